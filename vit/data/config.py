"""The data configuration: one flat dataclass that Hydra's ConfigStore can hold.

Only str / int / float / bool, ``Optional`` of those, ``list[str]`` and ``Optional[list[float]]``
fields are used, so the same class works as a structured config and as a plain Python object.
``resolve_config`` turns any mapping (a dict, an OmegaConf ``DictConfig``) into a
validated ``DataConfig`` and is the one place where option values are checked.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf

DATASET_NAMES: tuple[str, ...] = (
    "mnist5k", "mnist", "fashion_mnist", "cifar10", "cifar100", "cifar2", "imagefolder", "shards",
)
SOURCES: tuple[str, ...] = ("torchvision", "npz")
BAD_IMAGE_POLICIES: tuple[str, ...] = ("skip", "fail")
MODES: tuple[str, ...] = ("memory", "stream", "auto")
# AutoAugment's policies (torchvision's AutoAugmentPolicy values): the datasets they were searched on.
AUTOAUGMENT_POLICIES: tuple[str, ...] = ("cifar10", "imagenet", "svhn")
# Resize filters of the image-folder transforms (torchvision's InterpolationMode values).
INTERPOLATIONS: tuple[str, ...] = ("nearest", "bilinear", "bicubic")


@dataclass
class DataConfig:
    """What to load and how to batch it.

    name: one of ``DATASET_NAMES``.
    root: dataset root. torchvision datasets live in (and download into) it; mnist5k is read
        from ``ROOT/mnist5k/mnist5k.npz``; imagefolder uses it as its folder when ``path`` is None.
    download: let torchvision download missing files (needs a network).
    source: for cifar10 / cifar100 / cifar2: "torchvision" (the python batches under ``root``)
        or "npz" (one arrays file named by ``path``, keys x_train, y_train, x_test, y_test,
        optional classes; images uint8 NHWC).
    path: the .npz file for source=npz; the folder holding train/ val/ [test/] for imagefolder
        (None: ``root``); for shards (required), the folder or object-store URL (s3://, gs://,
        azure://) that ``python -m vit.data.shards`` wrote, holding meta.json and train/ val/ test/.
    batch_size / eval_batch_size: training batch size; evaluation batch size (None: batch_size).
        Both are per device (per process) under data-parallel training.
    global_batch_size: the training batch of one optimizer step summed over all devices, nodes and
        accumulated batches; when set it replaces batch_size, which becomes global_batch_size /
        (devices x num_nodes x accumulate_grad_batches) (see ``vit.distributed``), so that the
        same command trains the same way on any number of devices.
    num_workers, pin_memory, persistent_workers, prefetch_factor: passed to every DataLoader
        (the last two only when num_workers > 0).
    val_fraction: share of the training split held out for validation, with ``split_seed``,
        for datasets that have no validation split of their own.
    img_size: side of the square images the model sees (None: the dataset's native size; 224
        for imagefolder). In-memory datasets are resized on the batch when it differs.
    augment: train-time augmentation (random crop + flip; no flip for digits).
    randaugment_ops, randaugment_magnitude: torchvision's RandAugment on training images, this many
        ops per image at this magnitude (0..30); 0 ops disables it. It works image by image, so
        it costs far more than the batch crop and flip.
    autoaugment: torchvision's AutoAugment on training images with the policy searched on "cifar10",
        "imagenet" or "svhn" (Cubuk et al. 2019; CCT and Lee et al. train on CIFAR with the
        cifar10 one); None disables it. Image by image, like RandAugment, which it replaces: set
        one of the two.
    classes: for cifar2, the CIFAR-10 class names to keep, in label order (empty: cat, dog).
    max_train_samples: keep a seeded random subset of this many training samples.
    bad_image_policy: for imagefolder (and predict.py), "skip" unreadable images (listed in
        ``dm.skipped_files``) or "fail" on the first one. Files that are not images of a
        supported type are skipped and listed either way.
    cache_dir: for shards on object storage, the local folder where downloaded chunks are cached
        (None: litdata's default cache); local shards are read in place.
    mode: "memory" loads in-memory datasets whole; "stream" converts them once to shards under
        ``ROOT/shards/`` and streams those; "auto" streams when the dataset would take more than
        ``memory_fraction`` of the free memory (see ``vit.data.plan``). Image folders and shards
        are always read as they are used.
    shuffle_seed: for shards, the seed of the streamed training order, which also changes with
        every epoch (None: the run's seed, ``torch.initial_seed()``).
    mean, std: per-channel normalisation of pixels in [0, 1], one value per channel (None: the
        dataset's statistics, or those of the pretrained weights when ``model.init_from`` is set).
    interpolation, crop_pct: for image folders, the resize filter (nearest, bilinear, bicubic) and
        the evaluation crop: resize the short side to img_size / crop_pct, keep the centre
        img_size (None: bilinear and 0.875, or the pretrained weights' values when
        ``model.init_from`` is set). In-memory datasets and shards are resized whole, bilinearly.
    """

    name: str = "mnist5k"
    root: str = "data"
    download: bool = True
    source: str = "torchvision"
    path: Optional[str] = None
    batch_size: int = 128
    eval_batch_size: Optional[int] = None
    global_batch_size: Optional[int] = None
    num_workers: int = 0
    pin_memory: bool = False
    persistent_workers: bool = False
    prefetch_factor: Optional[int] = None
    val_fraction: float = 0.1
    split_seed: int = 0
    img_size: Optional[int] = None
    augment: bool = True
    randaugment_ops: int = 0
    randaugment_magnitude: int = 9
    autoaugment: Optional[str] = None
    classes: list[str] = field(default_factory=list)
    max_train_samples: Optional[int] = None
    bad_image_policy: str = "skip"
    cache_dir: Optional[str] = None
    shuffle_seed: Optional[int] = None
    mode: str = "memory"
    memory_fraction: float = 0.5
    mean: Optional[list[float]] = None
    std: Optional[list[float]] = None
    interpolation: Optional[str] = None
    crop_pct: Optional[float] = None


def resolve_config(cfg: DataConfig | Mapping[str, Any] | None = None, **overrides: Any) -> DataConfig:
    """Return a validated ``DataConfig`` from a DataConfig, a dict or an OmegaConf DictConfig.

    ``overrides`` replace single fields, e.g. ``resolve_config(cfg, batch_size=32)``.
    Raises ValueError on an unknown field or an invalid value.
    """
    if cfg is None:
        values: dict[str, Any] = {}
    elif isinstance(cfg, DataConfig):
        values = dataclasses.asdict(cfg)
    elif isinstance(cfg, DictConfig):
        values = OmegaConf.to_container(cfg, resolve=True)  # type: ignore[assignment]
    elif isinstance(cfg, Mapping):
        values = dict(cfg)
    else:
        raise TypeError(f"expected a DataConfig or a mapping of its fields, got {type(cfg).__name__}")
    values.update(overrides)
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown data option(s) {unknown}; valid options: {sorted(known)}")
    if values.get("classes") is not None:
        values["classes"] = [str(c) for c in values["classes"]]
    for key in ("mean", "std"):
        if values.get(key) is not None:
            values[key] = _numbers(f"data.{key}", values[key])
    resolved = DataConfig(**values)
    _validate(resolved)
    return resolved


def _choice(option: str, value: str, valid: tuple[str, ...]) -> None:
    if value not in valid:
        close = difflib.get_close_matches(str(value), valid, n=3)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"unknown {option} {value!r}; valid values: {', '.join(valid)}.{hint}")


def _validate(cfg: DataConfig) -> None:
    _choice("dataset name (data.name)", cfg.name, DATASET_NAMES)
    _choice("data.source", cfg.source, SOURCES)
    _choice("data.bad_image_policy", cfg.bad_image_policy, BAD_IMAGE_POLICIES)
    _choice("data.mode", cfg.mode, MODES)
    if cfg.autoaugment is not None:
        _choice("data.autoaugment", cfg.autoaugment, AUTOAUGMENT_POLICIES)
        if cfg.randaugment_ops > 0:
            raise ValueError(f"data.autoaugment={cfg.autoaugment} and data.randaugment_ops={cfg.randaugment_ops} are "
                             f"two augmentation policies; set data.randaugment_ops=0 or data.autoaugment=null")
    if not 0.0 < cfg.memory_fraction <= 1.0:
        raise ValueError(f"data.memory_fraction must be in (0, 1], got {cfg.memory_fraction}")
    for option in ("batch_size", "eval_batch_size", "global_batch_size", "prefetch_factor", "img_size",
                   "max_train_samples"):
        value = getattr(cfg, option)
        if value is not None and value <= 0:
            raise ValueError(f"data.{option} must be a positive integer, got {value}")
    if cfg.num_workers < 0:
        raise ValueError(f"data.num_workers must be >= 0, got {cfg.num_workers}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.classes and cfg.name != "cifar2":
        raise ValueError(f"data.classes selects CIFAR-10 classes for cifar2 only; got it for {cfg.name!r}")
    if cfg.name == "shards" and not cfg.path:
        raise ValueError("data=shards needs data.path=DIR, the folder (or s3://... URL) written by "
                         "`python -m vit.data.shards data=NAME out=DIR`")
    if cfg.source == "npz" and cfg.name in ("cifar10", "cifar100", "cifar2") and not cfg.path:
        raise ValueError("data.source=npz needs data.path, the .npz file with x_train, y_train, x_test, y_test")
    _validate_normalisation(cfg)


def _numbers(option: str, value: Any) -> list[float]:
    """A list of finite numbers, or a ValueError naming ``option``."""
    if isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{option} must be a list of numbers, one per channel, got {value!r}")
    items = list(value)
    if not items or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                            for v in items):
        raise ValueError(f"{option} must be a list of numbers, one per channel, got {items!r}")
    return [float(v) for v in items]


def _validate_normalisation(cfg: DataConfig) -> None:
    if (cfg.mean is None) != (cfg.std is None):
        given, other = ("mean", "std") if cfg.std is None else ("std", "mean")
        raise ValueError(f"data.{given} is set but data.{other} is not; give both (one value per channel), "
                         f"or neither to use the dataset's statistics")
    if cfg.mean is not None and cfg.std is not None:
        if len(cfg.mean) != len(cfg.std):
            raise ValueError(f"data.mean {cfg.mean} and data.std {cfg.std} need one value per channel each, "
                             f"got {len(cfg.mean)} and {len(cfg.std)}")
        if any(s <= 0 for s in cfg.std):
            raise ValueError(f"data.std must be > 0 in every channel (it divides), got {cfg.std}")
    if cfg.interpolation is not None:
        _choice("data.interpolation", cfg.interpolation, INTERPOLATIONS)
    if cfg.crop_pct is not None and not 0.0 < cfg.crop_pct <= 1.0:
        raise ValueError(f"data.crop_pct must be in (0, 1] (the centre crop's share of the resized side), "
                         f"got {cfg.crop_pct}")
    for option in ("interpolation", "crop_pct"):
        if getattr(cfg, option) is not None and cfg.name != "imagefolder":
            raise ValueError(f"data.{option} applies to image folders (their resize and centre crop); "
                             f"{cfg.name!r} is resized whole, bilinearly: set data.{option}=null")
