"""The encode job end to end: inputs -> pipeline -> output, on one process or each rank of a torchrun.

`encode_images` is the Python entry (images in memory or paths -> `Embeddings`); `run_job` is what
`packed_vit encode` runs.
"""

from __future__ import annotations

import collections
import copy
import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from . import ranks
from .inputs import Part, find_parts
from .jpeg_decoders import check_jpeg_decoder
from .output import Embeddings, FolderBusy, FolderLock, JobMismatch, ShardWriter, WriteFault, finished_shards, \
    prepare_folder, read_manifest, refuse_foreign_folder, resume_position, save_embeddings, write_manifest  # fmt: skip
from .pipeline import PairsSource, StageClock, encoded_results, use_more_hardware_queues, warm_up

# Patches per forward. An eager forward's host time is its kernel launches (~20 ms for so400m or AIMv2-L on the H200
# machine, shared under one GIL with the preprocessing thread), the same at any size, so a forward must be long on the
# GPU to hide it: at 16384 patches (22-29 ms of GPU at 256 patches per image) the launching thread was the bound; at
# 32768 the job ran 4-5% faster (benchmarks/RESULTS.md, encode job, session 14).
DEFAULT_MAX_TOKENS = 32768
DEFAULT_SHARD_SIZE = 10000

# Exit statuses of `packed-vit encode` (docs/encode-faults.md). Interrupted by a signal: 128 + its number (130 for
# Ctrl-C, 143 for SIGTERM), as shells report a process the signal ended; the output folder then resumes.
EXIT_DONE = 0  # the job completed, every sample encoded
EXIT_FAILED = 1  # the job stopped: a write fault, a skip under --strict, another rank failed, nothing readable
EXIT_REFUSED = 2  # nothing was done: bad arguments or inputs, the model, another job or another run in the folder
EXIT_SKIPPED = 3  # the job completed, some samples skipped (each named with its reason in `skipped`)


def process_start_time() -> float | None:
    """When this process started (wall clock), from /proc on Linux: start-up includes the interpreter and imports.

    /proc/self/stat gives the start in clock ticks after boot; its age is now on CLOCK_BOOTTIME (the same clock)
    less that. Not /proc/stat's btime: the boot time there is whole seconds, so the start came out up to 1 s early
    (0.87 s on the CPU machine: start-up read that much too long)."""
    try:
        with open("/proc/self/stat") as stat:
            ticks = int(stat.read().rsplit(")", 1)[1].split()[19])  # field 22, after the command's "(name)"
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - ticks / os.sysconf("SC_CLK_TCK")
        return time.time() - age
    except (OSError, ValueError, IndexError, AttributeError):  # no /proc (not Linux), no CLOCK_BOOTTIME
        return None


