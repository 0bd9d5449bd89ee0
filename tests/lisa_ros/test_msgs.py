"""The lisa_msgs interfaces: generated types, rclpy transport, and rosbags from the .msg files.

``make venv`` builds lisa_msgs into the venv (tools/build_lisa_msgs.py); these tests use that
install as the node will: import, serialise, publish/subscribe and an action round trip over
loopback, and write/read a bag with the types rosbags builds from the definitions
(``lisa_ros.msg_types``), checking both sides read each other's bytes and agree on the type hash.
"""

from __future__ import annotations

import array
import json
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import rclpy  # noqa: E402
from rclpy.action import ActionClient, ActionServer  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402
from rclpy.qos import QoSProfile, ReliabilityPolicy  # noqa: E402
from rclpy.serialization import deserialize_message, serialize_message  # noqa: E402
from rosbags.rosbag2 import Reader, Writer  # noqa: E402
from rosbags.rosbag2.enums import StoragePlugin  # noqa: E402
from rosbags.typesys import Stores, get_typestore  # noqa: E402

from lisa_ros.msg_types import (  # noqa: E402
    SEGMENTATION,
    TARGET,
    find_msg_dir,
    lisa_msgs_types,
    register_lisa_msgs,
)

try:
    from lisa_msgs.action import Segment
    from lisa_msgs.msg import Segmentation, Target
except ImportError as exc:  # a venv made before lisa_msgs existed
    raise ImportError(
        f"lisa_msgs is not installed in {sys.prefix} ({exc}): run make venv "
        "(or python tools/build_lisa_msgs.py with the venv's Python)"
    ) from exc

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]
RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
H, W = 6, 8

# The interface as documented: every field and its ROS type.
TARGET_FIELDS = {
    "index": "uint32",
    "score": "float",
    "mask": "sensor_msgs/Image",
    "bbox": "sensor_msgs/RegionOfInterest",
    "area": "uint32",
    "position_valid": "boolean",
    "position": "geometry_msgs/Point",
    "depth_frame_id": "string",
    "depth_pixels": "uint32",
    "depth_min": "float",
    "depth_max": "float",
}
SEGMENTATION_FIELDS = {
    "header": "std_msgs/Header",
    "command_id": "uint64",
    "command": "string",
    "answer": "string",
    "found": "boolean",
    "targets": "sequence<lisa_msgs/Target>",
    "error": "string",
    "error_code": "string",
    "standing": "boolean",
    "turn": "uint32",
    "preencoded": "boolean",
    "encode_time": "float",
    "inference_time": "float",
    "latency": "float",
}
ERROR_CODES = {
    "ERROR_NO_IMAGE": "no_image",
    "ERROR_STALE_IMAGE": "stale_image",
    "ERROR_REJECTED": "rejected",
    "ERROR_DROPPED": "dropped",
    "ERROR_CANCELLED": "cancelled",
    "ERROR_MODEL": "model_error",
    "ERROR_OUT_OF_MEMORY": "out_of_memory",
    "ERROR_BAD_RESULT": "bad_result",
    "ERROR_NOT_READY": "not_ready",
}
GOAL_FIELDS = {"command": "string", "mode": "string", "explain": "uint8", "follow_up": "boolean"}
EXPLAIN = {"EXPLAIN_DEFAULT": 0, "EXPLAIN_NO": 1, "EXPLAIN_YES": 2}
FEEDBACK_FIELDS = {"stage": "uint8", "stage_name": "string", "elapsed": "float"}
STAGES = {
    "STAGE_QUEUED": 0,
    "STAGE_WAITING_FOR_FRAME": 1,
    "STAGE_ENCODING": 2,
    "STAGE_DECODING": 3,
}


def make_segmentation() -> Segmentation:
    """A result with two targets: one with a 3-D position, one without depth."""
    mask = np.zeros((H, W), np.uint8)
    mask[1:4, 2:5] = 255
    first = Target(index=0, score=0.875, area=9, position_valid=True, depth_pixels=7)
    first.mask.header.frame_id = "camera_optical"
    first.mask.height, first.mask.width, first.mask.step = H, W, W
    first.mask.encoding = "mono8"
    first.mask.data = array.array("B", mask.tobytes())
    first.bbox.x_offset, first.bbox.y_offset, first.bbox.width, first.bbox.height = 2, 1, 3, 3
    first.position.x, first.position.y, first.position.z = 0.25, -0.125, 1.5
    first.depth_frame_id = "depth_optical"
    first.depth_min, first.depth_max = 1.25, 1.75
    second = Target(index=1, score=0.5, depth_min=math.nan, depth_max=math.nan)
    msg = Segmentation(
        command_id=3,
        command="the red cup",
        answer="It is [SEG] and [SEG].",
        found=True,
        targets=[first, second],
        turn=2,
        preencoded=True,
        encode_time=0.0,
        inference_time=0.5,
        latency=0.75,
    )
    msg.header.frame_id = "camera_optical"
    msg.header.stamp.sec, msg.header.stamp.nanosec = 12, 345
    return msg


