"""GPU: what the CUDA context's making costs in the encode job's conditions. In a fresh process per variant: the
driver's initialization (`torch.cuda.device_count()` + `is_available()`, as `ranks.device_of_rank`), then optionally
14 DataLoader workers forked (as the job forks them before its first CUDA call), then the context (the first CUDA
tensor) and nvJPEG's first decode, each timed; CUDA_DEVICE_MAX_CONNECTIONS unset (8) or 32 (the job's).

    python3 benchmarks/probes/context_cost.py [ROUNDS]
"""

import json
import os
import subprocess
import sys

CHILD = r"""
import io, json, os, sys, time
import torch, torch.utils.data, torchvision.io
from packed_vit.encode.jpeg_decoders import tiny_jpeg  # imported before the clocks start (session 16's run had not)
start = time.perf_counter()
torch.cuda.device_count(); torch.cuda.is_available()
driver = time.perf_counter()
workers = int(sys.argv[1])
if workers:
    batches = iter(torch.utils.data.DataLoader(range(10**6), batch_size=None, num_workers=workers, prefetch_factor=2))
forked = time.perf_counter()
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
context = time.perf_counter()
torchvision.io.decode_jpeg(torch.frombuffer(bytearray(tiny_jpeg()), dtype=torch.uint8), device="cuda")
torch.cuda.synchronize()
nvjpeg = time.perf_counter()
print(json.dumps({"driver_s": round(driver - start, 3), "fork_s": round(forked - driver, 3),
                  "context_s": round(context - forked, 3), "nvjpeg_s": round(nvjpeg - context, 3)}))
os._exit(0)
"""

if __name__ == "__main__":
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 2
    for _ in range(rounds):
        for connections in ("unset", "32"):
            for workers in (0, 14):
                env = dict(os.environ)
                env.pop("CUDA_DEVICE_MAX_CONNECTIONS", None)
                if connections != "unset":
                    env["CUDA_DEVICE_MAX_CONNECTIONS"] = connections
                run = subprocess.run([sys.executable, "-c", CHILD, str(workers)], capture_output=True, text=True,
                                     env=env, timeout=120)  # fmt: skip
                result = {"connections": connections, "workers": workers}
                try:
                    result.update(json.loads(run.stdout.strip().splitlines()[-1]))
                except (IndexError, ValueError):
                    result["error"] = run.stderr[-800:]
                print(json.dumps(result), flush=True)
