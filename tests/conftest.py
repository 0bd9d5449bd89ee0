"""Shared test fixtures and paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

TESTS_DIR = Path(__file__).resolve().parent
REFERENCE_DIR = TESTS_DIR / "fixtures" / "lisa_reference"

# Tests never touch the network. The reference fixture ships a hub cache holding the tiny CLIP
# stand-in under its published name, as a user with a warm cache and no network would have it.
# huggingface_hub reads these at import, so they are set before any test module imports it.
os.environ["HF_HUB_CACHE"] = str(REFERENCE_DIR / "hf_cache")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    """The original implementation's tiny checkpoint and outputs (see its README.md)."""
    return REFERENCE_DIR


def read_rgb(path: Path):
    """An image file as (H, W, 3) uint8 RGB, read as the original chat.py reads it."""
    import cv2

    bgr = cv2.imread(str(path))
    assert bgr is not None, path
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="session")
def reference_model():
    """The reference fixture's tiny checkpoint loaded through load_lisa, fp32 on CPU."""
    from lisa_model.checkpoint import load_lisa

    return load_lisa(REFERENCE_DIR / "lisa-tiny", device="cpu", dtype="float32")
