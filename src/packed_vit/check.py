"""`packed-vit check`: on the user's own checkpoint, device and dtype, does the packed tower give transformers' numbers?

    packed-vit check --model PATH_OR_REPO [--revision R] [--images FILES_OR_DIRS...] [--device D]
                     [--dtype float32|bfloat16|float16] [--attn-implementation A] [--cuda-graphs]
                     [--max-num-patches N] [--json FILE]

Top to bottom:
1. The two towers, with the same weights: ours through its `from_pretrained` (every format of DESIGN §4), and
   transformers' own tower through transformers' `from_pretrained` wherever transformers reads the format
   (Siglip2: `Siglip2Model` / `Siglip2VisionModel`; AIMv2: `Aimv2VisionModel` / `Aimv2Model`). Apple's original
   AIMv2 layout and this project's own saves are formats transformers cannot read: there the reference is
   transformers' tower built from the checkpoint's config and holding our converted weights, and the report says so.
2. The inputs: images (the user's, or `builtin_images()`: synthetic, photo-like, mixed sizes, no download) through
   the checkpoint's processor settings (packed-vit's processor, whose patches equal transformers' processor's,
   DESIGN §6), and random patches on the edge grids of DESIGN §7 (1x1, 1xN, Nx1, smaller and larger than the
   position table, t > 1).
3. The reference image by image (frame by frame), in float32, and, for bf16 / fp16, once more in that dtype; ours on
   all inputs in ONE packed forward, per attention backend available on the device (or the one named), and with
   `--cuda-graphs` once more through the CUDA-graph path (`model.enable_cuda_graphs()`).
4. Each (backend, path, input) row against DESIGN §7, for `last_hidden_state` and `pooler_output` (when the
   checkpoint has a head): float32: ||ours - ref|| / ||ref|| <= 1e-5; bf16 / fp16: our error against the float32
   reference <= 1.1 x the reference's own error in that dtype (measured here), judged over all inputs together
   (the "all inputs" row: one input's ratio is rounding noise over rounding noise, printed, not judged), and every
   frame's cosine >= 0.999.
5. A table (and `--json FILE`). Exit status: 0 every row holds, 1 some row does not (named), 2 the check could not
   run (a checkpoint the loaders refuse, an unreadable image, a backend or option the device cannot run), with the
   loader's message, not a traceback.

To see the check fail, break the packed tower after loading: tests/test_check.py wraps `load_packed_tower` (the one
place ours is loaded) with a monkeypatch that perturbs one weight.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import pickle
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import PIL.Image
import torch
import transformers
from packaging.version import Version
from safetensors import SafetensorError

from . import __version__
from .demo import patches_to_image, quiet_libraries
from .encode.inputs import find_images, read_image
from .hub_export import FP32_REL_TOL, Tower, make_processor, read_source_config, rel_err, tower_for_model_type
from .modeling import conversion_aimv2, conversion_siglip2
from .modeling.attention import ATTENTION_BACKENDS, check_attn_implementation, resolve_attn_implementation
from .modeling.checkpoint_loading import CheckpointSource, config_fields, detect_format, hub_offline
from .modeling.cuda_graphs import GRAPH_BACKENDS

EXIT_PASS, EXIT_FAIL, EXIT_CANNOT_CHECK = 0, 1, 2
LOW_PRECISION_ERROR_RATIO = 1.1  # DESIGN §7: ours vs fp32 <= 1.1 x the reference's own error in the dtype
LOW_PRECISION_MIN_COSINE = 0.999  # DESIGN §7, per image
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RANDOM_INPUT_SEED = 0
# transformers <= 5.23 resized Siglip2's position table with torch's CPU antialias kernel, which gives a width-1
# output (an Nx1 grid, N > 1) wrong weights (DESIGN §3): there the reference itself is wrong, so on the CPU with those
# releases such grids are not compared (the report says so).
SIGLIP2_CPU_REFERENCE_WRONG_AT_WIDTH_1 = Version(transformers.__version__).release < (5, 24)


class CannotCheck(Exception):
    """The check cannot run: the message says why (exit status 2)."""


@dataclass
class CheckOptions:
    model: str
    revision: str | None = None
    images: list[str] = field(default_factory=list)  # files or folders; empty: `builtin_images()`
    device: str | None = None  # default: cuda when available, else cpu
    dtype: str | None = None  # default: bfloat16 on CUDA, float32 otherwise
    attn_implementation: str | None = None  # default: every backend available on the device
    cuda_graphs: bool = False
    max_num_patches: int | None = None  # the processor's patch budget per image (default: the checkpoint's)
    json_path: Path | None = None


# --------------------------------------------------------------------------------------------------------------
# 1. The two towers
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Towers:
    tower: Tower
    checkpoint: str  # the checkpoint's format, in words
    reference_loaded: str  # how transformers' tower got its weights, in words
    ours: torch.nn.Module  # float32, eval, on the device
    reference: torch.nn.Module  # float32, eval, on the device
    processor: object


def load_packed_tower(tower: Tower, model: str, revision: str | None) -> torch.nn.Module:
    """Ours, float32, through the tower's `from_pretrained` (every format of DESIGN §4)."""
    return tower.model_class.from_pretrained(model, revision=revision, dtype=torch.float32)


