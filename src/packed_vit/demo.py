"""`python -m packed_vit demo`: the main job end to end on an embedded default, with no network.

For each tower, a random-weight checkpoint in its ORIGINAL format (Siglip2: a whole google-style `Siglip2Model`,
model_type siglip2, `vision_model.*` beside a text tower, with transformers' `Siglip2ImageProcessor` settings;
AIMv2: Apple's original native layout, `preprocessor.*` / `trunk.*`) goes through push_to_hub's code path
(`hub_export.export_folder`: flat remote code, verified in a fresh process) into a temporary folder, is loaded back
with `AutoModel` / `AutoImageProcessor.from_pretrained(..., trust_remote_code=True)`, and encodes scikit-image's
photos of mixed sizes, packed by a token budget (`encode.encode_images`, what `packed_vit encode` runs).

Each image's embedding is compared with transformers' own tower run on that image alone (fp32, CPU):
- Siglip2: `Siglip2Model.from_pretrained(original checkpoint).vision_model`, fed by transformers'
  `Siglip2ImageProcessor` (PIL backend) from the same checkpoint: the pooled outputs (attention-pooling head).
- AIMv2: `Aimv2VisionModel` holding the weights the Apple-layout checkpoint was written from (transformers cannot
  read Apple's layout), fed the pixels of our native-resolution processor (transformers has no native-resolution
  AIMv2 processor): the mean patch features (the native checkpoints have no head).
The exported folders are loaded and run in a fresh process that imports packed_vit only afterwards, so the code
that runs is the folders' own (as for a user without packed-vit), not the installed package's.
The run fails (exit 1) if any cosine similarity is below `MIN_COSINE`, or the reference saw another patch grid.

Then both sides are timed as benchmarks/ times them: model calls only (inputs preprocessed before), warm
(transformers' tower just ran for the check; ours gets a warm-up call), then rounds calling each side once
(interleaved, so a busy machine slows both alike), the median. Ours: the packed tower (the installed package's
code, which the export copied) on the exported weights, on the images of the encode job's first forward, in one
forward; transformers: its tower on those images one by one. The demo prints what such numbers can say (little:
tiny towers on a CPU) and where the GPU results are.

The towers are small (random weights, a few layers) so that the demo takes well under a minute on a 2-core CPU, with
the real patch sizes (16, 14) and processor settings, so the images are cut as for the real models.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import PIL.Image
import torch
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Siglip2Model, Siglip2VisionConfig

from .encode import Embeddings, load_embeddings
from .hub_export import export_folder, rel_err
from .modeling import Aimv2PackingVisionModel, Siglip2PackingVisionModel
from .original_checkpoints import perturb_, write_apple_original, write_siglip2_full_model
from .processing import Aimv2PackingImageProcessor, Siglip2PackingImageProcessor

try:  # transformers 5: the PIL backend has its own class (the default one needs torchvision)
    from transformers import Siglip2ImageProcessorPil as ReferenceSiglip2Processor
except ImportError:  # transformers 4.57: the slow processor is the PIL one
    from transformers import Siglip2ImageProcessor as ReferenceSiglip2Processor

PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina")
MIN_COSINE = 0.9999  # per image, fp32
DEMO_MAX_TOKENS = 2048  # patches per forward: the six photos take several forwards
SEED = 0
# Per side: warm-up calls, then interleaved rounds: at least MIN_ROUNDS, more up to MAX_ROUNDS while the timing has
# taken less than TIMING_BUDGET_S (a few seconds a tower on an idle 2-core CPU; a busy one stops at MIN_ROUNDS).
WARMUP_CALLS, MIN_ROUNDS, MAX_ROUNDS, TIMING_BUDGET_S = 1, 3, 7, 5.0
GPU_RESULTS = "docs/results.md"  # in the repository; the so400m / AIMv2-L numbers on an H200

SIGLIP2 = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=3, patch_size=16,
               num_patches=256, vision_use_head=True)  # fmt: skip
SIGLIP2_PROCESSOR = dict(patch_size=16, max_num_patches=256)  # google/siglip2-*-patch16-naflex's
AIMV2 = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=3, num_attention_heads=3, patch_size=14,
             is_native=True, use_head=False)  # fmt: skip


def patches_to_image(patches: torch.Tensor, h: int, w: int, patch_size: int, channels: int = 3) -> torch.Tensor:
    """[h*w, p*p*C] (row, col, channel) patches -> [1, C, h*p, w*p] image, for references that take images."""
    p = patch_size
    return patches.reshape(h, w, p, p, channels).permute(4, 0, 2, 1, 3).reshape(1, channels, h * p, w * p)


# --------------------------------------------------------------------------------------------------------------
# The two towers: an original checkpoint, and transformers' own tower on one image
# --------------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """transformers' tower on one image: `prepare(image)` -> its inputs (preprocessing, not timed),
    `run(inputs)` -> (its embedding [D], the (h, w) patch grid it saw)."""

    prepare: Callable[[PIL.Image.Image], dict]
    run: Callable[[dict], tuple[torch.Tensor, tuple[int, int]]]

    def __call__(self, image: PIL.Image.Image) -> tuple[torch.Tensor, tuple[int, int]]:
        return self.run(self.prepare(image))


def random_weights(model_class, fields: dict) -> dict[str, torch.Tensor]:
    """Canonical random weights (transformers' vision-model names on every version: ours), moved off their init."""
    return perturb_(model_class(model_class.config_class(**fields))).state_dict()


def siglip2_original(folder: Path) -> Reference:
    """A google/siglip2-*-naflex-style checkpoint in `folder`; transformers' tower and processor read from it."""
    write_siglip2_full_model(Siglip2VisionConfig(**SIGLIP2), random_weights(Siglip2PackingVisionModel, SIGLIP2), folder)
    ReferenceSiglip2Processor(**SIGLIP2_PROCESSOR).save_pretrained(folder)  # google's repos carry their settings
    model = Siglip2Model.from_pretrained(folder).vision_model.eval()
    processor = ReferenceSiglip2Processor.from_pretrained(folder)

    def prepare(image):
        return processor(image, return_tensors="pt")  # padded to max_num_patches, with the mask and shapes

    def run(inputs):
        # positional: the mask is `pixel_attention_mask` in transformers 5, `attention_mask` in 4.57
        out = model(inputs["pixel_values"], inputs["pixel_attention_mask"], inputs["spatial_shapes"])
        return out.pooler_output[0], tuple(inputs["spatial_shapes"][0].tolist())

    return Reference(prepare, run)


def aimv2_original(folder: Path) -> Reference:
    """An apple/aimv2-*-native checkpoint in Apple's original layout in `folder`; transformers' tower with its
    weights."""
    vision = Aimv2VisionConfig(**AIMV2)
    weights = random_weights(Aimv2PackingVisionModel, AIMV2)
    write_apple_original(vision, weights, folder)
    model = Aimv2VisionModel(vision).eval()
    model.load_state_dict(weights, strict=True)
    # transformers has no native-resolution AIMv2 processor: the pixels are our processor's, with the settings the
    # export gives this checkpoint (the class defaults, the checkpoint's geometry).
    processor = Aimv2PackingImageProcessor(is_native=True, patch_size=vision.patch_size)

    def prepare(image):
        inputs = processor(image, return_tensors="pt")
        _, h, w = inputs["grid_thw"][0].tolist()
        return dict(pixel_values=patches_to_image(inputs["pixel_values"], h, w, vision.patch_size), grid=(h, w))

    def run(inputs):
        return model(pixel_values=inputs["pixel_values"]).last_hidden_state[0].mean(0), inputs["grid"]

    return Reference(prepare, run)


@dataclass(frozen=True)
class DemoTower:
    key: str
    name: str
    checkpoint: str  # what the original checkpoint is, in words
    write_original: Callable[[Path], Reference]
    fields: dict
    model_class: type  # ours, for the timing
    processor_class: type


TOWERS = (
    DemoTower("siglip2", "Siglip2", "google-style Siglip2Model (model_type siglip2, vision_model.* + text tower)",
              siglip2_original, SIGLIP2, Siglip2PackingVisionModel, Siglip2PackingImageProcessor),
    DemoTower("aimv2", "AIMv2", "Apple's original layout, native resolution (preprocessor.*, trunk.*)",
              aimv2_original, AIMV2, Aimv2PackingVisionModel, Aimv2PackingImageProcessor),
)  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Loading the exports as remote code, encoding
# --------------------------------------------------------------------------------------------------------------

# Runs in a fresh process (`python -I`). The exported folders are loaded BEFORE packed_vit is imported, so that
# AutoModel / AutoImageProcessor can only use the folders' own code, as for a user without packed-vit (in this
# process, where importing packed_vit registered its classes, transformers 5 would prefer those). Then the photos go
# through packed_vit's encoding loop (`encode_images`, what `packed_vit encode` runs) with the remote-code objects.
_ENCODE_WITH_REMOTE_CODE = r"""
import json, sys
import transformers

out_dir, max_tokens, folders = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
loaded = [
    (transformers.AutoModel.from_pretrained(folder, trust_remote_code=True).eval(),
     transformers.AutoImageProcessor.from_pretrained(folder, trust_remote_code=True))
    for folder in folders
]
if any(name.split(".")[0] == "packed_vit" for name in sys.modules):
    sys.exit("packed_vit was imported while the exported folders were loading")

from packed_vit.demo import load_photos
from packed_vit.encode import encode_images, save_embeddings

photos = load_photos()
classes = []
for index, (folder, (model, processor)) in enumerate(zip(folders, loaded)):
    embeddings = encode_images(model, processor, photos.items(), max_tokens=max_tokens, progress=False)
    save_embeddings(f"{out_dir}/{index}.safetensors", embeddings, folder)
    classes.append([f"{type(obj).__module__}.{type(obj).__name__}" for obj in (model, processor)])
print(json.dumps(classes))
"""


def encode_with_remote_code(folders: list[Path], work: Path) -> list[tuple[Embeddings, list[str]]]:
    """Each exported folder loaded with AutoModel / AutoImageProcessor (trust_remote_code) in a fresh process, the
    photos encoded -> [(embeddings, [model class, processor class])]."""
    env = {
        **os.environ,
        "HF_MODULES_CACHE": str(work / "modules"),  # a clean copy of the remote code
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    }
    command = [sys.executable, "-I", "-c", _ENCODE_WITH_REMOTE_CODE, str(work), str(DEMO_MAX_TOKENS)]
    run = subprocess.run(command + [str(f) for f in folders], env=env, capture_output=True, text=True)
    if run.returncode != 0:
        raise RuntimeError(f"Loading the exported folders as remote code failed:\n{run.stderr[-4000:]}")
    classes = json.loads(run.stdout.strip().splitlines()[-1])
    return [(load_embeddings(work / f"{i}.safetensors"), classes[i]) for i in range(len(folders))]


# --------------------------------------------------------------------------------------------------------------
# Running and reporting
# --------------------------------------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=0).item()


def load_photos() -> dict[str, PIL.Image.Image]:
    from skimage import data  # scikit-image: in the test extra, `pip install -e ".[test]"`

    return {name: PIL.Image.fromarray(getattr(data, name)()) for name in PHOTOS}


def build_and_export(tower: DemoTower, work: Path) -> tuple[Path, Reference]:
    """The tower's original checkpoint, exported with push_to_hub's code path -> (exported folder, reference)."""
    fields = tower.fields
    print(f"{tower.name}: {tower.checkpoint}, random weights, hidden {fields['hidden_size']}, "
          f"{fields['num_hidden_layers']} layers, patch {fields['patch_size']}")  # fmt: skip
    original = work / f"{tower.key}_original"
    original.mkdir()
    torch.manual_seed(SEED)
    reference = tower.write_original(original)
    start = time.perf_counter()
    exported, report = export_folder(original, work / f"{tower.key}_export", repo_id=f"demo/{tower.key}")
    print(f"  exported with push_to_hub's code path in {time.perf_counter() - start:.1f} s, verified in a fresh "
          f"process ({report.verified_with}): max rel err {report.max_rel_err:.1e}")  # fmt: skip
    return exported, reference


@torch.no_grad()
def compare(tower: DemoTower, embeddings: Embeddings, classes: list[str], reference: Reference, photos: dict) -> bool:
    """Prints the tower's table against transformers. True when every image has the reference's grid and a cosine
    >= MIN_COSINE, and the fresh process ran the exported folder's own code."""
    print(f"\n{tower.name}, loaded with AutoModel / AutoImageProcessor.from_pretrained(export, trust_remote_code=True) "
          f"in a fresh process:\n  {classes[0]}\n  {classes[1]}")  # fmt: skip
    remote_code = all(name.startswith("transformers_modules.") for name in classes)
    if not remote_code:
        print("  FAIL: these are not the exported folder's code")
    if embeddings.skipped or embeddings.names != list(photos):
        raise RuntimeError(f"The demo photos were not all encoded: {embeddings.names}, skipped {embeddings.skipped}")
    references = [reference(image) for image in photos.values()]

    print(f"  embedding: {embeddings.pooled_kind}")
    print(f"  {'image':<18} {'size (HxW)':>11} {'grid (t,h,w)':>14} {'patches':>8} {'cosine vs transformers':>23} "
          f"{'rel err':>8}")  # fmt: skip
    passed = remote_code
    for name, size, grid, pooled, (expected, expected_grid) in zip(
        embeddings.names, embeddings.sizes, embeddings.grid_thw, torch.cat(embeddings.pooled), references, strict=True
    ):
        t, h, w = grid[0].tolist()
        cos = cosine(pooled, expected)
        same_grid = (h, w) == expected_grid
        passed = passed and same_grid and cos >= MIN_COSINE  # a NaN fails too
        note = "" if same_grid else f"  FAIL: transformers saw grid {expected_grid}"
        print(f"  {name:<18} {f'{size[0]}x{size[1]}':>11} {f'({t}, {h}, {w})':>14} {t * h * w:>8} {cos:>23.8f} "
              f"{rel_err(pooled, expected):>8.1e}{note}")  # fmt: skip
    return passed


def interleaved_median_seconds(
    runs: dict[str, Callable[[], object]], warm: tuple[str, ...] = ()
) -> tuple[dict[str, float], int]:
    """(median seconds of each run, rounds timed): `WARMUP_CALLS` calls of each run not named in `warm` (those ran
    just before), then rounds calling each once in turn (see MIN_ROUNDS). benchmarks/measure.py's method on the host
    clock (the package cannot import benchmarks/), interleaved because a shared CPU's speed drifts: both sides see
    the same drift."""
    for name, run in runs.items():
        for _ in range(0 if name in warm else WARMUP_CALLS):
            run()
    seconds = {name: [] for name in runs}
    start_timing = time.perf_counter()
    rounds = 0
    while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS and time.perf_counter() - start_timing < TIMING_BUDGET_S):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - start)
        rounds += 1
    return {name: statistics.median(times) for name, times in seconds.items()}, rounds


