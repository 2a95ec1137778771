"""Throughput and peak memory of ``vit`` models against timm's twin with the same weights.

For each model configuration and precision mode this script builds ``vit.create_model(name)``
and ``vit.to_timm(model)`` (timm's ``VisionTransformer`` carrying identical weights), checks
that both give the same fp32 logits in eval mode, then measures

* **train step**: ``zero_grad`` + forward + cross-entropy + backward + ``AdamW.step``
  (lr 1e-3, foreach default), models in ``train()`` mode;
* **inference**: forward under ``torch.inference_mode()``, models in ``eval()`` mode;

in fp32 and under bf16 autocast (``torch.autocast(device, dtype=torch.bfloat16)``), on the
same input batch for every model.

Timing. Every model first takes ``--warmup`` untimed steps (at least one). Then the models
take turns (vit, timm, vit, timm, ...) for ``--repeats`` rounds, so that clock, thermal or
load drift hits all of them alike. A timed run is a fixed number of consecutive steps, enough
for the fastest model's run to last about 0.2 s, the same for every model. On Linux each round
also records the share of CPU time that *other* processes used (from /proc/stat); a round
disturbed by more than ``--max-background`` is discarded and, after waiting (up to 10 s) for
the machine to quieten, run again; after ``repeats`` extra rounds the least disturbed rounds
are used. Reported: images/s of the
median run, the vit/timm throughput ratio of those medians (>1 means vit is faster), and in
parentheses the interquartile range of the per-round paired ratios.

Peak memory. Bytes the model owns when the step starts (parameters, buffers and, for
training, AdamW state; gradients are set to None first) plus the largest increase of allocated
bytes during one step, ``vit.measure.allocation_increase`` (the CUDA allocator's peak, or on the
CPU the allocator events that ``torch.profiler`` records). The input batch is not counted.

Threads. Unless ``--threads`` is given the script leaves torch's thread settings as any fresh
process has them. ``torch.set_num_threads`` (any count) also turns off MKL's dynamic threading,
which changes fp32 speeds (bench/README.md): setting it for every model would measure a process
users do not have.

C allocator. By default each configuration trains before it infers, so inference is timed in a
process whose glibc heap has grown and keeps freed blocks (as in validation during training).
A process that never trains, e.g. a prediction script, starts with glibc's small thresholds: it
gives large freed blocks back to the OS and page-faults them in again on the next call, which
costs paths with more or larger temporaries most. ``--phases infer`` measures that process, for
one configuration and one mode per process: fp32 steps, like training, grow the heap first.

Attention path. ``vit`` models with ``attn_impl='auto'`` choose between
``F.scaled_dot_product_attention`` ('fused') and the textbook matmul-softmax-matmul
('explicit') through ``vit.attention.choose_attention_path``; each table says which path
'auto' takes. ``--attn-impl-sweep`` times ``attn_impl='fused'`` and ``'explicit'`` side by side
with timm and reports whether 'auto' picked the faster (in fp32: the faster within timm's peak
memory; within 3% counts as a tie).

Targets. The summary prints each configuration's verdict against the package's targets on a
CPU (:func:`speed_target`, ``FP32_MEMORY_TARGET``).

Ceiling. ``--attention-ceiling`` adds ``vit[no attention]``: the same model with the attention
core (``q k^T``, softmax, the weighted sum) replaced by a copy of the values, so attention costs
no more than writing its output. No attention path can beat its ratio to timm: when that ceiling
is below a target, the rest of the model (linear layers, GELU, LayerNorm, the kernels vit and
timm share) is what stands in the way, not the attention path.

Examples::

    python bench/model_throughput.py
    python bench/model_throughput.py --models vit_cifar --modes bf16 --repeats 9
    python bench/model_throughput.py --modes bf16 --phases infer    # an inference-only process
    python bench/model_throughput.py --attn-impl-sweep --json sweep.json
    python bench/model_throughput.py --models vit_tiny_patch16_224 --modes bf16 --profile 12
    python bench/model_throughput.py --modes bf16 --attention-ceiling
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

import timm
import torch
import torch.nn.functional as F
from torch import nn

import vit
from vit.attention import choose_attention_path
from vit.measure import MiB, allocation_increase

DEFAULT_MODELS = ("vit_cifar", "vit_mnist", "vit_tiny_patch16_224")
MODES = ("fp32", "bf16")
PHASES = ("train", "infer")
SMALL_MODEL_BATCH = 128
LARGE_MODEL_BATCH = 16  # 224x224 models: keeps the default run within minutes on 2 CPU cores
MIN_RUN_SECONDS = 0.2
LOGITS_TOLERANCE = 1e-4
TIE_MARGIN = 0.03  # timing noise on a quiet machine: paths this close tie, targets missed by less are flagged so
FP32_MEMORY_TARGET = 1.05  # vit/timm peak memory in fp32, both phases

ATTENTION_PATHS = ("fused", "explicit")  # the attn_impl values besides 'auto'
CEILING_LABEL = "vit[no attention]"
CpuCounters = tuple[float, float, float]  # (busy s of all cores, total s of all cores, own CPU s)


@dataclass
class Candidate:
    """One model under test with its optimizer; ``label`` is 'timm', 'vit', 'vit[<attn_impl>]' or
    ``CEILING_LABEL``."""

    label: str
    model: nn.Module
    optimizer: torch.optim.Optimizer

    @property
    def is_timm(self) -> bool:
        return self.label == "timm"

    @property
    def is_ceiling(self) -> bool:
        return self.label == CEILING_LABEL


Step = Callable[[Candidate], None]


@dataclass
class Timing:
    """Alternating timed runs of several candidates in one phase."""

    steps_per_run: int
    seconds: dict[str, list[float]]  # per label, one entry per used round
    background: list[float | None]  # other processes' CPU share during each used round
    discarded_rounds: int


@dataclass
class Measurement:
    """Timings and peak memory of one candidate in one (config, mode, phase)."""

    config: str
    mode: str
    phase: str
    label: str
    batch_size: int
    steps_per_run: int
    run_seconds: list[float]
    peak_bytes: int

    @property
    def images_per_s(self) -> float:
        return self.batch_size * self.steps_per_run / statistics.median(self.run_seconds)


@dataclass
class Comparison:
    """One vit candidate against timm in one (config, mode, phase)."""

    vit: Measurement
    timm: Measurement
    auto_path: str  # the attention path attn_impl='auto' takes here
    faster_path: str | None  # sweep only: the fastest path (fp32: within timm's memory), or 'tie' (TIE_MARGIN)
    background: float | None  # median share of CPU used by other processes while timing
    discarded_rounds: int
    speed_ratio: float = field(init=False)
    paired_ratio_iqr: tuple[float, float] = field(init=False)
    memory_ratio: float = field(init=False)

    def __post_init__(self) -> None:
        self.speed_ratio = self.vit.images_per_s / self.timm.images_per_s
        paired = [t / v for v, t in zip(self.vit.run_seconds, self.timm.run_seconds)]
        q1, _, q3 = statistics.quantiles(paired, n=4, method="inclusive") if len(paired) > 1 else paired * 3
        self.paired_ratio_iqr = (q1, q3)
        self.memory_ratio = self.vit.peak_bytes / self.timm.peak_bytes

    def as_dict(self) -> dict:
        record = {k: v for k, v in asdict(self).items() if k not in ("vit", "timm")}
        for side in ("vit", "timm"):
            m = getattr(self, side)
            record[side] = {**asdict(m), "images_per_s": m.images_per_s}
        return record


def speed_target(config: str, mode: str, phase: str) -> float:
    """The vit/timm throughput the package aims for on a CPU. fp32 and bf16 inference run timm's own
    fused kernel, so they should tie; bf16 training takes the explicit path, whose backward is much
    faster than the fused kernel's on CPUs (most for short sequences of narrow heads)."""
    if mode == "bf16" and phase == "train":
        return 1.25 if config == "vit_tiny_patch16_224" else 3.0
    return 0.95


