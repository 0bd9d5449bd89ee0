"""Pre/post-processing against the original LISA's outputs (tests/fixtures/lisa_reference)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from lisa_model.processing import (
    CLIP_IMAGE_SIZE,
    CLIP_MEAN,
    CLIP_STD,
    SAM_IMAGE_SIZE,
    SAM_PIXEL_MEAN,
    SAM_PIXEL_STD,
    PreparedImage,
    _clip_resize_and_crop,
    clip_preprocess,
    clip_resized_shape,
    postprocess_masks,
    prepare_image,
    sam_preprocess,
    sam_resize,
    sam_resized_shape,
)

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "lisa_reference"
EXPECTED = REFERENCE_DIR / "expected"
IMAGES = ["img0", "img1", "img2", "img3_large"]


def _sha256_f32(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array, dtype="<f4").tobytes()).hexdigest()


def _load_rgb(name: str) -> np.ndarray:
    with Image.open(REFERENCE_DIR / "inputs" / f"{name}.png") as image:
        return np.array(image.convert("RGB"))


@pytest.fixture(scope="module")
def preprocess_info() -> dict[str, dict]:
    entries = json.loads((EXPECTED / "preprocess.json").read_text())
    return {Path(entry["image"]).stem: entry for entry in entries}


@pytest.fixture(scope="module")
def preprocess_npz() -> dict[str, np.ndarray]:
    with np.load(EXPECTED / "preprocess.npz") as data:
        return {key: data[key] for key in data.files}


def test_constants() -> None:
    assert CLIP_IMAGE_SIZE == 224 and SAM_IMAGE_SIZE == 1024
    assert CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073)
    assert CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    assert SAM_PIXEL_MEAN == (123.675, 116.28, 103.53)
    assert SAM_PIXEL_STD == (58.395, 57.12, 57.375)


# --- CLIP ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGES)
def test_clip_preprocess_bit_exact(name, preprocess_info, preprocess_npz) -> None:
    rgb = _load_rgb(name)
    assert list(rgb.shape[:2]) == preprocess_info[name]["original_size"]
    pixels = clip_preprocess(rgb)
    assert pixels.dtype == torch.float32 and pixels.shape == (3, 224, 224)
    reference = preprocess_npz[f"{name}__clip_pixel_values"][0]
    np.testing.assert_array_equal(pixels.numpy(), reference)
    assert _sha256_f32(pixels.numpy()) == preprocess_info[name]["clip_pixel_values_sha256_f32"]


def test_clip_preprocess_arithmetic_order_matters() -> None:
    """Normalising in float64 instead of float32 changes bits: the exact test above can fail."""
    rgb = _load_rgb("img0")
    crop = _clip_resize_and_crop(rgb)
    other = ((crop * (1 / 255) - np.asarray(CLIP_MEAN)) / np.asarray(CLIP_STD)).astype(np.float32)
    assert not np.array_equal(other.transpose(2, 0, 1), clip_preprocess(rgb).numpy())


def _one_step_resize_and_crop(rgb: np.ndarray) -> np.ndarray:
    """The processor's own way: one PIL resize of the whole image, then the centre crop."""
    new_h, new_w = clip_resized_shape(*rgb.shape[:2])
    resized = Image.fromarray(rgb).resize((new_w, new_h), Image.Resampling.BICUBIC)
    top, left = (new_h - 224) // 2, (new_w - 224) // 2
    return np.asarray(resized)[top : top + 224, left : left + 224]


@pytest.mark.parametrize(
    "shape", [(240, 320), (360, 203), (1, 1), (3, 5), (224, 224), (9, 1200), (1200, 9), (97, 96)]
)
def test_clip_two_pass_resize_equals_one_pil_resize(shape) -> None:
    rgb = np.random.default_rng(sum(shape)).integers(0, 256, (*shape, 3), dtype=np.uint8)
    np.testing.assert_array_equal(_clip_resize_and_crop(rgb), _one_step_resize_and_crop(rgb))


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(240, 320, (224, 298)), (360, 203, (397, 224)), (5, 5, (224, 224)), (1, 3, (224, 672))],
)
def test_clip_resized_shape(height, width, expected) -> None:
    assert clip_resized_shape(height, width) == expected


def test_clip_preprocess_accepts_non_contiguous_input() -> None:
    rgb = _load_rgb("img1")
    view = np.asfortranarray(rgb)
    np.testing.assert_array_equal(clip_preprocess(view).numpy(), clip_preprocess(rgb).numpy())


