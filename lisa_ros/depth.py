"""3-D target positions from a depth image aligned to the colour image (ROS-free).

A depth camera driver (RealSense ``aligned_depth_to_color``, ZED ``depth/depth_registered``, OAK
``stereo/depth`` aligned to RGB) publishes a depth image pixel-aligned with the colour image, and a
``CameraInfo`` whose ``K`` describes that image. A target's mask from the colour image then picks
its depth pixels directly, and each pixel ``(u, v)`` with depth ``z`` deprojects through the
pinhole model to

    x = (u - cx) * z / fx,    y = (v - cy) * z / fy,    z

in metres, in the depth image's optical frame (REP 103 ``*_optical_frame``: x right, y down,
z forward), which for aligned depth is the colour camera's optical frame. Pixel coordinates are
OpenCV's: ``(0, 0)`` is the centre of the top-left pixel.

Pieces:

- :class:`CameraIntrinsics` (from a ``CameraInfo`` message, duck-typed on ``k``, ``width``,
  ``height``, ``binning_x``/``binning_y``, ``roi``) and :class:`DepthFrame` (a depth image in
  metres with its stamp, frame and intrinsics);
- :func:`target_depth`: a robust 3-D centre of a mask (:class:`TargetDepth`);
  :func:`target_points`: the mask's 3-D points, decimated, for a point cloud; both take
  :class:`DepthOptions` (depth range, erosion);
- :class:`DepthBuffer`: a thread-safe buffer of the newest depth frames that pairs a colour
  frame's stamp with the depth frame nearest in time, within a tolerance, and says why when none
  is (:class:`DepthLookup`).

Intrinsics for another resolution: when ``CameraInfo`` was calibrated at another size than the
depth image, ``K`` is scaled to the depth image if the two sizes differ by one scale factor (a
resized stream, e.g. 1280x720 calibration and 640x360 images, within 1 %); any other difference
(a crop, another aspect ratio) raises :class:`DepthSizeMismatch`, since scaling would silently
give wrong positions. ``binning_x``/``binning_y`` are applied as such a scale; a non-trivial
``roi`` is refused.
"""

from __future__ import annotations

import enum
import math
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np

#: Relative difference allowed between the horizontal and vertical scale when ``K`` is scaled
#: from ``CameraInfo``'s size to the depth image's.
SCALE_TOLERANCE = 0.01


class DepthSizeMismatch(ValueError):  # noqa: N818 - the name issue 22 gives this error
    """Sizes that do not fit: a mask and a depth image, or a depth image and its ``CameraInfo``."""


