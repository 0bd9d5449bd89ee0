"""Image message <-> numpy conversion on real rclpy messages and real rosbags messages.

Expected pixels are computed independently (numpy channel picks, OpenCV's rounding
``convertScaleAbs`` for cv_bridge's 16 -> 8 bit scaling) and, where it applies, checked against
rosbags-image's ``message_to_cvimage`` as a second, independent decoder.
"""

from __future__ import annotations

import sys
import types
from typing import Any

import cv2
import numpy as np
import pytest
from rosbags.image import message_to_cvimage
from rosbags.typesys import Stores, get_typestore

from lisa_ros import conversion
from lisa_ros.conversion import (
    MASK_PNG_FORMAT,
    SUPPORTED_ENCODINGS,
    ImageConversionError,
    compressed_to_rgb,
    conversion_backend,
    image_to_rgb,
    mask_to_compressed_png,
    mask_to_image_fields,
    message_to_rgb,
    rgb_to_image_fields,
    stamp_to_seconds,
)

rclpy_msgs = pytest.importorskip("sensor_msgs.msg")
TS = get_typestore(Stores.ROS2_HUMBLE)
H, W = 6, 8


# ----------------------------------------------------------------------------- message builders


def rclpy_image(**fields: Any) -> Any:
    from std_msgs.msg import Header

    return rclpy_msgs.Image(header=Header(frame_id="cam"), **fields)


def rosbags_header() -> Any:
    time_t = TS.types["builtin_interfaces/msg/Time"]
    return TS.types["std_msgs/msg/Header"](
        stamp=time_t(sec=12, nanosec=500_000_000), frame_id="cam"
    )


def rosbags_image(**fields: Any) -> Any:
    fields["data"] = np.frombuffer(bytes(fields["data"]), dtype=np.uint8)
    return TS.types["sensor_msgs/msg/Image"](header=rosbags_header(), **fields)


def rosbags_compressed(fmt: str, data: bytes) -> Any:
    arr = np.frombuffer(data, dtype=np.uint8)
    return TS.types["sensor_msgs/msg/CompressedImage"](
        header=rosbags_header(), format=fmt, data=arr
    )


BUILDERS = {"rclpy": rclpy_image, "rosbags": rosbags_image}


def pack(pixels: np.ndarray, pad: int = 0, big: bool = False) -> tuple[bytes, int]:
    """``(H, W, C)`` pixels -> (data, step) with ``pad`` junk bytes after every row."""
    dtype = pixels.dtype.newbyteorder(">" if big else "<") if pixels.itemsize > 1 else pixels.dtype
    rows = np.ascontiguousarray(pixels.astype(dtype)).reshape(pixels.shape[0], -1).view(np.uint8)
    junk = np.full((rows.shape[0], pad), 0xAB, dtype=np.uint8)
    padded = np.concatenate([rows, junk], axis=1)
    return padded.tobytes(), padded.shape[1]


# ----------------------------------------------------------------------------- expected pixels

# encoding -> (channels, dtype, how to get RGB from the stored channels)
PLAIN: dict[str, tuple[int, type, Any]] = {
    "rgb8": (3, np.uint8, lambda p: p),
    "bgr8": (3, np.uint8, lambda p: p[..., ::-1]),
    "rgba8": (4, np.uint8, lambda p: p[..., :3]),
    "bgra8": (4, np.uint8, lambda p: p[..., [2, 1, 0]]),
    "mono8": (1, np.uint8, lambda p: np.repeat(p, 3, axis=2)),
    "8UC1": (1, np.uint8, lambda p: np.repeat(p, 3, axis=2)),
    "8UC3": (3, np.uint8, lambda p: p[..., ::-1]),
    "8UC4": (4, np.uint8, lambda p: p[..., [2, 1, 0]]),
    "mono16": (1, np.uint16, lambda p: np.repeat(p, 3, axis=2)),
    "16UC1": (1, np.uint16, lambda p: np.repeat(p, 3, axis=2)),
    "rgb16": (3, np.uint16, lambda p: p),
    "bgr16": (3, np.uint16, lambda p: p[..., ::-1]),
    "rgba16": (4, np.uint16, lambda p: p[..., :3]),
    "bgra16": (4, np.uint16, lambda p: p[..., [2, 1, 0]]),
}


def random_pixels(encoding: str, seed: int = 0) -> np.ndarray:
    channels, dtype, _ = PLAIN[encoding]
    rng = np.random.default_rng(seed)
    hi = 65536 if dtype is np.uint16 else 256
    pixels = rng.integers(0, hi, size=(H, W, channels)).astype(dtype)
    if dtype is np.uint16:  # the extremes and values next to the rounding points
        pixels.reshape(-1)[:6] = [0, 65535, 128, 129, 257 * 100 + 128, 257 * 100 + 129]
    return pixels


