"""Probe (issue 13): where should JPEGs be decoded so that the tower's forwards never wait?

nvJPEG's batch decode waits for all the work queued on the device (encode_stages.py, `blocking_while_busy`), so in
the process that runs the forwards every decode drains their queue. This measures, on the GPU machine, the forwards'
rate (so400m bf16, 64 images of 16x16 patches per forward, queued two deep on their own stream) alone and while a
decoder runs next to them, and the decoder's rate meanwhile:
- `gpu_process`: nvJPEG decode + GPU resize to uint8 patches (`GpuPreprocessing`) in another process, whose
  device-wide waits cover only its own CUDA context; patches come back through host memory;
- `gpu_thread`: the same in a thread of this process (the pipeline's design in session 4);
- `pil_workers` / `torchvision_cpu_workers`: DataLoader workers decoding on the CPU (PIL, or torchvision's
  libjpeg-turbo `decode_jpeg`), shipping the full-size RGB images;
- `nvjpeg_wait`: a 64-JPEG decode on an idle GPU and behind 200 ms of matmuls on a side stream, repeated after
  warm-up (does the wait stay once nvJPEG's buffers have grown?).

    python benchmarks/decode_placement.py --work /tmp/bench_encode --out $OUT/decode_placement.json
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).parent))
import bench_encode  # noqa: E402  (the corpus recipe, the tower's sizes)
from encode_stages import busy  # noqa: E402

SECONDS = 8.0
CHUNK = 256


def gpu_preprocessing():
    from packed_vit.encode.gpu_preprocessing import GpuPreprocessing
    from packed_vit.processing import Siglip2PackingImageProcessor

    return GpuPreprocessing(Siglip2PackingImageProcessor(max_num_patches=256), torch.device("cuda"))


def read_jpegs(paths) -> list[torch.Tensor]:
    return [torch.frombuffer(bytearray(Path(p).read_bytes()), dtype=torch.uint8) for p in paths]


def decode_chunks(gpu, jpegs: list[torch.Tensor], stop, counter) -> None:
    """Decode + resize chunks of CHUNK JPEGs to uint8 patches on the host, round and round, until `stop`."""
    while not stop.is_set():
        for start in range(0, len(jpegs), CHUNK):
            images = gpu.decode(jpegs[start : start + CHUNK])
            torch.cat([gpu.resized_patches(image)[0] for image in images]).cpu()  # on the host, as a worker ships them
            with counter.get_lock():
                counter.value += len(images)
            if stop.is_set():
                return


def gpu_decoder_process(paths, ready, stop, counter) -> None:
    gpu = gpu_preprocessing()
    jpegs = read_jpegs(paths)
    gpu.decode(jpegs[:CHUNK])  # warm-up
    ready.set()
    decode_chunks(gpu, jpegs, stop, counter)


class CpuDecodes(torch.utils.data.IterableDataset):
    def __init__(self, paths, how: str):
        self.paths, self.how = paths, how

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        mine = [p for i, p in enumerate(self.paths) if (i // 16) % workers == worker]
        while True:
            for start in range(0, len(mine), 16):
                yield [self.decode(p) for p in mine[start : start + 16]]

    def decode(self, path) -> torch.Tensor:
        if self.how == "pil":
            import PIL.Image

            with PIL.Image.open(path) as image:
                return torch.from_numpy(np.array(image.convert("RGB")))
        import torchvision.io

        return torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), mode=torchvision.io.ImageReadMode.RGB)


def forwards(model, seconds: float) -> float:
    """images/s of back-to-back forwards (64 x 16x16), two queued, on their own stream."""
    stream = torch.cuda.Stream()
    x = torch.randn(64 * 256, 768, device="cuda", dtype=torch.bfloat16)
    grid = torch.tensor([[1, 16, 16]] * 64)
    queued: deque = deque()
    done, start = 0, time.perf_counter()
    with torch.no_grad(), torch.cuda.stream(stream):
        while time.perf_counter() - start < seconds:
            model(x, grid)
            event = torch.cuda.Event()
            event.record()
            queued.append(event)
            if len(queued) > 2:
                queued.popleft().synchronize()
                done += 64
        while queued:
            queued.popleft().synchronize()
            done += 64
    return done / (time.perf_counter() - start)


def rate_of(counter, seconds: float, model=None) -> dict:
    """The decoder's images/s over `seconds` (with the forwards running in this thread when `model` is given)."""
    before, start = counter.value, time.perf_counter()
    forward_rate = forwards(model, seconds) if model is not None else (time.sleep(seconds) or None)
    decoded = (counter.value - before) / (time.perf_counter() - start)
    return {"decoder_images_per_s": decoded, "forwards_images_per_s": forward_rate}


