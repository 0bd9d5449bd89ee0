"""``lisa-demo``: the main job on the embedded default — bundled scenes, bundled commands.

Runs a model (default: the embedded demo model) over the example scenes shipped with the
package, prints each command and answer, and writes one overlay per command plus a contact
sheet to look at. ``make demo`` runs exactly this.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from lisa_model.cli.common import (
    UserError,
    add_encoder_dtype_argument,
    add_model_arguments,
    load_model_from_args,
    read_rgb_image,
    run_cli,
)
from lisa_model.demo import EXAMPLES_DIR


@dataclass
class DemoCommand:
    image: str
    command: str
    explain: bool = False


def read_commands(path: Path) -> list[DemoCommand]:
    """``commands.json``: ``[{"image": "scene_0.png", "command": "...", "explain": false}]``."""
    try:
        raw = json.loads(path.read_text())
        return [
            DemoCommand(str(c["image"]), str(c["command"]), bool(c.get("explain"))) for c in raw
        ]
    except FileNotFoundError:
        raise UserError(f"--examples {path.parent}: no commands.json") from None
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise UserError(
            f"{path}: expected a list of {{image, command, explain}} objects ({exc})"
        ) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-demo",
        description="Run LISA on the bundled example scenes and commands; write overlays.",
    )
    add_model_arguments(parser)
    add_encoder_dtype_argument(parser)
    parser.add_argument("--examples", type=Path, default=EXAMPLES_DIR, help="scenes + commands")
    parser.add_argument("--out", type=Path, default=Path("demo_out"), help="output directory")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    return parser


def run(args: argparse.Namespace) -> int:
    import cv2

    from lisa_model.predictor import LisaPredictor
    from lisa_model.visualize import annotate, contact_sheet, overlay

    commands = read_commands(args.examples / "commands.json")
    model = load_model_from_args(args)
    predictor = LisaPredictor(model)
    args.out.mkdir(parents=True, exist_ok=True)
    pictures, labels = [], []
    current = None
    rgb = None
    for i, cmd in enumerate(commands):
        if cmd.image != current:
            rgb = read_rgb_image(args.examples / cmd.image)
            predictor.set_image(rgb)
            current = cmd.image
        start = time.perf_counter()
        result = predictor.predict(cmd.command, explain=cmd.explain,
                                   max_new_tokens=args.max_new_tokens)  # fmt: skip
        ms = 1000 * (time.perf_counter() - start)
        found = f"{result.masks.shape[0]} mask(s)" if result.found else "not found"
        print(f"[{cmd.image}] {cmd.command!r}\n    -> {result.text!r} ({found}, {ms:.0f} ms)")
        picture = annotate(overlay(rgb, result.masks), f"> {cmd.command}\n{result.text}")
        name = f"{Path(cmd.image).stem}_{i:02d}.png"
        cv2.imwrite(str(args.out / name), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
        pictures.append(picture)
        labels.append(found)
    sheet = contact_sheet(pictures, columns=3, labels=labels)
    cv2.imwrite(str(args.out / "demo_sheet.png"), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    print(f"wrote {len(pictures)} overlays and {args.out / 'demo_sheet.png'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
