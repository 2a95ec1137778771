"""Loaders that read a dataset's files into ``ArraySplits``: uint8 (N, C, H, W) tensors.

torchvision's dataset classes are used only to find, download and parse the files; their
``.data`` / ``.targets`` arrays are taken whole, never item by item. Missing files become a
``DatasetNotFoundError`` that says where they were looked for and how to get them.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torchvision
from torch import Tensor

from vit.data.arrays import select_classes
from vit.data.config import DataConfig
from vit.data.errors import DatasetNotFoundError

MNIST_CLASSES: tuple[str, ...] = tuple(torchvision.datasets.MNIST.classes)
FASHION_MNIST_CLASSES: tuple[str, ...] = tuple(torchvision.datasets.FashionMNIST.classes)
CIFAR10_CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)
CIFAR2_DEFAULT_CLASSES: tuple[str, ...] = ("cat", "dog")

Split = tuple[Tensor, Tensor]  # images uint8 (N, C, H, W), labels int64 (N,)


@dataclass
class ArraySplits:
    """A whole dataset in memory. ``val`` is None when the dataset has no validation split
    of its own and it is carved from ``train``."""

    train: Split
    test: Split
    class_names: list[str]
    val: Optional[Split] = None


def load_mnist_family(cfg: DataConfig) -> ArraySplits:
    """MNIST or Fashion-MNIST (cfg.name) from ``ROOT/<MNIST|FashionMNIST>/raw``: 1x28x28 images."""
    dataset_cls = torchvision.datasets.FashionMNIST if cfg.name == "fashion_mnist" else torchvision.datasets.MNIST
    # torchvision keeps the (decompressed) resources under ROOT/<class name>/raw.
    folder = Path(cfg.root) / dataset_cls.__name__ / "raw"
    expected = [Path(name).with_suffix("").name for name, _ in dataset_cls.resources]
    splits = []
    for train in (True, False):
        ds = _open_torchvision(dataset_cls, cfg, train, folder, expected)
        splits.append((ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    return ArraySplits(train=splits[0], test=splits[1], class_names=list(dataset_cls.classes))


def load_cifar(cfg: DataConfig) -> ArraySplits:
    """CIFAR-10, CIFAR-100 or a CIFAR-10 class subset (cfg.name = cifar2): 3x32x32 images."""
    if cfg.name == "cifar2":
        return _select_cifar10_classes(_read_cifar(cfg, 10), list(cfg.classes or CIFAR2_DEFAULT_CLASSES))
    return _read_cifar(cfg, 100 if cfg.name == "cifar100" else 10)


def _read_cifar(cfg: DataConfig, num_classes: int) -> ArraySplits:
    label = f"CIFAR-{num_classes}"
    if cfg.source == "npz":
        assert cfg.path is not None  # resolve_config requires it for source=npz
        default_names = list(CIFAR10_CLASSES) if num_classes == 10 else [str(i) for i in range(num_classes)]
        return load_npz(Path(cfg.path), label, num_classes, default_names)
    dataset_cls = torchvision.datasets.CIFAR10 if num_classes == 10 else torchvision.datasets.CIFAR100
    folder = Path(cfg.root) / dataset_cls.base_folder
    expected = [name for name, _ in dataset_cls.train_list + dataset_cls.test_list] + [dataset_cls.meta["filename"]]
    splits = []
    for train in (True, False):
        ds = _open_torchvision(dataset_cls, cfg, train, folder, expected)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()  # NHWC -> NCHW
        splits.append((images, torch.as_tensor(ds.targets, dtype=torch.long)))
    return ArraySplits(train=splits[0], test=splits[1], class_names=list(ds.classes))


def _select_cifar10_classes(data: ArraySplits, names: list[str]) -> ArraySplits:
    unknown = [n for n in names if n not in data.class_names]
    if unknown or len(set(names)) != len(names) or len(names) < 2:
        raise ValueError(
            f"data.classes must name at least two distinct CIFAR-10 classes, got {names}"
            + (f" (unknown: {unknown})" if unknown else "")
            + f"; valid names: {', '.join(data.class_names)}"
        )
    keep = [data.class_names.index(n) for n in names]
    return ArraySplits(train=select_classes(*data.train, keep), test=select_classes(*data.test, keep),
                       class_names=names)


def load_npz(path: Path, label: str, num_classes: int, default_names: list[str]) -> ArraySplits:
    """Read an arrays file with x_train, y_train, x_test, y_test (uint8 NHWC images, integer
    labels in [0, num_classes)) and optional ``classes`` (num_classes names)."""
    if not path.is_file():
        raise DatasetNotFoundError.for_files(
            f"{label} arrays file", path.parent, [path.name],
            "Set data.path=... to an .npz file with x_train, y_train, x_test, y_test (uint8 images of shape "
            "N x H x W x C, integer labels) and optionally classes, or use data.source=torchvision.")
    with np.load(path, allow_pickle=False) as arrays:
        missing = [key for key in ("x_train", "y_train", "x_test", "y_test") if key not in arrays.files]
        if missing:
            raise ValueError(f"{path} lacks the arrays {missing}; it holds {arrays.files}")
        splits = [_npz_split(path, arrays[f"x_{part}"], arrays[f"y_{part}"], num_classes) for part in ("train", "test")]
        names = [str(n) for n in arrays["classes"]] if "classes" in arrays.files else default_names
    if len(names) != num_classes:
        raise ValueError(f"{path}: 'classes' holds {len(names)} names, {label} has {num_classes} classes")
    return ArraySplits(train=splits[0], test=splits[1], class_names=names)


def _npz_split(path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[Tensor, Tensor]:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"{path}: images must be uint8 N x H x W x C with C in (1, 3), "
                         f"got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{path}: labels must be integers of shape ({images.shape[0]},), "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{path}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels.astype(np.int64)))


def _open_torchvision(dataset_cls: type, cfg: DataConfig, train: bool, folder: Path, expected: list[str]):
    """Instantiate a torchvision dataset, turning missing files into a DatasetNotFoundError."""
    label = {"FashionMNIST": "Fashion-MNIST", "CIFAR10": "CIFAR-10", "CIFAR100": "CIFAR-100"}.get(
        dataset_cls.__name__, dataset_cls.__name__)
    try:
        return dataset_cls(cfg.root, train=train, download=cfg.download)
    except (RuntimeError, OSError) as error:  # urllib's URLError is an OSError
        if all((folder / name).is_file() for name in expected):
            raise  # the files are there: a real read or integrity error, not a missing dataset
        relative = folder.relative_to(Path(cfg.root))
        get = (f"torchvision could not download them{_reason(error)}. To get them, retry with data.download=true on "
               f"a machine with a network" if cfg.download else
               f"data.download is false. To get them, set data.download=true on a machine with a network "
               f"(torchvision then downloads them into {Path(cfg.root).expanduser().resolve()})")
        raise DatasetNotFoundError.for_files(
            label, folder, expected,
            f"{get}, or point data.root=... at a folder that holds {relative.as_posix()}/ with these files.",
        ) from error


def _reason(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f" ({type(error).__name__}: {lines[0]})" if lines else f" ({type(error).__name__})"
