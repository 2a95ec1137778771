"""One training run from a composed config: build, fit, test, and leave results behind.

``train.py`` hands Hydra's config to :func:`run`; tests call it directly. The run
directory receives ``checkpoints/``, ``metrics.csv``, ``results.json``, curves and
the confusion matrix. Only global rank zero writes files other than checkpoints.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from vit.callbacks import EpochSummary, TestCurve, TrainingClock
from vit.config import TrainConfig, TrainerConfig, check_config, model_kwargs
from vit.data import DataConfig, build_datamodule, plan_data
from vit.distributed import (SameRunDirectory, StopAllRanksOnError, build_strategy, devices_per_node,
                             keep_file_logs_on_rank_zero, per_device_batch_size)
from vit.checkpoints import AtomicCheckpointIO, check_compatible, load_checkpoint, resolve_ckpt_path
from vit.errors import ConfigError
from vit.inference import classifier_from_checkpoint
from vit.lightning_module import ImageClassifier
from vit.measure import measure_model, reset_peak_memory
from vit.preflight import MiB, available_memory, check_batch_fits, estimate_training_memory, match_model_to_data
from vit.reports import plot_confusion_matrix, plot_curves, write_results

log = logging.getLogger(__name__)


def _as_schema(cfg: DictConfig | dict[str, Any]) -> DictConfig:
    """Merge onto the typed schema so that runs outside Hydra are validated the same way."""
    schema = OmegaConf.structured(TrainConfig)
    return OmegaConf.merge(schema, cfg)


def build_trainer(cfg: DictConfig, output_dir: Path, clock: TrainingClock, dm: Any) -> L.Trainer:
    trainer_args = asdict(OmegaConf.to_object(cfg.trainer))
    # A redrawn bar fills log files with thousands of lines; the epoch summary is readable there.
    trainer_args["enable_progress_bar"] &= sys.stdout.isatty()
    trainer_args["strategy"] = build_strategy(cfg.trainer.strategy, cfg.trainer.accelerator, cfg.distributed)
    callbacks: list[L.Callback] = [
        clock,
        ModelCheckpoint(dirpath=output_dir / "checkpoints", monitor=cfg.callbacks.monitor, mode=cfg.callbacks.mode,
                        save_top_k=cfg.callbacks.save_top_k, save_last=cfg.callbacks.save_last,
                        filename="epoch{epoch:03d}-step{step}", auto_insert_metric_name=False),
        LearningRateMonitor(logging_interval="epoch"),
        SameRunDirectory(output_dir),
        StopAllRanksOnError(),
    ]
    if cfg.callbacks.test_curve:
        callbacks.append(TestCurve(clock, dm.test_dataloader))
    if cfg.callbacks.epoch_summary:
        callbacks.append(EpochSummary(clock))
    if cfg.callbacks.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(cfg.callbacks.monitor, mode=cfg.callbacks.mode,
                                       patience=cfg.callbacks.early_stopping_patience))
    loggers: list[Any] = [CSVLogger(save_dir=output_dir, name="", version="")]
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=output_dir, name="tensorboard", version=""))
    return L.Trainer(**trainer_args, default_root_dir=output_dir, logger=loggers, callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()])


def run(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Train and/or test as ``cfg`` says; returns what is written to ``results.json``."""
    cfg = _as_schema(cfg)
    check_config(cfg)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else _hydra_output_dir()
    output_dir.mkdir(parents=True, exist_ok=True)
    keep_file_logs_on_rank_zero()
    L.seed_everything(cfg.seed, workers=True)

    try:
        name, kwargs = model_kwargs(cfg.model)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    data_cfg: DataConfig = OmegaConf.to_object(cfg.data)
    if data_cfg.img_size is None and "img_size" in kwargs:
        size = kwargs["img_size"]
        data_cfg.img_size = size if isinstance(size, int) else int(size[0])
    if data_cfg.global_batch_size is not None:  # the per-device batch follows from the number of devices
        data_cfg.batch_size = cfg.data.batch_size = per_device_batch_size(
            data_cfg.global_batch_size, devices_per_node(cfg.trainer.accelerator, cfg.trainer.devices),
            cfg.trainer.num_nodes, cfg.trainer.accumulate_grad_batches)
    device = _training_device(cfg)
    reset_peak_memory(device)
    try:
        data_cfg = plan_data(data_cfg, available_memory(device))  # data.mode: memory, stream or auto
        dm = build_datamodule(data_cfg)
        dm.prepare_data()
        dm.setup("fit")
    except ValueError as error:  # the data module names the bad setting
        raise ConfigError(str(error)) from error
    kwargs = match_model_to_data(name, kwargs, data_cfg.name, dm)

    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir)
    # Read once here so that an unsafe file or one made for another model stops the run
    # before training, with a message; Lightning reads it again to restore the full state.
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if cfg.train:
        try:
            module = ImageClassifier(name, kwargs, optim=OmegaConf.to_container(cfg.optim),
                                     loss=OmegaConf.to_container(cfg.loss), class_names=list(dm.class_names),
                                     mean=list(dm.mean), std=list(dm.std))
        except ValueError as error:  # the model refused its arguments, and said which
            raise ConfigError(f"model {name!r}: {error}") from error
        if checkpoint is not None:
            check_compatible(checkpoint["state_dict"], module, ckpt_path)
    else:
        if checkpoint is None:
            raise ConfigError("train=false needs ckpt_path=PATH to a checkpoint to test")
        module = classifier_from_checkpoint(checkpoint)
    del checkpoint

    if cfg.train and cfg.preflight:
        _check_memory(cfg, module, dm, device)

    num_parameters = module.num_parameters  # counted before FSDP replaces the parameters by shards
    clock = TrainingClock()
    trainer = build_trainer(cfg, output_dir, clock, dm)
    log.info("model %s: %s parameters; data %s: %d training images; output %s",
             name, f"{module.num_parameters:,}", data_cfg.name, dm.num_train_samples, output_dir)

    if cfg.train:
        # Lightning unwraps a compiled module (its steps stay compiled), so checkpoints keep plain keys.
        fit_module = torch.compile(module) if cfg.compile else module
        trainer.fit(fit_module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)  # never unpickle code
    test_metrics: dict[str, float] = {}
    if cfg.test:
        ckpt_callback = trainer.checkpoint_callback
        best = ckpt_callback.best_model_path if cfg.train and ckpt_callback and ckpt_callback.best_model_path else None
        test_metrics = trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)[0]

    results = _results(cfg, name, module, num_parameters, dm, trainer, clock, test_metrics)
    results.update(_measure(_whole_model(trainer, module), dm))
    if cfg.test:  # gathers every rank's counts (a collective, so all ranks take part); rank zero reuses the cached value
        module.test_confusion.compute()
    if trainer.is_global_zero:
        _write_outputs(output_dir, module, dm, results, tested=bool(cfg.test))
        log.info("test accuracy %s | results in %s", _fmt(results.get("test_acc")), output_dir / "results.json")
    return results


