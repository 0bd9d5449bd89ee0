"""The synthetic reasoning-shapes generator: scenes, masks, queries, ReasonSeg files, CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest

from lisa_model.prompts import SEG_TOKEN
from training.shapes.queries import Query, make_queries
from training.shapes.scene import (
    BACKGROUND_KINDS,
    Scene,
    SceneObject,
    ShapesConfig,
    generate_scene,
    render_scene,
)
from training.shapes.vocabulary import COLOUR_THINGS, COLOURS, PALETTE, SHAPE_KINDS, SHAPES
from training.shapes.writer import (
    GENERATOR_VERSION,
    Example,
    make_example,
    mask_to_polygons,
    write_dataset,
)
from training.shapes.writer import main as make_shapes_main

# ----------------------------------------------------------------------------------------------
# Independent helpers (written from the ReasonSeg format, not from the generator)


def reason_seg_mask(shapes: list[dict], height: int, width: int) -> np.ndarray:
    """The original get_mask_from_json: polygons by area (largest first), polylines + fillPoly."""
    valid = [s for s in shapes if s["label"].lower() != "flag"]
    areas = []
    for s in valid:
        tmp = np.zeros((height, width), np.uint8)
        pts = np.array([s["points"]], dtype=np.int32)
        cv2.polylines(tmp, pts, True, 1, 1)
        cv2.fillPoly(tmp, pts, 1)
        areas.append(tmp.sum())
    mask = np.zeros((height, width), np.uint8)
    for i in np.argsort(areas)[::-1]:
        s = valid[i]
        value = 255 if "ignore" in s["label"].lower() else 1
        pts = np.array([s["points"]], dtype=np.int32)
        cv2.polylines(mask, pts, True, value, 1)
        cv2.fillPoly(mask, pts, value)
    return mask


def polygons_mask(polygons: list[np.ndarray] | list[list], height: int, width: int) -> np.ndarray:
    return reason_seg_mask([{"label": "target", "points": p} for p in polygons], height, width)


SHAPE_WORD = re.compile(r"\b(circle|ring|square|rectangle|triangle|hexagon|star|cross)(?:e?s)?\b")
COLOUR_WORD = re.compile(r"\b(red|green|blue|yellow|orange|purple|white|black)\b")
THING_COLOUR = {  # what colour everyone expects these things to be
    "a ripe strawberry": "red", "a fire truck": "red", "a ripe tomato": "red",
    "grass": "green", "fresh leaves": "green", "a frog": "green",
    "a clear sky": "blue", "the sky on a sunny day": "blue", "the ocean": "blue",
    "a banana": "yellow", "a lemon": "yellow", "a rubber duck": "yellow",
    "a carrot": "orange", "a pumpkin": "orange", "an orange": "orange",
    "lavender flowers": "purple", "an aubergine": "purple", "an amethyst": "purple",
    "fresh snow": "white", "milk": "white", "a swan": "white",
    "coal": "black", "a crow": "black", "a panther": "black",
}  # fmt: skip
SHAPE_HINTS = {  # phrase in a shape-knowledge query -> the shape it means
    "solid round outline": "circle", "no corners and no hole": "circle", "a coin": "circle",
    "a full moon": "circle", "a hole in the middle": "ring", "hole through": "ring",
    "a donut": "ring", "a lifebuoy": "ring",
    "four equal sides": "square", "four sides of the same length": "square",
    "a chessboard square": "square", "a sticky note": "square",
    "two long sides and two short sides": "rectangle", "a door": "rectangle",
    "a brick": "rectangle", "three sides": "triangle", "three corners": "triangle",
    "a yield sign": "triangle", "a musical triangle": "triangle", "six sides": "hexagon",
    "six corners": "hexagon", "a honeycomb cell": "hexagon", "the nut on a bolt": "hexagon",
    "five pointed tips": "star", "five sharp points": "star", "a starfish": "star",
    "a sheriff's badge": "star", "four arms of the same length": "cross", "a plus sign": "cross",
    "a first-aid symbol": "cross",
}  # fmt: skip
CORNERS = {"circle": 0, "ring": 0, "triangle": 3, "square": 4, "rectangle": 4, "hexagon": 6}


def find_thing(text: str) -> str:
    hits = [
        t
        for t in THING_COLOUR
        if f"colour of {t}" in text
        or f"coloured like {t}" in text
        or f"colour as {t}" in text
        or f"reminds you of {t}" in text
    ]
    assert len(hits) >= 1, text
    return max(hits, key=len)


def find_shape_hint(text: str) -> str:
    shapes = {shape for phrase, shape in SHAPE_HINTS.items() if phrase in text}
    assert len(shapes) == 1, (text, shapes)
    return shapes.pop()


def centroid(mask: np.ndarray) -> tuple[float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.mean()), float(ys.mean())


def expected_targets(scene: Scene, query: Query) -> set[int] | None:
    """The objects a query must select, computed here from the scene; None if not checkable."""
    objs = scene.objects
    text = query.texts[0]
    vis = {o.object_id: int(o.visible.sum()) for o in objs}
    if query.concept in ("colour_shape", "shape", "colour"):
        colour = COLOUR_WORD.search(text)
        shape = SHAPE_WORD.search(text)
        return {
            o.object_id
            for o in objs
            if (colour is None or o.colour == colour.group(1))
            and (shape is None or o.shape == shape.group(1))
        }
    if query.concept == "colour_knowledge":
        colour = THING_COLOUR[find_thing(text)]
        return {o.object_id for o in objs if o.colour == colour}
    if query.concept == "roll":
        return {o.object_id for o in objs if o.shape in ("circle", "ring")}
    if query.concept == "shape_knowledge":
        shape = find_shape_hint(text)
        return {o.object_id for o in objs if o.shape == shape}
    if query.concept in ("biggest", "smallest"):
        pick = max if query.concept == "biggest" else min
        return {pick(vis, key=vis.get)}
    if query.concept in ("biggest_in_half", "smallest_in_half"):
        side = re.search(r"\b(left|right|top|bottom)\b", text).group(1)
        axis, low = {
            "left": (0, True),
            "right": (0, False),
            "top": (1, True),
            "bottom": (1, False),
        }[side]
        extent = scene.width if axis == 0 else scene.height
        members = [o for o in objs if (centroid(o.visible)[axis] < extent / 2) == low]
        pick = max if query.concept == "biggest_in_half" else min
        return {pick(members, key=lambda o: vis[o.object_id]).object_id}
    if query.concept.startswith("closest_to_"):
        side = query.concept.removeprefix("closest_to_")

        def edge(o: SceneObject) -> int:
            ys, xs = np.nonzero(o.visible)
            return {"top": ys.min(), "bottom": -ys.max(), "left": xs.min(), "right": -xs.max()}[
                side
            ]

        return {min(objs, key=edge).object_id}
    if query.concept in ("most_corners", "fewest_corners"):
        if any(o.shape in ("star", "cross") for o in objs):
            return None  # counts depend on how one counts; checked by the generator's ranges
        corners = {o.object_id: CORNERS[o.shape] for o in objs}
        pick = max if query.concept == "most_corners" else min
        return {pick(corners, key=corners.get)}
    raise AssertionError(f"unknown concept {query.concept}")


# ----------------------------------------------------------------------------------------------
# Scenes


@pytest.fixture(scope="module")
def examples() -> list[Example]:
    return [make_example(7, "train", i) for i in range(120)]


def test_scene_is_deterministic_from_the_rng() -> None:
    a = generate_scene(np.random.default_rng(3))
    b = generate_scene(np.random.default_rng(3))
    c = generate_scene(np.random.default_rng(4))
    assert np.array_equal(render_scene(a), render_scene(b))
    assert [(o.shape, o.colour, o.center) for o in a.objects] == [
        (o.shape, o.colour, o.center) for o in b.objects
    ]
    assert all(np.array_equal(x.visible, y.visible) for x, y in zip(a.objects, b.objects))
    assert (
        a.height != c.height
        or a.width != c.width
        or not np.array_equal(render_scene(a), render_scene(c))
    )


def test_scene_size_argument_and_config_validation() -> None:
    scene = generate_scene(np.random.default_rng(0), (180, 290))
    assert (scene.height, scene.width) == (180, 290) and scene.background.shape == (180, 290, 3)
    cfg = ShapesConfig(min_objects=5, max_objects=5)
    assert len(generate_scene(np.random.default_rng(1), (300, 300), config=cfg).objects) == 5
    with pytest.raises(ValueError, match="min_objects"):
        ShapesConfig(min_objects=4, max_objects=2)
    with pytest.raises(ValueError, match="size"):
        generate_scene(np.random.default_rng(0), (8, 200))


def test_scene_size_and_objects(examples: list[Example]) -> None:
    sizes = set()
    shapes, colours, backgrounds = set(), set(), set()
    for ex in examples:
        scene = ex.scene
        assert 160 <= scene.height <= 320 and 160 <= scene.width <= 320
        assert ex.image.shape == (scene.height, scene.width, 3) and ex.image.dtype == np.uint8
        sizes.add((scene.height, scene.width))
        backgrounds.add(scene.background_kind)
        assert 2 <= len(scene.objects) <= 6
        union = np.zeros((scene.height, scene.width), bool)
        for k, obj in enumerate(scene.objects):
            shapes.add(obj.shape)
            colours.add(obj.colour)
            assert obj.object_id == k
            assert obj.visible.shape == (scene.height, scene.width)
            assert not (obj.visible & ~obj.mask).any()  # visible part of its own shape
            assert not (obj.visible & union).any()  # visible regions are disjoint
            union |= obj.visible
            above = np.zeros_like(union)
            for top in scene.objects[k + 1 :]:
                above |= top.mask
            assert np.array_equal(obj.visible, obj.mask & ~above)  # depth order
            assert obj.visible_area >= max(120, 0.7 * obj.area) - 1e-9
            n, _ = cv2.connectedComponents(obj.visible.astype(np.uint8), connectivity=8)
            assert n == 2, "an object's visible region is one piece"
            x0, y0, x1, y1 = obj.bbox
            assert obj.visible[y0:y1, x0:x1].sum() == obj.visible_area
        # same-coloured objects never touch, so they cannot merge into one blob
        for a in scene.objects:
            for b in scene.objects:
                if a.object_id < b.object_id and a.colour == b.colour:
                    grown = cv2.dilate(a.mask.astype(np.uint8), np.ones((3, 3), np.uint8))
                    assert not (grown.astype(bool) & b.mask).any()
    assert len(sizes) > 50 and any(h != w for h, w in sizes)
    assert shapes == set(SHAPES)
    assert colours == set(COLOURS)
    assert backgrounds == set(BACKGROUND_KINDS)


def test_rendered_pixels_show_the_object_colour(examples: list[Example]) -> None:
    checked = 0
    for ex in examples[:40]:
        for obj in ex.scene.objects:
            inner = cv2.erode(obj.visible.astype(np.uint8), np.ones((3, 3), np.uint8)).astype(bool)
            pixels = ex.image[inner]
            exact = np.all(pixels == np.array(PALETTE[obj.colour]), axis=1)
            assert exact.mean() >= 0.99, (ex.image_id, obj.name, exact.mean())
            checked += 1
    assert checked > 100


def test_objects_contrast_with_the_background(examples: list[Example]) -> None:
    def lab(rgb: np.ndarray) -> np.ndarray:
        arr = rgb.reshape(1, -1, 3).astype(np.float32) / 255.0
        return cv2.cvtColor(arr, cv2.COLOR_RGB2Lab).reshape(-1, 3)

    for ex in examples[:40]:
        for obj in ex.scene.objects:
            ring = cv2.dilate(obj.mask.astype(np.uint8), np.ones((7, 7), np.uint8)).astype(bool)
            ring &= ~obj.mask
            for other in ex.scene.objects:
                ring &= ~other.mask
            if ring.sum() < 20:
                continue
            bg = lab(ex.scene.background[ring])
            fg = lab(np.array(PALETTE[obj.colour], np.uint8))
            delta = np.linalg.norm(bg - fg, axis=1)
            assert np.median(delta) >= 40, (ex.image_id, obj.name, float(np.median(delta)))


# ----------------------------------------------------------------------------------------------
# Masks and polygons


def test_polygons_reproduce_visible_masks_exactly(examples: list[Example]) -> None:
    for ex in examples[:60]:
        h, w = ex.scene.height, ex.scene.width
        for obj in ex.scene.objects:
            polygons = mask_to_polygons(obj.visible)
            assert polygons and all(p.ndim == 2 and p.shape[1] == 2 for p in polygons)
            mask = polygons_mask([p.tolist() for p in polygons], h, w)
            assert set(np.unique(mask)) <= {0, 1}
            assert np.array_equal(mask.astype(bool), obj.visible), (ex.image_id, obj.name)
            if obj.shape == "circle" and obj.visible_area == obj.area:
                assert sum(len(p) for p in polygons) >= 16  # round outlines get many vertices


def test_polygons_cut_regions_with_holes() -> None:
    rng = np.random.default_rng(0)
    masks = []
    ring = np.zeros((60, 80), np.uint8)
    cv2.circle(ring, (40, 30), 25, 1, -1)
    cv2.circle(ring, (40, 30), 12, 0, -1)
    masks.append(ring)
    nested = np.zeros((70, 70), np.uint8)  # a square with two holes, one holding an island
    nested[5:65, 5:65] = 1
    nested[10:40, 10:40] = 0
    nested[20:30, 20:30] = 1
    nested[50:55, 45:60] = 0
    masks.append(nested)
    diagonal = np.ones((9, 9), np.uint8)  # a hole only 4-connected to itself
    diagonal[4, 4] = 0
    masks.append(diagonal)
    for _ in range(30):  # random blobs with holes, spikes and islands
        noise = cv2.GaussianBlur(rng.random((50, 64)).astype(np.float32), (0, 0), 2.0)
        masks.append((noise > np.quantile(noise, 0.5)).astype(np.uint8))
    for mask in masks:
        polygons = mask_to_polygons(mask)
        rebuilt = polygons_mask([p.tolist() for p in polygons], *mask.shape)
        assert np.array_equal(rebuilt, mask)
    assert len(mask_to_polygons(ring)) >= 2  # the ring had to be cut
    assert mask_to_polygons(np.zeros((5, 5), bool)) == []
    with pytest.raises(ValueError, match=r"\(H, W\)"):
        mask_to_polygons(np.zeros((2, 3, 4), bool))


# ----------------------------------------------------------------------------------------------
# Queries


def test_query_targets_match_the_scene(examples: list[Example]) -> None:
    concepts: dict[str, int] = {}
    n_multi = n_sentences = 0
    for ex in examples:
        scene = ex.scene
        ids = {o.object_id for o in scene.objects}
        for q in ex.queries:
            concepts[f"{q.kind}:{q.concept}"] = concepts.get(f"{q.kind}:{q.concept}", 0) + 1
            assert 1 <= len(q.texts) <= 3 and len(set(q.texts)) == len(q.texts)
            assert q.answer.count(SEG_TOKEN) == len(q.target_ids)
            assert SEG_TOKEN not in q.explanation and q.explanation
            if q.kind == "absent":
                assert q.target_ids == ()
                assert re.search(r"\b(no|nothing|Nothing)\b", q.answer), q.answer
                continue
            assert q.target_ids and set(q.target_ids) <= ids
            assert len(set(q.target_ids)) == len(q.target_ids)
            xs = [centroid(scene.objects[k].visible)[0] for k in q.target_ids]
            assert xs == sorted(xs)  # [SEG] order is left to right
            n_multi += len(q.target_ids) > 1
            n_sentences += q.is_sentence
            assert not (q.kind == "explicit" and q.is_sentence)
            expected = expected_targets(scene, q)
            if expected is not None:
                assert set(q.target_ids) == expected, (ex.image_id, q)
            if q.concept in ("biggest", "smallest"):  # only clear winners are asked about
                areas = sorted(o.visible_area for o in scene.objects)
                ratio = areas[-1] / areas[-2] if q.concept == "biggest" else areas[1] / areas[0]
                assert ratio >= 1.25, (ex.image_id, q.concept, areas)
            for k in q.target_ids:  # every named target appears in the answer
                assert scene.objects[k].name in q.answer
    assert n_multi > 20 and n_sentences > 200
    for concept in (
        "explicit:colour_shape",
        "explicit:shape",
        "explicit:colour",
        "reasoning:colour_knowledge",
        "reasoning:roll",
        "reasoning:shape_knowledge",
        "reasoning:most_corners",
        "reasoning:fewest_corners",
        "reasoning:biggest",
        "reasoning:smallest",
        "reasoning:biggest_in_half",
        "reasoning:smallest_in_half",
        "reasoning:closest_to_top",
        "reasoning:closest_to_left",
        "absent:colour_shape",
        "absent:colour_knowledge",
        "absent:roll",
    ):
        assert concepts.get(concept, 0) > 0, concept


def test_absent_queries_name_nothing_in_the_scene(examples: list[Example]) -> None:
    for ex in examples:
        names = {o.name for o in ex.scene.objects}
        colours = {o.colour for o in ex.scene.objects}
        for q in ex.queries:
            if q.kind != "absent":
                continue
            if q.concept == "colour_shape":
                colour = COLOUR_WORD.search(q.texts[0]).group(1)
                shape = SHAPE_WORD.search(q.texts[0]).group(1)
                assert f"{colour} {shape}" not in names
            elif q.concept == "colour_knowledge":
                assert THING_COLOUR[find_thing(q.texts[0])] not in colours
            elif q.concept == "roll":
                assert not any(o.shape in ("circle", "ring") for o in ex.scene.objects)


def test_colour_and_shape_knowledge_tables_are_right() -> None:
    for colour, things in COLOUR_THINGS.items():
        for thing in things:
            assert THING_COLOUR[thing] == colour
    for shape, kind in SHAPE_KINDS.items():
        for phrase in kind.with_phrases + kind.like_phrases:
            assert find_shape_hint(phrase) == shape


def _object(k: int, shape: str, colour: str, mask: np.ndarray) -> SceneObject:
    cov = mask.astype(np.float32)
    x, y = centroid(mask)
    return SceneObject(k, shape, colour, (x, y), 10.0, 0.0, (), cov, mask, mask.copy())


def test_hand_made_scene_queries() -> None:
    h, w = 200, 300
    masks = []
    for draw in (
        lambda m: cv2.circle(m, (40, 60), 12, 1, -1),  # small red circle, left, top
        lambda m: cv2.rectangle(m, (60, 110), (120, 170), 1, -1),  # blue square, left, bottom
        lambda m: cv2.fillPoly(m, [np.array([[200, 40], [290, 190], [170, 190]], np.int32)], 1),
    ):
        m = np.zeros((h, w), np.uint8)
        draw(m)
        masks.append(m.astype(bool))
    objects = (
        _object(0, "circle", "red", masks[0]),
        _object(1, "square", "blue", masks[1]),
        _object(2, "triangle", "green", masks[2]),
    )
    scene = Scene(h, w, np.full((h, w, 3), 140, np.uint8), "plain", objects)
    queries = make_queries(scene, np.random.default_rng(0))
    by_concept: dict[str, set[tuple[int, ...]]] = {}
    for q in queries:
        key = q.concept
        if key.endswith("_in_half"):
            key += ":" + re.search(r"\b(left|right|top|bottom)\b", q.texts[0]).group(1)
        by_concept.setdefault(key, set()).add(q.target_ids)
    assert by_concept["biggest"] == {(2,)}
    assert by_concept["smallest"] == {(0,)}
    assert by_concept["biggest_in_half:left"] == {(1,)}  # left half: circle and square
    assert by_concept["smallest_in_half:left"] == {(0,)}
    assert by_concept["biggest_in_half:bottom"] == {(2,)}  # bottom half: square and triangle
    assert by_concept["smallest_in_half:bottom"] == {(1,)}
    assert not any(k.endswith((":top", ":right")) for k in by_concept)  # a single object there
    assert by_concept["roll"] == {(0,)}
    assert by_concept["most_corners"] == {(1,)}
    assert by_concept["fewest_corners"] == {(0,)}
    assert "closest_to_top" not in by_concept  # the triangle's tip is higher, the circle's centre
    assert by_concept["closest_to_right"] == {(2,)}
    assert by_concept["closest_to_left"] == {(0,)}
    green = [q for q in queries if q.concept == "colour_knowledge" and q.target_ids == (2,)]
    assert green and all(THING_COLOUR[find_thing(t)] == "green" for q in green for t in q.texts)
    long_roll = [q for q in queries if q.concept == "roll" and q.is_sentence]
    assert long_roll and long_roll[0].texts[0].endswith("?")
    assert "red circle" in long_roll[0].explanation
    absent = [q for q in queries if q.kind == "absent"]
    assert absent and all(q.target_ids == () and "[SEG]" not in q.answer for q in absent)
    assert {"colour_shape", "colour_knowledge"} <= {q.concept for q in absent}

    # two red objects: one multi-target query with one [SEG] per object, left to right
    masks2 = [masks[0], masks[1], masks[2]]
    objects2 = (
        _object(0, "circle", "red", masks2[0]),
        _object(1, "square", "red", masks2[1]),
        _object(2, "triangle", "green", masks2[2]),
    )
    scene2 = Scene(h, w, np.full((h, w, 3), 140, np.uint8), "plain", objects2)
    queries2 = make_queries(scene2, np.random.default_rng(0))
    reds = [q for q in queries2 if q.concept == "colour" and len(q.target_ids) > 1]
    assert reds and reds[0].target_ids == (0, 1)
    assert reds[0].texts[0] in ("all the red objects", "every red shape", "the red things")
    assert reds[0].answer.count("[SEG]") == 2
    assert reds[0].answer.index("red circle") < reds[0].answer.index("red square")


def test_query_validation() -> None:
    with pytest.raises(ValueError, match="one \\[SEG\\] per target"):
        Query(("the x",), False, "explicit", "shape", (0, 1), "It is [SEG].", "why")
    with pytest.raises(ValueError, match="absent"):
        Query(("the x",), False, "absent", "shape", (0,), "It is [SEG].", "why")
    with pytest.raises(ValueError, match="kind"):
        Query(("the x",), False, "other", "shape", (0,), "It is [SEG].", "why")


# ----------------------------------------------------------------------------------------------
# Files


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


@pytest.fixture(scope="module")
def written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("shapes") / "ds"
    summary = write_dataset(out, {"train": 12, "val": 4, "test": 3}, seed=5)
    assert summary.counts == {"train": 12, "val": 4, "test": 3}
    return out


def test_layout_and_reason_seg_jsons(written: Path) -> None:
    meta = json.loads((written / "meta.json").read_text())
    assert meta["seed"] == 5 and meta["counts"] == {"train": 12, "val": 4, "test": 3}
    assert meta["version"] == GENERATOR_VERSION and meta["palette"]["red"] == [215, 35, 35]
    for split, n in meta["counts"].items():
        folder = written / split
        assert len(list(folder.glob("*.jpg"))) == n
        jsons = sorted(folder.glob("*.json"))
        assert len(jsons) == n
        lines = (folder / "queries.jsonl").read_text().splitlines()
        assert len(lines) == n
        assert meta["num_queries"][split] == sum(len(json.loads(x)["queries"]) for x in lines)
        explanatory = json.loads((written / "explanatory" / f"{split}.json").read_text())
        assert {e["image"] for e in explanatory} == {p.with_suffix(".jpg").name for p in jsons}
        for index, (json_path, line) in enumerate(zip(jsons, lines)):
            ex = make_example(5, split, index)
            assert json_path.stem == ex.image_id
            anno = json.loads(json_path.read_text())
            assert set(anno) == {"text", "is_sentence", "shapes"}
            assert isinstance(anno["is_sentence"], bool)
            assert anno["text"] and all(isinstance(t, str) for t in anno["text"])
            image = cv2.imread(str(json_path.with_suffix(".jpg")))[:, :, ::-1]
            assert image.shape == ex.image.shape
            assert np.abs(image.astype(int) - ex.image.astype(int)).mean() < 2.0  # jpeg q95
            # the mask the ReasonSeg loader computes == the union of the targets' visible parts
            assert all(s["label"] == "target" for s in anno["shapes"])
            mask = reason_seg_mask(anno["shapes"], *image.shape[:2])
            query = ex.queries[ex.json_query]
            union = np.zeros(image.shape[:2], bool)
            for k in query.target_ids:
                union |= ex.scene.objects[k].visible
            assert union.any() and np.array_equal(mask == 1, union)
            assert anno["text"] == list(query.texts)
            assert anno["is_sentence"] == query.is_sentence
            # the sidecar carries every query and per-object polygons
            record = json.loads(line)
            assert record["image"] == f"{ex.image_id}.jpg"
            assert record["queries"][record["json_query"]]["texts"] == anno["text"]
            assert len(record["queries"]) == len(ex.queries)
            for obj, info in zip(ex.scene.objects, record["objects"]):
                assert (info["shape"], info["colour"], info["id"]) == (
                    obj.shape,
                    obj.colour,
                    obj.object_id,
                )
                rebuilt = polygons_mask(info["polygons"], *image.shape[:2]).astype(bool)
                assert np.array_equal(rebuilt, obj.visible)
            entry = next(e for e in explanatory if e["image"] == record["image"])
            assert entry["query"] == anno["text"][0] and entry["outputs"] == query.explanation


def test_json_query_mix(written: Path) -> None:
    kinds = []
    for line in (written / "train" / "queries.jsonl").read_text().splitlines():
        record = json.loads(line)
        q = record["queries"][record["json_query"]]
        kinds.append((q["kind"], q["is_sentence"]))
    assert ("reasoning", True) in kinds and ("reasoning", False) in kinds
    assert all(kind != "absent" for kind, _ in kinds)


def test_same_seed_same_files_other_seed_differs(written: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_dataset(again, {"train": 12, "val": 4, "test": 3}, seed=5, workers=2)
    a, b = _files(written), _files(again)
    assert a.keys() == b.keys()
    for name in a:
        if name.endswith(".jpg"):
            pa = cv2.imdecode(np.frombuffer(a[name], np.uint8), cv2.IMREAD_COLOR)
            pb = cv2.imdecode(np.frombuffer(b[name], np.uint8), cv2.IMREAD_COLOR)
            assert np.array_equal(pa, pb), name
        elif name != "meta.json":
            assert a[name] == b[name], name
    other = tmp_path / "other"
    write_dataset(other, {"val": 2}, seed=6)
    assert (other / "val" / "val_000000.json").read_bytes() != a["val/val_000000.json"]


def test_splits_do_not_depend_on_other_counts(written: Path, tmp_path: Path) -> None:
    out = tmp_path / "png"
    write_dataset(out, {"train": 1, "val": 2}, seed=5, image_format="png")
    assert not (out / "test").exists()
    for name in ("val_000000", "val_000001"):
        assert (out / "val" / f"{name}.json").read_bytes() == (
            written / "val" / f"{name}.json"
        ).read_bytes()
        png = cv2.imread(str(out / "val" / f"{name}.png"))[:, :, ::-1]
        assert np.array_equal(png, make_example(5, "val", int(name[-1])).image)  # lossless


def test_absent_queries_in_jsons_give_empty_masks(tmp_path: Path) -> None:
    write_dataset(tmp_path / "ds", {"val": 3}, seed=1, absent_json_rate=1.0)
    for path in sorted((tmp_path / "ds" / "val").glob("*.json")):
        anno = json.loads(path.read_text())
        assert anno["shapes"] == []
        image = cv2.imread(str(path.with_suffix(".jpg")))
        assert not reason_seg_mask(anno["shapes"], *image.shape[:2]).any()
    assert json.loads((tmp_path / "ds" / "explanatory" / "val.json").read_text()) == []


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    write_dataset(out, {"train": 4}, seed=0)
    (out / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not empty"):
        write_dataset(out, {"train": 2}, seed=0)
    assert len(list((out / "train").glob("*.jpg"))) == 4
    write_dataset(out, {"train": 2}, seed=0, force=True)
    assert len(list((out / "train").glob("*.jpg"))) == 2  # stale images removed
    assert (out / "notes.txt").read_text() == "keep me"
    assert json.loads((out / "meta.json").read_text())["counts"]["train"] == 2
    with pytest.raises(ValueError, match="unknown split"):
        write_dataset(tmp_path / "x", {"training": 2})


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli"
    argv = [
        "--out",
        str(out),
        "--train",
        "3",
        "--val",
        "2",
        "--test",
        "1",
        "--seed",
        "2",
        "--no-progress",
    ]
    assert make_shapes_main(argv) == 0
    meta = json.loads((out / "meta.json").read_text())
    assert meta["counts"] == {"train": 3, "val": 2, "test": 1} and meta["seed"] == 2
    assert "wrote 6 images" in capsys.readouterr().out
    assert make_shapes_main(argv) == 2
    assert "not empty" in capsys.readouterr().err
    assert make_shapes_main([*argv, "--force"]) == 0
