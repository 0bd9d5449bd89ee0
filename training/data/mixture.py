"""The seeded dataset mixture and the factory that builds the paper's training/validation data.

``DataConfig`` mirrors the original ``train_ds.py`` string options (``--dataset
"sem_seg||refer_seg||vqa||reason_seg" --sample_rates "9,3,3,1" --sem_seg_data ...``), so a user
points ``dataset_dir`` at the paper's layout (the original's README, "Training data") and gets the
same data: a type is drawn with the sample rates, then a source within it uniformly, then an image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from training.data.reason_seg import ReasonSegDataset, ReasonSegValDataset
from training.data.refer_seg import REFER_DATASETS, ReferSegDataset, ReferSegValDataset
from training.data.sem_seg import SEM_SEG_SOURCES, SemSegDataset
from training.data.types import DataFileNotFoundError, Sample, check_index, item_rng
from training.data.vqa import VQADataset
from training.shapes.datasets import ShapesQueryDataset, ShapesQueryMix

DATASET_TYPES = ("sem_seg", "refer_seg", "vqa", "reason_seg", "shapes")


class SampleDataset(Protocol):
    """What the mixture needs of a dataset."""

    def __len__(self) -> int: ...

    def __getitem__(self, idx: int) -> Sample: ...


class MixtureDataset:
    """Item ``idx`` -> ``item_rng(seed, idx, epoch)`` picks a dataset with the normalised
    ``rates``, then a uniform index within it.

    Args:
        datasets: ``{name: dataset}``; the names are only for logs and :meth:`pick`.
        rates: per-name weights (mapping with the same keys, or a sequence in ``datasets``
            order); normalised to probabilities. Zero rates are allowed.
        length: ``len()`` of the mixture (samples per epoch).
        seed: base seed of the per-item generators.
    """

    def __init__(
        self,
        datasets: Mapping[str, SampleDataset],
        rates: Mapping[str, float] | Sequence[float],
        length: int,
        seed: int = 0,
    ) -> None:
        self.names = list(datasets)
        if not self.names:
            raise ValueError("MixtureDataset needs at least one dataset")
        if isinstance(rates, Mapping):
            if set(rates) != set(self.names):
                raise ValueError(
                    f"rates are given for {sorted(rates)} but the datasets are "
                    f"{sorted(self.names)}"
                )
            weights = [float(rates[n]) for n in self.names]
        else:
            weights = [float(r) for r in rates]
            if len(weights) != len(self.names):
                raise ValueError(
                    f"{len(weights)} rates for {len(self.names)} datasets {self.names}; "
                    "expected one rate per dataset"
                )
        w = np.asarray(weights, dtype=np.float64)
        if (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
            raise ValueError(f"rates must be finite, >= 0 and not all zero, got {weights}")
        self.probs = w / w.sum()
        self.datasets = dict(datasets)
        for name, p in zip(self.names, self.probs):
            if p > 0 and len(self.datasets[name]) == 0:
                raise ValueError(f"dataset {name!r} is empty but has sample rate {p:.3f}")
        if length < 1:
            raise ValueError(f"length must be >= 1, got {length}")
        self.length = int(length)
        self.seed = int(seed)
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch here and in every member that has ``set_epoch`` (fresh draws)."""
        self.epoch = int(epoch)
        for ds in self.datasets.values():
            if hasattr(ds, "set_epoch"):
                ds.set_epoch(epoch)

    def pick(self, idx: int) -> tuple[str, int]:
        """``(dataset name, index within it)`` that item ``idx`` reads."""
        i = check_index(idx, len(self), "MixtureDataset")
        rng = item_rng(self.seed, i, self.epoch)
        name = self.names[int(rng.choice(len(self.names), p=self.probs))]
        return name, int(rng.integers(len(self.datasets[name])))

    def __getitem__(self, idx: int) -> Sample:
        name, j = self.pick(idx)
        return self.datasets[name][j]


def _split_options(value: str) -> list[str]:
    return [s for s in value.split("||") if s]


def parse_rates(value: str | Sequence[float]) -> tuple[float, ...]:
    """``"9,3,3,1"`` (the original's flag format) or a sequence -> tuple of floats."""
    if isinstance(value, str):
        try:
            return tuple(float(x) for x in value.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"sample_rates {value!r}: expected comma-separated numbers") from None
    return tuple(float(x) for x in value)


