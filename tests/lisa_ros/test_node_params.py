"""lisa_node's parameters, params YAML, launch file and entry point.

A bad value set while the node runs is refused at once with a reason naming the parameter; a bad
start-up value fails ``configure`` with one log line naming the parameter and leaves the node
unconfigured; ``config/lisa_params.yaml`` is what ``lisa_ros.settings`` renders; the launch file
declares its arguments and holds no logic (launch/launch_ros are not installable here, so it is
parsed and run against stand-ins that record the Node's arguments; the parameter rule itself is
tested in test_launch_params.py); ``main`` exits cleanly on Ctrl-C.
"""

from __future__ import annotations

import array
import ast
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
os.environ["ROS_DOMAIN_ID"] = str(1 + os.getpid() % 100)

import pytest  # noqa: E402
import rclpy  # noqa: E402
import yaml  # noqa: E402
from rclpy.context import Context  # noqa: E402
from rclpy.lifecycle import TransitionCallbackReturn  # noqa: E402
from rclpy.parameter import Parameter  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402
from std_msgs.msg import String  # noqa: E402

from lisa_ros.node import LisaNode  # noqa: E402
from lisa_ros.pipeline import PipelineConfig  # noqa: E402
from lisa_ros.settings import (  # noqa: E402
    SETTINGS,
    YAML_NODE_KEY,
    LisaNodeConfig,
    SettingError,
    defaults,
    render_yaml,
)

pytestmark = pytest.mark.ros

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "fixtures" / "lisa_reference" / "lisa-tiny"
PARAMS_YAML = REPO / "config" / "lisa_params.yaml"
LAUNCH_FILE = REPO / "launch" / "lisa.launch.py"
RCLPY_OWN = {"use_sim_time", "start_type_description_service"}  # declared by every rclpy node


@pytest.fixture(scope="module")
def context() -> Iterator[Context]:
    ctx = Context()
    rclpy.init(args=["--ros-args", "--disable-external-lib-logs"], context=ctx)
    yield ctx
    rclpy.shutdown(context=ctx)


@pytest.fixture
def make_node(context: Context) -> Iterator[Any]:
    nodes: list[LisaNode] = []

    def make(namespace: str = "/params", cli_args: list[str] | None = None, **values: Any):
        overrides = [Parameter(k, value=v) for k, v in values.items()]
        node = LisaNode(
            namespace=namespace,
            context=context,
            parameter_overrides=overrides,
            cli_args=cli_args,
        )
        nodes.append(node)
        return node

    yield make
    for node in nodes:
        node.destroy_node()


BAD_VALUES = [
    ({"max_rate_hz": -1.0}, "parameter 'max_rate_hz': -1.0 is not a double in [0.01, 1000]"),
    ({"mode": "fast"}, "parameter 'mode': 'fast' is not one of 'generate', 'segment'"),
    ({"image_transport": "theora"}, "parameter 'image_transport': 'theora' is not one of"),
    ({"image_reliability": "sometimes"}, "parameter 'image_reliability': 'sometimes' is not"),
    ({"quantization": "3bit"}, "parameter 'quantization': '3bit' is not one of"),
    ({"dtype": "int8"}, "parameter 'dtype': 'int8' is not one of"),
    ({"max_new_tokens": "ten"}, "parameter 'max_new_tokens': expected an integer in [1, 4096]"),
    ({"queue_size": 0}, "parameter 'queue_size': 0 is not an integer in [1, 1000]"),
    ({"image_wait_timeout": float("nan")}, "parameter 'image_wait_timeout': nan is not a double"),
    ({"continuous": 1}, "parameter 'continuous': expected a bool, got int 1"),
    ({"explain": True, "mode": "segment"}, "parameter 'explain': explain=true needs mode"),
    ({"device": "gpu"}, "parameter 'device': 'gpu' is not a torch device"),
    ({"quantization": "8bit", "device": "cpu"}, "parameter 'quantization': 8bit needs a CUDA"),
    (
        {"model": "/nonexistent/lisa-7b"},
        "parameter 'model': /nonexistent/lisa-7b: no such checkpoint directory",
    ),
    ({"model": str(REPO / "config")}, "not a LISA checkpoint (no config.json)"),
]