def from_transformers(model_class, model: str, revision: str | None) -> torch.nn.Module:
    """transformers' own `from_pretrained`, refusing what it would only warn about: a weight left at its init."""
    loaded, info = model_class.from_pretrained(
        model, revision=revision, attn_implementation="sdpa", output_loading_info=True, dtype=torch.float32
    )
    problems = [f"{kind}: {', '.join(map(str, info[kind]))}" for kind in ("missing_keys", "mismatched_keys")
                if info.get(kind)]  # fmt: skip
    if problems:
        raise CannotCheck(
            f"transformers' {model_class.__name__}.from_pretrained({model!r}) leaves weights at their random init "
            f"({'; '.join(problems)}): it cannot be the reference for this checkpoint"
        )
    return loaded


# tower -> transformers' vision config and model, and the config fields ours shares with them
REFERENCE_CLASSES = {
    "Siglip2": ("Siglip2VisionConfig", "Siglip2VisionModel", conversion_siglip2.VISION_CONFIG_FIELDS),
    "AIMv2": ("Aimv2VisionConfig", "Aimv2VisionModel", conversion_aimv2.VISION_CONFIG_FIELDS),
}
# config model_type -> (the checkpoint, in words; the transformers class that reads it; its vision tower's attribute)
TRANSFORMERS_READS = {
    "siglip2": ("full Siglip2Model (model_type siglip2)", "Siglip2Model", "vision_model"),
    "siglip2_vision_model": ("transformers Siglip2VisionModel", "Siglip2VisionModel", None),
    "aimv2_vision_model": ("transformers Aimv2VisionModel", "Aimv2VisionModel", None),
}
# model_type aimv2 is also Apple's original layouts: this entry only when the keys are transformers'
AIMV2_MODEL = ("transformers Aimv2Model", "Aimv2Model", "vision_model")


def reference_from_weights(tower: Tower, ours: torch.nn.Module) -> torch.nn.Module:
    """transformers' tower built from our (converted) config, holding our (converted) weights."""
    config_class, model_class, fields = REFERENCE_CLASSES[tower.name]
    config = getattr(transformers, config_class)(**config_fields(ours.config.to_dict(), fields),
                                                 attn_implementation="sdpa")  # fmt: skip
    reference = getattr(transformers, model_class)(config)
    state_dict = ours.state_dict()
    if next(iter(reference.state_dict())).startswith("vision_model."):  # transformers 4.x keeps the tower there
        state_dict = {f"vision_model.{key}": tensor for key, tensor in state_dict.items()}
    reference.load_state_dict(state_dict, strict=True)
    return reference


