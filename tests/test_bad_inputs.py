"""The bad-input probe (issue #15): mistakes a user can make, each of which must stop the run
with one clear message that names the bad value, before any work: no traceback from deep
inside a library, no run that silently does something else.

Fast cases compose the config with Hydra's compose API and call ``vit.training.run`` in-process;
the slow ones go through ``train.py`` and check what a user sees: exit status 2, one line on
stderr starting with ``error:``, no traceback. The helpers at the top (``compose``, ``run_case``,
``train_py``) are meant for other files' cases too.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from omegaconf import DictConfig

from vit.conf_dir import conf_dir
from vit.config import as_schema, check_config, model_kwargs, register_configs
from vit.lightning_module import ImageClassifier
from vit.errors import CheckpointError, ConfigError
from vit.registry import create_model
from vit.training import run

REPO = Path(__file__).resolve().parents[1]
CONF = conf_dir()  # the checkout's conf/ (or an installed wheel's vit/conf)
EMBEDDED = REPO / "data"  # mnist5k ships with the repository

# Settings that keep a run tiny should a case get as far as training (it should not); the model
# ones apply to the default model, vit_mnist, and are left out when a case picks another model.
TINY = ("trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
        "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", "callbacks.epoch_summary=false")
TINY_VIT = ("model.depth=1", "model.embed_dim=16", "model.num_heads=2")


def compose(overrides: list[str] | tuple[str, ...] = (), config_name: str = "train") -> DictConfig:
    """The config ``python train.py OVERRIDES`` would run, composed from conf/ in-process."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return hydra_compose(config_name, overrides=[f"data.root={EMBEDDED}", *overrides])


def tiny(overrides: list[str] | tuple[str, ...]) -> list[str]:
    """``overrides`` after the tiny settings, so that the case's own win."""
    other_model = any(o.startswith("model=") for o in overrides)
    return [*TINY, *(() if other_model else TINY_VIT), *overrides]


def run_case(overrides: list[str] | tuple[str, ...], output_dir: Path) -> dict[str, Any]:
    """``run`` the composed config with tiny settings, writing into ``output_dir``."""
    cfg = compose(tiny(overrides))
    cfg.output_dir = str(output_dir)
    return run(cfg)


