"""How much bfloat16 changes the masks: float32 against bfloat16 image encoders and full bfloat16.

For each model, every example is answered three times, each by the same model loaded with
:func:`lisa_model.checkpoint.load_lisa` in one precision:

- ``float32``: everything in float32 (the reference);
- ``bf16 encoders``: the CLIP tower and SAM's image encoder in bfloat16, the rest float32
  (``encoder_dtype=bfloat16``);
- ``bfloat16``: the whole model in bfloat16.

It prints, per example, the IoU of each precision's final mask with the float32 mask (the
union of the answer's masks; two empty masks count as IoU 1) and the mean, and the time of each
precision (``set_image`` + ``predict`` per example; the first example is run once before, so
loading and first-call costs are not counted).

Models: the embedded demo model on the bundled examples (``lisa_model/data/examples``, trained
weights) and the equivalence fixture's checkpoint (``tests/fixtures/lisa_reference``, random
weights) on its three images and three queries. The fast path (``mode="segment"``, one mask per
command) is the default, so every precision answers the same question; ``--mode generate``
decodes answers instead (the number of masks may then differ between precisions).

On a CPU without native bfloat16 (AVX2 only) bfloat16 is emulated: the times show that cost.

    python benchmarks/dtype_agreement.py
    python benchmarks/dtype_agreement.py --quick      # one command per scene, well under a minute
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

if __package__ in (None, ""):  # run as a file: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_common import cpu_name, load_average, markdown_table, median

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "lisa_reference"
#: Precision name -> (LLM dtype, encoder dtype).
PRECISIONS: dict[str, tuple[str, str]] = {
    "float32": ("float32", "float32"),
    "bf16 encoders": ("float32", "bfloat16"),
    "bfloat16": ("bfloat16", "bfloat16"),
}
MODELS = ("demo", "fixture")


@dataclass
class Example:
    """One image and one command."""

    name: str
    image: Path
    command: str


@dataclass
class ModelResult:
    """IoUs with float32 per example and seconds per example, by precision."""

    model: str
    examples: list[str]
    iou: dict[str, list[float]] = field(default_factory=dict)
    seconds: dict[str, list[float]] = field(default_factory=dict)
    masks: dict[str, list[int]] = field(default_factory=dict)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dtype_agreement", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"from {list(MODELS)}")
    parser.add_argument("--mode", choices=("segment", "generate"), default="segment")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="with --mode generate")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    parser.add_argument(
        "--quick", action="store_true",
        help="one command per scene of the demo model, one query per fixture image (< 1 min)",
    )  # fmt: skip
    return parser


def demo_examples(quick: bool) -> list[Example]:
    from lisa_model.demo import EXAMPLES_DIR

    raw = json.loads((EXAMPLES_DIR / "commands.json").read_text())
    examples, seen = [], set()
    for i, entry in enumerate(raw):
        if quick and entry["image"] in seen:
            continue
        seen.add(entry["image"])
        name = f"{Path(entry['image']).stem}#{i}"
        examples.append(Example(name, EXAMPLES_DIR / entry["image"], entry["command"]))
    return examples


def fixture_examples(quick: bool) -> list[Example]:
    inputs = json.loads((FIXTURE / "inputs" / "inputs.json").read_text())
    queries = inputs["queries"][:1] if quick else inputs["queries"]
    return [
        Example(f"{Path(img['file']).stem}/{q['id']}", FIXTURE / "inputs" / img["file"], q["text"])
        for img in inputs["images"]
        for q in queries
    ]


def model_source(name: str) -> tuple[Path, str | None]:
    """(checkpoint directory, vision tower override) of a model name."""
    if name == "demo":
        from lisa_model.demo import demo_model_dir

        return demo_model_dir(), None
    # The fixture's CLIP stand-in lives in a hub cache under the published name.
    snapshots = FIXTURE / "hf_cache" / "models--openai--clip-vit-large-patch14" / "snapshots"
    return FIXTURE / "lisa-tiny", str(next(snapshots.iterdir()))


def read_rgb(path: Path) -> np.ndarray:
    import cv2

    bgr = cv2.imread(str(path))
    if bgr is None:
        raise FileNotFoundError(path)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def mask_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks; 1.0 when both are empty."""
    union = np.logical_or(a, b).sum()
    return 1.0 if union == 0 else float(np.logical_and(a, b).sum() / union)


