"""``colcon build`` of the package in a fresh workspace, and the installed ``lisa_node`` runs.

colcon comes from PyPI (colcon-common-extensions, in the dev venv); the build is the ordinary
ament_python one (``setup.py`` + ``setup.cfg``'s ``install_scripts=$base/lib/lisa_ros``), so
``ros2 run lisa_ros lisa_node`` and ``ros2 launch lisa_ros lisa.launch.py`` find their files.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE_FILES = ("setup.py", "setup.cfg", "package.xml")
PACKAGE_DIRS = ("resource", "launch", "config", "lisa_model", "lisa_ros", "training")
VENV_BIN = Path(sys.executable).parent

pytestmark = pytest.mark.ros


def _colcon() -> Path:
    colcon = VENV_BIN / "colcon"
    if not colcon.is_file():
        pytest.skip(
            f"colcon is not installed in {VENV_BIN} (pip install colcon-common-extensions)"
        )
    return colcon


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    colcon = _colcon()
    ws = tmp_path_factory.mktemp("colcon_ws")
    src = ws / "src" / "lisa_ros"
    src.mkdir(parents=True)
    for name in PACKAGE_FILES:
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGE_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    env = {**os.environ, "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(
        [str(colcon), "build", "--base-paths", "src"],
        cwd=ws,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Summary: 1 package finished" in result.stdout, result.stdout
    return ws


def test_colcon_build_installs_executable_launch_and_config(workspace: Path) -> None:
    install = workspace / "install" / "lisa_ros"
    node = install / "lib" / "lisa_ros" / "lisa_node"
    assert node.is_file() and os.access(node, os.X_OK)
    assert "'console_scripts', 'lisa_node'" in node.read_text()
    share = install / "share" / "lisa_ros"
    for relative in (
        "launch/lisa.launch.py",
        "config/lisa_params.yaml",
        "package.xml",
    ):
        assert (share / relative).is_file(), relative
    index = install / "share" / "ament_index" / "resource_index" / "packages" / "lisa_ros"
    assert index.is_file()
    (site,) = (install / "lib").glob("python3*/site-packages")
    assert (site / "lisa_ros" / "node.py").is_file()
    assert (site / "lisa_model" / "predictor.py").is_file()
    (entry_points,) = site.glob("*.egg-info/entry_points.txt")
    assert "lisa_node = lisa_ros.node:main" in entry_points.read_text()


def test_installed_lisa_node_runs_from_the_install_space(workspace: Path) -> None:
    """The installed executable imports the installed package; with a missing model it logs the
    configure failure naming the parameter, keeps running unconfigured, and exits 0 on SIGINT."""
    install = workspace / "install" / "lisa_ros"
    (site,) = (install / "lib").glob("python3*/site-packages")
    env = {
        **os.environ,
        "PYTHONPATH": f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_DOMAIN_ID": str(1 + os.getpid() % 100),
    }
    args = [str(install / "lib" / "lisa_ros" / "lisa_node"), "--ros-args"]
    args += ["-p", "model:=/nonexistent/lisa", "-r", "__ns:=/lisa_colcon"]
    proc = subprocess.Popen(
        args, cwd=workspace, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while not any("autostart: configure failed" in ln for ln in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    output = "".join(lines)
    assert "configure failed: parameter 'model': /nonexistent/lisa: no such checkpoint" in output
    assert "Traceback" not in output, output
