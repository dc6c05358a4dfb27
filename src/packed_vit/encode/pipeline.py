"""Stage 2 of the encode job: samples -> packed forwards -> per-image embeddings, keeping the device busy.

- Decoding and preprocessing run in `workers` DataLoader processes (0: in this process). The samples are dealt to
  the workers in chunks of consecutive samples (`CHUNK`, `GPU_CHUNK` for the GPU path), round robin; the DataLoader
  hands their chunks back in the same round robin, so the main process sees every sample in input order whatever
  the number of workers. Every sample yields an entry, an unreadable one a `skip` entry, which is what keeps that
  round robin aligned.
- A worker ships a chunk's pixels as one tensor (a few IPC messages per chunk rather than per image), pinned by the
  DataLoader, and copied to the device with `non_blocking`. With our packed processors the worker stops before the
  rescale / normalize step and ships the resized image's uint8 patches (a quarter of the float32 bytes); the device
  finishes them with the processor's own arithmetic (float64 product, float32 normalize, `normalize_patches`), so
  the result equals the processor's output to the bit.
- Forwards are packed greedily in order by a token budget (`token_budget_batches`), never across a `group` (an
  output shard), so that a shard's forwards depend on its own images only: a resumed or distributed run computes the
  very same forwards. Forwards are queued back to back: the results of forward i are read (one event wait) only once
  forward i + 1 is queued.
- `preprocess="gpu"` (Siglip2 and AIMv2): workers only read the files; JPEGs are decoded on the GPU (nvJPEG), resized
  (cropped), rescaled and normalized there as transformers' torchvision backend does (`gpu_preprocessing`). `"auto"`
  takes it wherever it applies (CUDA, torchvision with nvJPEG), else the CPU path: measured faster (RESULTS.md).

On CUDA the stages are threads with a queue between each, each stage on its own CUDA stream:
  read (DataLoader workers) -> preprocess (a thread: copies or nvJPEG decode, resize, normalize; `in_background`)
  -> forward (the caller's thread, PIPELINE_DEPTH forwards queued) -> results, in input order.
Start-up, in this order: the workers are forked (before this process has a CUDA context, which makes forks slow);
the model starts loading in a thread of its own (`model` may be a function that loads it) while this thread makes
the GPU preprocessing (the CUDA context, nvJPEG) and the preprocessing thread starts reading and decoding; one
forward of the budget's size (`warm_up`) pays the one-time costs of a process's first forward (lazy kernel loading,
cuBLAS workspaces, Triton, and with `cuda_graphs` the capture of the graph most forwards replay; the job pays most
of them beforehand, beside the load: `job.warm_up_on_zero_weights`).
The preprocessing thread records a CUDA event after each chunk; a forward waits for the events of its own images'
chunks only (not for the whole preprocessing stream, which by then holds the next chunks' work too). nvJPEG's batch
decode returns only once its batch is decoded, so it must not run in the thread that queues the forwards, and
PREFETCH_CHUNKS chunks stay ready ahead so the forwards never wait for a decode. The preprocessing stream has the
highest priority: its kernels are few and small. With CUDA graphs the job (`run_job`) asks for more hardware work
queues before the process's CUDA context is made (`use_more_hardware_queues`), so that the preprocessing's streams do
not wait behind replayed graphs.
`StageClock` adds up each stage's host seconds and marks the start-up steps (`packed-vit encode --profile`).
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
import weakref
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from queue import Full, Queue
from typing import Any

import numpy as np
import torch

from .inputs import UNREADABLE, Sample, read_image

CHUNK = 16  # samples per worker task: large enough to amortise IPC, small enough to start the GPU quickly
# The GPU path's workers only read files; a chunk is one nvJPEG batch. Measured on the H200 machine, batches of 16 / 64
# / 256 decode 5500 / 8300 / 8900 images/s on an idle GPU; next to the forwards, issue 23's probe kept them at 0.969 of
# their rate alone with 128 and 0.94-0.95 with 256; in the job's profile 128 vs 256 was within the run-to-run spread
# (Siglip2 1948 vs 1921 images/s, AIMv2-224 1806 vs 1992: RESULTS.md, encode job).
GPU_CHUNK = 128
WORKER_PREFETCH = 4  # chunks each DataLoader worker keeps ready (its `prefetch_factor`)
PREFETCH_CHUNKS = 3  # chunks preprocessed ahead of the forwards, on CUDA (`in_background`): >= 4 forwards at 256
PIPELINE_DEPTH = 2  # forwards queued on the device before the host waits for the oldest one's results
# Hardware work queues of the process's CUDA context (the driver reads the variable when it makes the context; at most
# 32). With the default 8, the preprocessing's streams (ours, and the pool stream torchvision's nvJPEG decodes on) can
# share a queue with the forwards' stream, and their work then waits behind every forward queued before it on that
# queue: beside replayed CUDA graphs the preprocessing fell from 4400 to 619 images/s, at 32 it kept 4379 (AIMv2-224,
# RESULTS.md, encode job, session 11). Asked for only with CUDA graphs: the eager job measured the same at 8 and 32,
# and a context of 32 queues took 0.50-0.62 s to make against 0.13-0.20 s at 8, on the start-up's longest chain
# (benchmarks/probes/context_cost.py; RESULTS.md, encode job, session 16). A value the user set is kept.
HARDWARE_QUEUES = "32"


def use_more_hardware_queues() -> None:
    """Before this process's first CUDA call (too late once the context exists: then it changes nothing)."""
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", HARDWARE_QUEUES)


