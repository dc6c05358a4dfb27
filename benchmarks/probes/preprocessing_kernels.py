"""GPU: how much GPU time does the GPU path's preprocessing take per image, kernel by kernel? Beside the forwards at
32 hardware queues the job is bound by the GPU they share (RESULTS.md, encode job, session 11), so this is the
preprocessing's cost to the forwards. Profiles `GpuPreprocessing.prepare_chunk` (the job's code, on the job's chunks,
as `decode_beside_forwards.py` runs it) with torch's profiler, CUDA activities, for each JPEG decoder given.

    python3 benchmarks/probes/preprocessing_kernels.py CHECKPOINT CORPUS_DIR [IMAGES] [DECODERS]

DECODERS: comma-separated `--jpeg-decoder` values (default nvjpeg), each with `:torch-ops` for the resize and
normalize by torch's ops image by image instead of `fused_preprocessing`'s two launches per chunk. The hardware
engines' own work is not a kernel: it shows only as the wall time the kernels leave uncovered.
"""

import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from decode_beside_forwards import Preprocessing  # this folder is on sys.path when the script runs

TOP = 15  # kernels listed per decoder

if __name__ == "__main__":
    from packed_vit.encode.job import load_config_and_processor

    checkpoint, corpus = sys.argv[1], Path(sys.argv[2])
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
    decoders = (sys.argv[4] if len(sys.argv) > 4 else "nvjpeg").split(",")
    _, processor = load_config_and_processor(checkpoint)
    paths = sorted(corpus.glob("*.jpg"))[:count]
    for decoder in decoders:
        name, _, variant = decoder.partition(":")
        pre = Preprocessing(processor, paths, name, fused=variant != "torch-ops")
        pre.run(seconds=1.0)  # warm-up: nvJPEG's buffers, the resize kernels
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profile, torch.cuda.stream(pre.stream):
            start = time.perf_counter()
            for chunk in pre.chunks:  # one pass, as the job's preprocessing thread does it
                pre.gpu.prepare_chunk(chunk)
            torch.cuda.synchronize()
            wall = time.perf_counter() - start
        images = sum(len(chunk.entries) for chunk in pre.chunks)
        per_kernel = defaultdict(lambda: [0, 0.0])  # name -> [calls, microseconds]
        for event in profile.events():
            if event.device_type == torch.autograd.DeviceType.CUDA:  # kernels, copies, memsets
                per_kernel[event.name][0] += 1
                per_kernel[event.name][1] += event.time_range.elapsed_us()
        total = sum(us for _, us in per_kernel.values())
        print(f"== {decoder}: {images} images, {wall:.2f} s wall (profiled), GPU kernels {total / 1e3:.1f} ms = "
              f"{total / images:.1f} us per image", flush=True)  # fmt: skip
        for name, (calls, us) in sorted(per_kernel.items(), key=lambda item: -item[1][1])[:TOP]:
            print(f"  {us / images:8.2f} us/image {calls / images:6.2f} calls/image  {name[:110]}", flush=True)
