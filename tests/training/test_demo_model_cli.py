"""``python -m training.demo_model``: ``eval --record PATH`` writes where it is told, and no
command writes into the installed packages (the shipped demo model, the bundled examples)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from lisa_model.demo import DEMO_MODEL_DIR
from training.demo_model.cli import RECIPE_FILE
from training.demo_model.cli import main as demo_model_main
from training.shapes.writer import write_dataset

REPO = Path(__file__).resolve().parents[2]
EXAMPLES_DIR = DEMO_MODEL_DIR.parent / "examples"


def _listing(folder: Path) -> dict[str, tuple[int, int]]:
    """``{path: (size, mtime_ns)}`` of ``folder`` and everything in it."""
    entries = [folder, *folder.rglob("*")]
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in entries}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shapes")
    write_dataset(out, {"val": 1}, seed=5)
    return out


def test_eval_record_writes_the_given_path_not_the_shipped_model(
    data_dir: Path, tmp_path: Path
) -> None:
    before = _listing(DEMO_MODEL_DIR)
    record = tmp_path / "scored" / RECIPE_FILE
    argv = ["eval", "--model", str(DEMO_MODEL_DIR), "--data", str(data_dir), "--split", "val"]
    assert demo_model_main([*argv, "--max-images", "1", "--record", str(record)]) == 0
    recipe = json.loads(record.read_text())
    assert recipe["data"]["seed"] == 5
    assert recipe["data"]["config"] == json.loads((data_dir / "meta.json").read_text())["config"]
    report = recipe["report"]
    assert report["split"] == "val" and report["counts"]["segment overall"] == 1
    assert _listing(DEMO_MODEL_DIR) == before


@pytest.mark.parametrize(
    ("command", "flag", "target"),
    [
        ("eval", "--record", DEMO_MODEL_DIR / RECIPE_FILE),
        ("eval", "--out", DEMO_MODEL_DIR / "report.json"),
        ("init", "--out", DEMO_MODEL_DIR),
        ("warmup", "--out", DEMO_MODEL_DIR / "warm"),
        ("examples", "--out", EXAMPLES_DIR),
    ],
)
def test_no_command_writes_into_the_installed_package(
    data_dir: Path, capsys, command: str, flag: str, target: Path
) -> None:
    before = {folder: _listing(folder) for folder in (DEMO_MODEL_DIR, EXAMPLES_DIR)}
    argv = {
        "eval": ["eval", "--model", str(DEMO_MODEL_DIR), "--data", str(data_dir)],
        "init": ["init", "--data", str(data_dir)],
        "warmup": ["warmup", "--model", str(DEMO_MODEL_DIR), "--data", str(data_dir)],
        "examples": ["examples"],
    }[command]
    assert demo_model_main([*argv, flag, str(target)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"{flag} {target}: inside the installed package" in err[0], err
    assert err[0].startswith("python -m training.demo_model: error: ")
    assert {folder: _listing(folder) for folder in before} == before


def test_record_needs_the_data_sets_meta_json(tmp_path: Path, data_dir: Path, capsys) -> None:
    bare = tmp_path / "bare"
    (bare / "val").mkdir(parents=True)
    for path in (data_dir / "val").iterdir():
        (bare / "val" / path.name).write_bytes(path.read_bytes())
    argv = ["eval", "--model", str(DEMO_MODEL_DIR), "--data", str(bare)]
    assert demo_model_main([*argv, "--record", str(tmp_path / RECIPE_FILE)]) == 2
    assert "meta.json" in capsys.readouterr().err
    assert not (tmp_path / RECIPE_FILE).exists()


def test_module_runs_as_a_command() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "training.demo_model", "eval", "--help"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "--record PATH" in result.stdout
