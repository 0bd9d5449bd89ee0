"""Typed results: one ``lisa_msgs/Segmentation`` per command, answered or failed.

:func:`describe` turns a pipeline outcome into a ROS-free :class:`ResultInfo` (one
:class:`TargetInfo` per ``[SEG]`` with its full-frame mask, score, pixel box and, with aligned
depth, its 3-D centre); :func:`segmentation_message` builds the message from it through a
:class:`MessageKit`, so that the node (rclpy message classes) and the bag replay (a rosbags
typestore) write the same message from the same code.

Conventions (also in ``lisa_msgs/msg/*.msg``):

- ``targets`` follow the order of the answer's ``[SEG]`` tokens (the fast path has one);
  a target's ``mask`` is mono8, 255 = target, with the source frame's header and size;
- ``score`` is the mean mask probability (sigmoid of the mask logits) over the mask's pixels,
  0 for an empty mask; ``found`` is true when at least one target has a pixel;
- ``bbox`` is the mask's pixel box (``x_offset``, ``y_offset``, ``width``, ``height``; zeros for
  an empty mask), ``area`` its pixel count;
- ``position`` is the robust 3-D centre from aligned depth (:func:`lisa_ros.depth.target_depth`)
  in the depth image's frame, metres; ``position_valid`` is false when the frame had no depth or
  the mask no valid depth pixel (never a made-up point);
- a failed command has ``error`` (the reason) and ``error_code`` (a ``FailureKind`` value) set,
  no targets, and the source frame's header when it had one (else the time of the failure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from lisa_ros.depth import (
    DepthFrame,
    DepthLookup,
    DepthOptions,
    DepthSizeMismatch,
    TargetDepth,
    target_depth,
    target_points,
)
from lisa_ros.pipeline_types import Command, Event, Failure, Outcome, Success

SEGMENTATION_TYPE = "lisa_msgs/msg/Segmentation"
TARGET_TYPE = "lisa_msgs/msg/Target"
IMAGE_TYPE = "sensor_msgs/msg/Image"
ROI_TYPE = "sensor_msgs/msg/RegionOfInterest"
POINT_TYPE = "geometry_msgs/msg/Point"


@dataclass(frozen=True, eq=False)
class TargetInfo:
    """One segmented target.

    Attributes:
        index: 0-based order of its ``[SEG]`` in the answer.
        mask: ``(H, W)`` bool in the source frame.
        score: mean mask probability over the mask's pixels (0.0 for an empty mask).
        box: ``(x, y, width, height)`` pixels; zeros for an empty mask.
        area: mask pixels.
        depth: the 3-D centre from aligned depth, or None when the frame had no depth.
        depth_frame_id: the depth image's frame ("" without depth).
    """

    index: int
    mask: np.ndarray
    score: float
    box: tuple[int, int, int, int]
    area: int
    depth: TargetDepth | None = None
    depth_frame_id: str = ""

    @property
    def position_valid(self) -> bool:
        return self.depth is not None and self.depth.position is not None


@dataclass(frozen=True, eq=False)
class ResultInfo:
    """Everything a ``Segmentation`` message says about one command (see the module docstring).

    ``header`` is the source frame's header (None for a command that never got a frame);
    ``depth_problem`` is a sentence for the log when depth could not be used for this result.
    """

    command: Command
    answer: str = ""
    targets: tuple[TargetInfo, ...] = ()
    error: str = ""
    error_code: str = ""
    header: Any = None
    standing: bool = False
    turn: int = 1
    preencoded: bool = False
    encode_time: float = 0.0
    inference_time: float = 0.0
    latency: float = 0.0
    depth_problem: str | None = None

    @property
    def found(self) -> bool:
        return any(t.area > 0 for t in self.targets)

    @property
    def ok(self) -> bool:
        return not self.error_code


def mask_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """``(x, y, width, height)`` of the pixels of an ``(H, W)`` bool mask; zeros when empty."""
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return 0, 0, 0, 0
    y0, y1, x0, x1 = int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])
    return x0, y0, x1 - x0 + 1, y1 - y0 + 1


def mask_score(mask: np.ndarray, logits: np.ndarray | None) -> float:
    """Mean sigmoid of ``logits`` over the mask's pixels (0.0 for an empty mask or no logits)."""
    if logits is None or not mask.any():
        return 0.0
    values = np.asarray(logits, dtype=np.float64)[mask]
    return float(np.mean(1.0 / (1.0 + np.exp(-np.clip(values, -60.0, 60.0)))))


