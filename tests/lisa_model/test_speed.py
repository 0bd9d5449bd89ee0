"""Speed work that must not change results: lagged EOS checks in the decoding loop, CLIP run
only up to the selected layer, SDPA attention, models built on their device, torch.compile."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lisa_model.builders import ADDED_TOKEN_LAYOUTS, ModelSpec, build_lisa
from lisa_model.generation import crop_cache, greedy_generate
from lisa_model.predictor import LisaPredictor
from lisa_model.processing import prepare_image
from lisa_model.speed import COMPILABLE_PARTS, compile_model
from lisa_model.tokenizer import LisaTokenizer, train_sentencepiece
from tests.conftest import REFERENCE_DIR, TINY_CORPUS, read_rgb

INPUTS = REFERENCE_DIR / "inputs"


@pytest.fixture(scope="module")
def cases():
    return json.loads((REFERENCE_DIR / "expected" / "generate.json").read_text())


@pytest.fixture(scope="module")
def frame_features(reference_model):
    """CLIP features of each fixture image: ``{name: (1, 256, H)}``."""
    out = {}
    with torch.inference_mode():
        for name in ("img0", "img2"):
            prepared = prepare_image(read_rgb(INPUTS / f"{name}.png"))
            out[name] = reference_model.encode_clip(prepared.clip[None])
    return out


@pytest.fixture(scope="module")
def tiny_tokenizer(tmp_path_factory):
    path = train_sentencepiece(TINY_CORPUS * 4, 320, tmp_path_factory.mktemp("sp") / "sp.model")
    return LisaTokenizer.from_sentencepiece(path, ADDED_TOKEN_LAYOUTS["7b-v1"])


@pytest.mark.parametrize("key", ["img0_q0_short", "img2_q2_explain"])
def test_eos_check_lag_changes_nothing(reference_model, cases, frame_features, key):
    """img0_q0_short stops on EOS after 4 ids; img2_q2_explain has 3 [SEG] and hits the budget."""
    case = next(c for c in cases if c["key"] == key)
    model = reference_model
    with torch.inference_mode():
        embeds, _, _ = model.embed_inputs(
            torch.tensor([case["input_ids"]]), frame_features[case["image"].split(".")[0]]
        )
    results = [
        greedy_generate(
            model.llm,
            embeds,
            max_new_tokens=16,
            eos_token_id=model.eos_token_id,
            seg_token_id=model.seg_token_id,
            eos_check_lag=lag,
        )
        for lag in (0, 1, 3)
    ]
    assert results[0].token_ids == case["generated_ids"]
    assert results[0].stopped_on_eos == case["stopped_on_eos"]
    for lag, res in zip((1, 3), results[1:]):
        assert res.token_ids == results[0].token_ids
        assert res.stopped_on_eos == results[0].stopped_on_eos
        assert torch.equal(res.seg_hidden, results[0].seg_hidden)
        assert torch.equal(res.first_logits, results[0].first_logits)
        # At most `lag` forward steps past what was needed, and only when EOS stopped it.
        needed = len(res.token_ids) - 1
        extra = min(lag, 16 - len(res.token_ids)) if res.stopped_on_eos else 0
        assert res.forward_steps == needed + extra
    assert results[0].seg_hidden.shape[0] == case["n_seg"]


def test_lagged_eos_leaves_a_croppable_cache(reference_model, cases, frame_features):
    from transformers import DynamicCache

    case = next(c for c in cases if c["key"] == "img0_q0_short")  # stops on EOS
    model = reference_model
    with torch.inference_mode():
        embeds, _, _ = model.embed_inputs(
            torch.tensor([case["input_ids"]]), frame_features["img0"]
        )
        cache = DynamicCache()
        model.llm.model(inputs_embeds=embeds[:, :-5], cache=cache, use_cache=True)
        prefix = cache.get_seq_length()
        res = greedy_generate(
            model.llm,
            embeds[:, -5:],
            max_new_tokens=16,
            eos_token_id=model.eos_token_id,
            seg_token_id=model.seg_token_id,
            cache=cache,
            eos_check_lag=2,
        )
        assert res.token_ids == case["generated_ids"]
        assert cache.get_seq_length() == prefix + 5 + res.forward_steps
        crop_cache(cache, prefix)
        assert cache.get_seq_length() == prefix


def test_negative_eos_forces_the_budget(reference_model, cases, frame_features):
    case = next(c for c in cases if c["key"] == "img0_q0_short")
    with torch.inference_mode():
        embeds, _, _ = reference_model.embed_inputs(
            torch.tensor([case["input_ids"]]), frame_features["img0"]
        )
    res = greedy_generate(
        reference_model.llm,
        embeds,
        max_new_tokens=9,
        eos_token_id=-1,
        seg_token_id=reference_model.seg_token_id,
    )
    assert len(res.token_ids) == 9 and not res.stopped_on_eos
    assert res.token_ids[:4] == case["generated_ids"]  # EOS included, then decoding goes on


def test_errors():
    with pytest.raises(ValueError, match="eos_check_lag"):
        greedy_generate(
            None, torch.zeros(1, 1, 4), max_new_tokens=2, eos_token_id=2, seg_token_id=3,
            eos_check_lag=-1,
        )  # fmt: skip


def test_clip_runs_only_up_to_the_selected_layer(reference_model):
    model = reference_model
    pixels = prepare_image(read_rgb(INPUTS / "img1.png")).clip[None]
    calls = []
    last = model.vision_tower.encoder.layers[-1]
    handle = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        with torch.inference_mode():
            ours = model.clip_hidden_states(pixels)
            assert not calls  # select layer -2: the last layer never runs
            full = model.vision_tower(pixels, output_hidden_states=True)
    finally:
        handle.remove()
    assert torch.equal(ours, full.hidden_states[-2])


def test_attention_is_sdpa(reference_model, tiny_tokenizer):
    assert reference_model.llm.config._attn_implementation == "sdpa"
    assert reference_model.vision_tower.config._attn_implementation == "sdpa"
    built = build_lisa(ModelSpec(), tiny_tokenizer, device="meta")
    assert built.llm.config._attn_implementation == "sdpa"
    assert built.vision_tower.config._attn_implementation == "sdpa"


def test_build_lisa_creates_parameters_on_device_in_dtype(tiny_tokenizer):
    model = build_lisa(ModelSpec(), tiny_tokenizer, device="meta", dtype=torch.bfloat16)
    tensors = list(model.parameters()) + list(model.buffers())
    assert all(t.device.type == "meta" for t in tensors)
    assert {t.dtype for t in model.parameters()} == {torch.bfloat16}
    assert torch.get_default_dtype() == torch.float32  # restored
    # Float32 on the CPU stays seeded and reproducible.
    a = build_lisa(ModelSpec(), tiny_tokenizer, seed=1).state_dict()
    b = build_lisa(ModelSpec(), tiny_tokenizer, seed=1).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_compile_model_keeps_results(tiny_tokenizer):
    """The eager backend traces with dynamo like the real one but compiles no kernels."""
    model = build_lisa(ModelSpec(), tiny_tokenizer, seed=2)
    rgb = read_rgb(INPUTS / "img0.png")
    plain = LisaPredictor(model)
    plain.set_image(rgb)
    before = plain.predict("the ball", mode="segment")
    compile_model(model, backend="eager")
    compiled = LisaPredictor(model)
    compiled.set_image(rgb)
    after = compiled.predict("the ball", mode="segment")
    np.testing.assert_allclose(after.logits, before.logits, atol=1e-5)
    with pytest.raises(ValueError, match="unknown parts"):
        compile_model(model, parts=("vae",))
    assert set(COMPILABLE_PARTS) >= {"clip", "sam_encoder"}
