"""vit.data on real data: MNIST, Fashion-MNIST, a CIFAR-10 subset, hymenoptera photos and mnist5k."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path
from urllib.error import URLError

import lightning as L
import numpy as np
import pytest
import torch
import torchvision
from omegaconf import OmegaConf
from PIL import Image
from torch import nn

from vit.data import DATASET_NAMES, BatchTransform, DataConfig, DataError, DatasetNotFoundError, build_datamodule
from vit.data.folder import load_rgb
from vit.errors import UserError

REPO = Path(__file__).resolve().parents[1]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _mnist(root: Path, **kw):
    dm = build_datamodule(DataConfig(name="mnist", root=str(root), download=False, **kw))
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    return dm


def _cifar_npz(root: Path, name: str = "cifar10", **kw):
    dm = build_datamodule(name=name, source="npz", path=str(root / "cifar10_jpeg_subset.npz"), **kw)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def mnist(datasets_root):
    return _mnist(datasets_root, batch_size=256, eval_batch_size=2000)


@pytest.fixture(scope="module")
def hymenoptera(datasets_root):
    return datasets_root / "hymenoptera_data"


# ---------------------------------------------------------------- in-memory datasets


def test_mnist_sizes_shapes_and_normalisation(mnist):
    assert (mnist.num_classes, mnist.in_chans, mnist.img_size) == (10, 1, (28, 28))
    assert mnist.mean == (0.1307,) and mnist.std == (0.3081,)
    assert len(mnist.class_names) == 10
    assert (mnist.num_train_samples, len(mnist.val_set), len(mnist.test_set)) == (54000, 6000, 10000)

    images, labels = next(iter(mnist.train_dataloader()))
    assert images.shape == (256, 1, 28, 28) and images.dtype == torch.float32
    assert labels.shape == (256,) and labels.dtype == torch.int64
    assert 0 <= labels.min() and labels.max() <= 9

    images, labels = next(iter(mnist.val_dataloader()))
    assert images.shape == (2000, 1, 28, 28)
    black, white = (0 - 0.1307) / 0.3081, (1 - 0.1307) / 0.3081
    assert images.min() == pytest.approx(black, abs=1e-5) and images.max() == pytest.approx(white, abs=1e-5)
    assert abs(images.mean().item()) < 0.1 and 0.9 < images.std().item() < 1.1
    assert len(labels.unique()) == 10


def test_eval_loaders_keep_order_and_cover_every_sample(mnist):
    labels = torch.cat([y for _, y in mnist.test_dataloader()])
    assert torch.equal(labels, mnist.test_set.labels)


def test_train_loader_shuffles(mnist):
    _, labels = next(iter(mnist.train_dataloader()))
    assert not torch.equal(labels, mnist.train_set.labels[:256])


def test_split_is_deterministic_and_seeded(datasets_root, mnist):
    again = _mnist(datasets_root)
    other = _mnist(datasets_root, split_seed=1)
    assert torch.equal(again.val_set.images, mnist.val_set.images)
    assert torch.equal(again.train_set.labels, mnist.train_set.labels)
    assert not torch.equal(other.val_set.images, mnist.val_set.images)
    # train and val partition the 60,000 training images
    assert other.num_train_samples + len(other.val_set) == 60000


def test_max_train_samples_keeps_a_seeded_subset_and_the_same_val(datasets_root, mnist):
    small = _mnist(datasets_root, max_train_samples=1000)
    assert small.num_train_samples == 1000
    assert torch.equal(small.val_set.images, mnist.val_set.images)
    assert len(small.train_set.labels.unique()) == 10  # random, not the first 1,000 of one order


def test_fashion_mnist_opens(datasets_root):
    dm = build_datamodule(name="fashion_mnist", root=str(datasets_root), download=False, batch_size=64)
    dm.setup("fit")
    assert dm.mean == (0.2860,) and dm.std == (0.3530,)
    assert dm.class_names[0] == "T-shirt/top" and dm.num_classes == 10
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (64, 1, 28, 28) and labels.dtype == torch.int64


def test_cifar10_from_npz(datasets_root):
    dm = _cifar_npz(datasets_root, batch_size=100)
    dm.setup("test")
    assert (dm.num_train_samples, len(dm.val_set), len(dm.test_set)) == (9000, 1000, 10000)
    assert dm.class_names == CIFAR10_CLASSES
    assert (dm.num_classes, dm.in_chans, dm.img_size) == (10, 3, (32, 32))
    images, labels = next(iter(dm.test_dataloader()))
    assert images.shape == (100, 3, 32, 32) and labels.dtype == torch.int64
    # channels come out in RGB order: the test set is grouped by class, airplanes first (blue sky)
    x_test = np.load(datasets_root / "cifar10_jpeg_subset.npz")["x_test"]
    assert torch.equal(dm.test_set.images[:5], torch.from_numpy(x_test[:5]).permute(0, 3, 1, 2))


def test_cifar2_from_npz_remaps_labels(datasets_root):
    dm = _cifar_npz(datasets_root, name="cifar2", batch_size=50)
    dm.setup("test")
    assert dm.class_names == ["cat", "dog"] and dm.num_classes == 2
    assert dm.num_train_samples + len(dm.val_set) == 2000 and len(dm.test_set) == 2000
    assert set(dm.test_set.labels.tolist()) == {0, 1}
    _, labels = next(iter(dm.train_dataloader()))
    assert set(labels.tolist()) <= {0, 1}
    arrays = np.load(datasets_root / "cifar10_jpeg_subset.npz")
    dogs = torch.from_numpy(arrays["x_test"][arrays["y_test"] == 5]).permute(0, 3, 1, 2)
    assert torch.equal(dm.test_set.images[dm.test_set.labels == 1], dogs)


def test_cifar_torchvision_source_matches_npz(datasets_root, tmp_path, monkeypatch):
    """The same arrays written as CIFAR-10 python batches load identically through torchvision."""
    arrays = np.load(datasets_root / "cifar10_jpeg_subset.npz")
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()

    def batch(x, y):  # CIFAR's layout: rows of 3072 bytes, channel-major
        return {"data": x.transpose(0, 3, 1, 2).reshape(len(x), -1), "labels": y.tolist()}

    order = np.random.default_rng(0).permutation(10000)  # the real batches are not grouped by class
    x_train, y_train = arrays["x_train"][order], arrays["y_train"][order]
    for i in range(5):
        part = slice(2000 * i, 2000 * (i + 1))
        (folder / f"data_batch_{i + 1}").write_bytes(pickle.dumps(batch(x_train[part], y_train[part])))
    (folder / "test_batch").write_bytes(pickle.dumps(batch(arrays["x_test"], arrays["y_test"])))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": [str(c) for c in arrays["classes"]]}))
    # the md5s of these re-written files differ from the official ones
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setitem(torchvision.datasets.CIFAR10.meta, "md5", None)

    tv = build_datamodule(name="cifar2", root=str(tmp_path), download=False)
    tv.setup()
    npz = _cifar_npz(datasets_root, name="cifar2")
    npz.setup()
    assert tv.class_names == ["cat", "dog"]
    assert torch.equal(tv.test_set.images, npz.test_set.images)
    assert torch.equal(tv.test_set.labels, npz.test_set.labels)

    def train_and_val(dm):  # the same 2,000 images, split differently since their order differs
        return sorted((img.numpy().tobytes(), int(y)) for ds in (dm.train_set, dm.val_set)
                      for img, y in zip(ds.images, ds.labels))

    assert train_and_val(tv) == train_and_val(npz)


def test_cifar2_class_choice_and_unknown_class(datasets_root):
    dm = _cifar_npz(datasets_root, name="cifar2", classes=["ship", "airplane", "frog"])
    assert dm.num_classes == 3 and dm.class_names == ["ship", "airplane", "frog"]
    with pytest.raises(ValueError, match="dgo.*airplane, automobile"):
        _cifar_npz(datasets_root, name="cifar2", classes=["cat", "dgo"])


def test_mnist5k_embedded_real_digits():
    dm = build_datamodule(name="mnist5k", root=str(REPO / "data"), batch_size=500)
    dm.setup("fit")
    dm.setup("test")
    assert (dm.num_train_samples, len(dm.val_set), len(dm.test_set)) == (4000, 500, 500)
    assert dm.num_classes == 10 and dm.in_chans == 1
    everything = torch.cat([dm.train_set.images, dm.val_set.images, dm.test_set.images])
    assert everything.dtype == torch.uint8 and everything.shape == (5000, 1, 28, 28)
    assert 0.12 < everything.float().mean().item() / 255 < 0.14
    labels = torch.cat([dm.train_set.labels, dm.val_set.labels, dm.test_set.labels])
    assert torch.bincount(labels).tolist() == [500] * 10
    # the split is fixed: split_seed and val_fraction do not move it
    other = build_datamodule(name="mnist5k", root=str(REPO / "data"), split_seed=3, val_fraction=0.3)
    other.setup()
    assert torch.equal(other.test_set.images, dm.test_set.images)


def test_in_memory_resize_and_workers():
    dm = build_datamodule(name="mnist5k", root=str(REPO / "data"), img_size=32, batch_size=100,
                          num_workers=2, persistent_workers=True, prefetch_factor=2)
    dm.setup("fit")
    assert dm.img_size == (32, 32)
    loader = dm.val_dataloader()
    assert (loader.num_workers, loader.persistent_workers, loader.prefetch_factor) == (2, True, 2)
    batches = list(loader)
    assert sum(len(y) for _, y in batches) == 500
    assert batches[0][0].shape == (100, 1, 32, 32)


class _Linear(L.LightningModule):
    def __init__(self, dm) -> None:
        super().__init__()
        self.fc = nn.Linear(dm.in_chans * dm.img_size[0] * dm.img_size[1], dm.num_classes)
        self.seen = {"train": 0, "val": 0, "test": 0}

    def _step(self, batch, stage):
        images, labels = batch
        self.seen[stage] += len(labels)
        return nn.functional.cross_entropy(self.fc(images.flatten(1)), labels)

    def training_step(self, batch, _):
        return self._step(batch, "train")

    def validation_step(self, batch, _):
        self._step(batch, "val")

    def test_step(self, batch, _):
        self._step(batch, "test")

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_lightning_trainer_runs_the_datamodule():
    dm = build_datamodule(name="mnist5k", root=str(REPO / "data"), batch_size=100, eval_batch_size=250)
    model = _Linear(dm)  # built from the datamodule's sizes before setup, as train.py does
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, limit_train_batches=5, num_sanity_val_steps=0, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    assert model.seen == {"train": 500, "val": 500, "test": 500}


# ---------------------------------------------------------------- batch augmentation


@pytest.fixture(scope="module")
def cifar_batch(datasets_root):
    x = np.load(datasets_root / "cifar10_jpeg_subset.npz")["x_train"][::40]  # 250 images, all classes
    return torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()


def test_flip_mirrors_about_half_the_images(cifar_batch):
    stats = dict(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    plain = BatchTransform(**stats)(cifar_batch)
    out = BatchTransform(**stats, flip=True)(cifar_batch)
    assert out.shape == plain.shape
    same = (out == plain).flatten(1).all(1)
    mirrored = (out == plain.flip(-1)).flatten(1).all(1)
    assert bool((same | mirrored).all())
    assert 60 < int(mirrored.sum()) < 190


def test_random_crop_is_a_window_of_the_padded_image(cifar_batch):
    images = cifar_batch[:20]
    out = BatchTransform((0.0,) * 3, (1 / 255,) * 3, crop_padding=4)(images)  # identity on values
    assert out.shape == images.shape
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4)).float()
    offsets = []
    for img, src in zip(out, padded):
        hits = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(src[:, dy:dy + 32, dx:dx + 32], img)]
        assert hits, "every crop must be a 32x32 window of the zero-padded image"
        offsets.append(hits[0])
    assert len(set(offsets)) > 5  # offsets vary


def test_train_augmentation_changes_images_but_not_value_range(datasets_root):
    dm = _cifar_npz(datasets_root, batch_size=256, max_train_samples=256)
    indices = list(range(256))
    augmented, labels = dm.train_set.__getitems__(indices)
    plain = dm.val_set.transform(dm.train_set.images[indices])
    assert augmented.shape == plain.shape == (256, 3, 32, 32)
    assert torch.equal(labels, dm.train_set.labels)
    changed = (augmented != plain).flatten(1).any(1)
    assert int(changed.sum()) > 200  # a few draws leave an image as it was (offset 4,4 and no flip)
    lowest = torch.tensor([-m / s for m, s in zip(dm.mean, dm.std)]).view(1, 3, 1, 1)
    highest = torch.tensor([(1 - m) / s for m, s in zip(dm.mean, dm.std)]).view(1, 3, 1, 1)
    assert bool((augmented >= lowest - 1e-5).all() and (augmented <= highest + 1e-5).all())


def test_augmentation_is_reproducible_from_the_torch_seed(datasets_root):
    dm = _cifar_npz(datasets_root, batch_size=64)
    torch.manual_seed(7)
    first = next(iter(dm.train_dataloader()))
    torch.manual_seed(7)
    second = next(iter(dm.train_dataloader()))
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_without_augment_train_batches_equal_the_eval_transform(datasets_root):
    dm = _cifar_npz(datasets_root, augment=False, batch_size=64)
    indices = [5, 17, 300, 8999]
    images, _ = dm.train_set.__getitems__(indices)
    expected = BatchTransform(dm.mean, dm.std)(dm.train_set.images[indices])
    assert torch.equal(images, expected)
    single, label = dm.train_set[17]
    assert torch.equal(single, images[1]) and label == dm.train_set.labels[17]


# ---------------------------------------------------------------- image folders


def test_imagefolder_hymenoptera(hymenoptera):
    dm = build_datamodule(name="imagefolder", path=str(hymenoptera), img_size=64, batch_size=16, num_workers=2)
    assert dm.class_names == ["ants", "bees"] and dm.num_classes == 2 and dm.in_chans == 3
    assert dm.mean == (0.485, 0.456, 0.406)
    dm.setup("fit")
    dm.setup("test")
    # imageNotFound.gif is not an image extension: not used, but counted and listed as skipped
    assert (dm.num_train_samples, len(dm.val_set), len(dm.test_set)) == (244, 153, 153)
    assert dm.skipped_files == [str(hymenoptera / "train" / "ants" / "imageNotFound.gif")]
    assert dm.test_split == "val"  # no test/ folder
    for loader in (dm.train_dataloader(), dm.val_dataloader()):
        for step, (images, labels) in enumerate(loader):
            assert images.shape == (16, 3, 64, 64) and images.dtype == torch.float32
            assert labels.dtype == torch.int64 and set(labels.tolist()) <= {0, 1}
            assert -2.2 < images.min() and images.max() < 2.7
            if step == 1:
                break


def _make_folder(tmp_path: Path, hymenoptera: Path, per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            target = tmp_path / split / name
            target.mkdir(parents=True)
            for src in sorted((hymenoptera / split / name).glob("*.jpg"))[:per_class]:
                shutil.copy(src, target / src.name)
    return tmp_path


def test_imagefolder_bad_images_skip_or_fail(tmp_path, hymenoptera):
    root = _make_folder(tmp_path, hymenoptera)
    rng = np.random.default_rng(0)
    corrupt = root / "train" / "ants" / "random bytes.jpg"
    corrupt.write_bytes(rng.integers(0, 256, 5000, dtype=np.uint8).tobytes())
    whole = sorted((hymenoptera / "train" / "bees").glob("*.jpg"))[5].read_bytes()
    truncated = root / "train" / "bees" / "truncated.jpg"
    truncated.write_bytes(whole[: len(whole) // 2])

    dm = build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=4)
    dm.setup("fit")
    assert sorted(Path(f).name for f in dm.skipped_files) == ["random bytes.jpg", "truncated.jpg"]
    assert dm.num_train_samples == 6
    assert sum(len(y) for _, y in dm.train_dataloader()) == 6

    with pytest.raises(ValueError, match="random bytes.jpg"):
        build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=4,
                         bad_image_policy="fail").setup("fit")


def test_imagefolder_empty_or_missing_class_folder(tmp_path, hymenoptera):
    root = _make_folder(tmp_path, hymenoptera, per_class=1)
    (root / "train" / "wasps").mkdir()
    with pytest.raises(ValueError, match=r"train/wasps"):
        build_datamodule(name="imagefolder", path=str(root), batch_size=1).setup("fit")
    (root / "train" / "wasps" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"train/wasps.*no image files"):
        build_datamodule(name="imagefolder", path=str(root), batch_size=1).setup("fit")
    shutil.copy(next((hymenoptera / "train" / "ants").glob("*.jpg")), root / "train" / "wasps" / "w.jpg")
    with pytest.raises(ValueError, match=r"val/wasps.*missing"):
        build_datamodule(name="imagefolder", path=str(root), batch_size=1).setup("fit")


def test_imagefolder_without_val_carves_it_from_train(tmp_path, hymenoptera):
    root = _make_folder(tmp_path, hymenoptera, per_class=5)
    shutil.rmtree(root / "val")
    dm = build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=2, val_fraction=0.2)
    dm.setup("fit")
    assert (dm.num_train_samples, len(dm.val_set)) == (8, 2)
    assert dm.test_set is dm.val_set
    train_files = {path for path, _ in dm.train_set.samples}
    assert not train_files & {path for path, _ in dm.val_set.samples}


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "CMYK", "I;16", "1"])
def test_load_rgb_converts_every_mode(tmp_path, hymenoptera, mode):
    photo = Image.open(sorted((hymenoptera / "val" / "bees").glob("*.jpg"))[0]).convert("RGB").resize((48, 40))
    if mode == "I;16":
        img = Image.fromarray((np.asarray(photo.convert("L"), dtype=np.uint16) * 257))
        assert img.mode == "I;16"
    else:
        img = photo.convert(mode)
    path = tmp_path / ("img.tiff" if mode == "CMYK" else "img.png")
    img.save(path)
    out = load_rgb(str(path), 64)
    assert out.mode == "RGB" and out.size == (48, 40)
    if mode in ("L", "I;16"):  # 16-bit grey is scaled, not clipped
        assert np.array_equal(np.asarray(out)[..., 0], np.asarray(photo.convert("L")))


def test_imagefolder_symlink_loop_lists_each_real_folder_once(tmp_path, hymenoptera, caplog):
    """ln -s . train/ants/loop used to list the ants 41 times over (until the path grew too long)."""
    root = _make_folder(tmp_path / "data", hymenoptera)
    (root / "train" / "ants" / "loop").symlink_to(".")
    extra = tmp_path / "more_bees"  # a real folder outside the tree, linked twice: listed once
    extra.mkdir()
    shutil.copy(sorted((hymenoptera / "train" / "bees").glob("*.jpg"))[10], extra / "extra bee.jpg")
    (root / "train" / "bees" / "more").symlink_to(extra)
    (root / "train" / "bees" / "more again").symlink_to(extra)
    dm = build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=2)
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.num_train_samples == 7  # 3 ants + 3 bees + the linked bee, each once
    names = [Path(path).name for path, _ in dm.train_set.samples]
    assert len(names) == len(set(names))
    assert dm.skipped_dirs == [str(root / "train" / "ants" / "loop"), str(root / "train" / "bees" / "more again")]
    assert "skipped 2 folder(s) reached again through a symbolic link" in caplog.text


def test_imagefolder_hidden_folders_are_left_out_like_hidden_files(tmp_path, hymenoptera):
    root = _make_folder(tmp_path, hymenoptera)
    hidden = root / "train" / "ants" / ".hid"
    hidden.mkdir()
    for i, src in enumerate(sorted((hymenoptera / "train" / "ants").glob("*.jpg"))[5:8]):
        shutil.copy(src, hidden / f"h{i}.jpg")
    (root / "train" / "ants" / ".DS_Store").write_bytes(b"\0" * 10)
    dm = build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=2)
    dm.setup("fit")
    assert dm.num_train_samples == 6 and dm.skipped_files == [] and dm.skipped_dirs == []


def test_imagefolder_files_of_other_types_are_counted_and_listed(tmp_path, hymenoptera, caplog):
    root = _make_folder(tmp_path, hymenoptera)
    shutil.copy(hymenoptera / "train" / "ants" / "imageNotFound.gif", root / "train" / "ants")
    (root / "val" / "bees" / "notes.txt").write_text("not an image")
    dm = build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=2, bad_image_policy="fail")
    with caplog.at_level("WARNING"):
        dm.setup("fit")  # not images, so not failures even under bad_image_policy=fail
    assert dm.skipped_files == [str(root / "train" / "ants" / "imageNotFound.gif"),
                                str(root / "val" / "bees" / "notes.txt")]
    assert "skipped 2 file(s) that are not images of a supported type" in caplog.text
    assert dm.num_train_samples == 6


def test_imagefolder_test_split_says_which_folder_tests_use(tmp_path, hymenoptera, caplog):
    root = _make_folder(tmp_path, hymenoptera)
    dm = build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=2)
    assert dm.test_split == "test"  # until setup has looked
    with caplog.at_level("WARNING"):
        dm.setup("fit")
    assert dm.test_split == "val" and dm.test_set is dm.val_set
    assert "has no test/ folder: testing uses the validation split (val/)" in caplog.text

    shutil.copytree(root / "val", root / "test")
    with_test = build_datamodule(name="imagefolder", path=str(root), img_size=32, batch_size=2)
    with_test.setup("fit")
    assert with_test.test_split == "test" and with_test.test_set is not with_test.val_set
    assert build_datamodule(name="mnist5k", root=str(REPO / "data")).test_split == "test"


# ---------------------------------------------------------------- missing files and bad options


def test_missing_mnist_offline(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        build_datamodule(name="mnist", root=str(tmp_path), download=False).prepare_data()
    message = str(info.value)
    assert str(tmp_path.resolve() / "MNIST" / "raw") in message
    assert "train-images-idx3-ubyte" in message and "data.download=true" in message
    assert isinstance(info.value, FileNotFoundError)


def test_failed_download_is_wrapped(tmp_path, monkeypatch):
    def no_network(*args, **kwargs):
        raise URLError("no network in tests")

    monkeypatch.setattr("torchvision.datasets.cifar.download_and_extract_archive", no_network)
    with pytest.raises(DatasetNotFoundError, match="could not download.*no network in tests") as info:
        build_datamodule(name="cifar10", root=str(tmp_path), download=True).prepare_data()
    assert str(tmp_path.resolve() / "cifar-10-batches-py") in str(info.value)


def test_missing_cifar_torchvision_and_npz(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="cifar-10-batches-py.*data_batch_1"):
        build_datamodule(name="cifar10", root=str(tmp_path), download=False).setup("fit")
    with pytest.raises(DatasetNotFoundError, match=r"cifar-100-python"):
        build_datamodule(name="cifar100", root=str(tmp_path), download=False).setup("fit")
    with pytest.raises(DatasetNotFoundError) as info:
        build_datamodule(name="cifar2", source="npz", path=str(tmp_path / "nope.npz")).setup("fit")
    assert str(tmp_path.resolve()) in str(info.value) and "nope.npz" in str(info.value)
    with pytest.raises(DatasetNotFoundError, match="mnist5k.npz"):
        build_datamodule(name="mnist5k", root=str(tmp_path)).setup("fit")
    with pytest.raises(DatasetNotFoundError, match="train/"):
        build_datamodule(name="imagefolder", path=str(tmp_path)).setup("fit")


def _mnist_copy(datasets_root: Path, tmp_path: Path) -> Path:
    """ROOT/MNIST/raw with links to the real files, so that a test can replace one of them."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for src in (datasets_root / "MNIST" / "raw").iterdir():
        (raw / src.name).symlink_to(src)
    return raw


