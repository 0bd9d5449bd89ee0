"""Scheduling in bag time: :class:`ReplayDriver` runs the ROS-free
:class:`~lisa_ros.pipeline.Pipeline` as the node's worker would (due jobs at the time they became
due, ``--realtime``), and :func:`iter_replay` feeds it a bag's frames and commands in time order,
yielding what happens (messages read, frames skipped, command events, outcomes to publish)."""

from __future__ import annotations

import heapq
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from rosbags.interfaces import Connection
from rosbags.typesys.store import Typestore

from lisa_ros.conversion import message_to_rgb, stamp_to_seconds
from lisa_ros.pipeline import Encoded, Event, Outcome, Pipeline, Segmenter
from lisa_ros.replay.bags import NS
from lisa_ros.replay.commands import TimedCommand
from lisa_ros.replay.input_bag import InputBag, TopicSelection

log = logging.getLogger(__name__)


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
        self.pipeline.push_frame(rgb, t_ns / NS, stamp=stamp, header=header, frame_id=frame_id)
        self._arrive(t_ns)

    def push_command(self, t_ns: int, text: str) -> list[Event]:
        """Push a command received at bag time ``t_ns``; the pipeline's events to log."""
        events = self.pipeline.push_command(text, t_ns / NS)
        self._arrive(t_ns)
        return events

    def run_until(self, limit_ns: float) -> list[Published]:
        """Run every job that would start at or before ``limit_ns`` (``math.inf``: all of them,
        e.g. the timeouts of commands still waiting when the bag ends)."""
        published: list[Published] = []
        while self._clock_ns is not None:
            clock = self._clock_ns
            wait = self.pipeline.time_until_next_event(clock / NS)
            if wait is None:
                break
            start = clock + math.ceil(wait * NS)
            if start > limit_ns:
                break
            began = self.timer()
            outcome = self.pipeline.step(start / NS, self.segmenter)
            elapsed = self.timer() - began
            if outcome is None:
                # Nothing to do after all (the frame went stale while waiting, or rounding):
                # the worker looked at `start`; always move on by at least 1 ns.
                self._clock_ns = max(start, clock + 1)
                continue
            end = start + (int(round(elapsed * NS)) if self.realtime else 0)
            self._clock_ns = end
            if not isinstance(outcome, Encoded):  # a pre-encoding publishes nothing
                published.append(Published(end, outcome))
        return published


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
        log.warning("%s at %.3f s: cannot deserialise a command (%s)", conn.topic, t / NS, exc)
        return
    for event in driver.push_command(t, text):
        yield CommandEvent(t, conn.topic, event)
