"""The input bag: opening a rosbag2 bag, choosing its image and command topics, deserialising with
the definitions embedded in the bag, and reading messages in bag time order."""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rosbags.interfaces import Connection, MessageDefinitionFormat
from rosbags.rosbag2 import Reader, ReaderError
from rosbags.typesys import Stores, get_types_from_idl, get_types_from_msg, get_typestore
from rosbags.typesys.store import Typestore

from lisa_ros.replay.bags import IMAGE_TYPE, IMAGE_TYPES, STRING_TYPE
from lisa_ros.replay.errors import ReplayError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TopicSelection:
    """Which topics of a bag the replay reads: the image topic and its type, the command topic
    (None when commands come only from a file)."""

    image_topic: str
    image_type: str
    command_topic: str | None


def _bag_error(path: Path, exc: BaseException) -> ReplayError:
    return ReplayError(f"{path}: cannot be read as a ROS 2 bag ({type(exc).__name__}: {exc})")


def _embedded_types(conn: Connection) -> dict[str, Any]:
    """Message types defined by a connection's embedded definition ({} when it has none)."""
    msgdef = conn.msgdef
    if msgdef.format == MessageDefinitionFormat.MSG and msgdef.data:
        return dict(get_types_from_msg(msgdef.data, conn.msgtype))
    if msgdef.format == MessageDefinitionFormat.IDL and msgdef.data:
        separator = "=" * 80 + "\n"
        if not msgdef.data.startswith(separator + "IDL: "):
            return dict(get_types_from_idl(msgdef.data))
        types: dict[str, Any] = {}
        for block in msgdef.data.split(separator)[1:]:
            types.update(get_types_from_idl(block.split("\n", 1)[1]))
        return types
    return {}


