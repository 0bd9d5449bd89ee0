"""8-bit / 4-bit weights for the LLM through bitsandbytes (CUDA only).

What is quantised: the ``nn.Linear`` layers inside the LLM's decoder layers (attention and MLP),
which hold almost all of the weights. What is not: SAM (never, as in the original), CLIP, the
``mm_projector``, the ``[SEG]`` projector, ``lm_head`` and the embeddings. The original also
quantised ``lm_head`` and the projectors; keeping those in 16 bit costs ~0.3 GB on 7B and avoids
the blank masks its users report with 4-bit (LISA issue #174), since the ``[SEG]`` state and its
projection are what SAM sees.
"""

from __future__ import annotations

import torch
from torch import nn


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise RuntimeError(
            "quantization needs bitsandbytes: pip install 'lisa_ros[quant]' "
            f"(bitsandbytes>=0.43) on a CUDA machine ({exc})"
        ) from None
    return bnb


def quantize_llm(
    model: nn.Module,
    mode: str,
    device: torch.device | str,
    compute_dtype: torch.dtype = torch.float16,
) -> int:
    """Replace the decoder layers' linears of ``model.llm`` in place; returns how many.

    Weights are quantised when the new modules move to ``device`` (which must be CUDA).
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError(f"bitsandbytes quantization needs a CUDA device, got {device}")
    if mode not in ("8bit", "4bit"):
        raise ValueError(f"quantization mode {mode!r}; expected '8bit' or '4bit'")
    bnb = _bnb()
    count = 0
    for layer in model.llm.model.layers:
        for name, child in list(layer.named_modules()):
            if not isinstance(child, nn.Linear):
                continue
            parent = layer.get_submodule(name.rsplit(".", 1)[0]) if "." in name else layer
            attr = name.rsplit(".", 1)[-1]
            weight = child.weight.data.to(torch.float16 if mode == "8bit" else compute_dtype)
            bias = child.bias is not None
            if mode == "8bit":
                new = bnb.nn.Linear8bitLt(
                    child.in_features, child.out_features, bias=bias,
                    has_fp16_weights=False, threshold=6.0,
                )  # fmt: skip
                new.weight = bnb.nn.Int8Params(
                    weight.cpu(), requires_grad=False, has_fp16_weights=False
                )
            else:
                new = bnb.nn.Linear4bit(
                    child.in_features, child.out_features, bias=bias,
                    compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                )  # fmt: skip
                new.weight = bnb.nn.Params4bit(
                    weight.cpu(), requires_grad=False, compress_statistics=True, quant_type="nf4"
                )
            if bias:
                new.bias = nn.Parameter(child.bias.data.to(compute_dtype), requires_grad=False)
            setattr(parent, attr, new.to(device))
            count += 1
    return count
