"""Shards (vit.data.shards) streamed by litdata (vit.data.streaming), on real digits and photos."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from vit.checkpoints import load_checkpoint
from vit.data import build_datamodule
from vit.data.shard_format import check_name
from vit.data.shards import main
from vit.training import run

from test_training import compose_train, quick

# costly module-scoped fixtures: one worker runs them all, once (--dist loadgroup)
pytestmark = pytest.mark.xdist_group("test_shards")

REPO = Path(__file__).resolve().parents[1]
EMBEDDED = REPO / "data"
TRAIN = 4000  # mnist5k's training split


@pytest.fixture(autouse=True)
def _one_thread():
    """Batches of 50 digits gain nothing from intra-op threads, and on a busy two-core machine
    torch's thread pool makes each batch op ~50x slower (DataLoader workers use one thread anyway)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """mnist5k as shards, through the command line; small chunks, so that there are many."""
    out = tmp_path_factory.mktemp("mnist5k_shards")
    assert main(["data=mnist5k", f"data.root={EMBEDDED}", f"out={out}", "chunk_bytes=128KB"]) == 0
    return out


def shard_dm(path: Path | str, **overrides):
    cfg = {"name": "shards", "path": str(path), "batch_size": 50, "num_workers": 0, "shuffle_seed": 7, **overrides}
    dm = build_datamodule(cfg)
    dm.setup("fit")
    return dm


def epoch_ids(loader) -> tuple[torch.Tensor, int]:
    """The sample ids of one pass over a ``with_ids`` loader, in order, and the number of batches."""
    ids = [batch[2] for batch in loader]
    return torch.cat(ids), len(ids)


def test_conversion_writes_every_split_and_the_metadata(shards):
    meta = json.loads((shards / "meta.json").read_text())
    assert meta["splits"] == {"train": TRAIN, "val": 500, "test": 500}
    assert (meta["dataset"], meta["encoding"], meta["in_chans"], meta["image_size"]) == ("mnist5k", "raw", 1, 28)
    assert len(list((shards / "train").glob("chunk-*.bin"))) > 10
    dm = shard_dm(shards)
    assert (dm.num_classes, dm.in_chans, dm.img_size, dm.num_train_samples) == (10, 1, (28, 28), TRAIN)
    assert dm.class_names[0] == "0 - zero" and dm.mean == (0.1307,) and dm.skipped_files == []

    # Evaluation batches stream the source split in order, pixel for pixel.
    source = build_datamodule(name="mnist5k", root=str(EMBEDDED), batch_size=500)
    source.setup("fit")
    images, labels, ids = next(iter(dm.loader("val", with_ids=True)))
    expected_images, expected_labels = next(iter(source.val_dataloader()))
    assert torch.equal(ids, torch.arange(50)) and images.dtype == torch.float32 and labels.dtype == torch.int64
    assert torch.equal(labels, expected_labels[:50]) and torch.allclose(images, expected_images[:50])
    assert sum(len(y) for _, y in dm.test_dataloader()) == 500


def test_training_order_is_complete_shuffled_seeded_and_new_every_epoch(shards):
    loader = shard_dm(shards).loader("train", with_ids=True)
    first, batches = epoch_ids(loader)
    second, _ = epoch_ids(loader)
    assert batches == len(loader) == TRAIN // 50
    for order in (first, second):
        assert torch.equal(order.sort().values, torch.arange(TRAIN))  # every sample exactly once
    assert not torch.equal(first, second)
    assert (first[:100] == torch.arange(100)).sum() < 5 and (first[1:] > first[:-1]).float().mean() < 0.6
    assert torch.equal(epoch_ids(shard_dm(shards).loader("train", with_ids=True))[0], first)  # same seed
    assert not torch.equal(epoch_ids(shard_dm(shards, shuffle_seed=8).loader("train", with_ids=True))[0], first)


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads the memory map from /proc")
def test_finished_epochs_let_their_chunks_go(shards):
    """Reading in the training process must not map more chunks with every epoch."""
    def mapped_chunks() -> int:
        return sum(str(shards) in line for line in Path("/proc/self/maps").read_text().splitlines())

    loader = shard_dm(shards, augment=False).loader("train")
    counts = []
    for _ in range(4):
        for _ in loader:
            pass
        counts.append(mapped_chunks())
    assert 0 < counts[-1] <= counts[0], counts