def load_reference(tower: Tower, config: dict, ours, model: str, revision: str | None) -> tuple[str, str, object]:
    """-> (the checkpoint's format in words, how the reference was loaded in words, transformers' tower)."""
    model_type = config.get("model_type")
    readable = TRANSFORMERS_READS.get(model_type)
    checkpoint, why = "packed-vit's own save / export", "transformers cannot read this project's format"
    if model_type == "aimv2":  # transformers' Aimv2Model or one of Apple's original layouts: the keys tell
        source = CheckpointSource(model, hub_kwargs={"revision": revision, "local_files_only": hub_offline()})
        keys = source.read_state_dict(None, torch.device("cpu"))
        checkpoint_format = detect_format(conversion_aimv2.FORMATS, keys, "AIMv2")
        if checkpoint_format.marker == conversion_aimv2.CANONICAL_MARKER:
            readable = AIMV2_MODEL
        checkpoint, why = checkpoint_format.name, "transformers cannot read Apple's original layout"
    if readable is None:
        reference = reference_from_weights(tower, ours)
        return checkpoint, f"transformers' {type(reference).__name__} holding packed-vit's converted weights ({why})", \
            reference  # fmt: skip
    checkpoint, class_name, tower_attribute = readable
    loaded = from_transformers(getattr(transformers, class_name), model, revision)
    if tower_attribute is None:
        return checkpoint, f"transformers' own from_pretrained: {class_name}", loaded
    return checkpoint, f"transformers' own from_pretrained: {class_name}.{tower_attribute}", \
        getattr(loaded, tower_attribute)  # fmt: skip


def load_towers(options: CheckOptions, device: torch.device) -> Towers:
    config, _ = read_source_config(options.model, options.revision)
    tower = tower_for_model_type(config.get("model_type"))
    ours = load_packed_tower(tower, options.model, options.revision)
    checkpoint, reference_loaded, reference = load_reference(tower, config, ours, options.model, options.revision)
    settings = tower.processor_settings(ours.config)
    if options.max_num_patches is not None:
        settings["max_num_patches"] = options.max_num_patches
    processor = make_processor(tower.processor_class, settings, options.model, options.revision)
    return Towers(tower, checkpoint, reference_loaded, ours.to(device).eval(), reference.to(device).eval(), processor)


# --------------------------------------------------------------------------------------------------------------
# 2. The inputs
# --------------------------------------------------------------------------------------------------------------

# name -> (width, height): landscape and portrait photos, a panorama, a tall strip, a square, a thumbnail
BUILTIN_IMAGE_SIZES = {
    "landscape": (640, 427), "portrait": (360, 640), "panorama": (1200, 240), "tall-strip": (96, 900),
    "square": (512, 512), "thumbnail": (40, 32),
}  # fmt: skip


