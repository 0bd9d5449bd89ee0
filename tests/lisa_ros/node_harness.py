"""Test harness for lisa_node over real rclpy on loopback: a module-wide executor (``ros``), a
model loaded once (``shared_model``), nodes that share it (``SharedModelNode``), a probe that
plays camera and user and records the outputs (``Probe``), frame makers and waits.

Test modules set ``ROS_AUTOMATIC_DISCOVERY_RANGE``/``ROS_DOMAIN_ID`` before importing this.
"""

from __future__ import annotations

import array
import re
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from lisa_ros.node import LisaNode

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "lisa_reference" / "lisa-tiny"
H, W = 48, 64  # functional-test frames; the flood uses 480 x 640
RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
OUTPUTS = ("mask", "mask/compressed", "overlay", "explanation")
START_SECONDS = 120.0  # generous: a loaded CI machine starts Python + torch slowly


# ------------------------------------------------------------------------------------ harness


@dataclass
class Ros:
    context: Context
    executor: MultiThreadedExecutor
    nodes: list[Node] = field(default_factory=list)

    def add(self, node: Node) -> Any:
        self.nodes.append(node)
        self.executor.add_node(node)
        return node


class SlowSegmenter:
    """Wraps the real segmenter: ``delay`` seconds more per predict; queries containing
    "out of memory" / "raise an error" raise what a CUDA OOM / a broken model would."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner, self.delay = inner, delay

    def set_image(self, rgb: np.ndarray) -> None:
        self.inner.set_image(rgb)

    def predict(self, query: str, explain: bool = False, max_new_tokens: int = 64) -> Any:
        import torch

        if "out of memory" in query:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if "raise an error" in query:
            raise RuntimeError("boom")
        time.sleep(self.delay)
        return self.inner.predict(query, explain=explain, max_new_tokens=max_new_tokens)


class SharedModelNode(LisaNode):
    """LisaNode that takes the module's already loaded model (optionally a wrapped segmenter)."""

    def __init__(
        self, model: Any, wrap: Callable[[Any], Any] | None = None, **kwargs: Any
    ) -> None:
        self._shared_model, self._wrap = model, wrap
        super().__init__(**kwargs)

    def load_model(self, config: Any) -> Any:
        self.resolve_device(config)
        return self._shared_model

    def build_segmenter(self, model: Any, config: Any) -> Any:
        segmenter = super().build_segmenter(model, config)
        return self._wrap(segmenter) if self._wrap else segmenter


def wait_until(predicate: Callable[[], bool], timeout: float, period: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(period)
    return predicate()


def params(**values: Any) -> list[Parameter]:
    return [Parameter(k, value=v) for k, v in values.items()]


@dataclass
class Received:
    msg: Any
    t: float  # monotonic receipt time


class Probe:
    """Camera + user + output recorder for the node in namespace ``ns``."""

    def __init__(self, ros: Ros, ns: str, image_qos: QoSProfile = RELIABLE) -> None:
        self.ns = ns
        self.node: Node = ros.add(Node(f"probe{ns.replace('/', '_')}", context=ros.context))
        self.lock = threading.Lock()
        self.masks: list[Received] = []
        self.pngs: list[Received] = []
        self.overlays: list[Received] = []
        self.explanations: list[Received] = []
        for topic, kind, store in (
            ("mask", Image, self.masks),
            ("mask/compressed", CompressedImage, self.pngs),
            ("overlay", Image, self.overlays),
            ("explanation", String, self.explanations),
        ):
            self.node.create_subscription(
                kind, f"{ns}/{topic}", lambda m, s=store: self._record(s, m), RELIABLE
            )
        self.image_pub = self.node.create_publisher(Image, f"{ns}/image", image_qos)
        self.compressed_pub = self.node.create_publisher(
            CompressedImage, f"{ns}/image/compressed", image_qos
        )
        self.command_pub = self.node.create_publisher(String, f"{ns}/command", RELIABLE)
        self.output_topics = {f"{ns}/{t}" for t in OUTPUTS}

    def clear(self) -> None:
        with self.lock:
            for store in (self.masks, self.pngs, self.overlays, self.explanations):
                store.clear()

    def _record(self, store: list[Received], msg: Any) -> None:
        with self.lock:
            store.append(Received(msg, time.monotonic()))

    def texts(self) -> list[str]:
        with self.lock:
            return [r.msg.data for r in self.explanations]

    def connect(self, lisa: LisaNode, compressed: bool = False, timeout: float = 15.0) -> None:
        """Wait for the node to be active and for every topic pair to be matched."""
        assert wait_until(lambda: lisa.state == "active", 30.0), lisa.state
        image_pub = self.compressed_pub if compressed else self.image_pub
        outputs = [p for p in lisa.publishers if p.topic_name in self.output_topics]

        def matched() -> bool:
            return (
                image_pub.get_subscription_count() > 0
                and self.command_pub.get_subscription_count() > 0
                and all(p.get_subscription_count() > 0 for p in outputs)
            )

        assert wait_until(matched, timeout), "probe and node did not match"

    def now(self) -> Any:
        return self.node.get_clock().now()

    def frame(self, msg: Image | CompressedImage, frame_id: str, age: float = 0.0) -> Any:
        msg.header.frame_id = frame_id
        stamp = self.now().nanoseconds - int(age * 1e9)
        msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp, 1_000_000_000)
        (self.compressed_pub if isinstance(msg, CompressedImage) else self.image_pub).publish(msg)
        return msg.header

    def command(self, text: str) -> None:
        self.command_pub.publish(String(data=text))

    def frame_taken(self, lisa: LisaNode, msg: Image | CompressedImage, frame_id: str) -> Any:
        """``frame``, then wait until ``lisa``'s pipeline holds it, so a command sent next pairs
        with this frame however slowly the host delivers it (image and command are two topics)."""
        before = lisa.pipeline.stats().frames_received
        header = self.frame(msg, frame_id)
        taken = wait_until(lambda: lisa.pipeline.stats().frames_received > before, 10.0)
        assert taken, f"{lisa.get_name()} did not receive frame {frame_id!r}"
        return header

    def mask_for(self, frame_id: str) -> Received | None:
        with self.lock:
            return next((r for r in self.masks if r.msg.header.frame_id == frame_id), None)

    def wait_explanations(self, n: int, timeout: float = 20.0) -> list[str]:
        assert wait_until(lambda: len(self.explanations) >= n, timeout), self.texts()
        return self.texts()

    def wait_text(self, start: int, pattern: str, timeout: float = 20.0) -> str:
        """The first explanation from index ``start`` on that matches the regular expression
        ``pattern`` (``re.search``), waiting for it. Matching by content, not by position, keeps
        a test right when a report of an earlier test or another topic's message arrives late."""

        def found() -> str | None:
            return next((t for t in self.texts()[start:] if re.search(pattern, t)), None)

        assert wait_until(lambda: found() is not None, timeout), (pattern, self.texts()[start:])
        return found()


