"""Many processes, GPUs and machines, through Lightning's own strategies (no home-made engine).

``vit.training`` calls into this module for four things:

* :func:`build_strategy` turns ``trainer.strategy: ddp`` / ``fsdp`` plus the typed
  ``distributed`` section into Lightning's ``DDPStrategy`` / ``FSDPStrategy`` objects, so that the
  process-group timeout, FSDP's wrapping and activation checkpointing are config switches.
* :func:`per_device_batch_size` derives each device's batch from ``data.global_batch_size``.
* :class:`SameRunDirectory` stops a job whose ranks disagree about the run directory, and
  :class:`StopAllRanksOnError` ends the ranks rank zero started when it fails.
* :func:`keep_file_logs_on_rank_zero` leaves the run's log file to global rank zero.

How the processes are made is Lightning's business: ``trainer.devices=N`` on one machine
re-runs ``train.py`` once per extra device (its subprocess launcher); torchrun and SLURM's
srun start every process themselves and Lightning detects them from the environment.
"""
from __future__ import annotations

import logging
import os
import signal
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import lightning as L
from lightning.pytorch.accelerators import AcceleratorRegistry, CUDAAccelerator, MPSAccelerator
from lightning.pytorch.strategies import DDPStrategy, FSDPStrategy, Strategy

from vit.errors import ConfigError
from vit.model import Block

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from vit.config import DistributedConfig

# The FSDP sharding strategies Lightning accepts by name.
SHARDING_STRATEGIES = ("FULL_SHARD", "SHARD_GRAD_OP", "NO_SHARD", "HYBRID_SHARD")


def build_strategy(strategy: Any, accelerator: str, dist: DistributedConfig | DictConfig) -> str | Strategy:
    """The ``strategy`` argument for ``lightning.Trainer``.

    ``"ddp"`` and ``"fsdp"`` become strategy objects configured by ``dist`` (a
    ``DistributedConfig``); any other value (``"auto"``, another registered name) is returned
    unchanged for Lightning to resolve, and ``dist`` is ignored then.

    Raises ConfigError for settings that cannot work together.
    """
    name = str(strategy).lower()
    if dist.activation_checkpointing and name != "fsdp":
        raise ConfigError(f"distributed.activation_checkpointing=true needs trainer.strategy=fsdp (trainer=fsdp); "
                          f"got trainer.strategy={strategy!r}")
    if dist.timeout_s <= 0:
        raise ConfigError(f"distributed.timeout_s must be positive, got {dist.timeout_s}")
    timeout = timedelta(seconds=dist.timeout_s)
    if name == "ddp":
        return DDPStrategy(timeout=timeout, process_group_backend=dist.backend,
                           find_unused_parameters=dist.find_unused_parameters)
    if name == "fsdp":
        if str(accelerator).lower() not in ("gpu", "cuda", "auto"):
            # Lightning refuses too, with a traceback; this says which setting to change.
            raise ConfigError(f"trainer.strategy=fsdp needs GPUs (trainer.accelerator=gpu), got "
                              f"trainer.accelerator={accelerator!r}; on CPU use trainer=ddp")
        if dist.sharding_strategy not in SHARDING_STRATEGIES:
            raise ConfigError(f"distributed.sharding_strategy must be one of {', '.join(SHARDING_STRATEGIES)}, "
                              f"got {dist.sharding_strategy!r}")
        # One FSDP unit per transformer block: parameters are gathered block by block, so at most
        # one block is whole in memory at a time. Models without blocks (the CNN baselines) form a
        # single unit. state_dict_type="full" gathers one ordinary checkpoint file on rank zero,
        # which predict.py and ckpt_path=... read like any other.
        return FSDPStrategy(
            auto_wrap_policy={Block},
            activation_checkpointing_policy={Block} if dist.activation_checkpointing else None,
            sharding_strategy=dist.sharding_strategy,
            state_dict_type="full",
            timeout=timeout,
            process_group_backend=dist.backend,
        )
    return strategy


# -- the global batch ---------------------------------------------------------------------------------

def devices_per_node(accelerator: str, devices: Any) -> int:
    """How many devices (processes) the Trainer will use on each node for these flags.

    Parsed by Lightning's accelerator classes, as the Trainer does, so ``"auto"``, ``-1``,
    ``"0,1"`` and lists mean what they mean there.
    """
    name = str(accelerator).lower()
    if name == "auto":
        name = "cuda" if CUDAAccelerator.is_available() else "mps" if MPSAccelerator.is_available() else "cpu"
    elif name == "gpu":
        name = "mps" if MPSAccelerator.is_available() else "cuda"
    if name not in AcceleratorRegistry:
        raise ConfigError(f"data.global_batch_size cannot count the devices of trainer.accelerator={accelerator!r}; "
                          f"set data.batch_size (per device) instead")
    accelerator_cls = AcceleratorRegistry[name]["accelerator"]
    if devices == "auto":
        return int(accelerator_cls.auto_device_count())
    return len(accelerator_cls.get_parallel_devices(accelerator_cls.parse_devices(devices)))


