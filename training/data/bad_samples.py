"""Skipping bad samples during training, up to a limit.

A sample that cannot be read (a truncated image, a label with values outside the classes, an
annotation that breaks the format) is replaced by the next item of the dataset. The replacement
carries what was wrong in :attr:`~training.data.types.Sample.skipped`, so the count reaches the
training process through the batch even when DataLoader workers read the data; the trainer adds
it up and stops the run with :class:`BadSampleLimitError` naming the last bad file once more than
``data.max_bad_samples`` were skipped.
"""

from __future__ import annotations

from typing import Any

from training.data.types import DataFormatError, Sample

#: What a bad sample raises: the datasets' format errors, I/O errors, broken invariants.
BAD_SAMPLE_ERRORS = (DataFormatError, OSError, ValueError)


class BadSampleLimitError(DataFormatError):
    """More bad samples than ``data.max_bad_samples``; the message names the last one."""


def limit_message(count: int, limit: int, last: str) -> str:
    return f"{count} bad samples, more than data.max_bad_samples = {limit}; the last: {last}"


class SkipBadSamples:
    """``dataset`` whose unreadable items are replaced by the following ones.

    Args:
        dataset: any map-style dataset of :class:`Sample` (``set_epoch`` is passed on).
        max_bad: replacements tried for one item before giving up (the trainer's limit on the
            whole run is the same number).
    """

    def __init__(self, dataset: Any, max_bad: int) -> None:
        if max_bad < 0:
            raise ValueError(f"max_bad must be >= 0, got {max_bad}")
        self.dataset = dataset
        self.max_bad = int(max_bad)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def __getitem__(self, idx: int) -> Sample:
        skipped: list[str] = []
        n = len(self.dataset)
        for step in range(self.max_bad + 1):
            try:
                sample = self.dataset[(int(idx) + step) % n]
            except BAD_SAMPLE_ERRORS as exc:  # logged where the batch arrives (the trainer)
                skipped.append(" ".join(str(exc).split()) or type(exc).__name__)
                continue
            if skipped:
                sample.skipped = (*sample.skipped, *skipped)
            return sample
        raise BadSampleLimitError(limit_message(len(skipped), self.max_bad, skipped[-1]))


def worker_message(exc: BaseException) -> str:
    """The message of an error raised in a DataLoader worker, without the worker's traceback
    (the loader re-raises it with ``"Caught X in DataLoader worker process N. Original
    Traceback ..."`` in front of the original ``"module.X: message"`` line)."""
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) <= 1:
        return lines[0] if lines else type(exc).__name__
    last = lines[-1]
    name = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return last[len(name) :] if last.startswith(name) else last
