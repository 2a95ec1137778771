"""Multi-head attention: first-principles explicit path, fused and tiled paths, masks, causality,
cross-attention, all checked against torch.nn.MultiheadAttention."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from vit import MultiHeadAttention
from vit import layers
from vit.layers import _choose_attention_path

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


@pytest.mark.parametrize("path", ["explicit", "tiled"])
@pytest.mark.parametrize("kwargs", [{}, {"causal": True}])
def test_every_path_agrees_with_the_fused_kernel(kwargs, path):
    x = torch.randn(3, 11, DIM)
    fused = MultiHeadAttention(DIM, HEADS, attn_impl="fused").eval()
    other = MultiHeadAttention(DIM, HEADS, attn_impl=path).eval()
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


@pytest.fixture
def normalise_last_results(monkeypatch) -> list[bool]:
    """Records, per call of the inference-only normalise-last path, whether it gave a result."""
    results, original = [], layers._attention_normalised_last

    def spy(*args):
        out = original(*args)
        results.append(out is not None)
        return out

    monkeypatch.setattr(layers, "_attention_normalised_last", spy)
    return results


@pytest.mark.parametrize("path, block_bytes", [
    ("explicit", layers._SCORE_BLOCK_BYTES),  # all images in one block
    ("explicit", 1),  # one image per block
    ("tiled", layers._SCORE_BLOCK_BYTES),  # temporaries within one activation: several blocks
])
@pytest.mark.parametrize("kwargs", VARIANTS)
def test_inference_divides_by_the_row_sums_after_the_values(normalise_last_results, kwargs, path, block_bytes,
                                                            monkeypatch):
    """Without autograd the explicit and tiled paths compute exp(S) [V, 1] and divide last: the same
    numbers as the fused kernel, in the same (B, N, D) layout, with masks, causality and
    cross-attention, whatever the blocks."""
    monkeypatch.setattr(layers, "_SCORE_BLOCK_BYTES", block_bytes)
    torch.manual_seed(0)
    fused = MultiHeadAttention(DIM, HEADS, attn_impl="fused").eval()
    explicit = MultiHeadAttention(DIM, HEADS, attn_impl=path).eval()
    explicit.load_state_dict(fused.state_dict())
    x, context = torch.randn(3, 9, DIM), torch.randn(3, 6, DIM)
    call = variant_call(kwargs, context, mask_heads=1)
    with torch.inference_mode():
        want, got = fused(x, **call), explicit(x, **call)
    assert normalise_last_results == [True]
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("path", ["explicit", "tiled"])
@pytest.mark.parametrize("logit", [400.0, -400.0])
def test_inference_falls_back_to_softmax_when_exp_leaves_the_float_range(normalise_last_results, logit, path):
    """Logits of +400 overflow exp; logits of -400 everywhere leave every row's sum at 0. The
    explicit and tiled paths then take the max-subtracted softmax and still match the fused kernel."""
    q = torch.ones(2, HEADS, 5, 8)
    k = torch.full((2, HEADS, 5, 8), logit / 8**0.5)  # every scaled logit q.k / sqrt(8) is `logit`
    for temporary_bytes in (None, 1):
        assert layers._attention_normalised_last(q, k, torch.randn(2, HEADS, 5, 8), None, 8**-0.5,
                                                 temporary_bytes) is None
    del normalise_last_results[:]

    torch.manual_seed(0)
    fused = MultiHeadAttention(DIM, HEADS, attn_impl="fused").eval()
    explicit = MultiHeadAttention(DIM, HEADS, attn_impl=path).eval()
    head_dim = DIM // HEADS
    with torch.no_grad():  # constant queries and keys: every token's logit against every key is `logit`
        fused.qkv.weight[:2 * DIM] = 0
        fused.qkv.bias[:DIM] = 1
        fused.qkv.bias[DIM:2 * DIM] = logit / head_dim**0.5
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(2, 5, DIM)
    with torch.inference_mode():
        want, got = fused(x), explicit(x)
    assert normalise_last_results == [False]
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_bf16_inference_divides_after_the_values_and_agrees_with_fused(normalise_last_results):
    x = torch.randn(4, 17, DIM)
    fused = MultiHeadAttention(DIM, HEADS, attn_impl="fused").eval()
    explicit = MultiHeadAttention(DIM, HEADS, attn_impl="explicit").eval()
    explicit.load_state_dict(fused.state_dict())
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        want, got = fused(x), explicit(x)
    assert normalise_last_results == [True] and got.dtype == torch.bfloat16
    assert (got.float() - want.float()).abs().max() < 3e-2  # bf16: ~3 digits


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles of one image, so that a batch of 3 runs through several tiles."""
    monkeypatch.setattr(layers, "TILE_BYTES", 1)