@dataclass
class DataConfig:
    """Training-data options, named and formatted as the original ``train_ds.py`` flags.

    Attributes:
        dataset_dir: the root holding ``ade20k/``, ``coco/``, ``refer_seg/``, ``reason_seg/``...
        datasets: ``||``-separated types out of ``sem_seg``, ``refer_seg``, ``vqa``,
            ``reason_seg``, ``shapes`` (the synthetic data's full query set, see
            :mod:`training.shapes.datasets`).
        sample_rates: one weight per type (``"9,3,3,1"`` or a sequence).
        sem_seg_data: ``||``-separated semantic-segmentation sources.
        refer_seg_data: ``||``-separated REFER datasets (train split each).
        vqa_data: JSON stem under ``llava_dataset/``.
        reason_seg_data: ``"<folder>|<split>[_<split>...]"`` under ``reason_seg/``.
        shapes_data: ``"<folder>|<split>"`` under ``reason_seg/`` of a ``lisa-make-shapes``
            data set (its ``<split>/queries.jsonl``).
        shapes_absent: probability of an absent-target conversation in ``shapes`` samples.
        shapes_groups: weights of the present-target query groups of ``shapes`` samples
            (explicit, reasoning phrase, reasoning sentence).
        shapes_concepts: ``||``-separated query concepts ``shapes`` samples are drawn from
            (e.g. ``"colour||colour_knowledge"``); empty: all.
        shapes_answers: probabilities of the ``segment``, ``plain``, ``concept`` and ``terse``
            answer styles of ``shapes`` samples (the rest: the query's own answer), see
            :class:`~training.shapes.datasets.ShapesQueryMix`.
        explanatory: probability of text-only explanatory answers, -1 to disable.
        num_classes_per_sample: classes/sentences (conversations) per image, at most.
        seed: base seed of every generator.
        samples_per_epoch: mixture length (original: batch 2 x grad-acc 10 x 500 steps x 8 GPUs).
        max_bad_samples: training samples that cannot be read (a truncated image...) are
            skipped, each replaced by the next item, up to this many per process; one more
            stops the run with an error naming the last bad file. 0: the first one stops it.
    """

    dataset_dir: str
    datasets: str = "sem_seg||refer_seg||vqa||reason_seg"
    sample_rates: str | Sequence[float] = (9.0, 3.0, 3.0, 1.0)
    sem_seg_data: str = "ade20k||cocostuff||pascal_part||paco_lvis||mapillary"
    refer_seg_data: str = "refclef||refcoco||refcoco+||refcocog"
    vqa_data: str = "llava_instruct_150k"
    reason_seg_data: str = "ReasonSeg|train"
    shapes_data: str = "Shapes|train"
    shapes_absent: float = 0.2
    shapes_groups: str | Sequence[float] = (0.2, 0.4, 0.4)
    shapes_concepts: str = ""
    shapes_answers: str | Sequence[float] = (0.0, 0.5, 0.0, 0.0)
    explanatory: float = 0.1
    num_classes_per_sample: int = 3
    seed: int = 0
    samples_per_epoch: int = 500 * 8 * 2 * 10
    max_bad_samples: int = 10

    def __post_init__(self) -> None:
        self.sample_rates = parse_rates(self.sample_rates)
        types = _split_options(self.datasets)
        unknown = [t for t in types if t not in DATASET_TYPES]
        if not types or unknown:
            raise ValueError(
                f"datasets {self.datasets!r}: unknown types {unknown}; expected '||'-separated "
                f"names out of {DATASET_TYPES}"
            )
        if len(self.sample_rates) != len(types):
            raise ValueError(
                f"{len(self.sample_rates)} sample_rates {self.sample_rates} for {len(types)} "
                f"datasets {types}; expected one rate per dataset"
            )
        bad = [s for s in _split_options(self.sem_seg_data) if s not in SEM_SEG_SOURCES]
        if "sem_seg" in types and bad:
            raise ValueError(f"sem_seg_data: unknown sources {bad}; expected {SEM_SEG_SOURCES}")
        bad = [s for s in _split_options(self.refer_seg_data) if s not in REFER_DATASETS]
        if "refer_seg" in types and bad:
            raise ValueError(f"refer_seg_data: unknown datasets {bad}; expected {REFER_DATASETS}")
        for kind, example in (("reason_seg", "ReasonSeg|train"), ("shapes", "Shapes|train")):
            value = getattr(self, f"{kind}_data")
            if kind in types and len(value.split("|")) != 2:
                raise ValueError(
                    f"{kind}_data {value!r}: expected '<folder>|<split>', e.g. '{example}'"
                )
        if self.explanatory != -1 and not 0.0 <= self.explanatory <= 1.0:
            raise ValueError(f"explanatory must be in [0, 1] or -1, got {self.explanatory}")
        if self.num_classes_per_sample < 1:
            raise ValueError(
                f"num_classes_per_sample must be >= 1, got {self.num_classes_per_sample}"
            )
        if self.samples_per_epoch < 1:
            raise ValueError(f"samples_per_epoch must be >= 1, got {self.samples_per_epoch}")
        if self.max_bad_samples < 0:
            raise ValueError(f"max_bad_samples must be >= 0, got {self.max_bad_samples}")

        self.shapes_answers = parse_rates(self.shapes_answers)
        self.shapes_groups = parse_rates(self.shapes_groups)
        self.shapes_mix()  # validates the shapes options
        for field in ("datasets", "sem_seg_data", "refer_seg_data"):
            names = _split_options(getattr(self, field))
            twice = sorted({n for n in names if names.count(n) > 1})
            if twice:
                raise ValueError(
                    f"{field}: {twice[0]!r} is listed twice in {getattr(self, field)!r}"
                )

    @property
    def dataset_types(self) -> list[str]:
        return _split_options(self.datasets)

    def shapes_mix(self) -> ShapesQueryMix:
        """The conversation mix of ``shapes`` samples."""
        if len(self.shapes_answers) != 4:
            raise ValueError(
                f"shapes_answers {self.shapes_answers}: expected four probabilities "
                "(segment, plain, concept, terse)"
            )
        segment, plain, concept, terse = self.shapes_answers
        return ShapesQueryMix(
            absent=self.shapes_absent,
            present_weights=tuple(self.shapes_groups),
            concepts=tuple(_split_options(self.shapes_concepts)),
            segment_answer=segment,
            plain_answer=plain,
            concept_answer=concept,
            terse_answer=terse,
            explain=max(self.explanatory, 0.0),
        )


