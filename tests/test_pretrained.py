"""Starting from pretrained weights: every layout a ViT checkpoint comes in loads with the same
logits as its source, and fine-tuning's adaptations (new head, another grid, grey images) are
exact; bad files get one clear message."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import vit
from vit.errors import CheckpointError
from vit.pretrained import adapt_input_channels, load_pretrained

SMALL = dict(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=5)


def small_timm(**overrides) -> torch.nn.Module:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    model = VisionTransformer(**{**SMALL, **overrides}).eval()
    with torch.no_grad():  # non-trivial biases and LayerNorms, so that a misplaced tensor shows
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


def small_vit(**overrides) -> vit.VisionTransformer:
    return vit.VisionTransformer(**{**SMALL, **overrides}).eval()


def logits(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_timm_checkpoint_files_load_with_equal_logits(tmp_path, suffix):
    source = small_timm()
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(source.state_dict(), str(path))
    else:
        torch.save({"state_dict": source.state_dict()} if suffix == ".pth" else source.state_dict(), path)
    model = small_vit()
    report = load_pretrained(model, path)
    assert report.missing == [] and report.unexpected == [] and report.notes == []
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(model, x), logits(source, x), atol=1e-5, rtol=1e-5)


def test_create_model_init_from_a_file_with_another_class_count(tmp_path):
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False).eval()
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    model = vit.create_model("vit_tiny_patch16_224", num_classes=2, init_from=str(tmp_path / "model.safetensors"))
    assert model.get_classifier().out_features == 2
    for name, tensor in source.state_dict().items():
        if not name.startswith("head."):
            torch.testing.assert_close(model.state_dict()[name], tensor, rtol=0, atol=0)
    assert model.pretrained_cfg["source"].endswith("model.safetensors")
    same = vit.create_model("vit_tiny_patch16_224", init_from=str(tmp_path / "model.safetensors")).eval()
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(logits(same, x), logits(source, x), atol=1e-5, rtol=1e-5)


def test_head_for_another_class_count_is_reported_and_left_initialised():
    source = small_timm()
    model = small_vit(num_classes=3)
    head_before = model.head.weight.clone()
    report = load_pretrained(model, source.state_dict())
    assert any("head left as initialised (5 classes" in note for note in report.notes)
    torch.testing.assert_close(model.head.weight, head_before)
    torch.testing.assert_close(model.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)


def test_another_image_size_resamples_the_position_embeddings_as_timm_does():
    from timm.layers import resample_abs_pos_embed

    source = small_timm()
    model = small_vit(img_size=48)  # 4x4 grid -> 6x6
    report = load_pretrained(model, source.state_dict())
    assert report.notes == ["position embeddings resampled from a 4x4 grid to 6x6"]
    expected = resample_abs_pos_embed(source.pos_embed.detach(), (6, 6), num_prefix_tokens=1)
    torch.testing.assert_close(model.pos_embed.detach(), expected, atol=1e-5, rtol=1e-5)


def test_grey_images_sum_the_colour_weights_of_the_patch_projection():
    source = small_timm()
    model = small_vit(in_chans=1)
    load_pretrained(model, source.state_dict())
    torch.testing.assert_close(model.patch_embed.proj.weight, source.patch_embed.proj.weight.sum(1, keepdim=True))
    grey = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(logits(model, grey), logits(source, grey.expand(-1, 3, -1, -1)), atol=1e-5, rtol=1e-5)
    four = adapt_input_channels(source.patch_embed.proj.weight, 4)  # repeated, rescaled by 3/4
    torch.testing.assert_close(four[:, 3], source.patch_embed.proj.weight[:, 0] * 0.75)


def jax_layout(model) -> dict[str, torch.Tensor]:
    """The original JAX ViT's names and layouts, written out independently of vit.pretrained."""
    s = {k: v.detach() for k, v in model.state_dict().items()}
    d, h = model.embed_dim, model.blocks[0].attn.num_heads
    out = {"embedding/kernel": s["patch_embed.proj.weight"].permute(2, 3, 1, 0), "embedding/bias": s["patch_embed.proj.bias"],
           "cls": s["cls_token"], "Transformer/posembed_input/pos_embedding": s["pos_embed"],
           "Transformer/encoder_norm/scale": s["norm.weight"], "Transformer/encoder_norm/bias": s["norm.bias"],
           "head/kernel": s["head.weight"].T, "head/bias": s["head.bias"]}
    for i in range(len(model.blocks)):
        b, t = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        out[b + "LayerNorm_0/scale"], out[b + "LayerNorm_0/bias"] = s[t + "norm1.weight"], s[t + "norm1.bias"]
        out[b + "LayerNorm_2/scale"], out[b + "LayerNorm_2/bias"] = s[t + "norm2.weight"], s[t + "norm2.bias"]
        for j, part in enumerate(("query", "key", "value")):
            w = s[t + "attn.qkv.weight"][j * d:(j + 1) * d]  # (out, in)
            out[b + f"MultiHeadDotProductAttention_1/{part}/kernel"] = w.T.reshape(d, h, d // h)
            out[b + f"MultiHeadDotProductAttention_1/{part}/bias"] = s[t + "attn.qkv.bias"][j * d:(j + 1) * d].reshape(h, -1)
        out[b + "MultiHeadDotProductAttention_1/out/kernel"] = s[t + "attn.proj.weight"].T.reshape(h, d // h, d)
        out[b + "MultiHeadDotProductAttention_1/out/bias"] = s[t + "attn.proj.bias"]
        for j, fc in enumerate(("fc1", "fc2")):
            out[b + f"MlpBlock_3/Dense_{j}/kernel"] = s[t + f"mlp.{fc}.weight"].T
            out[b + f"MlpBlock_3/Dense_{j}/bias"] = s[t + f"mlp.{fc}.bias"]
    return out


def huggingface_layout(model) -> dict[str, torch.Tensor]:
    """Hugging Face ViTForImageClassification's names, written out independently of vit.pretrained."""
    s = {k: v.detach() for k, v in model.state_dict().items()}
    d = model.embed_dim
    out = {"vit.embeddings.cls_token": s["cls_token"], "vit.embeddings.position_embeddings": s["pos_embed"],
           "vit.embeddings.patch_embeddings.projection.weight": s["patch_embed.proj.weight"],
           "vit.embeddings.patch_embeddings.projection.bias": s["patch_embed.proj.bias"],
           "vit.layernorm.weight": s["norm.weight"], "vit.layernorm.bias": s["norm.bias"],
           "classifier.weight": s["head.weight"], "classifier.bias": s["head.bias"]}
    for i in range(len(model.blocks)):
        l, t = f"vit.encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            for j, part in enumerate(("query", "key", "value")):
                out[f"{l}attention.attention.{part}.{kind}"] = s[f"{t}attn.qkv.{kind}"][j * d:(j + 1) * d]
            out[f"{l}attention.output.dense.{kind}"] = s[f"{t}attn.proj.{kind}"]
            out[f"{l}intermediate.dense.{kind}"] = s[f"{t}mlp.fc1.{kind}"]
            out[f"{l}output.dense.{kind}"] = s[f"{t}mlp.fc2.{kind}"]
            out[f"{l}layernorm_before.{kind}"] = s[f"{t}norm1.{kind}"]
            out[f"{l}layernorm_after.{kind}"] = s[f"{t}norm2.{kind}"]
    return out


def test_jax_npz_and_huggingface_layouts_load_with_equal_logits(tmp_path):
    import numpy as np

    source = small_timm()
    np.savez(tmp_path / "ViT.npz", **{k: v.numpy() for k, v in jax_layout(source).items()})
    save_file({k: v.contiguous() for k, v in huggingface_layout(source).items()}, str(tmp_path / "hf.safetensors"))
    x = torch.randn(2, 3, 32, 32)
    for path in (tmp_path / "ViT.npz", tmp_path / "hf.safetensors"):
        model = small_vit()
        report = load_pretrained(model, path)
        assert report.missing == [] and report.unexpected == [], path
        torch.testing.assert_close(logits(model, x), logits(source, x), atol=1e-5, rtol=1e-5)


def test_a_hub_folder_brings_its_data_config(tmp_path):
    import json

    source = small_timm()
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(
        {"architecture": "vit_tiny", "pretrained_cfg": {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                                                         "interpolation": "bicubic", "crop_pct": 0.9}}))
    model = small_vit()
    load_pretrained(model, tmp_path)
    assert model.pretrained_cfg["mean"] == [0.5, 0.5, 0.5] and model.pretrained_cfg["crop_pct"] == 0.9


def test_this_packages_own_checkpoint_and_export_load(tmp_path):
    from vit.export import save_weights

    source = vit.create_model("vit_mnist", depth=1).eval()
    torch.save({"state_dict": {f"model.{k}": v for k, v in source.state_dict().items()},
                "hyper_parameters": {"mean": [0.1307], "std": [0.3081]}}, tmp_path / "run.ckpt")
    save_weights(source, tmp_path / "export.safetensors",
                 config={"model_name": "vit_mnist", "model_kwargs": {"depth": 1}, "class_names": list("0123456789"),
                         "mean": [0.1307], "std": [0.3081]})
    x = torch.randn(2, 1, 28, 28)
    for path in (tmp_path / "run.ckpt", tmp_path / "export.safetensors"):
        model = vit.create_model("vit_mnist", depth=1, init_from=str(path)).eval()
        torch.testing.assert_close(logits(model, x), logits(source, x), rtol=0, atol=0)
        assert model.pretrained_cfg["mean"] == [0.1307]


def test_reset_classifier_gives_a_fresh_head():
    model = small_vit()
    model.reset_classifier(7)
    assert model.get_classifier().out_features == 7 and model.num_classes == 7
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    model.reset_classifier(0)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 48)  # the pooled features


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


