"""The node's settings, declared once.

Every parameter of ``lisa_node`` is one :class:`Setting` in :data:`SETTINGS`: name, type (the
type of its default), default, allowed values (choices or an inclusive range), when a change
takes effect, and a description. Everything else is derived from this table:

- the node declares its ROS parameters from it, statically typed, with descriptors that
  ``ros2 param describe`` shows (range, choices, read-only), and refuses a bad value at once
  (:mod:`lisa_ros.parameters`);
- :class:`~lisa_ros.pipeline.PipelineConfig` takes its defaults and checks from it;
- ``config/lisa_params.yaml`` and the parameter table of ``docs/node.md`` are rendered by
  :func:`render_yaml` and :func:`render_markdown_table` (``python -m lisa_ros.settings yaml``),
  and a test checks that the files equal what they render.

A bad value raises :class:`SettingError`, whose ``name`` is the setting: nothing parses messages.
This module is ROS-free (the replay and tests use it without rclpy).
"""

from __future__ import annotations

import argparse
import enum
import math
import sys
import textwrap
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from lisa_model.options import DEFAULT_MODE, DTYPE_NAMES, MODES

Value = bool | int | float | str


class Applies(enum.Enum):
    """When a changed value takes effect."""

    #: at once, also while the node is active
    LIVE = "live"
    #: on the next configure transition (cleanup, then configure): topics and QoS are rebuilt
    CONFIGURE = "configure"
    #: read-only: given at start-up (launch argument, params file, ``-p``), fixed while running
    STARTUP = "startup"


class SettingError(ValueError):
    """A setting has a value the node cannot use; ``name`` is the setting (parameter) name."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"parameter '{name}': {message}")
        self.name = name
        self.reason = message


_TYPE_NAMES = {bool: "bool", int: "integer", float: "double", str: "string"}


@dataclass(frozen=True)
class Setting:
    """One parameter of the node.

    Attributes:
        name: the ROS parameter name.
        default: the default value; its Python type is the parameter's type.
        description: what it does, for ``ros2 param describe``, the YAML file and the docs.
        section: the group it is listed under in the YAML file and the docs.
        applies: when a change takes effect (:class:`Applies`).
        choices: the allowed strings (None: any string).
        minimum, maximum: the inclusive range of a number (None: unbounded on that side).
        unit: the unit of a number, for the docs ("s", "Hz", ...).
    """

    name: str
    default: Value
    description: str
    section: str
    applies: Applies = Applies.LIVE
    choices: tuple[str, ...] | None = None
    minimum: float | None = None
    maximum: float | None = None
    unit: str = ""

    @property
    def type(self) -> type:
        return type(self.default)

    @property
    def type_name(self) -> str:
        return _TYPE_NAMES[self.type]

    @property
    def read_only(self) -> bool:
        return self.applies == Applies.STARTUP

    def allowed(self) -> str:
        """The allowed values in words, e.g. ``an integer in [1, 1000]`` or ``one of 'a', 'b'``."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        article = "an" if self.type_name[0] in "aeiou" else "a"
        text = f"{article} {self.type_name}"
        if self.minimum is not None and self.maximum is not None:
            text += f" in [{_number(self.minimum)}, {_number(self.maximum)}]"
        elif self.minimum is not None:
            text += f" >= {_number(self.minimum)}"
        elif self.maximum is not None:
            text += f" <= {_number(self.maximum)}"
        return text

    def check(self, value: Any) -> Value:
        """``value`` converted to the setting's type (an integer is accepted for a double), or
        :class:`SettingError` naming the setting and the allowed values."""
        expected = self.type
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # "max_rate_hz: 2" in YAML is an integer
        if type(value) is not expected:
            kind = "unset" if value is None else type(value).__name__
            raise SettingError(self.name, f"expected {self.allowed()}, got {kind} {value!r}")
        if self.choices is not None and value not in self.choices:
            raise SettingError(self.name, f"{value!r} is not {self.allowed()}")
        if expected in (int, float):
            low = -math.inf if self.minimum is None else self.minimum
            high = math.inf if self.maximum is None else self.maximum
            if not (math.isfinite(value) and low <= value <= high):
                raise SettingError(self.name, f"{value!r} is not {self.allowed()}")
        return value


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


_MODEL = "model"
_ANSWERS = "answers"
_PAIRING = "pairing commands with frames"
_PREENCODE = "pre-encoding"
_DEPTH = "3-D positions from aligned depth"
_TOPICS = "topics"
_NODE = "node"

