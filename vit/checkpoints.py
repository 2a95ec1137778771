"""Checkpoints that are safe to load and safe to write.

* Loading never unpickles code: ``torch.load(weights_only=True)`` only, and a file that
  needs more is refused with a message.
* A checkpoint made for another model is refused before training, naming the tensors whose
  shapes differ.
* Writing goes to a temporary file in the same folder, flushed to disk, then renamed over
  the target: a run killed while saving leaves the previous checkpoint intact.
* ``ckpt_path=last`` finds the newest ``checkpoints/last.ckpt`` among the sibling run
  directories, so that a killed run restarts with the same command plus ``ckpt_path=last``.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO

from vit.errors import CheckpointError


def resolve_ckpt_path(ckpt_path: str | None, output_dir: Path) -> Path | None:
    """``None`` stays None; ``"last"`` becomes the newest ``*/checkpoints/last.ckpt`` beside
    ``output_dir`` (the run directories Hydra makes under one parent); anything else is a path."""
    if ckpt_path is None:
        return None
    if ckpt_path != "last":
        return Path(ckpt_path)
    parent = output_dir.resolve().parent
    candidates = [p for p in parent.glob("*/checkpoints/last.ckpt") if output_dir.resolve() not in p.parents]
    if not candidates:
        raise CheckpointError(f"ckpt_path=last: no earlier run under {parent} has checkpoints/last.ckpt; "
                              f"pass ckpt_path=PATH to a checkpoint instead")
    return max(candidates, key=lambda p: p.stat().st_mtime)


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer, made atomic: temporary file, fsync, rename."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any = None) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
        try:
            with os.fdopen(handle, "wb") as stream:
                torch.save(checkpoint, stream)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(temporary, target)  # atomic on POSIX within one file system
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