@torch.no_grad()
def time_both(tower: DemoTower, exported: Path, embeddings: Embeddings, reference: Reference, photos: dict) -> None:
    """Prints the medians of warm, interleaved model calls on the images of the encode job's first forward: ours
    packed in that forward, transformers image by image. The first forward only, so that the timing costs a few
    calls of one forward's work (all six photos for Siglip2, two for AIMv2-native's larger grids), not of the job's.
    Inputs are preprocessed before (the encode job's reading and preprocessing is its own line)."""
    model = tower.model_class.from_pretrained(exported).eval()
    processor = tower.processor_class.from_pretrained(exported)
    images = list(photos.values())[: embeddings.batch_sizes[0]]
    packed_inputs = processor(images, return_tensors="pt")
    reference_inputs = [reference.prepare(image) for image in images]
    # compare() ran transformers on every photo just before: its warm-up; ours is a fresh model here
    medians, rounds = interleaved_median_seconds({
        "packed": lambda: model(packed_inputs["pixel_values"], packed_inputs["grid_thw"]),
        "transformers": lambda: [reference.run(inputs) for inputs in reference_inputs],
    }, warm=("transformers",))  # fmt: skip
    count, patches = len(images), embeddings.batch_tokens[0]
    print(f"  model time, median of {rounds} interleaved calls of each, warm, on the encode job's first forward:")
    print(f"    packed, one forward of {count} images ({patches} patches): {medians['packed'] * 1e3:.1f} ms "
          f"= {count / medians['packed']:.1f} images/s")  # fmt: skip
    masks = [inputs["pixel_attention_mask"] for inputs in reference_inputs if "pixel_attention_mask" in inputs]
    padding = f", {sum(int((m == 0).sum()) for m in masks)} padding patches computed" if masks else ""
    print(f"    transformers, image by image{padding}: {medians['transformers'] * 1e3:.1f} ms "
          f"= {count / medians['transformers']:.1f} images/s "
          f"(packed / transformers: {medians['transformers'] / medians['packed']:.2f}x)")  # fmt: skip
    forwards = len(embeddings.batch_sizes)
    print(f"  encode job in the fresh process, all {len(photos)} photos in {forwards} forward{'s' * (forwards != 1)} "
          f"of {embeddings.batch_sizes} images (token budget {DEMO_MAX_TOKENS}), one cold pass with reading and "
          f"preprocessing: {embeddings.total_seconds:.2f} s")  # fmt: skip