# -- environment ----------------------------------------------------------------------------------


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask where the OS has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def cpu_counters() -> CpuCounters | None:
    """Machine-wide CPU seconds from Linux's /proc/stat and this process's own; None elsewhere."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = sum(ticks) - ticks[3] - ticks[4]  # everything but idle and iowait
    return busy / hz, sum(ticks) / hz, sum(os.times()[:2])


def background_share(start: CpuCounters | None, end: CpuCounters | None) -> float | None:
    """Share of all cores' time that *other* processes used between two samples.

    On a shared machine a timing is only as good as the machine was quiet; this lets the
    benchmark retry disturbed rounds and report contention instead of hiding it.
    """
    if start is None or end is None:
        return None
    busy, total, own = (e - s for e, s in zip(end, start))
    return max(0.0, busy - own) / total if total > 0 else None


def wait_until_quiet(max_share: float, timeout_s: float = 10.0, window_s: float = 0.5) -> None:
    """Idle in short windows until other processes use at most ``max_share`` of the CPU, or time out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        start = cpu_counters()
        time.sleep(window_s)
        share = background_share(start, cpu_counters())
        if share is None or share <= max_share:
            return


@contextlib.contextmanager
def kineto_quiet() -> Iterator[None]:
    """Drop the profiler backend's start/stop banner lines from stderr; keep everything else."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            noise = ("profiler_start", "profiler_stop", "gpuGetDeviceCount")
            sys.stderr.writelines(line for line in sink if not any(n in line for n in noise))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- models and steps -----------------------------------------------------------------------------


def skip_attention_core(model: nn.Module) -> nn.Module:
    """Make every block's attention return its values ``v`` (B, N, D) in place of ``softmax(q k^T) v``.

    The qkv and output projections still run; the core costs one copy of its output, less than
    any real attention path. The logits change, so this model only bounds the speed.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        _, _, v = self._project(x, None)  # v: (B, H, N, Dh)
        return self.proj_drop(self.proj(v.transpose(1, 2).reshape(x.shape)))

    for block in model.blocks:
        block.attn.forward = types.MethodType(forward, block.attn)
    return model


