"""Training end to end: config validation, real short fits, resume, sweeps, outputs, predict."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ValidationError

import vit
from vit.config import model_config_yaml, register_configs
from vit.errors import ConfigError
from vit.registry import list_models
from vit.measure import count_forward_flops, peak_memory_mb, reset_peak_memory
from vit.training import run

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = str(REPO / "data")

register_configs()


def compose_train(*overrides: str):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


def quick(tmp_path: Path, *overrides: str) -> list[str]:
    """Overrides for a run of a few seconds on the embedded digits, writing into tmp_path."""
    return [f"data.root={EMBEDDED}", f"output_dir={tmp_path}", "trainer.max_epochs=1",
            "data.max_train_samples=256", "trainer.enable_progress_bar=false", *overrides]


def train_py(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


# -- configuration ------------------------------------------------------------------------------------

def test_default_config_is_the_offline_vit():
    cfg = compose_train()
    assert cfg.model.name == "vit_mnist" and cfg.data.name == "mnist5k"
    assert cfg.train and cfg.test and cfg.ckpt_path is None and cfg.seed == 42
    assert cfg.trainer.accelerator == "cpu"


def test_overrides_reach_the_model_and_groups():
    cfg = compose_train("model=vit_cifar", "data=cifar2", "model.patch_size=8", "model.num_heads=6",
                        "optim.lr=3e-4", "trainer.max_epochs=50", "optim=sgd")
    assert (cfg.model.patch_size, cfg.model.num_heads, cfg.optim.lr, cfg.trainer.max_epochs) == (8, 6, 3e-4, 50)
    assert cfg.optim.name == "sgd" and list(cfg.data.classes) == ["cat", "dog"]


@pytest.mark.parametrize("override, named", [
    ("data.batchsize=3", "batchsize"),
    ("trainer.max_epochs=many", "max_epochs"),
    ("optim.lr=fast", "lr"),
    ("model.patchsize=3", "patchsize"),
    ("trainer=tpu", "tpu"),
])
def test_hydra_refuses_unknown_keys_and_wrong_types(override, named):
    with pytest.raises((ConfigCompositionException, ValidationError), match=named) as raised:
        compose_train(override)
    assert named in str(raised.value) + str(raised.value.__cause__)


def test_model_values_are_checked_against_the_constructor(tmp_path):
    with pytest.raises(ConfigError, match=r"model.depth must be int.*got 'deep'"):
        run(compose_train(*quick(tmp_path, "model.depth=deep")))
    with pytest.raises(ConfigError, match="embed_dim 64 is not divisible by num_heads 5"):
        run(compose_train(*quick(tmp_path, "model.num_heads=5")))
    with pytest.raises(ConfigError, match="model.num_classes=3 but dataset 'mnist5k' has 10 classes"):
        run(compose_train(*quick(tmp_path, "model.num_classes=3")))
    with pytest.raises(ConfigError, match="in_chans=3 .* 1-channel images"):
        run(compose_train(*quick(tmp_path, "model=vit_cifar")))


def test_every_registered_model_has_a_config_in_sync_with_the_registry():
    for name in list_models():
        path = REPO / "conf" / "model" / f"{name}.yaml"
        assert path.read_text() == model_config_yaml(name), f"regenerate with `python -m vit.config` ({path})"


# -- runs ---------------------------------------------------------------------------------------------

def test_a_run_leaves_results_curves_and_checkpoints(tmp_path):
    results = run(compose_train(*quick(tmp_path, "model=linear_mnist", "trainer.max_epochs=2", "optim.lr=0.01",
                                       "optim.warmup_epochs=0")))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["model"] == "linear_mnist" and saved["dataset"] == "mnist5k"
    assert saved["params"] == 7850 and saved["epochs"] == 2 and saved["global_step"] == 2 * 4  # 256 / 64
    assert saved["interrupted"] is False and saved["test_split"] == "test" and saved["ckpt_path"] is None
    assert saved["train_time_s"] > 0 and saved["train_images_per_s"] > 0
    for key in ("val_acc", "test_acc"):
        assert 0.5 < saved[key] <= 1.0  # a linear model on real digits beats chance (0.1) after 512 images
    for name in ("metrics.csv", "loss.png", "accuracy.png", "confusion_matrix.png", "checkpoints/last.ckpt"):
        assert (tmp_path / name).is_file(), name
    header = (tmp_path / "metrics.csv").read_text().splitlines()[0]
    assert {"train/loss_epoch", "val/acc", "test/acc", "val/acc_top5"} <= set(header.split(","))


def test_the_run_log_gets_the_epoch_summaries_and_lightning_keeps_earlier_files(tmp_path, caplog):
    # What Hydra puts into a run folder before the run starts: the CSV logger must leave it alone.
    (tmp_path / ".hydra").mkdir(parents=True)
    (tmp_path / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (tmp_path / "train.log").write_text("")
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.INFO, logger="vit"):
        warnings.simplefilter("always")
        run(compose_train(*quick(tmp_path, "model=linear_mnist", "trainer.max_epochs=2", "test=false")))
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]
    summaries = [r.getMessage() for r in caplog.records if r.name == "vit.callbacks"]
    assert [line.split(" | ")[0] for line in summaries] == ["epoch 1/2", "epoch 2/2"]
    assert (tmp_path / ".hydra" / "config.yaml").is_file() and (tmp_path / "metrics.csv").is_file()


@pytest.mark.slow
def test_train_py_writes_one_summary_line_per_epoch_into_train_log(tmp_path):
    done = train_py("model=linear_mnist", f"data.root={EMBEDDED}", "trainer.max_epochs=2", "data.max_train_samples=256",
                    "test=false", f"hydra.run.dir={tmp_path / 'run'}")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = (tmp_path / "run" / "train.log").read_text().splitlines()
    assert len([line for line in lines if " - epoch 1/2 | train loss" in line]) == 1
    assert len([line for line in lines if " - epoch 2/2 | train loss" in line]) == 1
    assert "exists and is not empty" not in done.stdout + done.stderr


def test_testing_a_checkpoint_reproduces_its_score(tmp_path):
    first = run(compose_train(*quick(tmp_path / "a", "model=linear_mnist")))
    again = run(compose_train(*quick(tmp_path / "b", "train=false", f"ckpt_path={first['best_checkpoint']}")))
    assert again["test_acc"] == pytest.approx(first["test_acc"], abs=1e-6)
    assert again["epochs"] == 0


def test_resume_continues_at_the_right_epoch_step_and_learning_rate(tmp_path):
    common = ("model=linear_mnist", "data.batch_size=32", "optim.warmup_epochs=0.5", "trainer.max_epochs=3",
              "callbacks.save_top_k=-1")  # keep every epoch's checkpoint, as if the run had been stopped
    straight = run(compose_train(*quick(tmp_path / "straight", *common)))
    checkpoint = tmp_path / "straight" / "checkpoints" / "epoch000-step8.ckpt"
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    assert saved["epoch"] == 0 and saved["global_step"] == 8
    resumed = run(compose_train(*quick(tmp_path / "resumed", *common, f"ckpt_path={checkpoint}")))
    assert resumed["epochs"] == straight["epochs"] == 3
    assert resumed["global_step"] == straight["global_step"] == 24

    def lr_per_epoch(run_dir: Path) -> list[float]:
        rows = [line.split(",") for line in (run_dir / "metrics.csv").read_text().splitlines()]
        column = rows[0].index("lr-AdamW/pg1")
        return [float(r[column]) for r in rows[1:] if r[column]]

    assert lr_per_epoch(tmp_path / "resumed") == pytest.approx(lr_per_epoch(tmp_path / "straight")[-2:])


def test_same_seed_same_run_on_cpu(tmp_path):
    first = run(compose_train(*quick(tmp_path / "a", "model=cnn_mnist")))
    second = run(compose_train(*quick(tmp_path / "b", "model=cnn_mnist")))
    assert (first["val_acc"], first["test_acc"], first["test_loss"]) == \
        (second["val_acc"], second["test_acc"], second["test_loss"])
    weights = [torch.load(tmp_path / d / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
               for d in ("a", "b")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


@pytest.mark.parametrize("extra", [
    ("loss.mixup_alpha=0.2", "loss.cutmix_alpha=1.0", "loss.label_smoothing=0.1"),
    ("trainer.precision=bf16-mixed",),
    ("trainer.precision=16-mixed",),
    ("data.randaugment_ops=2", "optim=sgd", "logger=tensorboard"),
], ids=["mixup_cutmix_smoothing", "bf16", "fp16", "randaugment_sgd_tensorboard"])
def test_training_options_run_and_learn(tmp_path, extra):
    results = run(compose_train(*quick(tmp_path, "model=vit_mnist", "model.depth=2", *extra)))
    assert results["global_step"] == 4 and 0.0 <= results["test_acc"] <= 1.0
    assert results["test_loss"] is not None and results["test_loss"] < 5
    assert results["peak_memory_mb"] > 0 and results["peak_memory_counted_from"] in ("run", "process start")
    if "logger=tensorboard" in extra:
        assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_warmup_then_cosine_schedule():
    from vit.lightning_module import warmup_cosine

    values = [warmup_cosine(step, 10, 110, 0.01) for step in range(110)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[9:], values[10:]))  # never rises after warm-up
    assert values[-1] == pytest.approx(0.01, abs=1e-3)


def test_no_weight_decay_on_norms_biases_tokens_and_positions():
    import vit
    from vit.lightning_module import split_weight_decay

    model = vit.create_model("vit_mnist", depth=1)
    decay, no_decay = split_weight_decay(model)
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in no_decay} == {
        "cls_token", "pos_embed", "patch_embed.proj.bias", "blocks.0.norm1.weight", "blocks.0.norm1.bias",
        "blocks.0.attn.qkv.bias", "blocks.0.attn.proj.bias", "blocks.0.norm2.weight", "blocks.0.norm2.bias",
        "blocks.0.mlp.fc1.bias", "blocks.0.mlp.fc2.bias", "norm.weight", "norm.bias", "head.bias"}
    assert {names[id(p)] for p in decay} == {
        "patch_embed.proj.weight", "blocks.0.attn.qkv.weight", "blocks.0.attn.proj.weight",
        "blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.weight", "head.weight"}


def test_weight_decay_groups_survive_wrapping_that_renames_and_flattens_parameters():
    """FSDP (use_orig_params) turns each parameter into a 1-D shard and prefixes its name, as
    activation checkpointing does; the groups are decided on the model before it is wrapped."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    import vit
    from vit.model import Block
    from vit.lightning_module import no_weight_decay_names, split_weight_decay

    model = vit.create_model("vit_mnist", depth=1)
    before = [[p.shape for p in group] for group in split_weight_decay(model)]
    names = no_weight_decay_names(model)
    apply_activation_checkpointing(model, auto_wrap_policy=ModuleWrapPolicy({Block}))
    assert any("_checkpoint_wrapped_module" in n for n, _ in model.named_parameters())
    with torch.no_grad():  # what a shard looks like: flat
        for p in model.parameters():
            p.data = p.data.flatten()
    decay, no_decay = split_weight_decay(model, names)
    assert [len(decay), len(no_decay)] == [len(group) for group in before]
    assert sorted(p.numel() for p in decay) == sorted(s.numel() for s in before[0])


