"""The small building blocks of a Vision Transformer, besides attention (:mod:`vit.attention`).

Shapes: B batch, N tokens, D embedding width, C image channels.

Sub-module names follow timm's ``vision_transformer.py`` (``proj``, ``fc1``, ``gamma`` ...)
so that a state dict moves between the two packages without renaming.
"""
from __future__ import annotations

from functools import partial
from typing import Sequence

import torch
from torch import nn

# timm and the original JAX ViT both use eps=1e-6; matching it keeps outputs equal.
LayerNorm = partial(nn.LayerNorm, eps=1e-6)


def to_2tuple(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(28, 32)`` stays. Anything else is a ValueError naming ``name``."""
    if isinstance(value, int) and not isinstance(value, bool):
        pair = (value, value)
    elif isinstance(value, Sequence) and len(value) == 2 and all(isinstance(v, int) for v in value):
        pair = (int(value[0]), int(value[1]))
    else:
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    if min(pair) <= 0:
        raise ValueError(f"{name} must be positive, got {value!r}")
    return pair


def check_images(x: torch.Tensor, in_chans: int, img_size: tuple[int, int]) -> None:
    """Refuse anything but a batch (B, in_chans, H, W) of the size a tokenizer was built for."""
    if x.ndim != 4 or x.shape[1] != in_chans or tuple(x.shape[2:]) != img_size:
        raise ValueError(f"expected images of shape (B, {in_chans}, {img_size[0]}, {img_size[1]}), "
                         f"got {tuple(x.shape)}")


class PatchEmbed(nn.Module):
    """Cut an image into non-overlapping patches and embed each one linearly.

    A ``P x P`` convolution with stride ``P`` applies the same ``(C*P*P) -> D``
    matrix to every flattened patch, i.e. it *is* the paper's linear patch
    projection, only without materialising the unfolded patches.

    ``(B, C, H, W) -> (B, N, D)`` with ``N = (H / P) * (W / P)``.
    """

    def __init__(
        self,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
    ) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        for axis, size, patch in zip(("height", "width"), self.img_size, self.patch_size):
            if size % patch:
                raise ValueError(
                    f"image {axis} {size} is not divisible by patch size {patch}; "
                    f"choose an img_size that is a multiple of patch_size"
                )
        if in_chans <= 0:
            raise ValueError(f"in_chans must be positive, got {in_chans}")
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=self.patch_size, stride=self.patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size)
        x = self.proj(x)  # (B, D, H/P, W/P)
        return x.flatten(2).transpose(1, 2)  # (B, N, D)


class Mlp(nn.Module):
    """Position-wise feed-forward network: ``(B, N, D) -> (B, N, hidden) -> (B, N, D)``."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(drop)
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop2 = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class LayerScale(nn.Module):
    """Learned per-channel scale of a residual branch (CaiT), initialised small."""

    def __init__(self, dim: int, init_values: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init_values)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class DropPath(nn.Module):
    """Stochastic depth: drop a whole residual branch per sample with probability ``p``.

    Survivors are scaled by ``1 / (1 - p)`` so the expected output is unchanged.
    """

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"drop path probability must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)  # one coin per sample
        return x * x.new_empty(shape).bernoulli_(keep).div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class SequencePool(nn.Module):
    """Attention-weighted mean of the tokens (CCT's sequence pooling): (B, N, D) -> (B, D).

    A learned linear map scores every token; the softmax of the scores over the sequence weights
    the average. The model learns which tokens matter instead of reading one class token.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.attention_pool = nn.Linear(dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights = self.attention_pool(x).softmax(dim=1)  # (B, N, 1), summing to 1 over the tokens
        return (weights.transpose(1, 2) @ x).squeeze(1)  # (B, 1, N) @ (B, N, D) -> (B, D)
