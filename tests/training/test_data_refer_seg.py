"""Referring segmentation readers on tiny REFER-format files (refs pickle + COCO instances)."""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from pycocotools import mask as mask_utils

from lisa_model.prompts import ANSWER_LIST, SHORT_QUESTION_LIST, render_conversation
from training.data.refer_seg import (
    ReferSegDataset,
    ReferSegValDataset,
    segmentation_to_mask,
)
from training.data.types import DataFileNotFoundError, DataFormatError

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "lisa_reference"
H, W = 16, 20


def _box_poly(x0: int, y0: int, x1: int, y1: int) -> list[float]:
    return [x0, y0, x1, y0, x1, y1, x0, y1]


def _rle(mask: np.ndarray) -> dict:
    enc = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": enc["size"], "counts": enc["counts"].decode()}


def _write_refer(
    root: Path,
    dataset: str,
    split_by: str,
    images: list[dict],
    anns: list[dict],
    refs: list[dict],
    image_dir: Path,
) -> None:
    (root / dataset).mkdir(parents=True, exist_ok=True)
    with (root / dataset / f"refs({split_by}).p").open("wb") as f:
        pickle.dump(refs, f)
    (root / dataset / "instances.json").write_text(
        json.dumps({"images": images, "annotations": anns, "categories": [{"id": 1, "name": "x"}]})
    )
    image_dir.mkdir(parents=True, exist_ok=True)
    for im in images:
        rgb = np.full((im["height"], im["width"], 3), 80, np.uint8)
        (image_dir / im["file_name"]).parent.mkdir(parents=True, exist_ok=True)
        assert cv2.imwrite(str(image_dir / im["file_name"]), rgb)


def _ref(ref_id: int, ann_id: int, image_id: int, split: str, sents: list[str]) -> dict:
    return {
        "ref_id": ref_id,
        "ann_id": ann_id,
        "image_id": image_id,
        "split": split,
        "category_id": 1,
        "sentences": [
            {"sent": s, "sent_id": ref_id * 10 + i, "tokens": s.split()}
            for i, s in enumerate(sents)
        ],
    }


def _coco_name(image_id: int) -> str:
    return f"COCO_train2014_{image_id:012d}.jpg"


@pytest.fixture()
def refer_root(tmp_path: Path) -> Path:
    root = tmp_path / "refer_seg"
    crowd = np.zeros((H, W), np.uint8)
    crowd[10:14, 15:19] = 1
    # an uncompressed RLE (iscrowd style): run lengths of the column-major mask, zeros first
    flat = crowd.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    images = [
        {"id": 7, "file_name": _coco_name(7), "height": H, "width": W},
        {"id": 3, "file_name": _coco_name(3), "height": H, "width": W},
        {"id": 9, "file_name": _coco_name(9), "height": H, "width": W},
    ]
    anns = [
        {"id": 100, "image_id": 7, "category_id": 1, "segmentation": [_box_poly(1, 1, 5, 4)]},
        {
            "id": 101,
            "image_id": 7,
            "category_id": 1,
            "segmentation": [_box_poly(8, 2, 10, 6), _box_poly(9, 4, 12, 8)],  # two parts
        },
        {
            "id": 102,
            "image_id": 3,
            "category_id": 1,
            "segmentation": {"size": [H, W], "counts": runs},
        },
        {"id": 103, "image_id": 3, "category_id": 1, "segmentation": []},
        {"id": 104, "image_id": 9, "category_id": 1, "segmentation": [_box_poly(0, 0, 3, 3)]},
    ]
    refs = [
        _ref(1, 100, 7, "train", ["The LEFT box ", "box on the left", "small thing", "top left"]),
        _ref(2, 101, 7, "train", ["two parts"]),
        _ref(3, 102, 3, "train", ["Crowd region"]),
        _ref(4, 103, 3, "train", ["nothing"]),
        _ref(5, 104, 9, "val", ["Corner Box", "  the corner "]),
        _ref(6, 100, 7, "testA", ["test sentence"]),
    ]
    _write_refer(
        root, "refcoco", "unc", images, anns, refs, root / "images/mscoco/images/train2014"
    )
    return root


