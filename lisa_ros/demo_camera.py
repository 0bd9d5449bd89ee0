"""``lisa-demo-camera``: a stand-in RGB-D camera for trying lisa_node without hardware.

It publishes one of the bundled example scenes (``lisa_model/data/examples``) as a colour stream,
with an aligned depth image of a flat plane at ``--depth`` metres and the ``CameraInfo`` of a
pinhole camera, all three stamped alike, as a RealSense driver with ``align_depth`` publishes
them::

    lisa-demo-camera --scene scene_0 --depth 1.5 --hz 10
    ros2 launch lisa_ros lisa.launch.py depth:=true   # or: lisa_node --ros-args -p depth:=true

Topics (relative, remap them with ``--ros-args -r``): ``image`` (rgb8), ``depth`` (16UC1, mm,
or 32FC1 with ``--float``), ``camera_info``; frame ``camera_color_optical_frame``. Reliable QoS,
depth 5.
"""

from __future__ import annotations

import argparse
import array
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Horizontal field of view of the stand-in camera (a RealSense D435's colour camera: ~69 deg).
FOV_DEG = 69.0
FRAME_ID = "camera_color_optical_frame"


def camera_k(width: int, height: int, fov_deg: float = FOV_DEG) -> list[float]:
    """Row-major ``K`` of a pinhole camera of this size and horizontal field of view."""
    f = (width / 2) / np.tan(np.radians(fov_deg) / 2)
    return [f, 0.0, (width - 1) / 2, 0.0, f, (height - 1) / 2, 0.0, 0.0, 1.0]


def scene_rgb(scene: str) -> np.ndarray:
    """A bundled example scene (``scene_0`` ... or a path to an image) as ``(H, W, 3)`` RGB."""
    from lisa_model.cli.common import read_rgb_image
    from lisa_model.demo import EXAMPLES_DIR

    path = Path(scene)
    if not path.suffix:
        path = EXAMPLES_DIR / f"{scene}.png"
    return read_rgb_image(path)


class DemoCamera:
    """Publishes the colour frame, the depth plane and the camera info on ``node``."""

    def __init__(self, node: Any, rgb: np.ndarray, depth_m: float, float_depth: bool) -> None:
        from rclpy.qos import QoSProfile, ReliabilityPolicy
        from sensor_msgs.msg import CameraInfo, Image

        from lisa_ros.conversion import depth_to_image_fields, rgb_to_image_fields

        self.node = node
        qos = QoSProfile(depth=5, reliability=ReliabilityPolicy.RELIABLE)
        self.image_pub = node.create_publisher(Image, "image", qos)
        self.depth_pub = node.create_publisher(Image, "depth", qos)
        self.info_pub = node.create_publisher(CameraInfo, "camera_info", qos)
        h, w = rgb.shape[:2]
        plane = np.full((h, w), depth_m, np.float32)
        self._fields = {
            "image": rgb_to_image_fields(rgb),
            "depth": depth_to_image_fields(plane, "32FC1" if float_depth else "16UC1"),
        }
        self._info = CameraInfo(width=w, height=h, k=camera_k(w, h), distortion_model="plumb_bob")
        self._info.d = [0.0] * 5
        self._info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        k = self._info.k
        self._info.p = [k[0], 0.0, k[2], 0.0, 0.0, k[4], k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
        self.published = 0

    def _image(self, key: str, header: Any) -> Any:
        from sensor_msgs.msg import Image

        fields = self._fields[key]
        msg = Image(
            header=header,
            height=fields.height,
            width=fields.width,
            encoding=fields.encoding,
            is_bigendian=fields.is_bigendian,
            step=fields.step,
        )
        msg.data = array.array("B", fields.data)
        return msg

    def publish(self) -> Any:
        """One frame: colour, depth and camera info with one stamp. Returns the header."""
        from std_msgs.msg import Header

        header = Header(stamp=self.node.get_clock().now().to_msg(), frame_id=FRAME_ID)
        self._info.header = header
        self.info_pub.publish(self._info)
        self.depth_pub.publish(self._image("depth", header))
        self.image_pub.publish(self._image("image", header))
        self.published += 1
        return header


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-demo-camera",
        description="Publish a bundled example scene as an RGB-D camera would (colour, aligned "
        "depth of a plane, camera_info), to try lisa_node with depth:=true.",
    )
    parser.add_argument("--scene", default="scene_0", help="scene_0..scene_5 or an image path")
    parser.add_argument("--depth", type=float, default=1.5, help="plane distance in metres")
    parser.add_argument("--hz", type=float, default=10.0, help="frames per second")
    parser.add_argument("--float", action="store_true", help="32FC1 depth in metres (not 16UC1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    import rclpy
    from rclpy.executors import ExternalShutdownException

    args, ros_args = build_parser().parse_known_args(argv)
    if not (args.depth > 0 and args.hz > 0):
        print("lisa-demo-camera: error: --depth and --hz must be > 0", file=sys.stderr)
        return 2
    try:
        rgb = scene_rgb(args.scene)
    except Exception as exc:  # a UserError naming the path
        print(f"lisa-demo-camera: error: {exc}", file=sys.stderr)
        return 2
    rclpy.init(args=["lisa-demo-camera", *ros_args])
    node = rclpy.create_node("demo_camera")
    camera = DemoCamera(node, rgb, args.depth, args.float)
    node.create_timer(1.0 / args.hz, camera.publish)
    h, w = rgb.shape[:2]
    node.get_logger().info(
        f"publishing {args.scene} ({w}x{h}) on {node.resolve_topic_name('image')}, a plane at "
        f"{args.depth} m on {node.resolve_topic_name('depth')} and "
        f"{node.resolve_topic_name('camera_info')} at {args.hz} Hz"
    )
    try:
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
