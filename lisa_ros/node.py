"""``lisa_node``: LISA reasoning segmentation as a ROS 2 lifecycle node.

Topics (relative names, remap them in launch):

- subscribes ``image`` (``sensor_msgs/Image``, any encoding ``lisa_ros.conversion`` reads) or, with
  ``image_transport: compressed``, ``<image>/compressed`` (``sensor_msgs/CompressedImage``, JPEG or
  PNG), sensor-data QoS (keep last 5, volatile), reliability from ``image_reliability``;
- subscribes ``command`` (``std_msgs/String``), reliable, depth ``queue_size``;
- publishes ``mask`` (``sensor_msgs/Image`` mono8, 255 = target, the source frame's header and
  size), optionally ``<mask>/compressed`` (lossless PNG), ``explanation`` (``std_msgs/String``: the
  answer, or ``"failed: <reason>"``) and ``overlay`` (``sensor_msgs/Image`` rgb8, for rqt/rviz).

Threads: subscription callbacks (executor thread) only decode the message and push it into the
ROS-free :class:`~lisa_ros.pipeline.Pipeline` (one frame slot, bounded command queue). One worker
thread, started on configure and stopped on cleanup, owns the model: it sleeps on the pipeline's
condition until there is work, runs ``pipeline.step`` and publishes the outcome. So a 30 Hz camera
never builds a backlog and callbacks return at once even while inference takes seconds.

Lifecycle: configure reads and validates all parameters into one :class:`LisaNodeConfig`, loads
the model and creates publishers, subscriptions and the worker (any error: FAILURE, with one log
line naming the parameter, and the node stays unconfigured); activate starts serving; deactivate
stops serving (input is ignored, queued commands and the held frame are dropped); cleanup and
shutdown stop the worker and free the model. ``autostart`` (default true) configures and
activates the node as soon as it spins.
"""

from __future__ import annotations

import array
import gc
import re
import sys
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import rclpy
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CompressedImage, Image
from std_msgs.msg import String

from lisa_ros.conversion import (
    ImageConversionError,
    ImageFields,
    compressed_to_rgb,
    image_to_rgb,
    mask_to_compressed_png,
    mask_to_image_fields,
    rgb_to_image_fields,
    stamp_to_seconds,
)
from lisa_ros.pipeline import (
    Event,
    EventKind,
    Failure,
    FailureKind,
    ModeSegmenter,
    Outcome,
    Pipeline,
    PipelineConfig,
    Segmenter,
    Success,
    event_text,
    failure_text,
)

if TYPE_CHECKING:
    from lisa_model.modeling import LisaModel

NODE_NAME = "lisa_node"
#: One log line per reason at most this often (the rest are counted and the count reported).
LOG_THROTTLE_SECONDS = 5.0
#: How long cleanup waits for an inference in flight before giving up on the worker.
WORKER_JOIN_SECONDS = 60.0

#: Command reader depth beyond queue_size (see _make_entities).
COMMAND_READER_SLACK = 10

_DEFAULTS = PipelineConfig()


@dataclass(frozen=True)
class ParameterSpec:
    """One ROS parameter of the node: name, default (its type is the expected type), meaning,
    and the allowed values for a string parameter (None: any)."""

    name: str
    default: bool | int | float | str
    description: str
    choices: tuple[str, ...] | None = None

    @property
    def type_name(self) -> str:
        return {bool: "bool", int: "integer", float: "double", str: "string"}[type(self.default)]

    def descriptor(self) -> ParameterDescriptor:
        constraints = f"{self.type_name}"
        if self.choices is not None:
            constraints += ", one of: " + ", ".join(repr(c) for c in self.choices)
        # dynamic_typing: a wrong type (e.g. max_rate_hz: 2 in YAML, an integer) must not stop
        # the node from being constructed; configure checks types with a clear message instead.
        return ParameterDescriptor(
            name=self.name,
            description=self.description,
            additional_constraints=constraints,
            dynamic_typing=True,
        )


