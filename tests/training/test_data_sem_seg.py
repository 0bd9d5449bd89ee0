"""Semantic/part segmentation readers on tiny files in the ADE20K, COCO-Stuff, Mapillary,
PACO-LVIS and PASCAL-Part layouts."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from lisa_model.prompts import ANSWER_LIST, SHORT_QUESTION_LIST
from training.data.sem_seg import (
    SemSegDataset,
    load_ade20k_classes,
    load_cocostuff_classes,
)
from training.data.types import DataFileNotFoundError, DataFormatError

H, W = 12, 16


def _image(path: Path, h: int = H, w: int = W) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), 90, np.uint8))


def _label(path: Path, label: np.ndarray, palette: bool = False) -> None:
    """An 8-bit index PNG (mode ``L``), or a palette PNG (mode ``P``) as Mapillary ships."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lab = np.ascontiguousarray(label, dtype=np.uint8)
    if palette:
        im = Image.frombytes("P", (lab.shape[1], lab.shape[0]), lab.tobytes())
        im.putpalette([(i * 37) % 256 for i in range(768)])
    else:
        im = Image.fromarray(lab)
    im.save(path)
    with Image.open(path) as check:
        assert check.mode == ("P" if palette else "L")


def _check_questions(sample) -> None:  # noqa: ANN001
    assert len(sample.conversations) == len(sample.texts) == sample.masks.shape[0]
    for ((question, answer),), text in zip(sample.conversations, sample.texts):
        assert question in [t.format(class_name=text.lower()) for t in SHORT_QUESTION_LIST]
        assert answer in ANSWER_LIST


# --------------------------------------------------------------------------- ADE20K


def _ade_root(tmp_path: Path) -> Path:
    root = tmp_path / "data"
    empty = np.zeros((H, W), np.uint8)  # only "other" (0) -> nothing to segment
    label = np.zeros((H, W), np.uint8)
    label[0:4] = 1  # wall
    label[4:8] = 4  # floor
    label[8:10] = 150  # flag
    label[10:, :4] = 255
    for name, lab in (("ADE_train_0001", empty), ("ADE_train_0002", label)):
        _image(root / "ade20k/images/training" / f"{name}.jpg")
        _label(root / "ade20k/annotations/training" / f"{name}.png", lab)
    return root


def test_ade20k_class_list() -> None:
    classes = load_ade20k_classes()
    assert len(classes) == 150 and len(set(classes)) == 150
    assert classes[:4] == ["wall", "building", "sky", "floor"] and classes[-1] == "flag"


def test_ade20k_samples(tmp_path: Path) -> None:
    root = _ade_root(tmp_path)
    ds = SemSegDataset(root, "ade20k", seed=0, num_classes_per_sample=3)
    assert len(ds) == 2
    s = ds[0]  # image 0 has only "other": replaced by the next image
    assert Path(s.image_path).name == "ADE_train_0002.jpg" and s.source == "ade20k"
    # 0 -> 255, k -> k-1, 255 stays ignore
    assert s.label[0, 0] == 0 and s.label[5, 0] == 3 and s.label[9, 0] == 149
    assert s.label[11, 0] == 255 and s.label[11, 8] == 255
    assert sorted(s.texts) == ["flag", "floor", "wall"]
    ids = {"wall": 0, "floor": 3, "flag": 149}
    for text, mask in zip(s.texts, s.masks):
        assert (mask == (s.label == ids[text])).all()
    _check_questions(s)
    ds2 = SemSegDataset(root, "ade20k", seed=0, num_classes_per_sample=2, samples_per_epoch=8)
    assert all(len(ds2[i].texts) == 2 for i in range(8))
    assert len({tuple(ds2[i].texts) for i in range(8)}) > 1
    assert [ds2[i].conversations for i in range(8)] == [ds2[i].conversations for i in range(8)]
    other = SemSegDataset(root, "ade20k", seed=1, num_classes_per_sample=2, samples_per_epoch=8)
    assert [ds2[i].conversations for i in range(8)] != [other[i].conversations for i in range(8)]


def test_ade20k_bad_labels_are_named(tmp_path: Path) -> None:
    root = _ade_root(tmp_path)
    _label(root / "ade20k/annotations/training/ADE_train_0002.png", np.full((H, W), 200))
    ds = SemSegDataset(root, "ade20k")
    with pytest.raises(DataFormatError, match=r"ADE_train_0002.png: values \[199\]"):
        ds[1]
    (root / "ade20k/annotations/training/ADE_train_0001.png").unlink()
    with pytest.raises(DataFileNotFoundError, match="ADE_train_0001.png"):
        ds[0]


