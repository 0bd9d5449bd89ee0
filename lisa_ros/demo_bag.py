"""``lisa-make-demo-bag``: write a small ROS 2 bag of synthetic table-top scenes and commands.

The bag looks like a short recording from a robot's camera while someone talks to it:

- ``/camera/color/image_raw`` (``sensor_msgs/Image``, rgb8) at ``rate_hz``; each header stamp is
  the receive time minus a small camera latency (as a real driver stamps its frames);
- ``/camera/color/image_raw/compressed`` (``sensor_msgs/CompressedImage``, JPEG, written the way
  image_transport's compressed publisher does: BGR data, format ``"rgb8; jpeg compressed bgr8"``),
  the same frames, unless ``compressed_topic=False``;
- ``/command`` (``std_msgs/String``): commands at fixed times, in the words of the synthetic
  shapes data the embedded demo model knows ("find the red circle", "something that could roll",
  ..., "stop").

The scene is a few flat-coloured shapes on a table (a red ball rolling from left to right, a blue
box, a green triangle, a yellow star), drawn with OpenCV by :func:`draw_scene`. Nothing is random,
so the same arguments always write the same messages. By default the bag is compressed with zstd
(per message for sqlite3, per chunk for MCAP; both are read by ``ros2 bag`` and ``rosbags``), which
keeps 15 raw 320x240 frames at a few hundred KB.

Example::

    lisa-make-demo-bag examples/demo.bag
    lisa-replay examples/demo.bag --out demo_out.bag --overlays demo_overlays
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
from rosbags.typesys import Stores, get_typestore

from lisa_model.cli.common import UserError, run_cli
from lisa_ros.conversion import rgb_to_image_fields
from lisa_ros.replay.bags import (
    COMPRESSED_TYPE,
    IMAGE_TYPE,
    NS,
    STORAGES,
    STRING_TYPE,
    header_msg,
    image_msg,
    open_writer,
)

IMAGE_TOPIC = "/camera/color/image_raw"
COMPRESSED_TOPIC = IMAGE_TOPIC + "/compressed"
COMMAND_TOPIC = "/command"
FRAME_ID = "camera_color_optical_frame"

#: ``(seconds after the first frame, text)`` of the commands in the demo bag.
DEFAULT_COMMANDS: tuple[tuple[float, str], ...] = (
    (0.3, "find the red circle"),
    (0.9, "something that could roll"),
    (1.5, "the blue square"),
    (2.1, "the shape with three corners"),
    (2.5, "stop"),
)

#: Bag time of the first frame: 2023-11-14 22:13:20 UTC, a fixed, realistic Unix time.
DEFAULT_START_NS = 1_700_000_000 * NS


def draw_scene(t: float, width: int = 320, height: int = 240) -> np.ndarray:
    """Draw the demo table-top scene at ``t`` seconds into the recording.

    A red ball rolls from left to right (one image width in ~6 s) in front of a blue box, a green
    triangle and a yellow star, on a wooden-looking table under a grey wall. Sizes scale with the
    image, so any ``width``/``height`` gives the same picture.

    Returns:
        ``(height, width, 3)`` uint8 RGB.
    """
    if width < 16 or height < 16:
        raise ValueError(f"image must be at least 16x16, got {width}x{height}")
    s = min(width / 320.0, height / 240.0)
    img = np.empty((height, width, 3), dtype=np.uint8)
    horizon = int(0.38 * height)
    img[:horizon] = (188, 190, 196)  # wall
    rows = np.linspace(0.0, 1.0, height - horizon, dtype=np.float32)[:, None]
    table = (1.0 - rows) * np.array([196, 160, 112]) + rows * np.array([160, 122, 80])
    img[horizon:] = table[:, None, :].astype(np.uint8)

    # Blue box (square), green triangle, yellow star, at fixed places on the table.
    def pt(x: float, y: float) -> tuple[int, int]:
        return int(round(x * width)), int(round(y * height))

    cv2.rectangle(img, pt(0.60, 0.42), pt(0.80, 0.69), (30, 95, 220), thickness=-1)
    triangle = np.array([pt(0.16, 0.70), pt(0.34, 0.70), pt(0.25, 0.46)], dtype=np.int32)
    cv2.fillPoly(img, [triangle], (40, 160, 55))
    cx, cy, r_out = 0.88 * width, 0.86 * height, 0.075 * width
    angles = np.pi / 2 + np.arange(10) * np.pi / 5
    radii = np.where(np.arange(10) % 2 == 0, r_out, 0.45 * r_out)
    star = np.stack([cx + radii * np.cos(angles), cy - radii * np.sin(angles)], axis=1)
    cv2.fillPoly(img, [np.round(star).astype(np.int32)], (240, 200, 30))

    # The red ball, in front of everything else.
    radius = max(3, int(round(22 * s)))
    x = int(round((0.08 + 0.16 * t) * width)) % width
    cv2.circle(img, (x, int(0.80 * height)), radius, (215, 35, 35), thickness=-1, lineType=8)
    return img


def make_demo_bag(
    path: str | Path,
    storage: str = "sqlite3",
    *,
    frames: int = 15,
    rate_hz: float = 5.0,
    width: int = 320,
    height: int = 240,
    compressed_topic: bool = True,
    commands: Sequence[tuple[float, str]] = DEFAULT_COMMANDS,
    start_ns: int = DEFAULT_START_NS,
    camera_latency: float = 0.03,
    compress: bool = True,
) -> Path:
    """Write the demo bag (see the module docstring) to a new directory ``path``.

    Args:
        path: the bag directory to create; it must not exist.
        storage: ``"sqlite3"`` (``.db3``) or ``"mcap"``.
        frames: number of camera frames (>= 1).
        rate_hz: camera rate (> 0); frame ``i`` is received at ``start_ns + i / rate_hz``.
        width, height: image size in pixels.
        compressed_topic: also write the JPEG ``.../compressed`` topic.
        commands: ``(seconds after the first frame, text)`` pairs for ``/command``.
        start_ns: bag (receive) time of the first frame, nanoseconds since the Unix epoch.
        camera_latency: seconds between a frame's header stamp and its receive time (>= 0).
        compress: zstd compression (per message for sqlite3, per chunk for MCAP).

    Returns:
        ``path`` as a ``Path``.
    """
    path = Path(path)
    if storage not in STORAGES:
        raise ValueError(f"storage must be one of {STORAGES}, got {storage!r}")
    if frames < 1 or not rate_hz > 0 or camera_latency < 0:
        raise ValueError(
            f"need frames >= 1, rate_hz > 0, camera_latency >= 0; got {frames}, {rate_hz}, "
            f"{camera_latency}"
        )
    if path.exists():
        raise FileExistsError(f"{path} exists; the demo bag is only written to a new path")
    ts = get_typestore(Stores.ROS2_HUMBLE)
    compressed_t, string_t = ts.types[COMPRESSED_TYPE], ts.types[STRING_TYPE]
    writer = open_writer(path, storage, compress=compress)
    period_ns = int(round(1e9 / rate_hz))
    latency_ns = int(round(camera_latency * 1e9))
    with writer:
        raw_conn = writer.add_connection(IMAGE_TOPIC, IMAGE_TYPE, typestore=ts)
        jpeg_conn = None
        if compressed_topic:
            jpeg_conn = writer.add_connection(COMPRESSED_TOPIC, COMPRESSED_TYPE, typestore=ts)
        command_conn = writer.add_connection(COMMAND_TOPIC, STRING_TYPE, typestore=ts)
        for i in range(frames):
            t_ns = start_ns + i * period_ns
            stamp_ns = t_ns - latency_ns
            header = header_msg(ts, stamp_ns // NS, stamp_ns % NS, FRAME_ID)
            rgb = draw_scene(i / rate_hz, width, height)
            msg = image_msg(ts, header, rgb_to_image_fields(rgb))
            writer.write(raw_conn, t_ns, ts.serialize_cdr(msg, IMAGE_TYPE))
            if jpeg_conn is not None:
                bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
                ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 90])
                if not ok:  # pragma: no cover - OpenCV fails here only when out of memory
                    raise RuntimeError("cv2.imencode failed to write a JPEG frame")
                cmsg = compressed_t(
                    header=header, format="rgb8; jpeg compressed bgr8", data=jpeg.reshape(-1)
                )
                # image_transport publishes the compressed copy a little after the raw frame.
                writer.write(
                    jpeg_conn,
                    t_ns + 2_000_000,
                    ts.serialize_cdr(cmsg, COMPRESSED_TYPE),
                )
        for seconds, text in commands:
            t_ns = start_ns + int(round(seconds * 1e9))
            data = ts.serialize_cdr(string_t(data=text), STRING_TYPE)
            writer.write(command_conn, t_ns, data)
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-make-demo-bag",
        description="Write a small ROS 2 bag of synthetic table-top camera frames and spoken-"
        "style commands, to try lisa-replay on.",
    )
    parser.add_argument("out", type=Path, help="bag directory to create (must not exist)")
    parser.add_argument("--storage", choices=STORAGES, default="sqlite3", help="bag storage")
    parser.add_argument("--frames", type=int, default=15, help="camera frames (default 15)")
    parser.add_argument("--rate", type=float, default=5.0, help="camera rate in Hz (default 5)")
    parser.add_argument("--width", type=int, default=320, help="image width (default 320)")
    parser.add_argument("--height", type=int, default=240, help="image height (default 240)")
    parser.add_argument(
        "--no-compressed-topic", action="store_true", help="leave out the JPEG topic"
    )
    parser.add_argument("--no-compress", action="store_true", help="no zstd compression")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.out.exists():
        raise UserError(f"{args.out} exists; give a new path for the demo bag")
    try:
        path = make_demo_bag(
            args.out,
            args.storage,
            frames=args.frames,
            rate_hz=args.rate,
            width=args.width,
            height=args.height,
            compressed_topic=not args.no_compressed_topic,
            compress=not args.no_compress,
        )
    except ValueError as exc:
        raise UserError(str(exc)) from None
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    print(f"wrote {path} ({args.storage}, {args.frames} frames, {size / 1024:.0f} KiB)")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
