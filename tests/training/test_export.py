"""lisa-export: ZeRO checkpoint -> merged LoRA -> published layout that loads and segments like
the model did at the end of training."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat

import pytest
import torch

from lisa_model.checkpoint import iter_state_dict, load_lisa, weight_files
from tests.training.train_helpers import (
    make_base_llava,
    make_shapes_data,
    make_test_checkpoint,
    train_config,
)
from training.engine import Trainer, model_inputs
from training.export import main


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps from a base LLaVA (SAM from a .pth, [SEG] added) with embed_tokens frozen, so the
    new embedding rows are seeded, never saved, and must be rebuilt identically by the export."""
    root = tmp_path_factory.mktemp("export")
    lisa = make_test_checkpoint(root / "lisa")
    base, sam_pth = make_base_llava(lisa, root / "base")
    data = make_shapes_data(root / "data")
    cfg = train_config(
        base,
        data,
        root / "run",
        model={"sam_checkpoint": str(sam_pth)},
        train={"embed_tokens": False},
        optim={"lr": 3e-3, "steps_per_epoch": 4},
    )
    trainer = Trainer(cfg)
    trainer.fit()
    trainer.close()
    model = trainer.engine.module.eval()
    batch = next(iter(trainer.val_batches()))
    return {"root": root, "run": root / "run", "model": model, "batch": batch, "lisa": lisa}