def test_truncated_mnist_file_names_the_file_and_its_expected_size(datasets_root, tmp_path):
    raw = _mnist_copy(datasets_root, tmp_path)
    whole = (raw / "train-images-idx3-ubyte").read_bytes()
    (raw / "train-images-idx3-ubyte").unlink()
    (raw / "train-images-idx3-ubyte").write_bytes(whole[:1_000_000])  # an interrupted copy
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is truncated: 1,000,000 bytes, "
                                        r"expected 47,040,016 .*60000 x 28 x 28") as info:
        build_datamodule(name="mnist", root=str(tmp_path), download=True).prepare_data()
    assert isinstance(info.value, UserError) and "data.download=true" in str(info.value)

    (raw / "train-images-idx3-ubyte").write_bytes(b"<html>404</html>")  # a web page saved under its name
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte is not an IDX file"):
        build_datamodule(name="mnist", root=str(tmp_path), download=False).prepare_data()


def test_a_run_stops_on_a_truncated_mnist_file_naming_it(datasets_root, tmp_path):
    from test_training import compose_train
    from vit.training import run

    raw = _mnist_copy(datasets_root, tmp_path)
    whole = (raw / "t10k-labels-idx1-ubyte").read_bytes()
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte").write_bytes(whole[:5000])
    expected = f"{raw / 't10k-labels-idx1-ubyte'} is truncated: 5,000 bytes, expected 10,008"
    with pytest.raises(UserError) as refused:
        run(compose_train("data=mnist", f"data.root={tmp_path}", "data.download=false",
                          f"output_dir={tmp_path / 'run'}"))
    assert expected in str(refused.value) and "\n" not in str(refused.value)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_mnist_labels_that_do_not_match_the_images_are_named(datasets_root, tmp_path):
    raw = _mnist_copy(datasets_root, tmp_path)
    (raw / "t10k-labels-idx1-ubyte").unlink()
    (raw / "t10k-labels-idx1-ubyte").symlink_to(datasets_root / "MNIST" / "raw" / "train-labels-idx1-ubyte")
    with pytest.raises(DataError, match=r"t10k-labels-idx1-ubyte holds labels of shape \(60000,\) for the "
                                        r"10,000 images"):
        build_datamodule(name="mnist", root=str(tmp_path), download=False).prepare_data()