#: Every parameter of the node, in the order of the YAML file and the docs.
SETTINGS: tuple[Setting, ...] = (
    Setting(
        "autostart",
        True,
        "configure and activate the node as soon as it spins",
        _NODE,
        Applies.STARTUP,
    ),
    Setting(
        "model",
        "",
        "LISA checkpoint: a local directory or a hub id in the published layout "
        "(e.g. xinlai/LISA-7B-v1); empty = the embedded demo model",
        _MODEL,
        Applies.STARTUP,
    ),
    Setting(
        "device",
        "",
        "torch device: cpu, cuda, cuda:1, ...; empty = cuda when available, else cpu",
        _MODEL,
        Applies.STARTUP,
    ),
    Setting(
        "dtype",
        "",
        "compute dtype; empty = float32 on CPU, bfloat16 on CUDA",
        _MODEL,
        Applies.STARTUP,
        choices=("", *DTYPE_NAMES),
    ),
    Setting(
        "encoder_dtype",
        "",
        "dtype of the CLIP and SAM image encoders; empty = dtype. bfloat16 speeds them up on GPUs "
        "and on CPUs with AVX512-BF16 or AMX (masks agree with float32 at IoU 0.99+)",
        _MODEL,
        Applies.STARTUP,
        choices=("", *DTYPE_NAMES),
    ),
    Setting(
        "threads",
        0,
        "CPU threads torch uses for the model; 0 = torch's default (one per core). On a CPU "
        "shared with the camera driver, fewer threads than cores keep latency steady",
        _MODEL,
        Applies.STARTUP,
        minimum=0,
        maximum=1024,
    ),
    Setting(
        "quantization",
        "",
        "bitsandbytes quantisation of the LLM (CUDA only; SAM is never quantised)",
        _MODEL,
        Applies.STARTUP,
        choices=("", "8bit", "4bit"),
    ),
    Setting(
        "vision_tower",
        "",
        "CLIP tower path or hub id; empty = the checkpoint's",
        _MODEL,
        Applies.STARTUP,
    ),
    Setting(
        "mode",
        DEFAULT_MODE,
        "generate: decode an answer, one mask per [SEG]; segment: fast path, one mask, no text",
        _ANSWERS,
        choices=MODES,
    ),
    Setting(
        "explain",
        False,
        "ask for a short explanation with the answer (mode generate only)",
        _ANSWERS,
    ),
    Setting(
        "max_new_tokens",
        64,
        "most tokens generated per answer",
        _ANSWERS,
        minimum=1,
        maximum=4096,
    ),
    Setting(
        "max_command_chars",
        500,
        "longer commands are rejected (the model's token budget is checked as well)",
        _ANSWERS,
        minimum=1,
        maximum=100_000,
    ),
    Setting(
        "follow_up",
        False,
        "commands continue the previous conversation: its frame, its questions and answers in "
        'the prompt ("now the one on the left"); an action goal\'s follow_up does the same',
        _ANSWERS,
    ),
    Setting(
        "follow_up_timeout",
        30.0,
        "a conversation older than this (since its last answer) is over: the next command is a "
        "new question on a fresh frame",
        _ANSWERS,
        minimum=0.0,
        maximum=3600.0,
        unit="s",
    ),
    Setting(
        "max_image_age",
        1.0,
        "a frame older than this (header stamp, else arrival) is never used; 0 = any age",
        _PAIRING,
        minimum=0.0,
        maximum=3600.0,
        unit="s",
    ),
    Setting(
        "image_wait_timeout",
        2.0,
        "how long a command waits for a fresh frame before it fails",
        _PAIRING,
        minimum=0.0,
        maximum=3600.0,
        unit="s",
    ),
    Setting(
        "age_from_header",
        True,
        "age frames by their header stamp (false: by arrival, for cameras with another clock)",
        _PAIRING,
    ),
    Setting(
        "queue_size",
        5,
        "most commands waiting; a full queue drops the oldest (with a warning)",
        _PAIRING,
        Applies.CONFIGURE,
        minimum=1,
        maximum=1000,
    ),
    Setting(
        "continuous",
        False,
        "re-apply the last successful command to new frames until a new or the stop command",
        _PAIRING,
    ),
    Setting(
        "max_rate_hz",
        2.0,
        "most continuous-mode runs per second",
        _PAIRING,
        minimum=0.01,
        maximum=1000.0,
        unit="Hz",
    ),
    Setting(
        "stop_command",
        "stop",
        "a command equal to this (any case) ends continuous mode and cancels waiting commands; "
        "empty = none",
        _PAIRING,
    ),
    Setting(
        "preencode",
        True,
        "while idle, encode the newest fresh frame (CLIP, SAM, prompt prefix) so that a command "
        "finds it encoded; costs one encoding per frame at up to preencode_max_hz",
        _PREENCODE,
    ),
    Setting(
        "preencode_max_hz",
        2.0,
        "most frames pre-encoded per second; 0 = off",
        _PREENCODE,
        minimum=0.0,
        maximum=100.0,
        unit="Hz",
    ),
    Setting(
        "depth",
        False,
        "subscribe <depth> (sensor_msgs/Image 16UC1 mm or 32FC1 m, aligned to the colour image) "
        "and <camera_info>, and give each target its 3-D centre",
        _DEPTH,
        Applies.CONFIGURE,
    ),
    Setting(
        "depth_tolerance",
        0.05,
        "most time between a colour frame's stamp and the depth image paired with it",
        _DEPTH,
        Applies.CONFIGURE,
        minimum=0.0,
        maximum=10.0,
        unit="s",
    ),
    Setting(
        "depth_min_range",
        0.1,
        "nearer depth is ignored (set the camera's working range)",
        _DEPTH,
        minimum=0.0,
        maximum=1000.0,
        unit="m",
    ),
    Setting(
        "depth_max_range",
        10.0,
        "farther depth is ignored",
        _DEPTH,
        minimum=0.001,
        maximum=1000.0,
        unit="m",
    ),
    Setting(
        "depth_erode_px",
        3,
        "radius the mask is eroded by before its depth is read (a mask's rim is often "
        "background); 0 = none",
        _DEPTH,
        minimum=0,
        maximum=100,
        unit="px",
    ),
    Setting(
        "depth_min_pixels",
        20,
        "fewer valid depth pixels in the eroded mask: the whole mask is used",
        _DEPTH,
        minimum=1,
        maximum=1_000_000,
    ),
    Setting(
        "publish_target_point",
        False,
        "with depth: publish the first target's centre on <target_point> "
        "(geometry_msgs/PointStamped)",
        _DEPTH,
        Applies.CONFIGURE,
    ),
    Setting(
        "publish_target_cloud",
        False,
        "with depth: publish the targets' 3-D points on <target_cloud> (sensor_msgs/PointCloud2)",
        _DEPTH,
        Applies.CONFIGURE,
    ),
    Setting(
        "target_cloud_max_points",
        5000,
        "most points in <target_cloud> (decimated evenly)",
        _DEPTH,
        minimum=1,
        maximum=10_000_000,
    ),
    Setting(
        "image_transport",
        "raw",
        "raw: subscribe <image> (sensor_msgs/Image); compressed: <image>/compressed",
        _TOPICS,
        Applies.CONFIGURE,
        choices=("raw", "compressed"),
    ),
    Setting(
        "image_reliability",
        "best_effort",
        "QoS reliability of the image subscription (best_effort also accepts reliable cameras)",
        _TOPICS,
        Applies.CONFIGURE,
        choices=("best_effort", "reliable"),
    ),
    Setting(
        "publish_overlay",
        True,
        "publish the rgb8 overlay picture on <overlay> (for rqt_image_view / rviz2)",
        _TOPICS,
        Applies.CONFIGURE,
    ),
    Setting(
        "publish_compressed_mask",
        False,
        "also publish <mask>/compressed (lossless PNG)",
        _TOPICS,
        Applies.CONFIGURE,
    ),
)

