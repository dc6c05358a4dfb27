"""The encode job on the GPU machine (issue 13, DESIGN §11): end to end vs GPU-only vs a transformers user's loop.

For each `max_num_patches` budget (256, 1024), with Siglip2 so400m/16 random weights in transformers' saved format:
- corpus: `--images` JPEGs of mixed sizes (sides 200..1600 px) cut and resized from scikit-image's photos;
- `cli`: `python -m packed_vit encode CORPUS --model CKPT` run as a user runs it, once per `--preprocess` mode:
  wall clock, start-up (the command's own report: process start to first forward), peak RSS of the command and
  its workers (`ru_maxrss` of the children, the largest process);
- `gpu_only`: the packed forwards alone on the same batches (the processor's patches, packed by the same token
  budget, already on the GPU), timed with CUDA events;
- `transformers`: its `Siglip2ImageProcessor` (default backend) + `Siglip2VisionModel` (sdpa, bf16), 64 images per
  padded batch, one process, on the first `--reference-images` images;
- checks: GPU preprocessing vs transformers' torchvision backend on the same decoded pixels (max abs difference of
  the patches), nvJPEG vs PIL pixels, and bf16 embeddings of both paths vs transformers' fp32 tower per image
  (cosine).
Writes benchmarks/results_encode.json (or --out) and prints a table. Needs CUDA, torchvision, scikit-image.

    python benchmarks/bench_encode.py --work /tmp/bench_encode --out $OUT/results_encode.json
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
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


def write_checkpoint(folder: Path, max_num_patches: int) -> None:
    from transformers import Siglip2VisionConfig, Siglip2VisionModel

    weights = folder.parent / "so400m_weights"
    if not (weights / "model.safetensors").is_file():
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Siglip2VisionModel(Siglip2VisionConfig(**SO400M))
            for parameter in model.parameters():  # away from init (LayerNorms at 1/0 hide errors)
                parameter.data.normal_(0, 0.02).add_(1.0 if parameter.ndim == 1 and parameter.shape[0] else 0)
        model.save_pretrained(weights)
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).exists():
            (folder / name).symlink_to(weights / name)
    from transformers import Siglip2ImageProcessor

    Siglip2ImageProcessor(patch_size=16, max_num_patches=max_num_patches).save_pretrained(folder)


def run_cli(corpus: Path, checkpoint: Path, out: Path, preprocess: str) -> dict:
    arguments = ["encode", str(corpus), "--model", str(checkpoint), "--out", str(out), "--no-progress",
                 "--preprocess", preprocess]  # fmt: skip
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
            "printed": line}  # fmt: skip


def packed_batches(paths, processor):
    """The processor's patches of every image (in a process pool), packed as `encode` packs them."""
    from packed_vit.encode import token_budget_batches
    from packed_vit.encode.job import DEFAULT_MAX_TOKENS

    # forkserver: this process holds a CUDA context by now, which forked children must not inherit
    with get_context("forkserver").Pool(os.cpu_count()) as pool:
        prepared = pool.map(_process, [(processor, p) for p in paths], chunksize=8)
    return list(token_budget_batches(prepared, DEFAULT_MAX_TOKENS, tokens=lambda item: len(item[0])))


def _process(job):
    processor, path = job
    out = processor(PIL.Image.open(path), return_tensors="pt", do_convert_rgb=True)
    return out["pixel_values"].to(torch.bfloat16), out["grid_thw"]


def gpu_only(model, batches) -> dict:
    device_batches = [(torch.cat([b[0] for b in batch]).cuda(), torch.cat([b[1] for b in batch])) for batch in batches]
    images = sum(len(batch) for batch in batches)
    with torch.no_grad():
        for pixels, grid in device_batches[:3]:
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


