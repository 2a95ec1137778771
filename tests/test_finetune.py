"""Fine-tuning from pretrained weights (issue #16, the training side): model.init_from loaded once,
the data following the weights, frozen parameters, layer-wise learning rates, the EMA of the
weights, debug=fast and the Optuna search.

The tests of the pieces build an ``ImageClassifier`` and a Lightning Trainer themselves; those
marked ``run`` go through ``vit.training.run`` (or ``train.py``) and need its wiring of
``model.init_from``, ``finetune`` and ``callbacks.ema``.
"""
from __future__ import annotations

import json
import re
import time
from dataclasses import asdict
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from PIL import Image
from safetensors.torch import save_file
from torch.utils.data import DataLoader, TensorDataset
from torchvision.transforms import v2

from test_bad_inputs import CONF, EMBEDDED, compose, run_case, tiny, train_py
from vit.config import MODEL_NODE_KEYS, OptimConfig, model_config_yaml, model_init_from, model_kwargs
from vit.data import build_datamodule
from vit.errors import CheckpointError
from vit.finetune import EMA, adapt_stats, follow_weights, frozen_names, layer_id, pretrained_data_config
from vit.inference import classifier_from_checkpoint
from vit.lightning_module import ImageClassifier, no_weight_decay_names
from vit.registry import create_model, list_models

TINY = {"depth": 3, "embed_dim": 16, "num_heads": 2, "num_classes": 3}


def classifier(finetune: dict | None = None, **optim) -> ImageClassifier:
    """A 3-block ViT for 28x28 grey images, 3 classes; a constant learning rate unless ``optim`` says."""
    settings = {**asdict(OptimConfig()), "scheduler": "constant", **optim}
    return ImageClassifier("vit_mnist", dict(TINY), optim=settings, loss={}, class_names=["a", "b", "c"],
                           mean=[0.5], std=[0.5], finetune=finetune)


def loader(n: int = 16, batch_size: int = 4, seed: int = 0) -> DataLoader:
    """The same ``n`` random images every time, in order: runs that should agree do."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(n, 1, 28, 28, generator=generator)
    return DataLoader(TensorDataset(images, torch.arange(n) % 3), batch_size=batch_size)


def trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                    enable_checkpointing=False, num_sanity_val_steps=0)
    return L.Trainer(**{**defaults, **kwargs})


# -- model.init_from: a key of the model node, not a constructor argument ------------------------------

def test_init_from_is_a_model_node_key_that_does_not_reach_the_constructor():
    name, kwargs = model_kwargs({"name": "vit_mnist", "init_from": "weights.safetensors", "depth": 2})
    assert (name, kwargs) == ("vit_mnist", {"depth": 2})
    assert model_init_from({"name": "vit_mnist", "init_from": "timm:vit_tiny_patch16_224"}) == \
        "timm:vit_tiny_patch16_224"
    assert model_init_from({"name": "vit_mnist"}) is None
    with pytest.raises(ValueError, match=r"'init_frm'.*did you mean init_from"):
        model_kwargs({"name": "vit_mnist", "init_frm": "x"})


@pytest.mark.parametrize("name", list_models())
def test_every_model_config_has_init_from_null(name):
    text = (CONF / "model" / f"{name}.yaml").read_text()
    assert text == model_config_yaml(name), "conf/model/ is stale: run python -m vit.config"
    assert "\ninit_from: null\n" in text and set(MODEL_NODE_KEYS) == {"init_from"}


# -- freezing -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("freeze, last_n, trains", [
    ("backbone", 1, ("head.",)),
    ("all_but_last_n", 1, ("head.", "norm.", "blocks.2.")),
    ("all_but_last_n", 3, ("head.", "norm.", "blocks.")),
])
def test_frozen_parameters_stay_out_of_the_optimizer_and_do_not_move(freeze, last_n, trains):
    module = classifier({"freeze": freeze, "last_n": last_n}, lr=1e-2)
    before = {name: p.detach().clone() for name, p in module.model.named_parameters()}
    fit = trainer(max_steps=1)
    fit.fit(module, loader())

    optimised = {id(p) for group in fit.optimizers[0].param_groups for p in group["params"]}
    for name, param in module.model.named_parameters():
        should_train = name.startswith(trains)
        assert param.requires_grad == should_train, name
        assert (id(param) in optimised) == should_train, name
        if not should_train:
            assert torch.equal(param, before[name]), f"frozen {name} changed"
    for name in ("head.weight", "head.bias") + (("blocks.2.mlp.fc1.weight",) if freeze != "backbone" else ()):
        assert not torch.equal(dict(module.model.named_parameters())[name], before[name]), f"{name} did not train"


def test_freezing_picks_the_layers_by_position():
    model = create_model("vit_mnist", **TINY)
    assert frozen_names(model, "none") == set()
    assert {layer_id(n, 3) for n in frozen_names(model, "all_but_last_n", 2)} == {0, 1}
    assert "pos_embed" in frozen_names(model, "backbone") and "head.weight" not in frozen_names(model, "backbone")
    with pytest.raises(ValueError, match=r"finetune.last_n must be in \[1, 3\].*got 4"):
        frozen_names(model, "all_but_last_n", 4)
    distilled = create_model("vit_mnist_distilled", **TINY)
    assert not {"head_dist.weight", "head.weight"} & frozen_names(distilled, "backbone")


# -- layer-wise learning-rate decay -----------------------------------------------------------------------

def expected_scale(name: str, decay: float, depth: int = 3) -> float:
    """BEiT's rule, written out again: embeddings lowest, block i at decay^(depth - i), the rest 1."""
    if name.startswith(("patch_embed", "cls_token", "dist_token", "pos_embed")):
        return decay ** (depth + 1)
    if name.startswith("blocks."):
        return decay ** (depth - int(name.split(".")[1]))
    return 1.0