@pytest.mark.parametrize("kwargs", VARIANTS)
def test_tiled_gradients_equal_the_explicit_paths(small_tiles, kwargs):
    """The tiled path's hand-written backward against autograd through the explicit path."""
    torch.manual_seed(0)
    explicit = MultiHeadAttention(DIM, HEADS, attn_impl="explicit")
    tiled = MultiHeadAttention(DIM, HEADS, attn_impl="tiled")
    tiled.load_state_dict(explicit.state_dict())
    x, context = torch.randn(3, 9, DIM), torch.randn(3, 6, DIM)
    call = variant_call(kwargs, context, mask_heads=HEADS)
    grads = []
    for module in (explicit, tiled):
        inputs = [x.clone().requires_grad_(), context.clone().requires_grad_()]
        if "context" in call:
            call["context"] = inputs[1]
        out = module(inputs[0], **call)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append([out.detach(), inputs[0].grad, *(p.grad for p in module.parameters())]
                     + ([inputs[1].grad] if "context" in call else []))
    for want, got in zip(*grads):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def saved_for_backward(module: MultiHeadAttention, x: torch.Tensor) -> list[tuple[int, ...]]:
    shapes = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: shapes.append(tuple(t.shape)) or t, lambda t: t):
        module(x).sum().backward()
    return shapes


def test_tiled_path_stores_no_attention_probabilities():
    """What makes the tiled path as lean as the fused kernel: nothing of shape (B, H, N, N) is
    kept for the backward pass (the explicit path keeps the probabilities)."""
    x = torch.randn(2, 10, DIM, requires_grad=True)
    probabilities = (2, HEADS, 10, 10)
    assert probabilities in saved_for_backward(MultiHeadAttention(DIM, HEADS, attn_impl="explicit"), x)
    assert probabilities not in saved_for_backward(MultiHeadAttention(DIM, HEADS, attn_impl="tiled"), x)


