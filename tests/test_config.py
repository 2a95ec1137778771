"""The configuration is checked whole before any work (issue #15, items 6, 7 and 9): keys the
schema lacks, values a run cannot use, models that do not fit their data, and sweeps in which
one bad job must not stop the others."""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from lightning.pytorch.callbacks import ModelCheckpoint
from omegaconf import OmegaConf
from torch.utils.data import DataLoader, TensorDataset

from test_bad_inputs import CONF, EMBEDDED, TINY, TINY_VIT, compose, error_lines, run_case, train_py
from vit.config import TrainConfig, as_schema, check_config, register_configs
from vit.data.arrays import BatchTransform, TensorImageDataset
from vit.errors import ConfigError, UserError
from vit.lightning_module import VALIDATION_METRICS, ImageClassifier, validation_metrics
from vit.preflight import match_model_to_data
from vit.sweep import FAILURE_FILE, SweepFailures

# -- item 6: keys the schema does not define ----------------------------------------------------------


@pytest.mark.parametrize("override, named", [
    ("+trainer.fast_dev_run=true", r"trainer\.fast_dev_run"),
    ("+optim.lrr=1e-3", r"optim\.lrr \(did you mean optim\.lr\?\)"),
    ("+data.batch_sise=32", r"data\.batch_sise \(did you mean data\.batch_size"),
    ("+model.foo=1", r"'foo'"),
])
def test_a_key_added_with_plus_is_refused_by_name(tmp_path, override, named):
    with pytest.raises(ConfigError, match=named):
        run_case([override], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_check_config_refuses_keys_that_a_merge_kept():
    """However the config was merged onto the schema, check_config looks at every key."""
    cfg = OmegaConf.merge(OmegaConf.structured(TrainConfig), compose(["+trainer.fast_dev_run=true"]))
    assert "fast_dev_run" in cfg.trainer
    with pytest.raises(ConfigError, match=r"unknown config key trainer\.fast_dev_run"):
        check_config(cfg)


def test_the_merge_onto_the_schema_refuses_what_hydra_added():
    """Hydra adds a ``+`` key even to a typed node, and OmegaConf's merge keeps keys a typed
    source already holds: the merge must start from plain values to catch them."""
    typed = OmegaConf.structured(TrainConfig)
    OmegaConf.update(typed, "optim.lrr", 1.0, force_add=True)  # what Hydra does for +optim.lrr=1.0
    assert "lrr" in OmegaConf.merge(OmegaConf.structured(TrainConfig), typed).optim
    with pytest.raises(ConfigError, match=r"optim\.lrr \(did you mean optim\.lr\?\)"):
        as_schema(typed)


def test_hydra_keys_still_work():
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = hydra_compose("train", overrides=["hydra.job.name=probe", f"data.root={EMBEDDED}"],
                            return_hydra_config=True)
    assert cfg.hydra.job.name == "probe"
    check_config(as_schema(cfg))


# Options that need a file named on the command line: the shards folder, the CIFAR-10 subset.
NEEDS_PATH = {"shards": "data.path=shards_folder", "cifar10_small": "data.path=cifar10_subset.npz",
              "pretrain_cifar64": "data.path=cifar10_subset.npz"}


def shipped_configs() -> list[list[str]]:
    """One composition per config file in conf/: each group option, each experiment, each recipe
    (a group that train.yaml does not list: the compare_* sweeps add it with +recipe=NAME)."""
    runs = []
    for group in ("model", "data", "optim", "trainer", "logger", "callbacks", "experiment", "debug", "hparams_search",
                  "recipe"):
        for path in sorted((CONF / group).glob("*.yaml")):
            needs = [value for key, value in NEEDS_PATH.items() if key in path.stem]
            runs.append([f"{'+' if group == 'recipe' else ''}{group}={path.stem}"] + needs)
    return runs


@pytest.mark.parametrize("overrides", shipped_configs(), ids=lambda o: o[0])
def test_every_shipped_config_passes_the_checks(overrides):
    cfg = as_schema(compose(overrides))
    if cfg.trainer.accelerator == "gpu" and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            check_config(cfg)
    else:
        check_config(cfg)


# -- item 7: values that a run cannot use ----------------------------------------------------------


def test_max_epochs_zero_is_refused_rather_than_testing_an_untrained_model(tmp_path):
    with pytest.raises(ConfigError, match=r"max_epochs=0 would train nothing.*train=false ckpt_path=PATH"):
        run_case(["trainer.max_epochs=0"], tmp_path / "run")
    assert not (tmp_path / "run").exists()


def tiny_classifier(num_classes: int) -> ImageClassifier:
    return ImageClassifier("vit_mnist", {"depth": 1, "embed_dim": 16, "num_heads": 2, "num_classes": num_classes},
                           optim={"name": "adamw", "lr": 1e-3, "weight_decay": 0.0, "betas": [0.9, 0.999],
                                  "scheduler": "constant"},
                           loss={}, class_names=[str(i) for i in range(num_classes)], mean=[0.5], std=[0.5])


def digits_loader(num_classes: int) -> DataLoader:
    images = torch.randn(8, 1, 28, 28)
    return DataLoader(TensorDataset(images, torch.arange(8) % num_classes), batch_size=4)


def quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                     **kwargs)


