"""The demo SAM mask decoder's warm-up on concept prompts, then the ``[SEG]`` projector fit.

LISA's SAM comes pretrained: its decoder already turns a prompt into the mask of one object. The
demo's decoder learns here to segment what a concept prompt names (:class:`ConceptPrompts` of
:func:`concept_key`, :func:`warm_up_sam_decoder`); then the ``[SEG]`` projector is solved so that
the LLM's state for a query lands on its concept's prompt (:func:`fit_seg_projector_`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lisa_model.modeling import LisaModel
from lisa_model.options import native_bf16
from training.data.types import check_counts
from training.demo_model.loop import check_schedule, train_warmup
from training.demo_model.sam_encoder import object_coverage
from training.shapes.datasets import ShapesValDataset, query_focus
from training.shapes.records import ShapesImageRecord, ShapesQueriesFile, ShapesQueryRecord
from training.shapes.writer import SIDECAR_FILE


@dataclass(frozen=True)
class DecoderWarmup:
    """Concept-prompted training of SAM's mask decoder, then a fit of the ``[SEG]`` projector
    (see :func:`warm_up_sam_decoder` and :func:`fit_seg_projector_`).

    Attributes:
        steps: optimiser steps of the decoder; 0 skips the warm-up and the fit.
        batch_size: images per step.
        queries_per_image: present-target queries (masks) per image and step.
        lr: peak AdamW rate (linear warm-up over ``warmup_steps``, then cosine to 0).
        warmup_steps: steps of the linear warm-up.
        max_images: training images whose SAM embeddings are computed once and kept
            (``(256, 32, 32)`` float16, 0.5 MB each, for the demo's SAM).
        fit_samples: training queries whose ``[SEG]`` states the projector is fitted on.
        bf16: run the decoder's forward under bfloat16 autocast (weights and optimiser stay
            float32): 1.4x faster on a CPU with AVX512-BF16, as on CUDA; ``None``: where the
            device computes bfloat16 natively (:func:`native_bf16`).
        seed: draws of images and queries.
        log_every: steps per entry of the returned loss history.
    """

    steps: int = 600
    batch_size: int = 8
    queries_per_image: int = 4
    lr: float = 1e-3
    warmup_steps: int = 50
    max_images: int = 1200
    fit_samples: int = 2048
    bf16: bool | None = None
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        check_counts(
            batch_size=self.batch_size,
            queries_per_image=self.queries_per_image,
            log_every=self.log_every,
            max_images=self.max_images,
            fit_samples=self.fit_samples,
        )
        check_schedule(self)


def concept_key(record: ShapesImageRecord, query: ShapesQueryRecord) -> str:
    """What a present-target query asks for, in words: ``"red triangle"``, ``"round"``,
    ``"leftmost"``, ``"biggest on the left"`` (:attr:`Focus.key`, from the query's words)."""
    return query_focus(record, query).key


class ConceptPrompts(torch.nn.Module):
    """SAM prompts ``(N, 256)`` for concept keys: the sum of one learned vector per word, so
    ``"red triangle"`` is ``red + triangle`` and ``"biggest on the left"`` shares ``biggest``
    with ``"biggest"``.

    Args:
        words: the vocabulary (every word of every key it will be asked for).
        dim: prompt width (SAM's 256).
        seed: the N(0, 1) initialisation (the scale of SAM's own point prompts).
    """

    def __init__(self, words: Sequence[str], dim: int = 256, seed: int = 0) -> None:
        super().__init__()
        self.words = tuple(sorted(set(words)))
        self.index = {w: i for i, w in enumerate(self.words)}
        generator = torch.Generator().manual_seed(seed)
        self.table = torch.nn.Parameter(torch.randn(len(self.words), dim, generator=generator))

    def forward(self, keys: Sequence[str]) -> torch.Tensor:
        rows = []
        for key in keys:
            words = key.split()
            unknown = [w for w in words if w not in self.index]
            if unknown or not words:
                raise KeyError(f"ConceptPrompts: no vector for {unknown or key!r} in {key!r}")
            rows.append(self.table[[self.index[w] for w in words]].sum(0))
        return torch.stack(rows)


def _present_queries(record: ShapesImageRecord) -> list[tuple[str, tuple[int, ...]]]:
    return [
        (concept_key(record, q), q.target_ids)
        for q in record.queries
        if q.kind != "absent" and q.target_ids
    ]


@dataclass
class DecoderData:
    """The first training images as SAM's mask decoder sees them, read once by
    :func:`warm_up_sam_decoder` (SAM's encoder is fixed by then).

    Attributes:
        embeddings: per image, its ``(256, g, g)`` float16 SAM embedding.
        object_masks: per image, ``(n_obj, 4g, 4g)`` soft 0..1 object masks in the decoder's
            low-resolution frame (:func:`object_coverage`).
        queries: per image, ``(concept key, target ids)`` of its present-target queries.
        source: the sidecar file the records came from (for error messages).
    """

    embeddings: list[torch.Tensor]
    object_masks: list[torch.Tensor]
    queries: list[list[tuple[str, tuple[int, ...]]]]
    source: Path

    def target(self, image: int, target_ids: Sequence[int]) -> torch.Tensor:
        """``(4g, 4g)`` union mask of ``target_ids`` in image ``image``."""
        return self.object_masks[image][list(target_ids)].sum(0).clamp(max=1)


@torch.no_grad()
def read_decoder_data(
    model: LisaModel, data_dir: str | Path, max_images: int, progress: bool = True
) -> DecoderData:
    """Embed the first ``max_images`` training images with SAM's encoder (see
    :class:`DecoderData`)."""
    from tqdm import tqdm

    from lisa_model.processing import sam_preprocess, sam_resize
    from training.data.types import read_image

    sam = model.sam
    size = int(sam.image_encoder.img_size)
    low = 4 * int(sam.prompt_encoder.image_embedding_size[0])
    split = Path(data_dir) / "train"
    records = ShapesQueriesFile(split / SIDECAR_FILE)
    count = min(max_images, len(records))
    data = DecoderData([], [], [], split / SIDECAR_FILE)
    was_training = sam.image_encoder.training
    sam.image_encoder.eval()
    for i in tqdm(range(count), desc="decoder warm-up: embedding", disable=not progress):
        record = records.record(i)
        resized = sam_resize(read_image(split / record.image), size)
        embedding = model.encode_sam(sam_preprocess(resized, size)[None])
        data.embeddings.append(embedding[0].half())  # (256, g, g)
        hw = (resized.shape[0], resized.shape[1])
        data.object_masks.append(torch.from_numpy(object_coverage(record, low, size, hw)))
        data.queries.append(_present_queries(record))
    sam.image_encoder.train(was_training)
    return data


def _mask_step_loss(
    model: LisaModel,
    data: DecoderData,
    images: Sequence[int],
    prompt: Callable[[list[str]], torch.Tensor],
    cfg: DecoderWarmup,
    rng: np.random.Generator,
) -> Callable[[], torch.Tensor]:
    """The decoder warm-up's step: ``cfg.batch_size`` draws of ``images``, up to
    ``cfg.queries_per_image`` of each one's ``data.queries[image]`` (``(concept key, target
    ids)`` pairs), prompts ``prompt(keys)``, ``lisa-train``'s mask losses against the union
    masks in the decoder's low-resolution frame."""
    from lisa_model.losses import mask_losses

    bf16 = native_bf16(model.device) if cfg.bf16 is None else cfg.bf16

    def step_loss() -> torch.Tensor:
        preds, targets = [], []
        for image in rng.choice(images, size=cfg.batch_size).tolist():
            pairs = data.queries[image]
            n = min(cfg.queries_per_image, len(pairs))
            chosen = [pairs[j] for j in rng.choice(len(pairs), size=n, replace=False)]
            with torch.autocast(model.device.type, torch.bfloat16, enabled=bf16):
                prompts = prompt([source for source, _ in chosen])
                preds.append(model.decode_masks(data.embeddings[image][None], prompts).float())
            target = [data.target(image, ids) for _, ids in chosen]
            targets.append(torch.stack(target).to(preds[-1].device))
        return mask_losses(preds, targets).total

    return step_loss


def warm_up_sam_decoder(
    model: LisaModel,
    data_dir: str | Path,
    cfg: DecoderWarmup,
    progress: bool = True,
) -> tuple[list[float], ConceptPrompts]:
    """Train SAM's mask decoder to segment what a concept prompt names, in place.

    LISA's SAM comes pretrained: its decoder already turns a prompt into the mask of one
    object. The demo's decoder starts from random weights, and trained only through the LLM
    inside ``lisa-train`` (about 11 masks a second on two cores, most of the 800 steps spent on
    colours) it never learned the comparisons: "the leftmost one", "the smallest" scored
    0.26-0.37 gIoU while the LLM's prompts told them apart (linear probe 97%). This is the
    demo's stand-in for SAM's pretraining, with concept prompts in place of points (as SAM's
    own text-to-mask experiment put CLIP embeddings in the prompt slot): each present query of
    the training split is prompted by :class:`ConceptPrompts` of its :func:`concept_key`, and
    the decoder (with the prompt encoder's no-mask embedding and the word vectors) learns the
    union mask of its targets with ``lisa-train``'s mask losses (BCE 2, Dice 0.5) on the
    ``(4g, 4g)`` low-resolution logits. SAM's image encoder is fixed (its embeddings are
    computed once, :func:`read_decoder_data`), so a step costs only the decoder: about 30 masks a
    second on two cores of a CPU with AVX512-BF16 under bfloat16 autocast (``cfg.bf16``), 27 in
    float32.

    Returns:
        ``(history, prompts)``: the mean loss of every ``cfg.log_every`` steps, and the trained
        concept prompts (for :func:`fit_seg_projector_`).
    """
    data = read_decoder_data(model, data_dir, cfg.max_images, progress)
    queries = data.queries
    usable = [i for i in range(len(queries)) if queries[i]]
    if not usable:
        raise ValueError(f"decoder warm-up: no present-target query in {data.source}")
    prompts = ConceptPrompts([w for qs in queries for key, _ in qs for w in key.split()])
    prompts.to(model.device)
    decoder, no_mask = model.sam.mask_decoder, model.sam.prompt_encoder.no_mask_embed
    decoder.train()
    params = [*decoder.parameters(), *no_mask.parameters(), *prompts.parameters()]
    for p in params:
        p.requires_grad_(True)
    step_loss = _mask_step_loss(model, data, usable, prompts, cfg, np.random.default_rng(cfg.seed))

    history = train_warmup(params, cfg, step_loss, "decoder warm-up", progress)
    decoder.eval()
    prompts.requires_grad_(False)
    return history, prompts


@torch.no_grad()
def seg_states(
    model: LisaModel, samples: Sequence, batch_size: int = 8, progress: bool = False
) -> torch.Tensor:
    """``(N, H)`` final-norm LLM states that SAM reads for the ``[SEG]`` of ``samples`` (one
    ``[SEG]`` each: :class:`ShapesValDataset` present-target samples, answer ``"[SEG]."``)."""
    from tqdm import tqdm

    from lisa_model.modeling import seg_hidden_positions
    from training.evaluate import make_collator

    collate = make_collator(model)
    states = []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="[SEG] states", unit="batch", disable=not progress):
        batch = collate(samples[start : start + batch_size])
        clip = model.encode_clip(batch.images_clip.to(model.device, model.dtype))
        offsets = [int(o) for o in batch.offsets]
        counts = torch.tensor([b - a for a, b in zip(offsets[:-1], offsets[1:])])
        ids = batch.input_ids.to(model.device)
        embeds, mask, _ = model.embed_inputs(
            ids, clip.repeat_interleave(counts, dim=0), batch.attention_mask.to(model.device)
        )
        hidden = model.llm.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        rows, pos = seg_hidden_positions(
            ids, model.seg_token_id, model.image_token_index, model.num_image_tokens
        )
        if len(rows) != ids.shape[0]:
            raise ValueError(f"seg_states: {len(rows)} [SEG] tokens in {ids.shape[0]} samples")
        states.append(hidden[rows, pos].float())
    return torch.cat(states)


