"""``data=shards``: train from shards streamed by litdata (format: ``vit.data.shard_format``;
writer: ``vit.data.shards``).

The training process never holds the dataset: litdata's ``StreamingDataset`` hands each
DataLoader worker its share of the chunks (memory-mapped in place on local disk, downloaded into
``data.cache_dir`` from object storage and evicted from there), and ``ShardCollate`` decodes the
samples of a batch and stacks them into uint8 (B, C, H, W) for ``BatchTransform``, the crop, flip
and normalisation of the in-memory datasets.

Order: chunks are permuted and the samples inside each chunk too, with a generator seeded by
(``data.shuffle_seed``, epoch), so the order is reproducible and differs every epoch; the
converter wrote the training split in random order, so every chunk is a random draw. Chunks (or
ranges of them) are dealt to the (rank, worker) pairs so that each sample goes to exactly one.

Equal batches: for training, litdata's ``drop_last`` gives every rank the same number of full
batches per epoch (world_size and rank come from torch.distributed or WORLD_SIZE / GLOBAL_RANK).
A rank with one batch more than the others would hang in the gradient all-reduce of that extra
step; the price is that fewer than world_size x batch_size samples, different ones each epoch,
sit out an epoch. Evaluation loaders keep every sample, unshuffled.

Resuming mid-epoch: ``StreamingDataLoader`` knows how many batches it delivered;
``ShardDataModule.state_dict`` returns that state, Lightning stores it in the checkpoint and hands
it back through ``load_state_dict`` before asking for the training loader, which then continues
with the samples not yet seen.
"""
from __future__ import annotations

import json
import logging
import tempfile
from io import BytesIO
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np
import torch
from litdata import StreamingDataLoader, StreamingDataset
from litdata.streaming import item_loader as litdata_item_loader
from litdata.streaming import shuffle as litdata_shuffle
from PIL import Image
from torch import Tensor

from vit.data.arrays import BatchTransform
from vit.data.config import DataConfig
from vit.data.datamodules import VisionDataModule
from vit.data.errors import DatasetNotFoundError
from vit.data.folder import augment_policy
from vit.data.shard_format import INDEX_FILE, META_FILE, SPLITS, ShardMeta, check_index, check_name

Sample = dict[str, Any]  # {"id": int, "label": int, "image": uint8 (C, H, W) array or JPEG bytes}

# litdata logs a few INFO lines (cache budget, read mode) for every dataset it opens, i.e. several
# per epoch; a run's log at INFO level (Hydra's default) drowns in them. Unless configured already.
if logging.getLogger("litdata").level == logging.NOTSET:
    logging.getLogger("litdata").setLevel(logging.WARNING)


def is_remote(source: str) -> bool:
    """Whether ``source`` is a URL litdata downloads from (s3://, gs://, azure://, ...; ``local:``
    is litdata's way of treating a local folder as remote, with a cache)."""
    return "://" in source or source.startswith("local:")


def split_location(source: str, split: str) -> str:
    """The folder or URL of one split of the shards at ``source``."""
    if is_remote(source):
        return f"{source.rstrip('/')}/{split}"
    return str(Path(source).expanduser().resolve() / split)


def read_meta(source: str) -> ShardMeta:
    """Read and check ``meta.json`` of the shards at ``source`` (a folder or an object-store URL)."""
    where = f"{source.rstrip('/')}/{META_FILE}"
    if not is_remote(source):
        folder = Path(source).expanduser()
        if not (folder / META_FILE).is_file():
            raise DatasetNotFoundError.for_files(
                "Shards", folder, [META_FILE, *(f"{split}/" for split in SPLITS)],
                "Write them with `python -m vit.data.shards data=NAME [data.root=...] out=DIR` and point "
                "data.path=DIR at that folder (a missing meta.json also means an unfinished conversion).")
        return ShardMeta.from_json((folder / META_FILE).read_text(), where)
    from litdata.streaming.downloader import get_downloader

    with tempfile.TemporaryDirectory() as scratch:  # read once, keep nothing
        local = str(Path(scratch) / META_FILE)
        try:
            get_downloader(source, scratch, []).download_file(where, local)
            text = Path(local).read_text()
        except Exception as error:  # each store's client raises its own types
            raise DatasetNotFoundError(f"Shards not found: cannot read {where} ({type(error).__name__}: {error}). "
                                       f"Point data.path=... at the folder written by `python -m vit.data.shards`."
                                       ) from error
    return ShardMeta.from_json(text, where)


