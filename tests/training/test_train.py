"""The DeepSpeed engine on the CPU: loss goes down, run files, resume = uninterrupted run,
validation numbers (the original's, and by hand), two processes over gloo."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from lisa_model.checkpoint import load_lisa
from lisa_model.modeling import LisaForwardOutput
from tests.conftest import REFERENCE_DIR
from tests.training.train_helpers import (
    config_dict,
    make_shapes_data,
    make_test_checkpoint,
    train_config,
)
from training.collate import Collator
from training.config import deepspeed_config
from training.data.types import Sample
from training.engine import Trainer, seconds_per_step, validate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A test-size checkpoint and a shapes dataset (4 train, 2 val images)."""
    root = tmp_path_factory.mktemp("train")
    return make_test_checkpoint(root / "ckpt"), make_shapes_data(root / "data")


def adam_state(trainer: Trainer) -> list[dict[str, torch.Tensor]]:
    """The torch AdamW state inside DeepSpeed's ZeRO optimizer, in parameter-group order."""
    opt = trainer.engine.optimizer.optimizer
    return [dict(opt.state[p]) for group in opt.param_groups for p in group["params"]]


def test_training_lowers_the_loss_and_writes_the_run(workspace, tmp_path, capsys):
    source, data = workspace
    out = tmp_path / "run"
    cfg = train_config(source, data, out, optim={"lr": 3e-3, "steps_per_epoch": 20})
    trainer = Trainer(cfg)
    result = trainer.fit()
    trainer.close()

    losses = [s.loss for s in result.steps]
    masks = [s.mask_bce_loss + s.mask_dice_loss for s in result.steps]
    assert len(losses) == 20 and result.global_step == 20
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:5]), losses
    assert np.mean(masks[-5:]) < 0.7 * np.mean(masks[:5]), masks
    with capsys.disabled():
        print(f"\n[test-size model, micro-batch 2] {seconds_per_step(result):.2f} s/step on CPU")

    # WarmupDecayLR as DeepSpeed runs it: step k applies the rate of scheduler iteration k - 2
    # (the first two steps run at 0), warm-up clamped to 2 iterations, then linear decay.
    lrs = [s.lr for s in result.steps]
    assert lrs[:3] == pytest.approx([0.0, 0.0, 1.5e-3])
    assert lrs[3] == pytest.approx(3e-3) and lrs[-1] == pytest.approx(3e-3 * 2 / 18)

    # Run files: everything lisa-export and a reader of the run need.
    record = json.loads((out / "run.json").read_text())
    assert record["source_kind"] == "lisa" and record["world_size"] == 1
    assert record["precision"] == "fp32"
    assert record["tokenizer"]["added_tokens"]["[SEG]"] == trainer.model.seg_token_id
    assert record["lora"]["modules"] == trainer.report.lora_modules and record["lora"]["r"] == 8
    assert record["trainable"]["names"] == trainer.report.trainable_names
    assert record["config"]["model"]["source"] == str(source)
    ds = json.loads((out / "deepspeed_config.json").read_text())
    assert ds == json.loads(json.dumps(deepspeed_config(cfg, "fp32")))
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["kind"] for x in lines].count("train") == 20
    val = [x for x in lines if x["kind"] == "val"]
    assert len(val) == 1 and val[0]["step"] == 20 and val[0]["num_samples"] == 2
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    ckpt = out / "ckpt"
    assert (ckpt / "latest").read_text().strip() == "last"
    for tag in ("best", "last"):
        assert (ckpt / tag / "mp_rank_00_model_states.pt").is_file()
        assert (ckpt / tag / "zero_pp_rank_0_mp_rank_00_optim_states.pt").is_file()
        assert (ckpt / tag / "rng_state_rank0.pt").is_file()

    # A second fresh run into the same directory is refused (it would overwrite checkpoints).
    with pytest.raises(FileExistsError, match="--resume"):
        Trainer(cfg)


