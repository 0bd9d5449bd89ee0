"""End-to-end latency of lisa_node over real rclpy pub/sub on loopback.

Measures, in one process (node + a probe node on one executor):

- command latency: publish a frame and a command together, time until the mask arrives
  (median and p95 over ``--runs``; every run is a new frame, so it includes the image encoding);
- continuous mode: a camera streams at ``--camera-hz`` with a standing command and no rate limit
  to speak of; masks per second over ``--seconds``.

With ``--live`` it measures what pre-encoding buys instead: a camera streams at ``--camera-hz``
all along while a user sends ``--commands`` commands, each one a random gap (``--gap``, seeded by
``--seed``) after the previous result; command-to-result latency (publish the command -> its
``segmentation`` result, matched by the command text, which is unique per command) with
``preencode`` on, then off (the same node; the parameter applies live), beside the set-frame
latency (camera stopped, ``max_image_age`` 0, the last frame encoded, then the commands): the
latency floor of the model. Ratios printed: live on / set frame (target <= 1.5) and live off /
live on (target >= 3). ``--bench-model small`` runs an in-code model whose encoders dominate
(``benchmarks/bench_common.py``), saved to a temporary checkpoint and loaded by path.

Defaults use the reference fixture's tiny checkpoint on the CPU, which says how much the node
and ROS add around the model; pass ``--model``/``--device`` for a real one. Not a test: it prints
numbers and asserts nothing.

    python benchmarks/node_latency.py --runs 20 --size 480x640
    python benchmarks/node_latency.py --live --commands 20 --json live.json
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import statistics
import tempfile
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
    parser.add_argument("--live", action="store_true", help="pre-encoding on/off vs set frame")
    parser.add_argument("--commands", type=int, default=12, help="--live: commands per setting")
    parser.add_argument(
        "--gap",
        type=_parse_gap,
        default=(1.0, 3.0),
        help="--live: seconds MIN,MAX between a result and the next command (uniform)",
    )
    parser.add_argument("--seed", type=int, default=0, help="--live: seed of the gaps")
    parser.add_argument(
        "--bench-model",
        choices=("", "small"),
        default="",
        help="--live: an in-code model (random weights) instead of --model",
    )
    parser.add_argument(
        "--preencode-max-hz",
        type=float,
        default=None,
        help="--live: the node parameter (default: the node's default)",
    )
    parser.add_argument(
        "--max-image-age",
        type=float,
        default=None,
        help="--live: the node parameter for the live settings (default: the node's default)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="the node's threads parameter (torch CPU threads; 0 = torch's default)",
    )
    parser.add_argument("--json", default="", help="--live: write the figures here")
    return parser


def _parse_gap(text: str) -> tuple[float, float]:
    low, high = (float(v) for v in text.split(","))
    if not 0.0 <= low <= high:
        raise argparse.ArgumentTypeError(f"want MIN,MAX with 0 <= MIN <= MAX, got {text!r}")
    return low, high


def _node_overrides(args: argparse.Namespace, **extra: object) -> dict[str, object]:
    """The node's parameters for a benchmark run: the model options, reliable images, and
    ``extra``."""
    return {
        "model": args.model,
        "device": args.device,
        "dtype": args.dtype,
        "mode": args.mode,
        "max_new_tokens": args.max_new_tokens,
        "image_reliability": "reliable",
        "image_wait_timeout": 10.0,
        "threads": args.threads,
        **extra,
    }


def _random_frames(h: int, w: int, seed: int, count: int = 4) -> list[bytes]:
    """``count`` random ``(h, w, 3)`` uint8 frames as raw rgb8 bytes."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8).tobytes() for _ in range(count)]


def _wait_until_active(node, timeout: float = 600.0) -> bool:
    """Wait for the node to load its model and activate; say how long it took or why not."""
    start = time.perf_counter()
    while node.state != "active":
        if node.last_error or time.perf_counter() - start > timeout:
            print(f"node did not start: {node.last_error}")
            return False
        time.sleep(0.05)
    print(f"model ready in {time.perf_counter() - start:.1f} s on {node.model.device}")
    return True


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def _ros_environment(args: argparse.Namespace) -> None:
    if Path(args.model).resolve().is_relative_to(FIXTURE):
        # The fixture's CLIP tower lives in its own hub cache (as the tests use it).
        os.environ.setdefault("HF_HUB_CACHE", str(FIXTURE / "hf_cache"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))