def assert_same_segmentation(got: Any, want: Segmentation) -> None:
    """Field by field (NaN equal to NaN), for rclpy messages and rosbags dataclasses alike."""
    for name in SEGMENTATION_FIELDS:
        if name not in ("header", "targets"):
            assert getattr(got, name) == getattr(want, name), name
    assert got.header.frame_id == want.header.frame_id
    assert (got.header.stamp.sec, got.header.stamp.nanosec) == (12, 345)
    assert len(got.targets) == len(want.targets)
    for g, w in zip(got.targets, want.targets):
        assert (g.index, g.score, g.area, g.position_valid) == (
            w.index,
            w.score,
            w.area,
            w.position_valid,
        )
        assert bytes(g.mask.data) == bytes(w.mask.data)
        assert (g.mask.height, g.mask.width, g.mask.step, g.mask.encoding) == (
            w.mask.height,
            w.mask.width,
            w.mask.step,
            w.mask.encoding,
        )
        assert g.mask.header.frame_id == w.mask.header.frame_id
        assert (g.bbox.x_offset, g.bbox.y_offset, g.bbox.width, g.bbox.height) == (
            w.bbox.x_offset,
            w.bbox.y_offset,
            w.bbox.width,
            w.bbox.height,
        )
        assert (g.position.x, g.position.y, g.position.z) == (
            w.position.x,
            w.position.y,
            w.position.z,
        )
        assert g.depth_frame_id == w.depth_frame_id and g.depth_pixels == w.depth_pixels
        for a, b in ((g.depth_min, w.depth_min), (g.depth_max, w.depth_max)):
            assert a == b or (math.isnan(a) and math.isnan(b))


# ------------------------------------------------------------------------------- the types


def test_fields_and_constants_are_the_documented_interface() -> None:
    assert Target.get_fields_and_field_types() == TARGET_FIELDS
    assert Segmentation.get_fields_and_field_types() == SEGMENTATION_FIELDS
    assert {name: getattr(Segmentation, name) for name in ERROR_CODES} == ERROR_CODES
    assert Segment.Goal.get_fields_and_field_types() == GOAL_FIELDS
    assert {name: getattr(Segment.Goal, name) for name in EXPLAIN} == EXPLAIN
    assert Segment.Result.get_fields_and_field_types() == {
        "segmentation": "lisa_msgs/Segmentation"
    }
    assert Segment.Feedback.get_fields_and_field_types() == FEEDBACK_FIELDS
    assert {name: getattr(Segment.Feedback, name) for name in STAGES} == STAGES
    # Defaults a consumer relies on: a fresh result is "not found", no error, no position.
    fresh = Segmentation()
    assert not fresh.found and fresh.error_code == "" and list(fresh.targets) == []
    assert not Target().position_valid and Segment.Goal().explain == Segment.Goal.EXPLAIN_DEFAULT


def test_rclpy_serialization_round_trips() -> None:
    msg = make_segmentation()
    raw = serialize_message(msg)
    back = deserialize_message(raw, Segmentation)
    assert_same_segmentation(back, msg)
    failed = Segmentation(command="x", error="no frame", error_code=Segmentation.ERROR_NO_IMAGE)
    assert deserialize_message(serialize_message(failed), Segmentation).error_code == "no_image"


# ------------------------------------------------------------------------ rclpy transport


@pytest.fixture
def ros() -> Iterator[tuple[Context, Callable[[str], Any]]]:
    context = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    nodes: list[Any] = []

    def make_node(name: str) -> Any:
        node = rclpy.create_node(name, namespace="/lisa_msgs_test", context=context)
        nodes.append(node)
        executor.add_node(node)
        return node

    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    yield context, make_node
    executor.shutdown()
    thread.join(10)
    for node in reversed(nodes):
        node.destroy_node()
    rclpy.shutdown(context=context)


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_publish_and_subscribe_over_loopback(ros) -> None:
    _, make_node = ros
    sender, receiver = make_node("sender"), make_node("receiver")
    got: list[Segmentation] = []
    receiver.create_subscription(Segmentation, "segmentation", got.append, RELIABLE)
    pub = sender.create_publisher(Segmentation, "segmentation", RELIABLE)
    wait_for(lambda: pub.get_subscription_count() == 1, "the subscriber")
    msg = make_segmentation()
    pub.publish(msg)
    wait_for(lambda: got, "the message")
    assert_same_segmentation(got[0], msg)


