"""One training run from a composed config: build, fit, test, and leave results behind.

``train.py`` hands Hydra's config to :func:`run`; tests call it directly. The run
directory receives ``checkpoints/`` (the best and ``last.ckpt``), ``metrics.csv``,
``results.json``, curves and the confusion matrix. Only global rank zero writes files other
than checkpoints. A run stopped with Ctrl-C still leaves ``last.ckpt`` and a ``results.json``
that says ``"interrupted": true`` and how far it got.

Two settings are decided here, before any work: ``distill.teacher_ckpt`` reads a frozen teacher once
(``vit.distill``; it is never saved with the student), and ``trainer.precision=auto`` becomes
bf16 autocast or float32, whichever the hardware runs faster (``vit.preflight.resolve_precision``).
"""
from __future__ import annotations

import logging
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Mapping

import lightning as L
import torch
from lightning.pytorch.callbacks import EarlyStopping, LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from omegaconf import DictConfig, OmegaConf

from vit.callbacks import EpochSummary, RunFolderCSVLogger, TestCurve, TrainingClock
from vit.config import as_schema, check_config, model_init_from, model_kwargs
from vit.data import DataConfig, build_datamodule, plan_data
from vit.distributed import (SameRunDirectory, StopAllRanksOnError, build_strategy, devices_per_node,
                             keep_file_logs_on_rank_zero, per_device_batch_size)
from vit.checkpoints import (AtomicCheckpointIO, LastCheckpoint, check_compatible, load_checkpoint,
                             resolve_ckpt_path)
from vit.teacher import read_teacher, resolve_teacher_ckpt, teacher_for_data
from vit.errors import ConfigError
from vit.finetune import EMA, follow_weights, pretrained_data_config
from vit.inference import classifier_from_checkpoint
from vit.lightning_module import ImageClassifier
from vit.measure import measure_model, reset_peak_memory
from vit.preflight import (MiB, available_memory, check_batch_fits, estimate_training_memory, match_model_to_data,
                           resolve_precision)
from vit.pretrained import load_pretrained
from vit.reports import plot_confusion_matrix, plot_curves, write_results

log = logging.getLogger(__name__)


def build_trainer(cfg: DictConfig, output_dir: Path, clock: TrainingClock, dm: Any,
                  from_here: bool = False) -> L.Trainer:
    """The Trainer for ``cfg``; ``from_here``: the run starts from a checkpoint of this same folder."""
    trainer_args = asdict(OmegaConf.to_object(cfg.trainer))
    # A redrawn bar fills log files with thousands of lines; the epoch summary is readable there.
    trainer_args["enable_progress_bar"] &= sys.stdout.isatty()
    trainer_args["strategy"] = build_strategy(cfg.trainer.strategy, cfg.trainer.accelerator, cfg.distributed)
    checkpoints = output_dir / "checkpoints"
    callbacks: list[L.Callback] = [
        clock,
        # The best save_top_k on the monitored metric. last.ckpt is LastCheckpoint's, below. Without the
        # version counter, a file of the same name (same epoch and step: a stopped run of this folder
        # repeating a save) is rewritten instead of doubled as "-v1".
        ModelCheckpoint(dirpath=checkpoints, monitor=cfg.callbacks.monitor, mode=cfg.callbacks.mode,
                        save_top_k=cfg.callbacks.save_top_k, save_last=False, enable_version_counter=False,
                        filename="epoch{epoch:03d}-step{step}", auto_insert_metric_name=False),
        LearningRateMonitor(logging_interval="epoch"),
        SameRunDirectory(output_dir),
        StopAllRanksOnError(),
    ]
    if cfg.callbacks.save_last:
        callbacks.append(LastCheckpoint(checkpoints))
    if cfg.callbacks.test_curve:
        callbacks.append(TestCurve(clock, dm.test_dataloader))
    if cfg.callbacks.epoch_summary:
        callbacks.append(EpochSummary(clock))
    if cfg.callbacks.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(cfg.callbacks.monitor, mode=cfg.callbacks.mode,
                                       patience=cfg.callbacks.early_stopping_patience))
    if cfg.callbacks.ema:  # validation, the checkpoints and the test use the averaged weights
        callbacks.append(EMA(cfg.callbacks.ema_decay))
    loggers: list[Any] = [RunFolderCSVLogger(output_dir, resuming=from_here)]
    if cfg.logger.tensorboard:
        loggers.append(TensorBoardLogger(save_dir=output_dir, name="tensorboard", version=""))
    return L.Trainer(**trainer_args, default_root_dir=output_dir, logger=loggers, callbacks=callbacks,
                     plugins=[AtomicCheckpointIO()])


