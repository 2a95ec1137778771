"""Loading a trained classifier to use it: from a checkpoint or from exported weights.

* :func:`load_classifier` reads either file a run leaves behind, a Lightning checkpoint
  (``.ckpt``) or the ``.safetensors`` weights ``vit.export`` writes, without unpickling code.
* :class:`NormalizedClassifier` puts the dataset's normalisation in front of the network, so
  that it takes images in [0, 1]; prediction, attention maps and every export use it.
* :func:`require_keys` gives the commands that load a classifier (predict, visualize, export)
  one message for a mandatory key left out, instead of OmegaConf's traceback.

Predicting needs nothing from training or exporting, so this module imports neither.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from vit.checkpoints import check_compatible, load_checkpoint
from vit.errors import CheckpointError, ConfigError
from vit.lightning_module import ImageClassifier, LossConfig, OptimConfig

# Keys every safetensors weights file carries in its metadata; values are JSON except
# model_name, a plain string. ``vit.export.save_weights`` writes them.
WEIGHTS_METADATA = ("model_name", "model_kwargs", "class_names", "mean", "std")


class NormalizedClassifier(nn.Module):
    """Images in [0, 1] ``(N, C, H, W)`` -> logits ``(N, num_classes)``.

    Applies the dataset's normalisation ``(x - mean) / std`` the model was trained with, then
    the model, so a caller (or an exported graph) needs no preprocessing beyond scaling pixels
    to [0, 1].

    Args:
        model: the network, taking normalised images.
        mean, std: per-channel statistics, length C.
        input_shape: ``(C, H, W)`` the model expects.
    """

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float],
                 input_shape: tuple[int, int, int]) -> None:
        super().__init__()
        if len(mean) != input_shape[0] or len(std) != input_shape[0]:
            raise ValueError(f"mean {list(mean)} and std {list(std)} need one value per channel "
                             f"({input_shape[0]})")
        self.model = model
        self.input_shape = tuple(input_shape)
        # Buffers, not constants: they move with .to(device) and appear as initialisers in ONNX.
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @classmethod
    def from_classifier(cls, module: ImageClassifier) -> "NormalizedClassifier":
        """The classifier's network with the normalisation and input size stored in its hparams."""
        hp = module.hparams
        size = hp.model_kwargs.get("img_size", 224)
        height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
        in_chans = int(hp.model_kwargs.get("in_chans", 3))
        return cls(module.model, hp.mean, hp.std, (in_chans, height, width))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(N, C, H, W)`` in [0, 1] -> the normalised input of the model, same shape."""
        return (images - self.mean) / self.std

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model(self.normalize(images))


def require_keys(cfg: Any, usage: str, *keys: str) -> None:
    """Raise ConfigError naming the ``keys`` that the command-line config ``cfg`` leaves unset
    (``???`` in the YAML, or null), followed by ``usage``, the command's synopsis."""
    from omegaconf import OmegaConf

    missing = [key for key in keys if key not in cfg or OmegaConf.is_missing(cfg, key) or cfg[key] is None]
    if missing:
        named = " and ".join(f"{key}=" for key in missing)
        raise ConfigError(f"{named} {'is' if len(missing) == 1 else 'are'} required: {usage}")


def load_classifier(path: str | Path) -> ImageClassifier:
    """The classifier stored in ``path``, in eval mode: a ``.safetensors`` file is read by
    :func:`load_weights`, anything else as a training checkpoint (``.ckpt``). Neither runs code
    stored in the file; a missing, damaged or foreign file raises CheckpointError."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_weights(path)
    return classifier_from_checkpoint(load_checkpoint(path)).eval()


def classifier_from_checkpoint(checkpoint: dict[str, Any]) -> ImageClassifier:
    """Rebuild the classifier from a loaded checkpoint dictionary: the hyperparameters saved by
    ``ImageClassifier`` build the model, then the state dict fills it (strictly)."""
    module = ImageClassifier(**checkpoint["hyper_parameters"])
    module.load_state_dict(checkpoint["state_dict"])
    return module


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The configuration stored in a safetensors weights file, decoded from JSON."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path.resolve()}")
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # not a safetensors file, or a truncated one
        raise CheckpointError(f"cannot read {path} as safetensors: {error}") from error
    missing = [key for key in WEIGHTS_METADATA if key not in raw]
    if missing:
        raise CheckpointError(f"{path} was not written by vit.export.save_weights: its metadata lacks "
                              f"{', '.join(missing)}")
    try:
        return {key: value if key in ("model_name", "format") else json.loads(value) for key, value in raw.items()}
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{path}: metadata is not valid JSON ({error})") from error


def load_weights(path: str | Path) -> ImageClassifier:
    """Rebuild the classifier from a safetensors weights file: ``vit.create_model(name, **kwargs)``
    with the stored tensors, in eval mode. Files without optimiser or loss settings get the
    training defaults for those, which only matter for further training."""
    from safetensors.torch import load_file

    path = Path(path)
    meta = read_metadata(path)
    hparams = {key: meta[key] for key in WEIGHTS_METADATA}
    hparams["optim"] = meta.get("optim", asdict(OptimConfig()))
    hparams["loss"] = meta.get("loss", asdict(LossConfig()))
    hparams["eval_resize"] = meta.get("eval_resize")  # absent from files written before it was stored
    try:
        module = ImageClassifier(**hparams)
    except ValueError as error:
        raise CheckpointError(f"{path}: the stored configuration does not build a model: {error}") from error
    tensors = load_file(str(path))
    check_compatible(tensors, module.model, path)
    module.model.load_state_dict(tensors)
    return module.eval()