def expected_rgb(encoding: str, pixels: np.ndarray) -> np.ndarray:
    rgb = np.ascontiguousarray(PLAIN[encoding][2](pixels))
    if rgb.dtype == np.uint16:
        # cv_bridge: convertTo(CV_8U, 255/65535), i.e. OpenCV's saturate_cast rounding.
        rgb = cv2.convertScaleAbs(rgb, alpha=255.0 / 65535.0)
    return rgb


def message(builder: str, encoding: str, pixels: np.ndarray, pad: int = 0, big: bool = False):
    data, step = pack(pixels, pad, big)
    return BUILDERS[builder](
        height=H, width=W, encoding=encoding, is_bigendian=int(big), step=step, data=data
    )


# ----------------------------------------------------------------------------- Image -> RGB


@pytest.mark.parametrize("builder", sorted(BUILDERS))
@pytest.mark.parametrize("pad", [0, 5])
@pytest.mark.parametrize("encoding", sorted(PLAIN))
def test_image_to_rgb_matches_the_expected_pixels(builder: str, pad: int, encoding: str) -> None:
    pixels = random_pixels(encoding)
    out = image_to_rgb(message(builder, encoding, pixels, pad=pad), backend="numpy")
    assert out.shape == (H, W, 3) and out.dtype == np.uint8 and out.flags.c_contiguous
    np.testing.assert_array_equal(out, expected_rgb(encoding, pixels))


@pytest.mark.parametrize("encoding", ["mono16", "16UC1", "rgb16", "bgra16"])
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_big_endian_16_bit_reads_like_little_endian(encoding: str, builder: str) -> None:
    pixels = random_pixels(encoding, seed=1)
    big = image_to_rgb(message(builder, encoding, pixels, pad=3, big=True))
    little = image_to_rgb(message(builder, encoding, pixels, pad=3, big=False))
    np.testing.assert_array_equal(big, little)
    np.testing.assert_array_equal(big, expected_rgb(encoding, pixels))


@pytest.mark.parametrize(
    ("encoding", "big"),
    [
        (e, big)
        for e in sorted(PLAIN)
        for big in (False, True)
        if big <= (PLAIN[e][1] is np.uint16)
    ],
)
def test_rosbags_image_agrees(encoding: str, big: bool) -> None:
    """rosbags-image ignores row padding, does not colour-convert generic types (8UC3, 16UC1,
    ...), and truncates where cv_bridge rounds 16 -> 8 bits, so: packed rows, its raw decode for
    generic types, +-1 for 16-bit data."""
    pixels = random_pixels(encoding, seed=2)
    msg = message("rosbags", encoding, pixels, big=big)
    ours = image_to_rgb(msg).astype(int)
    if encoding[0].isdigit():
        raw = message_to_cvimage(msg)  # no colour space: the stored channels, native order
        np.testing.assert_array_equal(ours, expected_rgb(encoding, raw.reshape(pixels.shape)))
        return
    oracle = message_to_cvimage(msg, "rgb8").astype(int)
    if pixels.dtype == np.uint16:
        assert np.abs(ours - oracle).max() <= 1
        assert np.all(ours >= oracle)  # rounding never gives less than truncating
    else:
        np.testing.assert_array_equal(ours, oracle)


def bayer_mosaic(pattern: str, color: tuple[int, int, int], h: int, w: int) -> np.ndarray:
    """A raw Bayer image of a uniformly coloured scene; pattern names the top-left 2x2 block."""
    index = {"r": 0, "g": 1, "b": 2}
    raw = np.empty((h, w), dtype=np.uint16)
    for dy in range(2):
        for dx in range(2):
            raw[dy::2, dx::2] = color[index[pattern[2 * dy + dx]]]
    return raw


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("pattern", ["rggb", "bggr", "gbrg", "grbg"])
def test_bayer_is_demosaiced_with_the_right_pattern(pattern: str, bits: int) -> None:
    color = (200, 90, 30) if bits == 8 else (51400, 23130, 7710)  # = 257 * (200, 90, 30)
    raw = bayer_mosaic(pattern, color, 10, 12).astype(np.uint8 if bits == 8 else np.uint16)
    data, step = pack(raw[:, :, None], pad=2)
    fields = dict(height=10, width=12, encoding=f"bayer_{pattern}{bits}", is_bigendian=0)
    for build in BUILDERS.values():
        out = image_to_rgb(build(step=step, data=data, **fields))
        assert out.shape == (10, 12, 3)
        np.testing.assert_array_equal(out[2:-2, 2:-2], np.broadcast_to((200, 90, 30), (6, 8, 3)))


