"""VisionTransformer, the registry, the baselines and timm interop."""
from __future__ import annotations

import pytest
import timm
import torch

import vit
from vit.layers import PatchEmbed
from vit.pos_embed import resample_position_embedding, sincos_2d_position_embedding

TIMM_PARAMETER_COUNTS = {
    "vit_tiny_patch16_224": 5_717_416,
    "vit_small_patch16_224": 22_050_664,
    "vit_base_patch16_224": 86_567_656,
    "vit_large_patch16_224": 304_326_632,
    "vit_huge_patch14_224": 632_045_800,
}


def small_vit(**kwargs) -> vit.VisionTransformer:
    config = dict(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=3, num_classes=10)
    return vit.VisionTransformer(**{**config, **kwargs})


@pytest.mark.parametrize("name, expected", TIMM_PARAMETER_COUNTS.items())
def test_paper_family_has_timms_parameter_counts(name, expected):
    with torch.device("meta"):  # no memory or init cost for ViT-H
        model = vit.create_model(name)
    assert vit.count_parameters(model) == expected


def test_baseline_parameter_counts():
    assert vit.count_parameters(vit.create_model("linear_mnist")) == 7_850
    assert vit.count_parameters(vit.create_model("cnn_cifar")) == 40_198
    assert vit.count_parameters(vit.create_model("cnn_cifar", num_classes=10)) == 40_198 - 42 + 21 * 10
    assert vit.count_parameters(vit.create_model("resnet18_cifar")) == 11_173_962


@pytest.mark.parametrize(
    "name, shape",
    [("vit_mnist", (2, 1, 28, 28)), ("vit_cifar", (2, 3, 32, 32)), ("linear_mnist", (2, 1, 28, 28)),
     ("cnn_mnist", (2, 1, 28, 28)), ("cnn_cifar", (2, 3, 32, 32)), ("resnet18_cifar", (2, 3, 32, 32))],
)
def test_registered_small_models_classify(name, shape):
    model = vit.create_model(name, num_classes=7)
    assert model(torch.randn(shape)).shape == (2, 7)


def test_create_model_from_the_readme():
    model = vit.create_model("vit_base_patch16_224", num_classes=10)
    with torch.no_grad():
        logits = model(torch.randn(1, 3, 224, 224))
    assert logits.shape == (1, 10)
    maps = model.get_attention_maps(torch.randn(1, 3, 224, 224))
    assert len(maps) == 12 and all(m.shape == (1, 12, 197, 197) for m in maps)


def test_list_models_and_unknown_name():
    names = vit.list_models()
    assert {"vit_tiny_patch16_224", "vit_mnist", "vit_cifar", "linear_mnist", "cnn_cifar",
            "resnet18_cifar"} <= set(names)
    assert vit.list_models("vit_*patch16*") == [n for n in names if n.startswith("vit_") and "patch16" in n]
    with pytest.raises(ValueError, match=r"unknown model 'vit_tiny_patch16'.*vit_tiny_patch16_224"):
        vit.create_model("vit_tiny_patch16")
    with pytest.raises(ValueError, match=r"no argument\(s\) 'patchsize'.*patch_size"):
        vit.create_model("vit_mnist", patchsize=7)


def test_shapes_through_the_model():
    model = small_vit().eval()
    x = torch.randn(3, 3, 32, 32)
    tokens = model.forward_features(x)
    assert tokens.shape == (3, 1 + 64, 48)
    assert model.forward_head(tokens, pre_logits=True).shape == (3, 48)
    assert model(x).shape == (3, 10)
    maps = model.get_attention_maps(x)
    assert [m.shape for m in maps] == [(3, 3, 65, 65)] * 2
    torch.testing.assert_close(maps[0].sum(-1), torch.ones(3, 3, 65))


def test_patch_embedding_is_a_linear_map_of_each_flattened_patch():
    embed = PatchEmbed(img_size=(8, 12), patch_size=4, in_chans=3, embed_dim=5)
    x = torch.randn(2, 3, 8, 12)
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4)  # (B, C, gh, gw, P, P)
    patches = patches.permute(0, 2, 3, 1, 4, 5).reshape(2, 6, 3 * 16)  # row-major patch order
    expected = patches @ embed.proj.weight.reshape(5, -1).T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, atol=1e-5, rtol=1e-5)
    assert embed.grid_size == (2, 3)


def test_non_square_images_and_grayscale():
    model = small_vit(img_size=(28, 20), in_chans=1)
    assert model(torch.randn(2, 1, 28, 20)).shape == (2, 10)


def test_explicit_and_fused_models_agree():
    fused = small_vit(attn_impl="fused").eval()
    explicit = small_vit(attn_impl="explicit").eval()
    explicit.load_state_dict(fused.state_dict())
    x = torch.randn(4, 3, 32, 32)
    assert (fused(x) - explicit(x)).abs().max() < 1e-5
    with torch.inference_mode():
        assert (fused(x) - explicit(x)).abs().max() < 1e-5
    with pytest.raises(ValueError, match="attn_impl must be one of 'auto', 'explicit', 'fused', got 'tiled'"):
        small_vit(attn_impl="tiled")


def test_gradients_reach_every_parameter():
    model = small_vit(qk_norm=True, init_values=1e-4, drop_path_rate=0.1, global_pool="avg")
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert missing == []