def _box_mask(x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
    m = np.zeros((H, W), np.uint8)
    m[y0 : y1 + 1, x0 : x1 + 1] = 1
    return m


def test_segmentation_formats() -> None:
    box = _box_mask(2, 3, 6, 7)
    poly = segmentation_to_mask([_box_poly(2, 3, 6, 7)], H, W, "a")
    # pycocotools polygons cover the area inside the outline; the box corners land in it
    assert poly[3:8, 2:7].sum() >= 16 and poly[10:].sum() == 0
    assert (segmentation_to_mask(_rle(box), H, W, "b") == box).all()
    assert (segmentation_to_mask([_rle(box)], H, W, "c") == box).all()
    enc = mask_utils.encode(np.asfortranarray(box))  # counts as bytes
    assert (segmentation_to_mask(enc, H, W, "d") == box).all()
    assert segmentation_to_mask([], H, W, "e").sum() == 0
    overlap = segmentation_to_mask([_rle(box), _rle(box)], H, W, "f")
    assert overlap.max() == 1  # parts are or-ed, never summed to 2
    with pytest.raises(DataFormatError, match="annotation 5: segmentation must be"):
        segmentation_to_mask(["junk"], H, W, "annotation 5")
    with pytest.raises(DataFormatError, match="annotation 6: segmentation is 4x3"):
        segmentation_to_mask(_rle(np.zeros((3, 4), np.uint8)), H, W, "annotation 6")


def test_training_samples(refer_root: Path) -> None:
    ds = ReferSegDataset(refer_root, "refcoco", "train", seed=0, num_sentences=3)
    assert ds.source == "refcoco" and len(ds) == 2  # images 3 and 7 have train refs
    s = ds[1]  # image 7 (sorted ids: 3, 7)
    assert Path(s.image_path) == refer_root / "images/mscoco/images/train2014" / _coco_name(7)
    assert s.image.shape == (H, W, 3) and len(s.conversations) == 3
    assert len(set(s.texts)) == 3
    two_parts = segmentation_to_mask([_box_poly(8, 2, 10, 6), _box_poly(9, 4, 12, 8)], H, W, "x")
    left = segmentation_to_mask([_box_poly(1, 1, 5, 4)], H, W, "x")
    for ((question, answer),), text, mask in zip(s.conversations, s.texts, s.masks):
        assert question in [t.format(class_name=text.strip().lower()) for t in SHORT_QUESTION_LIST]
        assert answer in ANSWER_LIST
        expected = two_parts if text == "two parts" else left
        assert (mask == expected).all()
    assert s.masks.max() == 1 and s.label.sum() == 0

    s = ds[0]  # image 3: uncompressed RLE and an empty segmentation
    by_text = dict(zip(s.texts, s.masks))
    assert (by_text["Crowd region"] == _box_mask(15, 10, 18, 13)).all()
    assert by_text["nothing"].sum() == 0


def test_training_is_deterministic_per_item(refer_root: Path) -> None:
    def draws(seed: int) -> list:
        ds = ReferSegDataset(refer_root, "refcoco", seed=seed, samples_per_epoch=10)
        return [(ds[i].texts, ds[i].conversations) for i in range(10)]

    assert draws(5) == draws(5)
    assert draws(5) != draws(6)


def test_val_samples_enumerate_every_sentence(refer_root: Path) -> None:
    ds = ReferSegValDataset(refer_root, "refcoco", "val")
    assert len(ds) == 1
    s = ds[0]
    assert s.texts == ["corner box", "the corner"]
    assert s.conversations == [
        [
            (
                "<image>\n What is corner box in this image? Please output segmentation mask.",
                "[SEG].",
            )
        ],
        [
            (
                "<image>\n What is the corner in this image? Please output segmentation mask.",
                "[SEG].",
            )
        ],
    ]
    assert s.masks.shape == (2, H, W) and (s.masks[0] == s.masks[1]).all()
    assert len(ReferSegValDataset(refer_root, "refcoco", "testA")) == 1
    assert len(ReferSegValDataset(refer_root, "refcoco", "test")) == 1


def test_refcocog_uses_umd_and_refclef_its_own_images(tmp_path: Path) -> None:
    root = tmp_path / "refer_seg"
    images = [{"id": 1, "file_name": "19/19000.jpg", "height": H, "width": W}]
    anns = [
        {"id": 5, "image_id": 1, "category_id": 1, "segmentation": [_rle(_box_mask(1, 1, 2, 2))]}
    ]
    refs = [_ref(1, 5, 1, "train", ["a thing"])]
    _write_refer(root, "refclef", "unc", images, anns, refs, root / "images/saiapr_tc-12")
    s = ReferSegDataset(root, "refclef")[0]
    assert Path(s.image_path) == root / "images/saiapr_tc-12/19/19000.jpg"
    assert (s.masks[0] == _box_mask(1, 1, 2, 2)).all()

    images = [{"id": 2, "file_name": _coco_name(2), "height": H, "width": W}]
    anns = [{"id": 6, "image_id": 2, "category_id": 1, "segmentation": [_box_poly(1, 1, 4, 4)]}]
    _write_refer(
        root,
        "refcocog",
        "umd",
        images,
        anns,
        [_ref(1, 6, 2, "train", ["g"])],
        root / "images/mscoco/images/train2014",
    )
    assert ReferSegDataset(root, "refcocog")[0].texts == ["g"]
    with pytest.raises(DataFileNotFoundError, match=r"refs\(unc\).p"):
        ReferSegDataset(root, "refcocog", split_by="unc")


def test_val_reproduces_the_original_refer_conversations(tmp_path: Path) -> None:
    """The fixture's val_batched case: the 3 queries of img0 as refer-style conversations."""
    expected = json.loads((REFERENCE_DIR / "expected" / "val_batched.json").read_text())
    queries = json.loads((REFERENCE_DIR / "inputs" / "inputs.json").read_text())["queries"]
    root = tmp_path / "refer_seg"
    images = [{"id": 1, "file_name": _coco_name(1), "height": 240, "width": 320}]
    anns = [{"id": 1, "image_id": 1, "category_id": 1, "segmentation": [_box_poly(1, 1, 9, 9)]}]
    refs = [_ref(1, 1, 1, "val", [q["text"] for q in queries])]
    image_dir = root / "images/mscoco/images/train2014"
    _write_refer(root, "refcoco", "unc", images, anns, refs, image_dir)
    shutil.copy(REFERENCE_DIR / "inputs" / "img0.png", image_dir / _coco_name(1))
    s = ReferSegValDataset(root, "refcoco", "val")[0]
    rendered = [
        render_conversation(c, "llava_v1", use_im_start_end=False) for c in s.conversations
    ]
    assert rendered == expected["samples"][0]["conversations"]
    assert s.original_size == (240, 320) and s.masks.shape == (3, 240, 320)


def test_errors_name_the_file(refer_root: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match=r"refcoco\+.*refs\(unc\).p"):
        ReferSegDataset(refer_root, "refcoco+")
    with pytest.raises(ValueError, match="unknown refer dataset 'grefcoco'"):
        ReferSegDataset(refer_root, "grefcoco")
    (refer_root / "images/mscoco/images/train2014" / _coco_name(3)).unlink()
    ds = ReferSegDataset(refer_root, "refcoco")
    with pytest.raises(DataFileNotFoundError, match=_coco_name(3)):
        ds[0]
    with pytest.raises(DataFormatError, match="no refs in split 'testB'"):
        ReferSegValDataset(refer_root, "refcoco", "testB")
    (refer_root / "refcoco" / "refs(unc).p").write_bytes(b"garbage")
    with pytest.raises(DataFormatError, match=r"refs\(unc\).p is not a readable refs pickle"):
        ReferSegDataset(refer_root, "refcoco")


class _RunsCode:
    """Unpickled without restriction, this would create ``marker`` (and run any command)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("protocol", [0, 2, pickle.HIGHEST_PROTOCOL])
def test_a_refs_pickle_that_would_run_code_is_refused(
    refer_root: Path, tmp_path: Path, protocol: int
) -> None:
    marker = tmp_path / "MARKER"
    path = refer_root / "refcoco" / "refs(unc).p"
    refs = [_ref(1, 100, 7, "train", ["a box"]), {"payload": _RunsCode(marker)}]
    path.write_bytes(pickle.dumps(refs, protocol=protocol))
    with pytest.raises(
        DataFormatError, match=r"refs\(unc\)\.p: refused global (posix|os)\.system"
    ):
        ReferSegDataset(refer_root, "refcoco")
    assert not marker.exists()


def test_python2_refs_pickle_reads(refer_root: Path) -> None:
    """The REFER API's files are Python 2 pickles (protocol 0, byte strings; latin-1 bytes
    where a sentence is not ASCII): they hold only dicts, lists, strings and numbers."""
    path = refer_root / "refcoco" / "refs(unc).p"
    py2 = (
        b"(lp0\n(dp1\nS'ref_id'\np2\nI1\nsS'ann_id'\np3\nI100\nsS'image_id'\np4\nI7\n"
        b"sS'split'\np5\nS'train'\np6\nsS'category_id'\np7\nI1\nsS'sentences'\np8\n"
        b"(lp9\n(dp10\nS'sent'\np11\nS'caf\\xe9 table'\np12\nsS'sent_id'\np13\nI10\n"
        b"sS'tokens'\np14\n(lp15\nS'table'\np16\naL3L\nasasa."
    )
    path.write_bytes(py2)
    ds = ReferSegDataset(refer_root, "refcoco", num_sentences=1)
    sample = ds[0]
    assert sample.texts == ["café table"]
    assert ds.data.img_refs[7][0]["sentences"][0]["tokens"] == ["table", 3]