def per_device_batch_size(global_batch_size: int, devices: int, num_nodes: int = 1,
                          accumulate_grad_batches: int = 1) -> int:
    """``global_batch_size / (devices x num_nodes x accumulate_grad_batches)``.

    One optimizer step then sees ``global_batch_size`` samples whatever the number of devices,
    so the learning rate, which belongs to the global batch, needs no change.
    Raises ConfigError when the division is not exact.
    """
    if global_batch_size <= 0:
        raise ConfigError(f"data.global_batch_size must be a positive integer, got {global_batch_size}")
    shares = devices * num_nodes * accumulate_grad_batches
    if global_batch_size % shares:
        lower = global_batch_size // shares * shares
        raise ConfigError(
            f"data.global_batch_size={global_batch_size} cannot be split evenly into devices ({devices}) x "
            f"num_nodes ({num_nodes}) x accumulate_grad_batches ({accumulate_grad_batches}) = {shares} batches; "
            f"choose a multiple of {shares} (e.g. {lower or shares} or {lower + shares}), "
            f"or set data.batch_size (per device) instead")
    return global_batch_size // shares


# -- one run directory, one log file --------------------------------------------------------------------

class SameRunDirectory(L.Callback):
    """Fails the job, on every rank, when the ranks' run directories differ.

    Every rank must write into rank zero's directory (checkpoints are written by rank zero and
    read back by all ranks for testing). Lightning's own launcher passes ``hydra.run.dir`` to
    the processes it starts, but with torchrun or srun each process composes its config on its
    own, and Hydra's default directory names the start time, which differs between machines.
    """

    def __init__(self, output_dir: Path) -> None:
        self.output_dir = str(Path(output_dir).resolve())
        self._checked = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._checked or trainer.world_size == 1:
            return
        self._checked = True
        rank_zero_dir = trainer.strategy.broadcast(self.output_dir, src=0)
        # Decided by all ranks together, so that all of them stop rather than some waiting forever.
        if trainer.strategy.reduce_boolean_decision(rank_zero_dir != self.output_dir, all=False):
            raise ConfigError(
                f"the ranks of this job write into different run directories (rank zero: {rank_zero_dir}, "
                f"rank {trainer.global_rank}: {self.output_dir}); when torchrun or srun starts the processes, "
                f"give every one the same hydra.run.dir=DIR (or output_dir=DIR) on a shared file system")


class StopAllRanksOnError(L.Callback):
    """When training fails on this process, kills the processes Lightning's launcher started from it.

    Lightning does that only for Ctrl-C: after any other error, rank zero exits while the ranks it
    started, waiting for it or stuck, would live on (holding their GPUs) as orphans. A failure on
    another rank is already covered: Lightning's launcher watches its children and ends the job.
    """

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        launcher = trainer.strategy.launcher
        if launcher is not None and getattr(launcher, "procs", None):  # rank zero of Lightning's launcher
            launcher.kill(signal.SIGKILL)  # what Lightning sends them on Ctrl-C


def launched_as_rank_zero() -> bool:
    """Whether this process is global rank zero, judged from what launchers put in the environment
    (torchrun: RANK, GROUP_RANK; srun: SLURM_PROCID; Lightning's launcher: LOCAL_RANK, NODE_RANK),
    so before any process group exists. A process started by hand has none of them: rank zero."""
    keys = ("RANK", "GROUP_RANK", "LOCAL_RANK", "NODE_RANK", "SLURM_PROCID")
    return all(os.environ.get(key, "0").strip() in ("", "0") for key in keys)


def keep_file_logs_on_rank_zero() -> None:
    """On ranks other than zero, stop writing the log file(s) Hydra opened for this process.

    Rank zero's ``train.log`` is the run's log; other ranks still print to the console (errors
    included). Lightning's launcher names its children's Hydra jobs ``train_ddp_process_N``, so
    Hydra has already created an empty ``train_ddp_process_N.log`` for each: it is removed.
    """
    if launched_as_rank_zero():
        return
    root = logging.getLogger()
    for handler in list(root.handlers):
        if not isinstance(handler, logging.FileHandler):
            continue
        root.removeHandler(handler)
        handler.close()
        path = Path(handler.baseFilename)
        # Only this rank's own, still empty file: with torchrun or srun, rank zero's train.log is the same path.
        if "_ddp_process_" in path.name and path.is_file() and path.stat().st_size == 0:
            path.unlink()