class ShardCollate:
    """litdata samples -> (images float32 (B, C, S, S) normalised, labels int64 (B,)), plus the
    sample ids int64 (B,) when ``with_ids``. Runs in the DataLoader workers."""

    def __init__(self, transform: BatchTransform, encoding: str, with_ids: bool = False) -> None:
        self.transform = transform
        self.encoding = encoding
        self.with_ids = with_ids

    def __call__(self, samples: list[Sample]) -> tuple[Tensor, ...]:
        if self.encoding == "jpeg":
            images = np.stack([_decode_jpeg(s["image"]) for s in samples])
        else:
            images = np.stack([s["image"] for s in samples])
        batch = (self.transform(torch.from_numpy(images)), torch.tensor([s["label"] for s in samples]))
        if self.with_ids:
            batch += (torch.tensor([s["id"] for s in samples]),)
        return batch


def _decode_jpeg(data: bytes) -> np.ndarray:
    with Image.open(BytesIO(data)) as image:
        return np.asarray(image.convert("RGB")).transpose(2, 0, 1)  # (H, W, 3) -> (3, H, W)


class ShardLoader(StreamingDataLoader):
    """litdata's loader, with two repairs.

    * Its state holds plain Python values only: litdata leaves numpy integers in it (e.g. when
      ``max_train_samples`` subsamples), which ``torch.load(weights_only=True)`` refuses, and
      Lightning stores this state in every checkpoint.
    * Each finished epoch's chunk readers are let go (see ``_forget_litdata_memos``); without
      that, a loader without workers maps a few more chunks into the process every epoch.
    """

    def __iter__(self) -> Iterator[Any]:
        try:
            yield from super().__iter__()
        finally:
            _forget_litdata_memos()

    def state_dict(self) -> dict[str, Any]:
        return _plain(super().state_dict())


def _forget_litdata_memos() -> None:
    """Clear the ``functools.lru_cache`` memos on litdata's shuffler and item-loader methods.

    A memoised method keeps its ``self`` alive: up to ten past epochs' shufflers, and through them
    their readers with every chunk they had memory-mapped (measured: +45 MB of RSS per epoch of
    MNIST read in the training process). The memos only save recomputing an epoch's chunk plan.
    """
    for module in (litdata_shuffle, litdata_item_loader):
        for cls in vars(module).values():
            if isinstance(cls, type) and cls.__module__ == module.__name__:
                for attribute in vars(cls).values():
                    clear = getattr(attribute, "cache_clear", None)
                    if callable(clear):
                        clear()


def _plain(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(item) for item in value)
    return value