def synthetic_photo(width: int, height: int, seed: int) -> PIL.Image.Image:
    """A photo-like RGB image, made here so that the check needs no download: 1/f ("pink") noise, the power
    spectrum of natural images, with correlated colour channels, over a smooth sky-to-ground colour gradient, with a
    few soft-edged discs (objects with edges at every orientation)."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(height)[:, None], np.fft.rfftfreq(width)[None, :]
    amplitude = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(width, height))
    phases = np.exp(2j * np.pi * rng.random((3, height, fx.shape[1])))
    noise = np.fft.irfft2(amplitude * phases, s=(height, width))  # [3, H, W]
    noise = 0.7 * noise[:1] + 0.3 * noise  # mostly shared between channels, as luminance is
    noise = (noise - noise.mean()) / noise.std()
    top, bottom = rng.random((2, 3, 1, 1))
    rows = np.linspace(0.0, 1.0, height)[None, :, None]
    image = top * (1 - rows) + bottom * rows + 0.12 * noise
    yy, xx = np.mgrid[0:height, 0:width]
    for _ in range(3):
        cy, cx, radius = rng.random() * height, rng.random() * width, (0.05 + 0.2 * rng.random()) * min(width, height)
        inside = 0.5 - 0.5 * np.tanh((np.hypot(yy - cy, xx - cx) - radius) / 3.0)  # a soft edge of a few pixels
        image = image * (1 - inside) + rng.random((3, 1, 1)) * inside
    pixels = (np.clip(image, 0.0, 1.0) * 255).round().astype(np.uint8).transpose(1, 2, 0)
    return PIL.Image.fromarray(pixels)


def builtin_images() -> dict[str, PIL.Image.Image]:
    return {name: synthetic_photo(w, h, seed) for seed, (name, (w, h)) in enumerate(BUILTIN_IMAGE_SIZES.items())}


def user_images(paths: list[str]) -> dict[str, PIL.Image.Image]:
    files = find_images(paths)
    if not files:
        raise CannotCheck(f"no image files in {' '.join(paths)}")
    images = {}
    for file in files:
        try:
            images[str(file)] = read_image(file).convert("RGB")
        except (OSError, ValueError) as error:
            raise CannotCheck(f"cannot read image {file}: {error}") from error
    return images


@dataclass
class CheckInput:
    name: str
    kind: str  # "image" or "random"
    size: tuple[int, int] | None  # an image's (width, height) in pixels
    grid: tuple[int, int, int]  # (t, h, w) in patches
    patches: torch.Tensor  # [t*h*w, p*p*C] float32


def edge_grids(config) -> list[tuple[int, int, int]]:
    """DESIGN §7's edge shapes, scaled to the position table (Siglip2's; AIMv2 native's sin-cos has none: 16x16)."""
    if getattr(config, "is_native", True) is False:  # learned AIMv2 positions: transformers runs the trained grid only
        side = config.image_size // config.patch_size
        return [(1, side, side), (2, side, side)]
    side = math.isqrt(getattr(config, "num_patches", 256))  # 16 for the released checkpoints
    half = max(2, side // 2)
    return [(1, 1, 1), (1, 1, 2 * side + 3), (1, 2 * side + 1, 1), (1, half - 1, half + 1), (1, side, side),
            (1, 2 * side, side + half), (3, half + 4, half + 2)]  # fmt: skip


def reference_is_wrong(tower: Tower, grid: tuple[int, int, int], device: torch.device) -> bool:
    _, h, w = grid
    return tower.name == "Siglip2" and device.type == "cpu" and SIGLIP2_CPU_REFERENCE_WRONG_AT_WIDTH_1 and w == 1 < h


def build_inputs(towers: Towers, images: dict[str, PIL.Image.Image]) -> list[CheckInput]:
    inputs = []
    for name, image in images.items():
        processed = towers.processor(image, return_tensors="pt")
        grid = tuple(processed["grid_thw"][0].tolist())
        inputs.append(CheckInput(name, "image", image.size, grid, processed["pixel_values"].float()))
    config = towers.ours.config
    patch_dim = config.num_channels * config.patch_size**2
    generator = torch.Generator().manual_seed(RANDOM_INPUT_SEED)
    for grid in edge_grids(config):
        t, h, w = grid
        patches = torch.randn(t * h * w, patch_dim, generator=generator)
        inputs.append(CheckInput(f"random {t}x{h}x{w}", "random", None, grid, patches))
    return inputs


# --------------------------------------------------------------------------------------------------------------
# 3. Running: the reference frame by frame, ours packed
# --------------------------------------------------------------------------------------------------------------

# Per input: output name -> its frames' values ("last_hidden_state": [h*w, D] each; "pooler_output": [D] each, with a
# head)
Outputs = dict[str, list[torch.Tensor]]


def reference_frame(reference, tower: Tower, patches: torch.Tensor, h: int, w: int):
    """transformers' tower on one frame, called as its processor's output is -> its BaseModelOutputWithPooling."""
    if tower.name == "Siglip2":
        mask = torch.ones(1, h * w, dtype=torch.long, device=patches.device)
        shapes = torch.tensor([[h, w]], device=patches.device)
        # positional: the mask is `pixel_attention_mask` of Siglip2VisionModel, `attention_mask` of 4.57's
        # Siglip2VisionTransformer (Siglip2Model.vision_model)
        return reference(patches[None], mask, shapes)
    config = reference.config
    return reference(pixel_values=patches_to_image(patches, h, w, config.patch_size, config.num_channels))


def output_frames(last_hidden_state: torch.Tensor, pooler_output: torch.Tensor | None, frames: int) -> Outputs:
    """[frames * h*w, D] and [frames, D] (or None) -> Outputs, in float32."""
    outputs = {"last_hidden_state": list(last_hidden_state.float().view(frames, -1, last_hidden_state.shape[-1]))}
    if pooler_output is not None:
        outputs["pooler_output"] = list(pooler_output.float())
    return outputs


@torch.no_grad()
def run_reference(reference, tower: Tower, inputs: list[CheckInput], device, dtype) -> list[Outputs]:
    results = []
    for item in inputs:
        t, h, w = item.grid
        frames = [reference_frame(reference, tower, frame.to(device, dtype), h, w)
                  for frame in item.patches.view(t, h * w, -1)]  # fmt: skip
        pooled = None if frames[0].pooler_output is None else torch.cat([out.pooler_output for out in frames])
        results.append(output_frames(torch.cat([out.last_hidden_state[0] for out in frames]), pooled, t))
    return results


@torch.no_grad()
def run_packed(ours, inputs: list[CheckInput], device, dtype) -> list[Outputs]:
    """ONE packed forward over every input -> per input its frames' outputs."""
    patches = torch.cat([item.patches for item in inputs]).to(device, dtype)
    grid_thw = torch.tensor([item.grid for item in inputs], dtype=torch.int64)
    out = ours(patches, grid_thw)
    last = out.last_hidden_state.split([math.prod(item.grid) for item in inputs])
    frames = [item.grid[0] for item in inputs]
    pooled = [None] * len(inputs) if out.pooler_output is None else out.pooler_output.split(frames)
    return [output_frames(*outputs) for outputs in zip(last, pooled, frames)]


def run_graph_path(ours, inputs: list[CheckInput], device, dtype) -> tuple[list[Outputs], bool]:
    """The packed forward replayed from a CUDA graph -> (outputs, whether a graph replayed it). Twice: the first
    call captures, the second replays what a service's later calls replay."""
    total = sum(math.prod(item.grid) for item in inputs)
    frames = sum(item.grid[0] for item in inputs)
    ours.enable_cuda_graphs(max_tokens=max(16384, 2 * total), max_frames=max(256, 2 * frames))  # room for a bucket
    try:
        run_packed(ours, inputs, device, dtype)
        outputs = run_packed(ours, inputs, device, dtype)
        return outputs, ours.cuda_graphs.replays == 2
    finally:
        ours.disable_cuda_graphs()


def backends_to_check(requested: str | None, device: torch.device, dtype: torch.dtype) -> list[str]:
    """The named backend (an error if it cannot run here), or every backend that runs on (device, dtype)."""
    if requested is not None:
        try:
            return [resolve_attn_implementation(check_attn_implementation(requested), device, dtype)]
        except ValueError as error:
            raise CannotCheck(str(error)) from error
    available = []
    for name in ATTENTION_BACKENDS:
        try:
            available.append(resolve_attn_implementation(check_attn_implementation(name), device, dtype))
        except ValueError:  # not installed, or not for this device / dtype
            continue
    return available


# --------------------------------------------------------------------------------------------------------------
# 4. The contract, row by row
# --------------------------------------------------------------------------------------------------------------


def cosine(ours: list[torch.Tensor], ref: list[torch.Tensor]) -> float:
    """The smallest per-frame cosine similarity of the flattened outputs (NaN if any is: torch's min keeps NaN)."""
    cosines = [torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0)
               for a, b in zip(ours, ref, strict=True)]  # fmt: skip
    return torch.stack(cosines).min().item()


