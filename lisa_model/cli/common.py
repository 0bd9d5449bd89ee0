"""Pieces shared by the command-line tools: model arguments, image reading, error handling.

A user error (bad path, unreadable image, not a checkpoint, empty query) ends the tool with one
line ``error: ...`` naming the input and what was expected, exit status 2, and no traceback.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from lisa_model.config import CheckpointError
from lisa_model.options import (
    DEFAULT_MODE,
    DTYPE_NAMES,
    MODES,
    cpu_bf16_note,
    resolve_device,
    resolve_dtype,
)


class UserError(Exception):
    """An error caused by the tool's input; reported as one line, exit status 2."""


def default_model_source() -> str:
    """The embedded demo model, the default wherever a model is needed and none is given."""
    from lisa_model.demo import demo_model_dir

    return str(demo_model_dir())


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=None,
        help="checkpoint directory or hub id in the published LISA layout "
        "(e.g. xinlai/LISA-7B-v1); default: the embedded demo model",
    )
    parser.add_argument(
        "--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda when available)"
    )
    parser.add_argument(
        "--dtype",
        default=None,
        choices=DTYPE_NAMES,
        help="compute dtype (default: float32 on CPU, bfloat16 on CUDA)",
    )
    parser.add_argument(
        "--quantization", choices=("8bit", "4bit"), default=None, help="bitsandbytes (CUDA)"
    )
    parser.add_argument("--vision-tower", default=None, help="override the CLIP tower path/id")


def add_encoder_dtype_argument(parser: argparse.ArgumentParser) -> None:
    """``--encoder-dtype``: the image encoders' dtype, separate from ``--dtype`` (the LLM's)."""
    parser.add_argument(
        "--encoder-dtype",
        default=None,
        choices=DTYPE_NAMES,
        help="dtype of the CLIP and SAM image encoders (default: --dtype); bfloat16 is a "
        "speed-up on GPUs and on CPUs with AVX512-BF16 or AMX",
    )


def add_mode_argument(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """``--mode`` with the answer modes of :data:`lisa_model.options.MODES`."""
    parser.add_argument(
        "--mode",
        choices=MODES,
        default=DEFAULT_MODE,
        help="generate: decode an answer (one mask per [SEG]); segment: fast path, one mask, "
        "no text",
    )


def load_model_from_args(args: argparse.Namespace):
    from lisa_model.checkpoint import load_lisa

    source = args.model or default_model_source()
    try:
        device = resolve_device(args.device)
    except ValueError as exc:
        raise UserError(f"--device: {exc}") from None
    dtype = resolve_dtype(args.dtype, device)
    encoder_dtype = getattr(args, "encoder_dtype", None)
    encoder_dtype = dtype if encoder_dtype is None else resolve_dtype(encoder_dtype, device)
    # No silent slow path: bfloat16 (of the LLM or the encoders) on a CPU that emulates it.
    note = next(filter(None, (cpu_bf16_note(device, d) for d in (dtype, encoder_dtype))), None)
    if note:
        print(f"note: {note}", file=sys.stderr)
    try:
        return load_lisa(
            source,
            device=device,
            dtype=dtype,
            quantization=args.quantization,
            vision_tower=args.vision_tower,
            encoder_dtype=encoder_dtype,
        )
    except CheckpointError as exc:  # its message starts with the file at fault
        raise UserError(f"--model: {exc}") from None


def read_rgb_image(path: str | Path) -> np.ndarray:
    """Read an image file as ``(H, W, 3)`` uint8 RGB; :class:`UserError` naming the path."""
    import cv2

    path = Path(path)
    if not path.exists():
        raise UserError(f"--image {path}: no such file")
    if not path.is_file():
        raise UserError(f"--image {path}: not a file")
    data = np.fromfile(path, dtype=np.uint8)
    bgr = cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None
    if bgr is None:
        raise UserError(f"--image {path}: cannot be read as an image (expected PNG/JPEG/...)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def run_cli(
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], int],
    argv: list[str] | None,
) -> int:
    """Parse ``argv`` and call ``run``; user errors become one ``error:`` line and status 2."""
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        return run(args)
    except UserError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{parser.prog}: interrupted", file=sys.stderr)
        return 130
