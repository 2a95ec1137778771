"""The shard format: what ``python -m vit.data.shards`` writes and ``data=shards`` reads.

A shard folder holds

    meta.json            what a datamodule needs before reading a sample (``ShardMeta``)
    train/ val/ test/    one litdata dataset each: index.json + chunk-*.bin

This module only defines and checks that layout; the writer (``vit.data.shards``) and the
reader (``vit.data.streaming``) both import it, and it imports neither, nor litdata.

Reading is guarded by ``check_index``: an index.json is refused unless every chunk name is a plain
file name (no absolute path, no '..', no separator: litdata joins it to a folder and, for object
storage, writes the download there) and its serializers are data-only (litdata can also unpickle).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import PurePosixPath, PureWindowsPath
from typing import Any

SPLITS: tuple[str, ...] = ("train", "val", "test")
META_FILE = "meta.json"
INDEX_FILE = "index.json"
FORMAT = "vit-shards"
FORMAT_VERSION = 1
ENCODINGS: tuple[str, ...] = ("raw", "jpeg")
# The serializers our samples need (ints, uint8 arrays, JPEG bytes). litdata also has "pickle",
# which would run code from the chunk files, so an index asking for anything else is refused.
SAFE_DATA_FORMATS = frozenset({"int", "numpy", "bytes"})
SAFE_SPEC_TYPES = frozenset({None, "builtins.dict"})  # the sample is one flat dict


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
