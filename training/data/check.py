"""Checking the data of a run before it trains: every dataset opened, every entry looked at.

``lisa-train`` runs :func:`check_training_data` before the model loads and DeepSpeed starts (and
``lisa-train --check-data`` runs only this). Each dataset of the mixture and the validation set is
built (its index parsed: annotation JSONs, refs pickles, ``instances.json``, ``queries.jsonl``),
then every entry is checked without decoding pixels: the annotation parses with the keys and
types its format needs, the image exists and its header is readable, and a mask's size (label
image, RLE) matches its image. The first problem ends the check with one
:class:`~training.data.types.DataFormatError` naming the file and the entry.

What a header cannot tell (a truncated image body, label values outside the classes) shows up when
the sample is read during training, where :class:`~training.data.bad_samples.SkipBadSamples`
skips it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.data.mixture import DataConfig, MixtureDataset, build_dataset, build_val_dataset
from training.data.types import DataFormatError, image_size
from training.shapes.datasets import ShapesQueryDataset, ShapesValDataset


@dataclass
class DatasetCheck:
    """One dataset that passed: its name (type, source, split, folder) and entries checked."""

    name: str
    entries: int


@dataclass
class DataCheckReport:
    """What :func:`check_training_data` checked."""

    datasets: list[DatasetCheck] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def entries(self) -> int:
        return sum(d.entries for d in self.datasets)

    def summary(self) -> str:
        """A few lines: one per dataset, then the total."""
        lines = [f"  {d.name}: {d.entries} entries" for d in self.datasets]
        lines.append(
            f"data check: {len(self.datasets)} datasets, {self.entries} entries checked in "
            f"{self.seconds:.1f} s: OK"
        )
        return "\n".join(lines)


def _shapes_entries(dataset: ShapesQueryDataset | ShapesValDataset) -> Iterator[int]:
    """Every line of a shapes ``queries.jsonl``: parsed and validated, its image's header size
    as the line says."""
    file = dataset.file
    split_dir = file.path.parent
    for i in range(len(file)):
        record = file.record(i)
        image_path = split_dir / record.image
        actual = image_size(image_path, f"image of {file.path} line {i + 1}")
        if actual != (record.height, record.width):
            raise DataFormatError(
                f"image {image_path} is {actual[1]}x{actual[0]} (WxH) but {file.path} line "
                f"{i + 1} says {record.width}x{record.height}"
            )
        yield i


def entries_of(dataset: Any) -> Iterator[Any]:
    """The entry check of one (non-mixture) dataset: yields each entry once it passed."""
    if isinstance(dataset, (ShapesQueryDataset, ShapesValDataset)):
        return _shapes_entries(dataset)
    check = getattr(dataset, "check_entries", None)
    if check is None:
        raise TypeError(f"{type(dataset).__name__} has no check_entries()")
    return check()


def describe(dataset: Any) -> str:
    """A short name of a dataset for the summary (source, split and where it lives)."""
    source = getattr(dataset, "source", type(dataset).__name__)
    for attr in ("split_dir", "json_path"):
        if hasattr(dataset, attr):
            return f"{source} {getattr(dataset, attr)}"
    root = getattr(dataset, "root", None)
    data = getattr(dataset, "data", None)
    if data is not None and hasattr(data, "refs_path"):
        return f"{source} {data.refs_path} [{data.split}]"
    split = getattr(dataset, "split", None)
    where = Path(root) / split if root is not None and split else root
    return f"{source} {where}" if where is not None else str(source)


def leaves(dataset: Any) -> Iterator[Any]:
    """The source datasets inside a (nested) :class:`MixtureDataset`."""
    if isinstance(dataset, MixtureDataset):
        for member in dataset.datasets.values():
            yield from leaves(member)
    else:
        yield dataset


def check_training_data(
    data: DataConfig,
    val_dataset: str | None = None,
    val_dataset_dir: str | Path | None = None,
    progress: bool = False,
) -> DataCheckReport:
    """Open every dataset ``data`` names (and the validation set) and check every entry.

    Args:
        data: the run's data section.
        val_dataset: the validation set (``"ReasonSeg|val"``, ``"refcoco|unc|val"``) or ``None``.
        val_dataset_dir: its root (default: ``data.dataset_dir``).
        progress: show a progress bar per dataset.

    Raises:
        DataFileNotFoundError / DataFormatError: the first problem, naming the file and entry.
    """
    from tqdm import tqdm

    start = time.perf_counter()
    report = DataCheckReport()
    datasets = list(leaves(build_dataset(data)))
    if val_dataset:
        datasets.append(build_val_dataset(val_dataset_dir or data.dataset_dir, val_dataset))
    for dataset in datasets:
        name = describe(dataset)
        count = 0
        # On a terminal only (disable=None), and cleared when done, so that an error stays
        # the one line it is.
        with tqdm(desc=name, unit="entry", leave=False, disable=None if progress else True) as bar:
            for _ in entries_of(dataset):
                count += 1
                bar.update(1)
        report.datasets.append(DatasetCheck(name, count))
    report.seconds = time.perf_counter() - start
    return report