def gpu_process(paths, model, processes: int) -> dict:
    ctx = mp.get_context("spawn")
    counter, stop = ctx.Value("l", 0), ctx.Event()
    readies = [ctx.Event() for _ in range(processes)]
    children = [ctx.Process(target=gpu_decoder_process, args=(paths, ready, stop, counter)) for ready in readies]
    for child in children:
        child.start()
    for ready in readies:
        ready.wait(300)
    report = {"alone": rate_of(counter, SECONDS), "with_forwards": rate_of(counter, SECONDS, model)}
    stop.set()
    for child in children:
        child.join(60)
    return report


def gpu_thread(paths, model) -> dict:
    gpu = gpu_preprocessing()
    jpegs = read_jpegs(paths)
    counter, stop = mp.Value("l", 0), threading.Event()

    def run():
        with torch.cuda.stream(torch.cuda.Stream()):
            decode_chunks(gpu, jpegs, stop, counter)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    report = {"alone": rate_of(counter, SECONDS), "with_forwards": rate_of(counter, SECONDS, model)}
    stop.set()
    thread.join()
    return report


def cpu_workers(paths, model, how: str, workers: int) -> dict:
    loader = torch.utils.data.DataLoader(CpuDecodes(paths, how), batch_size=None, num_workers=workers,
                                         pin_memory=True, prefetch_factor=4)  # fmt: skip
    counter, stop = mp.Value("l", 0), threading.Event()

    def consume():
        for images in loader:
            counter.value += len(images)
            if stop.is_set():
                return

    thread = threading.Thread(target=consume, daemon=True)
    thread.start()
    time.sleep(3)  # workers started
    report = {"alone": rate_of(counter, SECONDS), "with_forwards": rate_of(counter, SECONDS, model)}
    stop.set()
    thread.join(60)
    return report


def nvjpeg_wait(paths) -> dict:
    gpu = gpu_preprocessing()
    jpegs = read_jpegs(paths[:64])
    side = torch.cuda.Stream()
    report = {}
    for attempt in range(3):
        for where in ("idle", "side_stream_busy"):
            torch.cuda.synchronize()
            if where != "idle":
                busy(side, 200.0)
            start = time.perf_counter()
            gpu.decode(jpegs)
            report[f"decode_64_{where}_ms_{attempt}"] = 1e3 * (time.perf_counter() - start)
    torch.cuda.synchronize()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_encode"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=14)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    corpus = args.work / "corpus"
    bench_encode.write_corpus(corpus, args.images)
    paths = sorted(corpus.glob("*.jpg"))
    import packed_vit

    with torch.device("cuda"):
        model = packed_vit.Siglip2PackingVisionModel(packed_vit.Siglip2PackingVisionConfig(**bench_encode.SO400M))
    model = model.bfloat16().eval()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def record(name, value):
        report[name] = value
        print(json.dumps({name: value}), flush=True)

    forwards(model, 2.0)  # warm-up
    record("forwards_alone_images_per_s", forwards(model, SECONDS))
    record("nvjpeg_wait", nvjpeg_wait(paths))
    record("gpu_process_1", gpu_process(paths, model, 1))
    record("gpu_process_2", gpu_process(paths, model, 2))
    record("gpu_thread", gpu_thread(paths, model))
    record("pil_workers", cpu_workers(paths, model, "pil", args.workers))
    record("torchvision_cpu_workers", cpu_workers(paths, model, "torchvision", args.workers))
    record("forwards_alone_again_images_per_s", forwards(model, SECONDS))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
