"""``data.mode``: load a dataset whole, or convert it once to shards and stream it.

A dataset's in-memory size is known before loading it: images x bytes per image (uint8 pixels,
as the in-memory datasets hold them), or, for an .npz file, the array sizes in its headers.
``plan_data`` compares it with the free memory it is given (``vit.preflight.available_memory``
measures that) and, for ``stream`` or an ``auto`` dataset that would not fit, hands back the
config of the shards it wrote.
"""
from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
import zipfile
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from vit.data.config import DataConfig
from vit.data.shard_format import META_FILE
from vit.errors import ConfigError

log = logging.getLogger(__name__)

MiB = 2**20

# Images (train + test) x bytes per image of the datasets that the in-memory datamodules load whole.
_IN_MEMORY_SIZES = {
    "mnist5k": (5_000, (1, 28, 28)),
    "mnist": (70_000, (1, 28, 28)),
    "fashion_mnist": (70_000, (1, 28, 28)),
    "cifar10": (60_000, (3, 32, 32)),
    "cifar100": (60_000, (3, 32, 32)),
    "cifar2": (60_000, (3, 32, 32)),  # the subset is cut from all of CIFAR-10, loaded first
}

# Settings that only affect how a run reads batches, not what the shards contain.
_RUN_ONLY_FIELDS = ("mode", "memory_fraction", "batch_size", "eval_batch_size", "global_batch_size", "num_workers",
                    "pin_memory", "persistent_workers", "prefetch_factor", "cache_dir", "shuffle_seed", "download")


def dataset_bytes(num_images: int, image_shape: tuple[int, int, int]) -> int:
    """In-memory size of ``num_images`` uint8 images of ``image_shape`` (C, H, W)."""
    channels, height, width = image_shape
    return num_images * channels * height * width


def _npz_array_bytes(path: Path) -> int:
    """Uncompressed bytes of every array in an .npz, read from the member headers only."""
    total = 0
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                               else np.lib.format.read_array_header_2_0)
                shape, _, dtype = read_header(stream)
                total += int(np.prod(shape)) * np.dtype(dtype).itemsize
    return total


def estimated_dataset_bytes(cfg: DataConfig) -> int | None:
    """In-memory size of the dataset ``cfg`` names, before loading it; None for datasets that are
    read from disk as they are used (image folders, shards)."""
    if cfg.name in ("cifar10", "cifar100", "cifar2") and cfg.source == "npz" and cfg.path:
        return _npz_array_bytes(Path(cfg.path)) if Path(cfg.path).is_file() else None
    if cfg.name in _IN_MEMORY_SIZES:
        return dataset_bytes(*_IN_MEMORY_SIZES[cfg.name])
    return None


def plan_data(cfg: DataConfig, available: int) -> DataConfig:
    """Apply ``data.mode``: ``memory`` keeps the config; ``stream`` always, and ``auto`` when the
    dataset would take more than ``data.memory_fraction`` of ``available`` bytes, convert it once
    to shards under ``ROOT/shards/`` (in a separate process, so this one never holds it) and
    return the config that streams them."""
    if cfg.mode == "memory":
        return cfg
    size = estimated_dataset_bytes(cfg)
    if size is None:
        return cfg
    if cfg.mode == "auto" and size <= cfg.memory_fraction * available:
        log.info("pre-flight: dataset %s takes about %s MiB in memory, %s MiB free: loading it whole",
                 cfg.name, f"{size / MiB:,.0f}", f"{available / MiB:,.0f}")
        return cfg
    source = {k: v for k, v in asdict(cfg).items() if k not in _RUN_ONLY_FIELDS}
    # The folder is named after what the shards hold, so a changed option converts anew.
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cfg.root) / "shards" / f"{cfg.name}-{key}"
    if not (out / META_FILE).is_file():
        log.info("pre-flight: streaming %s (about %s MiB; %s MiB free): converting it to shards in %s",
                 cfg.name, f"{size / MiB:,.0f}", f"{available / MiB:,.0f}", out)
        arguments = [f"data.{k}={_override_value(v)}" for k, v in source.items()]
        done = subprocess.run([sys.executable, "-m", "vit.data.shards", *arguments, f"out={_override_value(str(out))}",
                               "overwrite=true"], capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"converting {cfg.name} to shards in {out} failed: {done.stderr.strip()[-2000:]}")
    return replace(cfg, name="shards", path=str(out), mode="memory", source="torchvision", classes=[],
                   max_train_samples=None)


def _override_value(value: object) -> str:
    """``value`` as a Hydra override value: JSON's quoted strings, numbers, true/false/null and
    lists are all valid there, and quoting keeps paths with spaces or '=' in one piece."""
    return json.dumps(value, ensure_ascii=False)
