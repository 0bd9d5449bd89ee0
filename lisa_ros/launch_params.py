"""What ``lisa.launch.py`` hands to ``lisa_node``, as pure functions of the launch arguments.

The rule: the params file wins; a launch argument overrides it only when given. ``model:=``,
``device:=`` and ``depth:=`` default to "" (not given), so a ``device: cpu`` in the user's YAML
stays ``cpu`` on a GPU machine unless ``device:=cuda`` is passed. ``respawn:=true`` restarts a node
that died, ``respawn_delay`` seconds later; stopping launch stops it for good.

launch/launch_ros are not installable from PyPI, so the launch file only resolves its arguments
and calls ``node_options``; the rule lives (and is tested) here.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

# Launch arguments that override the params file when given (non-empty): strings, booleans.
OVERRIDES = ("model", "device")
BOOL_OVERRIDES = ("depth",)
# Every launch argument node_options reads.
ARGUMENTS = ("params_file", *OVERRIDES, *BOOL_OVERRIDES, "respawn", "respawn_delay")
_TRUE = ("true", "1")  # what launch itself accepts as booleans (any case)
_FALSE = ("false", "0")


def node_parameters(
    params_file: str, overrides: Mapping[str, str], bool_overrides: Mapping[str, str] = {}
) -> list[str | dict[str, str | bool]]:
    """The ``parameters`` of the Node action: the params file, then the given overrides.

    Later entries win in ROS, so the dict of overrides comes after the file, and holds only the
    overrides whose value is not empty (an empty launch argument means "not given");
    ``bool_overrides`` are turned into booleans (``depth:=true``).
    """
    if not params_file.strip():
        raise ValueError("launch argument 'params_file' is empty (a YAML parameters file)")
    given: dict[str, str | bool] = {
        name: value.strip() for name, value in overrides.items() if value.strip()
    }
    given.update(
        {name: parse_bool(name, value) for name, value in bool_overrides.items() if value.strip()}
    )
    return [params_file, given] if given else [params_file]


def parse_bool(name: str, text: str) -> bool:
    """A boolean launch argument: true/false or 1/0, any case."""
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(f"launch argument {name!r}: expected true or false, got {text!r}")


def parse_seconds(name: str, text: str) -> float:
    """A duration launch argument: a finite number of seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"launch argument {name!r}: expected seconds >= 0, got {text!r}")
    return value


def node_options(arguments: Mapping[str, str]) -> dict[str, Any]:
    """Keyword arguments for ``launch_ros.actions.Node`` from the resolved launch arguments
    (``context.launch_configurations``): ``parameters``, ``respawn`` and ``respawn_delay``."""
    missing = [name for name in ARGUMENTS if name not in arguments]
    if missing:
        raise ValueError(f"launch arguments not declared: {', '.join(missing)}")
    return {
        "parameters": node_parameters(
            arguments["params_file"],
            {name: arguments[name] for name in OVERRIDES},
            {name: arguments[name] for name in BOOL_OVERRIDES},
        ),
        "respawn": parse_bool("respawn", arguments["respawn"]),
        "respawn_delay": parse_seconds("respawn_delay", arguments["respawn_delay"]),
    }
