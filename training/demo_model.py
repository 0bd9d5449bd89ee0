"""The starting point of the embedded demo model: a fresh small LISA for the shapes data.

The demo model is trained from scratch by this project's own training code on the synthetic
"reasoning shapes" data (:mod:`training.shapes`). Its starting checkpoint is built here:

1. a LLaMA-like SentencePiece tokenizer trained on the data's own vocabulary (every text, answer
   and explanation of the training split, plus the chat template and the paper's question and
   answer lists), with the LISA-7B-v1 added tokens (``<im_patch> <im_start> <im_end> [SEG]``);
2. a randomly initialised LISA of :data:`DEMO_SPEC` (:func:`lisa_model.builders.build_lisa`),
   its LLM given a text-only language warm-up on the training split's conversations
   (:func:`warm_up_language`, LISA's stand-in for a pretrained LLaVA), its ``[SEG]``
   projector centred on the warmed state (:func:`center_seg_projector_`), its SAM image
   encoder (a small convolutional one, :class:`lisa_model.sam.ConvImageEncoder`) taught the
   shape, colour and relations under each patch (:func:`warm_up_sam_encoder`) and its SAM mask
   decoder taught to segment what a concept prompt names (:func:`warm_up_sam_decoder`), the
   two together the stand-in for SAM's pretraining; last, the ``[SEG]`` projector fitted so
   that the LLM's state for a query lands on its concept's prompt
   (:func:`fit_seg_projector_`);
3. saved self-contained in the published layout (CLIP tower included), so training starts from
   it like from any checkpoint and the result loads with :func:`lisa_model.checkpoint.load_lisa`.

Command line::

    python -m training.demo_model init --data runs/shapes --out runs/demo/init
    python -m training.demo_model warmup --model CKPT --data runs/shapes --out DIR
    python -m training.demo_model eval --model CKPT --data runs/shapes --split test
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from lisa_model.builders import ADDED_TOKEN_LAYOUTS, ModelSpec, build_lisa
from lisa_model.checkpoint import save_lisa
from lisa_model.metrics import SegMetrics
from lisa_model.modeling import IGNORE_INDEX, LisaModel
from lisa_model.options import native_bf16
from lisa_model.prompts import (
    ANSWER_LIST,
    EXPLANATORY_QUESTION_LIST,
    IM_END_TOKEN,
    IM_START_TOKEN,
    IMAGE_TOKEN,
    LONG_QUESTION_LIST,
    SHORT_QUESTION_LIST,
    TEMPLATES,
    render_conversation,
)
from lisa_model.sam import SamGeometry
from lisa_model.tokenizer import LisaTokenizer, train_sentencepiece
from training import shapes
from training.collate import conversation_labels, pad_right
from training.data.shapes_queries import (
    PRESENT_GROUPS,
    SIDECAR_FILE,
    ShapesImageRecord,
    ShapesQueriesFile,
    ShapesQueryDataset,
    ShapesQueryMix,
    ShapesQueryRecord,
    ShapesValDataset,
    concept_answer,
    query_focus,
    terse_answer,
)
from training.data.types import check_counts

#: Sizes of the demo model (see the module docstring of the recipe for how they were chosen).
DEMO_SPEC = ModelSpec(
    hidden_size=256,
    num_layers=4,
    num_heads=4,
    intermediate_size=688,
    max_position_embeddings=512,
    clip_hidden=128,
    clip_layers=2,
    clip_heads=4,
    clip_intermediate=512,
    clip_image_size=224,
    clip_patch_size=14,
    sam=SamGeometry(
        img_size=256,
        patch_size=8,
        embed_dim=128,
        depth=4,
        encoder="conv",
        conv_widths=(32, 64, 96),
        decoder_mlp_dim=512,
    ),
)
#: Written beside a trained demo checkpoint by ``eval --record``: data seed, scene settings and
#: the evaluation report.
RECIPE_FILE = "demo.json"
#: SentencePiece vocabulary size of the demo tokenizer (before the added tokens).
DEMO_VOCAB_SIZE = 1000
DEMO_TOKEN_LAYOUT = "7b-v1"
#: How often the fixed template sentences enter the tokenizer corpus.
TEMPLATE_REPEATS = 5000


def demo_corpus(data_dir: str | Path, split: str = "train") -> Iterator[str]:
    """Sentences the demo tokenizer is trained on, in a fixed order.

    The chat template's system prompt and roles and the paper's question/answer templates
    (each :data:`TEMPLATE_REPEATS` times: they are in every conversation, so their words should
    be single pieces), then every text, answer and explanation of
    ``<data_dir>/<split>/queries.jsonl`` (line order).
    """
    templates = []
    for template in TEMPLATES.values():
        templates += [template.system, " ".join(template.roles) + ":"]
    for question in (*SHORT_QUESTION_LIST, *LONG_QUESTION_LIST):
        templates.append(
            question.replace("<image>\n", "").format(class_name="the red circle", sent="")
        )
    templates += [*EXPLANATORY_QUESTION_LIST, *ANSWER_LIST]
    for _ in range(TEMPLATE_REPEATS):
        yield from templates
    sidecar = ShapesQueriesFile(Path(data_dir) / split / SIDECAR_FILE)
    for i in range(len(sidecar)):
        record = sidecar.record(i)
        for query in record.queries:
            yield from query.texts
            yield query.answer
            yield query.explanation
            if query.target_ids:
                yield concept_answer(record, query)
                yield terse_answer(record, query)


def train_demo_tokenizer(
    data_dir: str | Path, vocab_size: int = DEMO_VOCAB_SIZE, split: str = "train"
) -> LisaTokenizer:
    """A LISA tokenizer whose SentencePiece model is trained on :func:`demo_corpus`.

    Deterministic: the same data gives the same ids. ``[SEG]`` and the image tokens are
    added after the SentencePiece pieces (LISA-7B-v1 order).
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = train_sentencepiece(
            demo_corpus(data_dir, split), vocab_size, Path(tmp) / "sp.model"
        )
        return LisaTokenizer.from_sentencepiece(
            path.read_bytes(), ADDED_TOKEN_LAYOUTS[DEMO_TOKEN_LAYOUT]
        )


