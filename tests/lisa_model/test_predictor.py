"""LisaPredictor: per-frame caching, both paths, frames of odd sizes, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lisa_model.predictor import LisaPredictor
from tests.conftest import REFERENCE_DIR, read_rgb

IMG0 = REFERENCE_DIR / "inputs" / "img0.png"
QUERY = "What is the red ball in this image? Please output segmentation mask."


class ForwardLengths:
    """Records how many new positions each LLM forward processed."""

    def __init__(self, model):
        self.lengths: list[int] = []
        self.handle = model.llm.model.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        x = kwargs.get("inputs_embeds")
        if x is None:
            x = kwargs.get("input_ids")
        self.lengths.append(int(x.shape[1]))


def test_second_query_reuses_frame_work_and_matches_uncached(reference_model):
    cached = LisaPredictor(reference_model)
    uncached = LisaPredictor(reference_model, cache_prefix=False)
    rgb = read_rgb(IMG0)
    calls = {"sam": 0}
    original = reference_model.encode_sam

    def counting(x):
        calls["sam"] += 1
        return original(x)

    reference_model.encode_sam = counting
    try:
        cached.set_image(rgb)
        uncached.set_image(rgb)
        rec = ForwardLengths(reference_model)
        try:
            a1 = cached.predict(QUERY, raw_prompt=True, max_new_tokens=8)
            first = list(rec.lengths)
            rec.lengths.clear()
            a2 = cached.predict(QUERY, raw_prompt=True, max_new_tokens=8)
            second = list(rec.lengths)
            rec.lengths.clear()
            b = uncached.predict(QUERY, raw_prompt=True, max_new_tokens=8)
            full = list(rec.lengths)
        finally:
            rec.handle.remove()
    finally:
        del reference_model.encode_sam
    assert calls["sam"] == 2  # once per set_image, never per query
    # The cached predictor only feeds the query part; the uncached one the whole prompt.
    assert first[0] == second[0] < full[0]
    assert full[0] == len(cached.prompt_ids(QUERY)) + reference_model.num_image_tokens - 1
    for r in (a2, b):
        assert r.token_ids == a1.token_ids
        np.testing.assert_allclose(r.logits, a1.logits, atol=1e-5)
    seg = cached.predict(QUERY, raw_prompt=True, mode="segment")
    seg_uncached = uncached.predict(QUERY, raw_prompt=True, mode="segment")
    np.testing.assert_allclose(seg.logits, seg_uncached.logits, atol=1e-5)


@pytest.mark.parametrize("hw", [(37, 411), (300, 7), (1, 1), (1100, 90)])
def test_masks_are_in_the_original_frame(reference_model, hw):
    predictor = LisaPredictor(reference_model)
    rng = np.random.default_rng(1)
    predictor.set_image(rng.integers(0, 256, (*hw, 3), dtype=np.uint8))
    result = predictor.predict("the red ball", mode="segment")
    assert result.masks.shape == (1, *hw) and result.masks.dtype == bool
    assert result.logits.shape == (1, *hw) and result.logits.dtype == np.float32
    assert np.array_equal(result.masks, result.logits > 0)
    assert result.union_mask.shape == hw


def test_generation_result_fields(reference_model):
    predictor = LisaPredictor(reference_model)
    predictor.set_image(read_rgb(IMG0))
    result = predictor.predict(QUERY, raw_prompt=True, max_new_tokens=16)
    assert result.found and result.masks.shape == (1, 240, 320)
    assert result.text.startswith("[SEG]") and "</s>" not in result.text
    assert result.token_ids[-1] == reference_model.eos_token_id
    assert set(result.timings) == {"llm", "masks"}
    assert {"clip", "sam_encoder", "llm_prefix"} <= set(predictor.last_set_image_timings)


def test_nothing_found_gives_empty_masks(reference_model):
    predictor = LisaPredictor(reference_model)
    predictor.set_image(read_rgb(REFERENCE_DIR / "inputs" / "img1.png"))
    result = predictor.predict(QUERY, raw_prompt=True, max_new_tokens=4)
    assert not result.found
    assert result.masks.shape == (0, 167, 259) and result.union_mask.sum() == 0


def test_errors(reference_model):
    predictor = LisaPredictor(reference_model)
    with pytest.raises(RuntimeError, match="set_image"):
        predictor.predict("x")
    predictor.set_image(read_rgb(IMG0))
    with pytest.raises(ValueError, match="empty query"):
        predictor.predict("   ")
    with pytest.raises(ValueError, match="mode"):
        predictor.predict("x", mode="fast")
    with pytest.raises(ValueError, match="explain"):
        predictor.predict("x", explain=True, mode="segment")
    with pytest.raises(ValueError, match="too long"):
        predictor.predict("ball " * 3000)
    with pytest.raises(ValueError):
        predictor.set_image(np.zeros((10, 10), np.uint8))


def test_cache_is_restored_after_a_failed_query(reference_model):
    predictor = LisaPredictor(reference_model)
    predictor.set_image(read_rgb(IMG0))
    before = predictor._frame.prefix_cache.get_seq_length()
    original = reference_model.llm.lm_head.forward

    def boom(*a, **k):
        raise RuntimeError("CUDA out of memory (simulated)")

    reference_model.llm.lm_head.forward = boom
    try:
        with pytest.raises(RuntimeError, match="simulated"):
            predictor.predict(QUERY, raw_prompt=True)
    finally:
        reference_model.llm.lm_head.forward = original
    assert predictor._frame.prefix_cache.get_seq_length() == before
    result = predictor.predict(QUERY, raw_prompt=True, max_new_tokens=16)
    assert result.found


def test_format_query_styles():
    from lisa_model.prompts import format_query

    assert format_query("the red ball") == (
        "What is the red ball in this image? Please output segmentation mask."
    )
    assert format_query("Which object could roll?") == (
        "Which object could roll? Please output segmentation mask."
    )
    assert format_query("the knife", explain=True) == (
        "the knife Please output segmentation mask and explain why."
    )
    assert format_query("  Segment it. Please output segmentation mask. ") == (
        "Segment it. Please output segmentation mask."
    )
    with pytest.raises(ValueError):
        format_query(" \n ")


def test_inference_mode_outputs_do_not_track_grad(reference_model):
    predictor = LisaPredictor(reference_model)
    predictor.set_image(read_rgb(IMG0))
    assert not predictor._frame.image_embedding.requires_grad
    assert torch.is_inference(predictor._frame.image_features)
