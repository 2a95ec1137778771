"""Bad inputs to the data package, prediction, attention maps, export and timm conversion.

Each case is an input that cannot work, the exception it must raise and a pattern the message
must match: the message names the bad value (a file, a key, a number) and what was expected.
Every case runs in-process in well under a second; the command-line forms are tested in
test_predict.py, test_visualize.py and test_export.py.
"""
from __future__ import annotations

import functools
import io
import math
import struct
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import torchvision
from hydra import compose, initialize_config_dir
from PIL import Image

import vit
from vit.attention_maps import write_attention_figures
from vit.config import LossConfig, OptimConfig
from vit.data import DataError, DatasetNotFoundError, build_datamodule
from vit.errors import CheckpointError, ConfigError, UserError
from vit.export import ExportError, export, save_weights
from vit.export import _main as export_main
from vit.inference import load_classifier, require_keys
from vit.lightning_module import ImageClassifier
from vit.predict import check_options, expand_image_paths, output_file, predict_files

REPO = Path(__file__).resolve().parents[1]

# -- helpers ------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def tiny(model: str = "vit_mnist") -> ImageClassifier:
    """An untrained classifier for 1x28x28 digits (one block for the ViT), built in milliseconds."""
    torch.manual_seed(0)
    kwargs = {"img_size": 28, "in_chans": 1, "num_classes": 10}
    if model.startswith("vit"):
        kwargs.update(patch_size=4, embed_dim=32, depth=1, num_heads=2)
    return ImageClassifier(model, kwargs, optim=asdict(OptimConfig()), loss=asdict(LossConfig()),
                           class_names=[str(i) for i in range(10)], mean=[0.1307], std=[0.3081]).eval()


def weights(tmp: Path, model: str = "linear_mnist") -> Path:
    return save_weights(tiny(model), tmp / f"{model}.safetensors")


@functools.lru_cache(maxsize=None)
def digit_png() -> bytes:
    """A real MNIST digit (from the embedded mnist5k set) as PNG bytes."""
    buffer = io.BytesIO()
    Image.fromarray(np.load(REPO / "data" / "mnist5k" / "mnist5k.npz")["images"][0]).save(buffer, format="PNG")
    return buffer.getvalue()


BROKEN_JPEG = b"\xff\xd8\xff\xe0" + bytes(200)  # a JPEG header and nothing after it


def files(tmp: Path, layout: dict[str, bytes | str | None]) -> Path:
    """Write ``{relative path: content}`` under ``tmp``; None is a real digit PNG."""
    for relative, content in layout.items():
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, str):
            path.write_text(content)
        else:
            path.write_bytes(digit_png() if content is None else content)
    return tmp


def image(tmp: Path, name: str = "digit.png", content: bytes | None = None) -> Path:
    return files(tmp, {name: content}) / name


def two_class_folder(tmp: Path, extra: dict[str, bytes | str | None] | None = None) -> Path:
    """An image folder train/{a,b}, val/{a,b} with one digit each, plus the ``extra`` files."""
    layout: dict[str, bytes | str | None] = {f"{s}/{c}/1.png": None for s in ("train", "val") for c in "ab"}
    return files(tmp, {**layout, **(extra or {})})


def setup_folder(path: Path, **options) -> None:
    build_datamodule(name="imagefolder", path=str(path), img_size=28, batch_size=1, **options).setup("fit")


GOOD_ARRAYS = {"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.arange(4),
               "x_test": np.zeros((2, 8, 8, 3), np.uint8), "y_test": np.arange(2)}


