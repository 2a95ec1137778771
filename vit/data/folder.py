"""Image folders on disk: ``PATH/{train,val[,test]}/<class>/<image>``, decoded lazily with PIL.

Listing follows torchvision's ImageFolder: classes are the sub-folders of ``train/`` in
sorted order, and only files with an extension in ``IMG_EXTENSIONS`` are images. Other files
(a ``.gif``, which ImageFolder does not read either, a ``notes.txt``) are not decoded but
reported, so that a folder that lost half its images to an unexpected format says so. Hidden
files and folders (``.DS_Store``, ``.ipynb_checkpoints/``) are left out silently. ``val/`` and
``test/`` use the class-to-index mapping of ``train/``.

Symbolic links to folders are followed, but each real folder is listed once: a link back to a
parent (``ln -s . loop``) would otherwise list the same images again at every depth until the
path grows too long, silently multiplying the data. Folders reached a second time are reported.

Unreadable images are found once, in ``check_images``, by decoding every file at reduced
scale (JPEG draft mode makes that a fraction of a full decode); that catches both files that
are not images and truncated ones, which a header-only ``Image.verify()`` misses. Datasets are
built from the readable files only, so workers never meet a bad file that was there at setup;
a file that breaks later raises a DataError naming it.
"""
from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS
from torchvision.transforms import v2

from vit.data.errors import DataError

if TYPE_CHECKING:
    from vit.data.config import DataConfig

log = logging.getLogger(__name__)

Sample = tuple[str, int]  # (file path, class index)


def find_classes(train_dir: Path) -> list[str]:
    """The class names of an image folder split: its non-hidden sub-folders, sorted."""
    if not train_dir.is_dir():
        raise FileNotFoundError(f"no folder {train_dir}")
    classes = sorted(e.name for e in os.scandir(train_dir) if e.is_dir() and not e.name.startswith("."))
    if not classes:
        raise DataError(f"{train_dir} has no class sub-folders; expected {train_dir}/<class>/<image files>")
    return classes


@dataclass
class Listing:
    """What ``list_samples`` found in a split folder."""

    samples: list[Sample] = field(default_factory=list)  # (path, class index) of every image file
    not_images: list[str] = field(default_factory=list)  # other (non-hidden) files, not used
    repeated_dirs: list[str] = field(default_factory=list)  # folders reached again through a link, not listed


def list_samples(split_dir: Path, classes: Sequence[str]) -> Listing:
    """Every image file under ``split_dir/<class>/`` for the given classes, and what was left out.

    Raises DataError naming the folder when a class folder is missing or holds no image file,
    or when ``split_dir`` has a class folder that is not in ``classes``.
    """
    found = set(find_classes(split_dir))
    extra = sorted(found - set(classes))
    if extra:
        raise DataError(f"{split_dir} has class folders {extra} that the training split does not have")
    listing = Listing()
    for index, name in enumerate(classes):
        class_dir = split_dir / name
        if name not in found:
            raise DataError(f"class folder {class_dir} is missing; every split needs the classes of train/: "
                            f"{list(classes)}")
        images, others, repeated = _walk_once(class_dir)
        if not images:
            held = f"; it holds {len(others)} other file(s): {some_of(others)}" if others else ""
            raise DataError(f"class folder {class_dir} holds no image files ({', '.join(IMG_EXTENSIONS)}){held}")
        listing.samples.extend((f, index) for f in images)
        listing.not_images.extend(others)
        listing.repeated_dirs.extend(repeated)
    return listing


def _walk_once(folder: Path) -> tuple[list[str], list[str], list[str]]:
    """(image files, other files, folders not entered because their real path was already listed)
    under ``folder``, following symbolic links but entering each real folder once; sorted."""
    images: list[str] = []
    others: list[str] = []
    repeated: list[str] = []
    seen = {os.path.realpath(folder)}
    for root, dirs, names in os.walk(folder, followlinks=True):
        keep = []
        for name in sorted(dirs):
            if name.startswith("."):
                continue
            real = os.path.realpath(os.path.join(root, name))
            if real in seen:
                repeated.append(os.path.join(root, name))
            else:
                seen.add(real)
                keep.append(name)
        dirs[:] = keep  # os.walk descends into what is left in dirs
        for name in names:
            if not name.startswith("."):
                (images if name.lower().endswith(IMG_EXTENSIONS) else others).append(os.path.join(root, name))
    return sorted(images), sorted(others), sorted(repeated)


def some_of(paths: Sequence[str], limit: int = 5) -> str:
    """The first few paths of a list, for a message that stays one line long."""
    shown = ", ".join(map(str, paths[:limit]))
    return shown + (f" and {len(paths) - limit} more" if len(paths) > limit else "")


def check_images(samples: Sequence[Sample], policy: str, threads: int = 8) -> tuple[list[Sample], list[str]]:
    """Decode every image (at reduced scale) and split ``samples`` into (readable, bad file paths).

    policy "fail": raise DataError naming the first unreadable file (in listing order).
    """
    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:  # PIL releases the GIL while decoding
        errors = list(pool.map(_decode_error, (path for path, _ in samples)))
    bad = [path for (path, _), error in zip(samples, errors) if error is not None]
    if bad and policy == "fail":
        first = next(e for e in errors if e is not None)
        raise DataError(f"unreadable image {bad[0]}: {first} (data.bad_image_policy=fail; use skip to leave it out)")
    return [s for s, error in zip(samples, errors) if error is None], bad


