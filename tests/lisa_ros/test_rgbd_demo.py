"""The README's RGB-D walk-through, as a user runs it: lisa_node with ``depth:=true`` on the
embedded demo model, ``lisa-demo-camera`` publishing a bundled scene with a depth plane at 1.5 m,
and ``examples/segment_client.py`` sending a ``Segment`` goal. Three real processes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]
CLIENT = REPO / "examples" / "segment_client.py"


def test_a_segment_goal_on_the_demo_camera_gives_targets_at_the_plane_distance(spawn) -> None:
    from lisa_model.demo import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "config.json").is_file():
        pytest.skip("the embedded demo model is not installed")
    ns = "/rgbd_demo"
    node = spawn(
        [sys.executable, "-m", "lisa_ros.node"],
        ns,
        params=["depth:=true", "max_image_age:=5.0", "image_wait_timeout:=30.0"],
    )
    camera = spawn(
        [sys.executable, "-m", "lisa_ros.demo_camera", "--scene", "scene_0", "--depth", "1.5"],
        ns,
        params=[],
    )
    camera.wait_for("publishing scene_0")
    node.wait_for("active: serving commands")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    client = subprocess.run(
        [sys.executable, str(CLIENT), "all the blue objects", "--action", f"{ns}/segment"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    out = client.stdout
    assert client.returncode == 0, out + client.stderr + node.output
    assert "status succeeded" in out, out
    targets = re.findall(
        r"target \d+: (\d+)x(\d+) mask, .* at \(.*, .*, ([0-9.]+)\) m in (\S+)", out
    )
    assert targets, out
    for width, height, z, frame in targets:
        assert (int(width), int(height)) == (173, 317)  # full-frame masks of the scene
        assert abs(float(z) - 1.5) <= 0.01 and frame == "camera_color_optical_frame"
