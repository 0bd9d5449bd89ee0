"""LISA reasoning segmentation: model, checkpoint I/O, processing and predictor.

Pure PyTorch / transformers / segment-anything; never imports ROS. Submodules are imported lazily
so that ``import lisa_model`` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "Conversation",
    "LisaModel",
    "LisaPredictor",
    "QueryTooLongError",
    "SegmentationResult",
    "load_lisa",
    "save_lisa",
]

_EXPORTS = {
    "Conversation": "lisa_model.conversation",
    "LisaModel": "lisa_model.modeling",
    "LisaPredictor": "lisa_model.predictor",
    "QueryTooLongError": "lisa_model.predictor",
    "SegmentationResult": "lisa_model.types",
    "load_lisa": "lisa_model.checkpoint",
    "save_lisa": "lisa_model.checkpoint",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'lisa_model' has no attribute {name!r}")
