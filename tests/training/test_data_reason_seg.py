"""ReasonSeg readers: labelme JSON masks, training draws, explanations, and the original's
validation samples reproduced from the reference fixture."""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from lisa_model.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    LONG_QUESTION_LIST,
    SHORT_QUESTION_LIST,
    render_conversation,
)
from training.data.reason_seg import (
    ReasonSegDataset,
    ReasonSegValDataset,
    polygons_to_mask,
    read_reason_seg_json,
)
from training.data.types import DataFileNotFoundError, DataFormatError

REFERENCE_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "lisa_reference"
H, W = 20, 24


def _rect(x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    return [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]


def _write_pair(split_dir: Path, name: str, anno: dict, hw: tuple[int, int] = (H, W)) -> None:
    split_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(name))
    cv2.imwrite(str(split_dir / f"{name}.jpg"), rng.integers(0, 255, (*hw, 3), dtype=np.uint8))
    (split_dir / f"{name}.json").write_text(json.dumps(anno))


SHORT = {
    "text": ["The Red Ball", "a Cup", "the dog", "a mat", "the lamp"],
    "is_sentence": False,
    "shapes": [
        {"label": "target", "points": _rect(2, 3, 10, 9)},
        {"label": "flag", "points": _rect(0, 0, 23, 19)},
    ],
}
LONG = {
    "text": ["Which object could roll away?"],
    "is_sentence": True,
    "shapes": [
        {"label": "target", "points": _rect(1, 1, 12, 12)},
        {"label": "Ignore_region", "points": _rect(4, 4, 6, 6)},
    ],
}


@pytest.fixture()
def reason_root(tmp_path: Path) -> Path:
    root = tmp_path / "reason_seg" / "ReasonSeg"
    _write_pair(root / "train", "a_short", SHORT)
    _write_pair(root / "train", "b_long", LONG)
    _write_pair(
        root / "train",
        "c_empty",
        {"text": ["nothing here"], "is_sentence": False, "shapes": []},
    )
    (root / "explanatory").mkdir()
    (root / "explanatory" / "train.json").write_text(
        json.dumps([{"image": "b_long.jpg", "query": "q", "outputs": "Because it is round."}])
    )
    return root


# --------------------------------------------------------------------------- mask rasterisation


def test_polygons_follow_the_labelme_rules() -> None:
    shapes = [
        {"label": "target", "points": _rect(2.9, 3.2, 10.7, 9.99)},  # int32 truncation: 2,3,10,9
        {"label": "IGNORE", "points": _rect(4, 4, 5, 5)},  # smaller, drawn last -> 255 inside
        {"label": "Flag", "points": _rect(0, 0, 23, 19)},  # skipped
    ]
    mask = polygons_to_mask(shapes, H, W, Path("x.json"))
    expected = np.zeros((H, W), np.uint8)
    expected[3:10, 2:11] = 1
    expected[4:6, 4:6] = 255
    assert (mask == expected).all()


# sha256[:16] of the (H, W) uint8 masks that OpenCV 4.8.0 (the original's version) draws with
# cv2.polylines(m, pts, True, 1, 1) + cv2.fillPoly(m, pts, 1) for the polygons of
# _random_polygons(). About half of them differ under OpenCV >= 4.9.
OPENCV_48_MASK_SHA256 = (
    "e5d50c30e9270cf5",
    "e5f0464c7c7064c0",
    "8a93a4a5d794b908",
    "c6038eabb77923c5",
    "b78d9d1e3e7c1ce0",
    "c38f1294a259a7e9",
    "5334c908088f874f",
    "57e3e18b274efc61",
    "e0b3a81433a4b885",
    "0154c3b19f379dd3",
    "70ef542639a133cb",
    "65b264926df79567",
    "c7b5e10b7adc15f6",
    "37c7f39a7fbacf07",
    "f6a17bea28f2bd96",
    "d1e461706439c144",
    "d3f6435381671fa4",
    "788085b7abdf5f35",
    "89561357c211c29b",
    "2b39e6f79e2eb02b",
    "256c92f11b27e185",
    "46dcb7a9e7bde1f5",
    "b54897c690330c32",
    "004483a86bda2d92",
    "072acd8899649f38",
    "f42a99231fffe0f1",
    "e1206ed74b519e97",
    "a3a0302302508417",
    "0053b808c3beb9d6",
    "e461bb8397b0173f",
    "1ba264f71b6efb10",
    "6f099750f8ff3605",
    "2991d7c00c1bfd1c",
    "7f074ba8c9f1f6e8",
    "964568e8ba123a72",
    "d8d562196d329027",
    "3d6a052e910d51cf",
    "75e1d8520e577a77",
    "c95cd5dc4a3fedb1",
    "ecb06aab425491c6",
    "5134091633d1d972",
    "5074395effb6a9d9",
    "81255e99d292ef60",
    "0a4c6ad4a756f886",
    "b4719c738dba4d62",
    "663448551361d220",
    "390c889edc8fe398",
    "163c02b23d95d3f0",
)