def build_candidates(config: str, sweep: bool, ceiling: bool, device: torch.device) -> list[Candidate]:
    """vit (or, for the sweep, one variant per attention path), the attention-free ceiling when
    asked, then timm; all with one set of weights."""
    reference = vit.create_model(config)
    models: dict[str, nn.Module] = {}
    if sweep:
        for impl in ATTENTION_PATHS:
            variant = vit.create_model(config, attn_impl=impl)
            variant.load_state_dict(reference.state_dict())
            models[f"vit[{impl}]"] = variant
    else:
        models["vit"] = reference
    if ceiling:
        bound = vit.create_model(config)
        bound.load_state_dict(reference.state_dict())
        models[CEILING_LABEL] = skip_attention_core(bound)
    models["timm"] = vit.to_timm(reference)
    candidates = []
    for label, model in models.items():
        model.to(device)
        candidates.append(Candidate(label, model, torch.optim.AdamW(model.parameters(), lr=1e-3)))
    return candidates


def num_tokens(model: nn.Module) -> int:
    return model.num_prefix_tokens + model.patch_embed.num_patches


def autocast(mode: str, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=mode == "bf16")


def auto_attention_path(model: nn.Module, batch_size: int, mode: str, phase: str, device: torch.device) -> str:
    """The path ``attn_impl='auto'`` takes for this model's queries in this mode and phase.

    Under bf16 autocast the qkv projection, hence q, is bf16; otherwise fp32. When training,
    autograd records q (the rule reads the phase from ``requires_grad``).
    """
    attn = model.blocks[0].attn
    dtype = torch.bfloat16 if mode == "bf16" else torch.float32
    q = torch.empty(batch_size, attn.num_heads, num_tokens(model), attn.head_dim, dtype=dtype, device=device,
                    requires_grad=phase == "train")
    return choose_attention_path(q)


def make_steps(x: torch.Tensor, y: torch.Tensor, mode: str, device: torch.device) -> dict[str, Step]:
    """The two phases, each a function of a candidate whose model is already in the right mode."""

    def train(c: Candidate) -> None:
        c.optimizer.zero_grad(set_to_none=True)
        with autocast(mode, device):
            loss = F.cross_entropy(c.model(x), y)
        loss.backward()
        c.optimizer.step()

    def infer(c: Candidate) -> None:
        with torch.inference_mode(), autocast(mode, device):
            c.model(x)

    return {"train": train, "infer": infer}