#: Every parameter of the node, with its default (config/lisa_params.yaml mirrors this).
PARAMETERS: tuple[ParameterSpec, ...] = (
    ParameterSpec("autostart", True, "configure and activate the node as soon as it spins"),
    ParameterSpec(
        "model",
        "",
        "LISA checkpoint: a local directory or a hub id in the published layout "
        "(e.g. xinlai/LISA-7B-v1); empty = the embedded demo model",
    ),
    ParameterSpec(
        "device", "", "torch device: cpu, cuda, cuda:1, ...; empty = cuda when available, else cpu"
    ),
    ParameterSpec(
        "dtype",
        "",
        "compute dtype; empty = float32 on CPU, bfloat16 on CUDA",
        ("", "float32", "bfloat16", "float16"),
    ),
    ParameterSpec(
        "quantization",
        "",
        "bitsandbytes quantisation of the LLM (CUDA only; SAM is never quantised)",
        ("", "8bit", "4bit"),
    ),
    ParameterSpec("vision_tower", "", "CLIP tower path or hub id; empty = the checkpoint's"),
    ParameterSpec(
        "mode",
        "generate",
        "generate: decode an answer, one mask per [SEG]; segment: fast path, one mask, no text",
        ("generate", "segment"),
    ),
    ParameterSpec("explain", _DEFAULTS.explain, "ask for a short explanation (mode generate)"),
    ParameterSpec("max_new_tokens", _DEFAULTS.max_new_tokens, "most tokens generated per answer"),
    ParameterSpec(
        "max_image_age",
        _DEFAULTS.max_image_age,
        "seconds; a frame older than this (header stamp, else arrival) is never used; 0 = any",
    ),
    ParameterSpec(
        "image_wait_timeout",
        _DEFAULTS.image_wait_timeout,
        "seconds a command waits for a fresh frame before it fails",
    ),
    ParameterSpec(
        "age_from_header",
        _DEFAULTS.age_from_header,
        "age frames by their header stamp (false: by arrival, for cameras with another clock)",
    ),
    ParameterSpec(
        "queue_size",
        _DEFAULTS.queue_size,
        "most commands waiting; a full queue drops the oldest (with a warning)",
    ),
    ParameterSpec(
        "continuous",
        _DEFAULTS.continuous,
        "re-apply the last successful command to new frames until a new or stop command",
    ),
    ParameterSpec(
        "max_rate_hz", _DEFAULTS.max_rate_hz, "most continuous-mode runs per second (> 0)"
    ),
    ParameterSpec(
        "max_command_chars", _DEFAULTS.max_command_chars, "longer commands are rejected"
    ),
    ParameterSpec(
        "stop_command",
        _DEFAULTS.stop_command,
        "a command equal to this (any case) ends continuous mode and cancels waiting commands; "
        "empty = none",
    ),
    ParameterSpec(
        "image_transport",
        "raw",
        "raw: subscribe <image> (sensor_msgs/Image); compressed: <image>/compressed",
        ("raw", "compressed"),
    ),
    ParameterSpec(
        "image_reliability",
        "best_effort",
        "QoS reliability of the image subscription (best_effort also accepts reliable cameras)",
        ("best_effort", "reliable"),
    ),
    ParameterSpec("publish_overlay", True, "publish the rgb8 overlay picture on <overlay>"),
    ParameterSpec(
        "publish_compressed_mask", False, "also publish <mask>/compressed (lossless PNG)"
    ),
)


_PARAMETER_NAMES = frozenset(spec.name for spec in PARAMETERS)


def parameter_defaults() -> dict[str, bool | int | float | str]:
    """``{name: default}`` of every declared parameter."""
    return {spec.name: spec.default for spec in PARAMETERS}


class ParameterError(ValueError):
    """A parameter has a value the node cannot use; ``name`` is the parameter."""

    def __init__(self, name: str, message: str) -> None:
        super().__init__(f"parameter '{name}': {message}")
        self.name = name


