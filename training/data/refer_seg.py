"""Referring segmentation: refCLEF, refCOCO, refCOCO+, refCOCOg in the REFER-API format.

Layout (``root`` = ``<dataset_dir>/refer_seg``)::

    root/<dataset>/refs(<split_by>).p      pickled list of refs: {ref_id, ann_id, image_id, split,
                                           category_id, sentences: [{sent, sent_id, ...}]}
    root/<dataset>/instances.json          COCO format: images, annotations, categories
    root/images/mscoco/images/train2014/   COCO_train2014_%012d.jpg (refcoco, refcoco+, refcocog)
    root/images/saiapr_tc-12/              refclef images (file_name as in instances.json)

``split_by`` is ``umd`` for refcocog and ``unc`` otherwise (refclef included), as the original.
Masks come from the annotation's COCO polygons or RLE; multi-part masks are merged (logical or).
"""

from __future__ import annotations

import builtins
import pickle
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lisa_model.prompts import ANSWER_LIST, IMAGE_TOKEN, SEGMENT_ONLY_ANSWER, SHORT_QUESTION_LIST
from training.data.types import (
    DataFormatError,
    Sample,
    check_counts,
    check_image_size,
    check_index,
    image_size,
    item_rng,
    read_image,
    read_json,
    require_path,
)

REFER_DATASETS = ("refclef", "refcoco", "refcoco+", "refcocog")


def default_split_by(dataset: str) -> str:
    """``"umd"`` for refcocog, ``"unc"`` for the others (the original's choice)."""
    return "umd" if dataset == "refcocog" else "unc"


def image_dir(root: Path, dataset: str) -> Path:
    """Where the images of ``dataset`` live under the refer_seg ``root``."""
    if dataset == "refclef":
        return root / "images" / "saiapr_tc-12"
    return root / "images" / "mscoco" / "images" / "train2014"


def segmentation_to_mask(seg: Any, height: int, width: int, where: str) -> np.ndarray:
    """``(H, W)`` uint8 0/1 mask of a COCO ``segmentation`` (polygons, RLE list or RLE dict).

    Empty segmentations give an all-zero mask; the parts of a multi-part object are or-ed (the
    original summed them, which gives 2 where parts overlap).

    Raises:
        DataFormatError: naming ``where`` when the segmentation is neither polygons nor RLE, or
            its RLE size is not ``(height, width)``.
    """
    from pycocotools import mask as mask_utils

    if seg is None or (isinstance(seg, list) and len(seg) == 0):
        return np.zeros((height, width), dtype=np.uint8)

    def _rle(obj: dict) -> dict:
        if not isinstance(obj, dict) or "counts" not in obj or "size" not in obj:
            raise DataFormatError(f"{where}: expected an RLE object with 'counts' and 'size'")
        counts = obj["counts"]
        if isinstance(counts, list):  # uncompressed RLE
            return mask_utils.frPyObjects(dict(obj), height, width)
        if isinstance(counts, str):
            return {"size": list(obj["size"]), "counts": counts.encode()}
        return {"size": list(obj["size"]), "counts": counts}

    try:
        if isinstance(seg, dict):
            rles = [_rle(seg)]
        elif isinstance(seg, list) and all(isinstance(p, list) for p in seg):
            rles = mask_utils.frPyObjects(seg, height, width)
        elif isinstance(seg, list) and all(isinstance(p, dict) for p in seg):
            rles = [_rle(p) for p in seg]
        else:
            raise DataFormatError(
                f"{where}: segmentation must be a list of polygons, a list of RLEs or an RLE, "
                f"got {str(seg)[:80]}"
            )
        with warnings.catch_warnings():  # pycocotools' Cython __array__ predates NumPy 2
            warnings.filterwarnings("ignore", "__array__ implementation", DeprecationWarning)
            decoded = mask_utils.decode(rles)  # (H, W, n)
    except DataFormatError:
        raise
    except Exception as exc:  # pycocotools raises bare Exceptions/TypeErrors
        raise DataFormatError(f"{where}: cannot decode segmentation ({exc})") from exc
    if decoded.shape[:2] != (height, width):
        raise DataFormatError(
            f"{where}: segmentation is {decoded.shape[1]}x{decoded.shape[0]} (WxH) but the image "
            f"is {width}x{height}"
        )
    return (decoded.reshape(height, width, -1).sum(axis=2) > 0).astype(np.uint8)


