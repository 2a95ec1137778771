"""Callbacks that make a run readable and measurable: a one-line summary per epoch,
a clock that counts training time and images (validation excluded), and an optional
test-accuracy curve; and the logger that writes ``metrics.csv`` into the run folder."""
from __future__ import annotations

import csv
import logging
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter
from lightning.pytorch.loggers.logger import rank_zero_experiment

log = logging.getLogger(__name__)


class TrainingClock(L.Callback):
    """Wall time spent in training epochs, data loading included, validation excluded,
    and the number of training images processed on this rank."""

    def __init__(self) -> None:
        self.train_time_s = 0.0
        self.images = 0
        self.epoch_time_s = 0.0
        self._started: float | None = None

    def _start(self) -> None:
        self._started = time.perf_counter()

    def _stop(self) -> None:
        if self._started is not None:
            elapsed = time.perf_counter() - self._started
            self.train_time_s += elapsed
            self.epoch_time_s += elapsed
            self._started = None

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.epoch_time_s = 0.0
        self._start()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.images += len(batch[1])

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training:
            self._stop()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training and not trainer.fit_loop.epoch_loop.done:
            self._start()  # validation in the middle of an epoch (val_check_interval)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop()

    @property
    def images_per_s(self) -> float:
        return self.images / self.train_time_s if self.train_time_s > 0 else 0.0


class EpochSummary(L.Callback):
    """Logs ``epoch 3/10 | train loss 0.41 acc 0.873 | val loss 0.35 acc 0.901 | lr 8.1e-04 | 12.3 s``
    on global rank zero, through the ``vit`` logger: under ``train.py`` to the console and ``train.log``."""

    def __init__(self, clock: TrainingClock) -> None:
        self.clock = clock

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        metrics = trainer.callback_metrics

        def fmt(key: str, spec: str) -> str:
            return format(float(metrics[key]), spec) if key in metrics else "-"

        lr = trainer.optimizers[0].param_groups[0]["lr"] if trainer.optimizers else float("nan")
        total = trainer.max_epochs if trainer.max_epochs and trainer.max_epochs > 0 else "?"
        log.info(
            f"epoch {trainer.current_epoch + 1}/{total} | "
            f"train loss {fmt('train/loss_epoch', '.4f')} acc {fmt('train/acc', '.4f')} | "
            f"val loss {fmt('val/loss', '.4f')} acc {fmt('val/acc', '.4f')} | "
            f"lr {lr:.2e} | {self.clock.epoch_time_s:.1f} s"
        )


class TestCurve(L.Callback):
    """Test accuracy after every training epoch, for accuracy-against-epoch and
    accuracy-against-time plots: logs ``curve/test_acc`` and ``curve/train_time_s``.

    The final ``test/acc`` of a run still comes from Lightning's test loop on the best
    checkpoint; this is the learning curve on the same test set.
    """

    def __init__(self, clock: TrainingClock, test_loader_factory) -> None:
        self.clock = clock
        self.test_loader_factory = test_loader_factory

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        was_training = pl_module.training
        pl_module.eval()
        correct = seen = 0
        with torch.inference_mode():
            for images, labels in self.test_loader_factory():
                images, labels = images.to(pl_module.device), labels.to(pl_module.device)
                correct += int((pl_module(images).argmax(dim=-1) == labels).sum())
                seen += len(labels)
        pl_module.train(was_training)
        pl_module.log("curve/test_acc", correct / max(seen, 1), on_epoch=True)
        pl_module.log("curve/train_time_s", self.clock.train_time_s, on_epoch=True)


class RunFolderCSVLogger(CSVLogger):
    """Lightning's CSV logger, writing ``metrics.csv`` (and ``hparams.yaml``) straight into the run folder.

    Lightning's writer expects a folder of its own: it warns that "previous log files will be
    deleted" whenever the folder holds anything, which a run folder always does (Hydra's
    ``.hydra/`` and ``train.log``), and deletes an existing ``metrics.csv``. Here a ``metrics.csv``
    already in the folder is kept and continued when ``resuming`` this folder's own run, so that the
    curves cover every epoch, and replaced without a warning otherwise.
    """

    def __init__(self, run_dir: Path, resuming: bool) -> None:
        super().__init__(save_dir=run_dir, name="", version="")
        self.resuming = resuming

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.log_dir, exist_ok=True)
            self._experiment = _RunFolderWriter(self.log_dir, self.resuming)
        return self._experiment


class _RunFolderWriter(ExperimentWriter):
    def __init__(self, log_dir: str, resuming: bool) -> None:
        self.resuming = resuming
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:  # Lightning's hook: called once, before the first row
        metrics_csv = Path(self.metrics_file_path)
        if not metrics_csv.is_file():
            return
        if not self.resuming:
            metrics_csv.unlink()  # another run's rows
            return
        with open(metrics_csv, newline="") as handle:
            header = next(csv.reader(handle), [])
        # Lightning appends rows under its sorted list of column names, which must be the file's header.
        self.metrics_keys = sorted(header)
        if header != self.metrics_keys:
            self._rewrite_with_new_header(self.metrics_keys)
