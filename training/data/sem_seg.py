"""Semantic/part segmentation sources: ADE20K, COCO-Stuff, Mapillary Vistas v2.0, PACO-LVIS,
PASCAL-Part, each turned into "segment the <class>" conversations as the original does.

Layout (``root`` = ``<dataset_dir>``)::

    ade20k/images/training/<id>.jpg, ade20k/annotations/training/<id>.png  (0 = other, k = class k)
    cocostuff/train2017/<id>.png (stuffthingmaps, 255 = unlabeled), images coco/train2017/<id>.jpg
    cocostuff/cocostuff_classes.txt ("0: unlabeled" then "k: name"; the COCO-Stuff labels.txt)
    mapillary/config_v2.0.json, mapillary/training/v2.0/labels/<id>.png, training/images/<id>.jpg
    vlpart/paco/annotations/paco_lvis_v1_train.json with images coco/<file_name>
    vlpart/pascal_part/train.json with images vlpart/pascal_part/VOCdevkit/VOC2010/JPEGImages/<f>

Label maps are read with PIL (palette indices stay class indices). ADE20K: 0 -> 255, then k -> k-1.
COCO-Stuff: every class whose name contains ``-`` (``building-other``, ``floor-wood``...) -> 255.
PACO-LVIS: ``"obj:part"`` names (``_(...)`` suffixes dropped) and PASCAL-Part ``"obj:part"`` names
become ``"obj part"`` or ``"the part of the obj"`` with probability 0.5 each.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

from lisa_model.prompts import ANSWER_LIST, SHORT_QUESTION_LIST
from training.data.refer_seg import check_coco_image, check_segmentation, segmentation_to_mask
from training.data.types import (
    IGNORE_LABEL,
    DataFormatError,
    Sample,
    check_counts,
    check_image_size,
    check_index,
    image_size,
    item_rng,
    read_image,
    read_json,
    read_label_png,
    require_path,
)

SEM_SEG_SOURCES = ("ade20k", "cocostuff", "mapillary", "paco_lvis", "pascal_part")
ADE20K_CLASSES_FILE = Path(__file__).with_name("ade20k_classes.json")


def load_ade20k_classes(path: str | Path = ADE20K_CLASSES_FILE) -> list[str]:
    """The 150 ADE20K (SceneParsing) class names; index ``k`` is label value ``k + 1``."""
    classes = read_json(path, "ADE20K class list")
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes):
        raise DataFormatError(f"{path}: expected a JSON list of class names")
    return classes


def load_cocostuff_classes(path: str | Path) -> list[str]:
    """COCO-Stuff names from ``"k: name"`` lines; the first line (``0: unlabeled``) is dropped.

    Index ``i`` of the result is label value ``i`` of the stuffthingmaps PNGs (``0`` = person).
    """
    p = require_path(Path(path), "COCO-Stuff class list (cocostuff_classes.txt)")
    lines = p.read_text(encoding="utf-8").splitlines()
    if not lines:
        raise DataFormatError(f"{p}: empty; expected '0: unlabeled' then one 'k: name' per line")
    classes = []
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if ": " not in line:
            raise DataFormatError(f"{p} line {n}: expected 'k: name', got {line!r}")
        classes.append(line.strip().split(": ")[-1])
    return classes


def load_mapillary_classes(path: str | Path) -> list[str]:
    """Lower-cased ``readable`` names of the ``labels`` of Mapillary's ``config_v2.0.json``."""
    config = read_json(path, "Mapillary config")
    labels = config.get("labels") if isinstance(config, dict) else None
    if not isinstance(labels, list) or not all(
        isinstance(x, dict) and isinstance(x.get("readable"), str) for x in labels
    ):
        raise DataFormatError(f"{path}: expected 'labels': [{{'readable': name, ...}}, ...]")
    return [x["readable"].lower() for x in labels]


def parse_paco_name(name: str, path: Path) -> str | tuple[str, str]:
    """PACO-LVIS category name -> ``"obj"`` or ``("obj", "part")`` with ``_(...)`` dropped."""
    parts = name.strip().split(":")
    if len(parts) == 1:
        return parts[0].split("_(")[0]
    if len(parts) == 2:
        return parts[0].split("_(")[0], parts[1].split("_(")[0]
    raise DataFormatError(f"{path}: category name {name!r}: expected 'obj' or 'obj:part'")


