"""The checks behind ``vit.config.check_config``: keys the schema lacks, values it types but a run
cannot use, and a model that cannot be built, all refused before any work starts.

Every error is a ConfigError naming the key, the value and what is allowed. The checks are cheap
(no data is read, the model is built on the meta device, which allocates nothing), so a mistake
costs a second, not an epoch. What only the data can tell (its channels, its image size) is
checked by ``vit.preflight.match_model_to_data`` once the data module is set up.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import typing
from collections.abc import Mapping
from typing import Any, NoReturn, Sequence

import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.accelerators import AcceleratorRegistry, CPUAccelerator, CUDAAccelerator
from lightning.pytorch.strategies import StrategyRegistry
from omegaconf import DictConfig, ListConfig, OmegaConf

from vit.data import resolve_config
from vit.distill import DISTILL_TYPES, LATEST
from vit.errors import ConfigError
from vit.finetune import FREEZE_CHOICES, frozen_names, num_layers
from vit.lightning_module import OPTIMIZERS, SCHEDULERS, VALIDATION_METRICS
from vit.registry import create_model, list_models


# -- keys -------------------------------------------------------------------------------------------

def unknown_keys(values: Mapping[str, Any], schema: type, prefix: str = "") -> list[tuple[str, list[str]]]:
    """(dotted key, the valid keys beside it) for every key of ``values`` that ``schema`` (a
    dataclass, walked into its dataclass fields) does not define. Fields typed ``Any`` (the
    per-model ``model`` node) are left to their own check."""
    hints = typing.get_type_hints(schema)
    fields = [f.name for f in dataclasses.fields(schema)]
    found = []
    for key, value in values.items():
        if key not in hints:
            found.append((f"{prefix}{key}", fields))
        elif dataclasses.is_dataclass(hints[key]) and isinstance(value, Mapping):
            found += unknown_keys(value, hints[key], f"{prefix}{key}.")
    return found


def refuse_unknown_keys(cfg: DictConfig | Mapping[str, Any], schema: type) -> None:
    """Raise a ConfigError naming every key the schema does not define, with the closest valid ones.

    Hydra's ``+key=value`` adds a key even to a typed config (by design: it is how one extends a
    config), and OmegaConf's merge keeps keys that a typed source already holds, so the schema
    alone lets such keys through; a run would then silently ignore them.
    """
    values = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    values.pop("hydra", None)  # Hydra's own node, when a caller composed with return_hydra_config
    found = unknown_keys(values, schema)
    if not found:
        return
    problems = []
    for key, valid in found:
        parent, _, name = key.rpartition(".")
        close = difflib.get_close_matches(name, valid, n=3, cutoff=0.6)
        where = f"{parent}." if parent else ""
        if close:
            problems.append(f"{key} (did you mean {' or '.join(where + c for c in close)}?)")
        else:
            problems.append(f"{key} (valid keys{' of ' + parent if parent else ''}: {', '.join(valid)})")
    raise ConfigError(f"unknown config key{'s' if len(found) > 1 else ''} {'; '.join(problems)}. A run reads "
                      f"only the keys of its schema (vit/config.py), so a key added with + would be ignored")


# -- values -----------------------------------------------------------------------------------------

def _fail(key: str, value: Any, allowed: str) -> NoReturn:
    raise ConfigError(f"{key} must be {allowed}, got {value!r}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _in_range(key: str, value: Any, low: float, high: float = math.inf, *, low_open: bool = False,
              high_open: bool = True) -> None:
    """``value`` must be a finite number in the interval; ``low_open`` / ``high_open`` leave the bound out."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if _is_number(value) and above and below:
        return
    if high == math.inf:
        _fail(key, value, f"a number {'>' if low_open else '>='} {low:g}")
    _fail(key, value, f"a number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}")


