"""A wheel built from the repository ships the data folders, and the build warns about nothing.

The wheel is built with the venv's own setuptools (``pip wheel --no-build-isolation``, no
download) from a copy of the package's files, because the build writes ``build/`` and
``*.egg-info`` next to ``setup.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: What a build of the package reads (setup.py's packages, package_data and data_files).
PACKAGE_FILES = ("setup.py", "setup.cfg", "pyproject.toml", "package.xml")
PACKAGE_DIRS = ("resource", "launch", "config", "lisa_model", "lisa_ros", "training")
#: Any line of the build output that warns (setuptools' BuildBackendWarning,
#: SetuptoolsDeprecationWarning, distutils' "warning: ...", pip's "WARNING: ...").
WARNING = re.compile(r"warning", re.IGNORECASE)


def _shipped(folder: str, pattern: str = "*") -> list[str]:
    """Files of the repository under ``folder`` matching ``pattern``, as wheel paths."""
    return sorted(
        p.relative_to(REPO).as_posix() for p in (REPO / folder).rglob(pattern) if p.is_file()
    )


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    """``(names in the wheel, build output)``."""
    src = tmp_path_factory.mktemp("src")
    for name in PACKAGE_FILES:
        shutil.copy2(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in PACKAGE_DIRS:
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("wheel")
    # PYTHONDONTWRITEBYTECODE makes distutils warn that it skips byte-compiling: not the
    # package's doing, so the build runs as on a user's machine.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    command = [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation"]
    result = subprocess.run(
        [*command, "--verbose", "-w", str(out)],
        cwd=src,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    (wheel,) = out.glob("lisa_ros-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return archive.namelist(), output


def test_wheel_ships_the_demo_model_examples_and_configs(wheel_build) -> None:
    names, _ = wheel_build
    demo_model = _shipped("lisa_model/data/demo_model")
    assert "lisa_model/data/demo_model/vision_tower/config.json" in demo_model
    assert "lisa_model/data/demo_model/demo.json" in demo_model
    examples = _shipped("lisa_model/data/examples")
    assert "lisa_model/data/examples/commands.json" in examples
    configs = _shipped("training/configs", "*.yaml")
    assert "training/configs/shapes_demo.yaml" in configs
    missing = sorted(set(demo_model + examples + configs) - set(names))
    assert not missing, missing
    assert "training/data/ade20k_classes.json" in names
    # the code beside them, and no data folder turned into a package of its own
    assert "training/shapes/writer.py" in names and "training/demo_model/__main__.py" in names
    assert not [n for n in names if n.startswith("lisa_model/data/") and n.endswith(".py")]


def test_wheel_build_prints_no_packaging_warning(wheel_build) -> None:
    _, output = wheel_build
    warnings = [line for line in output.splitlines() if WARNING.search(line)]
    assert not warnings, "\n".join(warnings)