def test_npz_that_needs_pickle_or_is_no_npz_is_refused_by_name(tmp_path, monkeypatch):
    good = {"x_train": np.zeros((4, 8, 8, 3), np.uint8), "y_train": np.arange(4), "x_test":
            np.zeros((2, 8, 8, 3), np.uint8), "y_test": np.arange(2)}
    calls = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda *a, **kw: calls.append(kw) or real_load(*a, **kw))

    objects = tmp_path / "objects.npz"
    np.savez(objects, **good, classes=np.array([{"name": "cat"}] * 10, dtype=object))
    with pytest.raises(DataError, match=r"objects.npz: array 'classes' holds Python objects.*refused"):
        build_datamodule(name="cifar10", source="npz", path=str(objects)).setup("fit")
    assert calls and all(kw.get("allow_pickle") is False for kw in calls)

    text = tmp_path / "notes.npz"
    text.write_text("x_train,y_train\n1,2\n")
    with pytest.raises(DataError, match=r"notes.npz is not an .npz file"):
        build_datamodule(name="cifar10", source="npz", path=str(text)).setup("fit")

    single = tmp_path / "single.npz"
    with single.open("wb") as file:
        np.save(file, good["x_train"])
    with pytest.raises(DataError, match=r"single.npz holds a single .npy array"):
        build_datamodule(name="cifar10", source="npz", path=str(single)).setup("fit")

    truncated = tmp_path / "truncated.npz"
    np.savez(truncated, **good)
    truncated.write_bytes(truncated.read_bytes()[:300])
    with pytest.raises(DataError, match=r"truncated.npz is truncated or damaged"):
        build_datamodule(name="cifar10", source="npz", path=str(truncated)).setup("fit")


