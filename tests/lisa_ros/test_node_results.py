"""Typed results of lisa_node over real rclpy on loopback: the ``segmentation`` topic, the
``segment`` action (result, feedback, cancel), command ids, 3-D positions from aligned depth,
answers of a node that is not serving, pre-encoding and follow-ups.

The segmenter is the real one over the reference fixture's tiny checkpoint, wrapped where a test
needs a known answer (``KnownTargets``: two masks at known places, so that per-target masks and
positions can be checked exactly).
"""

from __future__ import annotations

import array
import os
from typing import Any

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from action_msgs.msg import GoalStatus  # noqa: E402
from geometry_msgs.msg import PointStamped  # noqa: E402
from lisa_msgs.action import Segment  # noqa: E402
from lisa_msgs.msg import Segmentation  # noqa: E402
from rclpy.action import ActionClient  # noqa: E402
from sensor_msgs.msg import CameraInfo, Image, PointCloud2  # noqa: E402

from lisa_model.types import SegmentationResult  # noqa: E402
from lisa_ros.conversion import depth_to_image_fields  # noqa: E402
from lisa_ros.node import LisaNode  # noqa: E402
from tests.lisa_ros.node_harness import (  # noqa: E402
    RELIABLE,
    TINY,
    H,
    Probe,
    Ros,
    SharedModelNode,
    W,
    as_array,
    encoded,
    params,
    ramp_image,
    wait_until,
)

pytestmark = pytest.mark.ros

FX = FY = 60.0  # a 64 x 48 camera
CX, CY = (W - 1) / 2, (H - 1) / 2
#: The two targets KnownTargets finds: (row slice, column slice).
BOXES = ((slice(10, 20), slice(8, 24)), (slice(26, 40), slice(36, 56)))