def run(args: argparse.Namespace) -> int:
    _ros_environment(args)

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
    frames = _random_frames(h, w, seed=0)
    reliable = QoSProfile(depth=20, reliability=ReliabilityPolicy.RELIABLE)

    context = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    # Pre-encoding off: every command here is timed on a new frame, encoding included (with it
    # on, a command may take the previous frame, already encoded; --live measures that).
    overrides = _node_overrides(args, queue_size=2, preencode=False)
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
        if not _wait_until_active(node):
            return 1
        while image_pub.get_subscription_count() == 0 or command_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        time.sleep(0.5)

        # 1. command latency: frame + command published together -> mask received.
        latencies = []
        for i in range(args.runs + 1):  # the first run warms up
            before = node.pipeline.stats().frames_received
            t0 = time.perf_counter()
            publish_frame(i)
            # The command goes once the node holds the frame: the two topics may arrive in
            # either order, and a command before its frame would take the previous one.
            while node.pipeline.stats().frames_received == before:
                if time.perf_counter() - t0 > 30.0:
                    print(f"run {i}: frame not received within 30 s")
                    return 1
                time.sleep(0.001)
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


def _save_bench_model(name: str, directory: Path) -> str:
    """Build the in-code bench model ``name`` (random weights) and save it as a checkpoint."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_common import build_bench_model, make_tokenizer
    from model_speed import SIZES

    from lisa_model.checkpoint import save_lisa

    size = SIZES[name]
    model = build_bench_model(size, make_tokenizer(size.vocab_size))
    save_lisa(model, directory, llm_dtype=model.llm.dtype, include_vision_tower=True)
    return str(directory)


def _summary(latencies: list[float]) -> dict[str, float]:
    if not latencies:
        return {"median_ms": float("nan"), "p95_ms": float("nan"), "min_ms": float("nan")}
    return {
        "median_ms": statistics.median(latencies) * 1000,
        "p95_ms": percentile(latencies, 95) * 1000,
        "min_ms": min(latencies) * 1000,
    }


def run_live(args: argparse.Namespace) -> int:
    """``--live``: command-to-result latency under a streaming camera, pre-encoding on and off,
    beside the set-frame latency (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="lisa_bench_model_") as tmp:
        if args.bench_model:
            start = time.perf_counter()
            args.model = _save_bench_model(args.bench_model, Path(tmp) / args.bench_model)
            print(
                f"bench model {args.bench_model} built and saved in "
                f"{time.perf_counter() - start:.1f} s"
            )
        return _run_live(args)


