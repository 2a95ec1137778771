"""Loaders that read a dataset's files into ``ArraySplits``: uint8 (N, C, H, W) tensors.

torchvision's dataset classes are used only to find, download and parse the files; their
``.data`` / ``.targets`` arrays are taken whole, never item by item. Missing files become a
``DatasetNotFoundError`` that says where they were looked for and how to get them; files that
are there but damaged (a truncated IDX file, an .npz that is not one) become a ``DataError``
naming the file, checked before torchvision or numpy parse them, whose own errors would only
say that a reshape failed.
"""
from __future__ import annotations

import math
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torchvision
from torch import Tensor

from vit.data.arrays import select_classes
from vit.data.config import DataConfig
from vit.data.errors import DataError, DatasetNotFoundError

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
        _check_mnist_files(folder, "train" if train else "t10k")
        ds = _open_torchvision(dataset_cls, cfg, train, folder, expected)
        splits.append((ds.data.unsqueeze(1).contiguous(), ds.targets.long()))
    return ArraySplits(train=splits[0], test=splits[1], class_names=list(dataset_cls.classes))


# The IDX format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code, the number of
# dimensions, then each dimension as a big-endian uint32, then the values. Type codes torchvision reads:
_IDX_TYPES = {0x08: np.dtype("u1"), 0x09: np.dtype("i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
_REFETCH = ("Delete it and run again with data.download=true to fetch a fresh copy, or copy an intact file "
            "in its place.")


def idx_dims(path: Path) -> tuple[int, ...]:
    """The dimensions an IDX file declares in its header, after checking that the file's size
    matches them; raises DataError naming the file and both sizes otherwise."""
    size = path.stat().st_size
    with path.open("rb") as file:
        magic = file.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in _IDX_TYPES or not 1 <= magic[3] <= 3:
            raise DataError(f"{path} is not an IDX file: its first bytes are {magic.hex() or 'missing'} "
                            f"({size:,} bytes in all); an IDX file starts with 0000, a type code and the "
                            f"number of dimensions. {_REFETCH}")
        ndim = magic[3]
        header = file.read(4 * ndim)
    if len(header) < 4 * ndim:
        raise DataError(f"{path} is truncated: {size:,} bytes, too short for the header of an IDX file with "
                        f"{ndim} dimensions. {_REFETCH}")
    dims = struct.unpack(f">{ndim}I", header)
    itemsize = _IDX_TYPES[magic[2]].itemsize
    expected = 4 + 4 * ndim + math.prod(dims) * itemsize
    if size != expected:
        what = "truncated" if size < expected else "longer than its header says"
        raise DataError(f"{path} is {what}: {size:,} bytes, expected {expected:,} (a {4 + 4 * ndim}-byte header "
                        f"and {' x '.join(map(str, dims))} values of {itemsize} byte(s)). {_REFETCH}")
    return dims


def _check_mnist_files(folder: Path, prefix: str) -> None:
    """Check one split's IDX files (those that exist; missing ones are reported by the loader):
    sizes match their headers, 28x28 images, as many labels as images."""
    images, labels = folder / f"{prefix}-images-idx3-ubyte", folder / f"{prefix}-labels-idx1-ubyte"
    if not (images.is_file() and labels.is_file()):
        return
    image_dims, label_dims = idx_dims(images), idx_dims(labels)
    if len(image_dims) != 3 or image_dims[1:] != (28, 28):
        raise DataError(f"{images} holds an array of shape {image_dims}; expected N x 28 x 28 images")
    if label_dims != image_dims[:1]:
        raise DataError(f"{labels} holds labels of shape {label_dims} for the {image_dims[0]:,} images of "
                        f"{images}; expected ({image_dims[0]},)")


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
    arrays = read_npz(path, ["x_train", "y_train", "x_test", "y_test"], optional=["classes"])
    splits = [_npz_split(path, arrays[f"x_{part}"], arrays[f"y_{part}"], num_classes) for part in ("train", "test")]
    names = [str(n) for n in arrays["classes"]] if "classes" in arrays else default_names
    if len(names) != num_classes:
        raise DataError(f"{path}: 'classes' holds {len(names)} names, {label} has {num_classes} classes")
    return ArraySplits(train=splits[0], test=splits[1], class_names=names)


_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive with members, an empty one
_NPY_SIGNATURE = b"\x93NUMPY"


def read_npz(path: Path, required: Sequence[str], optional: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """The named arrays of an .npz file, read without pickle.

    Raises DataError naming the file when it is not an .npz archive (a single .npy array, a
    pickle, text, a truncated download), when a required array is missing, or when an array
    holds Python objects, which numpy can only read by unpickling: a pickle can run any code,
    so such files are refused rather than opened with ``allow_pickle=True``.
    """
    with path.open("rb") as file:
        start = file.read(6)
    if start == _NPY_SIGNATURE:
        raise DataError(f"{path} holds a single .npy array, not an .npz archive of named arrays; save it with "
                        f"numpy.savez(path, {', '.join(f'{k}=...' for k in required)})")
    if start[:4] not in _ZIP_SIGNATURES:
        raise DataError(f"{path} is not an .npz file (a zip archive written by numpy.savez): it starts with "
                        f"{start!r}")
    try:
        with np.load(path, allow_pickle=False) as archive:
            missing = [key for key in required if key not in archive.files]
            if missing:
                raise DataError(f"{path} lacks the arrays {missing}; it holds {archive.files}")
            return {key: _npz_member(path, archive, key) for key in [*required, *optional] if key in archive.files}
    except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as error:
        raise DataError(f"{path} is truncated or damaged ({type(error).__name__}: {error}); "
                        f"write or copy it again") from error


def _npz_member(path: Path, archive: "np.lib.npyio.NpzFile", key: str) -> np.ndarray:
    try:
        return archive[key]
    except ValueError as error:
        if "allow_pickle" in str(error):
            raise DataError(f"{path}: array {key!r} holds Python objects, which numpy reads only by unpickling, "
                            f"and a pickle can run code, so it is refused. Save it as numbers or strings, "
                            f"e.g. numpy.asarray(values, dtype=str) for class names") from None
        raise DataError(f"{path}: cannot read array {key!r}: {error}") from error


def _npz_split(path: Path, images: np.ndarray, labels: np.ndarray, num_classes: int) -> tuple[Tensor, Tensor]:
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise DataError(f"{path}: images must be uint8 N x H x W x C with C in (1, 3), "
                         f"got {images.dtype} {images.shape}")
    if labels.shape != images.shape[:1] or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: labels must be integers of shape ({images.shape[0]},), "
                         f"got {labels.dtype} {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise DataError(f"{path}: labels must lie in [0, {num_classes}), got [{labels.min()}, {labels.max()}]")
    return (torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(),
            torch.from_numpy(labels.astype(np.int64)))


def _open_torchvision(dataset_cls: type, cfg: DataConfig, train: bool, folder: Path, expected: list[str]):
    """Instantiate a torchvision dataset, turning missing files into a DatasetNotFoundError and
    files it cannot read (torchvision checks CIFAR's checksums) into a DataError."""
    label = {"FashionMNIST": "Fashion-MNIST", "CIFAR10": "CIFAR-10", "CIFAR100": "CIFAR-100"}.get(
        dataset_cls.__name__, dataset_cls.__name__)
    try:
        return dataset_cls(cfg.root, train=train, download=cfg.download)
    except (RuntimeError, OSError) as error:  # urllib's URLError is an OSError
        if all((folder / name).is_file() for name in expected):  # there, so damaged rather than missing
            raise DataError(f"{label}: the files in {folder.expanduser().resolve()} are all there but torchvision "
                            f"cannot read them{_reason(error)}; one of them is damaged. Delete the folder and run "
                            f"again with data.download=true, or copy intact files there.") from error
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
