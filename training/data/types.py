"""The typed training/validation sample, the data-format error, and the readers all datasets share.

Every dataset in :mod:`training.data` returns a :class:`Sample` from ``__getitem__``; the collate
function (elsewhere) turns samples into model batches. Images and masks stay in the original image
frame here: resizing for SAM/CLIP is the processor's job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from lisa_model.prompts import IMAGE_TOKEN, SEG_TOKEN

#: Label value that marks pixels excluded from the metrics (as in the original).
IGNORE_LABEL = 255


class DataFormatError(ValueError):
    """A data file is unreadable or does not hold what the dataset format prescribes.

    The message names the file (and the key or item) and says what was expected.
    """


class DataFileNotFoundError(DataFormatError, FileNotFoundError):
    """A file or directory the dataset layout requires is missing (message names the path)."""


@dataclass
class Sample:
    """One image with its conversations and ground-truth masks, in the original image frame.

    Attributes:
        image_path: the image file the sample was read from.
        image: ``(H, W, 3)`` uint8 RGB, as read from disk (cv2 + BGR->RGB, as the original).
        conversations: per conversation its ``(question, answer)`` rounds. The first question of
            every conversation starts with ``"<image>"`` exactly as the original templates put it;
            the collate function renders them with the chat template.
        masks: ``(N, H, W)`` uint8 0/1, one mask per ``[SEG]`` over all answers of all
            conversations, in order. ``N`` may be 0 (VQA, text-only explanatory answers).
        label: ``(H, W)`` uint8 ground truth, ``255`` = ignore. ReasonSeg: 0/1/255 target map;
            ADE20K/COCO-Stuff/Mapillary: class-index map; zeros where nothing more is known.
            The metric target of mask ``i`` is :meth:`metric_targets` ``[i]``.
        texts: the sampled class names / sentences / questions (for logs).
        is_sentence: ReasonSeg long-sentence flag (False elsewhere).
        source: data source, e.g. ``"reason_seg"``, ``"refcoco"``, ``"ade20k"``, ``"vqa"``.
        skipped: what was wrong with the bad samples read (and skipped) in place of this one
            (:class:`~training.data.bad_samples.SkipBadSamples`), one message each.
    """

    image_path: str
    image: np.ndarray
    conversations: list[list[tuple[str, str]]]
    masks: np.ndarray
    label: np.ndarray
    texts: list[str]
    is_sentence: bool
    source: str
    skipped: tuple[str, ...] = ()

    @property
    def original_size(self) -> tuple[int, int]:
        """``(H, W)`` of the image on disk."""
        return int(self.image.shape[0]), int(self.image.shape[1])

    @property
    def num_seg_tokens(self) -> int:
        """Number of ``[SEG]`` tokens over all answers of all conversations."""
        return sum(answer.count(SEG_TOKEN) for conv in self.conversations for _, answer in conv)

    def metric_targets(self) -> np.ndarray:
        """``(N, H, W)`` uint8 targets for gIoU/cIoU: ``masks`` with ``label == 255`` set to 255.

        This is what the original validation scores against (ReasonSeg's 0/1/255 map per mask).
        """
        ignore = self.label == IGNORE_LABEL
        return np.where(ignore[None], np.uint8(IGNORE_LABEL), self.masks).astype(np.uint8)

    def validate(self) -> Sample:
        """Check shapes, dtypes and that every ``[SEG]`` has its mask; returns ``self``.

        Raises:
            ValueError: naming the image and the broken invariant.
        """
        where = f"{self.source} sample {self.image_path}"
        if self.image.ndim != 3 or self.image.shape[2] != 3 or self.image.dtype != np.uint8:
            raise ValueError(
                f"{where}: image must be (H, W, 3) uint8, "
                f"got {self.image.shape} {self.image.dtype}"
            )
        h, w = self.original_size
        if self.masks.ndim != 3 or self.masks.shape[1:] != (h, w) or self.masks.dtype != np.uint8:
            raise ValueError(
                f"{where}: masks must be (N, {h}, {w}) uint8, "
                f"got {self.masks.shape} {self.masks.dtype}"
            )
        if self.masks.size and self.masks.max() > 1:
            raise ValueError(f"{where}: masks must hold only 0 and 1")
        if self.label.shape != (h, w) or self.label.dtype != np.uint8:
            raise ValueError(
                f"{where}: label must be ({h}, {w}) uint8, "
                f"got {self.label.shape} {self.label.dtype}"
            )
        if not self.conversations:
            raise ValueError(f"{where}: no conversations")
        for c, conv in enumerate(self.conversations):
            if not conv:
                raise ValueError(f"{where}: conversation {c} has no rounds")
            for r, turn in enumerate(conv):
                if len(turn) != 2 or not all(isinstance(t, str) for t in turn):
                    raise ValueError(
                        f"{where}: conversation {c} round {r} must be a (question, answer) "
                        f"pair of str, got {turn!r}"
                    )
            if not conv[0][0].startswith(IMAGE_TOKEN):
                raise ValueError(
                    f"{where}: conversation {c} must start with {IMAGE_TOKEN!r}, "
                    f"got {conv[0][0][:40]!r}"
                )
            n_image = sum(q.count(IMAGE_TOKEN) + a.count(IMAGE_TOKEN) for q, a in conv)
            if n_image != 1:
                raise ValueError(
                    f"{where}: conversation {c} holds {n_image} {IMAGE_TOKEN!r} tokens, expected 1"
                )
        n_seg = self.num_seg_tokens
        if n_seg != self.masks.shape[0]:
            raise ValueError(
                f"{where}: the answers hold {n_seg} {SEG_TOKEN} tokens but there are "
                f"{self.masks.shape[0]} masks; expected one mask per {SEG_TOKEN}"
            )
        return self


# --------------------------------------------------------------------------- shared readers


def item_rng(seed: int, idx: int, epoch: int = 0) -> np.random.Generator:
    """The generator of item ``idx``: a pure function of ``(seed, epoch, idx)``."""
    return np.random.default_rng([int(seed), int(epoch), int(idx)])


def check_counts(**counts: int | None) -> None:
    """Raise ``ValueError("<name> must be >= 1, got <value>")`` for the first count below 1;
    ``None`` (not given) passes."""
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


def check_index(idx: int, length: int, name: str) -> int:
    """``idx`` as int when ``0 <= idx < length`` (negative indices count from the end).

    Raises:
        IndexError: outside the range, so that iterating a dataset stops.
    """
    i = int(idx)
    if i < 0:
        i += length
    if not 0 <= i < length:
        raise IndexError(f"{name}: index {idx} out of range for length {length}")
    return i


def require_path(path: Path, what: str) -> Path:
    """``path`` if it exists, else :class:`DataFileNotFoundError` naming it and ``what`` it is."""
    if not path.exists():
        raise DataFileNotFoundError(f"{what} not found: {path}")
    return path


def read_image(path: str | Path) -> np.ndarray:
    """``(H, W, 3)`` uint8 RGB image read with OpenCV (BGR -> RGB), as the original reads images.

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataFormatError: OpenCV cannot decode it.
    """
    import cv2

    p = Path(path)
    if not p.is_file():
        raise DataFileNotFoundError(f"image not found: {p}")
    bgr = cv2.imread(str(p), cv2.IMREAD_COLOR)
    if bgr is None:
        raise DataFormatError(f"cannot decode image {p}: expected a JPEG/PNG readable by OpenCV")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


#: EXIF orientations that swap width and height (OpenCV applies them when it reads a JPEG).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def image_size(path: str | Path, what: str = "image") -> tuple[int, int]:
    """``(H, W)`` of an image file from its header (nothing is decoded), as :func:`read_image`
    would return it (EXIF rotations that swap the sides included).

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataFormatError: it is not an image PIL can identify.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataFileNotFoundError(f"{what} not found: {p}")
    try:
        with Image.open(p) as im:
            width, height = im.size
            orientation = im.getexif().get(0x0112) if im.format == "JPEG" else None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise DataFormatError(f"cannot read {what} {p}: {exc}") from exc
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return int(height), int(width)


def read_label_png(path: str | Path) -> np.ndarray:
    """``(H, W)`` integer label map read with PIL (palette indices stay indices), as the original.

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataFormatError: not an image, or not single-channel.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if not p.is_file():
        raise DataFileNotFoundError(f"label image not found: {p}")
    try:
        with Image.open(p) as im:
            label = np.array(im)
    except (UnidentifiedImageError, OSError) as exc:
        raise DataFormatError(f"cannot read label image {p}: {exc}") from exc
    if label.ndim != 2:
        raise DataFormatError(
            f"label image {p}: expected a single-channel (index/palette) PNG, "
            f"got an array of shape {label.shape}"
        )
    return label


def read_json(path: str | Path, what: str = "JSON file") -> Any:
    """Parse a JSON file (UTF-8, falling back to cp1252 as the original does for ReasonSeg).

    Raises:
        DataFileNotFoundError: the file does not exist.
        DataFormatError: it is not valid JSON.
    """
    p = Path(path)
    if not p.is_file():
        raise DataFileNotFoundError(f"{what} not found: {p}")
    raw = p.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("cp1252", errors="replace")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataFormatError(f"{what} {p} is not valid JSON: {exc}") from exc


def check_image_size(
    image: np.ndarray, expected: tuple[int, int], image_path: Path, ref: str
) -> None:
    """Raise :class:`DataFormatError` when the image is not ``(H, W)`` = ``expected``."""
    if tuple(image.shape[:2]) != tuple(expected):
        raise DataFormatError(
            f"image {image_path} is {image.shape[1]}x{image.shape[0]} (WxH) but {ref} says "
            f"{expected[1]}x{expected[0]}"
        )
