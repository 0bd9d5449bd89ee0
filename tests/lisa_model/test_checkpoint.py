"""Checkpoint I/O: the published layout both ways, on tiny checkpoints built in code."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest
import torch

from lisa_model.builders import ModelSpec
from lisa_model.checkpoint import (
    from_published_key,
    load_lisa,
    published_state_dict,
    save_lisa,
    to_published_key,
    weight_files,
)
from lisa_model.config import CheckpointError
from lisa_model.sam import (
    SAM_VIT_B,
    SAM_VIT_H,
    SAM_VIT_L,
    SamGeometry,
    build_sam,
    infer_sam_geometry,
)
from tests.conftest import make_tiny_checkpoint

OTHER_SPEC = ModelSpec(
    hidden_size=48, num_layers=3, num_heads=3, intermediate_size=96, rms_norm_eps=1e-5,
    max_position_embeddings=4096, clip_hidden=24, clip_layers=3, clip_heads=2,
    clip_intermediate=48,
    sam=SamGeometry(img_size=512, embed_dim=32, depth=3, num_heads=2, window_size=8,
                    global_attn_indexes=(2,), mlp_ratio=2.0),
)  # fmt: skip


def _load_shards(directory):
    state = {}
    for f in weight_files(directory):
        if f.suffix == ".safetensors":
            from safetensors.torch import load_file

            state.update(load_file(str(f)))
        else:
            state.update(torch.load(f, weights_only=True))
    return state


def test_key_mapping_round_trips():
    for key in [
        "model.layers.3.self_attn.q_proj.weight",
        "lm_head.weight",
        "model.mm_projector.weight",
        "model.text_hidden_fcs.0.2.bias",
        "model.visual_model.mask_decoder.iou_token.weight",
        "model.norm.weight",
    ]:
        assert to_published_key(from_published_key(key)) == key
    assert from_published_key("model.text_hidden_fcs.0.0.weight") == "seg_projector.0.weight"
    assert from_published_key("model.visual_model.image_encoder.pos_embed") == (
        "sam.image_encoder.pos_embed"
    )


def test_save_load_round_trip_is_exact(tiny_checkpoint, tmp_path):
    model = load_lisa(tiny_checkpoint)
    again = save_lisa(model, tmp_path / "again", include_vision_tower=True)
    first, second = _load_shards(tiny_checkpoint), _load_shards(again)
    assert first.keys() == second.keys()
    for key in first:
        assert first[key].dtype == second[key].dtype, key
        assert torch.equal(first[key], second[key]), key
    # As published: LLM in bf16, SAM and the [SEG] projector in fp32, no vision tower keys.
    assert first["model.layers.0.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert first["lm_head.weight"].dtype == torch.bfloat16
    assert first["model.visual_model.image_encoder.pos_embed"].dtype == torch.float32
    assert first["model.text_hidden_fcs.0.0.weight"].dtype == torch.float32
    assert not any("vision_tower" in k for k in first)
    for name in (
        "config.json",
        "tokenizer.model",
        "added_tokens.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
    ):
        assert (tiny_checkpoint / name).read_bytes() == (again / name).read_bytes(), name


def test_sharded_safetensors_and_bin_load_identically(tiny_checkpoint, tmp_path):
    model = load_lisa(tiny_checkpoint)
    st = save_lisa(
        model,
        tmp_path / "st",
        safe_serialization=True,
        max_shard_bytes=400_000,
        include_vision_tower=True,
    )
    bn = save_lisa(model, tmp_path / "bin", max_shard_bytes=400_000, include_vision_tower=True)
    assert (st / "model.safetensors.index.json").is_file()
    assert len(weight_files(st)) > 1 and len(weight_files(bn)) > 1
    a, b = load_lisa(st), load_lisa(bn)
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert ka == kb and torch.equal(va, vb), ka
    ref = model.state_dict()
    for key, value in a.state_dict().items():
        assert torch.equal(value, ref[key]), key


@pytest.mark.parametrize("layout,seg_offset", [("7b-v1", 3), ("13b-llama2", 0)])
def test_other_sizes_and_both_token_layouts(tmp_path, layout, seg_offset):
    directory = make_tiny_checkpoint(tmp_path / layout, layout=layout, spec=OTHER_SPEC, seed=3)
    model = load_lisa(directory)
    assert model.seg_token_id == model.tokenizer.vocab_size + seg_offset
    assert model.config.hidden_size == 48 and len(model.llm.model.layers) == 3
    encoder = model.sam.image_encoder
    assert len(encoder.blocks) == 3
    assert [b.window_size for b in encoder.blocks] == [8, 8, 0]
    assert encoder.blocks[0].attn.num_heads == 2
    assert model.sam_image_size == 512
    ids = model.tokenizer.encode("Sure, [SEG].")
    assert model.seg_token_id in ids
    # The whole path runs at this geometry: masks come back in the frame's size.
    from lisa_model.predictor import LisaPredictor

    predictor = LisaPredictor(model)
    predictor.set_image(np.full((50, 70, 3), 90, np.uint8))
    result = predictor.predict("the red ball", mode="segment")
    assert result.masks.shape == (1, 50, 70)


@pytest.mark.parametrize("geometry", [SAM_VIT_B, SAM_VIT_L, SAM_VIT_H])
def test_sam_geometry_is_inferred_from_weights(geometry):
    with torch.device("meta"):
        sam = build_sam(geometry)
    state = {f"model.visual_model.{k}": v for k, v in sam.state_dict().items()}
    assert infer_sam_geometry(state, prefix="model.visual_model.") == geometry


CONV_SAM = SamGeometry(
    img_size=128, patch_size=8, embed_dim=24, depth=3, encoder="conv", conv_widths=(8, 16, 16),
    decoder_mlp_dim=64,
)  # fmt: skip


def test_conv_sam_encoder_round_trips_through_the_published_layout(tmp_path):
    """A small convolutional SAM encoder (the demo model's) saves under
    ``model.visual_model.image_encoder.*`` and loads back with its geometry read off the weights;
    the predictor runs on it."""
    spec = ModelSpec(sam=CONV_SAM)
    directory = make_tiny_checkpoint(tmp_path / "conv", spec=spec, seed=5)
    model = load_lisa(directory)
    encoder = model.sam.image_encoder
    assert encoder.__class__.__name__ == "ConvImageEncoder"
    assert infer_sam_geometry(model.sam.state_dict()) == CONV_SAM
    assert model.sam_image_size == 128 and len(encoder.context) == 3
    embedding = encoder(torch.zeros(2, 3, 128, 128))
    assert embedding.shape == (2, 256, 16, 16)
    from lisa_model.predictor import LisaPredictor

    predictor = LisaPredictor(model)
    predictor.set_image(np.full((40, 90, 3), 200, np.uint8))
    assert predictor.predict("the red ball", mode="segment").masks.shape == (1, 40, 90)


def test_conv_sam_geometry_errors():
    with pytest.raises(ValueError, match="patch_size"):
        SamGeometry(img_size=128, patch_size=16, encoder="conv", conv_widths=(8, 16, 16))
    with pytest.raises(ValueError, match="encoder"):
        SamGeometry(encoder="resnet")
    state = {f"image_encoder.stem.{i}.0.weight": torch.zeros(8, 3, 3, 3) for i in (0, 2)}
    with pytest.raises(CheckpointError, match="stem"):
        infer_sam_geometry(state)


def _write_modified(src, dst, edit):
    shutil.copytree(src, dst)
    files = weight_files(dst)
    assert len(files) == 1
    state = torch.load(files[0], weights_only=True)
    edit(state)
    torch.save(state, files[0])
    return dst


def test_rotary_inv_freq_keys_are_ignored_and_reported(tiny_checkpoint, tmp_path):
    def add(state):
        state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8, dtype=torch.bfloat16)

    model = load_lisa(_write_modified(tiny_checkpoint, tmp_path / "c", add))
    assert list(model.load_report.ignored) == ["model.layers.0.self_attn.rotary_emb.inv_freq"]


def test_missing_and_unexpected_keys_are_errors(tiny_checkpoint, tmp_path):
    drop = _write_modified(
        tiny_checkpoint, tmp_path / "drop", lambda s: s.pop("model.text_hidden_fcs.0.2.weight")
    )
    with pytest.raises(CheckpointError, match="missing keys.*text_hidden_fcs|seg_projector"):
        load_lisa(drop)
    extra = _write_modified(
        tiny_checkpoint,
        tmp_path / "extra",
        lambda s: s.update({"model.something_new.weight": torch.zeros(1)}),
    )
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_lisa(extra)
    lora = _write_modified(
        tiny_checkpoint,
        tmp_path / "lora",
        lambda s: s.update(
            {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(1)}
        ),
    )
    with pytest.raises(CheckpointError, match="lisa-export"):
        load_lisa(lora)
    shape = _write_modified(
        tiny_checkpoint,
        tmp_path / "shape",
        lambda s: s.update({"model.mm_projector.bias": torch.zeros(7)}),
    )
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_lisa(shape)


def test_base_llava_checkpoint_needs_sam(tiny_checkpoint, tmp_path):
    def strip(state):
        for key in [
            k for k in state if k.startswith(("model.visual_model.", "model.text_hidden_fcs."))
        ]:
            del state[key]

    base = _write_modified(tiny_checkpoint, tmp_path / "base", strip)
    with pytest.raises(CheckpointError, match="sam_checkpoint"):
        load_lisa(base)
    # Starting training: a SAM .pth plus a fresh [SEG] projector.
    sam_pth = tmp_path / "sam_tiny.pth"
    torch.save(load_lisa(tiny_checkpoint).sam.state_dict(), sam_pth)
    model = load_lisa(base, sam_checkpoint=sam_pth, init_missing=True)
    assert any("seg_projector" in s for s in model.load_report.initialised)
    assert torch.isfinite(model.seg_projector[0].weight).all()


def test_bad_sources_give_clear_errors(tmp_path, tiny_checkpoint):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_lisa(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_lisa(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="could not be fetched"):
        load_lisa("xinlai/LISA-7B-v1")  # offline, not in the test hub cache
    no_weights = tmp_path / "noweights"
    shutil.copytree(tiny_checkpoint, no_weights)
    (no_weights / "pytorch_model.bin").unlink()
    with pytest.raises(CheckpointError, match="no weights"):
        load_lisa(no_weights)
    bad_config = tmp_path / "badconfig"
    shutil.copytree(tiny_checkpoint, bad_config)
    (bad_config / "config.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(CheckpointError, match=re.escape(f"{bad_config / 'config.json'}: lacks")):
        load_lisa(bad_config)


def test_vision_tower_override(tiny_checkpoint, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(tiny_checkpoint, moved)
    shutil.move(moved / "vision_tower", tmp_path / "clip")
    # Without the bundled tower it falls back to mm_vision_tower (the test hub cache's tiny CLIP,
    # a different network), with the override it uses the given path.
    model = load_lisa(moved, vision_tower=str(tmp_path / "clip"))
    assert model.load_report.vision_tower == str(tmp_path / "clip")
    original = load_lisa(tiny_checkpoint)
    for (k, v), (_, w) in zip(
        model.vision_tower.state_dict().items(), original.vision_tower.state_dict().items()
    ):
        assert torch.equal(v, w), k


def test_published_state_dict_has_no_vision_tower(reference_model):
    keys = published_state_dict(reference_model)
    assert not any("vision_tower" in k for k in keys)
    assert "model.text_hidden_fcs.0.0.weight" in keys and "lm_head.weight" in keys


def test_quantization_requires_cuda(tiny_checkpoint):
    with pytest.raises(ValueError, match="CUDA"):
        load_lisa(tiny_checkpoint, quantization="4bit")
    with pytest.raises(ValueError, match="quantization"):
        load_lisa(tiny_checkpoint, quantization="3bit")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for bitsandbytes")
@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_quantized_load_keeps_sam_unquantized(tiny_checkpoint, mode):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    model = load_lisa(tiny_checkpoint, device="cuda", dtype="float16", quantization=mode)
    layer = model.llm.model.layers[0].self_attn.q_proj
    assert type(layer).__name__ in ("Linear8bitLt", "Linear4bit")
    assert isinstance(model.sam.mask_decoder.iou_prediction_head.layers[0], torch.nn.Linear)
    assert type(model.sam.mask_decoder.iou_prediction_head.layers[0]) is torch.nn.Linear
