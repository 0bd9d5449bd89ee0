"""``python -m training.demo_model {init,warmup,eval,examples}``: the demo model's command line.

No command writes into an installed package of this project (``lisa_model``, ``training``): the
shipped demo model (``lisa_model/data/demo_model``) and examples are written elsewhere and copied
there by hand to ship them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from lisa_model.checkpoint import save_lisa
from lisa_model.cli.common import UserError, run_cli
from training.demo_model.evaluation import evaluate_demo
from training.demo_model.examples import write_examples
from training.demo_model.language import LanguageWarmup, warm_up_language
from training.demo_model.recipe import build_initial_demo_checkpoint
from training.demo_model.sam_decoder import DecoderWarmup
from training.demo_model.sam_encoder import EncoderWarmup
from training.demo_model.tokenizer import DEMO_VOCAB_SIZE

#: The file a shipped demo checkpoint carries (``eval --record <model>/demo.json``): the data
#: set's seed and scene settings with the evaluation report, so the scenes can be regenerated.
RECIPE_FILE = "demo.json"


def check_outside_packages(path: Path, flag: str) -> Path:
    """``path``, or :class:`UserError` when it lies inside the installed ``lisa_model`` or
    ``training`` package (the shipped demo model, the bundled examples, the configs)."""
    import lisa_model
    import training

    resolved = path.resolve()
    for module in (lisa_model, training):
        package = Path(module.__file__).resolve().parent
        if resolved == package or package in resolved.parents:
            raise UserError(
                f"{flag} {path}: inside the installed package {package}; write it elsewhere "
                "(to ship a model or examples, copy them into lisa_model/data by hand)"
            )
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.demo_model",
        description="The demo model: build its untrained start, or evaluate a trained one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write the untrained demo checkpoint")
    init.add_argument("--data", required=True, type=Path, help="shapes data set directory")
    init.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    init.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    init.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE)
    init.add_argument(
        "--warmup-steps",
        type=int,
        default=LanguageWarmup.steps,
        help="steps of the text-only language warm-up of the LLM (0: none)",
    )
    init.add_argument(
        "--encoder-steps",
        type=int,
        default=EncoderWarmup.steps,
        help="steps of SAM's image encoder warm-up on per-patch shapes and colours (0: none)",
    )
    init.add_argument(
        "--decoder-steps",
        type=int,
        default=DecoderWarmup.steps,
        help="steps of SAM's mask decoder warm-up on concept prompts, followed by the [SEG] "
        "projector fit (0: neither)",
    )
    wu = sub.add_parser(
        "warmup", help="train a checkpoint's LLM on the shapes conversations as text"
    )
    wu.add_argument("--model", required=True, help="checkpoint directory to start from")
    wu.add_argument("--data", required=True, type=Path, help="shapes data set directory")
    wu.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    wu.add_argument("--steps", type=int, default=LanguageWarmup.steps)
    wu.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="score a checkpoint on a shapes split")
    ev.add_argument("--model", required=True, help="checkpoint directory")
    ev.add_argument("--data", required=True, type=Path, help="shapes data set directory")
    ev.add_argument("--split", default="test")
    ev.add_argument("--max-images", type=int, default=None)
    ev.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ev.add_argument(
        "--record",
        type=Path,
        default=None,
        metavar="PATH",
        help="also write the data set's seed and scene settings (from its meta.json) with the "
        f"report to PATH, so the scenes can be regenerated (a shipped model carries it as "
        f"{RECIPE_FILE}: --record <model>/{RECIPE_FILE})",
    )
    ex = sub.add_parser("examples", help="write the bundled example scenes and commands")
    ex.add_argument("--out", required=True, type=Path, help="directory to write")
    ex.add_argument("--seed", type=int, default=0, help="data set seed of the scenes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.demo_model {init,warmup,eval,examples} ...``."""
    return run_cli(build_parser(), _run, None if argv is None else list(argv))


def _run(args: argparse.Namespace) -> int:
    for flag in ("out", "record"):
        if getattr(args, flag, None) is not None:
            check_outside_packages(getattr(args, flag), f"--{flag}")
    try:
        return _COMMANDS[args.command](args)
    except (FileNotFoundError, ValueError) as err:
        raise UserError(str(err)) from None


def _init(args: argparse.Namespace) -> int:
    for flag in ("warmup_steps", "encoder_steps", "decoder_steps"):
        if getattr(args, flag) < 0:
            name = "--" + flag.replace("_", "-")
            raise UserError(f"{name} must be >= 0, got {getattr(args, flag)}")
    out = build_initial_demo_checkpoint(
        args.out,
        args.data,
        seed=args.seed,
        vocab_size=args.vocab_size,
        warmup=LanguageWarmup(steps=args.warmup_steps, seed=args.seed),
        encoder_warmup=EncoderWarmup(steps=args.encoder_steps, seed=args.seed),
        decoder_warmup=DecoderWarmup(steps=args.decoder_steps, seed=args.seed),
    )
    config = json.loads((out / "config.json").read_text())
    print(f"wrote the initial demo checkpoint to {out} (vocab {config['vocab_size']})")
    return 0


def _warmup(args: argparse.Namespace) -> int:
    from lisa_model.checkpoint import load_lisa

    cfg = LanguageWarmup(steps=args.steps, seed=args.seed)
    model = load_lisa(args.model, dtype=torch.float32)
    history = warm_up_language(model, args.data, cfg)
    out = save_lisa(model, args.out, llm_dtype=torch.float32, include_vision_tower=True)
    losses = ", ".join(f"{x:.3f}" for x in history)
    print(f"wrote {out}; language warm-up loss every {cfg.log_every} steps: {losses}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from lisa_model.checkpoint import load_lisa

    meta = None
    if args.record is not None:  # read first: a missing meta.json fails before the long work
        meta_path = Path(args.data) / "meta.json"
        if not meta_path.is_file():
            raise UserError(f"--record needs {meta_path} (written last by lisa-make-shapes)")
        meta = json.loads(meta_path.read_text())
    model = load_lisa(args.model)
    report = evaluate_demo(model, args.data, args.split, max_images=args.max_images, progress=True)
    text = json.dumps(asdict(report), indent=1)
    if meta is not None:
        recipe = {
            "data": {
                k: meta[k] for k in ("seed", "config", "version", "absent_json_rate") if k in meta
            },
            "report": asdict(report),
        }
        args.record.parent.mkdir(parents=True, exist_ok=True)
        args.record.write_text(json.dumps(recipe, indent=1) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


def _examples(args: argparse.Namespace) -> int:
    path = write_examples(args.out, args.seed)
    print(f"wrote {path} and its scenes")
    return 0


_COMMANDS = {"init": _init, "warmup": _warmup, "eval": _eval, "examples": _examples}
