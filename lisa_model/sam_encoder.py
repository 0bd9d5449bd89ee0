"""SAM's ViT image encoder with fused, memory-bounded attention.

:class:`FusedImageEncoderViT` is a drop-in for ``segment_anything.modeling.ImageEncoderViT``:
the same submodules, parameter names and shapes (published SAM and LISA checkpoints load
unchanged) and the same output to float rounding. Only the attention differs:

- it runs ``torch.nn.functional.scaled_dot_product_attention`` (no ``(tokens x tokens)`` score
  matrix and softmax in Python); SAM's decomposed relative-position bias
  ``rel_h[..., :, None] + rel_w[..., None, :]`` (built from the queries, as upstream) goes in as
  the additive float mask;
- the queries of a block are processed ``query_chunk`` tokens at a time (whole grid rows), so a
  global block holds a ``(heads, query_chunk, N)`` bias instead of upstream's three
  ``(heads, N, N)`` tensors (N = 4096 at 1024 input);
- window partition and unpartition are folded into the head split and merge that the attention
  needs anyway (one copy each way instead of three), and the grid is padded only when it is not
  a multiple of the window, as upstream.
"""

from __future__ import annotations

import contextlib
import math
import types
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from segment_anything.modeling.common import MLPBlock
from segment_anything.modeling.image_encoder import Attention, Block, get_rel_pos

#: Query tokens per attention call in :class:`FusedImageEncoderViT` (rounded down to whole rows).
DEFAULT_QUERY_CHUNK = 1024