def run(cfg: DictConfig | dict[str, Any]) -> dict[str, Any]:
    """Train and/or test as ``cfg`` says; returns what is written to ``results.json``."""
    cfg = as_schema(cfg)
    check_config(cfg)
    output_dir = Path(cfg.output_dir) if cfg.output_dir else _hydra_output_dir()
    # The teacher's file is read before any work, so that a missing or unsafe one stops the run at once.
    teacher_path = teacher_file = None
    if cfg.distill.teacher_ckpt is not None and cfg.train:
        teacher_path = resolve_teacher_ckpt(cfg.distill.teacher_ckpt, output_dir, cfg.data.name)
        teacher_file = read_teacher(teacher_path)
    output_dir.mkdir(parents=True, exist_ok=True)
    keep_file_logs_on_rank_zero()
    L.seed_everything(cfg.seed, workers=True)
    # Decided before Lightning sees it: "auto" is bf16 autocast where the hardware runs it fast.
    precision, why = resolve_precision(cfg.trainer.precision, _training_device(cfg))
    if precision != str(cfg.trainer.precision):
        log.info("trainer.precision=%s: %s, because %s", cfg.trainer.precision, precision, why)
    cfg.trainer.precision = precision

    try:
        name, kwargs = model_kwargs(cfg.model)
    except ValueError as error:
        raise ConfigError(str(error)) from error
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, output_dir, name, cfg.data.name)
    # Read once here so that an unsafe file or one made for another model stops the run
    # before any work, with a message; Lightning reads it again to restore the full state.
    checkpoint = load_checkpoint(ckpt_path) if ckpt_path is not None else None
    if not cfg.train:
        if checkpoint is None:
            raise ConfigError("train=false needs ckpt_path=PATH to a checkpoint to test")
        # Testing a checkpoint tests the model stored in it, whatever model= says.
        stored = checkpoint["hyper_parameters"]
        name, kwargs = stored["model_name"], dict(stored["model_kwargs"])
        log.info("train=false: testing the model stored in %s (%s); model.* settings do not apply", ckpt_path, name)

    # The data is normalised (and, for image folders, resized and cropped) the way the model's
    # weights expect, wherever data.* leaves it open: a checkpoint's stored statistics, or those of
    # the pretrained weights, which are read here so that a bad file stops the run before the data.
    init_from = model_init_from(cfg.model) if cfg.train and checkpoint is None else None
    follows, follows_source = _data_follows(checkpoint, ckpt_path, init_from, name, kwargs)
    if cfg.train and checkpoint is not None and model_init_from(cfg.model) is not None:
        log.info("model.init_from is not loaded: training continues from the weights in %s", ckpt_path)

    peak_from_here = reset_peak_memory(_training_device(cfg))  # before the data: loading it counts
    if not peak_from_here:
        log.info("this system cannot restart the count of peak memory: peak_memory_mb counts from the start "
                    "of the process (in a -m sweep, the largest peak of the jobs so far)")
    data_cfg, dm, device = _data(cfg, kwargs, follows, follows_source)
    module, init_notes = _build_module(cfg, name, kwargs, dm, checkpoint, ckpt_path, init_from,
                                       teacher_file, teacher_path)
    teacher_model = teacher_file.hparams.model_name if teacher_file is not None else None
    del checkpoint, teacher_file

    if cfg.train and cfg.preflight:
        _check_memory(cfg, module, dm, device)

    num_parameters = module.num_parameters  # counted before FSDP replaces the parameters by shards
    trainable_params = sum(p.numel() for p in module.model.parameters() if p.requires_grad)
    clock = TrainingClock()
    # A checkpoint of this same folder: its metrics.csv is this run's history, to be continued.
    from_here = ckpt_path is not None and output_dir.resolve() in ckpt_path.resolve().parents
    trainer = build_trainer(cfg, output_dir, clock, dm, from_here=from_here)
    log.info("model %s: %s parameters; data %s: %d training images; output %s",
             name, f"{module.num_parameters:,}", data_cfg.name, dm.num_train_samples, output_dir)

    def results_so_far(test_metrics: dict[str, float], interrupted: bool) -> dict[str, Any]:
        results = _results(cfg, name, module, num_parameters, dm, trainer, clock, test_metrics, ckpt_path,
                           interrupted=interrupted)
        results.update({
            "init_from": init_from,  # the pretrained weights the run started from
            "init_notes": init_notes,  # how they were fitted to the model (vit.pretrained.LoadReport)
            "data_mean": list(dm.mean), "data_std": list(dm.std),  # the normalisation used, wherever it came from
            "trainable_params": trainable_params,  # fewer than params when finetune.freeze is set
            # the teacher the run learnt from, and how; None without one
            "distill": {"teacher_ckpt": str(teacher_path), "teacher_model": teacher_model, "type": cfg.distill.type,
                        "alpha": cfg.distill.alpha, "tau": cfg.distill.tau} if teacher_path is not None else None,
        })
        return results

    try:
        test_metrics = _fit_and_test(cfg, trainer, module, dm, ckpt_path)
    except SystemExit:
        # Lightning answers Ctrl-C by calling the callbacks' on_exception (LastCheckpoint saves there),
        # then sys.exit(1). Before leaving, say in the run folder what happened and how far the run got.
        if trainer.interrupted and trainer.is_global_zero:
            write_results(output_dir / "results.json", results_so_far({}, interrupted=True))
            log.info("interrupted after %d whole epoch(s), at global step %d (results.json says so); the same "
                     "command plus ckpt_path=last continues the run", trainer.current_epoch, trainer.global_step)
        raise

    results = results_so_far(test_metrics, interrupted=False)
    results.update(_measure(_whole_model(trainer, module), dm))
    results["peak_memory_counted_from"] = "run" if peak_from_here else "process start"
    if cfg.test:  # gathers every rank's counts (a collective, so all ranks take part); rank zero reuses the cached value
        module.test_confusion.compute()
    if trainer.is_global_zero:
        _write_outputs(output_dir, module, dm, results, tested=bool(cfg.test))
        log.info("test accuracy %s | results in %s", _fmt(results.get("test_acc")), output_dir / "results.json")
    return results


