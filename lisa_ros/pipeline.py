"""The ROS-free core shared by the live node and the bag replay.

It holds the latest camera frame (a one-slot buffer: a 30 Hz stream never builds a backlog), a
bounded queue of text commands, the rule that pairs a command with a frame, the optional standing
command of continuous mode, the conversation that follow-up commands continue, the pre-encoding
of the newest frame while idle, and the call into the model. It knows nothing of ROS or of any
clock: every method that needs the time takes ``now`` in seconds, so the node passes its clock
(wall or simulated) and the replay passes bag time, and both see the same behaviour.

Threading: ``push_frame``, ``push_command``, ``cancel``, ``clear_standing``, ``clear``, ``wake``,
``reconfigure`` and ``stats`` may be called from any thread (ROS callbacks);
``next_job``/``run_job``/``run_encode``/``step`` are meant for the one worker thread that owns
the model. There are no threads in here. A driver loop looks like::

    while running:
        now = clock()
        outcome = pipeline.step(now, segmenter)   # None when there is nothing to do now
        if isinstance(outcome, (Success, Failure)):
            publish(outcome)
        if outcome is not None:
            continue
        pipeline.wait_for_input(pipeline.time_until_next_event(now))  # woken by any push

Every command gets an id (1, 2, ...) and ends in exactly one outcome (see
:mod:`lisa_ros.pipeline_types`): a ``Success``, or a ``Failure`` returned by ``step``/``cancel``
or carried by an ``Event`` of ``push_command`` (rejected, dropped from a full queue, cancelled by
the stop command).

Pairing rule: a command takes the newest frame if that frame's age is at most ``max_image_age``
(age = ``now`` minus the frame's header stamp, or minus its arrival time when the stamp is zero or
``age_from_header`` is off). Otherwise it waits for a fresh frame until ``image_wait_timeout``
after the command arrived, then fails with the reason. A stale frame is never used; a command
that arrives before any image is served by the first fresh frame within the timeout. Commands
are served in arrival order. With ``preencode`` on, a fresh frame that is already encoded is
taken over a newer one that is not (it saves the encoding: the command costs what it costs on a
set frame). A follow-up command (``follow_up``) runs on its conversation's frame, whatever its
age, while the conversation is younger than ``follow_up_timeout``.

Pre-encoding: while no command waits, the worker encodes the newest fresh frame (CLIP features,
SAM embedding, prompt prefix: ``segmenter.set_image``), at most ``preencode_max_hz`` times a
second. Only one encoded frame is held; a command waits behind at most the one encoding that is
running when it arrives.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from lisa_model import visualize
from lisa_model.conversation import Conversation
from lisa_ros import settings
from lisa_ros.pipeline_types import (
    Command,
    CommandOptions,
    Encode,
    Event,
    EventKind,
    Failure,
    FailureKind,
    Frame,
    Job,
    Outcome,
    PipelineStats,
    Segmenter,
    Stage,
    Success,
    event_text,
    failure_text,
)

__all__ = [
    "Command",
    "CommandOptions",
    "Encode",
    "Encoded",
    "Event",
    "EventKind",
    "Failure",
    "FailureKind",
    "Frame",
    "Job",
    "ModeSegmenter",
    "Outcome",
    "Pipeline",
    "PipelineConfig",
    "PipelineStats",
    "Segmenter",
    "Stage",
    "Success",
    "event_text",
    "failure_text",
    "normalize_command",
    "success_text",
]


@dataclass(frozen=True)
class PipelineConfig:
    """Behaviour of the pipeline. Every field but ``overlay`` is a node setting of the same name:
    its default, type and allowed values come from :mod:`lisa_ros.settings`, and a bad value
    raises :class:`~lisa_ros.settings.SettingError` naming it.

    Attributes:
        explain: ask the model for a short explanation along with the mask.
        max_new_tokens: most tokens the model may generate per command.
        max_image_age: seconds; a frame older than this is never used for a command. 0 turns the
            age check off (any frame, however old, is fresh enough).
        image_wait_timeout: seconds a command waits for a fresh frame after it arrived before it
            fails (0 fails at once when there is no fresh frame).
        queue_size: most commands waiting. When full, a new command drops the OLDEST waiting
            one (ROS keep-last), reported by a ``COMMAND_DROPPED`` event.
        continuous: keep the last successful command standing and re-apply it to new frames.
        max_rate_hz: most runs per second of the standing command.
        max_command_chars: longer commands are rejected.
        overlay: render an RGB overlay picture for every success (the node's
            ``publish_overlay``).
        stop_command: a command equal to this (ignoring case and surrounding spaces) is not sent
            to the model: it clears the standing command, the waiting commands and the
            conversation. "" disables it.
        age_from_header: age frames from their header stamp (when non-zero); False ages them from
            their arrival time, for cameras whose clock is not synchronised with ours.
        follow_up: commands continue the previous conversation (an action goal may say so per
            command).
        follow_up_timeout: seconds after its last answer a conversation is over.
        preencode: encode the newest fresh frame while idle.
        preencode_max_hz: most pre-encodings per second; 0 turns pre-encoding off.
    """

    explain: bool = settings.default("explain")
    max_new_tokens: int = settings.default("max_new_tokens")
    max_image_age: float = settings.default("max_image_age")
    image_wait_timeout: float = settings.default("image_wait_timeout")
    queue_size: int = settings.default("queue_size")
    continuous: bool = settings.default("continuous")
    max_rate_hz: float = settings.default("max_rate_hz")
    max_command_chars: int = settings.default("max_command_chars")
    overlay: bool = True
    stop_command: str = settings.default("stop_command")
    age_from_header: bool = settings.default("age_from_header")
    follow_up: bool = settings.default("follow_up")
    follow_up_timeout: float = settings.default("follow_up_timeout")
    preencode: bool = settings.default("preencode")
    preencode_max_hz: float = settings.default("preencode_max_hz")

    def __post_init__(self) -> None:
        if not isinstance(self.overlay, bool):
            raise ValueError(f"overlay must be a bool, got {self.overlay!r}")
        for name in self.setting_names():
            object.__setattr__(self, name, settings.check(name, getattr(self, name)))

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The fields that are node settings (all but ``overlay``)."""
        return tuple(f.name for f in fields(cls) if f.name != "overlay")

    @property
    def preencoding(self) -> bool:
        return self.preencode and self.preencode_max_hz > 0.0