def check_segmentation(seg: Any, height: int, width: int, where: str) -> None:
    """Check a COCO ``segmentation`` without decoding it: polygons are lists of at least three
    ``x, y`` number pairs, an RLE has ``counts`` and a ``size`` of ``[height, width]``.

    Raises:
        DataFormatError: naming ``where`` and what is wrong.
    """
    if seg is None or (isinstance(seg, list) and not seg):
        return
    parts = seg if isinstance(seg, list) else [seg]
    for part in parts:
        if isinstance(part, dict):
            if "counts" not in part or "size" not in part:
                raise DataFormatError(f"{where}: expected an RLE object with 'counts' and 'size'")
            if list(part["size"]) != [height, width]:
                raise DataFormatError(
                    f"{where}: the mask is {part['size'][1]}x{part['size'][0]} (WxH) but the "
                    f"image is {width}x{height}"
                )
        elif not (
            isinstance(part, list)
            and len(part) >= 6
            and len(part) % 2 == 0
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in part)
        ):
            raise DataFormatError(
                f"{where}: segmentation must be polygons (lists of x, y numbers) or RLEs, "
                f"got {str(part)[:80]}"
            )


def check_coco_image(
    info: dict, image_id: int, image_root: Path, ann_file: Path, source: str
) -> tuple[int, int]:
    """``(H, W)`` of a COCO image record of ``ann_file``, checked against the header of its
    file under ``image_root``.

    Raises:
        DataFileNotFoundError / DataFormatError: naming the image file or ``ann_file``.
    """
    try:
        h, w = int(info["height"]), int(info["width"])
        path = image_root / info["file_name"]
    except (KeyError, TypeError, ValueError) as exc:
        raise DataFormatError(
            f"{ann_file}: image {image_id} needs file_name, height and width ({exc})"
        ) from None
    actual = image_size(path, f"{source} image")
    if actual != (h, w):
        raise DataFormatError(
            f"image {path} is {actual[1]}x{actual[0]} (WxH) but {ann_file} says {w}x{h} for "
            f"image {image_id}"
        )
    return h, w


def _split_matches(ref_split: str, split: str) -> bool:
    """The REFER API's split filter (``testA`` also matches ``testAB``, ``test`` any test)."""
    if split in ("testA", "testB", "testC"):
        return split[-1] in ref_split
    if split == "test":
        return "test" in ref_split
    return ref_split == split


