"""Where the encode job's time goes, stage by stage, on the GPU machine (issue 13). A diagnostic, not the benchmark:
`bench_encode.py` measures the job as users run it; this takes it apart to find the bound.

- `startup`: a fresh `python -c` that timestamps `import torch`, CUDA initialised, `import transformers.modeling_utils`,
  `import packed_vit`, the model loaded (`load_model_and_processor`, bf16 on cuda) and one forward done;
- `loader`: the DataLoader alone (workers decoding and resizing, or only reading for the GPU path), no device;
- `decode`: nvJPEG batch decode alone, at several batch sizes (host-blocking: torchvision syncs its stream);
- `gpu_preprocessing`: `GpuPreprocessing.prepare_chunk` over chunks already read, then one sync;
- `pipeline`: `encoded_results` in this process (cpu and gpu), all images;
- `gpu_only`: the packed forwards alone on the same batches (bench_encode's).
Prints one JSON object per stage; with --out also writes them all.

    python benchmarks/encode_stages.py --work /tmp/bench_encode --out $OUT/encode_stages.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_encode  # noqa: E402  (the corpus and checkpoint recipes)

STARTUP = """import time, sys
stamps = [("process start -> python", time.time() - START)]
def stamp(what): stamps.append((what, time.time() - START))
import torch; stamp("import torch")
torch.empty(0, device="cuda"); stamp("cuda initialised")
import transformers.modeling_utils; stamp("import transformers.modeling_utils")
import packed_vit.encode.job as job; stamp("import packed_vit")
model, processor = job.load_model_and_processor(CKPT, device="cuda", dtype=torch.bfloat16); stamp("model loaded")
with torch.no_grad():
    model(torch.zeros(256, 768, device="cuda", dtype=torch.bfloat16), torch.tensor([[1, 16, 16]]))
torch.cuda.synchronize(); stamp("first forward done")
print(__import__("json").dumps(stamps))
"""
OVERLAP = """import threading
cuda_thread = threading.Thread(target=lambda: (torch.empty(0, device="cuda"), stamp("cuda initialised (thread)")))
cuda_thread.start()"""


def startup(checkpoint: Path, overlapped: bool = False) -> dict:
    """`overlapped`: CUDA initialised in a thread while the main thread imports transformers (does it overlap?)."""
    start = time.time()
    script = STARTUP
    if overlapped:
        script = STARTUP.replace('torch.empty(0, device="cuda"); stamp("cuda initialised")', OVERLAP)
    code = f"START = {start!r}\nCKPT = {str(checkpoint)!r}\n" + script
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode:
        return {"error": run.stderr[-2000:]}
    stamps = json.loads(run.stdout.strip().splitlines()[-1])
    return {"cumulative_seconds": dict(stamps)}


def import_times(out: Path | None) -> list:
    """`python -X importtime -c "import packed_vit.encode.job"`: the 15 largest cumulative imports."""
    run = subprocess.run([sys.executable, "-X", "importtime", "-c", "import packed_vit.encode.job, packed_vit.cli"],
                         capture_output=True, text=True)  # fmt: skip
    rows = []
    for line in run.stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, self_us, cumulative_us, name = (part.strip() for part in line.replace("import time:", "|").split("|"))
            rows.append((int(cumulative_us) / 1e6, int(self_us) / 1e6, name))
    if out is not None:
        out.with_name("importtime.txt").write_text(run.stderr)
    return sorted(rows, reverse=True)[:15]


def loader_alone(paths, processor, gpu_decode: bool, workers: int) -> dict:
    from packed_vit.encode.pipeline import ChunkDataset, CpuPreparation, PairsSource

    dataset = ChunkDataset(PairsSource([(str(p), str(p)) for p in paths]), CpuPreparation(processor), gpu_decode)
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers, pin_memory=True,
                                         prefetch_factor=4)  # fmt: skip
    start, first, chunks = time.perf_counter(), None, []
    for chunk in loader:
        first = first or time.perf_counter()
        chunks.append(chunk)
    end = time.perf_counter()
    images = sum(len(c.entries) for c in chunks)
    return {"workers": workers, "images": images, "first_chunk_seconds": first - start,
            "images_per_s_after_first": (images - len(chunks[0].entries)) / (end - first)}, chunks  # fmt: skip


def decode_alone(chunks, gpu, batch_sizes=(16, 64, 256)) -> dict:
    encoded = [c.encoded[e.rows] for c in chunks for e in c.entries if e.kind == "jpeg"]
    report = {}
    for batch in batch_sizes:
        gpu.decode(encoded[:batch])  # warm-up
        torch.cuda.synchronize()
        start = time.perf_counter()
        for i in range(0, len(encoded), batch):
            gpu.decode(encoded[i : i + batch])
        torch.cuda.synchronize()
        report[batch] = len(encoded) / (time.perf_counter() - start)
    return {"jpegs": len(encoded), "images_per_s_by_batch": report}


def busy(stream, milliseconds: float = 200.0) -> None:
    """Queues about `milliseconds` of matmuls on `stream` (calibrated on the H200: 8192^3 bf16 ~ 1.5 ms)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    with torch.cuda.stream(stream):
        for _ in range(int(milliseconds / 1.5)):
            a @ a


