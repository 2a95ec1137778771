"""Fine-tuning a pretrained ViT: which parameters train, at which learning rate, on which data.

* **Freezing** (``finetune.freeze``): ``backbone`` trains the classifier head alone (a linear
  probe of the pretrained features); ``all_but_last_n`` also trains the last ``finetune.last_n``
  blocks and the final norm. Frozen parameters get ``requires_grad=False``, so autograd saves
  nothing for them and the optimizer never sees them.
* **Layer-wise learning-rate decay** (``optim.layer_decay``, BEiT's recipe, used by MAE and timm):
  the lower a layer, the more general (and the better pretrained) its features, so the smaller
  its steps. Layer ``i`` of ``L + 2`` (0: the embeddings, 1..L: the blocks, L + 1: the head and
  what follows the blocks) trains at ``lr * layer_decay ** (L + 1 - i)``.
* **EMA** (``callbacks.ema``): :class:`EMA` keeps an exponential moving average of the weights,
  which validation, the checkpoints and the test use.
* **Data that follows the weights**: a pretrained ViT expects the normalisation, resize filter and
  crop it was trained with (timm's ``pretrained_cfg``): :func:`pretrained_data_config` reads them,
  :func:`follow_weights` fills the ``data.*`` settings a user left null with them.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from vit.data.config import INTERPOLATIONS

log = logging.getLogger(__name__)

FREEZE_CHOICES = ("none", "backbone", "all_but_last_n")
# Parameters below the first block: layer 0 of the layer-wise decay, frozen with the backbone.
EMBEDDINGS = ("patch_embed", "cls_token", "dist_token", "pos_embed")
# The data settings that a pretrained_cfg provides, in DataConfig's names.
PRETRAINED_DATA_KEYS = ("mean", "std", "interpolation", "crop_pct")
# Resize and crop settings apply to images decoded from files; in-memory datasets are resized whole.
TRANSFORM_KEYS = ("interpolation", "crop_pct")


# -- which parameters train -------------------------------------------------------------------------

def classifier_names(model: nn.Module) -> set[str]:
    """Names of the classifier's parameters: ``get_classifier()`` and a distilled model's second head."""
    heads = [model.get_classifier(), getattr(model, "head_dist", None)]
    return {f"{prefix}.{name}" if prefix else name
            for prefix, module in model.named_modules() if any(module is head for head in heads if head is not None)
            for name, _ in module.named_parameters()}


def layer_id(name: str, num_layers: int) -> int:
    """The layer of parameter ``name`` in a ViT of ``num_layers`` blocks: 0 for the embeddings,
    ``i + 1`` for ``blocks.i.*``, ``num_layers + 1`` for everything after the blocks (final norm, head)."""
    if name.split(".")[0] in EMBEDDINGS:
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers + 1


def num_layers(model: nn.Module) -> int:
    """How many blocks ``model`` has; a ValueError for a model without ``blocks`` (the CNN baselines)."""
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        raise ValueError(f"{type(model).__name__} has no transformer blocks to tell layers apart; layer decay "
                         f"and finetune.freeze=all_but_last_n need a ViT")
    return len(blocks)


def frozen_names(model: nn.Module, freeze: str, last_n: int = 1) -> set[str]:
    """The parameters ``finetune.freeze`` leaves frozen.

    backbone: all but the classifier head(s). all_but_last_n: the embeddings and every block but
    the last ``last_n``; the final norm and the head train with those blocks.
    """
    names = {name for name, _ in model.named_parameters()}
    if freeze == "none":
        return set()
    if freeze == "backbone":
        if not hasattr(model, "get_classifier"):
            raise ValueError(f"{type(model).__name__} has no get_classifier() to tell the head from the backbone")
        return names - classifier_names(model)
    if freeze == "all_but_last_n":
        depth = num_layers(model)
        if not 1 <= last_n <= depth:
            raise ValueError(f"finetune.last_n must be in [1, {depth}] (the model's blocks), got {last_n}")
        return {name for name in names if layer_id(name, depth) <= depth - last_n}
    raise ValueError(f"finetune.freeze must be one of {', '.join(FREEZE_CHOICES)}, got {freeze!r}")


def freeze_parameters(model: nn.Module, freeze: str = "none", last_n: int = 1) -> int:
    """Set ``requires_grad=False`` on the parameters :func:`frozen_names` picks; returns how many
    values (not tensors) are frozen. Called before the optimizer is built, which skips them."""
    frozen = frozen_names(model, freeze, last_n)
    if frozen and len(frozen) == len(list(model.parameters())):
        raise ValueError(f"finetune.freeze={freeze} leaves no parameter of {type(model).__name__} to train "
                         f"(a model without a classifier head?)")
    count = 0
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
            count += param.numel()
    return count


# -- learning rate per layer ------------------------------------------------------------------------

def layer_decay_groups(model: nn.Module, named_params: Sequence[tuple[str, nn.Parameter]], lr: float,
                       weight_decay: float, layer_decay: float, no_decay_names: set[str]) -> list[dict[str, Any]]:
    """Optimizer parameter groups with BEiT's layer-wise learning-rate decay.

    ``named_params`` are the (unwrapped name, parameter) pairs to optimise (trainable ones only);
    ``no_decay_names`` keep weight decay 0 (norms, biases, tokens: see
    ``vit.lightning_module.no_weight_decay_names``). Each group holds one layer's parameters with
    or without weight decay, and its ``lr = lr * layer_decay ** (L + 1 - layer)`` with the scale in
    ``lr_scale``. A scheduler that multiplies every group's initial lr by one factor (the warm-up
    and cosine LambdaLR) keeps these ratios. The head's group comes first, so that
    ``param_groups[0]["lr"]`` is still the base learning rate.
    """
    depth = num_layers(model)
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in named_params:
        layer = layer_id(name, depth)
        decays = name not in no_decay_names
        if (layer, decays) not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[layer, decays] = {"params": [], "weight_decay": weight_decay if decays else 0.0,
                                     "lr": lr * scale, "lr_scale": scale,
                                     "name": f"layer{layer:02d}" + ("" if decays else "_no_decay")}
        groups[layer, decays]["params"].append(param)
    return [groups[key] for key in sorted(groups, key=lambda key: (-key[0], not key[1]))]


# -- a moving average of the weights ----------------------------------------------------------------

def ema_update(decay: float):
    """The in-place EMA step for ``torch.optim.swa_utils.AveragedModel(multi_avg_fn=...)``.

    ``average += (1 - d) * (current - average)`` with ``d = min(decay, (1 + n) / (10 + n))`` after
    ``n`` updates (TensorFlow's ExponentialMovingAverage with ``num_updates``): early on, when the
    weights move fast, the average follows them closely; later it settles at ``decay``. Without
    the warm-up a decay of 0.999 would, for a run of a few hundred steps, keep the average near
    the starting weights, and its freshly initialised head would barely train.
    """
    def update(averaged: list[torch.Tensor], current: list[torch.Tensor], num_averaged: torch.Tensor | int) -> None:
        n = int(num_averaged)
        weight = 1.0 - min(decay, (1 + n) / (10 + n))
        for avg, cur in zip(averaged, current):
            if avg.is_floating_point():
                avg.lerp_(cur, weight)
            else:  # integer buffers (BatchNorm's num_batches_tracked) count, they do not average
                avg.copy_(cur)

    return update


class EMA(WeightAveraging):
    """Lightning's weight averaging with :func:`ema_update`, updated after every optimizer step.

    What Lightning's ``WeightAveraging`` does: validation runs on the averaged weights (swapped in
    for the validation epoch), so ``val/acc`` and the best checkpoint are the average's; every
    checkpoint holds the average as its ``state_dict`` (what predict.py and a test load) and the
    raw weights as ``current_model_state``, with the average's update count in
    ``averaging_state``; resuming (``ckpt_path`` while fitting) restores both.

    Two changes to it. Testing a checkpoint after fitting keeps the averaged ``state_dict``:
    ``WeightAveraging`` would load ``current_model_state`` over it whenever it holds an average,
    which is the case after ``fit``, and so test the raw weights. And the average replaces the raw
    weights when fitting ends (``on_fit_end``), not when training ends: ``last.ckpt``, written at
    the end of training, still holds the raw weights to resume from.
    """

    def __init__(self, decay: float = 0.999) -> None:
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema_decay must be in (0, 1), got {decay}")
        super().__init__(use_buffers=True, multi_avg_fn=ema_update(decay))
        self.decay = decay

    def on_train_end(self, trainer, pl_module) -> None:
        pass  # see on_fit_end

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._average_model is not None:
            self._copy_average_to_current(pl_module)

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict[str, Any]) -> None:
        if trainer.state.fn == TrainerFn.FITTING:
            super().on_load_checkpoint(trainer, pl_module, checkpoint)
        # Otherwise (test, validate, predict) the model keeps the checkpoint's state_dict: the average.


# -- data that follows the weights ------------------------------------------------------------------

def pretrained_data_config(init_from: str, model_name: str, model_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The data settings that go with the weights at ``init_from``: the model's ``pretrained_cfg``
    once they are loaded (mean, std, interpolation, crop_pct; mean and std None when the weights do
    not say). Reads the weights: a missing, damaged or unsafe file, or a hub name that cannot be
    fetched, raises CheckpointError here, before the data is read.
    """
    from vit.pretrained import read_checkpoint
    from vit.registry import create_model

    probe = {key: (2 if key == "num_classes" and value is None else value) for key, value in model_kwargs.items()}
    with torch.device("meta"):  # the defaults of pretrained_cfg, without allocating the model
        defaults = dict(getattr(create_model(model_name, **probe), "pretrained_cfg", {}) or {})
    _, stored = read_checkpoint(init_from)
    merged = {**defaults, **{key: value for key, value in stored.items() if value is not None}}
    return {key: merged.get(key) for key in PRETRAINED_DATA_KEYS}