def _run_live(args: argparse.Namespace) -> int:
    _ros_environment(args)
    import rclpy
    import torch
    from lisa_msgs.msg import Segmentation
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    from lisa_ros.node import LisaNode

    h, w = args.size
    frames = _random_frames(h, w, seed=args.seed)
    gaps = random.Random(args.seed)
    reliable = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)

    context = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    overrides = _node_overrides(args, preencode=True)
    if args.preencode_max_hz is not None:
        overrides["preencode_max_hz"] = args.preencode_max_hz
    if args.max_image_age is not None:
        overrides["max_image_age"] = args.max_image_age
    node = LisaNode(
        namespace="/bench",
        context=context,
        parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()],
    )
    probe = Node("bench_probe", context=context)
    results: dict[str, tuple[Segmentation, float]] = {}
    arrived = threading.Condition()

    def on_result(msg: Segmentation) -> None:
        with arrived:
            results[msg.command] = (msg, time.perf_counter())
            arrived.notify_all()

    probe.create_subscription(Segmentation, "/bench/segmentation", on_result, reliable)
    image_pub = probe.create_publisher(Image, "/bench/image", reliable)
    command_pub = probe.create_publisher(String, "/bench/command", reliable)
    camera_on = threading.Event()
    stop = threading.Event()
    sent_frames = [0]

    def camera() -> None:
        start, i = time.perf_counter(), 0
        while not stop.is_set():
            if not camera_on.wait(0.1):
                start, i = time.perf_counter(), 0
                continue
            msg = Image(height=h, width=w, encoding="rgb8", step=3 * w)
            msg.header.frame_id = f"f{sent_frames[0]}"
            msg.header.stamp = probe.get_clock().now().to_msg()
            msg.data = array.array("B", frames[sent_frames[0] % len(frames)])
            image_pub.publish(msg)
            sent_frames[0] += 1
            i += 1
            stop.wait(max(0.0, start + i / args.camera_hz - time.perf_counter()))

    counter = [0]

    def command_round(label: str, n: int, gap: tuple[float, float]) -> dict[str, object]:
        latencies, preencoded, errors = [], 0, []
        for _ in range(n):
            time.sleep(gaps.uniform(*gap))
            counter[0] += 1
            text = f"the object in the middle {counter[0]}"
            t0 = time.perf_counter()
            command_pub.publish(String(data=text))
            with arrived:
                if not arrived.wait_for(lambda t=text: t in results, 120.0):
                    raise RuntimeError(f"{label}: no result for {text!r} within 120 s")
                msg, t1 = results[text]
            if msg.error_code:
                errors.append(msg.error_code)
                continue
            latencies.append(t1 - t0)
            preencoded += bool(msg.preencoded)
        return {
            "commands": n,
            "latencies_ms": [x * 1000 for x in latencies],
            **_summary(latencies),
            "preencoded": preencoded,
            "errors": errors,
        }

    executor.add_node(node)
    executor.add_node(probe)
    spinner.start()
    camera_thread = threading.Thread(target=camera, daemon=True)
    camera_thread.start()
    try:
        if not _wait_until_active(node):
            return 1
        node_hz = node.config.pipeline.preencode_max_hz
        max_age = node.config.pipeline.max_image_age
        torch_threads = node.config.threads or torch.get_num_threads()
        while image_pub.get_subscription_count() == 0 or command_pub.get_subscription_count() == 0:
            time.sleep(0.05)
        camera_on.set()
        command_round("warm-up", 1, (0.5, 0.5))

        phases: dict[str, dict[str, object]] = {}
        for label, on in (("live, preencode on", True), ("live, preencode off", False)):
            node.set_parameters([Parameter("preencode", value=on)])
            phases[label] = command_round(label, args.commands, args.gap)

        # Set frame: the camera stops, any age is fresh, the last frame gets encoded.
        node.set_parameters(
            [Parameter("preencode", value=True), Parameter("max_image_age", value=0.0)]
        )
        camera_on.clear()
        time.sleep(0.3)  # the camera thread notices
        deadline = time.perf_counter() + 120.0
        quiet_since, received = time.perf_counter(), -1
        while True:  # no frame for 0.5 s (the camera stopped), the newest one encoded
            now = time.perf_counter()
            count = node.pipeline.stats().frames_received
            if count != received:
                quiet_since, received = now, count
            newest, encoded = node.pipeline.newest_frame, node.pipeline.encoded_frame
            if now - quiet_since > 0.5 and newest is not None and encoded is newest:
                break
            if now > deadline:
                name = newest.frame_id if newest is not None else None
                print(f"the newest frame {name} was not encoded within 120 s")
                return 1
            time.sleep(0.02)
        phases["set frame (already encoded)"] = command_round(
            "set frame", args.commands, (0.2, 0.2)
        )
    finally:
        stop.set()
        camera_on.set()
        camera_thread.join(5)
        executor.shutdown()
        spinner.join(10)
        node.destroy_node()
        probe.destroy_node()
        rclpy.try_shutdown(context=context)

    on = phases["live, preencode on"]["median_ms"]
    off = phases["live, preencode off"]["median_ms"]
    floor = phases["set frame (already encoded)"]["median_ms"]
    ratios = {"live_on_vs_set_frame": on / floor, "live_off_vs_live_on": off / on}
    model_name = args.bench_model or Path(args.model).name
    print(
        f"\n## Live latency ({model_name}, {args.device}, {h}x{w} rgb8 at {args.camera_hz:g} Hz, "
        f"mode {args.mode}, gaps {args.gap[0]:g}-{args.gap[1]:g} s, seed {args.seed}, "
        f"preencode_max_hz {node_hz:g}, max_image_age {max_age:g} s, "
        f"{torch_threads} torch threads)\n"
    )
    print("| setting | commands | latency ms (median) | p95 | min | pre-encoded | errors |")
    print("|---|---|---|---|---|---|---|")
    for label, ph in phases.items():
        ok = len(ph["latencies_ms"])
        print(
            f"| {label} | {ph['commands']} | {ph['median_ms']:.0f} | {ph['p95_ms']:.0f} | "
            f"{ph['min_ms']:.0f} | {ph['preencoded']}/{ok} | "
            f"{', '.join(ph['errors']) or 'none'} |"
        )
    print("\n| ratio (of medians) | value | target | met |")
    print("|---|---|---|---|")
    print(
        f"| live with preencode / set frame | {ratios['live_on_vs_set_frame']:.2f} | <= 1.5 | "
        f"{'yes' if ratios['live_on_vs_set_frame'] <= 1.5 else 'no'} |"
    )
    print(
        f"| live preencode off / on | {ratios['live_off_vs_live_on']:.2f} | >= 3 | "
        f"{'yes' if ratios['live_off_vs_live_on'] >= 3 else 'no'} |"
    )
    if args.json:
        report = {
            "model": model_name,
            "device": args.device,
            "size": [h, w],
            "camera_hz": args.camera_hz,
            "mode": args.mode,
            "gap_s": list(args.gap),
            "seed": args.seed,
            "preencode_max_hz": node_hz,
            "max_image_age": max_age,
            "torch_threads": torch_threads,
            "phases": phases,
            "ratios": ratios,
        }
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_live(args) if args.live else run(args)


if __name__ == "__main__":
    raise SystemExit(main())