def build_initial_demo_checkpoint(
    out_dir: str | Path,
    data_dir: str | Path,
    spec: ModelSpec = DEMO_SPEC,
    seed: int = 0,
    vocab_size: int = DEMO_VOCAB_SIZE,
    warmup: LanguageWarmup | None = None,
    encoder_warmup: EncoderWarmup | None = None,
    decoder_warmup: DecoderWarmup | None = None,
    progress: bool = True,
) -> Path:
    """Write the untrained demo model to ``out_dir`` (published layout, CLIP tower included).

    Args:
        out_dir: the checkpoint directory to write (created; existing weight files replaced).
        data_dir: a shapes data set (``<data_dir>/train/queries.jsonl``) for the tokenizer and
            the language warm-up.
        spec: model sizes.
        seed: weight initialisation seed.
        vocab_size: SentencePiece pieces of the tokenizer.
        warmup: the LLM's text-only warm-up (:func:`warm_up_language`); ``None``: the
            defaults of :class:`LanguageWarmup` with ``seed``.
        encoder_warmup: SAM's image encoder warm-up (:func:`warm_up_sam_encoder`); ``None``:
            the defaults of :class:`EncoderWarmup` with ``seed``.
        decoder_warmup: SAM's mask decoder warm-up (:func:`warm_up_sam_decoder`) and the
            ``[SEG]`` projector fit after it (:func:`fit_seg_projector_`); ``None``: the
            defaults of :class:`DecoderWarmup` with ``seed``.
        progress: progress bars for the warm-ups.

    Returns:
        ``out_dir`` as a Path.
    """
    tokenizer = train_demo_tokenizer(data_dir, vocab_size)
    model = build_lisa(spec, tokenizer, seed=seed)
    scale_for_scratch_training_(model, seed)
    warmup = LanguageWarmup(seed=seed) if warmup is None else warmup
    if warmup.steps > 0:
        warm_up_language(model, data_dir, warmup, progress=progress)
        center_seg_projector_(model, data_dir, warmup)
    encoder_warmup = EncoderWarmup(seed=seed) if encoder_warmup is None else encoder_warmup
    if encoder_warmup.steps > 0:
        warm_up_sam_encoder(model, data_dir, encoder_warmup, progress=progress)
    decoder_warmup = DecoderWarmup(seed=seed) if decoder_warmup is None else decoder_warmup
    if decoder_warmup.steps > 0:
        _, prompts = warm_up_sam_decoder(model, data_dir, decoder_warmup, progress)
        fit = fit_seg_projector_(model, data_dir, prompts, decoder_warmup, progress)
        if progress:
            print(
                f"[SEG] projector fit, cosine to the concept prompts: {fit.before:.2f} before, "
                f"{fit.fitted:.2f} fitted, {fit.held_out:.2f} held out"
            )
    return save_lisa(model, out_dir, llm_dtype=torch.float32, include_vision_tower=True)


