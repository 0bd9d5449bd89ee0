"""``lisa-replay``: run LISA over a recorded ROS 2 bag and write what the robot would publish.

Example::

    lisa-replay recording/ --out recording_lisa/ --model xinlai/LISA-7B-v1 --device cuda \\
        --overlays recording_overlays/

Input: a rosbag2 directory (``metadata.yaml`` plus ``.db3`` or ``.mcap`` files) or a bare
``.db3``/``.mcap`` file, read with ``rosbags``. Messages are deserialised with the definitions
embedded in the bag when it has them (MCAP schemas; sqlite3 bags recorded from Iron on), else with
the ROS 2 Humble definitions. Frames come from one ``sensor_msgs/Image`` or
``sensor_msgs/CompressedImage`` topic (``--image-topic``; found automatically when the bag has one
image topic, or one raw topic ``T`` plus its image_transport variants ``T/<transport>``, then ``T``
is used). Commands come from a
``std_msgs/String`` topic (``--command-topic``; found automatically when one String topic is named
``command`` or ends in ``/command``) and/or a ``--commands FILE``.

Commands file: one command per line, ``<seconds> <text>``; blank lines and lines starting with
``#`` are skipped. ``seconds`` is relative to the bag's first message, unless it is at least
``ABSOLUTE_TIME_THRESHOLD`` (1e8 s, i.e. a Unix time after 1973), then it is an absolute bag time
in seconds since the epoch. Example::

    # seconds  command
    0.5   find the red ball
    2.25  what could I roll across the table?

Time: the replay drives the same :class:`~lisa_ros.pipeline.Pipeline` as the live node, in bag
time. Messages are fed in bag (receive) time order, ``now`` = the message's bag time, and before
each message every job that has become due (a command's wait timing out, a continuous-mode rerun)
is run at the time it became due, so pairing, ``max_image_age``, ``image_wait_timeout`` and
continuous mode behave as on the robot. By default inference takes no bag time: the replay answers
"what would the robot publish for these inputs" as if the model were instantaneous, so every
command is paired with the frame it would get on an infinitely fast machine, and results are the
same on any hardware. With ``--realtime`` bag time advances by the measured inference time of
each job: frames that arrive while the model runs replace each other in the one-frame buffer and
results are stamped when they would be published, as on a robot with this machine's speed.

Output: a new bag (``--storage``, default the input's) with, per successful command,
``<prefix>/mask`` (``sensor_msgs/Image`` mono8, 255 = target, header = the source frame's header),
``<prefix>/explanation`` (``std_msgs/String``), ``<prefix>/overlay`` (``sensor_msgs/Image``
rgb8; not with ``--no-overlay``) and with ``--compressed-mask`` ``<prefix>/mask/compressed``
(lossless PNG), written at the bag time the node would publish them. Like the node, the replay
also answers on ``explanation`` for failed commands (``"failed: <reason> (command '...')"``),
rejected or dropped commands, the stop command, and bad frames (once per kind of problem; the
node repeats it every few seconds).
``--copy-input`` also copies every input message, byte for byte, with its topic, type, definition
and QoS. ``--overlays DIR`` writes one PNG per result (``<index>_<seconds>s.png``, seconds after
the bag start) and a ``contact_sheet.png``.

The output bag is written to ``<out>.partial/`` and moved to ``<out>`` only when complete; an
existing ``<out>`` is never touched. If the run fails or is interrupted, ``<out>.partial/`` stays
with a ``PARTIAL.txt`` saying why, and the exit status is non-zero.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import math
import signal
import sqlite3
import sys
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.interfaces import Connection, MessageDefinitionFormat
from rosbags.rosbag2 import Reader, ReaderError, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from lisa_model.cli.common import (
    UserError,
    add_mode_argument,
    add_model_arguments,
    load_model_from_args,
    run_cli,
)
from lisa_ros.conversion import (
    mask_to_compressed_png,
    mask_to_image_fields,
    message_to_rgb,
    rgb_to_image_fields,
    stamp_to_seconds,
)
from lisa_ros.pipeline import (
    Event,
    Failure,
    ModeSegmenter,
    Outcome,
    Pipeline,
    PipelineConfig,
    PipelineStats,
    Segmenter,
    Success,
    event_text,
    failure_text,
)

log = logging.getLogger(__name__)

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
STRING_TYPE = "std_msgs/msg/String"
STORAGES = ("sqlite3", "mcap")
#: Command-file times at least this large (seconds) are absolute Unix times, not bag offsets.
ABSOLUTE_TIME_THRESHOLD = 1e8
#: Most overlays shown on the contact sheet (evenly picked when there are more results).
CONTACT_SHEET_MAX = 48
#: Most failed commands listed one by one in the closing summary.
FAILURES_LISTED = 20
_NS = 1_000_000_000


class ReplayError(UserError):
    """A problem with the replay's input (bag, topic, commands file, output path)."""


