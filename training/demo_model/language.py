"""The demo LLM's text-only language warm-up, and the ``[SEG]`` projector centred after it.

LISA starts from a pretrained LLaVA whose LLM already reads questions; the demo's LLM is trained
here on the shapes conversations as text (:func:`warm_up_language`), the common prefix of every
conversation computed once per step (:func:`shared_prefix_lm_loss`); then the ``[SEG]``
projector learns to read what differs between questions (:func:`center_seg_projector_`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lisa_model.modeling import IGNORE_INDEX, LisaModel
from lisa_model.prompts import IM_END_TOKEN, IM_START_TOKEN, IMAGE_TOKEN, render_conversation
from training.collate import conversation_labels, pad_right
from training.data.types import check_counts
from training.demo_model.loop import check_schedule, train_warmup
from training.shapes.datasets import ShapesQueryDataset, ShapesQueryMix


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
        check_schedule(self)


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

    history = train_warmup(params, cfg, step_loss, "language warm-up", progress)
    llm.eval()
    return history


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