def test_traced_tiled_attention_is_right_at_every_batch_size(small_tiles):
    """A tracer records the explicit path instead of the loop over one batch size's tiles."""
    attn = MultiHeadAttention(DIM, HEADS, attn_impl="tiled").eval()
    traced = torch.jit.trace(attn, (torch.randn(2, 5, DIM),))
    x = torch.randn(5, 5, DIM)
    torch.testing.assert_close(traced(x), attn(x), atol=1e-6, rtol=1e-5)
    exported = torch.export.export(attn, (torch.randn(2, 5, DIM),),
                                   dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.testing.assert_close(exported.module()(x), attn(x), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("amx", [False, True], ids=["no_amx", "amx"])
@pytest.mark.parametrize("dtype, batch, tokens, training, path, path_with_amx", [
    # fp32: the fused kernel at every size (tiled ran at 0.81-0.97x timm in a default process)
    (torch.float32, 128, 65, False, "fused", "fused"), (torch.float32, 128, 65, True, "fused", "fused"),
    (torch.float32, 128, 197, True, "fused", "fused"),
    # bf16 training: explicit, with or without AMX (the fused backward is slow on every CPU tried)
    (torch.bfloat16, 128, 65, True, "explicit", "explicit"), (torch.bfloat16, 2, 577, True, "fused", "fused"),
    # bf16 inference: explicit without AMX; with AMX the fused kernel won
    (torch.bfloat16, 2, 197, False, "explicit", "fused"), (torch.bfloat16, 128, 65, False, "explicit", "fused"),
    # bf16 inference of a single small image: the fused kernel's one call beats explicit's several
    (torch.bfloat16, 1, 65, False, "fused", "fused"), (torch.bfloat16, 1, 65, True, "explicit", "explicit"),
    (torch.float16, 128, 65, True, "fused", "fused"),
])
def test_auto_takes_the_path_the_benchmark_found_fastest(monkeypatch, amx, dtype, batch, tokens, training, path,
                                                          path_with_amx):
    monkeypatch.setattr(layers, "_cpu_has_amx_bf16", lambda: amx)
    q = torch.empty(batch, 12, tokens, 16, dtype=dtype, requires_grad=training)
    assert _choose_attention_path(q) == (path_with_amx if amx else path)


def test_amx_is_read_from_torchs_cpu_capabilities():
    assert layers._cpu_has_amx_bf16() is bool(torch.cpu.get_capabilities().get("amx_bf16", False))


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
    for impl in ("fused", "explicit", "tiled"):
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
    for impl in ("explicit", "tiled"):
        attn.attn_impl = impl
        assert (attn(x) - fused).abs().max() < 1e-5
    assert attn(x, context=torch.randn(2, 3, DIM)).shape == (2, 5, DIM)


def test_bf16_autocast_paths_agree():
    x = torch.randn(2, 17, DIM)
    attn = MultiHeadAttention(DIM, HEADS, attn_impl="fused")
    outputs, grads = {}, {}
    for impl in ("fused", "explicit", "tiled"):
        attn.attn_impl = impl
        attn.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            outputs[impl] = attn(x)
        outputs[impl].float().square().sum().backward()
        grads[impl] = attn.qkv.weight.grad.clone()
        assert outputs[impl].dtype == torch.bfloat16 and grads[impl].dtype == torch.float32
    for impl in ("explicit", "tiled"):
        assert (outputs[impl].float() - outputs["fused"].float()).abs().max() < 3e-2  # bf16: ~3 digits
    torch.testing.assert_close(grads["tiled"], grads["explicit"], atol=3e-2, rtol=3e-2)


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
    with pytest.raises(ValueError, match="got 'Fused'"):  # also when changed on a built module
        MultiHeadAttention(32, 4).attn_impl = "Fused"
    with pytest.raises(ValueError, match=r"expected x of shape \(B, N, 32\)"):
        MultiHeadAttention(32, 4)(torch.randn(2, 5, 16))


def allocation_peak(fn) -> int:
    """Largest increase of bytes held by PyTorch's CPU allocator while ``fn`` runs: the peak memory
    measure of bench/model_throughput.py (profiler allocation events), kept here so that the tests
    do not import a script."""
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation:
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(events):
        held += size
        peak = max(peak, held)
    return peak


def test_inference_temporaries_stay_within_the_budget():
    """With ``temporary_bytes`` the normalise-last form holds at most that much besides its output,
    however many images the batch has: what lets 'tiled' inference keep the fused kernel's peak.
    (fp32: in bf16 the final multiply's short-lived fp32 copies come on top, see its docstring;
    the model-level test below covers bf16.)"""
    q, k, v = (torch.randn(64, 12, 65, 16) for _ in range(3))
    activation = q.numel() * 4  # one (B, N, D) tensor, the budget 'tiled' gives
    for budget in (activation, activation // 2):
        peak = allocation_peak(lambda: layers._attention_normalised_last(q, k, v, None, 0.25, budget))
        assert peak <= budget + activation  # the budget + the output
    assert allocation_peak(lambda: layers._attention_normalised_last(q, k, v, None, 0.25)) > budget + activation


@pytest.mark.parametrize("name, batch", [("vit_cifar", 32), ("vit_mnist", 64)])
@pytest.mark.parametrize("bf16", [False, True])
def test_tiled_inference_needs_no_more_memory_than_fused(name, batch, bf16):
    """The whole model's inference peak (set by the MLP, which holds two hidden-width tensors) is
    the fused kernel's with 'tiled', whose attention temporaries stay within one activation."""
    import vit

    model = vit.create_model(name, depth=2).eval()
    x = torch.randn(batch, model.in_chans, *model.img_size)

    def peak(impl: str) -> int:
        for block in model.blocks:
            block.attn.attn_impl = impl

        def infer():
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(x)
        infer()
        return allocation_peak(infer)

    assert peak("tiled") <= peak("fused") < peak("explicit")
