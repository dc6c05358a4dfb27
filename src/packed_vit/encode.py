"""Images -> embeddings with a packed tower: `python -m packed_vit encode` and the demo run this.

The images stream through the checkpoint's packed image processor one at a time (an unreadable one is reported and
skipped, the rest go on), and are packed into forwards by a token budget: greedily in order, a forward is flushed
when the next image would take it past `max_tokens` patches (an image larger than the budget runs alone). Each image
gets one pooled vector: the tower's `pooler_output` when the checkpoint has a head, else the mean of its patch
features (`last_hidden_state`); optionally the patch features themselves, with their `grid_thw`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import PIL.Image
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import __version__
from .hub_export import read_source_config, source_processor, tower_for_model_type

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm", ".pgm")
DEFAULT_MAX_TOKENS = 16384
POOLED_BY_HEAD = "pooler_output of the checkpoint's attention-pooling head"
POOLED_BY_MEAN = "mean of each image's patch features (last_hidden_state); the checkpoint has no head"

# What reading a broken or non-image file raises in PIL (SyntaxError: some plugins' "broken file" error), and what
# the processors raise on an image they cannot take.
UNREADABLE = (OSError, SyntaxError, ValueError, TypeError, EOFError, PIL.Image.DecompressionBombError)


# --------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------


def find_images(inputs: Iterable[str | Path]) -> list[Path]:
    """Files given by name (whatever their extension), and the image files under given folders (recursively, by
    extension, sorted: the same order on every run). A path that does not exist is a FileNotFoundError."""
    found = []
    for path in map(Path, inputs):
        if path.is_dir():
            files = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            found.extend(sorted(files, key=lambda p: p.relative_to(path).as_posix()))
        elif path.is_file():
            found.append(path)
        else:
            raise FileNotFoundError(f"No such file or folder: {path}")
    return found


def read_image(path: Path) -> PIL.Image.Image:
    """The decoded image (the first frame of an animation). Decoding happens here, so a corrupt file fails here."""
    with PIL.Image.open(path) as image:
        image.load()
        return image.copy()


@dataclass
class Prepared:
    """One image through the processor: its packed patches [n, p*p*C] and grid (t, h, w)."""

    name: str
    size: tuple[int, int]  # (height, width) in pixels, as read
    pixel_values: torch.Tensor
    grid_thw: torch.Tensor  # [1, 3]

    @property
    def num_patches(self) -> int:
        return self.pixel_values.shape[0]


def prepare(name: str, image: str | Path | PIL.Image.Image, processor) -> Prepared:
    """`image`: a path (read with PIL) or a PIL image. RGB conversion is on: a grayscale, palette or RGBA file is
    read as the picture it shows (alpha composited on white) rather than refused."""
    if isinstance(image, (str, Path)):
        image = read_image(Path(image))
    batch = processor(image, return_tensors="pt", do_convert_rgb=True)
    return Prepared(name, (image.height, image.width), batch["pixel_values"], batch["grid_thw"])


def prepared_images(
    images: Iterable[tuple[str, Any]], processor, on_skip: Callable[[str, str], None]
) -> Iterator[Prepared]:
    """Each (name, image) processed, in order; one that cannot be read or processed goes to `on_skip(name, why)`."""
    for name, image in images:
        try:
            yield prepare(name, image, processor)
        except UNREADABLE as error:
            on_skip(name, f"{type(error).__name__}: {error}")


def token_budget_batches(items: Iterable, max_tokens: int, tokens: Callable[[Any], int]) -> Iterator[list]:
    """Greedy, in order: a batch is flushed when the next item would take it past `max_tokens`; an item larger than
    the budget is a batch of its own."""
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive number of patches, got {max_tokens}")
    batch, batch_tokens = [], 0
    for item in items:
        n = tokens(item)
        if batch and batch_tokens + n > max_tokens:
            yield batch
            batch, batch_tokens = [], 0
        batch.append(item)
        batch_tokens += n
    if batch:
        yield batch


# --------------------------------------------------------------------------------------------------------------
# Running the tower
# --------------------------------------------------------------------------------------------------------------


def mean_per_image(features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """[N, D] patch features of packed images -> [B, D], each image's mean, in one scatter (no loop over images)."""
    lengths = grid_thw.prod(1).to(features.device)
    image_of_patch = torch.repeat_interleave(torch.arange(len(lengths), device=features.device), lengths)
    sums = torch.zeros(len(lengths), features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, image_of_patch, features.float())
    return sums / lengths[:, None]