def test_config_errors():
    assert "mnist5k" in DATASET_NAMES and "imagefolder" in DATASET_NAMES
    with pytest.raises(ValueError, match="Did you mean 'cifar10'"):
        build_datamodule(name="cifar_10")
    with pytest.raises(ValueError, match="batch_size"):
        build_datamodule(batch_size=0)
    with pytest.raises(ValueError, match="val_fraction"):
        build_datamodule(val_fraction=1.0)
    with pytest.raises(ValueError, match="unknown data option"):
        build_datamodule({"name": "mnist", "batchsize": 3})
    with pytest.raises(ValueError, match="data.path"):
        build_datamodule(name="cifar10", source="npz")
    with pytest.raises(ValueError, match="4096.*4000"):
        build_datamodule(name="mnist5k", root=str(REPO / "data"), batch_size=4096).setup("fit")


def test_accepts_omegaconf_configs():
    structured = OmegaConf.structured(DataConfig(root=str(REPO / "data"), batch_size=32))
    dm = build_datamodule(structured)
    assert dm.cfg == DataConfig(root=str(REPO / "data"), batch_size=32)
    dm = build_datamodule(OmegaConf.create({"name": "cifar2", "classes": ["dog", "cat"], "source": "npz",
                                            "path": "x.npz"}))
    assert dm.num_classes == 2 and dm.cfg.classes == ["dog", "cat"]


# ---------------------------------------------------------------- module layout


def _data_module_imports() -> dict[str, set[str]]:
    """Every vit.data module and the vit.data modules it imports, at any level (a function's
    lazy import counts: it runs sooner or later)."""
    import ast

    folder = REPO / "vit" / "data"
    names = {("vit.data" if p.stem == "__init__" else f"vit.data.{p.stem}"): p for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in names.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges |= {alias.name for alias in node.names if alias.name in names}
            elif isinstance(node, ast.ImportFrom) and node.module in names:
                assert node.level == 0, f"{path}: relative import"
                submodules = {f"{node.module}.{alias.name}" for alias in node.names} & set(names)
                edges |= submodules or {node.module}
        graph[name] = edges - {name}
    return graph


def test_data_modules_import_each_other_without_a_cycle():
    graph = _data_module_imports()
    assert "vit.data.streaming" in graph["vit.data.factory"]  # lazy imports are seen
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(name):] + [name]))
        if name not in done:
            for imported in sorted(graph[name]):
                visit(imported, path + [name])
            done.add(name)

    for name in sorted(graph):
        visit(name, [])
