"""Reading a reasoning-shapes data set back: one validated record per line of ``queries.jsonl``.

The ReasonSeg json of an image (:mod:`training.shapes.writer`) holds one query; the sidecar
``<split>/queries.jsonl`` holds all of them (about 40 per image): explicit and reasoning
queries, several targets (one ``[SEG]`` per target, in order), absent targets (an answer without
``[SEG]``) and an explanation for each. Line ``i`` describes image ``i`` of the split::

    {"image": "<file>", "height": H, "width": W, "objects": [{"id": k, "polygons": [...], ...}],
     "queries": [{"texts": [...], "is_sentence": bool, "kind": "explicit"|"reasoning"|"absent",
                  "concept": str, "target_ids": [k, ...], "answer": str, "explanation": str}],
     "json_query": int}

Object masks are the ReasonSeg rasterisation of the object's polygons (exactly the visible
region, see :func:`training.data.reason_seg.polygons_to_mask`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lisa_model.prompts import SEG_TOKEN
from training.data.reason_seg import polygons_to_mask
from training.data.types import DataFormatError, check_index, require_path
from training.shapes.queries import QUERY_KINDS

#: Groups of the present-target queries (:attr:`ShapesQueryRecord.group`), in order.
PRESENT_GROUPS = ("explicit", "reasoning phrase", "reasoning sentence")


@dataclass(frozen=True)
class ShapesObjectRecord:
    """One object of a scene: ``polygons`` are ``(K, 2)`` int64 ``(x, y)`` pixel points."""

    object_id: int
    shape: str
    colour: str
    polygons: tuple[np.ndarray, ...]


@dataclass(frozen=True)
class ShapesQueryRecord:
    """One query of a scene; ``answer`` has one ``[SEG]`` per entry of ``target_ids``."""

    texts: tuple[str, ...]
    is_sentence: bool
    kind: str
    concept: str
    target_ids: tuple[int, ...]
    answer: str
    explanation: str

    @property
    def group(self) -> str:
        """``"absent"`` or one of :data:`PRESENT_GROUPS`."""
        if self.kind == "absent":
            return "absent"
        if self.kind == "explicit":
            return "explicit"
        return "reasoning sentence" if self.is_sentence else "reasoning phrase"


@dataclass(frozen=True)
class ShapesImageRecord:
    """One line of ``queries.jsonl``: an image with its objects and all its queries."""

    image: str
    height: int
    width: int
    objects: tuple[ShapesObjectRecord, ...]
    queries: tuple[ShapesQueryRecord, ...]
    json_query: int
    # object_mask's rasterised masks, kept for the life of this record (callers that want
    # several maps of one image rasterise each object once)
    _masks: dict[int, np.ndarray] = field(
        default_factory=dict, init=False, repr=False, compare=False
    )

    def object_mask(self, object_id: int) -> np.ndarray:
        """``(H, W)`` uint8 0/1 visible region of object ``object_id`` (image frame; a read-only
        array, rasterised once per record)."""
        mask = self._masks.get(object_id)
        if mask is None:
            obj = self.objects[object_id]
            shapes = [{"label": "target", "points": p} for p in obj.polygons]
            mask = polygons_to_mask(shapes, self.height, self.width, Path(self.image))
            mask.flags.writeable = False
            self._masks[object_id] = mask
        return mask

    def union_mask(self, object_ids: Sequence[int]) -> np.ndarray:
        """``(H, W)`` uint8 0/1 union of the objects' visible regions (all zero when empty)."""
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        for k in object_ids:
            mask |= self.object_mask(k)
        return mask


