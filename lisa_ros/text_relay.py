"""``text_relay``: forward one text field of any message as ``std_msgs/String`` (e.g. commands).

A speech recogniser that publishes ``std_msgs/String`` needs no relay (remap its topic onto the
node's ``command``). One that publishes its own type, such as whisper_ros's
``whisper_msgs/msg/Transcription`` (field ``text``), is relayed::

    ros2 run lisa_ros text_relay --ros-args -p input_type:=whisper_msgs/msg/Transcription \\
        -p field:=text -r input:=/whisper/transcription -r output:=/lisa/command

Parameters: ``input_type`` (``package/msg/Type``), ``field`` (a field name, or a dotted path
into nested messages), ``min_chars`` (shorter texts, after stripping, are not forwarded: a
recogniser's empty or one-letter results). Topics: subscribes ``input``, publishes ``output``
(both reliable, depth 10). A type or field that does not exist stops the relay at start with one
error line naming it.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Sequence
from typing import Any

NODE_NAME = "text_relay"


class RelayError(ValueError):
    """A parameter the relay cannot use (the message names it)."""


def message_class(type_name: str) -> type:
    """The message class of ``package/msg/Type`` (also ``package/Type``)."""
    parts = type_name.strip().split("/")
    if len(parts) == 2:
        parts = [parts[0], "msg", parts[1]]
    if len(parts) != 3 or not all(parts):
        raise RelayError(f"input_type {type_name!r}: expected package/msg/Type")
    package, kind, name = parts
    try:
        return getattr(importlib.import_module(f"{package}.{kind}"), name)
    except (ImportError, AttributeError):
        raise RelayError(
            f"input_type {type_name!r}: not found (is the package built and sourced?)"
        ) from None


def field_getter(cls: type, path: str) -> Any:
    """A function that reads the string at ``path`` (``text``, ``result.text``) of a ``cls``
    message; :class:`RelayError` naming the field when the type has no such string field."""
    names = [n for n in path.strip().split(".") if n]
    if not names:
        raise RelayError("field is empty: expected the name of a string field, e.g. text")
    current = cls
    for i, name in enumerate(names):
        types = current.get_fields_and_field_types()
        if name not in types:
            where = ".".join(names[:i]) or cls.__name__
            raise RelayError(
                f"field {path!r}: {where} has no field {name!r} (it has {', '.join(types)})"
            )
        kind = types[name]
        if i == len(names) - 1:
            if kind not in ("string", "wstring") and not kind.startswith("string<"):
                raise RelayError(f"field {path!r}: {name} is a {kind}, not a string")
        else:
            current = type(getattr(current(), name))

    def get(msg: Any) -> str:
        for name in names:
            msg = getattr(msg, name)
        return str(msg)

    return get


def make_node(**kwargs: Any) -> Any:
    """The relay node (``kwargs`` go to ``rclpy.node.Node``)."""
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from std_msgs.msg import String

    node = Node(NODE_NAME, **kwargs)
    input_type = node.declare_parameter("input_type", "std_msgs/msg/String").value
    field = node.declare_parameter("field", "data").value
    min_chars = node.declare_parameter("min_chars", 2).value
    cls = message_class(input_type)
    get = field_getter(cls, field)
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    pub = node.create_publisher(String, "output", qos)

    def relay(msg: Any) -> None:
        text = get(msg).strip()
        if len(text) >= min_chars:
            pub.publish(String(data=text))

    node.create_subscription(cls, "input", relay, qos)
    node.get_logger().info(
        f"relaying {input_type}.{field} from {node.resolve_topic_name('input')} to "
        f"{node.resolve_topic_name('output')}"
    )
    return node


def main(argv: Sequence[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException

    rclpy.init(args=argv)
    node = None
    try:
        node = make_node()
        rclpy.spin(node)
    except RelayError as exc:
        print(f"text_relay: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
