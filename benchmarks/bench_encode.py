"""The encode job on the GPU machine (issues 13, 23; DESIGN §11): ours vs the forwards alone vs a transformers user.

For each tower configuration (`--configs`: Siglip2 so400m/16 at 256 and 1024 patches, AIMv2-L/14 224 and native;
random weights in transformers' saved format):
- corpus: `--images` JPEGs of mixed sizes (sides 200..1600 px) cut and resized from scikit-image's photos;
- `cli`: `python -m packed_vit encode CORPUS --model CKPT` run as a user runs it, once per `--preprocess` mode:
  wall clock, start-up (the command's own report: process start to first forward), images/s from the first forward
  on, peak RSS of the command and its workers;
- `forwards_alone`: the packed forwards alone on the same batches (the processor's patches, packed by the same token
  budget, already on the GPU), timed with CUDA events;
- `transformers_user`: what a user who knows PyTorch writes without this project: transformers' image processor
  (`Siglip2ImageProcessor` / `CLIPImageProcessor`, the default backend) as the `collate_fn` of a DataLoader with
  14 workers, pinned memory, prefetch_factor=4, 64 images per padded batch, `Siglip2VisionModel` / `Aimv2VisionModel`
  (sdpa, bf16), `non_blocking` copies both ways; images/s from its first batch on, all images;
- `startup` (`--startup-configs`): ours' start-up (the CLI on a few images) and transformers' own `from_pretrained`
  onto the GPU, each in a fresh process, alternating `--startup-rounds` times: medians, and each side's imports;
- `profile` (`--profile`): our pipeline in this process (`encoded_results`, GPU path, 14 workers) with its
  `StageClock`: host seconds per stage and thread, GPU seconds in forwards; at GPU_CHUNK 128 and 256;
- checks: GPU preprocessing vs transformers' torchvision backend on CUDA on the same decoded pixels (max abs
  difference of the patches), nvJPEG vs PIL pixels, and bf16 embeddings of both paths vs transformers' fp32 tower
  per image (cosine).
Writes benchmarks/results_encode.json (or --out) and prints a table. Needs CUDA, torchvision, scikit-image.

    python benchmarks/bench_encode.py --work /tmp/bench_encode --out $OUT/results_encode.json --profile
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import time
from multiprocessing import Pool, get_context
from pathlib import Path

import numpy as np
import PIL.Image
import torch

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=16,
              num_patches=256)  # fmt: skip
AIMV2_LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8, patch_size=14,
                   image_size=224)  # fmt: skip
# name -> (family, transformers config fields, max_num_patches for Siglip2, has a transformers processor)
CONFIGS = {
    "siglip2_256": ("siglip2", SO400M, 256, True),
    "siglip2_1024": ("siglip2", SO400M, 1024, True),
    "aimv2_224": ("aimv2", {**AIMV2_LARGE, "use_head": True, "is_native": False}, None, True),
    "aimv2_native": ("aimv2", {**AIMV2_LARGE, "use_head": False, "is_native": True}, None, False),
}
USER_WORKERS = 14  # the job's own default on the 16-core machine
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")  # shipped with scikit-image
TRANSFORMERS_BATCH = 64
# `python -m packed_vit ...` as a user runs it, reporting its peak RSS (the process; its largest worker) at exit.
RUN_AND_REPORT_RSS = """import resource, runpy, sys
try:
    runpy.run_module("packed_vit", run_name="__main__", alter_sys=True)
finally:
    print("peak_rss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
          resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)