def test_clip_tall_image_fallback() -> None:
    rng = np.random.default_rng(0)
    for shape in [(1200, 9, 3), (901, 5, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        exact = _one_step_resize_and_crop(rgb).astype(np.int16)
        boxed = _clip_resize_and_crop(rgb, max_pixels=0).astype(np.int16)
        assert boxed.shape == exact.shape == (224, 224, 3)
        assert np.abs(boxed - exact).max() <= 2
    # Wide images never need the fallback: exact whatever the budget.
    rgb = rng.integers(0, 256, (9, 1200, 3), dtype=np.uint8)
    np.testing.assert_array_equal(
        _clip_resize_and_crop(rgb, max_pixels=0), _one_step_resize_and_crop(rgb)
    )


# --- SAM ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", IMAGES)
def test_sam_resize_bit_exact(name, preprocess_info) -> None:
    info = preprocess_info[name]
    rgb = _load_rgb(name)
    resized = sam_resize(rgb)
    with Image.open(EXPECTED / info["sam_resized_png"]) as image:
        reference = np.array(image)
    assert resized.dtype == np.uint8
    assert list(resized.shape[:2]) == info["resize"]
    assert sam_resized_shape(*rgb.shape[:2]) == tuple(info["resize"])
    np.testing.assert_array_equal(resized, reference)
    assert hashlib.sha256(resized.tobytes()).hexdigest() == info["sam_resized_sha256_u8"]


@pytest.mark.parametrize("name", IMAGES)
def test_sam_preprocess_bit_exact(name, preprocess_info, preprocess_npz) -> None:
    info = preprocess_info[name]
    with Image.open(EXPECTED / info["sam_resized_png"]) as image:
        resized = np.array(image)
    sam_input = sam_preprocess(resized)
    assert sam_input.dtype == torch.float32 and sam_input.shape == (3, 1024, 1024)
    array = sam_input.numpy()
    assert _sha256_f32(array) == info["sam_input_sha256_f32"]
    assert float(sam_input.double().sum()) == pytest.approx(info["sam_input_sum"], abs=1e-6)
    height, width = info["resize"]
    assert not array[:, height:, :].any() and not array[:, :, width:].any()  # pad is exactly 0
    np.testing.assert_array_equal(
        array[:, :64, :64], preprocess_npz[f"{name}__sam_input_crop_topleft_64"]
    )
    corner = array[:, max(height - 32, 0) : height + 32, max(width - 32, 0) : width + 32]
    np.testing.assert_array_equal(
        corner, preprocess_npz[f"{name}__sam_input_crop_at_resize_corner"]
    )


@pytest.mark.parametrize("name", IMAGES)
def test_prepare_image_matches_reference(name, preprocess_info, preprocess_npz) -> None:
    info = preprocess_info[name]
    prepared = prepare_image(_load_rgb(name))
    assert isinstance(prepared, PreparedImage)
    assert prepared.original_hw == tuple(info["original_size"])
    assert prepared.resized_hw == tuple(info["resize"])
    np.testing.assert_array_equal(
        prepared.clip.numpy(), preprocess_npz[f"{name}__clip_pixel_values"][0]
    )
    assert _sha256_f32(prepared.sam.numpy()) == info["sam_input_sha256_f32"]


def test_sam_resized_shape_matches_upstream() -> None:
    rng = np.random.default_rng(1)
    sizes = [(1, 1), (1, 2048), (2048, 1), (1023, 1025), (575, 1024), (3000, 7)]
    sizes += [tuple(int(v) for v in rng.integers(1, 3000, 2)) for _ in range(200)]
    for height, width in sizes:
        expected = ResizeLongestSide.get_preprocess_shape(height, width, 1024)
        assert sam_resized_shape(height, width) == expected, (height, width)


def test_sam_resized_shape_never_zero() -> None:
    # Upstream rounds the short side to 0 here (and then fails to resize).
    assert ResizeLongestSide.get_preprocess_shape(1, 5000, 1024) == (0, 1024)
    assert sam_resized_shape(1, 5000) == (1, 1024)
    assert sam_resized_shape(5000, 1) == (1024, 1)


def test_sam_resize_matches_upstream_on_random_images() -> None:
    rng = np.random.default_rng(2)
    transform = ResizeLongestSide(1024)
    for shape in [(7, 11, 3), (300, 97, 3), (1100, 1500, 3)]:
        rgb = rng.integers(0, 256, shape, dtype=np.uint8)
        np.testing.assert_array_equal(sam_resize(rgb), transform.apply_image(rgb))


@pytest.mark.parametrize(
    ("height", "width"),
    [(1, 1), (1, 7), (7, 1), (2, 2), (1, 5000), (5000, 1), (3, 300), (700, 3), (10, 2500)],
)
def test_odd_sizes_keep_shapes(height, width) -> None:
    rgb = np.random.default_rng(height * 10007 + width).integers(
        0, 256, (height, width, 3), dtype=np.uint8
    )
    prepared = prepare_image(rgb)
    assert prepared.clip.shape == (3, 224, 224) and prepared.clip.dtype == torch.float32
    assert prepared.sam.shape == (3, 1024, 1024) and prepared.sam.dtype == torch.float32
    assert prepared.original_hw == (height, width)
    res_h, res_w = prepared.resized_hw
    assert max(res_h, res_w) == 1024 and min(res_h, res_w) >= 1
    assert torch.isfinite(prepared.clip).all() and torch.isfinite(prepared.sam).all()
    logits = postprocess_masks(torch.randn(2, 1, 256, 256), prepared.resized_hw, (height, width))
    assert logits.shape == (2, height, width) and logits.dtype == torch.float32


@pytest.mark.parametrize("shape", [(1, 20000, 3), (20000, 1, 3)])
def test_clip_very_extreme_aspect_ratio(shape) -> None:
    rgb = np.full(shape, 128, dtype=np.uint8)
    pixels = clip_preprocess(rgb)  # a whole-image resize would be 224 x 4480000 pixels
    assert pixels.shape == (3, 224, 224)
    expected = (np.float32(128 * (1 / 255)) - np.float32(CLIP_MEAN)) / np.float32(CLIP_STD)
    np.testing.assert_array_equal(
        pixels.numpy(), np.broadcast_to(expected[:, None, None], (3, 224, 224))
    )


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        (np.zeros((10, 10), dtype=np.uint8), ["(10, 10)", "uint8", "3 channels"]),
        (np.zeros((10, 10, 4), dtype=np.uint8), ["(10, 10, 4)", "RGB"]),
        (np.zeros((10, 10, 3), dtype=np.float32), ["float32", "uint8"]),
        (np.zeros((0, 10, 3), dtype=np.uint8), ["empty"]),
        ([[[0, 0, 0]]], ["numpy array", "list"]),
    ],
)
def test_bad_images_raise_clear_errors(bad, words) -> None:
    for function in (prepare_image, clip_preprocess, sam_resize):
        with pytest.raises(ValueError) as info:
            function(bad)
        for word in words:
            assert word in str(info.value)


