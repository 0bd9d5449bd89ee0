"""A whole replay: ``ReplayOptions`` (what to do), :func:`replay_to_bag` (read, drive, write the
output bag and overlays, report progress) and its ``ReplaySummary``, and :func:`replay_outcomes`
(the same replay, nothing written)."""

from __future__ import annotations

import logging
import sys
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

from lisa_ros.pipeline import (
    EventKind,
    Failure,
    Pipeline,
    PipelineConfig,
    PipelineStats,
    Segmenter,
    Success,
    event_text,
    failure_text,
)
from lisa_ros.replay.bags import NS, open_writer
from lisa_ros.replay.commands import TimedCommand, load_commands_file
from lisa_ros.replay.driver import (
    CommandEvent,
    FrameSkipped,
    InputMessage,
    Published,
    ReplayDriver,
    iter_replay,
)
from lisa_ros.replay.errors import ReplayError
from lisa_ros.replay.input_bag import InputBag, TopicSelection
from lisa_ros.replay.output import (
    OutputBag,
    Position,
    check_output_paths,
    mark_partial,
    output_topics,
)
from lisa_ros.replay.overlays import overlay_png_name, write_contact_sheet, write_png
from lisa_ros.results import ResultInfo, failure_info, stop_info

log = logging.getLogger(__name__)

#: Most failed commands listed one by one in the closing summary.
FAILURES_LISTED = 20


#: Where the replay's defaults differ from the node's: pre-encoding only changes which frame a
#: command gets when inference takes time (``--realtime``), and costs an encoding per frame.
REPLAY_DEFAULTS: dict[str, Any] = {"preencode": False}


def replay_config(**values: Any) -> PipelineConfig:
    """The pipeline config of a replay: the node's defaults but :data:`REPLAY_DEFAULTS`."""
    return PipelineConfig(**{**REPLAY_DEFAULTS, **values})


@dataclass(frozen=True)
class ReplayOptions:
    """What ``lisa-replay`` does (one field per command-line option).

    Attributes:
        in_bag: input bag directory or ``.db3``/``.mcap`` file.
        out: output bag directory to create (must not exist, nor ``<out>.partial``).
        config: the pipeline's behaviour (as the node's parameters).
        image_topic, command_topic: topics to read; None to find them.
        bag_commands: read commands from the bag's command topic.
        commands_file: a commands file (format in the ``lisa_ros.replay`` docstring), or None.
        realtime: advance bag time by the inference time (see the ``lisa_ros.replay`` docstring).
        storage: output storage, ``"sqlite3"`` or ``"mcap"``; None: the input's.
        copy_input: copy every input message into the output bag.
        topic_prefix: namespace of the output topics (``<prefix>/mask`` etc.).
        publish_overlay: write the ``<prefix>/overlay`` topic.
        publish_compressed_mask: also write ``<prefix>/mask/compressed`` (lossless PNG).
        overlays_dir: write overlay PNGs and ``contact_sheet.png`` here (new or empty directory).
        progress: show a progress bar (tqdm; also off when stderr is not a terminal).
        verbose: print a line per result.
    """

    in_bag: Path
    out: Path
    config: PipelineConfig = field(default_factory=lambda: replay_config())
    image_topic: str | None = None
    command_topic: str | None = None
    bag_commands: bool = True
    commands_file: Path | None = None
    realtime: bool = False
    storage: str | None = None
    copy_input: bool = False
    topic_prefix: str = "/lisa"
    publish_overlay: bool = True
    publish_compressed_mask: bool = False
    overlays_dir: Path | None = None
    progress: bool = True
    verbose: bool = True

    @property
    def skipped_outputs(self) -> set[str]:
        """Keys of the output topics (``lisa_ros.replay.output.OUTPUT_TOPICS``) not written."""
        off = {"overlay": not self.publish_overlay, "mask_png": not self.publish_compressed_mask}
        return {key for key, skip in off.items() if skip}