def check_same_logits(candidates: Sequence[Candidate], x: torch.Tensor) -> str:
    """Every vit candidate's fp32 eval logits must match timm's (the ceiling is exempt); returns a
    one-line report."""
    for c in candidates:
        c.model.eval()
    reports = []
    with torch.no_grad():
        expected = next(c for c in candidates if c.is_timm).model(x)
        for c in candidates:
            if c.is_timm or c.is_ceiling:
                continue
            diff = (c.model(x) - expected).abs().max().item()
            if not diff < LOGITS_TOLERANCE:
                raise AssertionError(f"{c.label} and timm disagree: max |logits diff| = {diff:.3g}")
            reports.append(f"max |logits({c.label}) - logits(timm)| = {diff:.1e}")
    return "; ".join(reports) + f" (fp32, eval, batch {len(x)}) < {LOGITS_TOLERANCE:g}: OK"


# -- measuring ------------------------------------------------------------------------------------


def time_alternating(
    candidates: Sequence[Candidate], step: Step, args: argparse.Namespace, device: torch.device
) -> Timing:
    """Warm every candidate up, then time them in turn, round after round (see the module doc)."""
    fastest = math.inf
    for c in candidates:
        for _ in range(max(args.warmup, 1)):
            start = time.perf_counter()
            step(c)
            synchronize(device)
        fastest = min(fastest, time.perf_counter() - start)
    steps = max(1, math.ceil(MIN_RUN_SECONDS / fastest))

    def is_clean(share: float | None) -> bool:
        return share is None or share <= args.max_background

    rounds: list[tuple[float | None, dict[str, float]]] = []
    clean = 0
    while clean < args.repeats and len(rounds) < 2 * args.repeats:
        if rounds and not is_clean(rounds[-1][0]):
            wait_until_quiet(args.max_background)
        before = cpu_counters()
        seconds = {}
        for c in candidates:
            start = time.perf_counter()
            for _ in range(steps):
                step(c)
            synchronize(device)
            seconds[c.label] = time.perf_counter() - start
        share = background_share(before, cpu_counters())
        rounds.append((share, seconds))
        clean += is_clean(share)
    if clean >= args.repeats:
        used = [r for r in rounds if is_clean(r[0])]
    else:  # the machine stayed busy: keep the least disturbed rounds, in their original order
        keep = sorted(range(len(rounds)), key=lambda i: rounds[i][0] or 0.0)[: args.repeats]
        used = [rounds[i] for i in sorted(keep)]
    return Timing(
        steps_per_run=steps,
        seconds={c.label: [r[1][c.label] for r in used] for c in candidates},
        background=[r[0] for r in used],
        discarded_rounds=len(rounds) - len(used),
    )


def print_top_operators(c: Candidate, step: Step, phase: str, steps: int, device: torch.device, top: int) -> None:
    """Profile ``steps`` steps of one candidate and print the ``top`` operators by self time.

    Shows where a phase spends its time: which kernels vit and timm share, and how much is left
    for the attention path to win or lose.
    """
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with kineto_quiet(), profile(activities=activities) as prof:
        for _ in range(steps):
            step(c)
        synchronize(device)
    averages = prof.key_averages()
    sort_by = "self_device_time_total" if on_cuda else "self_cpu_time_total"
    total_ms = sum(getattr(e, sort_by) for e in averages) / 1e3
    print(f"\n  profile: {phase} {c.label}, {steps} steps, {total_ms:.1f} ms of self time in all")
    print(averages.table(sort_by=sort_by, row_limit=top))


def _storage_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (views and aliases counted once)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
    return sum(storages.values())


def owned_bytes(c: Candidate, phase: str) -> int:
    """Parameters and buffers, plus the optimizer state when training."""
    tensors = [*c.model.parameters(), *c.model.buffers()]
    if phase == "train":
        tensors += [v for state in c.optimizer.state.values() for v in state.values() if torch.is_tensor(v)]
    return _storage_bytes(tensors)


def peak_memory(c: Candidate, step: Step, phase: str, device: torch.device) -> int:
    """Owned bytes at the start of a step + the largest allocation increase during it."""
    c.optimizer.zero_grad(set_to_none=True)
    with kineto_quiet():
        increase = allocation_increase(lambda: step(c), device)
    return owned_bytes(c, phase) + increase


