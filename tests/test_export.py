"""Export: safetensors weights without pickle, ONNX with a dynamic batch under onnxruntime,
TorchScript and torch.export, and the ``python -m vit.export`` command."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import vit
from vit.errors import CheckpointError
from vit.export import ExportError, export, export_onnx, run_exported, save_weights
from vit.inference import load_classifier, load_weights, read_metadata
from vit.lightning_module import ImageClassifier

from test_training import REPO
from test_visualize import tiny_checkpoints

# costly module-scoped fixtures: one worker runs them all, once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_export")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    return tiny_checkpoints(tmp_path_factory.mktemp("runs"))


@pytest.fixture(scope="module")
def digits() -> torch.Tensor:
    """Eight real digits as the exported graphs take them: float (8, 1, 28, 28) in [0, 1]."""
    images = np.load(REPO / "data" / "mnist5k" / "mnist5k.npz")["images"][-8:]
    return torch.from_numpy(images).float().div(255.0)[:, None]


def pytorch_logits(module: ImageClassifier, images: torch.Tensor) -> torch.Tensor:
    """The reference, written out independently of the export wrapper: the checkpoint's
    normalisation as vit.predict applies it, then the network in eval mode."""
    mean = torch.tensor(module.hparams.mean).view(-1, 1, 1)
    std = torch.tensor(module.hparams.std).view(-1, 1, 1)
    with torch.no_grad():
        return module.model.eval()((images - mean) / std)


# -- safetensors --------------------------------------------------------------------------------------

def test_safetensors_round_trip_is_exact_and_holds_no_pickle(tmp_path, checkpoints, digits):
    from safetensors import safe_open

    module = load_classifier(checkpoints["vit_mnist"])
    path = save_weights(module, tmp_path / "vit.safetensors")

    # The whole file is an 8-byte header length, a JSON header and the raw tensor bytes it
    # indexes: no byte is left over where a pickle could hide.
    raw = path.read_bytes()
    (header_length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + header_length])
    assert header.pop("__metadata__")["model_name"] == "vit_mnist"
    assert len(raw) == 8 + header_length + max(entry["data_offsets"][1] for entry in header.values())
    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == set(module.model.state_dict())
    meta = read_metadata(path)
    assert meta["model_kwargs"] == json.loads(json.dumps(dict(module.hparams.model_kwargs)))
    assert meta["class_names"] == list(module.hparams.class_names) and len(meta["class_names"]) == 10
    assert meta["mean"] == pytest.approx(module.hparams.mean) and meta["std"] == pytest.approx(module.hparams.std)

    restored = load_weights(path)
    assert isinstance(restored, ImageClassifier) and not restored.training
    assert torch.equal(pytorch_logits(restored, digits), pytorch_logits(module, digits))
    # what predict.py, visualize.py and vit.export read when given the file as ckpt_path
    assert torch.equal(pytorch_logits(load_classifier(path), digits), pytorch_logits(module, digits))


def test_a_bare_model_saves_with_its_config_and_bad_files_are_refused(tmp_path, digits):
    model = vit.create_model("linear_mnist", num_classes=3).eval()
    config = {"model_name": "linear_mnist", "model_kwargs": {"num_classes": 3}, "class_names": ["a", "b", "c"],
              "mean": [0.5], "std": [0.25]}
    restored = load_weights(save_weights(model, tmp_path / "bare.safetensors", config))
    with torch.no_grad():
        assert torch.equal(restored.model(digits), model(digits))
    assert restored.hparams.optim["name"] == "adamw"  # training defaults fill what the file lacks
    with pytest.raises(TypeError, match="needs config"):
        save_weights(model, tmp_path / "x.safetensors")

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="cannot read"):
        load_weights(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(CheckpointError, match="lacks model_name"):
        load_weights(tmp_path / "foreign.safetensors")


# -- ONNX ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["vit_mnist", "linear_mnist"])
def test_onnx_matches_pytorch_on_real_digits_at_two_batch_sizes(tmp_path, checkpoints, digits, name):
    module = load_classifier(checkpoints[name])
    path = tmp_path / f"{name}.onnx"
    assert export_onnx(module, path) == "dynamo"  # the preferred exporter works for both models

    graph = onnx.load(str(path))
    assert max(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")) >= 17
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic: any batch size
    for batch in (1, 7):
        images = digits[:batch]
        got = run_exported("onnx", path, images)
        assert got.shape == (batch, 10)
        assert torch.allclose(got, pytorch_logits(module, images), atol=1e-4, rtol=0)


def test_torchscript_based_onnx_exporter_and_fallback_agree(tmp_path, checkpoints, digits, monkeypatch):
    module = load_classifier(checkpoints["vit_mnist"])
    assert export_onnx(module, tmp_path / "ts.onnx", exporter="torchscript") == "torchscript"
    assert torch.allclose(run_exported("onnx", tmp_path / "ts.onnx", digits[:7]), pytorch_logits(module, digits[:7]),
                          atol=1e-4, rtol=0)

    original = torch.onnx.export

    def dynamo_unavailable(*args, **kwargs):
        if kwargs.get("dynamo", True):
            raise ImportError("No module named 'onnxscript'")
        return original(*args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", dynamo_unavailable)
    linear = load_classifier(checkpoints["linear_mnist"])
    assert export_onnx(linear, tmp_path / "fallback.onnx") == "torchscript"
    with pytest.raises(ExportError, match="dynamo ONNX exporter failed.*onnxscript"):
        export_onnx(linear, tmp_path / "strict.onnx", exporter="dynamo")


# -- TorchScript and torch.export ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")  # deprecated in torch 2.14, still works
@pytest.mark.parametrize("fmt, suffix", [("torchscript", ".torchscript.pt"), ("export", ".pt2")])
def test_torchscript_and_torch_export_reproduce_the_vit(tmp_path, checkpoints, digits, fmt, suffix):
    module = load_classifier(checkpoints["vit_mnist"])
    report = export(module, fmt, tmp_path / f"vit{suffix}")  # verify=True: batches 1 and 3 within 1e-4
    assert report["max_abs_diff"] <= 1e-4
    got = run_exported(fmt, report["path"], digits[:7])  # and a batch size it was not traced with
    assert torch.allclose(got, pytorch_logits(module, digits[:7]), atol=1e-5, rtol=0)


def test_export_refuses_unknown_formats_and_misnamed_archives(tmp_path, checkpoints):
    module = load_classifier(checkpoints["linear_mnist"])
    with pytest.raises(ExportError, match="unknown format 'tflite'"):
        export(module, "tflite", tmp_path / "m.tflite")
    with pytest.raises(ExportError, match=r"\*.pt2"):
        export(module, "export", tmp_path / "m.pt")


# -- the command line ---------------------------------------------------------------------------------

def export_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vit.export", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_cli_writes_a_verified_onnx_file(tmp_path, checkpoints):
    # the linear model keeps this quick; the ViT's ONNX export is checked in-process above
    out = tmp_path / "exported" / "linear.onnx"
    done = export_cli(f"ckpt_path={checkpoints['linear_mnist']}", "format=onnx", f"out={out}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert out.is_file() and done.stdout.startswith(str(out))
    assert "exporter dynamo" in done.stdout and "max |difference| vs PyTorch" in done.stdout
    assert sorted(p.name for p in out.parent.iterdir()) == ["linear.onnx"]  # weights inline, no side file
    assert not list(tmp_path.glob("outputs")) and not list(tmp_path.glob(".hydra"))  # no run directory


# -- without the ONNX packages ------------------------------------------------------------------------

def test_onnx_without_the_onnx_packages_names_the_install_command(tmp_path, monkeypatch):
    from test_predict import tiny_classifier

    from vit.export import INSTALL_EXPORT

    assert "pip install 'vit[export]'" in INSTALL_EXPORT and "pip install -e '.[export]'" in INSTALL_EXPORT
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails as if it were not installed
    with pytest.raises(ExportError, match=r"format=onnx needs onnx, not installed here") as info:
        export(tiny_classifier("linear_mnist"), "onnx", tmp_path / "m.onnx")
    assert INSTALL_EXPORT in str(info.value)
    assert not list(tmp_path.iterdir())  # refused before anything was written
    # other formats do not need the ONNX packages
    assert export(tiny_classifier("linear_mnist"), "safetensors", tmp_path / "m.safetensors")["max_abs_diff"] == 0


def test_auto_exporter_without_onnxscript_falls_back_and_says_how_to_install(tmp_path, monkeypatch, caplog):
    from test_predict import tiny_classifier

    monkeypatch.setitem(sys.modules, "onnxscript", None)
    with caplog.at_level("WARNING"):
        report = export(tiny_classifier("linear_mnist"), "onnx", tmp_path / "m.onnx")
    assert report["exporter"] == "torchscript" and report["max_abs_diff"] <= 1e-4
    assert "onnxscript is not installed" in caplog.text and "pip install 'vit[export]'" in caplog.text


def test_the_export_extra_holds_the_onnx_packages_with_the_dev_pins():
    import tomllib

    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert sorted(extras["export"]) == ["onnx>=1.23", "onnxruntime>=1.32", "onnxscript>=0.7"]
    assert set(extras["export"]) <= set(extras["dev"])


@pytest.mark.slow  # a subprocess: importing torch and lightning alone takes seconds
def test_cli_without_onnx_is_one_message_naming_the_install_command(tmp_path):
    script = ("import sys; sys.modules['onnx'] = None; from vit.export import main; "
              f"sys.argv = ['vit.export', 'ckpt_path={tmp_path / 'm.ckpt'}', 'format=onnx']; main()")
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: format=onnx needs onnx, not installed here; install the export extra: pip install 'vit[export]' "
        "(in a source checkout: pip install -e '.[export]')"]