@dataclass
class ReplaySummary:
    """What a replay did.

    Attributes:
        out: the finished output bag.
        stats: the pipeline's counters.
        results: every outcome with its publication time, in order.
        frames_read: image messages read; ``frames_skipped``: of those, unusable, by reason.
        written: messages written per output topic (copied input topics included).
        bag_start_ns: bag time of the input's first message.
    """

    out: Path
    stats: PipelineStats
    results: list[Published]
    frames_read: int
    frames_skipped: Counter[str]
    written: Counter[str]
    bag_start_ns: int

    @property
    def inference_seconds(self) -> list[float]:
        return [
            p.outcome.inference_seconds for p in self.results if isinstance(p.outcome, Success)
        ]

    def text(self) -> str:
        """The closing summary, a few lines."""
        secs = self.inference_seconds
        s = self.stats
        failures = [p for p in self.results if isinstance(p.outcome, Failure)]
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(s.failures.items()))
        lines = [
            f"commands: {s.commands_received} received, {s.served} served"
            f" ({s.standing_runs} continuous reruns), {s.failed} failed"
            f"{f' ({reasons})' if reasons else ''}, {s.commands_rejected} rejected,"
            f" {s.commands_dropped} dropped, {s.commands_cancelled} cancelled by stop",
        ]
        if secs:
            lines.append(
                f"inference: mean {np.mean(secs):.3f} s, p95 {np.percentile(secs, 95):.3f} s, "
                f"max {max(secs):.3f} s over {len(secs)} runs"
            )
        skipped = sum(self.frames_skipped.values())
        lines.append(
            f"frames: {self.frames_read} read, {skipped} skipped, "
            f"{s.frames_dropped} never used (replaced by a newer frame)"
        )
        for reason, count in self.frames_skipped.most_common():
            lines.append(f"  skipped {count}x: {reason}")
        for p in failures[:FAILURES_LISTED]:
            o = p.outcome
            lines.append(
                f"  failed at {(p.time_ns - self.bag_start_ns) / NS:.2f} s: "
                f"{o.command.text!r}: {o.reason}"
            )
        if len(failures) > FAILURES_LISTED:
            lines.append(f"  ... and {len(failures) - FAILURES_LISTED} more failures")
        topics = ", ".join(f"{t} {n}" for t, n in self.written.items())
        lines.append(f"wrote {self.out}: {topics or 'no messages'}")
        return "\n".join(lines)


def _select_inputs(
    bag: InputBag,
    commands_file: str | Path | None,
    image_topic: str | None,
    command_topic: str | None,
    bag_commands: bool,
) -> tuple[list[TimedCommand], TopicSelection]:
    """The commands file's commands on the bag's time line and the topics to read."""
    commands = load_commands_file(commands_file, bag.start_ns) if commands_file else []
    return commands, bag.select(image_topic, command_topic, bag_commands, not commands)


def check_inputs(options: ReplayOptions) -> None:
    """Check the outputs' paths, the bag, its topics and the commands file, without replaying.

    Raises:
        ReplayError: what ``replay_to_bag`` would raise before it starts on these inputs.
    """
    check_output_paths(options.out, options.overlays_dir)
    with InputBag(options.in_bag) as bag:
        _select_inputs(
            bag,
            options.commands_file,
            options.image_topic,
            options.command_topic,
            options.bag_commands,
        )


def replay_to_bag(options: ReplayOptions, segmenter: Segmenter) -> ReplaySummary:
    """Replay ``options.in_bag`` through the pipeline with ``segmenter`` into a new bag.

    Writes ``<out>.partial/<name>/`` and renames it to ``<out>`` when complete. On any failure
    (including KeyboardInterrupt) the writer is aborted, ``<out>.partial/PARTIAL.txt`` says
    why, and the exception propagates.

    Raises:
        ReplayError: bad input (bag, topics, commands file, existing output), or no frame of the
            image topic could be used.
    """
    out = options.out
    partial = check_output_paths(out, options.overlays_dir)
    config = options.config
    if options.overlays_dir is not None and not config.overlay:
        config = replace(config, overlay=True)
    with InputBag(options.in_bag) as bag:
        commands, selection = _select_inputs(
            bag,
            options.commands_file,
            options.image_topic,
            options.command_topic,
            options.bag_commands,
        )
        read = (
            list(bag.topics)
            if options.copy_input
            else [t for t in (selection.image_topic, selection.command_topic) if t]
        )
        total = sum(bag.counts[t] for t in read)
        if options.copy_input:
            clash = set(bag.topics) & set(output_topics(options.topic_prefix).values())
            if clash:
                raise ReplayError(
                    f"{bag.path}: has topics {', '.join(sorted(clash))} that the output uses; "
                    "choose another --topic-prefix"
                )
        writer = open_writer(partial / out.name, options.storage or bag.storage)
        partial.mkdir(parents=True)
        progress = _progress(total, options.progress)
        position = Position()
        try:
            writer.open()
            summary = _run(
                options, config, bag, selection, commands, segmenter, writer, progress, position
            )
            writer.close()
            if options.overlays_dir is not None:
                write_contact_sheet(options.overlays_dir, _served(summary))
            (partial / out.name).rename(out)
            partial.rmdir()
        except BaseException as exc:
            progress.close()
            writer.abort()
            mark_partial(partial, exc, position, total, bag.start_ns)
            raise
        progress.close()
    return summary


def _served(summary: ReplaySummary) -> list[tuple[int, float, Success]]:
    served = [p for p in summary.results if isinstance(p.outcome, Success)]
    return [
        (i, (p.time_ns - summary.bag_start_ns) / NS, p.outcome)
        for i, p in enumerate(served, start=1)
    ]


def _event_info(item: CommandEvent) -> ResultInfo | None:
    """The typed result a command event ends in (a failure, the stop command), else None."""
    event = item.event
    if event.command is None:
        return None
    latency = item.time_ns / NS - event.command.received
    if event.failure is not None:
        return failure_info(event.failure, latency)
    if event.kind == EventKind.STOPPED:
        return stop_info(event, latency)
    return None


