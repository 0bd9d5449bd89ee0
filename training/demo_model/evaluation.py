"""Scoring a demo model on a shapes split: the fast path per query kind, absent targets, and
the generation path the robot runs (:func:`evaluate_demo`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from lisa_model.metrics import SegMetrics
from lisa_model.modeling import LisaModel
from training.shapes.datasets import ShapesValDataset
from training.shapes.records import PRESENT_GROUPS


@dataclass
class DemoReport:
    """How a model does on a shapes split (see :func:`evaluate_demo`).

    Attributes:
        segment: teacher-forced gIoU / cIoU of each image's ReasonSeg json query (the
            original's validation: its template, answer ``"[SEG]."``), ``overall`` and per group
            (``explicit``, ``reasoning phrase``, ``reasoning sentence``) and per kind of
            ReasonSeg (``short`` phrases, ``long`` sentences).
        absent_not_found: fraction of absent-target queries whose greedy answer has no
            ``[SEG]`` (correctly "not found"), overall and per concept.
        present_found: fraction of the json (present-target) queries whose greedy answer has at
            least one ``[SEG]``.
        present_found_matched: fraction of the present-target queries of the concepts that
            also have absent queries in the split (e.g. ``colour_shape``: "the red circle") whose
            greedy answer has a ``[SEG]``, overall and per concept: the other half of
            ``absent_not_found``. A model that says "not found" to every such question scores 1
            on ``absent_not_found`` and 0 here.
        generate: gIoU / cIoU of the greedy answers' masks (union per query, empty when none)
            on the json queries: the robot's path.
        counts: number of queries behind each number.
        seconds: wall time of the evaluation.
    """

    split: str
    segment: dict[str, dict[str, float]]
    absent_not_found: dict[str, float]
    present_found: float
    generate: dict[str, float]
    counts: dict[str, int]
    seconds: float
    examples: list[dict[str, str]] = field(default_factory=list)
    present_found_matched: dict[str, float] = field(default_factory=dict)


def _summary(metrics: SegMetrics) -> dict[str, float]:
    s = metrics.summary()
    return {"giou": float(s["giou"]), "ciou": float(s["ciou"])}


@torch.inference_mode()
def evaluate_demo(
    model: LisaModel,
    data_dir: str | Path,
    split: str = "test",
    *,
    max_images: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> DemoReport:
    """Score ``model`` on a shapes split: the fast path, absent targets, the generation path.

    Args:
        model: a loaded LISA (eval mode).
        data_dir: a shapes data set; ``<data_dir>/<split>/queries.jsonl`` and the jsons.
        split: which split.
        max_images: only the first this many images (all by default).
        batch_size: images per teacher-forced forward.
        max_new_tokens: greedy decoding budget per query.
        progress: tqdm bars.

    The fast path uses :class:`ShapesValDataset` ``(json_only=True)``, which gives exactly the
    samples of :class:`~training.data.reason_seg.ReasonSegValDataset`; generation goes through
    :class:`~lisa_model.predictor.LisaPredictor` with the query phrased by
    :func:`~lisa_model.prompts.format_query`, as the robot asks it.
    """
    from tqdm import tqdm

    from lisa_model.predictor import LisaPredictor
    from training.evaluate import make_collator

    start = time.perf_counter()
    model.eval()
    present = ShapesValDataset(data_dir, split, json_only=True, max_images=max_images)
    absent = ShapesValDataset(data_dir, split, kinds=("absent",), max_images=max_images)
    collate = make_collator(model)
    groups = ("overall", "short", "long", *PRESENT_GROUPS)
    segment = {g: SegMetrics() for g in groups}
    generate = SegMetrics()
    predictor = LisaPredictor(model)
    found_present, examples = 0, []
    indices = list(range(len(present)))
    bar = tqdm(total=len(indices), desc="segment+generate", disable=not progress)
    for chunk_start in range(0, len(indices), batch_size):
        chunk = indices[chunk_start : chunk_start + batch_size]
        samples = [present[i] for i in chunk]
        batch = collate(samples)
        out = model(
            batch.images_clip, batch.images_sam, batch.input_ids, batch.offsets,
            batch.resize_sizes, batch.original_sizes, batch.attention_mask,
        )  # fmt: skip
        for i, sample, pred in zip(chunk, samples, out.pred_masks, strict=True):
            target = torch.from_numpy(sample.metric_targets())
            group = present.query(i).group
            for g in ("overall", "long" if sample.is_sentence else "short", group):
                segment[g].update(pred.float().cpu(), target)
            predictor.set_image(sample.image)
            result = predictor.predict(sample.texts[0], max_new_tokens=max_new_tokens)
            found_present += int(result.found)
            generate.update(torch.from_numpy(result.union_mask)[None], target)
            if len(examples) < 8:
                examples.append({"query": sample.texts[0], "answer": result.text})
        bar.update(len(chunk))
    bar.close()

    def answers(dataset: ShapesValDataset, desc: str) -> Iterator[tuple[int, bool]]:
        """``(item, found)`` per query of ``dataset``; each image is set on the predictor once."""
        last_image = None
        for i in tqdm(range(len(dataset)), desc=desc, disable=not progress):
            sample = dataset[i]
            if dataset.items[i][0] != last_image:
                predictor.set_image(sample.image)
                last_image = dataset.items[i][0]
            result = predictor.predict(sample.texts[0], max_new_tokens=max_new_tokens)
            if len(examples) < 16:
                examples.append({"query": sample.texts[0], "answer": result.text})
            yield i, result.found

    not_found: dict[str, list[bool]] = {}
    for i, was_found in answers(absent, "absent"):
        for key in ("overall", absent.query(i).concept):
            not_found.setdefault(key, []).append(not was_found)
    # The same concepts asked about objects that are there: without this, answering "not
    # found" to every question of an absent-capable kind would look like a perfect score.
    concepts = set(not_found) - {"overall"}
    matched = ShapesValDataset(data_dir, split, max_images=max_images, concepts=concepts)
    found: dict[str, list[bool]] = {}
    for i, was_found in answers(matched, "present, same concepts"):
        for key in ("overall", matched.query(i).concept):
            found.setdefault(key, []).append(was_found)

    counts = {f"segment {g}": m.num_masks for g, m in segment.items()}
    counts.update({f"absent {k}": len(v) for k, v in not_found.items()})
    counts.update({f"present matched {k}": len(v) for k, v in found.items()})
    return DemoReport(
        split=split,
        segment={g: _summary(m) for g, m in segment.items() if m.num_masks},
        absent_not_found={k: float(np.mean(v)) for k, v in not_found.items()},
        present_found=found_present / max(len(indices), 1),
        present_found_matched={k: float(np.mean(v)) for k, v in found.items()},
        generate=_summary(generate),
        counts=counts,
        seconds=time.perf_counter() - start,
        examples=examples,
    )
