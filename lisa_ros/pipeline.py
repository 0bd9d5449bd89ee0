"""The ROS-free core shared by the live node and the bag replay.

It holds the latest camera frame (a one-slot buffer: a 30 Hz stream never builds a backlog), a
bounded queue of text commands, the rule that pairs a command with a frame, the optional standing
command of continuous mode, and the call into the model. It knows nothing of ROS or of any
clock: every method that needs the time takes ``now`` in seconds, so the node passes its clock
(wall or simulated) and the replay passes bag time, and both see the same behaviour.

Threading: ``push_frame``, ``push_command``, ``clear_standing``, ``clear``, ``wake`` and
``stats`` may be called from any thread (ROS callbacks); ``next_job``/``run_job``/``step`` are
meant for the one worker thread that owns the model. There are no threads in here. A driver loop
looks like::

    while running:
        now = clock()
        outcome = pipeline.step(now, segmenter)   # None when there is nothing to do now
        if outcome is not None:
            publish(outcome)
            continue
        pipeline.wait_for_input(pipeline.time_until_next_event(now))  # woken by any push

Pairing rule: a command takes the newest frame if that frame's age is at most ``max_image_age``
(age = ``now`` minus the frame's header stamp, or minus its arrival time when the stamp is zero or
``age_from_header`` is off). Otherwise it waits for a fresh frame until ``image_wait_timeout``
after the command arrived, then fails with the reason. A stale frame is never used; a command
that arrives before any image is served by the first fresh frame within the timeout. Commands
are served in arrival order.
"""

from __future__ import annotations

import enum
import math
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from lisa_model import visualize
from lisa_ros import settings

if TYPE_CHECKING:
    from lisa_model.types import SegmentationResult


class Segmenter(Protocol):
    """What the pipeline needs from the model (``lisa_model.LisaPredictor`` is one)."""

    def set_image(self, rgb: np.ndarray) -> None:
        """Take a new ``(H, W, 3)`` uint8 RGB frame and cache the per-frame work."""
        ...

    def predict(
        self, query: str, explain: bool = False, max_new_tokens: int = 64
    ) -> SegmentationResult:
        """Answer a query about the last frame; masks ``(N, H, W)`` bool in that frame."""
        ...


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
            to the model: it clears the standing command and the waiting commands. "" disables it.
        age_from_header: age frames from their header stamp (when non-zero); False ages them from
            their arrival time, for cameras whose clock is not synchronised with ours.
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

    def __post_init__(self) -> None:
        if not isinstance(self.overlay, bool):
            raise ValueError(f"overlay must be a bool, got {self.overlay!r}")
        for name in self.setting_names():
            object.__setattr__(self, name, settings.check(name, getattr(self, name)))

    @classmethod
    def setting_names(cls) -> tuple[str, ...]:
        """The fields that are node settings (all but ``overlay``)."""
        return tuple(f.name for f in fields(cls) if f.name != "overlay")


@dataclass(frozen=True, eq=False)
class Frame:
    """A camera frame as the pipeline holds it.

    Attributes:
        rgb: ``(H, W, 3)`` uint8 RGB in the camera frame; not copied, so the caller must not
            modify it after pushing.
        stamp: the source header's stamp in seconds (0.0 when unset).
        received: pipeline time (``now``) when the frame was pushed.
        header: the source header, opaque here; outputs copy it so they line up with the frame.
        frame_id: the source header's ``frame_id``.
        seq: 1, 2, ... in push order.
    """

    rgb: np.ndarray
    stamp: float
    received: float
    header: Any = None
    frame_id: str = ""
    seq: int = 0

    @property
    def hw(self) -> tuple[int, int]:
        return int(self.rgb.shape[0]), int(self.rgb.shape[1])


@dataclass(frozen=True)
class Command:
    """An accepted command: whitespace-normalised text, arrival time (pipeline ``now``), id."""

    text: str
    received: float
    id: int


class EventKind(enum.Enum):
    COMMAND_ACCEPTED = "command_accepted"
    COMMAND_REJECTED = "command_rejected"  # invalid text; never queued
    COMMAND_DROPPED = "command_dropped"  # oldest waiting command pushed out of a full queue
    STOPPED = "stopped"  # the stop command cleared the standing and waiting commands