def _progress(total: int, enabled: bool) -> Any:
    from tqdm import tqdm

    return tqdm(
        total=total,
        unit="msg",
        desc="lisa-replay",
        disable=None if enabled else True,
        dynamic_ncols=True,
    )


def _say(text: str, error: bool = False) -> None:
    from tqdm import tqdm

    tqdm.write(text, file=sys.stderr if error else sys.stdout)


def _run(
    options: ReplayOptions,
    config: PipelineConfig,
    bag: InputBag,
    selection: TopicSelection,
    commands: list[TimedCommand],
    segmenter: Segmenter,
    writer: Writer,
    progress: Any,
    position: Position,
) -> ReplaySummary:
    output = OutputBag(writer, options.topic_prefix, options.skipped_outputs)
    pipeline = Pipeline(config)
    driver = ReplayDriver(pipeline, segmenter, options.realtime)
    defs_store = bag.typestore(bag.topics) if options.copy_input else get_typestore(Stores.EMPTY)
    results: list[Published] = []
    skipped: Counter[str] = Counter()
    frames_read = served = 0
    start = bag.start_ns
    overlays = options.overlays_dir
    if overlays is not None:
        overlays.mkdir(parents=True, exist_ok=True)
    for item in iter_replay(bag, selection, driver, commands, read_all=options.copy_input):
        if isinstance(item, InputMessage):
            position.messages += 1
            position.time_ns = item.time_ns
            progress.update(1)
            if item.connection.topic == selection.image_topic:
                frames_read += 1
            if options.copy_input:
                output.copy(item, defs_store)
        elif isinstance(item, FrameSkipped):
            if item.reason not in skipped:
                output.explain(item.time_ns, f"failed: bad image on {item.topic}: {item.reason}")
                _say(
                    f"warning: skipping frame on {item.topic} at "
                    f"{(item.time_ns - start) / NS:.2f} s: {item.reason} (further frames with "
                    f"this problem are only counted)",
                    error=True,
                )
            skipped[item.reason] += 1
        elif isinstance(item, CommandEvent):
            text = event_text(item.event)
            info = _event_info(item)
            if info is not None and text is not None:
                output.answer(item.time_ns, info, text)
            if item.event.is_warning:
                _say(
                    f"warning: {item.origin} at {(item.time_ns - start) / NS:.2f} s: "
                    f"{item.event.message}",
                    error=True,
                )
        else:
            results.append(item)
            at = (item.time_ns - start) / NS
            outcome = item.outcome
            if isinstance(outcome, Success):
                output.publish(item.time_ns, outcome)
                served += 1
                if overlays is not None and outcome.overlay is not None:
                    write_png(overlays / overlay_png_name(served, at), outcome.overlay)
                if options.verbose:
                    pixels = int(np.count_nonzero(outcome.mask))
                    _say(
                        f"{at:8.2f} s  {outcome.command.text!r}: {outcome.result.masks.shape[0]}"
                        f" mask(s), {pixels} px, {outcome.inference_seconds:.2f} s"
                        f"{f' - {outcome.explanation}' if outcome.explanation else ''}"
                    )
            else:
                latency = item.time_ns / NS - outcome.command.received
                output.answer(item.time_ns, failure_info(outcome, latency), failure_text(outcome))
                _say(
                    f"warning: {at:.2f} s: command {outcome.command.text!r} failed: "
                    f"{outcome.reason}",
                    error=True,
                )
                if outcome.error is not None:
                    log.debug("".join(traceback.format_exception(outcome.error)))
    if frames_read and sum(skipped.values()) == frames_read:
        reason = skipped.most_common(1)[0][0]
        raise ReplayError(
            f"{bag.path}: none of the {frames_read} frames on {selection.image_topic} could be "
            f"used (e.g. {reason})"
        )
    return ReplaySummary(
        out=options.out,
        stats=pipeline.stats(),
        results=results,
        frames_read=frames_read,
        frames_skipped=skipped,
        written=output.written,
        bag_start_ns=start,
    )


def replay_outcomes(
    bag_path: str | Path,
    segmenter: Segmenter,
    config: PipelineConfig | None = None,
    *,
    image_topic: str | None = None,
    command_topic: str | None = None,
    commands_file: str | Path | None = None,
    bag_commands: bool = True,
    realtime: bool = False,
) -> list[Published]:
    """Every outcome of replaying a bag, with its publication time; nothing is written.

    The same path as ``lisa-replay`` takes, for comparisons with the live node: each ``Success``
    carries ``mask`` (``(H, W)`` uint8 0/255 in the source frame), ``frame.header`` (the source
    header), ``explanation`` and ``command``.
    """
    with InputBag(bag_path) as bag:
        commands, selection = _select_inputs(
            bag, commands_file, image_topic, command_topic, bag_commands
        )
        driver = ReplayDriver(
            Pipeline(config if config is not None else replay_config()), segmenter, realtime
        )
        return [
            item
            for item in iter_replay(bag, selection, driver, commands)
            if isinstance(item, Published)
        ]
