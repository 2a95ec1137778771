"""Multi-head attention: the textbook function, the explicit and fused paths, masks, causality,
cross-attention, all checked against torch.nn.MultiheadAttention and a per-head loop."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vit import MultiHeadAttention, attention

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
def test_explicit_path_agrees_with_the_fused_kernel(kwargs):
    x = torch.randn(3, 11, DIM)
    fused = MultiHeadAttention(DIM, HEADS, attn_impl="fused").eval()
    other = MultiHeadAttention(DIM, HEADS, attn_impl="explicit").eval()
    other.load_state_dict(fused.state_dict())
    mask = torch.rand(3, 1, 11, 11) > 0.3
    mask[..., 0] = True  # every query may see at least one key
    for m in (None, mask):
        diff = (fused(x, mask=m, **kwargs) - other(x, mask=m, **kwargs)).abs().max()
        assert diff < 1e-5


VARIANTS = [{}, {"causal": True}, {"cross": True}, {"mask": True}]


def variant_call(variant: dict, context: torch.Tensor, mask_heads: int) -> dict:
    """forward() keywords for one of VARIANTS: queries (3, 9) against themselves or 6 context
    tokens, optionally causal or with a random mask (mask_heads: 1 broadcasts over heads)."""
    call = {"causal": variant.get("causal", False)}
    if variant.get("cross") or variant.get("mask"):
        call["context"] = context
    if variant.get("mask"):
        call["mask"] = torch.rand(3, mask_heads, 9, 6) > 0.4
        call["mask"][..., 0] = True  # every query may see at least one key
    return call


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_explicit_and_fused_paths_agree_in_value_and_gradient(kwargs):
    """Training through either path gives the same outputs and gradients, with masks, causality and
    cross-attention."""
    torch.manual_seed(0)
    explicit = MultiHeadAttention(DIM, HEADS, attn_impl="explicit")
    fused = MultiHeadAttention(DIM, HEADS, attn_impl="fused")
    fused.load_state_dict(explicit.state_dict())
    x, context = torch.randn(3, 9, DIM), torch.randn(3, 6, DIM)
    call = variant_call(kwargs, context, mask_heads=HEADS)
    grads = []
    for module in (explicit, fused):
        inputs = [x.clone().requires_grad_(), context.clone().requires_grad_()]
        if "context" in call:
            call["context"] = inputs[1]
        out = module(inputs[0], **call)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([out.detach(), inputs[0].grad, *(p.grad for p in module.parameters())]
                     + ([inputs[1].grad] if "context" in call else []))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("grad", [False, True])
def test_explicit_path_calls_the_textbook_function_and_equals_a_per_head_loop(attn, monkeypatch, grad):
    """What a student stepping through attn_impl='explicit' sees is the textbook function, in eval
    mode under no_grad as well as in training: scores, softmax, weighted sum of the values."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return textbook(*args, **kwargs)

    textbook = attention.scaled_dot_product_attention
    monkeypatch.setattr(attention, "scaled_dot_product_attention", spy)
    attn.attn_impl = "explicit"
    x = torch.randn(2, 7, DIM)
    with torch.set_grad_enabled(grad):
        out = attn(x)
    assert calls == [(2, HEADS, 7, DIM // HEADS)]
    torch.testing.assert_close(out, by_hand(attn, x), atol=1e-6, rtol=1e-6)


def test_textbook_function_returns_probabilities_and_their_weighted_values():
    q, k, v = torch.randn(2, 3, 5, 8), torch.randn(2, 3, 6, 8), torch.randn(2, 3, 6, 8)
    out, weights = attention.scaled_dot_product_attention(q, k, v)
    assert out.shape == (2, 3, 5, 8) and weights.shape == (2, 3, 5, 6)
    torch.testing.assert_close(weights, torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1))
    torch.testing.assert_close(out, weights @ v)
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_a_query_with_no_allowed_key_gets_zeros_on_every_path(attn, impl):
    """Softmax over no key is undefined; every path returns zeros for such a query (its output is
    then W^O's bias), and the other queries are unaffected."""
    x = torch.randn(2, 4, DIM)
    mask = torch.ones(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, 1] = False  # query 1 may attend to nothing
    attn.attn_impl = impl
    out = attn(x, mask=mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, 1], attn.proj.bias.expand(2, DIM))
    _, weights = attn(x, mask=mask, return_attention=True)
    assert torch.all(weights[:, :, 1] == 0)
    x_grad = x.clone().requires_grad_()
    attn(x_grad, mask=mask).sum().backward()
    assert torch.isfinite(x_grad.grad).all()