class Progress:
    """tqdm when it is importable (it comes with huggingface_hub), else a line per update on stderr. Messages go
    through `write`, so that they do not break the bar. Under torchrun rank 0's bar also counts the other ranks'
    samples (`set_others`, from a thread, also while rank 0 waits for them): the whole job's progress and rate."""

    def __init__(self, total: int | None, enabled: bool = True, description: str | None = None):
        self.total, self.done, self.enabled = total, 0, enabled
        self.own, self.own_skipped, self.others, self.others_skipped = 0, 0, 0, 0
        self.lock = threading.Lock()
        try:
            from tqdm.auto import tqdm
        except ImportError:
            tqdm = None
        self.bar = tqdm(total=total, unit="img", file=sys.stderr, desc=description) if tqdm and enabled else None

    def update(self, images: int, skipped: int = 0) -> None:
        """`images` more of this process's samples done; `skipped`: this process's skips so far."""
        with self.lock:
            self.own, self.own_skipped = self.own + images, skipped
            self.show()

    def set_others(self, done: int, skipped: int) -> None:
        """The other ranks' samples done and skipped so far."""
        with self.lock:
            if (done, skipped) != (self.others, self.others_skipped):
                self.others, self.others_skipped = done, skipped
                self.show()

    def show(self) -> None:
        done, skipped = self.own + self.others, self.own_skipped + self.others_skipped
        if self.bar is not None:
            self.bar.update(done - self.done)
            self.bar.set_postfix(skipped=skipped, refresh=False)
        elif self.enabled:
            total = self.total if self.total is not None else "?"
            print(f"{done}/{total} images ({skipped} skipped)", file=sys.stderr)
        self.done = done

    def write(self, message: str) -> None:
        with self.lock:
            if self.bar is not None:
                self.bar.write(message, file=sys.stderr)
            else:
                print(message, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def report(result, bar: Progress, skipped_so_far: int, prefix: str = "") -> int:
    """One pipeline result on the bar and its skips on stderr -> the new skip count."""
    for entry in result.skipped:
        bar.write(f"{prefix}skipped {entry.name}: {entry.why}")
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
    cuda_graphs: bool = False,
    jpeg_decoder: str = "auto",
) -> Embeddings:
    """(name, image) pairs -> `Embeddings`, the images in the order given, less the skipped ones.

    `images`: image paths or images the processor takes. `total`: the number of images, for the progress bar.
    `workers`: decoding processes (0: this one). `preprocess`: "cpu" (PIL, the processor), "gpu" (CUDA) or "auto".
    `jpeg_decoder`: the GPU path's JPEG decoder, "auto", "nvjpeg" or "nvimgcodec" (`jpeg_decoders`).
    `cuda_graphs`: on CUDA, enable the model's CUDA graphs (`model.enable_cuda_graphs`) for the job's forwards
    (`packed-vit encode --cuda-graphs`). With the GPU path, set CUDA_DEVICE_MAX_CONNECTIONS=32 before the process's
    first CUDA call, as the command does with --cuda-graphs (`pipeline.use_more_hardware_queues`): at the default 8
    the preprocessing starves beside replayed graphs.
    """
    pairs = list(images)
    result = Embeddings()
    bar = Progress(total, enabled=progress)
    skipped = 0
    start = time.perf_counter()
    try:
        for forward in encoded_results(model, processor, PairsSource(pairs), max_tokens, patch_features, workers,
                                       preprocess, jpeg_decoder=jpeg_decoder, cuda_graphs=cuda_graphs):  # fmt: skip
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
    from ..hub_export import source_processor

    tower = source_tower(source, revision)
    model = load_model(source, revision, device, dtype, attn_implementation, tower)
    return model, source_processor(tower, model.config, source, revision)


def source_tower(source: str, revision: str | None = None):
    """The tower (hub_export.Tower: model and processor classes) of a checkpoint, by its config.json."""
    from ..hub_export import read_source_config, tower_for_model_type

    config, _ = read_source_config(source, revision)
    return tower_for_model_type(config.get("model_type"))


def load_model(source: str, revision: str | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, attn_implementation: str | None = None, tower=None):  # fmt: skip
    """The packed tower of any checkpoint the towers load, in eval mode on `device` in `dtype`. `tower`:
    `source_tower(source, revision)`, if already known."""
    model = (tower or source_tower(source, revision)).model_class.from_pretrained(
        source, revision=revision, dtype=dtype, device_map=str(device), attn_implementation=attn_implementation
    )
    return model.eval()


def load_config_and_processor(source: str, revision: str | None = None, tower=None):
    """(the tower's config, its packed image processor) from the checkpoint's files, without reading its weights (so
    the job can start decoding while they load); (None, None) for a pickle checkpoint, whose config needs its weights'
    names. `tower`: `source_tower(source, revision)`, if already known."""
    from ..hub_export import source_processor
    from ..modeling.checkpoint_loading import load_config

    tower = tower or source_tower(source, revision)
    config = load_config(tower.model_class, source, revision)
    return (None, None) if config is None else (config, source_processor(tower, config, source, revision))