def adapt_stats(values: Sequence[float], in_chans: int) -> list[float] | None:
    """Per-channel statistics for ``in_chans`` channels, as ``vit.pretrained.adapt_input_channels``
    adapts the patch projection: one channel is a grey image read as R = G = B, so it gets the
    average; more channels repeat the stored ones cyclically. None when neither applies."""
    values = [float(v) for v in values]
    if len(values) == in_chans:
        return values
    if in_chans == 1:
        return [sum(values) / len(values)]
    if in_chans > len(values):
        return [values[i % len(values)] for i in range(in_chans)]
    return None


def follow_weights(dm: Any, values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Fill the ``data.mean/std/interpolation/crop_pct`` that ``dm``'s config leaves null with
    ``values`` (from :func:`pretrained_data_config`, or a checkpoint's stored mean, std and
    ``eval_resize``).

    Call it after the data module is built and before ``setup``, which makes the transforms.
    Statistics are adapted to the data's channels (:func:`adapt_stats`); those that cannot be are
    left to the dataset (a stored model that does not fit the data is refused later, by name).
    Resize settings apply to image folders only. Returns what was filled, for the log and results.
    """
    cfg = dm.cfg
    filled: dict[str, Any] = {}
    stats = {key: values.get(key) for key in ("mean", "std")}
    if cfg.mean is None and cfg.std is None and all(v is not None for v in stats.values()):
        adapted = {key: adapt_stats(value, dm.in_chans) for key, value in stats.items()}
        if all(v is not None for v in adapted.values()):
            filled.update(adapted)
    if cfg.name == "imagefolder":
        for key in TRANSFORM_KEYS:
            value = values.get(key)
            if getattr(cfg, key) is not None or value is None:
                continue
            if (key == "interpolation" and value not in INTERPOLATIONS) or (key == "crop_pct" and not 0 < value <= 1):
                log.warning("%s says %s=%r, which the image transforms do not support; data.%s keeps its default",
                            source, key, value, key)
                continue
            filled[key] = value
    for key, value in filled.items():
        setattr(cfg, key, value)
    if filled:
        log.info("data follows %s: %s", source, ", ".join(f"data.{k}={v}" for k, v in filled.items()))
    return filled