BY_NAME: dict[str, Setting] = {s.name: s for s in SETTINGS}


def setting(name: str) -> Setting:
    """The setting called ``name`` (KeyError naming it otherwise)."""
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"no setting called {name!r}") from None


def default(name: str) -> Value:
    """The default value of a setting (dataclass fields take their defaults from here)."""
    return setting(name).default


def defaults() -> dict[str, Value]:
    """``{name: default}`` of every setting, in table order."""
    return {s.name: s.default for s in SETTINGS}


def check(name: str, value: Any) -> Value:
    """``setting(name).check(value)``."""
    return setting(name).check(value)


def check_values(values: Mapping[str, Any]) -> dict[str, Value]:
    """Every setting checked, missing names taking their defaults; :class:`SettingError` names
    the first bad one (in table order), then the rules that tie settings together."""
    unknown = sorted(set(values) - set(BY_NAME))
    if unknown:
        raise SettingError(unknown[0], f"no such parameter (known: {', '.join(BY_NAME)})")
    checked = {s.name: s.check(values.get(s.name, s.default)) for s in SETTINGS}
    check_combination(checked)
    return checked


def check_combination(values: Mapping[str, Any]) -> None:
    """The rules between settings (``values`` holds all of them)."""
    if values["explain"] and values["mode"] == "segment":
        raise SettingError(
            "explain", "explain=true needs mode 'generate' (mode 'segment' produces no text)"
        )
    if values["depth_min_range"] >= values["depth_max_range"]:
        raise SettingError(
            "depth_min_range",
            f"{values['depth_min_range']!r} must be less than depth_max_range "
            f"{values['depth_max_range']!r}",
        )