def test_layer_decay_gives_each_layer_its_power_of_the_learning_rate():
    lr, decay, wd = 1e-3, 0.5, 0.05
    module = classifier(lr=lr, layer_decay=decay, weight_decay=wd)
    groups = module.configure_optimizers()["optimizer"].param_groups
    no_decay = no_weight_decay_names(module.model)
    names = {id(p): n for n, p in module.model.named_parameters()}
    seen = []
    for group in groups:
        for param in group["params"]:
            name = names[id(param)]
            seen.append(name)
            assert group["lr"] == pytest.approx(lr * expected_scale(name, decay)), name
            assert group["weight_decay"] == (0.0 if name in no_decay else wd), name
    assert sorted(seen) == sorted(names.values())  # each trainable parameter once
    assert groups[0]["lr"] == lr  # the head's: what the epoch summary shows as "lr"
    lowest = min(g["lr"] for g in groups)
    assert lowest == pytest.approx(lr * decay ** 4)
    assert {names[id(p)] for g in groups if g["lr"] == lowest for p in g["params"]} == \
        {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}


def test_the_schedule_keeps_the_layer_ratios_and_frozen_layers_stay_out():
    module = classifier({"freeze": "all_but_last_n", "last_n": 1}, lr=1e-3, layer_decay=0.5,
                        scheduler="cosine", warmup_steps=2)
    fit = trainer(max_steps=3)
    fit.fit(module, loader())
    groups = fit.optimizers[0].param_groups
    assert {g["name"] for g in groups} == {"layer04", "layer04_no_decay", "layer03", "layer03_no_decay"}
    for group in groups:
        assert group["lr"] / groups[0]["lr"] == pytest.approx(group["lr_scale"])
    assert groups[0]["lr"] < 1e-3  # the cosine has moved them all together


# -- EMA -------------------------------------------------------------------------------------------------

