"""Shared pieces of the training-engine tests: a very small LISA, shapes data, configs."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from lisa_model.builders import ModelSpec
from lisa_model.checkpoint import iter_state_dict, weight_files
from lisa_model.sam import SamGeometry
from tests.conftest import make_tiny_checkpoint
from training.config import TrainConfig, config_from_dict

#: Smaller than the fixture model where it costs time: 64 CLIP tokens (patch 28) and a 256 px
#: one-block SAM encoder; the LLM, the 256-d prompt encoder and the mask decoder are the
#: fixture's. One training step (2 images) takes a fraction of a second on 2 cores.
TEST_SPEC = ModelSpec(
    clip_patch_size=28,
    sam=SamGeometry(
        img_size=256, embed_dim=32, depth=1, num_heads=2, window_size=8, global_attn_indexes=(0,)
    ),
)


def make_test_checkpoint(directory: Path, layout: str = "7b-v1", seed: int = 0) -> Path:
    """A self-contained LISA checkpoint of :data:`TEST_SPEC` (CLIP tower bundled)."""
    return make_tiny_checkpoint(directory, layout=layout, spec=TEST_SPEC, seed=seed)


def make_shapes_data(root: Path, train: int = 4, val: int = 2, seed: int = 0) -> Path:
    """``root/reason_seg/ReasonSeg/{train,val}`` with small synthetic shapes images."""
    from training.shapes.scene import ShapesConfig
    from training.shapes.writer import write_dataset

    small = ShapesConfig(min_side=64, max_side=96, min_radius_px=6, min_visible_px=30)
    write_dataset(
        root / "reason_seg" / "ReasonSeg", {"train": train, "val": val}, seed=seed, config=small
    )
    return root


def config_dict(source: Path, data_dir: Path, out_dir: Path) -> dict[str, Any]:
    """A small CPU run: ReasonSeg only, one text per image, micro-batch 2, no accumulation,
    4 steps, no workers."""
    return {
        "model": {"source": str(source)},
        "data": {
            "dataset_dir": str(data_dir),
            "datasets": "reason_seg",
            "sample_rates": "1",
            "explanatory": -1,
            "num_classes_per_sample": 1,  # one conversation per image keeps the LLM batch small
        },
        "val": {"dataset": "ReasonSeg|val"},
        "optim": {
            "lr": 1e-3,
            "warmup_steps": 1,
            "micro_batch_size": 2,
            "grad_accumulation_steps": 1,
            "epochs": 1,
            "steps_per_epoch": 4,
        },
        "run": {"output_dir": str(out_dir), "num_workers": 0, "progress": False},
    }


def train_config(source: Path, data_dir: Path, out_dir: Path, **sections: dict) -> TrainConfig:
    """:func:`config_dict` with ``sections`` merged in key by key."""
    data = config_dict(source, data_dir, out_dir)
    for name, values in sections.items():
        data.setdefault(name, {}).update(values)
    return config_from_dict(copy.deepcopy(data))


def make_base_llava(lisa_dir: Path, out_dir: Path) -> tuple[Path, Path]:
    """A base-LLaVA checkpoint made from a LISA one, plus a SAM ``.pth``.

    Drops SAM (``model.visual_model.*``, written to ``sam.pth`` without the prefix), the ``[SEG]``
    projector (``model.text_hidden_fcs.*``), the LISA config keys, and every added token from
    ``[SEG]`` on that a base LLaVA would not have (``[SEG]``, and for the 13B-llama2 layout also
    ``<im_start>``/``<im_end>``), with their embedding rows. Returns ``(base_dir, sam_pth)``.
    """
    out_dir.mkdir(parents=True)
    state = dict(iter_state_dict(weight_files(lisa_dir)))
    sam = {
        k[len("model.visual_model.") :]: v
        for k, v in state.items()
        if k.startswith("model.visual_model.")
    }
    sam_path = out_dir.parent / f"{out_dir.name}_sam.pth"
    torch.save(sam, sam_path)

    added = json.loads((lisa_dir / "added_tokens.json").read_text())
    first_seg = added["[SEG]"]
    keep_tokens = {t: i for t, i in added.items() if i < first_seg}
    vocab = first_seg
    base = {}
    for key, tensor in state.items():
        if key.startswith(("model.visual_model.", "model.text_hidden_fcs.")):
            continue
        if key in ("model.embed_tokens.weight", "lm_head.weight"):
            tensor = tensor[:vocab].clone()
        base[key] = tensor
    torch.save(base, out_dir / "pytorch_model.bin")

    config = json.loads((lisa_dir / "config.json").read_text())
    for key in ("train_mask_decoder", "out_dim"):
        config.pop(key)
    config["architectures"] = ["LlavaLlamaForCausalLM"]
    config["vocab_size"] = vocab
    config["mm_use_im_start_end"] = "<im_start>" in keep_tokens
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    (out_dir / "added_tokens.json").write_text(json.dumps(keep_tokens))
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        (out_dir / name).write_bytes((lisa_dir / name).read_bytes())
    if (lisa_dir / "vision_tower").is_dir():
        import shutil

        shutil.copytree(lisa_dir / "vision_tower", out_dir / "vision_tower")
    return out_dir, sam_path
