"""``lisa-export``: a lisa-train checkpoint -> a LISA checkpoint in the published layout.

Steps: consolidate the ZeRO checkpoint into one fp32 state dict (DeepSpeed's
``get_fp32_state_dict_from_zero_checkpoint``); rebuild the training-time model from the run's
``run.json`` (same source, tokens, seeded new weights, LoRA layers); load the trained parameters
into it; merge LoRA into the base weights (``W += B @ A * alpha / r``); write the published layout
with :func:`lisa_model.checkpoint.save_lisa` (LLM in ``--dtype``, SAM and the ``[SEG]`` projector
in float32; the CLIP tower bundled under ``vision_tower/`` when it is a local directory or was
trained, so the export is self-contained).

The result loads with ``load_lisa`` (the ROS node, ``lisa-segment``, ``lisa-eval``) and with the
original LISA code.

Example::

    lisa-export runs/finetune --out exports/lisa-7b-ft            # tag "best" if present
    lisa-export runs/finetune/ckpt --tag last --out exports/last --dtype float32
"""

from __future__ import annotations

import argparse
import logging
import pickle
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lisa_model.config import CheckpointError
from lisa_model.file_modes import follow_umask
from lisa_model.modeling import LisaModel
from lisa_model.options import parse_dtype
from training.checkpoint_files import check_checkpoint_files, weights_only_loads
from training.config import config_from_dict
from training.engine import CKPT_DIR, RUN_FILE, TAG_BEST, read_latest_tag, read_run_record
from training.model_setup import merge_lora, prepare_model_for_training

log = logging.getLogger(__name__)


class ExportError(ValueError):
    """A checkpoint cannot be exported (the message names it)."""


@dataclass
class ExportReport:
    """What :func:`export_checkpoint` wrote."""

    out_dir: Path
    run_dir: Path
    tag: str
    global_step: int | None
    merged_lora_layers: int
    loaded_tensors: int
    dtype: torch.dtype
    vision_tower_included: bool


def locate_run(checkpoint: str | Path) -> tuple[Path, Path, str | None]:
    """``(run_dir, ckpt_dir, tag or None)`` of a run directory, its ``ckpt`` directory or a tag
    directory inside it.

    Raises:
        ExportError: no ``run.json`` in or above ``checkpoint``.
    """
    path = Path(checkpoint).expanduser()
    if not path.is_dir():
        raise ExportError(f"{path}: no such checkpoint directory")
    if (path / RUN_FILE).is_file():
        return path, path / CKPT_DIR, None
    if (path.parent / RUN_FILE).is_file():
        return path.parent, path, None
    if (path.parent.parent / RUN_FILE).is_file():
        return path.parent.parent, path.parent, path.name
    raise ExportError(
        f"{path}: not a lisa-train checkpoint (no {RUN_FILE} in it or above it); pass the run "
        "directory (run.output_dir), its ckpt/ directory or a tag directory inside"
    )


def default_tag(ckpt_dir: Path) -> str:
    """``best`` when the run saved one (validation on), else the tag ``latest`` names."""
    if (ckpt_dir / TAG_BEST).is_dir():
        return TAG_BEST
    return read_latest_tag(ckpt_dir)


def _check_empty(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"{out}: exists and is not an empty directory; choose a new --out")


@dataclass
class TrainedModel:
    """A lisa-train checkpoint loaded back: the model (LoRA not merged, fp32, CPU) and where
    it came from."""

    model: LisaModel
    record: dict
    run_dir: Path
    tag: str
    global_step: int | None
    loaded_tensors: int


