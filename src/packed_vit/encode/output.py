"""Stage 3 of the encode job: embeddings -> files. One safetensors file for small jobs, or a folder of shards.

The folder (`--out DIR`): `manifest.json` (the job: model, options, inputs; its parts and their shards with their
images) and shards `part-PPPPPP-CCCCC.safetensors`: chunk C of part P, the samples at positions
[C * shard_size, (C + 1) * shard_size) of the part, encoded or skipped. A shard is written to a temporary name and
renamed once complete (after an fsync, so that a machine crash cannot leave a renamed but empty shard), so a shard
file present is a finished shard: that is what resuming relies on, after checking it (its size against its header,
the sha256 of each tensor against its metadata), so that a shard damaged since is encoded again, never trusted. Each
shard's metadata says whether it ends its part (a tar shard's length is known only once read). Temporary names are
unique to the writing process, and one run at a time holds the folder (`FolderLock`).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .. import __version__

POOLED_BY_HEAD = "pooler_output of the checkpoint's attention-pooling head"
POOLED_BY_MEAN = "mean of each image's patch features (last_hidden_state); the checkpoint has no head"
MANIFEST = "manifest.json"
FOLDER_FORMAT = "packed-vit embeddings folder"
LOCK = ".lock"


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
    tensors = {name: t.contiguous() for name, t in embeddings.tensors().items()}
    metadata["sha256"] = json.dumps({name: tensor_sha256(t) for name, t in tensors.items()})
    write_atomically(Path(path), lambda temporary: save_file(tensors, str(temporary), metadata=metadata))


def tensor_sha256(tensor: torch.Tensor) -> str:
    """Of the tensor's bytes as safetensors stores them (contiguous, little-endian on the machines torch runs on)."""
    return hashlib.sha256(tensor.reshape(-1).view(torch.uint8).numpy()).hexdigest()


