"""What every benchmark here measures with: CUDA-event timing, peak memory, host syncs, GPU kernel time.

Shared by bench.py, bench_vlm.py and probes/. Method (bench.py's docstring says more): warm-up calls first, then
CUDA events around each call on the GPU, the host clock on the CPU; the caller takes the median.
"""

from __future__ import annotations

import gc
import importlib.util
import platform
import sys
import time
from pathlib import Path
from typing import Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


def import_packed_vit():
    """The installed `packed_vit`, or, where it is not installed, the one of this checkout, mapped as setup.py does."""
    try:
        import packed_vit
    except ImportError:
        # `packed_vit.modeling` etc. live at the checkout's top level: searching ROOT for submodules finds them.
        spec = importlib.util.spec_from_file_location(
            "packed_vit",
            ROOT / "src" / "packed_vit" / "__init__.py",
            submodule_search_locations=[str(ROOT / "src" / "packed_vit"), str(ROOT)],
        )
        packed_vit = importlib.util.module_from_spec(spec)
        sys.modules["packed_vit"] = packed_vit
        spec.loader.exec_module(packed_vit)
    return packed_vit


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def time_ms(run: Callable[[], object], repeats: int, warmup: int, device: torch.device) -> list[float]:
    """Milliseconds of `repeats` calls after `warmup` calls: CUDA events on the GPU, the host clock on the CPU."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            run()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            start_s = time.perf_counter()
            run()
            times.append((time.perf_counter() - start_s) * 1e3)
    return times


def peak_memory_gib(run: Callable[[], object], resident_bytes: int, device: torch.device) -> float | None:
    """GiB one side needs alone: `resident_bytes` (its weights and inputs) + the most one call allocates on top."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    run()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before + resident_bytes) / GIB


def unless_out_of_memory(measure: Callable[[], object]):
    """`measure()`, or None when the GPU runs out of memory, with that memory given back."""
    try:
        return measure()
    except torch.cuda.OutOfMemoryError:
        pass  # leaving the except block drops the traceback, and with it the frames holding the tensors
    gc.collect()
    torch.cuda.empty_cache()
    return None


def host_sync_check(run: Callable[[], object], device: torch.device) -> tuple[bool | None, str]:
    """(passed, detail): one call of `run` under `torch.cuda.set_sync_debug_mode("error")`, which raises on any
    synchronizing CUDA call (a `.item()`, a blocking copy, ...). None on the CPU, where there is nothing to check."""
    if device.type != "cuda":
        return None, "not checked: no CUDA device"
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run()
    except RuntimeError as error:
        if "synchroniz" not in str(error):  # a failure of another kind is a bug to see, not a sync
            raise
        return False, str(error).strip().splitlines()[0]
    finally:
        torch.cuda.set_sync_debug_mode(0)
    torch.cuda.synchronize()
    return True, "no synchronizing CUDA call"


def gpu_kernel_ms(run: Callable[[], object], repeats: int, device: torch.device) -> float | None:
    """Milliseconds the GPU spends in kernels (and copies) per call, from the profiler: the floor a call's latency
    could reach if nothing waited for the host. None on the CPU."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    run()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as profiler:
        for _ in range(repeats):
            run()
        torch.cuda.synchronize()
    # self time: each kernel counted once, under the op that launched it
    self_us = sum(getattr(e, "self_device_time_total", 0) or 0 for e in profiler.key_averages())
    return self_us / 1e3 / repeats
