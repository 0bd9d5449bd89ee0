"""SAM parts from the upstream ``segment-anything`` package, and their geometry.

The published LISA configs do not describe SAM (the original always built ViT-H), so the encoder
geometry is read off the weights: embed dim from ``patch_embed.proj.weight``, depth from the block
count, head dim from ``rel_pos_h`` (``[2*window-1, head_dim]`` in windowed blocks,
``[2*grid-1, head_dim]`` in global ones), which also gives the window and the global blocks.
ViT-B/L/H and tiny test encoders all load the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial

import torch
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)

from lisa_model.config import CheckpointError

SAM_PROMPT_DIM = 256


@dataclass(frozen=True)
class SamGeometry:
    """Sizes of a SAM image encoder and mask decoder (ViT-H by default)."""

    img_size: int = 1024
    patch_size: int = 16
    embed_dim: int = 1280
    depth: int = 32
    num_heads: int = 16
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (7, 15, 23, 31)
    out_chans: int = SAM_PROMPT_DIM
    qkv_bias: bool = True
    use_rel_pos: bool = True
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256

    def __post_init__(self) -> None:
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of {self.patch_size}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"embed_dim {self.embed_dim} not divisible by {self.num_heads} heads")
        if any(not 0 <= i < self.depth for i in self.global_attn_indexes):
            raise ValueError(f"global_attn_indexes {self.global_attn_indexes} outside depth")

    @property
    def grid_size(self) -> int:
        """Side of the image embedding (64 for 1024/16)."""
        return self.img_size // self.patch_size


#: The three published SAM encoders.
SAM_VIT_H = SamGeometry()
SAM_VIT_L = SamGeometry(
    embed_dim=1024, depth=24, num_heads=16, global_attn_indexes=(5, 11, 17, 23)
)
SAM_VIT_B = SamGeometry(embed_dim=768, depth=12, num_heads=12, global_attn_indexes=(2, 5, 8, 11))


def build_sam(geometry: SamGeometry = SAM_VIT_H) -> Sam:
    """An upstream ``Sam`` with randomly initialised weights of the given geometry."""
    g = geometry
    encoder = ImageEncoderViT(
        img_size=g.img_size,
        patch_size=g.patch_size,
        embed_dim=g.embed_dim,
        depth=g.depth,
        num_heads=g.num_heads,
        mlp_ratio=g.mlp_ratio,
        out_chans=g.out_chans,
        qkv_bias=g.qkv_bias,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=g.use_rel_pos,
        window_size=g.window_size,
        global_attn_indexes=g.global_attn_indexes,
    )
    prompt_encoder = PromptEncoder(
        embed_dim=SAM_PROMPT_DIM,
        image_embedding_size=(g.grid_size, g.grid_size),
        input_image_size=(g.img_size, g.img_size),
        mask_in_chans=g.mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=g.num_multimask_outputs,
        transformer=TwoWayTransformer(
            depth=g.decoder_depth,
            embedding_dim=SAM_PROMPT_DIM,
            mlp_dim=g.decoder_mlp_dim,
            num_heads=g.decoder_num_heads,
        ),
        transformer_dim=SAM_PROMPT_DIM,
        iou_head_depth=g.iou_head_depth,
        iou_head_hidden_dim=g.iou_head_hidden_dim,
    )
    return Sam(
        image_encoder=encoder,
        prompt_encoder=prompt_encoder,
        mask_decoder=mask_decoder,
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )


def infer_sam_geometry(state: Mapping[str, torch.Tensor], prefix: str = "") -> SamGeometry:
    """Read the SAM geometry off a state dict whose SAM keys start with ``prefix``.

    ``prefix`` is e.g. ``"model.visual_model."`` for a published LISA checkpoint or ``""`` for
    a bare SAM state dict. Raises :class:`CheckpointError` naming the missing tensor.
    """

    def get(name: str) -> torch.Tensor:
        key = prefix + name
        if key not in state:
            raise CheckpointError(f"SAM weights incomplete: missing {key!r}")
        return state[key]

    patch = get("image_encoder.patch_embed.proj.weight")  # (embed, 3, p, p)
    embed_dim, patch_size = int(patch.shape[0]), int(patch.shape[-1])
    pos = state.get(prefix + "image_encoder.pos_embed")  # (1, grid, grid, embed)
    grid = int(pos.shape[1]) if pos is not None else 1024 // patch_size
    block_re = re.compile(re.escape(prefix) + r"image_encoder\.blocks\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in state if (m := block_re.match(k))), default=-1)
    if depth == 0:
        raise CheckpointError(f"SAM weights incomplete: no {prefix}image_encoder.blocks.*")

    rel = [state.get(f"{prefix}image_encoder.blocks.{i}.attn.rel_pos_h") for i in range(depth)]
    use_rel_pos = all(r is not None for r in rel)
    if not use_rel_pos:
        raise CheckpointError(
            "SAM encoder without relative positions: its head count cannot be inferred"
        )
    head_dim = int(rel[0].shape[1])
    global_len = 2 * grid - 1
    global_idx = tuple(i for i, r in enumerate(rel) if int(r.shape[0]) == global_len)
    windowed = [int(r.shape[0]) for r in rel if int(r.shape[0]) != global_len]
    if len(set(windowed)) > 1:
        raise CheckpointError(f"SAM encoder blocks use different window sizes: {set(windowed)}")
    window_size = (windowed[0] + 1) // 2 if windowed else 14

    lin1 = get("image_encoder.blocks.0.mlp.lin1.weight")
    dec_re = re.compile(re.escape(prefix) + r"mask_decoder\.transformer\.layers\.(\d+)\.")
    decoder_depth = 1 + max((int(m.group(1)) for k in state if (m := dec_re.match(k))), default=-1)
    iou_re = re.compile(re.escape(prefix) + r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")
    iou_depth = 1 + max((int(m.group(1)) for k in state if (m := iou_re.match(k))), default=-1)
    return SamGeometry(
        img_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_ratio=int(lin1.shape[0]) / embed_dim,
        window_size=window_size,
        global_attn_indexes=global_idx,
        out_chans=int(get("image_encoder.neck.0.weight").shape[0]),
        qkv_bias=(prefix + "image_encoder.blocks.0.attn.qkv.bias") in state,
        use_rel_pos=use_rel_pos,
        mask_in_chans=int(get("prompt_encoder.mask_downscaling.3.weight").shape[0]),
        decoder_depth=decoder_depth,
        decoder_mlp_dim=int(get("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]),
        num_multimask_outputs=int(get("mask_decoder.mask_tokens.weight").shape[0]) - 1,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=int(get("mask_decoder.iou_prediction_head.layers.0.weight").shape[0]),
    )