# ------------------------------------------------------------------------------ commands file


@dataclass(frozen=True)
class TimedCommand:
    """A command from a commands file: bag time in ns, text, and ``file:line`` it came from."""

    time_ns: int
    text: str
    origin: str


def parse_commands_file(path: str | Path) -> list[tuple[Decimal, str, int]]:
    """Read a commands file (format in the module docstring).

    Returns:
        ``(seconds, text, line number)`` per command, in file order; ``seconds`` exactly as
        written (a ``Decimal``).

    Raises:
        ReplayError: the file cannot be read, or a line is not ``<seconds> <text>`` with finite
            ``seconds >= 0`` and non-empty text (naming ``file:line``).
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ReplayError(f"--commands {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ReplayError(f"--commands {path}: cannot be read as UTF-8 text ({exc})") from None
    out: list[tuple[Decimal, str, int]] = []
    for number, line in enumerate(lines, start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        parts = stripped.split(None, 1)
        try:
            seconds = Decimal(parts[0])  # exact: Unix times in ns need more than a float
        except InvalidOperation:
            seconds = Decimal("NaN")
        if len(parts) < 2 or not seconds.is_finite() or seconds < 0:
            raise ReplayError(
                f"{path}:{number}: expected '<seconds> <command text>' with seconds >= 0, "
                f"got {stripped!r}"
            )
        out.append((seconds, parts[1].strip(), number))
    return out


def load_commands_file(path: str | Path, bag_start_ns: int) -> list[TimedCommand]:
    """Commands of a file on the bag's time line, sorted by time (file order for equal times).

    Times below ``ABSOLUTE_TIME_THRESHOLD`` are seconds after ``bag_start_ns``; larger ones are
    absolute seconds since the Unix epoch.
    """
    commands = []
    for seconds, text, number in parse_commands_file(path):
        offset = int((seconds * _NS).to_integral_value())
        t_ns = offset if seconds >= ABSOLUTE_TIME_THRESHOLD else bag_start_ns + offset
        commands.append(TimedCommand(t_ns, text, f"{path}:{number}"))
    return sorted(commands, key=lambda c: c.time_ns)


# --------------------------------------------------------------------------------- input bag


@dataclass(frozen=True)
class TopicSelection:
    """Which topics of a bag the replay reads: the image topic and its type, the command topic
    (None when commands come only from a file)."""

    image_topic: str
    image_type: str
    command_topic: str | None


def _bag_error(path: Path, exc: BaseException) -> ReplayError:
    return ReplayError(f"{path}: cannot be read as a ROS 2 bag ({type(exc).__name__}: {exc})")


def _embedded_types(conn: Connection) -> dict[str, Any]:
    """Message types defined by a connection's embedded definition ({} when it has none)."""
    msgdef = conn.msgdef
    if msgdef.format == MessageDefinitionFormat.MSG and msgdef.data:
        return dict(get_types_from_msg(msgdef.data, conn.msgtype))
    if msgdef.format == MessageDefinitionFormat.IDL and msgdef.data:
        separator = "=" * 80 + "\n"
        if not msgdef.data.startswith(separator + "IDL: "):
            return dict(get_types_from_idl(msgdef.data))
        types: dict[str, Any] = {}
        for block in msgdef.data.split(separator)[1:]:
            types.update(get_types_from_idl(block.split("\n", 1)[1]))
        return types
    return {}