"""


def write_photo(job) -> None:
    index, folder = job
    from skimage import data

    rng = np.random.default_rng(index)
    photo = getattr(data, PHOTOS[index % len(PHOTOS)])()
    photo = np.stack([photo] * 3, -1) if photo.ndim == 2 else photo[..., :3]
    h, w = photo.shape[:2]
    crop_h, crop_w = rng.integers(h // 3, h + 1), rng.integers(w // 3, w + 1)
    top, left = rng.integers(0, h - crop_h + 1), rng.integers(0, w - crop_w + 1)
    out_h, out_w = rng.integers(200, 1601, 2)
    image = PIL.Image.fromarray(photo[top : top + crop_h, left : left + crop_w]).resize((int(out_w), int(out_h)))
    image.save(folder / f"{index:06d}.jpg", quality=90)


def write_corpus(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if len(list(folder.glob("*.jpg"))) == count:
        return
    with Pool(os.cpu_count()) as pool:
        pool.map(write_photo, [(i, folder) for i in range(count)], chunksize=16)


def write_checkpoint(folder: Path, config_name: str) -> None:
    from transformers import Aimv2VisionConfig, Aimv2VisionModel, Siglip2ImageProcessor, Siglip2VisionConfig, \
        Siglip2VisionModel  # fmt: skip

    family, fields, budget, _ = CONFIGS[config_name]
    weights = folder.parent / (f"{family}_weights" if family == "siglip2" else f"{config_name}_weights")
    if not (weights / "model.safetensors").is_file():
        torch.manual_seed(0)
        config_cls, model_cls = (Siglip2VisionConfig, Siglip2VisionModel) if family == "siglip2" else \
            (Aimv2VisionConfig, Aimv2VisionModel)  # fmt: skip
        with torch.device("cuda"):
            model = model_cls(config_cls(**fields))
            for parameter in model.parameters():  # away from init (LayerNorms at 1/0 hide errors)
                parameter.data.normal_(0, 0.02).add_(1.0 if parameter.ndim == 1 and parameter.shape[0] else 0)
        model.save_pretrained(weights)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).exists():
            (folder / name).symlink_to(weights / name)
    if family == "siglip2":
        Siglip2ImageProcessor(patch_size=16, max_num_patches=budget).save_pretrained(folder)


def transformers_processor(config_name: str, backend: str = "default"):
    """transformers' own processor for a configuration ("default": its default backend; "pil": the PIL one)."""
    import transformers

    family, fields, budget, _ = CONFIGS[config_name]
    name = "Siglip2ImageProcessor" if family == "siglip2" else "CLIPImageProcessor"
    if backend == "pil":  # transformers 5: the PIL backend has its own class
        name = name + "Pil" if hasattr(transformers, name + "Pil") else name
    cls = getattr(transformers, name)
    if family == "siglip2":
        return cls(patch_size=16, max_num_patches=budget)
    size = fields["image_size"]
    return cls(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


def transformers_model(checkpoint: Path, config_name: str, dtype, attn_implementation: str | None = None):
    from transformers import Aimv2VisionModel, Siglip2VisionModel

    cls = Siglip2VisionModel if CONFIGS[config_name][0] == "siglip2" else Aimv2VisionModel
    return cls.from_pretrained(checkpoint, dtype=dtype, attn_implementation=attn_implementation).cuda().eval()


def transformers_inputs(batch: dict, non_blocking: bool = False) -> dict:
    """A transformers processor's batch -> the tower's keyword arguments on the GPU (spatial_shapes stay on the
    host: Siglip2 reads them there)."""
    return {name: value.cpu() if name == "spatial_shapes" else value.to("cuda", non_blocking=non_blocking)
            for name, value in batch.items() if name in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


class ProcessorCollate:
    """The user's collate_fn: paths -> PIL images -> transformers' processor -> tensors (picklable, for workers)."""

    def __init__(self, processor):
        self.processor = processor

    def __call__(self, paths):
        images = [PIL.Image.open(path).convert("RGB") for path in paths]
        return dict(self.processor(images, return_tensors="pt"))


def transformers_user(paths, checkpoint: Path, config_name: str) -> dict:
    """Issue 23's baseline: transformers' processor in a 14-worker DataLoader feeding its tower, padded batches of 64."""
    processor = transformers_processor(config_name)
    model = transformers_model(checkpoint, config_name, torch.bfloat16, "sdpa")
    loader = torch.utils.data.DataLoader([str(p) for p in paths], batch_size=TRANSFORMERS_BATCH,
                                         num_workers=USER_WORKERS, collate_fn=ProcessorCollate(processor),
                                         pin_memory=True, prefetch_factor=4)  # fmt: skip
    outputs, start = [], None
    with torch.no_grad():
        for batch in loader:
            start = start or time.perf_counter()  # from the first batch on, as ours from its first forward on
            inputs = transformers_inputs(batch, non_blocking=True)
            inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
            outputs.append(model(**inputs).pooler_output.float().to("cpu", non_blocking=True))
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del model
    return {"processor": type(processor).__name__, "workers": USER_WORKERS, "batch": TRANSFORMERS_BATCH,
            "images": sum(len(o) for o in outputs), "seconds": seconds, "images_per_s": len(paths) / seconds}


# A mode of the CLI run: "cpu" | "gpu", then options: "-graphs" (--cuda-graphs), "-hw" (--jpeg-decoder nvimgcodec)
MODE_OPTIONS = {"graphs": ["--cuda-graphs"], "hw": ["--jpeg-decoder", "nvimgcodec"]}


def run_cli(corpus: Path, checkpoint: Path, out: Path, mode: str, max_tokens: int | None = None) -> dict:
    """The CLI as a user runs it; `max_tokens`: its --max-tokens (None: the job's default)."""
    preprocess, *options = mode.split("-")
    budget = [] if max_tokens is None else ["--max-tokens", str(max_tokens)]
    arguments = ["encode", str(corpus), "--model", str(checkpoint), "--out", str(out), "--no-progress",
                 "--preprocess", preprocess, "--profile", *budget,
                 *(a for o in options for a in MODE_OPTIONS[o])]  # fmt: skip
    command = [sys.executable, "-c", RUN_AND_REPORT_RSS, *arguments]
    start = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise RuntimeError(run.stderr[-3000:])
    line = run.stdout.strip().splitlines()[-1]
    main_kib, worker_kib = map(int, re.search(r"peak_rss_kib (\d+) (\d+)", run.stderr).groups())
    startup = float(re.search(r"Start-up \(process start to first forward\) ([\d.]+) s", line).group(1))
    steady = float(re.search(r"\(([\d.]+) images/s from the first forward on", line).group(1))
    images = int(re.search(r"Encoded (\d+) image", line).group(1))
    return {"command": "python -m packed_vit " + " ".join(arguments), "wall_seconds": wall, "images": images, "images_per_s": images / wall,
            "images_per_s_after_startup": steady, "startup_seconds": startup,
            "peak_rss_gib_main_process": main_kib / 2**20, "peak_rss_gib_largest_worker": worker_kib / 2**20,
            "printed": line, "profile": run.stderr[run.stderr.find("start-up and run"):].splitlines()[:40]}  # fmt: skip


def packed_batches(paths, processor, max_tokens: int):
    """The processor's patches of every image (in a process pool), packed as `encode` packs them."""
    from packed_vit.encode import token_budget_batches

    # forkserver: this process holds a CUDA context by now, which forked children must not inherit
    with get_context("forkserver").Pool(os.cpu_count()) as pool:
        prepared = pool.map(_process, [(processor, p) for p in paths], chunksize=8)
    return list(token_budget_batches(prepared, max_tokens, tokens=lambda item: len(item[0])))


def _process(job):
    processor, path = job
    out = processor(PIL.Image.open(path), return_tensors="pt", do_convert_rgb=True)
    return out["pixel_values"].to(torch.bfloat16), out["grid_thw"]


def forwards_alone(model, batches) -> dict:
    """The packed forwards alone, CUDA events; with CUDA graphs enabled, after a first pass that captures them."""
    device_batches = [(torch.cat([b[0] for b in batch]).cuda(), torch.cat([b[1] for b in batch])) for batch in batches]
    images = sum(len(batch) for batch in batches)
    with torch.no_grad():
        for pixels, grid in device_batches if model.cuda_graphs is not None else device_batches[:3]:
            model(pixels, grid)
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for pixels, grid in device_batches:
            model(pixels, grid)
        end.record()
        torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1000
    return {"images": images, "forwards": len(batches), "seconds": seconds, "images_per_s": images / seconds}


def profile_pipeline(model, processor, paths, variant: str, max_tokens: int) -> dict:
    """Our pipeline in this process, GPU path, with its StageClock: where each thread's time went. `variant`:
    "CHUNK[:DECODER[:graphs]]" (GPU_CHUNK, --jpeg-decoder, CUDA graphs for the forwards; default: eager)."""
    from packed_vit.encode import pipeline

    chunk, decoder, graphs = (variant.split(":") + ["", ""])[:3]
    chunk, decoder, graphs = int(chunk), decoder or "nvjpeg", graphs == "graphs"
    pipeline.GPU_CHUNK, default = chunk, pipeline.GPU_CHUNK
    if not graphs:
        model.disable_cuda_graphs()
    clock = pipeline.StageClock()
    images, gpu_seconds, first = 0, 0.0, None
    try:
        source = pipeline.PairsSource([(str(p), str(p)) for p in paths])
        for result in pipeline.encoded_results(model, processor, source, max_tokens, workers=USER_WORKERS,
                                               preprocess="gpu", clock=clock, cuda_graphs=graphs,
                                               jpeg_decoder=decoder):  # fmt: skip
            first = first or result.launched_at
            images += len(result.images)
            gpu_seconds += result.model_seconds
        seconds = time.time() - first
    finally:
        pipeline.GPU_CHUNK = default
    return {"gpu_chunk": chunk, "jpeg_decoder": decoder, "cuda_graphs": graphs,
            "images": images, "seconds_from_first_forward": seconds,
            "images_per_s": images / seconds, "gpu_seconds_in_forwards": gpu_seconds,
            "forward_share_of_wall": gpu_seconds / seconds,
            "host_seconds_by_stage": dict(sorted(clock.seconds.items()))}  # fmt: skip


def transformers_startup(checkpoint: Path, config_name: str) -> dict:
    """A fresh process: transformers' own `from_pretrained` of the tower onto the GPU, bf16 (the start-up goal's
    reference), from the process's start."""
    cls = "Siglip2VisionModel" if CONFIGS[config_name][0] == "siglip2" else "Aimv2VisionModel"
    code = (f"import torch, time, transformers\ncls = transformers.{cls}\nimported = time.time()\n"
            f"m = cls.from_pretrained({str(checkpoint)!r}, dtype=torch.bfloat16, device_map='cuda')\n"
            "torch.cuda.synchronize()\nprint(imported, time.time())")  # fmt: skip
    start = time.time()
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if run.returncode:
        return {"error": run.stderr[-2000:]}
    imported, loaded = map(float, run.stdout.split()[-2:])
    return {"seconds_to_model_on_gpu": loaded - start, "seconds_to_imports_done": imported - start}


def startup_marks(profile: list[str]) -> dict[str, float]:
    """`--profile`'s start-up steps: step -> seconds from the process start."""
    marks = {}
    for line in profile[1 : profile.index("host seconds per stage (summed per thread):")]:
        seconds, step = line.strip().split(maxsplit=1)
        marks[step] = float(seconds)
    return marks


STARTUP_IMAGES = 128  # ours' start-up runs encode this many images: the start-up does not depend on the corpus


def startup_comparison(paths, work: Path, checkpoint: Path, config_name: str, rounds: int) -> dict:
    """Start-up, ours (the CLI, GPU path, process start to first forward) against transformers' own load
    (`transformers_startup`), alternating `rounds` times: on the GPU machine the imports alone moved by seconds
    between runs (RESULTS.md, session 8), so one sample of each says little. Medians, and each side's imports."""
    small = work / "startup_corpus"
    small.mkdir(exist_ok=True)
    for path in paths[:STARTUP_IMAGES]:
        if not (small / path.name).exists():
            (small / path.name).symlink_to(path.resolve())
    ours, theirs = [], []
    for _ in range(rounds):
        run = run_cli(small, checkpoint, work / "startup.safetensors", "gpu")
        marks = startup_marks(run["profile"])
        ours.append({"startup_seconds": run["startup_seconds"], "seconds_to_imports_done": marks["imports done"],
                     "marks": marks})  # fmt: skip
        theirs.append(transformers_startup(checkpoint, config_name))
        if "error" in theirs[-1]:
            return {"error": theirs[-1]["error"]}
    median = statistics.median
    return {"rounds": rounds, "ours": ours, "transformers": theirs,
            "median_ours": median(o["startup_seconds"] for o in ours),
            "median_transformers": median(t["seconds_to_model_on_gpu"] for t in theirs),
            "median_ours_imports": median(o["seconds_to_imports_done"] for o in ours),
            "median_transformers_imports": median(t["seconds_to_imports_done"] for t in theirs),
            # after the imports, which moved by seconds between runs on the GPU machine (RESULTS.md, session 12)
            "median_ours_after_imports": median(o["startup_seconds"] - o["seconds_to_imports_done"] for o in ours),
            "median_transformers_after_imports": median(t["seconds_to_model_on_gpu"] - t["seconds_to_imports_done"]
                                                        for t in theirs)}  # fmt: skip


def unpatchify(patches: torch.Tensor, grid, patch_size: int) -> torch.Tensor:
    """[h*w, p*p*3] channel-last patches -> [3, h*p, w*p], the image they were cut from."""
    _, h, w = (int(n) for n in grid)
    image = patches.reshape(h, w, patch_size, patch_size, 3).permute(4, 0, 2, 1, 3)
    return image.reshape(3, h * patch_size, w * patch_size)


def nvjpeg(path) -> torch.Tensor:
    import torchvision.io

    data = torchvision.io.read_file(str(path))
    return torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device="cuda")


def reference_inputs(config_name: str, mode: str, path, ours_processor) -> dict:
    """transformers' tower inputs for one image as the reference of `mode`: "cpu" its PIL backend on PIL's pixels,
    "gpu" its torchvision backend on CUDA on nvJPEG's pixels, "gpu-hw" (the hardware engines, whose pixels are
    PIL's within a level) transformers' own pipeline: its default processor on PIL's pixels. AIMv2 native has no
    transformers processor: our CPU processor (cpu, gpu-hw), our GPU preprocessing (gpu), as an image."""
    family, fields, _, has_processor = CONFIGS[config_name]
    if has_processor and "-hw" in mode:  # the hardware engines' pixels are PIL's: transformers' own pipeline
        processor = transformers_processor(config_name)
        return transformers_inputs(dict(processor(PIL.Image.open(path).convert("RGB"), return_tensors="pt")))
    if has_processor:
        processor = transformers_processor(config_name, "pil" if mode == "cpu" else "default")
        if mode == "cpu":
            return transformers_inputs(dict(processor(PIL.Image.open(path).convert("RGB"), return_tensors="pt")))
        return transformers_inputs(dict(processor(nvjpeg(path), return_tensors="pt", device="cuda")))
    if mode == "cpu" or "-hw" in mode:
        out = ours_processor(PIL.Image.open(path), return_tensors="pt", do_convert_rgb=True)
        patches, grid = out["pixel_values"], out["grid_thw"][0]
    else:
        from packed_vit.encode.gpu_preprocessing import GpuPreprocessing

        patches, grid = GpuPreprocessing(ours_processor, torch.device("cuda")).patches(nvjpeg(path))
    return {"pixel_values": unpatchify(patches, grid, fields["patch_size"])[None].cuda()}


def parity(paths, checkpoint: Path, config_name: str, embeddings_by_mode: dict, ours_processor) -> dict:
    """Per-image cosine of our bf16 pooled embeddings vs transformers' fp32 tower on its reference's pixels
    (`reference_inputs`); AIMv2 without a head: the mean of last_hidden_state, as ours."""
    model = transformers_model(checkpoint, config_name, torch.float32)
    report = {}
    for mode, (names, pooled) in embeddings_by_mode.items():
        row_of = {name: i for i, name in enumerate(names)}
        cosines = []
        for path in paths:
            with torch.no_grad():
                out = model(**reference_inputs(config_name, mode, path, ours_processor))
            ref = out.pooler_output[0] if out.pooler_output is not None else out.last_hidden_state[0].mean(0)
            ours = pooled[row_of[str(path)]].double()
            cosines.append(torch.nn.functional.cosine_similarity(ours, ref.double().cpu(), dim=0).item())
        report[mode] = {"images": len(cosines), "min_cosine": min(cosines), "mean_cosine": float(np.mean(cosines))}
    del model
    return report


def preprocessing_check(paths, config_name: str, ours_processor) -> dict:
    """GPU path patches vs transformers' torchvision backend on CUDA on the same nvJPEG pixels (AIMv2 native: vs our
    CPU processor on those pixels, PIL's resize); nvJPEG vs PIL pixels."""
    from packed_vit.encode.gpu_preprocessing import GpuPreprocessing

    family, fields, _, has_processor = CONFIGS[config_name]
    ours = GpuPreprocessing(ours_processor, torch.device("cuda"))
    if ours.fused is not None:
        ours.fused.wait_for_warm_up()  # `many_patches` takes the torch ops until then
    theirs = transformers_processor(config_name) if has_processor else None
    worst_patch, patch_means, worst_pixel, pixel_means, fused_equal = 0.0, [], 0, [], 0
    for path in paths:
        image = nvjpeg(path)
        patches, grid = ours.patches(image)  # the torch ops; and the job's fused kernels, which should be the same
        fused_equal += ours.fused is not None and torch.equal(ours.many_patches([image])[0], patches)
        if theirs is not None:
            expected = theirs(image, return_tensors="pt", device="cuda")["pixel_values"][0]
            if family == "siglip2":
                expected = expected[: grid[1] * grid[2]]
            else:  # [3, H, W] -> our channel-last patches
                p = fields["patch_size"]
                expected = expected.reshape(3, grid[1], p, grid[2], p).permute(1, 3, 2, 4, 0).reshape(-1, 3 * p * p)
        else:
            expected = ours_processor(image.permute(1, 2, 0).cpu().numpy(), return_tensors="pt")["pixel_values"]
        difference = (patches - expected.to(patches.device)).abs()
        worst_patch, patch_means = max(worst_patch, difference.max().item()), patch_means + [difference.mean().item()]
        pil = torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB"))).permute(2, 0, 1).cuda()
        difference = (pil.int() - image.int()).abs()
        worst_pixel, pixel_means = max(worst_pixel, difference.max().item()), pixel_means + [difference.float().mean().item()]
    hardware = hardware_vs_pil(paths)
    reference = "transformers_torchvision_cuda" if has_processor else "our_cpu_processor_same_pixels"
    return {"images": len(paths), f"max_abs_patch_difference_vs_{reference}": worst_patch,
            f"mean_abs_patch_difference_vs_{reference}": float(np.mean(patch_means)),
            "nvjpeg_vs_pil_max_pixel_difference": worst_pixel,
            "nvjpeg_vs_pil_mean_pixel_difference": float(np.mean(pixel_means)),
            "fused_kernels_images_equal_to_the_torch_ops": int(fused_equal), **hardware}  # fmt: skip


def hardware_vs_pil(paths) -> dict:
    """The hardware engines' pixels (nvImageCodec, `--jpeg-decoder nvimgcodec`) vs PIL's, when the extra is there."""
    from packed_vit.encode.jpeg_decoders import make_jpeg_decoder

    try:
        decoder = make_jpeg_decoder("nvimgcodec", torch.device("cuda"))
    except ValueError as error:
        return {"nvimgcodec": str(error)}
    encoded = [torch.from_numpy(np.fromfile(path, dtype=np.uint8)) for path in paths]
    worst, means = 0, []
    for path, image in zip(paths, decoder.decode(encoded)):
        if isinstance(image, Exception):
            return {"nvimgcodec": f"{path.name}: {image}"}
        pil = torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB"))).permute(2, 0, 1).cuda()
        difference = (pil.int() - image.int()).abs()
        worst, means = max(worst, difference.max().item()), means + [difference.float().mean().item()]
    return {"nvimgcodec_vs_pil_max_pixel_difference": worst, "nvimgcodec_vs_pil_mean_pixel_difference": float(np.mean(means))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_encode"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--parity-images", type=int, default=48)
    parser.add_argument("--configs", default=",".join(CONFIGS),
                        help="comma-separated; NAME:gpu (or :cpu) runs the CLI in that mode alone for NAME")
    parser.add_argument("--modes", default="cpu,gpu")
    parser.add_argument("--checks-configs", default=",".join(CONFIGS),
                        help="configurations whose pixels and embeddings are checked against transformers")
    parser.add_argument("--profile", action="store_true", help="our pipeline's stage clock, in this process")
    parser.add_argument("--profile-chunks", default="128,256",
                        help="the profile's variants, each CHUNK[:DECODER[:graphs]] (profile_pipeline)")
    parser.add_argument("--startup-configs", default="siglip2_256,aimv2_224",
                        help="configurations whose transformers from_pretrained start-up is measured (one per tower)")
    parser.add_argument("--startup-rounds", type=int, default=3,
                        help="start-up runs of ours and of transformers' load, alternating, per start-up config")
    parser.add_argument("--cli-only", action="store_true", help="only the CLI runs (no alone, user, profile, checks)")
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="patches per forward of the CLI runs and of the forwards alone (default: the job's)")
    parser.add_argument("--no-user", action="store_true", help="no transformers user runs")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results_encode.json")
    args = parser.parse_args()

    import transformers

    from packed_vit.encode import load_embeddings, load_model_and_processor
    from packed_vit.encode.job import DEFAULT_MAX_TOKENS

    start = time.perf_counter()
    corpus = args.work / "corpus"
    write_corpus(corpus, args.images)
    paths = sorted(corpus.glob("*.jpg"))
    megapixels = [np.prod(PIL.Image.open(p).size) / 1e6 for p in paths[:500]]
    print(f"corpus: {len(paths)} JPEGs, median {np.median(megapixels):.2f} MP, written in {time.perf_counter() - start:.1f} s", flush=True)
    import torchvision

    max_tokens = args.max_tokens or DEFAULT_MAX_TOKENS
    results = {"environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                               "torchvision": torchvision.__version__, "gpu": torch.cuda.get_device_name(),
                               "cpus": os.cpu_count()},
               "corpus": {"images": len(paths), "median_megapixels": float(np.median(megapixels))},
               "max_tokens": max_tokens, "configs": {}}  # fmt: skip
    for item in args.configs.split(","):
        name, _, only = item.partition(":")
        checkpoint = args.work / name
        write_checkpoint(checkpoint, name)
        row = {"cli": {}}
        embeddings = {}
        for mode in only.split("+") if only else args.modes.split(","):
            out = args.work / f"emb_{name}_{mode}.safetensors"
            row["cli"][mode] = run_cli(corpus, checkpoint, out, mode, args.max_tokens)
            loaded = load_embeddings(out)
            embeddings[mode] = (loaded.names, loaded.tensors()["pooled"])
            print(f"[{name}] cli {mode}: {row['cli'][mode]['printed']}", flush=True)
        if args.cli_only:
            results["configs"][name] = row
            args.out.write_text(json.dumps(results, indent=1))
            continue
        model, processor = load_model_and_processor(str(checkpoint), device="cuda", dtype=torch.bfloat16)
        batches = packed_batches(paths, processor, max_tokens)
        row["forwards_alone"] = forwards_alone(model, batches)
        print(f"[{name}] forwards alone: {row['forwards_alone']}", flush=True)
        row["forwards_alone_cuda_graphs"] = forwards_alone(model.enable_cuda_graphs(max_tokens=max_tokens), batches)
        print(f"[{name}] forwards alone, CUDA graphs: {row['forwards_alone_cuda_graphs']}", flush=True)
        if args.profile:
            variants = args.profile_chunks.split(",")
            row["profile"] = [profile_pipeline(model, processor, paths, variant, max_tokens) for variant in variants]
            print(f"[{name}] profile: {json.dumps(row['profile'], indent=1)}", flush=True)
        del model
        if CONFIGS[name][3] and not args.no_user:
            row["transformers_user"] = transformers_user(paths, checkpoint, name)
            print(f"[{name}] transformers user: {row['transformers_user']}", flush=True)
        if name in args.startup_configs.split(","):
            row["startup"] = startup_comparison(paths, args.work, checkpoint, name, args.startup_rounds)
            print(f"[{name}] start-up: {row['startup']}", flush=True)
        if name in args.checks_configs.split(","):
            spread = paths[:: max(1, len(paths) // args.parity_images)][: args.parity_images]  # over many chunks
            row["preprocessing_check"] = preprocessing_check(spread, name, processor)
            row["parity_bf16_vs_transformers_fp32"] = parity(spread, checkpoint, name,
                                                             embeddings, processor)  # fmt: skip
        print(f"[{name}] checks: {row.get('preprocessing_check')} "
              f"{row.get('parity_bf16_vs_transformers_fp32')}", flush=True)  # fmt: skip
        alone = max(row["forwards_alone"]["images_per_s"], row["forwards_alone_cuda_graphs"]["images_per_s"])
        user = row.get("transformers_user", {}).get("images_per_s")
        for cli in row["cli"].values():
            cli["after_startup_over_forwards_alone"] = cli["images_per_s_after_startup"] / alone
            cli["after_startup_over_transformers_user"] = cli["images_per_s_after_startup"] / user if user else None
        row["forwards_alone_over_transformers_user"] = alone / user if user else None  # the faster of the two alone
        results["configs"][name] = row
        args.out.write_text(json.dumps(results, indent=1))
    if args.cli_only:
        return
    print(f"\n{'config':>12} {'mode':>4} {'img/s':>7} {'alone':>6} {'/alone':>6} {'user':>5} {'/user':>5} "
          f"{'alone/user':>10} {'start s':>7} {'tf load s':>9}")  # fmt: skip
    # start s: this run's; with a start-up comparison, the medians of its rounds (ours, transformers' load)
    for name, row in results["configs"].items():
        user = row.get("transformers_user", {}).get("images_per_s")
        alone = max(row["forwards_alone"]["images_per_s"], row["forwards_alone_cuda_graphs"]["images_per_s"])
        startup = row.get("startup", {})
        for mode, cli in row["cli"].items():
            ratio = cli["after_startup_over_transformers_user"]
            print(f"{name:>12} {mode:>4} {cli['images_per_s_after_startup']:>7.0f} "
                  f"{alone:>6.0f} {cli['after_startup_over_forwards_alone']:>6.2f} "
                  f"{user or 0:>5.0f} {ratio or 0:>5.2f} {row['forwards_alone_over_transformers_user'] or 0:>10.2f} "
                  f"{startup.get('median_ours', cli['startup_seconds']):>7.2f} "
                  f"{startup.get('median_transformers', 0):>9.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
