"""Stage 3 of the encode job: embeddings -> files. One safetensors file for small jobs, or a folder of shards.

The folder (`--out DIR`): `manifest.json` (the job: model, options, inputs; its parts and their shards with their
images) and shards `part-PPPPPP-CCCCC.safetensors`: chunk C of part P, the samples at positions
[C * shard_size, (C + 1) * shard_size) of the part, encoded or skipped. A shard is written to a temporary name and
renamed once complete, so a shard file present is a finished shard: that is what resuming relies on. Each shard's
metadata says whether it ends its part (a tar shard's length is known only once read).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__

POOLED_BY_HEAD = "pooler_output of the checkpoint's attention-pooling head"
POOLED_BY_MEAN = "mean of each image's patch features (last_hidden_state); the checkpoint has no head"
MANIFEST = "manifest.json"
FOLDER_FORMAT = "packed-vit embeddings folder"


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
    model_seconds: float = 0.0  # in the forwards (device time), not reading or processing images
    total_seconds: float = 0.0

    @property
    def pooled_kind(self) -> str:
        return POOLED_BY_HEAD if self.pooled_by_head else POOLED_BY_MEAN

    def add(self, result) -> None:
        """A pipeline `ForwardResult`: its images in order, its skips."""
        self.skipped.extend((entry.name, entry.why) for entry in result.skipped)
        images = result.images
        if not images:
            return
        self.pooled_by_head = result.pooled_by_head
        self.pooled.append(result.pooled)
        if result.patch_features is not None:
            self.patch_features.append(result.patch_features)
        for entry in images:
            self.names.append(entry.name)
            self.sizes.append(tuple(int(n) for n in entry.size))
            self.grid_thw.append(torch.tensor([entry.grid], dtype=torch.int64))
        self.batch_sizes.append(len(images))
        self.batch_tokens.append(sum(entry.grid[0] * entry.grid[1] * entry.grid[2] for entry in images))
        self.model_seconds += result.model_seconds

    def extend(self, other: Embeddings) -> None:
        for name in ("names", "sizes", "grid_thw", "pooled", "patch_features", "skipped", "batch_sizes",
                     "batch_tokens"):  # fmt: skip
            getattr(self, name).extend(getattr(other, name))
        if other.pooled_by_head is not None:
            self.pooled_by_head = other.pooled_by_head
        self.model_seconds += other.model_seconds

    def tensors(self) -> dict[str, torch.Tensor]:
        """`pooled` [B, D], `grid_thw` [B, 3], and `patch_features` [N, D] when kept."""
        pooled = [p for p in self.pooled if p.numel()]
        dim = pooled[0].shape[1] if pooled else 0
        tensors = {
            "pooled": torch.cat(pooled) if pooled else torch.zeros(0, dim),
            "grid_thw": torch.cat(self.grid_thw) if self.grid_thw else torch.zeros(0, 3, dtype=torch.int64),
        }
        if self.patch_features:
            tensors["patch_features"] = torch.cat(self.patch_features)
        return tensors


def save_embeddings(path, embeddings: Embeddings, model_source: str, extra_metadata: dict | None = None) -> None:
    """safetensors: `pooled` [B, D] float32, `grid_thw` [B, 3], `patch_features` [N, D] (when kept); metadata (JSON
    strings): `names`, `image_sizes` (height, width), `pooled` (what the pooled vectors are), `skipped`, `model`,
    and how the run went: `batch_sizes` (images per forward), `batch_tokens` (patches per forward), `model_seconds`,
    `total_seconds`. Written to a temporary name and renamed: the file is complete or absent."""
    metadata = {
        "format": "pt",
        "names": json.dumps(embeddings.names),
        "image_sizes": json.dumps([list(size) for size in embeddings.sizes]),
        "pooled": embeddings.pooled_kind,
        "skipped": json.dumps([name for name, _ in embeddings.skipped]),
        "skipped_why": json.dumps([why for _, why in embeddings.skipped]),
        "model": model_source,
        "batch_sizes": json.dumps(embeddings.batch_sizes),
        "batch_tokens": json.dumps(embeddings.batch_tokens),
        "model_seconds": json.dumps(embeddings.model_seconds),
        "total_seconds": json.dumps(embeddings.total_seconds),
        "packed_vit_version": __version__,
        **(extra_metadata or {}),
    }
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    save_file({name: t.contiguous() for name, t in embeddings.tensors().items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


def read_embeddings_file(path) -> tuple[Embeddings, dict]:
    """One safetensors file `save_embeddings` wrote -> (its embeddings, its metadata)."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        tensors = {name: f.get_tensor(name) for name in f.keys()}
    skipped = json.loads(meta["skipped"])
    why = json.loads(meta.get("skipped_why", "null")) or [""] * len(skipped)
    embeddings = Embeddings(
        names=json.loads(meta["names"]),
        sizes=[tuple(size) for size in json.loads(meta["image_sizes"])],
        grid_thw=list(tensors["grid_thw"].split(1)),
        pooled=[tensors["pooled"]],
        patch_features=[tensors["patch_features"]] if "patch_features" in tensors else [],
        pooled_by_head=meta["pooled"] == POOLED_BY_HEAD,
        skipped=list(zip(skipped, why)),
        batch_sizes=json.loads(meta["batch_sizes"]),
        batch_tokens=json.loads(meta["batch_tokens"]),
        model_seconds=json.loads(meta["model_seconds"]),
        total_seconds=json.loads(meta["total_seconds"]),
    )
    return embeddings, meta


