"""``lisa-train``: fine-tune LISA with DeepSpeed from a YAML config.

Examples::

    lisa-train --config training/configs/finetune_lisa.yaml data.dataset_dir=/data
    deepspeed --num_gpus 8 --module training.train --config training/configs/lisa_7b_paper.yaml
    torchrun --nproc_per_node 8 -m training.train --config training/configs/lisa_7b_paper.yaml
    lisa-train --config cfg.yaml --resume            # continue run.output_dir's latest checkpoint
    lisa-train --resume runs/my-run optim.epochs=12  # config from runs/my-run/run.json
    lisa-train --config cfg.yaml --check-data      # only check every dataset entry

Before anything starts, every dataset the config names (and the validation set) is opened and
every entry checked (training.data.check); a broken file ends the run with one error line naming
it and exit status 2. Samples that still cannot be read during training are skipped, up to
``data.max_bad_samples``; their count is in metrics.jsonl and the final summary.

Overrides are ``section.key=value`` (values parsed as YAML); put them before a bare
``--resume`` or write ``--resume=DIR``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from lisa_model.config import CheckpointError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-train",
        description="Fine-tune LISA (LoRA + mask decoder) with DeepSpeed.",
        epilog="Launch on several GPUs/nodes with `deepspeed` or `torchrun` (docs/training.md).",
    )
    parser.add_argument("--config", type=Path, help="YAML run config (training/configs/*.yaml)")
    parser.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE", help="config overrides, e.g. optim.lr=1e-4"
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="DIR",
        help="continue from the latest checkpoint of DIR (a run directory; default: "
        "run.output_dir of --config). Without --config the run's own run.json is used.",
    )
    parser.add_argument(
        "--max-steps",
        type=int,
        default=None,
        help="stop after this many optimizer steps in all (smoke tests; the schedule is kept)",
    )
    parser.add_argument(
        "--check-data",
        action="store_true",
        help="open every dataset of the config, check every entry, print a summary and exit",
    )
    parser.add_argument(
        "--print-config",
        action="store_true",
        help="print the resolved config and the DeepSpeed config, then exit",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="DeepSpeed info logs")
    # The deepspeed launcher passes --local_rank; the process reads LOCAL_RANK from the env.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
    )
    from training.config import (
        ConfigError,
        deepspeed_config,
        dump_config,
        load_config,
        with_absolute_paths,
    )
    from training.data.types import DataFormatError

    try:
        if args.config is not None:
            cfg = load_config(args.config, args.overrides)
        elif args.resume:
            from training.engine import config_of_run, resolve_checkpoint_dir

            cfg = config_of_run(resolve_checkpoint_dir(args.resume).parent, args.overrides)
        else:
            print("lisa-train: error: --config is required (or --resume DIR)", file=sys.stderr)
            return 2
        if args.print_config:
            from lisa_model.options import default_device

            device = default_device()
            print(dump_config(with_absolute_paths(cfg)), end="")
            precision = cfg.run.resolved_precision(device)
            print(f"# DeepSpeed config ({precision} on {device.type}):")
            print(json.dumps(deepspeed_config(cfg, precision), indent=2))
            return 0
        if args.check_data:
            from training.data.check import check_training_data

            cfg = with_absolute_paths(cfg)
            report = check_training_data(
                cfg.data, cfg.val.dataset, cfg.val_dataset_dir, progress=True
            )
            print(report.summary())
            return 0
        if not args.verbose:
            logging.getLogger("DeepSpeed").setLevel(logging.WARNING)

        from training.engine import Trainer, seconds_per_step

        resume = None
        if args.resume is not None:
            resume = args.resume or cfg.run.output_dir
        trainer = Trainer(cfg, resume=resume)
    except (ConfigError, CheckpointError, DataFormatError, FileNotFoundError) as exc:
        print(f"lisa-train: error: {exc}", file=sys.stderr)
        return 2
    except (FileExistsError, ValueError) as exc:  # a run directory in use, a resume mismatch
        print(f"lisa-train: error: {exc}", file=sys.stderr)
        return 2

    import deepspeed.comm as ds_dist

    try:
        result = trainer.fit(max_steps=args.max_steps)
    except DataFormatError as exc:  # more bad samples than data.max_bad_samples
        print(f"lisa-train: error: {exc}", file=sys.stderr)
        return 2
    finally:
        trainer.close()
        if ds_dist.is_initialized():  # DeepSpeed's, which also drops its cached groups, so
            ds_dist.destroy_process_group()  # a later run in this process can start again
    if trainer.ctx.is_main:
        best = "n/a" if result.best_giou is None else f"{result.best_giou:.4f}"
        bad = f"{result.bad_samples} bad samples skipped"
        if result.last_bad_sample:
            bad += f" (the last: {result.last_bad_sample})"
        print(
            f"lisa-train: {result.global_step} steps ({seconds_per_step(result):.2f} s/step), "
            f"best gIoU {best}; {bad}; run directory {result.output_dir}\n"
            f"export: lisa-export {result.output_dir} --out <DIR>"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
