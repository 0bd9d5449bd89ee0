"""The demo SAM image encoder's warm-up: the shape, colour and relations under each patch.

LISA starts from a pretrained SAM whose image embedding already separates objects and their
forms; the demo's small convolutional encoder learns it here from the generator's own object
masks (:func:`warm_up_sam_encoder`), through a throwaway head on per-patch labels
(:func:`patch_labels`, :func:`relation_flags`, :func:`foreground_coverage`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lisa_model.modeling import LisaModel
from training.data.types import check_counts
from training.demo_model.loop import check_schedule, train_warmup
from training.shapes.records import ShapesQueriesFile
from training.shapes.vocabulary import COLOURS, SHAPES, corner_range
from training.shapes.writer import SIDECAR_FILE


@dataclass(frozen=True)
class EncoderWarmup:
    """Per-patch shape, colour and relation labels through SAM's image encoder before
    ``lisa-train`` (see :func:`warm_up_sam_encoder`).

    Attributes:
        steps: optimiser steps; 0 skips the warm-up.
        batch_size: images per step.
        lr: peak AdamW rate (linear warm-up over ``warmup_steps``, then cosine to 0).
        warmup_steps: steps of the linear warm-up.
        max_images: training images read (once, into memory: 0.4 MB each at 256 px).
        background_weight: weight of background patches in the cross-entropy.
        relation_weight: weight of the object patches' :data:`RELATIONS` loss (binary
            cross-entropy); 0 leaves it out.
        detail_weight: weight of the sub-patch foreground loss (binary cross-entropy of each
            patch's ``4 x 4`` cells in the mask decoder's low-resolution frame, see
            :func:`warm_up_sam_encoder`); 0 leaves it out.
        seed: draws of images.
        log_every: steps per entry of the returned loss history.
    """

    steps: int = 1000
    batch_size: int = 8
    lr: float = 1e-3
    warmup_steps: int = 50
    max_images: int = 3000
    background_weight: float = 0.2
    relation_weight: float = 1.0
    detail_weight: float = 1.0
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        check_counts(
            batch_size=self.batch_size, log_every=self.log_every, max_images=self.max_images
        )
        check_schedule(self)
        for name in ("relation_weight", "detail_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"EncoderWarmup: {name} must be >= 0, got {getattr(self, name)}")


def object_coverage(record, size: int, img_size: int, resized_hw: tuple[int, int]) -> np.ndarray:
    """``(n_objects, size, size)`` float32 in [0, 1]: how much of each cell of a ``size`` grid
    over SAM's padded ``img_size`` square each object covers. ``resized_hw`` is the image's size
    inside that square (top-left aligned, as :func:`sam_preprocess` pads)."""
    import cv2

    h, w = resized_hw
    cover = []
    for k in range(len(record.objects)):
        mask = cv2.resize(
            record.object_mask(k).astype(np.float32), (w, h), interpolation=cv2.INTER_AREA
        )
        full = np.zeros((img_size, img_size), np.float32)
        full[:h, :w] = mask
        cover.append(cv2.resize(full, (size, size), interpolation=cv2.INTER_AREA))
    return np.stack(cover) if cover else np.zeros((0, size, size), np.float32)


def foreground_coverage(
    record, size: int, img_size: int, resized_hw: tuple[int, int]
) -> np.ndarray:
    """``(size, size)`` float32 in [0, 1]: how much of each cell any object covers (the union of
    :func:`object_coverage`, same arguments)."""
    cover = object_coverage(record, size, img_size, resized_hw)
    if not len(cover):
        return np.zeros((size, size), np.float32)
    return np.clip(cover.sum(0), 0.0, 1.0)


def patch_owners(record, grid: int, img_size: int, resized_hw: tuple[int, int]) -> torch.Tensor:
    """The object under each patch, ``(grid, grid)`` int64, -1 for background.

    A patch takes the object that covers most of it (:func:`object_coverage`), if that covers
    at least half of it, else background.
    """
    background = np.full((1, grid, grid), 0.5, np.float32)  # wins below half a patch
    cover = np.concatenate([background, object_coverage(record, grid, img_size, resized_hw)])
    return torch.from_numpy(cover.argmax(0).astype(np.int64) - 1)


def patch_labels(
    record,
    grid: int,
    img_size: int,
    resized_hw: tuple[int, int],
    owner: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-patch ``(shape, colour)`` class maps, each ``(grid, grid)`` int64, of one shapes image:
    the classes of the object under the patch (:func:`patch_owners`, or ``owner`` when the
    caller has it already), background ``len(SHAPES)`` / ``len(COLOURS)``."""
    if owner is None:
        owner = patch_owners(record, grid, img_size, resized_hw)
    shape_ids = [SHAPES.index(o.shape) for o in record.objects] + [len(SHAPES)]
    colour_ids = [COLOURS.index(o.colour) for o in record.objects] + [len(COLOURS)]
    # owner -1 (background) picks the appended last entry
    return torch.tensor(shape_ids)[owner], torch.tensor(colour_ids)[owner]


