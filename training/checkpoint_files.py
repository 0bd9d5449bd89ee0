"""Reading DeepSpeed checkpoint files without running code from them.

A DeepSpeed checkpoint (``ckpt/<tag>/mp_rank_00_model_states.pt``,
``*_optim_states.pt``) is a ``torch.save`` pickle. DeepSpeed loads its files with
``torch.load(weights_only=False)``, which runs whatever a crafted file asks for. Here every file
is first read with ``weights_only=True``, allowing only tensors, plain containers and the few
classes DeepSpeed stores (:func:`deepspeed_safe_globals`), and DeepSpeed's own loads then run
with ``weights_only`` forced on (:func:`weights_only_loads`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from lisa_model.checkpoint import load_torch_file

#: torch reads it in every ``torch.load``: "1" makes ``weights_only=False`` calls safe loads.
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


def deepspeed_safe_globals() -> list[Any]:
    """The classes DeepSpeed pickles into checkpoint files besides tensors and containers.

    Found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on the ZeRO-2 fp32 and
    bf16 checkpoints lisa-train writes (DeepSpeed 0.19): the static loss scaler, the ZeRO stage
    enum and the fragment addresses of the optimizer state; fp16 runs store the dynamic loss
    scaler instead of the static one. All are plain records: rebuilding them runs no code.
    """
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_checkpoint_files(tag_dir: Path) -> dict[Path, Any]:
    """Read every ``*.pt`` file of a checkpoint tag directory with ``weights_only=True``.

    Returns:
        ``{file: content}`` (tensors memory-mapped where the file allows it).

    Raises:
        CheckpointError: naming the file: truncated or corrupt, or holding pickled objects
            other than tensors, containers and :func:`deepspeed_safe_globals` (nothing runs).
    """
    allowed = deepspeed_safe_globals()
    return {
        file: load_torch_file(file, allowed, what="tensors and DeepSpeed state")
        for file in sorted(tag_dir.glob("*.pt"))
    }


@contextlib.contextmanager
def weights_only_loads() -> Iterator[None]:
    """Every ``torch.load`` inside reads weights only, DeepSpeed's ``weights_only=False`` calls
    included, with :func:`deepspeed_safe_globals` allowed. Not thread-safe (an environment
    variable); the CLIs load checkpoints from one thread."""
    previous = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        if previous is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = previous
