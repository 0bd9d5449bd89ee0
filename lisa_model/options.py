"""The names every tool shares: compute dtypes, answer modes, and the default device.

One place for them, so the CLIs, the node, training and the benchmarks accept the same spellings
and resolve empty values the same way:

- dtypes: ``float32`` / ``bfloat16`` / ``float16`` (``fp32`` / ``bf16`` / ``fp16`` are accepted
  as aliases); empty or None = :func:`default_dtype` of the device.
- modes: ``generate`` (decode an answer, one mask per ``[SEG]``) and ``segment`` (the fast path:
  one teacher-forced forward, one mask, no text).
- device: empty or None = ``cuda`` when available, else ``cpu``.

:func:`native_bf16` says whether a device computes bfloat16 natively (a GPU that supports it, a
CPU with AVX512-BF16 or AMX), which is when bfloat16 is a speed-up rather than an emulation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported where it is needed: the names load without it
    import torch

#: The canonical dtype names, in the order help texts list them.
DTYPE_NAMES: tuple[str, ...] = ("float32", "bfloat16", "float16")
#: Every accepted spelling -> its canonical name.
DTYPE_ALIASES: dict[str, str] = {
    "float32": "float32",
    "fp32": "float32",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
    "float16": "float16",
    "fp16": "float16",
}
#: Answer modes of :meth:`lisa_model.predictor.LisaPredictor.predict`.
MODES: tuple[str, ...] = ("generate", "segment")
#: Mode used when none is given.
DEFAULT_MODE = "generate"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A dtype name (any spelling in :data:`DTYPE_ALIASES`, any case) or a torch dtype -> torch
    dtype; ``ValueError`` naming the accepted names otherwise."""
    import torch

    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return getattr(torch, DTYPE_ALIASES[str(dtype).lower()])
    except KeyError:
        accepted = ", ".join(DTYPE_ALIASES)
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {accepted}") from None


def dtype_name(dtype: str | torch.dtype) -> str:
    """The canonical name (``float32``, ``bfloat16``, ``float16``) of a dtype or alias."""
    return str(parse_dtype(dtype)).removeprefix("torch.")


def check_mode(mode: str) -> str:
    """``mode`` when it is one of :data:`MODES`; ``ValueError`` naming them otherwise."""
    if mode not in MODES:
        raise ValueError(f"mode {mode!r}; expected one of {', '.join(MODES)}")
    return mode


def default_device() -> torch.device:
    """``cuda`` when a CUDA device is available, else ``cpu``."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A device string (``cpu``, ``cuda``, ``cuda:1``; empty/None = :func:`default_device`) as a
    torch device; ``ValueError`` for a name torch does not know or CUDA that is not available."""
    import torch

    if isinstance(device, torch.device):
        parsed = device
    elif device is None or not str(device).strip():
        return default_device()
    else:
        try:
            parsed = torch.device(str(device).strip())
        except (RuntimeError, ValueError) as exc:
            raise ValueError(f"{device!r} is not a torch device ({exc})") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{str(device)!r} requested but CUDA is not available")
    return parsed


def default_dtype(device: str | torch.device) -> str:
    """The compute dtype used when none is given: ``bfloat16`` on CUDA, ``float32`` elsewhere
    (bfloat16 on a CPU is a choice: see :func:`native_bf16`)."""
    import torch

    return "bfloat16" if torch.device(device).type == "cuda" else "float32"


def resolve_dtype(dtype: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """``dtype`` parsed, or :func:`default_dtype` of ``device`` when it is empty or None."""
    if dtype is None or (isinstance(dtype, str) and not dtype.strip()):
        return parse_dtype(default_dtype(device))
    return parse_dtype(dtype)


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively, so that bfloat16 is a speed-up: a CUDA GPU
    that supports it, or a CPU with AVX512-BF16 or AMX (oneDNN's own check). On other CPUs
    (AVX2 only) bfloat16 is emulated and slower than float32."""
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if device.type == "cpu":
        try:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        except (AttributeError, RuntimeError):  # a build without oneDNN
            return False
    return False


def cpu_bf16_note(device: str | torch.device, dtype: str | torch.dtype) -> str | None:
    """A warning to show when ``dtype`` is bfloat16 on a CPU that only emulates it (None when
    there is nothing to say)."""
    import torch

    device = torch.device(device)
    if device.type != "cpu" or parse_dtype(dtype) != torch.bfloat16 or native_bf16(device):
        return None
    return (
        "bfloat16 on this CPU is emulated (no AVX512-BF16 or AMX): expect it to be slower than "
        "float32"
    )