def measure(
    config: str, candidates: Sequence[Candidate], mode: str, batch_size: int,
    args: argparse.Namespace, device: torch.device,
) -> list[Comparison]:
    """Time and size both phases of one (config, mode); compare each vit candidate with timm."""
    model = candidates[0].model
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, model.in_chans, *model.img_size, generator=generator).to(device)
    y = torch.randint(0, model.num_classes, (batch_size,), generator=generator).to(device)
    comparisons = []
    for phase, step in make_steps(x, y, mode, device).items():
        if phase not in args.phases:
            continue
        auto = auto_attention_path(model, batch_size, mode, phase, device)
        for c in candidates:
            c.model.train(phase == "train")
        timing = time_alternating(candidates, step, args, device)
        if args.profile:
            for c in candidates:
                print_top_operators(c, step, phase, timing.steps_per_run, device, args.profile)
        results = {
            c.label: Measurement(config, mode, phase, c.label, batch_size, timing.steps_per_run,
                                 timing.seconds[c.label], peak_memory(c, step, phase, device))
            for c in candidates
        }
        faster = None
        if all(f"vit[{p}]" in results for p in ATTENTION_PATHS):
            # fp32 has a memory target too: the fastest path among those within timm's peak memory.
            within = [p for p in ATTENTION_PATHS
                      if mode != "fp32" or results[f"vit[{p}]"].peak_bytes <= results["timm"].peak_bytes]
            speed = {p: results[f"vit[{p}]"].images_per_s for p in within or ATTENTION_PATHS}
            faster = max(speed, key=speed.get)
            # 'auto' within the margin of the fastest ties; outside timm's memory in fp32 it cannot.
            if faster != auto and auto in speed and speed[auto] >= speed[faster] * (1 - TIE_MARGIN):
                faster = "tie"
        shares = [s for s in timing.background if s is not None]
        background = statistics.median(shares) if shares else None
        comparisons += [
            Comparison(m, results["timm"], auto, faster, background, timing.discarded_rounds)
            for m in results.values() if m.label != "timm"
        ]
    return comparisons


# -- reporting ------------------------------------------------------------------------------------


def describe(config: str, model: nn.Module, batch_size: int) -> str:
    attn = model.blocks[0].attn
    h, w = model.img_size
    return (f"{config}: {h}x{w}x{model.in_chans}, patch {model.patch_size[0]}, {num_tokens(model)} tokens, "
            f"{len(model.blocks)} blocks, {attn.num_heads} heads x {attn.head_dim} dims, batch {batch_size}")


def print_table(comparisons: Sequence[Comparison]) -> None:
    print(f"  {'phase':<6}{'model':<15}{'vit img/s':>10}{'timm img/s':>11}  {'vit/timm (IQR)':<19}"
          f"{'vit MiB':>8}{'timm MiB':>9}{'vit/timm':>9}  {'others':>6}")
    for c in comparisons:
        q1, q3 = c.paired_ratio_iqr
        ratio = f"{c.speed_ratio:.2f} ({q1:.2f}-{q3:.2f})"
        load = "n/a" if c.background is None else f"{c.background:.0%}"
        if c.discarded_rounds:
            load += f" ({c.discarded_rounds} rounds redone)"
        print(f"  {c.vit.phase:<6}{c.vit.label:<15}{c.vit.images_per_s:>10.1f}{c.timm.images_per_s:>11.1f}  "
              f"{ratio:<19}{c.vit.peak_bytes / MiB:>8.1f}{c.timm.peak_bytes / MiB:>9.1f}{c.memory_ratio:>9.2f}"
              f"  {load:>6}")
    checked = {c.vit.phase: c for c in comparisons if c.faster_path is not None}
    for phase, c in checked.items():
        verdict = "OK" if c.faster_path in (c.auto_path, "tie") else "MISMATCH"
        print(f"  {phase}: measured faster path {c.faster_path}; 'auto' picks {c.auto_path}: {verdict}")


def _cell(ratio: float | None, width: int) -> str:
    """A right-aligned ratio, or '-' for a phase that was not measured."""
    return f"{ratio:>{width}.2f}" if ratio is not None else f"{'-':>{width}}"


