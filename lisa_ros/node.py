"""``lisa_node``: LISA reasoning segmentation as a ROS 2 lifecycle node.

Inputs (relative names, remap them in launch):

- ``image`` (``sensor_msgs/Image``, any encoding ``lisa_ros.conversion`` reads) or, with
  ``image_transport: compressed``, ``<image>/compressed`` (``sensor_msgs/CompressedImage``, JPEG or
  PNG), sensor-data QoS (keep last 5, volatile), reliability from ``image_reliability``;
- ``command`` (``std_msgs/String``), reliable, depth ``queue_size`` + 10;
- the ``segment`` action (``lisa_msgs/action/Segment``): a command with per-goal options, its
  stage as feedback, its ``Segmentation`` as the result (:mod:`lisa_ros.actions`);
- with ``depth: true``, ``depth`` (``sensor_msgs/Image`` 16UC1 mm or 32FC1 m, aligned to the
  colour image) and ``camera_info`` (``sensor_msgs/CameraInfo``), paired with the colour frame by
  stamp within ``depth_tolerance``.

Outputs: see :mod:`lisa_ros.node_outputs` (``segmentation``, the typed result of every command,
answered or failed; ``explanation``; ``mask``; ``overlay``; ``target_point``; ``target_cloud``).
Every command (topic or action) gets the next ``command_id`` (1, 2, ... for the life of the
process), which its result, its explanation (``[id] ...``) and its log lines carry.

Threads: subscription and action callbacks (executor thread) only decode and push into the
ROS-free :class:`~lisa_ros.pipeline.Pipeline` (one frame slot, bounded command queue). One worker
thread, started on configure and stopped on cleanup, owns the model: it sleeps on the pipeline's
condition until there is work, runs ``pipeline.step`` (a command, or the pre-encoding of the
newest frame while idle) and publishes the outcome. So a 30 Hz camera never builds a backlog and
callbacks return at once even while inference takes seconds.

Lifecycle: configure reads and checks all parameters into one :class:`LisaNodeConfig`, loads the
model and creates the lifecycle publishers, the subscriptions and the worker (any error:
FAILURE, with one log line naming the parameter or file, and the node stays unconfigured);
activate starts serving; deactivate stops serving (queued commands and the held frame are
dropped); cleanup and shutdown stop the worker and free the model; the ``shutdown`` transition
also ends the process. A command that reaches a node that is not serving is answered at once
with ``error_code`` ``not_ready`` and the reason (e.g. why configure failed). ``autostart``
(default true) configures and activates the node as soon as it spins.
"""

from __future__ import annotations

import gc
import itertools
import os
import re
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING, Any

import rclpy
from rcl_interfaces.msg import SetParametersResult
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, CompressedImage, Image
from std_msgs.msg import Header, String

from lisa_ros.actions import SegmentActionServer
from lisa_ros.conversion import (
    ImageConversionError,
    compressed_to_rgb,
    image_to_depth,
    image_to_rgb,
    stamp_to_seconds,
)
from lisa_ros.depth import CameraIntrinsics, DepthBuffer
from lisa_ros.node_outputs import NodeOutputs
from lisa_ros.parameters import ParameterGuard, refused, when
from lisa_ros.pipeline import (
    Command,
    CommandOptions,
    Encoded,
    Event,
    EventKind,
    Failure,
    FailureKind,
    ModeSegmenter,
    Outcome,
    Pipeline,
    Segmenter,
    Stage,
    Success,
    event_text,
    failure_text,
    success_text,
)
from lisa_ros.results import ResultInfo, describe, failure_info, stop_info, target_cloud_points
from lisa_ros.settings import BY_NAME, Applies, LisaNodeConfig, SettingError

if TYPE_CHECKING:
    from lisa_model.modeling import LisaModel