@dataclass(frozen=True)
class ProjectorFit:
    """Mean cosine between projected ``[SEG]`` states and their concept prompts (see
    :func:`fit_seg_projector_`): before the fit, after it on the queries it was fitted on, and
    after it on held-out queries (one in ten, none fitted on)."""

    before: float
    fitted: float
    held_out: float


def fit_seg_projector_(
    model: LisaModel,
    data_dir: str | Path,
    prompts: ConceptPrompts,
    cfg: DecoderWarmup,
    progress: bool = True,
) -> ProjectorFit:
    """Fit the ``[SEG]`` projector so that the LLM's state for a query becomes the concept
    prompt the warmed-up decoder knows (in place).

    ``cfg.fit_samples`` present-target training queries are asked in the fast path's form (the
    ReasonSeg validation question, answer ``"[SEG]."``) with their image, as ``lisa-train``
    and ``lisa-eval`` ask them; their ``[SEG]`` states (:func:`seg_states`) are regressed onto
    ``prompts(concept_key)``: the output layer by least squares (a tiny ridge) on the first
    layer's features, in closed form. (A few AdamW steps on both layers after it, tried, undid
    the fit: the solution is finely balanced.) One query in ten is held out to report how well
    the fit generalises. The LLM, CLIP, SAM and the projector's first layer are left as they
    are.
    """
    from tqdm import tqdm

    dataset = ShapesValDataset(data_dir, "train", max_images=cfg.max_images)
    rng = np.random.default_rng(cfg.seed + 1)
    picks = rng.choice(len(dataset), size=min(cfg.fit_samples, len(dataset)), replace=False)
    samples, keys = [], []
    for i in tqdm(picks.tolist(), desc="[SEG] projector fit: reading", disable=not progress):
        record = dataset.file.record(dataset.items[i][0])
        keys.append(concept_key(record, dataset.query(i)))
        samples.append(dataset[i])
    was_training = model.training
    model.eval()
    states = seg_states(model, samples, progress=progress)
    model.train(was_training)
    targets = prompts(keys).detach().to(states.device, torch.float32)
    held = torch.zeros(len(states), dtype=torch.bool, device=states.device)
    held[::10] = len(states) >= 10  # none held out of fewer than ten
    fit_states, fit_targets = states[~held], targets[~held]
    projector = model.seg_projector
    first, last = projector[0], projector[2]

    def cosine(x: torch.Tensor, y: torch.Tensor) -> float:
        if len(x) == 0:
            return float("nan")
        with torch.no_grad():
            projected = model.project_seg_hidden(x).float()
            return float(torch.nn.functional.cosine_similarity(projected, y).mean())

    before = cosine(states[held], targets[held]) if held.any() else cosine(states, targets)
    with torch.no_grad():
        features = torch.relu(first(fit_states.to(first.weight.dtype))).double()
        features = torch.cat([features, features.new_ones(len(features), 1)], 1)  # (N, H + 1)
        gram = features.T @ features
        ridge = 1e-6 * gram.diagonal().mean().clamp_min(1e-12)
        solution = torch.linalg.solve(
            gram + ridge * torch.eye(len(gram), dtype=gram.dtype, device=gram.device),
            features.T @ fit_targets.double(),
        )  # (H + 1, 256)
        last.weight.copy_(solution[:-1].T.to(last.weight.dtype))
        last.bias.copy_(solution[-1].to(last.bias.dtype))
    return ProjectorFit(
        before=before,
        fitted=cosine(fit_states, fit_targets),
        held_out=cosine(states[held], targets[held]),
    )