class InputBag:
    """A ROS 2 bag opened for replay (use as a context manager, or call ``close``).

    Attributes:
        path: the bag directory or storage file.
        storage: ``"sqlite3"`` or ``"mcap"``.
        topics: ``{topic: message type}`` (``"<mixed>"`` when connections disagree).
        counts: ``{topic: message count}``.
        start_ns: bag time of the first message (ns since the epoch).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise ReplayError(f"{path}: no such bag (expected a rosbag2 directory or .db3/.mcap)")
        if path.is_dir():
            if not (path / "metadata.yaml").is_file():
                files = sorted(p.name for p in path.iterdir() if p.suffix in (".db3", ".mcap"))
                hint = f"; to read a storage file alone, pass {path / files[0]}" if files else ""
                raise ReplayError(f"{path}: not a ROS 2 bag: no metadata.yaml in it{hint}")
            storage = "mcap" if any(path.glob("*.mcap")) else "sqlite3"
        elif path.suffix in (".db3", ".mcap"):
            storage = "mcap" if path.suffix == ".mcap" else "sqlite3"
        else:
            raise ReplayError(
                f"{path}: not a ROS 2 bag (expected a directory with metadata.yaml, or a .db3 or "
                f".mcap file)"
            )
        try:
            self._reader = Reader(path)
            self._reader.open()
        except (ReaderError, OSError, sqlite3.Error, ValueError, KeyError) as exc:
            raise _bag_error(path, exc) from None
        self.path, self.storage = path, storage
        self.connections: list[Connection] = list(self._reader.connections)
        self.topics: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        for conn in self.connections:
            known = self.topics.setdefault(conn.topic, conn.msgtype)
            if known != conn.msgtype:
                self.topics[conn.topic] = "<mixed>"
            self.counts[conn.topic] = self.counts.get(conn.topic, 0) + conn.msgcount
        self.start_ns = int(self._reader.start_time)
        self.message_count = int(self._reader.message_count)

    def __enter__(self) -> InputBag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._reader.is_open:
            self._reader.close()

    def describe_topics(self) -> str:
        """``"/a (sensor_msgs/msg/Image, 15 msgs), ..."`` for error messages."""
        if not self.topics:
            return "(none)"
        return ", ".join(
            f"{t} ({ty}, {self.counts[t]} msgs)" for t, ty in sorted(self.topics.items())
        )

    def select(
        self,
        image_topic: str | None = None,
        command_topic: str | None = None,
        bag_commands: bool = True,
        need_commands: bool = True,
    ) -> TopicSelection:
        """Choose the image and command topics (see the module docstring for auto-detection).

        Args:
            image_topic: the image topic; None to find it.
            command_topic: the command topic; None to find it (if ``bag_commands``).
            bag_commands: read commands from the bag at all.
            need_commands: raise when no command topic is found (there is no commands file).

        Raises:
            ReplayError: a named topic is missing or has the wrong type (listing the bag's
                topics), or the choice is ambiguous or impossible.
        """
        where = f"{self.path}"
        if image_topic is not None:
            image_topic = self._check_topic(image_topic, IMAGE_TYPES, "--image-topic")
        else:
            images = sorted(t for t, ty in self.topics.items() if ty in IMAGE_TYPES)
            if not images:
                raise ReplayError(
                    f"{where}: no sensor_msgs/Image or CompressedImage topic; topics: "
                    f"{self.describe_topics()}"
                )
            raw = [t for t in images if self.topics[t] == IMAGE_TYPE]
            if len(images) == 1:
                image_topic = images[0]
            elif len(raw) == 1 and all(t == raw[0] or t.startswith(raw[0] + "/") for t in images):
                image_topic = raw[0]  # one camera: the raw topic and its image_transport copies
            else:
                listed = ", ".join(f"{t} ({self.topics[t]})" for t in images)
                raise ReplayError(
                    f"{where}: several image topics, choose one with --image-topic: {listed}"
                )
        if self.counts.get(image_topic, 0) == 0:
            raise ReplayError(f"{where}: image topic {image_topic} has no messages")

        if command_topic is not None:
            command_topic = self._check_topic(command_topic, (STRING_TYPE,), "--command-topic")
        elif not bag_commands and need_commands:
            raise ReplayError("no commands: --no-bag-commands needs --commands FILE")
        elif bag_commands:
            strings = sorted(t for t, ty in self.topics.items() if ty == STRING_TYPE)
            named = [t for t in strings if t == "command" or t.endswith("/command")]
            if len(named) > 1:
                raise ReplayError(
                    f"{where}: several command topics, choose one with --command-topic: "
                    f"{', '.join(named)}"
                )
            command_topic = named[0] if named else None
            if command_topic is None and need_commands:
                listed = ", ".join(strings) if strings else "none"
                raise ReplayError(
                    f"{where}: no std_msgs/String topic named 'command' or '.../command' "
                    f"(String topics: {listed}); pass --command-topic TOPIC or --commands FILE"
                )
        return TopicSelection(image_topic, self.topics[image_topic], command_topic)

    def _check_topic(self, topic: str, types: tuple[str, ...], option: str) -> str:
        if topic not in self.topics:
            raise ReplayError(
                f"{option} {topic}: no such topic in {self.path}; topics: {self.describe_topics()}"
            )
        if self.topics[topic] not in types:
            raise ReplayError(
                f"{option} {topic}: has type {self.topics[topic]}, expected {' or '.join(types)}"
            )
        return topic

    def typestore(self, topics: Iterable[str]) -> Typestore:
        """A typestore for deserialising ``topics``: the bag's embedded definitions where it has
        them (the data was written with those), the ROS 2 Humble definitions for the rest."""
        types: dict[str, Any] = dict(get_typestore(Stores.ROS2_HUMBLE).fielddefs)
        wanted = set(topics)
        for conn in self.connections:
            if conn.topic not in wanted:
                continue
            try:
                types.update(_embedded_types(conn))
            except Exception as exc:  # noqa: BLE001 - any parser error: use the defaults
                log.warning(
                    "%s: cannot parse the embedded definition of %s (%s); using ROS 2 Humble's",
                    self.path,
                    conn.msgtype,
                    exc,
                )
        store = get_typestore(Stores.EMPTY)
        store.register({k: v for k, v in types.items() if k not in store.fielddefs})
        return store

    def messages(
        self, topics: Iterable[str] | None = None
    ) -> Iterator[tuple[Connection, int, bytes]]:
        """``(connection, bag time ns, raw CDR bytes)`` of ``topics`` (None: all) in time order."""
        wanted = None if topics is None else set(topics)
        conns = [c for c in self.connections if wanted is None or c.topic in wanted]
        if not conns:
            return
        try:
            yield from self._reader.messages(connections=conns)
        except (ReaderError, sqlite3.Error) as exc:
            raise ReplayError(
                f"{self.path}: bag is corrupt ({type(exc).__name__}: {exc})"
            ) from None


# ------------------------------------------------------------------------------ replay driver


@dataclass(frozen=True)
class Published:
    """A pipeline outcome and the bag time (ns) at which the node would publish it."""

    time_ns: int
    outcome: Outcome


class ReplayDriver:
    """Drives a :class:`~lisa_ros.pipeline.Pipeline` in bag time (no threads, no ROS).

    It plays the node's worker thread: its clock is the time at which the worker next looks for
    work. Inputs are pushed at their bag times, in time order; ``run_until(t)`` runs every job
    that would start at or before ``t``, each at the time it became due. Without ``realtime`` a
    job takes no bag time; with it, the clock advances by the measured wall time of the job, and
    inputs pushed meanwhile wait (frames replace each other) as on the robot.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        segmenter: Segmenter,
        realtime: bool = False,
        timer: Callable[[], float] = time.perf_counter,
    ) -> None:
        self.pipeline, self.segmenter, self.realtime = pipeline, segmenter, realtime
        self.timer = timer  # wall seconds, to measure jobs in realtime mode
        self._clock_ns: int | None = None

    def _arrive(self, t_ns: int) -> None:
        if self._clock_ns is None or self._clock_ns < t_ns:
            self._clock_ns = t_ns

    def push_frame(
        self, t_ns: int, rgb: np.ndarray, *, stamp: float, header: Any, frame_id: str
    ) -> None:
        """Push a ``(H, W, 3)`` uint8 RGB frame received at bag time ``t_ns``."""
        self.pipeline.push_frame(rgb, t_ns / _NS, stamp=stamp, header=header, frame_id=frame_id)
        self._arrive(t_ns)

    def push_command(self, t_ns: int, text: str) -> list[Event]:
        """Push a command received at bag time ``t_ns``; the pipeline's events to log."""
        events = self.pipeline.push_command(text, t_ns / _NS)
        self._arrive(t_ns)
        return events

    def run_until(self, limit_ns: float) -> list[Published]:
        """Run every job that would start at or before ``limit_ns`` (``math.inf``: all of them,
        e.g. the timeouts of commands still waiting when the bag ends)."""
        published: list[Published] = []
        while self._clock_ns is not None:
            clock = self._clock_ns
            wait = self.pipeline.time_until_next_event(clock / _NS)
            if wait is None:
                break
            start = clock + math.ceil(wait * _NS)
            if start > limit_ns:
                break
            began = self.timer()
            outcome = self.pipeline.step(start / _NS, self.segmenter)
            elapsed = self.timer() - began
            if outcome is None:
                # Nothing to do after all (the frame went stale while waiting, or rounding):
                # the worker looked at `start`; always move on by at least 1 ns.
                self._clock_ns = max(start, clock + 1)
                continue
            end = start + (int(round(elapsed * _NS)) if self.realtime else 0)
            self._clock_ns = end
            published.append(Published(end, outcome))
        return published


