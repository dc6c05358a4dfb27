"""Probe (issue 16): CUDA-graph latency when calls bring other grids vs the same grids each call, against the GPU
kernel time of the eager forward. Run from the repo root on a GPU:
    python3 benchmarks/probes/graph_new_grids.py [--host: host us per step of a call, 1 x 256]
        [--profile: also cProfile 200 new-grid calls of 1 x 256]

Per batch size, median ms of 30 calls: the same grids each call; other grids each call (two layouts of one bucket,
alternating: frame shapes seen before); unseen frame shapes each call (the kept position rows dropped before every
call, so they are computed); and the profiler's kernel time of the eager forward (the goal: <= 1.3x of it).
"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench.py
import bench  # noqa: E402

DEVICE = torch.device("cuda")
model = bench.so400m_on_cuda().enable_cuda_graphs()
print("images x patches | same grids ms | other grids ms | unseen shapes ms | kernel ms | ratios to kernel")
for images, side in ((1, 16), (4, 16), (16, 16), (1, 32), (4, 32)):
    grids = [torch.tensor([[1, side, side]] * images), torch.tensor([[1, side // 2, side * 2]] * images)]
    x = torch.randn(images * side * side, 768, device=DEVICE, dtype=torch.bfloat16)
    calls = iter(range(10**6))

    def other_grids():
        return model(x, grids[next(calls) % 2])

    def unseen_shapes():
        getattr(model.cuda_graphs, "shape_positions", {}).clear()  # (code before the kept rows has none)
        return other_grids()

    with torch.no_grad():
        same = statistics.median(bench.time_ms(lambda: model(x, grids[0]), 30, 3, DEVICE))
        other = statistics.median(bench.time_ms(other_grids, 30, 4, DEVICE))
        unseen = statistics.median(bench.time_ms(unseen_shapes, 30, 4, DEVICE))
        model.cuda_graphs, graphs = None, model.cuda_graphs
        kernel = bench.gpu_kernel_ms(lambda: model(x, grids[0]), 10, DEVICE)
        model.cuda_graphs = graphs
    ratios = " / ".join(f"{ms / kernel:.2f}" for ms in (same, other, unseen))
    print(f"{images} x {side * side} | {same:.3f} | {other:.3f} | {unseen:.3f} | {kernel:.3f} | {ratios}")

if "--host" in sys.argv:  # host microseconds per call of each step, 1 x 256, no profiler: timed wrappers
    import collections
    import inspect
    import time

    from packed_vit.modeling import cuda_graphs, packed_model

    spent = collections.Counter()

    def timed(name, fn):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return wrapper

    steps = {
        (packed_model, "check_packed_batch"), (cuda_graphs, "_slots_unchanged"), (torch.cuda.CUDAGraph, "replay"),
        (cuda_graphs.CudaGraphRunner, "forward"), (cuda_graphs.CudaGraphRunner, "_frame_positions"),
        (cuda_graphs.CudaGraphRunner, "_captured"), (cuda_graphs.Layout, "of"),
        (packed_model.PackedVisionPreTrainedModel, "attention_backend"), (packed_model, "BaseModelOutputWithPooling"),
    }  # fmt: skip
    for owner, name in steps:
        if hasattr(owner, name):
            attribute = inspect.getattr_static(owner, name)
            if isinstance(attribute, classmethod):
                setattr(owner, name, classmethod(timed(name, attribute.__func__)))
            else:
                setattr(owner, name, timed(name, attribute))
    grids = [torch.tensor([[1, 16, 16]]), torch.tensor([[1, 8, 32]])]
    x = torch.randn(256, 768, device=DEVICE).bfloat16()
    kept = model.cuda_graphs.shape_positions
    for label, grid_of, clear in (("same grids", lambda i: grids[0], False), ("other grids", lambda i: grids[i % 2], False),
                                  ("unseen shapes", lambda i: grids[i % 2], True)):  # fmt: skip
        with torch.no_grad():
            for i in range(10):
                model(x, grid_of(i))
            torch.cuda.synchronize()
            spent.clear()
            total = 0.0
            for i in range(200):
                if clear:
                    kept.clear()
                start = time.perf_counter()
                model(x, grid_of(i))
                total += time.perf_counter() - start
                torch.cuda.synchronize()
        steps_us = ", ".join(f"{name} {seconds / 200 * 1e6:.0f}" for name, seconds in spent.most_common())
        print(f"host us per call, {label}: whole forward {total / 200 * 1e6:.0f}; {steps_us}")

if "--profile" in sys.argv:  # where the host time of an other-grids call goes (cProfile, 200 calls, 1 x 256)
    import cProfile
    import pstats

    grids = [torch.tensor([[1, 16, 16]]), torch.tensor([[1, 8, 32]])]
    x = torch.randn(256, 768, device=DEVICE).bfloat16()
    with torch.no_grad():
        for i in range(10):
            model(x, grids[i % 2])
        torch.cuda.synchronize()
        profile = cProfile.Profile()
        profile.enable()
        for i in range(200):
            model(x, grids[i % 2])
        profile.disable()
        torch.cuda.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(40)
