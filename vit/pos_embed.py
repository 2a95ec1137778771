"""Position embeddings: a fixed 2-D sine-cosine table, and resampling a learned one to another grid.

Attention treats its input as a set; position embeddings are what tell the model where each
patch came from. Shapes: D embedding width, a patch grid of gh x gw.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_2d_position_embedding(grid_size: tuple[int, int], dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding (MoCo v3, "Simple ViT").

    A quarter of the channels encode sin/cos of the row index, a quarter of the
    column index, at geometrically spaced frequencies. Returns (gh * gw, dim).
    """
    if dim % 4:
        raise ValueError(f"sin-cos position embedding needs embed_dim divisible by 4, got {dim}")
    rows, cols = torch.meshgrid(
        torch.arange(grid_size[0], dtype=torch.float32),
        torch.arange(grid_size[1], dtype=torch.float32),
        indexing="ij",
    )
    omega = 1.0 / temperature ** (torch.arange(dim // 4, dtype=torch.float32) / (dim // 4))
    rows = rows.flatten()[:, None] * omega[None, :]
    cols = cols.flatten()[:, None] * omega[None, :]
    return torch.cat([cols.sin(), cols.cos(), rows.sin(), rows.cos()], dim=1)


def resample_position_embedding(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int],
    num_prefix_tokens: int = 1,
) -> torch.Tensor:
    """Resize learned position embeddings to another patch grid (ViT fine-tuning at a new resolution).

    ``(1, prefix + gh*gw, D) -> (1, prefix + new_gh*new_gw, D)``: the grid part is
    interpolated bicubically as a D-channel image; class-token entries are kept.
    """
    if tuple(new_grid) == tuple(old_grid):
        return pos_embed
    expected = num_prefix_tokens + old_grid[0] * old_grid[1]
    if pos_embed.ndim != 3 or pos_embed.shape[1] != expected:
        raise ValueError(
            f"position embedding of shape {tuple(pos_embed.shape)} does not match a "
            f"{old_grid[0]}x{old_grid[1]} grid with {num_prefix_tokens} prefix token(s) (expected {expected} tokens)"
        )
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = grid.shape[-1]
    orig_dtype = grid.dtype
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_grid), mode="bicubic", align_corners=False, antialias=True)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_grid[0] * new_grid[1], dim).to(orig_dtype)
    return torch.cat([prefix, grid], dim=1)


def grid_from_length(num_tokens: int, num_prefix_tokens: int) -> tuple[int, int]:
    """Infer a square patch grid from a position-embedding length (checkpoints do not store it)."""
    side = math.isqrt(num_tokens - num_prefix_tokens)
    if side * side != num_tokens - num_prefix_tokens:
        raise ValueError(
            f"cannot infer the patch grid of a position embedding with {num_tokens} tokens "
            f"({num_prefix_tokens} prefix); it is not square"
        )
    return side, side
