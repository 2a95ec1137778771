"""Shards: any configured dataset written as litdata chunks, for ``data=shards`` to stream.

    python -m vit.data.shards data=mnist data.root=DIR out=SHARDS [chunk_bytes=16MB] [overwrite=true]

The arguments are Hydra overrides, composed as for ``train.py``: ``data=NAME`` picks
``conf/data/NAME.yaml`` and ``data.KEY=VALUE`` overrides apply. Every split of that dataset, as
its datamodule builds them (``val_fraction``, ``split_seed``, ``max_train_samples`` included), is
written under SHARDS in the layout of ``vit.data.shard_format``.

A sample is ``{"id": int, "label": int, "image": ...}``: ``id`` is its index in the source split;
``image`` is uint8 (C, H, W) at native size for in-memory datasets ("raw"), or, for image folders,
the evaluation view (short side resized to S / 0.875, centre crop S, S = ``data.img_size`` or 224)
as JPEG bytes ("jpeg"). The training split is written in a seeded random order (``split_seed``):
litdata shuffles chunk order and samples within a chunk, never across chunks, so every chunk
must already be a random draw (a class-sorted folder would otherwise give one-class batches).
``meta.json`` is written last: it marks a finished conversion.

Shards live on local disk or, once copied there (e.g. ``aws s3 sync SHARDS s3://bucket/x``), on
object storage that litdata reads (s3://, gs://, azure://).
"""
from __future__ import annotations

import dataclasses
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from io import BytesIO
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

import hydra
import numpy as np
import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import ConfigCompositionException, HydraException, MissingConfigException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor
from torchvision.transforms import v2
from tqdm import tqdm

from vit.conf_dir import conf_dir
from vit.data.config import DataConfig, resolve_config
from vit.data.datamodules import ArrayDataModule, ImageFolderDataModule, VisionDataModule
from vit.data.factory import build_datamodule
from vit.data.folder import load_rgb
from vit.data.shard_format import META_FILE, SPLITS, ShardMeta

DEFAULT_CHUNK_BYTES = "16MB"
JPEG_QUALITY = 95
USAGE = ("usage: python -m vit.data.shards data=NAME [data.KEY=VALUE ...] out=DIR "
         f"[chunk_bytes={DEFAULT_CHUNK_BYTES}] [overwrite=false]")


# -- sources: where a split's samples come from -------------------------------------------------------

class SplitSource(Protocol):
    """One split of a dataset, sample by sample: ``sample(i)`` -> (image, int label)."""

    threads: int  # worker threads worth using to produce samples (decoding files pays; arrays don't)

    def __len__(self) -> int: ...

    def sample(self, index: int) -> tuple[np.ndarray | bytes, int]: ...


class ArraySource:
    """A split in memory: images uint8 (N, C, H, W), labels (N,); samples are (C, H, W) arrays."""

    threads = 1

    def __init__(self, images: Tensor, labels: Tensor) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or labels.shape != images.shape[:1]:
            raise ValueError(f"expected uint8 images (N, C, H, W) and labels (N,), got {images.dtype} "
                             f"{tuple(images.shape)} and {tuple(labels.shape)}")
        self.images = images.numpy()
        self.labels = labels.long().numpy()

    def __len__(self) -> int:
        return len(self.labels)

    def sample(self, index: int) -> tuple[np.ndarray, int]:
        return self.images[index], int(self.labels[index])


class FolderSource:
    """Image files: each becomes its evaluation view at ``side`` x ``side`` (the geometry of
    ``vit.data.folder.eval_transform``), encoded as JPEG."""

    threads = 8  # PIL releases the GIL while decoding, resizing and encoding

    def __init__(self, samples: Sequence[tuple[str, int]], side: int) -> None:
        self.samples = list(samples)
        self.resize_to = int(side / 0.875)
        self.view = v2.Compose([v2.Resize(self.resize_to, antialias=True), v2.CenterCrop(side)])

    def __len__(self) -> int:
        return len(self.samples)

    def sample(self, index: int) -> tuple[bytes, int]:
        path, label = self.samples[index]
        try:
            image = self.view(load_rgb(path, self.resize_to))
        except Exception as error:  # PIL raises many types for a file that broke since setup
            raise ValueError(f"cannot read image {path}: {type(error).__name__}: {error}") from error
        encoded = BytesIO()
        image.save(encoded, format="JPEG", quality=JPEG_QUALITY)
        return encoded.getvalue(), label


