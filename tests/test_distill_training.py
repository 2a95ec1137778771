"""Distillation in a training run (issue #17): ``distill.teacher_ckpt`` loads a frozen teacher once
per run, the distilled student's second head learns from it, and nothing of the teacher reaches
the student's checkpoint. Also ``trainer.precision=auto``, which the recipes use."""
from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_bad_inputs import run_case
from vit.distill import combined_loss
from vit.teacher import resolve_teacher_ckpt
from vit.errors import CheckpointError
from vit.inference import load_classifier
from vit.lightning_module import ImageClassifier
from vit.preflight import resolve_precision

# costly module-scoped fixtures: one worker runs them all, once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_distill_training")

# A distilled student small enough to train in seconds: vit_mnist_distilled with one narrow block.
STUDENT = ("model=vit_mnist_distilled", "model.depth=1", "model.embed_dim=16", "model.num_heads=2")


@pytest.fixture(scope="module")
def teacher_ckpt(tmp_path_factory) -> Path:
    """A cnn_mnist teacher trained for two batches of the embedded digits (run_case's tiny settings)."""
    results = run_case(["model=cnn_mnist"], tmp_path_factory.mktemp("teacher") / "run")
    return Path(results["best_checkpoint"])


def test_a_distilled_run_learns_from_the_teacher_and_saves_only_the_student(teacher_ckpt, tmp_path):
    # A copy that is deleted after training: a module rebuilt from the checkpoint must not need it.
    teacher = tmp_path / "teacher.ckpt"
    shutil.copy(teacher_ckpt, teacher)
    out = tmp_path / "student"
    results = run_case([*STUDENT, f"distill.teacher_ckpt={teacher}", "distill.type=soft", "distill.alpha=0.3",
                        "distill.tau=2.0"], out)
    teacher.unlink()

    assert results["distill"] == {"teacher_ckpt": str(teacher), "teacher_model": "cnn_mnist", "type": "soft",
                                  "alpha": 0.3, "tau": 2.0}
    assert json.loads((out / "results.json").read_text())["distill"] == results["distill"]
    assert math.isfinite(results["test_loss"])
    train_losses = [float(value) for value in _column(out / "metrics.csv", "train/loss_epoch")]
    assert train_losses and all(math.isfinite(loss) for loss in train_losses)

    for checkpoint_file in (Path(results["best_checkpoint"]), out / "checkpoints" / "last.ckpt"):
        checkpoint = torch.load(checkpoint_file, weights_only=True)
        keys = list(checkpoint["state_dict"])
        assert keys and all(key.startswith("model.") for key in keys), keys
        assert not any("teacher" in key for key in keys)
        assert "teacher" not in json.dumps(checkpoint["hyper_parameters"])
    rebuilt = load_classifier(results["best_checkpoint"])  # the teacher's file is gone
    assert rebuilt.teacher is None and rebuilt.model.dist_token is not None


def _column(metrics_csv: Path, name: str) -> list[str]:
    """The non-empty values of one column of metrics.csv, as text."""
    lines = metrics_csv.read_text().splitlines()
    index = lines[0].split(",").index(name)
    return [row.split(",")[index] for row in lines[1:] if row.split(",")[index]]


def test_train_false_tests_the_checkpoint_without_loading_the_teacher(teacher_ckpt, tmp_path):
    student = run_case([*STUDENT, f"distill.teacher_ckpt={teacher_ckpt}"], tmp_path / "student")
    tested = run_case([*STUDENT, "train=false", f"ckpt_path={student['best_checkpoint']}",
                       "distill.teacher_ckpt=no/such/teacher.ckpt"], tmp_path / "test")
    assert tested["distill"] is None and tested["test_acc"] == pytest.approx(student["test_acc"])


