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
    add_encoder_dtype_argument,
    add_mode_argument,
    add_model_arguments,
    load_model_from_args,
    run_cli,
)
from lisa_ros import settings
from lisa_ros.pipeline import ModeSegmenter, PipelineConfig
from lisa_ros.replay.bags import STORAGES
from lisa_ros.replay.run import (
    REPLAY_DEFAULTS,
    ReplayOptions,
    check_inputs,
    replay_config,
    replay_to_bag,
)
from lisa_ros.settings import SettingError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-replay",
        description="Run LISA over a recorded ROS 2 bag (sqlite3 or MCAP) through the same "
        "pipeline as the live node, in bag time, and write the masks, explanations and overlays "
        "the robot would publish into a new bag.",
    )
    parser.add_argument("in_bag", type=Path, help="bag directory or .db3/.mcap file")
    parser.add_argument("--out", type=Path, required=True, help="output bag (must not exist)")
    add_model_arguments(parser)
    add_encoder_dtype_argument(parser)
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
    add_mode_argument(group)
    settings.add_arguments(group, PipelineConfig.setting_names(), REPLAY_DEFAULTS)
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
    values = {name: getattr(args, name) for name in PipelineConfig.setting_names()}
    try:
        config = replay_config(overlay=not args.no_overlay or args.overlays is not None, **values)
    except SettingError as exc:
        flag = "--" + exc.name.replace("_", "-")
        raise UserError(f"{flag}: {exc.reason}") from None
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