def _decode_error(path: str) -> str | None:
    try:
        with Image.open(path) as img:
            img.draft("RGB", (64, 64))
            img.load()
    except Exception as error:  # PIL raises many types (OSError, SyntaxError, ValueError, ...) for bad files
        return f"{type(error).__name__}: {error}"
    return None


def load_rgb(path: str, min_side: int) -> Image.Image:
    """Open an image as 8-bit RGB whatever its mode.

    JPEGs are decoded at the smallest DCT scale that keeps both sides >= ``min_side``, which
    makes multi-megapixel photos several times cheaper to load. Transparent images are put on
    white; 16/32-bit greyscale is scaled from 0..65535 to 0..255.
    """
    with Image.open(path) as img:
        img.draft("RGB", (min_side, min_side))
        img.load()
        return to_rgb(img)


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode (1, L, LA, P, RGBA, CMYK, YCbCr, I;16, I, F, ...) to RGB."""
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I") or img.mode == "F":
        # PIL's own conversion clips these to 0..255; scale the 16-bit range instead.
        grey = np.asarray(img, dtype=np.float32) / 257.0
        return Image.fromarray(np.clip(grey, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def augment_policy(cfg: "DataConfig") -> Optional[Callable]:
    """The per-image augmentation policy as configured: torchvision's AutoAugment with the policy
    ``data.autoaugment`` names (searched on CIFAR-10, ImageNet or SVHN by Cubuk et al. 2019), or its
    RandAugment with ``data.randaugment_ops`` ops; None when neither is set (the config allows one)."""
    if cfg.autoaugment is not None:
        return v2.AutoAugment(v2.AutoAugmentPolicy(cfg.autoaugment))
    if cfg.randaugment_ops <= 0:
        return None
    return v2.RandAugment(num_ops=cfg.randaugment_ops, magnitude=cfg.randaugment_magnitude)


# The crop of the evaluation transform when neither data.crop_pct nor pretrained weights say
# otherwise: the short side resized to img_size / 0.875 (256 for 224), the ImageNet convention.
DEFAULT_CROP_PCT = 0.875
DEFAULT_INTERPOLATION = "bilinear"
# The resize of images whose test set has the model's size already (MNIST- and CIFAR-style data,
# shards), and of checkpoints that do not say: the whole short side to the model's size.
WHOLE_IMAGE_RESIZE = {"interpolation": DEFAULT_INTERPOLATION, "crop_pct": 1.0}


def train_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                    policy: Optional[Callable] = None,
                    interpolation: str = DEFAULT_INTERPOLATION) -> Callable[[Image.Image], Tensor]:
    """RandomResizedCrop(scale 0.35..1) + horizontal flip (+ ``policy``: AutoAugment or RandAugment),
    then float (3, S, S) normalised."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=(0.35, 1.0), interpolation=_mode(interpolation), antialias=True),
        v2.RandomHorizontalFlip(),
        *([policy] if policy is not None else []),
        *_to_normalised_tensor(mean, std),
    ])


def eval_transform(img_size: int, mean: Sequence[float], std: Sequence[float],
                   interpolation: str = DEFAULT_INTERPOLATION,
                   crop_pct: float = DEFAULT_CROP_PCT) -> Callable[[Image.Image], Tensor]:
    """Resize the short side to floor(img_size / crop_pct), centre-crop img_size: float (3, S, S) normalised.

    A pretrained model is evaluated the way it was trained to be (timm's ``pretrained_cfg``):
    e.g. bicubic with crop_pct 0.9 for timm's ViTs, so 224 is cut from 248, not 256.
    """
    return v2.Compose([*resize_and_crop((img_size, img_size), interpolation, crop_pct).transforms,
                       *_to_normalised_tensor(mean, std)])


def resize_and_crop(size: tuple[int, int], interpolation: str = DEFAULT_INTERPOLATION,
                    crop_pct: float = DEFAULT_CROP_PCT) -> v2.Compose:
    """A PIL image (or uint8 tensor) to ``size`` (H, W): the short side resized to
    floor(min(size) / crop_pct), then the centre cut out. The evaluation transform's geometry,
    shared with prediction, so that a file is seen as the test set saw its images."""
    return v2.Compose([v2.Resize(int(min(size) / crop_pct), interpolation=_mode(interpolation), antialias=True),
                       v2.CenterCrop(list(size))])


def _mode(interpolation: str) -> v2.InterpolationMode:
    return v2.InterpolationMode(interpolation)


def _to_normalised_tensor(mean: Sequence[float], std: Sequence[float]) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


class ImageFileDataset(Dataset):
    """Images read from disk: ``dataset[i]`` -> (float32 (3, S, S) normalised, int class index)."""

    def __init__(self, samples: Sequence[Sample], transform: Callable[[Image.Image], Tensor], img_size: int) -> None:
        self.samples = list(samples)
        self.transform = transform
        # Decode JPEGs no smaller than twice the output side: enough for the eval resize
        # (1.14x) and for RandomResizedCrop's smallest crops (sqrt(0.35) ~ 0.59 of a side).
        self.min_side = 2 * img_size

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        path, label = self.samples[index]
        try:
            img = load_rgb(path, self.min_side)
        except Exception as error:
            raise DataError(f"cannot read image {path}: {type(error).__name__}: {error}") from error
        return self.transform(img), label