def print_summary(comparisons: Sequence[Comparison], sweep: bool) -> None:
    print("\nSummary: vit/timm ratios (speed > 1: vit faster; memory < 1: vit smaller)")
    groups: dict[tuple[str, str], list[Comparison]] = {}
    ceiling: dict[tuple[str, str, str], float] = {}  # (config, mode, phase) -> the no-attention ratio
    for c in comparisons:
        if c.vit.label == CEILING_LABEL:
            ceiling[c.vit.config, c.vit.mode, c.vit.phase] = c.speed_ratio
        else:
            groups.setdefault((c.vit.config, c.vit.mode), []).append(c)
    if sweep:
        print(f"  {'config':<22}{'mode':<6}{'phase':<7}" + "".join(f"{p:>10}" for p in ATTENTION_PATHS)
              + (f"{'ceiling':>10}" if ceiling else "")
              + f"{'fastest':>10}{'auto':>10}   (fastest: in fp32 among paths within timm's peak memory)")
        for (config, mode), group in groups.items():
            for phase in dict.fromkeys(c.vit.phase for c in group):
                speed = {c.vit.label: c.speed_ratio for c in group if c.vit.phase == phase}
                c = next(c for c in group if c.vit.phase == phase)
                mark = "" if c.faster_path in (c.auto_path, "tie") else "  <- mismatch"
                print(f"  {config:<22}{mode:<6}{phase:<7}" + "".join(f"{speed[f'vit[{p}]']:>10.2f}" for p in ATTENTION_PATHS)
                      + (_cell(ceiling.get((config, mode, phase)), 10) if ceiling else "")
                      + f"{c.faster_path:>10}{c.auto_path:>10}{mark}")
        return
    print(f"  {'config':<22}{'mode':<6}{'attn':<15}{'train':>6}{'infer':>7}{'train mem':>10}{'infer mem':>10}"
          + (f"{'ceiling':>14}" if ceiling else "")
          + f"  targets: speed >= 0.95 (bf16 train: 3.0; vit_tiny 1.25); fp32 memory <= {FP32_MEMORY_TARGET:g}")
    for (config, mode), group in groups.items():
        by_phase = {c.vit.phase: c for c in group}
        misses = []
        for p, c in by_phase.items():
            target = speed_target(config, mode, p)
            if c.speed_ratio < target:
                bound = ceiling.get((config, mode, p))
                notes = ([f"within {TIE_MARGIN:.0%}"] if c.speed_ratio >= target * (1 - TIE_MARGIN) else []) + (
                    [f"ceiling {bound:.2f} < {target:g}: out of any attention path's reach"]
                    if bound is not None and bound < target else [])
                misses.append(f"{p} speed {c.speed_ratio:.2f} < {target:g}" + (f" ({'; '.join(notes)})" if notes else ""))
        if mode == "fp32":
            misses += [f"{p} memory {c.memory_ratio:.2f} > {FP32_MEMORY_TARGET:g}"
                       for p, c in by_phase.items() if c.memory_ratio > FP32_MEMORY_TARGET]
        paths = list(dict.fromkeys(c.auto_path for c in by_phase.values()))
        train, infer = by_phase.get("train"), by_phase.get("infer")
        bounds = (_cell(ceiling.get((config, mode, "train")), 7) + _cell(ceiling.get((config, mode, "infer")), 7)
                  if ceiling else "")
        print(f"  {config:<22}{mode:<6}{'/'.join(paths):<15}"
              f"{_cell(train and train.speed_ratio, 6)}{_cell(infer and infer.speed_ratio, 7)}"
              f"{_cell(train and train.memory_ratio, 10)}{_cell(infer and infer.memory_ratio, 10)}{bounds}  "
              f"{'met' if not misses else 'missed: ' + ', '.join(misses)}")


# -- main -----------------------------------------------------------------------------------------