#: The object relations of :func:`relation_flags`, in column order.
RELATIONS: tuple[str, ...] = (
    "leftmost",
    "rightmost",
    "topmost",
    "bottommost",
    "biggest",
    "smallest",
    "most_corners",
    "fewest_corners",
    "biggest_in_left_right_half",
    "smallest_in_left_right_half",
    "biggest_in_top_bottom_half",
    "smallest_in_top_bottom_half",
)


def relation_flags(record) -> torch.Tensor:
    """``(n_objects, len(RELATIONS))`` float32 0/1: which objects of a shapes image are the
    extremes the comparison queries ask for (ties: all of them).

    Measured on the visible regions (image frame), as the generator decides its queries: the
    extreme pixel towards each edge, the visible area, the corner counts
    (:func:`corner_range`: most by the fewest count, fewest by the most count), and size
    among the objects whose centroid is in the same left/right (top/bottom) half.
    """
    n = len(record.objects)
    left, right, top, bottom = (np.zeros(n) for _ in range(4))
    area, cx, cy = np.zeros(n), np.zeros(n), np.zeros(n)
    for k in range(n):
        ys, xs = np.nonzero(record.object_mask(k))
        if len(xs) == 0:  # hidden entirely: never an extreme
            left[k], right[k], top[k], bottom[k] = np.inf, -np.inf, np.inf, -np.inf
            area[k], cx[k], cy[k] = np.nan, -1.0, -1.0
            continue
        left[k], right[k], top[k], bottom[k] = xs.min(), xs.max(), ys.min(), ys.max()
        area[k], cx[k], cy[k] = len(xs), xs.mean(), ys.mean()
    corners = np.array([corner_range(o.shape) for o in record.objects]).reshape(n, 2)
    flags = [
        left == left.min(),
        right == right.max(),
        top == top.min(),
        bottom == bottom.max(),
        area == np.nanmax(area),
        area == np.nanmin(area),
        corners[:, 0] == corners[:, 0].max(),
        corners[:, 1] == corners[:, 1].min(),
    ]
    for centre, extent in ((cx, record.width), (cy, record.height)):
        low = centre < extent / 2.0
        big, small = np.zeros(n, bool), np.zeros(n, bool)
        for half in (low, ~low):
            sizes = np.where(half, area, np.nan)
            if np.isfinite(sizes).any():
                big |= half & (area == np.nanmax(sizes))
                small |= half & (area == np.nanmin(sizes))
        flags += [big, small]
    return torch.from_numpy(np.stack(flags, 1).astype(np.float32))