def _fmt_size(width: int, height: int) -> str:
    return f"{width}x{height}"


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics of an image (no distortion: aligned depth is rectified).

    Attributes:
        fx, fy: focal lengths in pixels (> 0).
        cx, cy: principal point in pixels (OpenCV convention: ``(0, 0)`` = centre of the
            top-left pixel).
        width, height: the image size these values describe, in pixels (> 0).
    """

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self) -> None:
        for name in ("fx", "fy", "cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(
                    f"camera intrinsics: {name} must be finite, got {getattr(self, name)}"
                )
        if not (self.fx > 0 and self.fy > 0):
            raise ValueError(
                f"camera intrinsics: fx and fy must be > 0, got fx={self.fx}, fy={self.fy} "
                "(an all-zero K means the camera is not calibrated)"
            )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"camera intrinsics: width and height must be > 0, got "
                f"{_fmt_size(self.width, self.height)}"
            )

    @classmethod
    def from_camera_info(cls, msg: Any) -> CameraIntrinsics:
        """Read a ``sensor_msgs/CameraInfo`` (rclpy or rosbags).

        Uses ``k`` (9 floats, row-major ``[fx 0 cx; 0 fy cy; 0 0 1]``), ``width`` and ``height``.
        ``binning_x``/``binning_y`` > 1 (the published image is the calibrated one binned)
        divide the size and scale ``K`` accordingly. A ``roi`` other than empty or the full image
        is refused.

        Raises:
            ValueError: ``k`` not 9 values, fx/fy not > 0 (uncalibrated camera), zero size, or a
                region of interest.
        """
        k = np.asarray(msg.k, dtype=np.float64).reshape(-1)
        if k.size != 9:
            raise ValueError(f"camera_info: k must hold 9 values (row-major 3x3), got {k.size}")
        width, height = int(msg.width), int(msg.height)
        roi = getattr(msg, "roi", None)
        if roi is not None:
            offset = (int(roi.x_offset), int(roi.y_offset))
            size = (int(roi.width), int(roi.height))
            if offset != (0, 0) or size not in ((0, 0), (width, height)):
                raise ValueError(
                    f"camera_info: a region of interest (offset {offset}, size "
                    f"{_fmt_size(*size)} of {_fmt_size(width, height)}) is not supported"
                )
        intrinsics = cls(
            fx=float(k[0]),
            fy=float(k[4]),
            cx=float(k[2]),
            cy=float(k[5]),
            width=width,
            height=height,
        )
        bin_x = max(int(getattr(msg, "binning_x", 0)), 1)
        bin_y = max(int(getattr(msg, "binning_y", 0)), 1)
        if bin_x == bin_y == 1:
            return intrinsics
        return intrinsics._scaled(width // bin_x, height // bin_y)

    def for_size(self, width: int, height: int) -> CameraIntrinsics:
        """These intrinsics for an image of ``width`` x ``height`` pixels.

        The same size gives ``self``; a uniform rescale (both axes scaled alike within
        ``SCALE_TOLERANCE``) gives scaled intrinsics (see :meth:`_scaled`).

        Raises:
            DepthSizeMismatch: the image is not a uniform rescale of the calibrated size.
        """
        if (width, height) == (self.width, self.height):
            return self
        sx, sy = width / self.width, height / self.height
        if abs(sx - sy) > SCALE_TOLERANCE * max(sx, sy):
            raise DepthSizeMismatch(
                f"the depth image is {_fmt_size(width, height)} but camera_info describes "
                f"{_fmt_size(self.width, self.height)}, which is not the same view rescaled "
                "(cropped or another aspect ratio); publish a camera_info for the depth image"
            )
        return self._scaled(width, height)

    def _scaled(self, width: int, height: int) -> CameraIntrinsics:
        """Scale to another image size: pixel edges scale, so ``c' + 0.5 = s * (c + 0.5)``."""
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(
            fx=self.fx * sx,
            fy=self.fy * sy,
            cx=(self.cx + 0.5) * sx - 0.5,
            cy=(self.cy + 0.5) * sy - 0.5,
            width=width,
            height=height,
        )

    def deproject(self, u: np.ndarray, v: np.ndarray, z: np.ndarray) -> np.ndarray:
        """Pixels ``u`` (column), ``v`` (row) at depth ``z`` (metres) -> ``(N, 3)`` x, y, z."""
        z = np.asarray(z, dtype=np.float64)
        x = (np.asarray(u, dtype=np.float64) - self.cx) * z / self.fx
        y = (np.asarray(v, dtype=np.float64) - self.cy) * z / self.fy
        return np.stack([x, y, z], axis=-1)


@dataclass(frozen=True)
class DepthFrame:
    """One depth image in metres with what is needed to deproject it.

    Attributes:
        depth_m: ``(H, W)`` float32 depth in metres along z; NaN where there is no measurement
            (what :func:`lisa_ros.conversion.image_to_depth` returns).
        stamp: the image's header stamp in seconds.
        frame_id: the image's optical frame (the frame of every position computed from it).
        intrinsics: the camera's intrinsics; stored scaled to ``depth_m``'s size when given
            for another resolution of the same view (:meth:`CameraIntrinsics.for_size`).

    Raises:
        ValueError: ``depth_m`` is not a 2-D float array.
        DepthSizeMismatch: the intrinsics describe another view (see the module docstring).
    """

    depth_m: np.ndarray
    stamp: float
    frame_id: str
    intrinsics: CameraIntrinsics

    def __post_init__(self) -> None:
        depth = np.asarray(self.depth_m)
        if depth.ndim != 2 or depth.dtype.kind != "f" or depth.size == 0:
            raise ValueError(
                f"depth_m must be a non-empty (H, W) float array in metres, got "
                f"{depth.shape} {depth.dtype}"
            )
        object.__setattr__(self, "depth_m", depth.astype(np.float32, copy=False))
        object.__setattr__(self, "stamp", float(self.stamp))
        height, width = depth.shape
        object.__setattr__(self, "intrinsics", self.intrinsics.for_size(width, height))

    @property
    def hw(self) -> tuple[int, int]:
        """``(height, width)`` of the depth image."""
        return self.depth_m.shape[0], self.depth_m.shape[1]


