"""Conversions between ``sensor_msgs`` image messages and numpy arrays.

The functions are duck-typed on the message fields, so the same code accepts rclpy messages
(``sensor_msgs.msg.Image``, ``data`` an ``array.array``) and rosbags messages (deserialised
dataclasses, ``data`` a uint8 ndarray):

- ``Image``: ``height``, ``width``, ``encoding``, ``is_bigendian``, ``step``, ``data``;
- ``CompressedImage``: ``format``, ``data``;
- ``Header``/``Time``: ``stamp.sec``, ``stamp.nanosec``, ``frame_id``.

Decoding follows cv_bridge's ``imgmsg_to_cv2(msg, "rgb8")`` (ROS 2 ``vision_opencv``):

- row padding: rows are ``step`` bytes apart, only the first ``width * channels * bytes`` count;
- ``is_bigendian`` is honoured for 16-bit data;
- 16-bit data is brought to 8 bits by ``round(v * 255 / 65535)`` after any colour conversion
  (cv_bridge's ``convertTo(..., 255. / 65535.)``, which rounds to nearest; note that
  rosbags-image truncates instead, so it can be one grey level lower);
- Bayer patterns are demosaiced with OpenCV's bilinear ``COLOR_Bayer<pattern>2RGB``.

Generic OpenCV type names are read as the ``cv_bridge.cv2_to_imgmsg(..., "passthrough")`` images
they normally come from, which are in OpenCV's BGR order: ``8UC1`` = ``mono8``, ``8UC3`` =
``bgr8``, ``8UC4`` = ``bgra8``, ``16UC1`` = ``mono16`` (cv_bridge itself refuses to colour-convert
generic types; rosbags-image passes ``8UC3`` through unchanged, i.e. reads it as RGB).

When the ``cv_bridge`` package of a ROS installation can be imported, ``image_to_rgb`` lets it do
the decoding (``backend="auto"``); otherwise, and always with ``backend="numpy"``, the numpy/OpenCV
code here does, with the same results. Messages are validated before either backend runs, so bad
input raises the same ``ImageConversionError`` on both.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np


class ImageConversionError(ValueError):
    """A message cannot be turned into an image (unknown encoding, bad size, step or data)."""


@dataclass(frozen=True)
class _Encoding:
    channels: int  # channels as stored in the message
    depth: int  # bytes per channel: 1 or 2
    to_rgb: int | None  # cv2.cvtColor code to RGB (None: already RGB)
    # What to ask cv_bridge for: "rgb8" (it converts), "passthrough" (it only unpacks, we
    # convert) or None (cv_bridge does not know the encoding; we do everything).
    bridge: str | None


# Bayer names follow the pattern of the top-left 2x2 block; OpenCV's RGGB/BGGR/... aliases of
# its older BG/RG/... codes read the same way (e.g. COLOR_BayerRGGB2RGB == COLOR_BayerBG2RGB).
_ENCODINGS: dict[str, _Encoding] = {
    "rgb8": _Encoding(3, 1, None, "rgb8"),
    "bgr8": _Encoding(3, 1, cv2.COLOR_BGR2RGB, "rgb8"),
    "rgba8": _Encoding(4, 1, cv2.COLOR_RGBA2RGB, "rgb8"),
    "bgra8": _Encoding(4, 1, cv2.COLOR_BGRA2RGB, "rgb8"),
    "mono8": _Encoding(1, 1, cv2.COLOR_GRAY2RGB, "rgb8"),
    "rgb16": _Encoding(3, 2, None, "rgb8"),
    "bgr16": _Encoding(3, 2, cv2.COLOR_BGR2RGB, "rgb8"),
    "rgba16": _Encoding(4, 2, cv2.COLOR_RGBA2RGB, "rgb8"),
    "bgra16": _Encoding(4, 2, cv2.COLOR_BGRA2RGB, "rgb8"),
    "mono16": _Encoding(1, 2, cv2.COLOR_GRAY2RGB, "rgb8"),
    "8UC1": _Encoding(1, 1, cv2.COLOR_GRAY2RGB, "passthrough"),
    "8UC3": _Encoding(3, 1, cv2.COLOR_BGR2RGB, "passthrough"),
    "8UC4": _Encoding(4, 1, cv2.COLOR_BGRA2RGB, "passthrough"),
    "16UC1": _Encoding(1, 2, cv2.COLOR_GRAY2RGB, "passthrough"),
    "yuv422": _Encoding(2, 1, cv2.COLOR_YUV2RGB_UYVY, "rgb8"),
    "uyvy": _Encoding(2, 1, cv2.COLOR_YUV2RGB_UYVY, None),
    "yuv422_yuy2": _Encoding(2, 1, cv2.COLOR_YUV2RGB_YUYV, None),
    "yuyv": _Encoding(2, 1, cv2.COLOR_YUV2RGB_YUYV, None),
    **{
        f"bayer_{pattern}{bits}": _Encoding(
            1, bits // 8, getattr(cv2, f"COLOR_Bayer{pattern.upper()}2RGB"), "rgb8"
        )
        for pattern in ("rggb", "bggr", "gbrg", "grbg")
        for bits in (8, 16)
    },
}

#: Encodings ``image_to_rgb`` accepts.
SUPPORTED_ENCODINGS: tuple[str, ...] = tuple(_ENCODINGS)


@dataclass(frozen=True)
class ImageFields:
    """Field values of a ``sensor_msgs/Image`` (everything but the header).

    ``data`` is ``height * step`` bytes, rows packed (``step == width * channels``).
    """

    height: int
    width: int
    encoding: str
    is_bigendian: int
    step: int
    data: bytes

    def as_kwargs(self, numpy_data: bool = False) -> dict[str, Any]:
        """Keyword arguments for a message constructor.

        ``numpy_data=False`` gives ``data`` as bytes (what rclpy's ``Image(...)`` takes);
        ``numpy_data=True`` as a uint8 ndarray (what rosbags' dataclasses hold).
        """
        data: Any = np.frombuffer(self.data, dtype=np.uint8) if numpy_data else self.data
        return {
            "height": self.height,
            "width": self.width,
            "encoding": self.encoding,
            "is_bigendian": self.is_bigendian,
            "step": self.step,
            "data": data,
        }


def stamp_to_seconds(stamp: Any) -> float:
    """``builtin_interfaces/Time`` (``sec``, ``nanosec``) -> float seconds."""
    return float(stamp.sec) + float(stamp.nanosec) * 1e-9


def _data_bytes(data: Any) -> np.ndarray:
    """The ``data`` field (bytes, array.array, ndarray or list of ints) as flat uint8."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).view(np.uint8).reshape(-1)
    try:
        return np.frombuffer(memoryview(data).cast("B"), dtype=np.uint8)
    except TypeError:
        return np.asarray(data, dtype=np.uint8).reshape(-1)


def _scale16to8(image: np.ndarray) -> np.ndarray:
    # round(v * 255 / 65535) in integers: 65535 is odd, so there is never an exact tie.
    return ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _checked_rows(msg: Any, encoding: str, channels: int, depth: int) -> np.ndarray:
    """Check an Image message's size fields; return its ``(H, W * channels * depth)`` uint8 rows.

    The rows are a view on the message data with any ``step`` padding cut off.
    """
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise ImageConversionError(f"{encoding} image is empty: height={height}, width={width}")
    row_bytes = width * channels * depth
    if step < row_bytes:
        raise ImageConversionError(
            f"{encoding} image step {step} is smaller than width * channels * bytes = "
            f"{width} * {channels} * {depth} = {row_bytes}"
        )
    data = _data_bytes(msg.data)
    if data.size < height * step:
        raise ImageConversionError(
            f"{encoding} image data has {data.size} bytes, fewer than height * step = "
            f"{height} * {step} = {height * step}"
        )
    return data[: height * step].reshape(height, step)[:, :row_bytes]


def _validated(msg: Any) -> tuple[_Encoding, np.ndarray]:
    """Check an Image message's fields; return its encoding and the ``(H, W, C)`` pixels.

    The pixels are a view on the message data in native byte order (a copy when swapped).
    """
    encoding = str(msg.encoding)
    info = _ENCODINGS.get(encoding)
    if info is None:
        raise ImageConversionError(
            f"unsupported image encoding {encoding!r}; supported: {', '.join(_ENCODINGS)}"
        )
    rows = _checked_rows(msg, encoding, info.channels, info.depth)
    height, width = rows.shape[0], int(msg.width)
    if info.channels == 2 and width % 2:
        raise ImageConversionError(f"{encoding} image width must be even, got {width}")
    if info.depth == 1:
        return info, rows.reshape(height, width, info.channels)
    big = bool(msg.is_bigendian)
    pixels = np.ascontiguousarray(rows).view(">u2" if big else "<u2")
    return info, pixels.astype(np.uint16).reshape(height, width, info.channels)


def _pixels_to_rgb(info: _Encoding, pixels: np.ndarray) -> np.ndarray:
    """``(H, W, C)`` pixels of an encoding -> new ``(H, W, 3)`` uint8 RGB (cv_bridge order)."""
    if info.channels == 1:
        pixels = pixels[:, :, 0]
    if info.to_rgb is not None:
        rgb = cv2.cvtColor(np.ascontiguousarray(pixels), info.to_rgb)
    else:
        rgb = np.array(pixels)  # copy: never hand out a view on the message buffer
    return _scale16to8(rgb) if rgb.dtype == np.uint16 else rgb


@functools.cache
def cv_bridge_or_none() -> Any:
    """A ``cv_bridge.CvBridge`` when the ROS package can be imported, else None (cached)."""
    try:
        from cv_bridge import CvBridge
    except ImportError:
        return None
    return CvBridge()


def conversion_backend() -> str:
    """``"cv_bridge"`` or ``"numpy"``: what ``image_to_rgb(msg)`` uses here."""
    return "numpy" if cv_bridge_or_none() is None else "cv_bridge"


def image_to_rgb(msg: Any, backend: str = "auto") -> np.ndarray:
    """Decode a ``sensor_msgs/Image`` into RGB.

    Args:
        msg: an Image message (rclpy or rosbags) in one of ``SUPPORTED_ENCODINGS``.
        backend: ``"auto"`` (cv_bridge when importable, else numpy), ``"cv_bridge"`` or
            ``"numpy"``.

    Returns:
        ``(H, W, 3)`` uint8 RGB in the camera frame, a new array that does not share memory with
        the message.

    Raises:
        ImageConversionError: unknown encoding, empty image, ``step`` too small for the width,
            data shorter than ``height * step``, odd width for YUV 4:2:2.
    """
    if backend not in ("auto", "cv_bridge", "numpy"):
        raise ValueError(f"backend must be 'auto', 'cv_bridge' or 'numpy', got {backend!r}")
    info, pixels = _validated(msg)
    bridge = cv_bridge_or_none() if backend != "numpy" else None
    if backend == "cv_bridge" and bridge is None:
        raise ImportError("backend='cv_bridge' needs the cv_bridge package of a ROS installation")
    if bridge is None or info.bridge is None:
        return _pixels_to_rgb(info, pixels)
    converted = np.asarray(bridge.imgmsg_to_cv2(msg, desired_encoding=info.bridge))
    if info.bridge == "rgb8":
        return np.array(converted, dtype=np.uint8)
    return _pixels_to_rgb(info, converted.reshape(pixels.shape))


def compressed_to_rgb(msg: Any) -> np.ndarray:
    """Decode a ``sensor_msgs/CompressedImage`` (JPEG, PNG, anything ``cv2.imdecode`` reads).

    The format string may be a bare codec (``"jpeg"``, ``"png"``) or image_transport's
    ``"<encoding>; <codec> compressed <encoding>"``; colour data is decoded as OpenCV's BGR
    (which is how image_transport stores it), grey as grey, 16-bit scaled like ``image_to_rgb``.
    ``compressedDepth`` (depth PNG with a private header) is not an image and is refused.

    Returns:
        ``(H, W, 3)`` uint8 RGB.

    Raises:
        ImageConversionError: empty data, ``compressedDepth``, or data OpenCV cannot decode.
    """
    fmt = str(msg.format)
    if "compresseddepth" in fmt.lower():
        raise ImageConversionError(f"compressed format {fmt!r} holds depth data, not an image")
    data = _data_bytes(msg.data)
    if data.size == 0:
        raise ImageConversionError(f"compressed image (format {fmt!r}) has no data")
    image = cv2.imdecode(data, cv2.IMREAD_UNCHANGED)
    if image is None:
        raise ImageConversionError(
            f"cannot decode {data.size} bytes of compressed image with format {fmt!r}"
        )
    if image.dtype not in (np.uint8, np.uint16):
        raise ImageConversionError(f"compressed image (format {fmt!r}) decoded to {image.dtype}")
    channels = 1 if image.ndim == 2 else image.shape[2]
    codes = {1: cv2.COLOR_GRAY2RGB, 3: cv2.COLOR_BGR2RGB, 4: cv2.COLOR_BGRA2RGB}
    if channels not in codes:
        raise ImageConversionError(f"compressed image (format {fmt!r}) has {channels} channels")
    rgb = cv2.cvtColor(image, codes[channels])
    return _scale16to8(rgb) if rgb.dtype == np.uint16 else rgb


def message_to_rgb(msg: Any) -> np.ndarray:
    """``compressed_to_rgb`` for messages with a ``format`` field, else ``image_to_rgb``."""
    return compressed_to_rgb(msg) if hasattr(msg, "format") else image_to_rgb(msg)


def rgb_to_image_fields(rgb: np.ndarray, encoding: str = "rgb8") -> ImageFields:
    """Pack an RGB image into ``sensor_msgs/Image`` fields.

    Args:
        rgb: ``(H, W, 3)`` uint8 RGB.
        encoding: ``"rgb8"`` (stored as is) or ``"bgr8"`` (channels swapped).

    Returns:
        ``ImageFields`` with packed rows (``step = 3 * W``), little-endian flag 0.
    """
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"rgb must be (H, W, 3) uint8, got {rgb.shape} {rgb.dtype}")
    if encoding == "bgr8":
        rgb = rgb[:, :, ::-1]
    elif encoding != "rgb8":
        raise ValueError(f"encoding must be 'rgb8' or 'bgr8', got {encoding!r}")
    h, w = rgb.shape[:2]
    return ImageFields(h, w, encoding, 0, 3 * w, np.ascontiguousarray(rgb).tobytes())


def _check_mask(mask: np.ndarray) -> np.ndarray:
    if mask.ndim != 2 or mask.dtype not in (np.uint8, np.bool_):
        raise ValueError(f"mask must be (H, W) uint8 or bool, got {mask.shape} {mask.dtype}")
    return mask.astype(np.uint8) * 255 if mask.dtype == np.bool_ else mask


def mask_to_image_fields(mask: np.ndarray) -> ImageFields:
    """Pack a mask into ``mono8`` ``sensor_msgs/Image`` fields.

    Args:
        mask: ``(H, W)`` uint8 (0/255 by convention, stored as given) or bool (True -> 255).
    """
    mask = _check_mask(mask)
    h, w = mask.shape
    return ImageFields(h, w, "mono8", 0, w, np.ascontiguousarray(mask).tobytes())


#: ``CompressedImage.format`` of a mask, as image_transport's png publisher writes a mono8 image.
MASK_PNG_FORMAT = "mono8; png compressed "


def mask_to_compressed_png(mask: np.ndarray) -> tuple[str, bytes]:
    """Encode a mask as a lossless grey PNG for a ``sensor_msgs/CompressedImage``.

    Masks are never JPEG-compressed: JPEG would blur the 0/255 edge into other values.

    Args:
        mask: ``(H, W)`` uint8 or bool, as for ``mask_to_image_fields``.

    Returns:
        ``(format, data)``: ``MASK_PNG_FORMAT`` and the PNG bytes.
    """
    ok, buf = cv2.imencode(".png", np.ascontiguousarray(_check_mask(mask)))
    if not ok:  # pragma: no cover - OpenCV fails here only when out of memory
        raise RuntimeError("cv2.imencode failed to write a PNG mask")
    return MASK_PNG_FORMAT, buf.tobytes()


# ----------------------------------------------------------------------------- depth images

#: Depth encodings ``image_to_depth`` accepts -> (numpy little-endian dtype, units per metre).
#: ``16UC1``/``mono16`` hold millimetres (REP 118; RealSense, ZED and OAK drivers publish
#: ``16UC1``), ``32FC1`` holds metres.
_DEPTH_ENCODINGS: dict[str, tuple[str, int]] = {
    "16UC1": ("<u2", 1000),
    "mono16": ("<u2", 1000),
    "32FC1": ("<f4", 1),
}

#: Encodings ``image_to_depth`` accepts.
DEPTH_ENCODINGS: tuple[str, ...] = tuple(_DEPTH_ENCODINGS)


def image_to_depth(msg: Any) -> np.ndarray:
    """Decode a depth ``sensor_msgs/Image`` into metres.

    Rows are ``step`` bytes apart (padding ignored) and ``is_bigendian`` is honoured, as in
    ``image_to_rgb``. Pixels without a measurement read as NaN: 0 in ``16UC1``/``mono16``
    (REP 118's "no return"), and 0, negative, NaN or infinite values in ``32FC1``.

    Args:
        msg: an Image message (rclpy or rosbags) in one of ``DEPTH_ENCODINGS``.

    Returns:
        ``(H, W)`` float32 depth in metres along the camera's optical axis (z), a new array.

    Raises:
        ImageConversionError: an encoding that is not a depth encoding (named in the message),
            an empty image, ``step`` too small for the width, data shorter than ``height * step``.
    """
    encoding = str(msg.encoding)
    if encoding not in _DEPTH_ENCODINGS:
        raise ImageConversionError(
            f"image encoding {encoding!r} is not a depth encoding; expected one of "
            f"{', '.join(DEPTH_ENCODINGS)} (millimetres as 16-bit integers, or float metres)"
        )
    dtype, units_per_metre = _DEPTH_ENCODINGS[encoding]
    item = np.dtype(dtype)
    rows = _checked_rows(msg, encoding, 1, item.itemsize)
    if msg.is_bigendian:
        item = item.newbyteorder(">")
    values = np.ascontiguousarray(rows).view(item).reshape(rows.shape[0], int(msg.width))
    if units_per_metre == 1:
        depth = values.astype(np.float32)  # a new native-order array
    else:  # millimetres: divide in float64 so that every value is the nearest float32
        depth = (values / units_per_metre).astype(np.float32)
    depth[~(np.isfinite(depth) & (depth > 0))] = np.nan
    return depth


def depth_to_image_fields(
    depth_m: np.ndarray, encoding: str = "16UC1", big_endian: bool = False
) -> ImageFields:
    """Pack a depth image into ``sensor_msgs/Image`` fields (the inverse of ``image_to_depth``).

    Args:
        depth_m: ``(H, W)`` float depth in metres; NaN, infinite and non-positive values are
            "no measurement".
        encoding: ``"16UC1"``/``"mono16"`` (rounded to whole millimetres; no measurement and
            depths beyond 65.535 m -> 0) or ``"32FC1"`` (metres; no measurement -> NaN).
        big_endian: store the values big-endian (``is_bigendian = 1``).

    Returns:
        ``ImageFields`` with packed rows (``step = W * bytes per value``).
    """
    depth_m = np.asarray(depth_m)
    if depth_m.ndim != 2 or depth_m.dtype.kind != "f":
        raise ValueError(
            f"depth_m must be (H, W) float metres, got {depth_m.shape} {depth_m.dtype}"
        )
    if encoding not in _DEPTH_ENCODINGS:
        raise ValueError(f"encoding must be one of {', '.join(DEPTH_ENCODINGS)}, got {encoding!r}")
    dtype, units_per_metre = _DEPTH_ENCODINGS[encoding]
    item = np.dtype(dtype).newbyteorder(">" if big_endian else "<")
    valid = np.isfinite(depth_m) & (depth_m > 0)
    if item.kind == "u":
        units = np.where(valid, np.round(depth_m.astype(np.float64) * units_per_metre), 0)
        values = np.where(units <= np.iinfo(item).max, units, 0).astype(item)
    else:
        values = np.where(valid, depth_m, np.nan).astype(item)
    h, w = depth_m.shape
    return ImageFields(h, w, encoding, int(big_endian), w * item.itemsize, values.tobytes())


# ----------------------------------------------------------------------------- point clouds

#: ``sensor_msgs/PointField.FLOAT32``.
POINT_FIELD_FLOAT32 = 7


@dataclass(frozen=True)
class PointFieldSpec:
    """Field values of one ``sensor_msgs/PointField``."""

    name: str
    offset: int
    datatype: int
    count: int

    def as_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for a ``PointField`` constructor."""
        return {
            "name": self.name,
            "offset": self.offset,
            "datatype": self.datatype,
            "count": self.count,
        }


@dataclass(frozen=True)
class CloudFields:
    """Field values of an unorganised ``sensor_msgs/PointCloud2`` (everything but the header).

    ``fields`` are ``PointFieldSpec``s: build ``PointField(**spec.as_kwargs())`` for each.
    """

    height: int
    width: int
    fields: tuple[PointFieldSpec, ...]
    is_bigendian: bool
    point_step: int
    row_step: int
    data: bytes
    is_dense: bool

    def as_kwargs(self, point_field: Any, numpy_data: bool = False) -> dict[str, Any]:
        """Keyword arguments for a ``PointCloud2`` constructor.

        Args:
            point_field: the ``PointField`` message class to build ``fields`` with.
            numpy_data: ``data`` as a uint8 ndarray (rosbags) instead of bytes (rclpy).
        """
        data: Any = np.frombuffer(self.data, dtype=np.uint8) if numpy_data else self.data
        return {
            "height": self.height,
            "width": self.width,
            "fields": [point_field(**spec.as_kwargs()) for spec in self.fields],
            "is_bigendian": self.is_bigendian,
            "point_step": self.point_step,
            "row_step": self.row_step,
            "data": data,
            "is_dense": self.is_dense,
        }


#: The ``x``, ``y``, ``z`` FLOAT32 layout ``points_to_cloud_fields`` writes.
XYZ_FIELDS: tuple[PointFieldSpec, ...] = tuple(
    PointFieldSpec(name, 4 * i, POINT_FIELD_FLOAT32, 1) for i, name in enumerate("xyz")
)


def points_to_cloud_fields(points: np.ndarray) -> CloudFields:
    """Pack 3-D points into ``sensor_msgs/PointCloud2`` fields (no ROS helpers needed).

    Args:
        points: ``(N, 3)`` float x, y, z in metres, in the frame the message's header will name
            (for targets: the depth image's optical frame). ``N`` may be 0.

    Returns:
        ``CloudFields``: one row (``height = 1``, ``width = N``), fields ``x``, ``y``, ``z``
        FLOAT32 at offsets 0, 4, 8, ``point_step = 12``, ``row_step = 12 * N``, little-endian
        data, ``is_dense`` True when every value is finite.
    """
    points = np.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3 or points.dtype.kind not in "fiu":
        raise ValueError(f"points must be (N, 3) float, got {points.shape} {points.dtype}")
    values = np.ascontiguousarray(points, dtype="<f4")
    n = values.shape[0]
    return CloudFields(
        height=1,
        width=n,
        fields=XYZ_FIELDS,
        is_bigendian=False,
        point_step=12,
        row_step=12 * n,
        data=values.tobytes(),
        is_dense=bool(np.isfinite(values).all()),
    )