@pytest.mark.parametrize("encoding", ["bayer_rggb8", "bayer_gbrg8", "bayer_grbg16"])
def test_bayer_agrees_with_rosbags_image(encoding: str) -> None:
    dtype = np.uint16 if encoding.endswith("16") else np.uint8
    raw = np.random.default_rng(3).integers(0, np.iinfo(dtype).max, size=(H, W, 1)).astype(dtype)
    msg = message("rosbags", encoding, raw)
    diff = image_to_rgb(msg).astype(int) - message_to_cvimage(msg, "rgb8").astype(int)
    assert np.abs(diff).max() <= (1 if dtype == np.uint16 else 0)


@pytest.mark.parametrize("encoding", ["yuv422", "uyvy", "yuyv", "yuv422_yuy2"])
def test_yuv422_agrees_with_rosbags_image(encoding: str) -> None:
    raw = np.random.default_rng(4).integers(0, 256, size=(H, W, 2)).astype(np.uint8)
    msg = message("rosbags", encoding, raw)
    rosbags_name = {"uyvy": "yuv422", "yuyv": "yuv422_yuy2"}.get(encoding, encoding)
    oracle = message_to_cvimage(message("rosbags", rosbags_name, raw), "rgb8")
    np.testing.assert_array_equal(image_to_rgb(msg), oracle)
    padded = message("rclpy", encoding, raw, pad=4)
    np.testing.assert_array_equal(image_to_rgb(padded), oracle)


def test_result_does_not_share_memory_with_the_message() -> None:
    pixels = random_pixels("rgb8")
    msg = message("rosbags", "rgb8", pixels)
    out = image_to_rgb(msg)
    assert not np.shares_memory(out, msg.data)
    out[:] = 0
    np.testing.assert_array_equal(image_to_rgb(msg), pixels)


def test_longer_data_than_height_times_step_is_accepted() -> None:
    pixels = random_pixels("mono8")
    data, step = pack(pixels)
    msg = rclpy_image(height=H, width=W, encoding="mono8", is_bigendian=0, step=step, data=data)
    msg.data = data + b"\x00" * 7
    np.testing.assert_array_equal(image_to_rgb(msg), expected_rgb("mono8", pixels))


def test_every_supported_encoding_is_tested() -> None:
    bayer = {f"bayer_{p}{b}" for p in ("rggb", "bggr", "gbrg", "grbg") for b in (8, 16)}
    tested = set(PLAIN) | bayer | {"yuv422", "uyvy", "yuyv", "yuv422_yuy2"}
    assert set(SUPPORTED_ENCODINGS) == tested


@pytest.mark.parametrize(
    ("fields", "words"),
    [
        (dict(encoding="32FC1", step=4 * W, data=bytes(4 * W * H)), "'32FC1'"),
        (dict(encoding="jpeg", step=W, data=bytes(W * H)), "unsupported image encoding"),
        (dict(encoding="rgb8", step=3 * W, data=bytes(3 * W * H - 1)), "fewer than height * step"),
        (dict(encoding="rgb8", step=3 * W - 1, data=bytes(3 * W * H)), "smaller than width"),
        (dict(encoding="mono16", step=W, data=bytes(2 * W * H)), f"{W} * 1 * 2"),
        (dict(encoding="mono8", step=0, data=b"", height=0), "empty"),
        (dict(encoding="yuv422", step=2 * (W - 1), data=bytes(W * H * 2), width=W - 1), "even"),
    ],
)
@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_bad_messages_raise_a_clear_error(builder: str, fields: dict, words: str) -> None:
    full = dict(height=H, width=W, is_bigendian=0) | fields
    with pytest.raises(ImageConversionError, match=words.replace("*", r"\*")) as info:
        image_to_rgb(BUILDERS[builder](**full))
    assert isinstance(info.value, ValueError)
    assert full["encoding"] in str(info.value)


def test_unknown_backend_is_refused() -> None:
    with pytest.raises(ValueError, match="backend"):
        image_to_rgb(message("rclpy", "rgb8", random_pixels("rgb8")), backend="pil")


# ----------------------------------------------------------------------------- cv_bridge


def test_numpy_fallback_is_used_without_cv_bridge() -> None:
    try:
        import cv_bridge  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("cv_bridge is installed here; the fallback is tested where it is not")
    assert conversion_backend() == "numpy"
    msg = message("rclpy", "bgr8", random_pixels("bgr8"))
    np.testing.assert_array_equal(image_to_rgb(msg), image_to_rgb(msg, backend="numpy"))
    with pytest.raises(ImportError, match="cv_bridge"):
        image_to_rgb(msg, backend="cv_bridge")


