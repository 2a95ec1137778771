"""last.ckpt is the last state, ckpt_path=last continues the right run, and Ctrl-C leaves a record."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from test_training import EMBEDDED, REPO, compose_train, quick
from vit.callbacks import TrainingClock
from vit.checkpoints import resolve_ckpt_path
from vit.errors import CheckpointError
from vit.reports import read_epoch_metrics
from vit.training import run

LINEAR = ("model=linear_mnist", "test=false")  # 256 digits in batches of 64: 4 steps per epoch


def saved_position(checkpoint: Path) -> tuple[int, int]:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return saved["epoch"], saved["global_step"]


# -- last.ckpt ----------------------------------------------------------------------------------------

def test_last_ckpt_is_the_final_epoch_when_the_best_came_first(tmp_path, monkeypatch):
    # The first epoch stays the best, whatever the validation accuracy does.
    monkeypatch.setattr(ModelCheckpoint, "check_monitor_top_k",
                        lambda self, trainer, current=None: not self.best_k_models)
    results = run(compose_train(*quick(tmp_path, *LINEAR, "trainer.max_epochs=5")))
    assert Path(results["best_checkpoint"]).name == "epoch000-step4.ckpt"
    assert saved_position(tmp_path / "checkpoints" / "last.ckpt") == (4, 20)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["epoch000-step4.ckpt", "last.ckpt"]


def test_last_ckpt_is_the_final_step_when_training_stops_inside_an_epoch(tmp_path):
    run(compose_train(*quick(tmp_path, *LINEAR, "trainer.max_epochs=5", "trainer.max_steps=6")))
    assert saved_position(tmp_path / "checkpoints" / "last.ckpt")[1] == 6


# -- ckpt_path=last -------------------------------------------------------------------------------------

def test_ckpt_path_last_continues_this_run_folder_not_a_newer_sibling(tmp_path):
    runs = tmp_path / "runs"
    run(compose_train(*quick(runs / "r2", *LINEAR)))  # stopped after one epoch, say
    run(compose_train(*quick(runs / "r1", *LINEAR, "trainer.max_epochs=3")))  # another run, newer
    r1_before = (runs / "r1" / "checkpoints" / "last.ckpt").read_bytes()

    again = run(compose_train(*quick(runs / "r2", *LINEAR, "trainer.max_epochs=2", "ckpt_path=last")))
    assert again["ckpt_path"] == str(runs / "r2" / "checkpoints" / "last.ckpt")
    assert (again["epochs"], again["global_step"]) == (2, 8)  # one more epoch after r2's own first
    assert saved_position(runs / "r2" / "checkpoints" / "last.ckpt") == (1, 8)
    assert not [p.name for p in (runs / "r2" / "checkpoints").iterdir() if "-v" in p.name]  # no last-v1.ckpt
    assert (runs / "r1" / "checkpoints" / "last.ckpt").read_bytes() == r1_before
    # metrics.csv continues: the curves cover both epochs of r2
    assert sorted(read_epoch_metrics(runs / "r2" / "metrics.csv")["val/acc"]) == [0, 1]


def fake_run(folder: Path, model: str | None, dataset: str = "mnist5k", age_s: float = 0) -> Path:
    """A run folder with checkpoints/last.ckpt aged ``age_s`` and, when ``model`` is given, Hydra's saved config."""
    last = folder / "checkpoints" / "last.ckpt"
    last.parent.mkdir(parents=True)
    last.write_bytes(b"x")
    os.utime(last, (time.time() - age_s, time.time() - age_s))
    if model is not None:
        (folder / ".hydra").mkdir()
        (folder / ".hydra" / "config.yaml").write_text(f"model:\n  name: {model}\ndata:\n  name: {dataset}\n")
    return last


def test_ckpt_path_last_takes_the_newest_earlier_run_of_the_same_model_and_data(tmp_path):
    older = fake_run(tmp_path / "older", "vit_mnist", age_s=300)
    fake_run(tmp_path / "other_model", "linear_mnist", age_s=10)
    fake_run(tmp_path / "other_data", "vit_mnist", dataset="fashion_mnist", age_s=10)
    fake_run(tmp_path / "no_hydra_config", None, age_s=10)
    assert resolve_ckpt_path("last", tmp_path / "now", "vit_mnist", "mnist5k") == older
    newer = fake_run(tmp_path / "newer", "vit_mnist", age_s=100)
    assert resolve_ckpt_path("last", tmp_path / "now", "vit_mnist", "mnist5k") == newer
    # this folder's own last.ckpt comes first, however old
    own = fake_run(tmp_path / "now", "vit_mnist", age_s=1000)
    assert resolve_ckpt_path("last", tmp_path / "now", "vit_mnist", "mnist5k") == own
    with pytest.raises(CheckpointError, match="no other run folder .* ran model 'cnn_mnist' on data 'mnist5k'"):
        resolve_ckpt_path("last", tmp_path / "fresh", "cnn_mnist", "mnist5k")


# -- Ctrl-C ---------------------------------------------------------------------------------------------

def test_ctrl_c_leaves_last_ckpt_and_results_that_say_so(tmp_path, monkeypatch):
    def interrupt_at_step_6(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 6:  # in the second epoch
            raise KeyboardInterrupt

    monkeypatch.setattr(TrainingClock, "on_train_batch_end", interrupt_at_step_6)
    handler = signal.getsignal(signal.SIGINT)
    try:
        with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C: sys.exit(1)
            run(compose_train(*quick(tmp_path, *LINEAR, "trainer.max_epochs=3")))
    finally:
        signal.signal(signal.SIGINT, handler)  # Lightning ignores further Ctrl-C while it shuts down
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["interrupted"] is True
    assert (results["epochs"], results["global_step"]) == (1, 6) and results["test_acc"] is None
    assert saved_position(tmp_path / "checkpoints" / "last.ckpt") == (1, 6)

    monkeypatch.undo()
    resumed = run(compose_train(*quick(tmp_path, *LINEAR, "trainer.max_epochs=3", "ckpt_path=last")))
    assert resumed["interrupted"] is False and resumed["epochs"] == 3


@pytest.mark.slow
def test_sigint_to_train_py_leaves_last_ckpt_and_results(tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "train.py"), "model=linear_mnist", f"data.root={EMBEDDED}", "trainer.max_epochs=50",
         "data.max_train_samples=256", "trainer.enable_progress_bar=false", f"hydra.run.dir={run_dir}"],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        # Ctrl-C as from a terminal: a suite started in the background (`cmd &` in a script) hands its
        # children SIGINT ignored, and Python then never raises KeyboardInterrupt.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    last = run_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert process.poll() is None, "the run ended before it could be interrupted"
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 1, stderr[-2000:]
    results = json.loads((run_dir / "results.json").read_text())
    epoch, step = saved_position(last)
    assert results["interrupted"] is True and results["global_step"] == step >= 4
    assert results["epochs"] in (epoch, epoch + 1)  # the last whole epoch, or the one the interrupt ended in
    assert "interrupted after" in (run_dir / "train.log").read_text()
