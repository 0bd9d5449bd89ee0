"""Robustness of the real ``lisa_node`` process: malformed inputs, a frame flood, kill and
respawn, commands in flight.

Starts ``python -m lisa_ros.node`` (the process ``ros2 run lisa_ros lisa_node`` runs) with
``autostart:=false`` and drives it as a lifecycle manager would (``configure`` then ``activate``
over its ``change_state`` service); this script is the camera and the user, over real rclpy on
loopback. It prints:

1. malformed inputs: frames with unknown encodings, sizes and steps that do not fit the data,
   empty, huge and truncated frames; commands empty, blank, huge, with control characters,
   bytes read as Latin-1, odd Unicode (``--seed`` picks the values), sent in ``--malformed``
   rounds (one of each kind and a valid command, then wait for the answers) while a 5 Hz camera
   sends valid frames; the count of each kind, the typed answers the node gave to the commands,
   crashes (the process died: must be 0) and the latency of a valid command right after them;
2. a frame flood: ``--camera-hz`` 480x640 rgb8 frames for ``--flood-seconds`` with a command
   now and then; the node process's RSS (``/proc/<pid>/status`` VmRSS) at the start, its
   maximum and at the end;
3. kill and respawn: SIGKILL, then a supervisor loop restarts the process ``--respawn-delay``
   seconds after it died, as ``launch_ros`` does with ``respawn:=true`` (``launch`` is not
   installed here, so the respawn is emulated), then configure + activate over the lifecycle
   services; kill -> first valid result, with the steps in between;
4. pairing: ``--in-flight`` commands published at once on the topic plus as many ``segment``
   action goals, each typed ``segmentation`` result checked against the command it answers
   (text and id; topic ids in send order; each goal's result its own command): mismatches must
   be 0.

Not a test: ``--quick`` is the smoke run of ``tests/test_benchmarks.py``.

    python benchmarks/node_stress.py --json stress.json
    python benchmarks/node_stress.py --quick
"""

from __future__ import annotations

import argparse
import array
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lisa_reference"
NAMESPACE = "/stress"
VALID = "the object in the middle"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(FIXTURE / "lisa-tiny"), help="checkpoint")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--malformed", type=int, default=5, help="inputs of each kind")
    parser.add_argument("--flood-seconds", type=float, default=60.0)
    parser.add_argument("--camera-hz", type=float, default=30.0)
    parser.add_argument("--respawn-delay", type=float, default=2.0, help="launch file default")
    parser.add_argument("--kills", type=int, default=2, help="kill/respawn cycles")
    parser.add_argument("--in-flight", type=int, default=4, help="topic commands (and goals)")
    parser.add_argument("--quick", action="store_true", help="smoke run (well under 90 s)")
    parser.add_argument("--json", default="")
    return parser


# ----------------------------------------------------------------------------- the process


