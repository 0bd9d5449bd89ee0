"""lisa-segment on good and bad inputs, as a user runs it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import cv2
import numpy as np
import pytest

from lisa_model.cli.segment import main
from tests.conftest import REFERENCE_DIR

CKPT = REFERENCE_DIR / "lisa-tiny"
IMG0 = REFERENCE_DIR / "inputs" / "img0.png"
QUERY = "What is the red ball in this image? Please output segmentation mask."


def test_segment_writes_mask_and_overlay(tmp_path, capsys):
    out = tmp_path / "out"
    code = main(["--model", str(CKPT), "--image", str(IMG0), "--query", QUERY, "--raw-prompt",
                 "--max-new-tokens", "16", "--out", str(out)])  # fmt: skip
    assert code == 0
    printed = capsys.readouterr().out
    assert "answer: [SEG]" in printed and "1 mask(s)" in printed
    mask = cv2.imread(str(out / "mask.png"), cv2.IMREAD_UNCHANGED)
    overlay = cv2.imread(str(out / "overlay.png"))
    assert mask.shape == (240, 320) and set(np.unique(mask)) <= {0, 255}
    assert 0 < (mask == 255).mean() < 1
    original = cv2.imread(str(IMG0))
    changed = np.any(overlay != original, axis=2)
    assert changed[mask == 255].mean() > 0.9  # tinted inside the mask
    assert changed[mask == 0].mean() < 0.1  # untouched outside (but for the outline)


def test_segment_fast_path_and_nothing_found(tmp_path, capsys):
    code = main(
        [
            "--model",
            str(CKPT),
            "--image",
            str(REFERENCE_DIR / "inputs" / "img1.png"),
            "--query",
            "the red ball",
            "--max-new-tokens",
            "4",
            "--out",
            str(tmp_path),
        ]
    )
    assert code == 0
    assert "nothing found" in capsys.readouterr().out
    assert cv2.imread(str(tmp_path / "mask.png"), cv2.IMREAD_UNCHANGED).max() == 0
    code = main(["--model", str(CKPT), "--image", str(IMG0), "--query", "the red ball",
                 "--mode", "segment", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0 and "segment-only" in capsys.readouterr().out


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing_image", "no such file"),
        ("bad_image", "cannot be read as an image"),
        ("not_checkpoint", "not a LISA checkpoint"),
        ("empty_query", "--query is empty"),
        ("missing_model", "no such checkpoint directory"),
    ],
)
def test_user_errors_are_one_clear_line(tmp_path, capsys, case, expect):
    image, model, query = str(IMG0), str(CKPT), "the ball"
    if case == "missing_image":
        image = str(tmp_path / "nope.png")
    elif case == "bad_image":
        (tmp_path / "bad.png").write_bytes(b"not an image")
        image = str(tmp_path / "bad.png")
    elif case == "not_checkpoint":
        (tmp_path / "dir").mkdir()
        model = str(tmp_path / "dir")
    elif case == "empty_query":
        query = "  "
    elif case == "missing_model":
        model = str(tmp_path / "nomodel")
    code = main(["--model", model, "--image", image, "--query", query, "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and expect in err and "Traceback" not in err


def test_console_script_runs_without_traceback(tmp_path):
    exe = shutil.which("lisa-segment", path=os.path.dirname(sys.executable))
    if exe is None:
        pytest.skip("package not installed in this environment (pip install -e .)")
    proc = subprocess.run(
        [exe, "--model", str(tmp_path / "missing"), "--image", str(IMG0), "--query", "x"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and "no such checkpoint directory" in proc.stderr
