"""Export a trained classifier for use outside this package.

``python -m vit.export ckpt_path=RUN/checkpoints/last.ckpt format=onnx out=model.onnx``

Formats (``format=``):

* ``safetensors``: the model's tensors, and in the file's metadata (plain JSON strings) everything
  needed to rebuild it: model name, constructor arguments, class names, the dataset's mean and
  std. Nothing is pickled; :func:`vit.inference.load_classifier` rebuilds the :class:`ImageClassifier`.
* ``onnx``: a graph from float images in [0, 1] of shape ``(N, C, H, W)``, any ``N``, to logits
  ``(N, num_classes)``; the dataset's normalisation is part of the graph
  (:class:`vit.inference.NormalizedClassifier`), so a caller only scales pixels to [0, 1].
  Opset 18. Two exporters work for every model here, including the ViT's fused
  ``scaled_dot_product_attention`` path (checked under onnxruntime against PyTorch to 1e-4 at
  batch sizes 1 and 7, see tests/test_export.py):

  - ``exporter=dynamo`` (``torch.onnx.export(dynamo=True)``, built on ``torch.export``): PyTorch's
    default and maintained exporter since 2.9; needs the ``onnxscript`` package. Preferred.
  - ``exporter=torchscript`` (``dynamo=False``): deprecated by PyTorch and slated for removal,
    kept as the fallback for when onnxscript is missing or the dynamo exporter fails.
  - ``exporter=auto`` (default): dynamo, falling back to torchscript with a logged warning.

* ``torchscript``: ``torch.jit.trace`` of the same normalising wrapper, dynamic batch. Works, but
  PyTorch 2.14 deprecates ``torch.jit`` (FutureWarning); prefer ``export``.
* ``export``: a ``torch.export`` ``ExportedProgram`` (``.pt2``) with a dynamic batch dimension;
  load with ``torch.export.load(path).module()``.

Every export is read back and compared with PyTorch on images of batch sizes 1 and 3
(``verify=true``, the default); a file whose outputs differ by more than 1e-4 is deleted and
reported as an error.

The ONNX packages (onnx, onnxscript for the dynamo exporter, onnxruntime for the check) are an
optional extra: ``pip install 'vit[export]'`` (in a source checkout ``pip install -e '.[export]'``).
Without them ``format=onnx`` stops before loading anything, with a message naming that command.
"""
from __future__ import annotations

import importlib
import json
import logging
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Literal, Mapping, Sequence

import torch
from torch import nn

from vit.errors import UserError
from vit.inference import WEIGHTS_METADATA, NormalizedClassifier, load_classifier, load_weights
from vit.lightning_module import ImageClassifier

log = logging.getLogger(__name__)

Format = Literal["safetensors", "onnx", "torchscript", "export"]
OnnxExporter = Literal["auto", "dynamo", "torchscript"]

SUFFIXES: dict[str, str] = {"safetensors": ".safetensors", "onnx": ".onnx",
                            "torchscript": ".torchscript.pt", "export": ".pt2"}
ONNX_EXPORTERS = ("auto", "dynamo", "torchscript")
INSTALL_EXPORT = "pip install 'vit[export]' (in a source checkout: pip install -e '.[export]')"
ONNX_OPSET = 18
TOLERANCE = 1e-4
# Protobuf cannot hold more than 2 GiB; above this the ONNX weights go to a side file.
_ONNX_INLINE_LIMIT_BYTES = 1_800_000_000


class ExportError(UserError):
    """An export that cannot be produced, or whose file does not reproduce the model."""


# -- safetensors --------------------------------------------------------------------------------------