class InputBag:
    """A ROS 2 bag opened for replay (use as a context manager, or call ``close``).

    Attributes:
        path: the bag directory or storage file.
        storage: ``"sqlite3"`` or ``"mcap"``.
        topics: ``{topic: message type}`` (``"<mixed>"`` when connections disagree).
        counts: ``{topic: message count}``.
        start_ns: bag time of the first message (ns since the epoch).
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if not path.exists():
            raise ReplayError(f"{path}: no such bag (expected a rosbag2 directory or .db3/.mcap)")
        if path.is_dir():
            if not (path / "metadata.yaml").is_file():
                files = sorted(p.name for p in path.iterdir() if p.suffix in (".db3", ".mcap"))
                hint = f"; to read a storage file alone, pass {path / files[0]}" if files else ""
                raise ReplayError(f"{path}: not a ROS 2 bag: no metadata.yaml in it{hint}")
            storage = "mcap" if any(path.glob("*.mcap")) else "sqlite3"
        elif path.suffix in (".db3", ".mcap"):
            storage = "mcap" if path.suffix == ".mcap" else "sqlite3"
        else:
            raise ReplayError(
                f"{path}: not a ROS 2 bag (expected a directory with metadata.yaml, or a .db3 or "
                f".mcap file)"
            )
        try:
            self._reader = Reader(path)
            self._reader.open()
        except (ReaderError, OSError, sqlite3.Error, ValueError, KeyError) as exc:
            raise _bag_error(path, exc) from None
        self.path, self.storage = path, storage
        self.connections: list[Connection] = list(self._reader.connections)
        self.topics: dict[str, str] = {}
        self.counts: dict[str, int] = {}
        for conn in self.connections:
            known = self.topics.setdefault(conn.topic, conn.msgtype)
            if known != conn.msgtype:
                self.topics[conn.topic] = "<mixed>"
            self.counts[conn.topic] = self.counts.get(conn.topic, 0) + conn.msgcount
        self.start_ns = int(self._reader.start_time)
        self.message_count = int(self._reader.message_count)

    def __enter__(self) -> InputBag:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._reader.is_open:
            self._reader.close()

    def describe_topics(self) -> str:
        """``"/a (sensor_msgs/msg/Image, 15 msgs), ..."`` for error messages."""
        if not self.topics:
            return "(none)"
        return ", ".join(
            f"{t} ({ty}, {self.counts[t]} msgs)" for t, ty in sorted(self.topics.items())
        )

    def select(
        self,
        image_topic: str | None = None,
        command_topic: str | None = None,
        bag_commands: bool = True,
        need_commands: bool = True,
    ) -> TopicSelection:
        """Choose the image and command topics (found as the ``lisa_ros.replay`` docstring says).

        Args:
            image_topic: the image topic; None to find it.
            command_topic: the command topic; None to find it (if ``bag_commands``).
            bag_commands: read commands from the bag at all.
            need_commands: raise when no command topic is found (there is no commands file).

        Raises:
            ReplayError: a named topic is missing or has the wrong type (listing the bag's
                topics), or the choice is ambiguous or impossible.
        """
        where = f"{self.path}"
        if image_topic is not None:
            image_topic = self._check_topic(image_topic, IMAGE_TYPES, "--image-topic")
        else:
            images = sorted(t for t, ty in self.topics.items() if ty in IMAGE_TYPES)
            if not images:
                raise ReplayError(
                    f"{where}: no sensor_msgs/Image or CompressedImage topic; topics: "
                    f"{self.describe_topics()}"
                )
            raw = [t for t in images if self.topics[t] == IMAGE_TYPE]
            if len(images) == 1:
                image_topic = images[0]
            elif len(raw) == 1 and all(t == raw[0] or t.startswith(raw[0] + "/") for t in images):
                image_topic = raw[0]  # one camera: the raw topic and its image_transport copies
            else:
                listed = ", ".join(f"{t} ({self.topics[t]})" for t in images)
                raise ReplayError(
                    f"{where}: several image topics, choose one with --image-topic: {listed}"
                )
        if self.counts.get(image_topic, 0) == 0:
            raise ReplayError(f"{where}: image topic {image_topic} has no messages")

        if command_topic is not None:
            command_topic = self._check_topic(command_topic, (STRING_TYPE,), "--command-topic")
        elif not bag_commands and need_commands:
            raise ReplayError("no commands: --no-bag-commands needs --commands FILE")
        elif bag_commands:
            strings = sorted(t for t, ty in self.topics.items() if ty == STRING_TYPE)
            named = [t for t in strings if t == "command" or t.endswith("/command")]
            if len(named) > 1:
                raise ReplayError(
                    f"{where}: several command topics, choose one with --command-topic: "
                    f"{', '.join(named)}"
                )
            command_topic = named[0] if named else None
            if command_topic is None and need_commands:
                listed = ", ".join(strings) if strings else "none"
                raise ReplayError(
                    f"{where}: no std_msgs/String topic named 'command' or '.../command' "
                    f"(String topics: {listed}); pass --command-topic TOPIC or --commands FILE"
                )
        return TopicSelection(image_topic, self.topics[image_topic], command_topic)

    def _check_topic(self, topic: str, types: tuple[str, ...], option: str) -> str:
        if topic not in self.topics:
            raise ReplayError(
                f"{option} {topic}: no such topic in {self.path}; topics: {self.describe_topics()}"
            )
        if self.topics[topic] not in types:
            raise ReplayError(
                f"{option} {topic}: has type {self.topics[topic]}, expected {' or '.join(types)}"
            )
        return topic

    def typestore(self, topics: Iterable[str]) -> Typestore:
        """A typestore for deserialising ``topics``: the bag's embedded definitions where it has
        them (the data was written with those), the ROS 2 Humble definitions for the rest."""
        types: dict[str, Any] = dict(get_typestore(Stores.ROS2_HUMBLE).fielddefs)
        wanted = set(topics)
        for conn in self.connections:
            if conn.topic not in wanted:
                continue
            try:
                types.update(_embedded_types(conn))
            except Exception as exc:  # noqa: BLE001 - any parser error: use the defaults
                log.warning(
                    "%s: cannot parse the embedded definition of %s (%s); using ROS 2 Humble's",
                    self.path,
                    conn.msgtype,
                    exc,
                )
        store = get_typestore(Stores.EMPTY)
        store.register({k: v for k, v in types.items() if k not in store.fielddefs})
        return store

    def messages(
        self, topics: Iterable[str] | None = None
    ) -> Iterator[tuple[Connection, int, bytes]]:
        """``(connection, bag time ns, raw CDR bytes)`` of ``topics`` (None: all) in time order."""
        wanted = None if topics is None else set(topics)
        conns = [c for c in self.connections if wanted is None or c.topic in wanted]
        if not conns:
            return
        try:
            yield from self._reader.messages(connections=conns)
        except (ReaderError, sqlite3.Error) as exc:
            raise ReplayError(
                f"{self.path}: bag is corrupt ({type(exc).__name__}: {exc})"
            ) from None
