"""Visual instruction data (LLaVA-Instruct-150k): whole multi-turn conversations, no masks.

Layout (``root`` = ``<dataset_dir>``)::

    llava_dataset/llava_instruct_150k.json   [{"id", "image": "<file>.jpg",
                                               "conversations": [{"from": "human"|"gpt",
                                                                  "value": "..."}, ...]}, ...]
    coco/train2017/<file>.jpg
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lisa_model.prompts import IMAGE_TOKEN
from training.data.types import (
    DataFormatError,
    Sample,
    check_counts,
    check_index,
    image_size,
    read_image,
    read_json,
)

_ROLES = ("human", "gpt")


def move_image_token_first(text: str) -> str:
    """``"... <image> ..."`` -> ``"<image>\\n..."`` (stripped), as LLaVA's preprocessing does."""
    if IMAGE_TOKEN not in text:
        return text
    return (IMAGE_TOKEN + "\n" + text.replace(IMAGE_TOKEN, "").strip()).strip()


def conversation_rounds(messages: object, where: str) -> list[tuple[str, str]]:
    """``[(question, answer), ...]`` from LLaVA ``conversations`` (a leading ``gpt`` turn is
    dropped, as the original does).

    Raises:
        DataFormatError: naming ``where`` if turns do not alternate human/gpt or one is unanswered.
    """
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("value"), str) and m.get("from") in _ROLES
        for m in messages
    ):
        raise DataFormatError(
            f"{where}: 'conversations' must be a list of {{'from': 'human'|'gpt', 'value': str}}"
        )
    if messages and messages[0]["from"] != "human":
        messages = messages[1:]
    if not messages or len(messages) % 2:
        raise DataFormatError(
            f"{where}: expected alternating human/gpt turns ending with a gpt answer, "
            f"got {len(messages)} turns"
        )
    for j, m in enumerate(messages):
        if m["from"] != _ROLES[j % 2]:
            raise DataFormatError(
                f"{where}: turn {j} is from {m['from']!r}, expected {_ROLES[j % 2]!r}"
            )
    values = [move_image_token_first(m["value"]) for m in messages]
    return list(zip(values[0::2], values[1::2]))


class VQADataset:
    """LLaVA instruction samples (the original ``VQADataset``): one conversation with all rounds.

    ``"<image>"`` is moved to the front of its turn as ``"<image>\\n..."``; no masks (``N = 0``).
    Item ``idx`` is record ``idx % n_records``; there is nothing random to draw (``seed`` is kept
    for a uniform interface).

    Args:
        root: ``<dataset_dir>``.
        data_name: JSON file stem under ``llava_dataset/``.
        samples_per_epoch: dataset length (wrapping); defaults to the number of records.
    """

    source = "vqa"

    def __init__(
        self,
        root: str | Path,
        seed: int = 0,
        data_name: str = "llava_instruct_150k",
        samples_per_epoch: int | None = None,
    ) -> None:
        check_counts(samples_per_epoch=samples_per_epoch)
        self.root = Path(root)
        self.seed = int(seed)
        self.json_path = self.root / "llava_dataset" / f"{data_name}.json"
        self.image_root = self.root / "coco" / "train2017"
        records = read_json(self.json_path, "LLaVA instruction JSON")
        if not isinstance(records, list) or not records:
            raise DataFormatError(f"{self.json_path}: expected a non-empty list of records")
        self.records = records
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch or len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """No-op (nothing is drawn); kept for a uniform interface."""

    def _record(self, j: int) -> tuple[Path, list[tuple[str, str]]]:
        """``(image path, rounds)`` of record ``j``, its structure checked."""
        record = self.records[j]
        where = f"{self.json_path} record {j}"
        if not isinstance(record, dict) or not isinstance(record.get("image"), str):
            raise DataFormatError(f"{where}: expected an object with a string 'image'")
        rounds = conversation_rounds(record.get("conversations"), where)
        return self.image_root / record["image"], rounds

    def check_entries(self) -> Iterator[int]:
        """Check every record (structure, and its image's header); yields each index."""
        for j in range(len(self.records)):
            image_path, _ = self._record(j)
            image_size(image_path, f"image of {self.json_path} record {j}")
            yield j

    def __getitem__(self, idx: int) -> Sample:
        i = check_index(idx, len(self), "VQADataset")
        image_path, rounds = self._record(i % len(self.records))
        image = read_image(image_path)
        h, w = image.shape[:2]
        return Sample(
            image_path=str(image_path),
            image=image,
            conversations=[rounds],
            masks=np.zeros((0, h, w), dtype=np.uint8),
            label=np.zeros((h, w), dtype=np.uint8),
            texts=[q.replace(IMAGE_TOKEN, "").strip() for q, _ in rounds],
            is_sentence=False,
            source=self.source,
        ).validate()