def test_action_goal_feedback_and_result(ros) -> None:
    _, make_node = ros
    server_node, client_node = make_node("server"), make_node("client")

    def execute(goal_handle: Any) -> Segment.Result:
        goal = goal_handle.request
        for stage, name in ((Segment.Feedback.STAGE_QUEUED, "queued"), (3, "decoding")):
            goal_handle.publish_feedback(Segment.Feedback(stage=stage, stage_name=name))
        goal_handle.succeed()
        result = make_segmentation()
        result.command = f"{goal.command} ({goal.mode}, explain {goal.explain})"
        result.turn = 2 if goal.follow_up else 1
        return Segment.Result(segmentation=result)

    ActionServer(server_node, Segment, "segment", execute)
    client = ActionClient(client_node, Segment, "segment")
    assert client.wait_for_server(timeout_sec=30)
    feedback: list[Segment.Feedback] = []
    goal = Segment.Goal(command="the cup", mode="segment", explain=Segment.Goal.EXPLAIN_YES)
    goal.follow_up = True
    sent = client.send_goal_async(goal, feedback_callback=lambda m: feedback.append(m.feedback))
    wait_for(sent.done, "goal acceptance")
    goal_handle = sent.result()
    assert goal_handle.accepted
    done = goal_handle.get_result_async()
    wait_for(done.done, "the result")
    segmentation = done.result().result.segmentation
    assert segmentation.command == "the cup (segment, explain 2)" and segmentation.turn == 2
    assert len(segmentation.targets) == 2 and segmentation.targets[0].position.z == 1.5
    wait_for(lambda: len(feedback) == 2, "two feedback messages", timeout=10)
    assert [(f.stage, f.stage_name) for f in feedback] == [(0, "queued"), (3, "decoding")]


# -------------------------------------------------------------------------------- rosbags


def test_rosbags_types_come_from_the_installed_definitions() -> None:
    directory = find_msg_dir()
    for name in ("Segmentation", "Target"):
        assert (directory / f"{name}.msg").read_text() == (
            REPO / "lisa_msgs" / "msg" / f"{name}.msg"
        ).read_text()
    assert set(lisa_msgs_types()) == {SEGMENTATION, TARGET}
    assert set(lisa_msgs_types(REPO / "lisa_msgs" / "msg")) == {SEGMENTATION, TARGET}
    with pytest.raises(FileNotFoundError, match="no Segmentation.msg, Target.msg"):
        lisa_msgs_types(REPO / "lisa_msgs" / "action")


def test_rosbags_and_rclpy_agree_on_bytes_and_type_hash() -> None:
    store = register_lisa_msgs(get_typestore(Stores.ROS2_HUMBLE))
    msg = make_segmentation()
    raw = serialize_message(msg)
    theirs = store.deserialize_cdr(raw, SEGMENTATION)
    assert_same_segmentation(theirs, msg)
    assert theirs.ERROR_OUT_OF_MEMORY == "out_of_memory"
    # rosbags' bytes read in rclpy; the same length (only CDR padding bytes may differ: rclpy
    # leaves them unset).
    ours = bytes(store.serialize_cdr(theirs, SEGMENTATION))
    assert len(ours) == len(raw)
    assert_same_segmentation(deserialize_message(ours, Segmentation), msg)
    # rosidl writes the type hashes it computed next to the definitions.
    generated = json.loads((find_msg_dir() / "Segmentation.json").read_text())
    hashes = {h["type_name"]: h["hash_string"] for h in generated["type_hashes"]}
    assert store.hash_rihs01(SEGMENTATION) == hashes[SEGMENTATION]
    assert store.hash_rihs01(TARGET) == hashes[TARGET]


def test_segmentation_written_to_a_bag_reads_back(tmp_path: Path) -> None:
    store = register_lisa_msgs(get_typestore(Stores.ROS2_HUMBLE))
    msg = make_segmentation()
    bag = tmp_path / "bag"
    with Writer(bag, version=9, storage_plugin=StoragePlugin.MCAP) as writer:
        conn = writer.add_connection("/lisa/segmentation", SEGMENTATION, typestore=store)
        raw = store.serialize_cdr(
            store.deserialize_cdr(serialize_message(msg), SEGMENTATION), SEGMENTATION
        )
        writer.write(conn, 12_000_000_345, raw)
    with Reader(bag) as reader:
        (conn,) = reader.connections
        assert conn.msgtype == SEGMENTATION
        ((_, t, raw),) = list(reader.messages())
    assert t == 12_000_000_345
    assert_same_segmentation(deserialize_message(bytes(raw), Segmentation), msg)
