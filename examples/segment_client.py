"""Ask lisa_node for a segmentation and wait for the typed result (the ``segment`` action).

    python examples/segment_client.py "all the blue objects"
    python examples/segment_client.py "now the one on the left" --follow-up

Prints the stages as they come (feedback) and, per target, its pixel box, area, score and 3-D
position (with ``depth:=true`` on the node). A behaviour-tree node or a task planner calls the
action the same way.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import rclpy
from action_msgs.msg import GoalStatus
from lisa_msgs.action import Segment
from rclpy.action import ActionClient
from rclpy.node import Node

EXPLAIN = {"default": Segment.Goal.EXPLAIN_DEFAULT, "no": Segment.Goal.EXPLAIN_NO}
EXPLAIN["yes"] = Segment.Goal.EXPLAIN_YES


def segment(node: Node, action: str, goal: Segment.Goal, timeout: float = 120.0):
    """Send ``goal`` to the action server ``action`` and wait; ``(status, Segmentation)``."""
    client = ActionClient(node, Segment, action)
    if not client.wait_for_server(timeout_sec=30.0):
        raise TimeoutError(f"no action server {action!r} (is lisa_node running?)")

    def feedback(msg) -> None:
        stage = msg.feedback
        node.get_logger().info(f"{stage.stage_name} after {stage.elapsed:.2f} s")

    sent = client.send_goal_async(goal, feedback_callback=feedback)
    rclpy.spin_until_future_complete(node, sent, timeout_sec=timeout)
    handle = sent.result()
    if handle is None or not handle.accepted:
        raise RuntimeError("the goal was not accepted")
    done = handle.get_result_async()
    rclpy.spin_until_future_complete(node, done, timeout_sec=timeout)
    if done.result() is None:
        raise TimeoutError(f"no result within {timeout} s")
    return done.result().status, done.result().result.segmentation


def describe(status: int, seg) -> str:
    """A few lines a person can read."""
    lines = [f"command {seg.command_id} {seg.command!r}: {seg.answer or '(no text)'}"]
    if seg.error:
        lines.append(f"failed ({seg.error_code}): {seg.error}")
    for t in seg.targets:
        box = t.bbox
        where = (
            f"at ({t.position.x:.3f}, {t.position.y:.3f}, {t.position.z:.3f}) m "
            f"in {t.depth_frame_id}"
            if t.position_valid
            else "no 3-D position"
        )
        lines.append(
            f"  target {t.index}: {t.mask.width}x{t.mask.height} mask, box "
            f"({box.x_offset}, {box.y_offset}, {box.width}, {box.height}), area {t.area}, "
            f"score {t.score:.2f}, {where}"
        )
    lines.append(
        f"status {'succeeded' if status == GoalStatus.STATUS_SUCCEEDED else status}; "
        f"inference {seg.inference_time:.2f} s, latency {seg.latency:.2f} s"
        f"{', pre-encoded frame' if seg.preencoded else ''}"
    )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", help="what to segment, in plain language")
    parser.add_argument("--action", default="/segment", help="the node's action name")
    parser.add_argument("--mode", default="", choices=("", "generate", "segment"))
    parser.add_argument("--explain", default="default", choices=tuple(EXPLAIN))
    parser.add_argument("--follow-up", action="store_true", help="continue the conversation")
    args, ros_args = parser.parse_known_args(argv)
    rclpy.init(args=["segment_client", *ros_args])
    node = rclpy.create_node("segment_client")
    try:
        goal = Segment.Goal(
            command=args.command,
            mode=args.mode,
            explain=EXPLAIN[args.explain],
            follow_up=args.follow_up,
        )
        status, seg = segment(node, args.action, goal)
        print(describe(status, seg))
        return 0 if status == GoalStatus.STATUS_SUCCEEDED else 1
    except (TimeoutError, RuntimeError) as exc:
        print(f"segment_client: error: {exc}", file=sys.stderr)
        return 2
    finally:
        node.destroy_node()
        rclpy.try_shutdown()


if __name__ == "__main__":
    raise SystemExit(main())