@dataclass(frozen=True)
class LisaNodeConfig:
    """The node's parameters, validated and typed (see ``PARAMETERS`` for their meaning).

    Attributes:
        model: checkpoint directory or hub id; "" = the embedded demo model.
        device: torch device string; "" = cuda when available, else cpu.
        dtype: "float32" | "bfloat16" | "float16"; "" = by device.
        quantization: None, "8bit" or "4bit".
        vision_tower: CLIP tower override; None = the checkpoint's.
        mode: "generate" or "segment".
        image_transport: "raw" or "compressed".
        image_reliability: "best_effort" or "reliable".
        publish_overlay: publish the overlay picture (also makes the pipeline render it).
        publish_compressed_mask: publish the mask as PNG on ``<mask>/compressed`` too.
        pipeline: the pairing/queue/continuous-mode behaviour.
    """

    model: str = ""
    device: str = ""
    dtype: str = ""
    quantization: str | None = None
    vision_tower: str | None = None
    mode: str = "generate"
    image_transport: str = "raw"
    image_reliability: str = "best_effort"
    publish_overlay: bool = True
    publish_compressed_mask: bool = False
    pipeline: PipelineConfig = _DEFAULTS

    @classmethod
    def from_parameters(cls, values: Mapping[str, Any]) -> LisaNodeConfig:
        """Check types and values of ``{parameter name: value}`` (missing names take their
        defaults) and build the config; :class:`ParameterError` names the first bad one."""
        checked: dict[str, Any] = {}
        for spec in PARAMETERS:
            checked[spec.name] = _check_value(spec, values.get(spec.name, spec.default))
        if checked["explain"] and checked["mode"] == "segment":
            raise ParameterError(
                "explain", "explain=true needs mode 'generate' (mode 'segment' produces no text)"
            )
        pipeline_fields = (
            "explain",
            "max_new_tokens",
            "max_image_age",
            "image_wait_timeout",
            "queue_size",
            "continuous",
            "max_rate_hz",
            "max_command_chars",
            "stop_command",
            "age_from_header",
        )
        try:
            pipeline = PipelineConfig(
                overlay=checked["publish_overlay"], **{k: checked[k] for k in pipeline_fields}
            )
        except ValueError as exc:  # its messages start with the field (= parameter) name
            message = str(exc)
            name = message.split()[0] if message.split()[0] in pipeline_fields else "parameters"
            raise ParameterError(name, message) from None
        return cls(
            model=checked["model"].strip(),
            device=checked["device"].strip(),
            dtype=checked["dtype"],
            quantization=checked["quantization"] or None,
            vision_tower=checked["vision_tower"].strip() or None,
            mode=checked["mode"],
            image_transport=checked["image_transport"],
            image_reliability=checked["image_reliability"],
            publish_overlay=checked["publish_overlay"],
            publish_compressed_mask=checked["publish_compressed_mask"],
            pipeline=pipeline,
        )


def _check_value(spec: ParameterSpec, value: Any) -> Any:
    expected = type(spec.default)
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)  # "max_rate_hz: 2" in YAML is an integer
    if type(value) is not expected:
        kind = "unset" if value is None else type(value).__name__
        article = "an" if spec.type_name[0] in "aeiou" else "a"
        raise ParameterError(
            spec.name, f"expected {article} {spec.type_name}, got {kind} {value!r}"
        )
    if spec.choices is not None and value not in spec.choices:
        allowed = ", ".join(repr(c) for c in spec.choices)
        raise ParameterError(spec.name, f"{value!r} is not one of {allowed}")
    return value


class LogThrottle:
    """Lets a message through once per ``period`` seconds per key and counts the ones it holds
    back, so a 30 Hz stream of bad frames gives one log line every few seconds. Thread-safe."""

    def __init__(self, period: float = LOG_THROTTLE_SECONDS) -> None:
        self.period = period
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def check(self, key: str, now: float | None = None) -> int | None:
        """None when the message must be held back; else how many were held back before it."""
        now = time.monotonic() if now is None else now
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.period:
                self._held[key] = self._held.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._held.pop(key, 0)


def _reason_key(kind: str, message: str) -> str:
    """Throttle key: the kind and the message with numbers blanked (sizes and ages vary)."""
    return f"{kind}:{re.sub(r'[0-9.]+', '#', message)}"


def _image_msg(fields: ImageFields, header: Any) -> Image:
    msg = Image(
        height=fields.height,
        width=fields.width,
        encoding=fields.encoding,
        is_bigendian=fields.is_bigendian,
        step=fields.step,
    )
    if header is not None:
        msg.header = header
    # array.array: rclpy's setter checks a bytes object element by element (slow for images).
    msg.data = array.array("B", fields.data)
    return msg


