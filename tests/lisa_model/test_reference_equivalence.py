"""Equivalence with the original implementation on its own tiny checkpoint.

The fixture (tests/fixtures/lisa_reference, see its README) was produced by the original LISA
code; here it is loaded through ``load_lisa`` exactly as a user loads a published checkpoint, and
every stage is compared: prompt and generated ids exactly, logits within 1e-4, binary masks where
the reference logit is not within 1e-4 of 0, teacher-forced validation and training losses.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from lisa_model.metrics import SegMetrics
from lisa_model.modeling import expanded_positions
from lisa_model.predictor import LisaPredictor
from lisa_model.processing import prepare_image
from lisa_model.sam_encoder import FusedImageEncoderViT
from tests.conftest import REFERENCE_DIR, read_rgb
from training.data.reason_seg import read_reason_seg_json

EXPECTED = REFERENCE_DIR / "expected"
INPUTS = REFERENCE_DIR / "inputs"
ATOL = 1e-4


def assert_masks_match(ours: np.ndarray, ref: np.ndarray) -> None:
    assert ours.shape == ref.shape
    if ref.size == 0:
        return
    np.testing.assert_allclose(ours, ref, atol=ATOL, rtol=0)
    decided = np.abs(ref) >= ATOL
    assert np.array_equal((ours > 0)[decided], (ref > 0)[decided])


@pytest.fixture(scope="module")
def generate_cases():
    return json.loads((EXPECTED / "generate.json").read_text()), np.load(EXPECTED / "generate.npz")


@pytest.fixture(scope="module")
def predictor(reference_model):
    return LisaPredictor(reference_model)


def test_checkpoint_loads_with_report(reference_model):
    report = reference_model.load_report
    assert report.vision_tower == "openai/clip-vit-large-patch14"
    # Only the bf16 RoPE buffers are ignored.
    assert report.ignored and all(k.endswith("rotary_emb.inv_freq") for k in report.ignored)
    assert reference_model.seg_token_id == 803
    geometry = reference_model.sam.image_encoder
    assert len(geometry.blocks) == 2 and geometry.blocks[1].window_size == 0  # global block 1
    assert geometry.blocks[0].window_size == 14
    assert isinstance(geometry, FusedImageEncoderViT)  # the default; the fixtures hold with it


def test_rope_frequencies_are_computed_not_loaded(reference_model):
    rotary = reference_model.llm.model.rotary_emb
    head_dim = (
        reference_model.config.hidden_size // reference_model.config.raw["num_attention_heads"]
    )
    exact = 1.0 / (10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    assert torch.equal(rotary.inv_freq.float(), exact)


def test_generation_matches_reference(predictor, generate_cases):
    cases, arrays = generate_cases
    current = None
    assert len(cases) == 9
    for case in cases:
        if case["image"] != current:
            predictor.set_image(read_rgb(INPUTS / case["image"]))
            current = case["image"]
        key = case["key"]
        assert predictor.prompt_ids(case["user_text"]) == case["input_ids"], key
        result = predictor.predict(case["user_text"], raw_prompt=True, max_new_tokens=16)
        assert result.token_ids == case["generated_ids"], key
        assert result.masks.shape[0] == case["n_seg"], key
        assert_masks_match(result.logits, arrays[f"{key}__pred_mask_logits"])
        assert (
            np.array_equal(result.masks.astype(np.uint8), arrays[f"{key}__pred_mask_binary"])
            or np.abs(arrays[f"{key}__pred_mask_logits"]).min() < ATOL
        ), key
        assert result.found == (case["n_seg"] > 0)
        tokenizer = predictor.model.tokenizer
        assert tokenizer.decode(result.token_ids) == case["decoded_answer"], key
        # chat.py's printed text: decode everything but the image placeholder, drop newlines.
        # The fixture captured the printed line, so it ends at the first line boundary in the
        # str.splitlines sense (one answer contains a \x1d byte token).
        ids = [i for i in case["input_ids"] + result.token_ids if i != -200]
        text = tokenizer.decode(ids).replace("\n", "").replace("  ", " ")
        assert text.splitlines()[0] == case["decoded_text_output"], key


def test_intermediate_tensors_match_reference(reference_model, generate_cases):
    """CLIP features, projector, SAM embedding, [SEG] rows, prompts and low-res masks."""
    cases, arrays = generate_cases
    model = reference_model
    predictor = LisaPredictor(model)
    for image in ("img0", "img2"):
        prepared = prepare_image(read_rgb(INPUTS / f"{image}.png"))
        with torch.inference_mode():
            out = model.vision_tower(prepared.clip[None], output_hidden_states=True)
            clip = out.hidden_states[-2][0, 1:]
            proj = model.encode_clip(prepared.clip[None])[0]
            emb = model.encode_sam(prepared.sam[None])[0]
        np.testing.assert_allclose(
            clip.numpy(), arrays[f"{image}__clip_patch_features"], atol=ATOL
        )
        np.testing.assert_allclose(proj.numpy(), arrays[f"{image}__mm_projector_out"], atol=ATOL)
        np.testing.assert_allclose(
            emb[:4].numpy(), arrays[f"{image}__image_embeddings_ch0_3"], atol=ATOL
        )
    for case in cases:
        if case["n_seg"] == 0 or not case["key"].startswith("img2"):
            continue
        key = case["key"]
        predictor.set_image(read_rgb(INPUTS / case["image"]))
        from lisa_model.generation import greedy_generate

        with torch.inference_mode():
            ids = torch.tensor([case["input_ids"]])
            feats = predictor._frame.image_features
            embeds, _, _ = model.embed_inputs(ids, feats)
            gen = greedy_generate(
                model.llm,
                embeds,
                max_new_tokens=16,
                eos_token_id=2,
                seg_token_id=model.seg_token_id,
            )
            prompts = model.project_seg_hidden(gen.seg_hidden)
            low_res = model.decode_masks(predictor._frame.image_embedding, prompts)
        np.testing.assert_allclose(
            gen.first_logits.numpy(), arrays[f"{key}__step_logits_first"], atol=ATOL
        )
        np.testing.assert_allclose(gen.seg_hidden.numpy(), arrays[f"{key}__seg_hidden"], atol=ATOL)
        np.testing.assert_allclose(prompts.numpy(), arrays[f"{key}__pred_embeddings"], atol=ATOL)
        np.testing.assert_allclose(low_res.numpy(), arrays[f"{key}__low_res_masks"], atol=ATOL)
        # The [SEG] rows sit where the original took them: expanded position of [SEG] - 1.
        out_ids = torch.tensor([case["output_ids"]])
        seg_cols = (out_ids[0] == model.seg_token_id).nonzero()[:, 0]
        expanded = expanded_positions(out_ids, -200, 256)[0, seg_cols] - 1
        assert expanded.tolist() == case["seg_hidden_index_in_expanded_seq"]


def test_fast_path_equals_generation_mask_when_first_token_is_seg(predictor, generate_cases):
    """img0's answers start with [SEG]: the teacher-forced state is the same state."""
    cases, arrays = generate_cases
    predictor.set_image(read_rgb(INPUTS / "img0.png"))
    case = cases[0]
    fast = predictor.predict(case["user_text"], raw_prompt=True, mode="segment")
    assert fast.masks.shape[0] == 1 and fast.text == "" and fast.token_ids == []
    assert_masks_match(fast.logits, arrays[f"{case['key']}__pred_mask_logits"])


