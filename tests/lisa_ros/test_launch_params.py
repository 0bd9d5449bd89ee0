"""lisa.launch.py's rule (lisa_ros.launch_params): the params file wins, launch arguments
override it only when given; respawn settings are checked.

The last test applies the rule as launch_ros does (the file, then the overrides as a second
params file keyed by the node's full name) to a real lisa_node.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)

import pytest  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402
from rclpy.context import Context  # noqa: E402

from lisa_ros.launch_params import (  # noqa: E402
    ARGUMENTS,
    OVERRIDES,
    node_options,
    node_parameters,
    parse_bool,
    parse_seconds,
)

DEFAULTS = {
    "params_file": "/share/lisa_ros/config/lisa_params.yaml",
    "model": "",
    "device": "",
    "depth": "",
    "respawn": "false",
    "respawn_delay": "2.0",
}


def test_the_params_file_alone_when_no_override_is_given() -> None:
    assert node_parameters("/p.yaml", {"model": "", "device": ""}) == ["/p.yaml"]
    assert node_parameters("/p.yaml", {"model": "  ", "device": "\t"}) == ["/p.yaml"]
    assert node_parameters("/p.yaml", {}) == ["/p.yaml"]


def test_given_overrides_come_after_the_file_and_only_those() -> None:
    assert node_parameters("/p.yaml", {"model": "", "device": "cuda:1"}) == [
        "/p.yaml",
        {"device": "cuda:1"},
    ]
    assert node_parameters("/p.yaml", {"model": " /ckpt ", "device": "cpu"}) == [
        "/p.yaml",
        {"model": "/ckpt", "device": "cpu"},
    ]
    with pytest.raises(ValueError, match="launch argument 'params_file' is empty"):
        node_parameters(" ", {"model": "x"})


def test_node_options_from_the_launch_defaults() -> None:
    assert set(ARGUMENTS) == set(DEFAULTS) and set(OVERRIDES) == {"model", "device"}
    assert node_options(DEFAULTS) == {
        "parameters": [DEFAULTS["params_file"]],
        "respawn": False,
        "respawn_delay": 2.0,
    }
    given = {**DEFAULTS, "device": "cpu", "depth": "True", "respawn": "True", "respawn_delay": "0"}
    assert node_options({**given, "namespace": "/robot"}) == {
        "parameters": [DEFAULTS["params_file"], {"device": "cpu", "depth": True}],
        "respawn": True,
        "respawn_delay": 0.0,
    }
    with pytest.raises(ValueError, match="launch arguments not declared: respawn, respawn_delay"):
        node_options({"params_file": "/p.yaml", "model": "", "device": "", "depth": ""})
    with pytest.raises(ValueError, match="launch argument 'depth': expected true or false"):
        node_options({**DEFAULTS, "depth": "yes please"})


BOOLS = [("true", True), ("TRUE", True), ("1", True), ("false", False), ("False", False)]


@pytest.mark.parametrize(("text", "value"), [*BOOLS, (" 0 ", False)])
def test_parse_bool(text: str, value: bool) -> None:
    assert parse_bool("respawn", text) is value


@pytest.mark.parametrize("text", ["", "yes", "2", "on"])
def test_parse_bool_names_the_argument(text: str) -> None:
    with pytest.raises(
        ValueError, match=f"launch argument 'respawn': expected true or false, got {text!r}"
    ):
        parse_bool("respawn", text)


def test_parse_seconds() -> None:
    assert parse_seconds("respawn_delay", "2.5") == 2.5
    assert parse_seconds("respawn_delay", "0") == 0.0
    for bad in ("-1", "nan", "inf", "soon", ""):
        with pytest.raises(
            ValueError, match=f"'respawn_delay': expected seconds >= 0, got {bad!r}"
        ):
            parse_seconds("respawn_delay", bad)
    assert math.isfinite(parse_seconds("respawn_delay", "1e3"))


# --------------------------------------------------------------- the rule on a real lisa_node


@pytest.fixture
def context() -> Iterator[Context]:
    ctx = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


def params_file_arguments(parameters: list, node_name: str, tmp_path: Path) -> list[str]:
    """``--params-file`` arguments as launch_ros makes them: a file as is, a dict written to a
    file keyed by the node's full name; in order (later files win)."""
    args = ["--ros-args"]
    for i, entry in enumerate(parameters):
        if isinstance(entry, dict):
            path = tmp_path / f"launch_params_{i}.yaml"
            path.write_text(yaml.safe_dump({node_name: {"ros__parameters": entry}}))
            entry = str(path)
        args += ["--params-file", entry]
    return args


@pytest.mark.ros
def test_yaml_values_survive_unless_a_launch_argument_is_given(
    context: Context, tmp_path: Path
) -> None:
    """Issue 22: a YAML ``device: cpu`` stayed ``cpu`` only if launch did not replace it."""
    from lisa_ros.node import LisaNode

    user_yaml = tmp_path / "mine.yaml"
    user_yaml.write_text(
        yaml.safe_dump(
            {"/**/lisa_node": {"ros__parameters": {"device": "cpu", "model": "/my/ckpt"}}}
        )
    )
    cases = [
        ({}, {"device": "cpu", "model": "/my/ckpt"}),
        ({"device": "cuda:1"}, {"device": "cuda:1", "model": "/my/ckpt"}),
        ({"model": "/other"}, {"device": "cpu", "model": "/other"}),
    ]
    for i, (given, expected) in enumerate(cases):
        arguments = {**DEFAULTS, "params_file": str(user_yaml), **given}
        parameters = node_options(arguments)["parameters"]
        cli_args = params_file_arguments(parameters, f"/case{i}/lisa_node", tmp_path)
        node = LisaNode(namespace=f"/case{i}", context=context, cli_args=cli_args)
        try:
            got = {name: node.get_parameter(name).value for name in expected}
        finally:
            node.destroy_node()
        assert got == expected, given
