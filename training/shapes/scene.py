"""Scenes of the reasoning-shapes data: 2-6 flat-coloured shapes over a textured background.

Deterministic from a random generator, no downloads. Each scene holds shapes (circle, ring,
square, rectangle, triangle, hexagon, star, cross) in the palette's 8 named colours
(:mod:`training.shapes.vocabulary`), drawn in depth order over a plain, gradient, striped or
noise background whose tones keep every object colour used in the scene clearly visible
(:func:`generate_scene`), then composited into an image (:func:`render_scene`). Objects are
placed so that each keeps most of its area visible as one connected region, which is what the
queries and the ReasonSeg polygons describe.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import cv2
import numpy as np

from training.shapes.vocabulary import BACKGROUND_TONES, COLOURS, PALETTE, SHAPES

BACKGROUND_KINDS: tuple[str, ...] = ("plain", "gradient", "stripes", "noise")

_SUPERSAMPLE = 4  # anti-aliasing: objects are rasterised at 4x and box-filtered
_SUBPIXEL_SHIFT = 4  # fixed-point bits for cv2.fillPoly at the supersampled scale


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
