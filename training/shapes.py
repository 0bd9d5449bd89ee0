"""Synthetic "reasoning shapes" data: coloured shapes on textured backgrounds, with queries.

Deterministic from a seed, no downloads. Each scene holds 2-6 flat-coloured shapes (circle, ring,
square, rectangle, triangle, hexagon, star, cross) in a fixed palette of 8 named colours, drawn in
depth order over a plain, gradient, striped or noise background whose tones keep every object
colour used in the scene clearly visible. From the scene we compute queries of the paper's kinds
(explicit phrases, implicit "world knowledge" / comparison phrases and long sentences,
explanations, several targets, absent targets) with their target objects, keeping only queries
whose target set is unambiguous.

On-disk layout written by :func:`write_dataset` (the ReasonSeg layout, see LISA_REFERENCE.md 5)::

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

GENERATOR_VERSION = "1"
SPLITS: tuple[str, ...] = ("train", "val", "test")
SEG_TOKEN = "[SEG]"

# Fixed palette (RGB). Every pair differs by CIE76 Delta-E >= 39, so names are unambiguous.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (40, 160, 55),
    "blue": (30, 95, 220),
    "yellow": (245, 215, 35),
    "orange": (245, 130, 20),
    "purple": (150, 45, 180),
    "white": (250, 250, 250),
    "black": (20, 20, 20),
}
COLOURS: tuple[str, ...] = tuple(PALETTE)

# Muted background tones (RGB); a scene only uses object colours far enough from its tones.
BACKGROUND_TONES: dict[str, tuple[int, int, int]] = {
    "sand": (205, 190, 155),
    "slate": (95, 110, 125),
    "grey": (140, 140, 140),
    "sage": (150, 165, 135),
    "rose": (190, 150, 155),
    "teal": (85, 130, 130),
    "charcoal": (65, 65, 70),
    "cream": (230, 225, 205),
    "steel": (165, 180, 195),
    "umber": (125, 100, 75),
    "light grey": (195, 195, 195),
}
BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "stripes", "noise")
QUERY_KINDS: tuple[str, ...] = ("explicit", "reasoning", "absent")

_SUPERSAMPLE = 4  # anti-aliasing: objects are rasterised at 4x and box-filtered
_SUBPIXEL_SHIFT = 4  # fixed-point bits for cv2.fillPoly at the supersampled scale
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


@dataclass(frozen=True)
class _ShapeKind:
    """What the query generator knows about a shape (its "world knowledge")."""

    plural: str
    corners: tuple[int, int]  # (fewest, most) a person could count: a star has 5 tips/10 corners
    corners_text: str
    rolls: bool
    with_phrases: tuple[str, ...]  # "the shape with {...}"
    like_phrases: tuple[str, ...]  # "the object shaped like {...}"
    reason: str  # "A triangle has three sides and three corners"


_SHAPE_KINDS: dict[str, _ShapeKind] = {
    "circle": _ShapeKind(
        plural="circles",
        corners=(0, 0),
        corners_text="no corners at all",
        rolls=True,
        with_phrases=("a solid round outline and no hole", "no corners and no hole in it"),
        like_phrases=("a coin", "a full moon"),
        reason="A circle is perfectly round and solid, like a coin or a full moon",
    ),
    "ring": _ShapeKind(
        plural="rings",
        corners=(0, 0),
        corners_text="no corners at all",
        rolls=True,
        with_phrases=("a hole in the middle", "a round hole through its centre"),
        like_phrases=("a donut", "a lifebuoy"),
        reason="A ring is round with a hole in the middle, like a donut",
    ),
    "square": _ShapeKind(
        plural="squares",
        corners=(4, 4),
        corners_text="4 corners",
        rolls=False,
        with_phrases=("four equal sides", "four sides of the same length"),
        like_phrases=("a chessboard square", "a sticky note"),
        reason="A square has four sides of the same length",
    ),
    "rectangle": _ShapeKind(
        plural="rectangles",
        corners=(4, 4),
        corners_text="4 corners",
        rolls=False,
        with_phrases=("two long sides and two short sides",),
        like_phrases=("a door", "a brick"),
        reason="A rectangle has two long sides and two short sides, like a door or a brick",
    ),
    "triangle": _ShapeKind(
        plural="triangles",
        corners=(3, 3),
        corners_text="3 corners",
        rolls=False,
        with_phrases=("three sides", "three corners"),
        like_phrases=("a yield sign", "a musical triangle"),
        reason="A triangle has three sides and three corners",
    ),
    "hexagon": _ShapeKind(
        plural="hexagons",
        corners=(6, 6),
        corners_text="6 corners",
        rolls=False,
        with_phrases=("six sides", "six corners"),
        like_phrases=("a honeycomb cell", "the nut on a bolt"),
        reason="A hexagon has six sides, like a cell of a honeycomb",
    ),
    "star": _ShapeKind(
        plural="stars",
        corners=(5, 10),
        corners_text="5 points and 10 corners",
        rolls=False,
        with_phrases=("five pointed tips", "five sharp points"),
        like_phrases=("a starfish", "a sheriff's badge"),
        reason="A star has five sharp points",
    ),
    "cross": _ShapeKind(
        plural="crosses",
        corners=(8, 12),
        corners_text="12 corners",
        rolls=False,
        with_phrases=("four arms of the same length",),
        like_phrases=("a plus sign", "a first-aid symbol"),
        reason="A cross has four arms of the same length, like a plus sign",
    ),
}
SHAPES: tuple[str, ...] = tuple(_SHAPE_KINDS)


def corner_range(shape: str) -> tuple[int, int]:
    """``(fewest, most)`` corners a person could count on ``shape`` (a star: 5 tips, 10 corners),
    as the corner queries compare them."""
    return _SHAPE_KINDS[shape].corners


# Things whose colour everyone knows, for the "colour of ..." queries.
_COLOUR_THINGS: dict[str, tuple[str, ...]] = {
    "red": ("a ripe strawberry", "a fire truck", "a ripe tomato"),
    "green": ("grass", "fresh leaves", "a frog"),
    "blue": ("a clear sky", "the sky on a sunny day", "the ocean"),
    "yellow": ("a banana", "a lemon", "a rubber duck"),
    "orange": ("a carrot", "a pumpkin", "an orange"),
    "purple": ("lavender flowers", "an aubergine", "an amethyst"),
    "white": ("fresh snow", "milk", "a swan"),
    "black": ("coal", "a crow", "a panther"),
}


@dataclass(frozen=True)
class ShapesConfig:
    """Scene generation settings (sizes in pixels)."""

    min_side: int = 160  # image height and width are drawn independently in [min_side, max_side]
    max_side: int = 320
    min_objects: int = 2
    max_objects: int = 6
    min_radius_frac: float = 0.08  # object radius as a fraction of the shorter image side
    max_radius_frac: float = 0.2
    min_radius_px: float = 11.0
    overlap_prob: float = 0.3  # chance that a new object may overlap the ones already placed
    gap_px: int = 2  # separation kept when no overlap is allowed, and between same-colour objects
    min_visible_frac: float = 0.7  # an object keeps >= this fraction of its area visible
    min_visible_px: int = 120
    min_contrast: float = 48.0  # CIE76 Delta-E between object colours and background tones
    placement_tries: int = 25
    scene_tries: int = 50

    def __post_init__(self) -> None:
        if not 16 <= self.min_side <= self.max_side:
            raise ValueError(
                f"ShapesConfig: need 16 <= min_side <= max_side, got {self.min_side}, "
                f"{self.max_side}"
            )
        if not 1 <= self.min_objects <= self.max_objects:
            raise ValueError(
                f"ShapesConfig: need 1 <= min_objects <= max_objects, got {self.min_objects}, "
                f"{self.max_objects}"
            )
        if not 0 < self.min_radius_frac <= self.max_radius_frac < 0.5:
            raise ValueError(
                "ShapesConfig: need 0 < min_radius_frac <= max_radius_frac < 0.5, got "
                f"{self.min_radius_frac}, {self.max_radius_frac}"
            )
        if not 0.0 <= self.overlap_prob <= 1.0 or not 0.0 < self.min_visible_frac <= 1.0:
            raise ValueError("ShapesConfig: overlap_prob and min_visible_frac must be in [0, 1]")


@dataclass(frozen=True, eq=False)
class SceneObject:
    """One flat-coloured shape of a scene. Arrays are in the image frame, (H, W)."""

    object_id: int  # depth order: 0 is drawn first (bottom-most)
    shape: str  # one of SHAPES
    colour: str  # one of COLOURS
    center: tuple[float, float]  # (x, y) in pixels, pixel centres at integers
    radius: float  # circumradius in pixels
    angle: float  # rotation in degrees
    outline: tuple[np.ndarray, ...]  # (N, 2) float64 (x, y) contours; a ring has outer + inner
    coverage: np.ndarray  # (H, W) float32 in [0, 1]: anti-aliased fraction of each pixel covered
    mask: np.ndarray  # (H, W) bool: coverage >= 0.5 (the whole shape, ignoring occlusion)
    visible: np.ndarray  # (H, W) bool: mask minus the masks of the objects drawn above it

    @property
    def name(self) -> str:
        """E.g. "red triangle"."""
        return f"{self.colour} {self.shape}"

    @property
    def area(self) -> int:
        """Pixels of the whole shape."""
        return int(self.mask.sum())

    @property
    def visible_area(self) -> int:
        """Pixels of the visible region."""
        return int(self.visible.sum())

    @property
    def bbox(self) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1) of the visible region, x1/y1 exclusive."""
        ys, xs = np.nonzero(self.visible)
        return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


