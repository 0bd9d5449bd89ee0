"""Build LISA models in code with random weights: tests, benchmarks and the demo model.

``build_lisa(spec, tokenizer)`` gives a model of any size with the published structure, so it
saves in the published layout and loads back through :func:`lisa_model.checkpoint.load_lisa`,
the same path real checkpoints take. Published shapes are available as ``LISA_7B`` / ``LISA_13B``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

from lisa_model.config import DEFAULT_VISION_TOWER, LisaConfig
from lisa_model.modeling import LisaModel, build_mm_projector, build_seg_projector
from lisa_model.sam import SAM_VIT_H, SamGeometry, build_sam

#: Added-token orders of the two published layouts (ids follow the sentencepiece vocabulary).
ADDED_TOKEN_LAYOUTS: dict[str, tuple[str, ...]] = {
    "7b-v1": ("<im_patch>", "<im_start>", "<im_end>", "[SEG]"),
    "13b-llama2": ("[SEG]", "<im_start>", "<im_end>"),
}

TINY_SAM = SamGeometry(
    embed_dim=64, depth=2, num_heads=2, window_size=14, global_attn_indexes=(1,)
)


@dataclass
class ModelSpec:
    """Sizes of a LISA model built in code. Defaults: the reference fixture's tiny model."""

    hidden_size: int = 64
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int | None = None
    intermediate_size: int = 128
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    clip_hidden: int = 32
    clip_layers: int = 2
    clip_heads: int = 2
    clip_intermediate: int = 128
    clip_image_size: int = 224
    clip_patch_size: int = 14
    mm_projector_type: str = "linear"
    sam: SamGeometry = field(default_factory=lambda: TINY_SAM)
    out_dim: int = 256
    vision_tower_name: str = DEFAULT_VISION_TOWER

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_heads}")
        if self.clip_image_size % self.clip_patch_size:
            raise ValueError("clip_image_size must be a multiple of clip_patch_size")


LISA_7B = ModelSpec(
    hidden_size=4096, num_layers=32, num_heads=32, intermediate_size=11008,
    clip_hidden=1024, clip_layers=24, clip_heads=16, clip_intermediate=4096, sam=SAM_VIT_H,
)  # fmt: skip
LISA_13B = ModelSpec(
    hidden_size=5120, num_layers=40, num_heads=40, intermediate_size=13824,
    max_position_embeddings=4096, rms_norm_eps=1e-5,
    clip_hidden=1024, clip_layers=24, clip_heads=16, clip_intermediate=4096, sam=SAM_VIT_H,
)  # fmt: skip


def published_config(spec: ModelSpec, vocab_size: int) -> dict[str, Any]:
    """A ``config.json`` dictionary in the published LISA layout for ``spec``."""
    return {
        "architectures": ["LISAForCausalLM"],
        "bos_token_id": 1,
        "eos_token_id": 2,
        "freeze_mm_mlp_adapter": True,
        "hidden_act": "silu",
        "hidden_size": spec.hidden_size,
        "image_aspect_ratio": "square",
        "image_grid_pinpoints": None,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate_size,
        "max_position_embeddings": spec.max_position_embeddings,
        "max_sequence_length": spec.max_position_embeddings,
        "mm_hidden_size": spec.clip_hidden,
        "mm_projector_type": spec.mm_projector_type,
        "mm_use_im_patch_token": False,
        "mm_use_im_start_end": True,
        "mm_vision_select_feature": "patch",
        "mm_vision_select_layer": -2,
        "mm_vision_tower": spec.vision_tower_name,
        "model_type": "llava",
        "num_attention_heads": spec.num_heads,
        "num_hidden_layers": spec.num_layers,
        "num_key_value_heads": spec.num_kv_heads or spec.num_heads,
        "out_dim": spec.out_dim,
        "pad_token_id": 0,
        "pretrain_mm_mlp_adapter": None,
        "pretraining_tp": 1,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_scaling": None,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "train_mask_decoder": True,
        "tune_mm_mlp_adapter": False,
        "use_cache": False,
        "use_mm_proj": True,
        "vision_tower": spec.vision_tower_name,
        "vocab_size": vocab_size,
    }


def build_clip(spec: ModelSpec) -> torch.nn.Module:
    """A randomly initialised ``CLIPVisionModel`` of the spec's geometry."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    cfg = CLIPVisionConfig(
        hidden_size=spec.clip_hidden,
        intermediate_size=spec.clip_intermediate,
        num_hidden_layers=spec.clip_layers,
        num_attention_heads=spec.clip_heads,
        image_size=spec.clip_image_size,
        patch_size=spec.clip_patch_size,
        projection_dim=spec.clip_hidden,
        hidden_act="quick_gelu",
        attn_implementation="sdpa",
    )
    return CLIPVisionModel(cfg).eval()


def build_lisa(
    spec: ModelSpec,
    tokenizer: Any,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> LisaModel:
    """A LISA model of ``spec`` with random weights (seeded), vocabulary ``len(tokenizer)``.

    Parameters are created directly on ``device`` in ``dtype`` (a 7B model in bf16 is built on
    the GPU without a float32 or host copy). ``device="meta"`` gives shapes only (sizes, counts).
    Float32 on the CPU gives the same weights as always for a given seed.
    """
    from transformers import LlamaForCausalLM

    device = torch.device(device)
    config = LisaConfig(raw=published_config(spec, len(tokenizer)))
    rng_devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices), device, _default_dtype(dtype):
        torch.manual_seed(seed)
        llm = LlamaForCausalLM(config.llm_config())
        clip = build_clip(spec)
        mm_projector = build_mm_projector(
            spec.mm_projector_type, spec.clip_hidden, spec.hidden_size
        )
        seg_projector = build_seg_projector(spec.hidden_size, spec.out_dim)
        sam = build_sam(spec.sam)
    clip.requires_grad_(False)
    model = LisaModel(config, llm, clip, mm_projector, seg_projector, sam, tokenizer)
    return model.to(device=device, dtype=dtype).eval()


@contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Floating tensors created inside default to ``dtype``."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)