def _ranks(shards: Path, monkeypatch, batch_size: int) -> list[tuple[torch.Tensor, int, int]]:
    """(ids, batches, len(loader)) of rank 0 and rank 1 of two, with two workers each; litdata
    reads the distributed layout from WORLD_SIZE / GLOBAL_RANK when torch.distributed is not set up."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = []
    for rank in (0, 1):
        monkeypatch.setenv("GLOBAL_RANK", str(rank))
        loader = shard_dm(shards, batch_size=batch_size, num_workers=2).loader("train", with_ids=True)
        ids, batches = epoch_ids(loader)
        seen.append((ids, batches, len(loader)))
    return seen


def test_two_ranks_with_two_workers_see_every_sample_once(shards, monkeypatch):
    (ids0, batches0, len0), (ids1, batches1, len1) = _ranks(shards, monkeypatch, batch_size=50)
    assert batches0 == batches1 == len0 == len1 == TRAIN // 50 // 2
    assert torch.equal(torch.cat([ids0, ids1]).sort().values, torch.arange(TRAIN))


def test_uneven_split_gives_every_rank_the_same_number_of_batches(shards, monkeypatch):
    # 4000 samples in batches of 64 are 62.5 batches: without care one rank would get one more
    # batch than the other, and wait forever in that step's gradient all-reduce.
    (ids0, batches0, len0), (ids1, batches1, len1) = _ranks(shards, monkeypatch, batch_size=64)
    assert batches0 == batches1 == len0 == len1 == 31
    seen = torch.cat([ids0, ids1])
    assert len(seen.unique()) == len(seen) == 2 * 31 * 64  # no sample twice; 32 sit this epoch out


def test_resumed_loader_continues_with_the_unseen_samples(shards, tmp_path):
    dm = shard_dm(shards, num_workers=2)
    loader = dm.loader("train", with_ids=True)
    seen = []
    for step, (_, _, ids) in enumerate(loader):
        seen.append(ids)
        if step == 29:
            break
    # Lightning puts the datamodule's state in the checkpoint; it must load with weights_only.
    torch.save({"state": dm.state_dict()}, tmp_path / "state.pt")
    state = torch.load(tmp_path / "state.pt", weights_only=True)["state"]

    resumed = shard_dm(shards, num_workers=2)
    resumed.load_state_dict(state)
    loader = resumed.loader("train", with_ids=True)
    rest, batches = epoch_ids(loader)
    assert batches == TRAIN // 50 - 30
    assert torch.equal(torch.cat([*seen, rest]).sort().values, torch.arange(TRAIN))
    following, _ = epoch_ids(loader)

    # The same orders as a run that was never interrupted, this epoch and the next.
    straight = shard_dm(shards, num_workers=2).loader("train", with_ids=True)
    assert torch.equal(torch.cat([*seen, rest]), epoch_ids(straight)[0])
    assert torch.equal(following, epoch_ids(straight)[0])


def test_shards_stream_through_a_cache_as_from_object_storage(shards, tmp_path):
    # "local:" makes litdata treat a folder as object storage: chunks are downloaded into the cache.
    loader = shard_dm(f"local:{shards}", cache_dir=str(tmp_path / "cache"), num_workers=2).loader("train",
                                                                                                   with_ids=True)
    assert torch.equal(epoch_ids(loader)[0].sort().values, torch.arange(TRAIN))
    assert list((tmp_path / "cache").rglob("chunk-*.bin"))


@pytest.mark.parametrize("name", ["../../escaped.bin", "/tmp/escaped.bin", "sub/../../escaped.bin", "..", "",
                                  "C:\\escaped.bin", "a\\..\\b"])
def test_unsafe_file_names_are_refused(name):
    with pytest.raises(ValueError, match="refusing the file name"):
        check_name(name, "index.json")
    assert check_name("chunk-0-12.bin", "index.json") == "chunk-0-12.bin"


@pytest.mark.parametrize("remote", [False, True], ids=["local", "cached_remote"])
def test_tampered_index_is_refused(shards, tmp_path, remote):
    copy = shutil.copytree(shards, tmp_path / "shards")
    index_path = copy / "train" / "index.json"
    index = json.loads(index_path.read_text())
    index["chunks"][0]["filename"] = "../../escaped.bin"
    index_path.write_text(json.dumps(index))
    # "local:" makes litdata treat the folder as object storage: chunks are copied into the cache.
    path = f"local:{copy}" if remote else copy
    dm = shard_dm(path, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="refusing the file name '../../escaped.bin'"):
        dm.train_dataloader()
    assert not list(tmp_path.rglob("escaped.bin"))

    index["chunks"][0]["filename"] = "chunk-0-0.bin"
    index["config"]["data_format"] = ["int", "int", "pickle"]  # litdata would unpickle the chunk bytes
    index_path.write_text(json.dumps(index))
    with pytest.raises(ValueError, match="refusing serializers"):
        shard_dm(copy).train_dataloader()


def test_lightning_trains_from_shards_and_resumes(shards, tmp_path):
    common = (f"data.path={shards}", "model=linear_mnist", "data.batch_size=64", "data.num_workers=0", "optim.lr=0.01",
              "optim.warmup_epochs=0")
    first = run(compose_train("data=shards", *quick(tmp_path / "a", *common)))
    assert first["dataset"] == "shards" and first["global_step"] == 256 // 64
    assert first["test_acc"] > 0.3  # a linear model on real digits, after 256 images, beats chance (0.1)
    checkpoint = tmp_path / "a" / "checkpoints" / "last.ckpt"
    state = load_checkpoint(checkpoint)["ShardDataModule"]["train_loader"]  # plain data: weights_only loads it
    assert state["current_epoch"] == 1 and state["num_samples_yielded"] == 256 and state["dataset"]["seed"] == 42
    resumed = run(compose_train("data=shards", *quick(tmp_path / "b", *common, "trainer.max_epochs=2",
                                                       f"ckpt_path={checkpoint}")))
    assert resumed["global_step"] == 2 * 256 // 64 and resumed["epochs"] == 2


def test_image_folder_and_npz_convert_to_shards(datasets_root, tmp_path):
    folder = tmp_path / "photos"
    for split in ("train", "val"):
        for name in ("ants", "bees"):
            (folder / split / name).mkdir(parents=True)
            for src in sorted((datasets_root / "hymenoptera_data" / split / name).glob("*.jpg"))[:4]:
                shutil.copy(src, folder / split / name / src.name)
    out = tmp_path / "photo_shards"
    assert main(["data=imagefolder", f"data.path={folder}", "data.img_size=64", f"out={out}"]) == 0
    dm = shard_dm(out, batch_size=4)
    assert (dm.class_names, dm.in_chans, dm.img_size, dm.meta.encoding) == (["ants", "bees"], 3, (64, 64), "jpeg")
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (4, 3, 64, 64) and set(labels.tolist()) <= {0, 1}
    assert dm.meta.splits == {"train": 8, "val": 8, "test": 8}  # no test/ folder: test is val, as in training

    with np.load(datasets_root / "cifar10_jpeg_subset.npz") as arrays:  # a real slice, as an npz file
        np.savez(tmp_path / "cifar.npz", x_train=arrays["x_train"][::50], y_train=arrays["y_train"][::50],
                 x_test=arrays["x_test"][::100], y_test=arrays["y_test"][::100], classes=arrays["classes"])
    out = tmp_path / "cifar_shards"
    assert main(["data=cifar10", "data.source=npz", f"data.path={tmp_path / 'cifar.npz'}", f"out={out}"]) == 0
    dm = shard_dm(out, batch_size=10)
    assert dm.meta.splits == {"train": 180, "val": 20, "test": 100} and dm.class_names[0] == "airplane"
    images, _ = next(iter(dm.train_dataloader()))
    assert images.shape == (10, 3, 32, 32)


def test_converter_refuses_bad_arguments(shards, tmp_path, capsys):
    assert main([f"data.root={EMBEDDED}"]) == 2 and "out=DIR is required" in capsys.readouterr().err
    assert main(["data=mnist5k", f"data.root={EMBEDDED}", f"out={shards}"]) == 1
    assert "not empty; pass overwrite=true" in capsys.readouterr().err
    assert main(["data=nope", f"out={tmp_path / 'x'}"]) == 1 and "available:" in capsys.readouterr().err
    # Unknown keys are usage errors, named; a value of the wrong type is named by Hydra's schema.
    assert main(["data=mnist5k", "colour=red", f"out={tmp_path / 'x'}"]) == 2
    assert "unknown argument 'colour'" in capsys.readouterr().err
    assert main(["data=mnist5k", "data.colour=red", f"out={tmp_path / 'x'}"]) == 2
    assert "unknown data option 'data.colour'" in capsys.readouterr().err
    assert main(["data=mnist5k", "data.batch_size=many", f"out={tmp_path / 'x'}"]) == 1
    assert "data.batch_size=many" in capsys.readouterr().err and not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="data=shards needs data.path"):
        build_datamodule(name="shards")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        build_datamodule(name="shards", path=str(tmp_path))
