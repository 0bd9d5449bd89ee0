"""``lisa-replay`` and the demo bag: real rosbag2 files (sqlite3 and MCAP) written with rosbags,
replayed through the pipeline with the reference fixture's tiny LISA, output bags read back.

The model is not what is under test in most of these, and on 2 CPU cores each frame costs it
about 0.3 s, so most tests use ``FakeSegmenter``: a mask computed from the frame's pixels (so a
mask shows which pixels the pipeline got) and a fake wall clock for ``--realtime``. The tiny real
model runs where the real path matters: the masks of a replay compared with the model's own
answer on the recorded frame, the end-to-end command line, and an interrupted run.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from rosbags.rosbag2 import Reader, StoragePlugin, Writer
from rosbags.typesys import Stores, get_types_from_msg, get_typestore

from lisa_model.predictor import LisaPredictor
from lisa_model.types import SegmentationResult
from lisa_model.visualize import union_mask_u8
from lisa_ros import replay
from lisa_ros.conversion import message_to_rgb
from lisa_ros.demo_bag import (
    COMMAND_TOPIC,
    COMPRESSED_TOPIC,
    IMAGE_TOPIC,
    draw_scene,
    make_demo_bag,
)
from lisa_ros.demo_bag import main as demo_main
from lisa_ros.pipeline import (
    Failure,
    FailureKind,
    ModeSegmenter,
    Pipeline,
    Success,
)
from lisa_ros.replay import (
    InputBag,
    ReplayDriver,
    ReplayError,
    ReplayOptions,
    iter_replay,
    load_commands_file,
    replay_outcomes,
    replay_to_bag,
)
from lisa_ros.replay import cli as replay_cli
from lisa_ros.replay.run import replay_config

TS = get_typestore(Stores.ROS2_HUMBLE)
NS = 1_000_000_000
T0 = 1_700_000_000 * NS  # bag time of the first frame
H, W = 48, 64
CAMERA = "/camera/image"


# --------------------------------------------------------------------------------- helpers


def header(i: int, t_ns: int) -> Any:
    stamp = t_ns - 10_000_000  # stamped 10 ms before it was received
    time_msg = TS.types["builtin_interfaces/msg/Time"](sec=stamp // NS, nanosec=stamp % NS)
    return TS.types["std_msgs/msg/Header"](stamp=time_msg, frame_id=f"cam{i}")


def image_message(rgb: np.ndarray, encoding: str, hdr: Any) -> tuple[str, Any]:
    """(msgtype, message) holding ``rgb`` in one of the encodings under test."""
    image_t = TS.types["sensor_msgs/msg/Image"]
    bgr = np.ascontiguousarray(rgb[:, :, ::-1])
    if encoding in ("jpeg", "png"):
        ok, buf = cv2.imencode(f".{'jpg' if encoding == 'jpeg' else 'png'}", bgr)
        assert ok
        msg = TS.types["sensor_msgs/msg/CompressedImage"](
            header=hdr, format=f"bgr8; {encoding} compressed bgr8", data=buf.reshape(-1)
        )
        return "sensor_msgs/msg/CompressedImage", msg
    h, w = rgb.shape[:2]
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    pixels = {
        "rgb8": rgb,
        "bgr8": bgr,
        "mono8": grey,
        "mono16": grey.astype("<u2") * 257,
        "32FC1": grey.astype("<f4"),
    }[encoding]
    data = np.ascontiguousarray(pixels).view(np.uint8).reshape(-1)
    msg = image_t(
        header=hdr,
        height=h,
        width=w,
        encoding=encoding,
        is_bigendian=0,
        step=data.size // h,
        data=data,
    )
    return "sensor_msgs/msg/Image", msg


def string(text: str) -> Any:
    return TS.types["std_msgs/msg/String"](data=text)


def write_bag(
    path: Path, storage: str, messages: list[tuple[str, str, int, Any]], typestore: Any = TS
) -> Path:
    """Write ``(topic, msgtype, t_ns, message)`` tuples (any order) into a new bag."""
    plugin = StoragePlugin.MCAP if storage == "mcap" else StoragePlugin.SQLITE3
    with Writer(path, version=9, storage_plugin=plugin) as writer:
        conns: dict[str, Any] = {}
        for topic, msgtype, t_ns, msg in messages:
            if topic not in conns:
                conns[topic] = writer.add_connection(topic, msgtype, typestore=typestore)
            writer.write(conns[topic], t_ns, typestore.serialize_cdr(msg, msgtype))
    return path


def frames(encoding: str = "rgb8", n: int = 4, rate_hz: float = 5.0, topic: str = CAMERA):
    """n frames of the demo scene; returns bag messages and {frame_id: message}."""
    messages, by_id = [], {}
    for i in range(n):
        t_ns = T0 + int(i * NS / rate_hz)
        msgtype, msg = image_message(draw_scene(i / rate_hz, W, H), encoding, header(i, t_ns))
        messages.append((topic, msgtype, t_ns, msg))
        by_id[f"cam{i}"] = msg
    return messages, by_id


def commands(*items: tuple[float, str], topic: str = "/command"):
    return [(topic, "std_msgs/msg/String", T0 + int(s * NS), string(text)) for s, text in items]


def read_bag(path: Path) -> dict[str, list[tuple[int, Any, bytes]]]:
    """{topic: [(t_ns, message or None, raw)]} of a bag, deserialised with its own definitions."""
    out: dict[str, list[tuple[int, Any, bytes]]] = {}
    with Reader(path) as reader:
        types: dict[str, Any] = {}
        for conn in reader.connections:
            types.update(get_types_from_msg(conn.msgdef.data, conn.msgtype))
        store = get_typestore(Stores.EMPTY)
        store.register({k: v for k, v in types.items() if k not in store.fielddefs})
        for conn, t_ns, raw in reader.messages():
            msg = store.deserialize_cdr(raw, conn.msgtype)
            out.setdefault(conn.topic, []).append((t_ns, msg, raw))
    return out


def options(in_bag: Path, out: Path, **kw: Any) -> ReplayOptions:
    return ReplayOptions(in_bag=in_bag, out=out, progress=False, verbose=False, **kw)


@pytest.fixture(scope="module")
def predictor(reference_model) -> LisaPredictor:
    return LisaPredictor(reference_model)


@pytest.fixture
def segmenter(predictor: LisaPredictor) -> ModeSegmenter:
    predictor.reset_image()
    return ModeSegmenter(predictor, "segment")


class FakeSegmenter:
    """Masks the bright pixels of the frame it holds (grey > 128: depends on the pixels it got);
    advances a fake wall clock by ``cost`` per predict; raises ``error`` if one is given."""

    def __init__(self, cost: float = 0.0, error: BaseException | None = None) -> None:
        self.cost, self.error, self.now = cost, error, 0.0
        self.images: list[np.ndarray] = []

    def timer(self) -> float:
        return self.now

    def set_image(self, rgb: np.ndarray) -> None:
        self.images.append(rgb)

    def predict(
        self, query: str, explain: bool = False, max_new_tokens: int = 64, mode: str = "generate"
    ):
        self.now += self.cost
        if self.error is not None:
            raise self.error
        masks = fake_masks(self.images[-1])
        return SegmentationResult(masks, np.where(masks, 1.0, -1.0).astype(np.float32), "ok")


def fake_masks(rgb: np.ndarray) -> np.ndarray:
    return (cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY) > 128)[None]


def drive(bag_path: Path, seg: FakeSegmenter, realtime: bool = False, **config: Any):
    with InputBag(bag_path) as bag:
        driver = ReplayDriver(Pipeline(replay_config(**config)), seg, realtime, seg.timer)
        items = list(iter_replay(bag, bag.select(), driver))
    return [i for i in items if isinstance(i, replay.Published)]


# ------------------------------------------------------------------- outputs, per encoding


@pytest.mark.parametrize(
    ("encoding", "storage"),
    [
        ("rgb8", "sqlite3"),
        ("bgr8", "mcap"),
        ("mono8", "sqlite3"),
        ("mono16", "mcap"),
        ("jpeg", "sqlite3"),
        ("png", "mcap"),
    ],
)
def test_one_mask_per_served_command_with_the_source_header(
    tmp_path: Path, encoding: str, storage: str
) -> None:
    images, by_id = frames(encoding)  # frames at 0.0, 0.2, 0.4, 0.6 s
    cmds = commands((0.25, "find the red ball"), (0.65, "the blue box"))
    bag = write_bag(tmp_path / "in", storage, images + cmds)
    out = tmp_path / "out"
    summary = replay_to_bag(options(bag, out), FakeSegmenter())

    assert out.is_dir() and not (tmp_path / "out.partial").exists()
    suffix = ".mcap" if storage == "mcap" else ".db3"
    assert (out / f"out{suffix}").is_file()  # same storage as the input by default
    assert summary.stats.served == 2 and summary.stats.failed == 0
    topics = read_bag(out)
    assert set(topics) == {
        "/lisa/mask",
        "/lisa/explanation",
        "/lisa/overlay",
        "/lisa/segmentation",
    }
    masks = topics["/lisa/mask"]
    assert [t for t, _, _ in masks] == [T0 + NS // 4, T0 + 13 * NS // 20]  # the commands' times
    for (_, mask, _), frame_id in zip(masks, ["cam1", "cam3"]):
        source = by_id[frame_id]
        assert mask.header.frame_id == frame_id
        assert (mask.header.stamp.sec, mask.header.stamp.nanosec) == (
            source.header.stamp.sec,
            source.header.stamp.nanosec,
        )
        assert (mask.height, mask.width, mask.encoding, mask.step) == (H, W, "mono8", W)
        expected = fake_masks(message_to_rgb(source))[0].astype(np.uint8) * 255
        np.testing.assert_array_equal(mask.data.reshape(H, W), expected)
    for _, overlay, _ in topics["/lisa/overlay"]:
        assert (overlay.height, overlay.width, overlay.encoding) == (H, W, "rgb8")
        assert overlay.header.frame_id in ("cam1", "cam3")
    assert len(topics["/lisa/explanation"]) == 2
    # The typed results, read back with the definitions embedded in the bag: one per command,
    # at the same time as its mask, with per-target masks equal to the mask topic's.
    results = topics["/lisa/segmentation"]
    assert [t for t, _, _ in results] == [t for t, _, _ in masks]
    assert [r.command for _, r, _ in results] == ["find the red ball", "the blue box"]
    assert [r.command_id for _, r, _ in results] == [1, 2]
    for (_, result, _), (_, mask, _) in zip(results, masks):
        assert result.error == "" and result.error_code == "" and result.found
        assert result.header.frame_id == mask.header.frame_id
        (target,) = result.targets
        assert target.index == 0 and not target.position_valid
        np.testing.assert_array_equal(target.mask.data, mask.data)
        assert target.area == int(np.count_nonzero(mask.data))


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_failed_and_cancelled_commands_are_typed_results_in_the_bag(
    tmp_path: Path, storage: str
) -> None:
    images, _ = frames("rgb8", n=2)  # frames at 0.0 and 0.2 s
    cmds = commands((0.1, ""), (1.5, "too late for any frame"), (1.6, "stop"))
    bag = write_bag(tmp_path / "in", storage, images + cmds)
    replay_to_bag(options(bag, tmp_path / "out"), FakeSegmenter())
    results = [r for _, r, _ in read_bag(tmp_path / "out")["/lisa/segmentation"]]
    by_text = {r.command: r for r in results}
    assert by_text[""].error_code == "rejected" and "command is empty" in by_text[""].error
    assert by_text["too late for any frame"].error_code == "cancelled"
    assert by_text["stop"].error == "" and by_text["stop"].answer.startswith("stopped:")
    assert sorted(r.command_id for r in results) == [1, 2, 3]


def test_rgb8_mask_is_the_models_answer_on_the_recorded_pixels(
    tmp_path: Path, predictor: LisaPredictor, segmenter: ModeSegmenter
) -> None:
    images, _ = frames("rgb8", n=2)
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.3, "the ball")))
    [published] = replay_outcomes(bag, segmenter)
    assert isinstance(published.outcome, Success)
    predictor.set_image(draw_scene(0.2, W, H))  # the frame at 0.2 s, drawn again
    result = predictor.predict("the ball", mode="segment")
    np.testing.assert_array_equal(published.outcome.mask, union_mask_u8(result.masks, (H, W)))


def test_bare_storage_file_and_copy_input_with_a_custom_type(tmp_path: Path) -> None:
    custom = dict(get_types_from_msg("string note\nuint8[] payload\n", "my_pkg/msg/Note"))
    store = get_typestore(Stores.ROS2_HUMBLE)
    store.register(custom)
    note = store.types["my_pkg/msg/Note"](note="hello", payload=np.arange(5, dtype=np.uint8))
    images, _ = frames("rgb8", n=2)
    extra = [("/notes", "my_pkg/msg/Note", T0 + 5, note)]
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.3, "ball")) + extra, store)
    out = tmp_path / "out"
    opts = options(
        bag / "in.db3", out, copy_input=True, storage="mcap", publish_compressed_mask=True
    )
    summary = replay_to_bag(opts, FakeSegmenter())
    assert (out / "out.mcap").is_file()
    assert summary.written["/notes"] == 1 and summary.written[CAMERA] == 2
    topics = read_bag(out)
    with Reader(bag) as reader:
        original = {c.topic: raw for c, _, raw in reader.messages()}
    with InputBag(bag) as opened:  # the bag's own definition describes the custom type
        note_in = opened.typestore(["/notes"]).deserialize_cdr(
            original["/notes"], "my_pkg/msg/Note"
        )
        assert note_in.note == "hello"
    [(_, copied, raw)] = topics["/notes"]
    assert raw == original["/notes"]  # bytes copied as they are
    assert copied.note == "hello" and list(copied.payload) == [0, 1, 2, 3, 4]
    assert [m.data for _, m, _ in topics["/command"]] == ["ball"]
    [(_, mask, _)] = topics["/lisa/mask"]
    [(_, png, _)] = topics["/lisa/mask/compressed"]
    assert png.format == "mono8; png compressed " and png.header.frame_id == "cam1"
    decoded = cv2.imdecode(png.data, cv2.IMREAD_UNCHANGED)
    np.testing.assert_array_equal(decoded, mask.data.reshape(H, W))


def test_bag_without_embedded_definitions_uses_the_default_types(tmp_path: Path) -> None:
    images, _ = frames("bgr8", n=2)
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.3, "ball")))
    with sqlite3.connect(bag / "in.db3") as db:  # as a rosbag2 Humble recording has none
        db.execute("DELETE FROM message_definitions")
    with InputBag(bag) as opened:
        assert all(not c.msgdef.data for c in opened.connections)
    [published] = replay_outcomes(bag, FakeSegmenter())
    assert published.outcome.ok and published.outcome.frame.frame_id == "cam1"


# ------------------------------------------------------------------------- commands file


def test_commands_file_relative_absolute_and_comments(tmp_path: Path) -> None:
    images, _ = frames("rgb8", n=4)
    bag = write_bag(tmp_path / "in", "mcap", images)  # no command topic at all
    absolute = (T0 + 650_000_000) / NS
    cmd_file = tmp_path / "cmds.txt"
    cmd_file.write_text(
        f"# seconds  text\n\n0.25 find the red ball\n{absolute:.3f}   the blue   box \n"
    )
    loaded = load_commands_file(cmd_file, T0)
    assert [(c.time_ns, c.text) for c in loaded] == [
        (T0 + 250_000_000, "find the red ball"),
        (T0 + 650_000_000, "the blue   box"),
    ]
    assert loaded[0].origin == f"{cmd_file}:3"
    results = replay_outcomes(bag, FakeSegmenter(), commands_file=cmd_file)
    assert [(p.outcome.command.text, p.outcome.frame.frame_id) for p in results] == [
        ("find the red ball", "cam1"),
        ("the blue box", "cam3"),
    ]
    assert [p.time_ns for p in results] == [T0 + 250_000_000, T0 + 650_000_000]


@pytest.mark.parametrize("line", ["abc find it", "1.5", "-2 go", "nan go"])
def test_malformed_commands_line_names_file_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, line: str
) -> None:
    images, _ = frames("rgb8", n=1)
    bag = write_bag(tmp_path / "in", "sqlite3", images)
    cmd_file = tmp_path / "cmds.txt"
    cmd_file.write_text(f"0.1 fine\n# comment\n{line}\n")
    rc = replay.main([str(bag), "--out", str(tmp_path / "out"), "--commands", str(cmd_file)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{cmd_file}:3" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------- error handling


def run_main(argv: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    rc = replay.main([str(a) for a in argv])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


def test_missing_and_corrupt_bags_are_one_line_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    rc, err = run_main([tmp_path / "nope", "--out", out], capsys)
    assert rc == 2 and "nope: no such bag" in err
    images, _ = frames("rgb8", n=2)
    for storage, suffix in (("sqlite3", "db3"), ("mcap", "mcap")):
        bag = write_bag(tmp_path / f"bag_{storage}", storage, images)
        storage_file = bag / f"bag_{storage}.{suffix}"
        storage_file.write_bytes(storage_file.read_bytes()[:300])
        for path in (bag, storage_file):
            rc, err = run_main([path, "--out", out], capsys)
            assert rc == 2 and "cannot be read as a ROS 2 bag" in err and str(path) in err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc, err = run_main([empty, "--out", out], capsys)
    assert rc == 2 and "no metadata.yaml" in err
    assert not out.exists()


def test_missing_topic_lists_the_topics_of_the_bag(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, _ = frames("rgb8", n=2)
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.1, "x")))
    out = tmp_path / "out"
    rc, err = run_main([bag, "--out", out, "--image-topic", "/nope"], capsys)
    assert rc == 2 and "--image-topic /nope: no such topic" in err
    assert f"{CAMERA} (sensor_msgs/msg/Image, 2 msgs)" in err
    assert "/command (std_msgs/msg/String, 1 msgs)" in err
    rc, err = run_main([bag, "--out", out, "--command-topic", CAMERA], capsys)
    assert rc == 2 and "expected std_msgs/msg/String" in err
    no_cmds = write_bag(tmp_path / "no_cmds", "sqlite3", images)
    rc, err = run_main([no_cmds, "--out", out], capsys)
    assert rc == 2 and "--commands FILE" in err


def test_several_image_topics_need_a_choice_unless_one_camera(tmp_path: Path) -> None:
    raw, _ = frames("rgb8", n=1)
    jpeg, _ = frames("jpeg", n=1, topic=CAMERA + "/compressed")
    other, _ = frames("rgb8", n=1, topic="/other/image")
    cmds = commands((0.1, "x"))
    with InputBag(write_bag(tmp_path / "a", "sqlite3", raw + jpeg + cmds)) as bag:
        assert bag.select().image_topic == CAMERA  # a raw topic and its transport
    with InputBag(write_bag(tmp_path / "b", "sqlite3", raw + other + cmds)) as bag:
        with pytest.raises(ReplayError, match="several image topics") as info:
            bag.select()
        assert CAMERA in str(info.value) and "/other/image" in str(info.value)
        assert bag.select(image_topic="/other/image").image_topic == "/other/image"


def test_existing_output_is_never_written_over(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    images, _ = frames("rgb8", n=1)
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.1, "x")))
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    rc, err = run_main([bag, "--out", out], capsys)
    assert rc == 2 and "exists" in err and (out / "keep.txt").read_text() == "mine"
    partial = tmp_path / "fresh.partial"
    partial.mkdir()
    rc, err = run_main([bag, "--out", tmp_path / "fresh"], capsys)
    assert rc == 2 and "fresh.partial exists" in err
    overlays = tmp_path / "overlays"
    overlays.mkdir()
    (overlays / "old.png").write_bytes(b"x")
    rc, err = run_main([bag, "--out", tmp_path / "o2", "--overlays", overlays], capsys)
    assert rc == 2 and "--overlays" in err


def test_bad_model_path_is_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    images, _ = frames("rgb8", n=1)
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.1, "x")))
    rc, err = run_main([bag, "--out", tmp_path / "out", "--model", tmp_path / "nomodel"], capsys)
    assert rc == 2 and "--model" in err and "nomodel" in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_broken_checkpoint_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """A truncated weights file: one error line that names it, nothing written."""
    import shutil

    from tests.conftest import REFERENCE_DIR

    model = tmp_path / "model"
    shutil.copytree(REFERENCE_DIR / "lisa-tiny", model)
    shard = sorted(model.glob("pytorch_model-*.bin"))[0]
    shard.write_bytes(shard.read_bytes()[:5000])
    images, _ = frames("rgb8", n=1)
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.1, "x")))
    rc, err = run_main([bag, "--out", tmp_path / "out", "--model", model], capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith(f"lisa-replay: error: --model: {shard}: truncated or corrupt")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_undecodable_frames_are_skipped_and_counted(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    segmenter = FakeSegmenter()
    good, _ = frames("rgb8", n=4)
    bad, _ = frames("32FC1", n=4)
    mixed = [bad[0], good[1], bad[2], good[3]]  # 0.2 s and 0.6 s decode
    cmds = commands((0.05, "a"), (0.25, "b"), (0.45, "c"))
    bag = write_bag(tmp_path / "in", "sqlite3", mixed + cmds)
    config = replay_config(max_image_age=0.2)
    summary = replay_to_bag(
        options(bag, tmp_path / "out", image_topic=CAMERA, config=config), segmenter
    )
    assert "unsupported image encoding '32FC1'" in capsys.readouterr().err
    assert summary.frames_read == 4 and sum(summary.frames_skipped.values()) == 2
    # "a" waits for the frame at 0.2 s, "b" takes it too, "c" takes the frame at 0.6 s.
    got = [(p.outcome.command.text, p.outcome.frame.frame_id) for p in summary.results]
    assert got == [("a", "cam1"), ("b", "cam1"), ("c", "cam3")]
    assert "skipped 2x: unsupported image encoding '32FC1'" in summary.text()

    all_bad = write_bag(tmp_path / "all_bad", "mcap", bad + cmds)
    with pytest.raises(ReplayError, match="none of the 4 frames"):
        replay_to_bag(options(all_bad, tmp_path / "out2"), segmenter)
    assert not (tmp_path / "out2").exists()
    assert "none of the 4 frames" in (tmp_path / "out2.partial" / "PARTIAL.txt").read_text()


class InterruptAfter(ModeSegmenter):
    """A segmenter interrupted (as by Ctrl-C) on its n-th query."""

    def __init__(self, predictor: Any, n: int) -> None:
        super().__init__(predictor, "segment")
        self.calls, self.n = 0, n

    def predict(self, query: str, explain: bool = False, max_new_tokens: int = 64):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return super().predict(query, explain, max_new_tokens)


def test_interrupt_midway_leaves_a_marked_partial_output(
    tmp_path: Path, predictor: LisaPredictor, capsys: pytest.CaptureFixture, monkeypatch
) -> None:
    images, _ = frames("rgb8", n=4)
    cmds = commands((0.05, "a"), (0.25, "b"), (0.45, "c"))
    bag = write_bag(tmp_path / "in", "sqlite3", images + cmds)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        replay_to_bag(options(bag, out), InterruptAfter(FakeSegmenter(), 2))
    partial = tmp_path / "out.partial"
    assert not out.exists()
    marker = (partial / "PARTIAL.txt").read_text()
    assert "INCOMPLETE" in marker and "interrupted" in marker
    assert (partial / "out").is_dir() and not (partial / "out" / "metadata.yaml").exists()

    # Through the command line: exit status 130, the marker, and a rerun refused.
    out2 = tmp_path / "cli_out"
    monkeypatch.setattr(replay_cli, "load_model_from_args", lambda args: predictor.model)
    monkeypatch.setattr(
        replay_cli, "ModeSegmenter", lambda p, mode: InterruptAfter(FakeSegmenter(), 2)
    )
    rc = replay.main([str(bag), "--out", str(out2)])
    assert rc == 130 and "interrupted" in capsys.readouterr().err
    assert "interrupted" in (tmp_path / "cli_out.partial" / "PARTIAL.txt").read_text()
    assert not out2.exists()


def test_model_errors_fail_the_command_not_the_replay(tmp_path: Path) -> None:
    images, _ = frames("rgb8", n=2)
    bag = write_bag(tmp_path / "in", "sqlite3", images + commands((0.1, "a")))
    summary = replay_to_bag(
        options(bag, tmp_path / "out"), FakeSegmenter(error=RuntimeError("boom"))
    )
    [published] = summary.results
    assert isinstance(published.outcome, Failure)
    assert published.outcome.kind == FailureKind.MODEL_ERROR
    assert "boom" in summary.text() and (tmp_path / "out" / "metadata.yaml").is_file()
    topics = read_bag(tmp_path / "out")
    assert "/lisa/mask" not in topics
    # As the node does, the failure is answered on the explanation topic, at the command's time.
    [(t_ns, answer, _)] = topics["/lisa/explanation"]
    assert answer.data == "[1] failed: model error: RuntimeError: boom (command 'a')"
    assert t_ns == T0 + NS // 10


# -------------------------------------------------------------- bag time, like the node


def test_timeouts_fire_at_their_bag_time_and_stale_frames_are_not_used(tmp_path: Path) -> None:
    images, _ = frames("rgb8", n=3, rate_hz=10.0)  # frames at 0.0, 0.1, 0.2 s
    late, _ = frames("rgb8", n=1)
    late = [(CAMERA, late[0][1], T0 + 5 * NS, late[0][3])]  # one more frame at 5.0 s
    cmds = commands((0.15, "now"), (3.0, "stale"), (6.5, "nothing"))
    bag = write_bag(tmp_path / "in", "sqlite3", images + late + cmds)
    results = drive(bag, FakeSegmenter(), max_image_age=0.5, image_wait_timeout=1.0)
    got = [(p.outcome.command.text, p.outcome.ok) for p in results]
    assert got == [("now", True), ("stale", False), ("nothing", False)]
    now, stale, nothing = results
    assert now.time_ns == T0 + 150_000_000 and now.outcome.frame.frame_id == "cam1"
    assert stale.outcome.kind == FailureKind.STALE_IMAGE
    assert nothing.outcome.kind == FailureKind.STALE_IMAGE  # the 5.0 s frame is 1.5 s old
    # Failures are published when the wait times out, in bag time (within float rounding).
    assert abs(stale.time_ns - (T0 + 4 * NS)) < 1000
    assert abs(nothing.time_ns - (T0 + 7_500_000_000)) < 1000  # after the bag's end


def test_continuous_mode_reruns_at_the_rate_limit(tmp_path: Path) -> None:
    images, _ = frames("rgb8", n=20, rate_hz=10.0)  # 0.0 .. 1.9 s
    cmds = commands((0.07, "follow the ball"), (1.25, "stop"))
    bag = write_bag(tmp_path / "in", "mcap", images + cmds)
    results = drive(bag, FakeSegmenter(), continuous=True, max_rate_hz=4.0)
    assert all(p.outcome.ok for p in results)
    times = [(p.time_ns - T0) / NS for p in results]
    # First run at the command, then the newest frame every 1 / 4 Hz, until "stop" at 1.25 s.
    assert times == pytest.approx([0.07, 0.32, 0.57, 0.82, 1.07], abs=1e-6)
    assert [p.outcome.standing for p in results] == [False, True, True, True, True]
    assert [p.outcome.frame.frame_id for p in results] == ["cam0", "cam3", "cam5", "cam8", "cam10"]


def test_realtime_skips_frames_that_arrive_during_inference(tmp_path: Path) -> None:
    images, _ = frames("rgb8", n=10, rate_hz=10.0)  # 0.0 .. 0.9 s
    cmds = commands((0.05, "first"), (0.12, "second"))
    bag = write_bag(tmp_path / "in", "sqlite3", images + cmds)
    instant = drive(bag, FakeSegmenter(cost=0.33))
    assert [p.outcome.frame.frame_id for p in instant] == ["cam0", "cam1"]
    assert [p.time_ns for p in instant] == [T0 + 50_000_000, T0 + 120_000_000]
    real = drive(bag, FakeSegmenter(cost=0.33), realtime=True)
    # "first" runs 0.05 -> 0.38 s; "second" waited, gets the newest frame (0.3 s) at 0.38 s.
    assert [p.outcome.frame.frame_id for p in real] == ["cam0", "cam3"]
    assert [(p.time_ns - T0) / NS for p in real] == pytest.approx([0.38, 0.71], abs=1e-6)


# -------------------------------------------------------------------------------- demo bag


@pytest.mark.parametrize("storage", ["sqlite3", "mcap"])
def test_demo_bag_is_small_and_readable(tmp_path: Path, storage: str) -> None:
    bag = make_demo_bag(tmp_path / "demo", storage)
    size = sum(f.stat().st_size for f in bag.iterdir())
    assert size < 500_000
    topics = read_bag(bag)
    assert {t: len(m) for t, m in topics.items()} == {
        IMAGE_TOPIC: 15,
        COMPRESSED_TOPIC: 15,
        COMMAND_TOPIC: 5,
    }
    first = topics[IMAGE_TOPIC][0][1]
    assert (first.width, first.height, first.encoding) == (320, 240, "rgb8")
    np.testing.assert_array_equal(message_to_rgb(first), draw_scene(0.0))
    jpeg = message_to_rgb(topics[COMPRESSED_TOPIC][0][1])
    assert np.abs(jpeg.astype(int) - draw_scene(0.0)).mean() < 3
    assert [m.data for _, m, _ in topics[COMMAND_TOPIC]][0] == "find the red circle"
    times = [t for t, _, _ in topics[IMAGE_TOPIC]]
    assert np.allclose(np.diff(times), NS / 5)


def test_demo_bag_cli_and_end_to_end_replay_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture, reference_dir: Path
) -> None:
    bag = tmp_path / "demo.bag"
    assert demo_main([str(bag), "--storage", "mcap", "--frames", "3"]) == 0
    assert demo_main([str(bag)]) == 2 and "exists" in capsys.readouterr().err
    out, overlays = tmp_path / "out.bag", tmp_path / "overlays"
    argv = [bag, "--out", out, "--model", reference_dir / "lisa-tiny", "--mode", "segment"]
    argv += ["--image-topic", COMPRESSED_TOPIC, "--storage", "sqlite3", "--copy-input"]
    rc = replay.main([str(a) for a in [*argv, "--overlays", overlays]])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    # Frames at 0.0, 0.2, 0.4 s. Commands at 0.3 and 0.9 s are served (the 0.9 s one with the
    # 0.4 s frame); those at 1.5 and 2.1 s find only a frame older than max_image_age (1 s) and
    # wait for a fresh one until "stop" at 2.5 s cancels them.
    assert "2 served" in captured.out and "2 cancelled by stop" in captured.out
    assert "p95" in captured.out
    topics = read_bag(out)
    assert len(topics["/lisa/mask"]) == 2 and len(topics[IMAGE_TOPIC]) == 3
    answers = [m.data for _, m, _ in topics["/lisa/explanation"]]
    # The node says so too: the stop command is answered, and so is each command it cancelled.
    assert len(answers) == 5 and answers[2].startswith("[5] stopped:")
    assert [a.split(" (command")[0] for a in answers[3:]] == [
        "[3] failed: cancelled by the stop command 5",
        "[4] failed: cancelled by the stop command 5",
    ]
    assert (out / "out.bag.db3").is_file()
    assert sorted(p.name for p in overlays.iterdir()) == [
        "0001_0.300s.png",
        "0002_0.900s.png",
        "contact_sheet.png",
    ]
    assert cv2.imread(str(overlays / "contact_sheet.png")) is not None
