"""Does loading overlap compute? The input pipeline of the CIFAR-style ViT, alone and while training.

Data: CIFAR-10 as the package loads it for training (``build_datamodule(name='cifar10',
source='npz', path=...)``; the shared datasets' ``cifar10_jpeg_subset.npz``: 9,000 training
images after the default 10% validation split), augmentation on (random crop with 4px padding +
horizontal flip, done on whole uint8 batches by ``vit.data.arrays.BatchTransform``), batch
``--batch-size``, ``--workers`` DataLoader workers with ``persistent_workers`` and the default
prefetch (2 batches per worker). Model: ``vit.create_model('vit_cifar')`` (3x32x32, 4px patches,
192-dim, 6 blocks), AdamW (lr 1e-3), fp32 or ``--precision bf16`` (``torch.autocast('cpu',
torch.bfloat16)``). Measured in one process, in this order:

1. **augmentation on one core**: the training loader with ``num_workers=0`` under
   ``torch.set_num_threads(1)``, iterated without a model: images/s of gather + crop + flip +
   float conversion + normalisation, all in this process (target: >= 40,000 images/s);
2. **loader alone**: the real training loader (``--workers`` workers) iterated without a model,
   after its first batch (worker start-up): the rate at which it can deliver batches;
3. **model alone**: the same training step on one batch taken from the loader, reused, no loader
   running: the rate the model would train at if data were free;
4. **training with the real loader**: a plain loop (a Lightning Trainer would add its own
   overhead to both sides and hide where time goes). Each step is split in two timed parts:
   ``next(iterator)`` (a new ``iter(loader)`` at epoch ends included) is **data wait**;
   ``zero_grad`` + forward + cross-entropy + backward + ``AdamW.step`` is **compute**. The first
   ``--warmup`` steps are not counted (worker start-up, the first of them, is reported on its
   own; the first steps of the model are slow while oneDNN picks its kernels). Reported: training
   images/s over the timed steps' wall time, and the **data-wait share** = wait / (wait +
   compute) (target with 1 worker: under 10%), also on the last line as ``wait_share <fraction>``.
   Also printed: the median and largest wait of a step, and how many epoch ends the timed steps
   cross (at an epoch end the persistent workers restart from an empty queue; the default 40
   steps stay within the first epoch of 71 steps, ``--steps 80`` crosses one).

A well overlapped pipeline shows a loader far faster than the model, a wait share near zero and
training images/s close to the model-alone figure; their ratio includes what the workers cost
the training process in CPU time.

Threads. DataLoader workers run torch with one thread each (torch sets that in every worker).
On a small machine the training process's own threads would compete with the workers for the
same cores, so by default the training process gets ``torch.set_num_threads(max(1, cores -
workers))``; ``--threads`` overrides it. On Linux the share of the machine's CPU time used by
*other* processes (not this one nor its workers) is reported for the timed phases: on a shared
machine a busy neighbour slows compute, and that share says how far to trust the numbers.
The wait share does not see the thread given up to a worker: compare the images/s of
``--workers 0`` (all cores train, loading in between steps) with those of ``--workers 1``.

    python bench/input_pipeline.py [--workers 1] [--steps 40] [--batch-size 128] [--precision fp32|bf16]
                                   [--data PATH.npz] [--threads N] [--warmup 3]
"""
from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader

import vit
from vit.data import build_datamodule

REPO = Path(__file__).resolve().parents[1]
DATA_FILE = "cifar10_jpeg_subset.npz"
MODEL = "vit_cifar"
MIN_LOADER_SECONDS = 2.0  # each loader-only measurement iterates whole epochs for at least this long
WAIT_SHARE_TARGET = 0.10  # data wait / (wait + compute), with 1 worker
AUGMENT_TARGET = 40_000  # augmented images/s on one core

Batch = tuple[Tensor, Tensor]


# -- environment ----------------------------------------------------------------------------------


def default_data() -> Path:
    root = os.environ.get("VIT_TEST_DATA", REPO.parent / "shared" / "datasets")
    return Path(root).resolve() / DATA_FILE


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_name() -> str:
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


class CpuMeter:
    """Share of the machine's CPU time used by processes other than this one and its children.

    Linux only (``/proc``); elsewhere ``share()`` is None. This process's live children (the
    DataLoader workers) are found by their parent pid in ``/proc/<pid>/stat``.
    """

    def __init__(self) -> None:
        self.hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.start = self._sample()

    def share(self) -> float | None:
        end = self._sample()
        if self.start is None or end is None:
            return None
        (busy0, total0, own0), (busy1, total1, own1) = self.start, end
        own = sum(seconds - own0.get(pid, 0.0) for pid, seconds in own1.items())
        total = total1 - total0
        return max(0.0, (busy1 - busy0) - own) / total if total > 0 else None

    def _sample(self) -> tuple[float, float, dict[int, float]] | None:
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:]]
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / self.hz  # all but idle and iowait
        own = {os.getpid(): sum(os.times()[:2])}
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()  # from field 3 (state) on
                if int(fields[1]) == os.getpid():  # ppid
                    own[int(entry.name)] = (int(fields[11]) + int(fields[12])) / self.hz  # utime + stime
        return busy, sum(ticks) / self.hz, own


