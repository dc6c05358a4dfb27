"""The encode job end to end: inputs -> pipeline -> output, on one process or each rank of a torchrun.

`encode_images` is the Python entry (images in memory or paths -> `Embeddings`); `run_job` is what
`packed_vit encode` runs.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import ranks
from .inputs import Part, find_parts
from .output import Embeddings, JobMismatch, ShardWriter, prepare_folder, read_embeddings_file, read_manifest, \
    resume_position, save_embeddings, shard_file, shard_metadata, write_manifest  # fmt: skip
from .pipeline import PairsSource, encoded_results

DEFAULT_MAX_TOKENS = 16384
DEFAULT_SHARD_SIZE = 10000


def process_start_time() -> float | None:
    """When this process started (wall clock), from /proc on Linux: start-up includes the interpreter and imports."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as boot:
            boot_time = next(int(line.split()[1]) for line in boot if line.startswith("btime"))
        import os

        return boot_time + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


class Progress:
    """tqdm when it is importable (it comes with huggingface_hub), else a line per update on stderr. Messages go
    through `write`, so that they do not break the bar."""

    def __init__(self, total: int | None, enabled: bool = True, description: str | None = None):
        self.total, self.done, self.enabled = total, 0, enabled
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="img", file=sys.stderr, desc=description) if tqdm and enabled else None

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


def report(result, bar: Progress, skipped_so_far: int) -> int:
    """One pipeline result on the bar and its skips on stderr -> the new skip count."""
    for entry in result.skipped:
        bar.write(f"skipped {entry.name}: {entry.why}")
    skipped_so_far += len(result.skipped)
    bar.update(len(result.entries), skipped_so_far)
    return skipped_so_far


def encode_images(
    model,
    processor,
    images: Iterable[tuple[str, Any]],
    max_tokens: int = DEFAULT_MAX_TOKENS,
    patch_features: bool = False,
    total: int | None = None,
    progress: bool = True,
    workers: int = 0,
    preprocess: str = "cpu",
) -> Embeddings:
    """(name, image) pairs -> `Embeddings`, the images in the order given, less the skipped ones.

    `images`: image paths or images the processor takes. `total`: the number of images, for the progress bar.
    `workers`: decoding processes (0: this one). `preprocess`: "cpu" (PIL, the processor) or "gpu" (Siglip2 on CUDA).
    """
    pairs = list(images)
    result = Embeddings()
    bar = Progress(total, enabled=progress)
    skipped = 0
    start = time.perf_counter()
    try:
        for forward in encoded_results(model, processor, PairsSource(pairs), max_tokens, patch_features, workers,
                                       preprocess):  # fmt: skip
            result.add(forward)
            skipped = report(forward, bar, skipped)
    finally:
        bar.close()
    result.total_seconds = time.perf_counter() - start
    return result


def load_model_and_processor(
    source: str,
    revision: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    attn_implementation: str | None = None,
):
    """Any checkpoint the towers load (DESIGN §4: original, transformers, ours, exported; folder or Hub id) -> (tower
    in eval mode on `device` in `dtype`, its packed image processor with the checkpoint's settings)."""
    from ..hub_export import read_source_config, source_processor, tower_for_model_type

    config, _ = read_source_config(source, revision)
    tower = tower_for_model_type(config.get("model_type"))
    model = tower.model_class.from_pretrained(
        source, revision=revision, dtype=dtype, device_map=str(device), attn_implementation=attn_implementation
    )
    return model.eval(), source_processor(tower, model.config, source, revision)


# --------------------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------------------


@dataclass
class JobOptions:
    inputs: list[str]
    model: str
    out: Path
    revision: str | None = None
    device: str | None = None
    dtype: str | None = None
    max_tokens: int = DEFAULT_MAX_TOKENS
    patch_features: bool = False
    attn_implementation: str | None = None
    workers: int | None = None
    preprocess: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    progress: bool = True

    @property
    def to_folder(self) -> bool:
        return self.out.suffix != ".safetensors"