def warm_up_on_zero_weights(model_class, config, processor, max_tokens: int, device: torch.device,
                            dtype: torch.dtype, clock: StageClock) -> None:  # fmt: skip
    """In a thread while the weights load (CUDA): the pipeline's warm-up forward (`pipeline.warm_up`) on a copy of
    the tower whose weights are zeros, so that the one-time costs of a process's first forward that need no weights
    (the kernels' lazy loading, the fused norms' Triton kernels, cuBLAS) are paid beside the load rather than after
    it (measured: RESULTS.md, encode job, session 12). The copy has one encoder layer: the layers are alike, so the
    first pays every one-time cost of theirs; more would only add their construction, launches and GPU memory (the
    start-up measured the same with one layer as with all: RESULTS.md, encode job, session 15). Its GPU memory is
    given back at the end. Only a head start: whatever fails here is left to the pipeline's warm-up forward on the
    real weights."""
    from .fused_preprocessing import hash_triton_compiler

    skeleton = None
    try:
        config = copy.deepcopy(config)
        config.num_hidden_layers = 1
        with torch.device("meta"):
            skeleton = model_class(config).to(dtype)
        skeleton = skeleton.to_empty(device=device).eval()
        with torch.no_grad():
            for tensor in itertools.chain(skeleton.parameters(), skeleton.buffers()):
                tensor.zero_()
        hash_triton_compiler()  # or wait for the job's hash in progress: the norms' first launch asks for it
        warm_up(skeleton, processor, max_tokens, torch.cuda.Stream(device))
        clock.mark("kernels warmed up (zero weights)")
    except Exception:  # noqa: BLE001 - see the docstring
        pass
    finally:
        del skeleton
        if torch.cuda.is_initialized():  # its memory was cached for its own stream, which nothing else allocates on
            torch.cuda.empty_cache()


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
    jpeg_decoder: str = "auto"
    shard_size: int = DEFAULT_SHARD_SIZE
    overwrite: bool = False
    progress: bool = True
    strict: bool = False
    cuda_graphs: bool = False  # the forwards replay CUDA graphs where they apply (CUDA, varlen_attn)
    profile: bool = False  # print the start-up steps and each stage's host seconds

    @property
    def to_folder(self) -> bool:
        return self.out.suffix != ".safetensors"


def fail(message: str, status: int = EXIT_REFUSED) -> int:
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