@dataclass
class OutputCheck:
    rel_err: float  # ||ours - ref_fp32|| / ||ref_fp32|| over the frames
    cosine: float  # the smallest per-frame cosine similarity to the float32 reference
    bound: float | None  # the largest rel_err allowed; None: not judged on this row (bf16 / fp16 inputs, see compare)
    reference_rel_err: float | None  # bf16 / fp16: the reference's own error in that dtype (the bound is 1.1x it)
    min_cosine: float | None  # bf16 / fp16: 0.999

    @property
    def holds(self) -> bool:  # NaN fails both comparisons
        error_holds = self.bound is None or self.rel_err <= self.bound
        return error_holds and (self.min_cosine is None or self.cosine >= self.min_cosine)


def check_output(ours: list[torch.Tensor], ref32: list[torch.Tensor], ref_low: list[torch.Tensor] | None) -> OutputCheck:
    """One output over some frames against DESIGN §7: fp32 (`ref_low` None) or bf16 / fp16."""
    err, cos = rel_err(torch.cat(ours), torch.cat(ref32)), cosine(ours, ref32)
    if ref_low is None:
        return OutputCheck(err, cos, FP32_REL_TOL, None, None)
    reference_err = rel_err(torch.cat(ref_low), torch.cat(ref32))
    return OutputCheck(err, cos, LOW_PRECISION_ERROR_RATIO * reference_err, reference_err, LOW_PRECISION_MIN_COSINE)


