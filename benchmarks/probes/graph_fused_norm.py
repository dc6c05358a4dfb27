"""Probe (issue 16): CUDA-graph latency of the so400m latency rows with the fused add + norm at every size (0) vs from
8192 tokens (the eager threshold). Run from the repo root on a GPU: python3 benchmarks/probes/graph_fused_norm.py"""

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench.py
import bench  # noqa: E402

model = bench.so400m_on_cuda()
g = torch.Generator().manual_seed(0)
for images, side in ((1, 16), (4, 16), (16, 16), (1, 32), (4, 32), (16, 32)):
    grid = torch.tensor([[1, side, side]] * images)
    x = torch.randn(images * side * side, 768, generator=g).cuda().bfloat16()
    line = f"{images} x {side * side}:"
    for min_tokens in (0, 8192):
        model.enable_cuda_graphs()
        model.cuda_graphs.fused_add_norm_min_tokens = min_tokens
        run = torch.no_grad()(lambda: model(x, grid))
        call = statistics.median(bench.time_ms(run, 30, 3, torch.device("cuda")))
        graph = next(iter(model.cuda_graphs.graphs.values())).graph
        replay = statistics.median(bench.time_ms(graph.replay, 30, 3, torch.device("cuda")))
        line += f" fused from {min_tokens}: call {call:.3f} ms, replay {replay:.3f} ms;"
    print(line, flush=True)