@dataclass(frozen=True, eq=False)
class Scene:
    """A generated scene: background and objects in depth order (not yet composited)."""

    height: int
    width: int
    background: np.ndarray  # (H, W, 3) uint8 RGB
    background_kind: str  # one of BACKGROUND_KINDS
    objects: tuple[SceneObject, ...]


@dataclass(frozen=True)
class Query:
    """One query of a scene with its target objects.

    ``texts[0]`` is the canonical wording, the rest are paraphrases with the same targets.
    ``target_ids`` are object ids in the order of the "[SEG]" tokens in ``answer`` (left to
    right in the image); empty for an absent target, whose answer has no "[SEG]".
    """

    texts: tuple[str, ...]
    is_sentence: bool
    kind: str  # one of QUERY_KINDS
    concept: str  # e.g. "colour_shape", "roll", "biggest_in_half"
    target_ids: tuple[int, ...]
    answer: str
    explanation: str

    def __post_init__(self) -> None:
        if not self.texts:
            raise ValueError("Query: texts must not be empty")
        if self.kind not in QUERY_KINDS:
            raise ValueError(f"Query: kind must be one of {QUERY_KINDS}, got {self.kind!r}")
        if (self.kind == "absent") != (len(self.target_ids) == 0):
            raise ValueError("Query: absent queries, and only those, have no targets")
        if self.answer.count(SEG_TOKEN) != len(self.target_ids):
            raise ValueError(
                f"Query: answer {self.answer!r} needs one {SEG_TOKEN} per target "
                f"({len(self.target_ids)})"
            )

    @property
    def text(self) -> str:
        """The canonical wording."""
        return self.texts[0]


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
# Geometry and rasterisation