@dataclass
class Row:
    backend: str
    graphs: bool
    input: str
    grid: tuple[int, int, int] | None  # None: the row of all inputs together
    outputs: dict[str, OutputCheck]  # "last_hidden_state", "pooler_output" (with a head)
    note: str = ""  # why the row fails besides the numbers

    @property
    def name(self) -> str:
        return f"{self.backend}{'+graphs' if self.graphs else ''}/{self.input}"

    @property
    def holds(self) -> bool:
        return not self.note and all(check.holds for check in self.outputs.values())


ALL_INPUTS = "all inputs"
OUTPUT_NAMES = ("last_hidden_state", "pooler_output")


def compare(backend: str, graphs: bool, inputs, ours: list[Outputs], ref32: list[Outputs],
            ref_low: list[Outputs] | None, note: str = "") -> list[Row]:  # fmt: skip
    """The rows of one packed run: one per input, and in bf16 / fp16 one of all inputs together.

    bf16 / fp16: every input's frames must have cosine >= 0.999, and the error ratio (ours / the reference's own,
    both against float32) is judged over all inputs together, as tests/test_cuda.py does: for one input it compares
    rounding noise with rounding noise (a single pooled vector moves it by +-30% on a small tower), so a per-input
    limit of 1.1 would fail correct towers at random. Each input's own ratio is still shown.
    """
    low_precision = ref_low is not None
    rows = []
    for index, item in enumerate(inputs):
        outputs, row_note = {}, note
        for name, ref_frames in ref32[index].items():
            if name not in ours[index]:
                row_note = f"no {name}, but transformers' tower returns one"
                continue
            check = check_output(ours[index][name], ref_frames, ref_low[index][name] if low_precision else None)
            outputs[name] = replace(check, bound=None) if low_precision else check
        rows.append(Row(backend, graphs, item.name, item.grid, outputs, row_note))
    if low_precision:
        combined = {
            name: check_output(*([frame for per_input in side for frame in per_input[name]]
                                 for side in (ours, ref32, ref_low)))  # fmt: skip
            for name in ref32[0] if all(name in per_input for per_input in ours)
        }
        rows.append(Row(backend, graphs, ALL_INPUTS, None, combined, note))
    return rows