def save_weights(module_or_model: ImageClassifier | nn.Module, path: str | Path,
                 config: Mapping[str, Any] | None = None) -> Path:
    """Write the model's tensors and its configuration to a safetensors file (no pickle).

    Args:
        module_or_model: an :class:`ImageClassifier`, whose hparams supply the configuration, or
            a bare model created by ``vit.create_model``, which then needs ``config``.
        path: the file to write.
        config: for a bare model: ``model_name``, ``model_kwargs``, ``class_names``, ``mean``,
            ``std`` (and optionally ``optim``, ``loss``, ``eval_resize``), as in ``ImageClassifier``'s
            arguments.

    Returns:
        ``path`` as a Path. The metadata holds ``model_name`` as a string and the other entries
        as JSON, so any safetensors reader can recover the configuration;
        :func:`vit.inference.load_classifier` rebuilds the classifier from it.
    """
    from safetensors.torch import save_file

    if isinstance(module_or_model, ImageClassifier):
        if config is not None:
            raise TypeError("config is taken from the ImageClassifier's hparams; pass a bare model to override it")
        config = dict(module_or_model.hparams)
        model = module_or_model.model
    else:
        if config is None or any(key not in config for key in WEIGHTS_METADATA):
            raise TypeError(f"a bare model needs config with {', '.join(WEIGHTS_METADATA)}")
        model = module_or_model
    metadata = {"model_name": str(config["model_name"])}
    for key in ("model_kwargs", "class_names", "mean", "std", "optim", "loss", "eval_resize"):
        if key in config:
            metadata[key] = json.dumps(_plain(config[key]))
    metadata["format"] = "pt"  # the safetensors convention for PyTorch-layout tensors
    # safetensors stores each tensor's own bytes: detach, CPU, contiguous
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in model.state_dict().items()}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


def _plain(value: Any) -> Any:
    """Containers from hparams (OmegaConf, AttributeDict, tuples) as JSON-ready builtins."""
    from omegaconf import DictConfig, ListConfig, OmegaConf

    if isinstance(value, (DictConfig, ListConfig)):
        return OmegaConf.to_container(value, resolve=True)
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


# -- graph exports ------------------------------------------------------------------------------------

def _example_input(wrapper: NormalizedClassifier, batch: int = 2) -> torch.Tensor:
    # Batch 2, not 1: torch.export specialises a dimension of size 1 to a constant.
    return torch.rand(batch, *wrapper.input_shape)


