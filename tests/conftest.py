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


TINY_CORPUS = [
    "the red ball is round and could roll across the table",
    "Sure, it is [SEG]. What is the blue square in this image?",
    "A chat between a curious human and an artificial intelligence assistant.",
    "Please output segmentation mask and explain why. USER: ASSISTANT:",
    "There is no purple star in this image. The green triangle has three corners.",
    "which object could a child throw to a friend while playing in the park",
]


def make_tiny_checkpoint(directory: Path, layout: str = "7b-v1", spec=None, seed: int = 0) -> Path:
    """Build a tiny LISA in code (own sentencepiece tokenizer) and save it, self-contained."""
    from lisa_model.builders import ADDED_TOKEN_LAYOUTS, ModelSpec, build_lisa
    from lisa_model.checkpoint import save_lisa
    from lisa_model.tokenizer import LisaTokenizer, train_sentencepiece

    directory.mkdir(parents=True, exist_ok=True)
    sp_path = train_sentencepiece(TINY_CORPUS * 4, 320, directory / "sp.model")
    tokenizer = LisaTokenizer.from_sentencepiece(sp_path, ADDED_TOKEN_LAYOUTS[layout])
    sp_path.unlink()
    model = build_lisa(spec or ModelSpec(), tokenizer, seed=seed)
    save_lisa(model, directory, include_vision_tower=True)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A tiny LISA checkpoint built in code (not the fixture), 7B-v1 token layout."""
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "lisa-tiny-built")