def fit_with_ema(folder: Path, max_epochs: int, ckpt_path: Path | None = None):
    torch.manual_seed(0)
    module = classifier(lr=1e-2)
    ema = EMA(decay=0.9)
    # Every epoch kept, so that last.ckpt (written with each save) is the final state.
    checkpoint = ModelCheckpoint(dirpath=folder, monitor="val/loss", mode="min", save_top_k=-1, save_last=True)
    fit = trainer(max_epochs=max_epochs, callbacks=[ema, checkpoint], enable_checkpointing=True)
    fit.fit(module, train_dataloaders=loader(), val_dataloaders=loader(8, seed=1), ckpt_path=ckpt_path)
    return module, fit, checkpoint


def val_loss(state_dict: dict) -> float:
    module = classifier()
    module.load_state_dict(state_dict)
    return trainer().validate(module, loader(8, seed=1), verbose=False)[0]["val/loss"]


def test_the_best_checkpoint_holds_the_ema_weights_it_was_chosen_by(tmp_path):
    module, fit, checkpoint = fit_with_ema(tmp_path, max_epochs=3)
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=True)
    average, raw = best["state_dict"], best["current_model_state"]
    assert not torch.equal(average["model.head.weight"], raw["model.head.weight"])  # EMA differs from raw
    assert val_loss(average) == pytest.approx(float(checkpoint.best_model_score), rel=1e-5)
    assert val_loss(raw) != pytest.approx(float(checkpoint.best_model_score), rel=1e-5)

    last = torch.load(tmp_path / "last.ckpt", map_location="cpu", weights_only=True)
    for name, value in module.state_dict().items():  # after fit the module holds the average
        assert torch.equal(value, last["state_dict"][name]), name
    # A checkpoint rebuilds as its average: what predict.py and train=false load.
    assert torch.equal(classifier_from_checkpoint(best).model.head.weight, average["model.head.weight"])

    fit.test(module, loader(8, seed=1), ckpt_path=checkpoint.best_model_path, verbose=False, weights_only=True)
    assert torch.equal(module.model.head.weight, average["model.head.weight"])  # tested: the average


def test_resuming_restores_the_ema_state(tmp_path):
    straight, _, _ = fit_with_ema(tmp_path / "straight", max_epochs=2)
    fit_with_ema(tmp_path / "first", max_epochs=1)
    resumed, _, _ = fit_with_ema(tmp_path / "resumed", max_epochs=2, ckpt_path=tmp_path / "first" / "last.ckpt")
    for name, value in straight.state_dict().items():
        assert torch.allclose(value, resumed.state_dict()[name], atol=1e-6), name
    last = torch.load(tmp_path / "resumed" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(last["averaging_state"]["n_averaged"]) == 8  # 2 epochs of 4 steps, counted across the resume


def test_ema_decay_outside_0_1_is_refused():
    with pytest.raises(ValueError, match=r"callbacks.ema_decay must be in \(0, 1\), got 1.0"):
        EMA(1.0)


# -- data that follows the weights -----------------------------------------------------------------------

def image_folder(root: Path, size: int = 40) -> Path:
    """Two classes of three small RGB images each, in train/ and val/."""
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True)
            for i in range(3):
                pixels = rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    return root


def transform_steps(dataset) -> dict[str, object]:
    return {type(t).__name__: t for t in dataset.transform.transforms}


