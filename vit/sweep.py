"""Sweeps (``python train.py -m ...``) in which one bad job does not stop the others.

Hydra's basic launcher runs the jobs of a sweep one after another in one process, and a job
that exits ends the whole sweep. ``train.py`` instead hands a job's UserError to
:func:`record_failure`, which leaves it in the job's folder as ``failure.json`` and lets the
sweep go on; :class:`SweepFailures`, a Hydra callback that ``conf/train.yaml`` registers, lists
the failed jobs and why when the sweep ends, and exits with status 2. The record is a file
rather than a variable so that launchers running jobs in other processes, or on other
machines, are covered too.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

FAILURE_FILE = "failure.json"


def in_multirun() -> bool:
    """Whether this process runs a job of a Hydra sweep (``-m``)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def clear_failure() -> None:
    """Remove this job folder's record of an earlier sweep's failure, so the folder tells the truth."""
    (Path(HydraConfig.get().runtime.output_dir) / FAILURE_FILE).unlink(missing_ok=True)


def record_failure(error: Exception) -> None:
    """Leave ``error`` in this job's folder for :class:`SweepFailures`, and say it now."""
    hydra = HydraConfig.get()
    record = {"job": hydra.job.num, "overrides": list(hydra.overrides.task), "error": str(error)}
    (Path(hydra.runtime.output_dir) / FAILURE_FILE).write_text(json.dumps(record, indent=1) + "\n")
    print(f"error: sweep job {hydra.job.num} failed, the sweep goes on: {error}", file=sys.stderr)


def swept_keys(config: DictConfig) -> set[str]:
    """The keys a sweep varies: those given several values on the command line (``key=a,b``)
    or in ``hydra.sweeper.params`` (an experiment config's sweep)."""
    keys = set(OmegaConf.select(config, "hydra.sweeper.params", default=None) or {})
    overrides = OmegaConf.to_container(config.hydra.overrides.task, resolve=False)
    for override in OverridesParser.create().parse_overrides(overrides):
        if override.is_sweep_override():
            keys.add(override.key_or_group)
    return keys


def describe(record: dict[str, Any], keys: set[str]) -> str:
    """``job 0 (model.patch_size=5): <why>``, showing the overrides that tell this job from the others."""
    overrides = [o for o in record["overrides"] if o.split("=", 1)[0].lstrip("+~") in keys] or record["overrides"]
    return f"job {record['job']} ({' '.join(overrides)}): {record['error']}"


class SweepFailures(Callback):
    """At the end of a sweep, lists the jobs that failed with a UserError and exits with status 2.

    Only records written during this sweep count: a sweep folder reused from an earlier sweep
    may still hold that sweep's.
    """

    def __init__(self) -> None:
        self._before: dict[Path, int] = {}

    @staticmethod
    def _records(sweep_dir: Path) -> dict[Path, int]:
        return {path: path.stat().st_mtime_ns for path in sweep_dir.rglob(FAILURE_FILE)} if sweep_dir.is_dir() else {}

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._before = self._records(Path(config.hydra.sweep.dir))

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        written = [path for path, mtime in self._records(sweep_dir).items() if self._before.get(path) != mtime]
        if not written:
            return
        records = sorted((json.loads(path.read_text()) for path in written), key=lambda record: record["job"])
        keys = swept_keys(config)
        lines = [f"error: {len(records)} job(s) of the sweep failed; the others ran (folders in {sweep_dir}):"]
        lines += [f"  {describe(record, keys)}" for record in records]
        print("\n".join(lines), file=sys.stderr)
        sys.exit(2)
