"""Move weights between ``vit.VisionTransformer`` and timm's ``VisionTransformer``.

Module names match timm's, so a state dict passes unchanged; what these functions
add is reading the architecture off one model to build the other, and refusing the
timm features this package does not implement (register tokens, attention pooling...).
This is how pretrained timm checkpoints come into the package.
"""
from __future__ import annotations

from typing import Any

from torch import nn

from vit.model import VisionTransformer


def _architecture(model: nn.Module) -> dict[str, Any]:
    """Constructor arguments shared by both classes, read off either kind of model
    (both expose the same attribute and sub-module names)."""
    block = model.blocks[0]
    return dict(
        img_size=tuple(model.patch_embed.img_size),
        patch_size=tuple(model.patch_embed.patch_size),
        in_chans=model.patch_embed.proj.in_channels,
        num_classes=model.num_classes,
        global_pool=model.global_pool,
        embed_dim=model.embed_dim,
        depth=len(model.blocks),
        num_heads=block.attn.num_heads,
        mlp_ratio=block.mlp.fc1.out_features / model.embed_dim,
        qkv_bias=block.attn.qkv.bias is not None,
        qk_norm=not isinstance(block.attn.q_norm, nn.Identity),
        # Only whether LayerScale exists matters: its gamma comes with the weights.
        init_values=1.0 if hasattr(block.ls1, "gamma") else None,
        class_token=model.cls_token is not None,
        pos_embed="learn" if model.pos_embed is not None else "none",
        fc_norm=not isinstance(model.fc_norm, nn.Identity),
    )


def _check_convertible(timm_model: nn.Module) -> None:
    problems = []
    if getattr(timm_model, "num_reg_tokens", 0):
        problems.append(f"register tokens ({timm_model.num_reg_tokens})")
    if getattr(timm_model, "attn_pool", None) is not None:
        problems.append("an attention-pooling head")
    if getattr(timm_model, "no_embed_class", False):
        problems.append("no_embed_class=True")
    if timm_model.global_pool not in ("token", "avg"):
        problems.append(f"global_pool={timm_model.global_pool!r}")
    if not isinstance(getattr(timm_model, "norm_pre", nn.Identity()), nn.Identity):
        problems.append("a pre-norm (CLIP-style)")
    if getattr(timm_model, "dynamic_img_size", False):
        problems.append("dynamic_img_size=True")
    block = timm_model.blocks[0]
    if type(block).__name__ != "Block" or not hasattr(block.attn, "qkv"):
        problems.append(f"blocks of type {type(block).__name__}")
    if problems:
        raise ValueError(f"cannot convert this timm model: vit.VisionTransformer has no {', '.join(problems)}")


def from_timm(timm_model: nn.Module, **overrides: Any) -> VisionTransformer:
    """Build the equivalent ``vit.VisionTransformer`` carrying the timm model's weights.

    ``overrides`` change settings that carry no weights (dropout rates, ``attn_impl``);
    a different ``img_size`` resamples the position embeddings.
    """
    _check_convertible(timm_model)
    model = VisionTransformer(**{**_architecture(timm_model), **overrides})
    model.load_state_dict(timm_model.state_dict())
    return model.to(next(timm_model.parameters()).dtype)


def to_timm(model: VisionTransformer, **overrides: Any) -> nn.Module:
    """Build timm's ``VisionTransformer`` with this model's configuration and weights."""
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    if model.pos_embed_type == "sincos":
        raise ValueError("timm's VisionTransformer has no fixed sin-cos position embedding; "
                         "convert a model built with pos_embed='learn'")
    timm_model = TimmVisionTransformer(**{**_architecture(model), **overrides})
    timm_model.load_state_dict(model.state_dict())
    return timm_model.to(next(model.parameters()).dtype)
