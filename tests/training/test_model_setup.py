"""prepare_model_for_training: trainable/frozen sets, LoRA on the LLM only, base-LLaVA and LISA
starting points, seeded rebuilds, LoRA merge."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from lisa_model.checkpoint import iter_state_dict, load_lisa, weight_files
from tests.conftest import REFERENCE_DIR
from tests.training.train_helpers import make_base_llava, make_test_checkpoint, train_config
from training.config import ConfigError
from training.model_setup import (
    TRAINABLE_PREFIXES,
    lora_target_regex,
    merge_lora,
    prepare_model_for_training,
)

FIXTURE = REFERENCE_DIR / "lisa-tiny"
NUM_LAYERS = 2  # the fixture LLM


def config(source: Path, tmp_path: Path, **sections: dict):
    return train_config(source, tmp_path / "data", tmp_path / "out", **sections)


@pytest.fixture(scope="module")
def default_model(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("default")
    return prepare_model_for_training(config(FIXTURE, tmp))


def test_default_trainable_set_is_the_papers(default_model):
    model, report = default_model
    names = [n for n, _ in model.named_parameters()]
    lora = {
        n
        for n in names
        if re.fullmatch(
            r"llm\.model\.layers\.\d\.self_attn\.[qv]_proj\.lora_[AB]\.default\.weight", n
        )
    }  # noqa: E501
    full = {
        n
        for n in names
        if n in ("llm.lm_head.weight", "llm.model.embed_tokens.weight")
        or n.startswith(("sam.mask_decoder.", "seg_projector."))
    }
    expected = lora | full
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == expected
    assert set(report.trainable_names) == expected
    assert len(lora) == 2 * 2 * NUM_LAYERS  # A and B of q and v in every layer
    frozen = set(names) - trainable
    for prefix in ("vision_tower.", "mm_projector.", "sam.image_encoder.", "sam.prompt_encoder."):
        part = {n for n in names if n.startswith(prefix)}
        assert part and part <= frozen, prefix
    base = {n for n in names if n.startswith("llm.model.layers.") and "lora_" not in n}
    assert base and base <= frozen  # LLM base weights (incl. q/v base_layer) frozen
    assert report.trainable_params == sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert report.total_params == sum(p.numel() for p in model.parameters())
    assert report.source_kind == "lisa" and report.added_tokens == {}
    assert not report.gradient_checkpointing  # auto = off on the CPU


def test_lora_is_only_on_the_llms_q_and_v_projections(default_model):
    from peft.tuners.lora import LoraLayer

    model, report = default_model
    lora_modules = sorted(n for n, m in model.named_modules() if isinstance(m, LoraLayer))
    assert lora_modules == sorted(
        f"llm.model.layers.{i}.self_attn.{p}"
        for i in range(NUM_LAYERS)
        for p in ("q_proj", "v_proj")
    )
    assert report.lora_modules == lora_modules
    # CLIP's and SAM's attention layers carry the same names and stay plain Linear layers.
    same_names = [
        n
        for n, m in model.named_modules()
        if n.endswith(("q_proj", "v_proj")) and not n.startswith("llm.")
    ]
    assert any(n.startswith("vision_tower.") for n in same_names)
    assert any(n.startswith("sam.mask_decoder.") for n in same_names)
    for name in same_names:
        assert type(model.get_submodule(name)) is nn.Linear, name
    regex = lora_target_regex(("q_proj", "v_proj"))
    assert re.fullmatch(regex, "model.layers.11.self_attn.q_proj")
    assert not re.fullmatch(regex, "model.layers.1.self_attn.k_proj")
    assert not re.fullmatch(regex, "lm_head")


def test_lora_adapters_start_as_identity(default_model):
    model, _ = default_model
    reference = load_lisa(FIXTURE)
    q = model.llm.model.layers[0].self_attn.q_proj
    assert torch.count_nonzero(q.lora_B.default.weight) == 0  # B = 0: output unchanged
    assert torch.count_nonzero(q.lora_A.default.weight) > 0
    x = torch.randn(3, q.in_features, generator=torch.Generator().manual_seed(0))
    ref_q = reference.llm.model.layers[0].self_attn.q_proj
    torch.testing.assert_close(q(x), ref_q(x), rtol=0, atol=0)
    assert q.scaling["default"] == pytest.approx(16 / 8)
    assert q.lora_dropout["default"].p == pytest.approx(0.05)


def test_switches_train_the_whole_llm_and_the_encoders(tmp_path):
    switches = {
        "lora": False,
        "vision_tower": True,
        "mm_projector": True,
        "sam_encoder": True,
        "sam_prompt_encoder": True,
    }
    model, report = prepare_model_for_training(config(FIXTURE, tmp_path, train=switches))
    assert report.lora_modules == [] and report.lora_target_regex is None
    assert all(p.requires_grad for p in model.parameters())  # every part switched on
    model, _ = prepare_model_for_training(
        config(FIXTURE, tmp_path, train={"lm_head": False, "mask_decoder": False})
    )
    assert not model.llm.lm_head.weight.requires_grad
    assert not any(p.requires_grad for p in model.sam.mask_decoder.parameters())
    assert set(TRAINABLE_PREFIXES) | {"lora", "llm_layers"} == {
        f for f in train_config(FIXTURE, tmp_path, tmp_path).train.__dataclass_fields__
    }
    # A stage with the LLM fixed: only the named parts train (the demo model's first stage).
    stage = {**switches, "llm_layers": False, "lm_head": False, "embed_tokens": False}
    model, _ = prepare_model_for_training(config(FIXTURE, tmp_path, train=stage))
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert all(p.requires_grad for p in model.sam.parameters())
    assert all(p.requires_grad for p in model.seg_projector.parameters())


def test_switched_on_encoders_receive_gradients(tmp_path):
    from tests.training.train_helpers import make_shapes_data
    from training.collate import Collator
    from training.data.reason_seg import ReasonSegValDataset

    switches = {"vision_tower": True, "mm_projector": True, "sam_encoder": True}
    model, _ = prepare_model_for_training(config(FIXTURE, tmp_path, train=switches))
    data = make_shapes_data(tmp_path / "data", train=1, val=1)
    sample = ReasonSegValDataset(data / "reason_seg" / "ReasonSeg", "val")[0]
    batch = Collator(model.tokenizer, num_image_tokens=model.num_image_tokens)([sample])
    from training.engine import model_inputs

    assert model.train_encoders
    model(**model_inputs(batch)).loss.backward()
    for part in ("vision_tower", "mm_projector", "sam.image_encoder"):
        grads = [p.grad for p in model.get_submodule(part).parameters() if p.requires_grad]
        assert grads and any(g is not None and g.abs().sum() > 0 for g in grads), part

    # The paper's default keeps them out of autograd altogether.
    frozen, _ = prepare_model_for_training(config(FIXTURE, tmp_path))
    assert not frozen.train_encoders


def test_seeded_rebuild_is_identical_and_the_seed_matters(tmp_path):
    one, _ = prepare_model_for_training(config(FIXTURE, tmp_path))
    two, _ = prepare_model_for_training(config(FIXTURE, tmp_path))
    other, _ = prepare_model_for_training(config(FIXTURE, tmp_path, run={"seed": 1}))
    a, b, c = one.state_dict(), two.state_dict(), other.state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    key = "llm.model.layers.0.self_attn.q_proj.lora_A.default.weight"
    assert not torch.equal(a[key], c[key])


@pytest.mark.parametrize("layout", ["7b-v1", "13b-llama2"])
def test_start_from_base_llava(tmp_path, layout):
    lisa_dir = make_test_checkpoint(tmp_path / "lisa", layout=layout)
    base_dir, sam_pth = make_base_llava(lisa_dir, tmp_path / "base")
    lisa_tokens = json.loads((lisa_dir / "added_tokens.json").read_text())
    base_vocab = json.loads((base_dir / "config.json").read_text())["vocab_size"]

    with pytest.raises(ConfigError, match=r"model\.sam_checkpoint"):
        prepare_model_for_training(config(base_dir, tmp_path))
    model, report = prepare_model_for_training(
        config(base_dir, tmp_path, model={"sam_checkpoint": str(sam_pth)})
    )
    # The tokens come back with the published ids, [SEG] first, then the image delimiters.
    assert model.tokenizer.added_tokens == lisa_tokens
    assert report.added_tokens == {t: i for t, i in lisa_tokens.items() if i >= base_vocab}
    vocab = len(lisa_tokens) + model.tokenizer.vocab_size
    assert report.vocab_size == vocab == model.config.raw["vocab_size"]
    assert model.llm.get_input_embeddings().weight.shape[0] == vocab
    assert model.llm.lm_head.weight.shape[0] == vocab and model.llm.config.vocab_size == vocab

    # Old rows kept, new rows drawn from N(0, 0.02); SAM from the .pth; [SEG] projector fresh.
    base_state = dict(iter_state_dict(weight_files(base_dir)))
    embed = model.llm.get_input_embeddings().weight.detach()
    assert torch.equal(embed[:base_vocab], base_state["model.embed_tokens.weight"].float())
    new_rows = embed[base_vocab:]
    assert 0 < new_rows.abs().max() < 0.02 * 6
    sam_state = torch.load(sam_pth, weights_only=True)
    for key, value in sam_state.items():
        assert torch.equal(model.sam.state_dict()[key], value.float()), key
    assert any("seg_projector" in p for p in report.initialised)
    assert report.source_kind == "llava"

    # The config now describes a LISA model: saved, it loads as one.
    raw = model.config.raw
    assert raw["train_mask_decoder"] is True and raw["out_dim"] == 256
    assert raw["architectures"] == ["LISAForCausalLM"] and raw["mm_use_im_start_end"] is True
    merge_lora(model)
    from lisa_model.checkpoint import save_lisa

    save_lisa(model, tmp_path / "saved", include_vision_tower=True)
    loaded = load_lisa(tmp_path / "saved")
    assert loaded.seg_token_id == lisa_tokens["[SEG]"]


def test_start_from_lisa_keeps_its_sam(tmp_path, caplog):
    """A LISA source brings its trained SAM; a sam_checkpoint is ignored with a warning (#159)."""
    lisa_dir = make_test_checkpoint(tmp_path / "lisa", seed=3)
    _, sam_pth = make_base_llava(make_test_checkpoint(tmp_path / "other", seed=4), tmp_path / "b")
    model, report = prepare_model_for_training(
        config(lisa_dir, tmp_path, model={"sam_checkpoint": str(sam_pth)})
    )
    assert "ignored" in caplog.text
    assert report.source_kind == "lisa" and report.initialised == []
    state = dict(iter_state_dict(weight_files(lisa_dir)))
    key = "mask_decoder.iou_token.weight"
    assert torch.equal(model.sam.state_dict()[key], state[f"model.visual_model.{key}"])


def test_merge_lora_folds_the_adapters_into_the_weights(tmp_path):
    model, _ = prepare_model_for_training(config(FIXTURE, tmp_path))
    gen = torch.Generator().manual_seed(0)
    for name, param in model.named_parameters():
        if "lora_B" in name:  # a trained adapter
            param.data = torch.randn(param.shape, generator=gen) * 0.1
    model.eval()
    ids = torch.tensor([[1, 5, 9, 300, 2]])
    before = model.llm(input_ids=ids).logits
    q = model.llm.model.layers[0].self_attn.q_proj
    expected_w = q.base_layer.weight + q.lora_B.default.weight @ q.lora_A.default.weight * 2.0
    assert merge_lora(model) == 2 * NUM_LAYERS
    merged_q = model.llm.model.layers[0].self_attn.q_proj
    assert type(merged_q) is nn.Linear
    torch.testing.assert_close(merged_q.weight, expected_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(model.llm(input_ids=ids).logits, before, rtol=0, atol=1e-5)
    assert not any("lora_" in k or "base_layer" in k for k in model.state_dict())


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    grads = []
    for on in (False, True):
        sections = {"run": {"gradient_checkpointing": on}, "lora": {"dropout": 0.0}}
        model, report = prepare_model_for_training(config(FIXTURE, tmp_path, **sections))
        assert report.gradient_checkpointing is on
        assert all(layer.gradient_checkpointing is on for layer in model.llm.model.layers)
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.fill_(0.01)
        model.train()
        model.llm(input_ids=torch.tensor([[1, 5, 9, 300, 2]])).logits.square().mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        if grads[0][name] is not None:
            torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7)
    assert grads[1]["llm.model.layers.0.self_attn.q_proj.lora_A.default.weight"].abs().sum() > 0
