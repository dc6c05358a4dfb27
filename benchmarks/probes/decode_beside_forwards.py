"""GPU: does the GPU path's preprocessing (nvJPEG batch decode + resize + normalize, the job's own code) keep up
with the packed forwards when both run at once, and does it matter whether it runs in a thread of the forwards'
process (one CUDA context, one GIL) or in a process of its own (its own context and GIL)? Images/s of each side,
alone and together, eager forwards and CUDA graphs, over fixed windows.

    python3 benchmarks/probes/decode_beside_forwards.py CHECKPOINT CORPUS_DIR [IMAGES] [WINDOW_S] [thread]

`thread`: only the preprocessing thread (no decoding process). Printed with the results: CUDA_DEVICE_MAX_CONNECTIONS
(hardware work queues per CUDA context, 8 by default: streams beyond that many share queues, so work on one can wait
behind another's) and QUEUED (forwards queued before the host waits, 2 by default).
"""

import multiprocessing as mp
import os
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

AHEAD = 3  # chunks in flight, as the job's PREFETCH_CHUNKS


class Preprocessing:
    """The job's GPU preprocessing (`GpuPreprocessing.prepare_chunk`) on the job's chunks of the files (read once,
    `ChunkDataset`: GPU_CHUNK JPEGs each), on its own stream, AHEAD chunks in flight."""

    def __init__(self, processor, paths, jpeg_decoder: str = "auto", fused: bool = True):
        from packed_vit.encode.gpu_preprocessing import GpuPreprocessing
        from packed_vit.encode.pipeline import ChunkDataset, CpuPreparation, PairsSource

        self.gpu = GpuPreprocessing(processor, torch.device("cuda"), jpeg_decoder, fused)
        if self.gpu.fused is not None:
            self.gpu.fused.wait_for_warm_up()  # the torch ops until then: measure the job's steady state
        source = PairsSource([(str(p), str(p)) for p in paths])
        self.chunks = list(ChunkDataset(source, CpuPreparation(processor), gpu_decode=True))
        self.stream = torch.cuda.Stream(priority=-100)

    def run(self, stop: threading.Event | None = None, seconds: float | None = None) -> tuple[int, float]:
        images, start, in_flight = 0, time.perf_counter(), []
        with torch.cuda.stream(self.stream):
            while True:
                for chunk in self.chunks:
                    self.gpu.prepare_chunk(chunk)
                    event = torch.cuda.Event()
                    event.record()
                    in_flight.append(event)
                    if len(in_flight) > AHEAD:
                        in_flight.pop(0).synchronize()
                    images += len(chunk.entries)
                    elapsed = time.perf_counter() - start
                    if (stop is not None and stop.is_set()) or (seconds is not None and elapsed > seconds):
                        torch.cuda.synchronize()
                        return images, time.perf_counter() - start


def decode_process(checkpoint, paths, ready, go, stop, quit, results):
    """Preprocesses from each `go` until `stop`, reporting (images, seconds) each time."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from packed_vit.encode.job import load_config_and_processor

    _, processor = load_config_and_processor(checkpoint)
    pre = Preprocessing(processor, paths)
    pre.run(seconds=1.0)  # warm-up
    ready.set()
    while True:
        go.wait()
        if quit.is_set():
            return
        go.clear()
        results.put(pre.run(stop=stop))
        stop.clear()
        ready.set()


# Forwards queued on the GPU before the host waits for the oldest (the job's PIPELINE_DEPTH). If the decoder's calls
# wait for all the work queued on the device, their time grows with this depth beside CUDA graphs.
QUEUED = int(os.environ.get("QUEUED", "2"))


def forwards_for(model, batches, seconds: float) -> tuple[int, float]:
    images, start, queued = 0, time.perf_counter(), []
    with torch.no_grad():
        while time.perf_counter() - start < seconds:
            for pixels, grid in batches:
                model(pixels, grid)
                event = torch.cuda.Event()
                event.record()
                queued.append(event)
                if len(queued) > QUEUED:
                    queued.pop(0).synchronize()
                images += len(grid)
        torch.cuda.synchronize()
    return images, time.perf_counter() - start


if __name__ == "__main__":
    checkpoint, corpus = sys.argv[1], Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    window = float(sys.argv[4]) if len(sys.argv) > 4 else 6.0
    with_process = sys.argv[5:6] != ["thread"]
    print("CUDA_DEVICE_MAX_CONNECTIONS =", os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS", "(unset: 8)"),
          f"forwards queued: {QUEUED}", flush=True)
    paths = sorted(corpus.glob("*.jpg"))[:count]
    if with_process:
        context = mp.get_context("spawn")
        ready, go, stop, quit = (context.Event() for _ in range(4))
        results = context.Queue()
        child = context.Process(target=decode_process, args=(checkpoint, paths, ready, go, stop, quit, results))
        child.start()

    from bench_encode import packed_batches

    from packed_vit.encode import load_model_and_processor

    model, processor = load_model_and_processor(checkpoint, device="cuda", dtype=torch.bfloat16)
    batches = [(torch.cat([b[0] for b in batch]).cuda(), torch.cat([b[1] for b in batch])) for batch in
               packed_batches(paths, processor)]  # fmt: skip
    in_process = Preprocessing(processor, paths)
    in_process.run(seconds=1.0)
    forwards_for(model, batches, 1.0)

    def report(label, images, seconds):
        print(f"{label}: {images / seconds:.0f} images/s ({images} in {seconds:.2f} s)", flush=True)

    def in_child(work):
        """The decode process preprocesses while `work()` runs here; returns work's result and the child's."""
        ready.wait()
        ready.clear()
        go.set()
        time.sleep(0.2)
        mine = work()
        stop.set()
        return mine, results.get()

    if with_process:
        report("decode alone, own process", *in_child(lambda: time.sleep(window))[1])
    report("decode alone, thread", *in_process.run(seconds=window))
    for graphs in (False, True):
        if graphs:
            model.enable_cuda_graphs()
            forwards_for(model, batches, 1.0)  # captures
        kind = "CUDA graphs" if graphs else "eager"
        report(f"forwards alone, {kind}", *forwards_for(model, batches, window))
        if with_process:
            mine, theirs = in_child(lambda: forwards_for(model, batches, window))
            report(f"forwards beside the decode process, {kind}", *mine)
            report("  decode beside, own process", *theirs)
        stop_thread, thread_result = threading.Event(), []
        thread = threading.Thread(target=lambda: thread_result.append(in_process.run(stop=stop_thread)))
        thread.start()
        time.sleep(0.2)
        report(f"forwards beside the decode thread, {kind}", *forwards_for(model, batches, window))
        stop_thread.set()
        thread.join()
        report("  decode beside, thread", *thread_result[0])
    if with_process:
        ready.wait()
        quit.set()
        go.set()
        child.join(timeout=30)
