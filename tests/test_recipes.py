"""The per-model recipes (conf/recipe/, run as experiment=NAME) and the comparisons that sweep over
them (issue #17): each comparison runs every model with its own recipe, includes a data-efficient
ViT and a distilled one beside the baselines, trains the distilled ViT's teacher earlier in the same
sweep, and records the test curve; the baselines' recipes suit them (the linear model on real MNIST);
a data-efficient ViT learns from a few thousand real images."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from torchvision.transforms import v2

from test_bad_inputs import CONF, EMBEDDED, compose, train_py
from vit.data import build_datamodule, resolve_config
from vit.config import as_schema, check_config
from vit.distill import LATEST
from vit.training import run

RECIPES = sorted(path.stem for path in (CONF / "recipe").glob("*.yaml"))
COMPARISONS = {"compare_mnist": [], "compare_cifar2": [], "compare_cifar10_small": ["data.path=subset.npz"]}
DATA_EFFICIENT_TOKENIZERS = ("conv", "spt")  # CCT's convolutions, Lee et al.'s shifted patches


def sweep_list(experiment: str) -> list[str]:
    """The recipes a compare_* experiment sweeps over, in the order Hydra runs them."""
    params = yaml.safe_load((CONF / "experiment" / f"{experiment}.yaml").read_text())["hydra"]["sweeper"]["params"]
    return str(params["+recipe"]).split(",")


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_is_an_experiment_with_auto_precision_and_says_where_its_values_come_from(recipe):
    assert (CONF / "experiment" / f"{recipe}.yaml").is_file(), f"experiment={recipe} is missing"
    text = (CONF / "recipe" / f"{recipe}.yaml").read_text()
    assert text.startswith("# @package _global_\n") and text.count("\n#") >= 3, "a recipe says what it is and why"
    extra = ["data.path=subset.npz"] if recipe.startswith("cifar10_small") else []
    for cfg in (compose([f"experiment={recipe}", *extra]), compose([f"+recipe={recipe}", *extra])):
        assert cfg.trainer.precision == "auto"
        check_config(as_schema(cfg))


@pytest.mark.parametrize("experiment", sorted(COMPARISONS))
def test_a_comparison_runs_every_model_with_its_own_recipe(experiment):
    recipes = sweep_list(experiment)
    jobs = [as_schema(compose([f"experiment={experiment}", f"+recipe={recipe}", *COMPARISONS[experiment]]))
            for recipe in recipes]
    models = [job.model.name for job in jobs]
    assert len(set(models)) == len(models) == len(recipes)
    assert len({job.data.name for job in jobs}) == 1, "one dataset per comparison"
    assert all(job.callbacks.test_curve for job in jobs), "compare.py's time to accuracy needs the test curve"
    for job in jobs:
        check_config(job)
    # Each model its own recipe: the values differ between them where the models need it.
    assert len({(job.optim.lr, job.optim.weight_decay, job.loss.label_smoothing, job.data.autoaugment)
                for job in jobs}) > 1
    # Beside the baselines: a data-efficient ViT and a distilled one.
    assert any(job.model.get("tokenizer") in DATA_EFFICIENT_TOKENIZERS for job in jobs)
    distilled = [i for i, job in enumerate(jobs) if job.distill.teacher_ckpt is not None]
    assert len(distilled) == 1 and jobs[distilled[0]].model.name.endswith("_distilled")
    # The teacher is a job of the same sweep that Hydra runs earlier (its launcher runs them in order).
    teacher = jobs[distilled[0]].distill.teacher_ckpt
    assert teacher.startswith(LATEST) and teacher[len(LATEST):] in models[:distilled[0]]


@pytest.mark.parametrize("recipe", ["mnist_linear", "mnist_cnn"])
def test_the_baselines_get_no_vit_regularisers(recipe):
    cfg = compose([f"experiment={recipe}"])
    assert cfg.loss.label_smoothing == 0 and cfg.loss.mixup_alpha == 0 and cfg.loss.cutmix_alpha == 0
    assert cfg.data.autoaugment is None and cfg.data.randaugment_ops == 0
    assert cfg.data.augment == (recipe != "mnist_linear")


@pytest.mark.parametrize("policy", ["cifar10", "imagenet", "svhn"])
def test_data_autoaugment_applies_the_named_policy_to_each_training_image(policy):
    dm = build_datamodule(resolve_config(name="mnist5k", root=str(EMBEDDED), batch_size=16, augment=False,
                                         autoaugment=policy))
    dm.setup("fit")
    transform = dm.train_set.transform
    assert isinstance(transform.policy, v2.AutoAugment) and transform.policy.policy.value == policy
    augmented, _ = dm.train_set.__getitems__(list(range(64)))
    plain = dm.val_set.transform(dm.train_set.images[:64])  # the same images, not augmented
    assert augmented.shape == plain.shape == (64, 1, 28, 28) and not torch.equal(augmented, plain)


@pytest.mark.slow
def test_the_linear_recipe_reaches_92_percent_on_real_mnist(tmp_path, datasets_root):
    """Logistic regression without augmentation or label smoothing. Its first 3 epochs of the
    recipe's 10 reached 0.9255 (as did all 10); random crops held it below 0.88."""
    cfg = compose(["experiment=mnist_linear", f"data.root={datasets_root}", "trainer.max_epochs=3",
                   "trainer.enable_progress_bar=false"])
    cfg.output_dir = str(tmp_path)
    results = run(cfg)
    assert results["test_acc"] >= 0.92, results["test_acc"]


