"""What reading and writing rosbag2 files with ``rosbags`` share: the message type names and
storages the replay knows, the bag time unit, opening a writer, and ``Header``/``Image`` messages
built in a rosbags typestore. Used by the replay's input and output and by ``lisa_ros.demo_bag``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rosbags.rosbag2 import CompressionFormat, CompressionMode, StoragePlugin, Writer
from rosbags.typesys.store import Typestore

from lisa_ros.conversion import ImageFields

IMAGE_TYPE = "sensor_msgs/msg/Image"
COMPRESSED_TYPE = "sensor_msgs/msg/CompressedImage"
IMAGE_TYPES = (IMAGE_TYPE, COMPRESSED_TYPE)
STRING_TYPE = "std_msgs/msg/String"
HEADER_TYPE = "std_msgs/msg/Header"
TIME_TYPE = "builtin_interfaces/msg/Time"
#: rosbag2 storage plugins: ``.db3`` files and ``.mcap`` files.
STORAGES = ("sqlite3", "mcap")
#: Nanoseconds per second; bag times are integer nanoseconds since the Unix epoch.
NS = 1_000_000_000


def open_writer(path: str | Path, storage: str, *, compress: bool = False) -> Writer:
    """A rosbag2 (version 9) writer for a new bag directory ``path``; call ``open`` (or use it as
    a context manager) to create it.

    Args:
        path: the bag directory to create.
        storage: one of ``STORAGES``.
        compress: zstd compression, per message for sqlite3 and per chunk for MCAP (the modes
            ``ros2 bag`` and ``rosbags`` both read).
    """
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    writer = Writer(path, version=9, storage_plugin=plugin)
    if compress:
        mode = CompressionMode.STORAGE if storage == "mcap" else CompressionMode.MESSAGE
        writer.set_compression(mode, CompressionFormat.ZSTD)
    return writer


def header_msg(ts: Typestore, sec: int, nanosec: int, frame_id: str) -> Any:
    """A ``std_msgs/Header`` of ``ts`` with stamp ``sec``/``nanosec`` and ``frame_id``."""
    stamp = ts.types[TIME_TYPE](sec=int(sec), nanosec=int(nanosec))
    return ts.types[HEADER_TYPE](stamp=stamp, frame_id=str(frame_id))


def copy_header(ts: Typestore, header: Any) -> Any:
    """``header`` (any message with ``stamp.sec``, ``stamp.nanosec``, ``frame_id``, e.g. one
    deserialised with another typestore) as a ``std_msgs/Header`` of ``ts``; None gives the
    empty header (stamp 0, no frame_id)."""
    if header is None:
        return header_msg(ts, 0, 0, "")
    return header_msg(ts, header.stamp.sec, header.stamp.nanosec, header.frame_id)


def image_msg(ts: Typestore, header: Any, fields: ImageFields) -> Any:
    """A ``sensor_msgs/Image`` of ``ts`` with ``header`` and the pixels of ``fields``."""
    return ts.types[IMAGE_TYPE](header=header, **fields.as_kwargs(numpy_data=True))
