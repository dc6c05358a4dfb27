"""Probe (issue 16): CUDA-graph latency when every call brings other grids (position embeddings and cu_seqlens rebuilt
on each call) vs the same grids each call. Run from the repo root on a GPU: python3 benchmarks/probe_graph_new_grids.py
[--profile: also cProfile 200 new-grid calls of 1 x 256]"""

import statistics
import sys

import torch

sys.path.insert(0, "benchmarks")
import bench  # noqa: E402

pv = bench.packed_vit
fields = bench.TOWERS["siglip2_so400m"].fields
with torch.device("cuda"):
    model = pv.Siglip2PackingVisionModel(pv.Siglip2PackingVisionConfig(**fields)).bfloat16().eval()
model.enable_cuda_graphs()
for images in (1, 4):
    grids = [torch.tensor([[1, 16, 16]] * images), torch.tensor([[1, 8, 32]] * images)]  # one bucket, two layouts
    x = torch.randn(images * 256, 768, device="cuda").bfloat16()
    calls = iter(range(10**6))
    alternating = torch.no_grad()(lambda: model(x, grids[next(calls) % 2]))
    new_grids = statistics.median(bench.time_ms(alternating, 30, 4, torch.device("cuda")))
    same = statistics.median(bench.time_ms(torch.no_grad()(lambda: model(x, grids[0])), 30, 3, torch.device("cuda")))
    print(f"{images} x 256 with graphs: same grids each call {same:.3f} ms, new grids each call {new_grids:.3f} ms")

if "--profile" in sys.argv:  # where the host time of a new-grids call goes (cProfile, 200 calls, 1 x 256)
    import cProfile
    import pstats

    grids = [torch.tensor([[1, 16, 16]]), torch.tensor([[1, 8, 32]])]
    x = torch.randn(256, 768, device="cuda").bfloat16()
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