@contextmanager
def _quiet_tracing() -> Iterator[None]:
    """Silence TracerWarnings: they flag the models' input-shape checks, which compare the fixed
    C, H, W with constants and are correct to freeze. Deprecation warnings still show."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        yield


def _missing_modules(names: Sequence[str]) -> list[str]:
    # Imported rather than looked up: a package that is installed but broken is as missing.
    missing = []
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    return missing


def check_onnx_packages(exporter: str = "auto", verify: bool = True) -> None:
    """Raise ExportError naming the install command when a package ONNX export needs is missing:
    onnx always, onnxscript for exporter=dynamo (auto falls back without it), onnxruntime to verify."""
    needed = ["onnx", *(["onnxscript"] if exporter == "dynamo" else []), *(["onnxruntime"] if verify else [])]
    missing = _missing_modules(needed)
    if missing:
        hint = " (or verify=false to write the file without checking it)" if missing == ["onnxruntime"] else ""
        raise ExportError(f"format=onnx needs {', '.join(missing)}, not installed here; install the export "
                          f"extra: {INSTALL_EXPORT}{hint}")


def export_onnx(module: ImageClassifier, path: str | Path, exporter: OnnxExporter = "auto",
                opset: int = ONNX_OPSET) -> str:
    """Write an ONNX graph: images ``(N, C, H, W)`` in [0, 1] -> logits ``(N, num_classes)``, N dynamic.

    Input and output are named ``images`` and ``logits``. Returns the exporter that produced
    the file, ``'dynamo'`` or ``'torchscript'`` (see the module docstring for the choice).
    """
    if exporter not in ONNX_EXPORTERS:
        raise ExportError(f"unknown ONNX exporter {exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    if opset < 17:
        raise ExportError(f"opset {opset} is too old: LayerNormalization needs opset >= 17")
    check_onnx_packages(exporter, verify=False)
    if exporter == "auto" and _missing_modules(["onnxscript"]):
        log.warning("onnxscript is not installed, so the dynamo ONNX exporter cannot run; using the "
                    "TorchScript-based one. For the dynamo exporter: %s", INSTALL_EXPORT)
        exporter = "torchscript"
    wrapper = NormalizedClassifier.from_classifier(module).eval()
    example = _example_input(wrapper)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = {"input_names": ["images"], "output_names": ["logits"], "opset_version": opset}
    if exporter in ("auto", "dynamo"):
        try:
            large = sum(t.numel() * t.element_size() for t in wrapper.state_dict().values()) > _ONNX_INLINE_LIMIT_BYTES
            torch.onnx.export(wrapper, (example,), str(path), dynamo=True, verbose=False,
                              external_data=large, dynamic_shapes=({0: torch.export.Dim("batch")},), **names)
            return "dynamo"
        except Exception as error:  # onnxscript missing, or an operator dynamo cannot translate
            if exporter == "dynamo":
                raise ExportError(f"the dynamo ONNX exporter failed: {type(error).__name__}: {error}; "
                                  f"try exporter=torchscript") from error
            log.warning("dynamo ONNX exporter failed (%s: %s); using the TorchScript-based exporter",
                        type(error).__name__, str(error).splitlines()[0] if str(error) else "")
    with _quiet_tracing():
        torch.onnx.export(wrapper, (example,), str(path), dynamo=False,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}}, **names)
    return "torchscript"


def export_torchscript(module: ImageClassifier, path: str | Path) -> Path:
    """``torch.jit.trace`` of :class:`NormalizedClassifier`; load with ``torch.jit.load``."""
    wrapper = NormalizedClassifier.from_classifier(module).eval()
    with _quiet_tracing():
        traced = torch.jit.trace(wrapper, (_example_input(wrapper),))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    traced.save(str(path))
    return path


def export_program(module: ImageClassifier, path: str | Path) -> Path:
    """``torch.export`` of :class:`NormalizedClassifier` with a dynamic batch, saved as ``.pt2``."""
    wrapper = NormalizedClassifier.from_classifier(module).eval()
    program = torch.export.export(wrapper, (_example_input(wrapper),),
                                  dynamic_shapes=({0: torch.export.Dim("batch")},))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.export.save(program, str(path))
    return path


# -- reading exports back -----------------------------------------------------------------------------

def run_exported(fmt: Format, path: str | Path, images: torch.Tensor) -> torch.Tensor:
    """Logits ``(N, num_classes)`` of an exported file for images ``(N, C, H, W)`` in [0, 1]."""
    path = str(path)
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return torch.from_numpy(session.run(["logits"], {"images": images.numpy()})[0])
    with torch.no_grad():
        if fmt == "safetensors":
            return NormalizedClassifier.from_classifier(load_weights(path))(images)
        if fmt == "torchscript":
            return torch.jit.load(path)(images)
        if fmt == "export":
            return torch.export.load(path).module()(images)
    raise ValueError(f"unknown format {fmt!r}")


def max_difference(fmt: Format, path: str | Path, module: ImageClassifier,
                   batch_sizes: Sequence[int] = (1, 3), seed: int = 0) -> float:
    """Largest |exported - PyTorch| logit over random images in [0, 1] of the given batch sizes.

    Batch sizes other than the export's example batch (2) check that N really is dynamic.
    """
    wrapper = NormalizedClassifier.from_classifier(module).eval()
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for n in batch_sizes:
        images = torch.rand(n, *wrapper.input_shape, generator=generator)
        with torch.no_grad():
            expected = wrapper(images)
        got = run_exported(fmt, path, images)
        if got.shape != expected.shape:
            raise ExportError(f"{path} returned logits of shape {tuple(got.shape)} for a batch of {n}; "
                              f"expected {tuple(expected.shape)}")
        worst = max(worst, float((got - expected).abs().max()))
    return worst


def export(module: ImageClassifier, fmt: Format, out: str | Path, exporter: OnnxExporter = "auto",
           opset: int = ONNX_OPSET, verify: bool = True) -> dict[str, Any]:
    """Write ``module`` as ``fmt`` to ``out``; with ``verify``, read it back and compare with PyTorch.

    Returns ``{"path", "format", "exporter" (ONNX only), "max_abs_diff" (when verified)}``.
    Raises ExportError for an unknown format, a failed export, or a file that differs from
    PyTorch by more than ``TOLERANCE`` (that file is deleted).
    """
    if fmt not in SUFFIXES:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(SUFFIXES)}")
    if fmt == "onnx":
        check_onnx_packages(exporter, verify)
    module = module.eval()
    out = Path(out)
    _check_not_a_folder(out, fmt)
    if fmt == "export" and out.suffix != ".pt2":
        raise ExportError(f"format=export writes a torch.export archive, which torch.export.load only reads "
                          f"from a file named *.pt2; got out={out}")
    report: dict[str, Any] = {"path": out, "format": fmt}
    try:
        if fmt == "safetensors":
            save_weights(module, out)
        elif fmt == "onnx":
            report["exporter"] = export_onnx(module, out, exporter, opset)
        elif fmt == "torchscript":
            export_torchscript(module, out)
        else:
            export_program(module, out)
    except ExportError:
        raise
    except Exception as error:
        raise ExportError(f"format={fmt} failed for model {module.hparams.model_name!r}: "
                          f"{type(error).__name__}: {error}") from error
    if verify:
        difference = max_difference(fmt, out, module)
        report["max_abs_diff"] = difference
        if not difference <= TOLERANCE:  # also catches NaN
            out.unlink(missing_ok=True)
            raise ExportError(f"the {fmt} export of {module.hparams.model_name!r} differs from PyTorch by "
                              f"{difference:.3g} (> {TOLERANCE}); the file was deleted")
    return report


def _check_not_a_folder(out: Path, fmt: str) -> None:
    if out.is_dir():
        raise ExportError(f"out={out} is a folder; give the file to write, e.g. out={out / ('model' + SUFFIXES[fmt])}")


# -- command line -------------------------------------------------------------------------------------

def _main(cfg: Any) -> None:
    from vit.inference import require_keys

    # every check before loading anything: the cheapest mistakes to report
    require_keys(cfg, "python -m vit.export ckpt_path=CHECKPOINT [format=onnx] [out=FILE]", "ckpt_path")
    fmt = cfg.format
    if fmt not in SUFFIXES:
        raise ExportError(f"unknown format {fmt!r}; choose one of {', '.join(SUFFIXES)}")
    if cfg.exporter not in ONNX_EXPORTERS:
        raise ExportError(f"unknown exporter {cfg.exporter!r}; choose one of {', '.join(ONNX_EXPORTERS)}")
    if fmt == "onnx":
        if isinstance(cfg.opset, bool) or not isinstance(cfg.opset, int) or cfg.opset < 17:
            raise ExportError(f"opset must be an integer >= 17 (LayerNormalization), got {cfg.opset!r}")
        check_onnx_packages(cfg.exporter, cfg.verify)
    ckpt = Path(cfg.ckpt_path)
    out = Path(cfg.out) if cfg.out else ckpt.with_suffix(SUFFIXES[fmt])
    if out.resolve() == ckpt.resolve():
        raise ExportError(f"out={out} would overwrite the checkpoint; choose another path")
    _check_not_a_folder(out, fmt)
    report = export(load_classifier(ckpt), fmt, out, cfg.exporter, cfg.opset, cfg.verify)
    details = [f"exporter {report['exporter']}"] if "exporter" in report else []
    if "max_abs_diff" in report:
        details.append(f"max |difference| vs PyTorch {report['max_abs_diff']:.2g}")
    print(f"{report['path']}" + (f" ({', '.join(details)})" if details else ""))


def main() -> None:
    import hydra

    from vit.conf_dir import conf_dir

    @hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name="export")
    def entry(cfg: Any) -> None:
        try:
            _main(cfg)
        except (UserError, FileNotFoundError) as error:
            print(f"error: {error}", file=sys.stderr)
            sys.exit(2)

    entry()


if __name__ == "__main__":
    main()