# Budgets up to this many patches replay CUDA graphs (`cuda_graphs=True`): the graphs' memory is about one forward's
# activations at the budget, as the eager forwards take, plus static buffers of the budget's rows.
CUDA_GRAPH_MAX_TOKENS = 65536


class StageClock:
    """Host seconds per stage, added up across threads: where each thread of the pipeline spent its time; and the
    wall clock of its start-up steps (`mark`)."""

    def __init__(self):
        self.seconds: dict[str, float] = defaultdict(float)
        self.marks: dict[str, float] = {}  # step -> wall clock (time.time()) when it was first reached
        self.lock = threading.Lock()

    def mark(self, step: str) -> None:
        self.marks.setdefault(step, time.time())

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] += seconds

    @contextlib.contextmanager
    def timing(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def timed(self, items: Iterable, stage: str) -> Iterator:
        """`items`, the time spent waiting for each next one added to `stage`."""
        iterator = iter(items)
        while True:
            with self.timing(stage):
                item = next(iterator, StopIteration)
            if item is StopIteration:
                return
            yield item


def default_workers() -> int:
    """One worker per CPU core left after the main process (which feeds the GPU) and the pinning thread."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 2, 32))


# --------------------------------------------------------------------------------------------------------------
# What the workers produce
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Entry:
    """One sample as the main process receives it: an image ready for the device, or a skip with the reason."""

    tag: Any  # where it came from (the caller's key: an index, or (part, position))
    name: str
    size: tuple[int, int] = (0, 0)  # (height, width) as read
    grid: tuple[int, int, int] | None = None  # (t, h, w) patches; None until a GPU decode tells it
    rows: slice = field(default_factory=lambda: slice(0, 0))  # its rows in the chunk's pixel tensor
    kind: str = "skip"  # "uint8" (resized, not normalized) | "float" (processor output) | "jpeg" | "decoded" | "skip"
    why: str = ""  # for a skip
    pixels: torch.Tensor | None = None  # on the device once the main process has it
    block: torch.Tensor | None = None  # the chunk's device tensor `pixels` is a view of (for `record_stream`)
    ready: torch.cuda.Event | None = None  # on CUDA: recorded once `pixels` are written (the chunk's preprocessing)
    resize_to: tuple[int, int] | None = None  # GPU path: (height, width) to resize to, worked out by the worker


@dataclass
class Chunk:
    """A worker's reply for a chunk of consecutive samples. Tensors in one piece per kind, for the IPC and pinning."""

    entries: list[Entry]
    uint8_pixels: torch.Tensor  # [rows, p*p*3] uint8: resized patches, not yet rescaled / normalized
    float_pixels: torch.Tensor  # [rows, p*p*3] float32: the processor's output (inputs that were not 8-bit)
    encoded: torch.Tensor  # [bytes] uint8: JPEG files, for the GPU decoder
    decoded: list[torch.Tensor] = field(default_factory=list)  # [3, H, W] uint8 each: non-JPEGs for the GPU path

    def pin_memory(self) -> Chunk:  # called by the DataLoader's pinning thread
        return Chunk(
            self.entries, self.uint8_pixels.pin_memory(), self.float_pixels.pin_memory(), self.encoded,
            [t.pin_memory() for t in self.decoded],
        )  # fmt: skip


def processor_stops_before_normalize(processor) -> bool:
    """Our packed processors (installed or remote code) expose the resize step on its own."""
    return callable(getattr(processor, "resized_frame", None)) and callable(getattr(processor, "options", None))


class CpuPreparation:
    """PIL decode + the packed processor, in a worker. Picklable (the DataLoader may spawn workers)."""

    def __init__(self, processor):
        self.processor = processor
        self.split = processor_stops_before_normalize(processor)
        self.options = processor.options({"do_convert_rgb": True}) if self.split else None
        self.patch_dim = processor.patch_size**2 * 3

    def __call__(self, entry: Entry, source) -> np.ndarray:
        """Fills `entry` (size, grid, kind) and returns its patches."""
        from ..processing.image_processing_packing import patchify, read_frame

        image = read_image(source) if isinstance(source, (Sample, str, Path, bytes)) else source
        if self.split:
            frame = read_frame(image, True, None)
            entry.size = frame.shape[:2]
            if frame.dtype == np.uint8:
                frame = self.processor.resized_frame(frame, self.options)
                if frame.dtype == np.uint8:
                    patch_size = self.options["patch_size"]
                    entry.kind = "uint8"
                    entry.grid = (1, frame.shape[0] // patch_size, frame.shape[1] // patch_size)
                    return patchify(frame, patch_size)
        else:
            entry.size = (image.height, image.width) if hasattr(image, "height") else tuple(np.shape(image)[:2])
        batch = self.processor(image, return_tensors="np", do_convert_rgb=True)
        entry.kind = "float"
        entry.grid = tuple(int(n) for n in batch["grid_thw"][0])
        return batch["pixel_values"]


def normalize_patches(patches: torch.Tensor, options: dict) -> torch.Tensor:
    """uint8 patches [n, p*p*3] (channel last) -> what the processor returns for them, float32, on their device.

    The same operations as `processing.image_processing_packing` in numpy (rescale: float64 product, float32
    result; normalize: float32), which IEEE arithmetic rounds identically on every device."""
    pixels = patches.double() * options["rescale_factor"] if options["do_rescale"] else patches
    pixels = pixels.float()
    if options["do_normalize"]:
        mean = torch.tensor(options["image_mean"], dtype=torch.float32, device=pixels.device)
        std = torch.tensor(options["image_std"], dtype=torch.float32, device=pixels.device)
        pixels = ((pixels.view(len(pixels), -1, 3) - mean) / std).view(len(pixels), -1)
    return pixels


# --------------------------------------------------------------------------------------------------------------
# The dataset the DataLoader workers run
# --------------------------------------------------------------------------------------------------------------


SampleSource = Callable[[Callable[[int], bool]], Iterator[tuple[Any, Any]]]
"""`source(mine)` -> (tag, (name, source) or Sample) for every sample in order; samples whose running index `mine`
rejects come as (tag, None): counted, not read."""


@dataclass
class PairsSource:
    """A `SampleSource` of (name, image or path) pairs, tagged by their index. A class, not a closure, so that
    DataLoader workers started by spawn (macOS and Windows by default) receive it pickled."""

    pairs: list[tuple[str, Any]]

    def __call__(self, mine: Callable[[int], bool]) -> Iterator[tuple[Any, Any]]:
        for index, (name, image) in enumerate(self.pairs):
            yield index, ((name, image) if mine(index) else None)


class ChunkDataset(torch.utils.data.IterableDataset):
    def __init__(self, samples: SampleSource, prepare: Callable[[Entry, Any], Any], gpu_decode: bool):
        self.samples, self.prepare, self.gpu_decode = samples, prepare, gpu_decode
        self.chunk_size = GPU_CHUNK if gpu_decode else CHUNK
        self.rule = None  # the GPU path's resize rule, made in the worker: its host work stays off the main process

    def __iter__(self) -> Iterator[Chunk]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)

        def mine(index: int) -> bool:
            return (index // size) % workers == worker

        size = self.chunk_size
        pending: list[tuple[Entry, Any]] = []
        for index, (tag, item) in enumerate(self.samples(mine)):
            if item is None:
                continue
            pending.append((tag, item))
            if len(pending) == size or (index + 1) % size == 0:  # a chunk ends at a multiple of its size
                yield self.chunk(pending)
                pending = []
        if pending:
            yield self.chunk(pending)

    def chunk(self, items: list[tuple[Any, Any]]) -> Chunk:
        entries, uint8_rows, float_rows, encoded, decoded = [], [], [], [], []
        for tag, item in items:
            name, source = (item.name, item) if isinstance(item, Sample) else item
            entry = Entry(tag, name)
            try:
                if self.gpu_decode:
                    from .gpu_preprocessing import TorchPreprocessing, read_for_gpu

                    kind, size, data = read_for_gpu(source)
                    entry.kind, entry.size = kind, size
                    self.rule = self.rule or TorchPreprocessing(self.prepare.processor)
                    entry.resize_to = self.rule.target_size(*size)
                    rows = encoded if kind == "jpeg" else decoded
                    start = sum(len(d) for d in encoded) if kind == "jpeg" else len(decoded)
                    entry.rows = slice(start, start + (len(data) if kind == "jpeg" else 1))
                    rows.append(data)
                else:
                    patches = self.prepare(entry, source)
                    rows = uint8_rows if entry.kind == "uint8" else float_rows
                    start = sum(len(r) for r in rows)
                    entry.rows = slice(start, start + len(patches))
                    rows.append(patches)
            except UNREADABLE as error:
                entry.kind, entry.why = "skip", f"{type(error).__name__}: {error}"
            entries.append(entry)
        patch_dim = getattr(self.prepare, "patch_dim", 0)

        def stack(rows, dtype):
            return torch.from_numpy(np.concatenate(rows)) if rows else torch.zeros(0, patch_dim, dtype=dtype)

        encoded_bytes = torch.frombuffer(bytearray(b"".join(encoded)), dtype=torch.uint8) if encoded else \
            torch.zeros(0, dtype=torch.uint8)  # fmt: skip
        return Chunk(entries, stack(uint8_rows, torch.uint8), stack(float_rows, torch.float32).float(),
                     encoded_bytes, [torch.from_numpy(d) for d in decoded])  # fmt: skip


# --------------------------------------------------------------------------------------------------------------
# Packing and running the tower
# --------------------------------------------------------------------------------------------------------------


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


def mean_per_image(features: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
    """[N, D] patch features of packed images -> [B, D], each image's mean, in one scatter (no loop over images).

    No host sync on CUDA (`grid_thw` is on the host): a blocking copy of the lengths, or `repeat_interleave` without
    its `output_size`, waits there for the whole forward to finish before the next one can be queued, and the GPU then
    idles while the next one's first kernels are launched (a tower without a head, such as AIMv2 native, is pooled
    here after every forward)."""
    lengths = grid_thw.prod(1).to(features.device, non_blocking=True)
    images = torch.arange(len(lengths), device=features.device)
    image_of_patch = images.repeat_interleave(lengths, output_size=features.shape[0])
    sums = torch.zeros(len(lengths), features.shape[1], dtype=torch.float32, device=features.device)
    sums.index_add_(0, image_of_patch, features.float())
    return sums / lengths[:, None]


@dataclass
class ForwardResult:
    """A contiguous run of samples in input order, all of one group: its images' embeddings and its skips."""

    group: Any
    entries: list[Entry]  # images and skips, in input order
    pooled: torch.Tensor  # [images, D] float32, CPU
    patch_features: torch.Tensor | None  # [patches, D] float32, CPU
    pooled_by_head: bool | None
    model_seconds: float
    launched_at: float  # wall clock when its forward was queued

    @property
    def images(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.kind != "skip"]

    @property
    def skipped(self) -> list[Entry]:
        return [entry for entry in self.entries if entry.kind == "skip"]


@dataclass
class Streams:
    """On CUDA the pipeline's two threads each queue on their own stream: preprocessing (copies, nvJPEG, resizes)
    and forwards. Off the default stream: with the forwards on it, their launches waited on the preprocessing
    (measured: RESULTS.md, encode job)."""

    preprocessing: torch.cuda.Stream
    forwards: torch.cuda.Stream


class InFlight:
    """A queued forward: its outputs are being copied to the host; `result()` waits for them."""

    def __init__(self, model, group, entries: list[Entry], patch_features: bool, streams: Streams | None = None):
        self.group, self.entries = group, entries
        images = [entry for entry in entries if entry.kind != "skip"]
        self.pooled = self.features = self.by_head = None
        self.start, self.launched_at = time.perf_counter(), time.time()
        self.done_event = None
        if not images:
            return
        weight = next(model.parameters())
        cuda = weight.device.type == "cuda"
        with torch.no_grad(), torch.cuda.stream(streams.forwards) if streams else contextlib.nullcontext():
            if streams:  # the pixels are written on the preprocessing stream, and read here: once per chunk
                for event in {id(entry.ready): entry.ready for entry in images if entry.ready is not None}.values():
                    streams.forwards.wait_event(event)
                for block in {id(entry.block): entry.block for entry in images}.values():
                    block.record_stream(streams.forwards)
            if cuda:
                self.start_event = torch.cuda.Event(enable_timing=True)
                self.done_event = torch.cuda.Event(enable_timing=True)
                self.start_event.record()
            pixel_values = torch.cat([entry.pixels for entry in images]).to(weight.dtype)
            grid_thw = torch.tensor([entry.grid for entry in images], dtype=torch.int64)
            out = model(pixel_values, grid_thw)
            self.by_head = out.pooler_output is not None
            pooled = out.pooler_output.float() if self.by_head else mean_per_image(out.last_hidden_state, grid_thw)
            # non_blocking device -> host copies land in pinned memory; done_event says when they have
            self.pooled = pooled.to("cpu", non_blocking=cuda)
            if patch_features:
                self.features = out.last_hidden_state.float().to("cpu", non_blocking=cuda)
            if cuda:
                self.done_event.record()
        for entry in images:
            entry.pixels = entry.block = None  # the device copy is no longer needed

    def result(self) -> ForwardResult:
        if self.done_event is not None:
            self.done_event.synchronize()
            seconds = self.start_event.elapsed_time(self.done_event) / 1000
        else:
            seconds = time.perf_counter() - self.start
        pooled = self.pooled if self.pooled is not None else torch.zeros(0, 0)
        return ForwardResult(self.group, self.entries, pooled, self.features, self.by_head, seconds, self.launched_at)


def chunks_on_device(
    chunks: Iterable[Chunk], device: torch.device, options: dict | None, gpu, clock: StageClock
) -> Iterator[list[Entry]]:
    """Each chunk's entries, in order, their pixels on `device` (being written, on CUDA: `ready` says when)."""
    for chunk in clock.timed(chunks, "read: waiting for the DataLoader workers"):
        if gpu is not None:
            gpu.prepare_chunk(chunk, clock)  # decodes, resizes and normalizes the chunk's images on the GPU
        with clock.timing("preprocess: copies + normalize launches"):
            if len(chunk.uint8_pixels):
                normalized = normalize_patches(chunk.uint8_pixels.to(device, non_blocking=True), options)
            if len(chunk.float_pixels):
                float_pixels = chunk.float_pixels.to(device, non_blocking=True)
            for entry in chunk.entries:
                if entry.kind == "uint8":
                    entry.pixels, entry.block = normalized[entry.rows], normalized
                elif entry.kind == "float":
                    entry.pixels, entry.block = float_pixels[entry.rows], float_pixels
            if device.type == "cuda":
                ready = torch.cuda.Event()
                ready.record()  # on this thread's stream, after all of the chunk's work
                for entry in chunk.entries:
                    entry.ready = ready
        yield chunk.entries


class InThread:
    """`function()` run in a daemon thread from now on (a daemon: an error elsewhere need not wait for it to end);
    `result()` waits for it, then returns what it returned or raises what it raised."""

    def __init__(self, function: Callable[[], Any]):
        self.value, self.error = None, None

        def run():
            try:
                self.value = function()
            except BaseException as error:  # raised in the caller's thread by result()
                self.error = error

        name = f"packed-vit {getattr(function, '__name__', 'thread')}"  # what a profiler of the threads shows
        self.thread = threading.Thread(target=run, name=name, daemon=True)
        self.thread.start()

    def result(self) -> Any:
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.value


def in_background(
    items: Iterator, depth: int, stream: torch.cuda.Stream | None = None, clock: StageClock | None = None
) -> Iterator:
    """`items`, produced by a thread up to `depth` ahead (its CUDA work on `stream`); its exception is raised here.
    `clock`: gets the producer's seconds waiting for room (it is ahead) and the consumer's waiting for an item.
    The thread starts at once (the caller may do other work meanwhile); the first item is awaited at the first next().

    Why a thread: nvJPEG's batch decode waits for all the work queued on the device (measured: RESULTS.md, encode
    job), so in the thread that queues the forwards it would let the queue run dry at every batch. Stopping early
    (closing the returned generator, or dropping it) stops the thread."""
    clock = clock or StageClock()
    queue: Queue = Queue(maxsize=depth)
    stop = threading.Event()
    finished = object()

    def put(item) -> bool:
        with clock.timing("preprocess: ahead, waiting for room in the queue"):
            while not stop.is_set():
                try:
                    queue.put(item, timeout=0.1)
                    return True
                except Full:
                    continue
        return False

    def produce():
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for item in items:
                    if not put(item):
                        return
            put(finished)
        except BaseException as error:  # handed to the consumer, which raises it
            put(error)

    def consume():
        try:
            while True:
                with clock.timing("forward: waiting for preprocessed images"):
                    item = queue.get()
                if item is finished:
                    break
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            thread.join()

    thread = threading.Thread(target=produce, name="packed-vit preprocessing", daemon=True)
    thread.start()
    consumer = consume()
    weakref.finalize(consumer, stop.set)  # a consumer dropped before its first item still stops the thread
    return consumer


def warm_up_grids(processor, max_tokens: int) -> list[tuple[int, int, int]]:
    """The grids of a forward that fills the budget as the job's forwards do, so that its CUDA graph (when graphs
    are on) is the one most forwards replay: frames of the processor's largest grid, the last one a patch short (a
    mixed corpus's forwards rarely fill the budget to the patch, and `cuda_graphs.Bucket` then adds a padding
    segment); fixed-size AIMv2: its crop's grid, whose forwards fill the budget exactly. At most
    CUDA_GRAPH_MAX_TOKENS patches: past that no graph is captured, and a forward's kernels are those of that size."""
    options = processor.options({})
    tokens = min(max_tokens, CUDA_GRAPH_MAX_TOKENS)
    patch_size = options["patch_size"]
    if not options.get("is_native", True) and options.get("do_center_crop"):
        rows, cols = options["crop_size"]["height"] // patch_size, options["crop_size"]["width"] // patch_size
        return [(1, rows, cols)] * max(1, tokens // (rows * cols))
    side = max(1, int(options.get("max_num_patches", 256) ** 0.5))
    frames = max(1, tokens // (side * side))
    return [(1, side, side)] * (frames - 1) + [(1, side, side - 1 if side > 1 else 1)]


def warm_up(model, processor, max_tokens: int, stream: torch.cuda.Stream) -> None:
    """One forward of `warm_up_grids` (zeros), waited for: the one-time costs of a process's first forward (lazy
    kernel loading, cuBLAS workspaces, Triton compiles; with CUDA graphs on, the capture of the graph most forwards
    replay), paid before the first images arrive rather than by them. Outputs do not depend on it (no state is kept
    but the graph, whose replays compute what the eager forward does)."""
    grids = warm_up_grids(processor, max_tokens)
    patch_size = processor.options({})["patch_size"]
    weight = next(model.parameters())
    with torch.no_grad(), torch.cuda.stream(stream):
        tokens = sum(t * h * w for t, h, w in grids)
        patches = torch.zeros(tokens, 3 * patch_size**2, device=weight.device, dtype=weight.dtype)
        model(patches, torch.tensor(grids))
    stream.synchronize()


def run_forwards(
    model, entries: Iterable[Entry], max_tokens: int, patch_features: bool, group_of: Callable[[Any], Any],
    streams: Streams | None = None, clock: StageClock | None = None,
) -> Iterator[ForwardResult]:
    """Entries in order -> results in order, forwards packed by the token budget within each group and queued
    PIPELINE_DEPTH deep."""
    clock = clock or StageClock()
    in_flight: deque[InFlight] = deque()

    def oldest() -> ForwardResult:
        with clock.timing("forward: waiting for the oldest forward's results"):
            return in_flight.popleft().result()

    for group, members in itertools.groupby(entries, key=lambda entry: group_of(entry.tag)):
        tokens = lambda entry: 0 if entry.kind == "skip" else int(np.prod(entry.grid))  # noqa: E731
        for batch in token_budget_batches(members, max_tokens, tokens):
            with clock.timing("forward: launches"):
                in_flight.append(InFlight(model, group, batch, patch_features, streams))
            while len(in_flight) > PIPELINE_DEPTH:
                yield oldest()
    while in_flight:
        yield oldest()


def has_gpu_preprocessing(processor) -> bool:
    """One of our packed processors, which the GPU path preprocesses (asked without touching CUDA)."""
    from .gpu_preprocessing import tower_of_processor

    try:
        return bool(tower_of_processor(processor))
    except ValueError:
        return False


def encoded_results(
    model,
    processor,
    samples: SampleSource,
    max_tokens: int,
    patch_features: bool = False,
    workers: int = 0,
    preprocess: str = "cpu",
    group_of: Callable[[Any], Any] = lambda tag: None,
    clock: StageClock | None = None,
    device: torch.device | str | None = None,
    cuda_graphs: bool = False,
    jpeg_decoder: str = "auto",
) -> Iterator[ForwardResult]:
    """The whole pipeline: samples -> results in input order (see the module docstring).

    `model`: the tower, or a function of no arguments that loads it onto `device`: called in a thread of its own once
    the workers are forked, so that the load overlaps the GPU preprocessing's start and the first images' decoding.
    `clock`: gets the host seconds of each stage and the start-up marks. `cuda_graphs`: the forwards replay CUDA
    graphs (`enable_cuda_graphs`, one graph per size bucket, the usual one captured in the warm-up) where they apply.
    `jpeg_decoder`: the GPU path's JPEG decoder (`jpeg_decoders`)."""
    clock = clock or StageClock()
    if max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive number of patches, got {max_tokens}")
    if preprocess not in ("auto", "cpu", "gpu"):
        raise ValueError(f"preprocess must be 'auto', 'cpu' or 'gpu', got {preprocess!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    prepare = CpuPreparation(processor)

    def batches(gpu_decode: bool) -> Iterator[Chunk]:
        dataset = ChunkDataset(samples, prepare, gpu_decode)
        return iter(torch.utils.data.DataLoader(
            dataset,
            batch_size=None,  # a worker's item is already a chunk
            num_workers=workers,
            pin_memory=device.type == "cuda",
            prefetch_factor=WORKER_PREFETCH if workers else None,
            persistent_workers=False,
        ))  # fmt: skip

    # The workers are forked first: before this process makes its CUDA context (a fork copies the process's memory
    # mappings, which a CUDA context adds many of) and before any other thread of ours runs CUDA work (a fork in the
    # middle of another thread's CUDA calls would copy that state mid-flight).
    gpu = None
    if preprocess != "cpu":
        from .jpeg_decoders import check_jpeg_decoder

        check_jpeg_decoder(jpeg_decoder)  # an unknown or absent decoder is refused, not taken for "no GPU path"
    gpu_decode = preprocess == "gpu" or (
        preprocess == "auto" and device.type == "cuda" and has_gpu_preprocessing(processor)
    )
    if gpu_decode:
        from .gpu_preprocessing import GpuPreprocessing

        if device.type != "cuda":
            GpuPreprocessing(processor, device)  # raises its "needs a CUDA device"
    chunks = batches(gpu_decode)
    clock.mark("workers forked")
    if device.type == "cuda":  # the key the norms' and the preprocessing's first Triton launches ask for: ahead
        from .fused_preprocessing import hash_triton_compiler, start_hashing_triton_compiler

        start_hashing_triton_compiler()  # unless the job has started it already
    # The load from here on, beside the GPU preprocessing's making (the CUDA context, nvJPEG) and the first chunks'
    # decoding: most of it waits on the disk and the GPU, not on this thread.
    loading = InThread(model) if callable(model) and not isinstance(model, torch.nn.Module) else None
    if gpu_decode:
        try:
            gpu = GpuPreprocessing(processor, device, jpeg_decoder)
            clock.mark("GPU preprocessing ready")
        except ValueError:  # no torchvision, or no nvJPEG in it, or no hardware JPEG engines
            if preprocess == "gpu":
                raise
            del chunks  # "auto": the CPU path after all; its workers are stopped
            if loading is not None:  # the new workers fork once no other thread of ours runs CUDA work
                model, loading = loading.result(), None
            if device.type == "cuda":  # nor is in the middle of an import (the hash's, of Triton's subpackages)
                hash_triton_compiler()  # waits for the hash in progress
            chunks = batches(gpu_decode=False)
    chunks = chunks_on_device(chunks, device, prepare.options, gpu, clock)
    streams = None
    if device.type == "cuda":
        # The preprocessing's kernels at the highest priority: they are few and small, and the forwards' kernels
        # could otherwise keep them waiting (not measured on its own: RESULTS.md, encode job, session 8).
        streams = Streams(torch.cuda.Stream(device, priority=-100), torch.cuda.Stream(device))
        chunks = in_background(chunks, PREFETCH_CHUNKS, streams.preprocessing, clock)  # decoding starts now
    if loading is not None:
        with clock.timing("forward: waiting for the model's load (the preprocessing runs meanwhile)"):
            model = loading.result()
    clock.mark("model loaded")
    if device.type == "cuda":
        if cuda_graphs and getattr(model, "cuda_graphs", False) is None and max_tokens <= CUDA_GRAPH_MAX_TOKENS:
            model.enable_cuda_graphs(max_tokens=max_tokens, max_frames=max(256, max_tokens // 16))
        with clock.timing("forward: warm-up"):
            warm_up(model, processor, max_tokens, streams.forwards)
        clock.mark("warmed up")
    entries = itertools.chain.from_iterable(chunks)
    yield from run_forwards(model, entries, max_tokens, patch_features, group_of, streams, clock)