def train_py(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """``python train.py ARGS`` in a subprocess, as a user would type it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# -- config cases: refused by check_config, before the output folder exists -------------------------

# (overrides, expected exception, regex that the message must match: it names the bad value)
CONFIG_CASES = [
    # keys the schema does not define, added with + (item 6)
    (["+optim.lrr=1e-3"], ConfigError, r"optim\.lrr.*did you mean optim\.lr\b"),
    (["+data.batch_sise=32"], ConfigError, r"data\.batch_sise.*data\.batch_size"),
    (["+trainer.fast_dev_run=true"], ConfigError, r"trainer\.fast_dev_run.*valid keys of trainer"),
    (["+model.foo=1"], ConfigError, r"vit_mnist.*no argument.*'foo'"),
    (["+model.depht=2"], ConfigError, r"'depht'.*did you mean depth"),
    (["+foo=1"], ConfigError, r"unknown config key foo\b"),
    (["+seeds=1"], ConfigError, r"seeds.*did you mean seed\b"),
    (["+callbacks.monitr=val/loss"], ConfigError, r"callbacks\.monitr.*callbacks\.monitor"),
    (["+loss.label_smothing=0.1"], ConfigError, r"loss\.label_smothing.*loss\.label_smoothing"),
    (["+distributed.timeout=5"], ConfigError, r"distributed\.timeout\b.*distributed\.timeout_s"),
    (["+logger.wandb=true"], ConfigError, r"logger\.wandb"),
    (["+optim.lrr=1", "+data.batch_sise=2"], ConfigError, r"keys data\.batch_sise.*optim\.lrr"),
    (["model.name=vit_mnst"], ConfigError, r"'vit_mnst'.*vit_mnist"),
    # optimizer
    (["optim.lr=0"], ConfigError, r"optim\.lr must be a number > 0, got 0\.0"),
    (["optim.lr=-1e-3"], ConfigError, r"optim\.lr .*got -0\.001"),
    (["optim.lr=nan"], ConfigError, r"optim\.lr .*got nan"),
    (["optim.lr=inf"], ConfigError, r"optim\.lr .*got inf"),
    (["optim.name=adam"], ConfigError, r"optim\.name must be one of adamw, sgd.*got 'adam'"),
    (["optim.name=Adamw"], ConfigError, r"optim\.name .*got 'Adamw'"),
    (["optim.scheduler=cos"], ConfigError, r"optim\.scheduler .*cosine.*got 'cos'"),
    (["optim.scheduler=step"], ConfigError, r"optim\.scheduler .*got 'step'"),
    (["optim.weight_decay=-0.1"], ConfigError, r"optim\.weight_decay .*got -0\.1"),
    (["optim.betas=[0.9]"], ConfigError, r"optim\.betas must be two numbers .*\[0\.9\]"),
    (["optim.betas=[0.9,1.0]"], ConfigError, r"optim\.betas .*\[0\.9, 1\.0\]"),
    (["optim.name=sgd", "optim.momentum=0"], ConfigError, r"optim\.momentum .*got 0\.0"),
    (["optim.name=sgd", "optim.momentum=1.5"], ConfigError, r"optim\.momentum .*got 1\.5"),
    (["optim.warmup_epochs=-1"], ConfigError, r"optim\.warmup_epochs .*got -1\.0"),
    (["optim.warmup_steps=-5"], ConfigError, r"optim\.warmup_steps .*got -5"),
    (["optim.min_lr_ratio=2"], ConfigError, r"optim\.min_lr_ratio .*\[0, 1\], got 2\.0"),
    # loss
    (["loss.label_smoothing=1.5"], ConfigError, r"loss\.label_smoothing must be a number in \[0, 1\), got 1\.5"),
    (["loss.label_smoothing=-0.1"], ConfigError, r"loss\.label_smoothing .*got -0\.1"),
    (["loss.label_smoothing=1.0"], ConfigError, r"loss\.label_smoothing .*got 1\.0"),
    (["loss.mixup_alpha=-1"], ConfigError, r"loss\.mixup_alpha .*got -1\.0"),
    (["loss.cutmix_alpha=-0.5"], ConfigError, r"loss\.cutmix_alpha .*got -0\.5"),
    (["loss.mix_prob=1.5"], ConfigError, r"loss\.mix_prob .*got 1\.5"),
    # trainer
    (["trainer.precision=17"], ConfigError, r"trainer\.precision must be one of .*32-true.*got 17"),
    (["trainer.precision=fp16"], ConfigError, r"trainer\.precision .*got 'fp16'"),
    (["trainer.precision=bf32"], ConfigError, r"trainer\.precision .*bf16-mixed.*got 'bf32'"),
    (["trainer.max_epochs=0"], ConfigError, r"trainer\.max_epochs=0 would train nothing.*train=false"),
    (["trainer.max_epochs=-2"], ConfigError, r"trainer\.max_epochs .*got -2"),
    (["trainer.max_steps=0"], ConfigError, r"trainer\.max_steps=0 would train nothing"),
    (["trainer.max_steps=-5"], ConfigError, r"trainer\.max_steps .*got -5"),
    (["trainer.max_epochs=-1"], ConfigError, r"trainer\.max_epochs=-1 .*forever"),
    (["trainer.accelerator=tpuu"], ConfigError, r"trainer\.accelerator .*did you mean tpu.*got 'tpuu'"),
    (["trainer.devices=0"], ConfigError, r"trainer\.devices .*got 0\b"),
    (["trainer.devices=-1"], ConfigError, r"trainer\.devices .*accelerator=cpu, got -1"),
    (["trainer.devices=abc"], ConfigError, r"trainer\.devices .*got 'abc'"),
    (["trainer.devices=[0]"], ConfigError, r"trainer\.devices .*got \[0\]"),
    (["trainer.devices=1.5"], ConfigError, r"trainer\.devices .*got 1\.5"),
    (["trainer.strategy=dpp"], ConfigError, r"trainer\.strategy .*did you mean ddp.*got 'dpp'"),
    (["trainer.num_nodes=0"], ConfigError, r"trainer\.num_nodes .*got 0"),
    (["trainer.accumulate_grad_batches=0"], ConfigError, r"trainer\.accumulate_grad_batches .*got 0"),
    (["trainer.gradient_clip_val=-1"], ConfigError, r"trainer\.gradient_clip_val .*got -1\.0"),
    (["trainer.check_val_every_n_epoch=0"], ConfigError, r"trainer\.check_val_every_n_epoch .*got 0"),
    (["trainer.val_check_interval=2.0"], ConfigError, r"trainer\.val_check_interval .*\(0, 1\], got 2\.0"),
    (["trainer.val_check_interval=0"], ConfigError, r"trainer\.val_check_interval .*got 0"),
    (["trainer.limit_train_batches=0"], ConfigError, r"trainer\.limit_train_batches=0 would train on no batch"),
    (["trainer.limit_test_batches=0"], ConfigError, r"trainer\.limit_test_batches=0 .*test=false"),
    (["trainer.limit_val_batches=1.5"], ConfigError, r"trainer\.limit_val_batches .*got 1\.5"),
    (["trainer.limit_train_batches=-1"], ConfigError, r"trainer\.limit_train_batches .*got -1"),
    (["trainer.limit_train_batches=abc"], ConfigError, r"trainer\.limit_train_batches .*got 'abc'"),
    (["trainer.max_time=abc"], ConfigError, r"trainer\.max_time .*DD:HH:MM:SS.*got 'abc'"),
    (["trainer.max_time='01:00:00'"], ConfigError, r"trainer\.max_time .*got '01:00:00'"),
    (["trainer.log_every_n_steps=-1"], ConfigError, r"trainer\.log_every_n_steps .*got -1"),
    (["trainer.num_sanity_val_steps=-2"], ConfigError, r"trainer\.num_sanity_val_steps .*got -2"),
    (["trainer.deterministic=maybe"], ConfigError, r"trainer\.deterministic .*warn.*got 'maybe'"),
    # checkpointing and early stopping
    (["callbacks.monitor=val/accuracy"], ConfigError, r"callbacks\.monitor .*val/acc.*got 'val/accuracy'"),
    (["callbacks.monitor=val_acc"], ConfigError, r"callbacks\.monitor .*got 'val_acc'"),
    (["callbacks.monitor=train/loss"], ConfigError, r"callbacks\.monitor must be one of val/loss.*got 'train/loss'"),
    (["callbacks.mode=maxx"], ConfigError, r"callbacks\.mode .*got 'maxx'"),
    (["callbacks.monitor=val/loss"], ConfigError, r"callbacks\.mode=max with callbacks\.monitor=val/loss .*mode=min"),
    (["callbacks.mode=min"], ConfigError, r"callbacks\.mode=min with callbacks\.monitor=val/acc .*mode=max"),
    (["callbacks.save_top_k=-2"], ConfigError, r"callbacks\.save_top_k .*got -2"),
    (["callbacks.early_stopping_patience=-1"], ConfigError, r"callbacks\.early_stopping_patience .*got -1"),
    # the run as a whole
    (["seed=-5"], ConfigError, r"seed must be .*got -5"),
    (["seed=4294967296"], ConfigError, r"seed must be .*got 4294967296"),
    (["train=false", "test=false"], ConfigError, r"train=false and test=false"),
    (["train=false"], ConfigError, r"train=false needs ckpt_path"),
    (["distributed.timeout_s=0"], ConfigError, r"distributed\.timeout_s .*got 0\.0"),
    # data options (vit.data's checks, run up front)
    (["data.batch_size=0"], ConfigError, r"data\.batch_size .*got 0"),
    (["data.batch_size=-32"], ConfigError, r"data\.batch_size .*got -32"),
    (["data.name=mnist5"], ConfigError, r"'mnist5'.*mnist5k"),
    (["data.val_fraction=1.0"], ConfigError, r"data\.val_fraction .*got 1\.0"),
    (["data.num_workers=-1"], ConfigError, r"data\.num_workers .*got -1"),
    (["data.mode=disk"], ConfigError, r"data\.mode 'disk'"),
    (["data.img_size=0"], ConfigError, r"data\.img_size .*got 0"),
    (["data.img_size=30"], ConfigError, r"data\.img_size=30 but model 'vit_mnist' takes 28x28"),
    (["model=vit_cifar", "data.img_size=28"], ConfigError, r"data\.img_size=28 but model 'vit_cifar' takes 32x32"),
    # the model: built on the meta device up front, so its own checks speak first
    (["model.patch_size=5"], ConfigError, r"vit_mnist.*28 is not divisible by patch size 5"),
    (["model.img_size=30"], ConfigError, r"vit_mnist.*30 is not divisible by patch size 4"),
    (["model.num_heads=3"], ConfigError, r"embed_dim 16 is not divisible by num_heads 3"),
    (["model.depth=0"], ConfigError, r"depth must be a positive int, got 0"),
    (["model.embed_dim=-8"], ConfigError, r"embed_dim must be a positive int, got -8"),
    (["model.mlp_ratio=0"], ConfigError, r"mlp_ratio must be positive, got 0"),
    (["model.global_pool=max"], ConfigError, r"global_pool must be .*got 'max'"),
    (["model.pos_embed=rope"], ConfigError, r"pos_embed must be .*got 'rope'"),
    (["model.drop_path_rate=1.0"], ConfigError, r"drop_path_rate must be in \[0, 1\), got 1\.0"),
    (["model.class_token=false"], ConfigError, r"global_pool='token' needs class_token=True"),
    (["model.depth=2.5"], ConfigError, r"model\.depth must be int .*got 2\.5"),
    (["model.in_chans=0"], ConfigError, r"in_chans must be positive, got 0"),
    (["model=cnn_cifar", "model.img_size=4"], ConfigError, r"img_size must be >= 8, got 4"),
    # fine-tuning (issue #16): weights, frozen layers, layer decay, EMA, the data's normalisation
    (["+model.init_frm=w.pth"], ConfigError, r"'init_frm'.*did you mean init_from"),
    (["model=cnn_mnist", "model.init_from=w.pth"], ConfigError,
     r"model\.init_from=w\.pth: model 'cnn_mnist' \(SmallCNN\) does not load pretrained ViT weights"),
    (["optim.layer_decay=0"], ConfigError, r"optim\.layer_decay must be a number in \(0, 1\], got 0\.0"),
    (["optim.layer_decay=1.5"], ConfigError, r"optim\.layer_decay .*got 1\.5"),
    (["model=cnn_mnist", "optim.layer_decay=0.75"], ConfigError,
     r"optim\.layer_decay=0\.75 with model 'cnn_mnist': SmallCNN has no transformer blocks"),
    (["finetune.freeze=head"], ConfigError, r"finetune\.freeze must be one of none, backbone, all_but_last_n.*'head'"),
    (["finetune.freeze=backbon"], ConfigError, r"finetune\.freeze .*did you mean backbone"),
    (["finetune.last_n=0"], ConfigError, r"finetune\.last_n must be an integer >= 1 .*got 0"),
    (["finetune.freeze=all_but_last_n", "finetune.last_n=2"], ConfigError,
     r"finetune\.freeze=all_but_last_n with model 'vit_mnist': finetune\.last_n must be in \[1, 1\].*got 2"),
    (["model=cnn_mnist", "finetune.freeze=backbone"], ConfigError,
     r"finetune\.freeze=backbone with model 'cnn_mnist': SmallCNN has no get_classifier"),
    (["callbacks.ema_decay=1.0"], ConfigError, r"callbacks\.ema_decay must be a number in \(0, 1\), got 1\.0"),
    (["callbacks.ema_decay=0"], ConfigError, r"callbacks\.ema_decay .*got 0\.0"),
    (["callbacks.ema=true", "trainer.strategy=fsdp"], ConfigError, r"callbacks\.ema=true with trainer\.strategy=fsdp"),
    (["data.mean=[0.5]"], ConfigError, r"data\.mean is set but data\.std is not"),
    (["data.mean=[0.5]", "data.std=[0.2,0.2]"], ConfigError, r"one value per channel each, got 1 and 2"),
    (["data.mean=[0.5]", "data.std=[0]"], ConfigError, r"data\.std must be > 0 .*\[0\.0\]"),
    (["data.crop_pct=0.9"], ConfigError, r"data\.crop_pct applies to image folders.*'mnist5k'"),
    (["data=imagefolder", "data.crop_pct=1.5"], ConfigError, r"data\.crop_pct must be in \(0, 1\].*got 1\.5"),
    (["data=imagefolder", "data.interpolation=cubic"], ConfigError, r"data\.interpolation 'cubic'.*'bicubic'"),
    # data-efficient training (issue #17): distillation, precision auto, AutoAugment
    (["distill.type=medium"], ConfigError, r"distill\.type must be one of hard, soft.*got 'medium'"),
    (["distill.type=Hard"], ConfigError, r"distill\.type .*did you mean hard.*got 'Hard'"),
    (["distill.alpha=1.5"], ConfigError, r"distill\.alpha must be a number in \[0, 1\], got 1\.5"),
    (["distill.alpha=-0.1"], ConfigError, r"distill\.alpha .*got -0\.1"),
    (["distill.alpha=nan"], ConfigError, r"distill\.alpha .*got nan"),
    (["distill.tau=0"], ConfigError, r"distill\.tau must be a number > 0, got 0\.0"),
    (["distill.tau=-2"], ConfigError, r"distill\.tau .*got -2\.0"),
    (["distill.teacher_ckpt=t.ckpt"], ConfigError,
     r"distill\.teacher_ckpt=t\.ckpt needs a student with a distillation token, which model 'vit_mnist' has not: "
     r"use model=vit_mnist_distilled"),
    (["model=cct_mnist", "distill.teacher_ckpt=t.ckpt"], ConfigError,
     r"model 'cct_mnist' has not: use a model that has one \(.*vit_mnist_distilled"),
    (["model=vit_mnist_distilled", "distill.teacher_ckpt=''"], ConfigError,
     r"distill\.teacher_ckpt must be a checkpoint path, latest:MODEL or null.*got ''"),
    (["model=vit_mnist_distilled", "distill.teacher_ckpt=latest:cnn_mnst"], ConfigError,
     r"distill\.teacher_ckpt=latest:cnn_mnst must be one of .*did you mean cnn_mnist"),
    (["model=vit_mnist_distilled", "distill.teacher_ckpt=no/such/teacher.ckpt"], CheckpointError,
     r"distill\.teacher_ckpt=no/such/teacher\.ckpt: checkpoint not found"),
    (["model=vit_mnist_distilled", "distill.teacher_ckpt=latest:cnn_mnist"], CheckpointError,
     r"distill\.teacher_ckpt=latest:cnn_mnist: no folder beside this run .*cnn_mnist run on data 'mnist5k'"),
    (["trainer.precision=autoo"], ConfigError, r"trainer\.precision .*did you mean auto.*got 'autoo'"),
    (["data.autoaugment=cifar"], ConfigError, r"data\.autoaugment 'cifar'.*cifar10, imagenet, svhn"),
    (["data.autoaugment=cifar10", "data.randaugment_ops=2"], ConfigError,
     r"data\.autoaugment=cifar10 and data\.randaugment_ops=2 are two augmentation policies"),
]


@pytest.mark.parametrize("overrides, error, pattern", CONFIG_CASES, ids=[" ".join(c[0]) for c in CONFIG_CASES])
def test_a_bad_config_is_refused_before_any_work(tmp_path, overrides, error, pattern):
    out = tmp_path / "run"
    with pytest.raises(error, match=pattern):
        run_case(overrides, out)
    assert not out.exists(), "refused only after the run started"


@pytest.mark.skipif(torch.cuda.is_available(), reason="the machine has a GPU")
def test_asking_for_a_gpu_without_one_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"trainer\.accelerator=gpu but torch sees no CUDA GPU"):
        run_case(["trainer.accelerator=gpu"], tmp_path / "run")


# -- cases that need the data: refused after the data module is set up, before the first step -------

DATA_CASES = [
    (["model.in_chans=3"], ConfigError, r"expects in_chans=3 but dataset 'mnist5k' has 1-channel images"),
    (["model=vit_cifar"], ConfigError, r"'vit_cifar' expects in_chans=3 .*1-channel"),
    (["model.num_classes=5"], ConfigError, r"model\.num_classes=5 but dataset 'mnist5k' has 10 classes"),
    (["model=linear_mnist", "model.num_classes=2"], ConfigError, r"model\.num_classes=2 .*10 classes"),
    (["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"], ConfigError,
     r"data\.mean=\[0\.5, 0\.5, 0\.5\] has 3 value\(s\), but 'mnist5k' has 1-channel images"),
]


@pytest.mark.parametrize("overrides, error, pattern", DATA_CASES, ids=[" ".join(c[0]) for c in DATA_CASES])
def test_a_model_that_does_not_fit_the_data_is_refused_before_training(tmp_path, overrides, error, pattern):
    out = tmp_path / "run"
    with pytest.raises(error, match=pattern):
        run_case(overrides, out)
    assert not (out / "checkpoints").exists()


# -- the teacher's file (distill.teacher_ckpt): refused before the first step, naming it ----------------

DISTILLED_STUDENT = ("model=vit_mnist_distilled", *TINY_VIT)


def _save_teacher(path: Path, model: str, num_classes: int, class_names: list[str] | None = None,
                  channels: int = 1) -> Path:
    """A checkpoint such as a run leaves, of an untrained classifier: its hyperparameters and weights."""
    module = ImageClassifier(model, {"num_classes": num_classes}, optim={}, loss={},
                             class_names=class_names or [str(i) for i in range(num_classes)],
                             mean=[0.5] * channels, std=[0.25] * channels)
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def _truncated(path: Path) -> Path:
    whole = _save_teacher(path.with_suffix(".whole"), "cnn_mnist", 10).read_bytes()
    path.write_bytes(whole[: len(whole) // 3])
    return path


def _pickled_code(path: Path) -> Path:
    torch.save(torch.nn.Linear(2, 2), path)  # a whole module: loading it would run pickled code
    return path


def _foreign(path: Path) -> Path:
    torch.save({"weights": torch.zeros(3)}, path)
    return path


FASHION = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]

# (id, writes the teacher file, before any work (no run folder), exception, message)
TEACHER_CASES: list[tuple[str, Callable[[Path], Path], bool, type[Exception], str]] = [
    ("truncated", _truncated, True, CheckpointError, r"distill\.teacher_ckpt=.*teacher\.ckpt: refusing to load"),
    ("pickled code", _pickled_code, True, CheckpointError,
     r"distill\.teacher_ckpt=.*refusing to load .*weights_only=True"),
    ("not a vit checkpoint", _foreign, True, CheckpointError,
     r"distill\.teacher_ckpt=.*not a checkpoint written by vit"),
    ("two classes", lambda p: _save_teacher(p, "cnn_mnist", 2), False, ConfigError,
     r"was trained for 2 classes on images \(1, 28, 28\), but the student has 10 classes and images \(1, 28, 28\)"),
    ("colour images", lambda p: _save_teacher(p, "cnn_cifar", 10, channels=3), False, ConfigError,
     r"was trained for 10 classes on images \(3, 32, 32\), but the student has 10 classes and images \(1, 28, 28\)"),
    ("other classes", lambda p: _save_teacher(p, "cnn_mnist", 10, FASHION), False, ConfigError,
     r"trained on other classes: class 0 is 'T-shirt/top' for the teacher but '0 - zero' in the student's data"),
]


@pytest.mark.parametrize("write, before_any_work, error, pattern", [c[1:] for c in TEACHER_CASES],
                         ids=[c[0] for c in TEACHER_CASES])
def test_a_bad_teacher_is_refused_before_the_first_step(tmp_path, write, before_any_work, error, pattern):
    teacher = write(tmp_path / "teacher.ckpt")
    out = tmp_path / "run"
    with pytest.raises(error, match=pattern):
        run_case([*DISTILLED_STUDENT, f"distill.teacher_ckpt={teacher}"], out)
    if before_any_work:
        assert not out.exists(), "the file was read only after the run started"
    else:  # the data had to be read to know its classes; nothing else happened
        assert not out.exists() or not [p for p in out.rglob("*") if p.suffix != ".log"]


# -- direct calls: the same checks for code that builds configs or models itself -------------------

CALL_CASES: list[tuple[str, Callable[[], Any], type[Exception], str]] = [
    ("dict with unknown key", lambda: as_schema({"optim": {"lrr": 1}}), ConfigError, r"optim\.lrr.*optim\.lr\b"),
    ("dict with unknown top key", lambda: as_schema({"epochs": 3}), ConfigError, r"unknown config key epochs"),
    ("dict with a string lr", lambda: as_schema({"optim": {"lr": "fast"}}), ConfigError, r"optim\.lr.*'fast'"),
    ("dict with text epochs", lambda: as_schema({"trainer": {"max_epochs": "ten"}}), ConfigError,
     r"trainer\.max_epochs.*'ten'"),
    ("dict without a model", lambda: check_config(as_schema({})), ConfigError, r"no model chosen.*vit_mnist"),
    ("model kwargs without name", lambda: model_kwargs({"depth": 2}), ValueError, r"needs a 'name'"),
    ("model kwargs of wrong type", lambda: model_kwargs({"name": "vit_mnist", "depth": "deep"}), ValueError,
     r"model\.depth must be int .*'deep'"),
    ("model kwargs unknown", lambda: model_kwargs({"name": "vit_mnist", "heads": 2}), ValueError,
     r"'heads'.*did you mean num_heads"),
    ("create unknown model", lambda: create_model("vit_mnistt"), ValueError, r"'vit_mnistt'.*vit_mnist"),
    ("create with unknown argument", lambda: create_model("vit_mnist", foo=1), ValueError, r"'foo'"),
    ("create with bad patch", lambda: create_model("vit_mnist", patch_size=5), ValueError, r"patch size 5"),
    ("create with bad heads", lambda: create_model("vit_mnist", num_heads=5), ValueError, r"num_heads 5"),
    ("create with bad size", lambda: create_model("vit_mnist", img_size=(28, 30)), ValueError, r"30"),
]


@pytest.mark.parametrize("call, error, pattern", [c[1:] for c in CALL_CASES], ids=[c[0] for c in CALL_CASES])
def test_a_bad_call_is_refused_by_name(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


def test_the_probe_is_large_enough():
    assert len(CONFIG_CASES) + len(DATA_CASES) + len(CALL_CASES) + len(TEACHER_CASES) >= 100


# -- end to end: what a user sees ---------------------------------------------------------------------

E2E_CASES = [
    # One case per way a run is refused (each also has an in-process case above): a key the
    # schema lacks, a value the model refuses, a file that is not there. Each case starts Python,
    # torch and Lightning (about 10 s), so the table stays short.
    (["+optim.lrr=1e-3"], r"optim\.lrr.*optim\.lr\b"),
    (["model.patch_size=5"], r"patch size 5"),
    (["model=vit_mnist_distilled", "distill.teacher_ckpt=missing.ckpt"], r"distill\.teacher_ckpt=missing\.ckpt: "
     r"checkpoint not found"),
]


@pytest.mark.slow
@pytest.mark.parametrize("overrides, pattern", E2E_CASES, ids=[" ".join(c[0]) for c in E2E_CASES])
def test_train_py_stops_with_one_message_and_status_2(tmp_path, overrides, pattern):
    done = train_py(*tiny(overrides), f"data.root={EMBEDDED}", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 2, done.stderr[-2000:]
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and re.search(pattern, errors[0]), done.stderr[-2000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert not (tmp_path / "checkpoints").exists()
