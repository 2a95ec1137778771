"""Turning an image into tokens when data are few: a small convolutional stem, or patches that see
their neighbours. (The paper's linear patch embedding is :class:`vit.layers.PatchEmbed`.)

A plain ViT's patches are cut independently, so the model has to learn from data that
neighbouring pixels belong together. On small datasets two remedies help most:

* :class:`ConvTokenizer` (Compact Convolutional Transformers, Hassani et al. 2021): a few
  conv-ReLU-maxpool layers, whose overlapping kernels build locality in.
* :class:`ShiftedPatchTokenizer` (Lee et al. 2021, "Vision Transformer for Small-Size Datasets"):
  each patch also sees the image shifted by half a patch in the four diagonal directions.

Each takes images (B, C, H, W) and returns tokens (B, N, D), and has ``grid_size`` and
``num_patches`` like ``PatchEmbed``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from vit.layers import LayerNorm, check_images, to_2tuple


class ConvTokenizer(nn.Module):
    """``num_layers`` x (conv k x k, stride 1 -> ReLU -> max-pool 3x3, stride 2): (B, C, H, W) -> (B, N, D).

    Each layer halves the height and width, so N = (H / 2^L) * (W / 2^L). The inner layers have
    ``hidden_channels`` channels, the last one ``embed_dim``. No conv bias, as in CCT: a bias
    before ReLU and max-pool only shifts what the next layer's weights can absorb.
    """

    def __init__(self, img_size: int | Sequence[int] = 32, in_chans: int = 3, embed_dim: int = 256,
                 num_layers: int = 1, kernel_size: int = 3, hidden_channels: int = 64) -> None:
        super().__init__()
        if num_layers < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"conv tokenizer needs conv_layers >= 1 and an odd conv_kernel, "
                             f"got conv_layers={num_layers}, conv_kernel={kernel_size}")
        self.img_size = to_2tuple(img_size, "img_size")
        self.in_chans = in_chans
        channels = [in_chans] + [hidden_channels] * (num_layers - 1) + [embed_dim]
        self.layers = nn.Sequential(*[
            nn.Sequential(
                nn.Conv2d(c_in, c_out, kernel_size, stride=1, padding=kernel_size // 2, bias=False),
                nn.ReLU(),
                nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
            )
            for c_in, c_out in zip(channels[:-1], channels[1:])
        ])
        self.grid_size = self.img_size
        for _ in range(num_layers):  # what a 3x3, stride-2, padding-1 pool does to a side
            self.grid_size = tuple((side - 1) // 2 + 1 for side in self.grid_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):  # He initialisation suits the ReLUs that follow
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size)
        return self.layers(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, N, D)


class ShiftedPatchTokenizer(nn.Module):
    """Patches of the image and of four copies shifted by half a patch diagonally: (B, C, H, W) -> (B, N, D).

    The five images are stacked on the channel axis (5C channels), cut into P x P patches,
    flattened (5 C P P values each), layer-normalised and linearly embedded. A token then covers
    its patch and half of each neighbour, which widens what one token sees at no cost in tokens.
    """

    def __init__(self, img_size: int | Sequence[int] = 32, patch_size: int | Sequence[int] = 4,
                 in_chans: int = 3, embed_dim: int = 192) -> None:
        super().__init__()
        self.img_size = to_2tuple(img_size, "img_size")
        self.patch_size = to_2tuple(patch_size, "patch_size")
        for axis, size, patch in zip(("height", "width"), self.img_size, self.patch_size):
            if size % patch:
                raise ValueError(f"image {axis} {size} is not divisible by patch size {patch}; "
                                 f"choose an img_size that is a multiple of patch_size")
        self.in_chans = in_chans
        self.grid_size = (self.img_size[0] // self.patch_size[0], self.img_size[1] // self.patch_size[1])
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        patch_values = 5 * in_chans * self.patch_size[0] * self.patch_size[1]
        self.norm = LayerNorm(patch_values)
        self.proj = nn.Linear(patch_values, embed_dim)

    def shifted(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, 5C, H, W): the image, then its copies moved by half a patch to the
        lower right, lower left, upper right and upper left, zero-filled where they uncover."""
        dy, dx = self.patch_size[0] // 2, self.patch_size[1] // 2
        # F.pad's (left, right, top, bottom): padding one side and cropping the other moves the image.
        moves = [(dx, -dx, dy, -dy), (-dx, dx, dy, -dy), (dx, -dx, -dy, dy), (-dx, dx, -dy, dy)]
        return torch.cat([x] + [F.pad(x, move) for move in moves], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        check_images(x, self.in_chans, self.img_size)
        patches = F.unfold(self.shifted(x), kernel_size=self.patch_size, stride=self.patch_size)  # (B, 5CPP, N)
        return self.proj(self.norm(patches.transpose(1, 2)))  # (B, N, D)