@torch.no_grad()
def run_batch(
    model, batch: list[Prepared], keep_patch_features: bool
) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """One packed forward -> (pooled [B, D] float32 on the CPU, patch features [N, D] or None, pooled by the head)."""
    weight = next(model.parameters())
    pixel_values = torch.cat([item.pixel_values for item in batch]).to(weight.device, weight.dtype)
    grid_thw = torch.cat([item.grid_thw for item in batch])
    out = model(pixel_values, grid_thw)
    by_head = out.pooler_output is not None
    pooled = out.pooler_output.float() if by_head else mean_per_image(out.last_hidden_state, grid_thw)
    patch_features = out.last_hidden_state.float().cpu() if keep_patch_features else None
    return pooled.cpu(), patch_features, by_head


@dataclass
class Embeddings:
    names: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)  # (height, width) of each image as read
    grid_thw: list[torch.Tensor] = field(default_factory=list)  # [1, 3] each
    pooled: list[torch.Tensor] = field(default_factory=list)  # [B, D] per forward
    patch_features: list[torch.Tensor] = field(default_factory=list)  # [N, D] per forward, when kept
    pooled_by_head: bool | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (name, why)
    batch_sizes: list[int] = field(default_factory=list)  # images per forward
    batch_tokens: list[int] = field(default_factory=list)  # patches per forward
    model_seconds: float = 0.0  # in the forwards (synchronized), not reading or processing images
    total_seconds: float = 0.0

    @property
    def pooled_kind(self) -> str:
        return POOLED_BY_HEAD if self.pooled_by_head else POOLED_BY_MEAN

    def tensors(self) -> dict[str, torch.Tensor]:
        """`pooled` [B, D], `grid_thw` [B, 3], and `patch_features` [N, D] when kept."""
        dim = self.pooled[0].shape[1] if self.pooled else 0
        tensors = {
            "pooled": torch.cat(self.pooled) if self.pooled else torch.zeros(0, dim),
            "grid_thw": torch.cat(self.grid_thw) if self.grid_thw else torch.zeros(0, 3, dtype=torch.int64),
        }
        if self.patch_features:
            tensors["patch_features"] = torch.cat(self.patch_features)
        return tensors