class RecordingTeacher(nn.Module):
    """Fixed logits for any batch; remembers the images it was given."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits
        self.seen: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self.seen.append(images.clone())
        return self.logits


def student(loss: dict | None = None) -> ImageClassifier:
    return ImageClassifier("vit_mnist_distilled", {"depth": 1, "embed_dim": 16, "num_heads": 2},
                           optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                  "scheduler": "constant"},
                           loss=loss or {}, class_names=[str(i) for i in range(10)], mean=[0.5], std=[0.5])


# training_step called without a Trainer: its self.log calls warn and do nothing.
NO_TRAINER = pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")


@NO_TRAINER
@pytest.mark.parametrize("kind", ["hard", "soft"])
def test_the_training_loss_is_the_label_loss_and_the_teachers_weighed_by_alpha(kind):
    module = student({"label_smoothing": 0.1})
    images, labels = torch.randn(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
    teacher = RecordingTeacher(torch.randn(4, 10))
    module.distill_from(teacher, kind, alpha=0.25, tau=2.0)
    loss = module.training_step((images, labels), 0)

    cls_logits, dist_logits = module.model.forward_distill(images)
    label_loss = F.cross_entropy(cls_logits, labels, label_smoothing=0.1)
    expected = combined_loss(label_loss, dist_logits, teacher.logits, kind, 0.25, 2.0)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(teacher.seen[0], images)
    assert "teacher" not in module.state_dict() and not any("teacher" in key for key in module.state_dict())
    assert sum(p.numel() for p in module.parameters()) == module.num_parameters  # the teacher's are not there


@NO_TRAINER
def test_with_mixup_the_teacher_sees_the_mixed_images_the_student_sees():
    module = student({"mixup_alpha": 0.8, "cutmix_alpha": 0.0})
    teacher = RecordingTeacher(torch.randn(4, 10))
    module.distill_from(teacher, "hard", alpha=0.5, tau=1.0)
    seen_by_student: list[torch.Tensor] = []
    forward_distill = module.model.forward_distill
    module.model.forward_distill = lambda x: (seen_by_student.append(x.clone()), forward_distill(x))[1]
    images = torch.randn(4, 1, 28, 28)
    module.training_step((images.clone(), torch.tensor([0, 1, 2, 3])), 0)
    assert not torch.equal(seen_by_student[0], images)  # mixed
    torch.testing.assert_close(teacher.seen[0], seen_by_student[0])


def test_validation_uses_the_averaged_heads():
    module = student()
    module.distill_from(RecordingTeacher(torch.zeros(2, 10)), "hard", 0.5, 1.0)
    images = torch.randn(2, 1, 28, 28)
    cls_logits, dist_logits = module.model.forward_distill(images)
    torch.testing.assert_close(module(images), (cls_logits + dist_logits) / 2)


def test_a_student_without_a_distillation_token_is_refused():
    module = ImageClassifier("vit_mnist", {"depth": 1, "embed_dim": 16, "num_heads": 2},
                             optim={}, loss={}, class_names=list("0123456789"), mean=[0.5], std=[0.5])
    with pytest.raises(ValueError, match=r"no distillation token.*model=vit_mnist_distilled"):
        module.distill_from(RecordingTeacher(torch.zeros(1, 10)), "hard", 0.5, 1.0)


# -- distill.teacher_ckpt=latest:MODEL -----------------------------------------------------------------

def _finished_run(folder: Path, model: str, data: str, interrupted: bool = False) -> Path:
    """A run folder as Hydra and vit.training leave it: .hydra/config.yaml, results.json, a checkpoint."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / ".hydra" / "config.yaml").write_text(f"model:\n  name: {model}\ndata:\n  name: {data}\n")
    best = folder / "checkpoints" / "epoch001-step10.ckpt"
    best.parent.mkdir()
    best.write_bytes(b"weights")
    (folder / "results.json").write_text(json.dumps({"best_checkpoint": "/elsewhere/checkpoints/" + best.name,
                                                     "interrupted": interrupted}))
    return best


def test_latest_takes_the_newest_finished_teacher_run_on_the_same_data(tmp_path):
    sweep = tmp_path / "sweep"
    older = _finished_run(sweep / "0_cnn", "cnn_cifar", "cifar2")
    newer = _finished_run(sweep / "1_cnn", "cnn_cifar", "cifar2")
    newer.touch()
    _finished_run(sweep / "2_other_data", "cnn_cifar", "cifar10")
    _finished_run(sweep / "3_other_model", "vit_cifar", "cifar2")
    _finished_run(sweep / "4_interrupted", "cnn_cifar", "cifar2", interrupted=True)
    assert older != newer
    assert resolve_teacher_ckpt("latest:cnn_cifar", sweep / "5_student", "cifar2") == newer
    assert resolve_teacher_ckpt("some/file.ckpt", sweep / "5_student", "cifar2") == Path("some/file.ckpt")
    with pytest.raises(CheckpointError, match=r"latest:cnn_mnist: no folder beside this run .*cnn_mnist run on data "
                                              r"'cifar2'.*list its job before this one"):
        resolve_teacher_ckpt("latest:cnn_mnist", sweep / "5_student", "cifar2")


# -- trainer.precision=auto --------------------------------------------------------------------------------

@pytest.mark.parametrize("capabilities, expected", [
    ({"avx512_bf16": True, "amx_bf16": False}, "bf16-mixed"),
    ({"avx512_bf16": False, "amx_bf16": True}, "bf16-mixed"),
    ({"avx512_bf16": False, "amx_bf16": False, "avx2": True}, "32-true"),
    ({}, "32-true"),
])
def test_auto_precision_is_bf16_only_on_a_cpu_that_computes_in_bf16(monkeypatch, capabilities, expected):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    precision, why = resolve_precision("auto", torch.device("cpu"))
    assert precision == expected and why
    assert resolve_precision("bf16-mixed", torch.device("cpu")) == ("bf16-mixed", "as configured")


@pytest.mark.parametrize("supported, expected", [(True, "bf16-mixed"), (False, "32-true")])
def test_auto_precision_on_a_gpu_follows_its_bf16_support(monkeypatch, supported, expected):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: supported)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *args, **kwargs: "a GPU")
    assert resolve_precision("auto", torch.device("cuda"))[0] == expected


def test_a_run_resolves_auto_before_lightning_and_records_the_result(monkeypatch, tmp_path, caplog):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx2": True})
    with caplog.at_level(logging.INFO, logger="vit"):
        results = run_case(["trainer.precision=auto"], tmp_path / "run")
    assert results["precision"] == "32-true"
    assert json.loads((tmp_path / "run" / "results.json").read_text())["precision"] == "32-true"
    said = "trainer.precision=auto: 32-true, because this CPU has neither avx512_bf16 nor amx_bf16"
    assert any(said in record.getMessage() for record in caplog.records)
