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
        distilled=getattr(model, "dist_token", None) is not None,  # DeiT's distillation token
    )


def _type_name(obj: Any) -> str:
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def _check_convertible(timm_model: Any) -> None:
    # Checked by class, not by attributes: many timm and torchvision models have blocks or a
    # patch_embed, and reading the architecture off the wrong one would fail far from the cause.
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    if not isinstance(timm_model, TimmVisionTransformer):
        hint = " (it is already this package's model)" if isinstance(timm_model, VisionTransformer) else ""
        raise TypeError(f"from_timm converts timm's VisionTransformer "
                        f"(timm.models.vision_transformer.VisionTransformer), got {_type_name(timm_model)}{hint}")
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

    Raises TypeError naming the type for anything but timm's ``VisionTransformer`` (or a
    subclass such as DeiT's distilled model), and ValueError listing the timm features this
    package does not implement. ``overrides`` change settings that carry no weights (dropout
    rates, ``attn_impl``) or that fine-tuning adapts (:func:`vit.pretrained.load_pretrained`):
    another ``num_classes`` gets a fresh head, another ``img_size`` resampled position embeddings.
    The timm model's data configuration (mean, std ...) becomes ``pretrained_cfg``.
    """
    from vit.pretrained import load_pretrained

    _check_convertible(timm_model)
    model = VisionTransformer(**{**_architecture(timm_model), **overrides})
    load_pretrained(model, timm_model.state_dict())
    cfg = getattr(timm_model, "pretrained_cfg", None) or {}
    model.pretrained_cfg.update({k: cfg[k] for k in ("mean", "std", "interpolation", "crop_pct") if k in cfg})
    return model.to(next(timm_model.parameters()).dtype)


def to_timm(model: VisionTransformer, **overrides: Any) -> nn.Module:
    """Build timm's ``VisionTransformer`` with this model's configuration and weights."""
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer as TimmVisionTransformer

    if not isinstance(model, VisionTransformer):
        raise TypeError(f"to_timm converts vit.VisionTransformer, got {_type_name(model)}")
    if model.pos_embed_type == "sincos":
        raise ValueError("timm's VisionTransformer has no fixed sin-cos position embedding; "
                         "convert a model built with pos_embed='learn'")
    problems = [f"tokenizer={model.tokenizer!r}"] if model.tokenizer != "patch" else []
    problems += [f"global_pool={model.global_pool!r}"] if model.global_pool == "seq" else []
    problems += ["locality self-attention"] if model.blocks[0].attn.locality else []
    if problems:
        raise ValueError(f"timm's VisionTransformer has no {', '.join(problems)}; only patch-embedding ViTs convert")
    arguments = {**_architecture(model), **overrides}
    timm_class = VisionTransformerDistilled if arguments.pop("distilled") else TimmVisionTransformer
    timm_model = timm_class(**arguments)
    timm_model.load_state_dict(model.state_dict())
    return timm_model.to(next(model.parameters()).dtype)