class _PlainUnpickler(pickle.Unpickler):
    """Reads plain data only: containers and scalars, which pickle stores without naming any
    class or function. Every other global (``os.system``, a class to rebuild) is refused, so
    no code stored in the file runs (the ``pickle`` documentation's "Restricting Globals")."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in ("set", "frozenset"):  # plain containers too
            return getattr(builtins, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("refused persistent id")


def read_plain_pickle(path: Path) -> Any:
    """The content of a pickle holding only dicts, lists, tuples, sets, strings, bytes, numbers,
    booleans and ``None`` (Python 2 pickles included, as the REFER API wrote them).

    Raises:
        DataFileNotFoundError: the file is missing.
        DataFormatError: naming the file: not a pickle, or one that names a class or function
            (refused without running anything).
    """
    require_path(path, "refs pickle")
    last: Exception | None = None
    for encoding in ("ASCII", "latin1"):  # Python 2 byte strings with non-ASCII bytes: latin1
        try:
            with path.open("rb") as f:
                return _PlainUnpickler(f, encoding=encoding).load()
        except UnicodeDecodeError as exc:
            last = exc
        except pickle.UnpicklingError as exc:
            if str(exc).startswith("refused"):
                raise DataFormatError(
                    f"{path}: {exc}: a refs pickle holds only lists, dicts, strings and numbers; "
                    "not loaded, as loading it would run code from the file"
                ) from None
            raise DataFormatError(f"{path} is not a readable refs pickle: {exc}") from None
        except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
            raise DataFormatError(
                f"{path} is not a readable refs pickle: {type(exc).__name__}: {exc}"
            ) from None
    raise DataFormatError(f"{path} is not a readable refs pickle: {last}")


def _load_refs(path: Path) -> list[dict]:
    refs = read_plain_pickle(path)
    if not isinstance(refs, list):
        raise DataFormatError(
            f"{path}: expected a pickled list of refs, got {type(refs).__name__}"
        )
    for k, ref in enumerate(refs):
        if not isinstance(ref, dict) or not {"ann_id", "image_id", "split", "sentences"} <= set(
            ref
        ):
            raise DataFormatError(
                f"{path}: ref {k} must be a dict with ann_id, image_id, split and sentences"
            )
    return refs


class ReferData:
    """The refs of one split of one REFER dataset, indexed by image (sorted image ids).

    Attributes:
        image_ids: sorted ids of the images that have refs in the split.
        images: ``{image id: COCO image record}``.
        anns: ``{annotation id: COCO annotation record}``.
        img_refs: ``{image id: refs of the split in pickle order}``.
        image_root: directory the image ``file_name`` values are relative to.
    """

    def __init__(
        self, root: str | Path, dataset: str, split: str, split_by: str | None = None
    ) -> None:
        if dataset not in REFER_DATASETS:
            raise ValueError(
                f"unknown refer dataset {dataset!r}; expected one of {REFER_DATASETS}"
            )
        self.root = Path(root)
        self.dataset = dataset
        self.split = split
        self.split_by = split_by or default_split_by(dataset)
        data_dir = self.root / dataset
        refs_path = data_dir / f"refs({self.split_by}).p"
        instances_path = data_dir / "instances.json"
        refs = _load_refs(refs_path)
        instances = read_json(instances_path, "refer instances.json")
        if not isinstance(instances, dict) or not {"images", "annotations"} <= set(instances):
            raise DataFormatError(
                f"{instances_path}: expected COCO keys 'images' and 'annotations'"
            )
        self.images = {int(im["id"]): im for im in instances["images"]}
        self.anns = {int(a["id"]): a for a in instances["annotations"]}
        self.img_refs: dict[int, list[dict]] = {}
        for ref in refs:
            if _split_matches(str(ref["split"]), split):
                self.img_refs.setdefault(int(ref["image_id"]), []).append(ref)
        missing = [i for i in self.img_refs if i not in self.images]
        if missing:
            raise DataFormatError(
                f"{refs_path}: refs name image ids {missing[:5]} that {instances_path} lacks"
            )
        self.image_ids = sorted(self.img_refs)
        if not self.image_ids:
            raise DataFormatError(f"{refs_path}: no refs in split {split!r}")
        self.image_root = image_dir(self.root, dataset)
        self.refs_path = refs_path

    def image_path(self, image_id: int) -> Path:
        return self.image_root / self.images[image_id]["file_name"]

    def check_entries(self) -> Iterator[int]:
        """Check every image of the split without decoding masks: the image's header gives the
        size instances.json says, its refs have sentences, their annotations exist and have
        well-formed segmentations of that size. Yields each image id once checked.

        Raises:
            DataFileNotFoundError / DataFormatError: naming the file and the image, ref or
                annotation at fault.
        """
        instances = self.root / self.dataset / "instances.json"
        for image_id in self.image_ids:
            h, w = check_coco_image(
                self.images[image_id], image_id, self.image_root, instances, self.dataset
            )
            _, ann_ids = self.sentences(image_id)
            flat = [a for ids in ann_ids for a in (ids if isinstance(ids, list) else [ids])]
            for ann_id in dict.fromkeys(flat):
                if ann_id == -1:  # gRefCOCO "no target"
                    continue
                try:
                    ann = self.anns.get(int(ann_id))
                except (TypeError, ValueError):
                    ann = None
                if ann is None:
                    raise DataFormatError(
                        f"{self.refs_path}: annotation id {ann_id} (image {image_id}) is not in "
                        f"{instances}"
                    )
                where = f"{instances} annotation {ann_id}"
                check_segmentation(ann.get("segmentation"), h, w, where)
            yield image_id

    def sentences(self, image_id: int) -> tuple[list[str], list[Any]]:
        """All ``(sentences, ann ids)`` of the image's refs, in ref order."""
        sents, ann_ids = [], []
        for ref in self.img_refs[image_id]:
            for sent in ref["sentences"]:
                if not isinstance(sent, dict) or not isinstance(sent.get("sent"), str):
                    raise DataFormatError(
                        f"{self.refs_path}: ref {ref.get('ref_id')} has a sentence without a "
                        "string 'sent'"
                    )
                sents.append(sent["sent"])
                ann_ids.append(ref["ann_id"])
        return sents, ann_ids

    def mask(self, ann_id: Any, image_id: int) -> np.ndarray:
        """``(H, W)`` uint8 0/1 mask of annotation ``ann_id`` (a list of ids is or-ed)."""
        info = self.images[image_id]
        h, w = int(info["height"]), int(info["width"])
        ids = ann_id if isinstance(ann_id, list) else [ann_id]
        out = np.zeros((h, w), dtype=np.uint8)
        for a in ids:
            if a == -1:  # gRefCOCO "no target"
                continue
            ann = self.anns.get(int(a))
            if ann is None:
                raise DataFormatError(
                    f"{self.refs_path}: annotation id {a} is not in {self.dataset}/instances.json"
                )
            where = f"{self.dataset}/instances.json annotation {a}"
            out |= segmentation_to_mask(ann.get("segmentation"), h, w, where)
        return out

    def read_image(self, image_id: int) -> tuple[Path, np.ndarray]:
        path = self.image_path(image_id)
        image = read_image(path)
        info = self.images[image_id]
        check_image_size(image, (int(info["height"]), int(info["width"])), path, "instances.json")
        return path, image