def test_options_change_the_structure():
    model = small_vit(global_pool="avg", class_token=False, qk_norm=True, init_values=0.1, pos_embed="sincos")
    assert model.cls_token is None and model.num_prefix_tokens == 0
    assert isinstance(model.norm, torch.nn.Identity) and not isinstance(model.fc_norm, torch.nn.Identity)
    assert "pos_embed" not in dict(model.named_parameters()) and model.pos_embed.shape == (1, 64, 48)
    assert model.blocks[0].ls1.gamma.eq(0.1).all()
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    no_pos = small_vit(pos_embed="none")
    assert no_pos.pos_embed is None


def test_sincos_table_is_fixed_and_distinct_per_position():
    table = sincos_2d_position_embedding((4, 4), 32)
    assert table.shape == (16, 32)
    assert torch.cdist(table, table).add(torch.eye(16)).min() > 0.1  # no two positions alike


def test_stochastic_depth_and_dropout_only_in_training():
    model = small_vit(drop_rate=0.2, attn_drop_rate=0.2, proj_drop_rate=0.2, drop_path_rate=0.3)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    torch.testing.assert_close(model(x), model(x))
    model.train()
    assert not torch.allclose(model(x), model(x))


def test_position_embeddings_resample_to_a_new_resolution():
    model_224 = vit.create_model("vit_tiny_patch16_224", depth=2).eval()
    x = torch.randn(1, 3, 224, 224)
    # the same weights loaded into a 384 model: the 14x14 grid becomes 24x24, class token kept
    model_384 = vit.create_model("vit_tiny_patch16_224", depth=2, img_size=384).eval()
    model_384.load_state_dict(model_224.state_dict())
    assert model_384.pos_embed.shape == (1, 1 + 24 * 24, 192)
    torch.testing.assert_close(model_384.pos_embed[:, 0], model_224.pos_embed[:, 0])
    assert model_384(torch.randn(1, 3, 384, 384)).shape == (1, 1000)
    # and loaded at 224 again the model reproduces itself exactly
    again = vit.create_model("vit_tiny_patch16_224", depth=2).eval()
    again.load_state_dict(model_224.state_dict())
    torch.testing.assert_close(again(x), model_224(x), atol=0, rtol=0)


def test_resampling_matches_timm():
    from timm.layers import resample_abs_pos_embed

    pos = torch.randn(1, 1 + 7 * 7, 16)
    ours = resample_position_embedding(pos, (12, 12), (7, 7), num_prefix_tokens=1)
    theirs = resample_abs_pos_embed(pos, new_size=(12, 12), old_size=(7, 7), num_prefix_tokens=1)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "make_timm",
    [
        lambda: timm.create_model("vit_tiny_patch16_224"),
        lambda: timm.models.vision_transformer.VisionTransformer(
            img_size=64, patch_size=16, embed_dim=96, depth=3, num_heads=3, global_pool="avg", class_token=False),
        lambda: timm.models.vision_transformer.VisionTransformer(
            img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=4, num_classes=10,
            qk_norm=True, init_values=1e-5),
    ],
    ids=["vit_tiny_patch16_224", "global_pool_avg", "32px_patch4_qknorm_layerscale"],
)
def test_timm_round_trip_gives_the_same_logits(make_timm):
    timm_model = make_timm().eval()
    with torch.no_grad():  # random weights everywhere, so that every tensor is checked
        for p in timm_model.parameters():
            p.normal_(0, 0.05)
    size = timm_model.patch_embed.img_size
    x = torch.randn(2, 3, *size)
    ours = vit.from_timm(timm_model).eval()
    assert vit.count_parameters(ours) == sum(p.numel() for p in timm_model.parameters())
    assert (ours(x) - timm_model(x)).abs().max() < 1e-5
    back = vit.to_timm(ours).eval()
    assert (back(x) - timm_model(x)).abs().max() < 1e-5
    assert (ours(x) - vit.from_timm(back)(x)).abs().max() < 1e-5


def test_to_timm_from_a_registered_model():
    model = vit.create_model("vit_cifar").eval()
    x = torch.randn(2, 3, 32, 32)
    assert (vit.to_timm(model).eval()(x) - model(x)).abs().max() < 1e-5


def test_unsupported_timm_features_are_refused():
    timm_model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, embed_dim=32, depth=1, num_heads=2, reg_tokens=4)
    with pytest.raises(ValueError, match="register tokens"):
        vit.from_timm(timm_model)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"img_size": 30, "patch_size": 4}, "image height 30 is not divisible by patch size 4"),
        ({"img_size": (32, 30), "patch_size": 4}, "image width 30 is not divisible by patch size 4"),
        ({"embed_dim": 50, "num_heads": 3}, "embed_dim 50 is not divisible by num_heads 3"),
        ({"depth": 0}, "depth must be a positive int"),
        ({"num_heads": -1}, "num_heads must be a positive int"),
        ({"global_pool": "max"}, "global_pool"),
        ({"class_token": False}, "class_token"),
        ({"drop_path_rate": 1.5}, "drop_path_rate"),
        ({"img_size": "big"}, "img_size must be an int"),
    ],
)
def test_bad_configs_name_the_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        small_vit(**kwargs)


@pytest.mark.parametrize(
    "shape, match",
    [((2, 1, 32, 32), r"expected images of shape \(B, 3, 32, 32\), got \(2, 1, 32, 32\)"),
     ((2, 3, 28, 28), r"got \(2, 3, 28, 28\)"),
     ((3, 32, 32), r"got \(3, 32, 32\)")],
)
def test_wrong_input_shapes_are_named(shape, match):
    with pytest.raises(ValueError, match=match):
        small_vit()(torch.randn(shape))
    with pytest.raises(ValueError, match=match):
        vit.create_model("cnn_cifar")(torch.randn(shape))