def parse_pascal_part_name(name: str, path: Path) -> tuple[str, str]:
    """PASCAL-Part category name ``"obj:part"`` -> ``("obj", "part")``."""
    parts = name.strip().split(":")
    if len(parts) != 2:
        raise DataFormatError(f"{path}: category name {name!r}: expected 'obj:part'")
    return parts[0], parts[1]


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


class _LabelMapSource:
    """Images with a class-index label PNG each (ADE20K, COCO-Stuff, Mapillary)."""

    def __init__(
        self,
        name: str,
        classes: list[str],
        pairs: list[tuple[Path, Path]],
        ignore_ids: Sequence[int] = (),
    ) -> None:
        self.name = name
        self.classes = classes
        self.pairs = pairs
        self.ignore_ids = list(ignore_ids)

    def __len__(self) -> int:
        return len(self.pairs)

    def check_entries(self) -> Iterator[Path]:
        """Check every ``(image, label)`` pair from their headers: both readable, same size.
        Yields each label image once checked."""
        for image_path, label_path in self.pairs:
            image_hw = image_size(image_path, f"{self.name} image")
            label_hw = image_size(label_path, f"{self.name} label image")
            if image_hw != label_hw:
                raise DataFormatError(
                    f"label image {label_path} is {label_hw[1]}x{label_hw[0]} (WxH) but its "
                    f"image {image_path} is {image_hw[1]}x{image_hw[0]}"
                )
            yield label_path

    def read_label(self, label_path: Path) -> np.ndarray:
        """``(H, W)`` uint8 class-index map with 255 = ignore."""
        raw = read_label_png(label_path).astype(np.int64)
        if self.name == "ade20k":
            raw = np.where(raw == 0, IGNORE_LABEL, raw - 1)
            raw[raw == IGNORE_LABEL - 1] = IGNORE_LABEL
        elif self.ignore_ids:
            raw[np.isin(raw, self.ignore_ids)] = IGNORE_LABEL
        bad = np.unique(raw[(raw != IGNORE_LABEL) & ((raw < 0) | (raw >= len(self.classes)))])
        if bad.size:
            raise DataFormatError(
                f"label image {label_path}: values {bad[:5].tolist()} are outside the "
                f"{len(self.classes)} {self.name} classes (and not ignore)"
            )
        return raw.astype(np.uint8)

    def sample(self, j: int, rng: np.random.Generator, k: int) -> Sample | None:
        image_path, label_path = self.pairs[j]
        label = self.read_label(label_path)
        ids = [int(c) for c in np.unique(label) if c != IGNORE_LABEL]
        if not ids:
            return None
        chosen = rng.choice(ids, size=k, replace=False).tolist() if len(ids) >= k else ids
        image = read_image(image_path)
        check_image_size(image, label.shape, image_path, f"label image {label_path}")
        texts = [self.classes[c] for c in chosen]
        conversations = [
            [
                (
                    _pick(rng, SHORT_QUESTION_LIST).format(class_name=t.lower()),
                    _pick(rng, ANSWER_LIST),
                )
            ]
            for t in texts
        ]
        masks = np.stack([(label == c).astype(np.uint8) for c in chosen])
        return Sample(
            image_path=str(image_path),
            image=image,
            conversations=conversations,
            masks=masks,
            label=label,
            texts=texts,
            is_sentence=False,
            source=self.name,
        )