def load_trained_model(checkpoint: str | Path, tag: str | None = None) -> TrainedModel:
    """The trained model of a lisa-train checkpoint, LoRA not merged, fp32 on the CPU.

    Raises:
        ExportError: the checkpoint, tag or run record is missing or does not match the model
            that ``run.json`` describes (the message names the checkpoint path).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    run_dir, ckpt_dir, path_tag = locate_run(checkpoint)
    try:
        tag = tag or path_tag or default_tag(ckpt_dir)
    except FileNotFoundError as exc:
        raise ExportError(str(exc)) from None
    tag_dir = ckpt_dir / tag
    if not tag_dir.is_dir():
        tags = (
            sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir()) if ckpt_dir.is_dir() else []
        )
        raise ExportError(f"{tag_dir}: no such checkpoint tag (found: {tags or 'none'})")
    # Every file read without running code from it, before the (slow) model build.
    step = _saved_step(check_checkpoint_files(tag_dir))
    try:
        record = read_run_record(run_dir)
    except (FileNotFoundError, ValueError) as exc:
        raise ExportError(str(exc)) from None
    cfg = config_from_dict(record["config"], where=str(run_dir / RUN_FILE))

    # The model as it was at the start of training (same source, tokens, seeds, LoRA layers).
    model, report = prepare_model_for_training(cfg, device="cpu", dtype=torch.float32)
    expected_vocab = record["tokenizer"]["vocab_size"]
    if report.vocab_size != expected_vocab or model.tokenizer.added_tokens != dict(
        record["tokenizer"]["added_tokens"]
    ):
        raise ExportError(
            f"{run_dir}: rebuilding the model from {cfg.model.source} gives vocabulary "
            f"{report.vocab_size} / tokens {model.tokenizer.added_tokens}, but training had "
            f"{expected_vocab} / {record['tokenizer']['added_tokens']}: the source changed"
        )

    # The trained tensors: fp32 master weights of the trainable parameters (+ buffers).
    try:
        with weights_only_loads():
            state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    except (FileNotFoundError, ValueError, RuntimeError, KeyError, pickle.UnpicklingError) as exc:
        reason = " ".join(str(exc).split())[:300]
        raise ExportError(
            f"{tag_dir}: cannot consolidate the ZeRO checkpoint ({reason})"
        ) from None
    known = model.state_dict()
    unexpected = sorted(set(state) - set(known))
    missing = sorted(set(record["trainable"]["names"]) - set(state))
    if unexpected or missing:
        raise ExportError(
            f"{tag_dir}: does not fit the model of {run_dir / RUN_FILE}: unexpected "
            f"{unexpected[:5]}, missing trained {missing[:5]}"
        )
    bad = [k for k, v in state.items() if tuple(v.shape) != tuple(known[k].shape)]
    if bad:
        raise ExportError(f"{tag_dir}: shape mismatch for {bad[:5]}")
    model.load_state_dict(state, strict=False)
    return TrainedModel(model, record, run_dir, tag, step, len(state))


def _saved_step(contents: dict[Path, Any]) -> int | None:
    """The step saved in the first ``mp_rank_*_model_states.pt`` of a checkpoint's files."""
    files = sorted(f for f in contents if f.name.endswith("_model_states.pt"))
    states = contents[files[0]] if files else None
    step = states.get("global_step") if isinstance(states, dict) else None
    return int(step) if isinstance(step, int) else None


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    tag: str | None = None,
    dtype: str | torch.dtype = torch.bfloat16,
    safe_serialization: bool = False,
) -> ExportReport:
    """Export a lisa-train checkpoint to ``out`` in the published LISA layout.

    Args:
        checkpoint: the run directory, its ``ckpt/`` directory, or a tag directory.
        out: a new (or empty) directory.
        tag: checkpoint tag (default: ``best`` if saved, else the one ``ckpt/latest`` names).
        dtype: storage dtype of the LLM, ``mm_projector`` and ``lm_head`` (bf16 as published;
            float32 for a lossless export). SAM and the ``[SEG]`` projector are always float32.
        safe_serialization: write ``.safetensors`` shards instead of ``.bin``.

    Raises:
        ExportError: ``out`` is not empty, or the checkpoint cannot be exported (named).
    """
    out = Path(out).expanduser()
    _check_empty(out)
    llm_dtype = parse_dtype(dtype)
    trained = load_trained_model(checkpoint, tag)
    model = trained.model
    merged = merge_lora(model)
    cfg = config_from_dict(trained.record["config"])
    tower = str(trained.record.get("vision_tower") or "")
    include_tower = cfg.train.vision_tower or Path(tower).is_dir()

    # Write next to the target and move into place, so a failure leaves no half export.
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        follow_umask(staging)  # mkdtemp makes 0700; the export is a folder like any other
        from lisa_model.checkpoint import save_lisa

        save_lisa(
            model,
            staging,
            llm_dtype=llm_dtype,
            safe_serialization=safe_serialization,
            include_vision_tower=include_tower,
        )
        _check_empty(out)
        if out.exists():
            out.rmdir()
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportReport(
        out_dir=out,
        run_dir=trained.run_dir,
        tag=trained.tag,
        global_step=trained.global_step,
        merged_lora_layers=merged,
        loaded_tensors=trained.loaded_tensors,
        dtype=llm_dtype,
        vision_tower_included=include_tower,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-export",
        description="Merge LoRA and export a lisa-train checkpoint in the published LISA layout.",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="run directory (run.output_dir), its ckpt/, or a tag dir"
    )
    parser.add_argument("--out", type=Path, required=True, help="new output directory")
    parser.add_argument("--tag", help="checkpoint tag (default: best if saved, else latest)")
    parser.add_argument(
        "--dtype",
        default="bf16",
        help="LLM storage dtype: bf16 (default, as published), fp16 or float32",
    )
    parser.add_argument("--safetensors", action="store_true", help="write .safetensors shards")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s: %(message)s")
    try:
        parse_dtype(args.dtype)
        report = export_checkpoint(
            args.checkpoint, args.out, args.tag, args.dtype, safe_serialization=args.safetensors
        )
    except (ExportError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"lisa-export: error: {exc}", file=sys.stderr)
        return 2
    step = "?" if report.global_step is None else report.global_step
    print(
        f"lisa-export: {report.run_dir} tag {report.tag} (step {step}) -> {report.out_dir} "
        f"({report.merged_lora_layers} LoRA layers merged, LLM in {report.dtype}"
        f"{', CLIP bundled' if report.vision_tower_included else ''})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