def _unit_outline(shape: str, rng: np.random.Generator) -> list[np.ndarray]:
    """Contours of a shape of circumradius 1 centred at 0, each (N, 2) float64 (x, y)."""

    def polar(radii: np.ndarray, angles: np.ndarray) -> np.ndarray:
        return np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)

    if shape in ("circle", "ring"):
        angles = np.linspace(0.0, 2.0 * np.pi, 96, endpoint=False)
        outer = polar(np.ones(96), angles)
        return [outer, 0.55 * outer] if shape == "ring" else [outer]
    if shape == "square":
        return [np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], dtype=np.float64) / np.sqrt(2)]
    if shape == "rectangle":
        aspect = rng.uniform(1.7, 2.4)
        half_w, half_h = 1.0 / np.hypot(1.0, 1.0 / aspect), 1.0 / np.hypot(aspect, 1.0)
        return [
            np.array([[-half_w, -half_h], [half_w, -half_h], [half_w, half_h], [-half_w, half_h]])
        ]
    if shape == "triangle":
        return [polar(np.ones(3), np.deg2rad([-90.0, 30.0, 150.0]))]
    if shape == "hexagon":
        return [polar(np.ones(6), np.deg2rad(np.arange(6) * 60.0))]
    if shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        return [polar(radii, np.deg2rad(-90.0 + np.arange(10) * 36.0))]
    if shape == "cross":
        a, b = 0.33, 1.0  # arm half-width, arm length
        pts = [
            (-a, -b),
            (a, -b),
            (a, -a),
            (b, -a),
            (b, a),
            (a, a),
            (a, b),
            (-a, b),
            (-a, a),
            (-b, a),
            (-b, -a),
            (-a, -a),
        ]
        return [np.array(pts, dtype=np.float64)]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _outline_box(outline: Sequence[np.ndarray], height: int, width: int) -> tuple[int, ...]:
    """(y0, y1, x0, x1) pixel box (end exclusive) that holds every pixel the outline touches."""
    pts = np.concatenate(outline)
    x0 = max(int(np.floor(pts[:, 0].min())) - 1, 0)
    y0 = max(int(np.floor(pts[:, 1].min())) - 1, 0)
    x1 = min(int(np.ceil(pts[:, 0].max())) + 2, width)
    y1 = min(int(np.ceil(pts[:, 1].max())) + 2, height)
    return y0, y1, x0, x1


def _coverage(outline: Sequence[np.ndarray], box: tuple[int, ...]) -> np.ndarray:
    """Anti-aliased coverage of the region inside ``outline`` (even-odd rule, so rings work).

    Returns the (y1 - y0, x1 - x0) float32 coverage in [0, 1] of the pixels of ``box``.
    """
    y0, y1, x0, x1 = box
    h, w = y1 - y0, x1 - x0
    s = _SUPERSAMPLE
    canvas = np.zeros((h * s, w * s), dtype=np.uint8)
    # pixel k spans [k - 0.5, k + 0.5); sub-pixel m of the s-times grid has centre (m+0.5)/s - 0.5
    scale = float(1 << _SUBPIXEL_SHIFT)
    contours = [
        np.round((((c - (x0, y0)) + 0.5) * s - 0.5) * scale).astype(np.int32) for c in outline
    ]
    # each sub-pixel holds s*s when inside, so the block average is the exact sub-pixel count
    cv2.fillPoly(canvas, contours, s * s, lineType=cv2.LINE_8, shift=_SUBPIXEL_SHIFT)
    count = cv2.resize(canvas, (w, h), interpolation=cv2.INTER_AREA)
    return count.astype(np.float32) / float(s * s)


def _lab(rgb: Sequence[Sequence[float]]) -> np.ndarray:
    """(N, 3) RGB 0-255 -> (N, 3) float32 CIE Lab."""
    arr = np.asarray(rgb, dtype=np.float32).reshape(1, -1, 3) / 255.0
    return cv2.cvtColor(arr, cv2.COLOR_RGB2Lab).reshape(-1, 3)


