"""Helpers for the install tests (venv route and colcon route): run an installed lisa_node."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

VENV = Path(sys.prefix)
VENV_BIN = Path(sys.executable).parent

# Run with the Python of an install: which lisa_msgs module and C libraries load, a serialisation
# round trip through them, and (with AMENT_PREFIX_PATH set) what the ament index says. Prints one
# JSON line.
PROBE = """
import json, os
import lisa_msgs
from lisa_msgs.action import Segment
from lisa_msgs.msg import Segmentation, Target
from rclpy.serialization import deserialize_message, serialize_message

msg = Segmentation(command="probe", targets=[Target(index=2)])
back = deserialize_message(serialize_message(msg), Segmentation)
goal = Segment.Goal(command="probe", explain=Segment.Goal.EXPLAIN_YES)
with open("/proc/self/maps") as maps:
    libs = sorted({line.split()[-1] for line in maps if "liblisa_msgs__" in line})
out = {
    "module": lisa_msgs.__file__,
    "libs": libs,
    "round_trip": [back.command, back.targets[0].index, goal.explain],
}
if os.environ.get("AMENT_PREFIX_PATH"):
    from ament_index_python.packages import get_package_share_directory
    from ament_index_python.packages import get_packages_with_prefixes

    prefixes = get_packages_with_prefixes()
    out["prefixes"] = {k: v for k, v in prefixes.items() if k.startswith("lisa_")}
    out["share"] = {n: get_package_share_directory(n) for n in ("lisa_ros", "lisa_msgs")}
print(json.dumps(out))
"""


def loopback_env(**extra: str) -> dict[str, str]:
    """This process's environment, DDS on loopback in a domain of its own, plus ``extra``."""
    return {
        **os.environ,
        "ROS_AUTOMATIC_DISCOVERY_RANGE": "LOCALHOST",
        "ROS_DOMAIN_ID": str(1 + os.getpid() % 100),
        **extra,
    }


def run_probe(env: dict[str, str], cwd: Path, setup: Path | None = None) -> dict[str, Any]:
    """Run ``PROBE`` with this venv's Python in ``env`` (after sourcing ``setup``, a colcon
    ``setup.sh``, if given); return what it printed."""
    command = f'exec "{sys.executable}" -c "$PROBE"'
    if setup is not None:
        command = f'. "{setup}" && {command}'
    result = subprocess.run(
        ["sh", "-c", command],
        cwd=cwd,
        env={**env, "PROBE": PROBE},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def run_lisa_node_until_configure_fails(
    executable: Path, namespace: str, env: dict[str, str], cwd: Path
) -> str:
    """Start an installed ``lisa_node`` with a model that does not exist: it must log the
    configure failure naming the parameter, keep running unconfigured, and exit 0 on SIGINT.
    Returns its output."""
    args = [str(executable), "--ros-args", "-p", "model:=/nonexistent/lisa"]
    args += ["-r", f"__ns:={namespace}"]
    proc = subprocess.Popen(
        args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
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
    return output