def _count(key: str, value: Any, minimum: int, *, optional: bool = False, meaning: str = "") -> None:
    """``value`` must be an int >= ``minimum`` (or None when optional)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        _fail(key, value, f"an integer >= {minimum}{meaning}" + (" or null" if optional else ""))


def _choice(key: str, value: Any, valid: Sequence[Any]) -> None:
    # True == 1 in Python: a bool matches only a bool
    if any(value == v and isinstance(value, bool) == isinstance(v, bool) for v in valid):
        return
    names = list(dict.fromkeys(map(str, valid)))  # 16 and "16" read the same
    close = difflib.get_close_matches(str(value), names, n=3)
    hint = f" (did you mean {' or '.join(close)}?)" if close else ""
    _fail(key, value, f"one of {', '.join(names)}{hint}")


def _plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, (DictConfig, ListConfig)) else value


def check_values(cfg: DictConfig) -> None:
    """Refuse values that the schema's types allow but a run cannot use."""
    _check_run(cfg)
    _check_optim(cfg.optim)
    _check_loss(cfg.loss)
    _check_trainer(cfg.trainer, train=cfg.train, test=cfg.test)
    _check_callbacks(cfg.callbacks)
    _choice("finetune.freeze", cfg.finetune.freeze, FREEZE_CHOICES)
    _count("finetune.last_n", cfg.finetune.last_n, 1, meaning=" (blocks that train; finetune.freeze=backbone "
           "trains the head alone)")
    if cfg.callbacks.ema and str(cfg.trainer.strategy).lower() == "fsdp":
        raise ConfigError("callbacks.ema=true with trainer.strategy=fsdp: the moving average is a whole copy of "
                          "the model on every device, which sharding is there to avoid; use trainer=ddp or "
                          "callbacks.ema=false")
    _in_range("distributed.timeout_s", cfg.distributed.timeout_s, 0, low_open=True)
    _check_distill(cfg.distill)
    limits = cfg.trainer.max_epochs, cfg.trainer.max_steps, cfg.trainer.max_time
    if cfg.train and limits[0] == -1 and limits[1] == -1 and limits[2] is None and \
            cfg.callbacks.early_stopping_patience is None:
        raise ConfigError("trainer.max_epochs=-1 with trainer.max_steps=-1, no trainer.max_time and no early "
                          "stopping would train forever; set one of them")
    try:
        resolve_config(cfg.data)  # the data package's own checks, run now rather than after the output folder exists
    except ValueError as error:
        raise ConfigError(str(error)) from error


def _check_run(cfg: DictConfig) -> None:
    if not (0 <= cfg.seed < 2**32):
        _fail("seed", cfg.seed, f"an integer in [0, {2**32 - 1}] (numpy's seed range)")
    if not cfg.train and not cfg.test:
        raise ConfigError("train=false and test=false leave nothing to do; set either to true")
    if not cfg.train and not cfg.ckpt_path:
        raise ConfigError("train=false needs ckpt_path=PATH to a checkpoint to test")


def _check_optim(optim: DictConfig) -> None:
    _choice("optim.name", optim.name, OPTIMIZERS)
    _choice("optim.scheduler", optim.scheduler, SCHEDULERS)
    _in_range("optim.lr", optim.lr, 0, low_open=True)
    _in_range("optim.weight_decay", optim.weight_decay, 0)
    betas = list(optim.betas)
    if len(betas) != 2 or not all(_is_number(b) and 0 <= b < 1 for b in betas):
        _fail("optim.betas", betas, "two numbers in [0, 1)")
    if optim.name == "sgd":  # Nesterov momentum, which needs a momentum
        _in_range("optim.momentum", optim.momentum, 0, 1, low_open=True)
    _in_range("optim.warmup_epochs", optim.warmup_epochs, 0)
    _count("optim.warmup_steps", optim.warmup_steps, 0, optional=True)
    _in_range("optim.min_lr_ratio", optim.min_lr_ratio, 0, 1, high_open=False)
    if optim.layer_decay is not None:  # 1 gives every layer the same lr; above 1 lower layers would learn faster
        _in_range("optim.layer_decay", optim.layer_decay, 0, 1, low_open=True, high_open=False)