def print_what_the_timings_mean() -> None:
    print(
        f"\nWhat the timings mean: tiny random towers (hidden {SIGLIP2['hidden_size']}, "
        f"{SIGLIP2['num_hidden_layers']} layers) on {torch.get_num_threads()} CPU threads, six photos. They show "
        "that both sides ran and how the demo's forwards compare on this machine; they say little about real "
        "models, where packing pays by not computing padding (Siglip2's padded batches) and by one forward instead "
        "of one per image (AIMv2 native), mostly on a GPU. Here both sides do nearly the same arithmetic: one photo at "
        "a time leaves transformers little padding to compute (counted above), and a CPU gains little from one "
        "large forward over several small ones, so ratios near 1x are expected, and a busy machine moves them.\n"
        f"Real towers (so400m, AIMv2-L) on an H200, with their commands: {GPU_RESULTS} in the repository "
        "(2.0x to 8.3x faster than transformers' towers there)."
    )


def quiet_libraries() -> None:
    """The demo prints its own report: no transformers warnings, no progress bars of file writes and loads."""
    import huggingface_hub.utils
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    huggingface_hub.utils.disable_progress_bars()


def run_demo() -> int:
    start = time.perf_counter()
    try:
        photos = load_photos()
    except ImportError:
        print("The demo encodes scikit-image's photos: pip install scikit-image (it is in the test extra: "
              'pip install -e ".[test]")')  # fmt: skip
        return 2
    quiet_libraries()
    print("packed-vit demo: original-format checkpoints -> push_to_hub export -> AutoModel / AutoImageProcessor "
          f"(trust_remote_code) -> {len(photos)} scikit-image photos; fp32, CPU, "
          f"{torch.get_num_threads()} threads\n")  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="packed_vit_demo_") as work:
        work = Path(work)
        built = [build_and_export(tower, work) for tower in TOWERS]
        encoded = encode_with_remote_code([exported for exported, _ in built], work)
        passed = []
        for tower, (exported, reference), (embeddings, classes) in zip(TOWERS, built, encoded):
            passed.append(compare(tower, embeddings, classes, reference, photos))
            time_both(tower, exported, embeddings, reference, photos)
    print_what_the_timings_mean()
    if all(passed):
        verdict = f"PASS: every cosine >= {MIN_COSINE}, and both towers ran as the exported remote code"
    else:
        verdict = f"FAIL: a cosine < {MIN_COSINE}, or a tower did not run as the exported remote code (see above)"
    print(f"\n{verdict}\ndemo wall time: {time.perf_counter() - start:.1f} s")
    return 0 if all(passed) else 1
