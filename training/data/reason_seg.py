"""ReasonSeg: labelme-style JSON beside each image, plus the optional explanatory answers.

Layout (``root`` = ``<dataset_dir>/reason_seg/ReasonSeg``)::

    root/train/<name>.jpg + <name>.json     {"text": [...], "is_sentence": bool,
    root/val/...                             "shapes": [{"label": ..., "points": [[x, y], ...]}]}
    root/explanatory/train.json             [{"image": "<name>.jpg", "query": ..., "outputs": ...}]

Shape labels: ``"flag"`` is skipped, labels containing ``"ignore"`` (any case) give 255, any other
label (``"target"``) gives 1. A JSON without target shapes gives an all-zero target mask.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lisa_model.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    IMAGE_TOKEN,
    LONG_QUESTION_LIST,
    SEGMENT_ONLY_ANSWER,
    SHORT_QUESTION_LIST,
)
from training.data.types import (
    IGNORE_LABEL,
    DataFileNotFoundError,
    DataFormatError,
    Sample,
    check_counts,
    check_index,
    image_size,
    item_rng,
    read_image,
    read_json,
    require_path,
)

#: Image extensions looked for beside each JSON, in this order (the released data is ``.jpg``).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


@dataclass
class ReasonSegAnnotation:
    """One ReasonSeg JSON.

    Attributes:
        mask: ``(H, W)`` uint8 with 0 background, 1 target, 255 ignore (image frame).
        texts: the instructions (short phrases or long sentences).
        is_sentence: True when ``texts`` are long sentences.
    """

    mask: np.ndarray
    texts: list[str]
    is_sentence: bool


def _shape_points(shape: object, json_path: Path, k: int) -> tuple[str, np.ndarray]:
    """``(label, (K, 2) int64 points)`` of shape ``k``, truncated toward zero as ``np.int32``."""
    if not isinstance(shape, dict) or "label" not in shape or "points" not in shape:
        raise DataFormatError(
            f"{json_path}: shapes[{k}] must be an object with 'label' and 'points', got {shape!r}"
        )
    label = shape["label"]
    if not isinstance(label, str):
        raise DataFormatError(f"{json_path}: shapes[{k}].label must be a string, got {label!r}")
    try:
        pts = np.asarray(shape["points"], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(
            f"{json_path}: shapes[{k}].points must be a list of [x, y] numbers ({exc})"
        ) from exc
    if pts.ndim != 2 or pts.shape[0] == 0 or pts.shape[1] != 2 or not np.isfinite(pts).all():
        raise DataFormatError(
            f"{json_path}: shapes[{k}].points must be a non-empty list of finite [x, y] pairs, "
            f"got an array of shape {pts.shape}"
        )
    if np.abs(pts).max() >= 2**31:
        raise DataFormatError(f"{json_path}: shapes[{k}].points exceed the int32 range")
    return label, np.trunc(pts).astype(np.int64)


# ---------------------------------------------------------------------------------------------
# Polygon rasterisation. The original ran OpenCV 4.8 (``cv2.polylines`` + ``cv2.fillPoly``,
# LINE_8, integer points); OpenCV >= 4.9 rounds polygon edges differently, which moves a few
# boundary pixels. The ground truth is defined by 4.8's rules, so they are implemented here:
#   * outline: 8-connected lines walked left to right from the (integer-clipped) end points;
#   * fill: every non-horizontal edge spans rows [y_top, y_bottom) in 16.16 fixed point,
#     starting half a pixel right of its upper vertex with slope dx/dy truncated toward zero (an
#     edge leaving the image takes its slope from the clipped segment, extrapolated back to its
#     upper vertex); per row the crossings are sorted and pairs [floor(a), floor(b)] filled.
# tests/training/test_data_reason_seg.py checks this against the original's fixture masks and
# against masks OpenCV 4.8.0 drew for random polygons (clipped, self-intersecting, degenerate).

_FIX = 16  # fixed-point fraction bits of polygon edges


def _cdiv(a: int, b: int) -> int:
    """Integer division truncating toward zero (C semantics)."""
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _clip_segment(
    w: int, h: int, x1: int, y1: int, x2: int, y2: int
) -> tuple[bool, int, int, int, int]:
    """Clip a segment to the image with integer arithmetic; ``(inside, x1, y1, x2, y2)``.

    Outcodes, then the crossings of the top/bottom border, then of the left/right border, each
    computed from the already-moved end points with truncating division.
    """
    right, bottom = w - 1, h - 1

    def code(x: int, y: int) -> int:
        return (x < 0) | (x > right) << 1 | (y < 0) << 2 | (y > bottom) << 3

    c1, c2 = code(x1, y1), code(x2, y2)
    if c1 & c2 or not c1 | c2:
        return not c1 | c2, x1, y1, x2, y2
    if c1 & 12:
        border = 0 if c1 < 8 else bottom
        x1 += _cdiv((border - y1) * (x2 - x1), y2 - y1)
        y1 = border
        c1 = code(x1, 0) & 3
    if c2 & 12:
        border = 0 if c2 < 8 else bottom
        x2 += _cdiv((border - y2) * (x2 - x1), y2 - y1)
        y2 = border
        c2 = code(x2, 0) & 3
    if not c1 & c2 and c1 | c2:
        if c1:
            border = 0 if c1 == 1 else right
            y1 += _cdiv((border - x1) * (y2 - y1), x2 - x1)
            x1, c1 = border, 0
        if c2:
            border = 0 if c2 == 1 else right
            y2 += _cdiv((border - x2) * (y2 - y1), x2 - x1)
            x2, c2 = border, 0
    return not c1 | c2, x1, y1, x2, y2


def _draw_line(mask: np.ndarray, x1: int, y1: int, x2: int, y2: int, value: int) -> None:
    """8-connected line between integer points, drawn in place (clipped to the mask)."""
    h, w = mask.shape
    if not (0 <= x1 < w and 0 <= x2 < w and 0 <= y1 < h and 0 <= y2 < h):
        inside, x1, y1, x2, y2 = _clip_segment(w, h, x1, y1, x2, y2)
        if not inside:
            return
    if x2 < x1:  # always walk left to right
        x1, y1, x2, y2 = x2, y2, x1, y1
    step_y = -1 if y2 < y1 else 1
    run, rise = x2 - x1, abs(y2 - y1)
    major, minor = (rise, run) if rise > run else (run, rise)
    i = np.arange(major + 1, dtype=np.int64)
    # Minor-axis steps taken before step i of the Bresenham walk (error starts at major-2*minor).
    taken = np.maximum(0, -((major - 2 * minor * i) // max(2 * major, 1)))
    if rise > run:
        mask[y1 + step_y * i, x1 + taken] = value
    else:
        mask[y1 + step_y * taken, x1 + i] = value


def _fill_polygon(mask: np.ndarray, points: np.ndarray, value: int) -> None:
    """Outline and fill one closed polygon of integer ``(K, 2)`` x/y points, in place."""
    h, w = mask.shape
    half = 1 << (_FIX - 1)
    edges = []  # (top row, bottom row, x at top row, dx per row), x in 16.16 fixed point
    px, py = (int(v) for v in points[-1])
    for qx, qy in points.tolist():
        _draw_line(mask, px, py, qx, qy, value)
        # The slope comes from the segment clipped to the image when it leaves the image.
        ax, ay, bx, by = px << _FIX, py, qx << _FIX, qy
        if 0 <= px < w and 0 <= qx < w and 0 <= py < h and 0 <= qy < h:
            ax, bx = ax + half, bx + half
        else:
            _, cx1, cy1, cx2, cy2 = _clip_segment(w, h, px, py, qx, qy)
            if cy1 != cy2:
                ax, ay, bx, by = cx1 << _FIX, cy1, cx2 << _FIX, cy2
        if py != qy:
            dx = _cdiv(bx - ax, by - ay)
            if py < qy:
                edges.append((py, qy, ax + (py - ay) * dx, dx))
            else:
                edges.append((qy, py, bx + (qy - by) * dx, dx))
        px, py = qx, qy
    rows, xs = [], []
    for top, bottom, x_top, dx in edges:
        r = np.arange(max(top, 0), min(bottom, h), dtype=np.int64)
        rows.append(r)
        xs.append(x_top + (r - top) * dx)
    if not rows:
        return
    r = np.concatenate(rows)
    x = np.concatenate(xs)
    order = np.lexsort((x, r))
    r, x = r[order], x[order]
    # Each row has an even number of crossings (closed polygon): pair them up in x order.
    row, left, right = r[0::2], x[0::2] >> _FIX, x[1::2] >> _FIX
    keep = (left < w) & (right >= 0)
    row, left, right = row[keep], np.maximum(left[keep], 0), np.minimum(right[keep], w - 1)
    if row.size == 0:
        return
    edge_count = np.zeros((h, w + 1), dtype=np.int32)
    np.add.at(edge_count, (row, left), 1)
    np.add.at(edge_count, (row, right + 1), -1)
    mask[np.cumsum(edge_count[:, :w], axis=1) > 0] = value


def polygons_to_mask(
    shapes: Sequence[object], height: int, width: int, json_path: Path
) -> np.ndarray:
    """Rasterise labelme ``shapes`` into an ``(H, W)`` uint8 0/1/255 map.

    Exactly the original ``get_mask_from_json``: ``"flag"`` shapes skipped; the others sorted by
    their filled area (descending, measured on a temporary mask) and drawn larger first, so
    smaller shapes (e.g. ignore regions inside a target) win; value 255 when the lower-cased
    label contains ``"ignore"``, else 1. Points are truncated to integers; outlines and fills
    follow OpenCV 4.8, which the original used (see the notes above ``_fill_polygon``).
    """
    valid: list[tuple[str, np.ndarray]] = []
    areas = []
    for k, shape in enumerate(shapes):
        label, points = _shape_points(shape, json_path, k)
        if label.lower() == "flag":
            continue
        valid.append((label, points))
    values = [IGNORE_LABEL if "ignore" in label.lower() else 1 for label, _ in valid]
    if len(set(values)) > 1:  # the drawing order only matters between different values
        for _, points in valid:
            tmp = np.zeros((height, width), dtype=np.uint8)
            _fill_polygon(tmp, points, 1)
            areas.append(tmp.sum())
    else:
        areas = [0] * len(valid)
    mask = np.zeros((height, width), dtype=np.uint8)
    for k in np.argsort(areas)[::-1]:
        _fill_polygon(mask, valid[int(k)][1], values[int(k)])
    return mask


def read_reason_seg_json(
    json_path: str | Path, image_size: tuple[int, int]
) -> ReasonSegAnnotation:
    """Read one ReasonSeg JSON for an image of ``image_size`` = ``(H, W)``.

    Raises:
        DataFileNotFoundError: the JSON is missing.
        DataFormatError: a key is missing or has the wrong type.
    """
    path = Path(json_path)
    texts, is_sentence, shapes = _parse_reason_seg_json(path)
    mask = polygons_to_mask(shapes, image_size[0], image_size[1], path)
    return ReasonSegAnnotation(mask=mask, texts=texts, is_sentence=is_sentence)


def _parse_reason_seg_json(path: Path) -> tuple[list[str], bool, list]:
    """``(texts, is_sentence, shapes)`` of one ReasonSeg JSON, keys and types checked."""
    anno = read_json(path, "ReasonSeg annotation")
    if not isinstance(anno, dict):
        raise DataFormatError(f"{path}: expected a JSON object, got {type(anno).__name__}")
    for key in ("text", "is_sentence", "shapes"):
        if key not in anno:
            raise DataFormatError(
                f"{path}: missing key {key!r} (expected text/is_sentence/shapes)"
            )
    texts = anno["text"]
    if isinstance(texts, str):
        texts = [texts]
    if not isinstance(texts, list) or not all(isinstance(t, str) for t in texts):
        raise DataFormatError(f"{path}: 'text' must be a list of strings, got {texts!r}")
    if not isinstance(anno["is_sentence"], bool):
        raise DataFormatError(
            f"{path}: 'is_sentence' must be true/false, got {anno['is_sentence']!r}"
        )
    if not isinstance(anno["shapes"], list):
        raise DataFormatError(f"{path}: 'shapes' must be a list")
    return list(texts), anno["is_sentence"], anno["shapes"]


def check_pairs(pairs: Sequence[tuple[Path, Path]]) -> Iterator[Path]:
    """Check every ``(image, json)`` pair without rasterising: the image's header is readable,
    the JSON parses with the keys, types, at least one text and well-formed polygon points.
    Yields each JSON once checked.

    Raises:
        DataFileNotFoundError / DataFormatError: naming the file (and the shape) at fault.
    """
    for image_path, json_path in pairs:
        image_size(image_path, "ReasonSeg image")
        texts, _, shapes = _parse_reason_seg_json(json_path)
        if not texts:
            raise DataFormatError(f"{json_path}: 'text' is empty; expected at least one text")
        for k, shape in enumerate(shapes):
            _shape_points(shape, json_path, k)
        yield json_path


def find_image_json_pairs(split_dir: Path) -> list[tuple[Path, Path]]:
    """Sorted ``(image, json)`` pairs of one split directory (each ``*.json`` with its image).

    Raises:
        DataFileNotFoundError: the directory is missing, or a JSON has no image beside it.
        DataFormatError: the directory holds no JSON annotations.
    """
    require_path(split_dir, "ReasonSeg split directory")
    pairs = []
    for json_path in sorted(split_dir.glob("*.json")):
        for ext in IMAGE_EXTENSIONS:
            image_path = json_path.with_suffix(ext)
            if image_path.is_file():
                pairs.append((image_path, json_path))
                break
        else:
            raise DataFileNotFoundError(
                f"no image for ReasonSeg annotation {json_path}: expected "
                f"{json_path.with_suffix('.jpg').name} (or .jpeg/.png) beside it"
            )
    if not pairs:
        raise DataFormatError(f"no ReasonSeg annotations (*.json) in {split_dir}")
    return pairs


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _load_explanations(path: Path) -> dict[str, str]:
    """``{image file name: explanation}`` from an explanatory JSON list."""
    items = read_json(path, "ReasonSeg explanatory JSON")
    if not isinstance(items, list):
        raise DataFormatError(f"{path}: expected a list of {{image, query, outputs}} objects")
    out = {}
    for k, item in enumerate(items):
        if (
            not isinstance(item, dict)
            or not isinstance(item.get("image"), str)
            or not isinstance(item.get("outputs"), str)
        ):
            raise DataFormatError(
                f"{path}: item {k} must be an object with string 'image' and 'outputs', "
                f"got {item!r:.200}"
            )
        out[item["image"]] = item["outputs"]
    return out


class ReasonSegDataset:
    """ReasonSeg training samples (the original ``ReasonSegDataset``), seeded per item.

    Item ``idx`` reads image ``idx % n_images`` and draws from ``item_rng(seed, idx, epoch)``: up
    to ``num_texts_per_image`` texts without replacement, one conversation each (short phrases ->
    SHORT template with the lower-cased text, sentences -> LONG template), answers from
    ``ANSWER_LIST``; every target is ``mask == 1``. For images in the explanatory JSON one choice
    per image: with probability ``explanatory`` a text-only answer (question ``"<image>\\n" +
    text``, answer = explanation, no masks), else uniformly the plain answer or question
    ``"<image>\\n" + text + " " + EXPLANATORY_QUESTION`` with answer ``ANSWER + " " +
    explanation``. ``explanatory=-1`` disables explanations (no JSON needed).

    Args:
        root: ``<dataset_dir>/reason_seg/ReasonSeg``.
        split: split directory name; ``"train_val"`` joins several, as the original.
        seed: base seed of the per-item generators.
        num_texts_per_image: texts (conversations) per sample, at most.
        explanatory: probability of the text-only explanatory answer, or -1 to disable.
        explanatory_json: defaults to ``root/explanatory/train.json``.
        samples_per_epoch: dataset length (wrapping over the images); defaults to the image count.
    """

    source = "reason_seg"

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        seed: int = 0,
        num_texts_per_image: int = 3,
        explanatory: float = 0.1,
        explanatory_json: str | Path | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        check_counts(num_texts_per_image=num_texts_per_image)
        if explanatory != -1 and not 0.0 <= explanatory <= 1.0:
            raise ValueError(
                f"explanatory must be a probability in [0, 1] or -1, got {explanatory}"
            )
        self.root = Path(root)
        self.split = split
        self.seed = int(seed)
        self.epoch = 0
        self.num_texts_per_image = int(num_texts_per_image)
        self.explanatory = float(explanatory)
        self.pairs: list[tuple[Path, Path]] = []
        for name in split.split("_"):
            self.pairs.extend(find_image_json_pairs(self.root / name))
        self.explanations: dict[str, str] = {}
        if self.explanatory != -1:
            path = (
                Path(explanatory_json)
                if explanatory_json
                else self.root / "explanatory" / "train.json"
            )
            if not path.is_file():
                raise DataFileNotFoundError(
                    f"ReasonSeg explanatory JSON not found: {path} (pass explanatory=-1 to train "
                    "without explanations)"
                )
            self.explanations = _load_explanations(path)
        check_counts(samples_per_epoch=samples_per_epoch)
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch or len(self.pairs)

    def check_entries(self) -> Iterator[Path]:
        """Check every annotation and image (:func:`check_pairs`); yields each JSON."""
        return check_pairs(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        """Mix ``epoch`` into the per-item generators (fresh draws every epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, idx: int) -> Sample:
        i = check_index(idx, len(self), "ReasonSegDataset")
        rng = item_rng(self.seed, i, self.epoch)
        image_path, json_path = self.pairs[i % len(self.pairs)]
        image = read_image(image_path)
        anno = read_reason_seg_json(json_path, image.shape[:2])
        if not anno.texts:
            raise DataFormatError(f"{json_path}: 'text' is empty; expected at least one text")

        n = len(anno.texts)
        k = self.num_texts_per_image
        inds = rng.choice(n, size=k, replace=False) if n >= k else np.arange(n)
        texts = [anno.texts[int(j)] for j in inds]

        explanation = self.explanations.get(image_path.name)
        choice = 0
        if explanation is not None:
            choice = 2 if rng.random() < self.explanatory else int(rng.integers(2))

        conversations = []
        for text in texts:
            if choice == 1:  # [SEG] plus the explanation
                question = IMAGE_TOKEN + "\n" + text + " " + _pick(rng, EXPLANATORY_QUESTION_LIST)
                answer = _pick(rng, ANSWER_LIST) + " " + explanation
            elif choice == 2:  # text-only explanation, no mask
                question, answer = IMAGE_TOKEN + "\n" + text, explanation
            else:
                if anno.is_sentence:
                    question = _pick(rng, LONG_QUESTION_LIST).format(sent=text)
                else:
                    question = _pick(rng, SHORT_QUESTION_LIST).format(class_name=text.lower())
                answer = _pick(rng, ANSWER_LIST)
            conversations.append([(question, answer)])

        h, w = anno.mask.shape
        target = (anno.mask == 1).astype(np.uint8)
        if choice == 2:
            masks = np.zeros((0, h, w), dtype=np.uint8)
        else:
            masks = np.repeat(target[None], len(texts), axis=0)
        return Sample(
            image_path=str(image_path),
            image=image,
            conversations=conversations,
            masks=masks,
            label=anno.mask,
            texts=texts,
            is_sentence=anno.is_sentence,
            source=self.source,
        ).validate()


