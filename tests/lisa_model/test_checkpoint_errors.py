"""Broken checkpoints: one CheckpointError naming the file and what is wrong, and through
lisa-segment one ``error:`` line with exit status 2 (the other CLIs: tests/training and
tests/lisa_ros)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from lisa_model.checkpoint import load_lisa, read_weight_file, save_lisa, weight_files
from lisa_model.cli.segment import main as segment_main
from lisa_model.config import CheckpointError
from tests.conftest import REFERENCE_DIR

REPO = Path(__file__).resolve().parents[2]
IMAGE = REFERENCE_DIR / "inputs" / "img0.png"


@pytest.fixture(scope="module")
def layouts(tiny_checkpoint, tmp_path_factory) -> dict[str, Path]:
    """The tiny checkpoint as a single .bin (as built), sharded .bin, single and sharded
    .safetensors."""
    root = tmp_path_factory.mktemp("layouts")
    model = load_lisa(tiny_checkpoint)
    out = {"bin": tiny_checkpoint}
    out["bin-sharded"] = save_lisa(
        model, root / "bin-sharded", max_shard_bytes=400_000, include_vision_tower=True
    )
    out["st"] = save_lisa(model, root / "st", safe_serialization=True, include_vision_tower=True)
    out["st-sharded"] = save_lisa(
        model,
        root / "st-sharded",
        safe_serialization=True,
        max_shard_bytes=400_000,
        include_vision_tower=True,
    )
    assert len(weight_files(out["bin-sharded"])) > 1 and len(weight_files(out["st-sharded"])) > 1
    return out


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def last_shard(directory: Path) -> Path:
    return weight_files(directory)[-1]


def edit_config(**changes) -> Callable[[Path], Path]:
    def edit(d: Path) -> Path:
        config = json.loads((d / "config.json").read_text())
        config.update({k: (v(config[k]) if callable(v) else v) for k, v in changes.items()})
        (d / "config.json").write_text(json.dumps(config))
        return d / "pytorch_model.bin"

    return edit


def _do(action: Callable[[Path], None], name: str) -> Callable[[Path], Path]:
    def edit(d: Path) -> Path:
        action(d / name)
        return d / name

    return edit


class _RunsCode:
    """A pickled object that would create a marker file when unpickled without restriction."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _crafted_pickle(d: Path) -> Path:
    target = d / "pytorch_model.bin"
    state = torch.load(target, weights_only=True)
    state["model.norm.weight"] = _RunsCode(d / "MARKER")
    torch.save(state, target)
    return target


# (case id, layout, edit -> the file the message must start with, what it must say)
CASES = [
    ("bin-truncated", "bin", _do(truncate, "pytorch_model.bin"), "truncated or corrupt"),
    ("bin-empty", "bin", _do(lambda p: p.write_bytes(b""), "pytorch_model.bin"), "empty file"),
    (
        "bin-not-weights",
        "bin",
        _do(lambda p: p.write_bytes(b"hello" * 99), "pytorch_model.bin"),
        "truncated or corrupt",
    ),
    ("bin-runs-code", "bin", _crafted_pickle, "pickled objects other than tensors"),
    (
        "bin-shard-truncated",
        "bin-sharded",
        lambda d: (truncate(last_shard(d)), last_shard(d))[1],
        "truncated or corrupt",
    ),
    (
        "bin-shard-missing",
        "bin-sharded",
        lambda d: (last_shard(d).unlink(), d / "pytorch_model.bin.index.json")[1],
        "lists shards that are missing",
    ),
    (
        "bin-index-malformed",
        "bin-sharded",
        _do(lambda p: p.write_text("{"), "pytorch_model.bin.index.json"),
        "malformed weight index",
    ),
    ("st-truncated", "st", _do(truncate, "model.safetensors"), "truncated or corrupt"),
    (
        "st-shard-truncated",
        "st-sharded",
        lambda d: (truncate(last_shard(d)), last_shard(d))[1],
        "truncated or corrupt",
    ),
    (
        "shape-mismatch",
        "bin",
        edit_config(intermediate_size=lambda v: v + 8),
        "shape mismatch",
    ),
    ("missing-keys", "bin", edit_config(num_hidden_layers=lambda v: v + 1), "missing keys"),
    ("unexpected-keys", "bin", edit_config(num_hidden_layers=lambda v: v - 1), "unexpected keys"),
    ("tokenizer-missing", "bin", _do(lambda p: p.unlink(), "tokenizer.model"), "missing"),
    (
        "tokenizer-truncated",
        "bin",
        _do(truncate, "tokenizer.model"),
        "not a valid SentencePiece model",
    ),
    (
        "tokenizer-config-malformed",
        "bin",
        _do(lambda p: p.write_text("{not json"), "tokenizer_config.json"),
        "not a readable JSON",
    ),
    (
        "config-malformed",
        "bin",
        _do(lambda p: p.write_text("{not json"), "config.json"),
        "not valid JSON",
    ),
    (
        "config-bad-value",
        "bin",
        lambda d: (edit_config(hidden_size="big")(d), d / "config.json")[1],
        "expected positive integers",
    ),
    (
        "vision-tower-truncated",
        "bin",
        _do(truncate, "vision_tower/model.safetensors"),
        "truncated or corrupt",
    ),
]