def warm_up_sam_encoder(
    model: LisaModel, data_dir: str | Path, cfg: EncoderWarmup, progress: bool = True
) -> list[float]:
    """Train SAM's image encoder to tell the shape, colour and relations under each patch, in
    place.

    LISA starts from a pretrained SAM whose image embedding already separates objects and their
    forms; a fresh encoder trained only through the mask loss of ``lisa-train`` does not learn
    shapes within the CPU budget (linear probe on the earlier demo model's ViT encoder: 29% of
    held-out objects, 8 shapes). This is the demo's stand-in for SAM's pretraining: a throwaway
    1x1 convolution on the ``(B, 256, g, g)`` embedding predicts each patch's shape and colour
    (cross-entropy, background down-weighted), labels from the generator's own object masks
    (:func:`patch_labels`). The head is discarded; only the encoder keeps what it learned.
    Measured on the demo's :class:`~lisa_model.sam.ConvImageEncoder` (linear probe, test
    images): 81% of held-out objects' shapes after 600 steps, 94% after 1,000 (8 minutes).

    The same head also predicts, on object patches, whether the object is one of the scene's
    extremes (:data:`RELATIONS`: leftmost, biggest, most corners, ...; binary cross-entropy
    weighted ``cfg.relation_weight``). Real SAM features hold no such thing (LISA's 7B LLM does
    the comparing); the demo's mask decoder, trained within minutes, compares objects poorly
    by itself. With these labels a comparison becomes a lookup like a colour: the decoder
    warm-up (:func:`~training.demo_model.sam_decoder.warm_up_sam_decoder`, 500 steps,
    validation queries, low resolution) reached 0.76-0.79 gIoU on positions, 0.83 on "the
    biggest", 0.62 on "the smallest" on this encoder, against 0.58-0.60, 0.60 and 0.40 on one
    warmed up without them (all queries: 0.744 against 0.696). Linear probe after 1,000 steps,
    held-out test objects (balanced accuracy, chance 0.5): leftmost/rightmost/topmost/bottommost
    0.90-0.95, biggest 0.86, smallest 0.75, by half 0.65-0.78, corners 0.71-0.73 (the encoder
    before: 0.50-0.54 for positions); shape 93% as without them.

    Per-patch labels say what is under a patch, not where in it the object's edge runs, and
    SAM's decoder draws its mask from the embedding alone (two transposed convolutions to the
    ``4g`` low-resolution frame). On the encoder warmed up with those labels only, a linear
    probe from the embedding to the 8 x 8 pixels of each patch found the foreground with IoU
    0.83 (validation images), about the IoU of the demo model's masks on objects it found
    (0.82); the low-resolution frame itself allows 0.98 (the foreground taken down to it and
    back up bilinearly). So the head also predicts, per patch, the
    ``4 x 4`` cells of the decoder's frame that any object covers (:func:`foreground_coverage`,
    soft targets, binary cross-entropy weighted ``cfg.detail_weight``, pixel-shuffled to
    ``(4g, 4g)``).

    Returns:
        the mean loss of every ``cfg.log_every`` steps.
    """
    from tqdm import tqdm

    from lisa_model.processing import sam_preprocess, sam_resize
    from training.data.types import read_image

    encoder = model.sam.image_encoder
    size = int(encoder.img_size)
    grid = int(model.sam.prompt_encoder.image_embedding_size[0])
    split = Path(data_dir) / "train"
    records = ShapesQueriesFile(split / SIDECAR_FILE)
    count = min(cfg.max_images, len(records))
    low = 4 * grid  # the mask decoder's low-resolution frame
    images, shape_maps, colour_maps, relation_maps, detail_maps = [], [], [], [], []
    for i in tqdm(range(count), desc="encoder warm-up: reading", disable=not progress):
        record = records.record(i)
        resized = sam_resize(read_image(split / record.image), size)
        images.append(sam_preprocess(resized, size).half())
        hw = (resized.shape[0], resized.shape[1])
        owner = patch_owners(record, grid, size, hw)
        sl, cl = patch_labels(record, grid, size, hw, owner=owner)
        shape_maps.append(sl)
        colour_maps.append(cl)
        # (grid, grid, R) flags of the patch's object; background rows are NaN (no loss)
        flags = torch.cat([relation_flags(record), torch.full((1, len(RELATIONS)), torch.nan)])
        relation_maps.append(flags[owner].half())
        foreground = foreground_coverage(record, low, size, hw)
        detail_maps.append(torch.from_numpy(np.round(255 * foreground).astype(np.uint8)))
    n_shape, n_colour = len(SHAPES) + 1, len(COLOURS) + 1
    n_cls = n_shape + n_colour + len(RELATIONS)
    out_chans = int(model.sam.prompt_encoder.embed_dim)
    head = torch.nn.Conv2d(out_chans, n_cls + (low // grid) ** 2, 1)
    to_cells = torch.nn.PixelShuffle(low // grid)  # (B, 16, g, g) -> (B, 1, 4g, 4g)
    shape_weight = torch.ones(n_shape)
    shape_weight[-1] = cfg.background_weight
    colour_weight = torch.ones(n_colour)
    colour_weight[-1] = cfg.background_weight

    encoder.train()
    params = list(encoder.parameters())
    for p in params:
        p.requires_grad_(True)
    params += list(head.parameters())
    rng = np.random.default_rng(cfg.seed)

    def step_loss() -> torch.Tensor:
        ids = rng.integers(count, size=cfg.batch_size).tolist()
        x = torch.stack([images[i] for i in ids]).float()
        logits = head(encoder(x))  # (B, n_shape + n_colour + R + 16, g, g)
        shape_t = torch.stack([shape_maps[i] for i in ids])
        colour_t = torch.stack([colour_maps[i] for i in ids])
        loss = torch.nn.functional.cross_entropy(
            logits[:, :n_shape], shape_t, weight=shape_weight
        ) + torch.nn.functional.cross_entropy(
            logits[:, n_shape : n_shape + n_colour], colour_t, weight=colour_weight
        )
        relation_t = torch.stack([relation_maps[i] for i in ids]).float()  # (B, g, g, R)
        owned = ~relation_t[..., 0].isnan()
        if cfg.relation_weight > 0 and owned.any():
            relation_logits = logits[:, n_shape + n_colour : n_cls].permute(0, 2, 3, 1)[owned]
            loss = loss + cfg.relation_weight * (
                torch.nn.functional.binary_cross_entropy_with_logits(
                    relation_logits, relation_t[owned]
                )
            )
        if cfg.detail_weight > 0:
            detail_t = torch.stack([detail_maps[i] for i in ids]).float() / 255  # (B, 4g, 4g)
            detail_logits = to_cells(logits[:, n_cls:])[:, 0]
            loss = loss + cfg.detail_weight * (
                torch.nn.functional.binary_cross_entropy_with_logits(detail_logits, detail_t)
            )
        return loss

    history = train_warmup(params, cfg, step_loss, "encoder warm-up", progress)
    encoder.eval()
    return history