def others(share: float | None) -> str:
    return "n/a" if share is None else f"{share:.0%}"


# -- data -----------------------------------------------------------------------------------------


def train_loader(data: Path, batch_size: int, workers: int) -> DataLoader:
    """The package's CIFAR-10 training loader: in-memory, augmented, ``workers`` persistent workers."""
    dm = build_datamodule(name="cifar10", source="npz", path=str(data), batch_size=batch_size, augment=True,
                          num_workers=workers, persistent_workers=workers > 0, download=False)
    dm.setup("fit")
    return dm.train_dataloader()


def endless(loader: DataLoader) -> Iterator[Batch]:
    """Batches of ``loader`` over as many epochs as asked for (a new ``iter`` at each epoch end)."""
    while True:
        yield from loader


@dataclass
class LoaderSpeed:
    images_per_s: float
    startup_s: float  # iter() + the first batch: worker start-up when there are workers
    images: int
    seconds: float


def loader_speed(loader: DataLoader, min_seconds: float = MIN_LOADER_SECONDS) -> LoaderSpeed:
    """Iterate ``loader`` without a model: whole epochs until ``min_seconds`` have passed.

    The first batch (worker start-up) is timed on its own and not counted; the rest of that first
    epoch and the following ones are.
    """
    started = time.perf_counter()
    batches = iter(loader)
    next(batches)
    startup = time.perf_counter() - started
    images, start = 0, time.perf_counter()
    for _, labels in batches:
        images += len(labels)
    while time.perf_counter() - start < min_seconds:
        for _, labels in loader:
            images += len(labels)
    seconds = time.perf_counter() - start
    del batches
    return LoaderSpeed(images / seconds, startup, images, seconds)


# -- training -------------------------------------------------------------------------------------


class Trainer:
    """``vit_cifar`` + AdamW; ``step`` is one full optimizer step on a batch."""

    def __init__(self, precision: str) -> None:
        self.model = vit.create_model(MODEL).train()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-3)
        self.precision = precision

    def step(self, images: Tensor, labels: Tensor) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.precision == "bf16"):
            loss = F.cross_entropy(self.model(images), labels)
        loss.backward()
        self.optimizer.step()
        return loss.item()


@dataclass
class TrainTiming:
    images: int
    wait_s: list[float]  # per timed step: next(iterator)
    compute_s: list[float]  # per timed step: the optimizer step
    wall_s: float  # all timed steps, loop overhead included
    startup_s: float  # first next(): worker start-up (not in the share)
    warmup_s: float  # all warm-up steps, start-up included
    background: float | None
    first_loss: float
    last_loss: float

    @property
    def images_per_s(self) -> float:
        return self.images / self.wall_s

    @property
    def wait_share(self) -> float:
        wait = sum(self.wait_s)
        return wait / (wait + sum(self.compute_s))


def model_alone(trainer: Trainer, batch: Batch, steps: int) -> tuple[float, float | None]:
    """images/s of ``steps`` optimizer steps on one fixed batch (no loader); others' CPU share."""
    images, labels = batch
    meter, start = CpuMeter(), time.perf_counter()
    for _ in range(steps):
        trainer.step(images, labels)
    seconds = time.perf_counter() - start
    return steps * len(labels) / seconds, meter.share()


def train_with_loader(trainer: Trainer, loader: DataLoader, steps: int, warmup: int) -> TrainTiming:
    """``warmup`` untimed steps, then ``steps`` steps with data wait and compute timed apart."""
    batches = endless(loader)
    started = time.perf_counter()
    images, labels = next(batches)
    startup = time.perf_counter() - started
    first_loss = trainer.step(images, labels)
    for _ in range(warmup - 1):
        trainer.step(*next(batches))
    warmup_s = time.perf_counter() - started

    waits, computes, seen = [], [], 0
    meter, start = CpuMeter(), time.perf_counter()
    for _ in range(steps):
        t0 = time.perf_counter()
        images, labels = next(batches)
        t1 = time.perf_counter()
        loss = trainer.step(images, labels)
        t2 = time.perf_counter()
        waits.append(t1 - t0)
        computes.append(t2 - t1)
        seen += len(labels)
    wall = time.perf_counter() - start
    return TrainTiming(seen, waits, computes, wall, startup, warmup_s, meter.share(), first_loss, loss)


