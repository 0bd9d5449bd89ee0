"""What ``lisa_node`` publishes, and how each result becomes messages.

=========================  ==================================  ===================================
topic                      type                                what it is for
=========================  ==================================  ===================================
``segmentation``           ``lisa_msgs/Segmentation``          the typed result of every command,
                                                               answered or failed: a manipulation
                                                               stack reads this
``explanation``            ``std_msgs/String``                 ``[command_id] answer`` or
                                                               ``[command_id] failed: reason``,
                                                               for people and logs
``mask``                   ``sensor_msgs/Image`` mono8         union of the targets, for rviz
``mask/compressed``        ``sensor_msgs/CompressedImage``     the same as lossless PNG (optional)
``overlay``                ``sensor_msgs/Image`` rgb8          the frame with the masks and the
                                                               answer drawn on it (optional)
``target_point``           ``geometry_msgs/PointStamped``      the first target's 3-D centre
                                                               (with depth, optional)
``target_cloud``           ``sensor_msgs/PointCloud2``         the targets' 3-D points (with
                                                               depth, optional)
=========================  ==================================  ===================================

``segmentation`` and ``explanation`` exist from start-up (a command sent to a node that is not
serving is answered too); the others follow the lifecycle (created on configure, publishing only
while active). All are reliable, depth 10.
"""

from __future__ import annotations

import array
import importlib
import threading
from typing import Any

import numpy as np
from geometry_msgs.msg import PointStamped
from lisa_msgs.msg import Segmentation
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import CompressedImage, Image, PointCloud2, PointField
from std_msgs.msg import Header, String

from lisa_ros.conversion import (
    ImageFields,
    mask_to_compressed_png,
    mask_to_image_fields,
    points_to_cloud_fields,
    rgb_to_image_fields,
)
from lisa_ros.results import ResultInfo, first_position, segmentation_message
from lisa_ros.settings import LisaNodeConfig

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


class RclpyKit:
    """:class:`~lisa_ros.results.MessageKit` for rclpy: message classes by type name."""

    def __init__(self) -> None:
        self._classes: dict[str, type] = {}

    def new(self, type_name: str, **fields: Any) -> Any:
        cls = self._classes.get(type_name)
        if cls is None:
            package, kind, name = type_name.split("/")
            cls = getattr(importlib.import_module(f"{package}.{kind}"), name)
            self._classes[type_name] = cls
        return cls(**fields)

    def uint8_data(self, data: np.ndarray) -> Any:
        # array.array: rclpy's setter checks a bytes object element by element (slow).
        return array.array("B", np.ascontiguousarray(data, dtype=np.uint8).tobytes())


def image_msg(fields: ImageFields, header: Any) -> Image:
    msg = Image(
        height=fields.height,
        width=fields.width,
        encoding=fields.encoding,
        is_bigendian=fields.is_bigendian,
        step=fields.step,
    )
    if header is not None:
        msg.header = header
    msg.data = array.array("B", fields.data)
    return msg


class NodeOutputs:
    """The node's publishers and how a result is published on them (thread-safe)."""

    def __init__(self, node: Any) -> None:
        self._node = node
        self._lock = threading.Lock()
        self._kit = RclpyKit()
        self.segmentation = node.create_publisher(Segmentation, "segmentation", RELIABLE)
        self.explanation = node.create_publisher(String, "explanation", RELIABLE)
        self._lifecycle: dict[str, Any] = {}

    # ------------------------------------------------------------------------- lifecycle part

    def create(self, config: LisaNodeConfig) -> None:
        """The publishers that follow the lifecycle (on configure)."""
        node = self._node
        made = {"mask": node.create_lifecycle_publisher(Image, "mask", RELIABLE)}
        if config.publish_compressed_mask:
            topic = node.resolve_topic_name("mask") + "/compressed"
            made["mask_png"] = node.create_lifecycle_publisher(CompressedImage, topic, RELIABLE)
        if config.publish_overlay:
            made["overlay"] = node.create_lifecycle_publisher(Image, "overlay", RELIABLE)
        if config.depth and config.publish_target_point:
            made["point"] = node.create_lifecycle_publisher(PointStamped, "target_point", RELIABLE)
        if config.depth and config.publish_target_cloud:
            made["cloud"] = node.create_lifecycle_publisher(PointCloud2, "target_cloud", RELIABLE)
        with self._lock:
            self._lifecycle = made

    def destroy(self) -> None:
        """Destroy the lifecycle publishers (on cleanup)."""
        with self._lock:
            made, self._lifecycle = self._lifecycle, {}
        for pub in made.values():
            self._node.destroy_lifecycle_publisher(pub)

    # ---------------------------------------------------------------------------- publishing

    def text(self, text: str) -> None:
        """Publish on ``explanation``."""
        with self._lock:
            self.explanation.publish(String(data=text))

    def result(
        self,
        info: ResultInfo,
        text: str,
        *,
        header: Any = None,
        mask: np.ndarray | None = None,
        overlay: np.ndarray | None = None,
        cloud: np.ndarray | None = None,
    ) -> Any:
        """Publish one command's result: for an answered command the pictures and depth outputs,
        then ``explanation`` and ``segmentation``. ``header`` is the one the result carries
        (the source frame's, or now for a command that never got a frame); ``mask`` the
        ``(H, W)`` uint8 union. Returns the ``Segmentation`` message."""
        message = segmentation_message(info, self._kit, header)
        with self._lock:  # pictures first, the typed result last: it says the result is out
            pubs = dict(self._lifecycle)
            if mask is not None and "mask" in pubs:
                pubs["mask"].publish(image_msg(mask_to_image_fields(mask), header))
            if mask is not None and "mask_png" in pubs:
                fmt, data = mask_to_compressed_png(mask)
                png = CompressedImage(format=fmt, header=header)
                png.data = array.array("B", data)
                pubs["mask_png"].publish(png)
            if overlay is not None and "overlay" in pubs:
                pubs["overlay"].publish(image_msg(rgb_to_image_fields(overlay), header))
            position = first_position(info)
            if position is not None and "point" in pubs:
                frame_id, (x, y, z) = position
                point = PointStamped(header=Header(stamp=header.stamp, frame_id=frame_id))
                point.point.x, point.point.y, point.point.z = x, y, z
                pubs["point"].publish(point)
            if cloud is not None and "cloud" in pubs:
                frame_id = next((t.depth_frame_id for t in info.targets if t.depth_frame_id), "")
                fields = points_to_cloud_fields(cloud)
                msg = PointCloud2(
                    header=Header(stamp=header.stamp, frame_id=frame_id),
                    **fields.as_kwargs(PointField),
                )
                pubs["cloud"].publish(msg)
            self.explanation.publish(String(data=text))
            self.segmentation.publish(message)
        return message
