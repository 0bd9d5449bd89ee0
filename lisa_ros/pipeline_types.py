"""What flows through the pipeline (:mod:`lisa_ros.pipeline`): frames, commands, jobs, outcomes,
events and counters. ROS-free; times are pipeline seconds (the driver's clock).

Every command the pipeline is given gets an id (1, 2, ... per pipeline) and ends in exactly one
outcome: a :class:`Success`, or a :class:`Failure` whose :class:`FailureKind` says why
(rejected, dropped from a full queue, cancelled, no or stale frame, model error). The node turns
each outcome into one typed ``lisa_msgs/Segmentation``.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

if TYPE_CHECKING:
    from lisa_model.types import SegmentationResult


class Segmenter(Protocol):
    """What the pipeline needs from the model (:class:`ModeSegmenter` over a ``LisaPredictor``)."""

    def set_image(self, rgb: np.ndarray) -> None:
        """Take a new ``(H, W, 3)`` uint8 RGB frame and cache the per-frame work."""
        ...

    def predict(
        self,
        query: str,
        explain: bool = False,
        max_new_tokens: int = 64,
        mode: str | None = None,
        history: tuple[tuple[str, str], ...] = (),
    ) -> SegmentationResult:
        """Answer a query about the last frame; masks ``(N, H, W)`` bool in that frame.

        ``mode`` None = the segmenter's own; ``history`` = earlier (question, answer) turns on
        this frame, oldest first."""
        ...


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
class CommandOptions:
    """Per-command choices (an action goal's fields); None = the pipeline's / node's setting.

    Attributes:
        mode: "generate" or "segment".
        explain: ask for an explanation (needs mode "generate").
        follow_up: continue the previous conversation (its frame, its questions and answers).
    """

    mode: str | None = None
    explain: bool | None = None
    follow_up: bool | None = None


@dataclass(frozen=True)
class Command:
    """A command: whitespace-normalised text, arrival time (pipeline ``now``), id, options."""

    text: str
    received: float
    id: int
    options: CommandOptions = CommandOptions()


class Stage(enum.IntEnum):
    """Where a command is; the values are ``lisa_msgs/action/Segment`` feedback's stages."""

    QUEUED = 0
    WAITING_FOR_FRAME = 1
    ENCODING = 2
    DECODING = 3


class FailureKind(enum.Enum):
    """Why a command failed; the values are ``lisa_msgs/Segmentation``'s ``error_code``s."""

    NO_IMAGE = "no_image"  # no frame arrived within image_wait_timeout
    STALE_IMAGE = "stale_image"  # only frames older than max_image_age arrived
    REJECTED = "rejected"  # invalid text or options; never queued
    DROPPED = "dropped"  # the oldest waiting command, pushed out of a full queue
    CANCELLED = "cancelled"  # by the stop command or a cancel request
    OUT_OF_MEMORY = "out_of_memory"  # the model ran out of (device) memory
    MODEL_ERROR = "model_error"  # set_image/predict raised
    BAD_RESULT = "bad_result"  # the model returned masks that do not fit the frame
    NOT_READY = "not_ready"  # the node is not serving (unconfigured, inactive)


@dataclass(frozen=True, eq=False)
class Failure:
    """A command that could not be answered; ``reason`` is a sentence for the log.

    ``frame`` is the frame it was paired with (None when it never got one), ``error`` the
    exception the model raised, if any (for logging its traceback).
    """

    command: Command
    kind: FailureKind
    reason: str
    frame: Frame | None = None
    error: BaseException | None = None
    standing: bool = False

    ok = False


class EventKind(enum.Enum):
    COMMAND_ACCEPTED = "command_accepted"
    COMMAND_REJECTED = "command_rejected"  # invalid text or options; never queued
    COMMAND_DROPPED = "command_dropped"  # oldest waiting command pushed out of a full queue
    COMMAND_CANCELLED = "command_cancelled"  # a waiting command ended by stop or cancel
    STOPPED = "stopped"  # the stop command cleared the standing and waiting commands


@dataclass(frozen=True)
class Event:
    """Something a driver should log. ``command`` is the command it concerns; ``failure`` is
    set when the event ends that command (rejected, dropped, cancelled): the driver reports it
    like any other failed command."""

    kind: EventKind
    message: str
    command: Command | None = None
    failure: Failure | None = None

    @property
    def is_warning(self) -> bool:
        return self.kind in (
            EventKind.COMMAND_REJECTED,
            EventKind.COMMAND_DROPPED,
            EventKind.COMMAND_CANCELLED,
        )


@dataclass(frozen=True)
class Job:
    """A command paired with a frame, ready for ``run_job``.

    ``standing`` is True when continuous mode re-applies the standing command; ``started`` is
    the pipeline time at which ``next_job`` handed it out; ``history`` holds the earlier turns
    of a follow-up's conversation (question, answer), oldest first.
    """

    command: Command
    frame: Frame
    standing: bool
    started: float
    history: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Encode:
    """Pre-encode ``frame`` while idle, so that a command arriving soon finds it encoded."""

    frame: Frame
    started: float


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
        encode_seconds: wall seconds this command spent encoding the frame (0.0 when the frame
            was already encoded).
        preencoded: the frame was encoded before the command was handed out (by pre-encoding
            or by an earlier command on the same frame).
        turn: 1 for a new question, 2, 3, ... for follow-ups in one conversation.
    """

    command: Command
    frame: Frame
    result: SegmentationResult
    mask: np.ndarray
    explanation: str
    inference_seconds: float
    standing: bool = False
    overlay: np.ndarray | None = None
    encode_seconds: float = 0.0
    preencoded: bool = False
    turn: int = 1

    ok = True


Outcome = Success | Failure


@dataclass
class PipelineStats:
    """Counters since the pipeline was made (a snapshot from ``Pipeline.stats()``).

    ``frames_dropped`` counts frames replaced in the buffer before any command used them, which is
    most frames when no command is running. ``served`` counts successes (``standing_runs`` of
    them were continuous-mode re-runs); ``failures`` counts failures by ``FailureKind`` value
    (rejected, dropped and cancelled commands have their own counters); ``preencoded`` counts
    frames encoded while idle.
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
    preencoded: int = 0
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
            f"frames {self.frames_received} received, {self.frames_dropped} dropped, "
            f"{self.preencoded} pre-encoded"
        )


def failure_text(failure: Failure) -> str:
    """What the node publishes on ``explanation`` for a failed command."""
    return f"[{failure.command.id}] failed: {failure.reason} (command {failure.command.text!r})"


def event_text(event: Event) -> str | None:
    """What the node publishes on ``explanation`` for a command event (None: nothing)."""
    if event.failure is not None:
        return failure_text(event.failure)
    if event.kind == EventKind.STOPPED:
        prefix = f"[{event.command.id}] " if event.command is not None else ""
        return prefix + event.message
    return None
