"""TrainConfig: YAML + dotted overrides, errors naming the key, the rendered DeepSpeed config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from training.config import (
    ConfigError,
    TrainConfig,
    config_from_dict,
    deepspeed_config,
    dump_config,
    load_config,
    with_absolute_paths,
)

CONFIGS = Path(__file__).resolve().parents[2] / "training" / "configs"
MINIMAL = {"model": {"source": "xinlai/LISA-7B-v1"}, "data": {"dataset_dir": "/data"}}


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_paper_config_renders_the_original_deepspeed_config():
    """The DeepSpeed dict of the original train_ds.py (optimizer passed as client)."""
    cfg = load_config(CONFIGS / "lisa_7b_paper.yaml")
    ds = deepspeed_config(cfg, "bf16")
    assert ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 10
    assert ds["scheduler"] == {
        "type": "WarmupDecayLR",
        "params": {
            "total_num_steps": 5000,
            "warmup_min_lr": 0,
            "warmup_max_lr": 3e-4,
            "warmup_num_steps": 100,
            "warmup_type": "linear",
        },
    }
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["gradient_clipping"] == 1.0
    assert ds["zero_optimization"] == {
        "stage": 2,
        "contiguous_gradients": True,
        "overlap_comm": True,
        "reduce_scatter": True,
        "reduce_bucket_size": 500_000_000,
        "allgather_bucket_size": 500_000_000,
    }
    assert "optimizer" not in ds  # torch AdamW client optimizer
    assert (cfg.optim.lr, cfg.optim.betas, cfg.optim.weight_decay) == (3e-4, (0.9, 0.95), 0.0)
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout) == (8, 16.0, 0.05)
    assert cfg.lora.target_modules == ("q_proj", "v_proj")
    assert (cfg.loss.ce, cfg.loss.bce, cfg.loss.dice) == (1.0, 2.0, 0.5)
    assert cfg.data.sample_rates == (9.0, 3.0, 3.0, 1.0)
    assert cfg.data.samples_per_epoch == 2 * 10 * 500  # per process; x world size at run time
    assert cfg.val.dataset == "ReasonSeg|val" and cfg.val_interval == 500
    # The dataclass defaults are the paper's too (the YAML only spells them out).
    defaults = TrainConfig(model=cfg.model, data=cfg.data, run=cfg.run)
    assert deepspeed_config(defaults, "bf16") == ds


def test_finetune_config_starts_from_lisa_on_reason_seg_only():
    cfg = load_config(CONFIGS / "finetune_lisa.yaml")
    assert cfg.model.source == "xinlai/LISA-7B-v1" and cfg.model.sam_checkpoint is None
    assert cfg.data.dataset_types == ["reason_seg"] and cfg.data.sample_rates == (1.0,)
    assert cfg.run.precision == "auto"
    assert cfg.run.resolved_precision(torch.device("cpu")) == "fp32"
    assert cfg.run.resolved_precision(torch.device("cuda", 0)) == "bf16"
    assert not cfg.run.resolved_gradient_checkpointing(torch.device("cpu"))
    assert cfg.run.resolved_gradient_checkpointing(torch.device("cuda", 0))


def test_overrides_are_yaml_scalars_coerced_to_the_field_type(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", MINIMAL)
    cfg = load_config(
        path,
        [
            "optim.lr=1e-4",  # PyYAML reads this as a string; the float field converts it
            "optim.betas=[0.8, 0.9]",
            "data.dataset_dir=/other",
            "train.lora=false",
            "lora.target_modules=q_proj,k_proj,v_proj",
            "val.dataset=null",
            "deepspeed.reduce_bucket_size=2e8",
            "run.gradient_checkpointing=true",
        ],
    )
    assert cfg.optim.lr == 1e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.optim.betas == (0.8, 0.9)
    assert cfg.data.dataset_dir == "/other"
    assert cfg.train.lora is False
    assert cfg.lora.target_modules == ("q_proj", "k_proj", "v_proj")
    assert cfg.val.dataset is None and cfg.val_interval is None
    assert cfg.deepspeed.reduce_bucket_size == 200_000_000
    assert cfg.run.gradient_checkpointing is True


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrr=1", "optim.lrr"),
        ("optimizer.lr=1", "unknown section 'optimizer'"),
        ("optim.lr=abc", "optim.lr"),
        ("optim.lr=-1", "optim.lr"),
        ("optim.micro_batch_size=0", "optim.micro_batch_size"),
        ("optim.warmup_steps=6000", "optim.warmup_steps"),
        ("train.lora=maybe", "train.lora"),
        ("lora.dropout=1.5", "lora.dropout"),
        ("run.precision=fp64", "run.precision"),
        ("run.gradient_checkpointing=sometimes", "run.gradient_checkpointing"),
        ("deepspeed.zero_stage=3", "deepspeed.zero_stage"),
        ("model.conv_template=vicuna", "model.conv_template"),
        ("data.datasets=imagenet", "data"),
        ("data.seed=3", "data.seed cannot be set"),
        ("data.samples_per_epoch=10", "data.samples_per_epoch cannot be set"),
        ("val.dataset=ReasonSeg", "val.dataset"),
        ("optim.betas=[0.9]", "optim.betas"),
        ("lr=1", "expected section.key=value"),
    ],
)
def test_bad_keys_and_values_are_named(tmp_path, override, message):
    path = write_yaml(tmp_path / "c.yaml", MINIMAL)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("(", r"\(")):
        load_config(path, [override])


def test_unknown_keys_in_the_file_are_all_listed(tmp_path):
    data = {**MINIMAL, "optim": {"lr": 1e-4, "momentum": 0.9}, "extra": {}}
    with pytest.raises(ConfigError) as err:
        load_config(write_yaml(tmp_path / "c.yaml", data))
    assert "optim.momentum" in str(err.value) and "'extra'" in str(err.value)
    assert str(tmp_path / "c.yaml") in str(err.value)


def test_required_keys_and_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.source"):
        config_from_dict({"data": {"dataset_dir": "/d"}})
    with pytest.raises(ConfigError, match=r"data\.dataset_dir"):
        config_from_dict({"model": {"source": "x/y"}})
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


def test_dump_loads_back_to_the_same_config(tmp_path):
    cfg = load_config(CONFIGS / "lisa_7b_paper.yaml", ["optim.lr=2e-4", "val.interval=50"])
    path = tmp_path / "dumped.yaml"
    path.write_text(dump_config(cfg))
    assert load_config(path) == cfg
    assert config_from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_absolute_paths_keep_hub_ids(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sam.pth").write_bytes(b"")
    cfg = config_from_dict({
        "model": {"source": "xinlai/LISA-7B-v1", "sam_checkpoint": "sam.pth"},
        "data": {"dataset_dir": "data"}, "run": {"output_dir": "runs/x"},
    })  # fmt: skip
    resolved = with_absolute_paths(cfg)
    assert resolved.model.source == "xinlai/LISA-7B-v1"
    assert resolved.model.sam_checkpoint == str(tmp_path / "sam.pth")
    assert resolved.data.dataset_dir == str(tmp_path / "data")
    assert resolved.run.output_dir == str(tmp_path / "runs" / "x")


def test_print_config_cli(tmp_path, capsys):
    from training.train import main

    path = write_yaml(tmp_path / "c.yaml", MINIMAL)
    assert main(["--config", str(path), "optim.grad_accumulation_steps=4", "--print-config"]) == 0
    out = capsys.readouterr().out
    head, _, ds_json = out.partition("# DeepSpeed config")
    assert yaml.safe_load(head)["optim"]["grad_accumulation_steps"] == 4
    assert json.loads(ds_json.split("\n", 1)[1])["gradient_accumulation_steps"] == 4
    assert main(["--config", str(path), "optim.nope=1", "--print-config"]) == 2
    assert "optim.nope" in capsys.readouterr().err
    assert main([]) == 2