# ------------------------------------------------------------------------------ the node config


@dataclass(frozen=True)
class LisaNodeConfig:
    """The node's settings, checked and typed (see :data:`SETTINGS` for their meaning).

    Attributes:
        model: checkpoint directory or hub id; "" = the embedded demo model.
        device: torch device string; "" = cuda when available, else cpu.
        dtype: "float32" | "bfloat16" | "float16"; "" = by device.
        encoder_dtype: the image encoders' dtype; "" = ``dtype``.
        threads: torch's CPU threads (``torch.set_num_threads``); 0 = torch's default.
        quantization: None, "8bit" or "4bit".
        vision_tower: CLIP tower override; None = the checkpoint's.
        mode: "generate" or "segment".
        image_transport: "raw" or "compressed".
        image_reliability: "best_effort" or "reliable".
        publish_overlay: publish the overlay picture (also makes the pipeline render it).
        publish_compressed_mask: publish the mask as PNG on ``<mask>/compressed`` too.
        depth: subscribe aligned depth and camera_info; targets get 3-D positions.
        depth_tolerance: seconds between a frame's stamp and its depth image's.
        depth_options: which depth pixels count (``lisa_ros.depth.DepthOptions``).
        publish_target_point, publish_target_cloud: the depth outputs.
        target_cloud_max_points: most points in ``target_cloud``.
        pipeline: the pairing/queue/continuous-mode behaviour.
    """

    model: str = ""
    device: str = ""
    dtype: str = ""
    encoder_dtype: str = ""
    threads: int = 0
    quantization: str | None = None
    vision_tower: str | None = None
    mode: str = DEFAULT_MODE
    image_transport: str = "raw"
    image_reliability: str = "best_effort"
    publish_overlay: bool = True
    publish_compressed_mask: bool = False
    depth: bool = False
    depth_tolerance: float = 0.05
    depth_options: Any = field(default=None)
    publish_target_point: bool = False
    publish_target_cloud: bool = False
    target_cloud_max_points: int = 5000
    pipeline: Any = field(default=None)

    def __post_init__(self) -> None:
        if self.pipeline is None:
            from lisa_ros.pipeline import PipelineConfig

            object.__setattr__(self, "pipeline", PipelineConfig(overlay=self.publish_overlay))
        if self.depth_options is None:
            from lisa_ros.depth import DepthOptions

            object.__setattr__(self, "depth_options", DepthOptions())

    @classmethod
    def from_values(cls, values: Mapping[str, Any]) -> LisaNodeConfig:
        """Check ``{setting name: value}`` (missing names take their defaults) and build the
        config; :class:`SettingError` names the first bad setting."""
        from lisa_ros.depth import DepthOptions
        from lisa_ros.pipeline import PipelineConfig

        checked = check_values(values)
        pipeline = PipelineConfig(
            overlay=checked["publish_overlay"],
            **{name: checked[name] for name in PipelineConfig.setting_names()},
        )
        return cls(
            model=checked["model"].strip(),
            device=checked["device"].strip(),
            dtype=checked["dtype"],
            encoder_dtype=checked["encoder_dtype"],
            threads=checked["threads"],
            quantization=checked["quantization"] or None,
            vision_tower=checked["vision_tower"].strip() or None,
            mode=checked["mode"],
            image_transport=checked["image_transport"],
            image_reliability=checked["image_reliability"],
            publish_overlay=checked["publish_overlay"],
            publish_compressed_mask=checked["publish_compressed_mask"],
            depth=checked["depth"],
            depth_tolerance=checked["depth_tolerance"],
            depth_options=DepthOptions(
                min_range=checked["depth_min_range"],
                max_range=checked["depth_max_range"],
                erode_px=checked["depth_erode_px"],
                min_pixels=checked["depth_min_pixels"],
            ),
            publish_target_point=checked["publish_target_point"],
            publish_target_cloud=checked["publish_target_cloud"],
            target_cloud_max_points=checked["target_cloud_max_points"],
            pipeline=pipeline,
        )