@pytest.mark.parametrize(("values", "message"), BAD_VALUES, ids=[str(v) for v, _ in BAD_VALUES])
def test_bad_parameter_fails_configure_with_a_clear_log_line(
    make_node, capfd, values: dict[str, Any], message: str
) -> None:
    node = make_node(autostart=False, **{"model": str(TINY), **values})
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert node.state == "unconfigured"
    assert node.model is None and node.pipeline is None and node.config is None
    assert node.last_error is not None and message in node.last_error, node.last_error
    time.sleep(0.05)
    err = capfd.readouterr().err
    line = next((ln for ln in err.splitlines() if "configure failed" in ln), "")
    assert "[ERROR]" in line and message in line, err


def test_cuda_device_without_cuda_is_refused(make_node) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    node = make_node(autostart=False, model=str(TINY), device="cuda")
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "parameter 'device': 'cuda' requested but CUDA is not available" in node.last_error


def test_no_model_needs_the_embedded_demo_model(make_node) -> None:
    from lisa_model.demo import DEMO_MODEL_DIR

    node = make_node(autostart=False)  # model "" = the embedded demo model
    if (DEMO_MODEL_DIR / "config.json").is_file():  # shipped in the repository
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        return
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "parameter 'model': no model given and the embedded demo model is not installed" in (
        node.last_error
    )


def test_fixing_the_parameter_lets_configure_succeed(make_node) -> None:
    node = make_node(autostart=False, model=str(TINY), mode="fast")
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    node.set_parameters([Parameter("mode", value="segment")])
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.state == "inactive" and node.model is not None
    assert node.config.mode == "segment" and node.last_error is None
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    assert node.model is None and node.state == "unconfigured"


def test_encoder_dtype_and_threads_apply_when_the_model_loads(make_node) -> None:
    import torch

    threads = torch.get_num_threads()
    wanted = 1 if threads != 1 else 2
    node = make_node(autostart=False, model=str(TINY), encoder_dtype="bfloat16", threads=wanted)
    try:
        assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
        assert torch.get_num_threads() == wanted
    finally:
        torch.set_num_threads(threads)
    model = node.model
    assert model.sam_encoder_dtype == torch.bfloat16
    assert next(model.vision_tower.parameters()).dtype == torch.bfloat16
    assert next(model.sam.mask_decoder.parameters()).dtype == torch.float32
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS


def test_a_pre_encoding_slower_than_max_image_age_is_reported_once(make_node, capfd) -> None:
    import numpy as np

    from lisa_ros.pipeline import Encoded
    from lisa_ros.pipeline_types import Frame

    node = make_node(autostart=False, model=str(TINY), max_image_age=0.5)
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    frame = Frame(np.zeros((4, 4, 3), np.uint8), stamp=0.0, received=0.0, seq=1)
    node._log_encoding(Encoded(frame, seconds=0.3))  # in time: nothing to say
    node._log_encoding(Encoded(frame, seconds=0.7))
    node._log_encoding(Encoded(frame, seconds=0.9))
    assert node.trigger_cleanup() == TransitionCallbackReturn.SUCCESS
    lines = [ln for ln in capfd.readouterr().err.splitlines() if "pre-encoding a frame" in ln]
    assert len(lines) == 1, lines
    assert "[WARN]" in lines[0] and "took 0.70 s" in lines[0]
    assert "max_image_age (0.5 s)" in lines[0]