def _random_polygons() -> list[tuple[int, int, list[list[float]]]]:
    r = random.Random(20240601)
    out = []
    for t in range(48):
        h, w = r.randint(1, 64), r.randint(1, 64)
        k = r.randint(1, 24)
        lo_x, hi_x, lo_y, hi_y = {
            0: (-0.99, w + 0.99, -0.99, h + 0.99),  # inside (truncation toward zero)
            1: (-2.0 * w, 3.0 * w, -2.0 * h, 3.0 * h),  # mostly outside: clipped edges
            2: (0.0, 6.0, 0.0, 6.0),  # tiny, repeated and horizontal edges
            3: (-12.0, w + 12.0, -12.0, h + 12.0),
        }[t % 4]
        pts = [[r.uniform(lo_x, hi_x), r.uniform(lo_y, hi_y)] for _ in range(k)]
        out.append((h, w, pts))
    return out


def test_polygons_match_opencv_4_8() -> None:
    got = []
    for h, w, pts in _random_polygons():
        mask = polygons_to_mask([{"label": "target", "points": pts}], h, w, Path("r.json"))
        got.append(hashlib.sha256(mask.tobytes()).hexdigest()[:16])
    assert got == list(OPENCV_48_MASK_SHA256)


def test_larger_polygons_are_drawn_first() -> None:
    # A big ignore region listed after a small target: the target still wins (drawn later).
    shapes = [
        {"label": "target", "points": _rect(5, 5, 7, 7)},
        {"label": "ignore", "points": _rect(1, 1, 15, 15)},
    ]
    mask = polygons_to_mask(shapes, H, W, Path("x.json"))
    assert (mask[5:8, 5:8] == 1).all()
    assert mask[1, 1] == 255 and mask[16, 16] == 0
    assert set(np.unique(mask)) == {0, 1, 255}


def test_polygons_of_one_value_are_their_union() -> None:
    # No drawing order among shapes of one value: the result is each one drawn alone, or-ed.
    rects = [_rect(2, 2, 12, 9), _rect(6, 4, 20, 16), _rect(0, 14, 4, 19)]
    for label in ("target", "ignore"):
        shapes = [{"label": label, "points": r} for r in rects]
        alone = [polygons_to_mask([s], H, W, Path("u.json")) for s in shapes]
        expected = np.maximum.reduce(alone)
        for order in ([0, 1, 2], [2, 0, 1]):
            mask = polygons_to_mask([shapes[i] for i in order], H, W, Path("u.json"))
            np.testing.assert_array_equal(mask, expected)
        assert set(np.unique(expected)) == {0, 255 if label == "ignore" else 1}


def test_json_without_targets_gives_a_zero_mask(tmp_path: Path) -> None:
    p = tmp_path / "e.json"
    p.write_text(json.dumps({"text": ["x"], "is_sentence": False, "shapes": []}))
    anno = read_reason_seg_json(p, (H, W))
    assert anno.mask.shape == (H, W) and anno.mask.sum() == 0


