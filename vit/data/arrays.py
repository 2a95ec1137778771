"""In-memory image datasets: every image of a split in one uint8 tensor, batched with tensor ops.

A ``TensorImageDataset`` holds ``images`` uint8 (N, C, H, W) and ``labels`` int64 (N,).
torch's DataLoader calls ``__getitems__`` with a whole batch of indices, so a batch is one
gather plus one ``BatchTransform`` call (crop, flip, float conversion, normalisation and an
optional resize, all on the whole batch) instead of N Python-level item fetches. The
DataLoader's ``collate_fn`` is then ``passthrough_collate``.

Augmentation draws from torch's global RNG: ``torch.manual_seed`` (or Lightning's
``seed_everything``) makes runs reproducible, and DataLoader workers get their own seeds
derived from it.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset


class BatchTransform:
    """uint8 images (B, C, H, W) -> float32 normalised images (B, C, S, S), S = out_size or H (H == W).

    Train-time options: a random crop of the original size out of the image zero-padded by
    ``crop_padding`` on every side, and a horizontal flip of each image with probability 1/2.
    Both happen in one gather on the uint8 batch, before the (4x larger) float conversion.
    ``out_size`` resizes the normalised batch with antialiased bilinear interpolation.
    ``policy`` (torchvision's ``v2.AutoAugment`` or ``v2.RandAugment``) is applied to each uint8 image.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, crop_padding: int = 0,
                 flip: bool = False, out_size: Optional[int] = None,
                 policy: Optional[Callable[[Tensor], Tensor]] = None) -> None:
        if len(mean) != len(std):
            raise ValueError(f"mean and std need one value per channel, got {len(mean)} and {len(std)}")
        std_t = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        # x / 255 then (x - mean) / std, folded into one multiply and one add.
        self.scale = 1.0 / (255.0 * std_t)
        self.shift = -torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) / std_t
        self.crop_padding = crop_padding
        self.flip = flip
        self.out_size = out_size
        self.policy = policy

    @property
    def augments(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __call__(self, images: Tensor) -> Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"expected uint8 images (B, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if images.shape[1] != self.scale.shape[1]:
            raise ValueError(f"expected {self.scale.shape[1]} channels, got {images.shape[1]}")
        if self.augments:
            images = self._crop_and_flip(images)
        if self.policy is not None:  # torchvision draws one op set per call, so per image
            images = torch.stack([self.policy(image) for image in images])
        x = images.float().mul_(self.scale).add_(self.shift)
        if self.out_size is not None and tuple(x.shape[-2:]) != (self.out_size, self.out_size):
            x = F.interpolate(x, size=(self.out_size, self.out_size), mode="bilinear",
                              align_corners=False, antialias=True)
        return x

    def _crop_and_flip(self, images: Tensor) -> Tensor:
        b, c, h, w = images.shape
        p = self.crop_padding
        padded = F.pad(images, (p, p, p, p)) if p else images
        wp = w + 2 * p
        rows = torch.randint(0, 2 * p + 1, (b, 1)) + torch.arange(h)  # (B, H) source rows
        cols = torch.randint(0, 2 * p + 1, (b, 1)) + torch.arange(w)  # (B, W) source columns
        if self.flip:
            cols = torch.where(torch.rand(b, 1) < 0.5, cols.flip(1), cols)
        # Flat source offset of every output pixel, the same for all channels of an image.
        index = (rows[:, :, None] * wp + cols[:, None, :]).view(b, 1, h * w).expand(b, c, h * w)
        return padded.reshape(b, c, -1).gather(2, index).view(b, c, h, w)


class TensorImageDataset(Dataset):
    """A split held as tensors: ``images`` uint8 (N, C, H, W), ``labels`` int64 (N,).

    ``dataset[i]`` -> (float32 (C, S, S), int64 scalar); ``dataset.__getitems__(indices)`` ->
    (float32 (B, C, S, S), int64 (B,)), the form the DataLoader uses with ``passthrough_collate``.
    """

    def __init__(self, images: Tensor, labels: Tensor, transform: BatchTransform) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {images.dtype} {tuple(images.shape)}")
        if labels.shape != (images.shape[0],):
            raise ValueError(f"labels must have shape ({images.shape[0]},), got {tuple(labels.shape)}")
        self.images = images
        self.labels = labels.long()
        self.transform = transform

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.transform(self.images[index]), self.labels[index]

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]


def passthrough_collate(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``collate_fn`` for datasets whose ``__getitems__`` already returns a stacked batch."""
    return batch


def random_partition(n: int, sizes: Sequence[int], seed: int) -> list[Tensor]:
    """Split ``range(n)`` at random into parts of the given sizes (summing to n).

    The same (n, sizes, seed) always gives the same parts; each part is sorted, so a split
    keeps the dataset's order. Returns int64 index tensors.
    """
    if sum(sizes) != n or min(sizes, default=0) < 0:
        raise ValueError(f"part sizes {list(sizes)} must be >= 0 and sum to {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return [part.sort().values for part in torch.split(perm, list(sizes))]


def train_val_indices(n: int, val_fraction: Optional[float], max_train: Optional[int],
                      seed: int) -> tuple[Tensor, Tensor]:
    """Seeded (train, val) int64 indices into a training split of ``n`` samples.

    ``val_fraction`` of the samples (rounded) are held out for validation; None holds out
    none, for datasets with a validation split of their own. ``max_train`` then keeps a random
    subset of that many training samples (all of them if there are fewer). Validation indices
    depend only on (n, val_fraction, seed), not on ``max_train``.
    """
    n_val = round(n * val_fraction) if val_fraction else 0
    val, train = random_partition(n, [n_val, n - n_val], seed)
    if max_train is not None and max_train < len(train):
        keep, _ = random_partition(len(train), [max_train, len(train) - max_train], seed)
        train = train[keep]
    return train, val


def select_classes(images: Tensor, labels: Tensor, keep: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Keep the samples whose label is in ``keep`` and relabel them 0..len(keep)-1 in that order.

    images (N, ...) and labels (N,) -> images (M, ...) and int64 labels (M,).
    """
    lookup = torch.full((max(int(labels.max()), *keep) + 1,), -1, dtype=torch.long)
    lookup[torch.as_tensor(keep, dtype=torch.long)] = torch.arange(len(keep))
    new_labels = lookup[labels]
    mask = new_labels >= 0
    return images[mask], new_labels[mask]