@pytest.mark.parametrize("make, match", [
    (lambda p: p.write_bytes(b"not a checkpoint at all"), r"cannot read pretrained weights from .*bad\.pth"),
    (lambda p: torch.save({"state_dict": {"x": Evil()}}, p), r"refusing to load .*bad\.pth: it holds pickled"),
    (lambda p: (torch.save(small_timm().state_dict(), p), p.write_bytes(p.read_bytes()[:5000])),
     r"cannot read pretrained weights from .*bad\.pth.*truncated"),
    (lambda p: torch.save(torch.nn.Linear(3, 4).state_dict(), p), r"bad\.pth does not hold the weights of this model"),
    (lambda p: torch.save(small_timm(embed_dim=24).state_dict(), p), r"made for another architecture.*blocks"),
])
def test_bad_files_get_one_clear_message(tmp_path, make, match):
    path = tmp_path / "bad.pth"
    make(path)
    with pytest.raises(CheckpointError, match=match):
        load_pretrained(small_vit(), path)


def test_missing_file_and_unknown_timm_name_are_named(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.pth not found"):
        load_pretrained(small_vit(), tmp_path / "nothing.pth")
    with pytest.raises(CheckpointError, match=r"timm has no model 'vit_nonesuch'"):
        load_pretrained(small_vit(), "timm:vit_nonesuch.augreg")


def test_a_hub_name_offline_says_what_to_download_and_where_to_put_it():
    code = ("import vit\n"
            "from vit.errors import CheckpointError\n"
            "try:\n"
            "    vit.create_model('vit_tiny_patch16_224', init_from='timm:vit_tiny_patch16_224.augreg_in21k_ft_in1k')\n"
            "except CheckpointError as e:\n"
            "    print(e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert "could not download timm weights 'vit_tiny_patch16_224.augreg_in21k_ft_in1k'" in done.stdout, done.stderr
    assert "https://huggingface.co/timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k/resolve/main/model.safetensors" \
        in done.stdout
    assert "model.init_from=PATH" in done.stdout


def test_from_timm_with_another_class_count_gets_a_new_head_and_the_data_config():
    source = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8).eval()
    model = vit.from_timm(source, num_classes=2)
    assert model.get_classifier().out_features == 2
    torch.testing.assert_close(model.blocks[0].attn.qkv.weight, source.blocks[0].attn.qkv.weight)
    assert tuple(model.pretrained_cfg["mean"]) == tuple(source.pretrained_cfg["mean"])


def test_distilled_models_convert_both_ways_with_equal_logits():
    model = vit.create_model("vit_cifar_distilled", depth=2).eval()
    timm_model = vit.to_timm(model)
    assert type(timm_model).__name__ == "VisionTransformerDistilled"
    back = vit.from_timm(timm_model).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(back, x), logits(model, x), rtol=0, atol=0)
    torch.testing.assert_close(logits(timm_model, x), logits(model, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name, match", [("cct_2_3x2_32", r"tokenizer='conv', global_pool='seq'"),
                                         ("sl_vit_cifar", r"tokenizer='spt', locality self-attention")])
def test_small_data_models_that_timm_cannot_express_are_refused_by_name(name, match):
    with pytest.raises(ValueError, match=match):
        vit.to_timm(vit.create_model(name))