def npz(tmp: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    """An arrays file like the CIFAR-10 one, with some arrays changed or dropped."""
    arrays = {k: v for k, v in {**GOOD_ARRAYS, **changes}.items() if k not in drop}
    np.savez(tmp / "arrays.npz", **arrays)
    return tmp / "arrays.npz"


def load_npz(path: Path) -> None:
    build_datamodule(name="cifar10", source="npz", path=str(path)).setup("fit")


def idx(dims: tuple[int, ...], type_code: int = 0x08, cut: int = 0, extra: bytes = b"") -> bytes:
    """An IDX file (MNIST's format) of zeros, with ``cut`` bytes cut off its end or ``extra`` added."""
    data = bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + bytes(math.prod(dims))
    return data[:len(data) - cut] + extra


def mnist_root(tmp: Path, **replace: bytes) -> Path:
    """ROOT/MNIST/raw with two 28x28 images per split; ``replace`` swaps files (``_`` is ``-``)."""
    raw = {"train-images-idx3-ubyte": idx((2, 28, 28)), "train-labels-idx1-ubyte": idx((2,)),
           "t10k-images-idx3-ubyte": idx((2, 28, 28)), "t10k-labels-idx1-ubyte": idx((2,))}
    raw.update({key.replace("_", "-"): value for key, value in replace.items()})
    return files(tmp, {f"MNIST/raw/{name}": content for name, content in raw.items()})


def load_mnist(root: Path) -> None:
    build_datamodule(name="mnist", root=str(root), download=False).prepare_data()


def config(name: str, *overrides: str):
    """conf/<name>.yaml composed with overrides, as the command line would see it."""
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose(name, overrides=list(overrides))


def without_module(name: str, action: Callable[[], object]) -> None:
    """Run ``action`` as if the package ``name`` were not installed (an import of it fails)."""
    saved = {key: module for key, module in sys.modules.items() if key == name or key.startswith(name + ".")}
    for key in saved:
        del sys.modules[key]
    sys.modules[name] = None  # type: ignore[assignment]  # makes `import name` raise ImportError
    try:
        action()
    finally:
        del sys.modules[name]
        sys.modules.update(saved)


# -- the cases ----------------------------------------------------------------------------------------

CASES = [
    # .npz arrays files (data.source=npz)
    pytest.param(lambda t: load_npz(npz(t, classes=np.array([{"n": 1}] * 10, dtype=object))),
                 DataError, r"arrays.npz: array 'classes' holds Python objects", id="npz-object-array"),
    pytest.param(lambda t: load_npz(files(t, {"a.npz": "x_train,y_train\n1,2\n"}) / "a.npz"),
                 DataError, r"a.npz is not an .npz file", id="npz-text-file"),
    pytest.param(lambda t: load_npz(files(t, {"a.npz": b""}) / "a.npz"),
                 DataError, r"a.npz is not an .npz file", id="npz-empty-file"),
    pytest.param(lambda t: load_npz(files(t, {"a.npz": b"\x93NUMPY" + bytes(100)}) / "a.npz"),
                 DataError, r"a.npz holds a single .npy array", id="npz-single-npy"),
    pytest.param(lambda t: load_npz(files(t, {"a.npz": npz(t).read_bytes()[:200]}) / "a.npz"),
                 DataError, r"a.npz is truncated or damaged", id="npz-truncated"),
    pytest.param(lambda t: load_npz(npz(t, drop=("y_test",))), DataError, r"lacks the arrays \['y_test'\]",
                 id="npz-missing-array"),
    pytest.param(lambda t: load_npz(npz(t, x_train=np.zeros((4, 8, 8, 3), np.float32))),
                 DataError, r"images must be uint8 .* got float32 \(4, 8, 8, 3\)", id="npz-float-images"),
    pytest.param(lambda t: load_npz(npz(t, y_train=np.array([0, 1, 2, 10]))),
                 DataError, r"labels must lie in \[0, 10\), got \[0, 10\]", id="npz-label-out-of-range"),
    pytest.param(lambda t: load_npz(npz(t, classes=np.array(["a", "b", "c"]))),
                 DataError, r"'classes' holds 3 names, CIFAR-10 has 10", id="npz-wrong-class-count"),
    pytest.param(lambda t: load_npz(t), DatasetNotFoundError, r"arrays file not found", id="npz-path-is-folder"),
    pytest.param(lambda t: build_datamodule(
                     name="mnist5k", root=str(files(t, {"mnist5k/mnist5k.npz": npz(t).read_bytes()}))).setup("fit"),
                 DataError, r"mnist5k.npz lacks the arrays \['images', 'labels'\]", id="mnist5k-wrong-arrays"),
    # MNIST IDX files
    pytest.param(lambda t: load_mnist(mnist_root(t, train_images_idx3_ubyte=idx((2, 28, 28), cut=100))), DataError,
                 r"train-images-idx3-ubyte is truncated: 1,484 bytes, expected 1,584", id="idx-truncated"),
    pytest.param(lambda t: load_mnist(mnist_root(t, t10k_labels_idx1_ubyte=idx((2,), extra=b"\0"))), DataError,
                 r"t10k-labels-idx1-ubyte is longer than its header says: 11 bytes, expected 10", id="idx-too-long"),
    pytest.param(lambda t: load_mnist(mnist_root(t, train_labels_idx1_ubyte=b"<html>Not Found</html>")), DataError,
                 r"train-labels-idx1-ubyte is not an IDX file: its first bytes are 3c68746d", id="idx-html-page"),
    pytest.param(lambda t: load_mnist(mnist_root(t, train_images_idx3_ubyte=idx((2, 28, 28))[:6])), DataError,
                 r"train-images-idx3-ubyte is truncated: 6 bytes, too short for the header", id="idx-short-header"),
    pytest.param(lambda t: load_mnist(mnist_root(t, train_labels_idx1_ubyte=idx((3,)))), DataError,
                 r"train-labels-idx1-ubyte holds labels of shape \(3,\) for the 2 images", id="idx-label-count"),
    pytest.param(lambda t: load_mnist(mnist_root(t, t10k_images_idx3_ubyte=idx((2, 32, 32)))), DataError,
                 r"t10k-images-idx3-ubyte holds an array of shape \(2, 32, 32\); expected N x 28 x 28",
                 id="idx-image-size"),
    # image folders
    pytest.param(lambda t: setup_folder(two_class_folder(t, {"train/c/notes.txt": "x"})), DataError,
                 r"train/c holds no image files .*1 other file\(s\): .*train/c/notes.txt", id="folder-no-images"),
    pytest.param(lambda t: setup_folder(files(t, {"train/a/1.png": None, "train/b/1.png": None, "val/a/1.png": None})),
                 DataError, r"class folder .*val/b is missing", id="folder-val-lacks-class"),
    pytest.param(lambda t: setup_folder(two_class_folder(t, {"val/c/1.png": None})), DataError,
                 r"val has class folders \['c'\] that the training split does not have", id="folder-extra-class"),
    pytest.param(lambda t: setup_folder(files(t, {"train/1.png": None})), DataError,
                 r"train has no class sub-folders", id="folder-no-classes"),
    pytest.param(lambda t: setup_folder(two_class_folder(t, {"train/a/bad.jpg": BROKEN_JPEG}), bad_image_policy="fail"),
                 DataError, r"unreadable image .*train/a/bad.jpg", id="folder-fail-policy"),
    pytest.param(lambda t: setup_folder(files(t, {"train/a/1.jpg": BROKEN_JPEG, "train/b/1.png": None})),
                 DataError, r"class folder .*train/a holds no readable images", id="folder-nothing-readable"),
    pytest.param(lambda t: setup_folder(t), DatasetNotFoundError, r"train/", id="folder-no-train"),
    pytest.param(lambda t: setup_folder(two_class_folder(t), bad_image_policy="ignore"), ValueError,
                 r"unknown data.bad_image_policy 'ignore'", id="folder-unknown-policy"),
    # predict
    pytest.param(lambda t: check_options(0, 64), ConfigError, r"top_k must be a positive integer, got 0", id="top-k-0"),
    pytest.param(lambda t: check_options("five", 64), ConfigError, r"top_k must be a positive integer, got 'five'",
                 id="top-k-text"),
    pytest.param(lambda t: check_options(5, -3), ConfigError, r"batch_size must be a positive integer, got -3",
                 id="batch-size-negative"),
    pytest.param(lambda t: check_options(5, 64, "ignore"), ConfigError, r"bad_image_policy must be one of skip, fail",
                 id="predict-unknown-policy"),
    pytest.param(lambda t: output_file(t / "preds.txt"), ConfigError, r"cannot tell the format from the suffix '.txt'",
                 id="out-unknown-suffix"),
    pytest.param(lambda t: output_file(image(t, "preds.csv", b"kept")), ConfigError, r"preds.csv exists",
                 id="out-exists"),
    pytest.param(lambda t: output_file(t), ConfigError, r"is a folder", id="out-folder"),
    pytest.param(lambda t: output_file(t / "p.json", "xml"), ConfigError, r"format must be one of csv, json, got 'xml'",
                 id="out-unknown-format"),
    pytest.param(lambda t: output_file(t / "p.csv", "json"), ConfigError, r"suffix of csv but format=json",
                 id="out-format-contradicts-suffix"),
    pytest.param(lambda t: expand_image_paths([]), ConfigError, r"images is empty", id="images-empty"),
    pytest.param(lambda t: expand_image_paths([t / "missing.png"]), FileNotFoundError,
                 r"no such image file or folder: .*missing.png", id="images-missing-file"),
    pytest.param(lambda t: expand_image_paths([files(t, {"notes.txt": "x"})]), FileNotFoundError,
                 r"no image files .* found in", id="images-folder-without-images"),
    pytest.param(lambda t: require_keys(config("predict", "ckpt_path=m.ckpt"), "usage", "ckpt_path", "images"),
                 ConfigError, r"^images= is required: usage$", id="predict-images-key-missing"),
    pytest.param(lambda t: require_keys(config("predict"), "usage", "ckpt_path", "images"),
                 ConfigError, r"^ckpt_path= and images= are required", id="predict-both-keys-missing"),
    pytest.param(lambda t: predict_files(tiny(), [image(t), image(t, "b.jpg", BROKEN_JPEG)], bad_image_policy="fail"),
                 DataError, r"cannot read image .*b.jpg", id="predict-fail-policy"),
    pytest.param(lambda t: load_classifier(t / "nope.ckpt"), CheckpointError, r"checkpoint not found: .*nope.ckpt",
                 id="ckpt-missing"),
    pytest.param(lambda t: load_classifier(image(t, "m.safetensors", b"not safetensors")), CheckpointError,
                 r"cannot read .*m.safetensors as safetensors", id="ckpt-not-safetensors"),
    # visualize
    pytest.param(lambda t: write_attention_figures(tiny(), [image(t)], image(t, "figures", b"a file")), ConfigError,
                 r"out=.*figures is a file", id="visualize-out-is-file"),
    pytest.param(lambda t: write_attention_figures(tiny(), [image(t)], t / "o", layers=[3]), ConfigError,
                 r"layer 3 does not exist: the model has 1 layers", id="visualize-layer"),
    pytest.param(lambda t: write_attention_figures(tiny(), [image(t)], t / "o", head_fusion="sum"), ConfigError,
                 r"head_fusion must be 'mean', 'max' or 'min', got 'sum'", id="visualize-head-fusion"),
    pytest.param(lambda t: write_attention_figures(tiny(), [image(t)], t / "o", discard_ratio=1.0), ConfigError,
                 r"discard_ratio must be in \[0, 1\), got 1.0", id="visualize-discard-ratio"),
    pytest.param(lambda t: write_attention_figures(tiny("linear_mnist"), [image(t)], t / "o"), UserError,
                 r"attention maps need a ViT.*'linear_mnist'", id="visualize-no-attention"),
    pytest.param(lambda t: write_attention_figures(tiny(), [image(t, "x.png", BROKEN_JPEG)], t / "o"), UserError,
                 r"cannot read image .*x.png", id="visualize-broken-image"),
    pytest.param(lambda t: require_keys(config("visualize", "ckpt_path=m.ckpt"), "usage", "ckpt_path", "images"),
                 ConfigError, r"^images= is required", id="visualize-images-key-missing"),
    # export
    pytest.param(lambda t: without_module("onnx", lambda: export(tiny("linear_mnist"), "onnx", t / "m.onnx")),
                 ExportError, r"needs onnx, not installed here.*pip install 'vit\[export\]'", id="export-no-onnx"),
    pytest.param(lambda t: without_module("onnxruntime", lambda: export(tiny("linear_mnist"), "onnx", t / "m.onnx")),
                 ExportError, r"needs onnxruntime.*vit\[export\].*verify=false", id="export-no-onnxruntime"),
    pytest.param(lambda t: without_module("onnxscript", lambda: export(tiny("linear_mnist"), "onnx", t / "m.onnx",
                                                                        exporter="dynamo")),
                 ExportError, r"needs onnxscript", id="export-dynamo-no-onnxscript"),
    pytest.param(lambda t: without_module("onnx", lambda: export_main(config("export", f"ckpt_path={t / 'no.ckpt'}"))),
                 ExportError, r"pip install 'vit\[export\]'", id="export-cli-no-onnx-before-loading"),
    pytest.param(lambda t: export(tiny("linear_mnist"), "tflite", t / "m.tflite"), ExportError,
                 r"unknown format 'tflite'; choose one of safetensors, onnx", id="export-format"),
    pytest.param(lambda t: export(tiny("linear_mnist"), "export", t / "m.pt"), ExportError, r"\*.pt2; got out=.*m.pt",
                 id="export-pt2-suffix"),
    pytest.param(lambda t: export(tiny("linear_mnist"), "safetensors", t), ExportError, r"out=.* is a folder",
                 id="export-out-folder"),
    pytest.param(lambda t: export_main(config("export", f"ckpt_path={weights(t)}", "opset=12")), ExportError,
                 r"opset must be an integer >= 17 .*got 12", id="export-opset"),
    pytest.param(lambda t: export_main(config("export", f"ckpt_path={weights(t)}", "exporter=fast")), ExportError,
                 r"unknown exporter 'fast'", id="export-exporter"),
    pytest.param(lambda t: export_main(config("export")), ConfigError, r"^ckpt_path= is required",
                 id="export-ckpt-key-missing"),
    # timm conversion
    pytest.param(lambda t: vit.from_timm(torch.nn.Linear(4, 2)), TypeError, r"got torch.nn.modules.linear.Linear",
                 id="from-timm-linear"),
    pytest.param(lambda t: vit.from_timm(torchvision.models.resnet18()), TypeError,
                 r"from_timm converts timm's VisionTransformer .*got torchvision.models.resnet.ResNet",
                 id="from-timm-resnet"),
    pytest.param(lambda t: vit.from_timm(tiny().model), TypeError, r"already this package's model",
                 id="from-timm-own-model"),
    pytest.param(lambda t: vit.to_timm(torch.nn.Linear(4, 2)), TypeError,
                 r"to_timm converts vit.VisionTransformer, got torch.nn.modules.linear.Linear", id="to-timm-linear"),
]


@pytest.mark.parametrize("run, error, message", CASES)
def test_bad_input_is_refused_with_a_message_naming_it(tmp_path, run, error, message):
    with pytest.raises(error, match=message):
        run(tmp_path)


def test_every_data_error_is_a_user_error_and_a_value_error():
    """train.py prints UserErrors as one line and exits 2; older callers caught ValueError."""
    assert issubclass(DataError, UserError) and issubclass(DataError, ValueError)
    assert issubclass(DatasetNotFoundError, UserError) and issubclass(DatasetNotFoundError, FileNotFoundError)