#: Standard deviation of the demo LLM's initial token embeddings (LLaMA's own init: 0.02).
EMBEDDING_INIT_STD = 1.0
#: Factor on the initial output layer of the ``[SEG]`` projector.
SEG_PROMPT_INIT_GAIN = 5.0


@torch.no_grad()
def scale_for_scratch_training_(model: LisaModel, seed: int = 0) -> None:
    """Initial scales for a LISA trained from scratch: distinct ``[SEG]`` prompts from step 0.

    With LLaMA's initialisation (embeddings N(0, 0.02)) the residual stream of a fresh LLM is
    dominated by attention averages over the 256 image tokens, so the ``[SEG]`` states of
    different queries are alike (cosine 0.62 between equal answers, 0.64 between different
    ones, measured on the shapes data). Token embeddings of N(0, 1) make the state before
    ``[SEG]`` carry that token (0.99 vs 0.39), and a ``[SEG]`` projector output of norm ~20
    matches the scale of SAM's own point prompts (N(0, 1) embeddings plus Fourier features).

    Measured limit (see the README's demo-model section): this alone does not keep SAM's
    freshly initialised mask decoder from learning to ignore its prompt token within the
    30-minute CPU budget.
    """
    generator = torch.Generator().manual_seed(seed + 1)
    embed = model.llm.get_input_embeddings().weight
    embed.copy_(torch.randn(embed.shape, generator=generator) * EMBEDDING_INIT_STD)
    last = model.seg_projector[2]  # Linear(H, 256)
    last.weight.mul_(SEG_PROMPT_INIT_GAIN)
    last.bias.mul_(SEG_PROMPT_INIT_GAIN)


# --------------------------------------------------------------------------- language warm-up
def _check_schedule(cfg: LanguageWarmup | EncoderWarmup | DecoderWarmup) -> None:
    """The warm-ups' shared check of ``steps``, ``warmup_steps`` and ``lr``."""
    if cfg.steps < 0 or cfg.warmup_steps < 0 or cfg.lr <= 0:
        raise ValueError(
            f"{type(cfg).__name__}: need steps >= 0, warmup_steps >= 0, lr > 0; got {cfg.steps}, "
            f"{cfg.warmup_steps}, {cfg.lr}"
        )


@dataclass(frozen=True)
class LanguageWarmup:
    """Text-only training of the fresh demo LLM before ``lisa-train`` (see
    :func:`warm_up_language`).

    Attributes:
        steps: optimiser steps; 0 skips the warm-up.
        batch_size: conversations per step.
        lr: peak AdamW rate (linear warm-up over ``warmup_steps``, then cosine to 0).
        warmup_steps: steps of the linear warm-up.
        absent: probability of an absent-target query (its answer says so).
        answers: ``(segment, plain, concept, terse)`` answer-style probabilities, the rest the
            query's own answer (as ``data.shapes_answers``).
        seed: draws of images, queries and templates.
        log_every: steps per entry of the returned loss history.
    """

    steps: int = 900
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 50
    absent: float = 0.15
    answers: tuple[float, float, float, float] = (0.4, 0.0, 0.1, 0.4)
    seed: int = 0
    log_every: int = 50

    def __post_init__(self) -> None:
        check_counts(batch_size=self.batch_size, log_every=self.log_every)
        _check_schedule(self)


