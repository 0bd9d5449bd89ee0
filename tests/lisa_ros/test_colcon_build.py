"""One ``colcon build`` of both packages in a fresh workspace, and the install space works.

The repository is lisa_ros (ament_python, at its root) with lisa_msgs (ament_cmake + rosidl) in
``lisa_msgs/``. colcon stops crawling a folder once it found a package there, so the command names
both: ``colcon build --base-paths src/lisa_ros src/lisa_ros/lisa_msgs``. lisa_ros's exec_depend on
lisa_msgs makes colcon build lisa_msgs first.

colcon comes from PyPI (colcon-common-extensions, in the dev venv), and so do ament_cmake and the
rosidl generators, found through the venv on ``AMENT_PREFIX_PATH``/``CMAKE_PREFIX_PATH`` after
the wheels' CMake exports are pointed at this venv's Python (as ``make venv`` does). The install
space is then used as a user would, after ``. install/setup.sh``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.lisa_ros.install_helpers import (
    VENV,
    VENV_BIN,
    loopback_env,
    run_lisa_node_until_configure_fails,
    run_probe,
)
from tools.build_lisa_msgs import PythonPaths, build_environment, fix_cmake_exports

REPO = Path(__file__).resolve().parents[2]
PACKAGE_FILES = ("setup.py", "setup.cfg", "package.xml")
PACKAGE_DIRS = ("resource", "launch", "config", "lisa_model", "lisa_ros", "training", "lisa_msgs")
INTERFACES = ("msg/Target.msg", "msg/Segmentation.msg", "action/Segment.action")

pytestmark = pytest.mark.ros


def _colcon() -> Path:
    colcon = VENV_BIN / "colcon"
    if not colcon.is_file():
        pytest.skip(
            f"colcon is not installed in {VENV_BIN} (pip install colcon-common-extensions)"
        )
    return colcon


def copy_repository(src: Path) -> None:
    """What a clone holds, without caches and build trees."""
    src.mkdir(parents=True)
    for name in PACKAGE_FILES:
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for name in PACKAGE_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    colcon = _colcon()
    fix_cmake_exports(VENV, PythonPaths.current())  # done by make venv; idempotent
    ws = tmp_path_factory.mktemp("colcon_ws")
    copy_repository(ws / "src" / "lisa_ros")
    env = build_environment(VENV, VENV)
    command = [str(colcon), "build", "--base-paths", "src/lisa_ros", "src/lisa_ros/lisa_msgs"]
    command += ["--cmake-args", f"-DPython3_EXECUTABLE={sys.executable}", "-DBUILD_TESTING=OFF"]
    result = subprocess.run(command, cwd=ws, env=env, capture_output=True, text=True, timeout=900)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "Summary: 2 packages finished" in result.stdout, output
    # lisa_ros waits for lisa_msgs (its exec_depend).
    finished_msgs = result.stdout.index("Finished <<< lisa_msgs")
    assert finished_msgs < result.stdout.index("Starting >>> lisa_ros"), result.stdout
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
    assert (site / "lisa_ros" / "launch_params.py").is_file()
    assert (site / "lisa_model" / "predictor.py").is_file()
    assert not (site / "lisa_msgs").exists(), "lisa_msgs/ must not be packaged as Python"
    (entry_points,) = site.glob("*.egg-info/entry_points.txt")
    assert "lisa_node = lisa_ros.node:main" in entry_points.read_text()


def test_colcon_build_installs_the_interfaces(workspace: Path) -> None:
    install = workspace / "install" / "lisa_msgs"
    share = install / "share" / "lisa_msgs"
    for relative in INTERFACES:
        assert (share / relative).read_text() == (REPO / "lisa_msgs" / relative).read_text()
    assert "<name>lisa_msgs</name>" in (share / "package.xml").read_text()
    index = install / "share" / "ament_index" / "resource_index"
    assert (index / "packages" / "lisa_msgs").is_file()
    assert (index / "rosidl_interfaces" / "lisa_msgs").read_text().split() == sorted(
        ["action/Segment.action", "action/Segment.idl", "msg/Segmentation.idl"]
        + ["msg/Segmentation.msg", "msg/Target.idl", "msg/Target.msg"]
    )
    (site,) = (install / "lib").glob("python3*/site-packages")
    assert (site / "lisa_msgs" / "msg" / "_segmentation.py").is_file()
    assert (install / "lib" / "liblisa_msgs__rosidl_typesupport_c.so").is_file()
    assert (install / "include" / "lisa_msgs" / "lisa_msgs" / "msg" / "segmentation.hpp").is_file()


def test_install_space_loads_its_own_lisa_msgs_and_indexes_both_packages(
    workspace: Path,
) -> None:
    """After ``. install/setup.sh``: lisa_msgs and its C libraries come from the install space
    (not from the venv, which has its own), and ament finds both packages there."""
    install = workspace / "install"
    env = loopback_env()
    for name in ("PYTHONPATH", "AMENT_PREFIX_PATH", "COLCON_PREFIX_PATH", "CMAKE_PREFIX_PATH"):
        env.pop(name, None)
    # The wheels' hook already ran in this process: the venv's libraries are on the path, after
    # what setup.sh prepends.
    env["_ROS_WHEELS_BOOTSTRAP_COMPLETE"] = "1"
    probe = run_probe(env, workspace, setup=install / "setup.sh")
    assert probe["module"].startswith(f"{install}/lisa_msgs/lib/"), probe
    assert probe["libs"], probe
    assert all(lib.startswith(f"{install}/lisa_msgs/lib/") for lib in probe["libs"]), probe
    assert probe["round_trip"] == ["probe", 2, 2]
    assert probe["prefixes"] == {
        "lisa_msgs": str(install / "lisa_msgs"),
        "lisa_ros": str(install / "lisa_ros"),
    }
    assert probe["share"] == {
        "lisa_ros": str(install / "lisa_ros" / "share" / "lisa_ros"),
        "lisa_msgs": str(install / "lisa_msgs" / "share" / "lisa_msgs"),
    }


def test_installed_lisa_node_runs_from_the_install_space(workspace: Path) -> None:
    """The installed executable imports the installed package; with a missing model it logs the
    configure failure naming the parameter, keeps running unconfigured, and exits 0 on SIGINT."""
    install = workspace / "install" / "lisa_ros"
    (site,) = (install / "lib").glob("python3*/site-packages")
    env = loopback_env(PYTHONPATH=f"{site}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    node = install / "lib" / "lisa_ros" / "lisa_node"
    run_lisa_node_until_configure_fails(node, "/lisa_colcon", env, workspace)