def _whole_model(trainer: L.Trainer, module: ImageClassifier) -> torch.nn.Module:
    """The module to run for measurements: under FSDP, the wrapped root, whose forward gathers the
    sharded parameters (every rank must call it: it is a collective); otherwise the model itself."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    return trainer.model if isinstance(trainer.model, FullyShardedDataParallel) else module.model


def _measure(model: torch.nn.Module, dm: Any, batch_size: int = 64) -> dict[str, Any]:
    """FLOPs per image, inference images/s and peak memory (:func:`vit.measure.measure_model`),
    measured on the first ``batch_size`` images of the test set, on the model's device."""
    images = next(iter(dm.test_dataloader()))[0][:batch_size]
    return measure_model(model, images.to(next(model.parameters()).device))


def _results(cfg: DictConfig, name: str, module: ImageClassifier, num_parameters: int, dm: Any, trainer: L.Trainer,
             clock: TrainingClock, test_metrics: dict[str, float]) -> dict[str, Any]:
    ckpt_callback = trainer.checkpoint_callback
    best_val = ckpt_callback.best_model_score if ckpt_callback is not None else None
    world = trainer.world_size
    return {
        "model": name,
        "dataset": cfg.data.name,
        "params": num_parameters,
        "epochs": trainer.current_epoch if cfg.train else 0,
        "global_step": trainer.global_step,
        "train_time_s": round(clock.train_time_s, 3),
        # every rank processed as many images as rank zero, concurrently
        "train_images_per_s": round(clock.images_per_s * world, 2),
        "val_acc": float(best_val) if best_val is not None else None,
        "test_acc": test_metrics.get("test/acc"),
        "test_acc_top5": test_metrics.get("test/acc_top5"),
        "test_loss": test_metrics.get("test/loss"),
        "best_checkpoint": (ckpt_callback.best_model_path or None) if ckpt_callback is not None else None,
        "skipped_files": list(dm.skipped_files),
        "skipped_count": len(dm.skipped_files),
        "batch_size": cfg.data.batch_size,  # per device
        "global_batch_size": cfg.data.batch_size * world * cfg.trainer.accumulate_grad_batches,
        "precision": str(cfg.trainer.precision),
        "world_size": world,
        "seed": cfg.seed,
        "model_config": module.hparams.model_kwargs,
    }


def _training_device(cfg: DictConfig) -> torch.device:
    wants_gpu = str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto")
    return torch.device("cuda") if wants_gpu and torch.cuda.is_available() else torch.device("cpu")


def _check_memory(cfg: DictConfig, module: ImageClassifier, dm: Any, device: torch.device) -> None:
    """Stop before training when one step cannot fit in the memory this device has free."""
    precision = str(cfg.trainer.precision)
    autocast_dtype = None
    if "bf16" in precision or (precision.startswith("16") and device.type == "cpu"):
        autocast_dtype = torch.bfloat16  # Lightning runs 16-mixed as bf16 on CPU
    elif precision.startswith("16"):
        autocast_dtype = torch.float16
    estimate = estimate_training_memory(module.model, (dm.in_chans, *dm.img_size), cfg.data.batch_size, autocast_dtype)
    # Processes on one CPU machine share its memory; GPUs each have their own.
    local_processes = devices_per_node(cfg.trainer.accelerator, cfg.trainer.devices) if device.type == "cpu" else 1
    available = available_memory(device) // max(local_processes, 1)
    log.info("pre-flight: a training step needs about %s; %s MiB free", estimate.describe(), f"{available / MiB:,.0f}")
    check_batch_fits(estimate, available, cfg.data.batch_size, precision)


def _write_outputs(output_dir: Path, module: ImageClassifier, dm: Any, results: dict[str, Any], tested: bool) -> None:
    write_results(output_dir / "results.json", results)
    metrics_csv = output_dir / "metrics.csv"
    if metrics_csv.exists():
        plot_curves(metrics_csv, output_dir)
    if tested:
        matrix = module.test_confusion.compute().cpu().numpy()
        plot_confusion_matrix(matrix, dm.class_names, output_dir / "confusion_matrix.png")


def _hydra_output_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        return Path(HydraConfig.get().runtime.output_dir)
    return Path("outputs") / "run"


def _fmt(value: float | None) -> str:
    return f"{value:.4f}" if value is not None else "n/a"
