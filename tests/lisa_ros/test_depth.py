"""3-D target positions from aligned depth, and stamp pairing of depth with colour frames.

Depth images go through real messages (``depth_to_image_fields`` -> rclpy/rosbags ``Image`` ->
``image_to_depth``), intrinsics through real ``CameraInfo`` messages; expected positions are the
pinhole deprojection of the mask's centre computed here by hand.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from lisa_ros.conversion import depth_to_image_fields, image_to_depth
from lisa_ros.depth import (
    CameraIntrinsics,
    DepthBuffer,
    DepthFrame,
    DepthMiss,
    DepthOptions,
    DepthSizeMismatch,
    target_depth,
    target_points,
)
from tests.lisa_ros.test_conversion import BUILDERS, TS, rclpy_msgs

W, H = 640, 480
FX = FY = 600.0
CX, CY = 319.5, 239.5
# The mask: rows 200..279, columns 300..419 (80 x 120 pixels).
TOP, BOTTOM, LEFT, RIGHT = 200, 280, 300, 420


def camera_info(builder: str = "rclpy", width: int = W, height: int = H, scale: float = 1.0, **kw):
    """A CameraInfo for the realistic 640x480 camera, optionally calibrated at another size."""
    fx, cx, cy = FX * scale, (CX + 0.5) * scale - 0.5, (CY + 0.5) * scale - 0.5
    k = [fx, 0.0, cx, 0.0, FY * scale, cy, 0.0, 0.0, 1.0]
    if builder == "rclpy":
        return rclpy_msgs.CameraInfo(width=width, height=height, k=k, **kw)
    info = TS.types["sensor_msgs/msg/CameraInfo"]
    roi = TS.types["sensor_msgs/msg/RegionOfInterest"](
        x_offset=0, y_offset=0, height=0, width=0, do_rectify=False
    )
    from tests.lisa_ros.test_conversion import rosbags_header

    return info(
        header=rosbags_header(),
        height=height,
        width=width,
        distortion_model="plumb_bob",
        d=np.zeros(5),
        k=np.array(k),
        r=np.eye(3).reshape(-1),
        p=np.zeros(12),
        binning_x=0,
        binning_y=0,
        roi=roi,
    )


def intrinsics() -> CameraIntrinsics:
    return CameraIntrinsics.from_camera_info(camera_info())


def through_message(depth_m: np.ndarray, encoding: str, builder: str = "rclpy") -> np.ndarray:
    fields = depth_to_image_fields(depth_m, encoding)
    return image_to_depth(BUILDERS[builder](**fields.as_kwargs()))


def frame_of(depth_m: np.ndarray, stamp: float = 10.0, info=None) -> DepthFrame:
    return DepthFrame(depth_m, stamp, "camera_color_optical_frame", info or intrinsics())


def plane(z: float) -> np.ndarray:
    return np.full((H, W), z, dtype=np.float32)


def box_mask(top=TOP, bottom=BOTTOM, left=LEFT, right=RIGHT) -> np.ndarray:
    mask = np.zeros((H, W), dtype=bool)
    mask[top:bottom, left:right] = True
    return mask


def deprojected_centre(top, bottom, left, right, z: float) -> tuple[float, float, float]:
    """By hand: the centre pixel of a box, through the pinhole model."""
    u, v = (left + right - 1) / 2, (top + bottom - 1) / 2
    return ((u - CX) * z / FX, (v - CY) * z / FY, z)


# ----------------------------------------------------------------------------- intrinsics


@pytest.mark.parametrize("builder", ["rclpy", "rosbags"])
def test_intrinsics_from_camera_info(builder: str) -> None:
    k = CameraIntrinsics.from_camera_info(camera_info(builder))
    assert (k.fx, k.fy, k.cx, k.cy, k.width, k.height) == (FX, FY, CX, CY, W, H)


def test_intrinsics_refuse_bad_camera_info() -> None:
    with pytest.raises(ValueError, match="fx and fy must be > 0"):
        CameraIntrinsics.from_camera_info(rclpy_msgs.CameraInfo(width=W, height=H))  # K all 0
    with pytest.raises(ValueError, match="9 values"):
        CameraIntrinsics.from_camera_info(
            type("Info", (), {"k": [1.0] * 4, "width": 4, "height": 4})
        )
    with pytest.raises(ValueError, match="width and height"):
        CameraIntrinsics.from_camera_info(camera_info(width=0, height=0))
    roi = rclpy_msgs.RegionOfInterest(x_offset=10, y_offset=0, width=100, height=100)
    with pytest.raises(ValueError, match="region of interest"):
        CameraIntrinsics.from_camera_info(camera_info(roi=roi))
    full = rclpy_msgs.RegionOfInterest(width=W, height=H)
    assert CameraIntrinsics.from_camera_info(camera_info(roi=full)) == intrinsics()
    with pytest.raises(ValueError, match="finite"):
        CameraIntrinsics(math.nan, FY, CX, CY, W, H)


def test_binning_and_rescaled_camera_info_scale_k() -> None:
    # Calibrated at 1280x960: the same camera seen at 640x480 has fx 600, cx 319.5.
    big = CameraIntrinsics.from_camera_info(camera_info(width=2 * W, height=2 * H, scale=2.0))
    assert (big.fx, big.cx, big.width) == (1200.0, 639.5, 1280)
    scaled = big.for_size(W, H)
    for name in ("fx", "fy", "cx", "cy"):
        assert getattr(scaled, name) == pytest.approx(getattr(intrinsics(), name))
    assert (scaled.width, scaled.height) == (W, H)
    binned = CameraIntrinsics.from_camera_info(
        camera_info(width=2 * W, height=2 * H, scale=2.0, binning_x=2, binning_y=2)
    )
    assert binned == scaled
    # A DepthFrame stores intrinsics for its own size, so positions do not change.
    a = target_depth(box_mask(), frame_of(plane(1.5), info=big))
    b = target_depth(box_mask(), frame_of(plane(1.5)))
    assert a.position == pytest.approx(b.position, abs=1e-9)


def test_camera_info_of_another_view_is_refused() -> None:
    wide = CameraIntrinsics.from_camera_info(camera_info(width=1280, height=720, scale=2.0))
    with pytest.raises(DepthSizeMismatch, match="1280x720") as info:
        frame_of(plane(1.5), info=wide)
    assert isinstance(info.value, ValueError) and "640x480" in str(info.value)


# ----------------------------------------------------------------------------- target_depth


@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_plane_at_known_distance(encoding: str, builder: str) -> None:
    frame = frame_of(through_message(plane(1.5), encoding, builder))
    result = target_depth(box_mask(), frame)
    assert result.found and result.eroded
    x, y, z = result.position
    ex, ey, ez = deprojected_centre(TOP, BOTTOM, LEFT, RIGHT, 1.5)
    assert abs(z - 1.5) < 0.01
    assert (x, y) == pytest.approx((ex, ey), abs=1e-4)
    assert ex == pytest.approx(0.1) and ey == pytest.approx(0.0)  # to the right, centred
    assert result.depth_min == pytest.approx(1.5) and result.depth_max == pytest.approx(1.5)
    assert 0 < result.valid_pixels < result.mask_pixels == 80 * 120  # eroded rim dropped


def test_invalid_and_out_of_range_pixels_are_ignored() -> None:
    depth = plane(1.5)
    # The mask's left 50 columns hold no measurement or depths outside [0.2, 4] m; if any
    # were used, z (median) or x would move.
    depth[TOP:BOTTOM, LEFT : LEFT + 10] = 0.0
    depth[TOP:BOTTOM, LEFT + 10 : LEFT + 20] = np.nan
    depth[TOP:BOTTOM, LEFT + 20 : LEFT + 30] = 9.0  # beyond max_range
    depth[TOP:BOTTOM, LEFT + 30 : LEFT + 40] = 0.1  # below min_range
    depth[TOP:BOTTOM, LEFT + 40 : LEFT + 50] = np.inf
    for encoding in ("16UC1", "32FC1"):
        frame = frame_of(through_message(depth, encoding))
        result = target_depth(box_mask(), frame, DepthOptions(0.2, 4.0, erode_px=0))
        ex, ey, ez = deprojected_centre(TOP, BOTTOM, LEFT + 50, RIGHT, 1.5)
        assert result.position == pytest.approx((ex, ey, ez), abs=1e-4)
        assert result.valid_pixels == 80 * 70 and not result.eroded
        assert (result.depth_min, result.depth_max) == pytest.approx((1.5, 1.5))


def test_mask_on_a_depth_edge_gives_the_object_depth() -> None:
    # An object at 0.8 m on a 1.5 m background; the mask spills 4 pixels onto the background
    # all around (as segmentation masks do at object edges).
    depth = plane(1.5)
    depth[TOP:BOTTOM, LEFT:RIGHT] = 0.8
    mask = box_mask(TOP - 4, BOTTOM + 4, LEFT - 4, RIGHT + 4)
    frame = frame_of(through_message(depth, "16UC1"))
    naive = float(np.mean(frame.depth_m[mask]))
    assert naive - 0.8 > 0.05  # a plain average would be several centimetres off

    result = target_depth(mask, frame, DepthOptions(erode_px=4))
    assert result.eroded and result.found
    assert result.position == pytest.approx(
        deprojected_centre(TOP, BOTTOM, LEFT, RIGHT, 0.8), abs=0.01
    )
    assert result.depth_max == pytest.approx(0.8)  # the rim was eroded away
    # Without erosion the median still holds while less than half of the mask is background.
    unrobust = target_depth(mask, frame, DepthOptions(erode_px=0))
    assert not unrobust.eroded and abs(unrobust.position[2] - 0.8) < 0.01
    assert unrobust.depth_max == pytest.approx(1.5)


def test_small_mask_falls_back_to_the_whole_mask() -> None:
    frame = frame_of(plane(2.0))
    mask = box_mask(100, 104, 100, 104)  # 16 pixels: a 3-pixel erosion leaves none
    result = target_depth(mask, frame, DepthOptions(erode_px=3, min_pixels=5))
    assert not result.eroded and result.valid_pixels == 16
    assert result.position == pytest.approx(deprojected_centre(100, 104, 100, 104, 2.0), abs=1e-6)


def test_no_valid_pixel_gives_no_position() -> None:
    depth = plane(1.5)
    depth[TOP:BOTTOM, LEFT:RIGHT] = np.nan
    for mask in (box_mask(), np.zeros((H, W), dtype=bool)):
        result = target_depth(mask, frame_of(depth))
        assert result.position is None and not result.found
        assert result.valid_pixels == 0
        assert math.isnan(result.depth_min) and math.isnan(result.depth_max)
    far = target_depth(box_mask(), frame_of(plane(1.5)), DepthOptions(max_range=1.0))
    assert far.position is None and far.mask_pixels == 80 * 120


def test_size_mismatch_is_a_typed_error() -> None:
    frame = frame_of(plane(1.5))
    with pytest.raises(DepthSizeMismatch, match="320x240.*640x480") as info:
        target_depth(np.ones((240, 320), dtype=bool), frame)
    assert isinstance(info.value, ValueError)
    assert "camera_color_optical_frame" in str(info.value) and "aligned" in str(info.value)
    with pytest.raises(DepthSizeMismatch):
        target_points(np.ones((240, 320), dtype=bool), frame)


def test_bad_arguments_are_refused() -> None:
    frame = frame_of(plane(1.5))
    with pytest.raises(ValueError, match="min_range < max_range"):
        DepthOptions(min_range=2.0, max_range=1.0)
    with pytest.raises(ValueError, match="erode_px"):
        DepthOptions(erode_px=-1)
    with pytest.raises(ValueError, match="min_pixels"):
        DepthOptions(min_pixels=0)
    with pytest.raises(ValueError, match="mask"):
        target_depth(box_mask().astype(np.float32), frame)
    with pytest.raises(ValueError, match="max_points"):
        target_points(box_mask(), frame, max_points=0)
    with pytest.raises(ValueError, match="depth_m"):
        DepthFrame(np.zeros((H, W), np.uint16), 0.0, "cam", intrinsics())
    uint8_mask = box_mask().astype(np.uint8) * 255
    assert target_depth(uint8_mask, frame) == target_depth(box_mask(), frame)


# ----------------------------------------------------------------------------- target_points


def test_target_points_are_decimated_within_bounds() -> None:
    frame = frame_of(plane(1.5))
    mask = box_mask()
    everything = target_points(mask, frame, 10**6, DepthOptions(erode_px=0))
    assert everything.shape == (80 * 120, 3) and everything.dtype == np.float32
    np.testing.assert_allclose(everything[:, 2], 1.5)
    u = everything[:, 0] * FX / 1.5 + CX
    v = everything[:, 1] * FY / 1.5 + CY
    assert u.min() == pytest.approx(LEFT, abs=1e-3) and u.max() == pytest.approx(
        RIGHT - 1, abs=1e-3
    )
    assert v.min() == pytest.approx(TOP, abs=1e-3) and v.max() == pytest.approx(
        BOTTOM - 1, abs=1e-3
    )
    for max_points in (1, 7, 500, 80 * 120 - 1):
        points = target_points(mask, frame, max_points, DepthOptions(erode_px=0))
        assert points.shape == (max_points, 3)
        assert len(np.unique(points, axis=0)) == max_points  # no pixel twice
        rows = {tuple(p) for p in everything.tolist()}
        assert all(tuple(p) in rows for p in points.tolist())  # only target pixels
    spread = target_points(mask, frame, 500, DepthOptions(erode_px=0))
    v = spread[:, 1] * FY / 1.5 + CY
    assert v.min() < TOP + 1 and v.max() > BOTTOM - 2  # spans the target, not just its top
    empty = target_points(mask, frame_of(plane(np.nan)))
    assert empty.shape == (0, 3) and empty.dtype == np.float32


# ----------------------------------------------------------------------------- DepthBuffer


def test_buffer_matches_the_nearest_stamp_within_tolerance() -> None:
    buffer = DepthBuffer(capacity=5, tolerance=0.02)
    miss = buffer.lookup(10.0)
    assert miss.frame is None and miss.miss is DepthMiss.NO_DEPTH
    assert "no depth image" in miss.message
    buffer.set_intrinsics(intrinsics())
    for i in range(4):  # 30 Hz: 10.000, 10.033, 10.067, 10.100
        frame = buffer.push_depth(plane(1.0 + i), 10.0 + i / 30, "cam")
        assert frame is not None and frame.intrinsics == intrinsics()
    hit = buffer.lookup(10.04)
    assert hit.frame is not None and hit.frame.stamp == pytest.approx(10.0 + 1 / 30)
    assert hit.miss is None and hit.offset == pytest.approx(1 / 30 - 0.04)
    assert buffer.match(10.06).depth_m[0, 0] == 3.0
    late = buffer.lookup(10.2)
    assert late.frame is None and late.miss is DepthMiss.TOO_FAR
    assert late.offset == pytest.approx(-0.1)
    assert "100 ms before the colour frame (tolerance 20 ms)" in late.message
    early = buffer.lookup(9.9)
    assert early.miss is DepthMiss.TOO_FAR and "100 ms after" in early.message
    assert buffer.match(9.9) is None and buffer.match(10.2) is None


def test_buffer_keeps_the_newest_frames() -> None:
    buffer = DepthBuffer(capacity=3, tolerance=0.001)
    buffer.set_intrinsics(intrinsics())
    for i in range(6):
        buffer.push_depth(plane(1.0), float(i), "cam")
    assert len(buffer) == 3
    assert buffer.match(2.0) is None and buffer.match(3.0).stamp == 3.0
    # Of two frames equally near, the newer is taken.
    tie = DepthBuffer(capacity=3, tolerance=1.0)
    tie.push(frame_of(plane(1.0), stamp=1.0))
    tie.push(frame_of(plane(2.0), stamp=2.0))
    assert tie.match(1.5).stamp == 2.0
    buffer.clear()
    assert len(buffer) == 0 and buffer.intrinsics is None


def test_buffer_without_camera_info_says_so() -> None:
    buffer = DepthBuffer()
    assert buffer.push_depth(plane(1.0), 1.0, "cam") is None
    assert buffer.push_depth(plane(1.0), 1.1, "cam") is None
    lookup = buffer.lookup(1.1)
    assert lookup.miss is DepthMiss.NO_CAMERA_INFO and lookup.dropped == 2
    assert "no camera_info" in lookup.message and "2 depth images dropped" in lookup.message
    buffer.set_intrinsics(intrinsics())
    assert buffer.push_depth(plane(1.0), 1.2, "cam") is not None
    assert buffer.match(1.2) is not None
    with pytest.raises(DepthSizeMismatch):
        buffer.push_depth(np.ones((100, 100), np.float32), 1.3, "cam")  # another view
    assert len(buffer) == 1


def test_buffer_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="capacity"):
        DepthBuffer(capacity=0)
    with pytest.raises(ValueError, match="tolerance"):
        DepthBuffer(tolerance=-0.1)


def test_buffer_is_thread_safe() -> None:
    buffer = DepthBuffer(capacity=4, tolerance=0.5)
    buffer.set_intrinsics(intrinsics())
    small = CameraIntrinsics(FX / 20, FY / 20, 15.5, 11.5, 32, 24)
    errors: list[BaseException] = []

    def producer() -> None:
        try:
            for i in range(300):
                buffer.push(DepthFrame(np.full((24, 32), 1.0, np.float32), i * 0.01, "cam", small))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def consumer() -> None:
        try:
            for i in range(300):
                lookup = buffer.lookup(i * 0.01)
                assert lookup.frame is None or abs(lookup.frame.stamp - i * 0.01) <= 0.5
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=f) for f in (producer, producer, consumer, consumer)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and not any(t.is_alive() for t in threads)
    assert len(buffer) == 4


def test_depth_module_imports_neither_torch_nor_ros() -> None:
    code = (
        "import sys, lisa_ros.depth\n"
        "bad = [m for m in ('torch', 'rclpy', 'cv_bridge', 'sensor_msgs') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "-c", code], cwd=repo, check=True, timeout=120)
