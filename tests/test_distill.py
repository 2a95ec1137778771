"""Distillation from a teacher: DeiT's hard and soft losses, and a teacher that stays frozen and
refuses data it was not trained for."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vit
from vit.distill import combined_loss, distillation_loss
from vit.teacher import load_teacher
from vit.errors import CheckpointError, ConfigError
from vit.export import save_weights

MEAN, STD = [0.1307], [0.3081]


def test_hard_distillation_is_cross_entropy_against_the_teachers_top_class():
    student, teacher = torch.randn(4, 10), torch.randn(4, 10)
    torch.testing.assert_close(distillation_loss(student, teacher, "hard", tau=1.0),
                               F.cross_entropy(student, teacher.argmax(1)))


def test_soft_distillation_is_the_tempered_kl_divergence_scaled_by_tau_squared():
    student, teacher, tau = torch.randn(4, 10), torch.randn(4, 10), 3.0
    p_teacher = torch.softmax(teacher / tau, dim=1)
    by_hand = (p_teacher * (p_teacher.log() - torch.log_softmax(student / tau, dim=1))).sum(1).mean() * tau**2
    torch.testing.assert_close(distillation_loss(student, teacher, "soft", tau), by_hand)
    assert distillation_loss(teacher, teacher, "soft", tau).abs() < 1e-6  # a perfect student


def test_alpha_weighs_labels_against_the_teacher():
    label_loss, student, teacher = torch.tensor(2.0), torch.randn(4, 10), torch.randn(4, 10)
    hard = distillation_loss(student, teacher, "hard", 1.0)
    torch.testing.assert_close(combined_loss(label_loss, student, teacher, "hard", 0.5, 1.0), 0.5 * 2.0 + 0.5 * hard)
    torch.testing.assert_close(combined_loss(label_loss, student, teacher, "hard", 0.0, 1.0), label_loss)


@pytest.fixture
def teacher_file(tmp_path):
    model = vit.create_model("cnn_mnist").eval()
    path = save_weights(model, tmp_path / "teacher.safetensors",
                        config={"model_name": "cnn_mnist", "model_kwargs": {}, "class_names": list("0123456789"),
                                "mean": MEAN, "std": STD})
    return path, model


def test_the_teacher_is_frozen_and_reads_the_students_normalisation(teacher_file):
    path, model = teacher_file
    teacher = load_teacher(path, num_classes=10, input_shape=(1, 28, 28))
    assert not any(p.requires_grad for p in teacher.parameters())
    teacher.train()
    assert not teacher.training and not teacher.model.training
    pixels = torch.rand(3, 1, 28, 28)
    student_mean, student_std = [0.5], [0.25]
    teacher.set_student_normalisation(student_mean, student_std)
    with torch.no_grad():
        expected = model((pixels - MEAN[0]) / STD[0])
    torch.testing.assert_close(teacher((pixels - 0.5) / 0.25), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("classes, shape, match", [
    (2, (1, 28, 28), r"trained for 10 classes on images \(1, 28, 28\), but the student has 2 classes"),
    (10, (3, 32, 32), r"but the student has 10 classes and images \(3, 32, 32\)"),
])
def test_a_teacher_for_other_data_is_refused_naming_both_shapes(teacher_file, classes, shape, match):
    with pytest.raises(ConfigError, match=match):
        load_teacher(teacher_file[0], num_classes=classes, input_shape=shape)


def test_a_missing_or_truncated_teacher_is_named(teacher_file, tmp_path):
    with pytest.raises(CheckpointError):
        load_teacher(tmp_path / "nothing.ckpt", 10, (1, 28, 28))
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(teacher_file[0].read_bytes()[:100])
    with pytest.raises(CheckpointError, match="truncated"):
        load_teacher(truncated, 10, (1, 28, 28))
