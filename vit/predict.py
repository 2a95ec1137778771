"""Classify image files with a trained checkpoint: the top-k classes and their probabilities.

:func:`predict_files` ranks the classes of each image and sets aside the files it cannot read
(``bad_image_policy="skip"``, as in training) or stops at the first (``"fail"``);
:func:`write_predictions` saves the result as CSV or JSON. ``predict.py`` is the command line.
Every option is checked by :func:`check_options` and :func:`output_file` before a model is loaded.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vit.data.config import BAD_IMAGE_POLICIES
from vit.data.folder import WHOLE_IMAGE_RESIZE, resize_and_crop
from vit.data.errors import DataError
from vit.errors import ConfigError, UserError
from vit.inference import NormalizedClassifier  # the normalisation an exported graph applies too
from vit.lightning_module import ImageClassifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
OUTPUT_FORMATS = {".csv": "csv", ".json": "json"}  # file suffix -> format

Ranked = list[tuple[str, float]]  # (class name, probability), best first


@dataclass
class Predictions:
    """What :func:`predict_files` returns: the ranked classes of every image it could read, in
    the order given, and ``(path, reason)`` for every file it skipped."""

    ranked: list[tuple[Path, Ranked]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)


def check_options(top_k: Any, batch_size: Any, bad_image_policy: Any = "skip") -> None:
    """Raise ConfigError naming the first option that cannot work."""
    for name, value in (("top_k", top_k), ("batch_size", batch_size)):
        # bool is an int in Python; top_k=true is a typo, not 1
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
    if bad_image_policy not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"bad_image_policy must be one of {', '.join(BAD_IMAGE_POLICIES)}, got {bad_image_policy!r}")


def output_file(out: Optional[str | Path], fmt: Optional[str] = None, overwrite: bool = False
                ) -> Optional[tuple[Path, str]]:
    """``(path, "csv" | "json")`` to write predictions to, or None when ``out`` is None.

    The format is ``fmt`` when given, else read off the suffix (``.csv``, ``.json``); any other
    suffix without ``fmt`` is refused, as is a ``fmt`` that contradicts a known suffix. An
    existing file is refused unless ``overwrite``: predictions are cheap to recompute, a file
    someone kept is not.
    """
    formats = sorted(set(OUTPUT_FORMATS.values()))
    if fmt is not None and fmt not in formats:
        raise ConfigError(f"format must be one of {', '.join(formats)}, got {fmt!r}")
    if out is None:
        if fmt is not None:
            raise ConfigError(f"format={fmt} needs out=FILE, the file to write the predictions to")
        return None
    path = Path(out)
    if path.is_dir():
        raise ConfigError(f"out={out} is a folder; give the file to write, e.g. out={path / 'predictions.csv'}")
    from_suffix = OUTPUT_FORMATS.get(path.suffix.lower())
    if fmt is None and from_suffix is None:
        raise ConfigError(f"out={out}: cannot tell the format from the suffix {path.suffix!r}; name the file "
                          f"*.csv or *.json, or add format=csv or format=json")
    if fmt is not None and from_suffix is not None and fmt != from_suffix:
        raise ConfigError(f"out={out} has the suffix of {from_suffix} but format={fmt}; make them agree")
    if path.is_file() and not overwrite:
        raise ConfigError(f"out={out} exists; choose another name, delete it, or add overwrite=true")
    return path, fmt or from_suffix  # type: ignore[return-value]


def expand_image_paths(items: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the image files directly inside them (sorted)."""
    if isinstance(items, (str, Path)):  # images=a.png on the command line arrives as one string
        items = [items]
    if not items:
        raise ConfigError("images is empty; give image files and/or folders, e.g. images=[a.png,photos/]")
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                                and not p.name.startswith(".")))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    if not paths:
        raise FileNotFoundError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found in "
                                f"{', '.join(map(str, items))}")
    return paths