@pytest.mark.parametrize("num_classes", [2, 10])
def test_the_monitorable_metrics_are_what_the_module_logs(num_classes):
    trainer = quiet_trainer(enable_checkpointing=False)
    trainer.validate(tiny_classifier(num_classes), dataloaders=digits_loader(num_classes), verbose=False)
    logged = {name for name in trainer.callback_metrics if name.startswith("val/")}
    assert logged == set(validation_metrics(num_classes)) <= set(VALIDATION_METRICS)


def test_monitoring_top5_with_two_classes_stops_before_the_first_step(tmp_path):
    module = tiny_classifier(2)
    trainer = quiet_trainer(max_epochs=1, default_root_dir=tmp_path,
                            callbacks=[ModelCheckpoint(dirpath=tmp_path, monitor="val/acc_top5", mode="max")])
    with pytest.raises(ConfigError, match=r"callbacks\.monitor='val/acc_top5' is not logged for 2 classes"):
        trainer.fit(module, train_dataloaders=digits_loader(2), val_dataloaders=digits_loader(2))
    assert trainer.global_step == 0 and not list(tmp_path.glob("*.ckpt"))


def write_npz(path: Path, channels: int, side: int = 32, n: int = 24) -> Path:
    rng = np.random.default_rng(0)
    images = lambda: rng.integers(0, 256, (n, side, side, channels), dtype=np.uint8)  # noqa: E731
    labels = lambda: np.arange(n, dtype=np.int64) % 10  # noqa: E731
    np.savez(path, x_train=images(), y_train=labels(), x_test=images(), y_test=labels())
    return path


def test_an_npz_of_grey_images_read_as_cifar10_is_refused_before_training(tmp_path):
    npz = write_npz(tmp_path / "grey.npz", channels=1)
    out = tmp_path / "run"
    with pytest.raises(UserError, match=r"1 channel"):
        run_case(["data=cifar10", "data.source=npz", f"data.path={npz}", "data.batch_size=4", "model=vit_cifar",
                  "model.depth=1"], out)
    assert not (out / "checkpoints").exists()


def fake_datamodule(images: torch.Tensor, declared_size: int, out_size: int | None = None) -> SimpleNamespace:
    """A set-up data module whose in-memory training split holds ``images`` (uint8 N, C, H, W)."""
    channels = images.shape[1]
    transform = BatchTransform([0.5] * channels, [0.5] * channels, crop_padding=2, out_size=out_size)
    train_set = TensorImageDataset(images, torch.zeros(len(images), dtype=torch.long), transform)
    return SimpleNamespace(num_classes=10, in_chans=channels, img_size=(declared_size, declared_size),
                           train_set=train_set, cfg=SimpleNamespace(path=None))