class RecordingBridge:
    """Stands in for cv_bridge.CvBridge: records what it is asked, decodes like cv_bridge."""

    calls: list[tuple[str, str]] = []

    def imgmsg_to_cv2(self, msg: Any, desired_encoding: str = "passthrough") -> np.ndarray:
        RecordingBridge.calls.append((msg.encoding, desired_encoding))
        pixels = conversion._validated(msg)[1]
        if desired_encoding == "passthrough":
            return pixels[:, :, 0] if pixels.shape[2] == 1 else pixels
        assert desired_encoding == "rgb8"
        return expected_rgb(msg.encoding, pixels)


@pytest.fixture
def fake_cv_bridge(monkeypatch: pytest.MonkeyPatch):
    module = types.ModuleType("cv_bridge")
    module.CvBridge = RecordingBridge  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cv_bridge", module)
    RecordingBridge.calls = []
    conversion.cv_bridge_or_none.cache_clear()
    yield RecordingBridge.calls
    conversion.cv_bridge_or_none.cache_clear()


def test_cv_bridge_is_used_when_importable(fake_cv_bridge: list) -> None:
    assert conversion_backend() == "cv_bridge"
    for encoding, desired in [("bgr8", "rgb8"), ("mono16", "rgb8"), ("8UC3", "passthrough")]:
        msg = message("rosbags", encoding, random_pixels(encoding), pad=2)
        out = image_to_rgb(msg)
        assert fake_cv_bridge[-1] == (encoding, desired)
        np.testing.assert_array_equal(out, image_to_rgb(msg, backend="numpy"))
    count = len(fake_cv_bridge)
    raw = np.random.default_rng(5).integers(0, 256, size=(H, W, 2)).astype(np.uint8)
    image_to_rgb(message("rclpy", "yuyv", raw))  # unknown to cv_bridge: ours only
    assert len(fake_cv_bridge) == count
    with pytest.raises(ImageConversionError):  # validated before cv_bridge sees it
        image_to_rgb(rclpy_image(height=H, width=W, encoding="rgb8", step=1, data=b""))
    assert len(fake_cv_bridge) == count


# ----------------------------------------------------------------------------- compressed


def encode(image_bgr: np.ndarray, ext: str) -> bytes:
    ok, buf = cv2.imencode(ext, image_bgr)
    assert ok
    return buf.tobytes()


@pytest.mark.parametrize(
    "fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "png", "bgr8; png compressed bgr8"]
)
@pytest.mark.parametrize("builder", ["rclpy", "rosbags"])
def test_compressed_color(fmt: str, builder: str) -> None:
    rgb = np.random.default_rng(6).integers(0, 256, size=(16, 24, 3)).astype(np.uint8)
    data = encode(rgb[..., ::-1], ".png" if "png" in fmt else ".jpg")
    if builder == "rclpy":
        msg = rclpy_msgs.CompressedImage(format=fmt, data=data)
    else:
        msg = rosbags_compressed(fmt, data)
    out = compressed_to_rgb(msg)
    assert out.shape == (16, 24, 3) and out.dtype == np.uint8
    if "png" in fmt:
        np.testing.assert_array_equal(out, rgb)
    else:  # lossy: compare with OpenCV's own decode, and with rosbags-image
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(out, decoded[..., ::-1])
    np.testing.assert_array_equal(out, message_to_cvimage(rosbags_compressed(fmt, data), "rgb8"))
    np.testing.assert_array_equal(message_to_rgb(msg), out)


