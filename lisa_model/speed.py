"""Optional ``torch.compile`` of LISA's parts (results unchanged up to kernel rounding).

What compiles well is what has fixed shapes: the CLIP encoder layers (always 257 tokens) and
the SAM image encoder (always 1024 x 1024). These are the per-frame costs, so compiling them
helps a camera stream. Inductor also fuses SAM's attention (relative-position add and softmax
over 4096 x 4096 scores), which on a CPU made the SAM encoder about 1.4x faster and halved its
peak memory (``benchmarks/README.md``); the first frame then pays 20-35 s of compiling there.
The mask decoder's batch is the number of ``[SEG]`` tokens (compiled with dynamic shapes), and
the LLM runs with a ``DynamicCache`` whose length changes every step, which makes
``torch.compile`` re-trace and guard on every call: on the CPU a tiny model decoded about 10x
slower compiled than eager, so ``"llm"`` is opt-in and meant for experiments only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from torch import nn

#: Parts :func:`compile_model` knows.
COMPILABLE_PARTS = ("clip", "sam_encoder", "mask_decoder", "llm")
#: Parts compiled by default: the fixed-shape image encoders.
DEFAULT_COMPILE_PARTS = ("clip", "sam_encoder")


def compile_model(
    model: nn.Module,
    parts: Iterable[str] = DEFAULT_COMPILE_PARTS,
    *,
    mode: str | None = None,
    **options: Any,
) -> nn.Module:
    """Compile ``parts`` of a :class:`~lisa_model.modeling.LisaModel` in place; returns it.

    Args:
        parts: names from :data:`COMPILABLE_PARTS`.
        mode: ``torch.compile`` mode (``None``, ``"reduce-overhead"``, ``"max-autotune"``).
        options: further ``torch.compile`` keyword arguments (``backend``, ``fullgraph``...).

    Compilation happens lazily at the first call of each part (the first frame is slow).
    """
    parts = tuple(parts)
    unknown = [p for p in parts if p not in COMPILABLE_PARTS]
    if unknown:
        raise ValueError(f"unknown parts {unknown}; expected some of {COMPILABLE_PARTS}")
    for part in parts:
        for module, dynamic in _modules(model, part):
            module.compile(mode=mode, dynamic=dynamic, **options)
    return model


def _modules(model: nn.Module, part: str) -> list[tuple[nn.Module, bool | None]]:
    """The modules that make up ``part``, each with its ``dynamic`` setting."""
    if part == "clip":
        # LisaModel.clip_hidden_states calls the encoder layers one by one (see there).
        layers = getattr(getattr(model.vision_tower, "encoder", None), "layers", None)
        return [(layer, False) for layer in layers] if layers else [(model.vision_tower, False)]
    if part == "sam_encoder":
        return [(model.sam.image_encoder, False)]
    if part == "mask_decoder":
        return [(model.sam.mask_decoder, True)]
    return [(model.llm.model, True)]
