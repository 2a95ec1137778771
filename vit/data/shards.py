"""Shards: any configured dataset written as litdata chunks, for ``data=shards`` to stream.

    python -m vit.data.shards data=mnist data.root=DIR out=SHARDS [chunk_bytes=16MB] [overwrite=true]

``data=NAME`` picks ``conf/data/NAME.yaml`` and ``data.KEY=VALUE`` overrides apply, as for
``train.py``; every split of that dataset, as its datamodule builds them (``val_fraction``,
``split_seed``, ``max_train_samples`` included), is written under SHARDS:

    meta.json            what a datamodule needs before reading a sample (``ShardMeta``)
    train/ val/ test/    one litdata dataset each: index.json + chunk-*.bin

A sample is ``{"id": int, "label": int, "image": ...}``: ``id`` is its index in the source split;
``image`` is uint8 (C, H, W) at native size for in-memory datasets ("raw"), or, for image folders,
the evaluation view (short side resized to S / 0.875, centre crop S, S = ``data.img_size`` or 224)
as JPEG bytes ("jpeg"). The training split is written in a seeded random order (``split_seed``):
litdata shuffles chunk order and samples within a chunk, never across chunks, so every chunk
must already be a random draw (a class-sorted folder would otherwise give one-class batches).
``meta.json`` is written last: it marks a finished conversion.

Shards live on local disk or, once copied there (e.g. ``aws s3 sync SHARDS s3://bucket/x``), on
object storage that litdata reads (s3://, gs://, azure://).

Reading is guarded by ``check_index``: an index.json is refused unless every chunk name is a plain
file name (no absolute path, no '..', no separator: litdata joins it to a folder and, for object
storage, writes the download there) and its serializers are data-only (litdata can also unpickle).
"""
from __future__ import annotations

import json
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from io import BytesIO
from itertools import islice
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterable, Iterator, Mapping, Optional, Protocol, Sequence

import numpy as np
import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch import Tensor
from torchvision.transforms import v2
from tqdm import tqdm

from vit.data.config import DataConfig, resolve_config
from vit.data.datamodules import ArrayDataModule, ImageFolderDataModule, VisionDataModule, build_datamodule
from vit.data.folder import load_rgb

SPLITS: tuple[str, ...] = ("train", "val", "test")
META_FILE = "meta.json"
INDEX_FILE = "index.json"
FORMAT = "vit-shards"
FORMAT_VERSION = 1
ENCODINGS: tuple[str, ...] = ("raw", "jpeg")
DEFAULT_CHUNK_BYTES = "16MB"
JPEG_QUALITY = 95
# The serializers our samples need (ints, uint8 arrays, JPEG bytes). litdata also has "pickle",
# which would run code from the chunk files, so an index asking for anything else is refused.
SAFE_DATA_FORMATS = frozenset({"int", "numpy", "bytes"})
SAFE_SPEC_TYPES = frozenset({None, "builtins.dict"})  # the sample is one flat dict
CONF_DIR = Path(__file__).resolve().parents[2] / "conf"
USAGE = ("usage: python -m vit.data.shards data=NAME [data.KEY=VALUE ...] out=DIR "
         f"[chunk_bytes={DEFAULT_CHUNK_BYTES}] [overwrite=false]")


# -- the format ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ShardMeta:
    """The facts ``meta.json`` holds: what the dataset is, before any sample is read.

    image_size is the side of the stored (square) images; crop_padding and flip are the
    source dataset's train-time augmentation; splits maps each split to its sample count.
    """

    dataset: str
    class_names: list[str]
    in_chans: int
    image_size: int
    encoding: str
    mean: list[float]
    std: list[float]
    crop_padding: int
    flip: bool
    splits: dict[str, int]

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": FORMAT_VERSION, **asdict(self)}, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> "ShardMeta":
        """Parse and check a meta.json; ValueError naming ``where`` and the bad entry."""
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{where} is not valid JSON: {error}") from error
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            raise ValueError(f"{where} is not a {FORMAT} meta file (written by `python -m vit.data.shards`)")
        if raw.get("version") != FORMAT_VERSION:
            raise ValueError(f"{where} has format version {raw.get('version')!r}; this vit reads {FORMAT_VERSION}")

        def need(ok: bool, key: str, what: str) -> None:
            if not ok:
                raise ValueError(f"{where}: '{key}' must be {what}, got {raw.get(key)!r}")

        def positive_int(key: str) -> bool:
            return type(raw.get(key)) is int and raw[key] > 0

        names, splits = raw.get("class_names"), raw.get("splits")
        need(isinstance(raw.get("dataset"), str), "dataset", "a string")
        need(isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names),
             "class_names", "a list of at least two strings")
        need(positive_int("in_chans"), "in_chans", "a positive integer")
        need(positive_int("image_size"), "image_size", "a positive integer")
        need(raw.get("encoding") in ENCODINGS, "encoding", f"one of {ENCODINGS}")
        for key in ("mean", "std"):
            value = raw.get(key)
            need(isinstance(value, list) and len(value) == raw["in_chans"]
                 and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value),
                 key, f"{raw['in_chans']} numbers")
        need(type(raw.get("crop_padding")) is int and raw["crop_padding"] >= 0, "crop_padding", "an integer >= 0")
        need(isinstance(raw.get("flip"), bool), "flip", "true or false")
        need(isinstance(splits, dict) and set(splits) == set(SPLITS)
             and all(type(n) is int and n >= 0 for n in splits.values()),
             "splits", f"a sample count for each of {', '.join(SPLITS)}")
        return cls(dataset=raw["dataset"], class_names=names, in_chans=raw["in_chans"],
                   image_size=raw["image_size"], encoding=raw["encoding"], mean=[float(v) for v in raw["mean"]],
                   std=[float(v) for v in raw["std"]], crop_padding=raw["crop_padding"], flip=raw["flip"],
                   splits=dict(splits))


