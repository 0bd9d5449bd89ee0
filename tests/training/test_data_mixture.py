"""The seeded mixture and the factory that builds the paper's data from DataConfig."""

from __future__ import annotations

import json
import pickle
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from training.data import (
    DataConfig,
    MixtureDataset,
    ReasonSegValDataset,
    ReferSegValDataset,
    Sample,
    build_dataset,
    build_val_dataset,
)
from training.data.types import DataFileNotFoundError


class _Source:
    """A member dataset of fixed length whose samples say where they came from."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n, self.epochs = name, n, []

    def __len__(self) -> int:
        return self.n

    def set_epoch(self, epoch: int) -> None:
        self.epochs.append(epoch)

    def __getitem__(self, idx: int) -> Sample:
        if not 0 <= idx < self.n:
            raise IndexError(idx)
        return Sample(
            image_path=f"{self.name}/{idx}.jpg",
            image=np.zeros((2, 2, 3), np.uint8),
            conversations=[[("<image>\nq", "a")]],
            masks=np.zeros((0, 2, 2), np.uint8),
            label=np.zeros((2, 2), np.uint8),
            texts=[],
            is_sentence=False,
            source=self.name,
        )


def _members() -> dict[str, _Source]:
    return {n: _Source(n, k) for n, k in (("sem_seg", 7), ("refer_seg", 5), ("vqa", 3), ("r", 2))}


def test_rates_are_followed() -> None:
    mix = MixtureDataset(_members(), [9, 3, 3, 1], length=16000, seed=0)
    counts = Counter(mix.pick(i)[0] for i in range(len(mix)))
    for name, rate in zip(mix.names, (9, 3, 3, 1)):
        assert abs(counts[name] / 16000 - rate / 16) < 0.015
    indices = Counter(j for i in range(2000) for n, j in [mix.pick(i)] if n == "sem_seg")
    assert set(indices) == set(range(7))
    assert mix[5].source == mix.pick(5)[0]


def test_picks_are_deterministic_per_item() -> None:
    a = MixtureDataset(_members(), {"sem_seg": 1, "refer_seg": 1, "vqa": 1, "r": 1}, 50, seed=3)
    b = MixtureDataset(_members(), [1, 1, 1, 1], 50, seed=3)
    c = MixtureDataset(_members(), [1, 1, 1, 1], 50, seed=4)
    picks = [a.pick(i) for i in range(50)]
    assert picks == [b.pick(i) for i in range(50)]
    assert picks != [c.pick(i) for i in range(50)]
    b.set_epoch(2)
    assert picks != [b.pick(i) for i in range(50)]
    assert all(m.epochs == [2] for m in b.datasets.values())
    with pytest.raises(IndexError):
        a[50]


def test_zero_rates_and_bad_rates() -> None:
    mix = MixtureDataset(_members(), [1, 0, 0, 0], 100, seed=0)
    assert {mix.pick(i)[0] for i in range(100)} == {"sem_seg"}
    with pytest.raises(ValueError, match="3 rates for 4 datasets"):
        MixtureDataset(_members(), [1, 1, 1], 10)
    with pytest.raises(ValueError, match="rates are given for"):
        MixtureDataset(_members(), {"sem_seg": 1}, 10)
    with pytest.raises(ValueError, match="not all zero"):
        MixtureDataset(_members(), [0, 0, 0, 0], 10)
    with pytest.raises(ValueError, match="'vqa' is empty"):
        MixtureDataset({"vqa": _Source("vqa", 0)}, [1], 10)


def test_data_config_mirrors_the_original_flags(tmp_path: Path) -> None:
    cfg = DataConfig(str(tmp_path), sample_rates="9,3,3,1")
    assert cfg.sample_rates == (9.0, 3.0, 3.0, 1.0)
    assert cfg.dataset_types == ["sem_seg", "refer_seg", "vqa", "reason_seg"]
    with pytest.raises(ValueError, match="2 sample_rates"):
        DataConfig(str(tmp_path), sample_rates="9,3")
    with pytest.raises(ValueError, match=r"unknown types \['seg'\]"):
        DataConfig(str(tmp_path), datasets="seg||vqa", sample_rates=(1, 1))
    with pytest.raises(ValueError, match="sem_seg_data: unknown sources"):
        DataConfig(str(tmp_path), sem_seg_data="ade20k||partimagenet")
    with pytest.raises(ValueError, match="explanatory"):
        DataConfig(str(tmp_path), explanatory=2.0)


# --------------------------------------------------------------------------- a tiny paper layout


def _img(path: Path, h: int = 10, w: int = 12) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), np.full((h, w, 3), 70, np.uint8))


def _paper_layout(root: Path) -> None:
    # ReasonSeg train/val + explanatory
    rs = root / "reason_seg" / "ReasonSeg"
    anno = {
        "text": ["the cup"],
        "is_sentence": False,
        "shapes": [{"label": "target", "points": [[1, 1], [6, 1], [6, 5], [1, 5]]}],
    }
    for split in ("train", "val"):
        _img(rs / split / "r1.jpg")
        (rs / split / "r1.json").write_text(json.dumps(anno))
    (rs / "explanatory").mkdir()
    (rs / "explanatory" / "train.json").write_text("[]")
    # refcoco
    rf = root / "refer_seg"
    (rf / "refcoco").mkdir(parents=True)
    ref = {
        "ref_id": 1,
        "ann_id": 1,
        "image_id": 1,
        "split": "train",
        "category_id": 1,
        "sentences": [{"sent": "left cup", "sent_id": 1, "tokens": []}],
    }
    with (rf / "refcoco" / "refs(unc).p").open("wb") as f:
        pickle.dump([ref, {**ref, "ref_id": 2, "split": "val"}], f)
    (rf / "refcoco" / "instances.json").write_text(
        json.dumps(
            {
                "images": [
                    {
                        "id": 1,
                        "file_name": "COCO_train2014_000000000001.jpg",
                        "height": 10,
                        "width": 12,
                    }
                ],
                "annotations": [
                    {"id": 1, "image_id": 1, "segmentation": [[1, 1, 5, 1, 5, 5, 1, 5]]}
                ],
                "categories": [],
            }
        )
    )
    _img(rf / "images/mscoco/images/train2014/COCO_train2014_000000000001.jpg")
    # ADE20K
    _img(root / "ade20k/images/training/a.jpg")
    label = np.zeros((10, 12), np.uint8)
    label[:5] = 3
    (root / "ade20k/annotations/training").mkdir(parents=True)
    Image.fromarray(label).save(root / "ade20k/annotations/training/a.png")
    # LLaVA
    (root / "llava_dataset").mkdir()
    conv = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A cup."}]
    (root / "llava_dataset" / "llava_instruct_150k.json").write_text(
        json.dumps([{"id": "1", "image": "v.jpg", "conversations": conv}])
    )
    _img(root / "coco/train2017/v.jpg")


def test_build_dataset_from_a_paper_layout(tmp_path: Path) -> None:
    _paper_layout(tmp_path)
    cfg = DataConfig(
        str(tmp_path),
        sem_seg_data="ade20k",
        refer_seg_data="refcoco",
        sample_rates="1,1,1,1",
        samples_per_epoch=40,
        seed=0,
    )
    mix = build_dataset(cfg)
    assert len(mix) == 40 and mix.names == ["sem_seg", "refer_seg", "vqa", "reason_seg"]
    samples = [mix[i] for i in range(40)]
    assert {s.source for s in samples} == {"ade20k", "refcoco", "vqa", "reason_seg"}
    for s in samples:
        assert s.num_seg_tokens == s.masks.shape[0]
    again = build_dataset(cfg)
    assert [again[i].conversations for i in range(40)] == [s.conversations for s in samples]
    # Sources span the epoch, so the same image drawn twice is not the same sample twice.
    assert all(len(ds) == 40 for ds in mix.datasets.values())
    picks = [mix.pick(i) for i in range(40)]
    assert len(set(picks)) > 30


def test_build_dataset_groups_sources_uniformly(tmp_path: Path) -> None:
    _paper_layout(tmp_path)
    shutil.copytree(tmp_path / "refer_seg/refcoco", tmp_path / "refer_seg/refcoco+")
    cfg = DataConfig(
        str(tmp_path),
        datasets="refer_seg||vqa",
        sample_rates="1,0",
        refer_seg_data="refcoco||refcoco+",
        samples_per_epoch=60,
    )
    mix = build_dataset(cfg)
    group = mix.datasets["refer_seg"]
    assert isinstance(group, MixtureDataset) and group.names == ["refcoco", "refcoco+"]
    counts = Counter(mix[i].source for i in range(60))
    assert set(counts) == {"refcoco", "refcoco+"} and min(counts.values()) > 15
    with pytest.raises(ValueError, match="'ade20k' is listed twice"):
        DataConfig(str(tmp_path), sem_seg_data="ade20k||ade20k")


def test_missing_sources_are_named(tmp_path: Path) -> None:
    _paper_layout(tmp_path)
    cfg = DataConfig(str(tmp_path), refer_seg_data="refcoco||refcocog", samples_per_epoch=10)
    with pytest.raises(DataFileNotFoundError, match=r"sem_seg source 'cocostuff'.*cocostuff"):
        build_dataset(DataConfig(str(tmp_path), sem_seg_data="ade20k||cocostuff"))
    with pytest.raises(DataFileNotFoundError, match=r"refer_seg source 'refcocog'.*refs\(umd\).p"):
        build_dataset(DataConfig(**{**cfg.__dict__, "sem_seg_data": "ade20k"}))


def test_build_val_dataset(tmp_path: Path) -> None:
    _paper_layout(tmp_path)
    val = build_val_dataset(tmp_path, "ReasonSeg|val")
    assert isinstance(val, ReasonSegValDataset) and len(val) == 1
    refer = build_val_dataset(tmp_path, "refcoco|unc|val")
    assert isinstance(refer, ReferSegValDataset) and refer[0].texts == ["left cup"]
    with pytest.raises(ValueError, match="expected 'ReasonSeg|val'"):
        build_val_dataset(tmp_path, "ReasonSeg")


def test_build_dataset_with_the_shapes_query_set(tmp_path: Path) -> None:
    from training.shapes.writer import write_dataset

    write_dataset(tmp_path / "reason_seg" / "Shapes", {"train": 3, "val": 1}, seed=0)
    cfg = DataConfig(
        str(tmp_path),
        datasets="shapes||reason_seg",
        sample_rates="1,1",
        shapes_data="Shapes|train",
        reason_seg_data="Shapes|train",
        shapes_absent=0.0,
        shapes_answers="0,0,0,1",  # every present answer terse: "Green [SEG]."
        explanatory=-1,
        samples_per_epoch=20,
    )
    mix = build_dataset(cfg)
    samples = [mix[i] for i in range(20)]
    shaped = [s for s in samples if s.source == "shapes"]
    assert shaped and {s.source for s in samples} == {"shapes", "reason_seg"}
    for s in shaped:
        answers = [conv[0][1] for conv in s.conversations]
        assert len(answers) == 3 and all(a.count("[SEG]") == 1 for a in answers)
        assert all(not a.startswith(("It is", "Sure")) for a in answers), answers
        assert s.masks.shape[0] == 3
    # The validation set of the same folder is the ReasonSeg one (json queries).
    assert len(build_val_dataset(tmp_path, "Shapes|val")) >= 1
    with pytest.raises(ValueError, match="shapes_answers"):
        DataConfig(str(tmp_path), datasets="shapes", sample_rates="1", shapes_answers="0.5,0.5")
    with pytest.raises(ValueError, match="shapes_data"):
        DataConfig(str(tmp_path), datasets="shapes", sample_rates="1", shapes_data="Shapes")
