"""Lightning datamodules for every dataset name in ``DATASET_NAMES`` (``vit.data.factory`` picks one).

Three kinds share one base class (loaders, sizes, checks):

* ``ArrayDataModule`` (mnist5k, mnist, fashion_mnist, cifar10, cifar100, cifar2): the whole
  dataset as uint8 tensors in memory, batched and augmented with tensor ops
  (see ``vit.data.arrays``).
* ``ImageFolderDataModule`` (imagefolder): JPEG/PNG/... files decoded in DataLoader workers
  (see ``vit.data.folder``).
* ``ShardDataModule`` (shards): any of the above converted to litdata shards, streamed from
  disk or object storage (see ``vit.data.streaming`` and ``vit.data.shards``).

Every module knows ``num_classes``, ``in_chans``, ``img_size``, ``mean`` and ``std`` right after
construction, so a model can be built before ``setup``; ``mean`` and ``std`` are ``data.mean`` and
``data.std`` when those are set (e.g. to the statistics pretrained weights expect), else the
dataset's; ``class_names`` may read the dataset;
``num_train_samples`` and the loaders need ``setup``. Batches are (images float32 normalised
(B, C, H, W), labels int64 (B,)).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import lightning as L
from torch.utils.data import DataLoader, Dataset

from vit.data.arrays import BatchTransform, TensorImageDataset, passthrough_collate, train_val_indices
from vit.data.config import DataConfig
from vit.data.embedded import load_mnist5k
from vit.data.errors import DataError, DatasetNotFoundError
from vit.data.folder import (DEFAULT_CROP_PCT, DEFAULT_INTERPOLATION, IMG_EXTENSIONS, WHOLE_IMAGE_RESIZE,
                             ImageFileDataset, augment_policy, check_images, eval_transform, find_classes,
                             list_samples, some_of, train_transform)
from vit.data.sources import ArraySplits, load_cifar, load_mnist_family

log = logging.getLogger(__name__)

MNIST_STATS = ((0.1307,), (0.3081,))
FASHION_MNIST_STATS = ((0.2860,), (0.3530,))
CIFAR10_STATS = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
CIFAR100_STATS = ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
IMAGEFOLDER_DEFAULT_SIZE = 224


class VisionDataModule(L.LightningDataModule):
    """What both kinds share: the config, the three splits and their DataLoaders."""

    num_classes: int
    in_chans: int
    img_size: tuple[int, int]

    collate_fn: Optional[Callable[[Any], Any]] = None  # None: DataLoader's default_collate

    # The split test_dataloader() serves: "test", or "val" for an image folder without test/,
    # whose test metrics are then validation metrics.
    test_split: str = "test"

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__()
        self.cfg = cfg
        # The dataset's own statistics, set by each subclass; data.mean / data.std replace them.
        self._dataset_stats: dict[str, tuple[float, ...]] = {}
        # Files of the dataset left out (image folders only): unreadable images, with
        # bad_image_policy=skip, and files that are not images of a supported type.
        self.skipped_files: list[str] = []
        # Folders not entered because a symbolic link led back to one already listed.
        self.skipped_dirs: list[str] = []
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def eval_resize(self) -> dict[str, Any]:
        """How an image of another size becomes the model's input at evaluation: ``interpolation``
        and ``crop_pct`` (short side to size / crop_pct, centre crop; vit.data.folder.resize_and_crop).
        Stored with the model, so that prediction on files sees them as the test set was seen.
        Here the test images already have the model's size: a file is resized whole, no margin."""
        return dict(WHOLE_IMAGE_RESIZE)

    # Read when the transforms are made (in setup), so a config changed between construction and
    # setup (vit.finetune.follow_weights fills data.mean from pretrained weights) is the one used.
    @property
    def mean(self) -> tuple[float, ...]:
        """Per-channel mean of pixels in [0, 1] that images are normalised with: data.mean, else the dataset's."""
        return self._stats("mean")

    @mean.setter
    def mean(self, value: tuple[float, ...]) -> None:
        self._dataset_stats["mean"] = tuple(value)

    @property
    def std(self) -> tuple[float, ...]:
        """Per-channel standard deviation that images are divided by: data.std, else the dataset's."""
        return self._stats("std")

    @std.setter
    def std(self, value: tuple[float, ...]) -> None:
        self._dataset_stats["std"] = tuple(value)

    def _stats(self, key: str) -> tuple[float, ...]:
        configured = getattr(self.cfg, key)
        if configured is None:
            return self._dataset_stats[key]
        if len(configured) != self.in_chans:
            raise ValueError(f"data.{key}={list(configured)} has {len(configured)} value(s), but {self.cfg.name!r} "
                             f"has {self.in_chans}-channel images; give one value per channel")
        return tuple(configured)

    @property
    def num_train_samples(self) -> int:
        return len(self._split("train"))  # type: ignore[arg-type]

    def train_dataloader(self) -> DataLoader:
        return self._loader(self._split("train"), self.cfg.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self._split("val"), self._eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self._split("test"), self._eval_batch_size, shuffle=False)

    @property
    def _eval_batch_size(self) -> int:
        return self.cfg.eval_batch_size or self.cfg.batch_size

    def _split(self, name: str) -> Dataset:
        dataset = getattr(self, f"{name}_set")
        if dataset is None:
            raise RuntimeError(f"the {name} split of {self.cfg.name} is not loaded yet: call setup() first")
        return dataset

    def _loader(self, dataset: Dataset, batch_size: int, shuffle: bool) -> DataLoader:
        cfg = self.cfg
        extra: dict[str, Any] = {}
        if cfg.num_workers > 0:  # DataLoader rejects these two without workers
            extra["persistent_workers"] = cfg.persistent_workers
            if cfg.prefetch_factor is not None:
                extra["prefetch_factor"] = cfg.prefetch_factor
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=False,
                          num_workers=cfg.num_workers, pin_memory=cfg.pin_memory, collate_fn=self.collate_fn,
                          **extra)

    def _check_batch_size(self) -> None:
        n = len(self._split("train"))  # type: ignore[arg-type]
        if self.cfg.batch_size > n:
            raise ValueError(f"data.batch_size={self.cfg.batch_size} is larger than the training set of "
                             f"{self.cfg.name}, which has {n} samples")