def check_name(name: Any, where: str) -> str:
    """``name`` if it is a plain file name that stays inside the folder it is joined to.

    Refused: non-strings, empty names, '.', '..', absolute paths (POSIX or Windows), any path
    separator (so no '..' component can hide inside) and NUL bytes.
    """
    if (not isinstance(name, str) or name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name
            or PurePosixPath(name).is_absolute() or PureWindowsPath(name).drive):
        raise ValueError(f"{where}: refusing the file name {name!r}: a shard index may only name plain files "
                         f"inside its own folder (no absolute path, no '..', no separator)")
    return name


def check_index(index: Any, where: str) -> int:
    """Check a litdata index.json (parsed) before litdata reads any chunk; returns its sample count.

    ValueError, naming ``where``, for an unsafe chunk file name (see ``check_name``), a serializer
    other than ``SAFE_DATA_FORMATS``, a sample structure other than a flat dict, compression or
    encryption (never written by this module) or a malformed entry.
    """
    config = index.get("config") if isinstance(index, dict) else None
    chunks = index.get("chunks") if isinstance(index, dict) else None
    if not isinstance(config, dict) or not isinstance(chunks, list):
        raise ValueError(f"{where} is not a litdata index (it needs 'config' and 'chunks')")
    formats = config.get("data_format")
    if not isinstance(formats, list) or not set(formats) <= SAFE_DATA_FORMATS:
        raise ValueError(f"{where}: refusing serializers {formats!r}; shards written by vit use only "
                         f"{sorted(SAFE_DATA_FORMATS)}")
    if config.get("compression") or config.get("encryption"):
        raise ValueError(f"{where}: compressed or encrypted chunks are not written by vit and are refused")
    if config.get("item_loader", "PyTreeLoader") != "PyTreeLoader":
        raise ValueError(f"{where}: unexpected item loader {config.get('item_loader')!r}")
    _check_spec(config.get("data_spec"), where)
    total = 0
    for chunk in chunks:
        if not isinstance(chunk, dict) or type(chunk.get("chunk_size")) is not int or chunk["chunk_size"] < 0:
            raise ValueError(f"{where}: malformed chunk entry {chunk!r}")
        check_name(chunk.get("filename"), where)
        total += chunk["chunk_size"]
    return total


def _check_spec(spec_text: Any, where: str) -> None:
    """The sample structure must be built of plain dicts: litdata resolves other node types by
    name, and some (defaultdict factories) by importing a module named in the file."""
    try:
        spec = json.loads(spec_text) if isinstance(spec_text, str) else None
    except json.JSONDecodeError:
        spec = None
    nodes = [spec[1]] if isinstance(spec, list) and len(spec) == 2 else [None]
    while nodes:
        node = nodes.pop()
        if not isinstance(node, dict) or node.get("type") not in SAFE_SPEC_TYPES \
                or not isinstance(node.get("children_spec"), list):
            raise ValueError(f"{where}: refusing the sample structure {spec_text!r}; vit shards hold one flat dict")
        nodes.extend(node["children_spec"])


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

def data_config_from_overrides(overrides: Sequence[str]) -> DataConfig:
    """``data=NAME`` (conf/data/NAME.yaml) then ``data.KEY=VALUE`` overrides, checked like a training run."""
    node = OmegaConf.structured(DataConfig)
    dotlist = []
    for override in overrides:
        key, _, value = override.partition("=")
        if key == "data":
            group = CONF_DIR / "data" / f"{value}.yaml"
            if not group.is_file():
                names = sorted(p.stem for p in (CONF_DIR / "data").glob("*.yaml"))
                raise ValueError(f"no data config {value!r}; available: {', '.join(names)}")
            node = OmegaConf.merge(node, OmegaConf.load(group))
        else:
            dotlist.append(f"{key.removeprefix('data.')}={value}")
    node = OmegaConf.merge(node, OmegaConf.from_dotlist(dotlist))
    return resolve_config(OmegaConf.to_object(node))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``python -m vit.data.shards``: parse key=value arguments, convert, print a summary."""
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or any(a in ("-h", "--help") for a in args):
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n")[0])
        return 0 if args else 2
    options: dict[str, str] = {"out": "", "chunk_bytes": DEFAULT_CHUNK_BYTES, "overwrite": "false"}
    data_overrides = []
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            print(f"expected key=value, got {arg!r}\n{USAGE}", file=sys.stderr)
            return 2
        if key == "data" or key.startswith("data."):
            data_overrides.append(arg)
        elif key in options:
            options[key] = value
        else:
            print(f"unknown argument {key!r}\n{USAGE}", file=sys.stderr)
            return 2
    if not options["out"]:
        print(f"out=DIR is required\n{USAGE}", file=sys.stderr)
        return 2
    chunk_bytes: str | int = int(options["chunk_bytes"]) if options["chunk_bytes"].isdigit() else options["chunk_bytes"]
    try:
        cfg = data_config_from_overrides(data_overrides)
        meta = convert(cfg, options["out"], chunk_bytes=chunk_bytes,
                       overwrite=options["overwrite"].lower() in ("1", "true", "yes"))
    except (ValueError, OSError, OmegaConfBaseException) as error:  # bad option, missing data, non-empty out
        print(f"error: {error}", file=sys.stderr)
        return 1
    sizes = ", ".join(f"{split} {n}" for split, n in meta.splits.items())
    print(f"wrote {meta.dataset} to {options['out']}: {sizes} ({meta.encoding} {meta.in_chans}x{meta.image_size}"
          f"x{meta.image_size}); train with data=shards data.path={options['out']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