class ReasonSegValDataset:
    """ReasonSeg validation samples (the original ``ValDataset("ReasonSeg|val")``), no randomness.

    One sample per image with only its first text (stripped): question ``"<image>\\n {text}
    Please output segmentation mask."`` for sentences, ``"<image>\\n What is {text} in this image?
    Please output segmentation mask."`` otherwise (note the space after the newline), answer
    ``"[SEG]."``. ``label`` is the 0/1/255 map (the metric target), ``masks[0] = label == 1``.
    """

    source = "reason_seg"

    def __init__(self, root: str | Path, split: str = "val") -> None:
        self.root = Path(root)
        self.split = split
        self.pairs = find_image_json_pairs(self.root / split)

    def __len__(self) -> int:
        return len(self.pairs)

    def check_entries(self) -> Iterator[Path]:
        """Check every annotation and image (:func:`check_pairs`); yields each JSON."""
        return check_pairs(self.pairs)

    def __getitem__(self, idx: int) -> Sample:
        i = check_index(idx, len(self), "ReasonSegValDataset")
        image_path, json_path = self.pairs[i]
        image = read_image(image_path)
        anno = read_reason_seg_json(json_path, image.shape[:2])
        if not anno.texts:
            raise DataFormatError(f"{json_path}: 'text' is empty; expected at least one text")
        text = anno.texts[0].strip()
        if anno.is_sentence:
            question = IMAGE_TOKEN + f"\n {text} Please output segmentation mask."
        else:
            question = (
                IMAGE_TOKEN + f"\n What is {text} in this image? Please output segmentation mask."
            )
        return Sample(
            image_path=str(image_path),
            image=image,
            conversations=[[(question, SEGMENT_ONLY_ANSWER)]],
            masks=(anno.mask == 1).astype(np.uint8)[None],
            label=anno.mask,
            texts=[text],
            is_sentence=anno.is_sentence,
            source=self.source,
        ).validate()