def _fit_and_test(cfg: DictConfig, trainer: L.Trainer, module: ImageClassifier, dm: Any,
                  ckpt_path: Path | None) -> dict[str, float]:
    """Fit (from ``ckpt_path`` if given) when cfg.train, then test the best checkpoint (the module as
    it is with train=false) when cfg.test; returns the test metrics, {} without a test."""
    if cfg.train:
        # Lightning unwraps a compiled module (its steps stay compiled), so checkpoints keep plain keys.
        fit_module = torch.compile(module) if cfg.compile else module
        trainer.fit(fit_module, datamodule=dm, ckpt_path=ckpt_path, weights_only=True)  # never unpickle code
    if not cfg.test:
        return {}
    ckpt_callback = trainer.checkpoint_callback
    best = ckpt_callback.best_model_path if cfg.train and ckpt_callback and ckpt_callback.best_model_path else None
    return trainer.test(module, datamodule=dm, ckpt_path=best, verbose=False, weights_only=True)[0]


def _data_follows(checkpoint: dict[str, Any] | None, ckpt_path: Path | None, init_from: str | None, name: str,
                  kwargs: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """What the data settings left null follow (vit.finetune.follow_weights), and where from: a
    checkpoint's mean and std and, for image folders, its test set's resize (``eval_resize``); or
    the pretrained weights' ``pretrained_cfg``; or nothing (None, "")."""
    if checkpoint is not None:
        stored = checkpoint["hyper_parameters"]
        values = {"mean": stored.get("mean"), "std": stored.get("std"), **(stored.get("eval_resize") or {})}
        return values, f"checkpoint {ckpt_path}"
    if init_from is not None:
        return pretrained_data_config(init_from, name, kwargs), f"model.init_from={init_from}"
    return None, ""


def _build_module(cfg: DictConfig, name: str, kwargs: dict[str, Any], dm: Any, checkpoint: dict[str, Any] | None,
                  ckpt_path: Path | None, init_from: str | None, teacher_file: ImageClassifier | None,
                  teacher_path: Path | None) -> tuple[ImageClassifier, list[str]]:
    """The module to fit, with its teacher and its starting weights (the checkpoint's, checked to
    fit, are loaded later by Lightning; pretrained ones here), and the notes on how pretrained
    weights were fitted to it. With train=false: the checkpoint's own module, as stored."""
    if not cfg.train:
        _check_stored_model_fits_data(name, kwargs, dm.cfg.name, dm, ckpt_path)
        if cfg.distill.teacher_ckpt is not None:
            log.info("distill.teacher_ckpt is not loaded: train=false only tests")
        return classifier_from_checkpoint(checkpoint), []
    kwargs = match_model_to_data(name, kwargs, dm.cfg.name, dm)
    try:
        module = ImageClassifier(name, kwargs, optim=OmegaConf.to_container(cfg.optim),
                                 loss=OmegaConf.to_container(cfg.loss), class_names=list(dm.class_names),
                                 mean=list(dm.mean), std=list(dm.std),
                                 finetune=OmegaConf.to_container(cfg.finetune), eval_resize=dm.eval_resize)
    except ValueError as error:  # the model refused its arguments, and said which
        raise ConfigError(f"model {name!r}: {error}") from error
    if teacher_file is not None:  # once, here: a module rebuilt from a checkpoint does not need the teacher
        module.distill_from(teacher_for_data(teacher_file, teacher_path, dm), cfg.distill.type,
                            cfg.distill.alpha, cfg.distill.tau)
        log.info("distillation (%s, alpha %g, tau %g) from teacher %s in %s", cfg.distill.type, cfg.distill.alpha,
                 cfg.distill.tau, teacher_file.hparams.model_name, teacher_path)
    init_notes: list[str] = []
    if checkpoint is not None:
        check_compatible(checkpoint["state_dict"], module, ckpt_path)
    elif init_from is not None:  # once, here: a module rebuilt from a checkpoint does not need the file
        report = load_pretrained(module.model, init_from)
        init_notes = list(report.notes)
        if report.missing:  # the head for another class count, for one
            init_notes.append(f"left as initialised: {', '.join(report.missing)}")
        if report.unexpected:
            init_notes.append(f"ignored: {', '.join(report.unexpected)}")
    return module, init_notes


def _data(cfg: DictConfig, kwargs: dict[str, Any], follows: Mapping[str, Any] | None = None,
          follows_source: str = "") -> tuple[DataConfig, Any, torch.device]:
    """The data module, set up for fitting, for a model built with ``kwargs``; its config; the device.
    ``follows``: data settings of the weights (vit.finetune.follow_weights) for what data.* leaves null."""
    data_cfg: DataConfig = OmegaConf.to_object(cfg.data)
    if data_cfg.img_size is None and "img_size" in kwargs:
        size = kwargs["img_size"]
        data_cfg.img_size = size if isinstance(size, int) else int(size[0])
    if data_cfg.global_batch_size is not None:  # the per-device batch follows from the number of devices
        data_cfg.batch_size = cfg.data.batch_size = per_device_batch_size(
            data_cfg.global_batch_size, devices_per_node(cfg.trainer.accelerator, cfg.trainer.devices),
            cfg.trainer.num_nodes, cfg.trainer.accumulate_grad_batches)
    device = _training_device(cfg)
    try:
        data_cfg = plan_data(data_cfg, available_memory(device))  # data.mode: memory, stream or auto
        dm = build_datamodule(data_cfg)
        if follows:
            follow_weights(dm, follows, follows_source)
        dm.prepare_data()
        dm.setup("fit")
    except ValueError as error:  # the data module names the bad setting
        raise ConfigError(str(error)) from error
    return data_cfg, dm, device


def _check_stored_model_fits_data(name: str, kwargs: dict[str, Any], dataset: str, dm: Any, ckpt_path: Path) -> None:
    """Refuse to test a checkpoint's model on data it cannot read, in terms of the checkpoint:
    match_model_to_data's advice to change model.* does not apply to a stored model."""
    try:
        match_model_to_data(name, kwargs, dataset, dm)
    except ConfigError as error:
        raise ConfigError(
            f"ckpt_path={ckpt_path} holds model {name!r} for {kwargs.get('num_classes', '?')} classes of "
            f"{kwargs.get('in_chans', '?')}-channel images, but data {dataset!r} has {dm.num_classes} classes of "
            f"{dm.in_chans}-channel images ({error}). With train=false the model is the checkpoint's (model.* "
            f"settings do not change it): test it on data like the data it was trained on") from error


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
             clock: TrainingClock, test_metrics: dict[str, float], ckpt_path: Path | None,
             interrupted: bool) -> dict[str, Any]:
    ckpt_callback = trainer.checkpoint_callback
    best_val = ckpt_callback.best_model_score if ckpt_callback is not None else None
    world = trainer.world_size
    return {
        "model": name,
        "dataset": cfg.data.name,
        "params": num_parameters,
        "epochs": trainer.current_epoch if cfg.train else 0,  # whole epochs
        "global_step": trainer.global_step,
        "interrupted": interrupted,  # stopped by Ctrl-C: no test figures, last.ckpt continues it
        "train_time_s": round(clock.train_time_s, 3),
        # every rank processed as many images as rank zero, concurrently
        "train_images_per_s": round(clock.images_per_s * world, 2),
        "val_acc": float(best_val) if best_val is not None else None,
        "test_acc": test_metrics.get("test/acc"),
        "test_acc_top5": test_metrics.get("test/acc_top5"),
        "test_loss": test_metrics.get("test/loss"),
        # image folders without test/ are tested on val/, and say so
        "test_split": getattr(dm, "test_split", "test"),
        "best_checkpoint": (ckpt_callback.best_model_path or None) if ckpt_callback is not None else None,
        # the checkpoint this run continued (train=true) or tested (train=false)
        "ckpt_path": str(ckpt_path) if ckpt_path is not None else None,
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