# ------------------------------------------------------------------------ command-line flags


def add_arguments(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    names: Sequence[str],
    defaults: Mapping[str, Value] | None = None,
) -> None:
    """One command-line option per setting in ``names`` (``--max-image-age``; bools as
    ``--explain/--no-explain``), typed and described from the table; ``defaults`` overrides the
    table's default of some (e.g. the replay's pre-encoding)."""
    defaults = defaults or {}
    for name in names:
        s = setting(name)
        flag = "--" + name.replace("_", "-")
        value = defaults.get(name, s.default)
        described = s.description + (f" ({s.unit})" if s.unit else "")
        if s.type is bool:
            parser.add_argument(
                flag,
                action=argparse.BooleanOptionalAction,
                default=value,
                help=f"{described} (default: {'on' if value else 'off'})",
            )
        else:
            parser.add_argument(
                flag,
                type=s.type,
                default=value,
                choices=s.choices,
                metavar=None if s.choices else name.upper(),
                help=f"{described} (default: {value!r})",
            )


# ---------------------------------------------------------------------------- rendered files

#: The node key of the params file: matches lisa_node in any namespace.
YAML_NODE_KEY = "/**/lisa_node"

_YAML_HEADER = """\
# Parameters of lisa_node: every one, with its default. Generated from lisa_ros/settings.py by
# `python -m lisa_ros.settings yaml` (a test checks that they agree); `ros2 param describe`
# shows each one's meaning, type and allowed values.
# "/**/lisa_node" matches the node in any namespace (a plain "lisa_node" key would only match
# /lisa_node, so the launch file's namespace argument would silently drop this file).
# When a change takes effect: [startup] read-only, restart the node; [configure] on the next
# configure (cleanup, then configure); the others at once, also with `ros2 param set`.
# With lisa.launch.py this file (or params_file:=yours) wins: its model:= and device:= arguments
# override the values below only when given (non-empty).
"""


def _yaml_value(value: Value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        plain = value and value.replace("_", "").isalnum() and value not in ("true", "false")
        return value if plain else f'"{value}"'
    return repr(value)


def render_yaml(settings: Sequence[Setting] = SETTINGS) -> str:
    """The params file (``config/lisa_params.yaml``) with every default and a comment each."""
    lines = [_YAML_HEADER.rstrip("\n"), f"{YAML_NODE_KEY}:", "  ros__parameters:"]
    section = None
    for s in settings:
        if s.section != section:
            section = s.section
            lines.append(f"    # --- {section}")
        tag = "" if s.applies == Applies.LIVE else f"[{s.applies.value}] "
        unit = f" ({s.unit})" if s.unit else ""
        bounded = s.choices is not None or s.minimum is not None or s.maximum is not None
        comment = f"{tag}{s.description}{unit}" + (f"; {s.allowed()}" if bounded else "")
        lines += textwrap.wrap(comment, 99, initial_indent="    # ", subsequent_indent="    #   ")
        lines.append(f"    {s.name}: {_yaml_value(s.default)}")
    return "\n".join(lines) + "\n"


def render_markdown_table(settings: Sequence[Setting] = SETTINGS) -> str:
    """The parameter reference table of ``docs/node.md``."""
    rows = [
        "| parameter | type | default | allowed | takes effect | meaning |",
        "|---|---|---|---|---|---|",
    ]
    when = {
        Applies.LIVE: "at once",
        Applies.CONFIGURE: "next configure",
        Applies.STARTUP: "start-up (read-only)",
    }
    for s in settings:
        allowed = s.allowed().replace("|", "\\|")
        unit = f" {s.unit}" if s.unit else ""
        value = _yaml_value(s.default) if s.default != "" else '""'
        rows.append(
            f"| `{s.name}` | {s.type_name} | `{value}`{unit} | {allowed} | {when[s.applies]} "
            f"| {s.description.replace('|', '/')} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m lisa_ros.settings {yaml,markdown}``: print a rendered file."""
    parser = argparse.ArgumentParser(
        prog="python -m lisa_ros.settings", description="Render the node's settings."
    )
    parser.add_argument("what", choices=("yaml", "markdown"))
    args = parser.parse_args(argv)
    text = render_yaml() if args.what == "yaml" else render_markdown_table()
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