def load_embeddings(path) -> Embeddings:
    """What `packed_vit encode` wrote, a file or a folder, as one batch in input order (skipped images with their
    reasons). A folder must be complete (its manifest says so): finish the job first by running it again."""
    path = Path(path)
    if not path.is_dir():
        return read_embeddings_file(path)[0]
    manifest = read_manifest(path)
    if manifest is None:
        raise ValueError(f"{path} has no {MANIFEST}: not a packed-vit encode output folder")
    if not manifest.get("complete"):
        raise ValueError(f"{path} is an unfinished job: run the same encode command again to finish it")
    result = Embeddings()
    for shard in manifest["shards"]:
        result.extend(read_embeddings_file(path / shard["file"])[0])
    result.total_seconds = manifest.get("total_seconds", 0.0)
    return result


# --------------------------------------------------------------------------------------------------------------
# The shard folder
# --------------------------------------------------------------------------------------------------------------


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(folder: Path, manifest: dict) -> None:
    temporary = folder / f".{MANIFEST}.tmp"
    temporary.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(temporary, folder / MANIFEST)


def shard_file(part: int, chunk: int) -> str:
    return f"part-{part:06d}-{chunk:05d}.safetensors"


def shard_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


class JobMismatch(ValueError):
    pass


def prepare_folder(folder: Path, job: dict, overwrite: bool) -> None:
    """Rank 0, before any rank writes: a new folder gets a manifest of `job`; an existing one must hold the same
    job (resume), or is emptied of our files with `overwrite`, else JobMismatch."""
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is None and folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise JobMismatch(f"{folder} exists, is not empty and is not an encode output folder (no {MANIFEST})")
    if manifest is not None and manifest.get("job") != job:
        if not overwrite:
            differing = sorted(k for k in set(job) | set(manifest.get("job", {}))
                               if job.get(k) != manifest.get("job", {}).get(k))  # fmt: skip
            raise JobMismatch(
                f"{folder} holds another job (it differs in: {', '.join(differing)}): pass --overwrite to replace "
                "it, or choose another --out"
            )
        manifest = None
    if manifest is None:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in [*folder.glob("part-*.safetensors"), *folder.glob(".part-*.tmp")]:
            stale.unlink()
        write_manifest(folder, {"format": FOLDER_FORMAT, "version": 1, "job": job, "complete": False})


def resume_position(folder: Path, part, shard_size: int) -> int | None:
    """Where `part` resumes: the first position of its first missing shard; None when the part is done."""
    chunk = 0
    while (folder / shard_file(part.index, chunk)).is_file():
        chunk += 1
    if chunk == 0:
        return 0
    if json.loads(shard_metadata(folder / shard_file(part.index, chunk - 1)).get("part_complete", "false")):
        return None
    return chunk * shard_size


class ShardWriter:
    """Collects the results of one shard (a group: (part, chunk)) at a time and writes it when the next starts."""

    def __init__(self, folder: Path, model_source: str, shard_size: int):
        self.folder, self.model_source, self.shard_size = folder, model_source, shard_size
        self.group = None
        self.embeddings = Embeddings()
        self.written = 0

    def add(self, result) -> None:
        if result.group != self.group:
            self.close_shard(part_complete=self.group is not None and result.group[0] != self.group[0])
            self.group = result.group
        self.embeddings.add(result)

    def close_shard(self, part_complete: bool) -> None:
        if self.group is None:
            return
        part, chunk = self.group
        save_embeddings(self.folder / shard_file(part, chunk), self.embeddings, self.model_source,
                        {"part": str(part), "chunk": str(chunk), "part_complete": json.dumps(part_complete)})  # fmt: skip
        self.written += 1
        self.group, self.embeddings = None, Embeddings()

    def part_finished(self, part: int) -> None:
        """The pipeline has no more samples of `part`: its last shard ends it."""
        if self.group is not None and self.group[0] == part:
            self.close_shard(part_complete=True)