class KnownTargets:
    """The real segmenter (so frames are really encoded) answering with two known masks."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.hw = (0, 0)

    def set_image(self, rgb: np.ndarray) -> None:
        self.inner.set_image(rgb)
        self.hw = rgb.shape[:2]

    def predict(self, query: str, explain: bool = False, max_new_tokens: int = 64, **extra: Any):
        self.inner.predict(query, explain=explain, max_new_tokens=max_new_tokens, **extra)
        masks = np.zeros((len(BOXES), *self.hw), bool)
        for mask, (rows, cols) in zip(masks, BOXES):
            mask[rows, cols] = True
        logits = np.where(masks, 3.0, -3.0).astype(np.float32)
        answer = "They are [SEG] and [SEG]."
        return SegmentationResult(masks, logits, answer, turn=(query, answer))


class ResultProbe(Probe):
    """The harness probe plus the typed outputs: segmentation, depth inputs, the action."""

    def __init__(self, ros: Ros, ns: str) -> None:
        super().__init__(ros, ns)
        self.results: list[Segmentation] = []
        self.points: list[PointStamped] = []
        self.clouds: list[PointCloud2] = []
        for topic, kind, store in (
            ("segmentation", Segmentation, self.results),
            ("target_point", PointStamped, self.points),
            ("target_cloud", PointCloud2, self.clouds),
        ):
            self.node.create_subscription(
                kind, f"{ns}/{topic}", lambda m, s=store: self._keep(s, m), RELIABLE
            )
        self.depth_pub = self.node.create_publisher(Image, f"{ns}/depth", RELIABLE)
        self.info_pub = self.node.create_publisher(CameraInfo, f"{ns}/camera_info", RELIABLE)
        self.action = ActionClient(self.node, Segment, f"{ns}/segment")

    def _keep(self, store: list, msg: Any) -> None:
        with self.lock:
            store.append(msg)

    def result_for(self, command_id: int) -> Segmentation | None:
        with self.lock:
            return next((r for r in self.results if r.command_id == command_id), None)

    def results_for(self, text: str) -> list[Segmentation]:
        with self.lock:
            return [r for r in self.results if r.command == text]

    def depth(self, node: LisaNode, header: Any, metres: float, encoding: str, hw=(H, W)) -> None:
        """camera_info (until ``node`` has it), then a depth plane at ``metres``, aligned and
        stamped like the colour frame, held by the node when this returns."""
        fields = depth_to_image_fields(np.full(hw, metres, np.float32), encoding)
        msg = Image(
            height=fields.height,
            width=fields.width,
            encoding=fields.encoding,
            is_bigendian=fields.is_bigendian,
            step=fields.step,
        )
        msg.data = array.array("B", fields.data)
        msg.header.stamp = header.stamp
        msg.header.frame_id = "camera_depth_optical_frame"
        info = CameraInfo(width=W, height=H, k=[FX, 0.0, CX, 0.0, FY, CY, 0.0, 0.0, 1.0])
        info.header = msg.header

        def has_info() -> bool:
            self.info_pub.publish(info)
            return node._depth is not None and node._depth.intrinsics is not None

        assert wait_until(has_info, 15.0, period=0.2), "the node got no camera_info"
        stamp = header.stamp.sec + header.stamp.nanosec * 1e-9
        self.depth_pub.publish(msg)
        assert wait_until(lambda: node._depth.match(stamp) is not None, 15.0), "no depth"

    def goal(self, command: str, **fields: Any) -> tuple[Any, list[Any]]:
        """Send a goal; returns its accepted handle and the feedback list it fills."""
        assert self.action.wait_for_server(timeout_sec=30.0)
        feedback: list[Any] = []
        future = self.action.send_goal_async(
            Segment.Goal(command=command, **fields), feedback_callback=feedback.append
        )
        assert wait_until(future.done, 30.0)
        handle = future.result()
        assert handle.accepted
        return handle, feedback


def wait_result(handle: Any, timeout: float = 60.0) -> Any:
    future = handle.get_result_async()
    assert wait_until(future.done, timeout), "no result"
    return future.result()


def connect(probe: ResultProbe, node: LisaNode) -> None:
    probe.connect(node)
    assert wait_until(lambda: probe.node.count_publishers(f"{probe.ns}/segmentation") > 0, 15)
    if node.config.depth:
        assert wait_until(lambda: probe.depth_pub.get_subscription_count() > 0, 15)
        assert wait_until(lambda: probe.info_pub.get_subscription_count() > 0, 15)
    assert probe.action.wait_for_server(timeout_sec=30.0)


@pytest.fixture(scope="module")
def depth_node(ros: Ros, shared_model: Any) -> tuple[LisaNode, ResultProbe]:
    node = ros.add(
        SharedModelNode(
            shared_model,
            wrap=KnownTargets,
            namespace="/lisa_typed",
            context=ros.context,
            parameter_overrides=params(
                model=str(TINY),
                mode="segment",
                image_reliability="reliable",
                max_image_age=30.0,  # loaded CI hosts deliver late; pairing is tested elsewhere
                image_wait_timeout=30.0,
                depth=True,
                depth_tolerance=0.01,
                depth_erode_px=1,
                depth_min_pixels=5,
                publish_target_point=True,
                publish_target_cloud=True,
                target_cloud_max_points=100,
                preencode=False,
            ),
        )
    )
    probe = ResultProbe(ros, "/lisa_typed")
    connect(probe, node)
    return node, probe


def expected_position(rows: slice, cols: slice, z: float) -> tuple[float, float, float]:
    u = (cols.start + cols.stop - 1) / 2
    v = (rows.start + rows.stop - 1) / 2
    return (u - CX) * z / FX, (v - CY) * z / FY, z


@pytest.mark.parametrize("encoding", ["16UC1", "32FC1"])
def test_action_goal_gives_one_typed_result_with_a_mask_and_position_per_target(
    depth_node, encoding: str
) -> None:
    node, probe = depth_node
    msg, _ = encoded(ramp_image(seed=11), "rgb8")
    header = probe.frame_taken(node, msg, f"colour_{encoding}")
    probe.depth(node, header, 1.5, encoding)
    handle, feedback = probe.goal("all the blue objects")
    response = wait_result(handle)
    assert response.status == GoalStatus.STATUS_SUCCEEDED
    seg = response.result.segmentation
    assert seg.command == "all the blue objects" and seg.command_id > 0
    assert seg.error == "" and seg.error_code == "" and seg.found
    assert seg.answer == "They are [SEG] and [SEG]."
    assert (seg.header.stamp, seg.header.frame_id) == (header.stamp, header.frame_id)
    assert seg.latency >= seg.inference_time >= 0.0
    assert [t.index for t in seg.targets] == [0, 1]
    for target, (rows, cols) in zip(seg.targets, BOXES):
        mask = as_array(target.mask)
        want = np.zeros((H, W), np.uint8)
        want[rows, cols] = 255
        np.testing.assert_array_equal(mask, want)  # full-frame mono8, 255 = target
        assert target.mask.header.stamp == header.stamp
        box = target.bbox
        assert (box.x_offset, box.y_offset) == (cols.start, rows.start)
        assert (box.width, box.height) == (cols.stop - cols.start, rows.stop - rows.start)
        assert target.area == int((want > 0).sum())
        assert target.score == pytest.approx(1 / (1 + np.exp(-3.0)), abs=1e-6)
        assert target.position_valid and target.depth_frame_id == "camera_depth_optical_frame"
        position = (target.position.x, target.position.y, target.position.z)
        np.testing.assert_allclose(position, expected_position(rows, cols, 1.5), atol=0.01)
        assert target.depth_pixels > 0
        assert target.depth_min == pytest.approx(1.5, abs=0.001)
    # Feedback named the stages, in order; the same result went out on the topic.
    stages = [f.feedback.stage for f in feedback]
    assert stages[0] == Segment.Feedback.STAGE_QUEUED
    assert Segment.Feedback.STAGE_DECODING in stages and stages == sorted(stages)
    assert wait_until(lambda: probe.result_for(seg.command_id) is not None, 15.0)
    published = probe.result_for(seg.command_id)
    assert len(published.targets) == 2 and published.answer == seg.answer
    # The depth outputs: the first target's centre, and the points of both.
    assert wait_until(lambda: any(p.header.stamp == header.stamp for p in probe.points), 15.0)
    point = next(p for p in probe.points if p.header.stamp == header.stamp)
    assert point.header.frame_id == "camera_depth_optical_frame"
    assert point.point.z == pytest.approx(1.5, abs=0.01)
    assert wait_until(lambda: any(c.header.stamp == header.stamp for c in probe.clouds), 15.0)
    cloud = next(c for c in probe.clouds if c.header.stamp == header.stamp)
    xyz = np.frombuffer(bytes(cloud.data), np.float32).reshape(-1, 3)
    assert 0 < len(xyz) <= 100 and np.allclose(xyz[:, 2], 1.5, atol=0.01)


def test_without_depth_for_the_frame_positions_are_not_made_up(depth_node) -> None:
    node, probe = depth_node
    msg, _ = encoded(ramp_image(seed=12), "rgb8")
    probe.frame_taken(node, msg, "colour_without_depth")  # no depth image at this stamp
    handle, _ = probe.goal("the cup")
    seg = wait_result(handle).result.segmentation
    assert seg.found and len(seg.targets) == 2
    assert not any(t.position_valid for t in seg.targets)
    assert all(t.depth_frame_id == "" for t in seg.targets)


def test_a_depth_image_of_another_size_is_reported_not_a_crash(depth_node, capfd) -> None:
    node, probe = depth_node
    msg, _ = encoded(ramp_image(seed=13), "rgb8")
    header = probe.frame_taken(node, msg, "colour_other_size")
    probe.depth(node, header, 1.5, "16UC1", hw=(H // 2, W // 2))
    seg = wait_result(probe.goal("the cup")[0]).result.segmentation
    assert seg.found and not any(t.position_valid for t in seg.targets)
    # The node still serves: the next command with aligned depth gets its positions.
    header = probe.frame_taken(node, msg, "colour_after_other_size")
    probe.depth(node, header, 0.8, "32FC1")
    seg = wait_result(probe.goal("the cup")[0]).result.segmentation
    assert all(t.position_valid for t in seg.targets)
    assert seg.targets[0].position.z == pytest.approx(0.8, abs=0.01)


def test_two_topic_commands_back_to_back_give_two_results_with_their_own_ids(depth_node) -> None:
    node, probe = depth_node
    msg, _ = encoded(ramp_image(seed=14), "rgb8")
    probe.frame_taken(node, msg, "colour_two")
    probe.command("the first thing")
    probe.command("the second thing")
    assert wait_until(lambda: probe.results_for("the second thing"), 30.0), probe.texts()
    (first,) = probe.results_for("the first thing")
    (second,) = probe.results_for("the second thing")
    assert first.command_id < second.command_id
    assert first.error == "" and second.error == "" and len(second.targets) == 2
    # The explanation carries the same ids.
    texts = probe.texts()
    assert any(t.startswith(f"[{first.command_id}] ") for t in texts)
    assert any(t.startswith(f"[{second.command_id}] ") for t in texts)


@pytest.fixture(scope="module")
def waiting_node(ros: Ros, shared_model: Any) -> tuple[LisaNode, ResultProbe]:
    """A node that never gets a frame: commands wait, then fail."""
    node = ros.add(
        SharedModelNode(
            shared_model,
            namespace="/lisa_waiting",
            context=ros.context,
            parameter_overrides=params(model=str(TINY), image_wait_timeout=1.0),
        )
    )
    probe = ResultProbe(ros, "/lisa_waiting")
    connect(probe, node)
    return node, probe


def test_a_failed_command_is_a_typed_result_too(waiting_node) -> None:
    node, probe = waiting_node
    probe.command("the red ball")
    assert wait_until(lambda: probe.results_for("the red ball"), 30.0)
    (seg,) = probe.results_for("the red ball")
    assert seg.error_code == Segmentation.ERROR_NO_IMAGE and "no image received" in seg.error
    assert not seg.found and list(seg.targets) == []
    # As an action: aborted, with the same typed result.
    response = wait_result(probe.goal("the blue box")[0])
    assert response.status == GoalStatus.STATUS_ABORTED
    assert response.result.segmentation.error_code == Segmentation.ERROR_NO_IMAGE
    # A command the model cannot take is rejected at once, with its own id.
    response = wait_result(probe.goal("", mode="segment")[0])
    seg = response.result.segmentation
    assert response.status == GoalStatus.STATUS_ABORTED
    assert seg.error_code == Segmentation.ERROR_REJECTED and "command is empty" in seg.error
    response = wait_result(probe.goal("cup", mode="segment", explain=2)[0])
    assert "explain needs mode 'generate'" in response.result.segmentation.error


def test_cancel_while_waiting_for_a_frame(waiting_node) -> None:
    node, probe = waiting_node
    node.set_parameters([params(image_wait_timeout=60.0)[0]])
    try:
        handle, feedback = probe.goal("the red ball")
        assert wait_until(
            lambda: any(
                f.feedback.stage == Segment.Feedback.STAGE_WAITING_FOR_FRAME for f in feedback
            ),
            30.0,
        ), feedback
        cancel = handle.cancel_goal_async()
        assert wait_until(cancel.done, 30.0)
        response = wait_result(handle, 30.0)
        assert response.status == GoalStatus.STATUS_CANCELED
        seg = response.result.segmentation
        assert seg.error_code == Segmentation.ERROR_CANCELLED
        assert node.pipeline.waiting_commands == 0
    finally:
        node.set_parameters([params(image_wait_timeout=1.0)[0]])


def test_a_node_that_is_not_serving_answers_with_the_reason(ros: Ros) -> None:
    node = ros.add(
        LisaNode(
            namespace="/lisa_broken",
            context=ros.context,
            parameter_overrides=params(autostart=False, model="/nonexistent/lisa"),
        )
    )
    probe = ResultProbe(ros, "/lisa_broken")
    assert node.trigger_configure().value != 0  # fails, the node stays up
    assert wait_until(lambda: probe.command_pub.get_subscription_count() > 0, 15.0)
    assert wait_until(lambda: probe.node.count_publishers("/lisa_broken/segmentation") > 0, 15)
    probe.command("the red ball")
    assert wait_until(lambda: probe.results_for("the red ball"), 15.0)
    (seg,) = probe.results_for("the red ball")
    assert seg.error_code == Segmentation.ERROR_NOT_READY
    assert "/nonexistent/lisa: no such checkpoint" in seg.error
    response = wait_result(probe.goal("the blue box")[0])
    assert response.status == GoalStatus.STATUS_ABORTED
    assert response.result.segmentation.error_code == Segmentation.ERROR_NOT_READY


def test_a_command_on_a_live_stream_uses_the_pre_encoded_frame(ros: Ros, shared_model) -> None:
    node = ros.add(
        SharedModelNode(
            shared_model,
            namespace="/lisa_live",
            context=ros.context,
            parameter_overrides=params(
                model=str(TINY),
                mode="segment",
                max_image_age=30.0,
                image_reliability="reliable",
                preencode_max_hz=50.0,
            ),
        )
    )
    probe = ResultProbe(ros, "/lisa_live")
    connect(probe, node)
    msg, _ = encoded(ramp_image(seed=15), "rgb8")
    probe.frame(msg, "live_0")
    assert wait_until(lambda: node.pipeline.stats().preencoded >= 1, 30.0)
    handle, feedback = probe.goal("the red ball")
    seg = wait_result(handle).result.segmentation
    assert seg.error == "" and seg.preencoded and seg.encode_time == 0.0
    assert seg.header.frame_id == "live_0"
    assert Segment.Feedback.STAGE_ENCODING not in [f.feedback.stage for f in feedback]


def test_a_follow_up_goal_continues_the_conversation_on_its_frame(depth_node) -> None:
    node, probe = depth_node
    msg, _ = encoded(ramp_image(seed=16), "rgb8")
    probe.frame_taken(node, msg, "conversation_frame")
    first = wait_result(probe.goal("the cups")[0]).result.segmentation
    assert first.turn == 1
    probe.frame_taken(node, msg, "a_newer_frame")
    second = wait_result(probe.goal("now the one on the left", follow_up=True)[0])
    second = second.result.segmentation
    assert second.turn == 2 and second.error == ""
    assert second.header.frame_id == "conversation_frame"  # the conversation's, not the newest
    third = wait_result(probe.goal("the plate")[0]).result.segmentation
    assert third.turn == 1 and third.header.frame_id == "a_newer_frame"


def test_ids_keep_increasing_across_a_reconfiguration(ros: Ros, shared_model) -> None:
    node = ros.add(
        SharedModelNode(
            shared_model,
            namespace="/lisa_ids",
            context=ros.context,
            parameter_overrides=params(model=str(TINY), image_wait_timeout=0.0),
        )
    )
    probe = ResultProbe(ros, "/lisa_ids")
    connect(probe, node)
    probe.command("before")
    assert wait_until(lambda: probe.results_for("before"), 15.0)
    node.trigger_deactivate()
    node.trigger_cleanup()
    node.trigger_configure()
    node.trigger_activate()
    connect(probe, node)
    probe.command("after")
    assert wait_until(lambda: probe.results_for("after"), 15.0)
    (before,) = probe.results_for("before")
    (after,) = probe.results_for("after")
    assert after.command_id > before.command_id


def test_a_command_too_long_for_the_models_positions_is_rejected_at_once(ros: Ros) -> None:
    """The embedded demo model has 512 positions and the image takes part of them: a command
    under max_command_chars can still not fit, and is rejected with the limit in tokens."""
    node = ros.add(
        LisaNode(
            namespace="/lisa_budget",
            context=ros.context,
            parameter_overrides=params(mode="segment"),  # the embedded demo model
        )
    )
    probe = ResultProbe(ros, "/lisa_budget")
    connect(probe, node)
    rng = np.random.default_rng(0)  # words the model's vocabulary splits into single letters
    long = " ".join("".join(rng.choice(list("qzxjkvw"), 5)) for _ in range(75))
    assert len(long) < 500
    probe.command(long)
    assert wait_until(lambda: probe.results_for(long), 30.0), probe.texts()
    (seg,) = probe.results_for(long)
    assert seg.error_code == Segmentation.ERROR_REJECTED
    assert "query too long" in seg.error and "tokens fit (about" in seg.error, seg.error
    assert node.pipeline.stats().commands_rejected == 1


def test_a_truncated_checkpoint_fails_configure_naming_the_file(ros: Ros, tmp_path, capfd):
    import shutil

    from lisa_model.demo import DEMO_MODEL_DIR

    copy = tmp_path / "model"
    shutil.copytree(DEMO_MODEL_DIR, copy)
    weights = copy / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    node = ros.add(
        LisaNode(
            namespace="/lisa_truncated",
            context=ros.context,
            parameter_overrides=params(autostart=False, model=str(copy)),
        )
    )
    assert node.trigger_configure().value != 0
    assert node.state == "unconfigured" and str(weights) in node.last_error
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "configure failed" in ln]
    assert len(lines) == 1 and str(weights) in lines[0] and "Traceback" not in err, err
    probe = ResultProbe(ros, "/lisa_truncated")
    assert wait_until(lambda: probe.command_pub.get_subscription_count() > 0, 15.0)
    probe.command("the red ball")
    assert wait_until(lambda: probe.results_for("the red ball"), 15.0)
    (seg,) = probe.results_for("the red ball")
    assert seg.error_code == Segmentation.ERROR_NOT_READY and str(weights) in seg.error