class FusedAttention(Attention):
    """Upstream ``Attention`` (same parameters ``qkv``, ``proj``, ``rel_pos_h/w``) whose forward
    uses SDPA over windows of the grid, ``query_chunk`` query tokens at a time."""

    def __init__(self, *args, query_chunk: int = DEFAULT_QUERY_CHUNK, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
        self.query_chunk = query_chunk

    def forward(self, x: torch.Tensor, window: int = 0) -> torch.Tensor:
        """``x``: ``(B, H, W, C)`` with ``H`` and ``W`` multiples of ``window`` (``0``: one
        window over the whole grid, i.e. global attention). Returns ``(B, H, W, C)``; every token
        attends to the tokens of its own window."""
        b, h, w, c = x.shape
        wh, ww = (window, window) if window > 0 else (h, w)
        nh, nw = h // wh, w // ww
        heads = self.num_heads
        d = c // heads
        qkv = self.qkv(x).view(b, nh, wh, nw, ww, 3, heads, d)
        # (3, B, nh, nw, heads, wh, ww, d) -> (3, B * windows, heads, wh * ww, d): the window
        # partition and the head split in one copy.
        qkv = qkv.permute(5, 0, 1, 3, 6, 2, 4, 7).reshape(3, b * nh * nw, heads, wh * ww, d)
        q, k, v = qkv.unbind(0)
        out = self._attend(q, k, v, (wh, ww))  # (B * windows, heads, wh * ww, d)
        # Head merge and window unpartition in one copy: (B, nh, wh, nw, ww, heads, d).
        out = out.view(b, nh, nw, heads, wh, ww, d).permute(0, 1, 4, 2, 5, 3, 6)
        return self.proj(out.reshape(b, h, w, c))

    def _attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, grid: tuple[int, int]
    ) -> torch.Tensor:
        """Attention of ``q, k, v`` ``(B', heads, N, d)`` over one ``grid = (gh, gw)`` window
        (``N = gh * gw``), queries in chunks of whole rows; returns ``(B', heads, N, d)``."""
        gh, gw = grid
        rows = max(1, min(gh, self.query_chunk // gw))
        rel_h = rel_w = None
        if self.use_rel_pos:
            rh = get_rel_pos(gh, gh, self.rel_pos_h).to(q.dtype)  # (gh, gh, d)
            rw = get_rel_pos(gw, gw, self.rel_pos_w).to(q.dtype)  # (gw, gw, d)
            q_grid = q.unflatten(2, (gh, gw))  # (B', heads, gh, gw, d)
            # einsum returns permuted strides; contiguous ones let the mask below be written
            # in order and flattened without a copy.
            rel_h = torch.einsum("bnhwc,hkc->bnhwk", q_grid, rh).contiguous()  # (.., gh, gw, gh)
            rel_w = torch.einsum("bnhwc,wkc->bnhwk", q_grid, rw).contiguous()  # (.., gh, gw, gw)
        outs = []
        buffer = None  # one mask buffer for all chunks (without autograd): no fresh pages each
        for r0 in range(0, gh, rows):
            r1 = min(gh, r0 + rows)
            mask = None
            if rel_h is not None and rel_w is not None:
                # (B', heads, rows, gw, gh, gw) -> (B', heads, rows * gw, N)
                shape = (*rel_h.shape[:2], r1 - r0, gw, gh, gw)
                out = None
                if not rel_h.requires_grad:
                    if buffer is None:  # the first chunk is the largest
                        buffer = rel_h.new_empty(math.prod(shape))
                    out = buffer[: math.prod(shape)].view(shape)
                mask = torch.add(
                    rel_h[:, :, r0:r1, :, :, None], rel_w[:, :, r0:r1, :, None, :], out=out
                )
                mask = mask.flatten(4).flatten(2, 3)
            q_rows = q[:, :, r0 * gw : r1 * gw]
            outs.append(F.scaled_dot_product_attention(q_rows, k, v, attn_mask=mask))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=2)


class FusedBlock(torch.nn.Module):
    """Upstream ``Block`` (same submodules ``norm1``, ``attn``, ``norm2``, ``mlp``) running
    :class:`FusedAttention`. ``window_size`` 0 means global attention over ``input_size``."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        norm_layer: type[torch.nn.Module] = torch.nn.LayerNorm,
        act_layer: type[torch.nn.Module] = torch.nn.GELU,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        input_size: tuple[int, int] | None = None,
        query_chunk: int = DEFAULT_QUERY_CHUNK,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = FusedAttention(
            dim,
            num_heads=num_heads,
            qkv_bias=qkv_bias,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            input_size=input_size if window_size == 0 else (window_size, window_size),
            query_chunk=query_chunk,
        )
        self.norm2 = norm_layer(dim)
        self.mlp = MLPBlock(embedding_dim=dim, mlp_dim=int(dim * mlp_ratio), act=act_layer)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, H, W, C)`` -> ``(B, H, W, C)``."""
        h, w = x.shape[1], x.shape[2]
        y = self.norm1(x)
        ws = self.window_size
        if ws > 0 and (h % ws or w % ws):  # pad bottom/right to whole windows, as upstream
            y = F.pad(y, (0, 0, 0, -w % ws, 0, -h % ws))
        y = self.attn(y, ws)
        x = x + y[:, :h, :w]  # the crop is a view; the residual add makes the copy
        return x + self.mlp(self.norm2(x))


class FusedImageEncoderViT(ImageEncoderViT):
    """``ImageEncoderViT`` with :class:`FusedBlock` blocks: ``(B, 3, S, S)`` ->
    ``(B, out_chans, S / patch, S / patch)``.

    Takes upstream's constructor arguments plus ``query_chunk`` (query tokens per attention
    call; lower bounds memory further at some speed cost). ``patch_embed``, ``pos_embed``,
    ``neck`` and ``forward`` are upstream's; the state dict has the same keys and shapes.
    """

    def __init__(
        self,
        img_size: int = 1024,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 256,
        qkv_bias: bool = True,
        norm_layer: type[torch.nn.Module] = torch.nn.LayerNorm,
        act_layer: type[torch.nn.Module] = torch.nn.GELU,
        use_abs_pos: bool = True,
        use_rel_pos: bool = False,
        rel_pos_zero_init: bool = True,
        window_size: int = 0,
        global_attn_indexes: tuple[int, ...] = (),
        query_chunk: int = DEFAULT_QUERY_CHUNK,
    ) -> None:
        # Upstream builds the patch embedding, position embedding and neck; its blocks are
        # replaced by fused ones (depth=0 there, so no block is built twice).
        super().__init__(
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=embed_dim,
            depth=0,
            num_heads=num_heads,
            mlp_ratio=mlp_ratio,
            out_chans=out_chans,
            qkv_bias=qkv_bias,
            norm_layer=norm_layer,
            act_layer=act_layer,
            use_abs_pos=use_abs_pos,
            use_rel_pos=use_rel_pos,
            rel_pos_zero_init=rel_pos_zero_init,
            window_size=window_size,
            global_attn_indexes=global_attn_indexes,
        )
        grid = img_size // patch_size
        for i in range(depth):
            self.blocks.append(
                FusedBlock(
                    dim=embed_dim,
                    num_heads=num_heads,
                    mlp_ratio=mlp_ratio,
                    qkv_bias=qkv_bias,
                    norm_layer=norm_layer,
                    act_layer=act_layer,
                    use_rel_pos=use_rel_pos,
                    rel_pos_zero_init=rel_pos_zero_init,
                    window_size=window_size if i not in global_attn_indexes else 0,
                    input_size=(grid, grid),
                    query_chunk=query_chunk,
                )
            )

    @property
    def query_chunk(self) -> int:
        """Query tokens per attention call (the first block's; see :meth:`set_query_chunk`)."""
        return self.blocks[0].attn.query_chunk if len(self.blocks) else DEFAULT_QUERY_CHUNK

    def set_query_chunk(self, query_chunk: int) -> None:
        """Set the query tokens per attention call of every block."""
        if query_chunk < 1:
            raise ValueError(f"query_chunk must be >= 1, got {query_chunk}")
        for block in self.blocks:
            block.attn.query_chunk = query_chunk


@contextlib.contextmanager
def upstream_forward(encoder: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Within the block, ``encoder`` (a :class:`FusedImageEncoderViT`) runs upstream's
    ``Block.forward`` and ``Attention.forward`` on its own modules: upstream's computation and
    memory, no second copy of the weights (the original-LISA baseline uses it). Any other
    encoder is left as it is."""
    if not isinstance(encoder, FusedImageEncoderViT):
        yield encoder
        return
    for block in encoder.blocks:
        block.forward = types.MethodType(Block.forward, block)
        block.attn.forward = types.MethodType(Attention.forward, block.attn)
    try:
        yield encoder
    finally:
        for block in encoder.blocks:
            del block.forward
            del block.attn.forward