def _pick(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


class ReferSegDataset:
    """Referring-segmentation training samples (the original ``ReferSegDataset``, one source).

    Item ``idx`` reads image ``idx % n_images`` (images with refs in ``split``, sorted by id) and
    draws from ``item_rng(seed, idx, epoch)`` up to ``num_sentences`` of its sentences without
    replacement, one conversation each: SHORT template with the stripped, lower-cased sentence,
    answer from ``ANSWER_LIST``, mask = the referred annotation.

    Args:
        root: ``<dataset_dir>/refer_seg``.
        dataset: ``refclef``, ``refcoco``, ``refcoco+`` or ``refcocog``.
        split: ``train``, ``val``, ``test``, ``testA``, ...
        split_by: defaults to ``umd`` for refcocog, ``unc`` otherwise.
        samples_per_epoch: dataset length (wrapping over the images); defaults to the image count.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split: str = "train",
        seed: int = 0,
        num_sentences: int = 3,
        split_by: str | None = None,
        samples_per_epoch: int | None = None,
    ) -> None:
        check_counts(num_sentences=num_sentences, samples_per_epoch=samples_per_epoch)
        self.data = ReferData(root, dataset, split, split_by)
        self.source = dataset
        self.seed = int(seed)
        self.epoch = 0
        self.num_sentences = int(num_sentences)
        self.samples_per_epoch = samples_per_epoch

    def __len__(self) -> int:
        return self.samples_per_epoch or len(self.data.image_ids)

    def check_entries(self) -> Iterator[int]:
        """:meth:`ReferData.check_entries` of this split."""
        return self.data.check_entries()

    def set_epoch(self, epoch: int) -> None:
        """Mix ``epoch`` into the per-item generators (fresh draws every epoch)."""
        self.epoch = int(epoch)

    def __getitem__(self, idx: int) -> Sample:
        i = check_index(idx, len(self), f"ReferSegDataset({self.source})")
        rng = item_rng(self.seed, i, self.epoch)
        image_id = self.data.image_ids[i % len(self.data.image_ids)]
        sents, ann_ids = self.data.sentences(image_id)
        if not sents:
            raise DataFormatError(f"{self.data.refs_path}: image {image_id} has no sentences")
        n, k = len(sents), self.num_sentences
        inds = rng.choice(n, size=k, replace=False) if n >= k else np.arange(n)
        texts = [sents[int(j)] for j in inds]
        conversations = [
            [
                (
                    _pick(rng, SHORT_QUESTION_LIST).format(class_name=t.strip().lower()),
                    _pick(rng, ANSWER_LIST),
                )
            ]
            for t in texts
        ]
        path, image = self.data.read_image(image_id)
        masks = np.stack([self.data.mask(ann_ids[int(j)], image_id) for j in inds])
        return Sample(
            image_path=str(path),
            image=image,
            conversations=conversations,
            masks=masks,
            label=np.zeros(image.shape[:2], dtype=np.uint8),
            texts=texts,
            is_sentence=False,
            source=self.source,
        ).validate()


class ReferSegValDataset:
    """Referring-segmentation evaluation (the original ``ValDataset("refcoco|unc|val")``).

    One sample per image (sorted ids) with every sentence of every ref of the image, stripped and
    lower-cased, one conversation each: ``"<image>\\n What is {sent} in this image? Please output
    segmentation mask."`` answered ``"[SEG]."``. Deterministic.
    """

    def __init__(
        self,
        root: str | Path,
        dataset: str = "refcoco",
        split: str = "val",
        split_by: str | None = None,
    ) -> None:
        self.data = ReferData(root, dataset, split, split_by)
        self.source = dataset

    def __len__(self) -> int:
        return len(self.data.image_ids)

    def check_entries(self) -> Iterator[int]:
        """:meth:`ReferData.check_entries` of this split."""
        return self.data.check_entries()

    def __getitem__(self, idx: int) -> Sample:
        i = check_index(idx, len(self), f"ReferSegValDataset({self.source})")
        image_id = self.data.image_ids[i]
        sents, ann_ids = self.data.sentences(image_id)
        if not sents:
            raise DataFormatError(f"{self.data.refs_path}: image {image_id} has no sentences")
        texts = [s.strip().lower() for s in sents]
        conversations = [
            [
                (
                    IMAGE_TOKEN
                    + f"\n What is {t.strip()} in this image? Please output segmentation mask.",
                    SEGMENT_ONLY_ANSWER,
                )
            ]
            for t in texts
        ]
        path, image = self.data.read_image(image_id)
        masks = np.stack([self.data.mask(a, image_id) for a in ann_ids])
        return Sample(
            image_path=str(path),
            image=image,
            conversations=conversations,
            masks=masks,
            label=np.zeros(image.shape[:2], dtype=np.uint8),
            texts=texts,
            is_sentence=False,
            source=self.source,
        ).validate()
