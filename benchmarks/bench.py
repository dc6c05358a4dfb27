"""Packed towers vs transformers' reference, run as a user would without this project (DESIGN §8).

Side by side in one process, random bf16 data, random-init weights (no checkpoint), models in bf16 and eval mode:

| id | ours (packed, one forward)                                        | reference (transformers, sdpa)         |
|----|-------------------------------------------------------------------|----------------------------------------|
| W1 | Siglip2 so400m/16, 64 images, h,w in [8,64], h*w <= 1024           | Siglip2VisionModel padded to 1024      |
| W2 | Siglip2 so400m/16, 256 images, h,w in [4,32], h*w <= 256           | Siglip2VisionModel padded to 256       |
| W3 | AIMv2 large/14 224 (learned positions), 256 images of 16x16        | Aimv2VisionModel on [256,3,224,224]    |
| W4 | AIMv2 large/14 native (sin-cos, no head), 64 images, h,w in [8,48] | Aimv2VisionModel, one call per image   |
| W5 | W1 forward + backward (loss: real tokens' outputs x random weights)| W1's reference, forward + backward     |

Also: a bf16 8192^3 matmul (the ceiling "% of ceiling" divides by), a token-scaling sweep (Siglip2 so400m,
images of 16x16..32x32 patches, 1k -> 256k tokens, reference padded to 1024, skipped where it runs out of memory),
peak memory of both sides, and whether our forward with a CPU `grid_thw` syncs the host
(`torch.cuda.set_sync_debug_mode("error")` around one forward of every forward workload).

Outputs, in --out-dir (default: benchmarks/): results.json, RESULTS.md (everything above a hand-written
"## Notes" section is regenerated, the section itself is kept) and scaling.png (needs matplotlib; skipped with
a message without it). The last thing printed is a short table.

GPU (a few minutes on an H100; full output and files land in benchmarks/):
    python benchmarks/bench.py
    python benchmarks/bench.py --workloads W1,W5 --backend varlen_attn --repeats 20 --compile
CPU smoke run (tiny configs, a few tokens, every step including the files; the numbers mean nothing):
    python benchmarks/bench.py --smoke --out-dir /tmp/bench_smoke

Method: CUDA events around each call after warm-up, median of --repeats calls (at most 5 for W4's per-image
loop, which is slow); on the CPU the host clock. Peak memory of a side is what it would need alone: its weights
and inputs plus the most one call allocates on top of what is resident (`max_memory_allocated()` after
`reset_peak_memory_stats()`, minus `memory_allocated()` before), so the other side's model, resident in the same
process, does not count. The reference gets its friendliest inputs: `spatial_shapes` on the CPU (it reads them
image by image). Useful FLOPs count the real tokens' work only (`useful_flops`), the same number for both sides.

The package need not be installed: without it, `packed_vit` is imported from this checkout (setup.py's mapping).
Here: what is measured (towers, workloads, sweep, latency), the batches, the models and each measurement; the timers
are measure.py's (shared with bench_vlm.py and probes/), the files and tables report.py's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import gc
import json
import platform
import shlex
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Siglip2VisionConfig, Siglip2VisionModel

sys.path.insert(0, str(Path(__file__).resolve().parent))  # measure.py, report.py, also when loaded by path (tests)
from measure import (  # noqa: E402
    GIB, ROOT, device_name, gpu_kernel_ms, host_sync_check, import_packed_vit, peak_memory_gib, time_ms,
    unless_out_of_memory,
)  # fmt: skip
from report import (  # noqa: E402
    CEILING, MEM_RATIO, SPEEDUP, fmt, log, print_table, write_results_md, write_scaling_plot,
)  # fmt: skip

packed_vit = import_packed_vit()

# --------------------------------------------------------------------------------------------------------------
# What is measured: towers, workloads, the sweep
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tower:
    name: str
    family: str  # "siglip2" | "aimv2": which reference and packed classes
    fields: dict  # config fields, the same for the reference's config and ours
    smoke_fields: dict  # tiny config of the same family for --smoke

    def label(self, smoke: bool) -> str:
        return f"{self.name} (tiny smoke config)" if smoke else self.name


TOWERS = {
    "siglip2_so400m": Tower(
        "Siglip2 so400m/16",
        "siglip2",
        dict(
            hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
            num_patches=256, patch_size=16, vision_use_head=True,
        ),
        # a 4x4 position table: smoke images are smaller and larger than it, like the real ones are around 16x16
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_patches=16, patch_size=16, vision_use_head=True,
        ),
    ),
    "aimv2_large_224": Tower(
        "AIMv2 large/14 224",
        "aimv2",
        dict(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8,
            image_size=224, patch_size=14, use_head=True, is_native=False,
        ),
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=56, patch_size=14, use_head=True, is_native=False,
        ),
    ),
    "aimv2_large_native": Tower(
        "AIMv2 large/14 native",
        "aimv2",
        dict(
            hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8,
            image_size=224, patch_size=14, use_head=False, is_native=True,
        ),
        dict(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            image_size=56, patch_size=14, use_head=False, is_native=True,
        ),
    ),
}  # fmt: skip


@dataclass(frozen=True)
class Workload:
    id: str
    tower: str  # key of TOWERS
    images: int
    sides: tuple[int, int]  # h and w drawn uniformly in [lo, hi] patches
    max_patches: int | None  # h*w <= this (drawn again until it holds); the padded length of a "padded" reference
    reference: str  # "padded" (one padded batch) | "batched" (one batch of same-size images) | "per_image" (a loop)
    goals: tuple[tuple[str, str, float], ...]  # (result key, ">=" or "<=", threshold)
    backward: bool = False
    smoke: tuple = ()  # (images, sides, max_patches) for --smoke

    def for_smoke(self) -> "Workload":
        images, sides, max_patches = self.smoke
        return dataclasses.replace(self, images=images, sides=sides, max_patches=max_patches)

    def description(self, smoke: bool = False) -> str:
        lo, hi = self.sides
        shape = f"{lo}x{lo} patches" if lo == hi else f"h,w in [{lo},{hi}]"
        bound = f", h*w <= {self.max_patches}" if self.max_patches and lo != hi else ""
        step = ", forward+backward" if self.backward else ""
        return f"{TOWERS[self.tower].label(smoke)}: {self.images} images, {shape}{bound}{step}"

    def reference_description(self) -> str:
        family = TOWERS[self.tower].family
        cls = "Siglip2VisionModel" if family == "siglip2" else "Aimv2VisionModel"
        how = {
            "padded": f"padded to {self.max_patches} patches with pixel_attention_mask",
            "batched": "one batch of same-size images",
            "per_image": "one call per image",
        }[self.reference]
        return f"{cls} (sdpa), {how}"


W1 = Workload(
    "W1", "siglip2_so400m", 64, (8, 64), 1024, "padded",
    goals=((SPEEDUP, ">=", 3.0), (CEILING, ">=", 65.0), (MEM_RATIO, "<=", 0.7)),
    smoke=(3, (2, 8), 32),
)  # fmt: skip
WORKLOADS = {
    "W1": W1,
    "W2": Workload(
        "W2", "siglip2_so400m", 256, (4, 32), 256, "padded", goals=((SPEEDUP, ">=", 3.0),), smoke=(5, (1, 4), 9)
    ),
    "W3": Workload(
        "W3", "aimv2_large_224", 256, (16, 16), 256, "batched", goals=((SPEEDUP, ">=", 1.8),), smoke=(3, (4, 4), 16)
    ),
    "W4": Workload(
        "W4", "aimv2_large_native", 64, (8, 48), None, "per_image", goals=((SPEEDUP, ">=", 15.0),),
        smoke=(3, (2, 6), None),
    ),
    "W5": dataclasses.replace(W1, id="W5", backward=True, goals=((SPEEDUP, ">=", 2.5), (MEM_RATIO, "<=", 0.55))),
}  # fmt: skip


@dataclass(frozen=True)
class Sweep:
    tower: str
    sides: tuple[int, int]
    max_patches: int  # the reference's padded length
    tokens: tuple[int, ...]  # total real tokens of each point (images are drawn until the total reaches it)


SWEEP = Sweep("siglip2_so400m", (16, 32), 1024, (1024, 4096, 16384, 65536, 262144))
SMOKE_SWEEP = Sweep("siglip2_so400m", (2, 4), 16, (64, 256))


@dataclass(frozen=True)
class Latency:
    """Small batches (DESIGN §12): `images` square images of `side` x `side` patches each, every pair in `batches`."""

    tower: str
    batches: tuple[tuple[int, int], ...]  # (images, side)
    graph_max_kernel_ratio: float  # goal: latency with CUDA graphs <= this x the GPU's kernel time
    min_speedup: dict  # goal: (images, side) -> reference ms / ours with CUDA graphs ms


LATENCY = Latency("siglip2_so400m", ((1, 16), (4, 16), (16, 16), (1, 32), (4, 32), (16, 32)), 1.3,
                  {(1, 16): 4.0, (4, 16): 4.0})  # fmt: skip
SMOKE_LATENCY = dataclasses.replace(LATENCY, batches=((1, 4), (4, 4)), min_speedup={})


@dataclass(frozen=True)
class Settings:
    device: torch.device
    repeats: int
    warmup: int
    backend: str  # our attn_implementation
    compile: bool
    smoke: bool
    matmul_size: int


PER_IMAGE_REPEATS = 5  # cap on the timed calls of W4's per-image reference loop, the slow one


# --------------------------------------------------------------------------------------------------------------
# Useful FLOPs
# --------------------------------------------------------------------------------------------------------------


def useful_flops(config: dict, family: str, image_tokens: list[int], backward: bool = False) -> float:
    """Floating-point operations of the real tokens' work (no padding) in one forward, or forward+backward.

    With N = sum(L_i) real tokens (L_i of image i), D hidden, I intermediate, P = patch_size^2 * channels:
    - encoder, per layer: 2*N*(4*D^2 + m*D*I) for the q, k, v, out projections and the MLP (m = 2: fc1, fc2;
      m = 3 for AIMv2's SwiGLU: gate, up, down), plus 4*D*sum(L_i^2) for attention (Q K^T and P V);
    - patch embedding: 2*N*P*D;
    - head, one query per image: key and value projections 2*N*2*D^2 and attention 4*D*N; then per image the
      output projection 2*D^2 (and Siglip2's MLP 2*2*D*I); Siglip2's learned probe is projected once: 2*D^2.
    Norms, activations, softmax, residual adds and position embeddings (our resize of the learned table is a small
    matmul; the reference's is an interpolation) are not counted. Backward costs 2x forward: fwd+bwd = 3x fwd.
    """
    d, i = config["hidden_size"], config["intermediate_size"]
    n, images = sum(image_tokens), len(image_tokens)
    mlp_matrices = 2 if family == "siglip2" else 3
    per_layer = 2 * n * (4 * d * d + mlp_matrices * d * i) + 4 * d * sum(length**2 for length in image_tokens)
    patch_embedding = 2 * n * (config["patch_size"] ** 2 * config.get("num_channels", 3)) * d
    flops = config["num_hidden_layers"] * per_layer + patch_embedding
    if config.get("vision_use_head", config.get("use_head")):
        flops += 2 * n * 2 * d * d + 4 * d * n + images * 2 * d * d
        if family == "siglip2":
            flops += 2 * d * d + images * 2 * 2 * d * i
    return 3.0 * flops if backward else float(flops)


# --------------------------------------------------------------------------------------------------------------
# Data: packed for ours, as the reference takes it
# --------------------------------------------------------------------------------------------------------------


def sample_grids(count: int, sides: tuple[int, int], max_patches: int | None, generator) -> list[tuple[int, int, int]]:
    """`count` grids (1, h, w), h and w uniform in [lo, hi], each drawn again until h*w <= max_patches."""
    grids = []
    while len(grids) < count:
        h, w = torch.randint(sides[0], sides[1] + 1, (2,), generator=generator).tolist()
        if max_patches is None or h * w <= max_patches:
            grids.append((1, h, w))
    return grids


def grids_for_tokens(total: int, sides: tuple[int, int], max_patches: int, generator) -> list[tuple[int, int, int]]:
    """Grids drawn one by one until their tokens reach `total` (the last image may overshoot it)."""
    grids, tokens = [], 0
    while tokens < total:
        (grid,) = sample_grids(1, sides, max_patches, generator)
        grids.append(grid)
        tokens += grid[1] * grid[2]
    return grids


@dataclass
class Batch:
    """One workload's images: packed for ours, and as the reference's calls take them."""

    grid_thw: torch.Tensor  # [B, 3] int64, CPU (our forward's host-side metadata comes from here, no sync)
    patches: torch.Tensor  # [N, P] on the device
    reference_calls: list[dict]  # keyword arguments of each reference call (one batch, or one call per image)
    reference_token_index: list[torch.Tensor | None]  # real tokens of each call's flattened [b*L] output; None: all
    reference_tokens: int  # tokens the reference computes, padding included
    # random weights of the loss of backward workloads: sum(last_hidden_state * w) + sum(pooler_output * w_pool)
    loss_weights: torch.Tensor | None  # [N, D]
    pooled_loss_weights: torch.Tensor | None  # [B, D]

    @property
    def image_tokens(self) -> list[int]:
        return self.grid_thw[:, 1:].prod(1).tolist()

    def reference_real_tokens(self, outputs) -> torch.Tensor:
        """The reference's last_hidden_state of the real tokens, packed like ours: [N, D]."""
        tokens = [out.last_hidden_state.flatten(0, 1) for out in outputs]
        indices = self.reference_token_index
        return torch.cat([t if index is None else t.index_select(0, index) for t, index in zip(tokens, indices)])

    def loss(self, last_hidden_state: torch.Tensor, pooler_output: torch.Tensor | None) -> torch.Tensor:
        """The same scalar for both sides: only real tokens count."""
        loss = (last_hidden_state * self.loss_weights).sum()
        return loss if pooler_output is None else loss + (pooler_output * self.pooled_loss_weights).sum()

    def input_bytes(self, side: str) -> int:
        """Device bytes of one side's inputs, the loss weights included."""
        tensors = [self.patches] if side == "ours" else [v for call in self.reference_calls for v in call.values()]
        tensors += [t for t in (self.loss_weights, self.pooled_loss_weights) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors if t.device.type != "cpu")


def make_batch(grids, tower_config: dict, reference: str, max_patches, device, generator, backward=False) -> Batch:
    """Random bf16 patches of `grids` (not zeros: zeros run faster than real data), in both forms."""
    grid_thw = torch.tensor(grids, dtype=torch.int64)
    p, channels, dim = tower_config["patch_size"], tower_config.get("num_channels", 3), tower_config["hidden_size"]
    lengths = grid_thw[:, 1:].prod(1)
    total = int(lengths.sum())
    patches = torch.randn(total, p * p * channels, generator=generator).to(device, torch.bfloat16)

    def loss_weights(rows: int):
        return torch.randn(rows, dim, generator=generator).to(device, torch.bfloat16) if backward else None

    batch = Batch(
        grid_thw=grid_thw,
        patches=patches,
        reference_calls=[],
        reference_token_index=[],
        reference_tokens=total,
        loss_weights=loss_weights(total),
        pooled_loss_weights=loss_weights(len(grids)),
    )
    if reference == "padded":  # Siglip2: [B, max_patches, P] padded patches, as Siglip2ImageProcessor makes them
        valid = torch.arange(max_patches)[None, :] < lengths[:, None]  # [B, max_patches]
        real = valid.flatten().nonzero().squeeze(1).to(device)
        pixel_values = patches.new_zeros(len(grids) * max_patches, patches.shape[1]).index_copy_(0, real, patches)
        batch.reference_calls = [
            dict(
                pixel_values=pixel_values.view(len(grids), max_patches, -1),
                pixel_attention_mask=valid.long().to(device),
                spatial_shapes=grid_thw[:, 1:].clone(),  # CPU: the reference reads it image by image
            )
        ]
        batch.reference_token_index = [real]
        batch.reference_tokens = len(grids) * max_patches
    else:  # AIMv2 takes images: the patches put back in place, (row, col, channel) -> [C, h*p, w*p]
        images = [
            image.view(1, h, w, p, p, channels).permute(0, 5, 1, 3, 2, 4).reshape(1, channels, h * p, w * p)
            for image, (_, h, w) in zip(patches.split(lengths.tolist()), grids)
        ]
        if reference == "batched":
            batch.reference_calls = [dict(pixel_values=torch.cat(images))]
        else:
            batch.reference_calls = [dict(pixel_values=image) for image in images]
        batch.reference_token_index = [None] * len(batch.reference_calls)
    return batch


# --------------------------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Pair:
    tower: Tower
    config: dict
    reference: torch.nn.Module
    ours: torch.nn.Module  # what is timed: compiled with --compile
    ours_eager: torch.nn.Module  # the module itself (the host-sync check runs it uncompiled)
    backend: str  # the attention backend our forward resolves to

    def parameter_bytes(self, side: str) -> int:
        model = self.ours_eager if side == "ours" else self.reference
        return sum(t.numel() * t.element_size() for t in model.parameters())


def so400m_on_cuda():
    """Our Siglip2 so400m/16 tower, random weights, bf16, eval, built on the GPU (the probes' model)."""
    config = packed_vit.Siglip2PackingVisionConfig(**TOWERS["siglip2_so400m"].fields)
    with torch.device("cuda"):
        return packed_vit.Siglip2PackingVisionModel(config).bfloat16().eval()


def build_pair(tower: Tower, settings: Settings) -> Pair:
    """The reference (random init, sdpa) and ours with the reference's weights, both bf16, eval, on the device."""
    fields = tower.smoke_fields if settings.smoke else tower.fields
    if tower.family == "siglip2":
        ref_config, ref_cls = Siglip2VisionConfig, Siglip2VisionModel
        our_config, our_cls = packed_vit.Siglip2PackingVisionConfig, packed_vit.Siglip2PackingVisionModel
    else:
        ref_config, ref_cls = Aimv2VisionConfig, Aimv2VisionModel
        our_config, our_cls = packed_vit.Aimv2PackingVisionConfig, packed_vit.Aimv2PackingVisionModel
    with settings.device:  # initialized in place: so400m's fp32 init on the host would take a while
        reference = ref_cls(ref_config(**fields, attn_implementation="sdpa")).to(torch.bfloat16).eval()
        ours = our_cls(our_config(**fields, attn_implementation=settings.backend)).to(torch.bfloat16).eval()
    ours.load_state_dict(reference.state_dict(), strict=True)
    backend = ours.attention_backend(settings.device, torch.bfloat16)
    timed = torch.compile(ours) if settings.compile else ours
    return Pair(tower, fields, reference, timed, ours, backend)


# --------------------------------------------------------------------------------------------------------------
# Measuring (the timers are measure.py's)
# --------------------------------------------------------------------------------------------------------------


def measure_side(run, repeats: int, resident_bytes: int, settings: Settings) -> dict:
    times = time_ms(run, repeats, settings.warmup, settings.device)
    return dict(
        ms=statistics.median(times),
        times_ms=[round(t, 4) for t in times],
        peak_gib=peak_memory_gib(run, resident_bytes, settings.device),
    )


def matmul_tflops(settings: Settings) -> float:
    """Median TFLOP/s of a bf16 n^3 torch.matmul on random data (the ceiling our useful TFLOP/s are compared with).

    20 warm-up products first: an idle GPU's clocks take a moment to rise.
    """
    n = settings.matmul_size
    a = torch.randn(n, n, device=settings.device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=settings.device, dtype=torch.bfloat16)
    times = time_ms(lambda: torch.matmul(a, b), max(settings.repeats, 20), 20, settings.device)
    return 2 * n**3 / (statistics.median(times) * 1e-3) / 1e12


def min_image_cosine(ours_tokens: torch.Tensor, reference_tokens: torch.Tensor, image_tokens: list[int]) -> float:
    """Lowest per-image cosine of ours vs the reference: proof that both sides computed the same images."""
    pairs = zip(ours_tokens.float().split(image_tokens), reference_tokens.float().split(image_tokens))
    return min(F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item() for a, b in pairs)


def side_runs(pair: Pair, batch: Batch, backward: bool):
    """(ours, reference) callables for one timed call: a no-grad forward, or forward + loss + backward."""

    def ours_forward():
        return pair.ours(batch.patches, batch.grid_thw)

    def reference_forward():
        return [pair.reference(**call) for call in batch.reference_calls]

    if not backward:
        return torch.no_grad()(ours_forward), torch.no_grad()(reference_forward)

    # Each step ends with its grads dropped, as optimizer.zero_grad(set_to_none=True) would after the update: the
    # next step allocates them afresh, and peak_memory_gib counts them (they are not resident before the call).
    def ours_step():
        out = ours_forward()
        batch.loss(out.last_hidden_state, out.pooler_output).backward()
        pair.ours.zero_grad(set_to_none=True)

    def reference_step():
        outs = reference_forward()
        pooled = None if outs[0].pooler_output is None else torch.cat([out.pooler_output for out in outs])
        batch.loss(batch.reference_real_tokens(outs), pooled).backward()
        pair.reference.zero_grad(set_to_none=True)

    return ours_step, reference_step


# --------------------------------------------------------------------------------------------------------------
# Workloads and the sweep
# --------------------------------------------------------------------------------------------------------------


def ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def tflop_per_s(flops: float, ms: float | None) -> float | None:
    return None if ms is None else flops / (ms * 1e-3) / 1e12


def goals_met(record: dict, goals) -> tuple[list[dict], bool | None]:
    """Each goal with its verdict (None where its number is missing, e.g. memory on the CPU); all met?"""
    verdicts = []
    for key, op, threshold in goals:
        value = record[key]
        met = None if value is None else (value >= threshold if op == ">=" else value <= threshold)
        verdicts.append(dict(metric=key, op=op, threshold=threshold, value=value, met=met))
    return verdicts, all_met(v["met"] for v in verdicts)


def all_met(flags) -> bool | None:
    """False if any is False, else None if any is unknown, else True."""
    flags = list(flags)
    return False if False in flags else None if None in flags else True


def run_workload(workload: Workload, pair: Pair, settings: Settings, ceiling_tflops: float, generator) -> dict:
    """One workload, both sides: timings, useful TFLOP/s, peak memory, a same-images check and the host-sync check.

    A side that runs out of GPU memory gets None for its numbers instead of ending the run.
    """
    grids = sample_grids(workload.images, workload.sides, workload.max_patches, generator)
    batch = make_batch(
        grids, pair.config, workload.reference, workload.max_patches, settings.device, generator, workload.backward
    )

    @torch.no_grad()
    def same_images_check() -> float:  # one untimed forward of each side
        ours_out = pair.ours(batch.patches, batch.grid_thw).last_hidden_state
        reference_outs = [pair.reference(**call) for call in batch.reference_calls]
        return min_image_cosine(ours_out, batch.reference_real_tokens(reference_outs), batch.image_tokens)

    cosine = unless_out_of_memory(same_images_check)
    runs = dict(zip(("ours", "reference"), side_runs(pair, batch, workload.backward)))
    repeats = dict(ours=settings.repeats, reference=settings.repeats)
    if workload.reference == "per_image":
        repeats["reference"] = min(settings.repeats, PER_IMAGE_REPEATS)
    measured = {}
    for side, run in runs.items():
        resident = pair.parameter_bytes(side) + batch.input_bytes(side)
        measured[side] = unless_out_of_memory(lambda: measure_side(run, repeats[side], resident, settings)) or dict(
            ms=None, times_ms=None, peak_gib=None, out_of_memory=True
        )
    synced, sync_detail = None, "not checked: forward workloads only"
    if not workload.backward:
        with torch.no_grad():
            forward = functools.partial(pair.ours_eager, batch.patches, batch.grid_thw)  # uncompiled
            synced, sync_detail = host_sync_check(forward, settings.device)

    ours, reference = measured["ours"], measured["reference"]
    flops = useful_flops(pair.config, pair.tower.family, batch.image_tokens, workload.backward)
    useful_tflops = tflop_per_s(flops, ours["ms"])
    record = dict(
        id=workload.id,
        description=workload.description(settings.smoke),
        reference=workload.reference_description(),
        images=len(grids),
        tokens=sum(batch.image_tokens),
        reference_tokens=batch.reference_tokens,
        ours_ms=ours["ms"],
        reference_ms=reference["ms"],
        speedup_vs_reference=ratio(reference["ms"], ours["ms"]),
        useful_gflop=flops / 1e9,
        useful_tflops=useful_tflops,
        reference_useful_tflops=tflop_per_s(flops, reference["ms"]),
        pct_of_matmul_ceiling=None if useful_tflops is None else 100.0 * useful_tflops / ceiling_tflops,
        peak_mem_gib_ours=ours["peak_gib"],
        peak_mem_gib_reference=reference["peak_gib"],
        peak_mem_ratio_vs_reference=ratio(ours["peak_gib"], reference["peak_gib"]),
        ours_out_of_memory=ours.get("out_of_memory", False),
        reference_out_of_memory=reference.get("out_of_memory", False),
        min_image_cosine_vs_reference=cosine,
        host_sync_free=synced,
        host_sync_detail=sync_detail,
        ours_times_ms=ours["times_ms"],
        reference_times_ms=reference["times_ms"],
    )
    record["goals"], record["met"] = goals_met(record, workload.goals)
    return record


def run_latency(latency: Latency, pair: Pair, settings: Settings, generator) -> tuple[list[dict], dict]:
    """Small-batch latency: ours eager, ours with CUDA graphs, the reference (padded batch, as in W1), the GPU's kernel
    time of our eager forward (profiler) and one replay of the captured graph alone. -> (rows, graph memory)."""
    model, on_gpu = pair.ours_eager, settings.device.type == "cuda"
    batches = [
        make_batch([(1, side, side)] * images, pair.config, "padded", side * side, settings.device, generator)
        for images, side in latency.batches
    ]
    # The graphs' memory: captured one after the other right after emptying torch's cache, so that what they
    # allocate (static buffers, their private pool) is what torch reserves anew.
    if on_gpu:
        gc.collect()
        torch.cuda.empty_cache()
        allocated_before, reserved_before = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
    model.enable_cuda_graphs()
    with torch.no_grad():
        for batch in batches:
            model(batch.patches, batch.grid_thw)
    memory = dict(graphs=len(model.cuda_graphs.graphs), max_tokens=model.cuda_graphs.max_tokens)
    if on_gpu:
        torch.cuda.synchronize()
        memory["allocated_gib"] = (torch.cuda.memory_allocated() - allocated_before) / GIB
        memory["reserved_gib"] = (torch.cuda.memory_reserved() - reserved_before) / GIB
    rows = []
    for (images, side), batch in zip(latency.batches, batches):
        ours, reference = side_runs(pair, batch, backward=False)
        replays_before = model.cuda_graphs.replays
        with_graphs = measure_side(ours, settings.repeats, 0, settings)["ms"]
        captured = list(model.cuda_graphs.graphs.values())
        replay_ms = None
        if captured and captured[-1].graph is not None:  # the graph this batch replays: the most recently used
            replay_ms = statistics.median(time_ms(captured[-1].graph.replay, settings.repeats, 1, settings.device))
        with_graphs_out = ours().last_hidden_state
        graphs, model.cuda_graphs = model.cuda_graphs, None
        cosine = min_image_cosine(with_graphs_out, ours().last_hidden_state, batch.image_tokens)  # vs eager
        eager_ms = measure_side(ours, settings.repeats, 0, settings)["ms"]
        kernel_ms = gpu_kernel_ms(ours, settings.repeats, settings.device)
        model.cuda_graphs = graphs
        reference_ms = measure_side(reference, settings.repeats, 0, settings)["ms"]
        row = dict(
            images=images, patches=side * side, tokens=images * side * side, ours_ms=eager_ms,
            ours_graphs_ms=with_graphs, reference_ms=reference_ms, kernel_ms=kernel_ms, graph_replay_ms=replay_ms,
            graphs_replayed=graphs.replays > replays_before, graphs_over_kernel=ratio(with_graphs, kernel_ms),
            speedup_vs_reference=ratio(reference_ms, with_graphs), min_image_cosine_graphs_vs_eager=cosine,
        )  # fmt: skip
        goals = [(row["graphs_over_kernel"], "<=", latency.graph_max_kernel_ratio)]
        goals.append((row[SPEEDUP], ">=", latency.min_speedup.get((images, side), 1.0)))
        verdicts = [None if v is None else (v <= t if op == "<=" else v >= t) for v, op, t in goals]
        row["met"] = all_met(verdicts)
        log(f"[latency] {images} x {side * side}: ours {eager_ms:.2f} ms, with graphs {with_graphs:.2f} ms, "
            f"reference {reference_ms:.2f} ms, kernels {fmt(kernel_ms, '.2f')} ms, "
            f"replay {fmt(replay_ms, '.2f')} ms")  # fmt: skip
        rows.append(row)
    model.disable_cuda_graphs()
    return rows, memory


def run_sweep(sweep: Sweep, pair: Pair, settings: Settings, generator) -> list[dict]:
    """Forward throughput and peak memory of both sides as the total tokens grow (reference padded); ours also with
    CUDA graphs (`enable_cuda_graphs()` defaults: eager above its max_tokens)."""
    points = []
    for target in sweep.tokens:
        grids = grids_for_tokens(target, sweep.sides, sweep.max_patches, generator)
        batch = make_batch(grids, pair.config, "padded", sweep.max_patches, settings.device, generator)
        runs = dict(zip(("ours", "reference"), side_runs(pair, batch, backward=False)))
        point = dict(target_tokens=target, tokens=sum(batch.image_tokens), images=len(grids))
        for side, run in runs.items():
            resident = pair.parameter_bytes(side) + batch.input_bytes(side)
            result = unless_out_of_memory(lambda: measure_side(run, settings.repeats, resident, settings))
            point[f"{side}_ms"] = None if result is None else result["ms"]
            point[f"{side}_tokens_per_s"] = None if result is None else point["tokens"] / (result["ms"] * 1e-3)
            point[f"{side}_peak_gib"] = None if result is None else result["peak_gib"]
            point[f"{side}_out_of_memory"] = result is None
        pair.ours_eager.enable_cuda_graphs()
        result = unless_out_of_memory(lambda: measure_side(runs["ours"], settings.repeats, 0, settings))
        point["ours_graphs_ms"] = None if result is None else result["ms"]
        point["ours_graphs_replayed"] = pair.ours_eager.cuda_graphs.replays > 0
        pair.ours_eager.disable_cuda_graphs()
        log(f"[sweep] {point['tokens']:>7} tokens, {len(grids):>4} images: ours {fmt(point['ours_ms'], '.2f')} ms, "
            f"with graphs {fmt(point['ours_graphs_ms'], '.2f')} ms, "
            f"reference {fmt(point['reference_ms'], '.2f', 'OOM')} ms")  # fmt: skip
        points.append(point)
        del batch, runs  # the next point's inputs need the room
    return points


# --------------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workloads", default="W1,W2,W3,W4,W5", help="comma-separated subset of W1..W5")
    parser.add_argument("--no-sweep", action="store_true", help="skip the token-scaling sweep")
    parser.add_argument("--no-latency", action="store_true", help="skip the small-batch latency table")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "varlen_attn", "flash_attention_2", "flash_attention_4", "sdpa", "eager"],
        help="our attn_implementation (auto: varlen_attn on CUDA bf16, sdpa on the CPU)",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, help="timed calls per side (default 10; 2 with --smoke)")
    parser.add_argument("--out-dir", type=Path, default=ROOT / "benchmarks")
    parser.add_argument("--smoke", action="store_true", help="tiny configs, a few tokens: CPU is fine")
    parser.add_argument("--compile", action="store_true", help="torch.compile our model")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    unknown = set(workload_keys(args)) - set(WORKLOADS)
    if unknown:
        parser.error(f"unknown workloads {sorted(unknown)}; choose from {', '.join(WORKLOADS)}")
    return args


def workload_keys(args) -> list[str]:
    return [key for key in args.workloads.split(",") if key]  # --workloads "": none


RECORD_ENVIRONMENT = ("device", "torch", "transformers", "backend", "compile", "command")


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.type != "cuda" and not args.smoke:
        raise SystemExit("The full benchmark needs a CUDA GPU; on the CPU run it with --smoke")
    settings = Settings(
        device=device,
        repeats=args.repeats or (2 if args.smoke else 10),
        warmup=1 if args.smoke else 3,
        backend=args.backend,
        compile=args.compile,
        smoke=args.smoke,
        matmul_size=256 if args.smoke else 8192,
    )
    generator = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)  # random-init weights
    log(f"packed_vit from {Path(packed_vit.__file__).parent}; device {device_name(device)}")

    command = shlex.join(sys.orig_argv if argv is None else ["python", "benchmarks/bench.py", *argv])
    results = dict(environment=environment(args, settings, command), workloads={}, token_sweep=[], latency=[])
    # The ceiling is measured first; again at the end, the same product says whether the GPU drifted meanwhile.
    results["matmul_ceiling_tflops"] = matmul_tflops(settings)
    log(f"[ceiling] bf16 {settings.matmul_size}^3 matmul: {results['matmul_ceiling_tflops']:.1f} TFLOP/s")

    pairs: dict[str, Pair] = {}

    def pair_of(tower_key: str) -> Pair:
        if tower_key not in pairs:
            pairs[tower_key] = build_pair(TOWERS[tower_key], settings)
            results["environment"]["backend"] = pairs[tower_key].backend
        return pairs[tower_key]

    for key in workload_keys(args):
        workload = WORKLOADS[key].for_smoke() if args.smoke else WORKLOADS[key]
        record = run_workload(workload, pair_of(workload.tower), settings, results["matmul_ceiling_tflops"], generator)
        # each record carries what it was measured with, so that it can be read alone
        results["workloads"][key] = {**record, **{k: results["environment"][k] for k in RECORD_ENVIRONMENT}}
        log(f"[{key}] ours {fmt(record['ours_ms'], '.2f', 'OOM')} ms, "
            f"reference {fmt(record['reference_ms'], '.2f', 'OOM')} ms, {fmt(record[SPEEDUP], '.2f')}x, "
            f"{fmt(record['useful_tflops'], '.1f')} useful TFLOP/s, memory ratio {fmt(record[MEM_RATIO], '.2f')}, "
            f"min cosine {fmt(record['min_image_cosine_vs_reference'], '.5f')}, "
            f"host sync free: {record['host_sync_free']}")  # fmt: skip
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.no_sweep:
        sweep = SMOKE_SWEEP if args.smoke else SWEEP
        results["token_sweep_setup"] = dict(dataclasses.asdict(sweep), tower=TOWERS[sweep.tower].label(args.smoke))
        results["token_sweep"] = run_sweep(sweep, pair_of(sweep.tower), settings, generator)

    if not args.no_latency:
        latency = SMOKE_LATENCY if args.smoke else LATENCY
        results["latency_setup"] = dict(
            tower=TOWERS[latency.tower].label(args.smoke), batches=latency.batches,
            graph_max_kernel_ratio=latency.graph_max_kernel_ratio,
            min_speedup={f"{i} x {side * side}": v for (i, side), v in latency.min_speedup.items()},
        )  # fmt: skip
        results["latency"], results["latency_graph_memory"] = run_latency(
            latency, pair_of(latency.tower), settings, generator
        )

    results["matmul_tflops_end"] = matmul_tflops(settings)
    log(f"[ceiling] again at the end: {results['matmul_tflops_end']:.1f} TFLOP/s")
    checked = [r["host_sync_free"] for r in results["workloads"].values() if not WORKLOADS[r["id"]].backward]
    results["host_sync_free"] = all_met(checked) if checked else None
    results["all_goals_met"] = all_met(
        [r["met"] for r in results["workloads"].values()] + [r["met"] for r in results["latency"]]
        + [results["host_sync_free"]]
    )
    args.out_dir.mkdir(parents=True, exist_ok=True)
    (args.out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot_written = bool(results["token_sweep"]) and write_scaling_plot(results, args.out_dir / "scaling.png")
    write_results_md(results, args.out_dir / "RESULTS.md", plot_written, PER_IMAGE_REPEATS)
    log(f"wrote {args.out_dir / 'results.json'}, {args.out_dir / 'RESULTS.md'}"
        f"{', ' + str(args.out_dir / 'scaling.png') if plot_written else ''}")  # fmt: skip
    print_table(results)
    return results


def environment(args, settings: Settings, command: str) -> dict:
    return dict(
        device=device_name(settings.device),
        torch=torch.__version__,
        transformers=transformers.__version__,
        python=platform.python_version(),
        command=command,
        backend=settings.backend,  # replaced by the resolved backend once a model is built
        compile=settings.compile,
        smoke=settings.smoke,
        repeats=settings.repeats,
        warmup=settings.warmup,
        matmul_size=settings.matmul_size,
        seed=args.seed,
    )


if __name__ == "__main__":
    main()
