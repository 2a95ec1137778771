"""The small-data ViT family: convolutional and shifted-patch tokenizers, sequence pooling,
locality self-attention and DeiT's distillation token, checked for shapes, the papers' parameter
counts, gradients, determinism and equality with timm's DeiT."""
from __future__ import annotations

import pytest
import torch

import vit
from vit.layers import SequencePool
from vit.tokenizers import ConvTokenizer, ShiftedPatchTokenizer


@pytest.mark.parametrize("name, params", [
    ("cct_7_3x1_32", 3_760_139),  # the CCT paper's 3.76M
    ("cct_2_3x2_32", 283_723),  # 0.28M
    ("vit_lite_7_4_32", 3_722_250),  # 3.72M
    ("vit_tiny_patch16_224_distilled", 5_910_800),  # timm's deit_tiny_distilled_patch16_224
    ("cct_mnist", 479_051),
    ("sl_vit_cifar", 1_843_888),
    ("vit_cifar_distilled", 1_808_852),
    ("vit_mnist_distilled", 206_740),
])
def test_presets_have_the_published_parameter_counts(name, params):
    assert vit.count_parameters(vit.create_model(name)) == params


def test_timm_counts_the_distilled_tiny_model_the_same():
    import timm

    assert vit.count_parameters(timm.create_model("deit_tiny_distilled_patch16_224")) == 5_910_800


@pytest.mark.parametrize("layers, img, grid", [(1, 32, 16), (2, 32, 8), (2, 28, 7), (3, 28, 4)])
def test_conv_tokenizer_halves_the_grid_per_layer(layers, img, grid):
    tokenizer = ConvTokenizer(img, in_chans=3, embed_dim=24, num_layers=layers)
    tokens = tokenizer(torch.randn(2, 3, img, img))
    assert tokens.shape == (2, grid * grid, 24) and tokenizer.grid_size == (grid, grid)
    assert tokenizer.num_patches == grid * grid


def test_shifted_patches_see_half_of_each_diagonal_neighbour():
    tokenizer = ShiftedPatchTokenizer(8, patch_size=4, in_chans=1, embed_dim=16)
    image = torch.arange(64.0).view(1, 1, 8, 8)
    shifted = tokenizer.shifted(image)  # (1, 5, 8, 8)
    assert shifted.shape == (1, 5, 8, 8)
    torch.testing.assert_close(shifted[0, 0], image[0, 0])
    # moved by 2 pixels down and right: pixel (r, c) of the copy is pixel (r-2, c-2), zero at the edges
    torch.testing.assert_close(shifted[0, 1, 2:, 2:], image[0, 0, :-2, :-2])
    assert shifted[0, 1, :2].abs().sum() == 0 and shifted[0, 1, :, :2].abs().sum() == 0
    torch.testing.assert_close(shifted[0, 4, :-2, :-2], image[0, 0, 2:, 2:])  # up and left
    assert tokenizer(image).shape == (1, 4, 16)
    assert tokenizer.norm.normalized_shape == (5 * 4 * 4,)


def test_sequence_pooling_is_a_softmax_weighted_mean_of_the_tokens():
    pool = SequencePool(8)
    x = torch.randn(3, 5, 8)
    weights = torch.softmax(pool.attention_pool(x), dim=1)  # (3, 5, 1)
    torch.testing.assert_close(pool(x), (weights * x).sum(dim=1))
    with torch.no_grad():
        pool.attention_pool.weight.zero_()
    torch.testing.assert_close(pool(x), x.mean(dim=1))  # equal scores: the plain mean


@pytest.mark.parametrize("impl", ["explicit", "fused"])
def test_locality_attention_never_attends_to_itself_and_learns_its_temperature(impl):
    attn = vit.MultiHeadAttention(32, 4, locality=True, attn_impl=impl)
    x = torch.randn(2, 6, 32)
    _, weights = attn(x, return_attention=True)
    assert torch.all(torch.diagonal(weights, dim1=-2, dim2=-1) == 0)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 4, 6))
    attn(x).sum().backward()
    assert attn.temperature.grad is not None and attn.temperature.grad != 0
    torch.testing.assert_close(attn.temperature.exp(), torch.tensor(8**-0.5))  # starts at 1 / sqrt(Dh)


def test_locality_attention_paths_agree_with_masks_and_temperature():
    torch.manual_seed(0)
    explicit = vit.MultiHeadAttention(32, 4, locality=True, attn_impl="explicit")
    fused = vit.MultiHeadAttention(32, 4, locality=True, attn_impl="fused")
    with torch.no_grad():
        explicit.temperature.fill_(0.3)
    fused.load_state_dict(explicit.state_dict())
    x = torch.randn(2, 7, 32)
    mask = torch.rand(2, 1, 7, 7) > 0.3
    for kwargs in ({}, {"mask": mask}, {"causal": True}, {"context": torch.randn(2, 5, 32)}):
        torch.testing.assert_close(fused(x, **kwargs), explicit(x, **kwargs), atol=1e-5, rtol=1e-5)


def test_distilled_model_equals_timms_deit_and_averages_its_heads():
    from timm.models.deit import VisionTransformerDistilled

    model = vit.create_model("vit_cifar_distilled", depth=2).eval()
    reference = VisionTransformerDistilled(img_size=32, patch_size=4, in_chans=3, num_classes=10, embed_dim=192,
                                           depth=2, num_heads=12, mlp_ratio=2.0).eval()
    reference.load_state_dict(model.state_dict())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=1e-5)
        logits, dist_logits = model.forward_distill(x)
        torch.testing.assert_close(model(x), (logits + dist_logits) / 2)
    assert model.num_prefix_tokens == 2 and model.pos_embed.shape == (1, 2 + 64, 192)


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "sl_vit_cifar", "vit_cifar_distilled", "cct_mnist"])
def test_gradients_reach_every_parameter(name):
    model = vit.create_model(name, depth=2)
    x = torch.randn(2, model.in_chans, *model.img_size)
    outputs = model.forward_distill(x) if model.dist_token is not None else (model(x),)
    sum(o.square().sum() for o in outputs).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


@pytest.mark.parametrize("name", ["cct_2_3x2_32", "sl_vit_cifar"])
def test_same_seed_same_model_same_logits(name):
    outputs = []
    for _ in range(2):
        torch.manual_seed(3)
        model = vit.create_model(name).eval()
        outputs.append(model(torch.ones(1, 3, 32, 32)))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=0)


@pytest.mark.parametrize("kwargs, match", [
    ({"tokenizer": "cnn"}, r"tokenizer must be one of 'patch', 'conv', 'spt', got 'cnn'"),
    ({"global_pool": "max"}, r"global_pool must be one of 'token', 'avg', 'seq', got 'max'"),
    ({"tokenizer": "conv", "conv_kernel": 4}, r"odd conv_kernel, got conv_layers=1, conv_kernel=4"),
    ({"tokenizer": "conv", "conv_layers": 0}, r"conv_layers >= 1"),
    ({"distilled": True, "global_pool": "avg"}, r"distilled=True .* needs global_pool='token'"),
    ({"global_pool": "token", "class_token": False}, r"needs class_token=True"),
])
def test_bad_small_data_options_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        vit.VisionTransformer(img_size=32, patch_size=4, embed_dim=32, depth=1, num_heads=2, **kwargs)


def test_a_model_without_distillation_token_says_so():
    with pytest.raises(ValueError, match="no distillation token"):
        vit.create_model("vit_mnist").forward_distill(torch.randn(1, 1, 28, 28))