def transformers_loop(paths, checkpoint: Path, max_num_patches: int) -> dict:
    from transformers import Siglip2ImageProcessor, Siglip2VisionModel

    processor = Siglip2ImageProcessor(patch_size=16, max_num_patches=max_num_patches)
    model = Siglip2VisionModel.from_pretrained(checkpoint, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    def run(batch_paths):
        inputs = processor([PIL.Image.open(p).convert("RGB") for p in batch_paths], return_tensors="pt")
        with torch.no_grad():
            out = model(inputs["pixel_values"].cuda().to(torch.bfloat16), inputs["pixel_attention_mask"].cuda(),
                        inputs["spatial_shapes"])  # fmt: skip
        return out.pooler_output.float().cpu()
    run(paths[:TRANSFORMERS_BATCH])  # warm-up
    torch.cuda.synchronize()
    start = time.perf_counter()
    for i in range(0, len(paths), TRANSFORMERS_BATCH):
        run(paths[i : i + TRANSFORMERS_BATCH])
    seconds = time.perf_counter() - start
    del model
    return {"backend": processor.backend if hasattr(processor, "backend") else type(processor).__name__,
            "images": len(paths), "seconds": seconds, "images_per_s": len(paths) / seconds}  # fmt: skip


def parity(paths, checkpoint: Path, embeddings_by_mode: dict, max_num_patches: int) -> dict:
    """Per-image cosine of our bf16 pooled embeddings vs transformers' fp32 tower on its own processor's pixels:
    the PIL backend for --preprocess cpu, the torchvision backend on CUDA for --preprocess gpu."""
    from transformers import Siglip2ImageProcessor, Siglip2VisionModel

    try:  # transformers 5: the PIL backend has its own class
        from transformers import Siglip2ImageProcessorPil
    except ImportError:
        from transformers import Siglip2ImageProcessor as Siglip2ImageProcessorPil

    model = Siglip2VisionModel.from_pretrained(checkpoint, dtype=torch.float32).cuda().eval()
    processors = {"cpu": Siglip2ImageProcessorPil(patch_size=16, max_num_patches=max_num_patches),
                  "gpu": Siglip2ImageProcessor(patch_size=16, max_num_patches=max_num_patches)}  # fmt: skip
    report = {}
    for mode, (names, pooled) in embeddings_by_mode.items():
        row_of = {name: i for i, name in enumerate(names)}
        cosines = []
        for path in paths:
            image = PIL.Image.open(path).convert("RGB")
            if mode == "gpu":  # the torchvision backend fed nvJPEG's pixels, on the GPU, as the GPU path is
                import torchvision.io

                data = torchvision.io.read_file(str(path))
                image = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device="cuda")
                inputs = processors[mode](image, return_tensors="pt", device="cuda")
            else:
                inputs = processors[mode](image, return_tensors="pt")
            with torch.no_grad():
                ref = model(inputs["pixel_values"].cuda(), inputs["pixel_attention_mask"].cuda(),
                            inputs["spatial_shapes"].cpu()).pooler_output[0].double().cpu()  # fmt: skip
            ours = pooled[row_of[str(path)]].double()
            cosines.append(torch.nn.functional.cosine_similarity(ours, ref, dim=0).item())
        report[mode] = {"images": len(cosines), "min_cosine": min(cosines), "mean_cosine": float(np.mean(cosines))}
    return report


