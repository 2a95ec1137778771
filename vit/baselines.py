"""The CNN baselines that a ViT is compared with, built for the same inputs.

All take ``num_classes``, ``in_chans`` and ``img_size`` so that the training
pipeline can swap them for a ViT without other changes.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from vit.layers import to_2tuple


def _check_input(x: torch.Tensor, expected: tuple[int, int, int]) -> None:
    if tuple(x.shape[1:]) != expected:
        raise ValueError(f"expected images of shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")


class LinearClassifier(nn.Module):
    """Multinomial logistic regression on raw pixels: (B, C, H, W) -> (B, num_classes).

    For MNIST (1x28x28, 10 classes) that is 784 x 10 weights + 10 biases = 7,850 parameters.
    """

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int | Sequence[int] = 28) -> None:
        super().__init__()
        h, w = to_2tuple(img_size, "img_size")
        self.input_shape = (in_chans, h, w)
        self.fc = nn.Linear(in_chans * h * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_shape)
        return self.fc(x.flatten(1))


class CifarCNN(nn.Module):
    """The course's small CIFAR CNN: three conv + max-pool stages, then three linear layers.

    conv 5x5 C->16, pool; conv 5x5 16->20, pool; conv 3x3 20->20, pool  (32x32 -> 20x4x4 = 320)
    then 320 -> 80 -> 20 -> num_classes. 40,198 parameters for 3x32x32 inputs and 2 classes.
    """

    def __init__(self, num_classes: int = 2, in_chans: int = 3, img_size: int | Sequence[int] = 32) -> None:
        super().__init__()
        h, w = to_2tuple(img_size, "img_size")
        if min(h, w) < 8:
            raise ValueError(f"CifarCNN halves the image three times; img_size must be >= 8, got {img_size}")
        self.input_shape = (in_chans, h, w)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 16, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 20, 5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(20, 20, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 20 * (h // 8) * (w // 8)
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(flat, 80), nn.ReLU(),
            nn.Linear(80, 20), nn.ReLU(),
            nn.Linear(20, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_shape)
        return self.classifier(self.features(x))


class SmallCNN(nn.Module):
    """A two-stage CNN for 28x28 digits (LeNet-like): conv 3x3 32, conv 3x3 64, each pooled, then 128 -> classes."""

    def __init__(self, num_classes: int = 10, in_chans: int = 1, img_size: int | Sequence[int] = 28) -> None:
        super().__init__()
        h, w = to_2tuple(img_size, "img_size")
        self.input_shape = (in_chans, h, w)
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _check_input(x, self.input_shape)
        return self.classifier(self.features(x))


def resnet18_cifar(num_classes: int = 10, in_chans: int = 3, img_size: int | Sequence[int] = 32) -> nn.Module:
    """torchvision's ResNet-18 for small images: a 3x3 stride-1 stem and no max-pool,
    so a 32x32 image keeps 4x4 resolution in the last stage (He et al.'s CIFAR setting)."""
    # Imported here: torchvision's models bring torch._dynamo, seconds of `import vit` for one model.
    import torchvision

    to_2tuple(img_size, "img_size")  # validated; the network itself is size-agnostic
    model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_chans, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model