def _require(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> object:
    if not isinstance(obj, dict) or key not in obj:
        raise DataFormatError(f"{where}: missing key {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise DataFormatError(f"{where}: {key!r} has the wrong type ({type(value).__name__})")
    return value


def parse_image_record(obj: object, where: str) -> ShapesImageRecord:
    """Validate one decoded ``queries.jsonl`` line.

    Raises:
        DataFormatError: naming ``where`` and the offending key.
    """
    if not isinstance(obj, dict):
        raise DataFormatError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    height = int(_require(obj, "height", int, where))
    width = int(_require(obj, "width", int, where))
    objects = []
    for k, o in enumerate(_require(obj, "objects", list, where)):
        w = f"{where} objects[{k}]"
        if _require(o, "id", int, w) != k:
            raise DataFormatError(f"{w}: 'id' must equal its position {k}")
        polygons = tuple(
            np.asarray(p, dtype=np.int64).reshape(-1, 2) for p in _require(o, "polygons", list, w)
        )
        if not polygons or any(len(p) == 0 for p in polygons):
            raise DataFormatError(f"{w}: 'polygons' must be a non-empty list of point lists")
        objects.append(
            ShapesObjectRecord(k, str(o.get("shape", "")), str(o.get("colour", "")), polygons)
        )
    queries = []
    for j, q in enumerate(_require(obj, "queries", list, where)):
        w = f"{where} queries[{j}]"
        texts = _require(q, "texts", list, w)
        kind = _require(q, "kind", str, w)
        targets = _require(q, "target_ids", list, w)
        answer = _require(q, "answer", str, w)
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise DataFormatError(f"{w}: 'texts' must be a non-empty list of non-empty strings")
        if kind not in QUERY_KINDS:
            raise DataFormatError(f"{w}: 'kind' must be one of {QUERY_KINDS}, got {kind!r}")
        if not all(isinstance(t, int) and 0 <= t < len(objects) for t in targets):
            raise DataFormatError(f"{w}: 'target_ids' must be object ids, got {targets!r}")
        if (kind == "absent") != (not targets) or answer.count(SEG_TOKEN) != len(targets):
            raise DataFormatError(
                f"{w}: the answer must hold one {SEG_TOKEN} per target and absent queries "
                f"none; got kind {kind!r}, {len(targets)} targets, answer {answer!r}"
            )
        queries.append(
            ShapesQueryRecord(
                texts=tuple(texts),
                is_sentence=bool(_require(q, "is_sentence", bool, w)),
                kind=kind,
                concept=str(q.get("concept", "")),
                target_ids=tuple(int(t) for t in targets),
                answer=answer,
                explanation=str(_require(q, "explanation", str, w)),
            )
        )
    json_query = int(_require(obj, "json_query", int, where))
    if not 0 <= json_query < len(queries):
        raise DataFormatError(f"{where}: 'json_query' {json_query} is not a query index")
    return ShapesImageRecord(
        image=str(_require(obj, "image", str, where)),
        height=height,
        width=width,
        objects=tuple(objects),
        queries=tuple(queries),
        json_query=json_query,
    )


class ShapesQueriesFile:
    """Random access to the lines of a ``queries.jsonl`` without holding them parsed.

    Only the byte offsets of the lines are kept (a split of 10k images is ~200 MB of JSON);
    :meth:`record` reads and validates one line.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = require_path(Path(path), "shapes query sidecar (queries.jsonl)")
        offsets = []
        with self.path.open("rb") as f:
            pos = 0
            for line in f:
                if line.strip():
                    offsets.append(pos)
                pos += len(line)
        if not offsets:
            raise DataFormatError(f"{self.path}: no records; expected one JSON object per line")
        self.offsets = offsets

    def __len__(self) -> int:
        return len(self.offsets)

    def record(self, i: int) -> ShapesImageRecord:
        """The validated record of line ``i`` (0-based, blank lines skipped)."""
        i = check_index(i, len(self), str(self.path))
        with self.path.open("rb") as f:
            f.seek(self.offsets[i])
            line = f.readline()
        where = f"{self.path} line {i + 1}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataFormatError(f"{where}: not valid JSON ({exc})") from exc
        return parse_image_record(obj, where)
