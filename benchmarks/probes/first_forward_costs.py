"""GPU: what does a fresh process's first packed forward pay beyond the forward itself, and how much of it can be
paid before the weights are loaded (on dummy tensors: CUDA context, cuBLAS, the Triton add + norm, varlen
attention)? One fresh process per order; seconds per step. Issue 23's start-up goal.

    python3 benchmarks/probes/first_forward_costs.py CHECKPOINT [MAX_NUM_PATCHES]
"""

import subprocess
import sys

STEPS = r"""
import sys, time
t0 = time.perf_counter()
import torch
from packed_vit.encode.job import load_config_and_processor, load_model
from packed_vit.encode.pipeline import warm_up_grids
from packed_vit.modeling.fused_norm import fused_add_norm
from packed_vit.modeling.packing import Segments
from packed_vit.modeling.attention import varlen_attention
checkpoint, prewarm = sys.argv[1], sys.argv[2] == "1"
times = {"imports": time.perf_counter() - t0}

def step(name, fn):
    start = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    times[name] = time.perf_counter() - start

_, processor = load_config_and_processor(checkpoint)
step("cuda context", lambda: torch.zeros(1, device="cuda"))
if prewarm:
    x = torch.randn(16384, 1152, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4304, 1152, device="cuda", dtype=torch.bfloat16)
    step("dummy matmuls (cuBLAS)", lambda: [torch.nn.functional.linear(x, w), torch.nn.functional.linear(x, w[:1152])])
    n = torch.ones(1152, device="cuda", dtype=torch.bfloat16)
    step("dummy fused add + norm (Triton)", lambda: fused_add_norm(x, x, n, n, 1e-6, False))
    q = torch.randn(16384, 16, 72, device="cuda", dtype=torch.bfloat16)
    segments = Segments(torch.full((64,), 256), torch.device("cuda"))
    step("dummy varlen attention", lambda: varlen_attention(q, q, q, segments, segments, 72**-0.5, "varlen_attn"))
model = None
def load():
    global model
    model = load_model(checkpoint, device="cuda", dtype=torch.bfloat16)
step("model load", load)
grids = warm_up_grids(processor, 16384)
patches = torch.zeros(sum(h * w for _, h, w in grids), 3 * 16 * 16, device="cuda", dtype=torch.bfloat16)
with torch.no_grad():
    for i in range(3):
        step(f"forward {i + 1}", lambda: model(patches, torch.tensor(grids)))
print({k: round(v, 3) for k, v in times.items()})
"""

if __name__ == "__main__":
    for prewarm in ("0", "1"):
        run = subprocess.run([sys.executable, "-c", STEPS, sys.argv[1], prewarm], capture_output=True, text=True)
        print(f"prewarm={prewarm}:", run.stdout.strip() or run.stderr[-2000:])