class LisaNode(LifecycleNode):
    """The LISA lifecycle node (see the module docstring for topics, threads and lifecycle).

    Args:
        node_name: ROS node name.
        **kwargs: passed to ``rclpy.lifecycle.LifecycleNode`` (``namespace``, ``context``,
            ``parameter_overrides``, ``cli_args``, ...).

    Subclasses may override :meth:`load_model` and :meth:`build_segmenter` (e.g. to share one
    loaded model between nodes, or to wrap the segmenter).
    """

    def __init__(self, node_name: str = NODE_NAME, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        for spec in PARAMETERS:
            self.declare_parameter(spec.name, spec.default, spec.descriptor())
        self._throttle = LogThrottle()
        self._publish_lock = threading.Lock()
        self._active = threading.Event()
        self._config: LisaNodeConfig | None = None
        self._model: Any = None
        self._segmenter: Segmenter | None = None
        self._pipeline: Pipeline | None = None
        self._worker: threading.Thread | None = None
        self._stop_worker = threading.Event()
        self._subscriptions_made: list[Any] = []
        self._mask_pub: Any = None
        self._mask_png_pub: Any = None
        self._overlay_pub: Any = None
        self._explanation_pub: Any = None
        self._image_topic = ""
        #: Why the last configure failed (None after a success); also logged.
        self.last_error: str | None = None
        self._autostart_timer = None
        self.add_post_set_parameters_callback(self._on_parameters_set)
        if self.get_parameter("autostart").value is True:
            self._autostart_timer = self.create_timer(0.0, self._autostart)

    # ------------------------------------------------------------------------------- queries

    @property
    def config(self) -> LisaNodeConfig | None:
        """The validated parameters of the current configuration (None when unconfigured)."""
        return self._config

    @property
    def model(self) -> LisaModel | None:
        """The loaded model (None when unconfigured)."""
        return self._model

    @property
    def pipeline(self) -> Pipeline | None:
        """The pipeline core (None when unconfigured); ``pipeline.stats()`` has the counters."""
        return self._pipeline

    @property
    def state(self) -> str:
        """Lifecycle state label: unconfigured, inactive, active, finalized (or a transition)."""
        return str(self._state_machine.current_state[1])

    @property
    def is_active(self) -> bool:
        return self._active.is_set()

    def read_config(self) -> LisaNodeConfig:
        """Read all parameters once and validate them; :class:`ParameterError` if one is bad."""
        values = {spec.name: self.get_parameter(spec.name).value for spec in PARAMETERS}
        return LisaNodeConfig.from_parameters(values)

    # ---------------------------------------------------------------------------- extension

    def resolve_device(self, config: LisaNodeConfig) -> tuple[str, str]:
        """``(device, dtype)`` for ``config``: empty values resolved; :class:`ParameterError` for
        a device torch does not know or that is not available, or quantisation off CUDA."""
        from lisa_model.options import default_dtype, resolve_device

        try:
            parsed = resolve_device(config.device)
        except ValueError as exc:
            raise ParameterError("device", str(exc)) from None
        if config.quantization and parsed.type != "cuda":
            raise ParameterError(
                "quantization", f"{config.quantization} needs a CUDA device, got {str(parsed)!r}"
            )
        return str(parsed), config.dtype or default_dtype(parsed)

    def load_model(self, config: LisaNodeConfig) -> LisaModel:
        """Load the checkpoint ``config`` names (the embedded demo model when it names none).

        Raises :class:`ParameterError` (``model``, ``device``, ...) for what a user can fix.
        """
        from lisa_model.checkpoint import load_lisa
        from lisa_model.config import CheckpointError

        device, dtype = self.resolve_device(config)
        source = config.model
        try:
            if not source:
                from lisa_model.demo import demo_model_dir

                source = str(demo_model_dir())
            return load_lisa(
                source,
                device=device,
                dtype=dtype,
                quantization=config.quantization,
                vision_tower=config.vision_tower,
            )
        except CheckpointError as exc:
            raise ParameterError("model", str(exc)) from None

    def build_segmenter(self, model: LisaModel, config: LisaNodeConfig) -> Segmenter:
        """What the worker calls: a ``LisaPredictor`` answering in ``config.mode``."""
        from lisa_model.predictor import LisaPredictor

        return ModeSegmenter(LisaPredictor(model), config.mode)

    # ---------------------------------------------------------------------------- lifecycle

    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        log = self.get_logger()
        try:
            config = self.read_config()
            source = config.model or "the embedded demo model"
            log.info(f"loading {source} ...")
            start = time.perf_counter()
            model = self.load_model(config)
            seconds = time.perf_counter() - start
            segmenter = self.build_segmenter(model, config)
        except ParameterError as exc:
            return self._configure_failed(f"configure failed: {exc}")
        except Exception as exc:  # anything else the loader raises (OOM, corrupt files, ...)
            self.get_logger().debug(traceback.format_exc())
            return self._configure_failed(
                f"configure failed: could not load the model: {type(exc).__name__}: {exc}"
            )
        if not self.context.ok():  # Ctrl-C while the model was loading
            return TransitionCallbackReturn.FAILURE
        try:
            self._config, self._model, self._segmenter = config, model, segmenter
            self._pipeline = Pipeline(config.pipeline)
            self._make_entities(config)
            self._stop_worker.clear()
            self._worker = threading.Thread(
                target=self._work,
                args=(self._pipeline, segmenter),
                name=f"{self.get_name()}_worker",
                daemon=True,
            )
            self._worker.start()
        except Exception as exc:
            self._release()
            return self._configure_failed(f"configure failed: {type(exc).__name__}: {exc}")
        self.last_error = None
        device = getattr(model, "device", "?")
        log.info(
            f"configured: {source} on {device} loaded in {seconds:.1f} s, mode {config.mode}; "
            f"image {self._image_topic} ({config.image_transport}, {config.image_reliability}), "
            f"command {self.resolve_topic_name('command')}"
        )
        return super().on_configure(state)

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        result = super().on_activate(state)  # enables the lifecycle publishers
        if result == TransitionCallbackReturn.SUCCESS:
            self._active.set()
            if self._pipeline is not None:
                self._pipeline.wake()
            self.get_logger().info("active: serving commands")
        return result

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self.get_logger().info("inactive: input is ignored until activated again")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up: model released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._deactivate()
        self._release()
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error while in state {state.label}; releasing everything")
        self._deactivate()
        self._release()
        return TransitionCallbackReturn.SUCCESS  # back to unconfigured

    def destroy_node(self) -> None:
        """Stop the worker and free the model before the node's ROS entities go away."""
        self._deactivate()
        self._release()
        if self._autostart_timer is not None:
            self._autostart_timer.cancel()
        super().destroy_node()

    # ---------------------------------------------------------------------------- internals

    def _autostart(self) -> None:
        timer, self._autostart_timer = self._autostart_timer, None
        if timer is not None:
            timer.cancel()  # one shot (destroyed with the node)
        if self.state != "unconfigured":
            return
        if self.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            if not self.context.ok():
                return
            self.get_logger().error(
                "autostart: configure failed; the node stays unconfigured (fix the parameter, "
                "then call the configure transition)"
            )
            return
        self.trigger_activate()

    def _on_parameters_set(self, parameters: list[Parameter]) -> None:
        ours = sorted(p.name for p in parameters if p.name in _PARAMETER_NAMES)
        if ours and self._config is not None:
            self.get_logger().info(
                f"parameter(s) {', '.join(ours)} set; they take effect on the next configure "
                "(cleanup, then configure)"
            )

    def _configure_failed(self, message: str) -> TransitionCallbackReturn:
        self.last_error = message
        self.get_logger().error(message)
        return TransitionCallbackReturn.FAILURE

    def _make_entities(self, config: LisaNodeConfig) -> None:
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self._mask_pub = self.create_lifecycle_publisher(Image, "mask", reliable)
        if config.publish_compressed_mask:
            topic = self.resolve_topic_name("mask") + "/compressed"
            self._mask_png_pub = self.create_lifecycle_publisher(CompressedImage, topic, reliable)
        self._explanation_pub = self.create_lifecycle_publisher(String, "explanation", reliable)
        if config.publish_overlay:
            self._overlay_pub = self.create_lifecycle_publisher(Image, "overlay", reliable)

        image_qos = QoSProfile(
            history=qos_profile_sensor_data.history,
            depth=qos_profile_sensor_data.depth,
            durability=qos_profile_sensor_data.durability,
            reliability=(
                ReliabilityPolicy.RELIABLE
                if config.image_reliability == "reliable"
                else ReliabilityPolicy.BEST_EFFORT
            ),
        )
        if config.image_transport == "compressed":
            # image_transport's naming: the remapped base topic plus "/compressed".
            self._image_topic = self.resolve_topic_name("image") + "/compressed"
            image_sub = self.create_subscription(
                CompressedImage, self._image_topic, self._on_compressed, image_qos
            )
        else:
            self._image_topic = self.resolve_topic_name("image")
            image_sub = self.create_subscription(Image, "image", self._on_image, image_qos)
        # The reader keeps more than queue_size so that a burst reaches the pipeline, which
        # drops the oldest waiting command with a warning (DDS would drop it silently).
        command_qos = QoSProfile(
            depth=config.pipeline.queue_size + COMMAND_READER_SLACK,
            reliability=ReliabilityPolicy.RELIABLE,
        )
        command_sub = self.create_subscription(String, "command", self._on_command, command_qos)
        self._subscriptions_made = [image_sub, command_sub]

    def _deactivate(self) -> None:
        self._active.clear()
        if self._pipeline is not None:
            self._pipeline.clear()  # forget the frame and the waiting/standing commands

    def _release(self) -> None:
        """Stop the worker, destroy publishers/subscriptions, drop the model (idempotent)."""
        self._active.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            self._stop_worker.set()
            if self._pipeline is not None:
                self._pipeline.wake()
            worker.join(WORKER_JOIN_SECONDS)
            if worker.is_alive():
                self.get_logger().warning(
                    f"the worker did not finish its inference within {WORKER_JOIN_SECONDS:.0f} s;"
                    " releasing the model anyway"
                )
        for sub in self._subscriptions_made:
            self.destroy_subscription(sub)
        self._subscriptions_made = []
        for name in ("_mask_pub", "_mask_png_pub", "_overlay_pub", "_explanation_pub"):
            pub = getattr(self, name)
            if pub is not None:
                self.destroy_lifecycle_publisher(pub)
                setattr(self, name, None)
        if self._pipeline is not None:
            summary = f"pipeline: {self._pipeline.stats().summary()}"
            if self.context.ok():
                self.get_logger().info(summary)
            else:  # after Ctrl-C the context is gone and with it the /rosout publisher
                print(f"[{self.get_fully_qualified_name()}] {summary}", file=sys.stderr)
        had_model = self._model is not None
        device = getattr(self._model, "device", None)
        self._pipeline = self._segmenter = self._model = self._config = None
        if had_model:
            gc.collect()
            if getattr(device, "type", None) == "cuda":
                import torch

                torch.cuda.empty_cache()

    def _now(self) -> float:
        return self.get_clock().now().nanoseconds * 1e-9

    # ----------------------------------------------------------------- callbacks (executor)

    def _on_image(self, msg: Image) -> None:
        self._push_frame(msg, image_to_rgb)

    def _on_compressed(self, msg: CompressedImage) -> None:
        self._push_frame(msg, compressed_to_rgb)

    def _push_frame(self, msg: Any, decode: Callable[[Any], Any]) -> None:
        pipeline = self._pipeline
        if not self._active.is_set() or pipeline is None:
            return
        try:
            rgb = decode(msg)
        except ImageConversionError as exc:
            reason = f"bad image on {self._image_topic}: {exc}"
            self._report(_reason_key("image", str(exc)), reason, publish=True)
            return
        pipeline.push_frame(
            rgb,
            self._now(),
            stamp=stamp_to_seconds(msg.header.stamp),
            header=msg.header,
            frame_id=msg.header.frame_id,
        )

    def _on_command(self, msg: String) -> None:
        pipeline = self._pipeline
        if not self._active.is_set() or pipeline is None:
            return
        for event in pipeline.push_command(msg.data, self._now()):
            self._handle_event(event)

    def _handle_event(self, event: Event) -> None:
        log = self.get_logger()
        if event.kind == EventKind.COMMAND_ACCEPTED:
            log.info(event.message)
        elif event.kind == EventKind.STOPPED:
            log.info(event.message)
            self._publish_explanation(event.message)
        else:  # rejected or dropped: a warning, and an answer on explanation for every one
            text = event_text(event) or f"failed: {event.message}"
            message = text.removeprefix("failed: ")
            self._report(_reason_key(event.kind.value, message), message, publish=False)
            self._publish_explanation(text)

    def _report(self, key: str, message: str, publish: bool) -> None:
        """Warn (throttled per key); with ``publish``, also answer on explanation (same rate)."""
        held = self._throttle.check(key)
        if held is None:
            return
        suffix = f" ({held} more like this held back)" if held else ""
        self.get_logger().warning(message + suffix)
        if publish:
            self._publish_explanation(f"failed: {message}")

    def _publish_explanation(self, text: str) -> None:
        pub = self._explanation_pub
        if pub is not None:
            with self._publish_lock:
                pub.publish(String(data=text))

    # ---------------------------------------------------------------------- worker thread

    def _work(self, pipeline: Pipeline, segmenter: Segmenter) -> None:
        """The worker: waits on the pipeline's condition, runs jobs, publishes outcomes."""
        while not self._stop_worker.is_set():
            if not self._active.is_set():
                pipeline.wait_for_input(None)  # woken by activate, a push or stop
                continue
            now = self._now()
            try:
                outcome = pipeline.step(now, segmenter)
            except Exception as exc:  # a bug, not a model error (run_job catches those)
                self._report(
                    _reason_key("worker", str(exc)),
                    f"worker error: {type(exc).__name__}: {exc}",
                    publish=True,
                )
                pipeline.wait_for_input(1.0)
                continue
            if outcome is not None:
                if self._active.is_set():
                    try:
                        self._publish_outcome(outcome)
                    except Exception as exc:
                        if not self.context.ok():
                            return  # Ctrl-C: the context went away under a running inference
                        message = f"could not publish a result: {type(exc).__name__}: {exc}"
                        self._report(_reason_key("publish", str(exc)), message, publish=False)
                continue
            pipeline.wait_for_input(pipeline.time_until_next_event(now))

    def _publish_outcome(self, outcome: Outcome) -> None:
        if isinstance(outcome, Failure):
            self._publish_failure(outcome)
            return
        assert isinstance(outcome, Success)
        frame = outcome.frame
        header = frame.header
        with self._publish_lock:
            if self._mask_pub is not None:
                self._mask_pub.publish(_image_msg(mask_to_image_fields(outcome.mask), header))
            if self._mask_png_pub is not None:
                fmt, data = mask_to_compressed_png(outcome.mask)
                msg = CompressedImage(format=fmt)
                if header is not None:
                    msg.header = header
                msg.data = array.array("B", data)
                self._mask_png_pub.publish(msg)
            if self._overlay_pub is not None and outcome.overlay is not None:
                self._overlay_pub.publish(_image_msg(rgb_to_image_fields(outcome.overlay), header))
            if self._explanation_pub is not None:
                self._explanation_pub.publish(String(data=outcome.explanation))
        n_masks = int(outcome.result.masks.shape[0])
        text = (
            f"served {'standing ' if outcome.standing else ''}command {outcome.command.id} "
            f"{outcome.command.text!r} on frame {frame.seq} ({frame.frame_id or 'no frame_id'}) "
            f"in {outcome.inference_seconds:.2f} s: {n_masks} mask(s)"
        )
        if outcome.standing:
            self.get_logger().debug(text)
        else:
            self.get_logger().info(text)

    def _publish_failure(self, failure: Failure) -> None:
        message = f"{failure.reason} (command {failure.command.text!r})"
        held = self._throttle.check(_reason_key(failure.kind.value, failure.reason))
        if held is not None:
            suffix = f" ({held} more like this held back)" if held else ""
            if failure.kind in (FailureKind.MODEL_ERROR, FailureKind.OUT_OF_MEMORY):
                self.get_logger().error(f"failed: {message}{suffix}")
                if failure.error is not None:
                    tb = "".join(traceback.format_exception(failure.error))
                    self.get_logger().debug(tb)
            else:
                self.get_logger().warning(f"failed: {message}{suffix}")
        if failure.kind == FailureKind.OUT_OF_MEMORY:
            self._free_device_cache()
        self._publish_explanation(failure_text(failure))

    def _free_device_cache(self) -> None:
        device = getattr(self._model, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            gc.collect()
            torch.cuda.empty_cache()


def main(argv: list[str] | None = None) -> int:
    """``lisa_node`` entry point: ``ros2 run lisa_ros lisa_node --ros-args -p model:=...``.

    Spins the node until Ctrl-C (or SIGTERM from launch), then shuts down in the order that
    avoids aborts at exit: executor, node (worker and model first), context.
    """
    rclpy.init(args=argv)
    node: LisaNode | None = None
    executor = SingleThreadedExecutor()
    status = 0
    try:
        node = LisaNode()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # e.g. bad --ros-args; one clear line instead of a traceback
        print(f"lisa_node: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