@dataclass(frozen=True)
class TargetDepth:
    """Where a target is in 3-D, from its mask and an aligned depth image.

    Attributes:
        position: ``(x, y, z)`` metres in the depth frame's optical frame (x right, y down,
            z forward): the component-wise median of the deprojected points used, or None when
            no pixel of the mask has a valid depth (never a made-up point).
        valid_pixels: how many pixels the position was computed from.
        mask_pixels: how many pixels the mask has.
        depth_min, depth_max: the smallest and largest depth (z, metres) among the pixels
            used; NaN when there are none.
        eroded: whether the pixels came from the eroded mask (else the whole mask).
    """

    position: tuple[float, float, float] | None
    valid_pixels: int
    mask_pixels: int
    depth_min: float
    depth_max: float
    eroded: bool

    @property
    def found(self) -> bool:
        """Whether a position could be computed."""
        return self.position is not None


@dataclass(frozen=True)
class DepthOptions:
    """Which depth pixels of a mask count (see :func:`target_depth`).

    Attributes:
        min_range, max_range: depths (metres) outside ``[min_range, max_range]`` are ignored,
            as are NaN, infinite and non-positive ones (set them to the camera's working range:
            stereo and ToF depth is noise beyond it).
        erode_px: radius (pixels) of the disc the mask is eroded with first, since a mask's rim
            often lies on the background; 0 disables it.
        min_pixels: the eroded mask is used when it keeps at least this many valid pixels,
            else the whole mask is (small or thin targets).
    """

    min_range: float = 0.1
    max_range: float = 10.0
    erode_px: int = 3
    min_pixels: int = 20

    def __post_init__(self) -> None:
        if not (0 <= self.min_range < self.max_range):
            raise ValueError(
                "depth range must satisfy 0 <= min_range < max_range, got "
                f"[{self.min_range}, {self.max_range}]"
            )
        if self.erode_px < 0:
            raise ValueError(f"erode_px must be >= 0, got {self.erode_px}")
        if self.min_pixels < 1:
            raise ValueError(f"min_pixels must be >= 1, got {self.min_pixels}")


def _check_mask(mask: np.ndarray, frame: DepthFrame) -> np.ndarray:
    """``mask`` as ``(H, W)`` bool matching the depth image, else a clear error."""
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype not in (np.bool_, np.uint8):
        raise ValueError(f"mask must be (H, W) bool or uint8, got {mask.shape} {mask.dtype}")
    if mask.shape != frame.hw:
        (mh, mw), (dh, dw) = mask.shape, frame.hw
        raise DepthSizeMismatch(
            f"the mask (colour image) is {_fmt_size(mw, mh)} but the depth image in frame "
            f"{frame.frame_id!r} is {_fmt_size(dw, dh)}: the depth must be aligned to the colour "
            "image (e.g. RealSense aligned_depth_to_color)"
        )
    return mask.astype(bool, copy=False)


def _target_pixels(
    mask: np.ndarray, frame: DepthFrame, options: DepthOptions
) -> tuple[np.ndarray, np.ndarray, bool, int]:
    """Row and column indices of the mask pixels to use, whether eroded, mask pixel count."""
    mask = _check_mask(mask, frame)
    depth = frame.depth_m
    valid = (
        np.isfinite(depth)
        & (depth > 0)
        & (depth >= options.min_range)
        & (depth <= options.max_range)
    )
    if options.erode_px > 0:
        size = 2 * options.erode_px + 1
        kernel = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (size, size))
        core = cv2.erode(mask.astype(np.uint8), kernel).astype(bool) & valid
        if int(core.sum()) >= options.min_pixels:
            rows, cols = np.nonzero(core)
            return rows, cols, True, int(mask.sum())
    rows, cols = np.nonzero(mask & valid)
    return rows, cols, False, int(mask.sum())


