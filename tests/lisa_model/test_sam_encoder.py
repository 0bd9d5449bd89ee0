"""FusedImageEncoderViT against upstream segment-anything ImageEncoderViT (same weights)."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from segment_anything.modeling import ImageEncoderViT

import lisa_model.sam_encoder as sam_encoder
from lisa_model.sam import SAM_VIT_B, SamGeometry, build_sam
from lisa_model.sam_encoder import FusedImageEncoderViT, upstream_forward

ATOL = 1e-4


def vit_kwargs(**overrides) -> dict:
    kwargs = dict(
        img_size=256,
        patch_size=16,
        embed_dim=64,
        depth=4,
        num_heads=4,
        out_chans=32,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        use_rel_pos=True,
        window_size=14,
        global_attn_indexes=(1, 3),
    )
    kwargs.update(overrides)
    return kwargs


def random_state(module: torch.nn.Module, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random values for every tensor (SAM zero-initialises rel_pos and pos_embed)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        k: torch.randn(v.shape, generator=gen) * (1.0 if k.endswith("norm1.weight") else 0.2)
        for k, v in module.state_dict().items()
    }


def pair(query_chunk: int = 1024, **overrides) -> tuple[ImageEncoderViT, FusedImageEncoderViT]:
    kwargs = vit_kwargs(**overrides)
    torch.manual_seed(0)
    upstream = ImageEncoderViT(**kwargs)
    state = random_state(upstream)
    upstream.load_state_dict(state)
    fused = FusedImageEncoderViT(**kwargs, query_chunk=query_chunk)
    fused.load_state_dict(state)  # strict: same keys and shapes
    return upstream.eval(), fused.eval()


def image(size: int, batch: int = 1, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_state_dict_keys_and_shapes_match_upstream():
    upstream, fused = pair()
    ours, theirs = fused.state_dict(), upstream.state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in ours)
    assert [b.window_size for b in fused.blocks] == [14, 0, 14, 0]


@pytest.mark.parametrize(
    ("overrides", "query_chunk"),
    [
        (dict(img_size=256), 1024),  # grid 16: windows padded to 28
        (dict(img_size=256), 40),  # global blocks in 8 chunks of 2 rows, windows in 7
        (dict(img_size=224), 1024),  # grid 14: no padding
        (dict(img_size=256, use_rel_pos=False), 40),
        (dict(img_size=320, window_size=7, global_attn_indexes=(0, 2, 3)), 100),
    ],
)
def test_matches_upstream_float32(overrides, query_chunk):
    upstream, fused = pair(query_chunk, **overrides)
    x = image(overrides["img_size"], batch=2)
    with torch.no_grad():
        ref, out = upstream(x), fused(x)
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= ATOL


def test_matches_upstream_at_1024_with_small_embed():
    upstream, fused = pair(
        img_size=1024, embed_dim=32, num_heads=2, depth=2, global_attn_indexes=(1,)
    )
    x = image(1024)
    with torch.no_grad():
        ref, out = upstream(x), fused(x)
    assert out.shape == (1, 32, 64, 64)
    assert (out - ref).abs().max().item() <= ATOL


def test_global_attention_is_chunked(monkeypatch):
    """No attention call sees more than ``query_chunk`` queries (whole rows); the (heads x N x N)
    bias of a global block is never built at once."""
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None):
        calls.append((q.shape[2], k.shape[2], None if attn_mask is None else attn_mask.shape))
        return sdpa(q, k, v, attn_mask=attn_mask)

    monkeypatch.setattr(sam_encoder.F, "scaled_dot_product_attention", recording)
    upstream, fused = pair(query_chunk=40, img_size=256)  # grid 16: 2 rows (32 queries) a call
    with torch.no_grad():
        ref, out = upstream(image(256)), fused(image(256))
    assert (out - ref).abs().max().item() <= ATOL
    global_calls = [c for c in calls if c[1] == 256]
    assert len(global_calls) == 2 * 8
    assert all(q == 32 and mask == (1, 4, 32, 256) for q, _, mask in global_calls)
    window_calls = [c for c in calls if c[1] == 196]  # 4 padded windows of 14 x 14
    assert len(window_calls) == 2 * 7 and all(q == 28 for q, _, _ in window_calls)


def test_backward_matches_upstream():
    upstream, fused = pair(query_chunk=40, img_size=224, depth=2, global_attn_indexes=(1,))
    upstream.train()
    fused.train()
    x = image(224)
    weight = torch.randn(1, 32, 14, 14, generator=torch.Generator().manual_seed(3))
    (upstream(x) * weight).sum().backward()
    (fused(x) * weight).sum().backward()
    theirs = dict(upstream.named_parameters())
    for name, param in fused.named_parameters():
        ref = theirs[name].grad
        assert param.grad is not None, name
        scale = max(ref.abs().max().item(), 1.0)
        assert (param.grad - ref).abs().max().item() <= ATOL * scale, name


def test_bfloat16_close_to_upstream():
    """In bf16 both round; the fused encoder is no further from float32 than upstream is."""
    upstream, fused = pair(query_chunk=100, img_size=256)
    x = image(256)
    with torch.no_grad():
        exact = upstream(x)
        upstream_bf16 = upstream.to(torch.bfloat16)(x.bfloat16()).float()
        fused_bf16 = fused.to(torch.bfloat16)(x.bfloat16()).float()
    assert fused_bf16.dtype == torch.float32 and torch.isfinite(fused_bf16).all()
    err_upstream = (upstream_bf16 - exact).abs().max().item()
    err_fused = (fused_bf16 - exact).abs().max().item()
    assert err_fused <= 2 * err_upstream + 1e-2, (err_fused, err_upstream)


def test_set_query_chunk_and_validation():
    _, fused = pair()
    assert fused.query_chunk == 1024
    fused.set_query_chunk(64)
    assert fused.query_chunk == 64 and all(b.attn.query_chunk == 64 for b in fused.blocks)
    with pytest.raises(ValueError, match="query_chunk"):
        fused.set_query_chunk(0)
    with pytest.raises(ValueError, match="query_chunk"):
        FusedImageEncoderViT(**vit_kwargs(), query_chunk=0)


def test_build_sam_uses_fused_encoder_unless_told():
    geometry = SamGeometry(
        img_size=224, embed_dim=32, depth=2, num_heads=2, global_attn_indexes=(1,)
    )
    fused = build_sam(geometry).image_encoder
    upstream = build_sam(geometry, sam_encoder="upstream").image_encoder
    assert type(fused) is FusedImageEncoderViT
    assert type(upstream) is ImageEncoderViT
    assert {k: v.shape for k, v in fused.state_dict().items()} == {
        k: v.shape for k, v in upstream.state_dict().items()
    }
    with pytest.raises(ValueError, match="sam_encoder"):
        build_sam(geometry, sam_encoder="flash")


def test_vit_b_state_dict_loads_into_fused_on_meta():
    """The published ViT-B layout (meta device: no memory) has the same keys and shapes."""
    with torch.device("meta"):
        fused = build_sam(SAM_VIT_B).image_encoder
        upstream = build_sam(SAM_VIT_B, sam_encoder="upstream").image_encoder
    assert {k: v.shape for k, v in fused.state_dict().items()} == {
        k: v.shape for k, v in upstream.state_dict().items()
    }


def test_upstream_forward_runs_upstream_code_on_the_fused_modules(monkeypatch):
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append(1)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(sam_encoder.F, "scaled_dot_product_attention", recording)
    upstream, fused = pair(img_size=256)
    x = image(256)
    with torch.no_grad():
        ref = upstream(x)
        with upstream_forward(fused) as same:
            assert same is fused
            out = fused(x)
        assert not calls and torch.equal(out, ref)  # upstream's ops: bit-identical
        fused(x)
    assert len(calls) == 4  # the fused forward is back
    plain = torch.nn.Linear(2, 2)
    with upstream_forward(plain) as same:
        assert same is plain