@dataclass(frozen=True)
class ArrayDatasetSpec:
    """What is known about an in-memory dataset before reading it."""

    load: Callable[[DataConfig], ArraySplits]
    in_chans: int
    native_size: int
    num_classes: int  # cifar2: with the default classes (cat, dog)
    stats: tuple[tuple[float, ...], tuple[float, ...]]  # per-channel (mean, std) of pixels in [0, 1]
    crop_padding: int  # train-time random crop out of the image padded by this much
    flip: bool  # train-time horizontal flips (not for digits: a flipped 2 or 7 is not a digit)


ARRAY_DATASETS: dict[str, ArrayDatasetSpec] = {
    "mnist5k": ArrayDatasetSpec(load_mnist5k, 1, 28, 10, MNIST_STATS, crop_padding=2, flip=False),
    "mnist": ArrayDatasetSpec(load_mnist_family, 1, 28, 10, MNIST_STATS, crop_padding=2, flip=False),
    "fashion_mnist": ArrayDatasetSpec(load_mnist_family, 1, 28, 10, FASHION_MNIST_STATS, crop_padding=2, flip=True),
    "cifar10": ArrayDatasetSpec(load_cifar, 3, 32, 10, CIFAR10_STATS, crop_padding=4, flip=True),
    "cifar100": ArrayDatasetSpec(load_cifar, 3, 32, 100, CIFAR100_STATS, crop_padding=4, flip=True),
    "cifar2": ArrayDatasetSpec(load_cifar, 3, 32, 2, CIFAR10_STATS, crop_padding=4, flip=True),
}


class ArrayDataModule(VisionDataModule):
    """An in-memory dataset: uint8 tensors, batched by ``TensorImageDataset.__getitems__``.

    Splits: the dataset's own test split; validation is ``val_fraction`` of its training split
    (seeded by ``split_seed``) unless the dataset has a validation split (mnist5k).
    """

    collate_fn = staticmethod(passthrough_collate)

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.spec = ARRAY_DATASETS[cfg.name]
        side = cfg.img_size or self.spec.native_size
        self.in_chans = self.spec.in_chans
        self.img_size = (side, side)
        self.mean, self.std = self.spec.stats
        # data.classes is only allowed for cifar2, where it picks the classes (default: cat, dog)
        self.num_classes = len(cfg.classes) if cfg.classes else self.spec.num_classes
        self._arrays: Optional[ArraySplits] = None
        self._class_names: Optional[list[str]] = None

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            self._class_names = self._load().class_names
        return self._class_names

    def prepare_data(self) -> None:
        """Download the files if needed (and allowed); raises DatasetNotFoundError if missing."""
        self._load()

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return  # all splits are built at once, on the first call
        data = self._load()
        images, labels = data.train
        cfg = self.cfg
        train_idx, val_idx = train_val_indices(len(labels), None if data.val is not None else cfg.val_fraction,
                                               cfg.max_train_samples, cfg.split_seed)
        val = data.val if data.val is not None else (images[val_idx], labels[val_idx])
        eval_tf = BatchTransform(self.mean, self.std, out_size=cfg.img_size)
        train_tf = BatchTransform(self.mean, self.std, out_size=cfg.img_size,
                                  crop_padding=self.spec.crop_padding if cfg.augment else 0,
                                  flip=self.spec.flip and cfg.augment, policy=augment_policy(cfg))
        self.train_set = TensorImageDataset(images[train_idx], labels[train_idx], train_tf)
        self.val_set = TensorImageDataset(*val, eval_tf)
        self.test_set = TensorImageDataset(*data.test, eval_tf)
        self._class_names = data.class_names
        self._arrays = None  # the splits above hold what is needed
        self._check_batch_size()

    def _load(self) -> ArraySplits:
        if self._arrays is None:
            self._arrays = self.spec.load(self.cfg)
        return self._arrays