class Interrupted(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt, so that both unwind the job the same way."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StrictStop(Exception):
    """--strict and a sample that could not be encoded."""


class ModelNotLoaded(Exception):
    """The model's weights could not be loaded (raised in the pipeline, which loads them while decoding starts)."""


def raise_interrupted(signum, frame):
    raise Interrupted(signum)


def run_job(options: JobOptions, started: float | None = None) -> int:
    """`started`: when the command started (wall clock) for the start-up time; default: now.

    Ctrl-C and SIGTERM (a scheduler's preemption; torchrun ending the other ranks when one fails) drop the shard in
    progress and leave the folder as the same command resumes it."""
    started = started or time.time()
    if options.cuda_graphs:  # the preprocessing starves beside replayed graphs otherwise; eager, it costs start-up
        use_more_hardware_queues()  # before the process's CUDA context is made
    clock = StageClock()  # --profile's start-up steps and stage seconds
    clock.mark("imports done")
    rank, world_size = ranks.start()
    in_main_thread = threading.current_thread() is threading.main_thread()  # only it may set signal handlers
    previous = signal.signal(signal.SIGTERM, raise_interrupted) if in_main_thread else None
    try:
        return _run_job(options, rank, world_size, started, clock)
    except KeyboardInterrupt as interrupt:
        signum = getattr(interrupt, "signum", signal.SIGINT)
        kept = (f"the shards finished so far are kept in {options.out}, the one in progress is dropped: run the same "
                "command again to resume") if options.to_folder else \
            f"nothing was written ({options.out} is written at the end; --out DIR makes a resumable job)"  # fmt: skip
        prefix = f"rank {rank}: " if world_size > 1 else ""
        return fail(f"{prefix}interrupted by {signal.Signals(signum).name}: {kept}", 128 + signum)
    finally:
        if previous is not None:  # None: not set from Python, or not the main thread
            signal.signal(signal.SIGTERM, previous)
        ranks.finish()


def _run_job(options: JobOptions, rank: int, world_size: int, started: float, clock: StageClock) -> int:
    device = ranks.device_of_rank(options.device)
    if device.type == "cuda":  # Triton's key, beside the listing and the fork (the pipeline would start it after)
        from .fused_preprocessing import start_hashing_triton_compiler

        start_hashing_triton_compiler()
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    dtype = dtypes[options.dtype] if options.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    if not options.to_folder and world_size > 1:
        return fail("--out FILE.safetensors is for one process: give a folder as --out with torchrun")
    try:
        parts = find_parts(options.inputs, options.shard_size)
    except OSError as error:  # an input that is not there, a list file that cannot be read
        return fail(str(error))
    if not parts:
        return fail(f"no image files in {' '.join(options.inputs)}")
    if options.preprocess != "cpu":  # before anything is written: a JPEG decoder that is not installed
        try:
            check_jpeg_decoder(options.jpeg_decoder)
        except ValueError as error:
            return fail(str(error))

    # What makes two runs the same job: a resumed run must be it, or the shards would mix two jobs' embeddings.
    job = {
        "model": options.model, "revision": options.revision, "inputs": list(options.inputs),
        "dtype": str(dtype).removeprefix("torch."), "max_tokens": options.max_tokens,
        "patch_features": options.patch_features, "preprocess": options.preprocess, "shard_size": options.shard_size,
        "attn_implementation": options.attn_implementation,
    }  # fmt: skip
    # Options added since: in the job only when not at their default, so that older folders still resume.
    if options.jpeg_decoder != "auto":
        job["jpeg_decoder"] = options.jpeg_decoder  # it changes the GPU path's pixels
    if options.cuda_graphs:
        job["cuda_graphs"] = True  # padded forwards: other matmul shapes, other roundings
    lock = None
    if options.to_folder:
        error = None
        if rank == 0:
            try:
                refuse_foreign_folder(options.out, options.overwrite)  # before the lock file is made in it
                lock = FolderLock(options.out)  # held until this run ends: a second run on the folder is refused
                prepare_folder(options.out, job, options.overwrite)
            except (FolderBusy, JobMismatch, OSError) as refusal:
                error = str(refusal)
        error = ranks.broadcast_from_rank0(error)  # every rank stops on rank 0's refusal
        if error:
            if lock is not None:
                lock.release()
            return fail(error)
    try:
        return encode_parts(options, parts, job, rank, world_size, device, dtype, started, clock)
    finally:
        if lock is not None:
            lock.release()


def encode_parts(options: JobOptions, parts: list[Part], job: dict, rank: int, world_size: int, device, dtype,
                 started: float, clock: StageClock) -> int:  # fmt: skip
    from .pipeline import default_workers

    folder, shard_size = options.out, options.shard_size
    prefix = f"rank {rank}: " if world_size > 1 else ""

    def warn(message: str) -> None:
        print(f"packed-vit encode: {prefix}{message}", file=sys.stderr)

    mine = ranks.parts_of_rank(parts, rank, world_size)
    todo = []
    for part in mine:
        start = resume_position(folder, part, shard_size, warn) if options.to_folder else 0
        if start is not None:
            todo.append((part, start))
    resumed = sum(1 for part, start in todo if start > 0) + (len(mine) - len(todo))
    clock.mark("inputs listed")

    def load():  # called by the pipeline in a thread once its workers are forked: the load overlaps their start
        warming = threading.Thread(target=warm_up_on_zero_weights, name="packed-vit warm-up", daemon=True, args=(
            tower.model_class, config, processor, options.max_tokens, device, dtype, clock))  # fmt: skip
        if device.type == "cuda":
            warming.start()
        try:
            return load_model(options.model, options.revision, device, dtype, options.attn_implementation, tower)
        except (OSError, ValueError, TypeError) as error:  # weights missing or not matching the config
            raise ModelNotLoaded(error) from error
        finally:
            if warming.is_alive():
                warming.join()

    try:  # the checkpoint's config and processor first: a wrong --model is refused before anything starts
        tower = source_tower(options.model, options.revision)
        config, processor = load_config_and_processor(options.model, options.revision, tower)
        model = load
        if processor is None:  # a pickle checkpoint: its config comes with its weights
            model, processor = load_model_and_processor(options.model, options.revision, device, dtype,
                                                        options.attn_implementation)  # fmt: skip
    except (OSError, ValueError, TypeError) as error:  # not a checkpoint, unknown format, unreachable, bad option
        return fail(f"cannot load --model {options.model}: {error}")
    clock.mark("processor ready")
    workers = default_workers() if options.workers is None else options.workers

    known = [part.known_length for part, _ in todo]
    total = None if None in known else sum(known) - sum(start for _, start in todo)
    try:
        totals = ranks.gather(total)  # the whole job's, for rank 0's bar
    except RuntimeError as error:  # a rank failed before it started (gloo: the peer closed its connection)
        return other_rank_failed(error, prefix, folder)
    bar = Progress(None if None in totals else sum(totals), enabled=options.progress and rank == 0,
                   description=f"{world_size} ranks" if world_size > 1 else None)  # fmt: skip
    counts = ranks.SharedCounts(folder, rank, world_size) if world_size > 1 else None
    watcher = ranks.watch_others(counts, bar.set_others) if counts is not None and rank == 0 else None

    def close_bar() -> None:
        if watcher is not None:
            watcher()
        bar.close()

    encoded = False
    writer = ShardWriter(folder, options.model, shard_size) if options.to_folder else None
    embeddings = Embeddings()
    skipped = 0
    first_forward = None
    group_of = (lambda tag: (tag[0], tag[1] // shard_size)) if options.to_folder else (lambda tag: None)
    try:
        results = encoded_results(model, processor, PartsSource(todo), options.max_tokens, options.patch_features,
                                  workers, options.preprocess, group_of, clock, device,
                                  jpeg_decoder=options.jpeg_decoder, cuda_graphs=options.cuda_graphs)  # fmt: skip
        for result in results:
            first_forward = first_forward or result.launched_at
            skipped = report(result, bar, skipped, prefix)
            if options.strict and result.skipped:
                if writer is not None:
                    writer.close_before(result.group)  # the shards before this one are finished: kept
                raise StrictStop(result.skipped[0])
            if writer is not None:
                writer.add(result)
                embeddings.skipped.extend((e.name, e.why) for e in result.skipped)
                embeddings.names.extend(e.name for e in result.images)
                embeddings.model_seconds += result.model_seconds
            else:
                embeddings.add(result)
            if counts is not None:
                counts.publish(bar.own, skipped)
        if writer is not None:
            writer.close_shard(part_complete=True)
        encoded = True
    except StrictStop as stop:
        entry = stop.args[0]
        kept = (f"the shards finished before it are kept in {folder}: the same command without --strict resumes and "
                "skips it") if options.to_folder else "nothing was written"  # fmt: skip
        return fail(f"{prefix}--strict: {entry.name} could not be encoded ({entry.why}); stopped, {kept}", EXIT_FAILED)
    except WriteFault as fault:
        kept = (f"no half-written shard is left, the {writer.written} shards this run finished are kept: once the "
                "fault is cleared, run the same command again to resume") if options.to_folder else \
            "nothing was written"  # fmt: skip
        return fail(f"{prefix}{fault}; {kept}", EXIT_FAILED)
    except ModelNotLoaded as error:
        return fail(f"cannot load --model {options.model}: {error.__cause__}")
    except ValueError as error:
        return fail(str(error))
    finally:
        if counts is not None:
            counts.publish(bar.own, skipped, force=True)
        if not encoded or watcher is None:
            close_bar()
    finished = time.time()
    summary = {
        "rank": rank, "images": len(embeddings.names), "skipped": len(embeddings.skipped),
        "shards": writer.written if writer else 1, "model_seconds": embeddings.model_seconds,
        "startup_seconds": (first_forward or finished) - started,
        "load_seconds": clock.marks.get("model loaded", finished) - started, "seconds": finished - started,
        "resumed_parts": resumed,
    }  # fmt: skip
    if options.profile:
        print_profile(clock, started, first_forward, finished, prefix)
    try:
        summaries = ranks.gather(summary)  # rank 0's bar still moves with the others' counts meanwhile
    except RuntimeError as error:  # a rank died before it finished (gloo: the peer closed its connection)
        return other_rank_failed(error, prefix, folder)
    finally:
        close_bar()
    if rank != 0:
        return EXIT_DONE
    return finish(options, parts, job, summaries, embeddings, summary, started, finished)


def print_profile(clock: StageClock, started: float, first_forward: float | None, finished: float,
                  prefix: str) -> None:  # fmt: skip
    """--profile: the start-up steps (seconds from the process start) and each stage's host seconds, on stderr."""
    steps = {"process start": started, **clock.marks, "first forward": first_forward or finished, "end": finished}
    lines = [f"{prefix}start-up and run (s from the process start):"]
    lines += [f"  {started_at - started:7.2f}  {step}" for step, started_at in sorted(steps.items(), key=lambda i: i[1])]
    lines.append(f"{prefix}host seconds per stage (summed per thread):")
    lines += [f"  {seconds:7.2f}  {stage}" for stage, seconds in sorted(clock.seconds.items(), key=lambda i: -i[1])]
    print("\n".join(lines), file=sys.stderr)


def other_rank_failed(error: Exception, prefix: str, folder: Path) -> int:
    return fail(f"{prefix}another rank failed ({error}); the shards finished are kept in {folder}: run the same "
                "command again to resume", EXIT_FAILED)  # fmt: skip


def finish(options: JobOptions, parts: list[Part], job: dict, summaries: list[dict], embeddings: Embeddings,
           summary: dict, started: float, finished: float) -> int:  # fmt: skip
    """Rank 0, every rank done: the manifest or the file, the summary line, the exit status."""
    folder, world_size = options.out, len(summaries)
    images = sum(s["images"] for s in summaries)
    seconds = max(s["seconds"] for s in summaries)
    if options.to_folder:
        try:
            manifest = finish_manifest(folder, parts, job, summaries)
        except WriteFault as fault:
            return fail(f"{fault}; every shard is written: run the same command again to write the manifest",
                        EXIT_FAILED)  # fmt: skip
        written = sum(s["shards"] for s in summaries)
        where = f"{len(manifest['shards'])} shards in {folder} ({written} written now)"
        images = manifest["images"]
        reasons = [why for shard in manifest["shards"] for why in shard["skipped_why"]]
    else:
        reasons = [why for _, why in embeddings.skipped]
        if not embeddings.names:
            return fail(f"none of the {len(reasons)} files could be read; nothing written", EXIT_FAILED)
        embeddings.total_seconds = finished - started
        folder.parent.mkdir(parents=True, exist_ok=True)
        try:
            save_embeddings(folder, embeddings, options.model)
        except WriteFault as fault:
            return fail(f"{fault}; nothing was written", EXIT_FAILED)
        where = f"{folder} (pooled: {embeddings.pooled_kind})"
    skipped = len(reasons)
    # The kind of each skip (the exception's name in its reason): a damaged tar shard, a missing file...
    kinds = collections.Counter(why.split(":", 1)[0] for why in reasons)
    by_kind = f" ({', '.join(f'{kind}: {n}' for kind, n in sorted(kinds.items()))})" if kinds else ""
    forwards = len(embeddings.batch_sizes)
    # The rate of this run's images (a resumed run's folder holds more), from each rank's first forward on.
    encoded_now = sum(s["images"] for s in summaries)
    steady = max(s["seconds"] - s["startup_seconds"] for s in summaries)
    rate = f"{encoded_now / max(steady, 1e-9):.1f} images/s from the first forward on" if encoded_now else \
        "none encoded now"  # fmt: skip
    print(
        f"Encoded {images} image{'s' * (images != 1)} in {seconds:.2f} s ({rate}"
        f"{f', {world_size} ranks' if world_size > 1 else ''}); skipped {skipped} unreadable file"
        f"{'s' * (skipped != 1)}{by_kind}; wrote {where}. Start-up (process start to first forward) "
        f"{summary['startup_seconds']:.2f} s, of which model load {summary['load_seconds']:.2f} s"
        + (f"; {forwards} forward{'s' * (forwards != 1)} of at most {options.max_tokens} patches" if forwards else "")
    )
    if options.to_folder and images == 0:
        return fail("no image could be read", EXIT_FAILED)
    # torchrun takes any non-zero status of a rank for a failure (it reports the job failed and exits 1): a job that
    # completed with skips ends with 0 there, and the manifest's `skipped` says how many.
    return EXIT_SKIPPED if skipped and world_size == 1 else EXIT_DONE


def finish_manifest(folder: Path, parts: list[Part], job: dict, summaries: list[dict]) -> dict:
    """Rank 0, once every rank is done: the manifest lists every part's shards (their images, their skips with the
    reasons, their sizes and checksums), in input order."""
    shards = [shard for part in parts for shard in finished_shards(folder, part)]
    manifest = {
        "format": read_manifest(folder)["format"], "version": 1, "job": job, "complete": True,
        "images": sum(len(s["images"]) for s in shards), "skipped": sum(len(s["skipped"]) for s in shards),
        "parts": len(parts), "shards": shards, "world_size": len(summaries),
        "total_seconds": max(s["seconds"] for s in summaries),
    }  # fmt: skip
    write_manifest(folder, manifest)
    ranks.SharedCounts.remove(folder)
    return manifest