def test_config_from_values_checks_types_and_converts_numbers() -> None:
    assert LisaNodeConfig.from_values(defaults()) == LisaNodeConfig()
    assert LisaNodeConfig().pipeline == PipelineConfig()
    config = LisaNodeConfig.from_values(
        {"max_rate_hz": 3, "quantization": "", "vision_tower": " ", "publish_overlay": False}
    )
    assert config.pipeline.max_rate_hz == 3.0 and isinstance(config.pipeline.max_rate_hz, float)
    assert config.quantization is None and config.vision_tower is None
    assert config.pipeline.overlay is False
    for values, name in (
        ({"queue_size": True}, "queue_size"),
        ({"max_image_age": "1.0"}, "max_image_age"),
        ({"model": None}, "model"),
        ({"max_command_chars": 2.5}, "max_command_chars"),
    ):
        with pytest.raises(SettingError) as info:
            LisaNodeConfig.from_values(values)
        assert info.value.name == name and f"parameter '{name}'" in str(info.value)


def test_declared_parameters_are_described_and_equal_the_params_yaml(make_node) -> None:
    node = make_node()  # autostart stays on, but the node is never spun
    declared = {
        name: p.value
        for name, p in node.get_parameters_by_prefix("").items()
        if name not in RCLPY_OWN
    }
    assert PARAMS_YAML.read_text() == render_yaml(), (
        "config/lisa_params.yaml is rendered from lisa_ros/settings.py: "
        "python -m lisa_ros.settings yaml > config/lisa_params.yaml"
    )
    yaml_params = yaml.safe_load(PARAMS_YAML.read_text())[YAML_NODE_KEY]["ros__parameters"]
    assert declared == defaults()
    assert yaml_params == declared
    for name, value in yaml_params.items():
        assert type(value) is type(declared[name]), name  # 2 vs 2.0 matters to ROS
        assert node.describe_parameter(name).description, f"{name} has no description"
    assert [s.name for s in SETTINGS] == list(declared)


def test_params_yaml_applies_to_the_node_in_any_namespace(make_node, tmp_path: Path) -> None:
    data = yaml.safe_load(PARAMS_YAML.read_text())
    data[YAML_NODE_KEY]["ros__parameters"]["mode"] = "segment"
    data[YAML_NODE_KEY]["ros__parameters"]["max_rate_hz"] = 7.5
    custom = tmp_path / "params.yaml"
    custom.write_text(yaml.safe_dump(data))
    for namespace in ("/", "/robot/arm"):
        node = make_node(
            namespace=namespace, cli_args=["--ros-args", "--params-file", str(custom)]
        )
        assert node.get_parameter("mode").value == "segment"
        assert node.read_config().pipeline.max_rate_hz == 7.5


@pytest.fixture
def served(context: Context, make_node) -> Iterator[Any]:
    """A LisaNode spun by an executor, and a parameter client on another node: what
    ``ros2 param set/describe`` do, over the real services."""
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.parameter_client import AsyncParameterClient

    executor = SingleThreadedExecutor(context=context)
    thread = threading.Thread(target=executor.spin, daemon=True)
    probe = rclpy.create_node("param_probe", namespace="/served", context=context)
    executor.add_node(probe)
    started = []

    def start(**values: Any) -> tuple[LisaNode, AsyncParameterClient]:
        node = make_node(namespace="/served", **{"model": str(TINY), **values})
        executor.add_node(node)
        if not started:
            thread.start()
            started.append(True)
        client = AsyncParameterClient(probe, node.get_fully_qualified_name())
        assert client.wait_for_services(timeout_sec=60.0)
        return node, client

    yield start
    executor.shutdown()
    if started:
        thread.join(10)
    probe.destroy_node()


def _wait(future: Any, seconds: float = 60.0) -> Any:
    deadline = time.monotonic() + seconds
    while not future.done():
        assert time.monotonic() < deadline, "no answer from the parameter service"
        time.sleep(0.01)
    return future.result()


def _set(client: Any, name: str, value: Any) -> Any:
    (result,) = _wait(client.set_parameters([Parameter(name, value=value)])).results
    return result


