"""Know before it crashes: does the model fit the data, and does a training step fit in memory?
And ``trainer.precision=auto``: bf16 autocast only where the hardware runs it fast.

Training memory = parameters + gradients + optimizer state (AdamW keeps two moments)
+ activations saved for the backward pass. Activations are *measured*, not guessed: one
forward pass on a batch of two images counts the bytes that autograd saves, and the
figure scales linearly with the batch size. This module only estimates and compares;
what a dataset too large for memory does instead (``data.mode``) is ``vit.data.plan``'s job.
"""
from __future__ import annotations

import os
from typing import Any
from dataclasses import dataclass

import torch
from torch import nn

from vit.errors import ConfigError

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


# CPU instruction sets that compute in bf16 natively (torch.cpu.get_capabilities() names them so).
# Without one, torch emulates bf16 matmuls, many times slower than float32.
BF16_CPU_FEATURES = ("avx512_bf16", "amx_bf16")


def resolve_precision(precision: str, device: torch.device) -> tuple[str, str]:
    """``trainer.precision`` as Lightning takes it, and why. "auto" becomes "bf16-mixed" on a CUDA
    GPU that supports bf16 or on a CPU with native bf16 instructions (``BF16_CPU_FEATURES``), where
    it is faster than float32 and needs no loss scaling; "32-true" elsewhere. Other values stay."""
    if str(precision) != "auto":
        return str(precision), "as configured"
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16-mixed", f"{torch.cuda.get_device_name(device)} supports bf16"
        return "32-true", f"{torch.cuda.get_device_name(device)} has no bf16 support (16-mixed would need loss scaling)"
    capabilities = torch.cpu.get_capabilities() if hasattr(torch.cpu, "get_capabilities") else {}
    native = [feature for feature in BF16_CPU_FEATURES if capabilities.get(feature)]
    if native:
        return "bf16-mixed", f"this CPU has {' and '.join(native)}"
    return "32-true", (f"this CPU has neither {' nor '.join(BF16_CPU_FEATURES)}, so bf16 would be emulated, "
                       f"slower than float32")


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


def match_model_to_data(name: str, kwargs: dict[str, Any], dataset: str, dm: Any) -> dict[str, Any]:
    """Fill ``num_classes`` from the dataset and refuse a model that cannot read its images.

    ``dm`` is set up: for an in-memory dataset the images themselves are looked at (a file may
    not hold what its dataset name promises), otherwise what the data module declares.
    """
    kwargs = dict(kwargs)
    if "num_classes" in kwargs:
        if kwargs["num_classes"] is None:
            kwargs["num_classes"] = dm.num_classes
        elif kwargs["num_classes"] != dm.num_classes:
            raise ConfigError(f"model.num_classes={kwargs['num_classes']} but dataset {dataset!r} has "
                              f"{dm.num_classes} classes; set model.num_classes={dm.num_classes} (or null)")
    channels, height, width = training_image_shape(dataset, dm)
    if kwargs.get("in_chans", channels) != channels:
        raise ConfigError(f"model {name!r} expects in_chans={kwargs['in_chans']} but dataset {dataset!r} has "
                          f"{channels}-channel images; set model.in_chans={channels}")
    if "img_size" in kwargs:
        size = kwargs["img_size"]
        expected = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if (height, width) != expected:
            raise ConfigError(f"model {name!r} takes {expected[0]}x{expected[1]} images (model.img_size={size}) but "
                              f"dataset {dataset!r} gives {height}x{width} after its transforms; set data.img_size="
                              f"null to resize them to the model's size, or model.img_size={height}")
    return kwargs


def training_image_shape(dataset: str, dm: Any) -> tuple[int, int, int]:
    """(C, H, W) of the training images as the model receives them.

    An in-memory split (``train_set.images``, uint8 N x C x H x W) has one image put through the
    training transform; a streamed or folder dataset reports what its data module declares.
    """
    train_set = getattr(dm, "train_set", None)
    images = getattr(train_set, "images", None)
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or len(images) == 0:
        return (dm.in_chans, *dm.img_size)
    if images.shape[1] != dm.in_chans:  # the transform normalises with one mean and std per channel
        path = getattr(getattr(dm, "cfg", None), "path", None)
        source = f" read from data.path={path}" if path else ""
        raise ConfigError(f"the training images of dataset {dataset!r}{source} have {images.shape[1]} channel(s), "
                          f"but {dataset!r} has {dm.in_chans}-channel images; use a file of "
                          f"{dm.in_chans}-channel images (N x H x W x {dm.in_chans})")
    # The augmentation draws random numbers; the seeded stream stays as training will find it.
    with torch.random.fork_rng(devices=[]):
        image, _ = train_set[0]
    return tuple(image.shape)  # type: ignore[return-value]
