"""The reasoning-shapes data set on disk, in the ReasonSeg layout, and ``lisa-make-shapes``.

On-disk layout written by :func:`write_dataset` (the ReasonSeg layout of the original)::

    <out>/<split>/<image_id>.jpg     RGB, JPEG quality 95, 4:4:4 chroma (ReasonSeg loaders glob
                                     *.jpg; ``image_format="png"`` writes lossless .png instead)
    <out>/<split>/<image_id>.json    {"text": [query, paraphrases...], "is_sentence": bool,
                                      "shapes": [{"label": "target", "points": [[x, y], ...]}]}
    <out>/<split>/queries.jsonl      the full query set of every image (see below)
    <out>/explanatory/<split>.json   [{"image": "<image_id>.jpg", "query": text, "outputs": why}]
    <out>/meta.json                  seed, counts, generator version, palette; written last, so a
                                     run that was interrupted has no meta.json

Point ``--dataset_dir``-style code at ``<out>`` as it would at ``.../reason_seg/ReasonSeg``.

ReasonSeg json: one json per image carries ONE target set (the union of the "target" polygons)
with 1-3 paraphrases of the same query, all short phrases or all sentences. We pick that query
(:attr:`Example.json_query`) among the scene's queries: 20% explicit phrases, 40% reasoning
phrases, 40% reasoning sentences (falling back to whatever kind exists). Several targets are
written as several polygons (the union is the mask, as in ReasonSeg). Absent-target queries are
written as a json with an empty "shapes" list (an all-zero mask) only with probability
``absent_json_rate`` (default 0); such images get no explanatory entry because the original
loader would pair the explanation with a "[SEG]" answer. No "ignore" polygons are written.

Polygons are integer pixel coordinates (x right, y down, pixel centres at integers) traced from
the object's visible mask, so rasterising them the way ReasonSeg does (``cv2.polylines`` with
thickness 1 plus ``cv2.fillPoly`` on int32 points, value 1) gives back the visible mask exactly.
Polygons cannot have holes, so a visible region with a hole (a ring, or an object with a smaller
one lying on top of it) is cut into several hole-free pieces along pixel columns.

queries.jsonl: one JSON object per line and image, in image order::

    {"image": "<image_id>.jpg", "height": H, "width": W, "background": kind,
     "objects": [{"id": k, "shape": s, "colour": c, "bbox": [x0, y0, x1, y1],
                  "area": full-shape pixels, "visible_area": visible pixels,
                  "polygons": [[[x, y], ...], ...]}],      # visible region, as in the json
     "queries": [{"texts": [...], "is_sentence": bool, "kind": "explicit"|"reasoning"|"absent",
                  "concept": name, "target_ids": [k, ...], "answer": text with one "[SEG]" per
                  target (k-th "[SEG]" = target_ids[k]), "explanation": text}],
     "json_query": index into "queries" of the query written to the ReasonSeg json}

Object ids are depth order (0 = bottom-most); bbox is of the visible region, in pixels, with
x1/y1 exclusive. Images are addressed as ``<split>_<index:06d>``; each one's random stream comes
from ``(seed, split, index)`` (:func:`example_rng`), so changing one split's count leaves the
other splits' images unchanged and any image can be regenerated in memory (:func:`make_example`).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import cv2
import numpy as np

from training.shapes.queries import Query, choose_json_query, make_queries
from training.shapes.scene import Scene, ShapesConfig, generate_scene, render_scene
from training.shapes.vocabulary import BACKGROUND_TONES, PALETTE, SHAPES

GENERATOR_VERSION = "1"
SPLITS: tuple[str, ...] = ("train", "val", "test")
#: The per-split file holding every query of every image (see the module docstring).
SIDECAR_FILE = "queries.jsonl"


@dataclass(frozen=True, eq=False)
class Example:
    """One image of the data set as written: scene, composited image, queries, json query."""

    image_id: str
    scene: Scene
    image: np.ndarray  # (H, W, 3) uint8 RGB
    queries: tuple[Query, ...]
    json_query: int  # index into queries of the one written to the ReasonSeg json


@dataclass(frozen=True)
class DatasetSummary:
    """What :func:`write_dataset` wrote."""

    out_dir: Path
    counts: dict[str, int]
    num_queries: dict[str, int]
    seconds: float


# --------------------------------------------------------------------------------------------
# Masks <-> ReasonSeg polygons


def _holes(component: np.ndarray) -> np.ndarray:
    """Background pixels of a (h, w) uint8 0/1 mask not 4-connected to the outside."""
    padded = np.pad(1 - component, 1, constant_values=1).astype(np.uint8)
    flood = np.zeros((padded.shape[0] + 2, padded.shape[1] + 2), dtype=np.uint8)
    cv2.floodFill(padded, flood, (0, 0), 2, flags=4)
    return padded[1:-1, 1:-1] == 1


def mask_to_polygons(mask: np.ndarray) -> list[np.ndarray]:
    """Hole-free polygons whose ReasonSeg rasterisation gives back ``mask`` exactly.

    Args:
        mask: (H, W) bool or 0/1 array in the image frame.

    Returns:
        List of (N, 2) int32 (x, y) polygons (pixel centres at integers). Drawing each with
        ``cv2.polylines(thickness=1)`` and ``cv2.fillPoly`` (value 1) reproduces the mask; a
        region with holes is cut into pieces along pixel columns through the holes.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask_to_polygons: expected an (H, W) mask, got shape {mask.shape}")
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return []
    y0, x0 = int(ys.min()), int(xs.min())
    crop = (mask[y0 : int(ys.max()) + 1, x0 : int(xs.max()) + 1] != 0).astype(np.uint8)
    polygons: list[np.ndarray] = []
    pieces = [crop]
    while pieces:
        piece = pieces.pop()
        n, labels = cv2.connectedComponents(piece, connectivity=8)
        for k in range(1, n):
            comp = (labels == k).astype(np.uint8)
            holes = _holes(comp)
            if holes.any():
                n_h, hole_labels = cv2.connectedComponents(holes.astype(np.uint8), connectivity=4)
                hx = np.nonzero(hole_labels == 1)[1]
                cut = (int(hx.min()) + int(hx.max())) // 2  # a column that crosses the hole
                left, right = comp.copy(), comp.copy()
                left[:, cut:] = 0
                right[:, :cut] = 0
                pieces.extend([left, right])
                continue
            contours, _ = cv2.findContours(comp, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
            for contour in contours:
                polygons.append(contour.reshape(-1, 2).astype(np.int32) + (x0, y0))
    polygons.sort(key=lambda p: (int(p[:, 1].min()), int(p[:, 0].min()), len(p)))
    return polygons


# --------------------------------------------------------------------------------------------
# Data set on disk


def example_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream of image ``index`` of ``split`` in a data set made with ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    return np.random.default_rng(np.random.SeedSequence([seed, SPLITS.index(split), index]))


def make_example(
    seed: int,
    split: str,
    index: int,
    *,
    config: ShapesConfig | None = None,
    absent_json_rate: float = 0.0,
) -> Example:
    """Image ``index`` of ``split`` exactly as :func:`write_dataset` writes it (in memory)."""
    rng = example_rng(seed, split, index)
    scene = generate_scene(rng, config=config)
    queries = make_queries(scene, rng)
    chosen = choose_json_query(queries, rng, absent_json_rate)
    return Example(f"{split}_{index:06d}", scene, render_scene(scene), tuple(queries), chosen)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _encode_image(image: np.ndarray, image_format: str, jpeg_quality: int) -> bytes:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    if image_format == "jpg":
        params = [
            cv2.IMWRITE_JPEG_QUALITY,
            jpeg_quality,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR,
            cv2.IMWRITE_JPEG_SAMPLING_FACTOR_444,
        ]
        ok, buf = cv2.imencode(".jpg", bgr, params)
    else:
        ok, buf = cv2.imencode(".png", bgr, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    if not ok:
        raise RuntimeError(f"could not encode a {image.shape} image as {image_format}")
    return buf.tobytes()


def _clean_output(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"output path {out} exists and is not a directory")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise FileExistsError(
            f"output directory {out} is not empty; pass --force (force=True) to overwrite"
        )
    (out / "meta.json").unlink(missing_ok=True)  # first, so a half-cleaned dir reads incomplete
    for sub in (*SPLITS, "explanatory"):
        folder = out / sub
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and path.suffix in (".jpg", ".png", ".json", ".jsonl", ".tmp"):
                    path.unlink()


@dataclass(frozen=True)
class _Job:
    seed: int
    split: str
    index: int
    config: ShapesConfig
    absent_json_rate: float
    image_format: str
    jpeg_quality: int


@dataclass(frozen=True)
class _ExampleFiles:
    """The encoded files of one image, built in a worker and written by the parent."""

    image_name: str
    image_bytes: bytes
    json_name: str
    json_text: str
    explanatory: dict[str, str] | None  # None for an absent-target json query
    sidecar_line: str
    num_queries: int


def _example_files(job: _Job) -> _ExampleFiles:
    ex = make_example(
        job.seed, job.split, job.index, config=job.config, absent_json_rate=job.absent_json_rate
    )
    file_name = f"{ex.image_id}.{job.image_format}"
    polygons = [mask_to_polygons(o.visible) for o in ex.scene.objects]
    query = ex.queries[ex.json_query]
    shapes = [
        {"label": "target", "points": poly.tolist()}
        for k in query.target_ids
        for poly in polygons[k]
    ]
    record = {"text": list(query.texts), "is_sentence": query.is_sentence, "shapes": shapes}
    explanatory = None
    if query.kind != "absent":
        explanatory = {"image": file_name, "query": query.text, "outputs": query.explanation}
    return _ExampleFiles(
        image_name=file_name,
        image_bytes=_encode_image(ex.image, job.image_format, job.jpeg_quality),
        json_name=f"{ex.image_id}.json",
        json_text=json.dumps(record),
        explanatory=explanatory,
        sidecar_line=json.dumps(_sidecar_record(ex, file_name, polygons)),
        num_queries=len(ex.queries),
    )


def write_dataset(
    out_dir: str | Path,
    counts: Mapping[str, int],
    seed: int = 0,
    *,
    force: bool = False,
    image_format: str = "jpg",
    jpeg_quality: int = 95,
    absent_json_rate: float = 0.0,
    config: ShapesConfig | None = None,
    workers: int = 1,
    progress: bool = False,
) -> DatasetSummary:
    """Write the data set in the ReasonSeg layout (see the module docstring).

    Args:
        out_dir: output directory; must be missing or empty unless ``force``.
        counts: images per split, keys from SPLITS, e.g. ``{"train": 2000, "val": 200}``.
        seed: data set seed; image i of a split depends only on (seed, split, i).
        force: overwrite: removes meta.json and the generated file types in the split folders.
        image_format: "jpg" (what ReasonSeg loaders read) or "png" (lossless).
        jpeg_quality: 1-100.
        absent_json_rate: probability that an image's ReasonSeg json holds an absent query.
        config: scene settings.
        workers: processes generating images (the files do not depend on it).
        progress: show a tqdm progress bar.
    """
    out = Path(out_dir)
    for split, n in counts.items():
        if split not in SPLITS:
            raise ValueError(f"counts: unknown split {split!r}; expected one of {SPLITS}")
        if int(n) < 0:
            raise ValueError(f"counts[{split!r}] must be >= 0, got {n}")
    if image_format not in ("jpg", "png"):
        raise ValueError(f"image_format must be 'jpg' or 'png', got {image_format!r}")
    if not 1 <= jpeg_quality <= 100:
        raise ValueError(f"jpeg_quality must be in 1..100, got {jpeg_quality}")
    if not 0.0 <= absent_json_rate <= 1.0:
        raise ValueError(f"absent_json_rate must be in [0, 1], got {absent_json_rate}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    cfg = config or ShapesConfig()
    _clean_output(out, force)
    out.mkdir(parents=True, exist_ok=True)

    from tqdm import tqdm

    start = time.perf_counter()
    num_queries: dict[str, int] = {}
    total = sum(int(n) for n in counts.values())
    pool = None
    if workers > 1:  # spawn: safe even when the caller has threads (torch, tqdm) running
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    bar = tqdm(total=total, desc="shapes", unit="img", disable=not progress)
    try:
        for split in SPLITS:
            n_images = int(counts.get(split, 0))
            if n_images == 0:
                continue
            split_dir = out / split
            split_dir.mkdir(exist_ok=True)
            jobs = [
                _Job(seed, split, i, cfg, absent_json_rate, image_format, jpeg_quality)
                for i in range(n_images)
            ]
            results = (
                pool.map(_example_files, jobs, chunksize=8) if pool else map(_example_files, jobs)
            )
            explanatory, lines, n_queries = [], [], 0
            for files in results:  # in image order
                (split_dir / files.image_name).write_bytes(files.image_bytes)
                (split_dir / files.json_name).write_text(files.json_text, encoding="utf-8")
                if files.explanatory is not None:
                    explanatory.append(files.explanatory)
                lines.append(files.sidecar_line)
                n_queries += files.num_queries
                bar.update(1)
            _write_atomic(split_dir / SIDECAR_FILE, ("\n".join(lines) + "\n").encode())
            (out / "explanatory").mkdir(exist_ok=True)
            _write_atomic(
                out / "explanatory" / f"{split}.json", json.dumps(explanatory, indent=1).encode()
            )
            num_queries[split] = n_queries
    finally:
        bar.close()
        if pool is not None:
            pool.shutdown(cancel_futures=True)
    seconds = time.perf_counter() - start
    meta = {
        "generator": "training.shapes",
        "version": GENERATOR_VERSION,
        "seed": int(seed),
        "counts": {s: int(counts.get(s, 0)) for s in SPLITS},
        "num_queries": num_queries,
        "image_format": image_format,
        "jpeg_quality": jpeg_quality if image_format == "jpg" else None,
        "absent_json_rate": absent_json_rate,
        "palette": {k: list(v) for k, v in PALETTE.items()},
        "shapes": list(SHAPES),
        "background_tones": {k: list(v) for k, v in BACKGROUND_TONES.items()},
        "config": asdict(cfg),
    }
    _write_atomic(out / "meta.json", json.dumps(meta, indent=1).encode())
    return DatasetSummary(out, dict(meta["counts"]), num_queries, seconds)


def _sidecar_record(ex: Example, file_name: str, polygons: list[list[np.ndarray]]) -> dict:
    objects = []
    for obj, polys in zip(ex.scene.objects, polygons, strict=True):
        objects.append(
            {
                "id": obj.object_id,
                "shape": obj.shape,
                "colour": obj.colour,
                "bbox": list(obj.bbox),
                "area": obj.area,
                "visible_area": obj.visible_area,
                "polygons": [p.tolist() for p in polys],
            }
        )
    queries = [
        {
            "texts": list(q.texts),
            "is_sentence": q.is_sentence,
            "kind": q.kind,
            "concept": q.concept,
            "target_ids": list(q.target_ids),
            "answer": q.answer,
            "explanation": q.explanation,
        }
        for q in ex.queries
    ]
    return {
        "image": file_name,
        "height": ex.scene.height,
        "width": ex.scene.width,
        "background": ex.scene.background_kind,
        "objects": objects,
        "queries": queries,
        "json_query": ex.json_query,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``lisa-make-shapes``: write the synthetic reasoning-shapes data set."""
    parser = argparse.ArgumentParser(
        prog="lisa-make-shapes",
        description="Write the synthetic 'reasoning shapes' data set in the ReasonSeg layout.",
    )
    parser.add_argument("--out", required=True, type=Path, help="output directory")
    parser.add_argument("--train", type=int, default=2000, help="training images")
    parser.add_argument("--val", type=int, default=200, help="validation images")
    parser.add_argument("--test", type=int, default=200, help="test images")
    parser.add_argument("--seed", type=int, default=0, help="data set seed")
    parser.add_argument("--force", action="store_true", help="overwrite a non-empty --out")
    parser.add_argument(
        "--image-format",
        choices=("jpg", "png"),
        default="jpg",
        help="jpg is what ReasonSeg loaders read",
    )
    parser.add_argument("--jpeg-quality", type=int, default=95)
    parser.add_argument(
        "--absent-json-rate",
        type=float,
        default=0.0,
        help="probability of an absent-target query in an image's json",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=min(4, os.cpu_count() or 1),
        help="generating processes (output does not depend on it; default: min(4, CPUs))",
    )
    parser.add_argument(
        "--objects",
        type=int,
        nargs=2,
        metavar=("MIN", "MAX"),
        default=(ShapesConfig.min_objects, ShapesConfig.max_objects),
        help="objects per scene (default: %(default)s)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    try:
        config = ShapesConfig(min_objects=args.objects[0], max_objects=args.objects[1])
        summary = write_dataset(
            args.out,
            {"train": args.train, "val": args.val, "test": args.test},
            args.seed,
            force=args.force,
            image_format=args.image_format,
            jpeg_quality=args.jpeg_quality,
            absent_json_rate=args.absent_json_rate,
            config=config,
            workers=args.workers,
            progress=not args.no_progress,
        )
    except (FileExistsError, NotADirectoryError, ValueError) as err:
        print(f"lisa-make-shapes: error: {err}", file=sys.stderr)
        return 2
    counts = ", ".join(f"{k} {v}" for k, v in summary.counts.items())
    print(
        f"wrote {sum(summary.counts.values())} images ({counts}) with "
        f"{sum(summary.num_queries.values())} queries to {summary.out_dir} "
        f"in {summary.seconds:.1f} s"
    )
    return 0