def predictions(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced mask logits ``(n, H, W)`` and the LLM's token logits of one batch."""
    with torch.no_grad():
        out = model(**model_inputs(batch, targets=False))
        ids = batch.input_ids.clamp(min=0)  # the image placeholder becomes <unk> for this probe
        logits = model.llm(input_ids=ids, attention_mask=batch.attention_mask).logits
    return out.pred_masks[0], logits


def test_float32_export_segments_like_the_trained_model(trained, tmp_path, capsys):
    out = tmp_path / "fp32"
    assert main([str(trained["run"]), "--out", str(out), "--dtype", "float32"]) == 0
    assert "LoRA layers merged" in capsys.readouterr().out
    exported = load_lisa(out)
    model = trained["model"]

    # Training changed the weights the export has to carry: LoRA (merged), the mask decoder.
    source = load_lisa(trained["lisa"])
    q = "llm.model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(exported.state_dict()[q], source.state_dict()[q])
    lora_b = model.llm.model.layers[0].self_attn.q_proj.lora_B.default.weight
    assert lora_b.abs().max() > 0

    masks, logits = predictions(model, trained["batch"])
    masks_x, logits_x = predictions(exported, trained["batch"])
    torch.testing.assert_close(masks_x, masks, rtol=0, atol=1e-4)
    torch.testing.assert_close(logits_x, logits, rtol=0, atol=1e-4)
    assert torch.equal(masks_x > 0, masks > 0)

    # Frozen new vocabulary rows were rebuilt from the seed, not saved: still identical.
    embed = model.llm.get_input_embeddings().weight
    assert torch.equal(exported.llm.get_input_embeddings().weight, embed)


def test_default_export_is_bf16_and_loads(trained, tmp_path):
    fp32, bf16 = tmp_path / "fp32", tmp_path / "bf16"
    assert main([str(trained["run"]), "--out", str(fp32), "--dtype", "float32"]) == 0
    assert main([str(trained["run"] / "ckpt"), "--out", str(bf16)]) == 0
    full = dict(iter_state_dict(weight_files(fp32)))
    half = dict(iter_state_dict(weight_files(bf16)))
    assert full.keys() == half.keys()
    for key, value in half.items():
        if key.startswith(("model.visual_model.", "model.text_hidden_fcs.")):
            assert value.dtype == torch.float32 and torch.equal(value, full[key]), key
        else:  # LLM, projector, lm_head: the fp32 values rounded to bf16
            assert value.dtype == torch.bfloat16, key
            assert torch.equal(value, full[key].to(torch.bfloat16)), key
    model = load_lisa(bf16, dtype="bfloat16")
    masks, _ = predictions(model, trained["batch"])
    assert masks.shape == trained["batch"].gt_masks[0].shape and torch.isfinite(masks).all()


def test_export_has_the_published_layout(trained, tmp_path):
    out = tmp_path / "layout"
    assert main([str(trained["run"]), "--out", str(out), "--tag", "last"]) == 0
    keys = set(dict(iter_state_dict(weight_files(out))))
    reference = set(dict(iter_state_dict(weight_files(trained["lisa"]))))
    assert keys == reference  # same keys as a LISA checkpoint: no LoRA, no base_layer
    config = json.loads((out / "config.json").read_text())
    assert config["train_mask_decoder"] is True and config["architectures"] == ["LISAForCausalLM"]
    assert (
        config["vocab_size"]
        == json.loads((trained["lisa"] / "config.json").read_text())["vocab_size"]
    )
    assert json.loads((out / "added_tokens.json").read_text()) == json.loads(
        (trained["lisa"] / "added_tokens.json").read_text()
    )
    assert (out / "vision_tower" / "config.json").is_file()  # local CLIP: bundled


def test_refusals_name_the_paths(trained, tmp_path, capsys):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file.txt").write_text("x")
    assert main([str(trained["run"]), "--out", str(busy)]) == 2
    assert str(busy) in capsys.readouterr().err

    assert main([str(tmp_path / "nope"), "--out", str(tmp_path / "o1")]) == 2
    assert str(tmp_path / "nope") in capsys.readouterr().err

    assert main([str(trained["run"]), "--out", str(tmp_path / "o2"), "--tag", "step9"]) == 2
    err = capsys.readouterr().err
    assert "step9" in err and "best" in err and "last" in err

    orphan = tmp_path / "orphan"
    shutil.copytree(trained["run"] / "ckpt", orphan / "ckpt")
    assert main([str(orphan), "--out", str(tmp_path / "o3")]) == 2
    assert str(orphan) in capsys.readouterr().err and not (tmp_path / "o3").exists()

    assert main([str(trained["run"]), "--out", str(tmp_path / "o4"), "--dtype", "int8"]) == 2
    assert "int8" in capsys.readouterr().err


class _RunsCode:
    """Unpickled without restriction, this would create ``marker`` (and run any command)."""

    def __init__(self, marker) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def _copy_run(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained["run"], run)
    return run, run / "ckpt" / "last" / "mp_rank_00_model_states.pt"


def test_checkpoint_files_hold_only_the_allowed_globals(trained):
    """What the allowlist is made of: the globals DeepSpeed pickles into lisa-train's files."""
    from torch.serialization import get_unsafe_globals_in_checkpoint

    from training.checkpoint_files import deepspeed_safe_globals

    allowed = {f"{g.__module__}.{g.__qualname__}" for g in deepspeed_safe_globals()}
    files = sorted((trained["run"] / "ckpt" / "last").glob("*.pt"))
    assert len(files) >= 2
    found = set()
    for file in files:
        found |= set(get_unsafe_globals_in_checkpoint(file))
    assert found and found <= allowed


def test_crafted_checkpoint_file_runs_nothing(trained, tmp_path, capsys):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from training.checkpoint_files import deepspeed_safe_globals, weights_only_loads

    run, states_file = _copy_run(trained, tmp_path)
    marker = tmp_path / "MARKER"
    with torch.serialization.safe_globals(deepspeed_safe_globals()):
        states = torch.load(states_file, weights_only=True)
    states["client_note"] = _RunsCode(marker)
    torch.save(states, states_file)

    out = tmp_path / "out"
    assert main([str(run), "--tag", "last", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lisa-export: error: ")
    assert f"{states_file}: " in err and "refused global posix.system" in err
    assert not marker.exists() and not out.exists()
    # DeepSpeed's own loader (weights_only=False inside) is forced to safe loads as well.
    with pytest.raises(pickle.UnpicklingError), weights_only_loads():
        get_fp32_state_dict_from_zero_checkpoint(str(run / "ckpt"), tag="last")
    assert not marker.exists()


def test_truncated_checkpoint_file_is_named(trained, tmp_path, capsys):
    run, _ = _copy_run(trained, tmp_path)
    optim = next((run / "ckpt" / "last").glob("*optim_states.pt"))
    optim.write_bytes(optim.read_bytes()[:1000])
    assert main([str(run), "--tag", "last", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{optim}: truncated or corrupt" in err


@pytest.mark.parametrize("umask", [0o002, 0o027])
def test_export_follows_the_umask(trained, tmp_path, umask):
    """Like any file the tools write: 0666 & ~umask for files, 0777 & ~umask for folders (the
    staging folder comes from mkdtemp, 0700; safetensors writes 0600)."""
    out = tmp_path / "export"
    previous = os.umask(umask)
    try:
        assert main([str(trained["run"]), "--out", str(out), "--safetensors"]) == 0
    finally:
        os.umask(previous)
    paths = [out, *out.rglob("*")]
    assert any(p.suffix == ".safetensors" for p in paths) and (out / "vision_tower").is_dir()
    for path in paths:
        expected = (0o777 if path.is_dir() else 0o666) & ~umask
        assert stat.S_IMODE(path.stat().st_mode) == expected, path


def test_broken_source_checkpoint_is_one_error_line(trained, tmp_path, capsys):
    """The export rebuilds the model from run.json's model.source: a truncated weights file
    there is named."""
    run, _ = _copy_run(trained, tmp_path)
    record = json.loads((run / "run.json").read_text())
    source = tmp_path / "source"
    shutil.copytree(record["config"]["model"]["source"], source)
    weights = source / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:5000])
    record["config"]["model"]["source"] = str(source)
    (run / "run.json").write_text(json.dumps(record))
    assert main([str(run), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"lisa-export: error: {weights}: truncated")
