"""Measuring a model: forward FLOPs, inference speed and peak memory.

One home for these numbers so that training's ``results.json``, the benchmarks and the tests
count the same way. Nothing here knows about training or data: a function takes a model and
a batch of images, or a device.
"""
from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

MiB = 2**20


def _sdpa_flops(query_shape: torch.Size, key_shape: torch.Size, value_shape: torch.Size, *args: Any,
                **kwargs: Any) -> int:
    """FLOPs of attention on q (B, H, N, Dh), k (B, H, M, Dh), v (B, H, M, Dv): the two matmuls,
    ``q k^T`` and the weighted sum of v, counted as torch counts its CUDA attention kernels."""
    batch, heads, queries, head_dim = query_shape
    keys, value_dim = key_shape[-2], value_shape[-1]
    return 2 * batch * heads * queries * keys * (head_dim + value_dim)


# torch's FlopCounterMode has no formula for the CPU's fused attention kernel and would count it as
# zero, which would drop attention from the count whenever the fused path runs on a CPU.
_CPU_ATTENTION_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_forward_flops(model: torch.nn.Module, images: torch.Tensor) -> int:
    """FLOPs of one forward pass over ``images`` (B, C, H, W), attention included on the fused and
    explicit paths. A multiply-add counts as two FLOPs, as torch's counter does."""
    with FlopCounterMode(display=False, custom_mapping=_CPU_ATTENTION_FLOPS) as counter:
        model(images)
    return int(counter.get_total_flops())


def inference_images_per_s(model: torch.nn.Module, images: torch.Tensor, repeats: int = 3) -> float:
    """Images per second of ``model(images)`` for a batch ``(B, C, H, W)``: the median of
    ``repeats`` timed forwards after one untimed warm-up (the first call pays for lazy setup).
    Call it in eval and inference mode; it does not change the model's mode."""
    model(images)  # warm-up
    if images.device.type == "cuda":
        torch.cuda.synchronize(images.device)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        model(images)
        if images.device.type == "cuda":  # kernels run asynchronously: wait for them to finish
            torch.cuda.synchronize(images.device)
        times.append(time.perf_counter() - started)
    return len(images) / sorted(times)[len(times) // 2]


def measure_model(model: torch.nn.Module, images: torch.Tensor, repeats: int = 3) -> dict[str, Any]:
    """``flops_per_image`` (:func:`count_forward_flops` of the first image),
    ``inference_images_per_s`` (:func:`inference_images_per_s` of the whole batch) and the
    ``peak_memory_mb`` since the last :func:`reset_peak_memory`, for a batch ``(B, C, H, W)``
    already on the model's device. The model is measured in eval mode and left in the mode it had."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            flops = count_forward_flops(model, images[:1])
            speed = inference_images_per_s(model, images, repeats)
    finally:
        model.train(was_training)
    return {
        "flops_per_image": flops,
        "inference_images_per_s": round(speed, 1),
        "peak_memory_mb": round(peak_memory_mb(images.device), 1),
    }


_PROC_SELF = Path("/proc/self")


def reset_peak_memory(device: torch.device) -> bool:
    """Start counting the peak memory afresh, so that jobs sharing one process (the runs of a
    Hydra ``-m`` sweep) each report their own peak rather than the largest so far.

    Returns whether the count restarted. On the CPU that needs Linux, and a kernel that honours
    ``/proc/self/clear_refs`` (some sandboxes accept the write and ignore it): the result is read
    back rather than assumed. Where it is False, :func:`peak_memory_mb` counts from the start of
    the process.
    """
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return True
    try:  # Linux: writing 5 to clear_refs resets the peak resident size (VmHWM) to the current one
        (_PROC_SELF / "clear_refs").write_text("5")
        status = _proc_status_mib()
    except OSError:
        return False
    # Just after a reset the peak is the current size; a peak far above it means the write was ignored.
    return "VmHWM" in status and "VmRSS" in status and status["VmHWM"] - status["VmRSS"] < 8


def _proc_status_mib() -> dict[str, float]:
    """The memory sizes of /proc/self/status (reported in kB), in MiB."""
    sizes = {}
    for line in (_PROC_SELF / "status").read_text().splitlines():
        key, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            sizes[key] = int(value.split()[0]) * 1024 / MiB
    return sizes


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory in MiB since :func:`reset_peak_memory`: allocated CUDA memory on a GPU, the
    process's peak resident memory on the CPU (from its start where the OS cannot reset the count)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MiB
    try:
        status = _proc_status_mib()
        if "VmHWM" in status:
            return status["VmHWM"]
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MiB if sys.platform == "darwin" else peak * 1024 / MiB  # bytes on macOS, KiB elsewhere


def allocation_increase(fn: Callable[[], Any], device: torch.device) -> int:
    """Largest increase, in bytes, of the memory torch's allocator holds while ``fn()`` runs.

    What one step adds on top of what already exists (activations, tensors saved for backward,
    gradients, temporaries), the same quantity on both devices: from the CUDA allocator's peak,
    and on the CPU, where torch keeps no statistics, from the allocation and free events that
    ``torch.profiler`` records, summed in order. Memory that bypasses torch's allocator (BLAS or
    oneDNN buffers) is not seen.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == _EventType.Allocation and event.extra_fields.device.type == "cpu":
            events.append((event.start_time_ns, event.extra_fields.alloc_size))
    held = peak = 0
    for _, size in sorted(events):  # a free has a negative size
        held += size
        peak = max(peak, held)
    return peak