def test_sam_preprocess_rejects_oversized_input() -> None:
    with pytest.raises(ValueError, match="1025x10"):
        sam_preprocess(np.zeros((1025, 10, 3), dtype=np.uint8))


# --- postprocess_masks -------------------------------------------------------------------------


def _low_res_cases(npz_name: str):
    info = {
        Path(e["image"]).stem: e for e in json.loads((EXPECTED / "preprocess.json").read_text())
    }
    with np.load(EXPECTED / npz_name) as data:
        for key in data.files:
            if key.endswith("__low_res_masks"):
                case = key[: -len("__low_res_masks")]
                image = info[case.split("_")[0]]
                yield (
                    case,
                    data[key],
                    data[f"{case}__pred_mask_logits"],
                    data[f"{case}__pred_mask_binary"],
                    tuple(image["resize"]),
                    tuple(image["original_size"]),
                )


@pytest.mark.parametrize("npz_name", ["generate.npz", "val_single.npz"])
def test_postprocess_masks_matches_reference(npz_name) -> None:
    cases = list(_low_res_cases(npz_name))
    assert len(cases) >= 5
    for case, low_res, expected, binary, resized_hw, original_hw in cases:
        logits = postprocess_masks(torch.from_numpy(low_res), resized_hw, original_hw)
        assert logits.dtype == torch.float32 and logits.shape == expected.shape, case
        np.testing.assert_allclose(logits.numpy(), expected, rtol=0, atol=1e-4, err_msg=case)
        confident = np.abs(expected) >= 1e-4
        np.testing.assert_array_equal((logits.numpy() > 0)[confident], binary[confident] > 0)


def test_postprocess_masks_layouts_and_dtypes() -> None:
    low_res = torch.randn(3, 1, 256, 256, generator=torch.Generator().manual_seed(0))
    out4 = postprocess_masks(low_res, (768, 1024), (240, 320))
    out3 = postprocess_masks(low_res[:, 0], (768, 1024), (240, 320))
    assert out4.shape == (3, 240, 320)
    torch.testing.assert_close(out3, out4, rtol=0, atol=0)
    out_bf16 = postprocess_masks(low_res.bfloat16(), (768, 1024), (240, 320))
    assert out_bf16.dtype == torch.float32
    empty = postprocess_masks(torch.zeros(0, 1, 256, 256), (768, 1024), (240, 320))
    assert empty.shape == (0, 240, 320)


def test_postprocess_masks_bad_arguments() -> None:
    with pytest.raises(ValueError, match="low_res"):
        postprocess_masks(torch.zeros(2, 3, 256, 256), (768, 1024), (240, 320))
    with pytest.raises(ValueError, match="resized_hw"):
        postprocess_masks(torch.zeros(1, 256, 256), (0, 1024), (240, 320))
    with pytest.raises(ValueError, match="original_hw"):
        postprocess_masks(torch.zeros(1, 256, 256), (768, 1024), (0, 320))