def test_resume_continues_like_an_uninterrupted_run(workspace, tmp_path):
    source, data = workspace
    sections = {
        "val": {"dataset": None},
        "optim": {"lr": 3e-3, "steps_per_epoch": 4, "grad_accumulation_steps": 2},
        "run": {"save_interval": 2},
    }
    cfg_a = train_config(source, data, tmp_path / "a", **sections)
    a = Trainer(cfg_a)
    a.fit(max_steps=2)  # "crashes" right after the step-2 checkpoint
    rng_at_save = torch.get_rng_state()
    state_at_save = adam_state(a)

    shutil.copytree(tmp_path / "a", tmp_path / "b")
    cfg_b = train_config(source, data, tmp_path / "b", **sections)
    b = Trainer(cfg_b, resume=tmp_path / "b")
    assert b.global_step == 2 and b.engine.global_steps == 2
    assert torch.equal(torch.get_rng_state(), rng_at_save)  # dropout RNG restored
    resumed = adam_state(b)
    assert len(resumed) == len(state_at_save) > 0
    for got, want in zip(resumed, state_at_save, strict=True):
        assert float(got["step"]) == float(want["step"]) == 2
        assert torch.equal(got["exp_avg"], want["exp_avg"])
        assert torch.equal(got["exp_avg_sq"], want["exp_avg_sq"])
    assert b.last_lr == a.last_lr
    assert b.engine.optimizer.param_groups[0]["lr"] == a.engine.optimizer.param_groups[0]["lr"]

    # Steps 3-4: A goes on in memory (uninterrupted), B from its checkpoint. Both share this
    # process's global RNG, so each starts from the state at the checkpoint.
    rng_b = torch.get_rng_state()
    uninterrupted = a.fit()
    torch.set_rng_state(rng_b)
    continued = b.fit()
    assert [s.step for s in continued.steps] == [3, 4]
    assert [s.loss for s in continued.steps] == pytest.approx(
        [s.loss for s in uninterrupted.steps], rel=1e-6
    )
    for got, want in zip(adam_state(b), adam_state(a), strict=True):
        torch.testing.assert_close(got["exp_avg"], want["exp_avg"], rtol=1e-5, atol=1e-8)

    # The parameters that define the model must match the run's.
    mismatched = train_config(source, data, tmp_path / "b", **sections, lora={"r": 4})
    with pytest.raises(ValueError, match=r"lora\.r"):
        Trainer(mismatched, resume=tmp_path / "b")
    with pytest.raises(ValueError, match="belongs to the run"):
        Trainer(cfg_a, resume=tmp_path / "b")  # would write on into another directory
    (tmp_path / "not-a-run").mkdir()
    with pytest.raises(FileNotFoundError, match="no 'latest' file"):
        Trainer(cfg_b, resume=tmp_path / "not-a-run")
    with pytest.raises(FileNotFoundError, match="no such checkpoint directory"):
        Trainer(cfg_b, resume=tmp_path / "missing")


def test_bf16_with_activation_checkpointing(workspace, tmp_path):
    """The GPU defaults (bf16 weights, recomputed activations) on the CPU: DeepSpeed keeps fp32
    master weights; 3 steps (the first two run at lr 0) change the trained parts only."""
    source, data = workspace
    cfg = train_config(
        source,
        data,
        tmp_path / "bf16",
        val={"dataset": None},
        optim={"lr": 3e-3, "steps_per_epoch": 3, "micro_batch_size": 1},
        run={"precision": "bf16", "gradient_checkpointing": True},
    )
    trainer = Trainer(cfg)
    model = trainer.engine.module
    assert model.dtype == torch.bfloat16 and trainer.report.gradient_checkpointing
    decoder = model.sam.mask_decoder.iou_token.weight.detach().clone()
    encoder = model.sam.image_encoder.patch_embed.proj.weight.detach().clone()
    result = trainer.fit()
    assert all(np.isfinite(s.loss) for s in result.steps) and result.global_step == 3
    assert not torch.equal(model.sam.mask_decoder.iou_token.weight, decoder)
    assert torch.equal(model.sam.image_encoder.patch_embed.proj.weight, encoder)
    assert json.loads((tmp_path / "bf16" / "run.json").read_text())["precision"] == "bf16"


