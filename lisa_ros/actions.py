"""The ``segment`` action (``lisa_msgs/action/Segment``): ask and wait for a typed result.

A goal is a command like one on the ``command`` topic (same queue, same pairing with frames,
same worker), with optional per-goal ``mode``, ``explain`` and ``follow_up``. The action server
only keeps the goal handles by command id: the node tells it each command's stage (feedback:
queued, waiting for a frame, encoding, decoding) and its result, the same ``Segmentation`` that
goes out on the ``segmentation`` topic. The goal then ends as succeeded (answered), aborted
(failed: the result's ``error`` says why) or canceled.

Cancel is accepted while the goal is queued or waiting for a frame (it leaves the queue at once)
and between stages (after encoding, before decoding); once decoding has started the answer comes
as usual.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from lisa_msgs.action import Segment
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.task import Future

from lisa_ros.pipeline_types import CommandOptions, FailureKind, Stage

STAGE_NAMES = {
    Stage.QUEUED: "queued",
    Stage.WAITING_FOR_FRAME: "waiting_for_frame",
    Stage.ENCODING: "encoding",
    Stage.DECODING: "decoding",
}


def goal_options(goal: Any) -> CommandOptions:
    """The per-command options of a ``Segment`` goal (empty/default fields: the node's)."""
    explain = {
        Segment.Goal.EXPLAIN_NO: False,
        Segment.Goal.EXPLAIN_YES: True,
    }.get(goal.explain)
    mode = goal.mode.strip() or None
    return CommandOptions(mode=mode, explain=explain, follow_up=goal.follow_up)


@dataclass
class _Goal:
    handle: Any
    accepted: float
    done: Future = field(default_factory=Future)


#: Submits a goal's command: ``(command id, text, options)``; the result comes by ``finish``.
Submit = Callable[[int, str, CommandOptions], None]


class SegmentActionServer:
    """The node's ``segment`` action server (see the module docstring).

    Args:
        node: the node that serves it.
        next_id: the node's command id counter.
        submit: hands a goal's command to the node (which answers through :meth:`finish`).
        cancel: asks the node to cancel a command by id.
    """

    def __init__(
        self,
        node: Any,
        next_id: Callable[[], int],
        submit: Submit,
        cancel: Callable[[int], None],
    ) -> None:
        self._next_id = next_id
        self._submit = submit
        self._cancel = cancel
        self._lock = threading.Lock()
        self._goals: dict[int, _Goal] = {}
        self._server = ActionServer(
            node,
            Segment,
            "segment",
            execute_callback=self._execute,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=self._on_cancel,
        )

    def destroy(self) -> None:
        self._server.destroy()

    def stage(self, command_id: int, stage: Stage) -> None:
        """Publish a goal's feedback (any thread; ignored for a command that is no goal)."""
        with self._lock:
            goal = self._goals.get(command_id)
        if goal is None:
            return
        feedback = Segment.Feedback(
            stage=int(stage),
            stage_name=STAGE_NAMES[stage],
            elapsed=float(time.monotonic() - goal.accepted),
        )
        goal.handle.publish_feedback(feedback)

    def finish(self, command_id: int, segmentation: Any) -> None:
        """Give a goal its result (any thread; ignored for a command that is no goal)."""
        with self._lock:
            goal = self._goals.pop(command_id, None)
        if goal is not None:
            goal.done.set_result(segmentation)

    async def _execute(self, handle: Any) -> Any:
        command_id = self._next_id()
        goal = _Goal(handle, time.monotonic())
        with self._lock:
            self._goals[command_id] = goal
        request = handle.request
        self.stage(command_id, Stage.QUEUED)
        self._submit(command_id, request.command, goal_options(request))
        segmentation = await goal.done
        if segmentation.error_code == FailureKind.CANCELLED.value and handle.is_cancel_requested:
            handle.canceled()
        elif segmentation.error_code:
            handle.abort()
        else:
            handle.succeed()
        return Segment.Result(segmentation=segmentation)

    def _on_cancel(self, handle: Any) -> CancelResponse:
        with self._lock:
            ids = [cid for cid, goal in self._goals.items() if goal.handle is handle]
        for command_id in ids:
            self._cancel(command_id)
        return CancelResponse.ACCEPT
