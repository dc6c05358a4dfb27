"""GPU: does loading the weights onto the GPU hold the GIL, and slow the threads beside it? In a fresh process per
loader (the CUDA context made first): a thread loads the checkpoint's safetensors file onto the GPU while the main
thread runs small CUDA calls (one-element copies to the GPU, each of which lets go of the GIL and takes it again), as
the encode job's other threads do at their start. Printed per loader: the load's seconds, and the main thread's
calls per second beside the load and alone.

    python3 benchmarks/probes/load_beside_threads.py CHECKPOINT_DIR [ROUNDS]

Loaders: `safetensors`: safetensors.torch.load_file(device="cuda"); `ours`: checkpoint_loading.read_safetensors.
"""

import json
import subprocess
import sys

CHILD = r"""
import json, sys, threading, time, torch
from safetensors.torch import load_file
from packed_vit.modeling.checkpoint_loading import read_safetensors
path, loader = sys.argv[1], sys.argv[2]
torch.zeros(1, device="cuda"); torch.cuda.synchronize()
one = torch.zeros(1)
def calls(seconds):
    n, end = 0, time.perf_counter() + seconds
    while time.perf_counter() < end:
        one.to("cuda"); n += 1
    return n / seconds
alone = calls(0.3)
done = {}
def load():
    start = time.perf_counter()
    weights = load_file(path, device="cuda") if loader == "safetensors" else read_safetensors(path, torch.device("cuda"))
    torch.cuda.synchronize(); done["seconds"] = time.perf_counter() - start; done["tensors"] = len(weights)
thread = threading.Thread(target=load); start = time.perf_counter(); thread.start()
n = 0
while thread.is_alive():
    one.to("cuda"); n += 1
beside = n / (time.perf_counter() - start)
print(json.dumps({"loader": loader, "load_s": round(done["seconds"], 3), "tensors": done["tensors"],
                  "calls_per_s_beside": round(beside), "calls_per_s_alone": round(alone)}))
"""

if __name__ == "__main__":
    checkpoint, rounds = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 2
    for _ in range(rounds):
        for loader in ("safetensors", "ours"):
            run = subprocess.run([sys.executable, "-c", CHILD, f"{checkpoint}/model.safetensors", loader],
                                 capture_output=True, text=True)  # fmt: skip
            print(run.stdout.strip() or run.stderr[-1500:])
            sys.stdout.flush()
    print(json.dumps({"safetensors": __import__("safetensors").__version__}))
