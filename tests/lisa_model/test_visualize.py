"""Result pictures: union masks, overlays, text banners, contact sheets."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from lisa_model.visualize import PALETTE, annotate, contact_sheet, overlay, union_mask_u8

H, W = 40, 60


def picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(H, W, 3)).astype(np.uint8)


def two_masks() -> np.ndarray:
    masks = np.zeros((2, H, W), dtype=bool)
    masks[0, 5:20, 5:25] = True
    masks[1, 22:35, 30:55] = True
    return masks


# ----------------------------------------------------------------------------- union


def test_union_mask_is_0_or_255_in_the_image_size() -> None:
    masks = two_masks()
    out = union_mask_u8(masks, (H, W))
    assert out.shape == (H, W) and out.dtype == np.uint8
    np.testing.assert_array_equal(out, np.where(masks.any(axis=0), 255, 0))


def test_union_of_no_masks_is_empty() -> None:
    out = union_mask_u8(np.zeros((0, H, W), dtype=bool), (H, W))
    assert out.shape == (H, W) and out.dtype == np.uint8 and not out.any()


def test_union_refuses_masks_of_another_size() -> None:
    with pytest.raises(ValueError, match="masks"):
        union_mask_u8(np.zeros((1, H, W + 1), dtype=bool), (H, W))


# ----------------------------------------------------------------------------- overlay


def test_overlay_tints_inside_outlines_edges_and_leaves_the_rest() -> None:
    rgb = picture()
    before = rgb.copy()
    masks = two_masks()
    out = overlay(rgb, masks, alpha=0.5, outline_px=2)
    np.testing.assert_array_equal(rgb, before)  # input untouched
    assert out.shape == (H, W, 3) and out.dtype == np.uint8

    outside = ~masks.any(axis=0)
    np.testing.assert_array_equal(out[outside], rgb[outside])

    for i, mask in enumerate(masks):
        color = np.array(PALETTE[i], dtype=np.uint8)
        inner = cv2.erode(mask.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0  # 3+ px in
        expected = np.rint(0.5 * rgb[inner].astype(float) + 0.5 * color).astype(np.uint8)
        np.testing.assert_array_equal(out[inner], expected)
        # the outline: the 2 pixel wide inner band along the edge, in the mask's solid colour
        band = mask & ~inner
        assert band.sum() > 0
        assert np.all(out[band] == color)


def test_overlay_with_nothing_to_draw_is_a_copy() -> None:
    rgb = picture(1)
    out = overlay(rgb, np.zeros((0, H, W), dtype=bool))
    np.testing.assert_array_equal(out, rgb)
    assert out is not rgb
    np.testing.assert_array_equal(overlay(rgb, two_masks(), alpha=0.0, outline_px=0), rgb)


def test_overlay_accepts_one_2d_mask_and_custom_colours() -> None:
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    mask = np.zeros((H, W), dtype=bool)
    mask[10:30, 10:30] = True
    out = overlay(rgb, mask, alpha=1.0, colors=[(0, 255, 0)], outline_px=0)
    assert np.all(out[mask] == (0, 255, 0)) and not out[~mask].any()


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(alpha=1.5), "alpha"),
        (dict(colors=[]), "colors"),
        (dict(outline_px=-1), "outline_px"),
        (dict(masks=np.zeros((1, H + 1, W), bool)), "masks"),
        (dict(rgb=np.zeros((H, W), np.uint8)), "rgb"),
    ],
)
def test_overlay_refuses_bad_arguments(kwargs: dict, words: str) -> None:
    args = dict(rgb=picture(), masks=two_masks()) | kwargs
    with pytest.raises(ValueError, match=words):
        overlay(**args)


# ----------------------------------------------------------------------------- annotate


def test_annotate_draws_a_banner_at_the_top_only() -> None:
    rgb = np.full((120, 200, 3), 200, dtype=np.uint8)
    out = annotate(rgb, "The knife is the thing to cut bread with.")
    assert out.shape == rgb.shape and out.dtype == np.uint8
    changed_rows = np.flatnonzero((out != rgb).any(axis=(1, 2)))
    assert changed_rows.size and changed_rows.min() == 0
    assert changed_rows.max() < 60  # at most half the image
    np.testing.assert_array_equal(out[60:], rgb[60:])
    assert (out[changed_rows] == 255).any()  # white text on the darkened band
    assert np.all(rgb == 200)  # input untouched


def test_annotate_wraps_long_text_onto_more_lines() -> None:
    rgb = np.full((300, 160, 3), 200, dtype=np.uint8)
    short = annotate(rgb, "a cup")
    long = annotate(rgb, "the red cup standing on the left side of the kitchen table " * 3)
    rows = lambda out: np.flatnonzero((out != rgb).any(axis=(1, 2))).max()  # noqa: E731
    assert rows(long) > 2 * rows(short)
    huge = annotate(rgb, "word " * 2000 + "\n" + "x" * 500)  # never overflows half the image
    assert rows(huge) < 150


def test_annotate_handles_empty_and_non_ascii_text() -> None:
    rgb = picture(2)
    np.testing.assert_array_equal(annotate(rgb, "  "), rgb)
    out = annotate(rgb, "où est la tasse ?\n[SEG]")
    assert out.shape == rgb.shape and (out != rgb).any()


# ----------------------------------------------------------------------------- contact sheet


def test_contact_sheet_grid_size_and_placement() -> None:
    images = [np.full((H, W, 3), 10 * (i + 1), dtype=np.uint8) for i in range(5)]
    sheet = contact_sheet(images, columns=3, pad=4)
    assert sheet.dtype == np.uint8
    assert sheet.shape == (2 * (H + 4) + 4, 3 * (W + 4) + 4, 3)
    np.testing.assert_array_equal(sheet[4 : 4 + H, 4 : 4 + W], images[0])
    second_row = sheet[4 + H + 4 : 4 + 2 * H + 4, 4 + W + 4 : 4 + 2 * W + 4]
    np.testing.assert_array_equal(second_row, images[4])
    assert np.all(sheet[-4:] == 32)  # background


def test_contact_sheet_labels_mixed_sizes_and_grey() -> None:
    images = [picture(3), np.zeros((20, 20), np.uint8), np.full((80, 30, 3), 255, np.uint8)]
    plain = contact_sheet(images, columns=2, cell_hw=(50, 50))
    labelled = contact_sheet(images, columns=2, cell_hw=(50, 50), labels=["a", "b", "long " * 20])
    assert plain.shape[1] == labelled.shape[1] == 2 * 54 + 4
    assert labelled.shape[0] > plain.shape[0]
    # the tall white image is scaled to 50 rows, keeping its aspect (about 19 columns)
    cell = plain[4 + 54 : 4 + 54 + 50, 4 : 4 + 50]
    assert np.all(cell[:, 25] == 255) and np.all(cell[:, 2] == 32)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        (dict(images=[]), "empty"),
        (dict(columns=0), "columns"),
        (dict(labels=["only one"]), "labels"),
        (dict(images=[np.zeros((4, 4, 3), np.float32)]), "uint8"),
        (dict(images=[np.zeros((4, 4, 2), np.uint8)]), r"\(H, W\)"),
    ],
)
def test_contact_sheet_refuses_bad_arguments(kwargs: dict, words: str) -> None:
    args = dict(images=[picture(), picture(1)]) | kwargs
    with pytest.raises(ValueError, match=words):
        contact_sheet(**args)


def test_annotate_starts_a_new_line_at_each_line_break() -> None:
    rgb = np.full((300, 400, 3), 200, dtype=np.uint8)
    rows = lambda out: np.flatnonzero((out != rgb).any(axis=(1, 2))).max()  # noqa: E731
    one = annotate(rgb, "> the red cup [SEG].")
    two = annotate(rgb, "> the red cup\n[SEG].")
    assert rows(two) > rows(one)  # a second line, not a "?" glyph on the first
    np.testing.assert_array_equal(annotate(rgb, "> the red cup\n[SEG]."), two)