def test_an_image_folder_follows_the_weights_where_the_config_leaves_it_open(tmp_path):
    weights = {"mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bicubic", "crop_pct": 0.9}
    dm = build_datamodule(name="imagefolder", path=str(image_folder(tmp_path)), batch_size=2, img_size=32)
    assert follow_weights(dm, weights, "weights") == weights
    dm.setup("fit")
    assert dm.mean == (0.5, 0.5, 0.5) and dm.std == (0.5, 0.5, 0.5)
    steps = transform_steps(dm.val_set)
    assert steps["Resize"].size == [int(32 / 0.9)] and steps["Resize"].interpolation == v2.InterpolationMode.BICUBIC
    assert steps["Normalize"].mean == [0.5, 0.5, 0.5]
    assert transform_steps(dm.train_set)["RandomResizedCrop"].interpolation == v2.InterpolationMode.BICUBIC

    mine = build_datamodule(name="imagefolder", path=str(tmp_path), batch_size=2, img_size=32,
                            mean=[0.4, 0.4, 0.4], std=[0.2, 0.2, 0.2], crop_pct=1.0)
    assert follow_weights(mine, weights, "weights") == {"interpolation": "bicubic"}  # what the user set stays
    mine.setup("fit")
    assert mine.mean == (0.4, 0.4, 0.4) and transform_steps(mine.val_set)["Resize"].size == [32]


def test_without_weights_an_image_folder_keeps_imagenet_statistics_and_the_usual_crop(tmp_path):
    dm = build_datamodule(name="imagefolder", path=str(image_folder(tmp_path)), batch_size=2, img_size=32)
    dm.setup("fit")
    assert dm.mean == (0.485, 0.456, 0.406)
    steps = transform_steps(dm.val_set)
    assert steps["Resize"].size == [int(32 / 0.875)] and steps["Resize"].interpolation == v2.InterpolationMode.BILINEAR


def test_in_memory_data_takes_data_mean_and_grey_images_average_rgb_statistics():
    dm = build_datamodule(name="mnist5k", root=str(EMBEDDED), mean=[0.5], std=[0.25])
    dm.setup("fit")
    assert dm.mean == (0.5,) and dm.std == (0.25,)
    images, _ = next(iter(dm.val_dataloader()))
    raw = dm.val_set.images[: len(images)].float() / 255
    assert torch.allclose(images, (raw - 0.5) / 0.25, atol=1e-5)

    grey = build_datamodule(name="mnist5k", root=str(EMBEDDED))
    filled = follow_weights(grey, {"mean": [0.2, 0.4, 0.6], "std": [0.3, 0.3, 0.3], "interpolation": "bicubic",
                                   "crop_pct": 0.9}, "weights")
    assert filled == {"mean": [pytest.approx(0.4)], "std": [pytest.approx(0.3)]}  # no resize settings: not a folder
    assert adapt_stats([0.1, 0.2, 0.3], 4) == [0.1, 0.2, 0.3, 0.1] and adapt_stats([0.1, 0.2], 1) == [pytest.approx(0.15)]


def test_a_mean_for_other_channels_is_refused_when_the_data_is_set_up():
    dm = build_datamodule(name="mnist5k", root=str(EMBEDDED), mean=[0.5, 0.5, 0.5], std=[0.5, 0.5, 0.5])
    with pytest.raises(ValueError, match=r"data.mean=\[0.5, 0.5, 0.5\] has 3 value\(s\), but 'mnist5k' has 1-channel"):
        dm.setup("fit")


def write_hub_folder(folder: Path, model_name: str = "vit_mnist", **kwargs) -> dict[str, torch.Tensor]:
    """A hub checkpoint folder as timm writes one: model.safetensors and config.json with pretrained_cfg."""
    folder.mkdir(parents=True)
    torch.manual_seed(1)
    state = {k: v.contiguous() for k, v in create_model(model_name, **kwargs).state_dict().items()}
    save_file(state, str(folder / "model.safetensors"))
    config = {"architecture": model_name, "pretrained_cfg": {"mean": [0.5] * 3, "std": [0.5] * 3,
                                                              "interpolation": "bicubic", "crop_pct": 0.9}}
    (folder / "config.json").write_text(json.dumps(config))
    return state


