"""SAM parts from the upstream ``segment-anything`` package, and their geometry.

The published LISA configs do not describe SAM (the original always built ViT-H), so the encoder
geometry is read off the weights: embed dim from ``patch_embed.proj.weight``, depth from the block
count, head dim from ``rel_pos_h`` (``[2*window-1, head_dim]`` in windowed blocks,
``[2*grid-1, head_dim]`` in global ones), which also gives the window and the global blocks.
ViT-B/L/H and tiny test encoders all load the same way.

Besides SAM's ViT, a small convolutional image encoder (:class:`ConvImageEncoder`, keys
``image_encoder.stem.*`` / ``context.*`` / ``pos_embed`` / ``neck.*``) can stand in front of the
same prompt encoder and mask decoder, the way MobileSAM and EfficientViT-SAM swap SAM's encoder for
a small one. The embedded demo model uses it: trained from scratch on a CPU, a ViT this small does
not learn shapes in the time a convolutional stack does (see the README's demo-model section).
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
from segment_anything.modeling.common import LayerNorm2d

from lisa_model.config import CheckpointError
from lisa_model.sam_encoder import FusedImageEncoderViT

SAM_PROMPT_DIM = 256

#: Implementations of SAM's ViT image encoder: ``"fused"`` (:class:`FusedImageEncoderViT`, SDPA
#: attention with the query rows in chunks, the default) or ``"upstream"`` (segment-anything's
#: ``ImageEncoderViT``). Both have the same parameters and outputs.
SAM_ENCODERS: tuple[str, ...] = ("fused", "upstream")


@dataclass(frozen=True)
class SamGeometry:
    """Sizes of a SAM image encoder and mask decoder (ViT-H by default).

    ``encoder="conv"`` selects :class:`ConvImageEncoder`: ``conv_widths`` are the channels of its
    stride-2 stem convolutions (so ``patch_size`` must be ``2 ** len(conv_widths)``),
    ``embed_dim`` the width of its ``depth`` residual context blocks (dilation 1, 2, 4, 8, 1, ...).
    The ViT-only fields (heads, window, global blocks) are then unused.
    """

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
    encoder: str = "vit"
    conv_widths: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if self.encoder not in ("vit", "conv"):
            raise ValueError(f"encoder must be 'vit' or 'conv', got {self.encoder!r}")
        if self.encoder == "conv" and self.patch_size != 2 ** len(self.conv_widths):
            raise ValueError(
                f"conv encoder: patch_size {self.patch_size} != 2 ** len(conv_widths "
                f"{self.conv_widths})"
            )
        if self.img_size % self.patch_size:
            raise ValueError(f"img_size {self.img_size} is not a multiple of {self.patch_size}")
        if self.encoder == "conv":
            return
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


def _conv_block(c_in: int, c_out: int, stride: int = 1, dilation: int = 1) -> torch.nn.Sequential:
    return torch.nn.Sequential(
        torch.nn.Conv2d(c_in, c_out, 3, stride, dilation, dilation=dilation, bias=False),
        torch.nn.GroupNorm(min(8, c_out), c_out),
        torch.nn.GELU(),
    )


def context_dilation(index: int) -> int:
    """Dilation of context block ``index`` of :class:`ConvImageEncoder` (1, 2, 4, 8, 1, 2, ...)."""
    return 2 ** (index % 4)


class ConvImageEncoder(torch.nn.Module):
    """A small convolutional SAM image encoder: ``(B, 3, S, S)`` -> ``(B, out_chans, g, g)``.

    ``S = img_size`` (SAM-normalised, padded pixels as for the ViT), ``g = S / patch_size``.
    Stem: one stride-2 3x3 convolution per ``conv_widths`` entry, then a 3x3 convolution to
    ``embed_dim``; plus a learned absolute position embedding ``(1, g, g, embed_dim)`` (zeros at
    start, as SAM's); ``depth`` residual dilated 3x3 context blocks (a receptive field that covers
    whole objects); SAM's neck (1x1 and 3x3 convolutions with LayerNorm2d) to ``out_chans``.
    Every convolution is shift-equivariant, which is what lets a model this small learn shapes
    wherever they are. Attributes ``img_size`` and ``patch_size`` match ``ImageEncoderViT``'s.
    """

    def __init__(
        self,
        img_size: int,
        conv_widths: tuple[int, ...],
        embed_dim: int,
        depth: int,
        out_chans: int = SAM_PROMPT_DIM,
    ) -> None:
        super().__init__()
        self.img_size = img_size
        self.patch_size = 2 ** len(conv_widths)
        grid = img_size // self.patch_size
        chans = (3, *conv_widths)
        self.stem = torch.nn.Sequential(
            *(_conv_block(a, b, stride=2) for a, b in zip(chans[:-1], chans[1:], strict=True)),
            _conv_block(chans[-1], embed_dim),
        )
        self.pos_embed = torch.nn.Parameter(torch.zeros(1, grid, grid, embed_dim))
        self.context = torch.nn.ModuleList(
            _conv_block(embed_dim, embed_dim, dilation=context_dilation(i)) for i in range(depth)
        )
        self.neck = torch.nn.Sequential(
            torch.nn.Conv2d(embed_dim, out_chans, 1, bias=False),
            LayerNorm2d(out_chans),
            torch.nn.Conv2d(out_chans, out_chans, 3, padding=1, bias=False),
            LayerNorm2d(out_chans),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x) + self.pos_embed.permute(0, 3, 1, 2)
        for block in self.context:
            x = x + block(x)
        return self.neck(x)


def build_sam(geometry: SamGeometry = SAM_VIT_H, *, sam_encoder: str = "fused") -> Sam:
    """An upstream ``Sam`` with randomly initialised weights of the given geometry.

    ``sam_encoder`` picks the ViT image encoder's implementation (:data:`SAM_ENCODERS`; the
    state dict is the same); a ``"conv"`` geometry ignores it.
    """
    g = geometry
    if g.encoder == "conv":
        encoder: torch.nn.Module = ConvImageEncoder(
            g.img_size, g.conv_widths, g.embed_dim, g.depth, g.out_chans
        )
    else:
        encoder = _build_vit(g, sam_encoder)
    return _assemble(g, encoder)


def _build_vit(g: SamGeometry, sam_encoder: str = "fused") -> ImageEncoderViT:
    if sam_encoder not in SAM_ENCODERS:
        raise ValueError(f"sam_encoder must be one of {SAM_ENCODERS}, got {sam_encoder!r}")
    cls = FusedImageEncoderViT if sam_encoder == "fused" else ImageEncoderViT
    return cls(
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


def _assemble(g: SamGeometry, encoder: torch.nn.Module) -> Sam:
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

    if prefix + "image_encoder.stem.0.0.weight" in state:
        return _infer_conv_geometry(state, prefix, get)
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
    return SamGeometry(
        img_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=embed_dim // head_dim,
        mlp_ratio=int(lin1.shape[0]) / embed_dim,
        window_size=window_size,
        global_attn_indexes=global_idx,
        qkv_bias=(prefix + "image_encoder.blocks.0.attn.qkv.bias") in state,
        use_rel_pos=use_rel_pos,
        **_decoder_geometry(state, prefix, get),
    )


def _infer_conv_geometry(state: Mapping[str, torch.Tensor], prefix: str, get) -> SamGeometry:
    """Geometry of a :class:`ConvImageEncoder` checkpoint (see :func:`infer_sam_geometry`)."""
    stem_re = re.compile(re.escape(prefix) + r"image_encoder\.stem\.(\d+)\.0\.weight$")
    stem = sorted(int(m.group(1)) for k in state if (m := stem_re.match(k)))
    if stem != list(range(len(stem))) or len(stem) < 2:
        raise CheckpointError(f"conv SAM encoder: stem blocks {stem} are not 0..n (n >= 1)")
    widths = tuple(int(get(f"image_encoder.stem.{i}.0.weight").shape[0]) for i in stem[:-1])
    embed_dim = int(get(f"image_encoder.stem.{stem[-1]}.0.weight").shape[0])
    grid = int(get("image_encoder.pos_embed").shape[1])
    ctx_re = re.compile(re.escape(prefix) + r"image_encoder\.context\.(\d+)\.")
    depth = 1 + max((int(m.group(1)) for k in state if (m := ctx_re.match(k))), default=-1)
    patch_size = 2 ** len(widths)
    return SamGeometry(
        img_size=grid * patch_size,
        patch_size=patch_size,
        embed_dim=embed_dim,
        depth=depth,
        encoder="conv",
        conv_widths=widths,
        **_decoder_geometry(state, prefix, get),
    )


def _decoder_geometry(state: Mapping[str, torch.Tensor], prefix: str, get) -> dict:
    """The SamGeometry fields of the neck, prompt encoder and mask decoder."""
    dec_re = re.compile(re.escape(prefix) + r"mask_decoder\.transformer\.layers\.(\d+)\.")
    decoder_depth = 1 + max((int(m.group(1)) for k in state if (m := dec_re.match(k))), default=-1)
    iou_re = re.compile(re.escape(prefix) + r"mask_decoder\.iou_prediction_head\.layers\.(\d+)\.")
    iou_depth = 1 + max((int(m.group(1)) for k in state if (m := iou_re.match(k))), default=-1)
    return dict(
        out_chans=int(get("image_encoder.neck.0.weight").shape[0]),
        mask_in_chans=int(get("prompt_encoder.mask_downscaling.3.weight").shape[0]),
        decoder_depth=decoder_depth,
        decoder_mlp_dim=int(get("mask_decoder.transformer.layers.0.mlp.lin1.weight").shape[0]),
        num_multimask_outputs=int(get("mask_decoder.mask_tokens.weight").shape[0]) - 1,
        iou_head_depth=iou_depth,
        iou_head_hidden_dim=int(get("mask_decoder.iou_prediction_head.layers.0.weight").shape[0]),
    )