@pytest.mark.parametrize(
    ("anno", "message"),
    [
        ({"text": ["x"], "is_sentence": False}, "missing key 'shapes'"),
        ({"text": ["x"], "is_sentence": "no", "shapes": []}, "'is_sentence' must be true/false"),
        ({"text": [1], "is_sentence": False, "shapes": []}, "'text' must be a list of strings"),
        (
            {"text": ["x"], "is_sentence": False, "shapes": [{"label": "target", "points": []}]},
            r"shapes\[0\].points must be a non-empty list",
        ),
        (
            {"text": ["x"], "is_sentence": False, "shapes": [{"points": [[1, 2]]}]},
            r"shapes\[0\] must be an object with 'label' and 'points'",
        ),
    ],
)
def test_malformed_json_names_the_file(tmp_path: Path, anno: dict, message: str) -> None:
    p = tmp_path / "broken.json"
    p.write_text(json.dumps(anno))
    with pytest.raises(DataFormatError, match=message) as info:
        read_reason_seg_json(p, (H, W))
    assert "broken.json" in str(info.value)


# --------------------------------------------------------------------------- the reference fixture


def _fixture_val_dir(tmp_path: Path) -> Path:
    """The fixture's ReasonSeg JSONs, each beside a copy of its image (``img0_q1_long.json`` ->
    ``img0.png``), laid out as a ReasonSeg split."""
    val = tmp_path / "ReasonSeg" / "val"
    val.mkdir(parents=True)
    for js in sorted((REFERENCE_DIR / "inputs" / "reason_seg_val").glob("*.json")):
        shutil.copy(js, val / js.name)
        image = js.name.split("_")[0] + ".png"
        shutil.copy(REFERENCE_DIR / "inputs" / image, val / f"{js.stem}.png")
    return val.parent


def test_val_dataset_reproduces_the_original(tmp_path: Path) -> None:
    expected = json.loads((REFERENCE_DIR / "expected" / "val_single.json").read_text())
    arrays = np.load(REFERENCE_DIR / "expected" / "val_single.npz")
    ds = ReasonSegValDataset(_fixture_val_dir(tmp_path), "val")
    assert len(ds) == len(expected["samples"]) == 9
    by_key = {Path(ds[i].image_path).stem: ds[i] for i in range(len(ds))}
    for ref in expected["samples"]:
        sample = by_key[ref["key"]]
        assert len(sample.conversations) == 1 and sample.masks.shape[0] == 1
        # The full prompt after <image> -> <im_start><image><im_end>, as the original's collate.
        assert render_conversation(sample.conversations[0], "llava_v1") == ref["conversation"][0]
        before = ref["conversation"][0].replace("<im_start><image><im_end>", "<image>")
        assert (
            render_conversation(sample.conversations[0], "llava_v1", use_im_start_end=False)
            == before
        )
        gt = arrays[f"{ref['key']}__gt_mask"]
        assert gt.shape == (1, *sample.original_size)
        assert (sample.label == gt[0]).all()
        assert (sample.metric_targets() == gt).all()
        assert (sample.masks[0] == (gt[0] == 1)).all()
        assert sorted(np.unique(sample.label).tolist()) == ref["gt_values"]


def test_val_question_forms(tmp_path: Path) -> None:
    root = tmp_path / "R"
    _write_pair(root / "val", "s", {**SHORT, "text": ["  The Red Ball ", "ignored"]})
    _write_pair(root / "val", "t", LONG)
    ds = ReasonSegValDataset(root)
    short, long_ = ds[0], ds[1]
    assert short.conversations == [
        [
            (
                "<image>\n What is The Red Ball in this image? Please output segmentation mask.",
                "[SEG].",
            )
        ]
    ]
    assert short.texts == ["The Red Ball"] and not short.is_sentence
    assert long_.conversations == [
        [("<image>\n Which object could roll away? Please output segmentation mask.", "[SEG].")]
    ]
    assert long_.is_sentence
    with pytest.raises(IndexError):
        ds[2]


# --------------------------------------------------------------------------- training samples