def test_images_of_another_size_than_the_model_takes_are_refused():
    dm = fake_datamodule(torch.zeros(4, 1, 30, 30, dtype=torch.uint8), declared_size=28)  # a module that says 28
    with pytest.raises(ConfigError, match=r"takes 28x28 images \(model\.img_size=28\) but dataset 'fake' gives 30x30"):
        match_model_to_data("vit_mnist", {"img_size": 28, "in_chans": 1, "num_classes": None}, "fake", dm)


def test_the_image_check_fills_num_classes_and_leaves_the_random_stream_alone():
    dm = fake_datamodule(torch.zeros(4, 1, 30, 30, dtype=torch.uint8), declared_size=28, out_size=28)
    before = torch.get_rng_state()
    kwargs = match_model_to_data("vit_mnist", {"img_size": 28, "in_chans": 1, "num_classes": None}, "fake", dm)
    assert kwargs["num_classes"] == 10
    assert torch.equal(torch.get_rng_state(), before)  # the augmentation drew its numbers elsewhere


# -- item 9: sweeps --------------------------------------------------------------------------------


def sweep_config(sweep_dir: Path, overrides: list[str]):
    return OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep_dir)}, "overrides": {"task": overrides},
                                       "sweeper": {"params": None}}})


def write_failure(job_dir: Path, job: int, overrides: list[str], error: str) -> None:
    job_dir.mkdir(parents=True, exist_ok=True)
    (job_dir / FAILURE_FILE).write_text(json.dumps({"job": job, "overrides": overrides, "error": error}))


def test_the_end_of_a_sweep_lists_its_failed_jobs_only(tmp_path, capsys):
    write_failure(tmp_path / "5_old", 5, ["model.patch_size=9"], "left by an earlier sweep")
    config = sweep_config(tmp_path, ["model.patch_size=5,7,6", "trainer.max_epochs=1"])
    callback = SweepFailures()
    callback.on_multirun_start(config)
    write_failure(tmp_path / "2_x", 2, ["model.patch_size=6", "trainer.max_epochs=1"], "6 does not divide 28")
    write_failure(tmp_path / "0_x", 0, ["model.patch_size=5", "trainer.max_epochs=1"], "5 does not divide 28")
    with pytest.raises(SystemExit) as exited:
        callback.on_multirun_end(config)
    assert exited.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("error: 2 job(s) of the sweep failed")
    assert lines[1:] == ["  job 0 (model.patch_size=5): 5 does not divide 28",
                         "  job 2 (model.patch_size=6): 6 does not divide 28"]


def test_a_sweep_without_failures_ends_quietly(tmp_path, capsys):
    config = sweep_config(tmp_path, ["model=a,b"])
    callback = SweepFailures()
    callback.on_multirun_start(config)
    callback.on_multirun_end(config)
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_one_bad_job_does_not_stop_the_sweep(tmp_path):
    """patch 5 does not divide 28, 7 does: job 0 fails on its config, job 1 still trains."""
    done = train_py("-m", "model=vit_mnist", "model.patch_size=5,7", *TINY, *TINY_VIT, f"data.root={EMBEDDED}",
                    f"hydra.sweep.dir={tmp_path}")
    output = done.stdout + done.stderr
    assert done.returncode == 2, output[-3000:]
    assert "Traceback" not in output
    assert [json.loads(p.read_text())["model_config"]["patch_size"] for p in tmp_path.glob("*/results.json")] == [7]
    summary = done.stderr[done.stderr.index("error: 1 job(s) of the sweep failed"):]
    assert "job 0 (model.patch_size=5): model 'vit_mnist': image height 28 is not divisible by patch size 5" in summary
    assert len(error_lines(done.stderr)) == 2  # the job's own line as it failed, and the summary
