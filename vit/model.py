"""The Vision Transformer (Dosovitskiy et al., 2021, "An Image is Worth 16x16 Words").

image (B, C, H, W)
  -> patches, linearly embedded           (B, N, D)      N = H*W / P^2
  -> prepend class token                  (B, 1 + N, D)
  -> add position embeddings              (B, 1 + N, D)
  -> depth x pre-norm encoder Block       (B, 1 + N, D)
  -> LayerNorm, pool (class token or mean) (B, D)
  -> linear head                          (B, num_classes)
"""
from __future__ import annotations

from typing import Any, Literal, Sequence

import torch
from torch import nn

from vit.attention import AttentionImpl, MultiHeadAttention
from vit.layers import DropPath, LayerNorm, LayerScale, Mlp, PatchEmbed, SequencePool
from vit.pos_embed import grid_from_length, resample_position_embedding, sincos_2d_position_embedding
from vit.tokenizers import ConvTokenizer, ShiftedPatchTokenizer

TOKENIZERS = ("patch", "conv", "spt")
GLOBAL_POOLS = ("token", "avg", "seq")
POS_EMBEDS = ("learn", "sincos", "none")


class Block(nn.Module):
    """Pre-norm Transformer encoder block; (B, N, D) -> (B, N, D).

    ``x = x + DropPath(LayerScale(Attention(LayerNorm(x))))``
    ``x = x + DropPath(LayerScale(Mlp(LayerNorm(x))))``

    Normalising before each branch (not after, as the original Transformer did) keeps an
    identity path from input to output, which lets deep stacks train without warm-up tricks.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        proj_drop: float = 0.0,
        attn_drop: float = 0.0,
        drop_path: float = 0.0,
        init_values: float | None = None,
        attn_impl: AttentionImpl = "auto",
        locality: bool = False,
    ) -> None:
        super().__init__()
        self.norm1 = LayerNorm(dim)
        self.attn = MultiHeadAttention(dim, num_heads, qkv_bias=qkv_bias, qk_norm=qk_norm, attn_drop=attn_drop,
                                       proj_drop=proj_drop, attn_impl=attn_impl, locality=locality)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), proj_drop)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """(B, N, D) -> (B, N, D), and the attention weights (B, H, N, N) when asked."""
        if return_attention:
            attended, weights = self.attn(self.norm1(x), return_attention=True)
            x = x + self.drop_path1(self.ls1(attended))
        else:
            x, weights = x + self.drop_path1(self.ls1(self.attn(self.norm1(x)))), None
        x = x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
        return (x, weights) if return_attention else x


class VisionTransformer(nn.Module):
    """ViT classifier. Keyword names and meanings follow timm's ``VisionTransformer``.

    The arguments after ``attn_impl`` add the methods that let a ViT learn from small datasets
    (see :mod:`vit.tokenizers`); their defaults give the paper's ViT.

    Args:
        img_size: input height and width (int or (H, W)); must be a multiple of ``patch_size``.
        patch_size: side of the square patches.
        in_chans: image channels (1 for MNIST, 3 for RGB).
        num_classes: classifier outputs; 0 keeps the pooled features (no head).
        global_pool: ``'token'`` classifies the class token, ``'avg'`` the mean of patch tokens,
            ``'seq'`` their attention-weighted mean (CCT's sequence pooling).
        embed_dim, depth, num_heads, mlp_ratio: width, number of blocks, heads per block,
            MLP hidden width as a multiple of ``embed_dim``.
        qkv_bias, qk_norm: bias on the Q/K/V projection; LayerNorm on each head's queries and keys.
        init_values: LayerScale initial value; None disables LayerScale.
        class_token: prepend a learned class token.
        pos_embed: ``'learn'`` (learned, the paper's), ``'sincos'`` (fixed 2-D) or ``'none'``.
        fc_norm: put the final LayerNorm after pooling; None means "when global_pool='avg'" (timm's rule).
        drop_rate: dropout before the head (timm's meaning).
        pos_drop_rate: dropout after adding position embeddings.
        proj_drop_rate: dropout after attention output projection and in the MLP.
        attn_drop_rate: dropout on the attention probabilities.
        drop_path_rate: stochastic depth, rising linearly from 0 to this value over the blocks.
        attn_impl: ``'auto'``, ``'explicit'`` or ``'fused'`` (see :class:`vit.attention.MultiHeadAttention`).
        tokenizer: ``'patch'`` (the paper's linear patch embedding), ``'conv'`` (CCT's convolutional
            tokenizer: ``conv_layers`` conv-ReLU-maxpool layers of ``conv_kernel`` x ``conv_kernel``;
            each halves the grid, and ``patch_size`` is not used) or ``'spt'`` (shifted patches).
        locality: locality self-attention in every block (learned temperature, no self-attention).
        distilled: add DeiT's distillation token and a second head that learns from a teacher;
            the two heads' logits are averaged at inference (:meth:`forward_distill` gives both).
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        global_pool: Literal["token", "avg", "seq"] = "token",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        qk_norm: bool = False,
        init_values: float | None = None,
        class_token: bool = True,
        pos_embed: Literal["learn", "sincos", "none"] = "learn",
        fc_norm: bool | None = None,
        drop_rate: float = 0.0,
        pos_drop_rate: float = 0.0,
        proj_drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.0,
        attn_impl: AttentionImpl = "auto",
        tokenizer: Literal["patch", "conv", "spt"] = "patch",
        conv_layers: int = 1,
        conv_kernel: int = 3,
        locality: bool = False,
        distilled: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (("embed_dim", embed_dim), ("depth", depth), ("num_heads", num_heads)):
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if embed_dim % num_heads:
            raise ValueError(
                f"embed_dim {embed_dim} is not divisible by num_heads {num_heads}; "
                f"each head needs an equal share of the embedding"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        if mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be positive, got {mlp_ratio}")
        for name, value, choices in (("global_pool", global_pool, GLOBAL_POOLS), ("pos_embed", pos_embed, POS_EMBEDS),
                                     ("tokenizer", tokenizer, TOKENIZERS)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        if global_pool == "token" and not class_token:
            raise ValueError("global_pool='token' needs class_token=True; use global_pool='avg' or 'seq' without it")
        if distilled and (global_pool != "token" or num_classes == 0):
            raise ValueError(f"distilled=True reads its heads off the class and distillation tokens: it needs "
                             f"global_pool='token' and num_classes > 0, got {global_pool!r} and {num_classes}")
        for name, rate in (("drop_rate", drop_rate), ("pos_drop_rate", pos_drop_rate),
                           ("proj_drop_rate", proj_drop_rate), ("attn_drop_rate", attn_drop_rate),
                           ("drop_path_rate", drop_path_rate)):
            if not 0.0 <= rate < 1.0:
                raise ValueError(f"{name} must be in [0, 1), got {rate}")

        self.num_classes = num_classes
        self.global_pool = global_pool
        self.embed_dim = self.num_features = embed_dim
        self.num_prefix_tokens = int(class_token) + int(distilled)
        self.pos_embed_type = pos_embed
        self.tokenizer = tokenizer

        if tokenizer == "conv":
            self.patch_embed = ConvTokenizer(img_size, in_chans, embed_dim, conv_layers, conv_kernel)
        elif tokenizer == "spt":
            self.patch_embed = ShiftedPatchTokenizer(img_size, patch_size, in_chans, embed_dim)
        else:
            self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        self.img_size, self.in_chans = self.patch_embed.img_size, in_chans
        self.patch_size = getattr(self.patch_embed, "patch_size", None)  # the conv tokenizer has none
        num_tokens = self.num_prefix_tokens + self.patch_embed.num_patches

        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if distilled else None
        if pos_embed == "learn":
            self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim))
        elif pos_embed == "sincos":
            table = sincos_2d_position_embedding(self.patch_embed.grid_size, embed_dim)
            table = torch.cat([torch.zeros(self.num_prefix_tokens, embed_dim), table])[None]
            self.register_buffer("pos_embed", table)  # fixed, but saved so checkpoints are self-contained
        else:
            self.pos_embed = None
        self.pos_drop = nn.Dropout(pos_drop_rate)

        # deeper blocks drop more: 0 for the first, drop_path_rate for the last
        drop_path_rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.Sequential(*[
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_norm=qk_norm,
                  proj_drop=proj_drop_rate, attn_drop=attn_drop_rate, drop_path=rate, init_values=init_values,
                  attn_impl=attn_impl, locality=locality)
            for rate in drop_path_rates
        ])
        use_fc_norm = global_pool == "avg" if fc_norm is None else fc_norm
        self.norm = nn.Identity() if use_fc_norm else LayerNorm(embed_dim)
        self.fc_norm = LayerNorm(embed_dim) if use_fc_norm else nn.Identity()
        self.seq_pool = SequencePool(embed_dim) if global_pool == "seq" else None
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.head_dist = nn.Linear(embed_dim, num_classes) if distilled else None

        self.init_weights()
        # The data configuration that goes with the weights (timm's name); vit.pretrained fills in
        # the mean, std and the rest when it loads weights that say them.
        self.pretrained_cfg: dict[str, Any] = {"input_size": (in_chans, *self.img_size), "mean": None, "std": None,
                                               "interpolation": "bicubic", "crop_pct": 0.9, "source": None}
        # A checkpoint made at another resolution loads with resampled position embeddings.
        self.register_load_state_dict_pre_hook(self._resample_pos_embed_on_load)

    def init_weights(self) -> None:
        """Initialise as the ViT paper's code: N(0, 0.02) position embeddings, zero class token,
        truncated-normal(0.02) linear weights with zero biases; LayerNorms at identity."""
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.dist_token is not None:  # DeiT's: unlike the class token, not zero
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

    def get_classifier(self) -> nn.Module:
        """The classifier head (timm's name)."""
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """A new, freshly initialised head for ``num_classes`` classes (0: no head, the pooled features)."""
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.num_classes = num_classes
        self.head = nn.Linear(self.embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        if self.head_dist is not None:
            if num_classes == 0:
                raise ValueError("a distilled model needs num_classes > 0 for its two heads")
            self.head_dist = nn.Linear(self.embed_dim, num_classes)
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                nn.init.trunc_normal_(head.weight, std=0.02)
                nn.init.zeros_(head.bias)

    def no_weight_decay(self) -> set[str]:
        """Parameters that weight decay should not shrink (they are not weights of a linear map)."""
        return {"pos_embed", "cls_token", "dist_token"}

    # -- forward ----------------------------------------------------------------------------------

    def _embed(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, prefix + N, D): tokens, class (and distillation) token, positions."""
        x = self.patch_embed(x)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        return self.pos_drop(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> normalised tokens (B, prefix + N, D)."""
        return self.norm(self.blocks(self._embed(x)))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Tokens (B, T, D) -> logits (B, num_classes), or pooled features (B, D) if ``pre_logits``.

        A distilled model averages its two heads (DeiT's inference rule).
        """
        if self.dist_token is not None:
            if pre_logits:
                return (x[:, 0] + x[:, 1]) / 2
            logits, dist_logits = self.distillation_heads(x)
            return (logits + dist_logits) / 2
        if self.global_pool == "avg":
            x = x[:, self.num_prefix_tokens:].mean(dim=1)
        elif self.global_pool == "seq":
            x = self.seq_pool(x[:, self.num_prefix_tokens:])
        else:
            x = x[:, 0]
        x = self.head_drop(self.fc_norm(x))
        return x if pre_logits else self.head(x)

    def distillation_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, D) -> (class head's logits, distillation head's logits), each (B, num_classes)."""
        if self.dist_token is None:
            raise ValueError("this model has no distillation token; build it with distilled=True")
        return self.head(self.head_drop(x[:, 0])), self.head_dist(self.head_drop(x[:, 1]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> logits (B, num_classes)."""
        return self.forward_head(self.forward_features(x))

    def forward_distill(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) -> the two heads' logits, for training against the labels and a teacher."""
        return self.distillation_heads(self.forward_features(x))

    @torch.no_grad()
    def get_attention_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Attention probabilities of every block, each (B, heads, T, T) with T = prefix + N.

        Row i of a map is where token i looks; with a class token, row 0 is what the
        classifier reads from. Computed by the explicit attention path in eval mode
        semantics of the current module state (call ``model.eval()`` for deterministic maps).
        """
        x = self._embed(x)
        maps = []
        for block in self.blocks:
            x, weights = block(x, return_attention=True)
            maps.append(weights)
        return maps

    # -- resolution changes -----------------------------------------------------------------------

    def _resample_pos_embed_on_load(self, module: nn.Module, state_dict: dict[str, Any], prefix: str,
                                    *args: Any, **kwargs: Any) -> None:
        key = prefix + "pos_embed"
        if key not in state_dict or not isinstance(self.pos_embed, nn.Parameter):
            return
        stored = state_dict[key]
        if stored.shape == self.pos_embed.shape:
            return
        if stored.ndim != 3 or stored.shape[-1] != self.embed_dim:
            return  # a different model; load_state_dict reports the mismatch
        old_grid = grid_from_length(stored.shape[1], self.num_prefix_tokens)
        state_dict[key] = resample_position_embedding(
            stored, self.patch_embed.grid_size, old_grid, self.num_prefix_tokens)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (buffers such as fixed sin-cos tables are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
