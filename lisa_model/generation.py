"""Greedy decoding with a KV cache, collecting the hidden states that feed SAM.

The original decodes without a cache (every step re-runs the whole sequence, CLIP included) and
afterwards picks, from the last step's full forward, the final-norm state of the token before
each ``[SEG]``. With a cache, that state is exactly the one computed at the step whose logits
chose ``[SEG]``, so it is recorded there and no second pass is needed.

The loop keeps tokens on the device: each chosen id is fed straight back as the next input and
copied to host memory asynchronously. Whether it was EOS is read ``eos_check_lag`` steps later
(default: 1 on CUDA, so the host never waits for the step it has just queued; 0 elsewhere, where
nothing runs ahead anyway). A lag of ``k`` costs at most ``k`` forward steps past EOS, whose
results are dropped: the returned ids, states and stop reason do not depend on the lag.
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
        forward_steps: single-token forward passes run after the prompt (at least
            ``len(token_ids) - 1``; up to ``eos_check_lag`` more when EOS was read late).
    """

    token_ids: list[int]
    seg_hidden: torch.Tensor
    stopped_on_eos: bool
    first_logits: torch.Tensor
    forward_steps: int = 0


def crop_cache(cache: object, length: int) -> None:
    """Drop cached positions beyond ``length`` (restores a cached prompt prefix)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


class _HostTokens:
    """Generated ids copied device -> host without blocking; read back when known to be there."""

    def __init__(self, capacity: int, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.buffer = torch.empty(capacity, dtype=torch.long, pin_memory=self.cuda)
        self.events: list[torch.cuda.Event | None] = []

    def push(self, token: torch.Tensor) -> None:
        """Queue the copy of ``token`` ``(1, 1)`` long (on the device) into the next slot."""
        index = len(self.events)
        self.buffer[index : index + 1].copy_(token.view(1), non_blocking=self.cuda)
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record()
        self.events.append(event)

    def get(self, index: int) -> int:
        """The id in slot ``index``, waiting only for that slot's copy."""
        event = self.events[index]
        if event is not None:
            event.synchronize()
        return int(self.buffer[index])


@torch.inference_mode()
def greedy_generate(
    llm: nn.Module,
    inputs_embeds: torch.Tensor,
    *,
    max_new_tokens: int,
    eos_token_id: int,
    seg_token_id: int,
    cache: object | None = None,
    eos_check_lag: int | None = None,
) -> GenerationOutput:
    """Greedy decoding of one sequence.

    Args:
        llm: a ``transformers`` causal LM (``.model`` returns final-norm states, ``.lm_head``).
        inputs_embeds: ``(1, L, H)`` embeddings of the (rest of the) prompt; positions continue
            after what ``cache`` already holds.
        max_new_tokens: most ids to generate (EOS included).
        eos_token_id: stops decoding (kept as the last id). A negative id never matches, which
            forces ``max_new_tokens`` ids (benchmarks).
        cache: a ``transformers`` cache holding a prompt prefix, or ``None`` for a fresh one. It
            is extended in place (possibly by up to ``eos_check_lag`` positions past what the
            result needs); callers crop it back with :func:`crop_cache`.
        eos_check_lag: how many steps after choosing an id the host reads it back to look for
            EOS; ``None`` = 1 on CUDA (no host-device sync per token), 0 elsewhere.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    device = inputs_embeds.device
    lag = (1 if device.type == "cuda" else 0) if eos_check_lag is None else int(eos_check_lag)
    if lag < 0:
        raise ValueError(f"eos_check_lag must be >= 0, got {eos_check_lag}")
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache()
    out = llm.model(inputs_embeds=inputs_embeds, cache=cache, use_cache=True)
    hidden = out.last_hidden_state[:, -1]  # (1, H) state that predicts the next token
    logits = llm.lm_head(hidden).float()  # (1, V)
    first_logits = logits[0].clone()

    host = _HostTokens(max_new_tokens, device)
    states: list[torch.Tensor] = []  # (H,) per generated id: the state that chose it
    checked = 0  # ids [0, checked) are known not to be EOS
    eos_at: int | None = None
    forward_steps = 0
    for step in range(max_new_tokens):
        next_id = torch.argmax(logits, dim=-1, keepdim=True)  # (1, 1) long, stays on device
        states.append(hidden[0])
        host.push(next_id)
        while eos_at is None and checked <= step - lag:
            if host.get(checked) == eos_token_id:
                eos_at = checked
            checked += 1
        if eos_at is not None or step == max_new_tokens - 1:
            break
        out = llm.model(input_ids=next_id, cache=cache, use_cache=True)
        forward_steps += 1
        hidden = out.last_hidden_state[:, -1]
        logits = llm.lm_head(hidden).float()

    generated = len(states)
    while eos_at is None and checked < generated:  # ids not read yet (lag > 0)
        if host.get(checked) == eos_token_id:
            eos_at = checked
        checked += 1
    length = generated if eos_at is None else eos_at + 1
    tokens = [host.get(i) for i in range(length)]
    seg_rows = [i for i, t in enumerate(tokens) if t == seg_token_id]
    seg_hidden = (
        torch.stack([states[i] for i in seg_rows])
        if seg_rows
        else inputs_embeds.new_zeros(0, inputs_embeds.shape[-1])
    )
    return GenerationOutput(tokens, seg_hidden, eos_at is not None, first_logits, forward_steps)