# ------------------------------------------------------------------------------ replay stream


@dataclass(frozen=True)
class InputMessage:
    """A message read from the bag (every message read, fed to the pipeline or not)."""

    connection: Connection
    time_ns: int
    raw: bytes


@dataclass(frozen=True)
class FrameSkipped:
    """An image message that could not be used (deserialisation or decoding failed)."""

    time_ns: int
    topic: str
    reason: str


@dataclass(frozen=True)
class CommandEvent:
    """What the pipeline said about a pushed command (accepted, rejected, dropped, stop)."""

    time_ns: int
    origin: str
    event: Event


ReplayItem = InputMessage | Published | FrameSkipped | CommandEvent


def iter_replay(
    bag: InputBag,
    selection: TopicSelection,
    driver: ReplayDriver,
    commands: Sequence[TimedCommand] = (),
    read_all: bool = False,
) -> Iterator[ReplayItem]:
    """Feed a bag (and file commands) through ``driver`` in time order, yielding what happens.

    Bag messages and file commands are merged by time (a bag message first at equal times);
    before and after each input, ``driver.run_until`` its time; at the end every job still due is
    run. A bag time earlier than the previous input (out-of-order storage files) is treated as
    equal to it.

    Args:
        bag: the opened bag.
        selection: the image and command topics.
        driver: the pipeline driver (holds the segmenter).
        commands: commands from a file, sorted by time.
        read_all: also read (and yield as ``InputMessage``) the bag's other topics.
    """
    topics = [selection.image_topic] + (
        [selection.command_topic] if selection.command_topic else []
    )
    store = bag.typestore(topics)
    bag_items = (
        (t, 0, n, (conn, raw))
        for n, (conn, t, raw) in enumerate(bag.messages(None if read_all else topics))
    )
    file_items = ((c.time_ns, 1, n, c) for n, c in enumerate(commands))
    last = -math.inf
    for t, _, _, item in heapq.merge(bag_items, file_items, key=lambda x: x[:3]):
        t = int(max(t, last))
        last = t
        yield from driver.run_until(t)
        if isinstance(item, TimedCommand):
            for event in driver.push_command(t, item.text):
                yield CommandEvent(t, item.origin, event)
        else:
            conn, raw = item
            yield InputMessage(conn, t, raw)
            if conn.topic == selection.image_topic:
                skipped = _push_image(driver, store, conn, t, raw)
                if skipped is not None:
                    yield skipped
            elif conn.topic == selection.command_topic:
                yield from _push_bag_command(driver, store, conn, t, raw)
        yield from driver.run_until(t)
    yield from driver.run_until(math.inf)


