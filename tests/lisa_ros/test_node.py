"""lisa_node over real rclpy pub/sub on loopback, with the reference fixture's tiny checkpoint.

A probe node plays camera and user: it publishes frames and commands and records what the node
publishes. Everything runs in this process on one MultiThreadedExecutor. The model is loaded once
for the module and shared by the nodes (``SharedModelNode``); the lifecycle test loads its own so
that it can check the model is freed on cleanup. The one dependency slowed down on purpose is the
segmenter (``SlowSegmenter``), to have seconds-long inference under a 30 Hz image flood.
"""

from __future__ import annotations

import array
import gc
import os
import re
import time
import weakref
from pathlib import Path
from typing import Any

# DDS on loopback and a domain of our own, before rclpy is initialised (pytest imports test
# modules before running any fixture).
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from lifecycle_msgs.msg import Transition  # noqa: E402
from lifecycle_msgs.srv import ChangeState, GetState  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.qos import qos_profile_sensor_data  # noqa: E402
from sensor_msgs.msg import CompressedImage  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from lisa_ros.conversion import MASK_PNG_FORMAT  # noqa: E402
from lisa_ros.node import LOG_THROTTLE_SECONDS, LisaNode  # noqa: E402
from tests.lisa_ros.node_harness import (  # noqa: E402
    TINY,
    FrameStream,
    H,
    Probe,
    Ros,
    SharedModelNode,
    SlowSegmenter,
    W,
    as_array,
    encoded,
    image_msg,
    params,
    ramp_image,
    rss_mb,
    wait_until,
)

pytestmark = pytest.mark.ros


# ------------------------------------------------------------------------------- the nodes


MAIN_MAX_AGE = 4.0  # the main node's max_image_age, seconds
MAIN_WAIT = 4.0  # and its image_wait_timeout


@pytest.fixture(scope="module")
def main(ros: Ros, shared_model: Any) -> tuple[LisaNode, Probe]:
    """Reliable raw images, generate mode, PNG masks on, a short command limit."""
    node = ros.add(
        SharedModelNode(
            shared_model,
            namespace="/lisa_main",
            context=ros.context,
            parameter_overrides=params(
                model=str(TINY),
                max_new_tokens=8,
                image_reliability="reliable",
                # Loose enough for a loaded CI host (a frame once took over 1.5 s to arrive).
                max_image_age=MAIN_MAX_AGE,
                image_wait_timeout=MAIN_WAIT,
                max_command_chars=60,
                publish_compressed_mask=True,
                # These tests pin which frame a command pairs with; with pre-encoding a command
                # may take an earlier, already encoded fresh frame (tested on its own).
                preencode=False,
            ),
        )
    )
    probe = Probe(ros, "/lisa_main")
    probe.connect(node)
    return node, probe