def warmup_conversations(
    model: LisaModel, data_dir: str | Path, cfg: LanguageWarmup
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless ``(input_ids, labels)`` pairs, each ``(L,)`` int64: one training conversation of
    the shapes train split (:meth:`ShapesQueryDataset.draw_turns`) with the image left out
    (``<im_start><im_end>`` stay), labels ``-100`` outside the answer."""
    seg, plain, concept, terse = cfg.answers
    mix = ShapesQueryMix(
        absent=cfg.absent,
        segment_answer=seg,
        plain_answer=plain,
        concept_answer=concept,
        terse_answer=terse,
        explain=0.0,
    )
    dataset = ShapesQueryDataset(
        Path(data_dir), "train", seed=cfg.seed, num_queries_per_image=1, mix=mix
    )
    tokenizer, template = model.tokenizer, model.config.conv_template
    use_im_start_end = model.config.use_im_start_end
    rng = np.random.default_rng(cfg.seed)
    while True:
        record = dataset.file.record(int(rng.integers(len(dataset.file))))
        turn = dataset.draw_turns(record, rng)[0]
        question = turn.question.replace(IMAGE_TOKEN, "")
        if use_im_start_end:
            question = IM_START_TOKEN + IM_END_TOKEN + question
        text = render_conversation([(question, turn.answer)], template, use_im_start_end)
        ids = torch.tensor(tokenizer.tokenizer_image_token(text), dtype=torch.long)
        yield ids, conversation_labels(text, ids, tokenizer, template)


def _train_warmup(
    params: list[torch.nn.Parameter],
    cfg: LanguageWarmup | EncoderWarmup | DecoderWarmup,
    step_loss: Callable[[], torch.Tensor],
    desc: str,
    progress: bool,
) -> list[float]:
    """The warm-ups' shared loop: AdamW at ``cfg.lr`` (linear warm-up over ``cfg.warmup_steps``,
    then cosine to 0), gradients clipped at 1, ``cfg.steps`` steps of ``step_loss()``.

    Returns:
        the mean loss of every ``cfg.log_every`` steps.
    """
    from tqdm import tqdm

    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.0)

    def rate(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
        return 0.5 * (1.0 + float(np.cos(np.pi * min(t, 1.0))))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, rate)
    history, window = [], []
    bar = tqdm(range(cfg.steps), desc=desc, disable=not progress)
    for _ in bar:
        loss = step_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        window.append(loss.item())
        if len(window) == cfg.log_every:
            history.append(sum(window) / len(window))
            window = []
            bar.set_postfix(loss=f"{history[-1]:.3f}")
    return history


def shared_prefix_lm_loss(
    llm: torch.nn.Module,
    input_ids: Sequence[torch.Tensor],
    labels: Sequence[torch.Tensor],
    pad_id: int,
) -> torch.Tensor:
    """The causal LM's next-token loss of a batch (shifted, ``-100`` ignored, mean over the
    labelled tokens: LISA's CE term), with the rows' common prefix computed once.

    Every warm-up conversation starts with the same system prompt and roles (34 of about 60
    tokens with the demo tokenizer), and causal attention makes their states the same in every
    row. So the prefix runs once as a batch of one, its keys and values are shared by every
    row (their gradients add up in the one prefix pass), and only the rest of each row runs
    per row: the loss and gradients equal those of the whole padded batch up to float
    rounding. The prefix ends before the first scored token's predecessor (the loss reads the
    logits at position ``t`` for the label at ``t + 1``), so every scored prediction is made
    in the per-row part. Without a common prefix, or with one row, this is the plain padded
    forward.

    Args:
        llm: a transformers causal LM (``LlamaForCausalLM``).
        input_ids: per row, ``(L_i,)`` int64 token ids.
        labels: per row, ``(L_i,)`` int64 targets, ``-100`` where nothing is scored.
        pad_id: the id the rows are padded with on the right (masked out of attention).
    """
    from transformers import DynamicCache

    rows = len(input_ids)
    full_ids = pad_right(input_ids, pad_id)
    full_labels = pad_right(labels, IGNORE_INDEX)
    shortest = min(len(ids) for ids in input_ids)
    scored = full_labels.ne(IGNORE_INDEX).any(0)  # (max_len,) columns with a scored token
    first_scored = int(scored.int().argmax()) if scored.any() else shortest
    limit = max(min(shortest, first_scored) - 1, 0)  # no pad, no scored prediction before it
    differs = (full_ids[:, :limit] != full_ids[:1, :limit]).any(0)
    prefix = int(differs.int().argmax()) if differs.any() else limit  # where the rows part
    if prefix == 0 or rows == 1:
        return llm(input_ids=full_ids, attention_mask=full_ids.ne(pad_id), labels=full_labels).loss
    head = llm.model(input_ids=full_ids[:1, :prefix], use_cache=True).cache
    cache = DynamicCache()
    for index, layer in enumerate(head.layers):
        cache.update(
            layer.keys.expand(rows, -1, -1, -1), layer.values.expand(rows, -1, -1, -1), index
        )
    rest = full_ids[:, prefix:]
    kept = torch.ones(rows, prefix, dtype=torch.bool, device=rest.device)
    mask = torch.cat([kept, rest.ne(pad_id)], dim=1)
    return llm(
        input_ids=rest, attention_mask=mask, cache=cache, labels=full_labels[:, prefix:]
    ).loss


def warm_up_language(
    model: LisaModel, data_dir: str | Path, cfg: LanguageWarmup, progress: bool = True
) -> list[float]:
    """Train the demo LLM (all its weights) on the shapes conversations as text, in place.

    LISA starts from a pretrained LLaVA whose LLM already reads questions; a LLM trained from
    scratch inside ``lisa-train`` does not learn to within the CPU budget (measured: after 400
    steps its prediction at the last prompt token, the state that feeds SAM in the fast path, is
    the same for every question). This warm-up is the demo's stand-in for that pretraining:
    next-token loss on the training split's questions and answers without the image (about 60
    tokens per conversation instead of about 315), so the state before the answer learns what
    the question asks for ("Blue [SEG]." for "the shape the colour of a clear sky"). The
    conversations' common prefix (system prompt and roles) runs once per step
    (:func:`shared_prefix_lm_loss`), which took a step from 0.45-0.50 to 0.30 s on 2 AVX2
    cores (900 steps: 8.9 minutes before).

    Returns:
        the mean loss of every ``cfg.log_every`` steps.
    """
    llm = model.llm
    llm.train()
    params = list(llm.parameters())
    for p in params:
        p.requires_grad_(True)
    pairs = warmup_conversations(model, data_dir, cfg)
    pad = model.tokenizer.pad_token_id

    def step_loss() -> torch.Tensor:
        batch = [next(pairs) for _ in range(cfg.batch_size)]
        return shared_prefix_lm_loss(llm, [ids for ids, _ in batch], [y for _, y in batch], pad)

    history = _train_warmup(params, cfg, step_loss, "language warm-up", progress)
    llm.eval()
    return history


# --------------------------------------------------------------------------- encoder warm-up
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
        _check_schedule(self)
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
    shape_ids = [shapes.SHAPES.index(o.shape) for o in record.objects] + [len(shapes.SHAPES)]
    colour_ids = [shapes.COLOURS.index(o.colour) for o in record.objects] + [len(shapes.COLOURS)]
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
    (:func:`shapes.corner_range`: most by the fewest count, fewest by the most count), and size
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
    corners = np.array([shapes.corner_range(o.shape) for o in record.objects]).reshape(n, 2)
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
    warm-up (:func:`warm_up_sam_decoder`, 500 steps, validation queries, low resolution) reached
    0.76-0.79 gIoU on positions, 0.83 on "the biggest", 0.62 on "the smallest" on this encoder,
    against 0.58-0.60, 0.60 and 0.40 on one warmed up without them (all queries: 0.744 against
    0.696). Linear probe after 1,000 steps, held-out test objects (balanced
    accuracy, chance 0.5): leftmost/rightmost/topmost/bottommost 0.90-0.95, biggest 0.86,
    smallest 0.75, by half 0.65-0.78, corners 0.71-0.73 (the encoder before: 0.50-0.54 for
    positions); shape 93% as without them.

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
    n_shape, n_colour = len(shapes.SHAPES) + 1, len(shapes.COLOURS) + 1
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

    history = _train_warmup(params, cfg, step_loss, "encoder warm-up", progress)
    encoder.eval()
    return history


# --------------------------------------------------------------------------- decoder warm-up
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
        _check_schedule(self)


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

    history = _train_warmup(params, cfg, step_loss, "decoder warm-up", progress)
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


@torch.no_grad()
def center_seg_projector_(
    model: LisaModel, data_dir: str | Path, cfg: LanguageWarmup, samples: int = 256
) -> torch.Tensor:
    """Make the ``[SEG]`` projector read what differs between questions (in place).

    After the warm-up the LLM's state at the last prompt token (the one SAM reads in the fast
    path) tells questions apart but shares a large common part (cosine 0.41 between questions
    with different answers); a fresh projector passes that on (0.63 between their prompts), and
    SAM's fresh decoder then learns to ignore its prompt. Data-dependent initialisation: the
    first layer's bias subtracts the mean of that state over ``samples`` training conversations
    (``W (h - mean) + b``), and the output layer is rescaled so prompts keep their mean norm.

    Returns:
        the ``(H,)`` mean state that was subtracted.
    """
    pairs = warmup_conversations(model, data_dir, cfg)
    states = []
    llm = model.llm
    was_training = llm.training
    llm.eval()
    for _ in range(samples):
        ids, labels = next(pairs)
        first = int((labels != IGNORE_INDEX).nonzero()[0])
        hidden = llm.model(input_ids=ids[None, :first]).last_hidden_state
        states.append(hidden[0, -1])
    llm.train(was_training)
    states = torch.stack(states).float()  # (samples, H)
    before = model.project_seg_hidden(states).norm(dim=-1).mean()
    mean = states.mean(0)
    first_layer, last_layer = model.seg_projector[0], model.seg_projector[2]
    first_layer.bias.sub_(first_layer.weight @ mean.to(first_layer.weight.dtype))
    after = model.project_seg_hidden(states).norm(dim=-1).mean()
    scale = float(before / after.clamp_min(1e-6))
    last_layer.weight.mul_(scale)
    last_layer.bias.mul_(scale)
    return mean


# --------------------------------------------------------------------------- evaluation
@dataclass
class DemoReport:
    """How a model does on a shapes split (see :func:`evaluate_demo`).

    Attributes:
        segment: teacher-forced gIoU / cIoU of each image's ReasonSeg json query (the
            original's validation: its template, answer ``"[SEG]."``), ``overall`` and per group
            (``explicit``, ``reasoning phrase``, ``reasoning sentence``) and per kind of
            ReasonSeg (``short`` phrases, ``long`` sentences).
        absent_not_found: fraction of absent-target queries whose greedy answer has no
            ``[SEG]`` (correctly "not found"), overall and per concept.
        present_found: fraction of the json (present-target) queries whose greedy answer has at
            least one ``[SEG]``.
        present_found_matched: fraction of the present-target queries of the concepts that
            also have absent queries in the split (e.g. ``colour_shape``: "the red circle") whose
            greedy answer has a ``[SEG]``, overall and per concept: the other half of
            ``absent_not_found``. A model that says "not found" to every such question scores 1
            on ``absent_not_found`` and 0 here.
        generate: gIoU / cIoU of the greedy answers' masks (union per query, empty when none)
            on the json queries: the robot's path.
        counts: number of queries behind each number.
        seconds: wall time of the evaluation.
    """

    split: str
    segment: dict[str, dict[str, float]]
    absent_not_found: dict[str, float]
    present_found: float
    generate: dict[str, float]
    counts: dict[str, int]
    seconds: float
    examples: list[dict[str, str]] = field(default_factory=list)
    present_found_matched: dict[str, float] = field(default_factory=dict)


def _summary(metrics: SegMetrics) -> dict[str, float]:
    s = metrics.summary()
    return {"giou": float(s["giou"]), "ciou": float(s["ciou"])}


@torch.inference_mode()
def evaluate_demo(
    model: LisaModel,
    data_dir: str | Path,
    split: str = "test",
    *,
    max_images: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 48,
    progress: bool = False,
) -> DemoReport:
    """Score ``model`` on a shapes split: the fast path, absent targets, the generation path.

    Args:
        model: a loaded LISA (eval mode).
        data_dir: a shapes data set; ``<data_dir>/<split>/queries.jsonl`` and the jsons.
        split: which split.
        max_images: only the first this many images (all by default).
        batch_size: images per teacher-forced forward.
        max_new_tokens: greedy decoding budget per query.
        progress: tqdm bars.

    The fast path uses :class:`ShapesValDataset` ``(json_only=True)``, which gives exactly the
    samples of :class:`~training.data.reason_seg.ReasonSegValDataset`; generation goes through
    :class:`~lisa_model.predictor.LisaPredictor` with the query phrased by
    :func:`~lisa_model.prompts.format_query`, as the robot asks it.
    """
    from tqdm import tqdm

    from lisa_model.predictor import LisaPredictor
    from training.evaluate import make_collator

    start = time.perf_counter()
    model.eval()
    present = ShapesValDataset(data_dir, split, json_only=True, max_images=max_images)
    absent = ShapesValDataset(data_dir, split, kinds=("absent",), max_images=max_images)
    collate = make_collator(model)
    groups = ("overall", "short", "long", *PRESENT_GROUPS)
    segment = {g: SegMetrics() for g in groups}
    generate = SegMetrics()
    predictor = LisaPredictor(model)
    found_present, examples = 0, []
    indices = list(range(len(present)))
    bar = tqdm(total=len(indices), desc="segment+generate", disable=not progress)
    for chunk_start in range(0, len(indices), batch_size):
        chunk = indices[chunk_start : chunk_start + batch_size]
        samples = [present[i] for i in chunk]
        batch = collate(samples)
        out = model(
            batch.images_clip, batch.images_sam, batch.input_ids, batch.offsets,
            batch.resize_sizes, batch.original_sizes, batch.attention_mask,
        )  # fmt: skip
        for i, sample, pred in zip(chunk, samples, out.pred_masks, strict=True):
            target = torch.from_numpy(sample.metric_targets())
            group = present.query(i).group
            for g in ("overall", "long" if sample.is_sentence else "short", group):
                segment[g].update(pred.float().cpu(), target)
            predictor.set_image(sample.image)
            result = predictor.predict(sample.texts[0], max_new_tokens=max_new_tokens)
            found_present += int(result.found)
            generate.update(torch.from_numpy(result.union_mask)[None], target)
            if len(examples) < 8:
                examples.append({"query": sample.texts[0], "answer": result.text})
        bar.update(len(chunk))
    bar.close()

    def answers(dataset: ShapesValDataset, desc: str) -> Iterator[tuple[int, bool]]:
        """``(item, found)`` per query of ``dataset``; each image is set on the predictor once."""
        last_image = None
        for i in tqdm(range(len(dataset)), desc=desc, disable=not progress):
            sample = dataset[i]
            if dataset.items[i][0] != last_image:
                predictor.set_image(sample.image)
                last_image = dataset.items[i][0]
            result = predictor.predict(sample.texts[0], max_new_tokens=max_new_tokens)
            if len(examples) < 16:
                examples.append({"query": sample.texts[0], "answer": result.text})
            yield i, result.found

    not_found: dict[str, list[bool]] = {}
    for i, was_found in answers(absent, "absent"):
        for key in ("overall", absent.query(i).concept):
            not_found.setdefault(key, []).append(not was_found)
    # The same concepts asked about objects that are there: without this, answering "not
    # found" to every question of an absent-capable kind would look like a perfect score.
    concepts = set(not_found) - {"overall"}
    matched = ShapesValDataset(data_dir, split, max_images=max_images, concepts=concepts)
    found: dict[str, list[bool]] = {}
    for i, was_found in answers(matched, "present, same concepts"):
        for key in ("overall", matched.query(i).concept):
            found.setdefault(key, []).append(was_found)

    counts = {f"segment {g}": m.num_masks for g, m in segment.items()}
    counts.update({f"absent {k}": len(v) for k, v in not_found.items()})
    counts.update({f"present matched {k}": len(v) for k, v in found.items()})
    return DemoReport(
        split=split,
        segment={g: _summary(m) for g, m in segment.items() if m.num_masks},
        absent_not_found={k: float(np.mean(v)) for k, v in not_found.items()},
        present_found=found_present / max(len(indices), 1),
        present_found_matched={k: float(np.mean(v)) for k, v in found.items()},
        generate=_summary(generate),
        counts=counts,
        seconds=time.perf_counter() - start,
        examples=examples,
    )


# --------------------------------------------------------------------------- examples
#: Scenes of the bundled examples: test-split images of the data seed 0 (never trained on).
EXAMPLE_SCENES = (0, 1, 2, 3, 4, 5)
#: Scene settings of the demo data (``make demo-model``: ``lisa-make-shapes --objects 2 4``).
DEMO_SCENES = shapes.ShapesConfig(min_objects=2, max_objects=4)


def _example_commands(example: shapes.Example, rng: np.random.Generator) -> list[dict]:
    """One command per query group the scene has: explicit, reasoning phrase, reasoning
    sentence, absent; the first present one also asks for an explanation."""
    picked: list[dict] = []
    for group in ("explicit", "reasoning phrase", "reasoning sentence", "absent"):
        pool = [
            q
            for q in example.queries
            if (q.kind == "absent" and group == "absent")
            or (q.kind == "explicit" and group == "explicit")
            or (
                q.kind == "reasoning"
                and group == f"reasoning {'sentence' if q.is_sentence else 'phrase'}"
            )
        ]
        if pool:
            q = pool[int(rng.integers(len(pool)))]
            picked.append({"command": q.text, "expected": q.answer})
    if picked:
        picked[0]["explain"] = True
    return picked


def write_examples(out_dir: str | Path, seed: int = 0, scenes: Sequence[int] = EXAMPLE_SCENES):
    """Write the bundled example scenes (``scene_<k>.png``) and ``commands.json``.

    The scenes are images of the test split of the demo data set made with ``seed``
    (:data:`DEMO_SCENES`); each gets one
    command per query group (``expected`` is the generator's answer, for the reader).
    """
    import cv2

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    commands = []
    for k, index in enumerate(scenes):
        example = shapes.make_example(seed, "test", index, config=DEMO_SCENES)
        name = f"scene_{k}.png"
        ok, png = cv2.imencode(".png", cv2.cvtColor(example.image, cv2.COLOR_RGB2BGR))
        if not ok:
            raise RuntimeError(f"could not encode {name}")
        (out / name).write_bytes(png.tobytes())
        rng = np.random.default_rng([seed, index])
        commands += [{"image": name, **c} for c in _example_commands(example, rng)]
    (out / "commands.json").write_text(json.dumps(commands, indent=1) + "\n")
    return out / "commands.json"


# --------------------------------------------------------------------------- command line
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m training.demo_model",
        description="The demo model: build its untrained start, or evaluate a trained one.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    init = sub.add_parser("init", help="write the untrained demo checkpoint")
    init.add_argument("--data", required=True, type=Path, help="shapes data set directory")
    init.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    init.add_argument("--seed", type=int, default=0, help="weight initialisation seed")
    init.add_argument("--vocab-size", type=int, default=DEMO_VOCAB_SIZE)
    init.add_argument(
        "--warmup-steps",
        type=int,
        default=LanguageWarmup.steps,
        help="steps of the text-only language warm-up of the LLM (0: none)",
    )
    init.add_argument(
        "--encoder-steps",
        type=int,
        default=EncoderWarmup.steps,
        help="steps of SAM's image encoder warm-up on per-patch shapes and colours (0: none)",
    )
    init.add_argument(
        "--decoder-steps",
        type=int,
        default=DecoderWarmup.steps,
        help="steps of SAM's mask decoder warm-up on concept prompts, followed by the [SEG] "
        "projector fit (0: neither)",
    )
    wu = sub.add_parser(
        "warmup", help="train a checkpoint's LLM on the shapes conversations as text"
    )
    wu.add_argument("--model", required=True, help="checkpoint directory to start from")
    wu.add_argument("--data", required=True, type=Path, help="shapes data set directory")
    wu.add_argument("--out", required=True, type=Path, help="checkpoint directory to write")
    wu.add_argument("--steps", type=int, default=LanguageWarmup.steps)
    wu.add_argument("--seed", type=int, default=0)
    ev = sub.add_parser("eval", help="score a checkpoint on a shapes split")
    ev.add_argument("--model", required=True, help="checkpoint directory")
    ev.add_argument("--data", required=True, type=Path, help="shapes data set directory")
    ev.add_argument("--split", default="test")
    ev.add_argument("--max-images", type=int, default=None)
    ev.add_argument("--out", type=Path, default=None, help="write the JSON report here")
    ev.add_argument(
        "--record",
        action="store_true",
        help=f"also write {RECIPE_FILE} into the model directory: the data set's seed and scene "
        "settings (from its meta.json) with the report, so the scenes can be regenerated",
    )
    ex = sub.add_parser("examples", help="write the bundled example scenes and commands")
    ex.add_argument("--out", required=True, type=Path, help="directory to write")
    ex.add_argument("--seed", type=int, default=0, help="data set seed of the scenes")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m training.demo_model {init,eval} ...``."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "init":
            if args.warmup_steps < 0:
                raise ValueError(f"--warmup-steps must be >= 0, got {args.warmup_steps}")
            if args.encoder_steps < 0:
                raise ValueError(f"--encoder-steps must be >= 0, got {args.encoder_steps}")
            if args.decoder_steps < 0:
                raise ValueError(f"--decoder-steps must be >= 0, got {args.decoder_steps}")
            out = build_initial_demo_checkpoint(
                args.out,
                args.data,
                seed=args.seed,
                vocab_size=args.vocab_size,
                warmup=LanguageWarmup(steps=args.warmup_steps, seed=args.seed),
                encoder_warmup=EncoderWarmup(steps=args.encoder_steps, seed=args.seed),
                decoder_warmup=DecoderWarmup(steps=args.decoder_steps, seed=args.seed),
            )
            config = json.loads((out / "config.json").read_text())
            print(f"wrote the initial demo checkpoint to {out} (vocab {config['vocab_size']})")
            return 0
        if args.command == "warmup":
            from lisa_model.checkpoint import load_lisa

            cfg = LanguageWarmup(steps=args.steps, seed=args.seed)
            model = load_lisa(args.model, dtype=torch.float32)
            history = warm_up_language(model, args.data, cfg)
            out = save_lisa(model, args.out, llm_dtype=torch.float32, include_vision_tower=True)
            losses = ", ".join(f"{x:.3f}" for x in history)
            print(f"wrote {out}; language warm-up loss every {cfg.log_every} steps: {losses}")
            return 0
        if args.command == "examples":
            path = write_examples(args.out, args.seed)
            print(f"wrote {path} and its scenes")
            return 0
        from lisa_model.checkpoint import load_lisa

        model = load_lisa(args.model)
        report = evaluate_demo(
            model, args.data, args.split, max_images=args.max_images, progress=True
        )
    except (FileNotFoundError, ValueError) as err:
        print(f"demo_model: error: {err}", file=sys.stderr)
        return 2
    text = json.dumps(asdict(report), indent=1)
    if args.record:
        meta = json.loads((Path(args.data) / "meta.json").read_text())
        recipe = {
            "data": {
                k: meta[k] for k in ("seed", "config", "version", "absent_json_rate") if k in meta
            },
            "report": asdict(report),
        }
        (Path(args.model) / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
