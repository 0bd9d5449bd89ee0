"""The ROS-free pipeline core: pairing, timeouts, continuous mode, queue, model failures.

Time is a plain number passed in (a fake clock); the model is a small fake segmenter, the one
part that is not under test here.
"""

from __future__ import annotations

import gc
import subprocess
import sys
import threading
import time
import weakref
from pathlib import Path

import numpy as np
import pytest

from lisa_model.types import SegmentationResult
from lisa_ros.pipeline import (
    Command,
    CommandOptions,
    Encode,
    Encoded,
    EventKind,
    Failure,
    FailureKind,
    Job,
    Pipeline,
    PipelineConfig,
    Stage,
    Success,
    failure_text,
    normalize_command,
    success_text,
)
from lisa_ros.settings import SettingError

REPO = Path(__file__).resolve().parents[2]
H, W = 24, 32


class Clock:
    """A fake clock the fake segmenter can advance (to model inference time)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t


class FakeSegmenter:
    """Masks the top-left quarter of whatever frame it holds; records calls.

    ``delay`` advances the fake clock per predict; ``error`` is raised by predict (or by
    set_image when ``fail_set_image``); ``mask_hw`` overrides the mask size (a broken model).
    """

    def __init__(
        self,
        clock: Clock | None = None,
        delay: float = 0.0,
        error: BaseException | None = None,
        fail_set_image: bool = False,
        mask_hw: tuple[int, int] | None = None,
    ) -> None:
        self.clock, self.delay, self.error = clock, delay, error
        self.fail_set_image, self.mask_hw = fail_set_image, mask_hw
        self.images: list[np.ndarray] = []
        self.queries: list[tuple[str, bool, int]] = []
        self.extra: list[dict[str, object]] = []  # mode / history, when given

    def set_image(self, rgb: np.ndarray) -> None:
        if self.fail_set_image and self.error is not None:
            raise self.error
        self.images.append(rgb)

    def predict(
        self, query: str, explain: bool = False, max_new_tokens: int = 64, **extra: object
    ) -> SegmentationResult:
        self.queries.append((query, explain, max_new_tokens))
        self.extra.append(extra)
        if self.clock is not None:
            self.clock.t += self.delay
        if self.error is not None and not self.fail_set_image:
            raise self.error
        h, w = self.mask_hw or self.images[-1].shape[:2]
        masks = np.zeros((1, h, w), dtype=bool)
        masks[0, : h // 2, : w // 2] = True
        logits = np.where(masks, 1.0, -1.0).astype(np.float32)
        return SegmentationResult(masks, logits, "[SEG]", turn=(query, "[SEG]"))


def rgb(value: int = 0) -> np.ndarray:
    return np.full((H, W, 3), value, dtype=np.uint8)


def make(**overrides: object) -> Pipeline:
    """A pipeline; pre-encoding off unless asked for (most tests are about pairing)."""
    return Pipeline(PipelineConfig(**{"preencode": False, **overrides}))


# ----------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("explain", 1),
        ("continuous", "yes"),
        ("age_from_header", 0),
        ("max_new_tokens", 0),
        ("max_new_tokens", 2.5),
        ("max_new_tokens", True),
        ("queue_size", 0),
        ("max_command_chars", -3),
        ("max_image_age", -0.1),
        ("max_image_age", float("nan")),
        ("image_wait_timeout", -1),
        ("image_wait_timeout", float("inf")),
        ("max_rate_hz", 0),
        ("max_rate_hz", "2"),
        ("stop_command", None),
    ],
)
def test_config_rejects_bad_values_naming_the_field(name: str, value: object) -> None:
    with pytest.raises(SettingError) as info:
        PipelineConfig(**{name: value})
    assert info.value.name == name and f"parameter '{name}'" in str(info.value)


def test_config_overlay_must_be_a_bool() -> None:
    with pytest.raises(ValueError, match="overlay must be a bool"):
        PipelineConfig(overlay=None)


def test_config_defaults_and_int_seconds_become_float() -> None:
    cfg = PipelineConfig(max_image_age=0, image_wait_timeout=3, max_rate_hz=5)
    assert cfg.max_image_age == 0.0 and isinstance(cfg.max_image_age, float)
    assert isinstance(cfg.image_wait_timeout, float) and isinstance(cfg.max_rate_hz, float)
    assert PipelineConfig().queue_size >= 1


# ----------------------------------------------------------------------------- commands


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("  the  red\tcup\n", "the red cup"),
        ("où est la tasse ?", "où est la tasse ?"),
        ("x" * 10, "x" * 10),
    ],
)
def test_normalize_command_accepts(text: str, expected: str) -> None:
    assert normalize_command(text, 10 if expected == "x" * 10 else 100) == (expected, None)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("", "empty"),
        (" \t\n ", "empty"),
        ("x" * 11, "11 characters, more than max_command_chars 10"),
        ("cup\x00", "U+0000"),
        ("red\x1bcup", "U+001B"),
        ("a\u200bb", "U+200B"),
    ],
)
def test_normalize_command_rejects_with_reason(text: str, reason: str) -> None:
    _, why = normalize_command(text, 10)
    assert why is not None and reason in why


def test_rejected_command_is_reported_and_never_queued() -> None:
    p = make()
    events = p.push_command("   ", 0.0)
    assert [e.kind for e in events] == [EventKind.COMMAND_REJECTED]
    assert events[0].is_warning and "empty" in events[0].message
    p.push_frame(rgb(), 0.0)
    assert p.next_job(0.0) is None
    s = p.stats()
    assert (s.commands_received, s.commands_rejected) == (1, 1)


def test_queue_overflow_drops_the_oldest_and_reports_it() -> None:
    p = make(queue_size=2)
    p.push_command("a", 0.0)
    p.push_command("b", 0.1)
    events = p.push_command("c", 0.2)
    assert [e.kind for e in events] == [EventKind.COMMAND_DROPPED, EventKind.COMMAND_ACCEPTED]
    assert events[0].command is not None and events[0].command.text == "a"
    assert events[0].is_warning and "'a'" in events[0].message
    p.push_frame(rgb(), 0.3)
    seg = FakeSegmenter()
    served = [p.step(0.3, seg), p.step(0.3, seg), p.step(0.3, seg)]
    assert [o.command.text for o in served if o is not None] == ["b", "c"]
    assert served[2] is None
    assert p.stats().commands_dropped == 1


# ----------------------------------------------------------------------------- pairing


def test_command_takes_the_fresh_frame_and_returns_a_mask_in_its_size() -> None:
    p = make(max_new_tokens=7, explain=True)
    header = object()
    frame = p.push_frame(rgb(10), 10.0, stamp=9.8, header=header, frame_id="cam")
    [event] = p.push_command("the cup", 10.1)
    assert event.kind is EventKind.COMMAND_ACCEPTED and not event.is_warning
    seg = FakeSegmenter()
    out = p.step(10.2, seg)
    assert isinstance(out, Success) and out.ok
    assert out.frame is frame and out.frame.header is header and out.frame.frame_id == "cam"
    assert seg.queries == [("the cup", True, 7)]
    assert out.mask.shape == (H, W) and out.mask.dtype == np.uint8
    assert set(np.unique(out.mask)) == {0, 255}
    assert out.mask[: H // 2, : W // 2].min() == 255 and out.mask[H // 2 :, :].max() == 0
    assert out.explanation == "[SEG]" and out.inference_seconds >= 0.0
    assert out.overlay is not None and out.overlay.shape == (H, W, 3)
    assert p.next_job(10.3) is None  # served once
    assert p.stats().served == 1


def test_overlay_is_off_when_configured_off() -> None:
    p = make(overlay=False)
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    out = p.step(0.0, FakeSegmenter())
    assert isinstance(out, Success) and out.overlay is None


def test_stale_frame_is_never_used_and_a_later_fresh_frame_is() -> None:
    p = make(max_image_age=1.0, image_wait_timeout=2.0)
    p.push_frame(rgb(1), 10.0, stamp=6.9)  # 3.1 s old at 10.0
    p.push_command("cup", 10.0)
    assert p.next_job(10.0) is None
    assert p.time_until_next_event(10.0) == pytest.approx(2.0)
    fresh = p.push_frame(rgb(2), 11.0, stamp=10.95)
    job = p.next_job(11.0)
    assert isinstance(job, Job) and job.frame is fresh


def test_stale_frame_times_out_with_its_age_in_the_reason() -> None:
    p = make(max_image_age=1.0, image_wait_timeout=2.0)
    p.push_frame(rgb(), 10.0, stamp=6.9)
    p.push_command("cup", 10.0)
    assert p.next_job(11.99) is None
    out = p.next_job(12.0)
    assert isinstance(out, Failure) and not out.ok and out.kind is FailureKind.STALE_IMAGE
    assert out.reason == "latest image is 5.1 s old, older than max_image_age 1.0 s"
    assert p.next_job(12.0) is None  # the command is gone
    assert p.stats().failures == {"stale_image": 1}


def test_stale_reason_matches_the_documented_wording() -> None:
    p = make(max_image_age=1.0, image_wait_timeout=0.0)
    p.push_frame(rgb(), 0.0, stamp=96.9)
    p.push_command("cup", 100.0)
    out = p.next_job(100.0)
    assert isinstance(out, Failure)
    assert out.reason == "latest image is 3.1 s old, older than max_image_age 1.0 s"


def test_command_before_any_image_is_served_when_the_first_frame_arrives() -> None:
    p = make(image_wait_timeout=2.0)
    p.push_command("cup", 5.0)
    assert p.next_job(5.5) is None
    assert p.time_until_next_event(5.5) == pytest.approx(1.5)
    frame = p.push_frame(rgb(), 6.5)
    assert p.time_until_next_event(6.5) == 0.0
    job = p.next_job(6.5)
    assert isinstance(job, Job) and job.frame is frame and job.command.text == "cup"


def test_no_image_within_the_timeout_fails_with_the_reason() -> None:
    p = make(image_wait_timeout=2.0)
    p.push_command("cup", 5.0)
    out = p.step(7.0, FakeSegmenter())
    assert isinstance(out, Failure) and out.kind is FailureKind.NO_IMAGE
    assert out.reason == "no image received within 2.0 s" and out.frame is None
    assert p.stats().failures == {"no_image": 1} and p.stats().failed == 1


def test_age_uses_receive_time_when_the_stamp_is_zero_or_ignored() -> None:
    p = make(max_image_age=1.0)
    p.push_frame(rgb(), 10.0, stamp=0.0)  # unset stamp: aged from arrival
    p.push_command("cup", 10.5)
    assert isinstance(p.next_job(10.5), Job)

    q = make(max_image_age=1.0, age_from_header=False)
    q.push_frame(rgb(), 10.0, stamp=1.0)  # unsynchronised camera clock
    q.push_command("cup", 10.5)
    assert isinstance(q.next_job(10.5), Job)


def test_max_image_age_zero_disables_the_age_check() -> None:
    p = make(max_image_age=0.0)
    p.push_frame(rgb(), 0.0, stamp=1.0)
    p.push_command("cup", 1000.0)
    assert isinstance(p.next_job(1000.0), Job)


def test_nothing_to_do_means_no_deadline() -> None:
    p = make()
    assert p.time_until_next_event(0.0) is None
    p.push_frame(rgb(), 0.0)
    assert p.time_until_next_event(0.0) is None and p.next_job(0.0) is None


def test_a_flood_of_frames_keeps_only_the_latest() -> None:
    p = make()
    first = np.zeros((H, W, 3), dtype=np.uint8)
    first_ref = weakref.ref(first)
    p.push_frame(first, 0.0)
    del first
    last = None
    for i in range(1000):
        last = p.push_frame(rgb(i % 256), 0.001 * i)
    gc.collect()
    assert first_ref() is None  # nothing but the newest frame is held
    p.push_command("cup", 1.0)
    job = p.next_job(1.0)
    assert isinstance(job, Job) and job.frame is last and job.frame.seq == 1001
    s = p.stats()
    assert (s.frames_received, s.frames_dropped) == (1001, 1000)


# ----------------------------------------------------------------------------- model calls


def test_set_image_once_for_several_commands_on_the_same_frame() -> None:
    p = make()
    seg = FakeSegmenter()
    frame = p.push_frame(rgb(3), 0.0)
    for text in ("a", "b", "c"):
        p.push_command(text, 0.0)
    outs = [p.step(0.1, seg) for _ in range(3)]
    assert all(isinstance(o, Success) for o in outs)
    assert len(seg.images) == 1 and seg.images[0] is frame.rgb
    assert [q[0] for q in seg.queries] == ["a", "b", "c"]
    p.push_frame(rgb(4), 0.2)
    p.push_command("d", 0.2)
    p.step(0.2, seg)
    assert len(seg.images) == 2
    other = FakeSegmenter()  # a reloaded model holds no frame yet
    p.push_command("e", 0.2)
    p.step(0.2, other)
    assert len(other.images) == 1


class OutOfMemoryError(RuntimeError):
    """Named like torch.cuda.OutOfMemoryError."""


@pytest.mark.parametrize(
    ("error", "kind", "words"),
    [
        (RuntimeError("shape mismatch"), FailureKind.MODEL_ERROR, "RuntimeError: shape mismatch"),
        (ValueError(), FailureKind.MODEL_ERROR, "model error: ValueError"),
        (OutOfMemoryError("Tried to allocate 2.00 GiB"), FailureKind.OUT_OF_MEMORY, "2.00 GiB"),
        (RuntimeError("CUDA error: out of memory"), FailureKind.OUT_OF_MEMORY, "out of memory"),
    ],
)
def test_model_exceptions_become_failures(
    error: BaseException, kind: FailureKind, words: str
) -> None:
    p = make()
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    out = p.step(0.0, FakeSegmenter(error=error))
    assert isinstance(out, Failure) and out.kind is kind and out.error is error
    assert words in out.reason and out.frame is not None
    assert p.stats().failures == {kind.value: 1} and p.stats().served == 0


def test_torch_out_of_memory_is_recognised() -> None:
    torch = pytest.importorskip("torch")
    p = make()
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    err = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
    out = p.step(0.0, FakeSegmenter(error=err))
    assert isinstance(out, Failure) and out.kind is FailureKind.OUT_OF_MEMORY


def test_failed_set_image_is_retried_on_the_next_command() -> None:
    p = make()
    p.push_frame(rgb(), 0.0)
    p.push_command("a", 0.0)
    seg = FakeSegmenter(error=RuntimeError("encoder broke"), fail_set_image=True)
    out = p.step(0.0, seg)
    assert isinstance(out, Failure) and "encoder broke" in out.reason
    seg.error = None
    p.push_command("b", 0.0)
    assert isinstance(p.step(0.0, seg), Success)
    assert len(seg.images) == 1  # set_image ran again on the same frame


def test_masks_of_the_wrong_size_are_a_failure() -> None:
    p = make()
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    out = p.step(0.0, FakeSegmenter(mask_hw=(H + 1, W)))
    assert isinstance(out, Failure) and out.kind is FailureKind.BAD_RESULT
    assert f"({H}, {W})" in out.reason


# ----------------------------------------------------------------------------- continuous mode


def test_continuous_mode_reruns_each_new_frame_once_at_most_max_rate() -> None:
    clock = Clock(0.0)
    p = make(continuous=True, max_rate_hz=2.0, max_image_age=1.0)
    seg = FakeSegmenter(clock, delay=0.1)
    p.push_frame(rgb(0), 0.0)
    p.push_command("cup", 0.0)
    first = p.step(0.0, seg)
    assert isinstance(first, Success) and not first.standing
    assert p.standing == first.command
    assert p.next_job(0.2) is None  # same frame: never twice
    assert p.time_until_next_event(0.2) is None
    p.push_frame(rgb(1), 0.2)
    assert p.time_until_next_event(0.2) == pytest.approx(0.3)  # 1 / 2 Hz after the first start
    assert p.next_job(0.49) is None
    job = p.next_job(0.5)
    assert isinstance(job, Job) and job.standing and job.frame.seq == 2
    assert isinstance(p.run_job(job, seg), Success)
    # A 30 Hz stream for 2 s gives about 2 Hz * 2 s = 4 standing runs, not 60.
    runs = 0
    for i in range(60):
        t = 0.6 + i / 30
        p.push_frame(rgb(i % 256), t)
        out = p.step(t, seg)
        runs += isinstance(out, Success) and out.standing
    assert runs == 4
    assert p.stats().standing_runs == runs + 1


def test_continuous_rerun_skips_stale_frames_silently() -> None:
    p = make(continuous=True, max_image_age=1.0)
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    assert isinstance(p.step(0.0, FakeSegmenter()), Success)
    p.push_frame(rgb(), 10.0, stamp=5.0)
    assert p.next_job(10.0) is None and p.stats().failed == 0


def test_a_new_command_replaces_the_standing_one() -> None:
    p = make(continuous=True, max_rate_hz=100.0)
    seg = FakeSegmenter()
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    p.step(0.0, seg)
    events = p.push_command("bowl", 0.1)
    assert "ends standing command 'cup'" in events[-1].message
    assert p.standing is None  # ended at once, not when the new one succeeds
    out = p.step(0.1, seg)
    assert isinstance(out, Success) and out.command.text == "bowl"
    assert p.standing is not None and p.standing.text == "bowl"
    p.push_frame(rgb(), 0.2)
    rerun = p.step(0.2, seg)
    assert isinstance(rerun, Success) and rerun.standing and rerun.command.text == "bowl"


def test_a_failed_new_command_does_not_bring_the_old_one_back() -> None:
    p = make(continuous=True, image_wait_timeout=0.5, max_image_age=0.1)
    seg = FakeSegmenter()
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    p.step(0.0, seg)
    p.push_command("bowl", 1.0)  # the frame is stale by now
    out = p.step(1.5, seg)
    assert isinstance(out, Failure) and out.kind is FailureKind.STALE_IMAGE
    p.push_frame(rgb(), 1.6)
    assert p.standing is None and p.next_job(1.6) is None


def test_a_command_superseded_while_running_does_not_become_standing() -> None:
    p = make(continuous=True)
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    job = p.next_job(0.0)
    assert isinstance(job, Job)
    p.push_command("bowl", 0.1)  # arrives while "cup" runs
    p.run_job(job, FakeSegmenter())
    assert p.standing is None


def test_stop_command_clears_standing_and_waiting_commands() -> None:
    p = make(continuous=True, stop_command="Stop")
    seg = FakeSegmenter()
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    p.step(0.0, seg)
    p.push_command("bowl", 0.1)
    p.push_command("plate", 0.1)
    event, *cancelled = p.push_command("  STOP ", 0.2)
    assert event.kind is EventKind.STOPPED and "'cup'" not in event.message
    assert "cancelled 2 waiting" in event.message
    assert event.command.text == "STOP" and event.command.id == 4 and event.failure is None
    # Each waiting command ends with its own typed failure.
    assert [e.kind for e in cancelled] == [EventKind.COMMAND_CANCELLED] * 2
    assert [e.failure.command.text for e in cancelled] == ["bowl", "plate"]
    assert {e.failure.kind for e in cancelled} == {FailureKind.CANCELLED}
    assert all("stop command 4" in e.failure.reason for e in cancelled)
    assert p.standing is None and p.waiting_commands == 0
    p.push_frame(rgb(), 0.3)
    assert p.next_job(0.3) is None
    assert p.stats().commands_cancelled == 2
    assert seg.queries == [("cup", False, 64)]


def test_clear_standing_returns_and_ends_it() -> None:
    p = make(continuous=True)
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    p.step(0.0, FakeSegmenter())
    ended = p.clear_standing()
    assert isinstance(ended, Command) and ended.text == "cup"
    assert p.clear_standing() is None
    p.push_frame(rgb(), 1.0)
    assert p.next_job(1.0) is None


def test_not_continuous_means_no_reruns() -> None:
    p = make(continuous=False)
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    p.step(0.0, FakeSegmenter())
    p.push_frame(rgb(), 5.0)
    assert p.standing is None and p.next_job(5.0) is None


# ----------------------------------------------------------------------------- threads, stats


def test_wait_for_input_wakes_on_push_and_times_out_otherwise() -> None:
    p = make()
    assert p.wait_for_input(0.01) is False
    timer = threading.Timer(0.05, lambda: p.push_command("cup", 0.0))
    timer.start()
    t0 = time.monotonic()
    assert p.wait_for_input(5.0) is True
    assert time.monotonic() - t0 < 2.0
    timer.join()
    p.push_frame(rgb(), 0.0)  # a push between polls is not lost
    assert p.wait_for_input(5.0) is True


def test_callbacks_from_other_threads_and_a_worker_loop() -> None:
    p = make(queue_size=3, max_image_age=0.0)
    seg = FakeSegmenter()
    outcomes: list[object] = []
    stop = threading.Event()

    def worker() -> None:
        while not stop.is_set():
            out = p.step(time.monotonic(), seg)
            if out is not None:
                outcomes.append(out)
                continue
            p.wait_for_input(p.time_until_next_event(time.monotonic()) or 0.05)

    def frames() -> None:
        for i in range(300):
            p.push_frame(rgb(i % 256), time.monotonic())

    def commands() -> None:
        for i in range(40):
            p.push_command(f"object {i}", time.monotonic())

    threads = [threading.Thread(target=f) for f in (worker, frames, commands)]
    for t in threads:
        t.start()
    threads[1].join()
    threads[2].join()
    deadline = time.monotonic() + 5.0
    while p.waiting_commands and time.monotonic() < deadline:
        time.sleep(0.01)
    stop.set()
    p.wake()
    threads[0].join(5.0)
    assert not threads[0].is_alive()
    s = p.stats()
    assert s.frames_received == 300 and s.commands_received == 40
    assert s.served + s.commands_dropped + s.failed == 40
    assert s.served == len(outcomes) > 0


def test_stats_summary_mentions_the_counts() -> None:
    p = make()
    p.push_frame(rgb(), 0.0)
    p.push_command("cup", 0.0)
    p.step(0.0, FakeSegmenter())
    p.push_command("", 0.0)
    text = p.stats().summary()
    assert "served 1" in text and "1 rejected" in text and "frames 1 received" in text
    snapshot = p.stats()
    snapshot.failures["x"] = 5
    assert p.stats().failures == {}  # a snapshot, not the live counters


def test_core_modules_import_neither_torch_nor_rclpy() -> None:
    code = (
        "import sys, lisa_ros.pipeline, lisa_ros.conversion, lisa_model.visualize\n"
        "bad = [m for m in ('torch', 'rclpy', 'cv_bridge') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=60)


# ------------------------------------------------------------- typed outcomes: ids, cancel, stages


def test_every_command_gets_an_id_and_exactly_one_outcome() -> None:
    p = make(queue_size=1)
    seg = FakeSegmenter()
    (rejected,) = p.push_command("", 0.0)
    (accepted,) = p.push_command("cup", 0.0)
    dropped, accepted2 = p.push_command("bowl", 0.0)
    assert [rejected.command.id, accepted.command.id, accepted2.command.id] == [1, 2, 3]
    assert rejected.failure.kind is FailureKind.REJECTED and rejected.failure.command.id == 1
    assert dropped.kind is EventKind.COMMAND_DROPPED and dropped.failure.command.id == 2
    assert dropped.failure.kind is FailureKind.DROPPED and accepted.failure is None
    p.push_frame(rgb(), 0.0)
    outcome = p.step(0.0, seg)
    assert isinstance(outcome, Success) and outcome.command.id == 3
    assert failure_text(rejected.failure).startswith("[1] failed: command rejected: ")
    assert success_text(outcome) == "[3] [SEG]"


def test_cancel_a_waiting_command_and_the_running_one_between_stages() -> None:
    cancelled_ids: list[int] = []
    p = None

    def on_stage(command: Command, stage: Stage) -> None:
        if stage is Stage.ENCODING and command.text == "bowl":
            assert p.cancel(command.id) is None  # running: ends before decoding
            cancelled_ids.append(command.id)

    p = Pipeline(PipelineConfig(preencode=False), on_stage=on_stage)
    seg = FakeSegmenter()
    p.push_command("cup", 0.0)
    p.push_command("bowl", 0.0)
    event = p.cancel(1)
    assert event.kind is EventKind.COMMAND_CANCELLED and event.failure.command.text == "cup"
    assert p.cancel(1) is None and p.cancel(99) is None
    p.push_frame(rgb(), 0.0)
    outcome = p.step(0.0, seg)
    assert isinstance(outcome, Failure) and outcome.kind is FailureKind.CANCELLED
    assert outcome.command.text == "bowl" and cancelled_ids == [2]
    assert seg.queries == []  # never decoded
    assert p.stats().commands_cancelled == 2 and p.stats().failed == 0


def test_stages_are_told_in_order_and_waiting_once() -> None:
    seen: list[tuple[int, Stage]] = []
    p = Pipeline(PipelineConfig(preencode=False), on_stage=lambda c, s: seen.append((c.id, s)))
    seg = FakeSegmenter()
    p.push_command("cup", 0.0)
    assert p.next_job(0.0) is None and p.next_job(0.1) is None
    p.push_frame(rgb(), 0.2)
    assert isinstance(p.step(0.2, seg), Success)
    p.push_command("bowl", 0.3)
    assert isinstance(p.step(0.3, seg), Success)  # same frame: no encoding
    assert seen == [
        (1, Stage.WAITING_FOR_FRAME),
        (1, Stage.ENCODING),
        (1, Stage.DECODING),
        (2, Stage.DECODING),
    ]


def test_per_command_options_and_the_input_check() -> None:
    def check(text: str, options: CommandOptions) -> str | None:
        return "too many tokens" if len(text) > 10 else None

    p = Pipeline(PipelineConfig(preencode=False), check_command=check)
    seg = FakeSegmenter()
    (long,) = p.push_command("a very long command", 0.0)
    assert long.failure.kind is FailureKind.REJECTED and "too many tokens" in long.failure.reason
    (bad,) = p.push_command("cup", 0.0, CommandOptions(mode="segment", explain=True))
    assert "explain needs mode 'generate'" in bad.failure.reason
    (odd,) = p.push_command("cup", 0.0, CommandOptions(mode="fast"))
    assert "mode 'fast' is not one of generate, segment" in odd.failure.reason
    p.push_command("cup", 0.0, CommandOptions(mode="segment", explain=False))
    p.push_command("bowl", 0.0, CommandOptions(explain=True))
    p.push_frame(rgb(), 0.0)
    p.step(0.0, seg)
    p.step(0.0, seg)
    assert seg.queries == [("cup", False, 64), ("bowl", True, 64)]
    assert seg.extra == [{"mode": "segment"}, {}]


# ---------------------------------------------------------------------------- pre-encoding


def test_idle_worker_pre_encodes_the_newest_frame_at_most_at_the_rate() -> None:
    p = make(preencode=True, preencode_max_hz=2.0)
    seg = FakeSegmenter()
    first = p.push_frame(rgb(1), 0.0)
    work = p.next_job(0.0)
    assert isinstance(work, Encode) and work.frame is first
    encoded = p.run_encode(work, seg)
    assert isinstance(encoded, Encoded) and encoded.error is None and p.encoded_frame is first
    assert p.next_job(0.1) is None  # nothing new
    second = p.push_frame(rgb(2), 0.2)
    assert p.next_job(0.2) is None  # rate: next pre-encoding at 0.5
    assert p.time_until_next_event(0.2) == pytest.approx(0.3)
    work = p.next_job(0.5)
    assert isinstance(work, Encode) and work.frame is second
    assert len(seg.images) == 1
    assert p.stats().preencoded == 1


def test_a_command_uses_the_pre_encoded_frame_without_encoding_again() -> None:
    p = make(preencode=True, preencode_max_hz=1.0, max_image_age=1.0)
    seg = FakeSegmenter()
    encoded = p.push_frame(rgb(1), 0.0)
    assert isinstance(p.step(0.0, seg), Encoded)
    newer = p.push_frame(rgb(2), 0.3)  # arrived after the encoding: not encoded
    p.push_command("cup", 0.4)
    outcome = p.step(0.4, seg)
    assert isinstance(outcome, Success) and outcome.frame is encoded
    assert outcome.preencoded and outcome.encode_seconds == 0.0
    assert len(seg.images) == 1
    # Once the encoded frame is too old, the command takes (and encodes) the newest one.
    p.push_command("bowl", 1.2)
    outcome = p.step(1.2, seg)
    assert outcome.frame is newer and not outcome.preencoded and len(seg.images) == 2


def test_pre_encoding_off_or_at_zero_hz_never_encodes_while_idle() -> None:
    for config in ({"preencode": False}, {"preencode": True, "preencode_max_hz": 0.0}):
        p = make(**config)
        p.push_frame(rgb(), 0.0)
        assert p.next_job(0.0) is None and p.time_until_next_event(0.0) is None


def test_a_failed_pre_encoding_is_reported_and_the_command_encodes_again() -> None:
    p = make(preencode=True)
    p.push_frame(rgb(), 0.0)
    encoded = p.step(0.0, FakeSegmenter(error=RuntimeError("boom"), fail_set_image=True))
    assert isinstance(encoded, Encoded) and isinstance(encoded.error, RuntimeError)
    assert p.encoded_frame is None
    seg = FakeSegmenter()
    p.push_command("cup", 0.1)
    outcome = p.step(0.1, seg)
    assert isinstance(outcome, Success) and not outcome.preencoded and len(seg.images) == 1


# ------------------------------------------------------------------------------ follow-ups


def test_a_follow_up_runs_on_its_conversation_frame_with_the_earlier_turns() -> None:
    p = make(follow_up_timeout=10.0, max_image_age=1.0)
    seg = FakeSegmenter()
    first_frame = p.push_frame(rgb(1), 0.0)
    p.push_command("the cups", 0.0)
    first = p.step(0.0, seg)
    assert first.turn == 1 and seg.extra[-1] == {}
    p.push_frame(rgb(2), 5.0)
    p.push_command("now the one on the left", 5.0, CommandOptions(follow_up=True))
    second = p.step(5.0, seg)
    assert second.frame is first_frame and second.turn == 2
    assert seg.extra[-1] == {"history": (("the cups", "[SEG]"),)}
    p.push_command("and the right one", 6.0, CommandOptions(follow_up=True))
    third = p.step(6.0, seg)
    assert third.turn == 3 and seg.extra[-1]["history"] == (
        ("the cups", "[SEG]"),
        ("now the one on the left", "[SEG]"),
    )
    # A new question (no follow-up) starts over on the newest frame.
    p.push_frame(rgb(3), 6.5)
    p.push_command("the plate", 6.5)
    fourth = p.step(6.5, seg)
    assert fourth.turn == 1 and fourth.frame is not first_frame and seg.extra[-1] == {}


def test_a_conversation_ends_after_its_timeout_or_the_stop_command() -> None:
    p = make(follow_up=True, follow_up_timeout=2.0)
    seg = FakeSegmenter()
    p.push_frame(rgb(1), 0.0)
    p.push_command("the cups", 0.0)
    p.step(0.0, seg)
    p.push_frame(rgb(2), 3.0)
    p.push_command("the left one", 3.0)  # the node's follow_up: on, but 3 s > 2 s
    late = p.step(3.0, seg)
    assert late.turn == 1 and seg.extra[-1] == {}
    p.push_command("stop", 3.5)
    p.push_command("the right one", 3.6)
    after_stop = p.step(3.6, seg)
    assert after_stop.turn == 1


def test_a_command_that_comes_during_the_encoding_of_a_fresh_frame_gets_it() -> None:
    p = make(preencode=True, max_image_age=1.0)

    class SlowEncode(FakeSegmenter):
        def set_image(self, rgb: np.ndarray) -> None:
            super().set_image(rgb)
            if len(self.images) == 1:  # the command arrives while the frame is being encoded
                p.push_command("cup", 0.5)

    seg = SlowEncode()
    frame = p.push_frame(rgb(), 0.0)
    assert isinstance(p.step(0.0, seg), Encoded)
    # The encoding took long (2.5 s on a loaded machine): the frame is now older than
    # max_image_age, but it was fresh when the command came, which waits for no other encoding.
    outcome = p.step(2.5, seg)
    assert isinstance(outcome, Success) and outcome.frame is frame and outcome.preencoded
    # A command that comes after the encoding is judged when it runs: the frame is stale.
    p.push_command("bowl", 2.6)
    assert p.next_job(2.6) is None