@pytest.mark.parametrize("which", ["val_single", "val_batched"])
def test_teacher_forced_validation_matches_reference(reference_model, which):
    meta = json.loads((EXPECTED / f"{which}.json").read_text())
    arrays = np.load(EXPECTED / f"{which}.npz")
    metrics = SegMetrics()
    for sample in meta["samples"]:
        key = sample["key"]
        image = key.split("_")[0]
        prepared = prepare_image(read_rgb(INPUTS / f"{image}.png"))
        if which == "val_single":
            ids = torch.tensor([sample["input_ids"]])
            mask = None
            offsets = [0, 1]
        else:
            ids = torch.from_numpy(arrays[f"{key}__input_ids"])
            mask = torch.from_numpy(arrays[f"{key}__attention_masks"]).long()
            offsets = sample["offset"]
        with torch.inference_mode():
            out = reference_model(
                images_clip=prepared.clip[None],
                images_sam=prepared.sam[None],
                input_ids=ids,
                attention_mask=mask,
                offsets=offsets,
                resize_sizes=[prepared.resized_hw],
                original_sizes=[prepared.original_hw],
            )
        pred = out.pred_masks[0].numpy()
        assert_masks_match(pred, arrays[f"{key}__pred_mask_logits"])
        if which == "val_single":
            np.testing.assert_allclose(
                out.low_res_masks[0].numpy(), arrays[f"{key}__low_res_masks"], atol=ATOL
            )
            gt = arrays[f"{key}__gt_mask"]
        else:
            gt = np.stack(
                [
                    np.load(EXPECTED / "val_single.npz")[f"{image}_{q}__gt_mask"][0]
                    for q in ("q0_short", "q1_long", "q2_explain")
                ]
            )
        metrics.update(torch.from_numpy(pred), torch.from_numpy(gt))
    expected = meta["metrics"]
    assert metrics.giou == pytest.approx(expected["giou"], abs=1e-6)
    assert metrics.ciou == pytest.approx(expected["ciou"], abs=1e-6)


def test_training_forward_losses_match_reference(reference_model):
    meta = json.loads((EXPECTED / "train_forward.json").read_text())
    images, queries = meta["images"], meta["queries"]
    prepared = [prepare_image(read_rgb(INPUTS / f"{im}.png")) for im in images]
    gts = []
    for im, qs, prep in zip(images, queries, prepared):
        # The reference's targets: get_mask_from_json(json) == 1.
        masks = [
            read_reason_seg_json(
                INPUTS / "reason_seg_val" / f"{im}_{q}.json", prep.original_hw
            ).mask
            == 1
            for q in qs
        ]
        gts.append(torch.from_numpy(np.stack(masks).astype(np.float32)))
    model = reference_model
    model.train()
    try:
        out = model(
            images_clip=torch.stack([p.clip for p in prepared]),
            images_sam=torch.stack([p.sam for p in prepared]),
            input_ids=torch.tensor(meta["input_ids"]),
            attention_mask=torch.tensor(meta["attention_masks"]),
            labels=torch.tensor(meta["labels"]),
            offsets=meta["offset"],
            resize_sizes=[p.resized_hw for p in prepared],
            original_sizes=[p.original_hw for p in prepared],
            gt_masks=gts,
        )
    finally:
        model.eval()
    assert out.ce_loss.item() == pytest.approx(meta["ce_loss"], abs=1e-4)
    assert out.mask_bce_loss.item() == pytest.approx(meta["mask_bce_loss"], abs=1e-4)
    assert out.mask_dice_loss.item() == pytest.approx(meta["mask_dice_loss"], abs=1e-4)
    assert out.loss.item() == pytest.approx(meta["loss"], abs=1e-4)