def test_the_data_config_of_pretrained_weights(tmp_path):
    write_hub_folder(tmp_path / "hub", "vit_tiny_patch16_224", depth=1)
    assert pretrained_data_config(str(tmp_path / "hub"), "vit_tiny_patch16_224", {"num_classes": None}) == \
        {"mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bicubic", "crop_pct": 0.9}
    torch.save(create_model("vit_tiny_patch16_224", depth=1).state_dict(), tmp_path / "plain.pth")
    # A bare state dict says nothing of its data: the model's defaults, and the dataset's statistics.
    assert pretrained_data_config(str(tmp_path / "plain.pth"), "vit_tiny_patch16_224", {}) == \
        {"mean": None, "std": None, "interpolation": "bicubic", "crop_pct": 0.9}
    with pytest.raises(CheckpointError, match=r"missing.pth not found"):
        pretrained_data_config(str(tmp_path / "missing.pth"), "vit_tiny_patch16_224", {})


# -- through vit.training.run: init_from, freeze, EMA (needs the run's wiring) ---------------------------

def finetune_overrides(folder: Path, data: Path, weights: Path, *extra: str) -> list[str]:
    """experiment=finetune, shrunk: a 2-block ViT-Ti at 112 px, two batches of each stage."""
    return ["experiment=finetune", f"data.path={data}", f"model.init_from={weights}", "model.depth=2",
            "model.img_size=112", "debug=fast", "trainer.enable_progress_bar=false", "data.batch_size=4",
            "data.eval_batch_size=4", f"output_dir={folder}", *extra]


def test_a_linear_probe_from_pretrained_weights_on_an_image_folder(tmp_path, datasets_root):
    from vit.training import run

    weights = tmp_path / "hub"
    stored = write_hub_folder(weights, "vit_tiny_patch16_224", depth=2)  # 224 px: 14x14 positions
    out = tmp_path / "run"
    results = run(compose(finetune_overrides(out, datasets_root / "hymenoptera_data", weights,
                                             "finetune.freeze=backbone")))
    assert results["init_from"] == str(weights)
    notes = " ".join(results["init_notes"])
    assert "position embeddings resampled from a 14x14 grid to 7x7" in notes and "head" in notes
    assert results["data_mean"] == [0.5, 0.5, 0.5]
    assert results["trainable_params"] == 192 * 2 + 2  # the head of 2 classes alone

    best = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    assert best["hyper_parameters"]["mean"] == [0.5, 0.5, 0.5]  # what predict.py will normalise with
    assert "init_from" not in best["hyper_parameters"]["model_kwargs"]
    state = {k.removeprefix("model."): v for k, v in best["state_dict"].items()}
    for name in ("patch_embed.proj.weight", "blocks.1.mlp.fc2.weight", "norm.weight", "cls_token"):
        assert torch.equal(state[name], stored[name]), f"{name}: not the pretrained weights, or trained"
    # The weights were loaded once, by the run: the checkpoint rebuilds without them.
    for path in weights.iterdir():
        path.unlink()
    assert classifier_from_checkpoint(best).model.head.weight.shape == (2, 192)


