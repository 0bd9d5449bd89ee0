"""Imports only point down: lisa_model and training never import ROS."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROS_MODULES = ("rclpy", "sensor_msgs", "std_msgs", "cv_bridge", "lisa_ros", "rosbags",
               "lifecycle_msgs", "launch", "launch_ros")  # fmt: skip


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_ros_imports_in_model_or_training_sources():
    offenders = {}
    for package in ("lisa_model", "training"):
        for path in sorted((REPO / package).rglob("*.py")):
            bad = _imports(path) & set(ROS_MODULES)
            if bad:
                offenders[str(path.relative_to(REPO))] = sorted(bad)
    assert not offenders, offenders


def test_lisa_model_imports_without_ros():
    code = (
        "import sys\n"
        "import lisa_model, lisa_model.checkpoint, lisa_model.predictor, lisa_model.cli.segment\n"
        f"bad = [m for m in {ROS_MODULES!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120)


def test_importing_lisa_model_does_no_work():
    code = "import sys, lisa_model\nassert 'torch' not in sys.modules, 'torch imported eagerly'\n"
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)
