"""The example scenes bundled with the package (``lisa_model/data/examples``): held-out scenes
of the demo data with one command per query group (:func:`write_examples`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from training.shapes.scene import ShapesConfig
from training.shapes.writer import Example, make_example

#: Scenes of the bundled examples: test-split images of the data seed 0 (never trained on).
EXAMPLE_SCENES = (0, 1, 2, 3, 4, 5)
#: Scene settings of the demo data (``make demo-model``: ``lisa-make-shapes --objects 2 4``).
DEMO_SCENES = ShapesConfig(min_objects=2, max_objects=4)


def _example_commands(example: Example, rng: np.random.Generator) -> list[dict]:
    """One command per query group the scene has: explicit, reasoning phrase, reasoning
    sentence, absent; the first present one also asks for an explanation."""
    picked: list[dict] = []
    for group in ("explicit", "reasoning phrase", "reasoning sentence", "absent"):
        pool = [
            q
            for q in example.queries
            if (q.kind == "absent" and group == "absent")
            or (q.kind == "explicit" and group == "explicit")
            or (
                q.kind == "reasoning"
                and group == f"reasoning {'sentence' if q.is_sentence else 'phrase'}"
            )
        ]
        if pool:
            q = pool[int(rng.integers(len(pool)))]
            picked.append({"command": q.text, "expected": q.answer})
    if picked:
        picked[0]["explain"] = True
    return picked


def write_examples(out_dir: str | Path, seed: int = 0, scenes: Sequence[int] = EXAMPLE_SCENES):
    """Write the bundled example scenes (``scene_<k>.png``) and ``commands.json``.

    The scenes are images of the test split of the demo data set made with ``seed``
    (:data:`DEMO_SCENES`); each gets one
    command per query group (``expected`` is the generator's answer, for the reader).
    """
    import cv2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    commands = []
    for k, index in enumerate(scenes):
        example = make_example(seed, "test", index, config=DEMO_SCENES)
        name = f"scene_{k}.png"
        ok, png = cv2.imencode(".png", cv2.cvtColor(example.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"could not encode {name}")
        (out / name).write_bytes(png.tobytes())
        rng = np.random.default_rng([seed, index])
        commands += [{"image": name, **c} for c in _example_commands(example, rng)]
    (out / "commands.json").write_text(json.dumps(commands, indent=1) + "\n")
    return out / "commands.json"
