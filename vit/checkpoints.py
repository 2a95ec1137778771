"""Checkpoints that are safe to load and safe to write, and a ``last.ckpt`` that is the last state.

* Loading never unpickles code: ``torch.load(weights_only=True)`` only, and a file that
  needs more is refused with a message.
* A checkpoint made for another model is refused before training, naming the tensors whose
  shapes differ.
* Writing goes to a temporary file in the same folder, flushed to disk, then renamed over
  the target: a run killed while saving, or a full disk, leaves the previous file intact; a
  full disk is one message naming the folder and the bytes needed (:func:`write_atomically`).
* :class:`LastCheckpoint` rewrites ``checkpoints/last.ckpt`` at the end of every epoch, at the
  end of training and on Ctrl-C, always under that name.
* ``ckpt_path=last`` means this run folder's own ``last.ckpt``, else the newest one of an earlier
  run of the same model and data beside it (:func:`resolve_ckpt_path`), so that a stopped run
  continues with the same command plus ``ckpt_path=last``.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import IO, Any, Callable

import lightning as L
import torch
import yaml
from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.trainer.states import TrainerFn

from vit.errors import CheckpointError, DiskFullError

log = logging.getLogger(__name__)

LAST = "last.ckpt"


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path, model: str, dataset: str) -> Path | None:
    """``None`` stays None and a path stays that path; ``"last"`` becomes, in this order:

    1. this run folder's own ``checkpoints/last.ckpt``: rerunning a stopped command in the same
       ``hydra.run.dir`` (or ``output_dir``) continues that run, in that folder;
    2. otherwise the newest ``checkpoints/last.ckpt`` among the other folders beside ``output_dir``
       (Hydra makes one per start, under one parent) whose run was of the same model and data:
       its ``.hydra/config.yaml`` names the same ``model.name`` and ``data.name``. Folders without
       that file (runs started outside Hydra) are not candidates; pass their checkpoint's path.

    The log says which folder was taken. Raises CheckpointError when there is none.
    """
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    own = output_dir / "checkpoints" / LAST
    if own.is_file():
        log.info("ckpt_path=last: this run folder's own %s", own)
        return own
    here = output_dir.resolve()
    candidates = [run / "checkpoints" / LAST for run in sibling_runs(output_dir, model, dataset)
                  if (run / "checkpoints" / LAST).is_file()]
    if not candidates:
        raise CheckpointError(
            f"ckpt_path=last: this run folder {output_dir} has no checkpoints/{LAST}, and no other run folder "
            f"under {here.parent} ran model {model!r} on data {dataset!r} and has one (a folder counts when its "
            f".hydra/config.yaml names that model.name and data.name); pass ckpt_path=PATH to a checkpoint instead")
    newest = max(candidates, key=lambda path: path.stat().st_mtime)
    log.info("ckpt_path=last: %s has no checkpoints/%s; taking the newest earlier run of %s on %s: %s",
             output_dir, LAST, model, dataset, newest)
    return newest


def sibling_runs(output_dir: Path, model: str, dataset: str) -> list[Path]:
    """The other run folders beside ``output_dir`` whose run was of ``model`` on ``dataset``
    (their ``.hydra/config.yaml`` says so): where ``ckpt_path=last`` and a ``latest:`` teacher look."""
    here = output_dir.resolve()
    return [run for run in here.parent.iterdir()
            if run.is_dir() and run != here and model_and_data(run) == (model, dataset)]


def model_and_data(run_dir: Path) -> tuple[str, str] | None:
    """``(model.name, data.name)`` from the config Hydra saved in ``run_dir``; None when unreadable.
    Also how ``distill.teacher_ckpt=latest:MODEL`` finds its teacher (vit.teacher)."""
    try:
        saved = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
        return str(saved["model"]["name"]), str(saved["data"]["name"])
    except (OSError, yaml.YAMLError, KeyError, TypeError):
        return None


def load_checkpoint(path: Path) -> dict[str, Any]:
    """The checkpoint dictionary, loaded without running any code stored in the file."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path.resolve()}")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated, not a checkpoint, or holds objects other than tensors
        raise CheckpointError(
            f"refusing to load checkpoint {path}: it is not a plain-tensor checkpoint that "
            f"torch.load(weights_only=True) can read ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from error
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint or "hyper_parameters" not in checkpoint:
        raise CheckpointError(f"{path} is not a checkpoint written by vit's training "
                              f"(it lacks a state_dict or hyper_parameters entry)")
    return checkpoint


def check_compatible(state_dict: dict[str, torch.Tensor], module: torch.nn.Module, path: Path) -> None:
    """Refuse a checkpoint whose tensors do not fit ``module``, naming every difference."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state_dict.items()}
    differences = [f"{k}: checkpoint {found[k]} vs model {expected[k]}"
                   for k in sorted(expected.keys() & found.keys()) if found[k] != expected[k]]
    missing = sorted(expected.keys() - found.keys())
    unexpected = sorted(found.keys() - expected.keys())
    if differences or missing or unexpected:
        lines = differences[:10] + [f"missing from checkpoint: {', '.join(missing[:10])}"] * bool(missing) \
            + [f"not in this model: {', '.join(unexpected[:10])}"] * bool(unexpected)
        raise CheckpointError(f"checkpoint {path} was made for another model configuration:\n  "
                              + "\n  ".join(lines) + "\nuse the model settings the checkpoint was trained with")


# -- writing ------------------------------------------------------------------------------------------

def write_atomically(target: Path, write: Callable[[IO[bytes]], None], needed_bytes: int) -> None:
    """Write ``target`` all or nothing: ``write(stream)`` fills a temporary file in the same folder,
    which is flushed to disk, then renamed over ``target`` (atomic on POSIX within one file system).

    A process killed meanwhile leaves the previous ``target`` intact and no temporary file behind.
    A full device or quota raises DiskFullError naming the folder and ``needed_bytes`` (the size of
    what was being written), so that the message says how much to free.
    """
    temporary: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Not tempfile.mkstemp: its files are private (0600), and the rename would keep that mode.
        name = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.tmp")
        handle = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as usual
        temporary = name
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException as error:
        if temporary is not None:
            temporary.unlink(missing_ok=True)
        if _is_disk_full(error):
            raise DiskFullError(_disk_full_message(target, needed_bytes)) from error
        raise


def _is_disk_full(error: BaseException | None) -> bool:
    """Whether ``error`` or an error it arose from is ENOSPC or EDQUOT (torch.save, for one,
    reports a failed write as a RuntimeError raised while handling the OSError)."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = error.__cause__ or error.__context__
    return False


def _disk_full_message(target: Path, needed_bytes: int) -> str:
    try:
        free = f"{_size(shutil.disk_usage(target.parent).free)} are free"
    except OSError:
        free = "the free space could not be read"
    return (f"no space left on the device of {target.parent}: writing {target.name} needs about "
            f"{_size(needed_bytes)} and {free}. Free some space there, or write the run elsewhere "
            f"(hydra.run.dir=DIR or output_dir=DIR); the previous {target.name}, if any, is unchanged")


def _size(num_bytes: int) -> str:
    return f"{num_bytes:,} bytes ({num_bytes / 2**20:,.1f} MiB)"


def tensor_bytes(obj: Any) -> int:
    """Bytes of the tensors in a nested dict/list/tuple: about the size of its checkpoint file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(value) for value in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(value) for value in obj)
    return 0


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic, with a full disk reported (:func:`write_atomically`)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        write_atomically(Path(path), lambda stream: torch.save(checkpoint, stream), tensor_bytes(checkpoint))


class LastCheckpoint(Checkpoint):
    """Keeps ``checkpoints/last.ckpt`` the latest state of training.

    Lightning's ``ModelCheckpoint(save_last=True)`` rewrites its last checkpoint only in a step where
    it also saves a top-k one, so after a run whose best epoch came early, ``last.ckpt`` held that
    early epoch; and it writes ``last-v1.ckpt`` when a ``last.ckpt`` it did not write is there. This
    callback writes ``last.ckpt`` itself, always under that name, through the Trainer's (atomic)
    checkpoint writer: at the end of every training epoch, when training stops inside an epoch
    (``max_steps``, ``max_time``) and on Ctrl-C. Being a ``Checkpoint``, it is called after the
    other callbacks, ``ModelCheckpoint`` included, so the file holds their state for that epoch.
    """

    def __init__(self, dirpath: Path) -> None:
        self.path = Path(dirpath) / LAST
        self._written_at_step = 0  # before the first optimizer step there is nothing to keep

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._write(trainer)  # after a whole epoch, this step is written already

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # Ctrl-C keeps the steps made since the epoch began. Only in a single process: with several,
        # saving is a collective that the other ranks, interrupted elsewhere, may never join.
        if isinstance(exception, KeyboardInterrupt) and trainer.world_size == 1 \
                and trainer.state.fn == TrainerFn.FITTING:
            self._write(trainer)

    def _write(self, trainer: L.Trainer) -> None:
        if trainer.sanity_checking or trainer.fast_dev_run or trainer.global_step == self._written_at_step:
            return
        trainer.save_checkpoint(self.path, weights_only=False)  # the whole state: it is for resuming
        self._written_at_step = trainer.global_step
