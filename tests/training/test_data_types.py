"""Sample invariants and the shared readers of training.data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from training.data.types import (
    DataFileNotFoundError,
    DataFormatError,
    Sample,
    check_index,
    item_rng,
    read_image,
    read_json,
    read_label_png,
)


def _sample(
    n_masks: int = 1, answer: str = "It is [SEG].", question: str = "<image>\nq"
) -> Sample:
    return Sample(
        image_path="/data/x.jpg",
        image=np.zeros((4, 5, 3), np.uint8),
        conversations=[[(question, answer)]],
        masks=np.zeros((n_masks, 4, 5), np.uint8),
        label=np.zeros((4, 5), np.uint8),
        texts=["x"],
        is_sentence=False,
        source="test",
    )


def test_validate_accepts_a_consistent_sample() -> None:
    s = _sample()
    assert s.validate() is s
    assert s.original_size == (4, 5)
    assert s.num_seg_tokens == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"n_masks": 2}, "1 [SEG] tokens but there are 2 masks"),
        ({"n_masks": 0}, "1 [SEG] tokens but there are 0 masks"),
        ({"question": "q without image"}, "must start with '<image>'"),
        ({"question": "<image>\n<image>"}, "2 '<image>' tokens"),
    ],
)
def test_validate_rejects_inconsistent_samples(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match="/data/x.jpg") as info:
        _sample(**kwargs).validate()
    assert message in str(info.value)


def test_validate_checks_shapes_and_mask_values() -> None:
    s = _sample()
    s.masks = np.zeros((1, 4, 6), np.uint8)
    with pytest.raises(ValueError, match=r"masks must be \(N, 4, 5\) uint8"):
        s.validate()
    s = _sample()
    s.masks[0, 0, 0] = 2
    with pytest.raises(ValueError, match="only 0 and 1"):
        s.validate()
    s = _sample()
    s.label = np.zeros((4, 5), np.int64)
    with pytest.raises(ValueError, match="label must be"):
        s.validate()


def test_metric_targets_keep_ignore_pixels() -> None:
    s = _sample()
    s.masks[0, 1, 1] = 1
    s.label[0, :] = 255
    t = s.metric_targets()
    assert t.dtype == np.uint8 and t.shape == (1, 4, 5)
    assert (t[0, 0] == 255).all() and t[0, 1, 1] == 1 and t[0, 2:].sum() == 0


def test_item_rng_is_a_function_of_seed_epoch_idx() -> None:
    a = item_rng(3, 7).integers(1 << 30, size=4)
    assert (a == item_rng(3, 7).integers(1 << 30, size=4)).all()
    assert (a != item_rng(4, 7).integers(1 << 30, size=4)).any()
    assert (a != item_rng(3, 8).integers(1 << 30, size=4)).any()
    assert (a != item_rng(3, 7, epoch=1).integers(1 << 30, size=4)).any()


def test_check_index() -> None:
    assert check_index(2, 3, "d") == 2
    assert check_index(-1, 3, "d") == 2
    with pytest.raises(IndexError, match="index 3 out of range"):
        check_index(3, 3, "d")


def test_read_image_is_rgb(tmp_path: Path) -> None:
    rgb = np.zeros((3, 4, 3), np.uint8)
    rgb[..., 0] = 200  # red
    rgb[0, 0] = (1, 2, 3)
    Image.fromarray(rgb).save(tmp_path / "a.png")
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (3, 4, 3)
    assert (out == rgb).all()


def test_read_image_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.jpg"
    with pytest.raises(DataFileNotFoundError, match="missing.jpg") as info:
        read_image(missing)
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match="bad.jpg"):
        read_image(bad)


def test_read_label_png_keeps_palette_indices(tmp_path: Path) -> None:
    idx = np.array([[0, 1], [5, 255]], np.uint8)
    im = Image.fromarray(idx, mode="P")
    im.putpalette([(i * 7) % 256 for i in range(768)])
    im.save(tmp_path / "l.png")
    assert (read_label_png(tmp_path / "l.png") == idx).all()
    Image.fromarray(np.zeros((2, 2, 3), np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(DataFormatError, match=r"rgb.png.*single-channel"):
        read_label_png(tmp_path / "rgb.png")


def test_read_json_falls_back_to_cp1252(tmp_path: Path) -> None:
    p = tmp_path / "a.json"
    p.write_bytes('{"text": ["caf\u00e9"]}'.encode("cp1252"))
    assert read_json(p) == {"text": ["caf\u00e9"]}
    p.write_text("{not json")
    with pytest.raises(DataFormatError, match="a.json is not valid JSON"):
        read_json(p)
