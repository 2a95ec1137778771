"""``ImageClassifier``: trains any registered model on (images, labels) batches.

It owns the loss (cross-entropy with label smoothing, mixup/cutmix, and DeiT's distillation
from a teacher when the run gives it one: :meth:`ImageClassifier.distill_from`), the optimizer
(AdamW without weight decay on norms, biases, class token and position embeddings;
optionally frozen parameters and layer-wise learning rates for fine-tuning, see
``vit.finetune``), the learning-rate schedule (linear warm-up, cosine decay, per optimizer
step) and the accuracy metrics. Everything needed to rebuild the model is stored in the
checkpoint as plain data, so it loads with ``torch.load(weights_only=True)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint, WeightAveraging
from torch import nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from vit.distill import combined_loss
from vit.errors import ConfigError, UserError
from vit.finetune import freeze_parameters, layer_decay_groups
from vit.model import count_parameters
from vit.registry import create_model

# The metrics logged once per validation epoch and which way each one improves: the ones
# ``callbacks.monitor`` (checkpointing, early stopping) may name. The config check reads this list,
# so a misspelt name stops the run at once instead of after an epoch; tests/test_config.py checks
# that the module logs exactly these names.
VALIDATION_METRICS: dict[str, str] = {"val/loss": "min", "val/acc": "max", "val/acc_top5": "max"}
# Top-5 accuracy is logged only above this many classes: with five or fewer it is always 1.
TOP5_MIN_CLASSES = 5
# The values of optim.name and optim.scheduler that configure_optimizers knows.
OPTIMIZERS = ("adamw", "sgd")
SCHEDULERS = ("cosine", "constant")



@dataclass
class OptimConfig:
    """AdamW (or SGD) with linear warm-up then cosine decay, stepped every optimizer step."""

    name: str = "adamw"  # adamw | sgd
    lr: float = 3e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    scheduler: str = "cosine"  # cosine | constant
    warmup_epochs: float = 1.0  # fraction of an epoch allowed; warmup_steps wins when set
    warmup_steps: Optional[int] = None
    min_lr_ratio: float = 0.01  # cosine ends at lr * min_lr_ratio
    # Layer-wise learning-rate decay for fine-tuning (BEiT): block i of L trains at
    # lr * layer_decay ** (L - i), the embeddings at lr * layer_decay ** (L + 1), the head at lr.
    # None: one learning rate for every layer. See vit/finetune.py.
    layer_decay: Optional[float] = None


@dataclass
class LossConfig:
    """Cross-entropy and the label-mixing regularisers (timm's Mixup implementation)."""

    label_smoothing: float = 0.0
    mixup_alpha: float = 0.0  # 0 disables mixup
    cutmix_alpha: float = 0.0  # 0 disables cutmix
    mix_prob: float = 1.0  # chance that a batch is mixed at all, when either alpha > 0

def validation_metrics(num_classes: int) -> dict[str, str]:
    """The entries of VALIDATION_METRICS logged for a dataset of ``num_classes`` classes."""
    return {name: mode for name, mode in VALIDATION_METRICS.items()
            if name != "val/acc_top5" or num_classes > TOP5_MIN_CLASSES}


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN or Inf; training cannot continue meaningfully."""


# Prefixes FSDP and activation checkpointing insert into parameter names of the modules they wrap.
_WRAPPER_PREFIXES = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")


def _unwrapped_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def no_weight_decay_names(model: nn.Module) -> set[str]:
    """Names of the parameters weight decay should leave alone: norm gains, biases, class token,
    position embeddings (vectors, or named by the model's ``no_weight_decay()``); shrinking them
    only hurts. Decided on the unwrapped model: FSDP flattens parameters to 1-D shards."""
    skip = set(getattr(model, "no_weight_decay", lambda: set())())
    return {name for name, param in model.named_parameters() if param.ndim <= 1 or name in skip}


def split_weight_decay(model: nn.Module, no_decay_names: set[str] | None = None
                       ) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(decayed, not decayed) trainable parameters of ``model``, which may be wrapped by FSDP or
    activation checkpointing if ``no_decay_names`` were taken from it before wrapping."""
    if no_decay_names is None:
        no_decay_names = no_weight_decay_names(model)
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if _unwrapped_name(name) in no_decay_names else decay).append(param)
    return decay, no_decay


def warmup_cosine(step: int, warmup_steps: int, total_steps: int, min_ratio: float) -> float:
    """Learning-rate multiplier: 0 -> 1 linearly over ``warmup_steps``, then cosine to ``min_ratio``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class ImageClassifier(L.LightningModule):
    """Wraps ``create_model(model_name, **model_kwargs)`` for training and evaluation.

    Args:
        model_name, model_kwargs: the registered model and its constructor arguments.
        optim: OptimConfig fields as a dict; loss: LossConfig fields as a dict.
        class_names, mean, std: the dataset's, kept so that a checkpoint can classify raw images.
        finetune: FinetuneConfig fields as a dict (which parameters are frozen); None: none.
        eval_resize: ``interpolation`` and ``crop_pct`` of the test images' resize (the data
            module's ``eval_resize``), kept so that prediction resizes files the same way; None
            (checkpoints from before it was stored): the short side resized bilinearly, no margin.

    Pretrained weights (``model.init_from``) are not loaded here: the training run loads them once
    into ``module.model``, so that rebuilding the module from a checkpoint does not need the file.
    The same holds for a distillation teacher (:meth:`distill_from`).
    """

    def __init__(
        self,
        model_name: str,
        model_kwargs: dict[str, Any],
        optim: dict[str, Any],
        loss: dict[str, Any],
        class_names: list[str],
        mean: list[float],
        std: list[float],
        finetune: dict[str, Any] | None = None,
        eval_resize: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.model = create_model(model_name, **model_kwargs)
        if finetune:
            freeze_parameters(self.model, finetune.get("freeze", "none"), finetune.get("last_n", 1))
        self._no_decay_names = no_weight_decay_names(self.model)  # before FSDP flattens the parameters
        self.num_classes = len(class_names)
        self.mixup = self._build_mixup(loss, self.num_classes)

        def metrics(prefix: str) -> MetricCollection:
            acc = {"acc": MulticlassAccuracy(self.num_classes, top_k=1, average="micro")}
            if self.num_classes > TOP5_MIN_CLASSES:
                acc["acc_top5"] = MulticlassAccuracy(self.num_classes, top_k=5, average="micro")
            return MetricCollection(acc, prefix=prefix)

        self.train_metrics, self.val_metrics, self.test_metrics = metrics("train/"), metrics("val/"), metrics("test/")
        self.test_confusion = MulticlassConfusionMatrix(self.num_classes)
        self.teacher: nn.Module | None = None  # see distill_from
        self.distill: tuple[str, float, float] = ("hard", 0.5, 1.0)

    @staticmethod
    def _build_mixup(loss: dict[str, Any], num_classes: int):
        if loss.get("mixup_alpha", 0) <= 0 and loss.get("cutmix_alpha", 0) <= 0:
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=loss.get("mixup_alpha", 0.0), cutmix_alpha=loss.get("cutmix_alpha", 0.0),
                     prob=loss.get("mix_prob", 1.0), label_smoothing=loss.get("label_smoothing", 0.0),
                     num_classes=num_classes)

    def distill_from(self, teacher: nn.Module, kind: str, alpha: float, tau: float) -> None:
        """Train the distillation head on ``teacher``'s predictions (DeiT; see ``vit.distill``): the
        loss becomes ``(1 - alpha) * label loss + alpha * distillation loss`` of ``kind`` ("hard" or
        "soft", at temperature ``tau``). ``teacher`` maps the student's batches to logits, frozen
        (``vit.distill.Teacher``). The model needs a distillation token (``model=<name>_distilled``).

        The teacher is kept as a plain attribute, not a submodule: it stays out of ``state_dict``
        (so of every checkpoint, and a module rebuilt from one needs no teacher), of
        ``parameters()`` (so of the optimizer) and of DDP's gradient synchronisation.
        """
        if getattr(self.model, "dist_token", None) is None:
            raise ConfigError(f"model {self.hparams.model_name!r} has no distillation token to learn from a "
                              f"teacher; use model={self.hparams.model_name}_distilled")
        self.__dict__["teacher"] = teacher  # bypasses nn.Module.__setattr__, which would register it
        self.distill = (kind, float(alpha), float(tau))

    @property
    def num_parameters(self) -> int:
        return count_parameters(self.model)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, C, H, W) -> logits (B, num_classes)."""
        return self.model(images)

    # -- steps --------------------------------------------------------------------------------------

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        soft_targets = None
        if self.mixup is not None and images.shape[0] % 2 == 0:  # timm's Mixup pairs samples up
            images, soft_targets = self.mixup(images, labels)
        if self.teacher is None:
            logits = label_logits = self(images)
        else:  # the class head learns from the labels, the distillation head from the teacher
            label_logits, dist_logits = self.model.forward_distill(images)
            logits = (label_logits + dist_logits) / 2  # what the model predicts (its forward), for the metrics
        if soft_targets is not None:
            loss = torch.sum(-soft_targets * F.log_softmax(label_logits.float(), dim=-1), dim=-1).mean()
        else:
            loss = F.cross_entropy(label_logits.float(), labels,
                                   label_smoothing=self.hparams.loss.get("label_smoothing", 0.0))
        if self.teacher is not None:  # the teacher sees the same (mixed) images as the student
            loss = combined_loss(loss, dist_logits.float(), self.teacher(images), *self.distill)
        if not torch.isfinite(loss):
            lr = self.trainer.optimizers[0].param_groups[0]["lr"]
            raise NonFiniteLossError(
                f"loss is {loss.item()} at global step {self.global_step} (learning rate {lr:.3g}); "
                f"lower optim.lr, keep trainer.gradient_clip_val set, or use trainer.precision=32-true")
        self.train_metrics.update(logits.detach(), labels)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=len(labels),
                 sync_dist=True)  # the mean over every rank, not rank zero's alone
        self.log_dict(self.train_metrics, on_step=False, on_epoch=True, batch_size=len(labels))
        return loss

    def _evaluate(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        images, labels = batch
        logits = self(images)
        loss = F.cross_entropy(logits.float(), labels)
        metrics = self.val_metrics if stage == "val" else self.test_metrics
        metrics.update(logits, labels)
        self.log(f"{stage}/loss", loss, on_epoch=True, prog_bar=True, batch_size=len(labels), sync_dist=True)
        self.log_dict(metrics, on_epoch=True, prog_bar=stage == "val", batch_size=len(labels))
        return logits

    def on_fit_start(self) -> None:
        """Put the teacher, if any, on this module's device, and refuse a monitored validation metric
        this module will not log, before the first step.

        The config check accepts any name in VALIDATION_METRICS; only here is the number of
        classes known, which decides whether val/acc_top5 exists. Lightning would notice it only
        when saving the first checkpoint, after a whole epoch.
        """
        if self.teacher is not None:  # not a submodule, so Lightning did not move it with the student
            self.teacher.to(self.device)
        logged = validation_metrics(self.num_classes)
        for callback in self.trainer.callbacks:
            monitor = callback.monitor if isinstance(callback, (ModelCheckpoint, EarlyStopping)) else None
            if monitor in VALIDATION_METRICS and monitor not in logged:
                raise ConfigError(f"callbacks.monitor={monitor!r} is not logged for {self.num_classes} classes; "
                                  f"choose one of {', '.join(logged)}")

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        logits = self._evaluate(batch, "test")
        self.test_confusion.update(logits, batch[1])

    def predict_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(images).softmax(dim=-1)

    # -- optimisation -------------------------------------------------------------------------------

    def configure_gradient_clipping(self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None,
                                    gradient_clip_algorithm: str | None = None) -> None:
        """Clip by the norm of the whole gradient, also when FSDP shards it.

        Under FSDP each rank holds a shard of every gradient, so ``clip_grad_norm_`` on the local
        parameters sees a partial norm (Lightning refuses it with ``gradient_clip_algorithm='norm'``);
        the root FSDP module's own ``clip_grad_norm_`` all-reduces the shards' norms first.
        """
        from torch.distributed.fsdp import FullyShardedDataParallel

        root = self.trainer.model if self._trainer is not None else None
        if (isinstance(root, FullyShardedDataParallel) and gradient_clip_val
                and gradient_clip_algorithm in (None, "norm")):
            root.clip_grad_norm_(gradient_clip_val)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Continue training from the raw weights of a checkpoint written with EMA (callbacks.ema), when
        this run has no EMA: such a checkpoint's ``state_dict`` is the average, the weights that trained
        are in ``current_model_state``. With EMA, its callback restores both."""
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if fitting and "current_model_state" in checkpoint and \
                not any(isinstance(c, WeightAveraging) for c in self.trainer.callbacks):
            checkpoint["state_dict"] = checkpoint["current_model_state"]

    def configure_optimizers(self) -> dict[str, Any]:
        optim = self.hparams.optim
        if optim.get("layer_decay") is not None:
            trainable = [(_unwrapped_name(name), param) for name, param in self.model.named_parameters()
                         if param.requires_grad]
            groups = layer_decay_groups(self.model, trainable, optim["lr"], optim["weight_decay"],
                                        optim["layer_decay"], self._no_decay_names)
        else:
            decay, no_decay = split_weight_decay(self.model, self._no_decay_names)
            groups = [{"params": decay, "weight_decay": optim["weight_decay"]},
                      {"params": no_decay, "weight_decay": 0.0}]
        if optim["name"] == "adamw":
            optimizer = torch.optim.AdamW(groups, lr=optim["lr"], betas=tuple(optim["betas"]))
        elif optim["name"] == "sgd":
            optimizer = torch.optim.SGD(groups, lr=optim["lr"], momentum=optim["momentum"], nesterov=True)
        else:
            raise ConfigError(f"unknown optimizer {optim['name']!r}; expected one of {', '.join(OPTIMIZERS)}")

        if optim["scheduler"] == "constant":
            return {"optimizer": optimizer}
        if optim["scheduler"] != "cosine":
            raise ConfigError(f"unknown scheduler {optim['scheduler']!r}; expected one of {', '.join(SCHEDULERS)}")
        total = max(1, int(self.trainer.estimated_stepping_batches))
        if optim.get("warmup_steps") is not None:
            warmup = optim["warmup_steps"]
        else:  # estimated_stepping_batches has sized the train loader by now
            steps_per_epoch = math.ceil(self.trainer.num_training_batches / self.trainer.accumulate_grad_batches)
            warmup = int(round(optim["warmup_epochs"] * steps_per_epoch))
        warmup = max(1, min(warmup, total))
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_cosine(step, warmup, total, optim["min_lr_ratio"]))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