@pytest.mark.slow
def test_a_compact_convolutional_transformer_learns_from_4000_real_digits(tmp_path):
    """cct_mnist with its recipe for one epoch of the embedded digits (mnist5k), at a batch small
    enough for 125 steps and a learning rate for so few: measured 0.618 test accuracy (chance 0.1)."""
    cfg = compose(["experiment=mnist_cct", "data=mnist5k", "trainer.max_epochs=1", "data.batch_size=32",
                   "optim.lr=1e-3", "optim.warmup_epochs=0.2", "trainer.enable_progress_bar=false"])
    cfg.output_dir = str(tmp_path)
    results = run(cfg)
    assert results["model"] == "cct_mnist" and results["test_acc"] >= 0.45, results["test_acc"]


@pytest.mark.slow
def test_the_cifar2_comparison_trains_the_teacher_first_and_the_distilled_vit_finds_it(tmp_path, datasets_root):
    """The whole sweep through train.py, each job shortened to two batches: the distilled ViT's
    distill.teacher_ckpt=latest:cnn_cifar is the best checkpoint of this sweep's cnn_cifar job."""
    sweep = tmp_path / "sweep"
    done = train_py("experiment=compare_cifar2", "data.source=npz",
                    f"data.path={datasets_root / 'cifar10_jpeg_subset.npz'}", f"hydra.sweep.dir={sweep}",
                    "trainer.max_epochs=1", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                    "trainer.limit_test_batches=1", "callbacks.test_curve=false", "data.batch_size=16",
                    "preflight=false", "trainer.enable_progress_bar=false")
    assert done.returncode == 0, done.stderr[-3000:]
    results = {r["model"]: r for r in (json.loads(p.read_text()) for p in sweep.glob("*/results.json"))}
    assert sorted(results) == ["cct_2_3x2_32", "cnn_cifar", "vit_cifar", "vit_cifar_distilled"]
    teacher = Path(results["cnn_cifar"]["best_checkpoint"])
    distill = results["vit_cifar_distilled"]["distill"]
    assert Path(distill["teacher_ckpt"]).resolve() == teacher.resolve() and distill["teacher_model"] == "cnn_cifar"
    assert all(r["distill"] is None for model, r in results.items() if model != "vit_cifar_distilled")
    assert {r["precision"] for r in results.values()} <= {"32-true", "bf16-mixed"}  # auto, resolved
