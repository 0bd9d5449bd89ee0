"""The output bag: which topics the replay writes and with which message types (declared once, in
``OUTPUT_TOPICS``), the writer that turns outcomes into those messages and copies input
connections, and the ``<out>.partial`` staging directory that keeps a failed run from looking
finished."""

from __future__ import annotations

import logging
import sys
from collections import Counter
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
from rosbags.interfaces import Connection, MessageDefinitionFormat
from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore
from rosbags.typesys.store import Typestore

from lisa_ros.conversion import mask_to_compressed_png, mask_to_image_fields, rgb_to_image_fields
from lisa_ros.msg_types import SEGMENTATION, register_lisa_msgs
from lisa_ros.pipeline import Success, success_text
from lisa_ros.replay.bags import (
    COMPRESSED_TYPE,
    IMAGE_TYPE,
    NS,
    STRING_TYPE,
    copy_header,
    header_msg,
    image_msg,
)
from lisa_ros.replay.driver import InputMessage
from lisa_ros.replay.errors import ReplayError
from lisa_ros.results import ResultInfo, describe, segmentation_message

log = logging.getLogger(__name__)

#: ``(typestore, header, success, info) -> message`` of one output topic (None: nothing to
#: write); ``info`` is the typed result of the success.
MessageBuilder = Callable[[Typestore, Any, Success, ResultInfo], Any]


class RosbagsKit:
    """:class:`~lisa_ros.results.MessageKit` over a rosbags typestore."""

    def __init__(self, ts: Typestore) -> None:
        self.ts = ts

    def new(self, type_name: str, **fields: Any) -> Any:
        return self.ts.types[type_name](**fields)

    def uint8_data(self, data: np.ndarray) -> Any:
        return np.ascontiguousarray(data, dtype=np.uint8).reshape(-1)


def _mask(ts: Typestore, header: Any, success: Success, info: ResultInfo) -> Any:
    return image_msg(ts, header, mask_to_image_fields(success.mask))


def _mask_png(ts: Typestore, header: Any, success: Success, info: ResultInfo) -> Any:
    fmt, png = mask_to_compressed_png(success.mask)
    data = np.frombuffer(png, dtype=np.uint8)
    return ts.types[COMPRESSED_TYPE](header=header, format=fmt, data=data)


def _explanation(ts: Typestore, header: Any, success: Success, info: ResultInfo) -> Any:
    return ts.types[STRING_TYPE](data=success_text(success))


def _segmentation(ts: Typestore, header: Any, success: Success, info: ResultInfo) -> Any:
    return segmentation_message(info, RosbagsKit(ts), header)


def _overlay(ts: Typestore, header: Any, success: Success, info: ResultInfo) -> Any:
    if success.overlay is None:
        return None
    return image_msg(ts, header, rgb_to_image_fields(success.overlay))


@dataclass(frozen=True)
class OutputTopic:
    """One topic of the output bag.

    Attributes:
        key: the name the code and ``output_topics`` use for it.
        name: the topic below ``--topic-prefix`` (``"mask"`` -> ``<prefix>/mask``).
        msgtype: its message type; one of ROS 2 Humble's or of lisa_msgs.
        build: its message for a successful command (header = the source frame's).
    """

    key: str
    name: str
    msgtype: str
    build: MessageBuilder


#: Every output topic, in the order its connection is added to the bag and its message written
#: for a successful command (as the node publishes them: pictures first, the typed result last).
OUTPUT_TOPICS: tuple[OutputTopic, ...] = (
    OutputTopic("mask", "mask", IMAGE_TYPE, _mask),
    OutputTopic("mask_png", "mask/compressed", COMPRESSED_TYPE, _mask_png),
    OutputTopic("overlay", "overlay", IMAGE_TYPE, _overlay),
    OutputTopic("explanation", "explanation", STRING_TYPE, _explanation),
    OutputTopic("segmentation", "segmentation", SEGMENTATION, _segmentation),
)


def output_typestore() -> Typestore:
    """A new typestore with ROS 2 Humble's types and lisa_msgs' (the bag embeds their
    definitions, .db3 and .mcap alike)."""
    return register_lisa_msgs(get_typestore(Stores.ROS2_HUMBLE))


def output_topics(prefix: str, skip: Collection[str] = ()) -> dict[str, str]:
    """``{key: topic}`` of ``OUTPUT_TOPICS`` below ``prefix`` (``{"mask": "<prefix>/mask",
    "mask_png": "<prefix>/mask/compressed", ...}``), leaving out the keys in ``skip``."""
    unknown = set(skip) - {t.key for t in OUTPUT_TOPICS}
    if unknown:
        raise ValueError(f"unknown output topics {sorted(unknown)}")
    prefix = "/" + prefix.strip("/") if prefix.strip("/") else ""
    return {t.key: f"{prefix}/{t.name}" for t in OUTPUT_TOPICS if t.key not in skip}