def sources_of(dm: VisionDataModule) -> tuple[dict[str, SplitSource], dict[str, Any]]:
    """The three splits of a set-up datamodule and the ``ShardMeta`` facts other than ``splits``."""
    facts: dict[str, Any] = {"class_names": list(dm.class_names), "in_chans": dm.in_chans,
                             "mean": list(dm.mean), "std": list(dm.std)}
    sets = {split: dm._split(split) for split in SPLITS}
    if isinstance(dm, ArrayDataModule):
        sources: dict[str, SplitSource] = {split: ArraySource(s.images, s.labels) for split, s in sets.items()}
        facts.update(dataset=dm.cfg.name, image_size=dm.spec.native_size, encoding="raw",
                     crop_padding=dm.spec.crop_padding, flip=dm.spec.flip)
    elif isinstance(dm, ImageFolderDataModule):
        side = dm.img_size[0]
        sources = {split: FolderSource(s.samples, side) for split, s in sets.items()}
        # Photos get the batch crop+flip of CIFAR, scaled: pad by 1/8 of the side.
        facts.update(dataset=dm.cfg.name, image_size=side, encoding="jpeg", crop_padding=side // 8, flip=True)
    else:
        raise ValueError(f"cannot convert a {type(dm).__name__} to shards")
    return sources, facts


# -- writing ------------------------------------------------------------------------------------------

def convert(cfg: DataConfig | Mapping[str, Any], out: str | Path, *, chunk_bytes: str | int = DEFAULT_CHUNK_BYTES,
            overwrite: bool = False, progress: bool = True) -> ShardMeta:
    """Write every split of the dataset ``cfg`` describes as shards under ``out``."""
    data_cfg = resolve_config(cfg)
    if data_cfg.name == "shards":
        raise ValueError("data=shards is already sharded; convert the dataset it was made from")
    dm = build_datamodule(data_cfg, batch_size=1)  # read sample by sample: the batch size must not refuse a small set
    dm.prepare_data()
    dm.setup("fit")
    sources, facts = sources_of(dm)
    return write_shards(out, sources, facts, chunk_bytes=chunk_bytes, overwrite=overwrite, progress=progress,
                        seed=data_cfg.split_seed)


def write_shards(out: str | Path, sources: Mapping[str, SplitSource], facts: Mapping[str, Any], *,
                 chunk_bytes: str | int = DEFAULT_CHUNK_BYTES, overwrite: bool = False, progress: bool = True,
                 seed: int = 0) -> ShardMeta:
    """Write ``sources`` (one per split in ``SPLITS``) under ``out``, then ``meta.json``.

    The training split is written in the order of a permutation seeded by ``seed``; the others in
    source order. ``out`` must be empty or missing unless ``overwrite`` (which removes only
    meta.json and the split folders).
    """
    if set(sources) != set(SPLITS):
        raise ValueError(f"shards need the splits {SPLITS}, got {sorted(sources)}")
    out = Path(out)
    _clear_output(out, overwrite)
    counts = {}
    for split in SPLITS:
        source = sources[split]
        n = len(source)
        if split == "train":
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
        else:
            order = list(range(n))
        _write_split(source, order, out / split, chunk_bytes,
                     tqdm(total=n, desc=f"{split:>5}", unit="img", disable=not progress, file=sys.stderr))
        counts[split] = n
    meta = ShardMeta(**facts, splits=counts)
    (out / META_FILE).write_text(meta.to_json())
    return meta


def _clear_output(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(f"out={out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"out={out} is not empty; pass overwrite=true to replace the shards in it")
        (out / META_FILE).unlink(missing_ok=True)  # first, so that a half-replaced folder is not taken as finished
        for split in SPLITS:
            if (out / split).is_dir() and not (out / split).is_symlink():
                shutil.rmtree(out / split)
    out.mkdir(parents=True, exist_ok=True)


def _write_split(source: SplitSource, order: list[int], directory: Path, chunk_bytes: str | int, bar: tqdm) -> None:
    from litdata.streaming.writer import BinaryWriter  # the writer behind litdata.optimize, in-process

    # litdata's optimize() runs a pool of spawned processes with queues, about 1 ms per sample
    # (a minute for MNIST); writing in-process with threads for file decoding is ~50x faster.
    writer = BinaryWriter(str(directory), chunk_bytes=chunk_bytes)
    with bar, ThreadPoolExecutor(max_workers=source.threads) as pool:
        position = 0
        for block in _blocks(order, 256):  # bounded: never more than a block of decoded images in flight
            samples = pool.map(source.sample, block) if source.threads > 1 else map(source.sample, block)
            for sample_id, (image, label) in zip(block, samples, strict=True):
                writer[position] = {"id": int(sample_id), "label": int(label), "image": image}
                position += 1
            bar.update(len(block))
    writer.done()
    writer.merge()


def _blocks(items: Iterable[int], size: int) -> Iterator[list[int]]:
    iterator = iter(items)
    while block := list(islice(iterator, size)):
        yield block


# -- command line -------------------------------------------------------------------------------------

@dataclass
class ConvertCommand:
    """The arguments of ``python -m vit.data.shards``, as a Hydra schema: Hydra refuses wrong types.

    ``_self_`` comes first in the defaults so that the chosen ``conf/data/NAME.yaml`` (mnist5k
    when no ``data=`` is given, as for training) is merged onto DataConfig's defaults, not under them.
    """

    defaults: list[Any] = field(default_factory=lambda: ["_self_", {"data": "mnist5k"}])
    data: DataConfig = field(default_factory=DataConfig)
    out: Optional[str] = None
    chunk_bytes: str = DEFAULT_CHUNK_BYTES  # litdata's size strings ("16MB") or a number of bytes
    overwrite: bool = False


COMMAND_SCHEMA = "shards_command"
COMMAND_KEYS = ("data", "out", "chunk_bytes", "overwrite")
DATA_KEYS = tuple(f.name for f in dataclasses.fields(DataConfig))


def check_arguments(args: Sequence[str]) -> None:
    """ValueError naming the first argument that is not ``key=value`` with a known key, so that
    none is silently ignored, or saying that ``out=DIR`` is missing."""
    for arg in args:
        key, sep, _ = arg.partition("=")
        group, _, option = key.partition(".")
        if not sep:
            raise ValueError(f"expected key=value, got {arg!r}")
        if group == "data" and option:
            if option.split(".")[0] not in DATA_KEYS:
                raise ValueError(f"unknown data option {key!r}; valid options: data.{', data.'.join(DATA_KEYS)}")
        elif option or group not in COMMAND_KEYS:
            raise ValueError(f"unknown argument {key!r}; valid keys: data, data.KEY, {', '.join(COMMAND_KEYS[1:])}")
    if not any(arg.startswith("out=") for arg in args):
        raise ValueError("out=DIR is required")


def compose_command(overrides: Sequence[str]) -> ConvertCommand:
    """The command's arguments composed by Hydra from the config folder (see ``conf_dir``) and
    ``overrides``; ValueError, naming the argument, for a data config that does not exist or a
    value that does not fit its option."""
    ConfigStore.instance().store(name=COMMAND_SCHEMA, node=ConvertCommand)
    folder = conf_dir()
    with hydra.initialize_config_dir(config_dir=str(folder), version_base="1.3"):
        try:
            cfg = hydra.compose(config_name=COMMAND_SCHEMA, overrides=list(overrides))
        except MissingConfigException as error:
            name = (error.missing_cfg_file or "").removeprefix("data/")
            raise ValueError(f"no data config {name!r} in {folder / 'data'}; available: "
                             f"{', '.join(error.options or [])}") from error
        except ConfigCompositionException as error:  # its cause says what is wrong with the value
            reason = str(error.__cause__).splitlines()[0] if error.__cause__ else ""
            raise ValueError(f"{error}: {reason}" if reason else str(error)) from error
    command: ConvertCommand = OmegaConf.to_object(cfg)
    command.data = resolve_config(command.data)  # the checks a datamodule makes, before any reading
    return command


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vit.data.shards``: compose the arguments with Hydra, convert, print a summary.

    Exit status 2 for a usage error (an argument that is not key=value, an unknown key, no
    out=DIR), 1 when the conversion cannot be done (a bad value, missing data, a non-empty out).
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n")[0])
        return 0 if args else 2
    try:
        check_arguments(args)
    except ValueError as error:
        print(f"{error}\n{USAGE}", file=sys.stderr)
        return 2
    try:
        command = compose_command(args)
        if not command.out:
            raise ValueError("out=DIR needs a folder, got an empty value")
        chunk_bytes = int(command.chunk_bytes) if command.chunk_bytes.isdigit() else command.chunk_bytes
        meta = convert(command.data, command.out, chunk_bytes=chunk_bytes, overwrite=command.overwrite)
    except (ValueError, OSError, HydraException, OmegaConfBaseException) as error:  # bad value, missing data, ...
        print(f"error: {error}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{split} {n}" for split, n in meta.splits.items())
    print(f"wrote {meta.dataset} to {command.out}: {sizes} ({meta.encoding} {meta.in_chans}x{meta.image_size}"
          f"x{meta.image_size}); train with data=shards data.path={command.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