class Progress:
    """tqdm when it is importable (it comes with huggingface_hub), else a line per forward on stderr. Messages go
    through `write`, so that they do not break the bar."""

    def __init__(self, total: int | None, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="img", file=sys.stderr) if tqdm is not None and enabled else None

    def update(self, images: int, skipped: int = 0) -> None:
        self.done += images
        if self.bar is not None:
            self.bar.update(images)
            self.bar.set_postfix(skipped=skipped, refresh=False)
        elif self.enabled:
            total = self.total if self.total is not None else "?"
            print(f"{self.done}/{total} images ({skipped} skipped)", file=sys.stderr)

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def encode_images(
    model,
    processor,
    images: Iterable[tuple[str, Any]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    patch_features: bool = False,
    total: int | None = None,
    progress: bool = True,
) -> Embeddings:
    """(name, image) pairs -> `Embeddings`, the images in the order given, less the skipped ones.

    `images`: image paths or images the processor takes. `total`: the number of images, for the progress bar.
    """
    result = Embeddings()
    bar = Progress(total, enabled=progress)
    device = next(model.parameters()).device

    def skip(name: str, why: str) -> None:
        result.skipped.append((name, why))
        bar.write(f"skipped {name}: {why}")
        bar.update(1, len(result.skipped))

    start = time.perf_counter()
    try:
        prepared = prepared_images(images, processor, skip)
        for batch in token_budget_batches(prepared, max_tokens, tokens=lambda item: item.num_patches):
            synchronize(device)
            forward_start = time.perf_counter()
            pooled, features, by_head = run_batch(model, batch, patch_features)
            synchronize(device)
            result.model_seconds += time.perf_counter() - forward_start
            result.pooled_by_head = by_head
            result.pooled.append(pooled)
            if features is not None:
                result.patch_features.append(features)
            for item in batch:
                result.names.append(item.name)
                result.sizes.append(item.size)
                result.grid_thw.append(item.grid_thw)
            result.batch_sizes.append(len(batch))
            result.batch_tokens.append(sum(item.num_patches for item in batch))
            bar.update(len(batch), len(result.skipped))
    finally:
        bar.close()
    result.total_seconds = time.perf_counter() - start
    return result


# --------------------------------------------------------------------------------------------------------------
# Loading a checkpoint, writing the output
# --------------------------------------------------------------------------------------------------------------


def load_model_and_processor(
    source: str,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
):
    """Any checkpoint the towers load (DESIGN §4: original, transformers, ours, exported; folder or Hub id) -> (tower
    in eval mode on `device` in `dtype`, its packed image processor with the checkpoint's settings)."""
    config, _ = read_source_config(source, revision)
    tower = tower_for_model_type(config.get("model_type"))
    model = tower.model_class.from_pretrained(
        source, revision=revision, dtype=dtype, device_map=str(device), attn_implementation=attn_implementation
    )
    return model.eval(), source_processor(tower, model.config, source, revision)


def save_embeddings(path, embeddings: Embeddings, model_source: str) -> None:
    """safetensors: `pooled` [B, D] float32, `grid_thw` [B, 3], `patch_features` [N, D] (when kept); metadata (JSON
    strings): `names`, `image_sizes` (height, width), `pooled` (what the pooled vectors are), `skipped`, `model`,
    and how the run went: `batch_sizes` (images per forward), `batch_tokens` (patches per forward), `model_seconds`,
    `total_seconds`."""
    metadata = {
        "format": "pt",
        "names": json.dumps(embeddings.names),
        "image_sizes": json.dumps([list(size) for size in embeddings.sizes]),
        "pooled": embeddings.pooled_kind,
        "skipped": json.dumps([name for name, _ in embeddings.skipped]),
        "model": model_source,
        "batch_sizes": json.dumps(embeddings.batch_sizes),
        "batch_tokens": json.dumps(embeddings.batch_tokens),
        "model_seconds": json.dumps(embeddings.model_seconds),
        "total_seconds": json.dumps(embeddings.total_seconds),
        "packed_vit_version": __version__,
    }
    save_file({name: t.contiguous() for name, t in embeddings.tensors().items()}, str(path), metadata=metadata)


def load_embeddings(path) -> Embeddings:
    """What `save_embeddings` wrote (the skipped images without the reasons), as one batch."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    return Embeddings(
        names=json.loads(meta["names"]),
        sizes=[tuple(size) for size in json.loads(meta["image_sizes"])],
        grid_thw=list(tensors["grid_thw"].split(1)),
        pooled=[tensors["pooled"]],
        patch_features=[tensors["patch_features"]] if "patch_features" in tensors else [],
        pooled_by_head=meta["pooled"] == POOLED_BY_HEAD,
        skipped=[(name, "") for name in json.loads(meta["skipped"])],
        batch_sizes=json.loads(meta["batch_sizes"]),
        batch_tokens=json.loads(meta["batch_tokens"]),
        model_seconds=json.loads(meta["model_seconds"]),
        total_seconds=json.loads(meta["total_seconds"]),
    )