@pytest.mark.parametrize("layout,edit,expect", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_broken_checkpoint_is_one_error_naming_the_file(
    layouts, tmp_path, capsys, layout, edit, expect
):
    broken = tmp_path / "ckpt"
    shutil.copytree(layouts[layout], broken)
    culprit = edit(broken)
    with pytest.raises(CheckpointError) as info:
        load_lisa(broken)
    message = str(info.value)
    assert message.startswith(f"{culprit}: "), message
    assert expect in message and "\n" not in message
    assert not (broken / "MARKER").exists()  # nothing from the files ran

    code = segment_main(["--model", str(broken), "--image", str(IMAGE), "--query", "the ball",
                         "--out", str(tmp_path / "out")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and err.startswith("lisa-segment: error: ")
    assert str(culprit) in err and expect in err and "Traceback" not in err
    assert not (broken / "MARKER").exists()


def test_unreadable_weight_file(tiny_checkpoint, tmp_path, monkeypatch):
    """Permissions do not stop root (the test user), so the read fails on purpose."""
    broken = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, broken)
    weights = broken / "pytorch_model.bin"
    real_open = Path.open

    def deny(self, *args, **kwargs):
        if self == weights:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", deny)
    with pytest.raises(CheckpointError, match=f"^{weights}: cannot be read .Permission denied"):
        load_lisa(broken)


def test_crafted_pickle_runs_nothing(tmp_path):
    """A .bin (or SAM .pth) whose pickle calls os.system is refused before anything runs."""
    marker = tmp_path / "MARKER"
    path = tmp_path / "sam.pth"
    with path.open("wb") as f:
        pickle.dump({"w": _RunsCode(marker)}, f, protocol=2)  # as a legacy torch file
    with pytest.raises(CheckpointError, match=f"^{path}: .*refused global posix.system"):
        read_weight_file(path)
    with path.open("wb") as f:
        pickle.dump({"w": _RunsCode(marker)}, f, protocol=4)
    with pytest.raises(CheckpointError, match=f"^{path}: holds pickled objects other than"):
        read_weight_file(path)
    assert not marker.exists()


def test_done_when_truncated_demo_model_in_a_subprocess(tmp_path):
    """The issue's check: lisa-segment on the demo model with its weights cut in half."""
    from lisa_model.demo import demo_model_dir

    model = tmp_path / "demo"
    shutil.copytree(demo_model_dir(), model)
    truncate(model / "pytorch_model.bin")
    image = Path(demo_model_dir()).parent / "examples" / "scene_0.png"
    proc = subprocess.run(
        [sys.executable, "-m", "lisa_model.cli.segment", "--model", str(model),
         "--image", str(image), "--query", "x", "--out", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300, cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lisa-segment: error: "), proc.stderr
    assert str(model / "pytorch_model.bin") in lines[0] and "truncated" in lines[0]