REFUSED = [
    ("queue_size", "abc", "parameter 'queue_size': expected an integer in [1, 1000], got str"),
    ("queue_size", 0, "parameter 'queue_size': 0 is not an integer in [1, 1000]"),
    ("mode", "fast", "parameter 'mode': 'fast' is not one of 'generate', 'segment'"),
    ("max_rate_hz", -2.0, "parameter 'max_rate_hz': -2.0 is not a double in [0.01, 1000]"),
    ("continuous", "yes", "parameter 'continuous': expected a bool, got str 'yes'"),
    ("model", "/other/model", "parameter 'model': read-only: set it at start-up"),
    ("dtype", "float16", "parameter 'dtype': read-only"),
]


def test_bad_values_are_refused_at_once_naming_the_parameter(served) -> None:
    node, client = served(autostart=False)
    for name, value, reason in REFUSED:
        before = node.get_parameter(name).value
        result = _set(client, name, value)
        assert not result.successful and reason in result.reason, (name, result.reason)
        assert node.get_parameter(name).value == before
    # Good values are accepted; an integer is taken for a double.
    assert _set(client, "queue_size", 3).successful
    assert node.get_parameter("queue_size").value == 3
    assert _set(client, "max_rate_hz", 3).successful
    value = node.get_parameter("max_rate_hz").value
    assert value == 3.0 and isinstance(value, float)
    # A rule between two parameters: explain needs mode generate.
    assert _set(client, "mode", "segment").successful
    result = _set(client, "explain", True)
    assert not result.successful and "explain=true needs mode 'generate'" in result.reason
    both = [Parameter("mode", value="generate"), Parameter("explain", value=True)]
    assert _wait(client.set_parameters_atomically(both)).result.successful


def test_describe_shows_type_range_choices_and_read_only(served) -> None:
    from rcl_interfaces.msg import ParameterType

    node, client = served(autostart=False)
    names = ["queue_size", "max_image_age", "mode", "model"]
    queue, age, mode, model = _wait(client.describe_parameters(names)).descriptors
    assert queue.type == ParameterType.PARAMETER_INTEGER and not queue.dynamic_typing
    (queue_range,) = queue.integer_range
    assert (queue_range.from_value, queue_range.to_value) == (1, 1000)
    assert "next configure" in queue.additional_constraints
    (age_range,) = age.floating_point_range
    assert (age_range.from_value, age_range.to_value) == (0.0, 3600.0)
    assert age.type == ParameterType.PARAMETER_DOUBLE and "(s)" in age.description
    assert "one of 'generate', 'segment'" in mode.additional_constraints and not mode.read_only
    assert model.read_only and model.type == ParameterType.PARAMETER_STRING


def test_live_settings_apply_to_the_running_node(served, capfd) -> None:
    node, client = served(autostart=False, mode="segment")
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.trigger_activate() == TransitionCallbackReturn.SUCCESS
    assert _set(client, "max_image_age", 4.0).successful
    assert node.pipeline.config.max_image_age == 4.0
    assert node.config.pipeline.max_image_age == 4.0
    assert _set(client, "mode", "generate").successful
    assert node.config.mode == "generate"
    # A setting that rebuilds topics waits for the next configure, and says so.
    assert _set(client, "image_transport", "compressed").successful
    assert node.config.image_transport == "raw"
    deadline = time.monotonic() + 30
    err = ""
    while "takes effect on the next configure" not in err:
        assert time.monotonic() < deadline, err
        time.sleep(0.05)
        err += capfd.readouterr().err
    assert "parameter 'image_transport' set" in err
    node.trigger_deactivate()
    node.trigger_cleanup()
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.config.image_transport == "compressed"
    node.trigger_cleanup()