@pytest.mark.parametrize("encoding", ["rgb8", "bgr8", "mono8", "rgba8", "mono16"])
def test_frame_and_command_give_mask_explanation_overlay(main, encoding: str) -> None:
    node, probe = main
    rgb = ramp_image(seed=len(encoding))
    msg, want = encoded(rgb, encoding)
    n_expl = len(probe.explanations)
    header = probe.frame_taken(node, msg, f"cam_{encoding}")
    probe.command("the red ball")
    assert wait_until(lambda: probe.mask_for(f"cam_{encoding}") is not None, 20.0), probe.texts()
    probe.wait_text(n_expl, r"^\[\d+\] (?!failed)")  # the answer, not a failure report
    assert not [t for t in probe.texts()[n_expl:] if re.match(r"^\[\d+\] failed", t)]
    mask_msg = probe.mask_for(f"cam_{encoding}").msg
    # The mask lines up with the frame: same header, same size, mono8 0/255.
    assert mask_msg.header.stamp == header.stamp and mask_msg.header.frame_id == header.frame_id
    assert (mask_msg.height, mask_msg.width, mask_msg.encoding) == (H, W, "mono8")
    mask = as_array(mask_msg)
    assert set(np.unique(mask)) <= {0, 255}
    # Lossless PNG copy of the same mask, with image_transport's format string.
    png = next(r.msg for r in probe.pngs if r.msg.header.frame_id == f"cam_{encoding}")
    assert png.format == MASK_PNG_FORMAT
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(png.data, np.uint8), -1), mask)
    # The overlay is the decoded frame (colour order right) wherever no mask or banner covers it.
    assert wait_until(
        lambda: any(r.msg.header.frame_id == f"cam_{encoding}" for r in probe.overlays), 5.0
    )
    overlay_msg = next(r.msg for r in probe.overlays if r.msg.header.frame_id == header.frame_id)
    assert (overlay_msg.encoding, overlay_msg.height, overlay_msg.width) == ("rgb8", H, W)
    overlay = as_array(overlay_msg)
    free = np.zeros((H, W), bool)
    free[H // 2 :] = mask[H // 2 :] == 0  # the text banner stays in the top half
    assert free.sum() > 0
    np.testing.assert_array_equal(overlay[free], want[free])


def test_stale_frame_is_never_used(main) -> None:
    node, probe = main
    n_expl = len(probe.explanations)
    rgb = ramp_image(seed=3)
    # Only a 30 s old frame: the command waits image_wait_timeout, then fails.
    probe.frame(encoded(rgb, "rgb8")[0], "old_a", age=30.0)
    start = time.monotonic()
    probe.command("the red ball")
    text = probe.wait_text(n_expl, r"^\[\d+\] failed: latest image")
    assert time.monotonic() - start >= MAIN_WAIT - 0.1
    pattern = r"failed: latest image is 3\d\.\d s old, older than max_image_age 4\.0 s"
    assert re.fullmatch(r"\[\d+\] " + pattern + r" \(command 'the red ball'\)", text), text
    assert probe.mask_for("old_a") is None
    # Stale frame, command, then a fresh frame within the timeout: served on the fresh one.
    probe.frame(encoded(rgb, "rgb8")[0], "old_b", age=30.0)
    probe.command("the red ball")
    time.sleep(0.5)
    header = probe.frame(encoded(rgb, "rgb8")[0], "fresh")
    assert wait_until(lambda: probe.mask_for("fresh") is not None, 20.0), probe.texts()
    assert probe.mask_for("fresh").msg.header.stamp == header.stamp
    assert probe.mask_for("old_b") is None


def test_bad_frames_and_commands_are_reported_and_node_keeps_serving(main) -> None:
    node, probe = main
    stats0 = node.pipeline.stats()
    n_expl = len(probe.explanations)
    rgb = ramp_image(seed=5)
    first_report = time.monotonic()
    probe.frame(image_msg(H, W, "foo8", rgb.tobytes(), 3 * W), "bad_encoding")
    probe.wait_text(
        n_expl, r"^failed: bad image on /lisa_main/image: unsupported image encoding 'foo8'"
    )
    probe.frame(image_msg(H, W, "rgb8", rgb.tobytes()[:100], 3 * W), "short")
    probe.wait_text(n_expl, r"^failed: bad image on /lisa_main/image: .*fewer than height \* step")
    probe.frame(image_msg(H, W, "rgb8", rgb.tobytes(), 10), "bad_step")
    probe.wait_text(n_expl, r"^failed: bad image on /lisa_main/image: .*step 10 is smaller than")
    # A 30 Hz stream of the same bad frame is reported once per throttle period, not 30 times.
    for _ in range(20):
        probe.frame(image_msg(H, W, "foo8", rgb.tobytes(), 3 * W), "bad_encoding")
        time.sleep(1 / 30)
    probe.command("")
    probe.command(" \t ")
    probe.command("x" * 61)
    probe.wait_text(n_expl, "more than max_command_chars")
    rejected = [t for t in probe.texts()[n_expl:] if "command rejected" in t]
    assert [re.sub(r"^\[\d+\] | \(command '.*'\)$", "", t) for t in rejected] == [
        "failed: command rejected: command is empty",
        "failed: command rejected: command is empty",
        "failed: command rejected: command has 61 characters, more than max_command_chars 60",
    ]
    ids = [int(re.match(r"^\[(\d+)\]", t).group(1)) for t in rejected]
    assert ids == sorted(set(ids)), rejected  # every command has its own id
    time.sleep(0.3)
    # Once per LOG_THROTTLE_SECONDS: one report, plus one per throttle period that this test
    # took on a loaded host (a bound that holds however slowly the frames were delivered).
    periods = int((time.monotonic() - first_report) / LOG_THROTTLE_SECONDS)
    reports = sum("unsupported image encoding" in t for t in probe.texts()[n_expl:])
    assert 1 <= reports <= 1 + periods, (reports, periods)
    stats = node.pipeline.stats()
    assert stats.commands_rejected - stats0.commands_rejected == 3
    assert stats.frames_received == stats0.frames_received  # no bad frame got in
    # And the node still serves.
    header = probe.frame_taken(node, encoded(rgb, "rgb8")[0], "good_after_bad")
    probe.command("the red ball")
    assert wait_until(lambda: probe.mask_for("good_after_bad") is not None, 20.0)
    assert probe.mask_for("good_after_bad").msg.header.stamp == header.stamp


def test_compressed_input_and_command_before_first_frame(ros: Ros, shared_model: Any) -> None:
    node = ros.add(
        SharedModelNode(
            shared_model,
            namespace="/lisa_jpeg",
            context=ros.context,
            parameter_overrides=params(
                model=str(TINY),
                image_transport="compressed",
                mode="segment",
                publish_overlay=False,
            ),
        )
    )
    probe = Probe(ros, "/lisa_jpeg", image_qos=qos_profile_sensor_data)
    probe.connect(node, compressed=True)
    assert not [p for p in node.publishers if p.topic_name.endswith(("/overlay", "/compressed"))]
    bgr = ramp_image(seed=9)[:, :, ::-1]
    # The very first input is a command; the frame comes 0.5 s later and serves it.
    probe.command("the red ball")
    time.sleep(0.5)
    for fmt, ext in (("jpeg", ".jpg"), ("png", ".png")):
        msg = CompressedImage(format=fmt)
        msg.data = array.array("B", cv2.imencode(ext, bgr)[1].tobytes())
        if fmt == "jpeg":
            header = probe.frame(msg, f"compressed_{fmt}")
        else:
            # A command is served on the newest frame the node holds, so the second command
            # goes out only once the PNG frame is in (otherwise it may be served on the JPEG).
            header = probe.frame_taken(node, msg, f"compressed_{fmt}")
            probe.command("the red ball")
        assert wait_until(lambda f=fmt: probe.mask_for(f"compressed_{f}") is not None, 20.0), (
            probe.texts()
        )
        mask = probe.mask_for(f"compressed_{fmt}").msg
        assert mask.header.stamp == header.stamp and (mask.height, mask.width) == (H, W)
    assert probe.overlays == [] and probe.pngs == []
    assert node.pipeline.stats().served == 2


def test_image_flood_during_slow_inference_keeps_one_frame_and_flat_memory(
    ros: Ros, shared_model: Any
) -> None:
    node = ros.add(
        SharedModelNode(
            shared_model,
            wrap=lambda s: SlowSegmenter(s, delay=0.5),
            namespace="/lisa_flood",
            context=ros.context,
            # Without pre-encoding, so that which commands the full queue drops is known.
            parameter_overrides=params(
                model=str(TINY),
                mode="segment",
                queue_size=2,
                image_wait_timeout=5.0,
                preencode=False,
            ),
        )
    )
    probe = Probe(ros, "/lisa_flood", image_qos=qos_profile_sensor_data)
    probe.connect(node)
    big = ramp_image(seed=1, hw=(480, 640))
    frames = [encoded(np.roll(big, i, axis=1), "rgb8")[0] for i in range(4)]
    with FrameStream(probe, 10.0, lambda i: frames[i % 4]):  # warm up at this frame size
        probe.command("warm up")
        assert wait_until(lambda: len(probe.masks) == 1, 30.0), probe.texts()
    gc.collect()
    rss_before = rss_mb()
    stats0 = node.pipeline.stats()

    with FrameStream(probe, 30.0, lambda i: frames[i % 4]) as stream:
        time.sleep(0.3)
        sent_a = time.monotonic()
        probe.command("A")
        time.sleep(0.3)  # A is running now (0.5 s sleep + inference)
        for text in ("B", "C", "D", "E"):  # queue of 2: B and C are pushed out by D and E
            probe.command(text)
        assert wait_until(lambda: len(probe.masks) == 4, 40.0), probe.texts()
        time.sleep(0.3)
    gc.collect()
    growth = rss_mb() - rss_before
    stats = node.pipeline.stats()

    texts = probe.texts()
    for name in ("B", "C"):
        pattern = (
            rf"\[\d+\] failed: command queue full \(2\): dropped the oldest command \d+ "
            rf"'{name}' \(command '{name}'\)"
        )
        assert any(re.fullmatch(pattern, t) for t in texts), texts
    assert stats.served - stats0.served == 3 and stats.commands_dropped == 2
    assert len(probe.masks) == 4  # warm up, A, D, E; nothing else
    # No backlog: each job took the newest frame when it started, never a queued old one.
    a, d, e = probe.masks[1:]
    sent = {f"f{i}": t for i, t in enumerate(stream.sent)}
    assert sent_a - 0.2 <= sent[a.msg.header.frame_id] <= sent_a + 0.5
    assert sent[d.msg.header.frame_id] >= a.t - 0.3
    assert sent[e.msg.header.frame_id] >= d.t - 0.3
    # Callbacks kept up during inference (they only decode and replace the one frame slot).
    frames_in = stats.frames_received - stats0.frames_received
    assert frames_in >= 0.5 * len(stream.sent), (frames_in, len(stream.sent))
    assert stats.frames_dropped - stats0.frames_dropped >= frames_in - 5
    assert growth < 50.0, f"RSS grew {growth:.1f} MB during a {len(stream.sent)}-frame flood"

    # Model failures (a CUDA OOM, an exception) are reported and the next command is served.
    with FrameStream(probe, 10.0, lambda i: frames[i % 4]):
        n = len(probe.explanations)
        probe.command("trigger out of memory")
        probe.wait_text(
            n,
            r"^\[\d+\] failed: out of memory while running the model "
            r"\(OutOfMemoryError: CUDA out of memory",
        )
        probe.command("please raise an error")
        text = probe.wait_text(n, r"^\[\d+\] failed: model error")
        assert re.fullmatch(
            r"\[\d+\] failed: model error: RuntimeError: boom \(command 'please raise an error'\)",
            text,
        ), text
        probe.command("the ball")
        assert wait_until(lambda: len(probe.masks) == 5, 30.0), probe.texts()


def test_continuous_mode_and_stop_command(ros: Ros, shared_model: Any) -> None:
    node = ros.add(
        SharedModelNode(
            shared_model,
            namespace="/lisa_cont",
            context=ros.context,
            parameter_overrides=params(
                model=str(TINY), mode="segment", continuous=True, max_rate_hz=2.0
            ),
        )
    )
    probe = Probe(ros, "/lisa_cont", image_qos=qos_profile_sensor_data)
    probe.connect(node)
    rgb = ramp_image(seed=2)
    with FrameStream(probe, 15.0, lambda i: encoded(rgb, "rgb8")[0]):
        start = time.monotonic()
        probe.command("the ball")
        assert wait_until(lambda: len(probe.masks) >= 3, 30.0), probe.texts()
        elapsed = time.monotonic() - start
        stats = node.pipeline.stats()
        assert stats.standing_runs >= 2
        assert stats.served <= 1 + elapsed * 2.0 + 1  # at most max_rate_hz re-runs
        ids = [int(r.msg.header.frame_id[1:]) for r in probe.masks]
        assert ids == sorted(set(ids)), ids  # every run on a newer frame
        n = len(probe.explanations)
        probe.command("STOP ")
        assert wait_until(lambda: any("] stopped:" in t for t in probe.texts()[n:]), 10.0)
        stopped = [re.sub(r"^\[\d+\] ", "", t) for t in probe.texts() if "] stopped:" in t]
        assert stopped == ["stopped: ended standing command 'the ball', cancelled 0 waiting"]
        # At most the run in flight when "stop" came may still finish; then masks stop for good
        # while frames keep coming (a standing command would run again within an inference).
        count = len(probe.masks)
        assert wait_until(lambda: time.monotonic() - probe.masks[-1].t > 3.0, 12.0, 0.1)
        assert len(probe.masks) - count <= 1, "standing command still running after stop"
    assert node.pipeline.standing is None


def test_lifecycle_transitions_load_serve_ignore_and_free(ros: Ros) -> None:
    node = ros.add(
        LisaNode(
            namespace="/lisa_life",
            context=ros.context,
            parameter_overrides=params(
                autostart=False, model=str(TINY), mode="segment", image_reliability="reliable"
            ),
        )
    )
    probe = Probe(ros, "/lisa_life")
    assert node.state == "unconfigured" and node.model is None and node.pipeline is None
    # Only the answers exist before configure (a command is answered 'not ready' then).
    made = {p.topic_name for p in node.publishers if p.topic_name in probe.output_topics}
    assert made == {"/lisa_life/explanation"}

    def call(srv_type: Any, name: str, request: Any) -> Any:
        client = probe.node.create_client(srv_type, f"/lisa_life/lisa_node/{name}")
        assert client.wait_for_service(10.0)
        future = client.call_async(request)
        assert wait_until(future.done, 30.0)
        probe.node.destroy_client(client)
        return future.result()

    # configure through the lifecycle service, as `ros2 lifecycle set` does: loads the model.
    request = ChangeState.Request(transition=Transition(id=Transition.TRANSITION_CONFIGURE))
    assert call(ChangeState, "change_state", request).success
    assert node.state == "inactive" and node.model is not None
    model_ref = weakref.ref(node.model)

    rgb = ramp_image(seed=4)
    msg = encoded(rgb, "rgb8")[0]
    assert wait_until(lambda: probe.image_pub.get_subscription_count() > 0, 10.0)
    assert wait_until(lambda: probe.command_pub.get_subscription_count() > 0, 10.0)

    def nothing_served(frame_id: str) -> None:
        """Frames are ignored; a command is answered 'not ready' and never reaches the model."""
        stats0 = node.pipeline.stats()
        n = len(probe.explanations)
        probe.frame(msg, frame_id)
        probe.command("the red ball")
        text = probe.wait_text(n, r"not ready")
        assert re.fullmatch(
            r"\[\d+\] failed: not ready: the node is inactive, not active "
            r"\(command 'the red ball'\)",
            text,
        ), text
        time.sleep(0.5)
        assert probe.masks == [] and probe.overlays == []
        stats = node.pipeline.stats()
        assert (stats.frames_received, stats.commands_received) == (
            stats0.frames_received,
            stats0.commands_received,
        )

    nothing_served("while_inactive")  # configured but not active

    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    probe.connect(node)
    probe.frame_taken(node, msg, "while_active")
    probe.command("the red ball")
    assert wait_until(lambda: probe.mask_for("while_active") is not None, 20.0), probe.texts()
    assert probe.wait_explanations(1) and len(probe.overlays) == 1

    assert node.trigger_deactivate() == TransitionCallbackReturn.SUCCESS
    probe.clear()
    nothing_served("after_deactivate")

    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert node.model is None and node.pipeline is None and node.config is None
    gc.collect()
    assert model_ref() is None, "the model is still referenced after cleanup"
    made = {p.topic_name for p in node.publishers if p.topic_name in probe.output_topics}
    assert made == {"/lisa_life/explanation"}
    state = call(GetState, "get_state", GetState.Request()).current_state
    assert state.label == "unconfigured"

    assert node.trigger_shutdown() == TransitionCallbackReturn.SUCCESS
    assert node.state == "finalized"


def test_live_node_and_replay_of_the_same_inputs_give_identical_masks(
    main, shared_model: Any, tmp_path: Path
) -> None:
    """What a recorded bag shows is what the robot does: the messages sent to the live node are
    recorded (as the CDR bytes rclpy serialises) and replayed through lisa-replay's path."""
    from rclpy.serialization import serialize_message
    from rosbags.rosbag2 import StoragePlugin, Writer
    from rosbags.typesys import Stores, get_typestore

    from lisa_model.predictor import LisaPredictor
    from lisa_ros.pipeline import ModeSegmenter, PipelineConfig, Success
    from lisa_ros.replay import replay_outcomes

    node, probe = main
    cases = [("rgb8", "the red ball"), ("bgr8", "what could roll?"), ("mono16", "the blue one")]
    live: dict[str, np.ndarray] = {}
    recorded: list[tuple[int, str, bytes]] = []
    for i, (encoding, text) in enumerate(cases):
        msg, _ = encoded(ramp_image(seed=100 + i), encoding)
        frame_id = f"replayed_{i}"
        header = probe.frame_taken(node, msg, frame_id)
        probe.command(text)
        assert wait_until(lambda fid=frame_id: probe.mask_for(fid) is not None, 20.0)
        live[frame_id] = as_array(probe.mask_for(frame_id).msg)
        t_ns = header.stamp.sec * 1_000_000_000 + header.stamp.nanosec
        recorded.append((t_ns, "/image", serialize_message(msg)))
        recorded.append((t_ns + 50_000_000, "/command", serialize_message(String(data=text))))

    bag = tmp_path / "recorded"
    ts = get_typestore(Stores.ROS2_HUMBLE)
    with Writer(bag, version=9, storage_plugin=StoragePlugin.SQLITE3) as writer:
        conns = {
            "/image": writer.add_connection("/image", "sensor_msgs/msg/Image", typestore=ts),
            "/command": writer.add_connection("/command", "std_msgs/msg/String", typestore=ts),
        }
        for t_ns, topic, raw in recorded:
            writer.write(conns[topic], t_ns, raw)

    segmenter = ModeSegmenter(LisaPredictor(shared_model), node.config.mode)
    config = node.config.pipeline  # the live node's own settings (pre-encoding off)
    assert isinstance(config, PipelineConfig) and not config.preencoding
    replayed = {
        p.outcome.frame.header.frame_id: p.outcome.mask
        for p in replay_outcomes(bag, segmenter, config)
        if isinstance(p.outcome, Success)
    }
    assert replayed.keys() == live.keys()
    for frame_id, mask in live.items():
        np.testing.assert_array_equal(replayed[frame_id], mask, err_msg=frame_id)
    assert any((m == 255).any() for m in live.values()), "the comparison needs non-empty masks"