def test_nothing_to_segment_anywhere(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _image(root / "ade20k/images/training/a.jpg")
    _label(root / "ade20k/annotations/training/a.png", np.zeros((H, W)))
    with pytest.raises(DataFormatError, match="no image has anything to segment"):
        SemSegDataset(root, "ade20k")[0]


# --------------------------------------------------------------------------- COCO-Stuff


def test_cocostuff_samples(tmp_path: Path) -> None:
    root = tmp_path / "data"
    (root / "cocostuff").mkdir(parents=True)
    (root / "cocostuff" / "cocostuff_classes.txt").write_text(
        "0: unlabeled\n1: person\n2: bicycle\n3: wall-brick\n4: sky-other\n5: grass\n"
    )
    assert load_cocostuff_classes(root / "cocostuff" / "cocostuff_classes.txt") == [
        "person", "bicycle", "wall-brick", "sky-other", "grass",
    ]  # fmt: skip
    label = np.full((H, W), 255, np.uint8)
    label[:3] = 0  # person
    label[3:6] = 2  # wall-brick -> ignore
    label[6:9] = 3  # sky-other -> ignore
    label[9:] = 4  # grass
    _label(root / "cocostuff/train2017/000000000042.png", label)
    _image(root / "coco/train2017/000000000042.jpg")
    s = SemSegDataset(root, "cocostuff", seed=0)[0]
    assert Path(s.image_path) == root / "coco/train2017/000000000042.jpg"
    assert sorted(s.texts) == ["grass", "person"]
    assert (s.label[3:9] == 255).all() and (s.label[:3] == 0).all() and (s.label[9:] == 4).all()
    _check_questions(s)
    with pytest.raises(DataFileNotFoundError, match="other_classes.txt"):
        SemSegDataset(root, "cocostuff", classes_file=root / "other_classes.txt")


# --------------------------------------------------------------------------- Mapillary


def test_mapillary_samples_with_palette_labels(tmp_path: Path) -> None:
    root = tmp_path / "data"
    config = {
        "labels": [{"name": f"n{i}", "readable": r} for i, r in enumerate(["Bird", "Road", "Sky"])]
    }
    (root / "mapillary").mkdir(parents=True)
    (root / "mapillary" / "config_v2.0.json").write_text(json.dumps(config))
    label = np.zeros((H, W), np.uint8)
    label[6:] = 2
    _label(root / "mapillary/training/v2.0/labels/abc.png", label, palette=True)
    _image(root / "mapillary/training/images/abc.jpg")
    s = SemSegDataset(root, "mapillary", seed=3)[0]
    assert Path(s.image_path).name == "abc.jpg"
    assert sorted(s.texts) == ["bird", "sky"]
    for text, mask in zip(s.texts, s.masks):
        assert mask.sum() == (H // 2) * W and (mask[6:] == (text == "sky")).all()


# ------------------------------------------------------------------ PACO-LVIS / PASCAL-Part


def _poly(x0: int, y0: int, x1: int, y1: int) -> list[list[float]]:
    return [[x0, y0, x1, y0, x1, y1, x0, y1]]


def _coco_parts(path: Path, categories: list[str], anns: list[tuple[int, int, list]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {
        "images": [
            {"id": 1, "file_name": "train2017/000000000001.jpg", "height": H, "width": W},
            {"id": 2, "file_name": "train2017/000000000002.jpg", "height": H, "width": W},
        ],
        "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories)],
        "annotations": [
            {"id": 10 + k, "image_id": im, "category_id": c, "segmentation": seg}
            for k, (im, c, seg) in enumerate(anns)
        ],
    }
    path.write_text(json.dumps(data))


def test_paco_lvis_names_and_masks(tmp_path: Path) -> None:
    root = tmp_path / "data"
    _coco_parts(
        root / "vlpart/paco/annotations/paco_lvis_v1_train.json",
        ["car_(automobile)", "car_(automobile):wheel", "bottle:cap_(bottle)"],
        [(2, 1, _poly(0, 0, 5, 5)), (2, 2, _poly(6, 6, 9, 9)), (2, 3, _poly(10, 0, 14, 3))],
    )
    _image(root / "coco/train2017/000000000001.jpg")
    _image(root / "coco/train2017/000000000002.jpg")
    ds = SemSegDataset(root, "paco_lvis", seed=0, samples_per_epoch=40)
    seen = set()
    for i in range(40):
        s = ds[i]
        assert Path(s.image_path).name == "000000000002.jpg"  # image 1 has no annotations
        assert len(s.texts) == 3
        _check_questions(s)
        seen.update(s.texts)
        for text, mask in zip(s.texts, s.masks):
            if text == "car":
                assert mask[2, 2] == 1 and mask[8, 8] == 0
            if "wheel" in text:
                assert mask[8, 8] == 1 and mask[2, 2] == 0
    assert seen == {
        "car",
        "car wheel",
        "the wheel of the car",
        "bottle cap",
        "the cap of the bottle",
    }


def test_pascal_part(tmp_path: Path) -> None:
    root = tmp_path / "data"
    base = root / "vlpart/pascal_part"
    _coco_parts(base / "train.json", ["dog:head", "dog:leg"], [(1, 1, _poly(0, 0, 4, 4))])
    _image(base / "VOCdevkit/VOC2010/JPEGImages/train2017/000000000001.jpg")
    s = SemSegDataset(root, "pascal_part", seed=0)[0]
    assert s.texts[0] in ("dog head", "the head of the dog") and s.source == "pascal_part"
    _coco_parts(base / "train.json", ["dog"], [(1, 1, _poly(0, 0, 4, 4))])
    with pytest.raises(
        DataFormatError, match=r"train.json: category name 'dog': expected 'obj:part'"
    ):
        SemSegDataset(root, "pascal_part")


def test_unknown_sources(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="partimagenet.*no loader"):
        SemSegDataset(tmp_path, "partimagenet")
    with pytest.raises(ValueError, match="unknown sem_seg source 'cityscapes'"):
        SemSegDataset(tmp_path, "cityscapes")
    with pytest.raises(DataFileNotFoundError, match=r"ade20k[/\\]images[/\\]training"):
        SemSegDataset(tmp_path, "ade20k")