@pytest.mark.slow
def test_short_fit_on_real_mnist_beats_chance_by_far(tmp_path, datasets_root):
    results = run(compose_train(
        f"data.root={datasets_root}", "data=mnist", f"output_dir={tmp_path}", "trainer.max_epochs=null",
        "trainer.max_steps=150", "data.batch_size=128", "trainer.limit_val_batches=10",
        "trainer.val_check_interval=50", "trainer.check_val_every_n_epoch=null", "optim.warmup_steps=15",
        # auto: bf16 only where the CPU runs it natively (emulated bf16 made this test take 4.5 minutes)
        "trainer.precision=auto", "trainer.enable_progress_bar=false",
        # 7px patches (16 tokens) learn fastest in few steps; no augmentation for a quick start
        "model.patch_size=7", "data.augment=false"))
    assert results["global_step"] == 150
    # chance is 0.10; evaluated on all 10,000 test digits. Measured 0.677 (fp32, AMD EPYC, 2 cores).
    assert results["test_acc"] > 0.6


# -- the command line ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_two_job_sweep_runs_both(tmp_path):
    done = train_py("-m", "model=linear_mnist,cnn_mnist", f"data.root={EMBEDDED}", "trainer.max_epochs=1",
                    "data.max_train_samples=128", f"hydra.sweep.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-3000:]
    results = sorted(json.loads(p.read_text())["model"] for p in tmp_path.glob("*/results.json"))
    assert results == ["cnn_mnist", "linear_mnist"]
    assert all((p.parent / ".hydra" / "config.yaml").is_file() for p in tmp_path.glob("*/results.json"))


def test_missing_offline_data_is_one_clear_message(tmp_path):
    from vit.data import DatasetNotFoundError

    with pytest.raises(DatasetNotFoundError) as refused:
        run(compose_train("data=mnist", f"data.root={tmp_path}", "data.download=false",
                          f"output_dir={tmp_path / 'run'}"))
    assert str(tmp_path.resolve()) in str(refused.value) and "MNIST" in str(refused.value)


def test_bad_override_exits_with_the_key_named(tmp_path):
    done = train_py("data.batchsize=3", f"hydra.run.dir={tmp_path}")
    assert done.returncode != 0 and "batchsize" in done.stderr


@pytest.mark.slow
def test_imagefolder_trains_from_jpeg_files(tmp_path, datasets_root):
    results = run(compose_train(
        "data=imagefolder", f"data.path={datasets_root / 'hymenoptera_data'}", "model=vit_cifar",
        "model.depth=2", f"output_dir={tmp_path}", "trainer.max_epochs=1", "data.batch_size=32",
        "trainer.enable_progress_bar=false", "data.persistent_workers=false", "data.interpolation=bicubic",
        "data.crop_pct=0.9"))
    assert results["dataset"] == "imagefolder" and results["model_config"]["num_classes"] == 2
    assert 0.0 <= results["test_acc"] <= 1.0 and results["global_step"] == 8  # 244 images / 32
    # The test set's resize travels with the model, for predict.py and for testing the checkpoint
    # without repeating data.interpolation and data.crop_pct: the same images, the same score.
    stored = torch.load(results["best_checkpoint"], weights_only=True)["hyper_parameters"]
    assert stored["eval_resize"] == {"interpolation": "bicubic", "crop_pct": 0.9}
    again = run(compose_train(
        "data=imagefolder", f"data.path={datasets_root / 'hymenoptera_data'}", f"output_dir={tmp_path / 'test'}",
        "train=false", f"ckpt_path={results['best_checkpoint']}", "trainer.enable_progress_bar=false",
        "data.persistent_workers=false"))
    assert (again["test_acc"], again["test_loss"]) == (results["test_acc"], results["test_loss"])


def test_predict_prints_top_k_for_each_image(tmp_path):
    results = run(compose_train(*quick(tmp_path / "run", "model=linear_mnist")))
    import numpy as np
    from PIL import Image

    digits = np.load(REPO / "data" / "mnist5k" / "mnist5k.npz")
    for i in (0, 4999):
        Image.fromarray(digits["images"][i]).save(tmp_path / f"digit{i}.png")
    done = subprocess.run([sys.executable, str(REPO / "predict.py"), f"ckpt_path={results['best_checkpoint']}",
                           f"images=[{tmp_path}]", "top_k=3"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 2 and all(line.count(",") == 2 for line in lines)
    probabilities = [float(part.split()[-1]) for part in lines[0].split(": ", 1)[1].split(", ")]
    assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1.0001


_PEAK_PROBE = """
import json, torch
from vit.measure import peak_memory_mb, reset_peak_memory
cpu = torch.device("cpu")
held = torch.ones(64 * 2**20)  # 256 MiB, touched
before = peak_memory_mb(cpu)
del held
restarted = reset_peak_memory(cpu)
print(json.dumps({"before": before, "restarted": restarted, "after": peak_memory_mb(cpu)}))
"""


def test_peak_memory_restarts_for_each_run_or_says_it_cannot():
    """Jobs of a -m sweep share one process: each reports its own peak, not the largest so far.
    In a fresh process, so that what this test worker held before does not set the peak."""
    done = subprocess.run([sys.executable, "-c", _PEAK_PROBE], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    probe = json.loads(done.stdout)
    if probe["restarted"]:
        assert probe["after"] < probe["before"] - 200
    else:  # the system ignored the reset (not Linux, or a sandbox): the answer says so, and the peak stayed
        assert probe["after"] >= probe["before"] - 1


def test_a_reset_the_system_ignores_is_reported(tmp_path, monkeypatch):
    """Some sandboxes accept the write to clear_refs and keep the old peak: that is not a restart."""
    import vit.measure

    (tmp_path / "clear_refs").write_text("")
    (tmp_path / "status").write_text("Name:\tpython\nVmHWM:\t 1584528 kB\nVmRSS:\t  302144 kB\n")
    monkeypatch.setattr(vit.measure, "_PROC_SELF", tmp_path)
    cpu = torch.device("cpu")
    assert reset_peak_memory(cpu) is False
    assert peak_memory_mb(cpu) == 1584528 / 1024
    (tmp_path / "status").write_text("Name:\tpython\nVmHWM:\t 302148 kB\nVmRSS:\t  302144 kB\n")
    assert reset_peak_memory(cpu) is True
    (tmp_path / "clear_refs").unlink()
    (tmp_path / "clear_refs").mkdir()  # the write fails: no restart either
    assert reset_peak_memory(cpu) is False


@pytest.mark.parametrize("attn_impl", ["fused", "explicit"])
def test_flops_per_image_count_attention_on_every_path(attn_impl):
    """vit_mnist by hand: patch conv 100,352 + 6 blocks x (qkv 1,228,800 + W^O 409,600 + MLP 1,638,400
    + attention 640,000) + head 1,280. The CPU's fused kernel has no formula in torch's counter."""
    model = vit.create_model("vit_mnist", attn_impl=attn_impl).eval()
    images = torch.randn(1, 1, 28, 28)
    with torch.inference_mode() if attn_impl == "fused" else torch.enable_grad():  # explicit: the textbook path
        assert count_forward_flops(model, images) == 23_602_432