def _push_image(
    driver: ReplayDriver, store: Typestore, conn: Connection, t: int, raw: bytes
) -> FrameSkipped | None:
    try:
        msg = store.deserialize_cdr(raw, conn.msgtype)
    except Exception as exc:  # noqa: BLE001 - a corrupt message is skipped, like a bad frame
        return FrameSkipped(t, conn.topic, f"cannot deserialise {conn.msgtype}: {exc}")
    try:
        rgb = message_to_rgb(msg)
    except ValueError as exc:  # ImageConversionError
        return FrameSkipped(t, conn.topic, str(exc))
    header = msg.header
    stamp = stamp_to_seconds(header.stamp)
    driver.push_frame(t, rgb, stamp=stamp, header=header, frame_id=str(header.frame_id))
    return None


def _push_bag_command(
    driver: ReplayDriver, store: Typestore, conn: Connection, t: int, raw: bytes
) -> Iterator[CommandEvent]:
    try:
        text = str(store.deserialize_cdr(raw, conn.msgtype).data)
    except Exception as exc:  # noqa: BLE001 - a corrupt message is skipped with a warning
        log.warning("%s at %.3f s: cannot deserialise a command (%s)", conn.topic, t / _NS, exc)
        return
    for event in driver.push_command(t, text):
        yield CommandEvent(t, conn.topic, event)


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
        commands = load_commands_file(commands_file, bag.start_ns) if commands_file else []
        selection = bag.select(image_topic, command_topic, bag_commands, not commands)
        driver = ReplayDriver(Pipeline(config), segmenter, realtime)
        return [
            item
            for item in iter_replay(bag, selection, driver, commands)
            if isinstance(item, Published)
        ]