class ImageFolderDataModule(VisionDataModule):
    """Images in ``PATH/train/<class>/``, ``PATH/val/<class>/`` and optionally ``PATH/test/<class>/``.

    PATH is data.path, or data.root when data.path is None. Without test/ the test split is
    val/ (``test_split`` says which, and the log says so); without val/, validation is
    ``val_fraction`` of train/ (seeded by ``split_seed``). Unreadable files are found in
    ``setup`` (see ``vit.data.folder``) and, with bad_image_policy=skip, left out and listed in
    ``skipped_files``, as are files that are not images of a supported type (whatever the
    policy: they are not images to fail on).
    """

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        self.folder = Path(cfg.path or cfg.root).expanduser()
        side = cfg.img_size or IMAGEFOLDER_DEFAULT_SIZE
        self.in_chans = 3
        self.img_size = (side, side)
        self.mean, self.std = IMAGENET_STATS
        self._class_names: Optional[list[str]] = None

    @property
    def eval_resize(self) -> dict[str, Any]:
        """data.interpolation and data.crop_pct (filled from pretrained weights where null), else the defaults."""
        return {"interpolation": self.cfg.interpolation or DEFAULT_INTERPOLATION,
                "crop_pct": self.cfg.crop_pct or DEFAULT_CROP_PCT}

    @property
    def class_names(self) -> list[str]:
        if self._class_names is None:
            train_dir = self.folder / "train"
            if not train_dir.is_dir():
                raise DatasetNotFoundError.for_files(
                    "Image folder dataset", self.folder, ["train/", "val/"],
                    "Point data.path=... at a folder holding train/<class>/<images>, val/<class>/<images> "
                    "and optionally test/<class>/<images>.")
            self._class_names = find_classes(train_dir)
        return self._class_names

    @property
    def num_classes(self) -> int:  # type: ignore[override]
        return len(self.class_names)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.train_set is not None:
            return
        cfg = self.cfg
        samples = {}
        not_images: list[str] = []
        for split in ("train", "val", "test"):
            split_dir = self.folder / split
            if split == "train" or split_dir.is_dir():
                listing = list_samples(split_dir, self.class_names)
                not_images.extend(listing.not_images)
                self.skipped_dirs.extend(listing.repeated_dirs)
                samples[split] = self._readable(split_dir, listing.samples)
        unreadable = list(self.skipped_files)
        self.skipped_files.extend(not_images)
        self._log_skipped(unreadable, not_images)
        if "test" not in samples:
            self.test_split = "val"
            log.warning("%s has no test/ folder: testing uses the validation split (%s), so test metrics "
                        "are validation metrics", self.folder, "val/" if "val" in samples else "carved from train/")
        train = samples["train"]
        train_idx, val_idx = train_val_indices(len(train), None if "val" in samples else cfg.val_fraction,
                                               cfg.max_train_samples, cfg.split_seed)
        val = samples["val"] if "val" in samples else [train[i] for i in val_idx]
        side = self.img_size[0]
        interpolation, crop_pct = self.eval_resize["interpolation"], self.eval_resize["crop_pct"]
        eval_tf = eval_transform(side, self.mean, self.std, interpolation, crop_pct)
        train_tf = train_transform(side, self.mean, self.std, augment_policy(cfg), interpolation) if cfg.augment \
            else eval_tf
        self.train_set = ImageFileDataset([train[i] for i in train_idx], train_tf, side)
        self.val_set = ImageFileDataset(val, eval_tf, side)
        self.test_set = ImageFileDataset(samples["test"], eval_tf, side) if "test" in samples else self.val_set
        self._check_batch_size()

    def _readable(self, split_dir: Path, samples: list[tuple[str, int]]) -> list[tuple[str, int]]:
        good, bad = check_images(samples, self.cfg.bad_image_policy)
        self.skipped_files.extend(bad)
        left = {label for _, label in good}
        for label, name in enumerate(self.class_names):
            if label not in left:
                raise DataError(f"class folder {split_dir / name} holds no readable images")
        return good

    def _log_skipped(self, unreadable: list[str], not_images: list[str]) -> None:
        if unreadable:
            log.warning("skipped %d unreadable image(s) (data.bad_image_policy=skip): %s",
                        len(unreadable), some_of(unreadable))
        if not_images:
            log.warning("skipped %d file(s) that are not images of a supported type (%s): %s",
                        len(not_images), " ".join(IMG_EXTENSIONS), some_of(not_images))
        if self.skipped_dirs:
            log.warning("skipped %d folder(s) reached again through a symbolic link (a link loop, or two links "
                        "to one folder); each real folder is listed once: %s",
                        len(self.skipped_dirs), some_of(self.skipped_dirs))
