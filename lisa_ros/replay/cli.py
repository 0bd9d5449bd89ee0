"""The ``lisa-replay`` command line: its options (``build_parser``), turning them into
``ReplayOptions`` and a model (``run``), and ``main`` (user documentation: the
``lisa_ros.replay`` package docstring)."""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path
from typing import Any

from lisa_model.cli.common import (
    UserError,
    add_mode_argument,
    add_model_arguments,
    load_model_from_args,
    run_cli,
)
from lisa_ros.pipeline import ModeSegmenter, PipelineConfig
from lisa_ros.replay.bags import STORAGES
from lisa_ros.replay.run import ReplayOptions, check_inputs, replay_to_bag


def build_parser() -> argparse.ArgumentParser:
    defaults = PipelineConfig()
    parser = argparse.ArgumentParser(
        prog="lisa-replay",
        description="Run LISA over a recorded ROS 2 bag (sqlite3 or MCAP) through the same "
        "pipeline as the live node, in bag time, and write the masks, explanations and overlays "
        "the robot would publish into a new bag.",
    )
    parser.add_argument("in_bag", type=Path, help="bag directory or .db3/.mcap file")
    parser.add_argument("--out", type=Path, required=True, help="output bag (must not exist)")
    add_model_arguments(parser)
    group = parser.add_argument_group("inputs")
    group.add_argument("--image-topic", help="sensor_msgs/Image or CompressedImage topic")
    group.add_argument("--command-topic", help="std_msgs/String topic with commands")
    group.add_argument(
        "--commands",
        type=Path,
        help="file of '<seconds> <text>' lines (seconds after the bag start, or Unix time)",
    )
    group.add_argument(
        "--no-bag-commands", action="store_true", help="ignore command topics in the bag"
    )
    group = parser.add_argument_group("pipeline (the node's parameters)")
    group.add_argument("--explain", action="store_true", help="ask for an explanation too")
    add_mode_argument(group)
    group.add_argument("--max-new-tokens", type=int, default=defaults.max_new_tokens)
    group.add_argument(
        "--max-image-age",
        type=float,
        default=defaults.max_image_age,
        help="seconds; older frames are never used (0: no limit)",
    )
    group.add_argument(
        "--image-wait-timeout",
        type=float,
        default=defaults.image_wait_timeout,
        help="seconds a command waits for a fresh frame",
    )
    group.add_argument("--queue-size", type=int, default=defaults.queue_size)
    group.add_argument(
        "--continuous", action="store_true", help="re-apply the last command to new frames"
    )
    group.add_argument("--max-rate-hz", type=float, default=defaults.max_rate_hz)
    group.add_argument("--stop-command", default=defaults.stop_command)
    group.add_argument("--max-command-chars", type=int, default=defaults.max_command_chars)
    group.add_argument(
        "--no-age-from-header",
        action="store_true",
        help="age frames from their bag time, not their header stamp",
    )
    group.add_argument(
        "--realtime",
        action="store_true",
        help="advance bag time by the measured inference time (frames arriving meanwhile "
        "are skipped, as on the robot); default: inference is instantaneous",
    )
    group = parser.add_argument_group("outputs")
    group.add_argument(
        "--storage", choices=STORAGES, default=None, help="output storage (default: the input's)"
    )
    group.add_argument("--topic-prefix", default="/lisa", help="output topic namespace")
    group.add_argument("--no-overlay", action="store_true", help="no overlay topic")
    group.add_argument(
        "--compressed-mask", action="store_true", help="also write <prefix>/mask/compressed (PNG)"
    )
    group.add_argument(
        "--copy-input", action="store_true", help="copy all input messages to the output bag"
    )
    group.add_argument(
        "--overlays", type=Path, default=None, help="directory for overlay PNGs + contact sheet"
    )
    group.add_argument("-q", "--quiet", action="store_true", help="no per-result lines")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.explain and args.mode == "segment":
        raise UserError("--explain needs --mode generate (the fast path produces no text)")
    try:
        config = PipelineConfig(
            explain=args.explain,
            max_new_tokens=args.max_new_tokens,
            max_image_age=args.max_image_age,
            image_wait_timeout=args.image_wait_timeout,
            queue_size=args.queue_size,
            continuous=args.continuous,
            max_rate_hz=args.max_rate_hz,
            overlay=not args.no_overlay or args.overlays is not None,
            stop_command=args.stop_command,
            max_command_chars=args.max_command_chars,
            age_from_header=not args.no_age_from_header,
        )
    except ValueError as exc:
        raise UserError(f"bad pipeline option: {exc}") from None
    options = ReplayOptions(
        in_bag=args.in_bag,
        out=args.out,
        config=config,
        image_topic=args.image_topic,
        command_topic=args.command_topic,
        bag_commands=not args.no_bag_commands,
        commands_file=args.commands,
        realtime=args.realtime,
        storage=args.storage,
        copy_input=args.copy_input,
        topic_prefix=args.topic_prefix,
        publish_overlay=not args.no_overlay,
        publish_compressed_mask=args.compressed_mask,
        overlays_dir=args.overlays,
        verbose=not args.quiet,
    )
    check_inputs(options)  # before the (slow) model load
    from lisa_model.predictor import LisaPredictor

    segmenter = ModeSegmenter(LisaPredictor(load_model_from_args(args)), args.mode)
    summary = replay_to_bag(options, segmenter)
    print(summary.text())
    return 0


def _sigterm_to_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    try:  # SIGTERM (e.g. from a job runner) cleans up like Ctrl-C does
        previous = signal.signal(signal.SIGTERM, _sigterm_to_exit)
    except ValueError:  # not the main thread
        previous = None
    try:
        return run_cli(build_parser(), run, argv)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