def target_depth(
    mask: np.ndarray, frame: DepthFrame, options: DepthOptions | None = None
) -> TargetDepth:
    """A robust 3-D centre of the target a mask covers.

    Args:
        mask: ``(H, W)`` bool (or uint8, nonzero = target) in the colour image, the same size
            as ``frame.depth_m``.
        frame: the depth frame paired with the colour image.
        options: which pixels count (range, erosion); defaults to ``DepthOptions()``.

    Returns:
        :class:`TargetDepth`; its position is the component-wise median of the deprojected
        valid points (robust to the background pixels a mask edge picks up), in
        ``frame.frame_id``.

    Raises:
        DepthSizeMismatch: the mask and the depth image differ in size.
        ValueError: a mask that is not ``(H, W)`` bool/uint8.
    """
    rows, cols, eroded, mask_pixels = _target_pixels(mask, frame, options or DepthOptions())
    if rows.size == 0:
        return TargetDepth(None, 0, mask_pixels, math.nan, math.nan, eroded)
    z = frame.depth_m[rows, cols]
    points = frame.intrinsics.deproject(cols, rows, z)  # (N, 3) float64
    centre = np.median(points, axis=0)
    return TargetDepth(
        position=(float(centre[0]), float(centre[1]), float(centre[2])),
        valid_pixels=int(rows.size),
        mask_pixels=mask_pixels,
        depth_min=float(z.min()),
        depth_max=float(z.max()),
        eroded=eroded,
    )


def target_points(
    mask: np.ndarray,
    frame: DepthFrame,
    max_points: int = 5000,
    options: DepthOptions | None = None,
) -> np.ndarray:
    """The target's 3-D points, for a ``PointCloud2`` (see ``points_to_cloud_fields``).

    The pixels are chosen as in :func:`target_depth`. When there are more than ``max_points``,
    evenly spaced ones in row-major order are kept (deterministic).

    Returns:
        ``(N, 3)`` float32 x, y, z metres in ``frame.frame_id``, ``N <= max_points``, rows in
        row-major pixel order; ``(0, 3)`` when no pixel is valid.
    """
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1, got {max_points}")
    rows, cols, _, _ = _target_pixels(mask, frame, options or DepthOptions())
    if rows.size > max_points:
        keep = np.round(np.linspace(0, rows.size - 1, max_points)).astype(np.intp)
        rows, cols = rows[keep], cols[keep]
    z = frame.depth_m[rows, cols]
    return frame.intrinsics.deproject(cols, rows, z).astype(np.float32).reshape(-1, 3)


# ----------------------------------------------------------------------------- stamp pairing


class DepthMiss(enum.Enum):
    """Why no depth frame matched a stamp."""

    NO_CAMERA_INFO = "no_camera_info"  # depth images came, but no camera_info to go with them
    NO_DEPTH = "no_depth"  # no depth image yet (or the buffer was cleared)
    TOO_FAR = "too_far"  # the nearest depth image is further away than the tolerance


@dataclass(frozen=True)
class DepthLookup:
    """The answer of :meth:`DepthBuffer.lookup`.

    Attributes:
        frame: the depth frame with the stamp nearest to the query, within the tolerance;
            None otherwise.
        miss: why ``frame`` is None (None when it is not).
        offset: nearest depth stamp minus the query stamp, seconds (None when no depth frame is
            held).
        tolerance: the buffer's tolerance, seconds.
        dropped: depth images dropped so far for want of a camera_info.
    """

    frame: DepthFrame | None
    miss: DepthMiss | None
    offset: float | None
    tolerance: float
    dropped: int = 0

    @property
    def message(self) -> str:
        """One line for a (throttled) log: what matched, or why nothing did."""
        if self.miss is None and self.frame is not None and self.offset is not None:
            return f"depth matched {self.offset * 1e3:+.1f} ms from the colour frame"
        if self.miss is DepthMiss.NO_CAMERA_INFO:
            return (
                f"no camera_info received yet ({self.dropped} depth images dropped); "
                "check the camera_info topic"
            )
        if self.miss is DepthMiss.NO_DEPTH:
            return "no depth image received yet; check the depth topic"
        assert self.offset is not None
        return (
            f"the nearest depth image is {abs(self.offset) * 1e3:.0f} ms "
            f"{'after' if self.offset > 0 else 'before'} the colour frame "
            f"(tolerance {self.tolerance * 1e3:.0f} ms)"
        )


