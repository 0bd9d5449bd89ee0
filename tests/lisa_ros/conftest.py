"""Fixtures of the node tests (the harness is in node_harness.py)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from typing import Any

# DDS on loopback and a domain of our own, before rclpy is initialised.
os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ.setdefault("ROS_DOMAIN_ID", str(1 + os.getpid() % 100))

import pytest  # noqa: E402
import rclpy  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.executors import MultiThreadedExecutor  # noqa: E402

from tests.lisa_ros.node_harness import TINY, NodeProcess, Ros  # noqa: E402


@pytest.fixture(scope="module")
def ros() -> Iterator[Ros]:
    context = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=context)
    executor = MultiThreadedExecutor(num_threads=4, context=context)
    thread = threading.Thread(target=executor.spin, daemon=True)
    thread.start()
    harness = Ros(context, executor)
    yield harness
    # This order (executor, spin thread, nodes, context) avoids rare aborts at exit.
    executor.shutdown()
    thread.join(10)
    for node in reversed(harness.nodes):
        node.destroy_node()
    rclpy.shutdown(context=context)


@pytest.fixture(scope="module")
def shared_model() -> Any:
    from lisa_model.checkpoint import load_lisa

    return load_lisa(TINY, device="cpu", dtype="float32")


@pytest.fixture
def spawn() -> Iterator:
    procs: list[NodeProcess] = []

    def start(args: list[str], namespace: str, params: list[str] | None = None) -> NodeProcess:
        proc = NodeProcess(args, namespace, params)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.kill()