def load_image(path: Path, in_chans: int, img_size: tuple[int, int],
               eval_resize: Optional[dict[str, Any]] = None) -> torch.Tensor:
    """An image file as a float tensor (in_chans, H, W) in [0, 1]: converted to grayscale or RGB,
    then resized and centre-cropped to ``img_size`` as the model's test images were
    (``eval_resize``: interpolation and crop_pct, stored with the model; None: the short side
    resized bilinearly to the model's size, no margin)."""
    resize = resize_and_crop(img_size, **(eval_resize or WHOLE_IMAGE_RESIZE))
    with Image.open(path) as image:
        # on the PIL image, as the image-folder data resizes, so that the pixels match
        image = resize(image.convert("L" if in_chans == 1 else "RGB"))
    return TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)  # as the data's ToDtype scales


@torch.inference_mode()
def predict_files(module: ImageClassifier, paths: Sequence[Path], top_k: int = 5, batch_size: int = 64,
                  bad_image_policy: str = "skip") -> Predictions:
    """The ``top_k`` classes of each image (fewer when the model has fewer classes), best first.

    A file that cannot be read as an image is listed in ``Predictions.skipped`` with the reason
    (``bad_image_policy="skip"``), or raises DataError naming it (``"fail"``).
    """
    check_options(top_k, batch_size, bad_image_policy)
    hp = module.hparams
    classifier = NormalizedClassifier.from_classifier(module).eval()
    in_chans, height, width = classifier.input_shape
    k = min(top_k, len(hp.class_names))
    result = Predictions()
    for start in range(0, len(paths), batch_size):
        chunk, images = [], []
        for path in paths[start:start + batch_size]:
            try:
                images.append(load_image(Path(path), in_chans, (height, width), hp.get("eval_resize")))
                chunk.append(Path(path))
            except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...)
                reason = f"{type(error).__name__}: {error}"
                if bad_image_policy == "fail":
                    raise DataError(f"cannot read image {path}: {reason} (bad_image_policy=fail; use skip to "
                                    f"predict the others)") from error
                result.skipped.append((Path(path), reason))
        if not chunk:
            continue
        probs, classes = classifier(torch.stack(images)).softmax(dim=-1).topk(k, dim=-1)
        for path, p_row, c_row in zip(chunk, probs.tolist(), classes.tolist()):
            result.ranked.append((path, [(hp.class_names[c], p) for c, p in zip(c_row, p_row)]))
    return result


def write_predictions(predictions: Predictions, path: str | Path, fmt: str) -> Path:
    """Write ``predictions`` as ``fmt``; probabilities are rounded to 6 decimals.

    * ``csv``: columns path, rank (1 = best), class, probability, error; one row per image and
      rank, and one row with only path and error for each skipped file.
    * ``json``: ``{"predictions": [{"path", "top_k": [{"class", "probability"}, ...]}, ...],
      "skipped": [{"path", "error"}, ...]}``.
    """
    formats = sorted(set(OUTPUT_FORMATS.values()))
    if fmt not in formats:
        raise ConfigError(f"format must be one of {', '.join(formats)}, got {fmt!r}")
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("w", newline="", encoding="utf-8") as file:
            if fmt == "csv":
                writer = csv.writer(file)
                writer.writerow(["path", "rank", "class", "probability", "error"])
                for image, ranked in predictions.ranked:
                    writer.writerows([str(image), rank, name, round(p, 6), ""]
                                     for rank, (name, p) in enumerate(ranked, start=1))
                writer.writerows([str(image), "", "", "", reason] for image, reason in predictions.skipped)
            else:
                json.dump({
                    "predictions": [{"path": str(image),
                                     "top_k": [{"class": name, "probability": round(p, 6)} for name, p in ranked]}
                                    for image, ranked in predictions.ranked],
                    "skipped": [{"path": str(image), "error": reason} for image, reason in predictions.skipped],
                }, file, indent=2)
                file.write("\n")
    except OSError as error:
        raise UserError(f"cannot write {path}: {error}") from error
    return path