def describe(
    outcome: Outcome,
    latency: float,
    depth: DepthLookup | None = None,
    depth_options: DepthOptions | None = None,
) -> ResultInfo:
    """The typed result of an outcome; with ``depth`` (the depth lookup for the outcome's
    frame), each target gets its 3-D centre."""
    if isinstance(outcome, Failure):
        return failure_info(outcome, latency)
    assert isinstance(outcome, Success)
    result = outcome.result
    masks = np.asarray(result.masks, dtype=bool)
    logits = getattr(result, "logits", None)
    problem = None
    frame: DepthFrame | None = None
    if depth is not None:
        frame = depth.frame
        if frame is None:
            problem = depth.message
    targets = []
    for i, mask in enumerate(masks):
        position = None
        if frame is not None and problem is None:
            try:
                position = target_depth(mask, frame, depth_options)
            except DepthSizeMismatch as exc:
                problem = str(exc)
        target_logits = None if logits is None else np.asarray(logits)[i]
        targets.append(
            TargetInfo(
                index=i,
                mask=mask,
                score=mask_score(mask, target_logits),
                box=mask_box(mask),
                area=int(mask.sum()),
                depth=position,
                depth_frame_id=frame.frame_id if frame is not None and problem is None else "",
            )
        )
    if problem is not None:  # no target of this result has a position
        targets = [TargetInfo(t.index, t.mask, t.score, t.box, t.area) for t in targets]
    return ResultInfo(
        command=outcome.command,
        answer=outcome.explanation,
        targets=tuple(targets),
        header=outcome.frame.header,
        standing=outcome.standing,
        turn=outcome.turn,
        preencoded=outcome.preencoded,
        encode_time=outcome.encode_seconds,
        inference_time=outcome.inference_seconds,
        latency=latency,
        depth_problem=problem,
    )


def failure_info(failure: Failure, latency: float) -> ResultInfo:
    """The typed result of a failed command (no targets; ``error`` and ``error_code`` set)."""
    return ResultInfo(
        command=failure.command,
        error=failure.reason,
        error_code=failure.kind.value,
        header=failure.frame.header if failure.frame is not None else None,
        standing=failure.standing,
        latency=latency,
    )


def stop_info(event: Event, latency: float) -> ResultInfo:
    """The typed result of the stop command: its message as the answer, no error."""
    assert event.command is not None
    return ResultInfo(command=event.command, answer=event.message, latency=latency)


def target_cloud_points(
    info: ResultInfo, depth: DepthLookup | None, options: DepthOptions, max_points: int
) -> np.ndarray | None:
    """``(N, 3)`` float32 points of all targets in the depth frame (each target at most
    ``max_points // targets``), or None without depth."""
    if depth is None or depth.frame is None or info.depth_problem is not None:
        return None
    targets = [t for t in info.targets if t.area > 0]
    if not targets:
        return np.zeros((0, 3), np.float32)
    each = max(1, max_points // len(targets))
    return np.concatenate([target_points(t.mask, depth.frame, each, options) for t in targets])


class MessageKit(Protocol):
    """How to make messages: rclpy classes in the node, a rosbags typestore in the replay."""

    def new(self, type_name: str, **fields: Any) -> Any:
        """A message of ``type_name`` (``pkg/msg/Name``) with these fields."""
        ...

    def uint8_data(self, data: np.ndarray) -> Any:
        """A ``uint8[]`` field's value from a 1-D uint8 array."""
        ...


def _image(kit: MessageKit, header: Any, mask: np.ndarray) -> Any:
    h, w = mask.shape
    data = np.ascontiguousarray(mask, dtype=np.uint8).reshape(-1) * np.uint8(255)
    return kit.new(
        IMAGE_TYPE,
        header=header,
        height=h,
        width=w,
        encoding="mono8",
        is_bigendian=0,
        step=w,
        data=kit.uint8_data(data),
    )


def _target(kit: MessageKit, header: Any, target: TargetInfo) -> Any:
    x, y, w, h = target.box
    depth = target.depth
    if target.position_valid:
        assert depth is not None and depth.position is not None
        px, py, pz = (float(v) for v in depth.position)
    else:
        px = py = pz = 0.0
    return kit.new(
        TARGET_TYPE,
        index=target.index,
        score=float(target.score),
        mask=_image(kit, header, target.mask),
        bbox=kit.new(ROI_TYPE, x_offset=x, y_offset=y, height=h, width=w, do_rectify=False),
        area=target.area,
        position_valid=target.position_valid,
        position=kit.new(POINT_TYPE, x=px, y=py, z=pz),
        depth_frame_id=target.depth_frame_id,
        depth_pixels=depth.valid_pixels if depth is not None else 0,
        depth_min=float(depth.depth_min) if depth is not None else math.nan,
        depth_max=float(depth.depth_max) if depth is not None else math.nan,
    )


def segmentation_message(info: ResultInfo, kit: MessageKit, header: Any) -> Any:
    """The ``lisa_msgs/Segmentation`` of ``info``; ``header`` is the source frame's header (or,
    for a command that never got a frame, one stamped when the result was made)."""
    return kit.new(
        SEGMENTATION_TYPE,
        header=header,
        command_id=info.command.id,
        command=info.command.text,
        answer=info.answer,
        found=info.found,
        targets=[_target(kit, header, t) for t in info.targets],
        error=info.error,
        error_code=info.error_code,
        standing=info.standing,
        turn=info.turn,
        preencoded=info.preencoded,
        encode_time=float(info.encode_time),
        inference_time=float(info.inference_time),
        latency=float(info.latency),
    )


def first_position(info: ResultInfo) -> tuple[str, tuple[float, float, float]] | None:
    """``(depth frame, position)`` of the first target with a valid position, else None."""
    for target in info.targets:
        if target.position_valid:
            assert target.depth is not None and target.depth.position is not None
            return target.depth_frame_id, target.depth.position
    return None