@pytest.mark.parametrize("device_dtype, training, path", [
    ("bf16", True, "explicit"),  # the one case where the fused CPU kernel's backward is slow
    ("bf16", False, "fused"),
    ("fp32", True, "fused"), ("fp32", False, "fused"),
    ("fp16", True, "fused"),
])
def test_auto_is_explicit_for_bf16_training_on_a_cpu_and_fused_otherwise(device_dtype, training, path):
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[device_dtype]
    q = torch.empty(2, HEADS, 9, DIM // HEADS, dtype=dtype, requires_grad=training)
    assert attention.choose_attention_path(q) == path
    with torch.no_grad():  # no graph recorded: inference, whatever requires_grad says
        assert attention.choose_attention_path(q) == "fused"


def test_self_attention_matches_torch_multihead_attention(attn):
    x = torch.randn(2, 9, DIM)
    out, weights = attn(x, return_attention=True)
    ref_out, ref_weights = reference_mha(attn)(x, x, x, average_attn_weights=False)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights, ref_weights, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(attn(x), ref_out, atol=1e-5, rtol=1e-5)  # default path


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


def test_qk_norm_and_no_bias_variants_run_on_every_path():
    x = torch.randn(2, 5, DIM)
    attn = MultiHeadAttention(DIM, HEADS, qkv_bias=False, qk_norm=True, attn_impl="fused").eval()
    assert attn.qkv.bias is None
    fused = attn(x)
    attn.attn_impl = "explicit"
    assert (attn(x) - fused).abs().max() < 1e-5
    assert attn(x, context=torch.randn(2, 3, DIM)).shape == (2, 5, DIM)


def test_bf16_autocast_paths_agree():
    x = torch.randn(2, 17, DIM)
    attn = MultiHeadAttention(DIM, HEADS, attn_impl="fused")
    outputs, grads = {}, {}
    for impl in ("fused", "explicit"):
        attn.attn_impl = impl
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[impl] = attn(x)
        outputs[impl].float().square().sum().backward()
        grads[impl] = attn.qkv.weight.grad.clone()
        assert outputs[impl].dtype == torch.bfloat16 and grads[impl].dtype == torch.float32
    assert (outputs["explicit"].float() - outputs["fused"].float()).abs().max() < 3e-2  # bf16: ~3 digits
    torch.testing.assert_close(grads["explicit"], grads["fused"], atol=3e-2, rtol=3e-2)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.ones(2, 5, 5)}, "bool"),
        ({"mask": torch.ones(2, 1, 4, 5, dtype=torch.bool)}, r"does not broadcast"),
        # a mask made for another batch size: both shapes named
        ({"mask": torch.ones(3, 1, 5, 5, dtype=torch.bool)},
         r"mask of shape \(3, 1, 5, 5\) does not broadcast to the attention scores' shape \(B=2, heads=4, "
         r"N_query=5, N_key=5\)"),
        ({"mask": torch.ones(1, 2, 1, 5, 5, dtype=torch.bool)}, r"mask of shape \(1, 2, 1, 5, 5\)"),
        ({"context": torch.randn(2, 3, DIM + 1)}, r"context of shape"),
    ],
)
def test_bad_arguments_are_named(attn, kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        attn(torch.randn(2, 5, DIM), **kwargs)


def test_bad_construction_is_named():
    with pytest.raises(ValueError, match="embed_dim 30 is not divisible by num_heads 4"):
        MultiHeadAttention(30, 4)
    with pytest.raises(ValueError, match="attn_impl must be one of 'auto', 'explicit', 'fused', got 'tiled'"):
        MultiHeadAttention(32, 4, attn_impl="tiled")  # the removed tiled path, named with the valid choices
    with pytest.raises(ValueError, match="got 'Fused'"):  # also when changed on a built module
        MultiHeadAttention(32, 4).attn_impl = "Fused"
    with pytest.raises(ValueError, match=r"expected x of shape \(B, N, 32\)"):
        MultiHeadAttention(32, 4)(torch.randn(2, 5, 16))