class _CocoPartSource:
    """COCO-format instance/part annotations (PACO-LVIS, PASCAL-Part)."""

    def __init__(self, name: str, ann_path: Path, image_root: Path) -> None:
        self.name = name
        data = read_json(ann_path, f"{name} annotations")
        if not isinstance(data, dict) or not {"images", "annotations", "categories"} <= set(data):
            raise DataFormatError(
                f"{ann_path}: expected COCO keys 'images', 'annotations' and 'categories'"
            )
        parse = parse_paco_name if name == "paco_lvis" else parse_pascal_part_name
        self.class_map = {int(c["id"]): parse(c["name"], ann_path) for c in data["categories"]}
        self.images = {int(im["id"]): im for im in data["images"]}
        self.img_anns: dict[int, list[dict]] = {i: [] for i in self.images}
        for ann in data["annotations"]:
            image_id = int(ann["image_id"])
            if image_id not in self.img_anns:
                raise DataFormatError(
                    f"{ann_path}: annotation {ann.get('id')} names unknown image {image_id}"
                )
            if int(ann["category_id"]) not in self.class_map:
                raise DataFormatError(
                    f"{ann_path}: annotation {ann.get('id')} names unknown category "
                    f"{ann['category_id']}"
                )
            self.img_anns[image_id].append(ann)
        self.image_ids = sorted(self.images)
        self.ann_path = ann_path
        self.image_root = image_root

    def __len__(self) -> int:
        return len(self.image_ids)

    def check_entries(self) -> Iterator[int]:
        """Check every image (header size as the annotations say) and the segmentations of its
        annotations (well-formed, of that size), without decoding. Yields each image id."""
        for image_id in self.image_ids:
            h, w = check_coco_image(
                self.images[image_id], image_id, self.image_root, self.ann_path, self.name
            )
            for ann in self.img_anns[image_id]:
                where = f"{self.ann_path} annotation {ann.get('id')}"
                check_segmentation(ann.get("segmentation"), h, w, where)
            yield image_id

    def sample(self, j: int, rng: np.random.Generator, k: int) -> Sample | None:
        image_id = self.image_ids[j]
        anns = self.img_anns[image_id]
        if not anns:
            return None
        inds = rng.choice(len(anns), size=k, replace=False) if len(anns) >= k else range(len(anns))
        chosen = [anns[int(i)] for i in inds]
        texts = []
        for ann in chosen:
            cls = self.class_map[int(ann["category_id"])]
            if isinstance(cls, tuple):
                obj, part = cls
                texts.append(f"{obj} {part}" if rng.random() < 0.5 else f"the {part} of the {obj}")
            else:
                texts.append(cls)
        info = self.images[image_id]
        image_path = self.image_root / info["file_name"]
        image = read_image(image_path)
        h, w = int(info["height"]), int(info["width"])
        check_image_size(image, (h, w), image_path, str(self.ann_path))
        masks = np.stack(
            [
                segmentation_to_mask(
                    ann.get("segmentation"), h, w, f"{self.ann_path} annotation {ann.get('id')}"
                )
                for ann in chosen
            ]
        )
        conversations = [
            [
                (
                    _pick(rng, SHORT_QUESTION_LIST).format(class_name=t.lower()),
                    _pick(rng, ANSWER_LIST),
                )
            ]
            for t in texts
        ]
        return Sample(
            image_path=str(image_path),
            image=image,
            conversations=conversations,
            masks=masks,
            label=np.zeros((h, w), dtype=np.uint8),
            texts=texts,
            is_sentence=False,
            source=self.name,
        )


def _label_pairs(
    label_dir: Path, image_dir: Path, what: str, stems: list[str] | None = None
) -> list[tuple[Path, Path]]:
    """``(image, label)`` pairs for every ``*.png`` in ``label_dir`` (or ``stems``), sorted."""
    require_path(label_dir, f"{what} label directory")
    if stems is None:
        stems = sorted(p.stem for p in label_dir.glob("*.png"))
    pairs = [(image_dir / f"{s}.jpg", label_dir / f"{s}.png") for s in stems]
    if not pairs:
        raise DataFormatError(f"no {what} label images (*.png) in {label_dir}")
    return pairs


