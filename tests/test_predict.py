"""predict.py and vit.predict: top-k classes of image files, bad files skipped and reported,
predictions written as CSV or JSON, and every option checked before a model is loaded."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vit.config import LossConfig, OptimConfig
from vit.data.errors import DataError
from vit.errors import ConfigError
from vit.export import save_weights
from vit.inference import load_classifier
from vit.lightning_module import ImageClassifier
from vit.predict import Predictions, check_options, output_file, predict_files, write_predictions

REPO = Path(__file__).resolve().parents[1]


def tiny_classifier(model: str = "vit_mnist") -> ImageClassifier:
    """An untrained one-block model for 1x28x28 digits: enough to exercise prediction, built in
    milliseconds (what is checked here is the plumbing, not the accuracy)."""
    kwargs = {"img_size": 28, "in_chans": 1, "num_classes": 10}  # as training stores them: all spelled out
    if model.startswith("vit"):
        kwargs.update(patch_size=4, embed_dim=32, depth=1, num_heads=2)
    return ImageClassifier(model, kwargs, optim=asdict(OptimConfig()), loss=asdict(LossConfig()),
                           class_names=[str(i) for i in range(10)], mean=[0.1307], std=[0.3081]).eval()


def save_checkpoint(module: ImageClassifier, path: Path) -> Path:
    """The two entries of a training checkpoint that ``load_classifier`` reads."""
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, path)
    return path


def predict_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, str(REPO / "predict.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def classifier() -> ImageClassifier:
    torch.manual_seed(0)
    return tiny_classifier()


@pytest.fixture(scope="module")
def weights(classifier, tmp_path_factory) -> Path:
    return save_weights(classifier, tmp_path_factory.mktemp("weights") / "tiny.safetensors")


@pytest.fixture()
def photos(tmp_path) -> Path:
    """A folder of three real digits and one corrupt JPEG, as a camera card might hold."""
    folder = tmp_path / "photos"
    folder.mkdir()
    digits = np.load(REPO / "data" / "mnist5k" / "mnist5k.npz")
    for i in (0, 1, 2):
        Image.fromarray(digits["images"][i]).save(folder / f"digit{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(200))  # a JPEG header, then nothing
    return folder


# -- in process ---------------------------------------------------------------------------------------

def test_a_corrupt_image_is_skipped_and_the_others_predicted(classifier, photos):
    paths = sorted(photos.iterdir())
    result = predict_files(classifier, paths, top_k=3, batch_size=2)
    assert [p.name for p, _ in result.ranked] == ["digit0.png", "digit1.png", "digit2.png"]
    assert [p.name for p, _ in result.skipped] == ["broken.jpg"]
    assert result.skipped[0][1]  # why, e.g. "UnidentifiedImageError: cannot identify image file ..."
    for _, ranked in result.ranked:
        probs = [p for _, p in ranked]
        assert len(ranked) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
    # the same probabilities as one batch without the broken file: skipping shifts nothing
    alone = predict_files(classifier, [photos / "digit1.png"], top_k=3)
    assert [name for name, _ in alone.ranked[0][1]] == [name for name, _ in result.ranked[1][1]]
    assert [p for _, p in alone.ranked[0][1]] == pytest.approx([p for _, p in result.ranked[1][1]], abs=1e-5)

    with pytest.raises(DataError, match=r"cannot read image .*broken.jpg.*bad_image_policy=fail"):
        predict_files(classifier, paths, bad_image_policy="fail")


@pytest.mark.parametrize("top_k, batch_size, message", [
    (0, 8, "top_k must be a positive integer, got 0"), (-1, 8, "top_k must be a positive integer, got -1"),
    (True, 8, "top_k must be a positive integer, got True"), (3, 0, "batch_size must be a positive integer, got 0"),
    (3, "8", "batch_size must be a positive integer, got '8'")])
def test_top_k_and_batch_size_must_be_positive_integers(classifier, photos, top_k, batch_size, message):
    with pytest.raises(ConfigError, match=message):
        predict_files(classifier, [photos / "digit0.png"], top_k=top_k, batch_size=batch_size)


def test_top_k_larger_than_the_classes_gives_every_class(classifier, photos):
    ranked = predict_files(classifier, [photos / "digit0.png"], top_k=50).ranked[0][1]
    assert sorted(name for name, _ in ranked) == [str(i) for i in range(10)]


def test_predictions_written_as_csv_and_json(tmp_path):
    result = Predictions(ranked=[(Path("a.png"), [("7", 0.9), ("1", 0.05)])],
                         skipped=[(Path("b.jpg"), "UnidentifiedImageError: cannot identify image file")])
    rows = list(csv.DictReader(write_predictions(result, tmp_path / "p.csv", "csv").open()))
    assert rows == [
        {"path": "a.png", "rank": "1", "class": "7", "probability": "0.9", "error": ""},
        {"path": "a.png", "rank": "2", "class": "1", "probability": "0.05", "error": ""},
        {"path": "b.jpg", "rank": "", "class": "", "probability": "", "error": result.skipped[0][1]},
    ]
    data = json.loads(write_predictions(result, tmp_path / "out" / "p.json", "json").read_text())
    assert data == {"predictions": [{"path": "a.png", "top_k": [{"class": "7", "probability": 0.9},
                                                                 {"class": "1", "probability": 0.05}]}],
                    "skipped": [{"path": "b.jpg", "error": result.skipped[0][1]}]}


def test_output_file_takes_the_format_from_the_suffix_or_format(tmp_path):
    assert output_file(None) is None
    assert output_file(tmp_path / "p.CSV") == (tmp_path / "p.CSV", "csv")
    assert output_file(tmp_path / "p.json") == (tmp_path / "p.json", "json")
    assert output_file(tmp_path / "p.txt", "json") == (tmp_path / "p.txt", "json")
    with pytest.raises(ConfigError, match=r"out=.*p.txt: cannot tell the format from the suffix '.txt'"):
        output_file(tmp_path / "p.txt")
    with pytest.raises(ConfigError, match=r"suffix of csv but format=json"):
        output_file(tmp_path / "p.csv", "json")
    with pytest.raises(ConfigError, match=r"format must be one of csv, json, got 'xml'"):
        output_file(tmp_path / "p.xml", "xml")
    with pytest.raises(ConfigError, match=r"format=json needs out=FILE"):
        output_file(None, "json")
    with pytest.raises(ConfigError, match=r"is a folder"):
        output_file(tmp_path, "csv")
    (tmp_path / "kept.csv").write_text("someone's results")
    with pytest.raises(ConfigError, match=r"kept.csv exists; .*overwrite=true"):
        output_file(tmp_path / "kept.csv")
    assert output_file(tmp_path / "kept.csv", overwrite=True) == (tmp_path / "kept.csv", "csv")


def test_check_options_names_the_bad_policy():
    check_options(5, 64, "fail")
    with pytest.raises(ConfigError, match=r"bad_image_policy must be one of skip, fail, got 'ignore'"):
        check_options(5, 64, "ignore")


# -- the command line ---------------------------------------------------------------------------------
# (in-process checks of the same options are in test_bad_inputs_data.py)

@pytest.mark.slow  # a subprocess: importing torch and lightning alone takes seconds
def test_cli_skips_the_corrupt_image_and_writes_csv(tmp_path, weights, photos):
    out = tmp_path / "results" / "preds.csv"
    done = predict_py(f"ckpt_path={weights}", f"images=[{photos}]", "top_k=2", f"out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.strip().splitlines()
    assert [line.split(": ")[0] for line in lines] == [str(photos / f"digit{i}.png") for i in range(3)]
    assert f"skipped {photos / 'broken.jpg'}: " in done.stderr and f"wrote 3 prediction(s) to {out}" in done.stderr
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 2 + 1 and rows[-1]["path"] == str(photos / "broken.jpg") and rows[-1]["error"]

    # (a second run to the same out= is refused: test_output_file_takes_the_format_from_the_suffix_or_format)


@pytest.mark.slow  # a subprocess: importing torch and lightning alone takes seconds
def test_cli_without_images_names_the_key(tmp_path, weights):
    done = predict_py(f"ckpt_path={weights}", cwd=tmp_path)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: images= is required: python predict.py")
    assert "MissingMandatoryValue" not in done.stderr


def test_a_training_checkpoint_and_its_safetensors_export_predict_alike(tmp_path, classifier, weights, photos):
    paths = sorted(photos.glob("*.png"))
    from_weights = predict_files(load_classifier(weights), paths, top_k=3)
    from_ckpt = predict_files(load_classifier(save_checkpoint(classifier, tmp_path / "tiny.ckpt")), paths, top_k=3)
    for (_, a), (_, b) in zip(from_weights.ranked, from_ckpt.ranked):
        assert [name for name, _ in a] == [name for name, _ in b]
        assert [p for _, p in a] == pytest.approx([p for _, p in b], abs=1e-6)


def test_a_file_is_resized_as_the_test_set_of_its_model_was(tmp_path):
    """An image-folder model is tested on files resized by data.interpolation and data.crop_pct;
    predict (and the attention maps) resize a file the same way, from the setting stored in the
    checkpoint and in the exported weights, so a file scores as it would in the test set."""
    from safetensors.torch import load_file, save_file

    from vit.data.config import DataConfig
    from vit.data.datamodules import ArrayDataModule, ImageFolderDataModule
    from vit.data.folder import eval_transform
    from vit.predict import load_image

    rng = np.random.default_rng(0)
    path = tmp_path / "wide.png"
    Image.fromarray(rng.integers(0, 256, (37, 50, 3), dtype=np.uint8)).save(path)
    setting = {"interpolation": "bicubic", "crop_pct": 0.9}

    folder = ImageFolderDataModule(DataConfig(name="imagefolder", path=str(tmp_path), **setting))
    assert folder.eval_resize == setting
    assert ImageFolderDataModule(DataConfig(name="imagefolder", path=str(tmp_path))).eval_resize == {
        "interpolation": "bilinear", "crop_pct": 0.875}
    assert ArrayDataModule(DataConfig(name="mnist5k")).eval_resize == {"interpolation": "bilinear", "crop_pct": 1.0}

    with Image.open(path) as image:  # the test set's pixels, before normalisation
        tested = eval_transform(32, [0.0] * 3, [1.0] * 3, **setting)(image.convert("RGB"))
    assert torch.equal(load_image(path, 3, (32, 32), setting), tested)
    assert not torch.allclose(load_image(path, 3, (32, 32)), tested, atol=0.05)  # the old whole-image resize

    kwargs = {"img_size": 32, "in_chans": 3, "num_classes": 2, "patch_size": 8, "embed_dim": 16, "depth": 1,
              "num_heads": 2}
    module = ImageClassifier("vit_cifar", kwargs, optim=asdict(OptimConfig()), loss=asdict(LossConfig()),
                             class_names=["ant", "bee"], mean=[0.5] * 3, std=[0.25] * 3, eval_resize=setting).eval()
    weights = save_weights(module, tmp_path / "m.safetensors")
    for stored in (load_classifier(weights), load_classifier(save_checkpoint(module, tmp_path / "m.ckpt"))):
        assert stored.hparams["eval_resize"] == setting
        probs = dict(predict_files(stored, [path], top_k=2).ranked[0][1])
        expected = module.model((tested[None] - 0.5) / 0.25).softmax(-1)[0]
        assert [probs["ant"], probs["bee"]] == pytest.approx(expected.tolist(), abs=1e-6)

    # a weights file from before the setting was stored loads, and resizes the whole image as before
    from safetensors import safe_open

    with safe_open(str(weights), framework="pt") as handle:
        metadata = {k: v for k, v in handle.metadata().items() if k != "eval_resize"}
    save_file(load_file(str(weights)), str(tmp_path / "old.safetensors"), metadata=metadata)
    assert load_classifier(tmp_path / "old.safetensors").hparams["eval_resize"] is None