def test_ema_and_layer_decay_in_a_run_and_resuming_it(tmp_path):
    from vit.training import run

    out = tmp_path / "run"
    overrides = ["data=mnist5k", "model.depth=2", "model.embed_dim=16", "model.num_heads=2", "callbacks.ema=true",
                 "optim.layer_decay=0.75", "trainer.limit_train_batches=3", "trainer.limit_val_batches=1",
                 "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false", f"output_dir={out}"]
    results = run(compose([*overrides, "trainer.max_epochs=1"]))
    best = torch.load(results["best_checkpoint"], map_location="cpu", weights_only=True)
    assert not torch.equal(best["state_dict"]["model.head.weight"], best["current_model_state"]["model.head.weight"])
    again = run(compose([*overrides, "trainer.max_epochs=2", "ckpt_path=last"]))
    assert again["global_step"] == 6
    last = torch.load(out / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(last["averaging_state"]["n_averaged"]) == 6


def truncated(path: Path) -> Path:
    source = path.with_name("whole.safetensors")
    save_file({"pos_embed": torch.zeros(1, 50, 16), "cls_token": torch.zeros(1, 1, 16)}, str(source))
    path.write_bytes(source.read_bytes()[:-100])
    return path


def with_code(path: Path) -> Path:
    torch.save({"state_dict": {"w": torch.zeros(2)}, "made_by": Path("x")}, path)  # a Path is no tensor
    return path


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.safetensors", r"pretrained weights .*missing\.safetensors not found"),
    (lambda p: truncated(p / "cut.safetensors"), r"cannot read pretrained weights from .*cut\.safetensors"),
    (lambda p: with_code(p / "code.pth"), r"refusing to load .*code\.pth.*pickled Python objects"),
], ids=["missing", "truncated", "pickle-with-code"])
def test_bad_pretrained_weights_stop_the_run_before_any_work(tmp_path, make, message):
    from vit.training import run

    out = tmp_path / "run"
    cfg = compose(tiny([f"model.init_from={make(tmp_path)}", f"output_dir={out}"]))
    with pytest.raises(CheckpointError, match=message):
        run(cfg)
    assert not out.exists() or not {"checkpoints", "results.json", "metrics.csv"} & {p.name for p in out.iterdir()}


def test_missing_weights_stop_the_run_before_any_work(tmp_path):
    """(train.py prints a UserError as one line and exits 2: tests/test_bad_inputs.py's end-to-end cases.)"""
    with pytest.raises(CheckpointError, match=r"nowhere\.pth not found"):
        run_case([f"model.init_from={tmp_path / 'nowhere.pth'}"], tmp_path / "run")
    assert not (tmp_path / "run" / "checkpoints").exists()


# -- debug=fast and the Optuna search ------------------------------------------------------------------------

@pytest.mark.slow
def test_debug_fast_runs_every_stage_in_seconds(tmp_path):
    started = time.monotonic()
    done = train_py("debug=fast", f"data.root={EMBEDDED}", f"hydra.run.dir={tmp_path}")
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["global_step"] == 2 and results["test_acc"] is not None and results["epochs"] == 1
    assert time.monotonic() - started < 120  # most of it starting Python, torch and Lightning


@pytest.mark.slow
def test_an_optuna_search_runs_its_trials_and_writes_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install -e '.[search]'")
    done = train_py("-m", "hparams_search=optuna", "hydra.sweeper.n_trials=2", f"data.root={EMBEDDED}",
                    "model.depth=1", "model.embed_dim=16", "model.num_heads=2", "preflight=false",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                    "trainer.limit_test_batches=1", "trainer.enable_progress_bar=false",
                    f"hydra.sweep.dir={tmp_path}", f"hydra.sweeper.storage=sqlite:///{tmp_path / 'study.db'}")
    assert done.returncode == 0, done.stderr[-3000:]
    trials = sorted(p for p in tmp_path.iterdir() if p.is_dir() and (p / "results.json").is_file())
    assert len(trials) == 2
    tried = [json.loads((t / "results.json").read_text()) for t in trials]
    assert all(r["test_acc"] is not None for r in tried)
    overrides = [(t / ".hydra" / "overrides.yaml").read_text() for t in trials]
    lrs = [float(re.search(r"optim\.lr=([0-9.e-]+)", o).group(1)) for o in overrides]
    assert lrs[0] != lrs[1] and all(1e-4 <= lr <= 1e-2 for lr in lrs)
    best = (tmp_path / "optimization_results.yaml").read_text()
    assert "best_params" in best and "optim.lr" in best and "model.drop_path_rate" in best
    assert float(re.search(r"best_value: ([0-9.]+)", best).group(1)) == max(r["test_acc"] for r in tried)
    # the study outlives the process: its database holds both trials and their values
    import optuna

    study = optuna.load_study(study_name="vit", storage=f"sqlite:///{tmp_path / 'study.db'}")
    assert sorted(t.value for t in study.trials) == sorted(r["test_acc"] for r in tried)
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