def _build_source(
    root: Path, name: str, classes_file: str | Path | None
) -> _LabelMapSource | _CocoPartSource:
    if name == "ade20k":
        classes = load_ade20k_classes(classes_file or ADE20K_CLASSES_FILE)
        image_dir = require_path(root / "ade20k" / "images" / "training", "ADE20K image directory")
        stems = sorted(p.name[:-4] for p in image_dir.iterdir() if p.name.endswith(".jpg"))
        if not stems:
            raise DataFormatError(f"no ADE20K images (*.jpg) in {image_dir}")
        label_dir = root / "ade20k" / "annotations" / "training"
        return _LabelMapSource(name, classes, _label_pairs(label_dir, image_dir, "ADE20K", stems))
    if name == "cocostuff":
        classes = load_cocostuff_classes(
            classes_file or root / "cocostuff" / "cocostuff_classes.txt"
        )
        pairs = _label_pairs(
            root / "cocostuff" / "train2017", root / "coco" / "train2017", "COCO-Stuff"
        )
        ignore = [i for i, c in enumerate(classes) if "-" in c]
        return _LabelMapSource(name, classes, pairs, ignore)
    if name == "mapillary":
        classes = load_mapillary_classes(classes_file or root / "mapillary" / "config_v2.0.json")
        train = root / "mapillary" / "training"
        pairs = _label_pairs(train / "v2.0" / "labels", train / "images", "Mapillary")
        return _LabelMapSource(name, classes, pairs)
    if name == "paco_lvis":
        ann = root / "vlpart" / "paco" / "annotations" / "paco_lvis_v1_train.json"
        return _CocoPartSource(name, ann, root / "coco")
    if name == "pascal_part":
        base = root / "vlpart" / "pascal_part"
        return _CocoPartSource(
            name, base / "train.json", base / "VOCdevkit" / "VOC2010" / "JPEGImages"
        )
    if name == "partimagenet":
        raise ValueError(
            "sem_seg source 'partimagenet' has no loader (the original lacks init_partimagenet); "
            f"expected one of {SEM_SEG_SOURCES}"
        )
    raise ValueError(f"unknown sem_seg source {name!r}; expected one of {SEM_SEG_SOURCES}")


class SemSegDataset:
    """Semantic/part segmentation training samples from one source (the original
    ``SemSegDataset`` with a single ``sem_seg_data`` entry), seeded per item.

    Item ``idx`` reads image ``idx % n_images`` (sorted) and draws from ``item_rng(seed, idx,
    epoch)`` up to ``num_classes_per_sample`` of its classes (label maps: the distinct labels
    other than 255; COCO-format sources: its annotations) without replacement, one conversation
    each: SHORT template with the lower-cased name, answer from ``ANSWER_LIST``. An image with
    nothing to segment is replaced by the next one (the original drew another random image).

    Args:
        root: ``<dataset_dir>`` (COCO-Stuff and PACO-LVIS read images from ``coco/``).
        name: one of :data:`SEM_SEG_SOURCES`.
        classes_file: overrides the class list (ADE20K JSON list, COCO-Stuff ``k: name`` text,
            Mapillary ``config_v2.0.json``).
        samples_per_epoch: dataset length (wrapping over the images); defaults to the image count.
    """

    def __init__(
        self,
        root: str | Path,
        name: str,
        seed: int = 0,
        num_classes_per_sample: int = 3,
        classes_file: str | Path | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        check_counts(
            num_classes_per_sample=num_classes_per_sample, samples_per_epoch=samples_per_epoch
        )
        self.root = Path(root)
        self.source = name
        self._src = _build_source(self.root, name, classes_file)
        self.seed = int(seed)
        self.epoch = 0
        self.num_classes_per_sample = int(num_classes_per_sample)
        self.samples_per_epoch = samples_per_epoch

    @property
    def classes(self) -> list[str] | None:
        """The class names of a label-map source (``None`` for COCO-format sources)."""
        return getattr(self._src, "classes", None)

    def __len__(self) -> int:
        return self.samples_per_epoch or len(self._src)

    def check_entries(self) -> Iterator[object]:
        """Check every image of the source and its annotation without decoding masks (yields
        each entry once checked); errors name the file and the entry."""
        return self._src.check_entries()

    def set_epoch(self, epoch: int) -> None:
        """Mix ``epoch`` into the per-item generators (fresh draws every epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, idx: int) -> Sample:
        i = check_index(idx, len(self), f"SemSegDataset({self.source})")
        rng = item_rng(self.seed, i, self.epoch)
        n = len(self._src)
        for step in range(n):
            sample = self._src.sample((i + step) % n, rng, self.num_classes_per_sample)
            if sample is not None:
                return sample.validate()
        raise DataFormatError(
            f"{self.source} under {self.root}: no image has anything to segment "
            "(all labels ignore, or no annotations)"
        )
