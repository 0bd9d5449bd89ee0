"""Depth images and point clouds <-> numpy, on real rclpy and rosbags messages.

Expected depths are computed independently (millimetre integers / 1000, invalid values -> NaN)
and, for packed rows, checked against rosbags-image's ``message_to_cvimage`` as a second decoder.
"""

from __future__ import annotations

import numpy as np
import pytest
from rosbags.image import message_to_cvimage

from lisa_ros.conversion import (
    DEPTH_ENCODINGS,
    POINT_FIELD_FLOAT32,
    ImageConversionError,
    depth_to_image_fields,
    image_to_depth,
    points_to_cloud_fields,
)
from tests.lisa_ros.test_conversion import BUILDERS, TS, pack, rclpy_msgs, rosbags_header

H, W = 5, 7


def millimetres(seed: int = 0) -> np.ndarray:
    """``(H, W)`` uint16 depths in mm, with the extremes (0 = no return, 65535)."""
    mm = np.random.default_rng(seed).integers(1, 65536, size=(H, W)).astype(np.uint16)
    mm.reshape(-1)[:4] = [0, 65535, 1, 1500]
    return mm


def metres_float(seed: int = 0) -> np.ndarray:
    """``(H, W)`` float32 metres, with every kind of invalid value."""
    m = np.random.default_rng(seed).uniform(0.05, 20.0, size=(H, W)).astype(np.float32)
    m.reshape(-1)[:6] = [0.0, np.nan, np.inf, -np.inf, -1.0, 1.5]
    return m


def depth_message(builder: str, encoding: str, values: np.ndarray, pad: int = 0, big=False):
    data, step = pack(values[:, :, None], pad=pad, big=big)
    return BUILDERS[builder](
        height=H, width=W, encoding=encoding, is_bigendian=int(big), step=step, data=data
    )


def expected_metres(encoding: str, values: np.ndarray) -> np.ndarray:
    out = values.astype(np.float64) / (1000.0 if encoding != "32FC1" else 1.0)
    out[~(np.isfinite(out) & (out > 0))] = np.nan
    return out.astype(np.float32)


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("pad", [0, 6])
@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize("encoding", DEPTH_ENCODINGS)
def test_image_to_depth_reads_metres(encoding: str, builder: str, pad: int, big: bool) -> None:
    values = metres_float() if encoding == "32FC1" else millimetres()
    depth = image_to_depth(depth_message(builder, encoding, values, pad=pad, big=big))
    assert depth.shape == (H, W) and depth.dtype == np.float32 and depth.flags.c_contiguous
    expected = expected_metres(encoding, values)
    np.testing.assert_array_equal(np.isnan(depth), np.isnan(expected))
    np.testing.assert_allclose(depth, expected, rtol=1e-6, equal_nan=True)
    if encoding != "32FC1":
        assert depth[0, 0] != depth[0, 0]  # 0 mm = no return
        assert depth[0, 3] == pytest.approx(1.5)
    else:
        assert np.isnan(depth.reshape(-1)[:5]).all() and depth[0, 5] == pytest.approx(1.5)


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
@pytest.mark.parametrize("big", [False, True])
def test_image_to_depth_agrees_with_rosbags_image(encoding: str, big: bool) -> None:
    values = metres_float(1) if encoding == "32FC1" else millimetres(1)
    msg = depth_message("rosbags", encoding, values, big=big)
    raw = message_to_cvimage(msg).astype(np.float64)  # stored values, native order
    if encoding == "16UC1":
        raw /= 1000.0
    raw[~(np.isfinite(raw) & (raw > 0))] = np.nan
    np.testing.assert_allclose(image_to_depth(msg), raw.astype(np.float32), equal_nan=True)


def test_image_to_depth_does_not_share_memory_with_the_message() -> None:
    values = np.full((H, W), 1.25, dtype=np.float32)
    msg = depth_message("rosbags", "32FC1", values)
    depth = image_to_depth(msg)
    assert not np.shares_memory(depth, msg.data)


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(encoding="rgb8", step=3 * W, data=bytes(3 * W * H)), "'rgb8' is not a depth"),
        (dict(encoding="16UC1", step=2 * W - 1, data=bytes(2 * W * H)), "smaller than width"),
        (dict(encoding="32FC1", step=4 * W, data=bytes(4 * W * H - 1)), "fewer than height"),
        (dict(encoding="16UC1", step=0, data=b"", height=0), "empty"),
    ],
)
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_bad_depth_messages_raise_a_clear_error(builder: str, fields: dict, words: str) -> None:
    full = dict(height=H, width=W, is_bigendian=0) | fields
    with pytest.raises(ImageConversionError, match=words) as info:
        image_to_depth(BUILDERS[builder](**full))
    assert full["encoding"] in str(info.value)
    if "depth" in words:
        assert all(e in str(info.value) for e in DEPTH_ENCODINGS)