def _val_sample(name: str, masks: np.ndarray, label: np.ndarray) -> Sample:
    n = masks.shape[0]
    question = "<image>\nWhat is the thing in this image? Please output segmentation mask."
    return Sample(
        image_path=name,
        image=np.full((*label.shape, 3), 128, np.uint8),
        conversations=[[(question, "[SEG]." if n == 1 else "[SEG] and [SEG].")]],
        masks=masks.astype(np.uint8),
        label=label.astype(np.uint8),
        texts=["the thing"],
        is_sentence=False,
        source="reason_seg",
    )


class PreparedMasks(nn.Module):
    """Stands in for the model (``validate`` is under test): returns prepared mask logits."""

    def __init__(self, logits: list[torch.Tensor]) -> None:
        super().__init__()
        self.queue = list(logits)

    def forward(self, images_clip, **kwargs) -> LisaForwardOutput:
        return LisaForwardOutput(pred_masks=[self.queue.pop(0)], low_res_masks=[])


def test_validate_scores_by_hand_computed_cases():
    def grid(n: int, *cells: tuple) -> np.ndarray:
        out = np.zeros((n, 4, 4))
        for index, value in cells:
            out[index] = value
        return out

    a_gt = grid(1, ((0, slice(0, 2), slice(0, 2)), 1))  # 4 px
    a_pred = grid(1, ((0, slice(0, 2)), 1))  # 8 px: I 4, U 8
    b_gt = grid(1, ((0, 0, 0), 1))
    b_label = grid(1, ((0, 0, 0), 1), ((0, 3), 255))[0]  # row 3 ignored
    b_pred = grid(1, ((0, 0, 0), 1), ((0, 3), 1))  # I 1, U 1 (row 3 does not count)
    c_gt = grid(2, ((1, 2, 2), 1))  # empty vs empty -> IoU 1; a missed pixel -> IoU 0
    c_pred = grid(2)
    samples = [
        _val_sample("a", a_gt, a_gt[0]),
        _val_sample("b", b_gt, b_label),
        _val_sample("c", c_gt, np.zeros((4, 4))),
    ]
    tokenizer = load_lisa(REFERENCE_DIR / "lisa-tiny").tokenizer
    collate = Collator(tokenizer, inference=True, truncate=False)
    batches = [collate([s]) for s in samples]
    logits = [torch.from_numpy(p).float() * 10 - 5 for p in (a_pred, b_pred, c_pred)]
    metrics = validate(PreparedMasks(logits), batches, "cpu")
    ious = [4 / (8 + 1e-5), 1 / (1 + 1e-5), 1.0, 0.0]
    assert metrics.num_masks == 4 and metrics.num_samples == 3
    assert metrics.giou == pytest.approx(sum(ious) / (4 + 1e-5), abs=1e-6)
    assert metrics.ciou == pytest.approx((4 + 1 + 0 + 0) / (8 + 1 + 0 + 1 + 1e-10), abs=1e-9)


