"""Bad input gets a clear error, faults lose nothing, checkpoints are safe to load."""
from __future__ import annotations

import errno
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import vit
from vit.checkpoints import AtomicCheckpointIO, load_checkpoint
from vit.errors import CheckpointError, ConfigError, DiskFullError, UserError
from vit.lightning_module import NonFiniteLossError
from vit.inference import load_classifier
from vit.reports import write_results
from vit.training import run

from test_training import EMBEDDED, REPO, compose_train, quick, train_py

# costly module-scoped fixtures: one worker runs them all, once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_hardening")


class RunsCode:
    """Unpickling this object would run a shell command; a safe loader must refuse it."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_in_a_checkpoint_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "hyper_parameters": {}, "payload": RunsCode(marker)}, evil)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        load_classifier(evil)
    with pytest.raises(CheckpointError, match="refusing to load checkpoint"):
        run(compose_train(f"ckpt_path={evil}", f"data.root={EMBEDDED}", f"output_dir={tmp_path / 'run'}"))
    assert not marker.exists()


def test_missing_and_truncated_checkpoints_are_named(tmp_path):
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nothing.ckpt"):
        load_classifier(tmp_path / "nothing.ckpt")
    good = run(compose_train(*quick(tmp_path / "run", "model=linear_mnist")))["best_checkpoint"]
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(Path(good).read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated.ckpt"):
        load_classifier(truncated)


def test_a_checkpoint_from_another_model_config_names_the_shapes(tmp_path):
    ckpt = run(compose_train(*quick(tmp_path / "a", "model=vit_mnist", "model.depth=1")))["best_checkpoint"]
    with pytest.raises(CheckpointError, match=r"model.pos_embed: checkpoint \(1, 50, 64\) vs model \(1, 17, 64\)"):
        run(compose_train(*quick(tmp_path / "b", "model=vit_mnist", "model.depth=1", "model.patch_size=7",
                                 f"ckpt_path={ckpt}")))


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    target = tmp_path / "last.ckpt"
    io = AtomicCheckpointIO()
    io.save_checkpoint({"weights": torch.ones(3)}, target)

    def killed_midway(obj, stream, *args, **kwargs):
        stream.write(b"partial bytes of a checkpoint")
        raise KeyboardInterrupt("killed while saving")

    monkeypatch.setattr(torch, "save", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"weights": torch.zeros(3)}, target)
    assert torch.equal(torch.load(target, weights_only=True)["weights"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary file left behind


def test_a_full_disk_while_checkpointing_is_one_message_and_the_last_checkpoint_survives(tmp_path, monkeypatch):
    real_save = torch.save
    calls = []

    def disk_fills_after_the_first_epoch(obj, stream, *args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:  # epoch 1: the best checkpoint and last.ckpt
            return real_save(obj, stream, *args, **kwargs)
        stream.write(b"the first bytes of a checkpoint")
        try:  # what torch.save does when the device fills: a RuntimeError raised while handling the OSError
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc] unexpected pos")

    monkeypatch.setattr(torch, "save", disk_fills_after_the_first_epoch)
    folder = tmp_path / "checkpoints"
    message = rf"no space left on the device of {re.escape(str(folder))}: writing \S+\.ckpt needs about [\d,]+ bytes"
    with pytest.raises(DiskFullError, match=message) as raised:
        run(compose_train(*quick(tmp_path, "model=linear_mnist", "trainer.max_epochs=3", "test=false")))
    assert isinstance(raised.value, UserError)  # train.py: one message, exit 2
    monkeypatch.undo()
    assert load_checkpoint(folder / "last.ckpt")["global_step"] == 4  # the first epoch's, intact
    assert not [p.name for p in folder.iterdir() if p.name.startswith(".")]  # no temporary file left


def test_a_full_disk_while_writing_results_is_one_message_and_the_previous_file_stays(tmp_path, monkeypatch):
    path = write_results(tmp_path / "results.json", {"test_acc": 0.5})

    def device_full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", device_full)
    results = {"test_acc": 0.9, "model": "vit_mnist"}
    needed = len(json.dumps(results, indent=2)) + 1
    message = rf"device of {re.escape(str(tmp_path))}: writing results.json needs about {needed} bytes"
    with pytest.raises(DiskFullError, match=message):
        write_results(path, results)
    assert json.loads(path.read_text()) == {"test_acc": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


# -- testing a checkpoint: the checkpoint's model ------------------------------------------------------

@pytest.fixture(scope="module")
def linear_checkpoint(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("linear")
    return Path(run(compose_train(*quick(out, "model=linear_mnist", "test=false")))["best_checkpoint"])


def test_testing_a_checkpoint_tests_and_records_the_checkpoints_model(tmp_path, linear_checkpoint):
    stored = load_checkpoint(linear_checkpoint)["hyper_parameters"]
    # the command line names the default model, vit_mnist; the checkpoint holds linear_mnist
    results = run(compose_train(*quick(tmp_path, "train=false", f"ckpt_path={linear_checkpoint}")))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["model"] == "linear_mnist" and saved["params"] == 7850
    assert saved["model_config"] == stored["model_kwargs"]
    assert saved["ckpt_path"] == str(linear_checkpoint) and saved["test_split"] == "test"
    assert results["test_acc"] > 0.3


def test_testing_a_checkpoint_on_data_its_model_cannot_read_is_one_message(tmp_path, linear_checkpoint, datasets_root):
    with pytest.raises(ConfigError, match=r"holds model 'linear_mnist' for 10 classes of 1-channel images, but data "
                                          r"'cifar2' has 2 classes of 3-channel images"):
        run(compose_train(*quick(tmp_path, "train=false", f"ckpt_path={linear_checkpoint}", "data=cifar2",
                                 "data.source=npz", f"data.path={datasets_root / 'cifar10_jpeg_subset.npz'}")))
    assert not (tmp_path / "results.json").exists()


def test_nan_loss_stops_with_the_step_and_learning_rate(tmp_path):
    with pytest.raises(NonFiniteLossError, match=r"at global step \d+ \(learning rate 1e\+30\)"):
        run(compose_train(*quick(tmp_path, "model=linear_mnist", "optim=sgd", "optim.lr=1e30",
                                 "optim.scheduler=constant", "trainer.gradient_clip_val=null")))


def test_batch_larger_than_the_dataset(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_size=512 is larger than the training set of mnist5k, which has 256 samples"):
        run(compose_train(*quick(tmp_path, "model=linear_mnist", "data.batch_size=512")))


@pytest.mark.slow
def test_a_killed_run_resumes_and_ends_like_an_uninterrupted_one(tmp_path):
    command = ["model=cnn_mnist", f"data.root={EMBEDDED}", "trainer.max_epochs=3", "data.max_train_samples=1024",
               "trainer.enable_progress_bar=false"]
    # The reference run in this process (a third train.py would add its start-up, ~10 s, and nothing else)
    expected = run(compose_train(*command, f"output_dir={tmp_path / 'runs' / 'straight'}"))

    first_dir = tmp_path / "runs" / "killed"
    process = subprocess.Popen([sys.executable, str(REPO / "train.py"), *command, f"hydra.run.dir={first_dir}"],
                               cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = first_dir / "checkpoints" / "last.ckpt"
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    time.sleep(0.5)  # into the next epoch
    assert process.poll() is None, "the run ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (first_dir / "results.json").exists()
    saved = torch.load(last, weights_only=True)  # the checkpoint survived the kill intact
    assert saved["global_step"] > 0

    resumed = train_py(*command, "ckpt_path=last", f"hydra.run.dir={tmp_path / 'runs' / 'resumed'}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    results = json.loads((tmp_path / "runs" / "resumed" / "results.json").read_text())
    assert results["epochs"] == expected["epochs"] == 3
    assert results["global_step"] == expected["global_step"]
    # Shuffling after the restart draws from a fresh RNG stream, so the runs are not
    # bit-identical; on 500 test digits they agree to within a few images.
    assert abs(results["test_acc"] - expected["test_acc"]) <= 0.03


# -- property-based: any valid small configuration builds and runs -----------------------------------

@st.composite
def vit_configs(draw):
    patch = draw(st.integers(1, 8))
    grid_h, grid_w = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    heads = draw(st.integers(1, 4))
    return dict(
        img_size=(patch * grid_h, patch * grid_w), patch_size=patch, in_chans=draw(st.sampled_from([1, 3])),
        num_classes=draw(st.integers(0, 12)), embed_dim=heads * draw(st.sampled_from([4, 8])), depth=draw(st.integers(1, 3)),
        num_heads=heads, mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])), qkv_bias=draw(st.booleans()),
        qk_norm=draw(st.booleans()), init_values=draw(st.sampled_from([None, 1e-4])),
        global_pool=draw(st.sampled_from(["token", "avg"])), attn_impl=draw(st.sampled_from(["fused", "explicit"])),
    ), draw(st.integers(1, 3))


@settings(max_examples=40, deadline=None)
@given(vit_configs())
def test_any_valid_config_builds_and_gives_the_right_shapes(config_and_batch):
    config, batch = config_and_batch
    model = vit.VisionTransformer(**config).eval()
    x = torch.randn(batch, config["in_chans"], *config["img_size"])
    out = model(x)
    assert out.shape == (batch, config["num_classes"] or config["embed_dim"])
    assert torch.isfinite(out).all()
    with torch.inference_mode():  # the inference-only forms of the attention paths give the same numbers
        torch.testing.assert_close(model(x), out, atol=1e-5, rtol=1e-5)
    tokens = (config["img_size"][0] // config["patch_size"]) * (config["img_size"][1] // config["patch_size"]) + 1
    maps = model.get_attention_maps(x)
    assert len(maps) == config["depth"] and maps[0].shape == (batch, config["num_heads"], tokens, tokens)


@settings(max_examples=30, deadline=None)
@given(size=st.integers(2, 64), patch=st.integers(2, 16))
def test_sizes_the_patch_does_not_divide_are_refused_by_name(size, patch):
    if size % patch == 0:
        assert vit.VisionTransformer(img_size=size, patch_size=patch, embed_dim=8, depth=1, num_heads=2)
    else:
        with pytest.raises(ValueError, match=f"image height {size} is not divisible by patch size {patch}"):
            vit.VisionTransformer(img_size=size, patch_size=patch, embed_dim=8, depth=1, num_heads=2)


@settings(max_examples=30, deadline=None)
@given(dim=st.integers(1, 64), heads=st.integers(1, 16))
def test_heads_that_do_not_divide_the_width_are_refused_by_name(dim, heads):
    if dim % heads:
        with pytest.raises(ValueError, match=f"embed_dim {dim} is not divisible by num_heads {heads}"):
            vit.VisionTransformer(img_size=8, patch_size=4, embed_dim=dim, depth=1, num_heads=heads)
    else:
        vit.VisionTransformer(img_size=8, patch_size=4, embed_dim=dim, depth=1, num_heads=heads)