class DepthBuffer:
    """The newest depth frames, matched to colour frames by stamp. Thread-safe.

    Subscription callbacks call :meth:`set_intrinsics` (``camera_info``) and :meth:`push_depth`
    (depth images, paired with the newest intrinsics) or :meth:`push`; the worker calls
    :meth:`lookup` or :meth:`match` with the colour frame's stamp.

    Args:
        capacity: depth frames kept (the oldest is dropped first). To match a colour frame that
            is ``a`` seconds old when looked up, keep at least ``depth rate * a`` frames.
        tolerance: largest ``|depth stamp - colour stamp|`` (seconds) that still matches.
    """

    def __init__(self, capacity: int = 30, tolerance: float = 0.05) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        if not (tolerance >= 0 and math.isfinite(tolerance)):
            raise ValueError(f"tolerance must be a finite number >= 0, got {tolerance}")
        self.capacity = int(capacity)
        self.tolerance = float(tolerance)
        self._lock = threading.Lock()
        self._frames: deque[DepthFrame] = deque(maxlen=self.capacity)
        self._intrinsics: CameraIntrinsics | None = None
        self._dropped = 0

    @property
    def intrinsics(self) -> CameraIntrinsics | None:
        """The newest intrinsics given, None before the first camera_info."""
        with self._lock:
            return self._intrinsics

    def set_intrinsics(self, intrinsics: CameraIntrinsics) -> None:
        """Use ``intrinsics`` for the depth images pushed from now on."""
        with self._lock:
            self._intrinsics = intrinsics

    def push_depth(self, depth_m: np.ndarray, stamp: float, frame_id: str) -> DepthFrame | None:
        """Add a depth image with the newest intrinsics.

        Returns:
            The frame added, or None when no intrinsics have been given yet (the image is
            dropped and counted; :meth:`lookup` then reports ``NO_CAMERA_INFO``).

        Raises:
            DepthSizeMismatch, ValueError: as :class:`DepthFrame` (nothing is added).
        """
        with self._lock:
            intrinsics = self._intrinsics
            if intrinsics is None:
                self._dropped += 1
                return None
        frame = DepthFrame(depth_m, stamp, frame_id, intrinsics)
        self.push(frame)
        return frame

    def push(self, frame: DepthFrame) -> None:
        """Add a depth frame (dropping the oldest when full)."""
        with self._lock:
            self._frames.append(frame)

    def lookup(self, stamp: float) -> DepthLookup:
        """The depth frame nearest to ``stamp`` (seconds) within the tolerance, or why none is.

        Of two frames equally near, the newer one is taken.
        """
        with self._lock:
            frames = list(self._frames)
            dropped = self._dropped
        if not frames:
            miss = DepthMiss.NO_CAMERA_INFO if dropped else DepthMiss.NO_DEPTH
            return DepthLookup(None, miss, None, self.tolerance, dropped)
        best = min(reversed(frames), key=lambda f: abs(f.stamp - stamp))
        offset = best.stamp - stamp
        if abs(offset) > self.tolerance:
            return DepthLookup(None, DepthMiss.TOO_FAR, offset, self.tolerance, dropped)
        return DepthLookup(best, None, offset, self.tolerance, dropped)

    def match(self, stamp: float) -> DepthFrame | None:
        """``lookup(stamp).frame``: the matching depth frame or None."""
        return self.lookup(stamp).frame

    def clear(self) -> None:
        """Forget all frames, the intrinsics and the drop count (e.g. on deactivate)."""
        with self._lock:
            self._frames.clear()
            self._intrinsics = None
            self._dropped = 0

    def __len__(self) -> int:
        with self._lock:
            return len(self._frames)
