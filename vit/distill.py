"""Distillation from a teacher (DeiT, Touvron et al. 2021): a ViT student learns from a CNN's predictions.

A distilled student (``distilled=True``) has a second token and head. The class head learns
from the labels; the distillation head learns from the teacher:

* ``hard``: the teacher's top class is the distillation head's label (DeiT's best variant);
* ``soft``: the distillation head matches the teacher's softened distribution (Hinton et al.):
  the KL divergence between the two at temperature ``tau``, times ``tau ** 2`` so that its
  gradients keep their size whatever the temperature.

``loss = (1 - alpha) * label_loss + alpha * distillation_loss``. A CNN teacher passes on the
locality a small ViT cannot learn from few images. The teacher is any classifier this package
trained (``RUN/checkpoints/best.ckpt`` or its safetensors export), frozen: eval mode, no
gradients, never saved with the student.

A training run (``distill.*``, vit/training.py) reads the teacher's file before any work and
checks it against the data once the data module knows its classes and image shape
(:mod:`vit.teacher`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

DISTILL_TYPES = ("hard", "soft")
# distill.teacher_ckpt=latest:MODEL: the best checkpoint of the newest finished MODEL run beside this one.
LATEST = "latest:"


def distillation_loss(dist_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, tau: float
                      ) -> torch.Tensor:
    """The distillation head's loss against the teacher. Both logits (B, num_classes); a scalar."""
    if kind == "hard":
        return F.cross_entropy(dist_logits, teacher_logits.argmax(dim=-1))
    student = F.log_softmax(dist_logits / tau, dim=-1)
    teacher = F.log_softmax(teacher_logits / tau, dim=-1)
    return F.kl_div(student, teacher, reduction="batchmean", log_target=True) * tau**2


def combined_loss(label_loss: torch.Tensor, dist_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                  alpha: float, tau: float) -> torch.Tensor:
    """``(1 - alpha) * label_loss + alpha * distillation_loss``."""
    return (1 - alpha) * label_loss + alpha * distillation_loss(dist_logits, teacher_logits, kind, tau)


class Teacher(nn.Module):
    """A frozen classifier that reads the student's normalised images: (B, C, H, W) -> logits.

    The student's batches are normalised with the student's statistics; the teacher was trained
    with its own. ``set_student_normalisation`` tells it the student's, so that it can undo them
    and apply its own.
    """

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1))
        self.register_buffer("student_mean", self.mean.clone())
        self.register_buffer("student_std", self.std.clone())

    def set_student_normalisation(self, mean: list[float], std: list[float]) -> None:
        self.student_mean.copy_(torch.tensor(mean).view(1, -1, 1, 1))
        self.student_std.copy_(torch.tensor(std).view(1, -1, 1, 1))

    def train(self, mode: bool = True) -> "Teacher":
        return super().train(False)  # always in eval mode: no dropout, fixed statistics

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        pixels = images * self.student_std + self.student_mean
        return self.model((pixels - self.mean) / self.std).float()
