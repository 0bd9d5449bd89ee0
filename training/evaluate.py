"""``lisa-eval``: gIoU / cIoU of a model on ReasonSeg or refCOCO/+/g, as the paper reports them.

Two ways to answer, both scored exactly as the original's validation (``SegMetrics``):

- segment-only (default): one teacher-forced forward per image with the answer ``"[SEG]."``
  for each of its queries (the original ``validate``), one mask per query;
- ``--generate``: the robot's path, greedy decoding with the predictor; the prediction of a query
  is the union of the masks of all ``[SEG]`` it emits (empty when it emits none).

ReasonSeg results are broken down by ``is_sentence`` into short (phrases), long (sentences) and
overall, like the paper's Table 1. Beside gIoU / cIoU it counts the "not found" mistakes: a
present target the model said it could not find (no ``[SEG]`` on the generation path, an empty
mask on the segment path), and an absent target (an all-background ground truth) for which it
found something. A JSON report and a picture of the worst and best cases are written.

Example::

    lisa-eval --model xinlai/LISA-7B-v1 --data /data/reason_seg/ReasonSeg --split val \\
        --device cuda --out runs/eval/reason_seg_val.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lisa_model.cli.common import UserError, add_model_arguments, load_model_from_args, run_cli
from lisa_model.metrics import SegMetrics, intersection_and_union
from lisa_model.modeling import LisaModel
from training.data.types import DataFormatError, Sample

REFER_DATASETS = ("refclef", "refcoco", "refcoco+", "refcocog")


@dataclass
class CaseResult:
    """One query of one image: its IoU (foreground class) and what was asked."""

    index: int  # sample (image) index in the dataset
    query: int  # query index within the sample
    image_path: str
    text: str
    is_sentence: bool
    iou: float
    found: bool = True
    answer: str = ""
    target_present: bool = True  # the ground truth has a foreground pixel


@dataclass
class EvalReport:
    """Everything ``lisa-eval`` measured (``asdict`` gives the JSON report)."""

    model: str
    data: str
    split: str
    path: str
    overall: dict[str, float]
    short: dict[str, float] | None
    long: dict[str, float] | None
    seconds: float
    cases: list[CaseResult] = field(default_factory=list)
    not_found: dict[str, dict[str, int]] = field(default_factory=dict)


def not_found_counts(cases: Iterable[CaseResult]) -> dict[str, int]:
    """The "not found" mistakes among ``cases``.

    Returns:
        ``present``: cases whose target is in the image; ``missed``: of those, how many the
        model said it could not find; ``absent``: cases without a target; ``false_found``: of
        those, how many it found something for.
    """
    counts = {"present": 0, "missed": 0, "absent": 0, "false_found": 0}
    for case in cases:
        if case.target_present:
            counts["present"] += 1
            counts["missed"] += not case.found
        else:
            counts["absent"] += 1
            counts["false_found"] += case.found
    return counts


def question_text(question: str) -> str:
    """The user text of a dataset question: ``"<image>\\n What is x?"`` -> ``"What is x?"``."""
    return question.replace("<image>", "", 1).strip()


def _case_iou(pred: torch.Tensor, target: torch.Tensor) -> float:
    """Foreground IoU of one ``(H, W)`` prediction as the original counts it (1 if both empty)."""
    iu = intersection_and_union(pred, target)
    inter, union = float(iu.intersection[1]), float(iu.union[1])
    return 1.0 if union == 0 else inter / (union + 1e-5)


@torch.inference_mode()
def predict_segment_only(model: LisaModel, collator, sample: Sample) -> torch.Tensor:
    """Teacher-forced masks of every query of ``sample``: ``(N, H, W)`` float32 logits."""
    batch = collator([sample]).to(model.device)
    out = model(
        images_clip=batch.images_clip,
        images_sam=batch.images_sam,
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        offsets=batch.offsets,
        resize_sizes=batch.resize_sizes,
        original_sizes=batch.original_sizes,
    )
    return out.pred_masks[0].float().cpu()


def predict_generate(
    predictor, sample: Sample, max_new_tokens: int
) -> tuple[torch.Tensor, list[bool], list[str]]:
    """Generated masks (union per query) ``(N, H, W)`` bool, whether each found something, and
    the answers."""
    predictor.set_image(sample.image)
    preds, found, answers = [], [], []
    for rounds in sample.conversations:
        result = predictor.predict(
            question_text(rounds[0][0]), max_new_tokens=max_new_tokens, raw_prompt=True
        )
        preds.append(torch.from_numpy(result.union_mask))
        found.append(result.found)
        answers.append(result.text)
    return torch.stack(preds), found, answers


def predict_sample(
    model: LisaModel, sample: Sample, collator, predictor, max_new_tokens: int
) -> tuple[torch.Tensor, list[bool], list[str]]:
    """``(N, H, W)`` bool predictions of every query of ``sample``, found flags and answers.

    With a ``predictor`` the generation path, else the teacher-forced segment-only path.
    """
    if predictor is not None:
        return predict_generate(predictor, sample, max_new_tokens)
    pred = predict_segment_only(model, collator, sample) > 0
    found = pred.flatten(1).any(dim=1).tolist()  # an empty mask is this path's "not found"
    return pred, found, [""] * len(pred)


def make_collator(model: LisaModel):
    """The validation collator matching ``model`` (no truncation, its prompt format)."""
    from training.collate import Collator

    return Collator(
        model.tokenizer,
        template=model.config.conv_template,
        use_im_start_end=model.config.use_im_start_end,
        num_image_tokens=model.num_image_tokens,
        inference=True,
        sam_image_size=model.sam_image_size,
    )


def evaluate(
    model: LisaModel,
    samples: Iterable[Sample],
    *,
    generate: bool = False,
    max_new_tokens: int = 64,
    progress: bool = True,
    total: int | None = None,
) -> tuple[dict[str, SegMetrics], list[CaseResult]]:
    """Score ``model`` on validation ``samples`` (one image and its queries each).

    Returns:
        ``{"overall", "short", "long"}`` metrics (short/long split by ``Sample.is_sentence``)
        and one :class:`CaseResult` per query.
    """
    from tqdm import tqdm

    from lisa_model.predictor import LisaPredictor

    collator = make_collator(model)
    predictor = LisaPredictor(model) if generate else None
    metrics = {k: SegMetrics() for k in ("overall", "short", "long")}
    cases: list[CaseResult] = []
    bar = tqdm(samples, total=total, disable=not progress, desc="lisa-eval", unit="img")
    for index, sample in enumerate(bar):
        targets = torch.from_numpy(sample.metric_targets())
        pred, found, answers = predict_sample(model, sample, collator, predictor, max_new_tokens)
        metrics["overall"].update(pred, targets)
        metrics["long" if sample.is_sentence else "short"].update(pred, targets)
        for i, text in enumerate(sample.texts[: len(pred)]):
            cases.append(
                CaseResult(
                    index=index,
                    query=i,
                    image_path=sample.image_path,
                    text=text,
                    is_sentence=sample.is_sentence,
                    iou=_case_iou(pred[i], targets[i]),
                    found=found[i],
                    answer=answers[i],
                    target_present=bool((targets[i] == 1).any()),
                )
            )
    return metrics, cases


def open_dataset(data: str | Path, split: str, dataset: str = "auto", split_by: str | None = None):
    """The validation dataset at ``data``: a ReasonSeg folder (``data/<split>/*.json``) or a
    REFER root (``data/<dataset>/refs(<split_by>).p``) with ``dataset`` one of refCOCO/+/g/CLEF.
    """
    from training.data.reason_seg import ReasonSegValDataset
    from training.data.refer_seg import ReferSegValDataset

    root = Path(data)
    if not root.is_dir():
        raise UserError(f"--data {root}: no such directory")
    if dataset == "auto":
        dataset = "reason_seg"
        for name in REFER_DATASETS:
            if (root / name).is_dir() and not (root / split).is_dir():
                names = "|".join(REFER_DATASETS)
                raise UserError(f"--data {root} holds REFER datasets: pass --dataset {names}")
    try:
        if dataset == "reason_seg":
            if not (root / split).is_dir():
                raise UserError(
                    f"--data {root}: no '{split}' folder; expected a ReasonSeg directory "
                    f"with {split}/<image>.jpg + <image>.json"
                )
            ds = ReasonSegValDataset(root, split)
        elif dataset in REFER_DATASETS:
            ds = ReferSegValDataset(root, dataset, split, split_by)
        else:
            raise UserError(f"--dataset {dataset}: expected reason_seg or one of {REFER_DATASETS}")
    except DataFormatError as exc:
        raise UserError(str(exc)) from None
    if len(ds) == 0:
        raise UserError(f"--data {root}: no samples in split {split!r}")
    return ds


def cases_picture(
    model: LisaModel,
    dataset,
    cases: Sequence[CaseResult],
    *,
    generate: bool = False,
    max_new_tokens: int = 64,
    count: int = 6,
) -> np.ndarray:
    """A grid of the ``count`` worst and best cases, re-predicted: prediction tinted, ground
    truth outlined in green, the query and its IoU written on each."""
    import cv2

    from lisa_model.predictor import LisaPredictor
    from lisa_model.visualize import annotate, contact_sheet, overlay

    ranked = sorted(cases, key=lambda c: c.iou)
    chosen = ranked if len(ranked) <= 2 * count else ranked[:count] + ranked[-count:]
    collator = make_collator(model)
    predictor = LisaPredictor(model) if generate else None
    images, labels = [], []
    for case in chosen:
        sample = dataset[case.index]
        pred, _, _ = predict_sample(model, sample, collator, predictor, max_new_tokens)
        picture = overlay(sample.image, pred[case.query].numpy()[None])
        gt = (sample.masks[case.query] > 0).astype(np.uint8)
        contours, _ = cv2.findContours(gt, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
        cv2.drawContours(picture, contours, -1, (0, 255, 0), 2)
        images.append(annotate(picture, case.text))
        labels.append(f"IoU {case.iou:.2f}")
    return contact_sheet(images, columns=min(4, max(1, len(images))), labels=labels)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lisa-eval",
        description="gIoU/cIoU of a LISA model on ReasonSeg or refCOCO/+/g (paper metrics).",
    )
    add_model_arguments(parser)
    parser.add_argument("--data", required=True, help="ReasonSeg folder or REFER root")
    parser.add_argument("--split", default="val", help="val | test | testA | testB | ...")
    parser.add_argument(
        "--dataset",
        default="auto",
        help="reason_seg (auto-detected) or refclef/refcoco/refcoco+/refcocog",
    )
    parser.add_argument("--split-by", default=None, help="REFER split-by (default: umd/unc)")
    parser.add_argument("--generate", action="store_true", help="score the generation path")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--limit", type=int, default=None, help="only the first N images")
    parser.add_argument("--out", type=Path, default=Path("lisa_eval/report.json"))
    parser.add_argument("--no-progress", action="store_true")
    return parser


def run(args: argparse.Namespace) -> int:
    if args.limit is not None and args.limit < 1:
        raise UserError(f"--limit must be >= 1, got {args.limit}")
    dataset = open_dataset(args.data, args.split, args.dataset, args.split_by)
    model = load_model_from_args(args)
    n = len(dataset) if args.limit is None else min(args.limit, len(dataset))

    def samples() -> Iterable[Sample]:
        for i in range(n):
            try:
                yield dataset[i]
            except DataFormatError as exc:
                raise UserError(str(exc)) from None

    start = time.perf_counter()
    metrics, cases = evaluate(
        model,
        samples(),
        generate=args.generate,
        max_new_tokens=args.max_new_tokens,
        progress=not args.no_progress,
        total=n,
    )
    seconds = time.perf_counter() - start
    is_reason = args.dataset in ("auto", "reason_seg")
    report = EvalReport(
        model=str(args.model or "embedded demo model"),
        data=str(args.data),
        split=args.split,
        path="generate" if args.generate else "segment",
        overall=metrics["overall"].summary(),
        short=metrics["short"].summary() if is_reason else None,
        long=metrics["long"].summary() if is_reason else None,
        seconds=seconds,
        cases=cases,
        not_found={
            "overall": not_found_counts(cases),
            **(
                {
                    "short": not_found_counts(c for c in cases if not c.is_sentence),
                    "long": not_found_counts(c for c in cases if c.is_sentence),
                }
                if is_reason
                else {}
            ),
        },
    )
    out: Path = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(format_summary(report))
    import cv2

    picture = cases_picture(
        model, dataset, cases, generate=args.generate, max_new_tokens=args.max_new_tokens
    )
    picture_path = out.with_name(out.stem + "_cases.png")
    cv2.imwrite(str(picture_path), cv2.cvtColor(picture, cv2.COLOR_RGB2BGR))
    print(f"report: {out}\npicture (worst and best cases): {picture_path}")
    return 0


def format_summary(report: EvalReport) -> str:
    """The table ``lisa-eval`` prints: gIoU, cIoU, queries and the "not found" mistakes
    (``missed``: said not found on a present target; ``false found``: found something for an
    absent one; each as ``count/of``)."""
    rows = [("overall", report.overall)]
    if report.short is not None:
        rows += [("short", report.short), ("long", report.long)]
    lines = [f"{report.data} [{report.split}] ({report.path} path, {report.seconds:.1f} s)"]
    lines.append(
        f"{'':10s} {'gIoU':>7s} {'cIoU':>7s} {'queries':>8s} {'missed':>9s} {'false found':>11s}"
    )
    for name, summary in rows:
        counts = report.not_found.get(name)
        missed = f"{counts['missed']}/{counts['present']}" if counts else "-"
        false_found = f"{counts['false_found']}/{counts['absent']}" if counts else "-"
        lines.append(
            f"{name:10s} {summary['giou']:7.4f} {summary['ciou']:7.4f} "
            f"{int(summary['num_masks']):8d} {missed:>9s} {false_found:>11s}"
        )
    lines.append(
        "missed: said 'not found' on a present target; false found: found something for an "
        "absent target (empty ground truth)"
    )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    return run_cli(build_parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