def _sub_seed(seed: int, *keys: int) -> int:
    """A deterministic seed for member ``keys`` of the mixture built from ``seed``."""
    return int(np.random.SeedSequence([int(seed), *keys]).generate_state(1)[0])


def _source_names(cfg: DataConfig, kind: str) -> list[str]:
    if kind == "sem_seg":
        return _split_options(cfg.sem_seg_data)
    if kind == "refer_seg":
        return _split_options(cfg.refer_seg_data)
    if kind == "vqa":
        return [cfg.vqa_data]
    if kind == "shapes":
        return [cfg.shapes_data]
    return [cfg.reason_seg_data]


def _make_source(cfg: DataConfig, kind: str, name: str, seed: int) -> SampleDataset:
    """One source dataset of type ``kind`` under ``cfg.dataset_dir``.

    Every source is as long as the epoch (its items wrap over its images), so the mixture's
    uniform index rarely repeats within an epoch and a repeated image gets fresh draws (texts,
    templates, answers), as the original's sampling does.
    """
    root = Path(cfg.dataset_dir)
    k = cfg.num_classes_per_sample
    n = cfg.samples_per_epoch
    if kind == "sem_seg":
        return SemSegDataset(root, name, seed, k, samples_per_epoch=n)
    if kind == "refer_seg":
        return ReferSegDataset(root / "refer_seg", name, "train", seed, k, samples_per_epoch=n)
    if kind == "vqa":
        return VQADataset(root, seed, name, samples_per_epoch=n)
    folder, split = name.split("|")
    if kind == "shapes":
        return ShapesQueryDataset(
            root / "reason_seg" / folder, split, seed, k, cfg.shapes_mix(), samples_per_epoch=n
        )
    return ReasonSegDataset(
        root / "reason_seg" / folder, split, seed, k, cfg.explanatory, samples_per_epoch=n
    )


def build_dataset(cfg: DataConfig) -> MixtureDataset:
    """The training mixture of ``cfg``: types by ``sample_rates``, sources within a type uniformly.

    Every member gets its own seed derived from ``cfg.seed``.

    Raises:
        DataFileNotFoundError: a file or directory a requested source needs is missing (the
            message names the source and the path).
    """
    groups: dict[str, SampleDataset] = {}
    for g, kind in enumerate(cfg.dataset_types):
        members: dict[str, SampleDataset] = {}
        for s, name in enumerate(_source_names(cfg, kind)):
            try:
                members[name] = _make_source(cfg, kind, name, _sub_seed(cfg.seed, g, s))
            except DataFileNotFoundError as exc:
                raise DataFileNotFoundError(f"{kind} source {name!r}: {exc}") from exc
        if len(members) == 1:
            groups[kind] = next(iter(members.values()))
        else:  # the original draws the source uniformly, then an image
            groups[kind] = MixtureDataset(
                members, [1.0] * len(members), cfg.samples_per_epoch, _sub_seed(cfg.seed, g)
            )
    return MixtureDataset(groups, cfg.sample_rates, cfg.samples_per_epoch, cfg.seed)


def build_val_dataset(
    dataset_dir: str | Path, val_dataset: str = "ReasonSeg|val"
) -> ReasonSegValDataset | ReferSegValDataset:
    """The original ``--val_dataset`` option: ``"ReasonSeg|val"`` (folder under ``reason_seg/``
    and split) or ``"refcoco|unc|val"`` (REFER dataset, split-by, split under ``refer_seg/``).
    """
    root = Path(dataset_dir)
    fields = val_dataset.split("|")
    if len(fields) == 2:
        folder, split = fields
        return ReasonSegValDataset(root / "reason_seg" / folder, split)
    if len(fields) == 3:
        ds, split_by, split = fields
        return ReferSegValDataset(root / "refer_seg", ds, split, split_by)
    raise ValueError(
        f"val_dataset {val_dataset!r}: expected 'ReasonSeg|val' or "
        "'<refer dataset>|<splitBy>|<split>'"
    )
