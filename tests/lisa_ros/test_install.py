"""The venv route: ``make venv`` installs lisa_msgs and lisa_ros's ament layout into the venv.

``tools/build_lisa_msgs.py`` builds lisa_msgs with cmake into the venv's prefix and
``tools/install_lisa_ros.py`` adds the ament index entry, ``share/lisa_ros`` and
``lib/lisa_ros/lisa_node``, so that the generated types load in any Python of the venv with no
setup, and ``ros2 run``/``ros2 launch`` find lisa_ros where the venv is on ``AMENT_PREFIX_PATH``.
These tests check the venv's install without rebuilding it (make venv built it once), the tools'
pieces on temporary prefixes, and a build from scratch into a temporary prefix.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

from lisa_model.cli.common import UserError
from tests.lisa_ros.install_helpers import (
    VENV,
    loopback_env,
    run_lisa_node_until_configure_fails,
    run_probe,
)
from tools import build_lisa_msgs, install_lisa_ros
from tools.build_lisa_msgs import (
    REQUIRED_CMAKE_PACKAGES,
    PythonPaths,
    check_prefix,
    fix_cmake_exports,
    input_hash,
    installed_files,
    is_up_to_date,
)

REPO = Path(__file__).resolve().parents[2]
PREFIX = VENV.resolve()
SITE = PREFIX / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"
INTERFACES = ("msg/Target.msg", "msg/Segmentation.msg", "action/Segment.action")

pytestmark = pytest.mark.ros


def bare_env(**extra: str) -> dict[str, str]:
    """A fresh process's environment as a user has it: nothing ROS-specific exported."""
    env = loopback_env(**extra)
    for name in ("LD_LIBRARY_PATH", "_ROS_WHEELS_BOOTSTRAP_COMPLETE", "AMENT_PREFIX_PATH"):
        if name not in extra:
            env.pop(name, None)
    return env


# ------------------------------------------------------------------------ the venv's install


def test_venv_lisa_msgs_is_installed_from_these_sources(capsys) -> None:
    digest = input_hash(build_lisa_msgs.SOURCE, PREFIX)
    assert is_up_to_date(PREFIX, digest), (
        f"lisa_msgs in {PREFIX} is missing or older than lisa_msgs/: run make venv"
    )
    for path in installed_files(PREFIX):
        assert path.is_file(), path
    for relative in INTERFACES:
        installed = PREFIX / "share" / "lisa_msgs" / relative
        assert installed.read_text() == (REPO / "lisa_msgs" / relative).read_text()
    # A second run is a no-op (make venv runs it whenever its inputs change).
    assert build_lisa_msgs.main(["--prefix", str(PREFIX)]) == 0
    assert f"lisa_msgs up to date in {PREFIX}" in capsys.readouterr().out


def test_generated_types_load_in_a_fresh_venv_process_with_nothing_exported() -> None:
    """The C libraries land in <venv>/lib, which the ROS wheels' start-up hook puts on
    LD_LIBRARY_PATH; no user setup is needed."""
    probe = run_probe(bare_env(), REPO)
    assert Path(probe["module"]).resolve() == SITE / "lisa_msgs" / "__init__.py"
    assert probe["libs"], probe
    assert {Path(lib).parent.resolve() for lib in probe["libs"]} == {PREFIX / "lib"}
    assert probe["round_trip"] == ["probe", 2, 2]
    assert "prefixes" not in probe


def test_ament_index_finds_both_packages_in_the_venv() -> None:
    probe = run_probe(bare_env(AMENT_PREFIX_PATH=str(PREFIX)), REPO)
    assert {k: Path(v).resolve() for k, v in probe["prefixes"].items()} == {
        "lisa_msgs": PREFIX,
        "lisa_ros": PREFIX,
    }
    assert {k: Path(v).resolve() for k, v in probe["share"].items()} == {
        "lisa_ros": PREFIX / "share" / "lisa_ros",
        "lisa_msgs": PREFIX / "share" / "lisa_msgs",
    }


def test_venv_has_the_lisa_ros_share_files_and_executable() -> None:
    share = PREFIX / "share" / "lisa_ros"
    assert "<name>lisa_ros</name>" in (share / "package.xml").read_text()
    assert (share / "launch" / "lisa.launch.py").is_file()
    assert (share / "config" / "lisa_params.yaml").is_file()
    index = PREFIX / "share" / "ament_index" / "resource_index" / "packages"
    assert (index / "lisa_ros").is_file() and (index / "lisa_msgs").is_file()
    node = PREFIX / "lib" / "lisa_ros" / "lisa_node"
    assert os.access(node, os.X_OK)
    assert node.read_text().splitlines()[0] == f"#!{VENV}/bin/python"


def test_venv_lisa_node_executable_starts_and_stops(tmp_path: Path) -> None:
    node = PREFIX / "lib" / "lisa_ros" / "lisa_node"
    run_lisa_node_until_configure_fails(node, "/lisa_venv_install", bare_env(), tmp_path)


# ------------------------------------------------------------------------ the tools' pieces