def blocking_while_busy(chunks, gpu) -> dict:
    """Host time of a 64-JPEG decode and of 64 resizes while ~200 ms of work is queued on the default stream, or on a
    side stream: ~200 ms means the call waits for that work."""
    encoded = [c.encoded[e.rows] for c in chunks[:2] for e in c.entries if e.kind == "jpeg"][:64]
    images = gpu.decode(encoded)
    report = {}
    for where, stream in (("idle", None), ("default_stream_busy", torch.cuda.default_stream()),
                          ("side_stream_busy", torch.cuda.Stream())):  # fmt: skip
        for what, call in (("decode_64", lambda: gpu.decode(encoded)),
                           ("resize_64", lambda: [gpu.resized_patches(i) for i in images])):  # fmt: skip
            torch.cuda.synchronize()
            if stream is not None:
                busy(stream)
            start = time.perf_counter()
            call()
            report[f"{what}_{where}_ms"] = 1e3 * (time.perf_counter() - start)
            torch.cuda.synchronize()
    return report


def preprocessing_alone(chunks, gpu) -> dict:
    decoded = gpu.decode([c.encoded[e.rows] for c in chunks[:8] for e in c.entries if e.kind == "jpeg"])
    torch.cuda.synchronize()
    start = time.perf_counter()
    for image in decoded:
        gpu.patches(image)
    host = time.perf_counter() - start
    torch.cuda.synchronize()
    per_image = {"host_ms_per_image_patches": 1e3 * host / len(decoded),
                 "with_sync_ms_per_image_patches": 1e3 * (time.perf_counter() - start) / len(decoded)}  # fmt: skip
    start = time.perf_counter()
    for chunk in chunks:
        gpu.prepare_chunk(chunk)
    torch.cuda.synchronize()
    images = sum(len(c.entries) for c in chunks)
    return {"images": images, "images_per_s": images / (time.perf_counter() - start), **per_image}


def pipeline(model, processor, paths, preprocess: str, workers: int) -> dict:
    """The whole pipeline in this process, with the host seconds spent in its main steps (wrapped for the run)."""
    from packed_vit.encode import gpu_preprocessing, pipeline as stages

    host = {}
    originals = {}

    def timed(owner, name):
        original = originals[(owner, name)] = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                host[name] = host.get(name, 0.0) + time.perf_counter() - start

        setattr(owner, name, wrapper)

    gpu = gpu_preprocessing.GpuPreprocessing
    for owner, name in ((gpu, "decode"), (gpu, "prepare_chunk"), (stages.InFlight, "__init__"), (stages.InFlight, "result")):
        timed(owner, name)
    try:
        start, first, images = time.perf_counter(), None, 0
        for result in stages.encoded_results(model, processor, stages.PairsSource([(str(p), str(p)) for p in paths]),
                                             16384, workers=workers, preprocess=preprocess):  # fmt: skip
            first = first or time.perf_counter()
            images += len(result.images)
        end = time.perf_counter()
    finally:
        for (owner, name), original in originals.items():
            setattr(owner, name, original)
    return {"preprocess": preprocess, "images": images, "seconds": end - start, "images_per_s": images / (end - start),
            "first_result_seconds": first - start, "host_seconds_in": host}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_encode"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--no-startup", action="store_true", help="skip the start-up and import measurements")
    parser.add_argument("--pipeline-only", action="store_true", help="only the pipeline runs and the forwards alone")
    args = parser.parse_args()
    from packed_vit.encode import default_workers, load_model_and_processor
    from packed_vit.encode.gpu_preprocessing import GpuPreprocessing

    corpus = args.work / "corpus"
    bench_encode.write_corpus(corpus, args.images)
    paths = sorted(corpus.glob("*.jpg"))
    checkpoint = args.work / f"so400m_{args.budget}"
    bench_encode.write_checkpoint(checkpoint, args.budget)
    results = {}

    def record(name, value):
        results[name] = value
        print(name, json.dumps(value), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))

    if not args.no_startup:
        record("startup", startup(checkpoint))
        record("startup_again", startup(checkpoint))
        record("startup_cuda_in_a_thread", startup(checkpoint, overlapped=True))
        record("largest_imports_cumulative_self_seconds", import_times(args.out))
    import cProfile
    import io
    import pstats

    profile = cProfile.Profile()
    profile.enable()
    model, processor = load_model_and_processor(str(checkpoint), device="cuda", dtype=torch.bfloat16)
    profile.disable()
    text = io.StringIO()
    pstats.Stats(profile, stream=text).sort_stats("cumulative").print_stats(30)
    record("load_profile_top", text.getvalue().splitlines()[:60])
    workers = default_workers()
    if not args.pipeline_only:
        record("loader_cpu", loader_alone(paths, processor, False, workers)[0])
        report, chunks = loader_alone(paths, processor, True, workers)
        record("loader_gpu_read_only", report)
        gpu = GpuPreprocessing(processor, torch.device("cuda"))
        record("decode", decode_alone(chunks, gpu))
        record("blocking_while_busy", blocking_while_busy(chunks, gpu))
        record("gpu_preprocessing", preprocessing_alone(chunks, gpu))
        del chunks
    import packed_vit.encode.pipeline as pipeline_module

    with torch.no_grad():  # the first forward's one-time costs (kernel compilation) out of the pipeline runs
        model(torch.zeros(256, 768, device="cuda", dtype=torch.bfloat16), torch.tensor([[1, 16, 16]]))
    for chunk in (64, pipeline_module.GPU_CHUNK):
        pipeline_module.GPU_CHUNK = chunk
        record(f"pipeline_gpu_chunk_{chunk}", pipeline(model, processor, paths, "gpu", workers))
    record("pipeline_cpu", pipeline(model, processor, paths, "cpu", workers))
    record("gpu_only", bench_encode.gpu_only(model, bench_encode.packed_batches(paths, processor)))


if __name__ == "__main__":
    main()