class OutputBag:
    """The output topics (and copies of input connections) of a bag being written.

    Attributes:
        topics: ``{key: topic}`` written (see ``output_topics``).
        written: messages written per topic (copied input topics included).
    """

    def __init__(self, writer: Writer, prefix: str, skip: Collection[str] = ()) -> None:
        """Add the connections of ``OUTPUT_TOPICS`` (but ``skip``) to the open ``writer``."""
        for key in ("explanation", "segmentation"):
            if key in skip:
                raise ValueError(f"the {key} topic cannot be left out: failures are told there")
        self.writer = writer
        self.ts = output_typestore()
        self.topics = output_topics(prefix, skip)
        self._outputs = {t.key: t for t in OUTPUT_TOPICS if t.key in self.topics}
        self.conns = {
            key: writer.add_connection(self.topics[key], t.msgtype, typestore=self.ts)
            for key, t in self._outputs.items()
        }
        self.copies: dict[int, Connection | None] = {}
        self.written: Counter[str] = Counter()

    def _write(self, output: OutputTopic, t_ns: int, msg: Any) -> None:
        self.writer.write(self.conns[output.key], t_ns, self.ts.serialize_cdr(msg, output.msgtype))
        self.written[self.topics[output.key]] += 1

    def explain(self, t_ns: int, text: str) -> None:
        """Write ``text`` on the explanation topic at bag time ``t_ns``."""
        self._write(self._outputs["explanation"], t_ns, self.ts.types[STRING_TYPE](data=text))

    def publish(self, t_ns: int, success: Success) -> None:
        """Write a successful command's messages at bag time ``t_ns``, headers copied from the
        source frame."""
        header = copy_header(self.ts, success.frame.header)
        info = describe(success, latency=t_ns / NS - success.command.received)
        for output in self._outputs.values():
            msg = output.build(self.ts, header, success, info)
            if msg is not None:
                self._write(output, t_ns, msg)

    def answer(self, t_ns: int, info: ResultInfo, text: str) -> None:
        """Write a command's answer that has no pictures (a failure, the stop command): its
        text on the explanation topic and its typed result, at bag time ``t_ns`` (header: the
        source frame's, else stamped ``t_ns``)."""
        if info.header is not None:
            header = copy_header(self.ts, info.header)
        else:
            header = header_msg(self.ts, *divmod(t_ns, NS), "")
        self.explain(t_ns, text)
        msg = segmentation_message(info, RosbagsKit(self.ts), header)
        self._write(self._outputs["segmentation"], t_ns, msg)

    def copy(self, message: InputMessage, store_for_defs: Typestore) -> None:
        """Copy an input message byte for byte, with its topic, type, definition and QoS."""
        conn = message.connection
        if conn.id not in self.copies:
            self.copies[conn.id] = self._copy_connection(conn, store_for_defs)
        target = self.copies[conn.id]
        if target is not None:
            self.writer.write(target, message.time_ns, message.raw)
            self.written[conn.topic] += 1

    def _copy_connection(self, conn: Connection, store: Typestore) -> Connection | None:
        for existing in self.writer.connections:  # several connections may share a topic
            if (existing.topic, existing.msgtype, existing.ext) == (
                conn.topic,
                conn.msgtype,
                conn.ext,
            ):
                return existing
        msgdef, digest = conn.msgdef.data, conn.digest
        if conn.msgdef.format == MessageDefinitionFormat.NONE or not msgdef or not digest:
            try:
                msgdef, _ = store.generate_msgdef(conn.msgtype, ros_version=2)
                digest = store.hash_rihs01(conn.msgtype)
            except Exception:  # noqa: BLE001 - unknown type: it cannot be described
                log.warning(
                    "--copy-input: not copying %s: the bag has no definition of %s",
                    conn.topic,
                    conn.msgtype,
                )
                return None
        return self.writer.add_connection(
            conn.topic,
            conn.msgtype,
            msgdef=msgdef,
            rihs01=digest,
            serialization_format=conn.ext.serialization_format,
            offered_qos_profiles=conn.ext.offered_qos_profiles,
        )


# ------------------------------------------------------------------- <out>.partial staging


@dataclass
class Position:
    """How far a replay got: input messages read and the bag time of the last one."""

    messages: int = 0
    time_ns: int | None = None


def check_output_paths(out: Path, overlays_dir: Path | None) -> Path:
    """Refuse existing outputs; return the staging directory ``<out>.partial``."""
    partial = out.with_name(out.name + ".partial")
    if out.exists():
        raise ReplayError(f"--out {out}: exists; lisa-replay never writes over an existing path")
    if partial.exists():
        raise ReplayError(
            f"--out {out}: {partial} exists (left by an earlier run that did not finish, or one "
            f"still running); remove it first"
        )
    if (
        overlays_dir is not None
        and overlays_dir.exists()
        and (not overlays_dir.is_dir() or any(overlays_dir.iterdir()))
    ):
        raise ReplayError(f"--overlays {overlays_dir}: exists and is not an empty directory")
    return partial


def mark_partial(
    partial: Path, exc: BaseException, position: Position, total: int, start_ns: int
) -> None:
    """Write ``PARTIAL.txt`` into the staging directory (never raises)."""
    if isinstance(exc, KeyboardInterrupt):
        why = "interrupted (Ctrl-C)"
    elif isinstance(exc, SystemExit):
        why = f"stopped by a signal (exit status {exc.code})"
    else:
        lines = str(exc).strip().splitlines()
        why = f"{type(exc).__name__}: {lines[0] if lines else ''}"
    at = position.time_ns
    where = f" at bag time {(at - start_ns) / NS:.2f} s" if at is not None else ""
    text = (
        "This replay output is INCOMPLETE; do not use it as a result.\n"
        f"reason: {why}\n"
        f"stopped after {position.messages} of {total} input messages{where}\n"
        f"when: {datetime.now(timezone.utc).isoformat(timespec='seconds')}\n"
        f"command: {' '.join(sys.argv)}\n"
        "The bag below may lack its metadata.yaml; delete this directory before running "
        "lisa-replay again with the same --out.\n"
    )
    try:
        partial.mkdir(parents=True, exist_ok=True)
        (partial / "PARTIAL.txt").write_text(text, encoding="utf-8")
    except OSError as err:  # pragma: no cover - e.g. the disk is full
        log.error("could not write %s: %s", partial / "PARTIAL.txt", err)