@dataclass(frozen=True)
class Event:
    """Something a driver should log; ``command`` is the command it concerns, if any."""

    kind: EventKind
    message: str
    command: Command | None = None

    @property
    def is_warning(self) -> bool:
        return self.kind in (EventKind.COMMAND_REJECTED, EventKind.COMMAND_DROPPED)


@dataclass(frozen=True)
class Job:
    """A command paired with a frame, ready for ``run_job``.

    ``standing`` is True when continuous mode re-applies the standing command; ``started`` is
    the pipeline time at which ``next_job`` handed it out.
    """

    command: Command
    frame: Frame
    standing: bool
    started: float


class FailureKind(enum.Enum):
    NO_IMAGE = "no_image"  # no frame arrived within image_wait_timeout
    STALE_IMAGE = "stale_image"  # only frames older than max_image_age arrived
    OUT_OF_MEMORY = "out_of_memory"  # the model ran out of (device) memory
    MODEL_ERROR = "model_error"  # set_image/predict raised
    BAD_RESULT = "bad_result"  # the model returned masks that do not fit the frame


@dataclass(frozen=True, eq=False)
class Success:
    """A command answered on a frame.

    Attributes:
        command: the command.
        frame: the frame it ran on (copy ``frame.header`` onto outputs).
        result: the model's ``SegmentationResult`` (masks ``(N, H, W)`` bool in the frame).
        mask: ``(H, W)`` uint8, 255 on the union of the masks, 0 elsewhere, in the frame's size.
        explanation: the model's answer text.
        inference_seconds: wall seconds spent in ``set_image`` (when called) and ``predict``.
        standing: whether this was a continuous-mode re-run of the standing command.
        overlay: ``(H, W, 3)`` uint8 RGB picture (masks tinted, command and answer written on
            it) when ``PipelineConfig.overlay`` is on, else None.
    """

    command: Command
    frame: Frame
    result: SegmentationResult
    mask: np.ndarray
    explanation: str
    inference_seconds: float
    standing: bool = False
    overlay: np.ndarray | None = None

    ok = True


@dataclass(frozen=True, eq=False)
class Failure:
    """A command that could not be answered; ``reason`` is a sentence for the log.

    ``frame`` is the frame it was paired with (None when it timed out waiting), ``error`` the
    exception the model raised, if any (for logging its traceback).
    """

    command: Command
    kind: FailureKind
    reason: str
    frame: Frame | None = None
    error: BaseException | None = None
    standing: bool = False

    ok = False


Outcome = Success | Failure


@dataclass
class PipelineStats:
    """Counters since the pipeline was made (a snapshot from ``Pipeline.stats()``).

    ``frames_dropped`` counts frames replaced in the buffer before any command used them, which is
    most frames when no command is running. ``served`` counts successes (``standing_runs`` of
    them were continuous-mode re-runs); ``failures`` counts failures by ``FailureKind`` value.
    """

    frames_received: int = 0
    frames_dropped: int = 0
    commands_received: int = 0
    commands_rejected: int = 0
    commands_dropped: int = 0
    commands_cancelled: int = 0
    served: int = 0
    standing_runs: int = 0
    inference_seconds: float = 0.0
    failures: dict[str, int] = field(default_factory=dict)

    @property
    def failed(self) -> int:
        return sum(self.failures.values())

    def summary(self) -> str:
        """One line for logs and end-of-run reports."""
        mean = self.inference_seconds / self.served if self.served else 0.0
        reasons = ", ".join(f"{k}={v}" for k, v in sorted(self.failures.items()))
        return (
            f"served {self.served} ({self.standing_runs} standing), failed {self.failed}"
            f"{f' ({reasons})' if reasons else ''}, mean inference {mean:.3f} s; "
            f"commands {self.commands_received} received, {self.commands_rejected} rejected, "
            f"{self.commands_dropped} dropped, {self.commands_cancelled} cancelled; "
            f"frames {self.frames_received} received, {self.frames_dropped} dropped"
        )


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