# -- main -----------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=1, help="DataLoader workers (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=40, help="timed training steps (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed training steps first, worker start-up included (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per step (default: %(default)s)")
    parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                        help="fp32, or bf16 autocast for the model (default: %(default)s)")
    parser.add_argument("--data", type=Path, default=None,
                        help=f"CIFAR-10 .npz (default: $VIT_TEST_DATA/{DATA_FILE}, else ../shared/datasets/{DATA_FILE} "
                             f"beside the repository)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads of the training process (default: max(1, cores - workers))")
    args = parser.parse_args(argv)
    if args.workers < 0 or args.steps < 1 or args.warmup < 1 or args.batch_size < 1 or (args.threads or 1) < 1:
        parser.error("--workers must be >= 0; --steps, --warmup, --batch-size and --threads >= 1")
    args.data = (args.data or default_data()).expanduser().resolve()
    if not args.data.is_file():
        parser.error(f"{args.data} not found; pass --data PATH.npz or set VIT_TEST_DATA to the shared datasets folder")
    return args


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def main(argv: Sequence[str] | None = None) -> TrainTiming:
    args = parse_args(argv)
    cores = available_cores()
    threads = args.threads or max(1, cores - args.workers)
    torch.manual_seed(0)
    print(f"Machine: {cpu_name()}, {cores} cores available, load average {os.getloadavg()[0]:.2f}; "
          f"torch {torch.__version__}, {platform.python_implementation()} {platform.python_version()}")
    print(f"Training process: torch.set_num_threads({threads}) (cores - workers, at least 1); "
          f"{args.workers} DataLoader worker(s) with 1 thread each")
    print(f"Data: {args.data}; batch {args.batch_size}, augment on. Model: {MODEL}, {args.precision}, AdamW.",
          flush=True)

    torch.set_num_threads(1)
    augment = loader_speed(train_loader(args.data, args.batch_size, workers=0))
    print(f"\n1. augmentation on one core (num_workers=0, 1 thread): {augment.images_per_s:,.0f} images/s "
          f"(target >= {AUGMENT_TARGET:,}: {verdict(augment.images_per_s >= AUGMENT_TARGET)})", flush=True)

    torch.set_num_threads(threads)
    alone = loader_speed(train_loader(args.data, args.batch_size, args.workers))
    print(f"2. loader alone ({args.workers} worker(s)): {alone.images_per_s:,.0f} images/s "
          f"({alone.images:,} images in {alone.seconds:.1f} s; start-up {alone.startup_s:.2f} s)", flush=True)

    loader = train_loader(args.data, args.batch_size, args.workers)
    trainer = Trainer(args.precision)
    dataset = loader.dataset  # a TensorImageDataset: __getitems__ gives an augmented batch
    batch = dataset.__getitems__(torch.randperm(len(dataset))[:args.batch_size].tolist())
    for _ in range(args.warmup):
        trainer.step(*batch)
    baseline_steps = max(5, args.steps // 4)
    model_speed, model_others = model_alone(trainer, batch, baseline_steps)
    print(f"3. model alone ({baseline_steps} steps on one fixed batch, {threads} thread(s)): "
          f"{model_speed:,.1f} images/s (others used {others(model_others)} of the machine's CPU)", flush=True)

    trainer = Trainer(args.precision)  # fresh weights and optimizer state for the real run
    timing = train_with_loader(trainer, loader, args.steps, args.warmup)
    wait, compute = sum(timing.wait_s), sum(timing.compute_s)
    print(f"4. training with the real loader ({args.steps} steps after {args.warmup} warm-up steps "
          f"of {timing.warmup_s:.1f} s, worker start-up {timing.startup_s:.2f} s of it): "
          f"{timing.images_per_s:,.1f} images/s = {timing.images_per_s / model_speed:.2f} x model alone "
          f"(others used {others(timing.background)} of the machine's CPU); loss {timing.first_loss:.3f} -> "
          f"{timing.last_loss:.3f}")
    per_epoch = len(loader)
    epoch_ends = (args.warmup + args.steps - 1) // per_epoch - (args.warmup - 1) // per_epoch
    print(f"   per step: data wait median {statistics.median(timing.wait_s) * 1e3:.2f} ms, "
          f"max {max(timing.wait_s) * 1e3:.2f} ms; compute median {statistics.median(timing.compute_s) * 1e3:.0f} ms; "
          f"the timed steps cross {epoch_ends} epoch end(s) ({per_epoch} steps per epoch)")
    print(f"   data wait {wait:.3f} s of wait + compute {wait + compute:.1f} s: share {timing.wait_share:.2%} "
          f"(target < {WAIT_SHARE_TARGET:.0%} with 1 worker: {verdict(timing.wait_share < WAIT_SHARE_TARGET)})")
    print(f"   loader alone delivers {alone.images_per_s / timing.images_per_s:,.0f} x what training consumes")
    print(f"wait_share {timing.wait_share:.4f}")
    return timing


if __name__ == "__main__":
    main()
