"""Training and evaluation data of LISA, one class per source, in the paper's on-disk formats.

Every dataset returns a :class:`Sample` (image, conversations, one mask per ``[SEG]``) and draws
its randomness from a generator seeded by ``(seed, epoch, idx)``. Submodules are imported lazily so
that ``import training.data`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DataFileNotFoundError": "training.data.types",
    "DataFormatError": "training.data.types",
    "IGNORE_LABEL": "training.data.types",
    "Sample": "training.data.types",
    "item_rng": "training.data.types",
    "read_image": "training.data.types",
    "ReasonSegDataset": "training.data.reason_seg",
    "ReasonSegValDataset": "training.data.reason_seg",
    "read_reason_seg_json": "training.data.reason_seg",
    "polygons_to_mask": "training.data.reason_seg",
    "ReferSegDataset": "training.data.refer_seg",
    "ReferSegValDataset": "training.data.refer_seg",
    "segmentation_to_mask": "training.data.refer_seg",
    "SEM_SEG_SOURCES": "training.data.sem_seg",
    "SemSegDataset": "training.data.sem_seg",
    "VQADataset": "training.data.vqa",
    "DataConfig": "training.data.mixture",
    "MixtureDataset": "training.data.mixture",
    "build_dataset": "training.data.mixture",
    "build_val_dataset": "training.data.mixture",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'training.data' has no attribute {name!r}")
