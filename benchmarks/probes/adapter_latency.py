"""Probe (issue 27): what a LoRA adapter costs a small inference batch on CUDA, eager and with CUDA graphs, and the
host time of the graphs' per-call adapter-state check. Run from the repo root on a GPU:
    python3 benchmarks/probes/adapter_latency.py

so400m bf16, LoRA r=16 on every linear layer (PEFT "all-linear", 166 layers), random adapter weights. Per batch,
median ms of 30 calls: the plain tower, the tower with the adapter (unmerged), and merged (`merge_and_unload`: plain
modules again), each eager and with graphs.
"""

import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: bench.py
import bench  # noqa: E402

from packed_vit.modeling import cuda_graphs  # noqa: E402

DEVICE = torch.device("cuda")
plain = bench.so400m_on_cuda()
adapted = get_peft_model(copy.deepcopy(plain), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
with torch.no_grad():
    for name, parameter in adapted.named_parameters():
        if "lora_B" in name:
            parameter.normal_(std=0.02)
merged = copy.deepcopy(adapted).merge_and_unload()
models = {"plain": plain, "lora": adapted, "lora merged": merged}


def tower(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


print("images x patches | " + " | ".join(f"{name} eager ms | {name} graphs ms" for name in models))
for images, side in ((1, 16), (4, 16), (16, 16), (1, 32), (4, 32)):
    grid_thw = torch.tensor([[1, side, side]] * images)
    x = torch.randn(images * side * side, 768, device=DEVICE, dtype=torch.bfloat16)
    row = []
    with torch.no_grad():
        for name, model in models.items():
            tower(model).disable_cuda_graphs()
            row.append(statistics.median(bench.time_ms(lambda: model(x, grid_thw), 30, 3, DEVICE)))
            tower(model).enable_cuda_graphs()
            row.append(statistics.median(bench.time_ms(lambda: model(x, grid_thw), 30, 3, DEVICE)))
    print(f"{images} x {side * side} | " + " | ".join(f"{ms:.3f}" for ms in row))

layers = cuda_graphs._adapter_layers(tower(adapted))
start = time.perf_counter()
for _ in range(1000):
    cuda_graphs._adapters_state(layers)
print(f"adapter-state check per call, {len(layers)} LoRA layers: {(time.perf_counter() - start) * 1e3:.1f} us")