def preprocessing_check(paths, max_num_patches: int) -> dict:
    """GPU path patches vs transformers' torchvision backend on CUDA, same nvJPEG pixels; nvJPEG vs PIL pixels."""
    import torchvision.io
    from transformers import Siglip2ImageProcessor

    from packed_vit.encode.gpu_preprocessing import GpuPreprocessing
    from packed_vit.processing import Siglip2PackingImageProcessor

    ours = GpuPreprocessing(Siglip2PackingImageProcessor(max_num_patches=max_num_patches), torch.device("cuda"))
    theirs = Siglip2ImageProcessor(patch_size=16, max_num_patches=max_num_patches)
    worst_patch, worst_pixel, mean_pixel = 0.0, 0, []
    for path in paths:
        data = torchvision.io.read_file(str(path))
        image = torchvision.io.decode_jpeg(data, mode=torchvision.io.ImageReadMode.RGB, device="cuda")
        patches, (_, h, w) = ours.patches(image)
        expected = theirs(image, return_tensors="pt", device="cuda")
        assert tuple(expected["spatial_shapes"][0].tolist()) == (h, w)
        worst_patch = max(worst_patch, (patches - expected["pixel_values"][0, : h * w].cuda()).abs().max().item())
        pil = torch.from_numpy(np.array(PIL.Image.open(path).convert("RGB"))).permute(2, 0, 1).cuda()
        difference = (pil.int() - image.int()).abs()
        worst_pixel, mean_pixel = max(worst_pixel, difference.max().item()), mean_pixel + [difference.float().mean().item()]
    return {"images": len(paths), "max_abs_patch_difference_vs_transformers_torchvision_cuda": worst_patch,
            "nvjpeg_vs_pil_max_pixel_difference": worst_pixel, "nvjpeg_vs_pil_mean_pixel_difference": float(np.mean(mean_pixel))}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/bench_encode"))
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--reference-images", type=int, default=640)
    parser.add_argument("--parity-images", type=int, default=48)
    parser.add_argument("--budgets", default="256,1024")
    parser.add_argument("--modes", default="cpu,gpu")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results_encode.json")
    args = parser.parse_args()

    from packed_vit.encode import load_embeddings, load_model_and_processor

    start = time.perf_counter()
    corpus = args.work / "corpus"
    write_corpus(corpus, args.images)
    paths = sorted(corpus.glob("*.jpg"))
    megapixels = [np.prod(PIL.Image.open(p).size) / 1e6 for p in paths[:500]]
    print(f"corpus: {len(paths)} JPEGs, median {np.median(megapixels):.2f} MP, written in {time.perf_counter() - start:.1f} s", flush=True)
    results = {"environment": {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "cpus": os.cpu_count()},
               "corpus": {"images": len(paths), "median_megapixels": float(np.median(megapixels))}, "budgets": {}}  # fmt: skip
    for budget in map(int, args.budgets.split(",")):
        checkpoint = args.work / f"so400m_{budget}"
        write_checkpoint(checkpoint, budget)
        row = {"cli": {}}
        embeddings = {}
        for mode in args.modes.split(","):
            out = args.work / f"emb_{budget}_{mode}.safetensors"
            row["cli"][mode] = run_cli(corpus, checkpoint, out, mode)
            loaded = load_embeddings(out)
            embeddings[mode] = (loaded.names, loaded.tensors()["pooled"])
            print(f"[{budget}] cli {mode}: {row['cli'][mode]['printed']}", flush=True)
        model, processor = load_model_and_processor(str(checkpoint), device="cuda", dtype=torch.bfloat16)
        row["gpu_only"] = gpu_only(model, packed_batches(paths, processor))
        del model
        print(f"[{budget}] gpu only: {row['gpu_only']}", flush=True)
        row["transformers"] = transformers_loop(paths[: args.reference_images], checkpoint, budget)
        print(f"[{budget}] transformers: {row['transformers']}", flush=True)
        row["preprocessing_check"] = preprocessing_check(paths[: args.parity_images], budget)
        row["parity_bf16_vs_transformers_fp32"] = parity(paths[: args.parity_images], checkpoint, embeddings, budget)
        print(f"[{budget}] checks: {row['preprocessing_check']} {row['parity_bf16_vs_transformers_fp32']}", flush=True)
        for mode, cli in row["cli"].items():
            cli["end_to_end_over_gpu_only"] = cli["images_per_s"] / row["gpu_only"]["images_per_s"]
            cli["after_startup_over_gpu_only"] = cli["images_per_s_after_startup"] / row["gpu_only"]["images_per_s"]
            cli["end_to_end_over_transformers"] = cli["images_per_s"] / row["transformers"]["images_per_s"]
        results["budgets"][budget] = row
        args.out.write_text(json.dumps(results, indent=1))
    print(f"\n{'budget':>6} {'mode':>4} {'e2e img/s':>10} {'after start':>11} {'gpu-only':>9} {'e2e/gpu':>8} "
          f"{'e2e/tf':>7} {'start-up s':>10} {'RSS GiB':>8}")  # fmt: skip
    for budget, row in results["budgets"].items():
        for mode, cli in row["cli"].items():
            print(f"{budget:>6} {mode:>4} {cli['images_per_s']:>10.0f} {cli['images_per_s_after_startup']:>11.0f} "
                  f"{row['gpu_only']['images_per_s']:>9.0f} {cli['end_to_end_over_gpu_only']:>8.2f} "
                  f"{cli['end_to_end_over_transformers']:>7.1f} {cli['startup_seconds']:>10.2f} "
                  f"{cli['peak_rss_gib_main_process']:>8.2f}")  # fmt: skip
        print(f"{budget:>6} transformers loop: {row['transformers']['images_per_s']:.1f} img/s")


if __name__ == "__main__":
    main()
