"""GPU: how much host time does one packed forward of the encode job's size need, against its GPU time, when nothing
else runs in the process? (The encode job's forward thread shares the GIL with its preprocessing thread: the slack
between these two numbers is what that sharing may cost before the GPU waits.) Measured with attention called as
the towers call it for inference (`varlen_attn`'s kernel directly) and through torch's `varlen_attn` custom op (the
code before that change), alternating, in one process.

    python3 benchmarks/probes/forward_host_time.py CHECKPOINT CORPUS_DIR [IMAGES]
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_encode import packed_batches  # noqa: E402

from packed_vit.encode import load_model_and_processor  # noqa: E402
from packed_vit.modeling import attention  # noqa: E402


def host_and_gpu_ms(model, batches) -> tuple[float, float]:
    """Median host and GPU milliseconds per forward, each forward launched onto an empty queue."""
    host, gpu = [], []
    with torch.no_grad():
        for pixels, grid in batches:
            torch.cuda.synchronize()  # an empty queue: the launches never wait for room
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            began = time.perf_counter()
            model(pixels, grid)
            host.append(time.perf_counter() - began)
            end.record()
            end.synchronize()
            gpu.append(start.elapsed_time(end) / 1000)
    return sorted(host)[len(host) // 2] * 1e3, sorted(gpu)[len(gpu) // 2] * 1e3


if __name__ == "__main__":
    checkpoint, corpus = sys.argv[1], Path(sys.argv[2])
    paths = sorted(corpus.glob("*.jpg"))[: int(sys.argv[3]) if len(sys.argv) > 3 else 640]
    model, processor = load_model_and_processor(checkpoint, device="cuda", dtype=torch.bfloat16)
    batches = [(torch.cat([b[0] for b in batch]).cuda(), torch.cat([b[1] for b in batch])) for batch in
               packed_batches(paths, processor)]  # fmt: skip
    direct = attention._records_no_autograd
    with torch.no_grad():
        for pixels, grid in batches:  # every grid's position map cached, as in a long job
            model(pixels, grid)
    for round in range(2):
        for name, records in (("direct kernel", direct), ("custom op", lambda *tensors: False)):
            attention._records_no_autograd = records
            host, gpu = host_and_gpu_ms(model, batches)
            print(f"round {round + 1}, attention by the {name}: {len(batches)} forwards, host per forward {host:.1f} ms, "
                  f"GPU {gpu:.1f} ms (medians)", flush=True)
