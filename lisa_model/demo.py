"""The embedded demo model: a small LISA trained by this project's own training code on the
synthetic reasoning-shapes data (see the README). It ships inside the package so that every tool
has a default model on a machine without a GPU or a download.
"""

from __future__ import annotations

from pathlib import Path

from lisa_model.config import CheckpointError

DEMO_MODEL_DIR = Path(__file__).resolve().parent / "data" / "demo_model"
#: The bundled example scenes (``scene_0.png`` ...) and their ``commands.json``.
EXAMPLES_DIR = Path(__file__).resolve().parent / "data" / "examples"


def demo_model_dir() -> Path:
    """Path of the embedded demo checkpoint; :class:`CheckpointError` if it is not installed."""
    if not (DEMO_MODEL_DIR / "config.json").is_file():
        raise CheckpointError(
            f"no model given and the embedded demo model is not installed at {DEMO_MODEL_DIR}; "
            "pass --model <checkpoint directory or hub id>"
        )
    return DEMO_MODEL_DIR
