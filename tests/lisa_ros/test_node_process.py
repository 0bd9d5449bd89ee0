"""The node as a process: the lifecycle ``shutdown`` transition, SIGTERM and SIGINT end it.

Real processes, real signals, the real lifecycle services over rclpy. A model that is still
loading, or an inference that does not return, must not keep the process alive.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)

import pytest  # noqa: E402
import rclpy  # noqa: E402
from rclpy.context import Context  # noqa: E402

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "lisa_reference" / "lisa-tiny"
SLOW_NODE = Path(__file__).with_name("slow_node.py")


@pytest.fixture(scope="module")
def context() -> Iterator[Context]:
    ctx = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def _clean(output: str) -> None:
    for bad in ("Traceback", "terminate called", "Aborted", "Segmentation fault"):
        assert bad not in output, output


def test_lifecycle_shutdown_transition_ends_the_process(spawn, context: Context) -> None:
    from lifecycle_msgs.msg import Transition
    from lifecycle_msgs.srv import ChangeState
    from rclpy.executors import SingleThreadedExecutor

    node = spawn([sys.executable, "-m", "lisa_ros.node"], "/stop_lifecycle")
    node.wait_for("active: serving commands")
    probe = rclpy.create_node("shutdown_probe", context=context)
    try:
        client = probe.create_client(ChangeState, "/stop_lifecycle/lisa_node/change_state")
        assert client.wait_for_service(timeout_sec=60.0)
        request = ChangeState.Request()
        request.transition.id = Transition.TRANSITION_ACTIVE_SHUTDOWN
        future = client.call_async(request)
        executor = SingleThreadedExecutor(context=context)
        executor.add_node(probe)
        executor.spin_until_future_complete(future, timeout_sec=60.0)
        executor.shutdown()
        assert future.done() and future.result().success, node.output
        started = time.monotonic()
        assert node.exit_code_within(15.0) == 0
        assert time.monotonic() - started < 15.0
    finally:
        probe.destroy_node()
    assert "shut down: model released, the process exits" in node.output
    _clean(node.output)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_process_while_the_model_loads(spawn, sig: signal.Signals) -> None:
    node = spawn([sys.executable, str(SLOW_NODE), "load"], f"/stop_load_{sig.name.lower()}")
    node.wait_for("slow_node: loading started")
    node.proc.send_signal(sig)
    assert node.exit_code_within(10.0) == 0
    _clean(node.output)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_ends_the_process_while_a_command_is_served(
    spawn, context: Context, sig: signal.Signals
) -> None:
    import array

    from sensor_msgs.msg import Image
    from std_msgs.msg import String

    namespace = f"/stop_infer_{sig.name.lower()}"
    node = spawn([sys.executable, str(SLOW_NODE), "infer"], namespace)
    node.wait_for("active: serving commands")
    probe = rclpy.create_node("infer_probe", context=context)
    try:
        image_pub = probe.create_publisher(Image, f"{namespace}/image", 10)
        command_pub = probe.create_publisher(String, f"{namespace}/command", 10)
        deadline = time.monotonic() + 60
        while image_pub.get_subscription_count() == 0 or command_pub.get_subscription_count() == 0:
            assert time.monotonic() < deadline, node.output
            time.sleep(0.05)
        image = Image(height=48, width=64, encoding="mono8", step=64)
        image.data = array.array("B", bytes(48 * 64))
        command_pub.publish(String(data="the red ball"))
        while not any("slow_node: inference started" in line for line in node.lines):
            assert time.monotonic() < deadline, node.output
            image.header.stamp = probe.get_clock().now().to_msg()
            image_pub.publish(image)
            time.sleep(0.1)
        node.proc.send_signal(sig)
        assert node.exit_code_within(10.0) == 0
    finally:
        probe.destroy_node()
    _clean(node.output)
