"""Classify image files with a trained checkpoint: the top-k classes and their probabilities."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from PIL import Image
from torchvision.transforms.v2 import functional as TF

from vit.inference import NormalizedClassifier  # the normalisation an exported graph applies too
from vit.lightning_module import ImageClassifier

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


def expand_image_paths(items: str | Path | Sequence[str | Path]) -> list[Path]:
    """Files as given, folders replaced by the image files directly inside them (sorted)."""
    if isinstance(items, (str, Path)):  # images=a.png on the command line arrives as one string
        items = [items]
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            paths.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.is_file():
            paths.append(path)
        else:
            raise FileNotFoundError(f"no such image file or folder: {path}")
    if not paths:
        raise FileNotFoundError(f"no image files found in {', '.join(map(str, items))}")
    return paths


def load_image(path: Path, in_chans: int, img_size: tuple[int, int]) -> torch.Tensor:
    """An image file as a float tensor (in_chans, H, W) in [0, 1]: converted to grayscale or RGB,
    shorter side resized to the model's size, centre-cropped."""
    with Image.open(path) as image:
        image = image.convert("L" if in_chans == 1 else "RGB")
        tensor = TF.pil_to_tensor(image)
    tensor = TF.resize(tensor, min(img_size), antialias=True)
    tensor = TF.center_crop(tensor, list(img_size))
    return tensor.float() / 255.0


@torch.inference_mode()
def predict_files(module: ImageClassifier, paths: Sequence[Path], top_k: int = 5,
                  batch_size: int = 64) -> list[tuple[Path, list[tuple[str, float]]]]:
    """``[(path, [(class name, probability), ...]), ...]`` for each image, best class first."""
    hp = module.hparams
    classifier = NormalizedClassifier.from_classifier(module).eval()
    in_chans, height, width = classifier.input_shape
    k = min(top_k, len(hp.class_names))
    results = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        images = torch.stack([load_image(p, in_chans, (height, width)) for p in chunk])
        probs, classes = classifier(images).softmax(dim=-1).topk(k, dim=-1)
        for path, p_row, c_row in zip(chunk, probs.tolist(), classes.tolist()):
            results.append((path, [(hp.class_names[c], p) for c, p in zip(c_row, p_row)]))
    return results
