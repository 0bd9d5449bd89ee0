"""Greedy decoding with a KV cache, collecting the hidden states that feed SAM.

The original decodes without a cache (every step re-runs the whole sequence, CLIP included) and
afterwards picks, from the last step's full forward, the final-norm state of the token before
each ``[SEG]``. With a cache, that state is exactly the one computed at the step whose logits
chose ``[SEG]``, so it is recorded there and no second pass is needed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class GenerationOutput:
    """Greedy decoding result for one sequence.

    Attributes:
        token_ids: generated ids, including the final EOS when decoding stopped on it.
        seg_hidden: ``(n_seg, H)`` final-norm hidden states that predicted each ``[SEG]``.
        stopped_on_eos: whether EOS ended decoding (else ``max_new_tokens`` did).
        first_logits: ``(V,)`` float32 logits of the first decoding step (for checks/tests).
    """

    token_ids: list[int]
    seg_hidden: torch.Tensor
    stopped_on_eos: bool
    first_logits: torch.Tensor


def crop_cache(cache: object, length: int) -> None:
    """Drop cached positions beyond ``length`` (restores a cached prompt prefix)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@torch.inference_mode()
def greedy_generate(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    seg_token_id: int,
    cache: object | None = None,
) -> GenerationOutput:
    """Greedy decoding of one sequence.

    Args:
        llm: a ``transformers`` causal LM (``.model`` returns final-norm states, ``.lm_head``).
        inputs_embeds: ``(1, L, H)`` embeddings of the (rest of the) prompt; positions continue
            after what ``cache`` already holds.
        cache: a ``transformers`` cache holding a prompt prefix, or ``None`` for a fresh one. It
            is extended in place; callers crop it back with :func:`crop_cache`.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    out = llm.model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]  # (1, H) state that predicts the next token
    logits = llm.lm_head(hidden).float()  # (1, V)
    first_logits = logits[0].clone()
    tokens: list[int] = []
    seg_states: list[torch.Tensor] = []
    stopped = False
    for step in range(max_new_tokens):
        next_id = int(torch.argmax(logits, dim=-1))
        tokens.append(next_id)
        if next_id == seg_token_id:
            seg_states.append(hidden[0])
        if next_id == eos_token_id:
            stopped = True
            break
        if step == max_new_tokens - 1:
            break
        ids = torch.tensor([[next_id]], device=inputs_embeds.device)
        out = llm.model(input_ids=ids, cache=cache, use_cache=True)
        hidden = out.last_hidden_state[:, -1]
        logits = llm.lm_head(hidden).float()
    seg_hidden = (
        torch.stack(seg_states)
        if seg_states
        else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
    )
    return GenerationOutput(tokens, seg_hidden, stopped, first_logits)