def test_install_lisa_ros_into_a_fresh_prefix_is_repeatable(tmp_path: Path) -> None:
    prefix = tmp_path / "prefix"
    for _ in range(2):  # the second run replaces the same files
        written = install_lisa_ros.install_lisa_ros(prefix, REPO, python=Path(sys.executable))
    rel = sorted(str(p.relative_to(prefix)) for p in written)
    assert rel == [
        "lib/lisa_ros/lisa_node",
        "lib/lisa_ros/text_relay",
        "share/ament_index/resource_index/packages/lisa_ros",
        "share/lisa_ros/config",
        "share/lisa_ros/launch",
        "share/lisa_ros/package.xml",
    ]
    share = prefix / "share" / "lisa_ros"
    for name in ("config", "launch", "package.xml"):
        assert (share / name).is_symlink() and (share / name).resolve() == REPO / name
    node = prefix / "lib" / "lisa_ros" / "lisa_node"
    assert os.access(node, os.X_OK) and not node.is_symlink()
    text = node.read_text()
    assert text.startswith(f"#!{sys.executable}\n") and "from lisa_ros.node import main" in text
    compile(text, str(node), "exec")
    relay = (prefix / "lib" / "lisa_ros" / "text_relay").read_text()
    assert "from lisa_ros.text_relay import main" in relay


def test_install_lisa_ros_names_a_bad_prefix_or_repo(tmp_path: Path, capsys) -> None:
    assert install_lisa_ros.main(["--prefix", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"install_lisa_ros: error: --prefix {tmp_path}: no bin/python" in err
    with pytest.raises(UserError, match="not the lisa_ros repository"):
        install_lisa_ros.install_lisa_ros(tmp_path, tmp_path, python=Path(sys.executable))


def test_fix_cmake_exports_rewrites_only_the_wheel_builders_missing_paths(tmp_path: Path) -> None:
    paths = PythonPaths.current()
    export = tmp_path / "share" / "std_msgs" / "cmake" / "export_std_msgsExport.cmake"
    export.parent.mkdir(parents=True)
    existing = str(tmp_path)
    builder = "/opt/python/cp311-cp311"
    export.write_text(
        "set_target_properties(std_msgs::py PROPERTIES\n"
        f'  INTERFACE_INCLUDE_DIRECTORIES "{builder}/include/python3.11;'
        f"{builder}/lib/python3.11/site-packages/numpy/_core/include;"
        f'{existing};/nonexistent/include;${{_IMPORT_PREFIX}}/include"\n)\n'
    )
    other = tmp_path / "share" / "other" / "cmake" / "otherConfig.cmake"
    other.parent.mkdir(parents=True)
    other.write_text(f'set(x "{builder}/include/python3.11")\n')
    assert fix_cmake_exports(tmp_path, paths) == [export]
    assert export.read_text() == (
        "set_target_properties(std_msgs::py PROPERTIES\n"
        f'  INTERFACE_INCLUDE_DIRECTORIES "{paths.include};{paths.numpy_include};'
        f'{existing};/nonexistent/include;${{_IMPORT_PREFIX}}/include"\n)\n'
    )
    assert other.read_text() == f'set(x "{builder}/include/python3.11")\n'
    assert fix_cmake_exports(tmp_path, paths) == []  # idempotent


def test_the_venvs_cmake_exports_point_at_existing_headers() -> None:
    """What make venv fixed: no Python/numpy include dir of the wheel builder is left."""
    assert fix_cmake_exports(PREFIX, PythonPaths.current()) == []
    for path in (PREFIX / "share").glob("*/cmake/*.cmake"):
        assert "/opt/python/cp311-cp311" not in path.read_text(), path


def test_missing_build_packages_are_named_with_their_pip_names(tmp_path: Path, capsys) -> None:
    with pytest.raises(UserError) as info:
        check_prefix(tmp_path)
    message = str(info.value)
    assert message.startswith(f"{tmp_path} lacks the ROS build packages ")
    assert all(pip in message for pip in REQUIRED_CMAKE_PACKAGES.values())
    assert "pip install -c constraints/dev.txt ros-ament-cmake " in message
    assert build_lisa_msgs.main(["--source", str(tmp_path), "--prefix", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"build_lisa_msgs: error: --source {tmp_path}: no CMakeLists.txt" in err


def test_a_bad_definition_fails_the_build_with_the_generators_message(
    tmp_path: Path, capsys
) -> None:
    source = tmp_path / "lisa_msgs"
    shutil.copytree(build_lisa_msgs.SOURCE, source)
    with (source / "msg" / "Target.msg").open("a") as f:
        f.write("float32 BadName\n")
    args = ["--source", str(source), "--prefix", str(tmp_path / "prefix")]
    assert build_lisa_msgs.main([*args, "--build-dir", str(tmp_path / "build")]) == 2
    err = capsys.readouterr().err
    assert "build_lisa_msgs: error: cmake configure of lisa_msgs failed (exit 1)" in err
    assert "'BadName' is an invalid field name" in err
    assert not (tmp_path / "prefix").exists()


def test_fresh_build_into_a_temporary_prefix(tmp_path: Path) -> None:
    """A build from scratch (about 25 s on 2 idle cores), then a no-op second run; the result
    loads from that prefix when it comes first on the paths, as a colcon install would."""
    prefix, build_dir = tmp_path / "prefix", tmp_path / "build"
    assert build_lisa_msgs.build_lisa_msgs(prefix, build_dir) is True
    assert build_lisa_msgs.build_lisa_msgs(prefix, build_dir) is False
    prefix = prefix.resolve()
    site = prefix / SITE.relative_to(PREFIX)
    lib_path = os.pathsep.join([str(prefix / "lib"), os.environ.get("LD_LIBRARY_PATH", "")])
    env = loopback_env(PYTHONPATH=str(site), LD_LIBRARY_PATH=lib_path)
    env["_ROS_WHEELS_BOOTSTRAP_COMPLETE"] = "1"  # keep this order of LD_LIBRARY_PATH
    probe = run_probe(env, tmp_path)
    assert Path(probe["module"]).resolve() == site / "lisa_msgs" / "__init__.py"
    assert {Path(lib).parent for lib in probe["libs"]} == {prefix / "lib"}
    assert probe["round_trip"] == ["probe", 2, 2]
