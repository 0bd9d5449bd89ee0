"""The vocabulary of the reasoning-shapes world: colours, background tones, shapes and what
everyone knows about them.

The scene generator (:mod:`training.shapes.scene`) draws from the palette and the shapes; the
query generator (:mod:`training.shapes.queries`) turns the "world knowledge" below into
reasoning queries ("the object the colour of grass", "the shape with six sides", "something that
could roll").
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ShapeKind:
    """What the query generator knows about a shape (its "world knowledge")."""

    plural: str
    corners: tuple[int, int]  # (fewest, most) a person could count: a star has 5 tips/10 corners
    corners_text: str
    rolls: bool
    with_phrases: tuple[str, ...]  # "the shape with {...}"
    like_phrases: tuple[str, ...]  # "the object shaped like {...}"
    reason: str  # "A triangle has three sides and three corners"


SHAPE_KINDS: dict[str, ShapeKind] = {
    "circle": ShapeKind(
        plural="circles",
        corners=(0, 0),
        corners_text="no corners at all",
        rolls=True,
        with_phrases=("a solid round outline and no hole", "no corners and no hole in it"),
        like_phrases=("a coin", "a full moon"),
        reason="A circle is perfectly round and solid, like a coin or a full moon",
    ),
    "ring": ShapeKind(
        plural="rings",
        corners=(0, 0),
        corners_text="no corners at all",
        rolls=True,
        with_phrases=("a hole in the middle", "a round hole through its centre"),
        like_phrases=("a donut", "a lifebuoy"),
        reason="A ring is round with a hole in the middle, like a donut",
    ),
    "square": ShapeKind(
        plural="squares",
        corners=(4, 4),
        corners_text="4 corners",
        rolls=False,
        with_phrases=("four equal sides", "four sides of the same length"),
        like_phrases=("a chessboard square", "a sticky note"),
        reason="A square has four sides of the same length",
    ),
    "rectangle": ShapeKind(
        plural="rectangles",
        corners=(4, 4),
        corners_text="4 corners",
        rolls=False,
        with_phrases=("two long sides and two short sides",),
        like_phrases=("a door", "a brick"),
        reason="A rectangle has two long sides and two short sides, like a door or a brick",
    ),
    "triangle": ShapeKind(
        plural="triangles",
        corners=(3, 3),
        corners_text="3 corners",
        rolls=False,
        with_phrases=("three sides", "three corners"),
        like_phrases=("a yield sign", "a musical triangle"),
        reason="A triangle has three sides and three corners",
    ),
    "hexagon": ShapeKind(
        plural="hexagons",
        corners=(6, 6),
        corners_text="6 corners",
        rolls=False,
        with_phrases=("six sides", "six corners"),
        like_phrases=("a honeycomb cell", "the nut on a bolt"),
        reason="A hexagon has six sides, like a cell of a honeycomb",
    ),
    "star": ShapeKind(
        plural="stars",
        corners=(5, 10),
        corners_text="5 points and 10 corners",
        rolls=False,
        with_phrases=("five pointed tips", "five sharp points"),
        like_phrases=("a starfish", "a sheriff's badge"),
        reason="A star has five sharp points",
    ),
    "cross": ShapeKind(
        plural="crosses",
        corners=(8, 12),
        corners_text="12 corners",
        rolls=False,
        with_phrases=("four arms of the same length",),
        like_phrases=("a plus sign", "a first-aid symbol"),
        reason="A cross has four arms of the same length, like a plus sign",
    ),
}
SHAPES: tuple[str, ...] = tuple(SHAPE_KINDS)


def corner_range(shape: str) -> tuple[int, int]:
    """``(fewest, most)`` corners a person could count on ``shape`` (a star: 5 tips, 10 corners),
    as the corner queries compare them."""
    return SHAPE_KINDS[shape].corners


# Things whose colour everyone knows, for the "colour of ..." queries.
COLOUR_THINGS: dict[str, tuple[str, ...]] = {
    "red": ("a ripe strawberry", "a fire truck", "a ripe tomato"),
    "green": ("grass", "fresh leaves", "a frog"),
    "blue": ("a clear sky", "the sky on a sunny day", "the ocean"),
    "yellow": ("a banana", "a lemon", "a rubber duck"),
    "orange": ("a carrot", "a pumpkin", "an orange"),
    "purple": ("lavender flowers", "an aubergine", "an amethyst"),
    "white": ("fresh snow", "milk", "a swan"),
    "black": ("coal", "a crow", "a panther"),
}
