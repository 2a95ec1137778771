"""Peak memory of training from shards stays flat as the dataset grows.

The real MNIST training split (the shared datasets: ``$VIT_TEST_DATA``, else ../shared/datasets
beside the repository) is converted to shards twice, as it is (1x) and repeated four times (4x);
validation and test stay 1x. Each is then trained on in a fresh subprocess: ``--steps`` steps of a
small model (``vit.create_model('linear_mnist')``, AdamW) in a plain PyTorch loop, reading through
``data=shards``'s training loader with the batches decoded in the training process itself
(``--workers 0``), so that whatever reading holds shows up there. The subprocess reports its peak
resident memory (``resource.getrusage(RUSAGE_SELF).ru_maxrss``, which counts the mapped shard
pages it touched). Printed: a row per size, then ``ratio <peak 4x / peak 1x>`` (target <= 1.2).

An in-memory dataset would grow by the pixels it adds (127 MB of uint8 for 4x MNIST); streaming
keeps at most a few chunks per reader mapped (litdata reads local chunks in place).

    python bench/streaming_memory.py [--steps 1000] [--batch-size 128] [--chunk-bytes 16MB] [--workers 0]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def data_root() -> Path:
    return Path(os.environ.get("VIT_TEST_DATA", REPO.parent / "shared" / "datasets")).resolve()


def write_mnist_shards(out: Path, repeats: int, chunk_bytes: str) -> int:
    """MNIST's splits as shards, the training split repeated ``repeats`` times; returns its size."""
    from vit.data import build_datamodule
    from vit.data.shards import ArraySource, sources_of, write_shards

    dm = build_datamodule(name="mnist", root=str(data_root()), download=False, batch_size=1)
    dm.setup("fit")
    sources, facts = sources_of(dm)
    train = dm.train_set
    sources["train"] = ArraySource(train.images.repeat(repeats, 1, 1, 1), train.labels.repeat(repeats))
    write_shards(out, sources, facts, chunk_bytes=chunk_bytes, progress=False)
    return len(sources["train"])


def train(path: str, steps: int, batch_size: int, workers: int) -> dict[str, float]:
    """The subprocess: ``steps`` training steps from the shards at ``path``; peak RSS in MB."""
    import torch

    import vit
    from vit.data import build_datamodule

    torch.set_num_threads(1)  # a tiny model: threads only add noise on a shared machine
    torch.manual_seed(0)
    dm = build_datamodule(name="shards", path=path, batch_size=batch_size, num_workers=workers)
    dm.setup("fit")
    model = vit.create_model("linear_mnist", num_classes=dm.num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loader = dm.train_dataloader()
    start, step, seen = time.perf_counter(), 0, 0
    while step < steps:
        for images, labels in loader:
            loss = torch.nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step, seen = step + 1, seen + len(labels)
            if step == steps:
                break
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return {"peak_rss_mb": peak_kib / 1024, "steps": step, "samples": seen, "seconds": time.perf_counter() - start,
            "loss": loss.item()}


def _child(*args: str) -> str:
    """Run this script with ``args`` in a fresh process; its last line of output.

    Conversion runs in a child too, so that this parent stays small: Linux carries the peak RSS
    of a forked process over its exec, so a child of a parent holding 4x MNIST would report that
    parent's peak as its own.
    """
    result = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        sys.exit(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return result.stdout.strip().splitlines()[-1]


def folder_mb(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--chunk-bytes", default="16MB")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (0: read in the measured process)")
    parser.add_argument("--train", metavar="SHARDS", help=argparse.SUPPRESS)  # the subprocesses
    parser.add_argument("--convert", metavar="SHARDS", help=argparse.SUPPRESS)
    parser.add_argument("--repeats", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.train:
        print(json.dumps(train(args.train, args.steps, args.batch_size, args.workers)))
        return
    if args.convert:
        print(write_mnist_shards(Path(args.convert), args.repeats, args.chunk_bytes))
        return

    if not (data_root() / "MNIST" / "raw").is_dir():
        sys.exit(f"MNIST not found under {data_root()}; set VIT_TEST_DATA to the shared datasets folder")
    print(f"MNIST from {data_root()}; {args.steps} steps of linear_mnist, batch {args.batch_size}, "
          f"{args.workers} workers, chunks of {args.chunk_bytes}", flush=True)
    print(f"{'dataset':<10} {'train samples':>13} {'shards MB':>10} {'peak RSS MB':>12} {'samples/s':>10}", flush=True)
    peaks = []
    with tempfile.TemporaryDirectory(prefix="vit-streaming-") as scratch:
        for repeats in (1, 4):
            out = Path(scratch) / f"mnist_x{repeats}"
            n = int(_child("--convert", str(out), "--repeats", str(repeats), "--chunk-bytes", args.chunk_bytes))
            report = json.loads(_child("--train", str(out), "--steps", str(args.steps),
                                       "--batch-size", str(args.batch_size), "--workers", str(args.workers)))
            peaks.append(report["peak_rss_mb"])
            print(f"{'mnist x' + str(repeats):<10} {n:>13} {folder_mb(out):>10.1f} {report['peak_rss_mb']:>12.1f} "
                  f"{report['samples'] / report['seconds']:>10.0f}", flush=True)
    print(f"ratio {peaks[1] / peaks[0]:.3f}")


if __name__ == "__main__":
    main()
