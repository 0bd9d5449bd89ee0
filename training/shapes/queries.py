"""Queries of a reasoning-shapes scene, with their targets computed from the scene.

From a scene (:mod:`training.shapes.scene`) :func:`make_queries` computes queries of the paper's
kinds: explicit phrases ("the red circle"), implicit "world knowledge" and comparison phrases and
long sentences ("the object the colour of grass", "Which object here is the biggest?"),
explanations, several targets and absent targets, keeping only queries whose target set is
unambiguous. :func:`choose_json_query` picks the one query an image's ReasonSeg json holds.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from lisa_model.prompts import SEG_TOKEN
from training.shapes.scene import Scene, SceneObject
from training.shapes.vocabulary import COLOUR_THINGS, COLOURS, SHAPE_KINDS, SHAPES

QUERY_KINDS: tuple[str, ...] = ("explicit", "reasoning", "absent")
_NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight")


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
            plural = f"{colour} {SHAPE_KINDS[shape].plural}"
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
            plural = SHAPE_KINDS[shape].plural
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
            things = COLOUR_THINGS[colour]
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
        group = [f for f in self.facts if SHAPE_KINDS[f.obj.shape].rolls]
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
        for shape, kind in SHAPE_KINDS.items():
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
                winner = max(self.facts, key=lambda f: SHAPE_KINDS[f.obj.shape].corners[0])
                ok = all(
                    SHAPE_KINDS[f.obj.shape].corners[1] < SHAPE_KINDS[winner.obj.shape].corners[0]
                    for f in self.facts
                    if f is not winner
                )
            else:
                winner = min(self.facts, key=lambda f: SHAPE_KINDS[f.obj.shape].corners[1])
                ok = all(
                    SHAPE_KINDS[f.obj.shape].corners[0] > SHAPE_KINDS[winner.obj.shape].corners[1]
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
            corners = SHAPE_KINDS[winner.obj.shape].corners_text
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
            things = COLOUR_THINGS[colour]
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
        if not any(SHAPE_KINDS[s].rolls for s in shapes):
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
        scene: from :func:`~training.shapes.scene.generate_scene`.
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
    """Index of the query written to the ReasonSeg json (policy: :mod:`training.shapes.writer`)."""
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