def answer_all(predictor, examples: list[Example], args) -> tuple[list, list[float]]:
    """Union masks and seconds (``set_image`` + ``predict``) per example; a warm-up first."""

    def answer(ex: Example, rgb: np.ndarray):
        predictor.set_image(rgb)
        if args.mode == "segment":
            return predictor.predict(ex.command, mode="segment")
        return predictor.predict(ex.command, max_new_tokens=args.max_new_tokens)

    images = {ex.image: read_rgb(ex.image) for ex in examples}
    answer(examples[0], images[examples[0].image])  # warm-up
    masks, seconds = [], []
    for ex in examples:
        t0 = time.perf_counter()
        result = answer(ex, images[ex.image])
        seconds.append(time.perf_counter() - t0)
        union = result.masks.any(axis=0) if result.masks.shape[0] else None
        masks.append((union, result.masks.shape[0]))
    return masks, seconds


def run_model(name: str, args) -> ModelResult:
    from lisa_model.checkpoint import load_lisa
    from lisa_model.predictor import LisaPredictor

    examples = demo_examples(args.quick) if name == "demo" else fixture_examples(args.quick)
    source, tower = model_source(name)
    result = ModelResult(name, [ex.name for ex in examples])
    reference = None
    for precision, (dtype, encoder_dtype) in PRECISIONS.items():
        model = load_lisa(
            source, device="cpu", dtype=dtype, encoder_dtype=encoder_dtype, vision_tower=tower
        )
        masks, seconds = answer_all(LisaPredictor(model), examples, args)
        del model
        if reference is None:
            reference = masks
        hw = [read_rgb(ex.image).shape[:2] for ex in examples]
        result.iou[precision] = [
            mask_iou(_or_empty(m, s), _or_empty(r, s))
            for (m, _), (r, _), s in zip(masks, reference, hw, strict=True)
        ]
        result.seconds[precision] = seconds
        result.masks[precision] = [n for _, n in masks]
        print(f"  {name}: {precision} done", flush=True)
    return result


def _or_empty(mask: np.ndarray | None, hw: tuple[int, int]) -> np.ndarray:
    return np.zeros(hw, dtype=bool) if mask is None else mask


def print_result(r: ModelResult) -> None:
    names = list(PRECISIONS)[1:]
    print(f"\n### {r.model}: IoU with the float32 mask\n")
    rows = [
        [ex, *(r.iou[p][i] for p in names), *(r.masks[p][i] for p in PRECISIONS)]
        for i, ex in enumerate(r.examples)
    ]
    rows.append(["mean", *(float(np.mean(r.iou[p])) for p in names), *([""] * len(PRECISIONS))])
    headers = ["example", *(f"IoU {p}" for p in names), *(f"masks {p}" for p in PRECISIONS)]
    print(markdown_table(headers, rows))
    print(f"\n### {r.model}: seconds per example (set_image + predict)\n")
    base = median(r.seconds["float32"])
    rows = [[p, median(s) * 1e3, sum(s) * 1e3, median(s) / base] for p, s in r.seconds.items()]
    print(markdown_table(["precision", "ms (median)", "ms (all)", "vs float32"], rows))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        print(f"unknown models {unknown}; expected some of {list(MODELS)}", file=sys.stderr)
        return 2
    import torch

    from lisa_model.options import cpu_bf16_note

    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"# dtype_agreement: {time.strftime('%Y-%m-%d %H:%M')}")
    print(f"- machine: {platform.machine()}, {cpu_name()}, load average {load_average()}")
    print(f"- torch {torch.__version__}, mode {args.mode}, CPU")
    note = cpu_bf16_note("cpu", "bfloat16")
    print(f"- note: {note}" if note else "- bfloat16: native on this CPU")
    results = []
    for name in names:
        result = run_model(name, args)
        print_result(result)
        results.append(result)
    if args.json:
        args.json.write_text(json.dumps([asdict(r) for r in results], indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