class WriteFault(OSError):
    """Writing an output file failed (a full disk, a lost mount...): the file is absent, its temporary removed."""


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)`, then the temporary file, flushed to disk, renamed to `path`: `path` is complete or absent.

    The temporary name is unique to this process (host, pid and a random part), so that two writers never rename
    each other's files. A fault while writing removes the temporary and raises WriteFault naming `path`."""
    temporary = path.with_name(f".{path.name}.{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as written:
            os.fsync(written.fileno())
        os.replace(temporary, path)
        fsync_folder(path.parent)
    except BaseException as error:  # a fault, or an interrupt: no temporary left behind
        temporary.unlink(missing_ok=True)
        if isinstance(error, (OSError, SafetensorError)):
            raise WriteFault(f"cannot write {path}: {error}") from error
        raise


def fsync_folder(folder: Path) -> None:
    """The rename itself on disk (POSIX: a folder's entries are flushed by an fsync of the folder)."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:  # not possible on every platform (Windows); the rename is still atomic
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


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
    text = json.dumps(manifest, indent=1) + "\n"
    write_atomically(folder / MANIFEST, lambda temporary: temporary.write_text(text))


def shard_file(part: int, chunk: int) -> str:
    return f"part-{part:06d}-{chunk:05d}.safetensors"


def shard_metadata(path: Path) -> dict:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


def shard_damage(path: Path, part: int, chunk: int) -> str | None:
    """What is wrong with a shard file, None when it is whole: its size is what its header says, it is the shard of
    (part, chunk), and each tensor's sha256 is the one its metadata recorded when it was written."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header_bytes = int.from_bytes(f.read(8), "little")
            if not 2 <= header_bytes <= size - 8:
                return f"{size} bytes, its header would need {header_bytes + 8}"
            header = json.loads(f.read(header_bytes))
        data_end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        if size != 8 + header_bytes + data_end:
            return f"{size} bytes, its header says {8 + header_bytes + data_end}"
        meta = header.get("__metadata__", {})
        if (meta.get("part"), meta.get("chunk")) != (str(part), str(chunk)):
            return f"its metadata names part {meta.get('part')} chunk {meta.get('chunk')}"
        expected = json.loads(meta.get("sha256", "{}"))  # shards of earlier versions have none: size checked only
        with safe_open(str(path), "pt") as f:
            for name, digest in expected.items():
                if tensor_sha256(f.get_tensor(name)) != digest:
                    return f"the sha256 of its {name} differs from the one written"
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as error:
        return f"unreadable: {type(error).__name__}: {error}"
    return None


class JobMismatch(ValueError):
    pass


def refuse_foreign_folder(folder: Path, overwrite: bool) -> None:
    """JobMismatch for a folder of other files (no manifest), unless `overwrite`. Our own hidden files aside: the
    lock, and the first manifest's temporary while a run that has just started writes it."""
    if overwrite or not folder.is_dir() or read_manifest(folder) is not None:
        return
    if any(path.name != LOCK and not path.name.startswith(f".{MANIFEST}.") for path in folder.iterdir()):
        raise JobMismatch(f"{folder} exists, is not empty and is not an encode output folder (no {MANIFEST})")


def prepare_folder(folder: Path, job: dict, overwrite: bool) -> None:
    """Rank 0, before any rank writes: a new folder gets a manifest of `job`; an existing one must hold the same
    job (resume), or is emptied of our files with `overwrite`, else JobMismatch."""
    refuse_foreign_folder(folder, overwrite)
    manifest = read_manifest(folder) if folder.is_dir() else None
    if manifest is not None and manifest.get("job") != job:
        if not overwrite:
            differing = sorted(k for k in set(job) | set(manifest.get("job", {}))
                               if job.get(k) != manifest.get("job", {}).get(k))  # fmt: skip
            raise JobMismatch(
                f"{folder} holds another job (it differs in: {', '.join(differing)}): pass --overwrite to replace "
                "it, or choose another --out"
            )
        manifest = None
    folder.mkdir(parents=True, exist_ok=True)
    # Temporary files of runs that died (the lock says none is running): never a finished shard, never needed.
    for stale in [*folder.glob(".part-*.tmp"), *folder.glob(f".{MANIFEST}.*tmp"), *folder.glob(".progress-*")]:
        stale.unlink()
    if manifest is None:
        for stale in folder.glob("part-*.safetensors"):
            stale.unlink()
        write_manifest(folder, {"format": FOLDER_FORMAT, "version": 1, "job": job, "complete": False})


def resume_position(folder: Path, part, shard_size: int, warn: Callable[[str], None] = print) -> int | None:
    """Where `part` resumes: the first position of its first missing or damaged shard (named through `warn`); None
    when the part is done."""
    chunk = 0
    while (path := folder / shard_file(part.index, chunk)).is_file():
        damage = shard_damage(path, part.index, chunk)
        if damage is not None:
            warn(f"shard {path} is damaged ({damage}): encoding it again")
            break
        if json.loads(shard_metadata(path).get("part_complete", "false")):
            return None
        chunk += 1
    return chunk * shard_size


def finished_shards(folder: Path, part) -> list[dict]:
    """The manifest's entries of a finished part's shards, in order: the shard files up to the one that ends it."""
    shards = []
    chunk = 0
    while (path := folder / shard_file(part.index, chunk)).is_file():  # none: a part without samples
        meta = shard_metadata(path)
        names, skipped = json.loads(meta["names"]), json.loads(meta["skipped"])
        shards.append({
            "file": path.name, "part": part.index, "source": part.source, "images": names, "skipped": skipped,
            "skipped_why": json.loads(meta.get("skipped_why", "[]")), "bytes": path.stat().st_size,
            "sha256": json.loads(meta.get("sha256", "{}")),
        })  # fmt: skip
        if json.loads(meta.get("part_complete", "false")):
            break
        chunk += 1
    return shards


# --------------------------------------------------------------------------------------------------------------
# One run at a time
# --------------------------------------------------------------------------------------------------------------


class FolderBusy(RuntimeError):
    pass


class FolderLock:
    """Holds an output folder for one run: an fcntl lock on `<folder>/.lock`, released when the run ends or its
    process dies (the kernel drops it; no stale lock to clean). The file says who holds it, for the refusal.

    POSIX record locks (`lockf`), not `flock`: DataLoader workers forked by the run do not inherit them, so a run
    killed with -9 leaves no lock behind in workers still exiting; they also hold across machines on NFS."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        self.file = open(folder / LOCK, "a+")
        try:
            fcntl.lockf(self.file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            self.file.seek(0)
            holder = self.file.read().strip() or "a process that has not written its name yet"
            self.file.close()
            if error.errno in (errno.EACCES, errno.EAGAIN):
                raise FolderBusy(f"{folder} is in use by another encode run ({holder}): wait for it to end, or "
                                 "stop it first (the same command then resumes its work)") from None  # fmt: skip
            raise
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} on host {socket.gethostname()}, since "
                        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}\n")  # fmt: skip
        self.file.flush()

    def release(self) -> None:
        if not self.file.closed:
            self.file.close()  # closing drops the lock


class ShardWriter:
    """Collects the results of one shard (a group: (part, chunk)) at a time and writes it when the next starts."""

    def __init__(self, folder: Path, model_source: str, shard_size: int):
        self.folder, self.model_source, self.shard_size = folder, model_source, shard_size
        self.group = None
        self.embeddings = Embeddings()
        self.written = 0

    def add(self, result) -> None:
        self.close_before(result.group)
        self.group = result.group
        self.embeddings.add(result)

    def close_before(self, group) -> None:
        """Writes the shard in progress if `group` is another one: its results are all in."""
        if group != self.group:
            self.close_shard(part_complete=self.group is not None and group[0] != self.group[0])

    def close_shard(self, part_complete: bool) -> None:
        """Writes the shard in progress (a fault: WriteFault, no file)."""
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
