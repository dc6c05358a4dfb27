"""A transformers VLM before and after `packed_vit.replace_vision_towers` (DESIGN §13, issue 15).

The client: transformers' LFM2-VL (`Lfm2VlForConditionalGeneration`) with a Siglip2 so400m/16 tower (1152/4304/27
layers/16 heads, 256 positions, no head, as LFM2-VL uses it) and the default LFM2 text config, random weights,
bf16, one prompt holding all images (LFM2-VL's 2x2 downsampling: (h/2)*(w/2) image tokens per image). Images of
mixed sizes, h and w even in [8, 64] with h*w <= 1024 patches, padded to the largest as LFM2-VL's processor does.

For 8 and 64 images (--images), in one process, three sides: "original", transformers' tower (sdpa, padded
batch); "replaced", after `replace_vision_towers(model)` in place (the packed tower on the same Parameters); and
"graphs", after `replace_vision_towers(model, cuda_graphs=True)` (the same tower replaying CUDA graphs for
inference batches up to 16384 patches; eager above that, on the CPU, and in training, so this side has no train
step; --no-graphs skips it):
- tower: the vision tower's forward alone, as `get_image_features` calls it;
- prefill: the model's forward on the prompt with its images, `logits_to_keep=1` (what `generate` runs first);
- train: forward with labels (text tokens) + backward, gradients set to None before each step.
Median milliseconds of CUDA-event timings after warm-up (bench.py's `time_ms`), peak allocated GiB of one call
(weights included: the same model on both sides), host-synchronizing CUDA calls of one tower forward
(`torch.cuda.set_sync_debug_mode("warn")`), and the agreement of each packed side with the original (cosine of
the prefill's logits and of the tower's real-token outputs; bf16, so not bit-equal).

GPU:      python benchmarks/bench_vlm.py --out benchmarks/vlm_results.json
CPU smoke (tiny configs, fp32, the numbers mean nothing): python benchmarks/bench_vlm.py --smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import warnings
from pathlib import Path

import torch
import transformers
from transformers import Lfm2Config, Lfm2VlConfig, Lfm2VlForConditionalGeneration, Siglip2VisionConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from measure import GIB, device_name, import_packed_vit, time_ms  # noqa: E402

SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=16)
TINY_VISION = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
TINY_TEXT = dict(
    vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
)  # fmt: skip
TEXT_TOKEN = 5  # a plain text token around the images
SIDES = ("original", "replaced", "graphs")
STEPS = ("tower", "prefill", "train")
GRAPH_STEPS = ("tower", "prefill")  # training runs eagerly: the graphs side's train step would be "replaced"'s


def build_model(smoke: bool, device: torch.device, dtype: torch.dtype) -> Lfm2VlForConditionalGeneration:
    vision = Siglip2VisionConfig(**(TINY_VISION if smoke else SO400M), vision_use_head=False)
    text = Lfm2Config(**TINY_TEXT) if smoke else Lfm2Config()
    extra = dict(projector_hidden_size=64) if smoke else {}
    config = Lfm2VlConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), **extra)
    with torch.device(device):  # random init straight on the device, in the benchmark's dtype
        return Lfm2VlForConditionalGeneration._from_config(config, dtype=dtype)


def sample_image_shapes(count: int, half_sides: tuple[int, int], max_patches: int, generator) -> list[tuple[int, int]]:
    """(h, w) in patches: even, uniform in [2 * half_sides[0], 2 * half_sides[1]], h*w <= max_patches."""
    shapes = []
    while len(shapes) < count:
        h, w = (2 * torch.randint(half_sides[0], half_sides[1] + 1, (2,), generator=generator)).tolist()
        if h * w <= max_patches:
            shapes.append((h, w))
    return shapes


def make_inputs(model, shapes, device, dtype, generator) -> dict:
    """LFM2-VL's inputs for one prompt with these images: padded patches, mask, spatial shapes, token ids, labels."""
    config = model.config
    patch_dim = config.vision_config.num_channels * config.vision_config.patch_size**2
    max_patches = max(h * w for h, w in shapes)
    pixel_values = torch.zeros(len(shapes), max_patches, patch_dim)
    pixel_attention_mask = torch.zeros(len(shapes), max_patches, dtype=torch.long)
    ids = []
    for i, (h, w) in enumerate(shapes):
        pixel_values[i, : h * w] = torch.randn(h * w, patch_dim, generator=generator)  # random, not zeros
        pixel_attention_mask[i, : h * w] = 1
        factor = config.downsample_factor
        ids += [TEXT_TOKEN] * 4 + [config.image_token_id] * ((h // factor) * (w // factor))
    input_ids = torch.tensor([ids + [TEXT_TOKEN] * 16])
    return dict(
        input_ids=input_ids.to(device),
        labels=input_ids.masked_fill(input_ids == config.image_token_id, -100).to(device),
        pixel_values=pixel_values.to(device, dtype),
        pixel_attention_mask=pixel_attention_mask.to(device),
        spatial_shapes=torch.tensor(shapes).to(device),
    )


def vision_inputs(inputs: dict) -> dict:
    return {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}


def peak_gib(run, device) -> float | None:
    """Peak allocated GiB during one call (the model's weights included)."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def host_syncs(run, device) -> int | None:
    """Synchronizing CUDA calls (device->host copies, .item(), ...) of one call of `run`."""
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure_side(model, inputs: dict, args, device, steps=STEPS) -> tuple[dict, dict]:
    """(numbers of each of `steps`, outputs to compare) for the model as it is now."""
    tower = model.model.vision_tower

    def tower_forward():
        with torch.no_grad():
            return tower(**vision_inputs(inputs)).last_hidden_state

    def prefill():
        with torch.no_grad():
            forward_inputs = {k: v for k, v in inputs.items() if k != "labels"}
            return model(**forward_inputs, logits_to_keep=1).logits

    def train_step():
        model.zero_grad(set_to_none=True)
        model(**inputs).loss.backward()

    numbers = {}
    runs = dict(tower=tower_forward, prefill=prefill, train=train_step)
    for name in steps:
        run = runs[name]
        model.train(name == "train")
        times = time_ms(run, args.repeats, args.warmup, device)
        numbers[name] = dict(
            ms=statistics.median(times), times_ms=[round(t, 3) for t in times], peak_gib=peak_gib(run, device)
        )
    model.zero_grad(set_to_none=True)
    model.eval()
    numbers["tower"]["host_syncs"] = host_syncs(tower_forward, device)
    mask = inputs["pixel_attention_mask"] > 0
    outputs = dict(tower_tokens=tower_forward()[mask].float(), logits=prefill().float())
    return numbers, outputs


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", default="8,64", help="comma-separated image counts (default 8,64)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU in fp32: checks the script runs")
    parser.add_argument("--no-graphs", action="store_true", help="skip the side with cuda_graphs=True")
    parser.add_argument("--out", type=Path, help="write the results as JSON here")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    packed_vit = import_packed_vit()
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    # h, w even in [8, 64], h*w <= 1024 patches; the smoke run: [2, 16], <= 64
    half_sides, max_patches = ((1, 8), 64) if args.smoke else ((4, 32), 1024)
    torch.manual_seed(args.seed)
    model = build_model(args.smoke, device, dtype).eval()
    generator = torch.Generator().manual_seed(args.seed)
    batches = {}
    for count in map(int, args.images.split(",")):
        shapes = sample_image_shapes(count, half_sides, max_patches, generator)
        batches[count] = make_inputs(model, shapes, device, dtype, generator)

    sides, outputs = {}, {}
    measured = SIDES[:2] if args.no_graphs else SIDES
    for side in measured:
        if side == "replaced":
            replaced = packed_vit.replace_vision_towers(model)
            tower_class = type(model.model.vision_tower).__name__
            print(f"replace_vision_towers: {replaced} tower(s) -> {tower_class}", flush=True)
        if side == "graphs":
            packed_vit.replace_vision_towers(model, cuda_graphs=True)  # the tower above, now with graphs
            print("replace_vision_towers(cuda_graphs=True): CUDA graphs on", flush=True)
        side_steps = GRAPH_STEPS if side == "graphs" else STEPS
        for count, inputs in batches.items():
            numbers, outputs[side, count] = measure_side(model, inputs, args, device, side_steps)
            sides.setdefault(count, {})[side] = numbers
            steps = ", ".join(f"{step} {v['ms']:.1f} ms" for step, v in numbers.items())
            print(f"{side:8s} {count:3d} images: {steps}", flush=True)

    results = dict(
        device=device_name(device), torch=torch.__version__, transformers=transformers.__version__,
        command=" ".join(["python", *sys.argv]), repeats=args.repeats, warmup=args.warmup, seed=args.seed,
        sides=list(measured), workloads=[],
    )  # fmt: skip
    for count, inputs in batches.items():
        mask = inputs["pixel_attention_mask"]
        original = outputs["original", count]
        workload = dict(
            images=count, patches=int(mask.sum()), padded_patches=mask.numel(),
            prompt_tokens=inputs["input_ids"].shape[1], **sides[count],
        )  # fmt: skip
        for side in measured[1:]:  # "tower_cosine" / "logits_cosine" for "replaced", "graphs_tower_cosine", ...
            prefix = "" if side == "replaced" else f"{side}_"
            workload[f"{prefix}tower_cosine"] = cosine(outputs[side, count]["tower_tokens"], original["tower_tokens"])
            workload[f"{prefix}logits_cosine"] = cosine(outputs[side, count]["logits"], original["logits"])
        results["workloads"].append(workload)
    print_table(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return results


def print_table(results: dict) -> None:
    print(f"\n{results['device']}, torch {results['torch']}, transformers {results['transformers']}")
    packed = results["sides"][1:]
    columns = ["images", "patches (padded)", "prompt tokens", "step", "original ms"]
    columns += [f"{side} ms" for side in packed] + [f"speed-up {side}" for side in packed]
    columns += [f"{side} peak GiB" for side in results["sides"]]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    for w in results["workloads"]:
        for step in STEPS:
            numbers = [w[side].get(step) for side in results["sides"]]  # None: the side has no such step
            ms = [f"{n['ms']:.1f}" if n else "n/a" for n in numbers]
            speedups = [f"{numbers[0]['ms'] / n['ms']:.2f}x" if n else "n/a" for n in numbers[1:]]
            gib = [f"{n['peak_gib']:.2f}" if n and n["peak_gib"] is not None else "n/a" for n in numbers]
            cells = [str(w["images"]), f"{w['patches']} ({w['padded_patches']})", str(w["prompt_tokens"]), step]
            print("| " + " | ".join(cells + ms + speedups + gib) + " |")
    for w in results["workloads"]:
        syncs = " -> ".join(str(w[side]["tower"]["host_syncs"]) for side in results["sides"])
        agreement = "; ".join(
            f"{side} tower tokens {w[prefix + 'tower_cosine']:.5f}, prefill logits {w[prefix + 'logits_cosine']:.5f}"
            for side, prefix in ((side, "" if side == "replaced" else f"{side}_") for side in packed)
        )
        print(f"{w['images']} images: host syncs per tower forward {syncs}; cosine vs original: {agreement}")


if __name__ == "__main__":
    main()