def test_bad_start_up_value_keeps_the_node_up_until_fixed(served) -> None:
    node, client = served(autostart=False, queue_size="abc", max_rate_hz=3)
    assert node.get_parameter("queue_size").value == defaults()["queue_size"]
    assert node.get_parameter("max_rate_hz").value == 3.0
    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert "parameter 'queue_size': expected an integer" in node.last_error
    assert _set(client, "queue_size", 4).successful
    assert node.trigger_configure() == TransitionCallbackReturn.SUCCESS
    assert node.config.pipeline.queue_size == 4
    node.trigger_cleanup()


def _calls(tree: ast.AST, name: str) -> list[ast.Call]:
    def called(node: ast.Call) -> str:
        func = node.func
        return func.id if isinstance(func, ast.Name) else getattr(func, "attr", "")

    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and called(n) == name]


LAUNCH_ARGUMENTS = {
    "params_file": None,  # a substitution: the package's config/lisa_params.yaml
    "model": "",
    "device": "",
    "depth": "",
    "namespace": "",
    "image_topic": "image",
    "command_topic": "command",
    "depth_topic": "depth",
    "camera_info_topic": "camera_info",
    "respawn": "false",
    "respawn_delay": "2.0",
    "sigterm_timeout": "10",
    "sigkill_timeout": "5",
}