NODE_NAME = "lisa_node"
#: One log line per reason at most this often (the rest are counted and the count reported).
LOG_THROTTLE_SECONDS = 5.0
#: How long cleanup waits for an inference in flight before giving up on the worker.
WORKER_JOIN_SECONDS = 60.0
#: The same when the process is stopping (shutdown transition, Ctrl-C, SIGTERM): the inference
#: is abandoned (the process exit ends it).
STOP_JOIN_SECONDS = 3.0
#: Once the process is asked to stop, it exits within this many seconds even if a callback is
#: still busy (a model that is loading, an inference that does not return).
STOP_GRACE_SECONDS = 5.0
#: Command reader depth beyond queue_size: a burst reaches the pipeline, which drops the oldest
#: waiting command with a typed answer (DDS would drop it silently).
COMMAND_READER_SLACK = 10
#: Depth images held for pairing (about a second of a 30 Hz stream).
DEPTH_BUFFER = 30


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
        self._parameters_guard = ParameterGuard(self)
        self._throttle = LogThrottle()
        self._warned_slow_encoding = False
        self._active = threading.Event()
        self._config: LisaNodeConfig | None = None
        self._model: Any = None
        self._segmenter: Segmenter | None = None
        self._pipeline: Pipeline | None = None
        self._worker: threading.Thread | None = None
        self._stop_worker = threading.Event()
        self._subscriptions_made: list[Any] = []
        self._image_topic = ""
        self._depth: DepthBuffer | None = None
        self._next_id = itertools.count(1).__next__  # command ids for the life of the node
        #: Why the last configure failed (None after a success); also logged.
        self.last_error: str | None = None
        self._outputs = NodeOutputs(self)
        self._command_sub = self._command_subscription(
            self._parameters_guard.values()["queue_size"]
        )
        self._actions = SegmentActionServer(
            self, self._next_id, self._submit_goal, self._cancel_command
        )
        self._autostart_timer = None
        self.add_post_set_parameters_callback(self._on_parameters_set)
        if self.get_parameter("autostart").value is True:
            self._autostart_timer = self.create_timer(0.0, self._autostart)

    # ------------------------------------------------------------------------------- queries

    @property
    def config(self) -> LisaNodeConfig | None:
        """The checked parameters of the current configuration (None when unconfigured)."""
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
        """Read all parameters once and check them; :class:`SettingError` if one is bad (also a
        bad start-up value that has not been fixed since)."""
        self._parameters_guard.check_startup()
        return LisaNodeConfig.from_values(self._parameters_guard.values())

    def set_parameters(self, parameter_list: list[Parameter]) -> list[SetParametersResult]:
        """rclpy's ``set_parameters`` with the settings checked first (see
        :class:`~lisa_ros.parameters.ParameterGuard`)."""
        return [self.set_parameters_atomically([p]) for p in parameter_list]

    def set_parameters_atomically(self, parameter_list: list[Parameter]) -> SetParametersResult:
        """rclpy's ``set_parameters_atomically`` (what the SetParameters services call) with the
        settings checked first: a bad value is refused with a reason naming the parameter and
        its allowed values."""
        checked, reason = self._parameters_guard.filter(parameter_list)
        if reason is not None:
            return refused(reason)
        return super().set_parameters_atomically(checked)

    # ---------------------------------------------------------------------------- extension

    def resolve_device(self, config: LisaNodeConfig) -> tuple[str, str]:
        """``(device, dtype)`` for ``config``: empty values resolved; :class:`SettingError` for
        a device torch does not know or that is not available, or quantisation off CUDA."""
        from lisa_model.options import default_dtype, resolve_device

        try:
            parsed = resolve_device(config.device)
        except ValueError as exc:
            raise SettingError("device", str(exc)) from None
        if config.quantization and parsed.type != "cuda":
            raise SettingError(
                "quantization", f"{config.quantization} needs a CUDA device, got {str(parsed)!r}"
            )
        return str(parsed), config.dtype or default_dtype(parsed)

    def load_model(self, config: LisaNodeConfig) -> LisaModel:
        """Load the checkpoint ``config`` names (the embedded demo model when it names none).

        Raises :class:`SettingError` (``model``, ``device``, ...) for what a user can fix.
        """
        from lisa_model.checkpoint import load_lisa
        from lisa_model.config import CheckpointError
        from lisa_model.options import cpu_bf16_note

        device, dtype = self.resolve_device(config)
        for name in sorted({dtype, config.encoder_dtype or dtype}):
            note = cpu_bf16_note(device, name)  # no silent slow path
            if note:
                self.get_logger().warning(note)
        if config.threads:
            import torch

            torch.set_num_threads(config.threads)  # process-wide: the node owns its process
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
                encoder_dtype=config.encoder_dtype or None,
            )
        except CheckpointError as exc:
            raise SettingError("model", str(exc)) from None

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
        except SettingError as exc:
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
            self._pipeline = Pipeline(
                config.pipeline,
                check_command=self._check_command,
                on_stage=self._on_stage,
                next_id=self._next_id,
            )
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
            + (f", depth {self.resolve_topic_name('depth')}" if config.depth else "")
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
        self.get_logger().info("inactive: commands are answered 'not ready' until activated")
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._release()
        self.get_logger().info("cleaned up: model released")
        return super().on_cleanup(state)

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Release everything; ``lisa_node``'s main loop then ends the process (status 0)."""
        self._deactivate()
        self._release(STOP_JOIN_SECONDS)
        self.get_logger().info("shut down: model released, the process exits")
        return super().on_shutdown(state)

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.get_logger().error(f"error while in state {state.label}; releasing everything")
        self._deactivate()
        self._release()
        return TransitionCallbackReturn.SUCCESS  # back to unconfigured

    def destroy_node(self) -> None:
        """Stop the worker and free the model before the node's ROS entities go away."""
        self._deactivate()
        self._release(WORKER_JOIN_SECONDS if self.context.ok() else STOP_JOIN_SECONDS)
        if self._autostart_timer is not None:
            self._autostart_timer.cancel()
        self._actions.destroy()
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

    def _on_parameters_set(self, parameters: Sequence[Parameter]) -> None:
        """After a successful set: apply live settings to the running node, say when the others
        take effect."""
        ours = [p for p in parameters if p.name in BY_NAME]
        self._parameters_guard.accepted(ours)
        config = self._config
        if not ours or config is None:
            return
        live = LisaNodeConfig.from_values(self._parameters_guard.values())
        later = sorted(p.name for p in ours if BY_NAME[p.name].applies != Applies.LIVE)
        pipeline, segmenter = self._pipeline, self._segmenter
        # Live settings: the pipeline's (overlay stays what configure set up), the mode, depth.
        new_pipeline = replace(live.pipeline, overlay=config.pipeline.overlay)
        self._config = replace(
            config,
            mode=live.mode,
            pipeline=new_pipeline,
            depth_options=live.depth_options,
            target_cloud_max_points=live.target_cloud_max_points,
        )
        if pipeline is not None:
            pipeline.reconfigure(new_pipeline)
        if isinstance(segmenter, ModeSegmenter):
            segmenter.mode = live.mode
        now = sorted(p.name for p in ours if BY_NAME[p.name].applies == Applies.LIVE)
        if now:
            self.get_logger().info(f"applied {', '.join(now)}")
        for name in later:
            self.get_logger().warning(f"parameter '{name}' set: it {when(BY_NAME[name])}")

    def _configure_failed(self, message: str) -> TransitionCallbackReturn:
        self.last_error = message
        self.get_logger().error(message)
        return TransitionCallbackReturn.FAILURE

    def _command_subscription(self, queue_size: int) -> Any:
        qos = QoSProfile(
            depth=queue_size + COMMAND_READER_SLACK, reliability=ReliabilityPolicy.RELIABLE
        )
        return self.create_subscription(String, "command", self._on_command, qos)

    def _make_entities(self, config: LisaNodeConfig) -> None:
        self._outputs.create(config)
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
        self._subscriptions_made = [image_sub]
        # The command reader is made again after the image reader: the executor then takes a
        # frame and a command that arrive together in that order (and queue_size may change).
        self.destroy_subscription(self._command_sub)
        self._command_sub = self._command_subscription(config.pipeline.queue_size)
        if config.depth:
            self._depth = DepthBuffer(DEPTH_BUFFER, config.depth_tolerance)
            self._subscriptions_made += [
                self.create_subscription(Image, "depth", self._on_depth, image_qos),
                self.create_subscription(
                    CameraInfo, "camera_info", self._on_camera_info, image_qos
                ),
            ]

    def _deactivate(self) -> None:
        self._active.clear()
        if self._pipeline is not None:
            self._pipeline.clear()  # forget the frame and the waiting/standing commands
        if self._depth is not None:
            self._depth.clear()

    def _release(self, join_seconds: float = WORKER_JOIN_SECONDS) -> None:
        """Stop the worker (waiting up to ``join_seconds`` for an inference in flight), destroy
        the lifecycle publishers and the subscriptions, drop the model (idempotent)."""
        self._active.clear()
        worker, self._worker = self._worker, None
        if worker is not None:
            self._stop_worker.set()
            if self._pipeline is not None:
                self._pipeline.wake()
            worker.join(join_seconds)
            if worker.is_alive():
                message = (
                    f"the worker did not finish its inference within {join_seconds:.0f} s; "
                    "releasing the model anyway"
                )
                if self.context.ok():
                    self.get_logger().warning(message)
                else:
                    print(f"[{self.get_fully_qualified_name()}] {message}", file=sys.stderr)
        for sub in self._subscriptions_made:
            self.destroy_subscription(sub)
        self._subscriptions_made = []
        self._outputs.destroy()
        if self._pipeline is not None:
            summary = f"pipeline: {self._pipeline.stats().summary()}"
            if self.context.ok():
                self.get_logger().info(summary)
            else:  # after Ctrl-C the context is gone and with it the /rosout publisher
                print(f"[{self.get_fully_qualified_name()}] {summary}", file=sys.stderr)
        had_model = self._model is not None
        device = getattr(self._model, "device", None)
        self._pipeline = self._segmenter = self._model = self._config = self._depth = None
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

    def _on_depth(self, msg: Image) -> None:
        buffer = self._depth
        if not self._active.is_set() or buffer is None:
            return
        try:
            depth = image_to_depth(msg)
        except ImageConversionError as exc:
            topic = self.resolve_topic_name("depth")
            self._report(_reason_key("depth", str(exc)), f"bad depth image on {topic}: {exc}")
            return
        buffer.push_depth(depth, stamp_to_seconds(msg.header.stamp), msg.header.frame_id)

    def _on_camera_info(self, msg: CameraInfo) -> None:
        buffer = self._depth
        if buffer is None:
            return
        try:
            buffer.set_intrinsics(CameraIntrinsics.from_camera_info(msg))
        except ValueError as exc:
            topic = self.resolve_topic_name("camera_info")
            self._report(_reason_key("camera_info", str(exc)), f"bad {topic}: {exc}")

    def _on_command(self, msg: String) -> None:
        self._submit(self._next_id(), msg.data, CommandOptions())

    def _submit_goal(self, command_id: int, text: str, options: CommandOptions) -> None:
        self._submit(command_id, text, options)

    def _submit(self, command_id: int, text: str, options: CommandOptions) -> None:
        """Hand a command to the pipeline, or answer it 'not ready' when the node is not
        serving; its outcome comes from the worker or, when it ends at once, from the events."""
        pipeline = self._pipeline
        now = self._now()
        if not self._active.is_set() or pipeline is None:
            command = Command(" ".join(str(text).split()), now, command_id, options)
            why = self.last_error or f"the node is {self.state}, not active"
            failure = Failure(command, FailureKind.NOT_READY, f"not ready: {why}")
            self._publish_outcome(failure)
            return
        for event in pipeline.push_command(text, now, options, command_id=command_id):
            self._handle_event(event)

    def _cancel_command(self, command_id: int) -> None:
        pipeline = self._pipeline
        if pipeline is None:
            return
        event = pipeline.cancel(command_id)
        if event is not None:
            self._handle_event(event)

    def _handle_event(self, event: Event) -> None:
        log = self.get_logger()
        if event.kind == EventKind.COMMAND_ACCEPTED:
            log.info(event.message)
        elif event.kind == EventKind.STOPPED:
            assert event.command is not None
            log.info(f"command {event.command.id}: {event.message}")
            info = stop_info(event, self._now() - event.command.received)
            self._publish_info(info, event_text(event) or event.message)
        elif event.failure is not None:  # rejected, dropped, cancelled: each one is answered
            self._publish_outcome(event.failure)

    def _check_command(self, text: str, options: CommandOptions) -> str | None:
        """The model's token budget for this command (None: it fits)."""
        config, segmenter = self._config, self._segmenter
        predictor = getattr(segmenter, "predictor", None)
        check = getattr(predictor, "check_query", None)
        if config is None or check is None:
            return None
        mode = options.mode or config.mode
        explain = config.pipeline.explain if options.explain is None else options.explain
        try:
            check(text, explain=explain, mode=mode, max_new_tokens=config.pipeline.max_new_tokens)
        except ValueError as exc:
            return str(exc)
        return None

    def _on_stage(self, command: Command, stage: Stage) -> None:
        self._actions.stage(command.id, stage)

    def _report(self, key: str, message: str, publish: bool = False) -> None:
        """Warn (throttled per key); with ``publish``, also answer on explanation (same rate)."""
        held = self._throttle.check(key)
        if held is None:
            return
        suffix = f" ({held} more like this held back)" if held else ""
        self.get_logger().warning(message + suffix)
        if publish:
            self._outputs.text(f"failed: {message}")

    # ---------------------------------------------------------------------- worker thread

    def _work(self, pipeline: Pipeline, segmenter: Segmenter) -> None:
        """The worker: waits on the pipeline's condition, runs jobs, publishes outcomes."""
        threads = self._config.threads if self._config is not None else 0
        if threads:
            import torch

            torch.set_num_threads(threads)  # per thread under OpenMP: this one runs the model
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
            if isinstance(outcome, Encoded):
                self._log_encoding(outcome)
                continue
            if outcome is not None:
                try:
                    self._publish_outcome(outcome)
                except Exception as exc:
                    if not self.context.ok():
                        return  # Ctrl-C: the context went away under a running inference
                    message = f"could not publish a result: {type(exc).__name__}: {exc}"
                    self._report(_reason_key("publish", str(exc)), message)
                continue
            pipeline.wait_for_input(pipeline.time_until_next_event(now))

    def _publish_outcome(self, outcome: Outcome) -> None:
        """Publish a command's outcome on every output (any thread)."""
        latency = self._now() - outcome.command.received
        if isinstance(outcome, Failure):
            self._log_failure(outcome)
            self._publish_info(failure_info(outcome, latency), failure_text(outcome))
            return
        assert isinstance(outcome, Success)
        config = self._config
        buffer = self._depth
        lookup = buffer.lookup(outcome.frame.stamp) if buffer is not None else None
        options = config.depth_options if config is not None else None
        info = describe(outcome, latency, lookup, options)
        if info.depth_problem is not None:
            self._report(_reason_key("depth", info.depth_problem), info.depth_problem)
        cloud = None
        if config is not None and config.publish_target_cloud and lookup is not None:
            cloud = target_cloud_points(info, lookup, options, config.target_cloud_max_points)
        self._publish_info(
            info, success_text(outcome), mask=outcome.mask, overlay=outcome.overlay, cloud=cloud
        )
        self._log_success(outcome, info)

    def _publish_info(self, info: ResultInfo, text: str, **pictures: Any) -> None:
        header = info.header
        if header is None:  # a command that never got a frame: stamped now
            header = Header(stamp=self.get_clock().now().to_msg())
        message = self._outputs.result(info, text, header=header, **pictures)
        self._actions.finish(info.command.id, message)

    def _log_success(self, outcome: Success, info: ResultInfo) -> None:
        frame = outcome.frame
        encoding = (
            "pre-encoded frame"
            if outcome.preencoded
            else f"encoding {outcome.encode_seconds:.2f} s"
        )
        placed = sum(t.position_valid for t in info.targets)
        depth = f", {placed} with a 3-D position" if self._depth is not None else ""
        text = (
            f"served {'standing ' if outcome.standing else ''}command {outcome.command.id} "
            f"{outcome.command.text!r} on frame {frame.seq} ({frame.frame_id or 'no frame_id'}) "
            f"in {outcome.inference_seconds:.2f} s ({encoding}): {len(info.targets)} "
            f"target(s){depth}"
        )
        if outcome.standing:
            self.get_logger().debug(text)
        else:
            self.get_logger().info(text)

    def _log_encoding(self, encoded: Encoded) -> None:
        if encoded.error is None:
            self.get_logger().debug(
                f"pre-encoded frame {encoded.frame.seq} in {encoded.seconds:.2f} s"
            )
            pipeline = self._pipeline
            max_age = pipeline.config.max_image_age if pipeline is not None else 0.0
            if 0.0 < max_age <= encoded.seconds and not self._warned_slow_encoding:
                self._warned_slow_encoding = True  # once per process: a property of the set-up
                self.get_logger().warning(
                    f"pre-encoding a frame took {encoded.seconds:.2f} s, not less than "
                    f"max_image_age ({max_age:g} s): pre-encoded frames are stale before a "
                    "command can use them. Raise max_image_age above the encoding time plus "
                    "1/preencode_max_hz, or set preencode to false (docs/performance.md)"
                )
            return
        reason = f"{type(encoded.error).__name__}: {encoded.error}"
        self._report(_reason_key("preencode", reason), f"pre-encoding failed: {reason}")

    def _log_failure(self, failure: Failure) -> None:
        message = f"command {failure.command.id}: {failure.reason} ({failure.command.text!r})"
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

    def _free_device_cache(self) -> None:
        device = getattr(self._model, "device", None)
        if getattr(device, "type", None) == "cuda":
            import torch

            gc.collect()
            torch.cuda.empty_cache()


