"""Typed configuration of a training run, registered with Hydra's ConfigStore.

``conf/train.yaml`` starts from the ``train_schema`` stored here, so Hydra refuses a
field of the wrong type or a key that does not exist, naming it; a key added with
``+key=value`` gets past Hydra and is refused by :func:`check_config`. The ``model``
node differs per model (its keys are the model's constructor arguments), so it is
checked against the registry by :func:`model_kwargs` instead of a dataclass.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from vit.conf_dir import conf_dir
from vit.config_checks import check_distill_student, check_finetune, check_model, check_values, refuse_unknown_keys
from vit.data import DataConfig
from vit.errors import ConfigError
from vit.lightning_module import LossConfig, OptimConfig  # the module's own settings, typed for the schema
from vit.registry import get_model_spec, list_models


@dataclass
class TrainerConfig:
    """Arguments of ``lightning.Trainer`` (same names and meanings)."""

    accelerator: str = "cpu"
    devices: Any = 1
    strategy: Any = "auto"
    num_nodes: int = 1
    precision: Any = "32-true"
    max_epochs: Optional[int] = 10
    max_steps: int = -1
    max_time: Optional[str] = None  # "DD:HH:MM:SS"
    gradient_clip_val: Optional[float] = 1.0
    accumulate_grad_batches: int = 1
    check_val_every_n_epoch: Optional[int] = 1
    val_check_interval: Any = None
    limit_train_batches: Any = None
    limit_val_batches: Any = None
    limit_test_batches: Any = None
    log_every_n_steps: int = 20
    num_sanity_val_steps: int = 0
    deterministic: Any = False
    benchmark: Optional[bool] = None
    enable_progress_bar: bool = True


@dataclass
class DistributedConfig:
    """How ``trainer.strategy: ddp`` and ``fsdp`` are built (see ``vit/distributed.py``).

    Other strategy names go to Lightning unchanged and ignore these fields.
    """

    # A collective that waits longer than this (a rank hung or died unnoticed) fails the job,
    # instead of torch's default 30 minutes. Raise it if a rank legitimately waits long, e.g.
    # while rank zero writes a huge checkpoint.
    timeout_s: float = 600.0
    backend: Optional[str] = None  # None: Lightning's choice (nccl on GPUs, gloo on CPU)
    find_unused_parameters: bool = False  # DDP: for models whose parameters do not all get gradients
    sharding_strategy: str = "FULL_SHARD"  # FSDP: FULL_SHARD | SHARD_GRAD_OP | NO_SHARD | HYBRID_SHARD
    # FSDP: recompute each transformer Block's activations in the backward pass (less memory, ~1/3 more compute).
    activation_checkpointing: bool = False


@dataclass
class LoggerConfig:
    """``metrics.csv`` is always written; TensorBoard events optionally."""

    tensorboard: bool = False


@dataclass
class CallbacksConfig:
    """Checkpointing (best on ``monitor`` and last), early stopping, the per-epoch summary."""

    monitor: str = "val/acc"
    mode: str = "max"
    save_top_k: int = 1
    save_last: bool = True
    early_stopping_patience: Optional[int] = None  # epochs without improvement; None disables
    epoch_summary: bool = True
    test_curve: bool = False  # test accuracy after every epoch (for comparison plots)
    # An exponential moving average of the weights, used for validation, the checkpoints and the
    # test (vit.finetune.EMA); ema_decay is its decay per optimizer step.
    ema: bool = False
    ema_decay: float = 0.999


@dataclass
class FinetuneConfig:
    """Which parameters train (vit/finetune.py); the weights to start from are ``model.init_from``.

    freeze: "none" (all train), "backbone" (only the classifier head: a linear probe) or
        "all_but_last_n" (the last ``last_n`` blocks, the final norm and the head).
    """

    freeze: str = "none"
    last_n: int = 1


@dataclass
class DistillConfig:
    """Learning from a trained teacher as well as from the labels (DeiT; see vit/distill.py).

    teacher_ckpt: the teacher, a classifier this package trained (``RUN/checkpoints/best.ckpt`` or
        its safetensors export), or ``latest:MODEL``: the best checkpoint of the newest finished
        MODEL run on the same data in a folder beside this run's (an earlier job of the same
        sweep, or an earlier run under outputs/runs/). None: no distillation. The student must
        have a distillation token (``model=<name>_distilled``).
    type: "hard" (the teacher's top class is the distillation head's label) or "soft" (the
        distillation head matches the teacher's distribution at temperature ``tau``).
    alpha: the teacher's share of the loss: (1 - alpha) * label loss + alpha * distillation loss.
    """

    teacher_ckpt: Optional[str] = None
    type: str = "hard"
    alpha: float = 0.5  # DeiT's hard distillation: the two losses weigh the same
    tau: float = 1.0  # soft only; DeiT's soft distillation uses tau 3 with alpha 0.1


@dataclass
class TrainConfig:
    """The whole run. ``model`` holds ``name`` plus constructor overrides of that model."""

    model: Any = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    callbacks: CallbacksConfig = field(default_factory=CallbacksConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    # torch.compile the LightningModule for training (Lightning unwraps it: checkpoint keys stay plain).
    compile: bool = False
    # Estimate the memory of a training step before training and stop if it cannot fit (vit/preflight.py).
    preflight: bool = True
    seed: int = 42
    train: bool = True
    test: bool = True
    ckpt_path: Optional[str] = None
    output_dir: Optional[str] = None  # None: Hydra's run directory, or ./outputs/run outside Hydra


def register_configs() -> None:
    """Make the schema known to Hydra (``conf/train.yaml`` lists it first in its defaults), and the
    ``folder_name`` resolver that names a sweep's job folders."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("folder_name", folder_name, replace=True)


# File systems refuse a name longer than 255 bytes; a job folder named after many overrides can be longer.
FOLDER_NAME_BYTES = 160


def folder_name(text: str) -> str:
    """``text`` as one folder's name: "/" (in a value such as val/loss) would nest folders, and a long
    name is cut (a sweep's folders stay apart: each starts with its job number)."""
    name = str(text).replace("/", "-")
    return name.encode()[:FOLDER_NAME_BYTES].decode(errors="ignore")


def as_schema(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """``cfg`` merged onto the typed schema: unknown keys and values of the wrong type are refused by name.

    The merge starts from plain containers: OmegaConf trusts a source that is already typed and
    would carry over keys that Hydra's ``+key=value`` added to it.
    """
    values = OmegaConf.to_container(cfg, resolve=False) if isinstance(cfg, DictConfig) else dict(cfg)
    values.pop("hydra", None)  # Hydra's own settings, present when composed with return_hydra_config
    refuse_unknown_keys(values, TrainConfig)
    try:
        return OmegaConf.merge(OmegaConf.structured(TrainConfig), values)
    except OmegaConfBaseException as error:  # a value of the wrong type; the message names the key
        key = getattr(error, "full_key", None)
        raise ConfigError(f"{key}: {error.msg}" if key and getattr(error, "msg", None) else str(error)) from error


def check_config(cfg: DictConfig) -> None:
    """Refuse, before any work starts, what a run cannot use: a key the schema lacks (added with
    ``+``), a value its type allows but a run cannot use, a model that cannot be built.

    ``cfg`` is already merged onto the schema. Each error names the key, the value and what is
    allowed (a ConfigError: one message, exit 2). The checks live in ``vit/config_checks.py``.
    """
    refuse_unknown_keys(cfg, TrainConfig)
    check_values(cfg)
    if OmegaConf.is_missing(cfg, "model"):
        raise ConfigError(f"no model chosen; add model=NAME, one of {', '.join(list_models())}")
    try:
        name, kwargs = model_kwargs(cfg.model)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    if cfg.train:  # testing alone uses the checkpoint's model, whatever model.* says
        # The data sets the derived arguments later; any valid stand-in lets the constructor check the rest.
        probe = {key: (2 if key in DATA_DERIVED and value is None else value) for key, value in kwargs.items()}
        check_model(name, probe, cfg.data.img_size)
        check_finetune(cfg, name, probe, model_init_from(cfg.model))
        check_distill_student(cfg, name, probe)


# -- the model node ---------------------------------------------------------------------------------

# Arguments a model config leaves to the data: null means "take it from the dataset".
DATA_DERIVED = ("num_classes",)
# Keys of the model node that are not constructor arguments, with their defaults. init_from names
# the pretrained weights a training run starts from (vit.pretrained.load_pretrained); the run
# loads them once, so they are not part of what rebuilds the model from a checkpoint.
MODEL_NODE_KEYS: dict[str, Any] = {"init_from": None}


def model_init_from(model_cfg: DictConfig | dict[str, Any]) -> str | None:
    """``model.init_from``: the pretrained weights to start from, or None."""
    value = model_cfg.get("init_from") if isinstance(model_cfg, (DictConfig, dict)) else None
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"model.init_from must be a path, a hub checkpoint folder or timm:NAME, got {value!r}")
    return value


def model_kwargs(model_cfg: DictConfig | dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """Split a model node into the registered name and checked constructor keywords.

    The node's other keys (``MODEL_NODE_KEYS``: ``init_from``) are accepted and left out of the
    keywords. Raises ValueError naming an unknown model, an unknown key or a value whose type
    does not match the argument's default.
    """
    cfg = OmegaConf.to_container(model_cfg, resolve=True) if isinstance(model_cfg, DictConfig) else dict(model_cfg)
    if "name" not in cfg:
        raise ValueError(f"the model config needs a 'name' (one of {', '.join(list_models())})")
    name = cfg.pop("name")
    for key in MODEL_NODE_KEYS:
        cfg.pop(key, None)
    spec = get_model_spec(name)
    accepted = {**spec.arguments(), **MODEL_NODE_KEYS}
    unknown = sorted(set(cfg) - set(accepted))
    if unknown:
        close = sorted({match for key in unknown for match in difflib.get_close_matches(key, accepted, n=2)})
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        raise ValueError(f"model {name!r} has no argument(s) {', '.join(map(repr, unknown))}; "
                         f"{hint}valid: {', '.join(sorted(accepted))}")
    for key, value in cfg.items():
        default = accepted[key]
        if value is None or default is None:
            continue
        if not _same_kind(value, default):
            raise ValueError(f"model.{key} must be {type(default).__name__} like its default {default!r}, "
                             f"got {value!r} ({type(value).__name__})")
    return name, cfg


def _same_kind(value: Any, default: Any) -> bool:
    """Whether a config value may replace a constructor default (ints pass for floats, and
    image or patch sizes may be an int or an (H, W) pair)."""
    if isinstance(default, bool) or isinstance(value, bool):
        return isinstance(value, bool) and isinstance(default, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float))
    if isinstance(default, (int, list, tuple)):
        return isinstance(value, (int, list, tuple))
    return isinstance(value, type(default))


def model_config_yaml(name: str) -> str:
    """The text of ``conf/model/<name>.yaml``: every constructor argument with the variant's value."""
    spec = get_model_spec(name)
    values = {"name": name, **MODEL_NODE_KEYS}
    for key, value in spec.arguments().items():
        values[key] = None if key in DATA_DERIVED else (list(value) if isinstance(value, tuple) else value)
    header = (f"# {name}: {spec.description}\n"
              f"# Generated from the registry by `python -m vit.config`; every key but init_from is a constructor\n"
              f"# argument. init_from: pretrained weights to start from (a file, a hub folder or timm:NAME).\n"
              f"# num_classes: null takes the number of classes from the dataset.\n")
    return header + yaml.safe_dump(values, sort_keys=False)


def write_model_configs(folder: Path) -> list[Path]:
    """(Re)write one model config per registered model."""
    (folder / "model").mkdir(parents=True, exist_ok=True)
    paths = []
    for name in list_models():
        path = folder / "model" / f"{name}.yaml"
        path.write_text(model_config_yaml(name))
        paths.append(path)
    return paths


if __name__ == "__main__":
    for written in write_model_configs(conf_dir()):
        print(written)