# --------------------------------------------------------------------------------------------------------------
# 5. Report
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Report:
    model: str
    revision: str | None
    tower: str
    checkpoint: str
    reference: str
    device: str
    dtype: str
    contract: str
    versions: dict
    inputs: list[dict]
    not_compared: list[str]
    rows: list[Row]

    @property
    def failed(self) -> list[Row]:
        return [row for row in self.rows if not row.holds]

    def to_json(self) -> dict:
        data = asdict(self)
        data["rows"] = [
            {**asdict(row), "name": row.name, "holds": row.holds,
             "outputs": {key: {**asdict(check), "holds": check.holds} for key, check in row.outputs.items()}}
            for row in self.rows
        ]  # fmt: skip
        data.update(passed=not self.failed, failed_rows=[row.name for row in self.failed],
                    exit_status=EXIT_FAIL if self.failed else EXIT_PASS)  # fmt: skip
        return data


def contract_text(dtype: torch.dtype) -> str:
    if dtype == torch.float32:
        return f"float32: per input ||ours - ref|| / ||ref|| <= {FP32_REL_TOL:g} (DESIGN §7)"
    return (f"{str(dtype).removeprefix('torch.')}: error vs the float32 reference <= {LOW_PRECISION_ERROR_RATIO} x "
            f"the reference's own error in that dtype, over all inputs (row '{ALL_INPUTS}'), and every frame's "
            f"cosine >= {LOW_PRECISION_MIN_COSINE} (DESIGN §7)")  # fmt: skip


def format_output(check: OutputCheck | None, low_precision: bool) -> str:
    if check is None:
        return f"{'-':>9} {'-':>9} {'-':>10}" + (f" {'-':>9}" if low_precision else "")
    ref = f" {check.reference_rel_err:>9.2e}" if low_precision else ""
    bound = "-" if check.bound is None else f"{check.bound:.2e}"
    return f"{check.rel_err:>9.2e}{ref} {bound:>9} {check.cosine:>10.7f}"


def print_report(report: Report) -> None:
    low_precision = report.dtype != "float32"
    print(f"packed-vit check: {report.model}" + (f" @ {report.revision}" if report.revision else ""))
    print(f"  tower: {report.tower}; checkpoint: {report.checkpoint}")
    print(f"  reference: {report.reference}")
    print(f"  device {report.device}, dtype {report.dtype}; " +
          ", ".join(f"{name} {version}" for name, version in report.versions.items()))  # fmt: skip
    print(f"  contract: {report.contract}")
    for note in report.not_compared:
        print(f"  not compared: {note}")
    ref_head = f" {'ref err':>9}" if low_precision else ""
    block = f"{'rel err':>9}{ref_head} {'bound':>9} {'cosine':>10}"
    width = len(block)
    print(f"\n{'backend':<18} {'input':<22} {'grid (t,h,w)':>14}  {'last_hidden_state':^{width}}  "
          f"{'pooler_output':^{width}}  ok")  # fmt: skip
    print(f"{'':<18} {'':<22} {'':>14}  {block}  {block}")
    for row in report.rows:
        backend = row.backend + ("+graphs" if row.graphs else "")
        grid = "-" if row.grid is None else "({}, {}, {})".format(*row.grid)
        outputs = [format_output(row.outputs.get(name), low_precision) for name in OUTPUT_NAMES]
        verdict = "yes" if row.holds else "NO" + (f" ({row.note})" if row.note else "")
        print(f"{backend:<18} {row.input[-22:]:<22} {grid:>14}  {outputs[0]}  {outputs[1]}  {verdict}")
    failed = report.failed
    if failed:
        print(f"\nFAIL: {len(failed)} of {len(report.rows)} rows do not hold: {', '.join(row.name for row in failed)}")
    else:
        print(f"\nPASS: all {len(report.rows)} rows hold")


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


