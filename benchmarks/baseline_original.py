"""The original LISA inference, step by step, as a measurement reference (not used by the package).

``chat.py`` -> ``LISAForCausalLM.evaluate`` (model/LISA.py of the original) with transformers
4.31's ``generate``:

- greedy decoding WITHOUT a KV cache (``use_cache`` comes from the config, which is False) and
  without an attention mask: every step runs the LLM over the whole sequence so far;
- the image goes through CLIP at every step (LLaVA's ``prepare_inputs_labels_for_multimodal``
  runs inside ``forward``), all CLIP layers with ``output_hidden_states=True``, layer -2 taken;
- each step's forward returns the logits of every position and (``output_hidden_states``)
  every layer's states; ``generate`` keeps each step's states;
- after decoding, the ``[SEG]`` states are picked from the LAST step's full forward (the state of
  the token before each ``[SEG]``), then SAM encodes the image and decodes all masks of the
  answer in one call, and the low-res masks are upsampled to the frame.

:func:`original_one_forward` is the original's teacher-forced pass instead (validation's
``model_forward``): one uncached forward over a finished conversation, the baseline of the
package's fast path.

Preprocessing, the SAM image encoder (run with upstream's attention code on the package's
modules, ``lisa_model.sam_encoder.upstream_forward``), the mask decoder call and the upsampling
are the package's, which the equivalence tests show equal to the original's; so the differences
measured against this are the cache, the per-frame reuse, what the package skips and its fused
SAM attention.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from lisa_model.modeling import LisaModel, seg_hidden_positions
from lisa_model.processing import postprocess_masks, prepare_image
from lisa_model.sam_encoder import upstream_forward


@dataclass
class OriginalResult:
    """One answer of the original's inference.

    Attributes:
        token_ids: generated ids (EOS included when decoding stopped on it).
        logits: ``(n_seg, H, W)`` float32 mask logits in the frame's original size.
        timings: seconds by stage: ``preprocess``, ``clip`` and ``llm`` (summed over steps),
            ``sam_encoder``, ``masks`` (projection + mask decoder + upsampling).
        steps: full forward passes run (= generated ids).
    """

    token_ids: list[int]
    logits: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    steps: int = 0


def clip_features_as_original(model: LisaModel, pixel_values: torch.Tensor) -> torch.Tensor:
    """``(1, 3, 224, 224)`` -> ``(1, P, H)``: the whole CLIP tower with every hidden state kept,
    layer ``mm_vision_select_layer`` without CLS, then the projector (LLaVA's encode_images)."""
    tower = model.vision_tower
    dtype = next(tower.parameters()).dtype
    out = tower(pixel_values.to(device=model.device, dtype=dtype), output_hidden_states=True)
    feats = out.hidden_states[model.config.mm_vision_select_layer][:, 1:]
    proj_dtype = next(model.mm_projector.parameters()).dtype
    return model.mm_projector(feats.to(proj_dtype)).to(model.dtype)


@torch.inference_mode()
def original_inference(
    model: LisaModel,
    rgb: np.ndarray,
    prompt_ids: list[int],
    max_new_tokens: int,
    clock: Callable[[], float] = time.perf_counter,
) -> OriginalResult:
    """Answer one prompt about ``rgb`` ``(H, W, 3)`` uint8 the way the original does.

    Args:
        prompt_ids: the chat prompt's ids with the image placeholder (``-200``).
        max_new_tokens: decoding budget; stops earlier on EOS.
        clock: returns seconds (pass one that synchronises CUDA for exact GPU stage times).
    """
    timings = dict.fromkeys(("preprocess", "clip", "llm", "sam_encoder", "masks"), 0.0)
    t0 = clock()
    prepared = prepare_image(rgb, sam_size=model.sam_image_size)
    pixel_clip = prepared.clip.unsqueeze(0)
    timings["preprocess"] = clock() - t0

    device = model.device
    ids = torch.tensor([prompt_ids], device=device)
    generated: list[int] = []
    step_states: list[torch.Tensor] = []  # generate(output_hidden_states=True) keeps them all
    for _ in range(max_new_tokens):
        t0 = clock()
        features = clip_features_as_original(model, pixel_clip)  # CLIP at every step
        t1 = clock()
        embeds, _, _ = model.embed_inputs(ids, features)
        out = model.llm(inputs_embeds=embeds, use_cache=False, output_hidden_states=True)
        step_states.append(out.hidden_states[-1])  # (1, L', H) after the final norm
        next_id = int(torch.argmax(out.logits[0, -1]))  # logits of all positions were computed
        t2 = clock()
        timings["clip"] += t1 - t0
        timings["llm"] += t2 - t1
        generated.append(next_id)
        ids = torch.cat([ids, torch.tensor([[next_id]], device=device)], dim=1)
        if next_id == model.eos_token_id:
            break

    t0 = clock()
    # [SEG] states from the last step's forward (over the prompt and all ids but the last).
    rows, positions = seg_hidden_positions(
        ids, model.seg_token_id, model.image_token_index, model.num_image_tokens
    )
    seg_hidden = step_states[-1][rows, positions]  # (n_seg, H)
    with upstream_forward(model.sam.image_encoder):  # the original ran upstream SAM's attention
        embedding = model.encode_sam(prepared.sam.unsqueeze(0))  # (1, 256, 64, 64)
    t1 = clock()
    logits_np = masks_from_seg_states(model, seg_hidden, embedding, prepared)
    t2 = clock()
    timings["sam_encoder"] = t1 - t0
    timings["masks"] = t2 - t1
    return OriginalResult(generated, logits_np, timings, steps=len(generated))


@torch.inference_mode()
def original_one_forward(
    model: LisaModel,
    rgb: np.ndarray,
    conversation_ids: list[int],
    clock: Callable[[], float] = time.perf_counter,
) -> OriginalResult:
    """The original's teacher-forced pass (``LISAForCausalLM.model_forward`` as validation runs
    it) for one image and one finished conversation, e.g. the answer ``"[SEG]."``.

    SAM's image encoder and the whole CLIP tower (every hidden state kept) run on the frame; the
    LLM runs ONE forward over all ``conversation_ids`` without a KV cache or attention mask,
    computing the logits of every position and keeping every layer's states
    (``output_hidden_states=True``); the last layer's states at the ``[SEG]`` positions (the
    token before each ``[SEG]``) are projected (``text_hidden_fcs``), decoded by SAM and
    upsampled to the frame. Nothing is reused across calls: every call costs a new frame.

    Args:
        conversation_ids: ids of the prompt AND the answer, with the image placeholder (``-200``),
            e.g. ``tokenizer_image_token(build_chat_prompt(text, answer="[SEG]."))``.
        clock: as :func:`original_inference`.

    Returns:
        :class:`OriginalResult` with ``token_ids`` empty, ``steps`` 1 and ``(n_seg, H, W)`` logits.
    """
    timings = dict.fromkeys(("preprocess", "clip", "llm", "sam_encoder", "masks"), 0.0)
    t0 = clock()
    prepared = prepare_image(rgb, sam_size=model.sam_image_size)
    timings["preprocess"] = clock() - t0

    t0 = clock()
    with upstream_forward(model.sam.image_encoder):  # upstream SAM attention, as the original
        embedding = model.encode_sam(prepared.sam.unsqueeze(0))  # (1, 256, 64, 64); SAM first
    t1 = clock()
    features = clip_features_as_original(model, prepared.clip.unsqueeze(0))  # (1, P, H)
    t2 = clock()
    ids = torch.tensor([conversation_ids], device=model.device)
    embeds, _, _ = model.embed_inputs(ids, features)
    out = model.llm(inputs_embeds=embeds, use_cache=False, output_hidden_states=True)
    hidden = out.hidden_states[-1]  # (1, L', H) after the final norm
    t3 = clock()
    rows, positions = seg_hidden_positions(
        ids, model.seg_token_id, model.image_token_index, model.num_image_tokens
    )
    seg_hidden = hidden[rows, positions]  # (n_seg, H)
    logits_np = masks_from_seg_states(model, seg_hidden, embedding, prepared)
    t4 = clock()
    timings.update(sam_encoder=t1 - t0, clip=t2 - t1, llm=t3 - t2, masks=t4 - t3)
    return OriginalResult([], logits_np, timings, steps=1)


def masks_from_seg_states(model: LisaModel, seg_hidden, embedding, prepared) -> np.ndarray:
    """``(n_seg, H, W)`` float32 mask logits in the frame's size from the ``[SEG]`` states
    ``(n_seg, hidden)``: projector, SAM's prompt encoder and mask decoder, upsampling."""
    if not seg_hidden.shape[0]:
        return np.zeros((0, *prepared.original_hw), dtype=np.float32)
    low_res = model.decode_masks(embedding, model.project_seg_hidden(seg_hidden))
    logits = postprocess_masks(
        low_res, prepared.resized_hw, prepared.original_hw, model.sam_image_size
    )
    return logits.float().cpu().numpy()