# ---------------------------------------------------------------------------------- output


@dataclass(frozen=True)
class ReplayOptions:
    """What ``lisa-replay`` does (one field per command-line option).

    Attributes:
        in_bag: input bag directory or ``.db3``/``.mcap`` file.
        out: output bag directory to create (must not exist, nor ``<out>.partial``).
        config: the pipeline's behaviour (as the node's parameters).
        image_topic, command_topic: topics to read; None to find them.
        bag_commands: read commands from the bag's command topic.
        commands_file: a commands file (format in the module docstring), or None.
        realtime: advance bag time by the inference time (see the module docstring).
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
    config: PipelineConfig = field(default_factory=PipelineConfig)
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
                f"  failed at {(p.time_ns - self.bag_start_ns) / _NS:.2f} s: "
                f"{o.command.text!r}: {o.reason}"
            )
        if len(failures) > FAILURES_LISTED:
            lines.append(f"  ... and {len(failures) - FAILURES_LISTED} more failures")
        topics = ", ".join(f"{t} {n}" for t, n in self.written.items())
        lines.append(f"wrote {self.out}: {topics or 'no messages'}")
        return "\n".join(lines)


class _OutputBag:
    """The output topics (and copies of input connections) of a bag being written."""

    def __init__(self, writer: Writer, prefix: str, overlay: bool, mask_png: bool) -> None:
        self.writer = writer
        self.ts = get_typestore(Stores.ROS2_HUMBLE)
        self.topics = output_topics(prefix, overlay, mask_png)
        types = {
            "mask": IMAGE_TYPE,
            "mask_png": COMPRESSED_TYPE,
            "explanation": STRING_TYPE,
            "overlay": IMAGE_TYPE,
        }
        self.conns = {
            key: writer.add_connection(topic, types[key], typestore=self.ts)
            for key, topic in self.topics.items()
        }
        self.copies: dict[int, Connection | None] = {}
        self.written: Counter[str] = Counter()

    def _header(self, header: Any) -> Any:
        t = self.ts.types
        if header is None:
            return t["std_msgs/msg/Header"](
                stamp=t["builtin_interfaces/msg/Time"](sec=0, nanosec=0), frame_id=""
            )
        stamp = t["builtin_interfaces/msg/Time"](
            sec=int(header.stamp.sec), nanosec=int(header.stamp.nanosec)
        )
        return t["std_msgs/msg/Header"](stamp=stamp, frame_id=str(header.frame_id))

    def _write(self, key: str, t_ns: int, msg: Any, msgtype: str) -> None:
        self.writer.write(self.conns[key], t_ns, self.ts.serialize_cdr(msg, msgtype))
        self.written[self.topics[key]] += 1

    def explain(self, t_ns: int, text: str) -> None:
        self._write("explanation", t_ns, self.ts.types[STRING_TYPE](data=text), STRING_TYPE)

    def publish(self, t_ns: int, success: Success) -> None:
        image_t = self.ts.types[IMAGE_TYPE]
        header = self._header(success.frame.header)
        fields = mask_to_image_fields(success.mask).as_kwargs(numpy_data=True)
        self._write("mask", t_ns, image_t(header=header, **fields), IMAGE_TYPE)
        if "mask_png" in self.conns:
            fmt, png = mask_to_compressed_png(success.mask)
            data = np.frombuffer(png, dtype=np.uint8)
            msg = self.ts.types[COMPRESSED_TYPE](header=header, format=fmt, data=data)
            self._write("mask_png", t_ns, msg, COMPRESSED_TYPE)
        self.explain(t_ns, success.explanation)
        if "overlay" in self.conns and success.overlay is not None:
            fields = rgb_to_image_fields(success.overlay).as_kwargs(numpy_data=True)
            self._write("overlay", t_ns, image_t(header=header, **fields), IMAGE_TYPE)

    def copy(self, message: InputMessage, store_for_defs: Typestore) -> None:
        conn = message.connection
        if conn.id not in self.copies:
            self.copies[conn.id] = self._copy_connection(conn, store_for_defs)
        target = self.copies[conn.id]
        if target is not None:
            self.writer.write(target, message.time_ns, message.raw)
            self.written[conn.topic] += 1

    def _copy_connection(self, conn: Connection, store: Typestore) -> Connection | None:
        for existing in self.writer.connections:  # several connections may share a topic
            if (existing.topic, existing.msgtype, existing.ext) == (
                conn.topic,
                conn.msgtype,
                conn.ext,
            ):
                return existing
        msgdef, digest = conn.msgdef.data, conn.digest
        if conn.msgdef.format == MessageDefinitionFormat.NONE or not msgdef or not digest:
            try:
                msgdef, _ = store.generate_msgdef(conn.msgtype, ros_version=2)
                digest = store.hash_rihs01(conn.msgtype)
            except Exception:  # noqa: BLE001 - unknown type: it cannot be described
                log.warning(
                    "--copy-input: not copying %s: the bag has no definition of %s",
                    conn.topic,
                    conn.msgtype,
                )
                return None
        return self.writer.add_connection(
            conn.topic,
            conn.msgtype,
            msgdef=msgdef,
            rihs01=digest,
            serialization_format=conn.ext.serialization_format,
            offered_qos_profiles=conn.ext.offered_qos_profiles,
        )


def _write_overlays(directory: Path, results: list[tuple[int, float, Success]]) -> None:
    """One PNG per result and a contact sheet (of at most ``CONTACT_SHEET_MAX`` results)."""
    import cv2

    from lisa_model.visualize import contact_sheet

    if not results:
        return
    thumbs, labels = [], []
    keep = set(np.linspace(0, len(results) - 1, min(len(results), CONTACT_SHEET_MAX)).round())
    for i, (index, seconds, success) in enumerate(results):
        if i not in keep:
            continue
        picture = success.overlay
        if picture.shape[1] > 320:
            f = 320 / picture.shape[1]
            size = (320, max(1, round(picture.shape[0] * f)))
            picture = cv2.resize(picture, size, interpolation=cv2.INTER_AREA)
        thumbs.append(picture)
        labels.append(f"#{index} {seconds:.2f}s {success.command.text}")
    sheet = contact_sheet(thumbs, columns=4, labels=labels)
    cv2.imwrite(str(directory / "contact_sheet.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))


@dataclass
class _Position:
    """How far a replay got: input messages read and the bag time of the last one."""

    messages: int = 0
    time_ns: int | None = None


def output_topics(prefix: str, overlay: bool = True, mask_png: bool = True) -> dict[str, str]:
    """``{"mask": "<prefix>/mask", "mask_png": "<prefix>/mask/compressed", "explanation": ...,
    "overlay": ...}``, without the optional ``overlay`` and ``mask_png`` when they are off."""
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    topics = {
        "mask": f"{prefix}/mask",
        "mask_png": f"{prefix}/mask/compressed",
        "explanation": f"{prefix}/explanation",
        "overlay": f"{prefix}/overlay",
    }
    if not overlay:
        del topics["overlay"]
    if not mask_png:
        del topics["mask_png"]
    return topics


def check_output_paths(out: Path, overlays_dir: Path | None) -> Path:
    """Refuse existing outputs; return the staging directory ``<out>.partial``."""
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise ReplayError(f"--out {out}: exists; lisa-replay never writes over an existing path")
    if partial.exists():
        raise ReplayError(
            f"--out {out}: {partial} exists (left by an earlier run that did not finish, or one "
            f"still running); remove it first"
        )
    if (
        overlays_dir is not None
        and overlays_dir.exists()
        and (not overlays_dir.is_dir() or any(overlays_dir.iterdir()))
    ):
        raise ReplayError(f"--overlays {overlays_dir}: exists and is not an empty directory")
    return partial


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
        commands = (
            load_commands_file(options.commands_file, bag.start_ns)
            if options.commands_file
            else []
        )
        selection = bag.select(
            options.image_topic, options.command_topic, options.bag_commands, not commands
        )
        storage = options.storage or bag.storage
        plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
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
        partial.mkdir(parents=True)
        writer = Writer(partial / out.name, version=9, storage_plugin=plugin)
        progress = _progress(total, options.progress)
        position = _Position()
        try:
            writer.open()
            summary = _run(
                options, config, bag, selection, commands, segmenter, writer, progress, position
            )
            writer.close()
            if options.overlays_dir is not None:
                _write_overlays(options.overlays_dir, _served(summary))
            (partial / out.name).rename(out)
            partial.rmdir()
        except BaseException as exc:
            progress.close()
            writer.abort()
            _mark_partial(partial, exc, position, total, bag.start_ns)
            raise
        progress.close()
    return summary


def _served(summary: ReplaySummary) -> list[tuple[int, float, Success]]:
    served = [p for p in summary.results if isinstance(p.outcome, Success)]
    return [
        (i, (p.time_ns - summary.bag_start_ns) / _NS, p.outcome)
        for i, p in enumerate(served, start=1)
    ]


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
    position: _Position,
) -> ReplaySummary:
    output = _OutputBag(
        writer, options.topic_prefix, options.publish_overlay, options.publish_compressed_mask
    )
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
                    f"{(item.time_ns - start) / _NS:.2f} s: {item.reason} (further frames with "
                    f"this problem are only counted)",
                    error=True,
                )
            skipped[item.reason] += 1
        elif isinstance(item, CommandEvent):
            text = event_text(item.event)
            if text is not None:
                output.explain(item.time_ns, text)
            if item.event.is_warning:
                _say(
                    f"warning: {item.origin} at {(item.time_ns - start) / _NS:.2f} s: "
                    f"{item.event.message}",
                    error=True,
                )
        else:
            results.append(item)
            at = (item.time_ns - start) / _NS
            outcome = item.outcome
            if isinstance(outcome, Success):
                output.publish(item.time_ns, outcome)
                served += 1
                if overlays is not None and outcome.overlay is not None:
                    _write_png(overlays / f"{served:04d}_{at:.3f}s.png", outcome.overlay)
                if options.verbose:
                    pixels = int(np.count_nonzero(outcome.mask))
                    _say(
                        f"{at:8.2f} s  {outcome.command.text!r}: {outcome.result.masks.shape[0]}"
                        f" mask(s), {pixels} px, {outcome.inference_seconds:.2f} s"
                        f"{f' - {outcome.explanation}' if outcome.explanation else ''}"
                    )
            else:
                output.explain(item.time_ns, failure_text(outcome))
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


def _write_png(path: Path, rgb: np.ndarray) -> None:
    import cv2

    if not cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"cannot write {path}")


def _mark_partial(
    partial: Path, exc: BaseException, position: _Position, total: int, start_ns: int
) -> None:
    """Write ``PARTIAL.txt`` into the staging directory (never raises)."""
    if isinstance(exc, KeyboardInterrupt):
        why = "interrupted (Ctrl-C)"
    elif isinstance(exc, SystemExit):
        why = f"stopped by a signal (exit status {exc.code})"
    else:
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    at = position.time_ns
    where = f" at bag time {(at - start_ns) / _NS:.2f} s" if at is not None else ""
    text = (
        "This replay output is INCOMPLETE; do not use it as a result.\n"
        f"reason: {why}\n"
        f"stopped after {position.messages} of {total} input messages{where}\n"
        f"when: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
        f"command: {' '.join(sys.argv)}\n"
        "The bag below may lack its metadata.yaml; delete this directory before running "
        "lisa-replay again with the same --out.\n"
    )
    try:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "PARTIAL.txt").write_text(text, encoding="utf-8")
    except OSError as err:  # pragma: no cover - e.g. the disk is full
        log.error("could not write %s: %s", partial / "PARTIAL.txt", err)


# ---------------------------------------------------------------------------------- the CLI


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
    # Check everything about the inputs before the (slow) model load.
    check_output_paths(options.out, options.overlays_dir)
    with InputBag(options.in_bag) as bag:
        commands = load_commands_file(args.commands, bag.start_ns) if args.commands else []
        bag.select(args.image_topic, args.command_topic, options.bag_commands, not commands)
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