def default_batch_size(model: nn.Module) -> int:
    return LARGE_MODEL_BATCH if max(model.img_size) >= 224 else SMALL_MODEL_BATCH


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), metavar="NAME",
                        help="registered vit model names (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help=f"images per step (default: {SMALL_MODEL_BATCH}; {LARGE_MODEL_BATCH} for 224px models)")
    parser.add_argument("--repeats", type=int, default=7, help="timed rounds, alternating models (default: 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model first (default: 2)")
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES),
                        help="fp32 and/or bf16 autocast (default: both)")
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES),
                        help="train and/or infer (default: both, training first); 'infer' alone "
                             "times inference in a process that never trains (see 'C allocator')")
    parser.add_argument("--threads", type=int, default=None,
                        help="call torch.set_num_threads(THREADS) first (default: leave torch's own "
                             "setting, as in a user's process)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--max-background", type=float, default=0.1, metavar="SHARE",
                        help="redo a round in which other processes used more than this share of the "
                             "machine's CPU time (Linux; default: %(default)s; 1 disables)")
    parser.add_argument("--attn-impl-sweep", action="store_true",
                        help="time vit with attn_impl='fused' and 'explicit' next to timm and check "
                             "that 'auto' picks the faster path")
    parser.add_argument("--attention-ceiling", action="store_true",
                        help=f"also time {CEILING_LABEL!r}, vit with the attention core skipped: the most any "
                             "attention path could gain")
    parser.add_argument("--json", metavar="OUT", help="also write every measurement to this JSON file")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after timing each phase, profile one timed run of every model and print "
                             "its N most expensive operators (torch.profiler, self time)")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0 or (args.batch_size is not None and args.batch_size < 1):
        parser.error("--repeats and --batch-size must be >= 1, --warmup >= 0")
    if args.profile < 0:
        parser.error(f"--profile N must be >= 0, got {args.profile}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    return args


def main(argv: Sequence[str] | None = None) -> list[Comparison]:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    how = f"torch.set_num_threads({threads})" if args.threads else f"{threads} (torch's default, not set)"
    torch.manual_seed(0)
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    print(f"torch {torch.__version__}, timm {timm.__version__}; device {device.type} ({hardware}); "
          f"threads {how}, {available_cores()} cores available")
    if "train" not in args.phases:
        print("Phases: inference only; this process never trains (glibc's heap as a prediction script has it).")
    memory_source = ("torch.cuda.max_memory_allocated" if device.type == "cuda"
                     else "torch.profiler CPU allocator events")
    print(f"Timing: {max(args.warmup, 1)} warm-up step(s) per model, then {args.repeats} rounds "
          f"vit, timm, vit, timm...; images/s of the median run; rounds where other processes used "
          f"> {args.max_background:.0%} of the CPU are redone ('others' = their median share).\n"
          f"Peak memory: parameters + buffers (+ AdamW state when training) + the largest allocation "
          f"increase during one step ({memory_source}); the input batch is not counted.")

    started, start_counters = time.perf_counter(), cpu_counters()
    comparisons: list[Comparison] = []
    for config in args.models:
        candidates = build_candidates(config, args.attn_impl_sweep, args.attention_ceiling, device)
        model = candidates[0].model
        batch_size = args.batch_size or default_batch_size(model)
        timm_path = "fused" if getattr(candidates[-1].model.blocks[0].attn, "fused_attn", False) else "explicit"
        print(f"\n== {describe(config, model, batch_size)}; timm attention: {timm_path}")
        check_x = torch.randn(8, model.in_chans, *model.img_size, device=device)
        print(f"  check: {check_same_logits(candidates, check_x)}")
        for mode in args.modes:
            results = measure(config, candidates, mode, batch_size, args, device)
            paths = {c.vit.phase: c.auto_path for c in results}
            shown = next(iter(paths.values())) if len(set(paths.values())) == 1 else ", ".join(f"{p} {a}" for p, a in paths.items())
            print(f"\n  [{mode}] 'auto' attention path: {shown}")
            print_table(results)
            comparisons += results

    print_summary(comparisons, args.attn_impl_sweep)
    background = background_share(start_counters, cpu_counters())
    if background is not None:
        print(f"\nOther processes used {background:.0%} of the machine's CPU time during the whole run.")
    print(f"Total time {time.perf_counter() - started:.0f} s.")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"torch": torch.__version__, "timm": timm.__version__, "device": device.type,
                       "threads": threads, "args": vars(args), "background_share": background,
                       "comparisons": [c.as_dict() for c in comparisons]}, f, indent=2)
        print(f"Wrote {args.json}")
    return comparisons


if __name__ == "__main__":
    main()
