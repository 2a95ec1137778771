"""Know before it crashes: estimate a run's memory and compare it with what the machine has.

Training memory = parameters + gradients + optimizer state (AdamW keeps two moments)
+ activations saved for the backward pass. Activations are *measured*, not guessed: one
forward pass on a batch of two images counts the bytes that autograd saves, and the
figure scales linearly with the batch size. The dataset's in-memory size is images x
bytes per image (uint8 pixels, as the in-memory datasets hold them); ``data.mode=auto``
streams it from shards when it would take more than ``data.memory_fraction`` of free memory.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vit.data import DataConfig
from vit.errors import ConfigError

log = logging.getLogger(__name__)

MiB = 2**20


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes a training step needs, by part; ``total`` is their sum."""

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer_state + self.activations

    def describe(self) -> str:
        return (f"{self.total / MiB:,.0f} MiB = parameters {self.parameters / MiB:,.0f} + gradients "
                f"{self.gradients / MiB:,.0f} + optimizer state {self.optimizer_state / MiB:,.0f} + activations "
                f"{self.activations / MiB:,.0f}")


def activation_bytes_per_image(model: nn.Module, image_shape: tuple[int, int, int],
                               autocast_dtype: torch.dtype | None = None) -> int:
    """Bytes that autograd saves for backward per image, measured on a batch of two.

    Storages are counted once even when several saved tensors share them.
    """
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    device = next(model.parameters()).device
    images = torch.zeros(2, *image_shape, device=device)
    was_training = model.training
    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor), \
            torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        output = model(images)
    del output
    model.train(was_training)
    parameter_storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(size for ptr, size in seen.items() if ptr not in parameter_storages) // 2


def estimate_training_memory(model: nn.Module, image_shape: tuple[int, int, int], batch_size: int,
                             autocast_dtype: torch.dtype | None = None,
                             optimizer_moments: int = 2) -> MemoryEstimate:
    """Memory of one training step of ``model`` on ``batch_size`` images of ``image_shape`` (C, H, W)."""
    parameter_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    trainable_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    return MemoryEstimate(
        parameters=parameter_bytes,
        gradients=trainable_bytes,
        optimizer_state=optimizer_moments * trainable_bytes,
        activations=batch_size * activation_bytes_per_image(model, image_shape, autocast_dtype),
    )


def available_memory(device: torch.device) -> int:
    """Free bytes on ``device``: the GPU's free memory, or the system's available RAM."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_batch_fits(estimate: MemoryEstimate, available: int, batch_size: int, precision: str,
                     headroom: float = 0.9) -> None:
    """Stop before training when a step cannot fit, naming the numbers and what to change."""
    if estimate.total <= headroom * available:
        return
    per_image = estimate.activations / max(batch_size, 1)
    fixed = estimate.total - estimate.activations
    fitting_batch = int((headroom * available - fixed) // per_image) if per_image else 0
    advice = [f"data.batch_size={max(fitting_batch, 1)} (with trainer.accumulate_grad_batches to keep the "
              f"effective batch)" if fitting_batch >= 1 else "a smaller model: its weights and optimizer state "
              f"alone take {fixed / MiB:,.0f} MiB"]
    if "bf16" not in precision and "16" not in precision:
        advice.append("trainer.precision=bf16-mixed (bf16 matmul activations)")
    advice.append("trainer=fsdp distributed.activation_checkpointing=true (recompute activations, "
                  "shard weights across GPUs)")
    raise ConfigError(
        f"a training step needs about {estimate.describe()} at batch size {batch_size}, but only "
        f"{available / MiB:,.0f} MiB are free. Try: " + "; or ".join(advice))


def dataset_bytes(num_images: int, image_shape: tuple[int, int, int]) -> int:
    """In-memory size of ``num_images`` uint8 images of ``image_shape`` (C, H, W)."""
    channels, height, width = image_shape
    return num_images * channels * height * width


# -- datasets larger than memory ---------------------------------------------------------------------

# Images (train + test) x bytes per image of the datasets that the in-memory datamodules load whole.
_IN_MEMORY_SIZES = {
    "mnist5k": (5_000, (1, 28, 28)),
    "mnist": (70_000, (1, 28, 28)),
    "fashion_mnist": (70_000, (1, 28, 28)),
    "cifar10": (60_000, (3, 32, 32)),
    "cifar100": (60_000, (3, 32, 32)),
    "cifar2": (60_000, (3, 32, 32)),  # the subset is cut from all of CIFAR-10, loaded first
}


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
    key = hashlib.sha256(json.dumps(source, sort_keys=True).encode()).hexdigest()[:10]
    out = Path(cfg.root) / "shards" / f"{cfg.name}-{key}"
    if not (out / "meta.json").is_file():
        log.info("pre-flight: streaming %s (about %s MiB; %s MiB free): converting it to shards in %s",
                 cfg.name, f"{size / MiB:,.0f}", f"{available / MiB:,.0f}", out)
        arguments = [f"data.{k}={json.dumps(v)}" for k, v in source.items()]
        done = subprocess.run([sys.executable, "-m", "vit.data.shards", *arguments, f"out={out}", "overwrite=true"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise ConfigError(f"converting {cfg.name} to shards in {out} failed: {done.stderr.strip()[-2000:]}")
    return replace(cfg, name="shards", path=str(out), mode="memory", source="torchvision", classes=[],
                   max_train_samples=None)


# Settings that only affect how a run reads batches, not what the shards contain.
_RUN_ONLY_FIELDS = ("mode", "memory_fraction", "batch_size", "eval_batch_size", "global_batch_size", "num_workers",
                    "pin_memory", "persistent_workers", "prefetch_factor", "cache_dir", "shuffle_seed", "download")