def _check_loss(loss: DictConfig) -> None:
    _in_range("loss.label_smoothing", loss.label_smoothing, 0, 1)
    _in_range("loss.mixup_alpha", loss.mixup_alpha, 0)
    _in_range("loss.cutmix_alpha", loss.cutmix_alpha, 0)
    _in_range("loss.mix_prob", loss.mix_prob, 0, 1, high_open=False)


def _check_distill(distill: DictConfig) -> None:
    if OmegaConf.is_missing(distill, "teacher_ckpt"):  # a recipe that needs a teacher leaves it "???"
        raise ConfigError("distill.teacher_ckpt is required here: the teacher's checkpoint "
                          "(RUN/checkpoints/best.ckpt of a CNN run on the same data), or latest:MODEL for the "
                          "newest finished MODEL run beside this one, e.g. distill.teacher_ckpt=latest:cnn_cifar")
    _choice("distill.type", distill.type, DISTILL_TYPES)
    _in_range("distill.alpha", distill.alpha, 0, 1, high_open=False)
    _in_range("distill.tau", distill.tau, 0, low_open=True)
    teacher = distill.teacher_ckpt
    if teacher is None:
        return
    if not str(teacher).strip():
        _fail("distill.teacher_ckpt", teacher, "a checkpoint path, latest:MODEL or null (no distillation)")
    if str(teacher).startswith(LATEST):
        _choice(f"the model of distill.teacher_ckpt={teacher}", str(teacher)[len(LATEST):], list_models())


# Lightning's own values, and "auto": bf16 autocast where the hardware runs it fast (vit.preflight).
AUTO_PRECISION = "auto"


def lightning_precisions() -> tuple[Any, ...]:
    """The values Lightning accepts for ``precision``, from Lightning itself so that they follow its version."""
    from lightning.fabric.plugins.precision.precision import (_PRECISION_INPUT_INT, _PRECISION_INPUT_STR,
                                                              _PRECISION_INPUT_STR_ALIAS)

    return (*typing.get_args(_PRECISION_INPUT_STR), *typing.get_args(_PRECISION_INPUT_STR_ALIAS),
            *typing.get_args(_PRECISION_INPUT_INT))


def _check_trainer(trainer: DictConfig, train: bool, test: bool) -> None:
    _choice("trainer.precision", trainer.precision, (AUTO_PRECISION, *lightning_precisions()))
    accelerator = trainer.accelerator
    _choice("trainer.accelerator", accelerator, ("auto", "gpu", *sorted(AcceleratorRegistry.available_accelerators())))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accelerator} but torch sees no CUDA GPU on this machine; "
                          f"use trainer=cpu (or trainer.accelerator=cpu)")
    _check_devices(trainer.devices, accelerator)
    if isinstance(trainer.strategy, str):
        _choice("trainer.strategy", trainer.strategy, ("auto", *StrategyRegistry.available_strategies()))
    _count("trainer.num_nodes", trainer.num_nodes, 1)
    if train:
        if trainer.max_epochs == 0 or trainer.max_steps == 0:
            key = "trainer.max_epochs" if trainer.max_epochs == 0 else "trainer.max_steps"
            raise ConfigError(f"{key}=0 would train nothing and test the untrained model; to test a trained "
                              f"model set train=false ckpt_path=PATH, else set {key} >= 1")
        _count("trainer.max_epochs", trainer.max_epochs, -1, optional=True, meaning=" (-1: no limit)")
        _count("trainer.max_steps", trainer.max_steps, -1, meaning=" (-1: no limit)")
    if trainer.max_time is not None and not re.fullmatch(r"\d+:\d\d:\d\d:\d\d", str(trainer.max_time).strip()):
        _fail("trainer.max_time", trainer.max_time, "a duration DD:HH:MM:SS such as 00:12:00:00")
    if trainer.gradient_clip_val is not None:
        _in_range("trainer.gradient_clip_val", trainer.gradient_clip_val, 0)  # a negative one reverses the step
    _count("trainer.accumulate_grad_batches", trainer.accumulate_grad_batches, 1)
    _count("trainer.check_val_every_n_epoch", trainer.check_val_every_n_epoch, 1, optional=True)
    _check_batches("trainer.val_check_interval", trainer.val_check_interval, minimum=1, fraction_low=0)
    for stage, needed in (("train", train), ("val", False), ("test", test)):
        key = f"trainer.limit_{stage}_batches"
        value = trainer[f"limit_{stage}_batches"]
        _check_batches(key, value, minimum=0, fraction_low=0, fraction_low_open=False)
        if needed and value == 0:
            raise ConfigError(f"{key}=0 would {stage} on no batch; set {stage}=false to skip that stage")
    _count("trainer.log_every_n_steps", trainer.log_every_n_steps, 0)
    _count("trainer.num_sanity_val_steps", trainer.num_sanity_val_steps, -1, meaning=" (-1: all)")
    _choice("trainer.deterministic", trainer.deterministic, (False, True, "warn"))


