"""Give an editable ``lisa_ros`` install the ament layout that ``ros2 run``/``ros2 launch`` need.

``pip install -e .`` makes ``lisa_ros`` importable and puts the ``lisa_node`` script in ``bin/``,
but ROS looks elsewhere: ``ros2 run lisa_ros lisa_node`` runs ``<prefix>/lib/lisa_ros/lisa_node``
and ``ros2 launch lisa_ros lisa.launch.py`` reads ``<prefix>/share/lisa_ros/launch``, both found
through the ament index entry ``share/ament_index/resource_index/packages/lisa_ros`` in a prefix
on ``AMENT_PREFIX_PATH``. ``python tools/install_lisa_ros.py`` (run by ``make venv``) adds them to
the venv, as colcon would to ``install/lisa_ros``:

- ``share/ament_index/resource_index/packages/lisa_ros`` (empty marker file);
- ``share/lisa_ros/package.xml``, ``share/lisa_ros/launch``, ``share/lisa_ros/config``: links to
  the repository's, so that edits take effect at once, like the editable Python install;
- ``lib/lisa_ros/lisa_node`` and ``lib/lisa_ros/text_relay``: scripts running their modules'
  ``main`` with the venv's Python.

Running it again replaces the same files; nothing else in the prefix is touched.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

from lisa_model.cli.common import UserError, run_cli

REPO = Path(__file__).resolve().parents[1]
PACKAGE = "lisa_ros"
SHARED = ("package.xml", "launch", "config")  # linked into share/lisa_ros
EXECUTABLES = {  # lib/lisa_ros/<name> runs <module>:main
    "lisa_node": "lisa_ros.node",
    "text_relay": "lisa_ros.text_relay",
}


def executable_script(python: Path, module: str) -> str:
    """The text of ``lib/lisa_ros/<name>``: ``module.main()`` under the venv's Python."""
    return (
        f"#!{python}\n"
        f"# Installed by tools/install_lisa_ros.py: ros2 run {PACKAGE} runs {module}:main.\n"
        "import sys\n\n"
        f"from {module} import main\n\n"
        'if __name__ == "__main__":\n'
        "    sys.exit(main())\n"
    )


def _replace_with_link(link: Path, target: Path) -> None:
    if link.is_symlink() or link.is_file():
        link.unlink()
    elif link.is_dir():
        shutil.rmtree(link)
    link.symlink_to(target, target_is_directory=target.is_dir())


def install_lisa_ros(prefix: Path, repo: Path = REPO, python: Path | None = None) -> list[Path]:
    """Install the ament layout of ``repo``'s lisa_ros into ``prefix``; return what it wrote.

    ``python`` (default ``<prefix>/bin/python``) is the interpreter the executables run with.
    """
    prefix, repo = prefix.resolve(), repo.resolve()
    python = python or prefix / "bin" / "python"
    if not python.is_file():
        raise UserError(f"--prefix {prefix}: no bin/python (expected a venv)")
    missing = [name for name in SHARED if not (repo / name).exists()]
    if missing or not (repo / "resource" / PACKAGE).is_file():
        lacks = ", ".join(missing or [f"resource/{PACKAGE}"])
        raise UserError(f"--repo {repo}: not the lisa_ros repository (no {lacks})")
    written = []
    index = prefix / "share" / "ament_index" / "resource_index" / "packages" / PACKAGE
    index.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(repo / "resource" / PACKAGE, index)
    written.append(index)
    share = prefix / "share" / PACKAGE
    share.mkdir(parents=True, exist_ok=True)
    for name in SHARED:
        _replace_with_link(share / name, repo / name)
        written.append(share / name)
    lib = prefix / "lib" / PACKAGE
    lib.mkdir(parents=True, exist_ok=True)
    for name, module in EXECUTABLES.items():
        path = lib / name
        if path.is_symlink():
            path.unlink()
        path.write_text(executable_script(python, module))
        path.chmod(0o755)
        written.append(path)
    return written


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="install_lisa_ros",
        description="Add the ament layout (share/lisa_ros, lib/lisa_ros/lisa_node, ament index) "
        "of an editable lisa_ros install to a venv, for ros2 run and ros2 launch.",
    )
    parser.add_argument(
        "--prefix",
        type=Path,
        default=Path(sys.prefix),
        help="the venv (default: this Python's, %(default)s)",
    )
    parser.add_argument(
        "--repo", type=Path, default=REPO, help="the lisa_ros checkout (default: %(default)s)"
    )
    return parser


def _run_args(args: argparse.Namespace) -> int:
    written = install_lisa_ros(args.prefix, args.repo)
    root = args.prefix.resolve()
    names = ", ".join(os.path.relpath(path, root) for path in written)
    print(f"lisa_ros ament layout in {root}: {names}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(_parser(), _run_args, argv)


if __name__ == "__main__":
    sys.exit(main())