def image_msg(
    height: int, width: int, encoding: str, data: bytes, step: int, big: int = 0
) -> Image:
    msg = Image(height=height, width=width, encoding=encoding, step=step, is_bigendian=big)
    msg.data = array.array("B", data)
    return msg


def ramp_image(seed: int, hw: tuple[int, int] = (H, W)) -> np.ndarray:
    """(H, W, 3) uint8 RGB: smooth colour ramps plus a little seeded noise."""
    h, w = hw
    yy, xx = np.mgrid[0:h, 0:w]
    rgb = np.stack([xx * 255 // max(1, w - 1), yy * 255 // max(1, h - 1), (xx + yy) % 256], -1)
    noise = np.random.default_rng(seed).integers(0, 20, (h, w, 3))
    return np.clip(rgb + noise, 0, 255).astype(np.uint8)


def encoded(rgb: np.ndarray, encoding: str) -> tuple[Image, np.ndarray]:
    """An Image message of ``rgb`` in ``encoding`` and the RGB a correct decoder returns."""
    h, w = rgb.shape[:2]
    if encoding == "rgb8":
        return image_msg(h, w, encoding, rgb.tobytes(), 3 * w), rgb
    if encoding == "bgr8":
        return image_msg(h, w, encoding, rgb[:, :, ::-1].tobytes(), 3 * w), rgb
    if encoding == "rgba8":
        rgba = np.dstack([rgb, np.full((h, w), 77, np.uint8)])
        return image_msg(h, w, encoding, rgba.tobytes(), 4 * w), rgb
    grey8 = rgb[:, :, 0]
    if encoding == "mono8":
        return image_msg(h, w, encoding, grey8.tobytes(), w), np.repeat(grey8[:, :, None], 3, 2)
    if encoding == "mono16":  # little-endian rows padded by 6 bytes
        grey16 = grey8.astype(np.uint16) * 257 + 100
        pad = 6
        rows = np.zeros((h, 2 * w + pad), np.uint8)
        rows[:, : 2 * w] = grey16.astype("<u2").view(np.uint8).reshape(h, 2 * w)
        want = ((grey16.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        msg = image_msg(h, w, encoding, rows.tobytes(), 2 * w + pad)
        return msg, np.repeat(want[:, :, None], 3, 2)
    raise AssertionError(encoding)


def as_array(msg: Image) -> np.ndarray:
    channels = {"mono8": 1, "rgb8": 3}[msg.encoding]
    data = np.frombuffer(msg.data, np.uint8).reshape(msg.height, msg.step)
    pixels = data[:, : msg.width * channels].reshape(msg.height, msg.width, channels)
    return pixels[:, :, 0] if channels == 1 else pixels


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    raise AssertionError("no VmRSS in /proc/self/status")


class FrameStream:
    """Publishes ``make(i)`` frames at ``hz`` from a thread; ``sent[i]`` = monotonic time."""

    def __init__(self, probe: Probe, hz: float, make: Callable[[int], Image]) -> None:
        self.probe, self.hz, self.make = probe, hz, make
        self.sent: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> FrameStream:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        start = time.monotonic()
        while not self._stop.is_set():
            i = len(self.sent)
            self.probe.frame(self.make(i), f"f{i}")
            self.sent.append(time.monotonic())
            self._stop.wait(max(0.0, start + (i + 1) / self.hz - time.monotonic()))


class NodeProcess:
    """A node process whose output is collected line by line."""

    def __init__(self, args: list[str], namespace: str, params: list[str] | None = None) -> None:
        """``args`` then ``--ros-args``: each of ``params`` (default: the tiny checkpoint as the
        model) as ``-p``, and the namespace."""
        self.namespace = namespace
        params = [f"model:={TINY}"] if params is None else params
        ros = [a for p in params for a in ("-p", p)]
        args = [*args, "--ros-args", *ros, "-r", f"__ns:={namespace}"]
        self.proc = subprocess.Popen(
            args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, seconds: float = START_SECONDS) -> None:
        deadline = time.monotonic() + seconds
        while not any(text in line for line in self.lines):
            assert self.proc.poll() is None, f"exited before {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} within {seconds} s:\n{self.output}"
            time.sleep(0.05)

    def exit_code_within(self, seconds: float) -> int:
        try:
            return self.proc.wait(seconds)
        except subprocess.TimeoutExpired:
            message = f"still running {seconds} s after the stop request:\n{self.output}"
            raise AssertionError(message) from None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(5)