class Supervised:
    """The node process under a respawn loop like ``launch_ros``'s ``respawn=True``: when the
    process exits (and we are not stopping), start it again ``delay`` seconds later."""

    def __init__(self, args: list[str], delay: float) -> None:
        self.args, self.delay = args, delay
        self.lines: list[str] = []
        self.starts: list[float] = []  # perf_counter of each (re)start
        self.exits: list[tuple[float, int]] = []  # perf_counter and status of each exit
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.proc = self._spawn()
        self._loop = threading.Thread(target=self._supervise, daemon=True)
        self._loop.start()

    def _spawn(self) -> subprocess.Popen:
        proc = subprocess.Popen(
            self.args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        self.starts.append(time.perf_counter())
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()
        return proc

    def _read(self, proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self.lines.append(line)

    def _supervise(self) -> None:
        while not self._stopping.is_set():
            with self._lock:
                proc = self.proc
            status = proc.wait()
            self.exits.append((time.perf_counter(), status))
            if self._stopping.wait(self.delay):
                return
            with self._lock:
                self.proc = self._spawn()

    @property
    def pid(self) -> int:
        with self._lock:
            return self.proc.pid

    def alive(self) -> bool:
        with self._lock:
            return self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL the running process; the perf_counter time of the kill."""
        with self._lock:
            t = time.perf_counter()
            self.proc.send_signal(signal.SIGKILL)
        return t

    def stop(self) -> None:
        self._stopping.set()
        with self._lock:
            proc = self.proc
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._loop.join(5)


def rss_mib(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------- malformed input


def malformed_frames(rng: random.Random, n: int) -> dict[str, list[dict[str, Any]]]:
    """Image message fields by kind (``height``, ``width``, ``encoding``, ``step``, ``data``)."""

    def noise(size: int) -> bytes:
        return rng.randbytes(size)

    def frame(h: int, w: int, enc: str, step: int, data: bytes, big: int = 0) -> dict:
        return {"height": h, "width": w, "encoding": enc, "step": step, "data": data, "big": big}

    kinds: dict[str, list[dict[str, Any]]] = {
        k: []
        for k in (
            "unknown encoding",
            "wrong size",
            "wrong step",
            "empty",
            "huge",
            "truncated data",
        )
    }
    for _ in range(n):
        h, w = rng.randint(1, 64), rng.randint(1, 64)
        enc = rng.choice(["yuv_weird", "", "RGB8 ", "bayer_zzzz8", "32SC9", "jpeg", "\x7f"])
        kinds["unknown encoding"].append(frame(h, w, enc, 3 * w, noise(3 * w * h)))
        kinds["wrong size"].append(
            frame(h + rng.randint(1, 50), w, "rgb8", 3 * w, noise(3 * w * h))
        )
        kinds["wrong step"].append(
            frame(
                h, w, rng.choice(["rgb8", "bgr8", "mono16"]), rng.randint(0, w), noise(3 * w * h)
            )
        )
        kinds["empty"].append(frame(rng.choice([0, h]), rng.choice([0, w]), "rgb8", 0, b""))
        huge = rng.choice([(65535, 65535), (1 << 20, 3), (4, 1 << 24)])
        kinds["huge"].append(frame(huge[0], huge[1], "rgb8", 3 * huge[1], noise(4096)))
        cut = rng.randint(1, 3 * w * h)
        kinds["truncated data"].append(frame(h, w, "rgb8", 3 * w, noise(3 * w * h - cut)))
    # A big real frame (1080p rgb8) with a step one byte short, a 16-bit one flagged big-endian.
    kinds["huge"].append(frame(1080, 1920, "rgb8", 5759, noise(1080 * 5760)))
    kinds["wrong step"].append(frame(48, 64, "mono16", 64, noise(48 * 64), big=1))
    return kinds


def malformed_commands(rng: random.Random, n: int) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {
        k: []
        for k in (
            "empty",
            "blank",
            "huge",
            "control characters",
            "bytes as Latin-1",
            "odd unicode",
        )
    }
    for _ in range(n):
        kinds["empty"].append("")
        kinds["blank"].append("".join(rng.choice(" \t\n\r\u00a0\u2003") for _ in range(40)))
        kinds["huge"].append(VALID * rng.randint(30, 5000))
        ctrl = "".join(chr(rng.randint(1, 31)) for _ in range(8))
        kinds["control characters"].append(rng.choice([ctrl, f"the cup{ctrl}", "\x1b[31mred"]))
        kinds["bytes as Latin-1"].append(rng.randbytes(rng.randint(1, 200)).decode("latin-1"))
        kinds["odd unicode"].append(
            rng.choice(["\u202eevil\u202c", "\ufeff\u200b", "🤖" * 300, "a\u0301" * 100, "\ufffd"])
        )
    return kinds


# ---------------------------------------------------------------------------------- the run


def run(args: argparse.Namespace) -> int:  # noqa: C901 (one scenario after the other)
    if args.quick:
        args.malformed = min(args.malformed, 2)
        args.flood_seconds = min(args.flood_seconds, 5.0)
        args.kills = min(args.kills, 1)
        args.in_flight = min(args.in_flight, 3)
    if Path(args.model).resolve().is_relative_to(FIXTURE):
        os.environ.setdefault("HF_HUB_CACHE", str(FIXTURE / "hf_cache"))
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")
    os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))

    import numpy as np
    import rclpy
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState, GetState
    from lisa_msgs.action import Segment
    from lisa_msgs.msg import Segmentation
    from rclpy.action import ActionClient
    from rclpy.context import Context
    from rclpy.executors import MultiThreadedExecutor
    from rclpy.node import Node
    from rclpy.qos import QoSProfile, ReliabilityPolicy
    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    rng = random.Random(args.seed)
    reliable = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE)
    context = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    probe = Node("stress_probe", context=context)
    results: list[tuple[Segmentation, float]] = []
    arrived = threading.Condition()

    def on_result(msg: Segmentation) -> None:
        with arrived:
            results.append((msg, time.perf_counter()))
            arrived.notify_all()

    probe.create_subscription(Segmentation, f"{NAMESPACE}/segmentation", on_result, reliable)
    image_pub = probe.create_publisher(Image, f"{NAMESPACE}/image", reliable)
    command_pub = probe.create_publisher(String, f"{NAMESPACE}/command", reliable)
    change_state = probe.create_client(ChangeState, f"{NAMESPACE}/lisa_node/change_state")
    get_state = probe.create_client(GetState, f"{NAMESPACE}/lisa_node/get_state")
    segment = ActionClient(probe, Segment, f"{NAMESPACE}/segment")
    executor.add_node(probe)
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()

    h, w = 480, 640
    pictures = [
        np.random.default_rng(args.seed + i).integers(0, 256, (h, w, 3), np.uint8).tobytes()
        for i in range(4)
    ]
    frame_count = [0]

    def valid_frame() -> None:
        msg = Image(height=h, width=w, encoding="rgb8", step=3 * w)
        msg.header.frame_id = f"f{frame_count[0]}"
        msg.header.stamp = probe.get_clock().now().to_msg()
        msg.data = array.array("B", pictures[frame_count[0] % len(pictures)])
        image_pub.publish(msg)
        frame_count[0] += 1

    class Camera:
        """Valid frames at ``hz`` from a thread while the block runs."""

        def __init__(self, hz: float) -> None:
            self.hz, self.stop = hz, threading.Event()
            self.thread = threading.Thread(target=self.run, daemon=True)

        def run(self) -> None:
            while not self.stop.wait(1.0 / self.hz):
                valid_frame()

        def __enter__(self) -> None:
            self.thread.start()

        def __exit__(self, *exc: object) -> None:
            self.stop.set()
            self.thread.join(5)

    def result_for(text: str, timeout: float, after: float = 0.0) -> tuple[Any, float] | None:
        with arrived:
            arrived.wait_for(
                lambda: any(m.command == text and t >= after for m, t in results), timeout
            )
            return next(((m, t) for m, t in results if m.command == text and t >= after), None)

    def call(client: Any, request: Any, timeout: float) -> Any:
        if not client.wait_for_service(timeout_sec=timeout):
            return None
        future = client.call_async(request)
        deadline = time.perf_counter() + timeout
        while not future.done() and time.perf_counter() < deadline:
            time.sleep(0.01)
        if not future.done():
            client.remove_pending_request(future)
            return None
        return future.result()

    def transition(tid: int, timeout: float = 300.0) -> bool:
        request = ChangeState.Request()
        request.transition.id = tid
        response = call(change_state, request, timeout)
        return bool(response and response.success)

    def bring_up(timeout: float = 300.0) -> dict[str, float]:
        """configure + activate over the services; perf_counter times of each step."""
        t: dict[str, float] = {}
        # Poll get_state with short waits: after a kill, discovery may still list the dead
        # process's service, and a request to it is never answered.
        deadline = time.perf_counter() + timeout
        while call(get_state, GetState.Request(), 1.0) is None:
            if time.perf_counter() > deadline:
                raise RuntimeError("lifecycle services did not appear")
        t["services"] = time.perf_counter()
        if not transition(Transition.TRANSITION_CONFIGURE, timeout):
            raise RuntimeError("configure failed:\n" + "".join(node.lines[-20:]))
        t["configured"] = time.perf_counter()
        if not transition(Transition.TRANSITION_ACTIVATE, timeout):
            raise RuntimeError("activate failed")
        t["active"] = time.perf_counter()
        deadline = time.perf_counter() + 60
        while image_pub.get_subscription_count() == 0 and time.perf_counter() < deadline:
            time.sleep(0.02)
        return t

    def valid_command(label: str, timeout: float = 120.0) -> float:
        """A fresh frame, then a command; seconds from the command to its result."""
        text = f"{VALID} {label}"
        valid_frame()
        t0 = time.perf_counter()
        command_pub.publish(String(data=text))
        got = result_for(text, timeout, after=t0)
        if got is None:
            raise RuntimeError(f"no result for {text!r} within {timeout} s")
        if got[0].error_code:
            raise RuntimeError(f"{text!r} failed: {got[0].error_code}: {got[0].error}")
        return got[1] - t0

    node_args = [
        sys.executable, "-m", "lisa_ros.node", "--ros-args",
        "-p", f"model:={args.model}", "-p", f"device:={args.device}", "-p", "autostart:=false",
        "-p", "mode:=segment",
        "-p", "image_reliability:=reliable", "-p", "image_wait_timeout:=10.0",
        "-r", f"__ns:={NAMESPACE}",
    ]  # fmt: skip
    report: dict[str, Any] = {"model": Path(args.model).name, "device": args.device}
    node = Supervised(node_args, args.respawn_delay)
    try:
        t_start = time.perf_counter()
        bring_up()
        print(f"node process {node.pid} active in {time.perf_counter() - t_start:.1f} s")
        while command_pub.get_subscription_count() == 0:
            time.sleep(0.02)
        first = valid_command("warm-up")
        baseline = [valid_command(f"baseline {i}") for i in range(3)]
        print(f"valid command: first {first * 1000:.0f} ms, then {_ms(baseline)}")

        # 1. Malformed inputs.
        exits_before = len(node.exits)
        frame_kinds = malformed_frames(rng, args.malformed)
        command_kinds = malformed_commands(rng, args.malformed)
        sent_frames: Counter[str] = Counter()
        sent_commands: Counter[str] = Counter()
        unpublishable: Counter[str] = Counter()
        # In rounds: one bad frame of each kind and a valid command, then one command of each
        # kind, then wait for the round's answers (a burst longer than the node's command
        # reader, queue_size + 10, would be cut by DDS, which is not what this measures). A
        # 5 Hz camera of valid frames runs meanwhile, so servable commands are served.
        probe_text = f"{VALID} after bad frames"
        answers: Counter[str] = Counter()
        probe_answers: Counter[str] = Counter()
        expected = probes_sent = 0
        with Camera(5.0):
            for r in range(args.malformed + 1):
                t_round, sent_round = time.perf_counter(), 0
                for kind, items in frame_kinds.items():
                    for f in items[r : r + 1] if r < args.malformed else items[r:]:
                        msg = Image(
                            height=f["height"], width=f["width"], encoding=f["encoding"],
                            step=f["step"], is_bigendian=f["big"],
                        )  # fmt: skip
                        msg.header.stamp = probe.get_clock().now().to_msg()
                        msg.data = array.array("B", f["data"])
                        image_pub.publish(msg)
                        sent_frames[kind] += 1
                if r == args.malformed:
                    break
                command_pub.publish(String(data=probe_text))
                probes_sent += 1
                sent_round += 1
                for kind, texts in command_kinds.items():
                    try:
                        command_pub.publish(String(data=texts[r]))
                    except Exception:  # what rclpy refuses to serialise never reaches the node
                        unpublishable[kind] += 1
                        continue
                    sent_commands[kind] += 1
                    sent_round += 1
                expected += sent_round - 1
                with arrived:
                    arrived.wait_for(
                        lambda t=t_round, n=sent_round: sum(u >= t for _, u in results) >= n,
                        60.0,
                    )
                    for m, u in results:
                        if u >= t_round:
                            store = probe_answers if m.command == probe_text else answers
                            store[m.error_code or "served"] += 1
        after_malformed = valid_command("after malformed input")
        crashes = len(node.exits) - exits_before + (0 if node.alive() else 1)
        print("\n## 1. Malformed inputs (real node process)\n")
        print("| input | kind | sent | refused by rclpy before sending |")
        print("|---|---|---|---|")
        for kind in frame_kinds:
            print(f"| frame | {kind} | {sent_frames[kind]} | 0 |")
        for kind in command_kinds:
            print(f"| command | {kind} | {sent_commands[kind]} | {unpublishable[kind]} |")
        print(
            f"\ntyped answers to the malformed commands: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(answers.items())) or 'none'} "
            f"({sum(answers.values())} of {expected})"
        )
        print(
            f"valid commands sent among them: {probes_sent}, answers: "
            f"{', '.join(f'{k} {v}' for k, v in sorted(probe_answers.items())) or 'none'}"
        )
        print(f"crashes (process died): {crashes}")
        print(
            f"valid command right after them: {after_malformed * 1000:.0f} ms "
            f"(before them: median {statistics.median(baseline) * 1000:.0f} ms)"
        )
        report["malformed"] = {
            "frames": dict(sent_frames),
            "commands": dict(sent_commands),
            "unpublishable_commands": dict(unpublishable),
            "answers": dict(answers),
            "answered": sum(answers.values()),
            "valid_among_them": dict(probe_answers),
            "valid_sent": probes_sent,
            "expected_answers": expected,
            "crashes": crashes,
            "valid_after_ms": after_malformed * 1000,
            "valid_before_ms": [x * 1000 for x in baseline],
        }

        # 2. Frame flood.
        pid = node.pid
        samples: list[float] = []
        rss_start = rss_mib(pid)
        stop_sampling = threading.Event()

        def sample() -> None:
            while not stop_sampling.wait(0.25):
                value = rss_mib(pid)
                if value is not None:
                    samples.append(value)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        t0 = time.perf_counter()
        sent, served_during = 0, 0
        next_command = t0 + 1.0
        while time.perf_counter() - t0 < args.flood_seconds:
            valid_frame()
            sent += 1
            now = time.perf_counter()
            if now >= next_command:
                command_pub.publish(String(data=f"{VALID} flood {sent}"))
                next_command = now + 2.0
            time.sleep(max(0.0, t0 + sent / args.camera_hz - time.perf_counter()))
        elapsed = time.perf_counter() - t0
        time.sleep(1.0)
        stop_sampling.set()
        sampler.join(5)
        rss_end = rss_mib(pid)
        with arrived:
            served_during = sum(1 for m, _ in results if "flood" in m.command and not m.error_code)
        print(f"\n## 2. Frame flood ({h}x{w} rgb8 at {args.camera_hz:g} Hz)\n")
        print("| frames | seconds | commands served | RSS start MiB | RSS max | RSS end |")
        print("|---|---|---|---|---|---|")
        print(
            f"| {sent} | {elapsed:.1f} | {served_during} | {rss_start:.0f} | "
            f"{max(samples, default=float('nan')):.0f} | {rss_end:.0f} |"
        )
        report["flood"] = {
            "frames": sent,
            "seconds": elapsed,
            "served": served_during,
            "rss_start_mib": rss_start,
            "rss_max_mib": max(samples, default=None),
            "rss_end_mib": rss_end,
            "alive": node.alive(),
        }

        # 3. Kill and respawn (emulated launch_ros respawn).
        cycles = []
        for k in range(args.kills):
            starts_before = len(node.starts)
            t_kill = node.kill()
            deadline = time.perf_counter() + 120
            while len(node.starts) == starts_before:
                if time.perf_counter() > deadline:
                    raise RuntimeError("the supervisor did not restart the process")
                time.sleep(0.01)
            t_spawn = node.starts[-1]
            steps = bring_up()
            # A fresh frame and a command every second (the first may go to a reader of the
            # dead process that discovery still lists) until one is served.
            tries: list[str] = []
            t_serving = None
            deadline = time.perf_counter() + 180
            while t_serving is None and time.perf_counter() < deadline:
                tries.append(f"{VALID} respawn {k} try {len(tries)}")
                valid_frame()
                command_pub.publish(String(data=tries[-1]))
                served = _served_among(results, arrived, set(tries), 1.0)
                t_serving = min(served, default=None)
            if t_serving is None:
                raise RuntimeError("the respawned node served nothing within 180 s")
            cycles.append({
                "respawned_s": t_spawn - t_kill,
                "services_s": steps["services"] - t_kill,
                "configured_s": steps["configured"] - t_kill,
                "active_s": steps["active"] - t_kill,
                "first_result_s": t_serving - t_kill,
            })  # fmt: skip
        print(
            f"\n## 3. SIGKILL -> serving again (respawn emulated: a supervisor loop restarts the "
            f"process {args.respawn_delay:g} s after it died, as launch_ros's respawn does; "
            f"then configure + activate over the lifecycle services)\n"
        )
        print("| cycle | respawned s | services up | configured | active | first valid result |")
        print("|---|---|---|---|---|---|")
        for k, c in enumerate(cycles):
            print(
                f"| {k + 1} | {c['respawned_s']:.2f} | {c['services_s']:.2f} | "
                f"{c['configured_s']:.2f} | {c['active_s']:.2f} | {c['first_result_s']:.2f} |"
            )
        report["respawn"] = {"emulated": True, "delay_s": args.respawn_delay, "cycles": cycles}

        # 4. Pairing with several commands in flight (topic and action).
        t_pair = time.perf_counter()
        valid_frame()
        topic_texts = [f"{VALID} in flight {i}" for i in range(args.in_flight)]
        goal_texts = [f"{VALID} goal {i}" for i in range(args.in_flight)]
        if not segment.wait_for_server(timeout_sec=60.0):
            raise RuntimeError("no segment action server")
        goal_futures = []
        for i in range(args.in_flight):
            command_pub.publish(String(data=topic_texts[i]))
            goal_futures.append(segment.send_goal_async(Segment.Goal(command=goal_texts[i])))
        camera = Camera(args.camera_hz)  # fresh frames while the queue drains
        camera.__enter__()
        goal_results: dict[str, Any] = {}
        deadline = time.perf_counter() + 300
        handles = []
        for text, future in zip(goal_texts, goal_futures, strict=True):
            while not future.done() and time.perf_counter() < deadline:
                time.sleep(0.01)
            handle = future.result() if future.done() else None
            handles.append((text, handle.get_result_async() if handle else None))
        for text, future in handles:
            while future is not None and not future.done() and time.perf_counter() < deadline:
                time.sleep(0.01)
            goal_results[text] = future.result().result.segmentation if future else None
        sent_all = set(topic_texts) | set(goal_texts)
        with arrived:
            arrived.wait_for(
                lambda: {m.command for m, t in results if t >= t_pair} >= sent_all,
                max(1.0, deadline - time.perf_counter()),
            )
            got = [(m, t) for m, t in results if t >= t_pair and m.command in sent_all]
        camera.__exit__()
        mismatches = []
        by_text = {m.command: m for m, _ in got}
        for text in sent_all - set(by_text):
            mismatches.append(f"no result for {text!r}")
        ids = [m.command_id for m, _ in got]
        if len(ids) != len(set(ids)):
            mismatches.append("a command id answered twice")
        topic_ids = [by_text[t].command_id for t in topic_texts if t in by_text]
        if topic_ids != sorted(topic_ids):
            mismatches.append(f"topic command ids out of send order: {topic_ids}")
        for text, seg in goal_results.items():
            if seg is None or seg.command != text:
                mismatches.append(f"goal {text!r} got {getattr(seg, 'command', None)!r}")
            elif text in by_text and by_text[text].command_id != seg.command_id:
                mismatches.append(f"goal {text!r}: topic and action ids differ")
        outcomes = Counter(m.error_code or "served" for m, _ in got)
        print(
            f"\n## 4. Pairing: {args.in_flight} topic commands + {args.in_flight} goals "
            "in flight\n"
        )
        print("| results | outcomes | mismatches |")
        print("|---|---|---|")
        print(
            f"| {len(got)} of {len(sent_all)} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))} | {len(mismatches)} |"
        )
        for line in mismatches:
            print(f"- {line}")
        report["pairing"] = {
            "sent": len(sent_all),
            "results": len(got),
            "outcomes": dict(outcomes),
            "mismatches": mismatches,
        }
        crashes_total = len(node.exits) - args.kills + (0 if node.alive() else 1)
        report["crashes"] = crashes_total
        print(f"\nprocess crashes outside the deliberate kills: {crashes_total}")
    except Exception:
        print("node log (last 40 lines):\n" + "".join(node.lines[-40:]), file=sys.stderr)
        raise
    finally:
        node.stop()
        executor.shutdown()
        spinner.join(10)
        probe.destroy_node()
        rclpy.try_shutdown(context=context)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0 if report["crashes"] == 0 and not report["pairing"]["mismatches"] else 1


def _served_among(
    results: list[tuple[Any, float]], arrived: threading.Condition, texts: set[str], wait: float
) -> list[float]:
    """Arrival times of the served results of ``texts`` (waiting up to ``wait`` for one)."""

    def served() -> list[float]:
        return [t for m, t in results if m.command in texts and not m.error_code]

    with arrived:
        arrived.wait_for(lambda: bool(served()), wait)
        return served()


def _ms(values: list[float]) -> str:
    return ", ".join(f"{v * 1000:.0f}" for v in values) + " ms"


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())
