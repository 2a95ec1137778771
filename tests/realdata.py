"""Where the tests' real datasets are, and how to get them on a machine that has none.

The tests read real data: MNIST, Fashion-MNIST, a 10,000-image CIFAR-10 training subset and the
ants-vs-bees image folder, all in one folder (``VIT_TEST_DATA``, by default ``../shared/datasets``
beside the repository). On a fresh machine without it, :func:`ensure_datasets` fetches them once
into a cache with torchvision's downloaders; offline, it says at once what is missing and where to
put it, instead of letting every test that needs data fail on its own.
"""
from __future__ import annotations

import os
import socket
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

# Each entry, relative to the datasets folder, and what it is.
REQUIRED = {
    "MNIST/raw": "the four MNIST IDX files",
    "FashionMNIST/raw": "the four Fashion-MNIST IDX files",
    "cifar10_jpeg_subset.npz": "x_train/y_train (1,000 CIFAR-10 images per class), x_test/y_test, classes",
    "hymenoptera_data/train": "the ants-vs-bees folder (hymenoptera_data/{train,val}/{ants,bees})",
}
HYMENOPTERA_URL = "https://download.pytorch.org/tutorial/hymenoptera_data.zip"
CONNECT_TIMEOUT_S = 10


def configured_dir() -> Path:
    return Path(os.environ.get("VIT_TEST_DATA", REPO.parent / "shared" / "datasets")).resolve()


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "vit" / "test-datasets"


def missing(root: Path) -> list[str]:
    return [entry for entry in REQUIRED if not (root / entry).exists()]


def ensure_datasets() -> tuple[Path, str | None]:
    """The folder holding every dataset, and a note when it was fetched now.

    Raises RuntimeError with one readable message when they are not there and cannot be fetched.
    """
    root = configured_dir()
    if not missing(root):
        return root, None
    # An explicitly named folder is filled in place; otherwise a per-user cache that later runs reuse.
    target = root if "VIT_TEST_DATA" in os.environ else cache_dir()
    if not missing(target):
        return target, None
    try:
        _check_network()
        fetch(target)
    except (OSError, RuntimeError) as error:
        raise RuntimeError(
            f"the tests need real datasets and none were found at {root}, and fetching them failed "
            f"({type(error).__name__}: {error}). Set VIT_TEST_DATA to a folder holding: "
            + "; ".join(f"{entry} ({what})" for entry, what in REQUIRED.items())) from None
    return target, f"fetched the test datasets into {target}"


def _check_network() -> None:
    """Fail in seconds, not minutes of retries, when the download servers cannot be reached."""
    request = urllib.request.Request(HYMENOPTERA_URL, method="HEAD")
    with urllib.request.urlopen(request, timeout=CONNECT_TIMEOUT_S):
        pass


def fetch(root: Path) -> None:
    """Download what is missing into ``root`` in the layout the tests read."""
    import torchvision
    from torchvision.datasets.utils import download_and_extract_archive

    root.mkdir(parents=True, exist_ok=True)
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        for name, dataset in (("MNIST", torchvision.datasets.MNIST),
                              ("FashionMNIST", torchvision.datasets.FashionMNIST)):
            if not (root / name / "raw").exists():
                for train in (True, False):
                    dataset(root=str(root), train=train, download=True)
        if not (root / "cifar10_jpeg_subset.npz").exists():
            write_cifar10_subset(root)
        if not (root / "hymenoptera_data" / "train").exists():
            download_and_extract_archive(HYMENOPTERA_URL, download_root=str(root))
    finally:
        socket.setdefaulttimeout(previous)


def write_cifar10_subset(root: Path, per_class: int = 1000) -> None:
    """The shared subset's layout from torchvision's CIFAR-10: the first ``per_class`` training
    images of each class in the original order, and the whole test set. (The shared copy was
    stored as JPEG and is slightly lossy; these are the lossless originals.)"""
    import torchvision

    train = torchvision.datasets.CIFAR10(root=str(root / "cifar10"), train=True, download=True)
    test = torchvision.datasets.CIFAR10(root=str(root / "cifar10"), train=False, download=True)
    labels = np.asarray(train.targets)
    keep = np.sort(np.concatenate([np.flatnonzero(labels == c)[:per_class] for c in range(10)]))
    np.savez(root / "cifar10_jpeg_subset.npz", x_train=train.data[keep], y_train=labels[keep].astype(np.int64),
             x_test=test.data, y_test=np.asarray(test.targets, dtype=np.int64), classes=np.array(train.classes))
