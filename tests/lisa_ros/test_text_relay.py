"""text_relay: a speech recogniser's own message type into lisa_node's ``command`` (a whisper_ros
style ``Transcription.text`` is played here by ``rcl_interfaces/msg/Log.msg``, a message with a
string field that is installed here)."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest
import rclpy
from rcl_interfaces.msg import Log
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import String

from lisa_ros.text_relay import RelayError, field_getter, make_node, message_class
from tests.lisa_ros.node_harness import wait_until

pytestmark = pytest.mark.ros
REPO = Path(__file__).resolve().parents[2]


def test_the_type_and_field_are_checked_naming_them() -> None:
    assert message_class("rcl_interfaces/msg/Log") is Log
    assert message_class("rcl_interfaces/Log") is Log
    with pytest.raises(RelayError, match="input_type 'whisper_msgs/msg/Nope': not found"):
        message_class("whisper_msgs/msg/Nope")
    with pytest.raises(RelayError, match="expected package/msg/Type"):
        message_class("Transcription")
    assert field_getter(Log, "msg")(Log(msg="hello")) == "hello"
    with pytest.raises(RelayError, match="field 'level': level is a uint8, not a string"):
        field_getter(Log, "level")
    with pytest.raises(RelayError, match="Log has no field 'text' \\(it has stamp, level"):
        field_getter(Log, "text")
    from lisa_msgs.msg import Segmentation  # a nested string field

    get = field_getter(Segmentation, "header.frame_id")
    message = Segmentation()
    message.header.frame_id = "cam"
    assert get(message) == "cam"


def test_a_transcript_field_arrives_as_a_command() -> None:
    context = Context()
    rclpy.init(context=context)
    executor = SingleThreadedExecutor(context=context)
    overrides = [
        Parameter("input_type", value="rcl_interfaces/msg/Log"),
        Parameter("field", value="msg"),
    ]
    relay = make_node(context=context, namespace="/speech", parameter_overrides=overrides)
    probe = rclpy.create_node("relay_probe", context=context)
    qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
    received: list[str] = []
    probe.create_subscription(String, "/speech/output", lambda m: received.append(m.data), qos)
    pub = probe.create_publisher(Log, "/speech/input", qos)
    for node in (relay, probe):
        executor.add_node(node)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    try:
        assert wait_until(lambda: pub.get_subscription_count() > 0, 15.0)
        for text in ("  the red ball ", "", "a", "the thing I could cut the bread with"):
            pub.publish(Log(msg=text))
        assert wait_until(lambda: len(received) >= 2, 15.0), received
        assert received == ["the red ball", "the thing I could cut the bread with"]
    finally:
        executor.shutdown()
        thread.join(10)
        relay.destroy_node()
        probe.destroy_node()
        rclpy.shutdown(context=context)


def test_a_type_that_is_not_installed_is_one_error_line() -> None:
    args = [sys.executable, "-m", "lisa_ros.text_relay", "--ros-args"]
    args += ["-p", "input_type:=whisper_msgs/msg/Transcription", "-p", "field:=text"]
    result = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "text_relay: error: input_type 'whisper_msgs/msg/Transcription': not found (is the "
        "package built and sourced?)"
    ]
