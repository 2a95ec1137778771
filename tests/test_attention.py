"""Multi-head attention: first-principles explicit path, fused path, masks, causality,
cross-attention, all checked against torch.nn.MultiheadAttention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vit import MultiHeadAttention

DIM, HEADS = 32, 4


def reference_mha(attn: MultiHeadAttention) -> nn.MultiheadAttention:
    """torch's own implementation carrying the same W^Q, W^K, W^V (stacked as in_proj) and W^O."""
    ref = nn.MultiheadAttention(attn.dim, attn.num_heads, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(attn.qkv.weight)
        ref.in_proj_bias.copy_(attn.qkv.bias)
        ref.out_proj.weight.copy_(attn.proj.weight)
        ref.out_proj.bias.copy_(attn.proj.bias)
    return ref.eval()


@pytest.fixture
def attn() -> MultiHeadAttention:
    return MultiHeadAttention(DIM, HEADS).eval()


def by_hand(attn: MultiHeadAttention, x: torch.Tensor) -> torch.Tensor:
    """The textbook formula, one head at a time, with no code shared with the module."""
    w_q, w_k, w_v = attn.qkv.weight.chunk(3)
    b_q, b_k, b_v = attn.qkv.bias.chunk(3)
    dh = DIM // HEADS
    heads = []
    for h in range(HEADS):
        rows = slice(h * dh, (h + 1) * dh)
        q = x @ w_q[rows].T + b_q[rows]
        k = x @ w_k[rows].T + b_k[rows]
        v = x @ w_v[rows].T + b_v[rows]
        heads.append(torch.softmax(q @ k.transpose(-2, -1) / dh**0.5, dim=-1) @ v)
    return torch.cat(heads, dim=-1) @ attn.proj.weight.T + attn.proj.bias


def test_explicit_path_is_the_textbook_formula(attn):
    x = torch.randn(2, 7, DIM)
    out = attn(x, return_attention=True)[0]
    torch.testing.assert_close(out, by_hand(attn, x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("kwargs", [{}, {"causal": True}])
def test_fused_and_explicit_paths_agree(kwargs):
    x = torch.randn(3, 11, DIM)
    fused = MultiHeadAttention(DIM, HEADS, attn_impl="fused").eval()
    explicit = MultiHeadAttention(DIM, HEADS, attn_impl="explicit").eval()
    explicit.load_state_dict(fused.state_dict())
    mask = torch.rand(3, 1, 11, 11) > 0.3
    mask[..., 0] = True  # every query may see at least one key
    for m in (None, mask):
        diff = (fused(x, mask=m, **kwargs) - explicit(x, mask=m, **kwargs)).abs().max()
        assert diff < 1e-5


def test_self_attention_matches_torch_multihead_attention(attn):
    x = torch.randn(2, 9, DIM)
    out, weights = attn(x, return_attention=True)
    ref_out, ref_weights = reference_mha(attn)(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn(x), ref_out, atol=1e-5, rtol=1e-5)  # fused default path


def test_cross_attention_matches_torch_multihead_attention(attn):
    x, context = torch.randn(2, 5, DIM), torch.randn(2, 13, DIM)
    out, weights = attn(x, context=context, return_attention=True)
    assert out.shape == (2, 5, DIM) and weights.shape == (2, HEADS, 5, 13)
    ref_out, _ = reference_mha(attn)(x, context, context)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn(x, context=context), ref_out, atol=1e-5, rtol=1e-5)


def test_mask_matches_torch_and_masked_keys_do_not_matter(attn):
    x, context = torch.randn(2, 4, DIM), torch.randn(2, 6, DIM)
    allowed = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    allowed[:, :, :, 4:] = False  # the last two keys are padding
    out = attn(x, context=context, mask=allowed)
    # torch's key_padding_mask is True where *ignored*.
    ref_out, _ = reference_mha(attn)(x, context, context, key_padding_mask=~allowed[:, 0, 0])
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)

    changed = context.clone()
    changed[:, 4:] = torch.randn(2, 2, DIM) * 100
    for impl in ("fused", "explicit"):
        attn.attn_impl = impl
        torch.testing.assert_close(attn(x, context=changed, mask=allowed), out, atol=1e-5, rtol=1e-5)
    _, weights = attn(x, context=context, mask=allowed, return_attention=True)
    assert torch.all(weights[..., 4:] == 0)


def test_causal_later_tokens_do_not_change_earlier_outputs(attn):
    x = torch.randn(2, 8, DIM)
    out = attn(x, causal=True)
    changed = x.clone()
    changed[:, 5:] = torch.randn(2, 3, DIM)
    out_changed = attn(changed, causal=True)
    torch.testing.assert_close(out_changed[:, :5], out[:, :5], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(out_changed[:, 5:], out[:, 5:])
    ref_mask = nn.Transformer.generate_square_subsequent_mask(8)  # -inf above the diagonal
    ref_out, _ = reference_mha(attn)(x, x, x, attn_mask=ref_mask)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    _, weights = attn(x, causal=True, return_attention=True)
    assert torch.all(weights.triu(diagonal=1) == 0)


def test_causal_combines_with_a_mask(attn):
    x = torch.randn(1, 6, DIM)
    padding = torch.ones(1, 1, 1, 6, dtype=torch.bool)
    padding[..., 3] = False
    _, weights = attn(x, mask=padding, causal=True, return_attention=True)
    assert torch.all(weights[..., 3] == 0) and torch.all(weights.triu(diagonal=1) == 0)
    attn.attn_impl = "fused"
    explicit = attn(x, mask=padding, causal=True, return_attention=True)[0]
    assert (attn(x, mask=padding, causal=True) - explicit).abs().max() < 1e-5


def test_attention_rows_are_probabilities(attn):
    _, weights = attn(torch.randn(2, 10, DIM), return_attention=True)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, HEADS, 10))
    assert torch.all(weights >= 0)


def test_qk_norm_and_no_bias_variants_run_on_both_paths():
    x = torch.randn(2, 5, DIM)
    attn = MultiHeadAttention(DIM, HEADS, qkv_bias=False, qk_norm=True).eval()
    assert attn.qkv.bias is None
    fused = attn(x)
    attn.attn_impl = "explicit"
    assert (attn(x) - fused).abs().max() < 1e-5
    assert attn(x, context=torch.randn(2, 3, DIM)).shape == (2, 5, DIM)


def test_bf16_autocast_paths_agree():
    x = torch.randn(2, 17, DIM)
    attn = MultiHeadAttention(DIM, HEADS, attn_impl="fused").eval()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = attn(x)
        attn.attn_impl = "explicit"
        explicit = attn(x)
    assert fused.dtype == explicit.dtype == torch.bfloat16
    assert (fused.float() - explicit.float()).abs().max() < 3e-2  # bf16 has ~3 significant digits


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.ones(2, 5, 5)}, "bool"),
        ({"mask": torch.ones(2, 1, 4, 5, dtype=torch.bool)}, r"does not broadcast"),
        ({"context": torch.randn(2, 3, DIM + 1)}, r"context of shape"),
    ],
)
def test_bad_arguments_are_named(attn, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attn(torch.randn(2, 5, DIM), **kwargs)


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="embed_dim 30 is not divisible by num_heads 4"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="attn_impl"):
        MultiHeadAttention(32, 4, attn_impl="flash")
    with pytest.raises(ValueError, match=r"expected x of shape \(B, N, 32\)"):
        MultiHeadAttention(32, 4)(torch.randn(2, 5, 16))