def test_validate_reproduces_the_originals_numbers(tmp_path):
    """Teacher-forced validation of the fixture model on the fixture's ReasonSeg jsons of one
    image (3 queries) gives the intersections and unions the original ``validate`` counted
    (expected/val_single.json), hence its gIoU / cIoU."""
    from torch.utils.data import DataLoader

    from training.data.reason_seg import ReasonSegValDataset

    expected = json.loads((REFERENCE_DIR / "expected" / "val_single.json").read_text())
    keys = [s["key"] for s in expected["samples"]]
    chosen = [k for k in keys if k.startswith("img1_")]  # the smallest image
    (tmp_path / "val").mkdir()
    for key in chosen:
        shutil.copy(REFERENCE_DIR / "inputs" / "reason_seg_val" / f"{key}.json", tmp_path / "val")
        shutil.copy(REFERENCE_DIR / "inputs" / "img1.png", tmp_path / "val" / f"{key}.png")
    model = load_lisa(REFERENCE_DIR / "lisa-tiny")
    loader = DataLoader(
        ReasonSegValDataset(tmp_path, "val"),
        batch_size=1,
        collate_fn=Collator(model.tokenizer, inference=True, truncate=False),
    )
    metrics = validate(model, loader, "cpu")

    per_sample = expected["metrics"]["per_sample"]
    counts = [per_sample[keys.index(k)]["per_mask"][0] for k in chosen]
    inter = [c["intersection"][1] for c in counts]
    union = [c["union"][1] for c in counts]
    assert metrics.num_masks == 3
    assert metrics.intersection[1] == sum(inter) and metrics.union[1] == sum(union)
    giou = sum(i / (u + 1e-5) for i, u in zip(inter, union)) / (3 + 1e-5)
    assert metrics.giou == pytest.approx(giou, abs=1e-6)
    assert metrics.ciou == pytest.approx(sum(inter) / sum(union), abs=1e-9)


def test_two_processes_over_gloo(workspace, tmp_path):
    """``torchrun --nproc_per_node 2`` runs the CLI: ZeRO-2 partitions, all-reduced validation,
    and the two-partition checkpoint exports and loads."""
    source, data = workspace
    out = tmp_path / "run"
    cfg = config_dict(source, data, out)
    cfg["optim"]["steps_per_epoch"] = 2
    config_path = tmp_path / "two.yaml"
    config_path.write_text(yaml.safe_dump(cfg))
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
    }
    env["OMP_NUM_THREADS"] = "1"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    command = [*launcher, "--nproc_per_node", "2", "-m", "training.train"]
    command += ["--config", str(config_path)]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stderr[-4000:]
    assert "lisa-train: 2 steps" in done.stdout

    record = json.loads((out / "run.json").read_text())
    assert record["world_size"] == 2
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x["kind"] == "val"]
    assert len(val) == 1 and val[0]["num_samples"] == 2  # one image per rank, summed
    last = out / "ckpt" / "last"
    for rank in (0, 1):
        assert (last / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").is_file()
        assert (last / f"rng_state_rank{rank}.pt").is_file()

    from training.export import export_checkpoint

    export_checkpoint(out, tmp_path / "export", tag="last", dtype="float32")
    model = load_lisa(tmp_path / "export")
    assert model.seg_token_id == record["tokenizer"]["seg_token_id"]
    print(f"\n[two processes] {seconds:.1f} s for start-up, 2 steps, validation and saving")


def test_trainer_config_is_recorded_with_absolute_paths(workspace, tmp_path, monkeypatch):
    """Relative paths in the config are resolved once, so run.json works from anywhere."""
    source, data = workspace
    monkeypatch.chdir(tmp_path)
    cfg = train_config(source, data, Path("rel-run"), val={"dataset": None})
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, steps_per_epoch=2))
    trainer = Trainer(cfg)
    record = json.loads((tmp_path / "rel-run" / "run.json").read_text())
    assert record["config"]["run"]["output_dir"] == str(tmp_path / "rel-run")
    assert trainer.out_dir == tmp_path / "rel-run"


def test_missing_data_is_reported_with_its_path(workspace, tmp_path, capsys):
    from training.train import main

    source, data = workspace
    config_path = tmp_path / "c.yaml"
    config_path.write_text(yaml.safe_dump(config_dict(source, tmp_path / "no-data", tmp_path)))
    assert main(["--config", str(config_path)]) == 2
    assert str(tmp_path / "no-data") in capsys.readouterr().err