@pytest.mark.parametrize("big", [False, True])
@pytest.mark.parametrize("encoding", DEPTH_ENCODINGS)
def test_depth_fields_round_trip(encoding: str, big: bool) -> None:
    depth = metres_float(2)
    depth[1, 1] = 70.0  # beyond what 16-bit millimetres hold
    fields = depth_to_image_fields(depth, encoding, big_endian=big)
    item = 2 if encoding != "32FC1" else 4
    assert (fields.height, fields.width, fields.step, fields.encoding) == (
        H,
        W,
        item * W,
        encoding,
    )
    assert fields.is_bigendian == int(big) and len(fields.data) == H * W * item
    for msg in (
        BUILDERS["rclpy"](**fields.as_kwargs()),
        BUILDERS["rosbags"](**fields.as_kwargs()),
    ):
        back = image_to_depth(msg)
        expected = depth.astype(np.float64)
        expected[~(np.isfinite(expected) & (expected > 0))] = np.nan
        if encoding == "32FC1":
            np.testing.assert_allclose(back, expected, equal_nan=True)
        else:
            expected[1, 1] = np.nan
            expected = np.round(expected * 1000) / 1000
            np.testing.assert_allclose(back, expected, atol=1e-6, equal_nan=True)


def test_depth_fields_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="depth_m"):
        depth_to_image_fields(np.zeros((2, 2), np.uint16))
    with pytest.raises(ValueError, match="depth_m"):
        depth_to_image_fields(np.zeros((2, 2, 1), np.float32))
    with pytest.raises(ValueError, match="encoding"):
        depth_to_image_fields(np.zeros((2, 2), np.float32), "mono8")


# ----------------------------------------------------------------------------- point clouds


def test_cloud_fields_build_real_point_clouds() -> None:
    from rclpy.serialization import deserialize_message, serialize_message
    from std_msgs.msg import Header

    points = np.random.default_rng(3).normal(size=(11, 3)).astype(np.float32)
    fields = points_to_cloud_fields(points)
    assert (fields.height, fields.width, fields.point_step, fields.row_step) == (1, 11, 12, 132)
    assert [(f.name, f.offset, f.datatype, f.count) for f in fields.fields] == [
        ("x", 0, POINT_FIELD_FLOAT32, 1),
        ("y", 4, POINT_FIELD_FLOAT32, 1),
        ("z", 8, POINT_FIELD_FLOAT32, 1),
    ]
    assert fields.is_dense and not fields.is_bigendian and len(fields.data) == 132
    assert POINT_FIELD_FLOAT32 == rclpy_msgs.PointField.FLOAT32

    live = rclpy_msgs.PointCloud2(
        header=Header(frame_id="cam_optical"), **fields.as_kwargs(rclpy_msgs.PointField)
    )
    back = deserialize_message(serialize_message(live), rclpy_msgs.PointCloud2)
    np.testing.assert_array_equal(np.frombuffer(bytes(back.data), "<f4").reshape(-1, 3), points)
    # The same fields as a rosbags message, written to CDR and read back by rclpy.
    cloud_t, field_t = (
        TS.types["sensor_msgs/msg/PointCloud2"],
        TS.types["sensor_msgs/msg/PointField"],
    )
    bag = cloud_t(header=rosbags_header(), **fields.as_kwargs(field_t, numpy_data=True))
    from_bag = deserialize_message(
        bytes(TS.serialize_cdr(bag, "sensor_msgs/msg/PointCloud2")), rclpy_msgs.PointCloud2
    )
    assert [f.name for f in from_bag.fields] == ["x", "y", "z"]
    assert (from_bag.width, from_bag.point_step, from_bag.is_dense) == (11, 12, True)
    np.testing.assert_array_equal(
        np.frombuffer(bytes(from_bag.data), "<f4").reshape(-1, 3), points
    )


def test_cloud_fields_empty_and_not_dense() -> None:
    empty = points_to_cloud_fields(np.zeros((0, 3), np.float32))
    assert (empty.width, empty.row_step, empty.data, empty.is_dense) == (0, 0, b"", True)
    holes = points_to_cloud_fields(np.array([[0.0, 0.0, 1.0], [np.nan, 0.0, 1.0]]))
    assert holes.width == 2 and not holes.is_dense
    with pytest.raises(ValueError, match="points"):
        points_to_cloud_fields(np.zeros((3, 2), np.float32))
    with pytest.raises(ValueError, match="points"):
        points_to_cloud_fields(np.zeros(3, np.float32))