def _check_batches(key: str, value: Any, minimum: int, fraction_low: float, fraction_low_open: bool = True) -> None:
    """A number of batches (an int) or a fraction of them (a float in (0, 1] or [0, 1]); None: all."""
    if value is None:
        return
    if isinstance(value, int) and not isinstance(value, bool):
        _count(key, value, minimum, meaning=" (batches)")
    elif isinstance(value, float):
        _in_range(key, value, fraction_low, 1, low_open=fraction_low_open, high_open=False)
    else:
        _fail(key, value, f"an integer >= {minimum} (batches), a float in [0, 1] (a fraction of them) or null")


def _check_devices(devices: Any, accelerator: str) -> None:
    """Whatever Lightning's accelerator accepts (it parses the value the same way when it starts)."""
    devices = _plain(devices)
    if devices == "auto":
        return
    if devices == 0 or devices == [] or isinstance(devices, bool):
        _fail("trainer.devices", devices, "'auto', an integer >= 1, -1 (every GPU) or a list of GPU indices")
    if accelerator == "auto":
        accelerator = "cuda" if torch.cuda.is_available() else "cpu"
    parser = {"cpu": CPUAccelerator, "gpu": CUDAAccelerator, "cuda": CUDAAccelerator}.get(accelerator)
    if parser is None:
        return
    try:
        parser.parse_devices(devices)
    except (TypeError, ValueError, MisconfigurationException) as error:
        allowed = "'auto' or an integer >= 1 (processes)" if parser is CPUAccelerator else \
            "'auto', an integer >= 1, -1 (every GPU) or a list of GPU indices that exist"
        raise ConfigError(f"trainer.devices must be {allowed} with trainer.accelerator={accelerator}, got "
                          f"{devices!r} ({str(error).strip()})") from error


def _check_callbacks(callbacks: DictConfig) -> None:
    _choice("callbacks.monitor", callbacks.monitor, tuple(VALIDATION_METRICS))
    _choice("callbacks.mode", callbacks.mode, ("max", "min"))
    better = VALIDATION_METRICS[callbacks.monitor]
    if callbacks.mode != better:
        direction = "lower" if better == "min" else "higher"
        raise ConfigError(f"callbacks.mode={callbacks.mode} with callbacks.monitor={callbacks.monitor} would keep the "
                          f"worst checkpoint: {callbacks.monitor} is better when {direction}; set callbacks.mode={better}")
    _count("callbacks.save_top_k", callbacks.save_top_k, -1, meaning=" (-1: every checkpoint)")
    _count("callbacks.early_stopping_patience", callbacks.early_stopping_patience, 0, optional=True)
    _in_range("callbacks.ema_decay", callbacks.ema_decay, 0, 1, low_open=True)