def _make_background(
    rng: np.random.Generator, height: int, width: int
) -> tuple[np.ndarray, str, list[tuple[int, int, int]]]:
    """A background image (H, W, 3) float32 RGB, its kind and the tones it is made of."""
    names = list(BACKGROUND_TONES)
    kind = BACKGROUND_KINDS[int(rng.integers(len(BACKGROUND_KINDS)))]
    first = names[int(rng.integers(len(names)))]
    tone_a = np.array(BACKGROUND_TONES[first], dtype=np.float32)
    others = [n for n in names if n != first]
    tone_b = np.array(BACKGROUND_TONES[others[int(rng.integers(len(others)))]], dtype=np.float32)
    if kind in ("stripes", "noise"):  # textures use a calmer second tone, half way between
        tone_b = np.round((tone_a + tone_b) / 2.0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    theta = rng.uniform(0.0, np.pi)
    proj = xs * np.cos(theta) + ys * np.sin(theta)  # (H, W) distance along a random direction
    if kind == "plain":
        image = np.broadcast_to(tone_a, (height, width, 3)).astype(np.float32)
        return image, kind, [tuple(int(v) for v in tone_a)]
    if kind == "gradient":
        t = (proj - proj.min()) / max(float(proj.max() - proj.min()), 1e-6)
    elif kind == "stripes":
        period = rng.uniform(10.0, 36.0)
        wave = np.sin(2.0 * np.pi * proj / period + rng.uniform(0.0, 2.0 * np.pi))
        t = np.clip(0.5 + 1.5 * wave, 0.0, 1.0)  # soft-edged bands
    else:  # noise: low-frequency blobs plus fine grain
        cells = int(rng.integers(3, 9))
        low = rng.random((cells, cells)).astype(np.float32)
        t = cv2.resize(low, (width, height), interpolation=cv2.INTER_CUBIC)
        t = np.clip(t + rng.normal(0.0, 0.05, (height, width)).astype(np.float32), 0.0, 1.0)
    image = tone_a + t[..., None] * (tone_b - tone_a)
    tones = [tuple(int(v) for v in tone_a), tuple(int(v) for v in tone_b)]
    if kind == "noise":  # intermediate shades occur too
        tones.append(tuple(int(v) for v in (tone_a + tone_b) / 2))
    return image.astype(np.float32), kind, tones


def _visible_colours(tones: Sequence[tuple[int, int, int]], min_contrast: float) -> list[str]:
    """Palette colours at least ``min_contrast`` Delta-E away from every background tone."""
    pal = _lab([PALETTE[c] for c in COLOURS])
    bg = _lab(tones)
    dist = np.linalg.norm(pal[:, None, :] - bg[None, :, :], axis=2).min(axis=1)
    return [c for c, d in zip(COLOURS, dist, strict=True) if d >= min_contrast]


@dataclass
class _Placed:
    shape: str
    colour: str
    center: tuple[float, float]
    radius: float
    angle: float
    outline: list[np.ndarray]
    coverage: np.ndarray  # (H, W) float32
    mask: np.ndarray  # (H, W) bool
    area: int
    visible: np.ndarray | None = None  # (H, W) bool, set once placed


def _random_object(
    rng: np.random.Generator, height: int, width: int, colours: Sequence[str], cfg: ShapesConfig
) -> _Placed:
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    colour = colours[int(rng.integers(len(colours)))]
    short = min(height, width)
    radius = max(rng.uniform(cfg.min_radius_frac, cfg.max_radius_frac) * short, cfg.min_radius_px)
    angle = float(rng.uniform(0.0, 360.0)) if shape not in ("circle", "ring") else 0.0
    rot = np.deg2rad(angle)
    rmat = np.array([[np.cos(rot), -np.sin(rot)], [np.sin(rot), np.cos(rot)]])
    local = [(c @ rmat.T) * radius for c in _unit_outline(shape, rng)]
    pts = np.concatenate(local)
    lo, hi = pts.min(axis=0), pts.max(axis=0)
    # keep the whole shape 1 px inside the image
    cx = rng.uniform(1.0 - lo[0], max(width - 2.0 - hi[0], 1.0 - lo[0]))
    cy = rng.uniform(1.0 - lo[1], max(height - 2.0 - hi[1], 1.0 - lo[1]))
    outline = [c + (cx, cy) for c in local]
    y0, y1, x0, x1 = _outline_box(outline, height, width)
    coverage = np.zeros((height, width), dtype=np.float32)
    coverage[y0:y1, x0:x1] = _coverage(outline, (y0, y1, x0, x1))
    mask = coverage >= 0.5
    return _Placed(
        shape,
        colour,
        (float(cx), float(cy)),
        float(radius),
        angle,
        outline,
        coverage,
        mask,
        int(np.count_nonzero(mask)),
    )


def _single_component(mask: np.ndarray) -> bool:
    n, _ = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    return n == 2


def _try_place(
    cand: _Placed, placed: list[_Placed], allow_overlap: bool, cfg: ShapesConfig
) -> bool:
    """Add ``cand`` on top of ``placed`` if every object stays visible and recognisable."""
    if cand.area < cfg.min_visible_px:
        return False
    size = 2 * cfg.gap_px + 1
    grown = cv2.dilate(cand.mask.astype(np.uint8), np.ones((size, size), np.uint8)).astype(bool)
    new_visible = []
    for obj in placed:
        if (obj.colour == cand.colour or not allow_overlap) and (grown & obj.mask).any():
            return False
        vis = obj.visible
        if (vis & cand.mask).any():
            vis = vis & ~cand.mask
            need = max(cfg.min_visible_px, cfg.min_visible_frac * obj.area)
            if np.count_nonzero(vis) < need or not _single_component(vis):
                return False
        new_visible.append(vis)
    for obj, vis in zip(placed, new_visible, strict=True):
        obj.visible = vis
    cand.visible = cand.mask.copy()
    placed.append(cand)
    return True


def generate_scene(
    rng: np.random.Generator,
    size: tuple[int, int] | None = None,
    *,
    config: ShapesConfig | None = None,
) -> Scene:
    """Draw a random scene.

    Args:
        rng: the only source of randomness.
        size: (height, width) in pixels; drawn from [min_side, max_side] per side when None.
        config: generation settings.

    Returns:
        A scene with ``config.min_objects``..``config.max_objects`` objects whose visible masks
        are non-empty, single connected regions keeping >= ``min_visible_frac`` of their area.
    """
    cfg = config or ShapesConfig()
    if size is None:
        height = int(rng.integers(cfg.min_side, cfg.max_side + 1))
        width = int(rng.integers(cfg.min_side, cfg.max_side + 1))
    else:
        height, width = (int(v) for v in size)
        if height < 16 or width < 16:
            raise ValueError(f"generate_scene: size must be >= 16 px per side, got {size}")
    for _ in range(cfg.scene_tries):
        background, kind, tones = _make_background(rng, height, width)
        colours = _visible_colours(tones, cfg.min_contrast)
        if len(colours) < 3:
            continue
        wanted = int(rng.integers(cfg.min_objects, cfg.max_objects + 1))
        placed: list[_Placed] = []
        for _obj in range(wanted):
            allow_overlap = bool(rng.random() < cfg.overlap_prob)
            for _try in range(cfg.placement_tries):
                cand = _random_object(rng, height, width, colours, cfg)
                if _try_place(cand, placed, allow_overlap, cfg):
                    break
        if len(placed) < cfg.min_objects:
            continue
        objects = tuple(
            SceneObject(
                i,
                p.shape,
                p.colour,
                p.center,
                p.radius,
                p.angle,
                tuple(p.outline),
                p.coverage,
                p.mask,
                p.visible,
            )
            for i, p in enumerate(placed)
        )
        bg = np.clip(np.round(background), 0, 255).astype(np.uint8)
        return Scene(height, width, bg, kind, objects)
    raise RuntimeError(
        f"generate_scene: could not place {cfg.min_objects} objects in a {height}x{width} image "
        f"after {cfg.scene_tries} tries; use a larger size or smaller min_objects"
    )


def render_scene(scene: Scene) -> np.ndarray:
    """Composite the objects over the background in depth order: (H, W, 3) uint8 RGB."""
    image = scene.background.astype(np.float32)
    for obj in scene.objects:
        y0, y1, x0, x1 = _outline_box(obj.outline, scene.height, scene.width)
        alpha = obj.coverage[y0:y1, x0:x1, None]
        colour = np.array(PALETTE[obj.colour], dtype=np.float32)
        image[y0:y1, x0:x1] = image[y0:y1, x0:x1] * (1.0 - alpha) + colour * alpha
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


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
# Queries


@dataclass(frozen=True)
class _Facts:
    """Measurements of one object used to decide which queries are unambiguous."""

    obj: SceneObject
    visible_area: int
    area: int
    outer_area: float  # area inside the outer outline (a ring's hole counts): how big it looks
    cx: float  # centroid of the visible region
    cy: float
    top: int  # extreme rows/columns of the visible region
    bottom: int
    left: int
    right: int


def _facts(obj: SceneObject) -> _Facts:
    ys, xs = np.nonzero(obj.visible)
    outer_area = float(obj.area)
    if obj.outline:
        x, y = obj.outline[0][:, 0], obj.outline[0][:, 1]
        outer_area = 0.5 * abs(float(np.dot(x, np.roll(y, 1)) - np.dot(y, np.roll(x, 1))))
    return _Facts(
        obj,
        len(xs),
        obj.area,
        outer_area,
        float(xs.mean()),
        float(ys.mean()),
        int(ys.min()),
        int(ys.max()),
        int(xs.min()),
        int(xs.max()),
    )


def _join(items: Sequence[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _capital(text: str) -> str:
    return text[:1].upper() + text[1:]


def _edge_distance(f: _Facts, side: str) -> tuple[float, float]:
    """(extreme pixel, centroid) of the visible region, ordered so smaller = nearer ``side``."""
    if side == "top":
        return f.top, f.cy
    if side == "bottom":
        return -f.bottom, -f.cy
    if side == "left":
        return f.left, f.cx
    return -f.right, -f.cx


_EDGE_WORDS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "top": (
        ("the object closest to the top", "the highest object", "the object nearest the top edge"),
        (
            "Which object is closest to the top edge of the picture?",
            "If this picture were a shelf, which object would be sitting highest?",
        ),
    ),
    "bottom": (
        (
            "the object closest to the bottom",
            "the lowest object",
            "the object nearest the bottom edge",
        ),
        (
            "Which object is closest to the bottom edge of the picture?",
            "Which object sits lowest in the picture?",
        ),
    ),
    "left": (
        (
            "the leftmost object",
            "the object closest to the left edge",
            "the object furthest to the left",
        ),
        (
            "Reading the picture from left to right, which object would you come across first?",
            "Which object is closest to the left edge of the picture?",
        ),
    ),
    "right": (
        (
            "the rightmost object",
            "the object closest to the right edge",
            "the object furthest to the right",
        ),
        (
            "Reading the picture from left to right, which object would you come across last?",
            "Which object is closest to the right edge of the picture?",
        ),
    ),
}


class _QueryBuilder:
    """Collects the queries of one scene; every add_* call checks unambiguity first."""

    def __init__(self, scene: Scene, rng: np.random.Generator) -> None:
        self.scene = scene
        self.rng = rng
        self.facts = [_facts(o) for o in scene.objects]
        self.queries: list[Query] = []

    # helpers ----------------------------------------------------------------------------------
    def _pick(self, options: Sequence[str], k: int = 3) -> tuple[str, ...]:
        order = self.rng.permutation(len(options))[: min(k, len(options))]
        return tuple(options[int(i)] for i in order)

    def _ordered(self, facts: Sequence[_Facts]) -> list[_Facts]:
        return sorted(facts, key=lambda f: (f.cx, f.cy))

    def _targets_text(self, facts: Sequence[_Facts], seg: bool) -> str:
        """ "the red circle [SEG], another red circle [SEG] and the blue star [SEG]"."""
        seen: set[str] = set()
        parts = []
        for f in facts:
            article = "another" if f.obj.name in seen else "the"
            seen.add(f.obj.name)
            parts.append(f"{article} {f.obj.name}" + (f" {SEG_TOKEN}" if seg else ""))
        return _join(parts)

    def _answer(self, facts: Sequence[_Facts]) -> str:
        if len(facts) == 1:
            template = ("It is the {} [SEG].", "The {} [SEG].", "Sure, it is the {} [SEG].")
            return template[int(self.rng.integers(3))].format(facts[0].obj.name)
        return f"They are {self._targets_text(facts, seg=True)}."

    def _scene_list(self) -> str:
        """ "a red circle, a blue star and an orange ring" (all objects, left to right)."""
        names = [o.obj.name for o in self._ordered(self.facts)]
        return _join([("an " if n[0] in "aeiou" else "a ") + n for n in names])

    def _add(
        self,
        kind: str,
        concept: str,
        targets: Sequence[_Facts],
        short: Sequence[str],
        long: Sequence[str],
        explanation: str,
        answer: str | None = None,
    ) -> None:
        ordered = self._ordered(targets)
        ids = tuple(f.obj.object_id for f in ordered)
        if answer is None:
            answer = self._answer(ordered)
        for options, is_sentence in ((short, False), (long, True)):
            if options:
                self.queries.append(
                    Query(
                        self._pick(options), is_sentence, kind, concept, ids, answer, explanation
                    )
                )

    def _group(self, targets: Sequence[_Facts]) -> str:
        return self._targets_text(self._ordered(targets), seg=False)

    # explicit ---------------------------------------------------------------------------------
    def add_explicit(self) -> None:
        by_name: dict[str, list[_Facts]] = {}
        by_shape: dict[str, list[_Facts]] = {}
        by_colour: dict[str, list[_Facts]] = {}
        for f in self.facts:
            by_name.setdefault(f.obj.name, []).append(f)
            by_shape.setdefault(f.obj.shape, []).append(f)
            by_colour.setdefault(f.obj.colour, []).append(f)
        for name, group in by_name.items():
            colour, shape = name.split(" ")
            plural = f"{colour} {_SHAPE_KINDS[shape].plural}"
            if len(group) == 1:
                short = (
                    f"the {name}",
                    f"the {shape} that is {colour}",
                    f"the {colour}-coloured {shape}",
                )
                why = f"It is the only object here that is both {colour} and a {shape}."
            else:
                short = (f"all the {plural}", f"every {name}", f"the {plural}")
                why = f"There are {_NUMBER_WORDS[len(group)]} {plural} here."
            self._add("explicit", "colour_shape", group, short, (), why)
        for shape, group in by_shape.items():
            plural = _SHAPE_KINDS[shape].plural
            if len(group) == 1:
                short = (f"the {shape}", f"the only {shape}")
                why = f"The {group[0].obj.name} is the only {shape} in the image."
            else:
                short = (f"all the {plural}", f"every {shape}", f"the {plural}")
                why = f"The {plural} here are {self._group(group)}."
            self._add("explicit", "shape", group, short, (), why)
        for colour, group in by_colour.items():
            if len(group) == 1:
                short = (f"the {colour} object", f"the {colour} shape", f"the only {colour} thing")
                why = f"The {group[0].obj.name} is the only {colour} object in the image."
            else:
                short = (
                    f"all the {colour} objects",
                    f"every {colour} shape",
                    f"the {colour} things",
                )
                why = f"The {colour} objects here are {self._group(group)}."
            self._add("explicit", "colour", group, short, (), why)

    # world knowledge --------------------------------------------------------------------------
    def add_colour_knowledge(self) -> None:
        for colour in COLOURS:
            group = [f for f in self.facts if f.obj.colour == colour]
            if not group:
                continue
            things = _COLOUR_THINGS[colour]
            thing = things[int(self.rng.integers(len(things)))]
            if len(group) == 1:
                short = (
                    f"the object the colour of {thing}",
                    f"the shape that has the colour of {thing}",
                    f"something coloured like {thing}",
                )
                long = (
                    f"Which object in this picture has the same colour as {thing}?",
                    f"I am looking for something that matches the colour of {thing}. "
                    "Which object should I pick?",
                    f"Find the shape whose colour reminds you of {thing}.",
                )
                why = (
                    f"The colour of {thing} is {colour}, and the {group[0].obj.name} is the "
                    f"only {colour} object here."
                )
            else:
                short = (
                    f"the objects the colour of {thing}",
                    f"all the shapes coloured like {thing}",
                    f"everything that has the colour of {thing}",
                )
                long = (
                    f"Which objects in this picture have the same colour as {thing}? "
                    "Find all of them.",
                    f"Point out every shape whose colour reminds you of {thing}.",
                )
                why = (
                    f"The colour of {thing} is {colour}, and the {colour} objects here are "
                    f"{self._group(group)}."
                )
            self._add("reasoning", "colour_knowledge", group, short, long, why)

    def add_roll(self) -> None:
        group = [f for f in self.facts if _SHAPE_KINDS[f.obj.shape].rolls]
        if not group:
            return
        if len(group) == 1:
            short = (
                "something that could roll",
                "the object that could roll",
                "the shape that would roll if pushed",
            )
            long = (
                "If I wanted to roll something across the table, which object in this "
                "picture would I pick?",
                "Which of these objects would roll away if you gave it a gentle push?",
                "I need something that can roll like a wheel. Which object should I use?",
            )
            why = (
                f"The {group[0].obj.name} is round, so it is the only object here that can "
                "roll; all the other shapes have corners."
            )
        else:
            short = (
                "the things that could roll",
                "everything that could roll",
                "all the objects that would roll if pushed",
            )
            long = (
                "Which objects in this picture could roll across a table if pushed? "
                "Find all of them.",
                "If the table tilted, which of these objects would roll away?",
            )
            why = (
                f"Round shapes roll: {self._group(group)} are round, while all the other "
                "shapes have corners."
            )
            if len(group) == len(self.facts):
                why = (
                    f"Round shapes roll, and all the objects here are round: {self._group(group)}."
                )
        self._add("reasoning", "roll", group, short, long, why)

    def add_shape_knowledge(self) -> None:
        for shape, kind in _SHAPE_KINDS.items():
            group = [f for f in self.facts if f.obj.shape == shape]
            if not group:
                continue
            with_ = kind.with_phrases[int(self.rng.integers(len(kind.with_phrases)))]
            like = kind.like_phrases[int(self.rng.integers(len(kind.like_phrases)))]
            if len(group) == 1:
                short = (
                    f"the shape with {with_}",
                    f"the object shaped like {like}",
                    f"the thing that looks like {like}",
                )
                long = (
                    f"Which object in this picture has {with_}?",
                    f"Which object here is shaped like {like}?",
                    f"If you had to pick the object that looks most like {like}, which one "
                    "would it be?",
                )
                why = f"{kind.reason}, and the {group[0].obj.name} is the only {shape} here."
            else:
                short = (f"the shapes with {with_}", f"all the objects shaped like {like}")
                long = (
                    f"Which objects in this picture have {with_}? Find all of them.",
                    f"Point out every object that is shaped like {like}.",
                )
                why = f"{kind.reason}; the {kind.plural} here are {self._group(group)}."
            self._add("reasoning", "shape_knowledge", group, short, long, why)

    def add_corners(self) -> None:
        for most in (True, False):
            if most:  # the winner's fewest-count beats everyone's most-count, so no doubt
                winner = max(self.facts, key=lambda f: _SHAPE_KINDS[f.obj.shape].corners[0])
                ok = all(
                    _SHAPE_KINDS[f.obj.shape].corners[1]
                    < _SHAPE_KINDS[winner.obj.shape].corners[0]
                    for f in self.facts
                    if f is not winner
                )
            else:
                winner = min(self.facts, key=lambda f: _SHAPE_KINDS[f.obj.shape].corners[1])
                ok = all(
                    _SHAPE_KINDS[f.obj.shape].corners[0]
                    > _SHAPE_KINDS[winner.obj.shape].corners[1]
                    for f in self.facts
                    if f is not winner
                )
            if not ok:
                continue
            word = "most" if most else "fewest"
            short = (
                f"the object with the {word} corners",
                f"the shape with the {'largest' if most else 'smallest'} number of corners",
            )
            long = (
                f"If you counted the corners of every shape in this picture, which one would "
                f"have the {word}?",
                f"Which object here has the {word} corners?",
            )
            corners = _SHAPE_KINDS[winner.obj.shape].corners_text
            why = (
                f"The {winner.obj.name} has {corners}, {'more' if most else 'fewer'} than any "
                "other shape here."
            )
            self._add(
                "reasoning",
                "most_corners" if most else "fewest_corners",
                [winner],
                short,
                long,
                why,
            )

    # comparison -------------------------------------------------------------------------------
    def _size_winner(self, facts: Sequence[_Facts], biggest: bool) -> _Facts | None:
        """The clearly biggest (smallest) object, or None.

        Clearly: ahead by >= 1.25x in visible area, whole-shape area and outer-outline area
        alike (a ring looks as big as its outline, hole included).
        """
        if len(facts) < 2:
            return None
        winners = set()
        for attr in ("visible_area", "area", "outer_area"):
            ranked = sorted(facts, key=lambda f: getattr(f, attr), reverse=biggest)
            first, second = getattr(ranked[0], attr), getattr(ranked[1], attr)
            big, small = (first, second) if biggest else (second, first)
            if big < 1.25 * small:
                return None
            winners.add(ranked[0].obj.object_id)
        return ranked[0] if len(winners) == 1 else None

    def add_size(self) -> None:
        for biggest in (True, False):
            winner = self._size_winner(self.facts, biggest)
            if winner is None:
                continue
            if biggest:
                short = (
                    "the biggest object",
                    "the largest shape",
                    "the object that takes up the most space",
                )
                long = (
                    "Which object in this picture takes up the most space?",
                    "If you had to pick the largest shape in the picture, which one would it be?",
                )
                why = f"The {winner.obj.name} covers more of the picture than any other object."
            else:
                short = (
                    "the smallest object",
                    "the tiniest shape",
                    "the object that takes up the least space",
                )
                long = (
                    "Which object in this picture is the smallest?",
                    "If you had to pick the tiniest shape in the picture, which one would it be?",
                )
                why = f"The {winner.obj.name} is smaller than every other object in the picture."
            self._add(
                "reasoning", "biggest" if biggest else "smallest", [winner], short, long, why
            )

    def add_size_in_half(self) -> None:
        band = 0.08
        halves = (
            ("left", "on the left", lambda f: f.cx, self.scene.width, True),
            ("right", "on the right", lambda f: f.cx, self.scene.width, False),
            ("top", "at the top", lambda f: f.cy, self.scene.height, True),
            ("bottom", "at the bottom", lambda f: f.cy, self.scene.height, False),
        )
        for side, on_side, coord, extent, low in halves:
            mid = extent / 2.0
            if any(abs(coord(f) - mid) < band * extent for f in self.facts):
                continue  # some object straddles the middle: "on the left" would be unclear
            members = [f for f in self.facts if (coord(f) < mid) == low]
            for biggest in (True, False):
                winner = self._size_winner(members, biggest)
                if winner is None:
                    continue
                word, adj = ("biggest", "largest") if biggest else ("smallest", "tiniest")
                short = (f"the {word} thing {on_side}", f"the {adj} object in the {side} half")
                long = (
                    f"Looking only at the {side} half of the picture, which object is the {word}?",
                    f"Among the objects {on_side} of the picture, which one is the {adj}?",
                )
                why = (
                    f"{_capital(on_side)} of the picture there are {self._group(members)}; "
                    f"the {winner.obj.name} is the {word} of them."
                )
                concept = "biggest_in_half" if biggest else "smallest_in_half"
                self._add("reasoning", concept, [winner], short, long, why)

    def add_extreme_position(self) -> None:
        for side, (short, long) in _EDGE_WORDS.items():
            extent = self.scene.height if side in ("top", "bottom") else self.scene.width
            ranked = sorted(self.facts, key=lambda f: _edge_distance(f, side)[0])
            winner, second = ranked[0], ranked[1]
            edge, centre = _edge_distance(winner, side)
            if _edge_distance(second, side)[0] - edge < max(4.0, 0.05 * extent):
                continue
            if any(_edge_distance(f, side)[1] <= centre for f in ranked[1:]):
                continue  # the closest edge and the closest centre must be the same object
            why = f"The {winner.obj.name} reaches closer to the {side} edge than any other object."
            self._add("reasoning", f"closest_to_{side}", [winner], short, long, why)

    # absent -----------------------------------------------------------------------------------
    def add_absent(self) -> None:
        present = {f.obj.name for f in self.facts}
        colours = sorted({f.obj.colour for f in self.facts})
        shapes = sorted({f.obj.shape for f in self.facts})
        # an explicit distractor that shares its colour or its shape with something present
        options = [
            f"{c} {s}"
            for c in COLOURS
            for s in SHAPES
            if f"{c} {s}" not in present and (c in colours or s in shapes)
        ]
        name = options[int(self.rng.integers(len(options)))]
        scene_list = self._scene_list()
        self._add(
            "absent",
            "colour_shape",
            [],
            (f"the {name}", f"the {name.split(' ')[1]} that is {name.split(' ')[0]}"),
            (
                f"Can you find the {name} in this picture?",
                f"Please show me where the {name} is in this picture.",
            ),
            f"I can see {scene_list}, but no {name}.",
            answer=f"There is no {name} in this image.",
        )
        missing = [c for c in COLOURS if c not in colours]
        if missing:
            colour = missing[int(self.rng.integers(len(missing)))]
            things = _COLOUR_THINGS[colour]
            thing = things[int(self.rng.integers(len(things)))]
            self._add(
                "absent",
                "colour_knowledge",
                [],
                (f"the object the colour of {thing}", f"something coloured like {thing}"),
                (f"Which object in this picture has the same colour as {thing}?",),
                f"The colour of {thing} is {colour}, but I can see only {scene_list}.",
                answer=f"There is nothing the colour of {thing} in this image.",
            )
        if not any(_SHAPE_KINDS[s].rolls for s in shapes):
            self._add(
                "absent",
                "roll",
                [],
                ("something that could roll", "the object that could roll"),
                (
                    "If I wanted to roll something across the table, which object in this picture "
                    "would I pick?",
                ),
                f"Only round things roll, and all the objects here ({scene_list}) have corners.",
                answer="Nothing in this image could roll.",
            )


def make_queries(scene: Scene, rng: np.random.Generator) -> list[Query]:
    """All unambiguous queries of a scene (explicit, reasoning, absent; short and long).

    Args:
        scene: from :func:`generate_scene`.
        rng: chooses wordings, paraphrases and distractors.

    Returns:
        Queries in a fixed concept order; each has its targets computed from the scene.
    """
    builder = _QueryBuilder(scene, rng)
    builder.add_explicit()
    builder.add_colour_knowledge()
    builder.add_roll()
    builder.add_shape_knowledge()
    builder.add_corners()
    builder.add_size()
    builder.add_size_in_half()
    builder.add_extreme_position()
    builder.add_absent()
    return builder.queries


def choose_json_query(
    queries: Sequence[Query], rng: np.random.Generator, absent_json_rate: float = 0.0
) -> int:
    """Index of the query written to the ReasonSeg json (policy in the module docstring)."""
    absent = [i for i, q in enumerate(queries) if q.kind == "absent"]
    if absent and rng.random() < absent_json_rate:
        return absent[int(rng.integers(len(absent)))]
    groups = [
        [i for i, q in enumerate(queries) if q.kind == "explicit"],
        [i for i, q in enumerate(queries) if q.kind == "reasoning" and not q.is_sentence],
        [i for i, q in enumerate(queries) if q.kind == "reasoning" and q.is_sentence],
    ]
    weights = np.array([0.2, 0.4, 0.4]) * np.array([len(g) > 0 for g in groups])
    if weights.sum() == 0:
        raise ValueError("choose_json_query: no query with a target")
    group = groups[int(rng.choice(3, p=weights / weights.sum()))]
    return group[int(rng.integers(len(group)))]


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
            _write_atomic(split_dir / "queries.jsonl", ("\n".join(lines) + "\n").encode())
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


if __name__ == "__main__":
    sys.exit(main())
