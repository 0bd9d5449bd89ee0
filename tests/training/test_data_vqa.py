"""LLaVA-Instruct reader on a tiny llava_instruct_150k.json."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from lisa_model.prompts import render_conversation
from training.data.types import DataFileNotFoundError, DataFormatError
from training.data.vqa import VQADataset, move_image_token_first

RECORDS = [
    {
        "id": "1",
        "image": "000000000001.jpg",
        "conversations": [
            {"from": "human", "value": "What is on the table?\n<image>"},
            {"from": "gpt", "value": "A red cup."},
            {"from": "human", "value": "What colour is it?"},
            {"from": "gpt", "value": "Red."},
        ],
    },
    {
        "id": "2",
        "image": "000000000002.jpg",
        "conversations": [
            {"from": "gpt", "value": "A stray opening turn."},
            {"from": "human", "value": "<image>\nDescribe the scene."},
            {"from": "gpt", "value": "A kitchen."},
        ],
    },
]


def _write(root: Path, records: list) -> None:
    (root / "llava_dataset").mkdir(parents=True, exist_ok=True)
    (root / "llava_dataset" / "llava_instruct_150k.json").write_text(json.dumps(records))
    for name in ("000000000001.jpg", "000000000002.jpg"):
        path = root / "coco" / "train2017" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), np.full((9, 13, 3), 50, np.uint8))


def test_move_image_token_first() -> None:
    assert move_image_token_first("What is this?\n<image>") == "<image>\nWhat is this?"
    assert move_image_token_first(" <image> hi ") == "<image>\nhi"
    assert move_image_token_first("no image") == "no image"


def test_vqa_samples(tmp_path: Path) -> None:
    _write(tmp_path, RECORDS)
    ds = VQADataset(tmp_path, seed=0)
    assert len(ds) == 2
    s = ds[0]
    assert s.source == "vqa" and Path(s.image_path) == tmp_path / "coco/train2017/000000000001.jpg"
    assert s.conversations == [
        [
            ("<image>\nWhat is on the table?", "A red cup."),
            ("What colour is it?", "Red."),
        ]
    ]
    assert s.masks.shape == (0, 9, 13) and s.label.shape == (9, 13)
    assert s.texts == ["What is on the table?", "What colour is it?"]
    assert render_conversation(s.conversations[0], "llava_v1", use_im_start_end=False) == (
        "A chat between a curious human and an artificial intelligence assistant. The assistant "
        "gives helpful, detailed, and polite answers to the human's questions. USER: <image>\n"
        "What is on the table? ASSISTANT: A red cup.</s>"
        "USER: What colour is it? ASSISTANT: Red.</s>"
    )
    assert ds[1].conversations == [[("<image>\nDescribe the scene.", "A kitchen.")]]
    wrapped = VQADataset(tmp_path, samples_per_epoch=5)
    assert len(wrapped) == 5 and wrapped[4].image_path == ds[0].image_path


@pytest.mark.parametrize(
    ("conversations", "message"),
    [
        (
            [{"from": "human", "value": "<image>\nq"}, {"from": "human", "value": "q2"}],
            "turn 1 is from 'human', expected 'gpt'",
        ),
        ([{"from": "human", "value": "<image>\nq"}], "ending with a gpt answer, got 1 turns"),
        ([{"from": "robot", "value": "x"}], "'conversations' must be a list"),
        (
            [{"from": "human", "value": "<image>\nq"}, {"from": "gpt", "value": "It is [SEG]."}],
            r"1 \[SEG\] tokens but there are 0 masks",
        ),
    ],
)
def test_malformed_records_are_named(tmp_path: Path, conversations: list, message: str) -> None:
    _write(tmp_path, [{"id": "x", "image": "000000000001.jpg", "conversations": conversations}])
    with pytest.raises(ValueError, match=message) as info:
        VQADataset(tmp_path)[0]
    where = ("000000000001.jpg", "llava_instruct_150k.json record 0")
    assert any(w in str(info.value) for w in where)


def test_missing_files_are_named(tmp_path: Path) -> None:
    with pytest.raises(DataFileNotFoundError, match=r"llava_dataset[/\\]llava_instruct_150k.json"):
        VQADataset(tmp_path)
    _write(tmp_path, [{**RECORDS[0], "image": "missing.jpg"}])
    with pytest.raises(DataFileNotFoundError, match="missing.jpg"):
        VQADataset(tmp_path)[0]
    _write(tmp_path, [{"id": "x", "conversations": RECORDS[0]["conversations"]}])
    with pytest.raises(
        DataFormatError, match="record 0: expected an object with a string 'image'"
    ):
        VQADataset(tmp_path)[0]