@dataclass(frozen=True)
class Encoded:
    """What ``step`` returns after a pre-encoding: the frame, the seconds it took, and the
    exception when the model failed (the frame is then not encoded)."""

    frame: Frame
    seconds: float
    error: BaseException | None = None


def normalize_command(text: str, max_chars: int) -> tuple[str, str | None]:
    """Validate a command: ``(normalised text, None)`` or ``(text, reason it is rejected)``.

    Runs of whitespace (spaces, tabs, newlines) become one space and the ends are stripped.
    Rejected: empty or whitespace-only text, any other non-printable character (control
    characters, zero-width marks), more than ``max_chars`` characters after normalising.
    """
    for i, ch in enumerate(text):
        if not ch.isprintable() and ch not in " \t\n\r":
            return text, f"command contains a non-printable character U+{ord(ch):04X} at {i}"
    normalised = " ".join(text.split())
    if not normalised:
        return normalised, "command is empty"
    if len(normalised) > max_chars:
        return normalised, (
            f"command has {len(normalised)} characters, more than max_command_chars {max_chars}"
        )
    return normalised, None


def success_text(success: Success) -> str:
    """What the node publishes on ``explanation`` for an answered command: ``[id] answer``."""
    return f"[{success.command.id}] {success.explanation}"


def _classify_error(exc: BaseException) -> tuple[FailureKind, str]:
    """Name a model exception; out-of-memory is recognised by class name or message (so that
    ``torch.cuda.OutOfMemoryError`` is caught without importing torch)."""
    name = type(exc).__name__
    lines = str(exc).strip().splitlines()
    detail = f"{name}: {lines[0]}" if lines else name
    names = [cls.__name__ for cls in type(exc).__mro__]
    if any("OutOfMemory" in n for n in names) or "out of memory" in str(exc).lower():
        return FailureKind.OUT_OF_MEMORY, f"out of memory while running the model ({detail})"
    return FailureKind.MODEL_ERROR, f"model error: {detail}"


