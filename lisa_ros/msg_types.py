"""The ``lisa_msgs`` message types for rosbags, built from their ``.msg`` definitions.

Bag writers (``lisa-replay``) need ``lisa_msgs/msg/Segmentation`` without the compiled ROS
package: rosbags makes the types from the definition text, in the CDR layout rclpy uses (each
reads the other's bytes) and with the type hash (RIHS01) that rosidl generates. The definitions
are read from the first of

1. the installed package's share directory found through the ament index (``AMENT_PREFIX_PATH``,
   set by a sourced ROS workspace);
2. ``<this Python's prefix>/share/lisa_msgs/msg``, where ``make venv`` installs it;
3. ``lisa_msgs/msg`` of the source checkout this module lives in.

Usage::

    store = get_typestore(Stores.ROS2_HUMBLE)
    register_lisa_msgs(store)
    conn = writer.add_connection("/lisa/segmentation", SEGMENTATION, typestore=store)
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from rosbags.typesys import get_types_from_msg
from rosbags.typesys.store import Typestore

PACKAGE = "lisa_msgs"
SEGMENTATION = f"{PACKAGE}/msg/Segmentation"
TARGET = f"{PACKAGE}/msg/Target"
MESSAGES = ("Segmentation", "Target")  # the .msg files every definitions directory has


def _ament_share() -> Path | None:
    try:
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory(PACKAGE))
    except (ImportError, LookupError, OSError):  # no ament_index, not found, no prefix path
        return None


def msg_candidates() -> list[Path]:
    """The directories searched for the definitions, in order."""
    share = _ament_share()
    candidates = [share / "msg"] if share is not None else []
    candidates.append(Path(sys.prefix) / "share" / PACKAGE / "msg")
    candidates.append(Path(__file__).resolve().parents[1] / PACKAGE / "msg")
    return candidates


def find_msg_dir() -> Path:
    """The first directory holding all of ``MESSAGES`` (see the module docstring)."""
    candidates = msg_candidates()
    for directory in candidates:
        if all((directory / f"{name}.msg").is_file() for name in MESSAGES):
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise FileNotFoundError(
        f"no {PACKAGE} message definitions found (looked in {looked}); install lisa_msgs "
        "(make venv, or colcon build) or run from the lisa_ros source checkout"
    )


def lisa_msgs_types(directory: Path | None = None) -> dict[str, Any]:
    """rosbags type definitions of every ``<directory>/*.msg`` (default: ``find_msg_dir()``),
    keyed by ``lisa_msgs/msg/<Name>``."""
    directory = directory or find_msg_dir()
    types: dict[str, Any] = {}
    for path in sorted(directory.glob("*.msg")):
        types.update(get_types_from_msg(path.read_text(), f"{PACKAGE}/msg/{path.stem}"))
    missing = [name for name in MESSAGES if f"{PACKAGE}/msg/{name}" not in types]
    if missing:
        raise FileNotFoundError(f"{directory}: no {', '.join(f'{n}.msg' for n in missing)}")
    return types


def register_lisa_msgs(typestore: Typestore, directory: Path | None = None) -> Typestore:
    """Add the lisa_msgs messages to ``typestore`` (a ROS 2 store: they use std_msgs,
    sensor_msgs and geometry_msgs); returns it."""
    typestore.register(lisa_msgs_types(directory))
    return typestore