def resolve_device_and_dtype(options: CheckOptions) -> tuple[torch.device, torch.dtype]:
    try:
        device = torch.device(options.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:
        raise CannotCheck(f"--device {options.device}: {error}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise CannotCheck(f"--device {device}: torch sees no CUDA device")
    if options.cuda_graphs and device.type != "cuda":
        raise CannotCheck("--cuda-graphs replays CUDA graphs: it needs a CUDA --device")
    dtype = DTYPES[options.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    return device, dtype


def check(options: CheckOptions) -> Report:
    """Runs the check (see the module docstring); CannotCheck / the loaders' errors when it cannot run."""
    device, dtype = resolve_device_and_dtype(options)
    backends = backends_to_check(options.attn_implementation, device, dtype)
    try:
        towers = load_towers(options, device)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError) as error:  # a damaged weights file, as its reader says
        raise CannotCheck(f"cannot read its weights: {error}") from error
    images = user_images(options.images) if options.images else builtin_images()
    inputs = build_inputs(towers, images)
    not_compared = [f"{item.name} {item.grid}: transformers {transformers.__version__}'s CPU reference resizes "
                    "Siglip2's position table wrongly at width 1 (fixed in 5.24)"
                    for item in inputs if reference_is_wrong(towers.tower, item.grid, device)]  # fmt: skip
    inputs = [item for item in inputs if not reference_is_wrong(towers.tower, item.grid, device)]

    low_precision = dtype != torch.float32
    ref32 = run_reference(towers.reference, towers.tower, inputs, device, torch.float32)
    ref_low = None
    if low_precision:
        ref_low = run_reference(copy.deepcopy(towers.reference).to(dtype), towers.tower, inputs, device, dtype)
    ours = towers.ours.to(dtype)
    rows = []
    for backend in backends:
        ours.config._attn_implementation = backend
        rows += compare(backend, False, inputs, run_packed(ours, inputs, device, dtype), ref32, ref_low)
        if options.cuda_graphs and backend in GRAPH_BACKENDS:
            outputs, replayed = run_graph_path(ours, inputs, device, dtype)
            note = "" if replayed else "the CUDA-graph path did not run"
            rows += compare(backend, True, inputs, outputs, ref32, ref_low, note)
    if options.cuda_graphs and not set(backends) & set(GRAPH_BACKENDS):
        not_compared.append(f"the CUDA-graph path: it runs the {', '.join(GRAPH_BACKENDS)} backend only")

    return Report(
        model=options.model, revision=options.revision, tower=towers.tower.name, checkpoint=towers.checkpoint,
        reference=towers.reference_loaded, device=str(device), dtype=str(dtype).removeprefix("torch."),
        contract=contract_text(dtype),
        versions={"packed-vit": __version__, "torch": torch.__version__, "transformers": transformers.__version__},
        inputs=[{"name": i.name, "kind": i.kind, "size": i.size, "grid": i.grid} for i in inputs],
        not_compared=not_compared, rows=rows,
    )  # fmt: skip


# The errors the loaders and readers raise with a message for the user (DESIGN §9): printed, never a traceback.
LOADING_ERRORS = (CannotCheck, ValueError, TypeError, OSError, KeyError)


@contextlib.contextmanager
def exact_float32():
    """float32 matmuls and convolutions in IEEE float32: cuDNN's default TF32 convolutions (AIMv2's reference patch
    embedding) would put a TF32 error into the float32 reference."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def run_check(options: CheckOptions) -> int:
    quiet_libraries()
    try:
        with exact_float32():
            report = check(options)
    except LOADING_ERRORS as error:
        message = str(error) if not isinstance(error, KeyError) else f"missing entry {error}"
        print(f"packed-vit check: cannot check {options.model}: {message}", file=sys.stderr)
        return EXIT_CANNOT_CHECK
    print_report(report)
    if options.json_path is not None:
        try:
            options.json_path.write_text(json.dumps(report.to_json(), indent=2) + "\n")
        except OSError as error:
            print(f"packed-vit check: cannot write --json {options.json_path}: {error}", file=sys.stderr)
            return EXIT_CANNOT_CHECK
    return EXIT_FAIL if report.failed else EXIT_PASS
