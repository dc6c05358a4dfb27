"""Probe (issue 16): where the GPU time of a small so400m batch goes, and what the candidate fusions would save.

Run from the repo root on a GPU: python3 benchmarks/probes/small_batch_kernels.py [--host]
1. Kernel time by kind (profiler, our forward with the graphs' settings: fused add + norm at every size) for
   1 x 256, 4 x 256 and 1 x 1024 patches.
2. One layer's ops alone at 256, 1024 and 4096 tokens, each replayed in a CUDA graph of 20 calls (no launch cost):
   q, k, v as three GEMMs vs one GEMM on the concatenated weight (with and without the concatenation in the graph),
   the output projection, fc1 + GELU epilogue, fc2, varlen attention over 256-token segments, fused add + norm.
3. --host: host microseconds of the small steps of a graph call (H2D copies of metadata, ...).
"""

import collections
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench.py
import bench  # noqa: E402

pv = bench.packed_vit
from packed_vit.modeling.fused_norm import fused_add_norm, fused_add_norm_from  # noqa: E402

DEVICE = torch.device("cuda")
model = bench.so400m_on_cuda()
fields = bench.TOWERS["siglip2_so400m"].fields
D, I, H = fields["hidden_size"], fields["intermediate_size"], fields["num_attention_heads"]


def kind_of(name: str) -> str:
    lowered = name.lower()
    if "flash" in lowered or "fmha" in lowered or "attn" in lowered:
        return "attention"
    if any(k in lowered for k in ("gemm", "nvjet", "xmma", "cutlass", "sm90", "splitk", "matmul")):
        return "gemm"
    if "add_norm" in lowered:
        return "fused add+norm (triton)"
    if "layer_norm" in lowered or "layernorm" in lowered:
        return "layernorm"
    if "memcpy" in lowered or "copy" in lowered:
        return "copies"
    return "other elementwise"


print("== 1. kernel time by kind, our forward with fused add + norm at every size (ms per forward) ==")
from torch.profiler import ProfilerActivity, profile  # noqa: E402

for images, side in ((1, 16), (4, 16), (1, 32)):
    grid = torch.tensor([[1, side, side]] * images)
    x = torch.randn(images * side * side, 768, device=DEVICE, dtype=torch.bfloat16)
    with torch.no_grad(), fused_add_norm_from(0):
        for _ in range(3):
            model(x, grid)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                model(x, grid)
            torch.cuda.synchronize()
    by_kind, by_name, count = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            by_kind[kind_of(event.name)] += event.device_time / 1e3 / 5
            by_name[event.name[:90]] += event.device_time / 1e3 / 5
            count[kind_of(event.name)] += 1 / 5
    total = sum(by_kind.values())
    print(f"-- {images} x {side * side}: {total:.3f} ms in {sum(count.values()):.0f} kernels")
    for kind, ms in by_kind.most_common():
        print(f"   {kind:28s} {ms:7.3f} ms  {count[kind]:5.0f} kernels")
    for name, ms in by_name.most_common(12):
        print(f"     {ms:7.3f} ms  {name}")


def graph_us(fn, calls=20, replays=15) -> float:
    """Microseconds per call of `fn`, `calls` of it replayed in one CUDA graph (median of `replays`)."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / calls)
    return statistics.median(times)


print("\n== 2. one layer's ops, us per call replayed in a graph (TFLOP/s where a GEMM) ==")
layer = model.encoder.layers[0]
attn, mlp = layer.self_attn, layer.mlp
qkv_weight = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight])  # [3D, D]
qkv_bias = torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias])
varlen = bench.packed_vit.modeling.attention._torch_varlen_attn()
with torch.no_grad():
    for tokens in (256, 1024, 4096):
        x = torch.randn(tokens, D, device=DEVICE, dtype=torch.bfloat16)
        h = torch.randn(tokens, I, device=DEVICE, dtype=torch.bfloat16)
        q = torch.randn(tokens, H, D // H, device=DEVICE, dtype=torch.bfloat16)
        cu = torch.arange(0, tokens + 1, 256, device=DEVICE, dtype=torch.int32)
        tflops = lambda us, flop: f"{flop / us / 1e6:6.1f}"  # noqa: E731
        rows = {
            "q,k,v: three GEMMs": (lambda: (attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)), 3 * 2 * tokens * D * D),
            "qkv: one GEMM, weights pre-concatenated": (lambda: F.linear(x, qkv_weight, qkv_bias), 6 * tokens * D * D),
            "qkv: concatenate weights + one GEMM": (
                lambda: F.linear(
                    x,
                    torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
                    torch.cat([attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]),
                ),
                6 * tokens * D * D,
            ),
            "out_proj": (lambda: attn.out_proj(x), 2 * tokens * D * D),
            "fc1 + GELU epilogue": (
                lambda: torch._addmm_activation(mlp.fc1.bias, x, mlp.fc1.weight.t(), use_gelu=True),
                2 * tokens * D * I,
            ),
            "fc2": (lambda: mlp.fc2(h), 2 * tokens * D * I),
            "varlen attention, 256-token segments": (lambda: varlen(q, q, q, cu, cu, 256, 256), None),
            "fused add + LayerNorm": (
                lambda: fused_add_norm(x, x, layer.layer_norm2.weight, layer.layer_norm2.bias, 1e-6, False),
                None,
            ),
        }
        print(f"-- {tokens} tokens")
        for name, (fn, flop) in rows.items():
            us = graph_us(fn)
            print(f"   {name:42s} {us:8.2f} us" + (f"  {tflops(us, flop)} TFLOP/s" if flop else ""))

if "--host" in sys.argv:
    print("\n== 3. host us per step (median of 200) ==")

    def host_us(fn, n=200) -> float:
        times = []
        for _ in range(n):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e6)
        torch.cuda.synchronize()
        return statistics.median(times)

    small = torch.arange(5, dtype=torch.int32)
    pinned = small.pin_memory()
    target = torch.zeros(5, dtype=torch.int32, device=DEVICE)
    busy = torch.randn(4096, 4096, device=DEVICE, dtype=torch.bfloat16)
    steps = {
        "pageable H2D .to(non_blocking) (idle GPU)": lambda: small.to(DEVICE, non_blocking=True),
        "pinned H2D .to(non_blocking)": lambda: pinned.to(DEVICE, non_blocking=True),
        "pageable copy_ into a device tensor": lambda: target.copy_(small, non_blocking=True),
        "torch.arange on the device": lambda: torch.arange(5, device=DEVICE, dtype=torch.int32),
        "a small device add": lambda: target + 1,
    }
    for name, fn in steps.items():
        print(f"   {name:46s} {host_us(fn):7.1f} us")
    for _ in range(20):
        busy @ busy  # keep the GPU busy: do pageable copies wait?
    print(f"   {'pageable H2D while the GPU is busy':46s} {host_us(lambda: small.to(DEVICE, non_blocking=True), 20):7.1f} us")
    torch.cuda.synchronize()
    model.enable_cuda_graphs()
    for images in (1, 4):
        grid = torch.tensor([[1, 16, 16]] * images)
        x = torch.randn(images * 256, 768, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            for _ in range(3):
                model(x, grid)
            torch.cuda.synchronize()
            print(f"   {images} x 256: pack_inputs {host_us(lambda: pv.modeling.packing.pack_inputs(x, grid, 768)):7.1f} us, "
                  f"whole graph call (host) {host_us(lambda: model(x, grid), 50):7.1f} us")  # fmt: skip
