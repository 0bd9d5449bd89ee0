"""End-to-end latency of lisa_node over real rclpy pub/sub on loopback.

Measures, in one process (node + a probe node on one executor):

- command latency: publish a frame and a command together, time until the mask arrives
  (median and p95 over ``--runs``; every run is a new frame, so it includes the image encoding);
- continuous mode: a camera streams at ``--camera-hz`` with a standing command and no rate limit
  to speak of; masks per second over ``--seconds``.

Defaults use the reference fixture's tiny checkpoint on the CPU, which says how much the node
and ROS add around the model; pass ``--model``/``--device`` for a real one. Not a test: it prints
numbers and asserts nothing.

    python benchmarks/node_latency.py --runs 20 --size 480x640
"""

from __future__ import annotations

import argparse
import array
import os
import statistics
import threading
import time
from pathlib import Path

from lisa_model.options import MODES

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lisa_reference"


def _parse_size(text: str) -> tuple[int, int]:
    h, w = (int(v) for v in text.lower().split("x"))
    return h, w


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(FIXTURE / "lisa-tiny"), help="checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="")
    parser.add_argument("--mode", choices=MODES, default="segment")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--runs", type=int, default=15, help="commands for the latency numbers")
    parser.add_argument("--size", type=_parse_size, default=(480, 640), help="frame HxW")
    parser.add_argument("--seconds", type=float, default=8.0, help="continuous-mode duration")
    parser.add_argument("--camera-hz", type=float, default=30.0)
    return parser


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def run(args: argparse.Namespace) -> int:
    if Path(args.model).resolve().is_relative_to(FIXTURE):
        # The fixture's CLIP tower lives in its own hub cache (as the tests use it).
        os.environ.setdefault("HF_HUB_CACHE", str(FIXTURE / "hf_cache"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))

    import numpy as np
    import rclpy
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from lisa_ros.node import LisaNode

    h, w = args.size
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes() for _ in range(4)]
    reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)

    context = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    overrides = {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "mode": args.mode,
        "max_new_tokens": args.max_new_tokens,
        "image_reliability": "reliable",
        "image_wait_timeout": 10.0,
        "queue_size": 2,
    }
    node = LisaNode(
        namespace="/bench",
        context=context,
        parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
    )
    probe = Node("bench_probe", context=context)
    masks: list[tuple[str, float]] = []
    arrived = threading.Condition()

    def on_mask(msg: Image) -> None:
        with arrived:
            masks.append((msg.header.frame_id, time.perf_counter()))
            arrived.notify_all()

    probe.create_subscription(Image, "/bench/mask", on_mask, reliable)
    image_pub = probe.create_publisher(Image, "/bench/image", reliable)
    command_pub = probe.create_publisher(String, "/bench/command", reliable)

    def publish_frame(i: int) -> None:
        msg = Image(height=h, width=w, encoding="rgb8", step=3 * w)
        msg.header.frame_id = f"f{i}"
        msg.header.stamp = probe.get_clock().now().to_msg()
        msg.data = array.array("B", frames[i % len(frames)])
        image_pub.publish(msg)

    def wait_for(predicate, timeout: float) -> bool:
        with arrived:
            return arrived.wait_for(predicate, timeout)

    executor.add_node(node)
    executor.add_node(probe)
    spinner.start()
    try:
        start = time.perf_counter()
        while node.state != "active":
            if node.last_error or time.perf_counter() - start > 600:
                print(f"node did not start: {node.last_error}")
                return 1
            time.sleep(0.05)
        print(f"model ready in {time.perf_counter() - start:.1f} s on {node.model.device}")
        while image_pub.get_subscription_count() == 0 or command_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        time.sleep(0.5)

        # 1. command latency: frame + command published together -> mask received.
        latencies = []
        for i in range(args.runs + 1):  # the first run warms up
            t0 = time.perf_counter()
            publish_frame(i)
            command_pub.publish(String(data="the object in the middle"))
            if not wait_for(lambda i=i: any(f == f"f{i}" for f, _ in masks), 120.0):
                print(f"run {i}: no mask within 120 s")
                return 1
            if i:
                latencies.append(next(t for f, t in masks if f == f"f{i}") - t0)
        stats = node.pipeline.stats()
        inference = stats.inference_seconds / max(1, stats.served)
        print(
            f"command latency ({h}x{w} rgb8, mode {args.mode}, {args.runs} runs): "
            f"median {statistics.median(latencies) * 1000:.0f} ms, "
            f"p95 {percentile(latencies, 95) * 1000:.0f} ms, "
            f"min {min(latencies) * 1000:.0f} ms; mean model time {inference * 1000:.0f} ms"
        )

        # 2. continuous mode: reconfigure (cleanup, new parameters, configure, activate).
        node.trigger_deactivate()
        node.trigger_cleanup()
        node.set_parameters(
            [Parameter("continuous", value=True), Parameter("max_rate_hz", value=1000.0)]
        )
        node.trigger_configure()
        node.trigger_activate()
        while image_pub.get_subscription_count() == 0 or command_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        time.sleep(0.5)
        with arrived:
            masks.clear()
        command_pub.publish(String(data="the object in the middle"))
        t_start = time.perf_counter()
        i = 0
        while time.perf_counter() - t_start < args.seconds:
            publish_frame(i)
            i += 1
            time.sleep(max(0.0, t_start + i / args.camera_hz - time.perf_counter()))
        elapsed = time.perf_counter() - t_start
        with arrived:
            n = len(masks)
            first = masks[0][1] if masks else t_start
        steady = (n - 1) / (masks[-1][1] - first) if n > 1 else 0.0
        print(
            f"continuous mode: {n} masks in {elapsed:.1f} s with a {args.camera_hz:.0f} Hz camera "
            f"({i} frames): {n / elapsed:.2f} masks/s overall, {steady:.2f} masks/s steady"
        )
        print(f"pipeline: {node.pipeline.stats().summary()}")
    finally:
        executor.shutdown()
        spinner.join(10)
        node.destroy_node()
        probe.destroy_node()
        rclpy.try_shutdown(context=context)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