def test_compressed_grey_alpha_and_16_bit_png() -> None:
    grey = np.random.default_rng(7).integers(0, 256, size=(9, 11)).astype(np.uint8)
    out = compressed_to_rgb(rosbags_compressed("mono8; png compressed ", encode(grey, ".png")))
    np.testing.assert_array_equal(out, np.repeat(grey[:, :, None], 3, axis=2))

    bgra = np.random.default_rng(8).integers(0, 256, size=(9, 11, 4)).astype(np.uint8)
    out = compressed_to_rgb(
        rosbags_compressed("bgra8; png compressed bgra8", encode(bgra, ".png"))
    )
    np.testing.assert_array_equal(out, bgra[..., [2, 1, 0]])

    deep = np.random.default_rng(9).integers(0, 65536, size=(9, 11)).astype(np.uint16)
    out = compressed_to_rgb(rosbags_compressed("mono16; png compressed ", encode(deep, ".png")))
    expected = np.repeat(cv2.convertScaleAbs(deep, alpha=255.0 / 65535.0)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize(
    ("fmt", "data", "words"),
    [
        ("jpeg", b"", "no data"),
        ("jpeg", b"definitely not a jpeg", "cannot decode 21 bytes"),
        ("16UC1; compressedDepth png", b"\x00" * 20, "depth"),
    ],
)
def test_bad_compressed_messages_raise(fmt: str, data: bytes, words: str) -> None:
    with pytest.raises(ImageConversionError, match=words):
        compressed_to_rgb(rclpy_msgs.CompressedImage(format=fmt, data=data))


# ----------------------------------------------------------------------------- numpy -> messages


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8"])
def test_rgb_fields_build_real_messages_that_round_trip(encoding: str) -> None:
    from rclpy.serialization import deserialize_message, serialize_message

    rgb = np.random.default_rng(10).integers(0, 256, size=(5, 7, 3)).astype(np.uint8)
    fields = rgb_to_image_fields(rgb, encoding)
    assert (fields.height, fields.width, fields.step, fields.encoding) == (5, 7, 21, encoding)
    assert fields.is_bigendian == 0 and len(fields.data) == 5 * 21

    live = rclpy_image(**fields.as_kwargs())
    bag = rosbags_image(**fields.as_kwargs(numpy_data=True))
    np.testing.assert_array_equal(image_to_rgb(live), rgb)
    np.testing.assert_array_equal(image_to_rgb(bag), rgb)
    # What the node publishes and what the replay writes are the same message on the wire. (Not
    # compared byte for byte: rclpy's serializer leaves CDR alignment padding uninitialised.)
    live.header.stamp.sec, live.header.stamp.nanosec = 12, 500_000_000
    cdr = serialize_message(live)
    bag_cdr = bytes(TS.serialize_cdr(bag, "sensor_msgs/msg/Image"))
    assert len(bag_cdr) == len(cdr)
    assert deserialize_message(bag_cdr, rclpy_msgs.Image) == live
    np.testing.assert_array_equal(image_to_rgb(deserialize_message(cdr, rclpy_msgs.Image)), rgb)
    back = TS.deserialize_cdr(cdr, "sensor_msgs/msg/Image")
    np.testing.assert_array_equal(image_to_rgb(back), rgb)


def test_rgb_fields_refuse_bad_input() -> None:
    with pytest.raises(ValueError, match="rgb"):
        rgb_to_image_fields(np.zeros((4, 4), np.uint8))
    with pytest.raises(ValueError, match="encoding"):
        rgb_to_image_fields(np.zeros((4, 4, 3), np.uint8), "mono8")


def test_mask_fields_are_mono8() -> None:
    mask = np.zeros((5, 7), dtype=np.uint8)
    mask[1:3, 2:5] = 255
    for given in (mask, mask > 0):
        fields = mask_to_image_fields(given)
        assert (fields.encoding, fields.step, fields.height, fields.width) == ("mono8", 7, 5, 7)
        assert fields.data == mask.tobytes()
        out = image_to_rgb(rclpy_image(**fields.as_kwargs()))
        np.testing.assert_array_equal(out[..., 0], mask)
    with pytest.raises(ValueError, match="mask"):
        mask_to_image_fields(np.zeros((2, 2, 1), np.uint8))
    with pytest.raises(ValueError, match="mask"):
        mask_to_image_fields(np.zeros((2, 2), np.float32))


def test_mask_png_is_lossless_grey_png() -> None:
    mask = np.zeros((30, 40), dtype=np.uint8)
    mask[5:20, 8:33] = 255
    fmt, data = mask_to_compressed_png(mask)
    assert fmt == MASK_PNG_FORMAT and "png" in fmt and "jpeg" not in fmt
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert decoded.ndim == 2
    np.testing.assert_array_equal(decoded, mask)
    out = compressed_to_rgb(rosbags_compressed(fmt, data))
    np.testing.assert_array_equal(out, np.repeat(mask[:, :, None], 3, axis=2))
    np.testing.assert_array_equal(
        cv2.imdecode(np.frombuffer(mask_to_compressed_png(mask > 0)[1], np.uint8), -1), mask
    )


def test_stamp_to_seconds_reads_both_message_kinds() -> None:
    from builtin_interfaces.msg import Time

    assert stamp_to_seconds(Time(sec=3, nanosec=250_000_000)) == pytest.approx(3.25)
    assert stamp_to_seconds(rosbags_header().stamp) == pytest.approx(12.5)