def test_training_samples(reason_root: Path) -> None:
    ds = ReasonSegDataset(reason_root, "train", seed=1, explanatory=-1)
    assert len(ds) == 3
    s = ds[0]  # a_short: 5 texts -> 3 distinct, SHORT template, lower-cased
    assert s.source == "reason_seg" and Path(s.image_path).name == "a_short.jpg"
    assert len(s.conversations) == 3 and len(set(s.texts)) == 3
    assert set(s.texts) <= set(SHORT["text"])
    for (round_,), text in zip(s.conversations, s.texts):
        question, answer = round_
        assert question in [t.format(class_name=text.lower()) for t in SHORT_QUESTION_LIST]
        assert answer in ANSWER_LIST
    target = np.zeros((H, W), np.uint8)
    target[3:10, 2:11] = 1
    assert s.masks.shape == (3, H, W) and (s.masks == target).all()
    assert (s.label == target).all()

    s = ds[1]  # b_long: one sentence, LONG template, ignore region excluded from the target
    assert s.is_sentence and len(s.conversations) == 1
    assert s.conversations[0][0][0] in [t.format(sent=LONG["text"][0]) for t in LONG_QUESTION_LIST]
    assert s.masks[0, 5, 5] == 0 and s.label[5, 5] == 255 and s.masks[0, 2, 2] == 1

    s = ds[2]  # no target shapes: all-zero mask, still one [SEG]
    assert s.masks.shape == (1, H, W) and s.masks.sum() == 0
    assert s.num_seg_tokens == 1


def test_training_is_deterministic_per_item(reason_root: Path) -> None:
    def draws(seed: int, epoch: int = 0) -> list:
        ds = ReasonSegDataset(reason_root, seed=seed, explanatory=-1, samples_per_epoch=12)
        ds.set_epoch(epoch)
        return [(ds[i].texts, ds[i].conversations) for i in range(len(ds))]

    a = draws(0)
    assert a == draws(0)
    assert a != draws(1)
    assert a != draws(0, epoch=1)
    # samples_per_epoch wraps over the images, with fresh draws for each item
    ds = ReasonSegDataset(reason_root, seed=0, explanatory=-1, samples_per_epoch=12)
    assert [Path(ds[i].image_path).name for i in (0, 3, 6)] == ["a_short.jpg"] * 3
    assert len({str(ds[i].conversations) for i in (0, 3, 6, 9)}) > 1
    with pytest.raises(IndexError):
        ds[12]


def test_explanatory_text_only_answers(reason_root: Path) -> None:
    ds = ReasonSegDataset(reason_root, seed=0, explanatory=1.0)
    s = ds[1]  # b_long is in the explanatory JSON
    text = LONG["text"][0]
    assert s.conversations == [[("<image>\n" + text, "Because it is round.")]]
    assert s.masks.shape == (0, H, W)
    assert ds[0].masks.shape[0] == 3  # images without explanation are unchanged


def test_explanatory_answer_mix(reason_root: Path) -> None:
    ds = ReasonSegDataset(reason_root, seed=0, explanatory=0.0, samples_per_epoch=60)
    text = LONG["text"][0]
    kinds = set()
    for i in range(1, 60, 3):  # every item that reads b_long.jpg
        ((question, answer),) = ds[i].conversations[0]
        assert ds[i].masks.shape[0] == 1
        if answer in ANSWER_LIST:
            assert question in [t.format(sent=text) for t in LONG_QUESTION_LIST]
            kinds.add("plain")
        else:
            assert question in ["<image>\n" + text + " " + q for q in EXPLANATORY_QUESTION_LIST]
            assert answer in [a + " Because it is round." for a in ANSWER_LIST]
            kinds.add("explained")
    assert kinds == {"plain", "explained"}


def test_missing_explanatory_json_is_named(tmp_path: Path) -> None:
    root = tmp_path / "R"
    _write_pair(root / "train", "a", SHORT)
    with pytest.raises(DataFileNotFoundError, match=r"explanatory[/\\]train.json"):
        ReasonSegDataset(root, explanatory=0.1)
    assert len(ReasonSegDataset(root, explanatory=-1)) == 1


def test_layout_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match="nowhere"):
        ReasonSegValDataset(tmp_path / "nowhere")
    split = tmp_path / "R" / "val"
    split.mkdir(parents=True)
    (split / "orphan.json").write_text(json.dumps(SHORT))
    with pytest.raises(DataFileNotFoundError, match=r"orphan.json.*orphan.jpg"):
        ReasonSegValDataset(tmp_path / "R")
    (split / "orphan.jpg").write_bytes(b"garbage")
    ds = ReasonSegValDataset(tmp_path / "R")
    with pytest.raises(DataFormatError, match="orphan.jpg"):
        ds[0]
    _write_pair(tmp_path / "E" / "val", "e", {**SHORT, "text": []})
    with pytest.raises(DataFormatError, match=r"e.json.*'text' is empty"):
        ReasonSegValDataset(tmp_path / "E")[0]