def test_launch_file_declares_its_arguments_and_holds_no_logic() -> None:
    """Thin: declarations and one OpaqueFunction that builds the Node from the resolved
    arguments with lisa_ros.launch_params (where the rule lives and is tested)."""
    from lisa_ros import launch_params

    tree = ast.parse(LAUNCH_FILE.read_text(), filename=str(LAUNCH_FILE))
    names = [c.args[0].value for c in _calls(tree, "DeclareLaunchArgument")]
    assert sorted(names) == sorted(LAUNCH_ARGUMENTS)
    used = {c.args[0].value for c in _calls(tree, "LaunchConfiguration")}
    assert used | set(launch_params.ARGUMENTS) == set(names), "every argument is used"
    assert used <= set(names), "nothing undeclared is read"
    (node_call,) = _calls(tree, "Node")
    kwargs = {k.arg: k.value for k in node_call.keywords}
    assert ast.literal_eval(kwargs["package"]) == "lisa_ros"
    assert ast.literal_eval(kwargs["executable"]) == "lisa_node"
    remapped = {ast.literal_eval(t.elts[0]) for t in kwargs["remappings"].elts}
    assert remapped == {"image", "command", "depth", "camera_info"}
    assert ast.unparse(kwargs[None]) == "node_options(context.launch_configurations)"
    (share,) = _calls(tree, "PathJoinSubstitution")
    assert ast.unparse(share) == (
        "PathJoinSubstitution([FindPackageShare('lisa_ros'), 'config', 'lisa_params.yaml'])"
    )
    (opaque,) = _calls(tree, "OpaqueFunction")
    callback = ast.unparse(opaque.keywords[0].value)
    functions = [n.name for n in tree.body if isinstance(n, ast.FunctionDef)]
    assert sorted(functions) == sorted(["generate_launch_description", callback])
    logic = (ast.If, ast.IfExp, ast.For, ast.While, ast.Try, ast.comprehension)
    assert not [n for n in ast.walk(tree) if isinstance(n, logic)]
    modules = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)} | {
        a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    assert {m.split(".")[0] for m in modules} - {"launch", "launch_ros"} == {"lisa_ros"}
    assert "lisa_ros.launch_params" in modules


class _Recorder:
    """Stand-in for a launch/launch_ros class: records its arguments."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args, self.kwargs = args, kwargs


def _launch_stand_ins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Modules named like launch's and launch_ros's, whose classes record their arguments."""
    import types

    names = {
        "launch": ("LaunchContext", "LaunchDescription"),
        "launch.actions": ("DeclareLaunchArgument", "OpaqueFunction"),
        "launch.substitutions": ("LaunchConfiguration", "PathJoinSubstitution"),
        "launch_ros": (),
        "launch_ros.actions": ("Node",),
        "launch_ros.substitutions": ("FindPackageShare",),
    }
    for module_name, classes in names.items():
        module = types.ModuleType(module_name)
        for name in classes:
            setattr(module, name, type(name, (_Recorder,), {}))
        monkeypatch.setitem(sys.modules, module_name, module)


def test_launch_file_builds_the_node_from_the_resolved_arguments(monkeypatch) -> None:
    """Executed against recording stand-ins (launch/launch_ros are not installable here):
    the declared defaults, and the Node the OpaqueFunction makes for given arguments."""
    import importlib.util

    _launch_stand_ins(monkeypatch)
    spec = importlib.util.spec_from_file_location("lisa_launch", LAUNCH_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    (entities,) = module.generate_launch_description().args
    declared = {e.args[0]: e.kwargs["default_value"] for e in entities[:-1]}
    assert {k: v for k, v in declared.items() if isinstance(v, str)} == {
        k: v for k, v in LAUNCH_ARGUMENTS.items() if v is not None
    }
    assert all(e.kwargs["description"] for e in entities[:-1])
    opaque = entities[-1]
    assert type(opaque).__name__ == "OpaqueFunction"

    def node_for(**given: str) -> Any:
        arguments = {k: v for k, v in LAUNCH_ARGUMENTS.items() if v is not None}
        arguments.update(params_file="/share/lisa_params.yaml", **given)
        context = SimpleNamespace(launch_configurations=arguments)
        (node,) = opaque.kwargs["function"](context)
        return node.kwargs

    node = node_for()
    assert node["parameters"] == ["/share/lisa_params.yaml"]  # the file wins
    assert (node["respawn"], node["respawn_delay"]) == (False, 2.0)
    assert node["sigterm_timeout"].args == ("sigterm_timeout",)
    assert node["sigkill_timeout"].args == ("sigkill_timeout",)
    assert node["namespace"].args == ("namespace",)
    node = node_for(device="cuda", depth="true", respawn="true", respawn_delay="0.5")
    assert node["parameters"] == ["/share/lisa_params.yaml", {"device": "cuda", "depth": True}]
    assert (node["respawn"], node["respawn_delay"]) == (True, 0.5)
    with pytest.raises(ValueError, match="launch argument 'respawn'"):
        node_for(respawn="sometimes")


def test_main_runs_the_node_and_exits_cleanly_on_ctrl_c(context: Context) -> None:
    """``python -m lisa_ros.node``: autostart loads the model and serves; SIGINT in the middle
    of an inference ends it with status 0, the worker stopped and the model released, no
    traceback, no abort."""
    args = [sys.executable, "-m", "lisa_ros.node", "--ros-args"]
    args += ["-p", f"model:={TINY}", "-p", "mode:=segment", "-r", "__ns:=/lisa_main_proc"]
    proc = subprocess.Popen(
        args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 90
        while not any("active: serving commands" in ln for ln in lines):
            assert proc.poll() is None, "".join(lines)
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.1)
        # A frame and a command, then Ctrl-C while the worker runs the model.
        probe = rclpy.create_node("main_probe", context=context)
        image_pub = probe.create_publisher(Image, "/lisa_main_proc/image", 10)
        command_pub = probe.create_publisher(String, "/lisa_main_proc/command", 10)
        while image_pub.get_subscription_count() == 0 or command_pub.get_subscription_count() == 0:
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)
        image = Image(height=48, width=64, encoding="mono8", step=64)
        image.header.stamp = probe.get_clock().now().to_msg()
        image.data = array.array("B", bytes(48 * 64))
        image_pub.publish(image)
        command_pub.publish(String(data="the red ball"))
        while not any("accepted command 1" in ln for ln in lines):
            assert time.monotonic() < deadline, "".join(lines)
            time.sleep(0.01)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(30) == 0, "".join(lines)
        probe.destroy_node()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(5)
    output = "".join(lines)
    assert "pipeline: served" in output  # cleanup ran
    for bad in ("Traceback", "terminate called", "Aborted", "Segmentation fault"):
        assert bad not in output, output