class ShardDataModule(VisionDataModule):
    """Shards at ``data.path`` (a folder or an object-store URL), streamed.

    Everything but the samples comes from ``meta.json``, read at construction. ``data.img_size``
    resizes batches when it differs from the stored size; ``data.max_train_samples`` streams a
    seeded subset of the training split. Loaders are ``ShardLoader`` objects (litdata's
    ``StreamingDataLoader``); their workers start afresh each epoch (``data.persistent_workers`` is
    not used), so that the litdata memos that ``_forget_litdata_memos`` clears in this process, and
    the chunk maps they hold, cannot pile up in long-lived workers.
    """

    def __init__(self, cfg: DataConfig) -> None:
        super().__init__(cfg)
        assert cfg.path is not None  # resolve_config requires it for shards
        self.source = cfg.path
        self.meta = read_meta(cfg.path)
        side = cfg.img_size or self.meta.image_size
        self.in_chans = self.meta.in_chans
        self.img_size = (side, side)
        self.mean, self.std = tuple(self.meta.mean), tuple(self.meta.std)
        self.num_classes = len(self.meta.class_names)
        # seed_everything(seed) has set torch's initial seed by the time a run builds this module.
        self.shuffle_seed = cfg.shuffle_seed if cfg.shuffle_seed is not None else torch.initial_seed() % 2**32
        self._train_loader: Optional[ShardLoader] = None
        self._train_state: Optional[dict[str, Any]] = None  # from a checkpoint, for the next training loader

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.class_names)

    @property
    def num_train_samples(self) -> int:
        n = self.meta.splits["train"]
        return min(n, self.cfg.max_train_samples or n)

    def setup(self, stage: Optional[str] = None) -> None:
        if self.cfg.batch_size > self.num_train_samples:
            raise ValueError(f"data.batch_size={self.cfg.batch_size} is larger than the training split of the "
                             f"shards at {self.source}, which has {self.num_train_samples} samples")

    def train_dataloader(self) -> ShardLoader:
        return self.loader("train")

    def val_dataloader(self) -> ShardLoader:
        return self.loader("val")

    def test_dataloader(self) -> ShardLoader:
        return self.loader("test")

    def loader(self, split: str, *, with_ids: bool = False) -> ShardLoader:
        """A fresh loader over ``split``; batches are (images, labels), plus sample ids when ``with_ids``.

        A training loader picks up the state given to ``load_state_dict``, and its state is what
        ``state_dict`` returns from then on.
        """
        train = split == "train"
        cfg = self.cfg
        extra: dict[str, Any] = {}
        if cfg.num_workers > 0 and cfg.prefetch_factor is not None:
            extra["prefetch_factor"] = cfg.prefetch_factor
        loader = ShardLoader(
            self._dataset(split), batch_size=cfg.batch_size if train else self._eval_batch_size,
            num_workers=cfg.num_workers, pin_memory=cfg.pin_memory,
            collate_fn=ShardCollate(self._transform(train), self.meta.encoding, with_ids), **extra)
        if train:
            if self._train_state is not None:
                loader.load_state_dict(self._train_state)
                self._train_state = None
            self._train_loader = loader
        return loader

    def state_dict(self) -> dict[str, Any]:
        """The training loader's position (epoch, samples delivered, next worker), once it has started.

        Plain ints, strings and lists: a checkpoint holding it loads with ``weights_only=True``.
        """
        if self._train_loader is None or self._train_loader.current_epoch == 0:
            return {}
        return {"train_loader": self._train_loader.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Make the next training loader continue where the one that gave ``state_dict`` stopped.

        (Lightning's fit loop also hands a stateful training loader its checkpointed state; it is
        the same state, and loading it twice is harmless.)
        """
        self._train_state = state_dict.get("train_loader")

    def _dataset(self, split: str) -> StreamingDataset:
        train = split == "train"
        n = self.meta.splits[split]
        subsample = 1.0
        if train and self.num_train_samples < n:
            subsample = (self.num_train_samples + 0.5) / n  # litdata keeps int(n * subsample) samples
        dataset = StreamingDataset(
            split_location(self.source, split), cache_dir=self.cfg.cache_dir, shuffle=train, drop_last=train,
            seed=self.shuffle_seed, subsample=subsample,
            # A permutation of the whole chunk, not litdata's default of shuffled blocks of 256, and
            # samples decoded one by one: decoding windows of neighbours, litdata's default, decodes
            # each window again for almost every sample of a permuted chunk (40x the work).
            item_shuffle_window="full", batch_decode=0)
        # Constructing the dataset reads (and for object storage downloads into the cache) only
        # index.json; check it before anything reads, downloads or writes a chunk it names.
        where = f"{split_location(self.source, split)}/{INDEX_FILE}"
        count = check_index(json.loads((Path(dataset.input_dir.path) / INDEX_FILE).read_text()), where)
        for name in dataset.subsampled_files:
            check_name(name, where)
        if count != n:
            raise ValueError(f"{where} holds {count} samples but {META_FILE} says {n}: the shards are incomplete "
                             f"or mixed; convert again")
        return dataset

    def _transform(self, train: bool) -> BatchTransform:
        cfg, meta = self.cfg, self.meta
        if not (train and cfg.augment):
            return BatchTransform(self.mean, self.std, out_size=cfg.img_size)
        return BatchTransform(self.mean, self.std, out_size=cfg.img_size, crop_padding=meta.crop_padding,
                              flip=meta.flip, policy=augment_policy(cfg))