class Pipeline:
    """Frame buffer, command queue, pairing policy and model calls (see the module docstring)."""

    def __init__(self, config: PipelineConfig | None = None) -> None:
        self.config = config if config is not None else PipelineConfig()
        self._lock = threading.Lock()
        self._input = threading.Condition(self._lock)
        self._woken = False
        self._frame: Frame | None = None
        self._frame_used = False
        self._frame_seq = 0
        self._commands: deque[Command] = deque()
        self._command_seq = 0
        # id of the newest accepted command; only it may become standing (None after "stop").
        self._latest_command_id: int | None = None
        self._standing: Command | None = None
        self._standing_frame_seq = 0  # newest frame the standing command has run on
        self._standing_next = -math.inf  # earliest time of its next run
        # Which frame the segmenter holds (touched by the worker thread only).
        self._image_owner: Callable[[], Any] | None = None
        self._image_seq = 0
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

    def push_command(self, text: str, now: float) -> list[Event]:
        """Validate and queue a command.

        Returns the events to log: ``COMMAND_REJECTED`` (with the reason), or ``STOPPED`` for the
        stop command, or ``COMMAND_ACCEPTED`` preceded by ``COMMAND_DROPPED`` when the full queue
        pushed out its oldest command. An accepted command ends any standing command at once.
        """
        text, reason = normalize_command(str(text), self.config.max_command_chars)
        with self._lock:
            self._stats.commands_received += 1
            if reason is not None:
                self._stats.commands_rejected += 1
                return [Event(EventKind.COMMAND_REJECTED, f"rejected: {reason}")]
            stop = self.config.stop_command.strip()
            if stop and text.casefold() == stop.casefold():
                return [self._stop_locked()]
            events: list[Event] = []
            if len(self._commands) >= self.config.queue_size:
                dropped = self._commands.popleft()
                self._stats.commands_dropped += 1
                events.append(
                    Event(
                        EventKind.COMMAND_DROPPED,
                        f"command queue full ({self.config.queue_size}): dropped the oldest "
                        f"command {dropped.text!r}",
                        dropped,
                    )
                )
            self._command_seq += 1
            command = Command(text, float(now), self._command_seq)
            self._commands.append(command)
            self._latest_command_id = command.id
            message = f"accepted command {command.id}: {text!r}"
            if self._standing is not None:
                message += f" (ends standing command {self._standing.text!r})"
                self._standing = None
            events.append(Event(EventKind.COMMAND_ACCEPTED, message, command))
            self._wake_locked()
            return events

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
        """Forget the frame, the waiting and standing commands and the segmenter's frame (e.g.
        when the node deactivates); counters are kept."""
        with self._lock:
            self._frame, self._frame_used = None, False
            self._commands.clear()
            self._standing = None
            self._latest_command_id = None
            self._image_owner = None
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

    # ------------------------------------------------------------------------- worker thread

    def next_job(self, now: float) -> Job | Failure | None:
        """What the worker should do at time ``now``.

        Returns a ``Job`` to pass to ``run_job`` (the oldest waiting command with the latest
        frame if that frame is fresh, else the standing command on a new fresh frame when its
        rate allows), a ``Failure`` for a command whose wait for a fresh frame timed out, or None
        when there is nothing to do yet.
        """
        cfg = self.config
        with self._lock:
            frame = self._frame
            fresh = frame is not None and self._is_fresh(frame, now)
            if self._commands:
                command = self._commands[0]
                if fresh:
                    self._commands.popleft()
                    self._frame_used = True
                    return Job(command, frame, standing=False, started=float(now))
                if now - command.received >= cfg.image_wait_timeout:
                    self._commands.popleft()
                    failure = self._timeout_failure(command, frame, now)
                    self._count_failure(failure)
                    return failure
                return None
            if (
                cfg.continuous
                and self._standing is not None
                and fresh
                and frame.seq > self._standing_frame_seq
                and now >= self._standing_next
            ):
                self._frame_used = True
                self._standing_frame_seq = frame.seq
                self._standing_next = now + 1.0 / cfg.max_rate_hz
                return Job(self._standing, frame, standing=True, started=float(now))
            return None

    def time_until_next_event(self, now: float) -> float | None:
        """Seconds from ``now`` until ``next_job`` may have work without new input: 0.0 when it
        has work now, the time to a command's timeout or to the standing command's next allowed
        run, or None when only a push can create work."""
        cfg = self.config
        with self._lock:
            frame = self._frame
            fresh = frame is not None and self._is_fresh(frame, now)
            if self._commands:
                if fresh:
                    return 0.0
                return max(0.0, self._commands[0].received + cfg.image_wait_timeout - now)
            if (
                cfg.continuous
                and self._standing is not None
                and fresh
                and frame.seq > self._standing_frame_seq
            ):
                return max(0.0, self._standing_next - now)
            return None

    def run_job(self, job: Job, segmenter: Segmenter) -> Outcome:
        """Run the model for a job; never raises for a model error.

        ``segmenter.set_image`` is called only when the segmenter does not already hold the job's
        frame (several commands on one frame share one image encoding), then ``predict``. Any
        exception becomes a ``Failure`` (``OUT_OF_MEMORY`` or ``MODEL_ERROR``), as do masks whose
        size does not match the frame (``BAD_RESULT``).
        """
        cfg, frame, command = self.config, job.frame, job.command
        start = time.perf_counter()
        try:
            holder = self._image_owner() if self._image_owner is not None else None
            if holder is not segmenter or self._image_seq != frame.seq:
                self._image_owner = None  # unknown state if set_image fails half-way
                segmenter.set_image(frame.rgb)
                self._image_owner, self._image_seq = _ref(segmenter), frame.seq
            result = segmenter.predict(
                command.text, explain=cfg.explain, max_new_tokens=cfg.max_new_tokens
            )
        except Exception as exc:  # a model failure must not take the node down
            self._image_owner = None
            kind, reason = _classify_error(exc)
            return self._finish(job, Failure(command, kind, reason, frame, exc, job.standing))
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
            command, frame, result, mask, explanation, seconds, job.standing, picture
        )
        return self._finish(job, success)

    def step(self, now: float, segmenter: Segmenter) -> Outcome | None:
        """``next_job(now)`` and, if it gave a job, ``run_job`` on it."""
        work = self.next_job(now)
        if isinstance(work, Job):
            return self.run_job(work, segmenter)
        return work

    # ----------------------------------------------------------------------------- internals

    def _is_fresh(self, frame: Frame, now: float) -> bool:
        max_age = self.config.max_image_age
        return max_age == 0.0 or self._age(frame, now) <= max_age

    def _age(self, frame: Frame, now: float) -> float:
        use_stamp = self.config.age_from_header and frame.stamp > 0.0
        return now - (frame.stamp if use_stamp else frame.received)

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
        key = failure.kind.value
        self._stats.failures[key] = self._stats.failures.get(key, 0) + 1

    def _finish(self, job: Job, outcome: Outcome) -> Outcome:
        """Count an outcome of ``run_job``; a success of the newest command becomes standing."""
        with self._lock:
            if isinstance(outcome, Failure):
                self._count_failure(outcome)
                return outcome
            self._stats.served += 1
            self._stats.standing_runs += int(outcome.standing)
            self._stats.inference_seconds += outcome.inference_seconds
            command = outcome.command
            if (
                self.config.continuous
                and not outcome.standing
                and command.id == self._latest_command_id
            ):
                self._standing = command
                self._standing_frame_seq = outcome.frame.seq
                self._standing_next = job.started + 1.0 / self.config.max_rate_hz
            return outcome

    def _stop_locked(self) -> Event:
        cancelled = len(self._commands)
        self._commands.clear()
        self._stats.commands_cancelled += cancelled
        standing, self._standing = self._standing, None
        self._latest_command_id = None
        what = f"standing command {standing.text!r}" if standing else "no standing command"
        return Event(EventKind.STOPPED, f"stopped: ended {what}, cancelled {cancelled} waiting")

    def _wake_locked(self) -> None:
        self._woken = True
        self._input.notify_all()


class ModeSegmenter:
    """A ``LisaPredictor`` seen through the :class:`Segmenter` protocol, answering in one
    ``mode`` (``"generate"`` or ``"segment"``); masks ``(N, H, W)`` bool in the frame."""

    def __init__(self, predictor: Any, mode: str) -> None:
        self.predictor, self.mode = predictor, mode

    def set_image(self, rgb: np.ndarray) -> None:
        self.predictor.set_image(rgb)

    def predict(self, query: str, explain: bool = False, max_new_tokens: int = 64) -> Any:
        return self.predictor.predict(
            query, explain=explain, max_new_tokens=max_new_tokens, mode=self.mode
        )


def failure_text(failure: Failure) -> str:
    """What the node publishes on ``explanation`` for a failed command."""
    return f"failed: {failure.reason} (command {failure.command.text!r})"


def event_text(event: Event) -> str | None:
    """What the node publishes on ``explanation`` for a command event (None: nothing)."""
    if event.kind == EventKind.STOPPED:
        return event.message
    if event.kind == EventKind.COMMAND_REJECTED:
        return f"failed: command {event.message}"
    if event.kind == EventKind.COMMAND_DROPPED:
        return f"failed: {event.message}"
    return None