def fail(message: str, status: int = 2) -> int:
    print(f"packed-vit encode: {message}", file=sys.stderr)
    return status


@dataclass
class PartsSource:
    """The samples of parts, each from its resume position on, tagged (part index, position in the part). A class,
    not a closure, so that DataLoader workers started by spawn (macOS and Windows by default) receive it pickled."""

    todo: list[tuple[Part, int]]

    def __call__(self, mine):
        index = 0  # the running index over the samples to encode, which the workers are dealt by
        for part, start in self.todo:
            def wanted(position, base=index - start, start=start):
                return position >= start and mine(base + position)

            for position, sample in part.samples(wanted):
                if position < start:
                    continue
                yield (part.index, position), sample
                index += 1


def run_job(options: JobOptions, started: float | None = None) -> int:
    """`started`: when the command started (wall clock) for the start-up time; default: now."""
    started = started or time.time()
    rank, world_size = ranks.start()
    try:
        return _run_job(options, rank, world_size, started)
    finally:
        ranks.finish()


def _run_job(options: JobOptions, rank: int, world_size: int, started: float) -> int:
    from .pipeline import default_workers

    device = ranks.device_of_rank(options.device)
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes[options.dtype] if options.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not options.to_folder and world_size > 1:
        return fail("--out FILE.safetensors is for one process: give a folder as --out with torchrun")
    try:
        parts = find_parts(options.inputs, options.shard_size)
    except FileNotFoundError as error:
        return fail(str(error))
    if not parts:
        return fail(f"no image files in {' '.join(options.inputs)}")

    folder = options.out
    shard_size = options.shard_size
    # What makes two runs the same job: a resumed run must be it, or the shards would mix two jobs' embeddings.
    job = {
        "model": options.model, "revision": options.revision, "inputs": list(options.inputs),
        "dtype": str(dtype).removeprefix("torch."), "max_tokens": options.max_tokens,
        "patch_features": options.patch_features, "preprocess": options.preprocess, "shard_size": shard_size,
        "attn_implementation": options.attn_implementation,
    }  # fmt: skip
    if options.to_folder:
        error = None
        if rank == 0:
            try:
                prepare_folder(folder, job, options.overwrite)
            except JobMismatch as mismatch:
                error = str(mismatch)
        error = ranks.broadcast_from_rank0(error)  # every rank stops on rank 0's refusal
        if error:
            return fail(error)

    mine = ranks.parts_of_rank(parts, rank, world_size)
    todo = []
    for part in mine:
        start = resume_position(folder, part, shard_size) if options.to_folder else 0
        if start is not None:
            todo.append((part, start))
    resumed = sum(1 for part, start in todo if start > 0) + (len(mine) - len(todo))

    try:
        model, processor = load_model_and_processor(options.model, options.revision, device, dtype,
                                                     options.attn_implementation)  # fmt: skip
    except (OSError, ValueError, TypeError) as error:  # not a checkpoint, unknown format, unreachable, bad option
        return fail(f"cannot load --model {options.model}: {error}")
    loaded = time.time()
    preprocess = options.preprocess  # "auto": the GPU path where it applies (pipeline.encoded_results)
    workers = default_workers() if options.workers is None else options.workers

    known = [part.known_length for part, _ in todo]
    total = None if None in known else sum(known) - sum(start for _, start in todo)
    bar = Progress(total, enabled=options.progress and rank == 0,
                   description=f"rank 0 of {world_size}" if world_size > 1 else None)  # fmt: skip
    writer = ShardWriter(folder, options.model, shard_size) if options.to_folder else None
    embeddings = Embeddings()
    skipped = 0
    first_forward = None
    group_of = (lambda tag: (tag[0], tag[1] // shard_size)) if options.to_folder else (lambda tag: None)
    try:
        results = encoded_results(model, processor, PartsSource(todo), options.max_tokens, options.patch_features,
                                  workers, preprocess, group_of)  # fmt: skip
        for result in results:
            first_forward = first_forward or result.launched_at
            if writer is not None:
                writer.add(result)
            else:
                embeddings.add(result)
            skipped = report(result, bar, skipped) if rank == 0 else skipped + len(result.skipped)
            if writer is not None:
                embeddings.skipped.extend((e.name, e.why) for e in result.skipped)
                embeddings.names.extend(e.name for e in result.images)
                embeddings.model_seconds += result.model_seconds
        if writer is not None:
            writer.close_shard(part_complete=True)
    except ValueError as error:
        return fail(str(error))
    finally:
        bar.close()
    finished = time.time()
    summary = {
        "rank": rank, "images": len(embeddings.names), "skipped": len(embeddings.skipped),
        "shards": writer.written if writer else 1, "model_seconds": embeddings.model_seconds,
        "startup_seconds": (first_forward or finished) - started, "load_seconds": loaded - started,
        "seconds": finished - started, "resumed_parts": resumed,
    }  # fmt: skip
    summaries = ranks.gather(summary)
    if rank != 0:
        return 0
    images = sum(s["images"] for s in summaries)
    skipped = sum(s["skipped"] for s in summaries)
    seconds = max(s["seconds"] for s in summaries)
    if options.to_folder:
        manifest = finish_manifest(folder, parts, job, summaries)
        written = sum(s["shards"] for s in summaries)
        where = f"{len(manifest['shards'])} shards in {folder} ({written} written now)"
        images, skipped = manifest["images"], manifest["skipped"]
    else:
        if not embeddings.names:
            return fail(f"none of the {skipped} files could be read; nothing written", status=1)
        embeddings.total_seconds = finished - started
        folder.parent.mkdir(parents=True, exist_ok=True)
        save_embeddings(folder, embeddings, options.model)
        where = f"{folder} (pooled: {embeddings.pooled_kind})"
    forwards = len(embeddings.batch_sizes)
    steady = finished - (summary["startup_seconds"] + started)
    print(
        f"Encoded {images} image{'s' * (images != 1)} in {seconds:.2f} s ({images / max(steady, 1e-9):.1f} images/s "
        "from the first forward on"
        f"{f', {world_size} ranks' if world_size > 1 else ''}); skipped {skipped} unreadable file"
        f"{'s' * (skipped != 1)}; wrote {where}. Start-up (process start to first forward) "
        f"{summary['startup_seconds']:.2f} s, of which model load {summary['load_seconds']:.2f} s"
        + (f"; {forwards} forward{'s' * (forwards != 1)} of at most {options.max_tokens} patches" if forwards else "")
    )
    if options.to_folder and images == 0:
        return fail("no image could be read", status=1)
    return 0


def finish_manifest(folder: Path, parts: list[Part], job: dict, summaries: list[dict]) -> dict:
    """Rank 0, once every rank is done: the manifest lists every part's shards and their images, in input order."""
    shards, images, skipped = [], 0, 0
    for part in parts:
        chunk = 0
        while (folder / shard_file(part.index, chunk)).is_file():
            meta = shard_metadata(folder / shard_file(part.index, chunk))
            names, skipped_names = json.loads(meta["names"]), json.loads(meta["skipped"])
            shards.append({"file": shard_file(part.index, chunk), "part": part.index, "source": part.source,
                           "images": names, "skipped": skipped_names})  # fmt: skip
            images, skipped = images + len(names), skipped + len(skipped_names)
            chunk += 1
    manifest = {
        "format": read_manifest(folder)["format"], "version": 1, "job": job, "complete": True,
        "images": images, "skipped": skipped, "parts": len(parts), "shards": shards,
        "world_size": len(summaries), "total_seconds": max(s["seconds"] for s in summaries),
    }  # fmt: skip
    write_manifest(folder, manifest)
    return manifest