def _ref(obj: Any) -> Callable[[], Any]:
    """A weak reference when possible (so the pipeline never keeps a freed model alive)."""
    try:
        return weakref.ref(obj)
    except TypeError:
        return lambda: obj


#: Checks a command's text and options before it is queued: a reason to reject it, or None.
CommandCheck = Callable[[str, CommandOptions], "str | None"]
#: Told when a command reaches a stage (called on the worker thread, outside the lock).
StageObserver = Callable[[Command, Stage], None]


class Pipeline:
    """Frame buffer, command queue, pairing policy and model calls (see the module docstring).

    Args:
        config: the behaviour.
        check_command: an extra check of each command at input (e.g. the model's token budget).
        on_stage: told when a command starts waiting for a frame, encoding and decoding.
        next_id: gives command ids (default: 1, 2, ... per pipeline); the node passes its own
            counter so that ids keep increasing across reconfigurations.
    """

    def __init__(
        self,
        config: PipelineConfig | None = None,
        *,
        check_command: CommandCheck | None = None,
        on_stage: StageObserver | None = None,
        next_id: Callable[[], int] | None = None,
    ) -> None:
        self.config = config if config is not None else PipelineConfig()
        self._next_id = next_id if next_id is not None else itertools.count(1).__next__
        self._check_command = check_command
        self._on_stage = on_stage
        self._lock = threading.Lock()
        self._input = threading.Condition(self._lock)
        self._woken = False
        self._frame: Frame | None = None
        self._frame_used = False
        self._frame_seq = 0
        self._commands: deque[Command] = deque()
        # id of the newest accepted command; only it may become standing (None after "stop").
        self._latest_command_id: int | None = None
        self._standing: Command | None = None
        self._standing_frame_seq = 0  # newest frame the standing command has run on
        self._standing_next = -math.inf  # earliest time of its next run
        # The conversation a follow-up continues: its rounds, its frame, its last answer's time.
        self._conversation = Conversation()
        self._conversation_frame: Frame | None = None
        self._conversation_updated = -math.inf
        # The frame the segmenter holds encoded, and who holds it (written by the worker).
        self._image_owner: Callable[[], Any] | None = None
        self._encoded: Frame | None = None
        self._encoding: Frame | None = None  # being pre-encoded now
        # Commands that arrived while their frame was being pre-encoded (and fresh): id -> frame.
        self._promised: dict[int, Frame] = {}
        self._next_preencode = -math.inf
        self._running: Command | None = None
        self._cancel_running = False
        self._reported_waiting = 0  # newest command id told WAITING_FOR_FRAME
        self._stats = PipelineStats()

    # ----------------------------------------------------------------------- input (any thread)

    def push_frame(
        self,
        rgb: np.ndarray,
        now: float,
        *,
        stamp: float = 0.0,
        header: Any = None,
        frame_id: str = "",
    ) -> Frame:
        """Make ``rgb`` the latest frame, replacing (dropping) the previous one.

        Args:
            rgb: ``(H, W, 3)`` uint8 RGB; kept without a copy.
            now: pipeline time in seconds (the frame's arrival time).
            stamp: the source header stamp in seconds; 0.0 when unknown.
            header: the source header, copied onto outputs by the driver.
            frame_id: the source header's frame_id.

        Returns:
            The ``Frame`` as stored.
        """
        if not (isinstance(rgb, np.ndarray) and rgb.dtype == np.uint8 and rgb.ndim == 3):
            raise ValueError(f"rgb must be an (H, W, 3) uint8 array, got {type(rgb).__name__}")
        if rgb.shape[2] != 3 or rgb.shape[0] == 0 or rgb.shape[1] == 0:
            raise ValueError(f"rgb must be a non-empty (H, W, 3) uint8 array, got {rgb.shape}")
        with self._lock:
            self._frame_seq += 1
            frame = Frame(rgb, float(stamp), float(now), header, frame_id, self._frame_seq)
            if self._frame is not None and not self._frame_used:
                self._stats.frames_dropped += 1
            self._frame, self._frame_used = frame, False
            self._stats.frames_received += 1
            self._wake_locked()
        return frame

    def push_command(
        self,
        text: str,
        now: float,
        options: CommandOptions | None = None,
        command_id: int | None = None,
    ) -> list[Event]:
        """Validate and queue a command; it gets ``command_id``, else the next id (a driver that
        must know the id before the outcome can exist takes one from its ``next_id`` first).

        Returns the events to log: ``COMMAND_REJECTED`` (with its failure), or ``STOPPED`` for
        the stop command followed by one ``COMMAND_CANCELLED`` per waiting command, or
        ``COMMAND_ACCEPTED`` preceded by ``COMMAND_DROPPED`` when the full queue pushed out its
        oldest command. An accepted command ends any standing command at once.
        """
        options = options if options is not None else CommandOptions()
        normalised, reason = normalize_command(str(text), self.config.max_command_chars)
        if reason is None:
            reason = self._check_options(options)
        if reason is None and self._check_command is not None:
            reason = self._check_command(normalised, options)
        with self._lock:
            self._stats.commands_received += 1
            cid = self._next_id() if command_id is None else command_id
            command = Command(normalised, float(now), cid, options)
            if reason is not None:
                self._stats.commands_rejected += 1
                failure = Failure(command, FailureKind.REJECTED, f"command rejected: {reason}")
                message = f"rejected command {command.id}: {reason}"
                return [Event(EventKind.COMMAND_REJECTED, message, command, failure)]
            stop = self.config.stop_command.strip()
            if stop and normalised.casefold() == stop.casefold():
                return self._stop_locked(command)
            events: list[Event] = []
            if len(self._commands) >= self.config.queue_size:
                dropped = self._commands.popleft()
                self._promised.pop(dropped.id, None)
                self._stats.commands_dropped += 1
                reason = (
                    f"command queue full ({self.config.queue_size}): dropped the oldest "
                    f"command {dropped.id} {dropped.text!r}"
                )
                failure = Failure(dropped, FailureKind.DROPPED, reason)
                events.append(Event(EventKind.COMMAND_DROPPED, reason, dropped, failure))
            self._commands.append(command)
            if self._encoding is not None and self._is_fresh(self._encoding, now):
                self._promised[command.id] = self._encoding
            self._latest_command_id = command.id
            message = f"accepted command {command.id}: {normalised!r}"
            if self._standing is not None:
                message += f" (ends standing command {self._standing.text!r})"
                self._standing = None
            events.append(Event(EventKind.COMMAND_ACCEPTED, message, command))
            self._wake_locked()
            return events

    def cancel(self, command_id: int) -> Event | None:
        """Cancel a command. A waiting one leaves the queue at once: the returned
        ``COMMAND_CANCELLED`` event carries its failure. The running one stops at the next stage
        boundary (after encoding, before decoding) and ``run_job`` returns its ``CANCELLED``
        failure; None is returned then, and for an id that is no longer known."""
        with self._lock:
            for command in self._commands:
                if command.id == command_id:
                    self._commands.remove(command)
                    self._promised.pop(command.id, None)
                    self._stats.commands_cancelled += 1
                    failure = Failure(command, FailureKind.CANCELLED, "cancelled while waiting")
                    return Event(EventKind.COMMAND_CANCELLED, failure.reason, command, failure)
            if self._running is not None and self._running.id == command_id:
                self._cancel_running = True
            return None

    def clear_standing(self) -> Command | None:
        """End continuous re-runs of the standing command; return it (None if there was none).

        Commands still waiting are served but do not become standing; the next accepted command
        does. Pushing the ``stop_command`` text (default "stop") does the same and also cancels
        the waiting commands, so a user can stop from the command topic.
        """
        with self._lock:
            standing, self._standing = self._standing, None
            self._latest_command_id = None
            return standing

    def clear(self) -> None:
        """Forget the frame, the waiting and standing commands, the conversation and the
        segmenter's frame (e.g. when the node deactivates); counters are kept."""
        with self._lock:
            self._frame, self._frame_used = None, False
            self._commands.clear()
            self._promised.clear()
            self._standing = None
            self._latest_command_id = None
            self._end_conversation()
            self._image_owner = None
            self._encoded = None
            self._wake_locked()

    def wake(self) -> None:
        """Make a pending or the next ``wait_for_input`` return at once (e.g. on shutdown)."""
        with self._lock:
            self._wake_locked()

    def wait_for_input(self, timeout: float | None) -> bool:
        """Block until something was pushed (or ``wake``) since the last call, or ``timeout``
        wall seconds passed (None: no limit). Returns whether it was woken."""
        with self._input:
            if not self._woken:
                self._input.wait(None if timeout is None else max(0.0, timeout))
            woken, self._woken = self._woken, False
            return woken

    def reconfigure(self, config: PipelineConfig) -> None:
        """Use ``config`` from now on (a node parameter changed while running); the waiting
        commands, the frame and the standing command stay, and the worker is woken so that a
        longer ``max_image_age`` or a new rate applies at once."""
        with self._lock:
            self.config = config
            self._next_preencode = -math.inf
            self._wake_locked()

    def stats(self) -> PipelineStats:
        """A snapshot of the counters."""
        with self._lock:
            s = self._stats
            return PipelineStats(**{**s.__dict__, "failures": dict(s.failures)})

    @property
    def standing(self) -> Command | None:
        """The standing command of continuous mode, if any."""
        with self._lock:
            return self._standing

    @property
    def waiting_commands(self) -> int:
        with self._lock:
            return len(self._commands)

    @property
    def newest_frame(self) -> Frame | None:
        """The newest frame received (None before the first)."""
        with self._lock:
            return self._frame

    @property
    def encoded_frame(self) -> Frame | None:
        """The frame the segmenter holds encoded (None when none or unknown)."""
        with self._lock:
            return self._encoded

    # ------------------------------------------------------------------------- worker thread

    def next_job(self, now: float) -> Job | Encode | Failure | None:
        """What the worker should do at time ``now``.

        Returns a ``Job`` to pass to ``run_job`` (the oldest waiting command with its frame, see
        the pairing rule, else the standing command on a new fresh frame when its rate allows),
        a ``Failure`` for a command whose wait for a fresh frame timed out, an ``Encode`` for
        ``run_encode`` when idle and pre-encoding is due, or None when there is nothing to do.
        """
        cfg = self.config
        waiting: Command | None = None
        with self._lock:
            frame = self._frame
            if self._commands:
                command = self._commands[0]
                chosen, history = self._frame_for(command, frame, now)
                if chosen is not None:
                    self._commands.popleft()
                    self._promised.pop(command.id, None)
                    self._frame_used = self._frame_used or chosen is frame
                    return Job(command, chosen, False, float(now), history)
                if now - command.received >= cfg.image_wait_timeout:
                    self._commands.popleft()
                    self._promised.pop(command.id, None)
                    failure = self._timeout_failure(command, frame, now)
                    self._count_failure(failure)
                    return failure
                if command.id > self._reported_waiting:
                    self._reported_waiting = command.id
                    waiting = command
            elif cfg.continuous and self._standing is not None and now >= self._standing_next:
                chosen = self._pick_frame(frame, now, after_seq=self._standing_frame_seq)
                if chosen is not None:
                    self._frame_used = self._frame_used or chosen is frame
                    self._standing_frame_seq = chosen.seq
                    self._standing_next = now + 1.0 / cfg.max_rate_hz
                    return Job(self._standing, chosen, True, float(now))
            if waiting is None and self._preencode_due(frame, now):
                self._next_preencode = now + 1.0 / cfg.preencode_max_hz
                return Encode(frame, float(now))
        if waiting is not None:
            self._tell(waiting, Stage.WAITING_FOR_FRAME)
        return None

    def time_until_next_event(self, now: float) -> float | None:
        """Seconds from ``now`` until ``next_job`` may have work without new input: 0.0 when it
        has work now, the time to a command's timeout, to the standing command's next allowed
        run or to the next pre-encoding, or None when only a push can create work."""
        cfg = self.config
        with self._lock:
            frame = self._frame
            if self._commands:
                command = self._commands[0]
                if self._frame_for(command, frame, now)[0] is not None:
                    return 0.0
                return max(0.0, command.received + cfg.image_wait_timeout - now)
            times = []
            standing_frame = self._pick_frame(frame, now, after_seq=self._standing_frame_seq)
            if cfg.continuous and self._standing is not None and standing_frame is not None:
                times.append(max(0.0, self._standing_next - now))
            if self._preencode_due(frame, now, ignore_rate=True):
                times.append(max(0.0, self._next_preencode - now))
            return min(times) if times else None

    def run_job(self, job: Job, segmenter: Segmenter) -> Outcome:
        """Run the model for a job; never raises for a model error.

        ``segmenter.set_image`` is called only when the segmenter does not already hold the job's
        frame (several commands on one frame share one image encoding, and a pre-encoded frame
        costs nothing more), then ``predict``. Any exception becomes a ``Failure``
        (``OUT_OF_MEMORY`` or ``MODEL_ERROR``), as do masks whose size does not match the frame
        (``BAD_RESULT``); a cancel request ends the job between the stages (``CANCELLED``).
        """
        cfg, frame, command = self.config, job.frame, job.command
        options = command.options
        start = time.perf_counter()
        encode_seconds = 0.0
        with self._lock:
            self._running, self._cancel_running = command, False
            preencoded = self._holds(segmenter, frame)
        try:
            if not preencoded:
                self._tell(command, Stage.ENCODING)
                self._set_image(segmenter, frame)
                encode_seconds = time.perf_counter() - start
            if self._take_cancel():
                reason = "cancelled after the frame was encoded, before decoding"
                kind = FailureKind.CANCELLED
                return self._finish(job, Failure(command, kind, reason, frame, None, job.standing))
            self._tell(command, Stage.DECODING)
            extra: dict[str, Any] = {}
            if options.mode is not None:
                extra["mode"] = options.mode
            if job.history:
                extra["history"] = job.history
            explain = cfg.explain if options.explain is None else options.explain
            result = segmenter.predict(
                command.text, explain=explain, max_new_tokens=cfg.max_new_tokens, **extra
            )
        except Exception as exc:  # a model failure must not take the node down
            with self._lock:
                self._image_owner, self._encoded = None, None
            kind, reason = _classify_error(exc)
            return self._finish(job, Failure(command, kind, reason, frame, exc, job.standing))
        finally:
            with self._lock:
                self._running, self._cancel_running = None, False
        seconds = time.perf_counter() - start
        masks = np.asarray(result.masks)
        if masks.ndim != 3 or tuple(masks.shape[1:]) != frame.hw:
            reason = f"model returned masks of shape {masks.shape} for a {frame.hw} frame"
            failure = Failure(command, FailureKind.BAD_RESULT, reason, frame, None, job.standing)
            return self._finish(job, failure)
        explanation = str(result.text)
        picture = None
        if cfg.overlay:
            picture = visualize.overlay(frame.rgb, masks)
            picture = visualize.annotate(picture, f"> {command.text}\n{explanation}")
        mask = visualize.union_mask_u8(masks, frame.hw)
        success = Success(
            command,
            frame,
            result,
            mask,
            explanation,
            seconds,
            job.standing,
            picture,
            encode_seconds=encode_seconds,
            preencoded=preencoded,
            turn=len(job.history) + 1,
        )
        return self._finish(job, success)

    def run_encode(self, encode: Encode, segmenter: Segmenter) -> Encoded:
        """Pre-encode a frame (``segmenter.set_image``); a model error is returned, not raised."""
        start = time.perf_counter()
        with self._lock:
            self._encoding = encode.frame
        try:
            self._set_image(segmenter, encode.frame)
        except Exception as exc:  # reported by the driver; the next command encodes again
            with self._lock:
                self._image_owner, self._encoded, self._encoding = None, None, None
            return Encoded(encode.frame, time.perf_counter() - start, exc)
        with self._lock:
            self._encoding = None
            self._stats.preencoded += 1
        return Encoded(encode.frame, time.perf_counter() - start)

    def step(self, now: float, segmenter: Segmenter) -> Outcome | Encoded | None:
        """``next_job(now)`` and, if it gave a job, ``run_job`` or ``run_encode`` on it."""
        work = self.next_job(now)
        if isinstance(work, Job):
            return self.run_job(work, segmenter)
        if isinstance(work, Encode):
            return self.run_encode(work, segmenter)
        return work

    # ----------------------------------------------------------------------------- internals

    def _check_options(self, options: CommandOptions) -> str | None:
        from lisa_model.options import MODES

        if options.mode is not None and options.mode not in MODES:
            return f"mode {options.mode!r} is not one of {', '.join(MODES)}"
        if options.explain and options.mode == "segment":
            return "explain needs mode 'generate' (mode 'segment' produces no text)"
        return None

    def _is_fresh(self, frame: Frame, now: float) -> bool:
        max_age = self.config.max_image_age
        return max_age == 0.0 or self._age(frame, now) <= max_age

    def _age(self, frame: Frame, now: float) -> float:
        use_stamp = self.config.age_from_header and frame.stamp > 0.0
        return now - (frame.stamp if use_stamp else frame.received)

    def _frame_for(
        self, command: Command, frame: Frame | None, now: float
    ) -> tuple[Frame | None, tuple[tuple[str, str], ...]]:
        """The frame the waiting ``command`` runs on now (None: none yet) and its history."""
        follow_up = command.options.follow_up
        if self.config.follow_up if follow_up is None else follow_up:
            frame_of = self._conversation_frame
            if frame_of is not None and now - self._conversation_updated <= (
                self.config.follow_up_timeout
            ):
                return frame_of, self._conversation.history_for(frame_of.seq)
        promised = self._promised.get(command.id)
        if promised is not None and promised is self._encoded:
            return promised, ()  # it was fresh when the command came during its encoding
        return self._pick_frame(frame, now), ()

    def _pick_frame(self, frame: Frame | None, now: float, after_seq: int = 0) -> Frame | None:
        """The frame a command takes now (None: none is fresh): the newest, or with
        pre-encoding the encoded one when it is fresh and the newest is not encoded yet."""
        encoded = self._encoded
        if (
            self.config.preencoding
            and encoded is not None
            and encoded is not frame
            and encoded.seq > after_seq
            and self._is_fresh(encoded, now)
        ):
            return encoded
        if frame is not None and frame.seq > after_seq and self._is_fresh(frame, now):
            return frame
        return None

    def _preencode_due(self, frame: Frame | None, now: float, ignore_rate: bool = False) -> bool:
        return (
            self.config.preencoding
            and frame is not None
            and frame is not self._encoded
            and self._is_fresh(frame, now)
            and (ignore_rate or now >= self._next_preencode)
        )

    def _holds(self, segmenter: Segmenter, frame: Frame) -> bool:
        holder = self._image_owner() if self._image_owner is not None else None
        return holder is segmenter and self._encoded is frame

    def _set_image(self, segmenter: Segmenter, frame: Frame) -> None:
        with self._lock:
            self._image_owner, self._encoded = None, None  # unknown if set_image fails
        segmenter.set_image(frame.rgb)
        with self._lock:
            self._image_owner, self._encoded = _ref(segmenter), frame

    def _take_cancel(self) -> bool:
        with self._lock:
            cancelled, self._cancel_running = self._cancel_running, False
            if cancelled:
                self._stats.commands_cancelled += 1
            return cancelled

    def _tell(self, command: Command, stage: Stage) -> None:
        if self._on_stage is not None:
            self._on_stage(command, stage)

    def _timeout_failure(self, command: Command, frame: Frame | None, now: float) -> Failure:
        cfg = self.config
        if frame is None:
            reason = f"no image received within {cfg.image_wait_timeout:.1f} s"
            return Failure(command, FailureKind.NO_IMAGE, reason)
        reason = (
            f"latest image is {self._age(frame, now):.1f} s old, older than max_image_age "
            f"{cfg.max_image_age:.1f} s"
        )
        return Failure(command, FailureKind.STALE_IMAGE, reason)

    def _count_failure(self, failure: Failure) -> None:
        if failure.kind == FailureKind.CANCELLED:
            return  # counted as commands_cancelled
        key = failure.kind.value
        self._stats.failures[key] = self._stats.failures.get(key, 0) + 1

    def _finish(self, job: Job, outcome: Outcome) -> Outcome:
        """Count an outcome of ``run_job``; a success of the newest command becomes standing and
        continues the conversation (or starts a new one)."""
        with self._lock:
            if isinstance(outcome, Failure):
                self._count_failure(outcome)
                return outcome
            self._stats.served += 1
            self._stats.standing_runs += int(outcome.standing)
            self._stats.inference_seconds += outcome.inference_seconds
            command = outcome.command
            if not outcome.standing:  # a new conversation, or the next round of this one
                if not job.history:
                    self._conversation.reset(outcome.frame.seq)
                self._conversation.record(outcome.result, outcome.frame.seq)
                self._conversation_frame = outcome.frame
                self._conversation_updated = job.started + outcome.inference_seconds
            if (
                self.config.continuous
                and not outcome.standing
                and command.id == self._latest_command_id
            ):
                self._standing = command
                self._standing_frame_seq = outcome.frame.seq
                self._standing_next = job.started + 1.0 / self.config.max_rate_hz
            return outcome

    def _stop_locked(self, command: Command) -> list[Event]:
        cancelled = list(self._commands)
        self._commands.clear()
        self._promised.clear()
        self._stats.commands_cancelled += len(cancelled)
        standing, self._standing = self._standing, None
        self._latest_command_id = None
        self._end_conversation()
        what = f"standing command {standing.text!r}" if standing else "no standing command"
        events = [
            Event(
                EventKind.STOPPED,
                f"stopped: ended {what}, cancelled {len(cancelled)} waiting",
                command,
            )
        ]
        for waiting in cancelled:
            reason = f"cancelled by the stop command {command.id}"
            failure = Failure(waiting, FailureKind.CANCELLED, reason)
            events.append(Event(EventKind.COMMAND_CANCELLED, reason, waiting, failure))
        return events

    def _end_conversation(self) -> None:
        self._conversation.reset()
        self._conversation_frame, self._conversation_updated = None, -math.inf

    def _wake_locked(self) -> None:
        self._woken = True
        self._input.notify_all()


class ModeSegmenter:
    """A ``LisaPredictor`` seen through the :class:`Segmenter` protocol, answering in ``mode``
    (``"generate"`` or ``"segment"``) unless a command asks for the other; masks ``(N, H, W)``
    bool in the frame."""

    def __init__(self, predictor: Any, mode: str) -> None:
        self.predictor, self.mode = predictor, mode

    def set_image(self, rgb: np.ndarray) -> None:
        self.predictor.set_image(rgb)

    def predict(
        self,
        query: str,
        explain: bool = False,
        max_new_tokens: int = 64,
        mode: str | None = None,
        history: tuple[tuple[str, str], ...] = (),
    ) -> Any:
        extra = {"history": history} if history else {}
        return self.predictor.predict(
            query,
            explain=explain,
            max_new_tokens=max_new_tokens,
            mode=mode or self.mode,
            **extra,
        )
