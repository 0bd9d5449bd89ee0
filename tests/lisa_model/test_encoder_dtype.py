"""Image encoders in their own dtype (``load_lisa(encoder_dtype=...)``, ``--encoder-dtype``)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lisa_model import options
from lisa_model.checkpoint import load_lisa
from lisa_model.cli.segment import main as segment_main
from lisa_model.predictor import LisaPredictor
from tests.conftest import REFERENCE_DIR, read_rgb

CKPT = REFERENCE_DIR / "lisa-tiny"
IMAGES = ("img0.png", "img1.png", "img2.png")
QUERY = "the red ball"


def _dtypes(module: torch.nn.Module) -> set[torch.dtype]:
    return {p.dtype for p in module.parameters()}


@pytest.fixture(scope="module")
def models():
    fp32 = load_lisa(CKPT, dtype="float32")
    mixed = load_lisa(CKPT, dtype="float32", encoder_dtype="bfloat16")
    return fp32, mixed


def test_only_the_image_encoders_change_dtype(models):
    fp32, mixed = models
    assert _dtypes(fp32) == {torch.float32}
    assert _dtypes(mixed.vision_tower) == {torch.bfloat16}
    assert _dtypes(mixed.sam.image_encoder) == {torch.bfloat16}
    for part in (
        mixed.llm,
        mixed.mm_projector,
        mixed.seg_projector,
        mixed.sam.prompt_encoder,
        mixed.sam.mask_decoder,
    ):
        assert _dtypes(part) == {torch.float32}
    assert mixed.dtype == mixed.sam_dtype == torch.float32
    assert mixed.sam_encoder_dtype == torch.bfloat16
    # None (the default) and the model's own dtype change nothing.
    same = load_lisa(CKPT, dtype="float32", encoder_dtype="float32")
    assert _dtypes(same) == {torch.float32}


def test_boundaries_are_cast(models):
    _, mixed = models
    clip_in = torch.zeros(1, 3, mixed.clip_image_size, mixed.clip_image_size)
    sam_in = torch.zeros(1, 3, mixed.sam_image_size, mixed.sam_image_size)
    with torch.inference_mode():
        assert mixed.encode_clip(clip_in).dtype == torch.float32
        assert mixed.encode_sam(sam_in).dtype == torch.float32


def test_bf16_encoder_masks_agree_with_fp32(models):
    """Measured on this fixture (fast path, 3 images): IoU 0.998-0.999 with the fp32 masks,
    largest logit difference well above float32 noise (bfloat16 did run)."""
    fp32, mixed = models
    ref, low = LisaPredictor(fp32), LisaPredictor(mixed)
    largest_diff = 0.0
    for name in IMAGES:
        rgb = read_rgb(REFERENCE_DIR / "inputs" / name)
        ref.set_image(rgb)
        low.set_image(rgb)
        a = ref.predict(QUERY, mode="segment")
        b = low.predict(QUERY, mode="segment")
        assert a.masks.shape == b.masks.shape == (1, *rgb.shape[:2])
        assert 0.01 < a.masks.mean() < 0.99, name  # a mask with an edge: IoU means something
        iou = np.logical_and(a.masks, b.masks).sum() / np.logical_or(a.masks, b.masks).sum()
        assert iou > 0.99, (name, iou)
        largest_diff = max(largest_diff, float(np.abs(a.logits - b.logits).max()))
    assert largest_diff > 1e-3  # the encoders really computed in bfloat16


def test_segment_cli_encoder_dtype_and_the_emulation_note(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(options, "native_bf16", lambda device: False)
    argv = ["--model", str(CKPT), "--image", str(REFERENCE_DIR / "inputs" / "img0.png"),
            "--query", QUERY, "--mode", "segment", "--out", str(tmp_path)]  # fmt: skip
    assert segment_main([*argv, "--encoder-dtype", "bfloat16"]) == 0
    captured = capsys.readouterr()
    notes = [line for line in captured.err.splitlines() if line.startswith("note:")]
    assert len(notes) == 1 and "emulated" in notes[0] and "slower" in notes[0]
    assert "1 mask(s)" in captured.out
    assert segment_main(argv) == 0  # float32 everywhere: nothing to note
    assert "note:" not in capsys.readouterr().err
