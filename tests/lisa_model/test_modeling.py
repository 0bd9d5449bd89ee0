"""The [SEG] convention, multimodal embedding, and a training step on a tiny model."""

from __future__ import annotations

import pytest
import torch

from lisa_model.checkpoint import load_lisa
from lisa_model.modeling import (
    IGNORE_INDEX,
    dense_positional_encoding,
    expanded_positions,
    seg_hidden_positions,
)
from lisa_model.processing import prepare_image

SEG, IMG = 9, -200


def test_seg_positions_several_none_and_padding():
    ids = torch.tensor(
        [
            [1, 5, IMG, 6, 7, SEG, 8, SEG, 2, 0, 0],  # two [SEG] after one image
            [1, 5, IMG, 6, 7, 8, 2, 0, 0, 0, 0],  # none, padded
            [1, IMG, SEG, 3, 0, 0, 0, 0, 0, 0, 0],  # [SEG] right after the image
        ]
    )
    rows, pos = seg_hidden_positions(ids, SEG, IMG, num_image_tokens=4)
    # Expanded index of a token after the image = text index + 3; the state used is one earlier.
    assert rows.tolist() == [0, 0, 2]
    assert pos.tolist() == [5 + 3 - 1, 7 + 3 - 1, 2 + 3 - 1]
    # Without an image the offset is zero; the row order is row-major.
    rows, pos = seg_hidden_positions(torch.tensor([[4, SEG, SEG], [SEG, 0, 0]])[:1], SEG, IMG, 4)
    assert pos.tolist() == [0, 1]
    empty_rows, empty_pos = seg_hidden_positions(torch.tensor([[1, 2, 3]]), SEG, IMG, 4)
    assert empty_rows.numel() == 0 and empty_pos.numel() == 0


def test_seg_at_position_zero_is_an_error():
    with pytest.raises(ValueError, match="position 0"):
        seg_hidden_positions(torch.tensor([[SEG, 1]]), SEG, IMG, 4)


def test_expanded_positions_with_two_images():
    ids = torch.tensor([[1, IMG, 5, IMG, 6]])
    assert expanded_positions(ids, IMG, 3).tolist() == [[0, 1, 4, 5, 8]]


def test_embed_inputs_places_features_masks_and_labels(reference_model):
    model = reference_model
    p = model.num_image_tokens
    ids = torch.tensor([[1, 801, IMG, 802, 40, 41, 0], [1, 801, IMG, 802, 40, 0, 0]])
    mask = (ids != 0).long()
    labels = torch.tensor([[-100, -100, -100, -100, 40, 41, -100]] * 2)
    feats = torch.randn(2, p, model.config.hidden_size)
    with torch.no_grad():
        embeds, new_mask, new_labels = model.embed_inputs(ids, feats, mask, labels)
        text = model.embed_tokens(torch.tensor([[1, 801, 802, 40]]))
    assert embeds.shape == (2, 7 + p - 1, model.config.hidden_size)
    assert torch.equal(embeds[0, 2 : 2 + p], feats[0])
    assert torch.equal(embeds[1, 2 : 2 + p], feats[1])
    assert torch.equal(embeds[0, [0, 1, 2 + p, 3 + p]], text[0])
    assert new_mask[0].tolist() == [1, 1] + [1] * p + [1, 1, 1, 0]
    assert new_mask[1].tolist() == [1, 1] + [1] * p + [1, 1, 0, 0]
    assert (new_labels[:, 2 : 2 + p] == IGNORE_INDEX).all()
    assert new_labels[0, 3 + p :].tolist() == [40, 41, -100]
    with pytest.raises(ValueError, match="different numbers of image placeholders"):
        model.embed_inputs(torch.tensor([[1, IMG], [1, 2]]), feats)
    with pytest.raises(ValueError, match="feature sets"):
        model.embed_inputs(ids, feats[:1])


def test_dense_pe_matches_upstream(reference_model):
    pe = reference_model.sam.prompt_encoder
    assert torch.allclose(
        dense_positional_encoding(pe, torch.float32), pe.get_dense_pe(), atol=1e-6
    )
    assert dense_positional_encoding(pe, torch.bfloat16).dtype == torch.bfloat16


def test_forward_backward_updates_trainable_parts(tiny_checkpoint):
    import numpy as np

    model = load_lisa(tiny_checkpoint)
    model.train()
    model.seg_projector.requires_grad_(True)
    model.sam.mask_decoder.requires_grad_(True)
    model.llm.lm_head.requires_grad_(True)
    tok = model.tokenizer
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    prepared = prepare_image(rgb)
    prompt = "USER: <im_start><image><im_end> What is the red ball? ASSISTANT: Sure, [SEG].</s>"
    ids = torch.tensor([tok.tokenizer_image_token(prompt)])
    labels = ids.clone()
    labels[:, : ids.shape[1] - 6] = IGNORE_INDEX
    gt = torch.zeros(1, 40, 56)
    gt[:, 10:30, 5:25] = 1
    out = model(
        images_clip=prepared.clip[None], images_sam=prepared.sam[None], input_ids=ids,
        offsets=[0, 1], resize_sizes=[prepared.resized_hw], original_sizes=[(40, 56)],
        labels=labels, gt_masks=[gt],
    )  # fmt: skip
    assert out.pred_masks[0].shape == (1, 40, 56)
    assert torch.isfinite(out.loss)
    assert out.loss.item() == pytest.approx(
        (out.ce_loss + out.mask_bce_loss + out.mask_dice_loss).item(), rel=1e-6
    )
    out.loss.backward()
    assert model.seg_projector[0].weight.grad.abs().sum() > 0
    assert model.sam.mask_decoder.mask_tokens.weight.grad.abs().sum() > 0
    assert model.llm.lm_head.weight.grad.abs().sum() > 0
    assert model.sam.image_encoder.patch_embed.proj.weight.grad is None


def test_forward_rejects_mask_count_mismatch(tiny_checkpoint):
    import numpy as np

    model = load_lisa(tiny_checkpoint)
    prepared = prepare_image(np.zeros((20, 20, 3), np.uint8))
    ids = torch.tensor([model.tokenizer.tokenizer_image_token("<image> It is [SEG].")])
    with pytest.raises(ValueError, match="ground-truth masks"):
        model(
            images_clip=prepared.clip[None], images_sam=prepared.sam[None], input_ids=ids,
            offsets=[0, 1], resize_sizes=[prepared.resized_hw], original_sizes=[(20, 20)],
            gt_masks=[torch.zeros(2, 20, 20)],
        )  # fmt: skip