def _exit_after(seconds: float, done: threading.Event) -> None:
    """Arm a watchdog: unless ``done`` is set within ``seconds``, end the process (status 0: a
    stop was asked for) so that Ctrl-C, SIGTERM and the shutdown transition always end it, also
    while a callback is busy loading a model or running one."""

    def watch() -> None:
        if not done.wait(seconds):
            print(
                f"lisa_node: still busy {seconds:.0f} s after the stop request; exiting now",
                file=sys.stderr,
                flush=True,
            )
            os._exit(0)

    threading.Thread(target=watch, name="lisa_node_stop_watchdog", daemon=True).start()


def main(argv: list[str] | None = None, *, node_type: type[LisaNode] | None = None) -> int:
    """``lisa_node`` entry point: ``ros2 run lisa_ros lisa_node --ros-args -p model:=...``.

    Spins the node until Ctrl-C, SIGTERM (what launch sends) or the lifecycle ``shutdown``
    transition, then shuts down in the order that avoids aborts at exit: executor, node (worker
    and model first), context. Exits 0 within :data:`STOP_GRACE_SECONDS` of the request.
    ``node_type`` runs a subclass of :class:`LisaNode` instead.
    """
    stopped = threading.Event()

    def on_signal(signum: int, frame: Any) -> None:
        _exit_after(STOP_GRACE_SECONDS, stopped)
        if signum == signal.SIGINT:
            raise KeyboardInterrupt

    # Installed before rclpy's handlers, which call them after shutting down the context.
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    rclpy.init(args=argv)
    context = rclpy.get_default_context()
    context.on_shutdown(lambda: _exit_after(STOP_GRACE_SECONDS, stopped))
    node: LisaNode | None = None
    executor = SingleThreadedExecutor()
    status = 0
    try:
        node = (node_type or LisaNode)()
        executor.add_node(node)
        while context.ok() and node.state != "finalized":
            executor.spin_once(timeout_sec=0.5)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception as exc:  # e.g. bad --ros-args; one clear line instead of a traceback
        print(f"lisa_node: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        status = 1
    finally:
        _exit_after(STOP_GRACE_SECONDS, stopped)
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
        stopped.set()
    return status


if __name__ == "__main__":
    raise SystemExit(main())