# -- the model --------------------------------------------------------------------------------------

def check_model(name: str, kwargs: dict[str, Any], data_img_size: int | None) -> None:
    """Build the model on the meta device, where its constructor checks its arguments (patch size
    against image size, heads against width...) without allocating a byte, and compare its image
    size with ``data.img_size``."""
    try:
        with torch.device("meta"):
            create_model(name, **kwargs)
    except (ValueError, TypeError) as error:
        raise ConfigError(f"model {name!r}: {error}") from error
    except (RuntimeError, NotImplementedError):
        pass  # a constructor that needs real tensors: checked when the model is built for training
    if data_img_size is not None and "img_size" in kwargs:
        size = kwargs["img_size"]
        model_hw = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        if model_hw != (data_img_size, data_img_size):
            raise ConfigError(f"data.img_size={data_img_size} but model {name!r} takes {model_hw[0]}x{model_hw[1]} "
                              f"images (model.img_size={size}); set data.img_size=null to follow the model, or "
                              f"model.img_size={data_img_size} (a multiple of its patch size) to train at that size")


def check_finetune(cfg: DictConfig, name: str, kwargs: dict[str, Any], init_from: str | None) -> None:
    """Refuse fine-tuning settings the model cannot take, naming them: pretrained weights, layer
    decay or partial freezing for a model that is not a ViT, ``finetune.last_n`` beyond its depth.
    The model is built on the meta device, as in :func:`check_model`; the weights are not read here."""
    wanted = [f"model.init_from={init_from}"] if init_from else []
    if cfg.optim.layer_decay is not None:
        wanted.append(f"optim.layer_decay={cfg.optim.layer_decay}")
    if cfg.finetune.freeze != "none":
        wanted.append(f"finetune.freeze={cfg.finetune.freeze}")
    if not wanted:
        return
    model = _meta_model(name, kwargs)
    if model is None:
        return  # check_model has spoken, or the constructor needs real tensors
    if init_from and not hasattr(model, "pretrained_cfg"):
        raise ConfigError(f"model.init_from={init_from}: model {name!r} ({type(model).__name__}) does not load "
                          f"pretrained ViT weights; choose a vit.VisionTransformer model (vit_*, cct_*, ...) or "
                          f"model.init_from=null")
    try:
        if cfg.optim.layer_decay is not None:
            num_layers(model)
        frozen_names(model, cfg.finetune.freeze, cfg.finetune.last_n)
    except ValueError as error:
        raise ConfigError(f"{' '.join(wanted)} with model {name!r}: {error}") from error


def _meta_model(name: str, kwargs: dict[str, Any]) -> Any:
    """The model built on the meta device (shapes only, no memory), or None when it cannot be."""
    try:
        with torch.device("meta"):
            return create_model(name, **kwargs)
    except (ValueError, TypeError, RuntimeError, NotImplementedError):
        return None


def check_distill_student(cfg: DictConfig, name: str, kwargs: dict[str, Any]) -> None:
    """With a teacher (``distill.teacher_ckpt``), the student needs DeiT's distillation token and
    head, which learn from the teacher; refuse a model without them, naming one that has them.
    The model is built on the meta device, as in :func:`check_model`."""
    if cfg.distill.teacher_ckpt is None:
        return
    model = _meta_model(name, kwargs)
    if model is None:
        return  # check_model has spoken, or the constructor needs real tensors
    if getattr(model, "dist_token", None) is not None:
        return
    distilled = [registered for registered in list_models() if registered.endswith("_distilled")]
    advice = f"use model={name}_distilled" if f"{name}_distilled" in distilled else \
        f"use a model that has one ({', '.join(distilled)})"
    raise ConfigError(f"distill.teacher_ckpt={cfg.distill.teacher_ckpt} needs a student with a distillation token, "
                      f"which model {name!r} has not: {advice}; or distill.teacher_ckpt=null to train without "
                      f"a teacher")
