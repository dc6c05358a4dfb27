"""CUDA-graph replay of the packed forward: small inference batches at the GPU's speed, not the host's.

A forward of a few images is bound by the host launching ~500 kernels (so400m: ~8 ms of launches for ~2 ms of GPU
work). A CUDA graph launches them all at once. A graph fixes every shape and every host-side argument, so batches
are padded to a size bucket, and one graph is captured per bucket, on the bucket's first batch:

- `Bucket`: total tokens rounded up to 1/8 of their power of two (at most 12.5% padding), `max_seqlen` (a host
  int the kernels size their grids with) rounded up to a power of two, the number of segments to a power of two.
  The padding tokens form trailing dummy segments of at most `max_seqlen` tokens, and segments left over are empty
  (zero-length: the varlen kernels read each length from `cu_seqlens` on the device). Every op but attention works
  on rows independently, and attention stays inside segments, so padding never reaches a real token.
- What the graph reads changes in place before each replay: the patches, the position embeddings and
  `cu_seqlens`. Real tokens come first, so the outputs are the first N rows and the first F pooled rows, copied out
  (the next replay overwrites them).
- Host work before the replay is what such a forward waits for, so it is kept small: the batch layout of each
  recent `grid_thw` (frames, bucket, `cu_seqlens`) is kept, and so are the position rows of each recent frame
  shape (a frame's rows depend on its shape alone): a new batch of shapes seen before costs one concatenation of
  their rows. A shape never seen is computed by the model's own (eager) `embeddings.positions`. Whether the model
  still holds the modules and parameter memory the graphs read is checked on every call, its module registries
  only after a registration anywhere (counted by torch's global registration hooks, installed with the first
  runner). Adapters (PEFT's layers) are captured as the modules they are; what their Python state selects (an
  adapter enabled, active, merged, its scale) is part of each graph's key. A model holding any other module of a
  class from outside torch and this package runs eagerly: what such a module computes may change with no trace.
- Memory: all graphs share one pool (about the activations of the largest bucket's forward: graphs run one at a
  time and nothing of one is read after another replays), static buffers of `max_tokens` rows, and the position
  rows of recent frame shapes, at most `max_tokens` rows (as much as the static position buffer).

Direct `torch.cuda.CUDAGraph` capture rather than `torch.compile(mode="reduce-overhead")`: no compile time (an
Inductor compile of so400m per bucket), no recompiles or graph breaks around the host-side packing metadata, and
the same kernels as the eager forward, so its outputs are the eager path's (tests/test_cuda.py).

Eager instead (same outputs) when autograd records, on the CPU, off the `varlen_attn` backend (the one whose
capture is tested), under autocast or torch.compile or an outer capture, with `output_hidden_states`, and for
batches over `max_tokens` / `max_frames`.
"""

from __future__ import annotations

import collections
import functools
import operator
from dataclasses import dataclass

import torch

from .fused_norm import fused_add_norm_from
from .packing import PackedGrid, Segments

# Backends whose kernels are checked under capture (tests/test_cuda.py); flash-attn's would need the same checks.
GRAPH_BACKENDS = ("varlen_attn",)
# A graph launches no kernel from the host, so the fused add + norm (one Triton launch for two torch kernels) pays
# at every size there; eagerly it waits for 8192 tokens (fused_norm.py).
GRAPH_FUSED_ADD_NORM_MIN_TOKENS = 0
WARMUP_CALLS = 2  # before a capture: Triton compiles, cuBLAS picks its kernels and allocates its workspace
KEPT_LAYOUTS = 256  # the host-side layouts of the most recent distinct grids (a few KB each)
MIN_MAX_SEQLEN = 128  # below one 128-row tile the flash kernels launch the same grid: fewer distinct buckets


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


@dataclass(frozen=True)
class Bucket:
    """The static sizes of one graph: `tokens` rows, `segments` segments of at most `max_seqlen` tokens each."""

    tokens: int
    segments: int
    max_seqlen: int

    @classmethod
    def fitting(cls, num_tokens: int, num_frames: int, longest: int) -> "Bucket":
        granularity = max(16, 1 << max(num_tokens.bit_length() - 4, 0))  # 1/8 of the tokens' power of two
        tokens = -(-num_tokens // granularity) * granularity
        max_seqlen = max(MIN_MAX_SEQLEN, _next_power_of_two(longest))
        padding_segments = -(-(tokens - num_tokens) // max_seqlen)
        return cls(tokens, _next_power_of_two(num_frames + padding_segments), max_seqlen)

    def segment_lengths(self, frame_lengths: torch.Tensor) -> torch.Tensor:
        """[F] real frame lengths -> [segments] int64 (host): the frames, the padding in chunks of <= max_seqlen,
        then empty segments."""
        padding = self.tokens - int(frame_lengths.sum())
        full, rest = divmod(padding, self.max_seqlen)
        chunks = torch.tensor([self.max_seqlen] * full + ([rest] if rest else []), dtype=torch.int64)
        empty = torch.zeros(self.segments - len(frame_lengths) - len(chunks), dtype=torch.int64)
        return torch.cat([frame_lengths, chunks, empty])

    def packed(self, segment_lengths: torch.Tensor, device: torch.device) -> PackedGrid:
        """The metadata a captured forward reads: only `frames` and `frame_queries` (their `cu_seqlens` on the
        device, `max_seqlen` on the host); the grid fields describe each segment as a 1 x length frame."""
        return PackedGrid(
            grid_thw=torch.stack([torch.ones_like(segment_lengths)] * 2 + [segment_lengths], 1),
            frame_heights=torch.ones_like(segment_lengths),
            frame_widths=segment_lengths,
            frames=Segments(segment_lengths, device, max_seqlen_bound=self.max_seqlen),
            frame_queries=Segments(torch.ones_like(segment_lengths), device),
        )


@dataclass
class StaticBuffers:
    """Inputs and outputs of every graph of one (device, dtypes), `max_tokens` rows: each graph uses a prefix."""

    patches: torch.Tensor  # [max_tokens, patch_dim]
    positions: torch.Tensor  # [max_tokens, D]
    last_hidden_state: torch.Tensor  # [max_tokens, D]
    positions_of: tuple | None = None  # the batch layout whose positions `positions` holds (see `run`)


@dataclass
class CapturedForward:
    graph: torch.cuda.CUDAGraph | None  # None: the padded forward runs eagerly (`capture_graphs=False`)
    packed: PackedGrid  # its `frames.cu_seqlens` is rewritten before each replay
    pooler_output: torch.Tensor | None  # [segments, D] in the graphs' pool
    cu_seqlens_of: bytes | None = None  # the grid_thw whose segments `packed.frames.cu_seqlens` holds


def _module_slots(model: torch.nn.Module) -> tuple:
    """What a graph holds on to: every submodule and parameter object where it is registered, and each parameter's
    memory (`.to()` on a submodule swaps `.data`): ~800 registry entries and ~450 addresses for so400m."""
    registries, names, registered, parameters = [], [], [], []
    for module in model.modules():
        for registry in (module._modules, module._parameters):
            for name, value in registry.items():
                if value is not None:
                    registries.append(registry), names.append(name), registered.append(value)
        parameters += [p for p in module._parameters.values() if p is not None]
    return registries, names, registered, parameters, list(map(torch.Tensor.data_ptr, parameters))


# The checks run as C-level `map`s: a Python loop over so400m's slots took 80-130 us per call, about a quarter of a
# replayed forward's host time (benchmarks/RESULTS.md).
def _registries_unchanged(slots: tuple) -> bool:
    registries, names, registered, _, _ = slots
    return all(map(operator.is_, map(dict.get, registries, names), registered))


def _addresses_unchanged(slots: tuple) -> bool:
    _, _, _, parameters, addresses = slots
    return list(map(torch.Tensor.data_ptr, parameters)) == addresses


def _slots_unchanged(slots: tuple) -> bool:
    return _registries_unchanged(slots) and _addresses_unchanged(slots)


# Modules of classes from neither torch nor this package decide in Python what their forward computes, and a graph
# fixes what the capture computed. PEFT's adapter layers keep that choice in a few attributes (an adapter enabled or
# disabled, which are active, which merged, their scales): their values are part of each graph's key, so toggling an
# adapter replays the graph of that state. PEFT's other modules follow their adapter layer. Any other module's
# state is unknown: the forward runs eagerly.
_OWN_MODULES = (__name__.rpartition(".")[0] + ".", "torch.", "transformers.activations")
_ADAPTER_STATE = ("_disable_adapters", "_active_adapter", "merged_adapters")  # PEFT's BaseTunerLayer


def _is_adapter_layer(module: torch.nn.Module) -> bool:
    return type(module).__module__.startswith("peft.") and all(hasattr(module, name) for name in _ADAPTER_STATE)


def _adapter_layers(model: torch.nn.Module) -> list | None:
    """PEFT's adapter layers in `model`; None where some module's Python state is not known (no graphs)."""
    foreign = [module for module in model.modules() if not type(module).__module__.startswith(_OWN_MODULES)]
    if not all(type(module).__module__.startswith("peft.") for module in foreign):
        return None
    return [module for module in foreign if _is_adapter_layer(module)]


_disabled = operator.attrgetter("_disable_adapters")
_active = operator.attrgetter("_active_adapter")
_merged = operator.attrgetter("merged_adapters")


def _scaling(layer) -> dict:
    return getattr(layer, "scaling", None) or {}  # LoRA's per-adapter scales; other tuners' layers have none


def _adapters_state(layers: list) -> list:
    """The adapter layers' state, compared by value (lists and dicts copied), built at C level: a Python loop over
    so400m's 166 LoRA layers cost a large part of a replay's host time."""
    return [
        list(map(_disabled, layers)), list(map(_active, layers)),
        list(map(list, map(_merged, layers))), list(map(dict, map(_scaling, layers))),
    ]  # fmt: skip


# Submodule and parameter registrations anywhere in this process (`module.x = ...`, `add_module`,
# `register_parameter`), counted by torch's global registration hooks, installed with the first runner: the
# registries are looked at again only after one.
_registrations = [0]


def _count_registration(module, name, value) -> None:
    _registrations[0] += 1  # returns None: the registered object stays as it is


@functools.cache
def _count_registrations() -> None:
    torch.nn.modules.module.register_module_module_registration_hook(_count_registration)
    torch.nn.modules.module.register_module_parameter_registration_hook(_count_registration)


@dataclass
class Layout:
    """A batch's frames as the graphs see them, from `grid_thw` alone (host). The runner keeps the layouts of recent
    grids: a batch of grids seen before skips this work."""

    grid: bytes  # grid_thw's bytes: the key
    frame_shapes: list  # [(h, w)] per frame
    num_tokens: int
    bucket: Bucket | None  # None: too large for the graphs
    segment_lengths: torch.Tensor | None  # [bucket.segments] int64, host: the bucket's segments for these frames
    cu_seqlens: torch.Tensor | None  # [bucket.segments + 1] int32, host: the same, as the kernels read them

    @classmethod
    def of(cls, grid_thw: torch.Tensor, max_tokens: int, max_frames: int) -> "Layout":
        frame_shapes = [(h, w) for t, h, w in grid_thw.tolist() for _ in range(t)]
        lengths = [h * w for h, w in frame_shapes]
        num_tokens = sum(lengths)
        bucket, segment_lengths, cu_seqlens = None, None, None
        if 0 < num_tokens <= max_tokens and len(lengths) <= max_frames:
            bucket = Bucket.fitting(num_tokens, len(lengths), max(lengths))
            segment_lengths = bucket.segment_lengths(torch.tensor(lengths, dtype=torch.int64))
            cu_seqlens = torch.zeros(len(segment_lengths) + 1, dtype=torch.int32)
            torch.cumsum(segment_lengths, 0, out=cu_seqlens[1:])
        return cls(grid_thw.numpy().tobytes(), frame_shapes, num_tokens, bucket, segment_lengths, cu_seqlens)


class CudaGraphRunner:
    """Captures and replays one CUDA graph per `Bucket`; see the module docstring. Not an `nn.Module`: it holds no
    weights and is not saved; a copy of the model gets a runner with the same settings and no graphs."""

    def __init__(self, max_tokens: int = 16384, max_frames: int = 256, max_graphs: int = 32, capture_graphs=True):
        self.max_tokens, self.max_frames, self.max_graphs = max_tokens, max_frames, max_graphs
        # False: each bucket's padded forward runs eagerly on any device and backend (how the CPU tests check it)
        self.capture_graphs = capture_graphs
        self.fused_add_norm_min_tokens = GRAPH_FUSED_ADD_NORM_MIN_TOKENS
        self.replays = 0  # forwards served by a graph (or by the padded forward, without capture)
        self.layouts: collections.OrderedDict[bytes, Layout] = collections.OrderedDict()  # LRU order
        _count_registrations()
        self.reset()

    def reset(self) -> None:
        """Drops every graph and buffer (their memory goes back to torch's allocator)."""
        self.graphs: collections.OrderedDict[tuple, CapturedForward] = collections.OrderedDict()  # LRU order
        self.buffers: dict[tuple, StaticBuffers] = {}
        self.pool = None
        self.warmup_streams: dict[torch.device, torch.cuda.Stream] = {}
        self.slots: tuple | None = None
        self.slots_registrations = -1  # the registration count when `slots` were taken
        self.adapter_layers: list | None = []  # with `slots`: PEFT's layers whose state keys the graphs
        self.adapter_state, self.adapter_state_key = None, ""  # their state at the last call, and its repr
        # (h, w) -> that frame shape's position rows [h*w, D], LRU order, at most `max_tokens` rows in all, for
        # `shape_positions_of` (device, the embeddings' parameter versions)
        self.shape_positions: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        self.shape_positions_of: tuple | None = None

    def __deepcopy__(self, memo) -> "CudaGraphRunner":
        return CudaGraphRunner(self.max_tokens, self.max_frames, self.max_graphs, self.capture_graphs)

    def __getstate__(self) -> dict:
        return dict(max_tokens=self.max_tokens, max_frames=self.max_frames, max_graphs=self.max_graphs,
                    capture_graphs=self.capture_graphs)  # fmt: skip

    def __setstate__(self, state: dict) -> None:
        self.__init__(**state)

    def applies(self, patches: torch.Tensor, backend: str, output_hidden_states) -> bool:
        """Whether this forward may replay a graph (the batch's size is `forward`'s to check)."""
        if output_hidden_states or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return False
        if torch.is_autocast_enabled(patches.device.type):
            return False
        if self.capture_graphs:
            on_graph_device = patches.is_cuda and backend in GRAPH_BACKENDS
            if not on_graph_device or torch.cuda.is_current_stream_capturing():
                return False
        return True

    def forward(self, model, patches: torch.Tensor, grid_thw: torch.Tensor, backend: str, output_hidden_states):
        """-> (last_hidden_state [N, D], pooler_output [F, D] or None) of `model` on this checked batch
        (`grid_thw` on the host), by replay; None where the forward runs eagerly instead.

        Host work is what bounds a replayed forward, so a batch of the same grids as the last one (a service of
        fixed-size images) reuses its layout, positions and `cu_seqlens`, and a new batch builds its position rows
        from those of the frame shapes seen before (`shape_positions`): no `PackedGrid` is built here.
        """
        if not self.applies(patches, backend, output_hidden_states):
            return None
        grid = grid_thw.numpy().tobytes()
        layout = self.layouts.get(grid)
        if layout is None:
            layout = self.layouts[grid] = Layout.of(grid_thw, self.max_tokens, self.max_frames)
            if len(self.layouts) > KEPT_LAYOUTS:
                self.layouts.popitem(last=False)  # the least recently used
        self.layouts.move_to_end(grid)
        if layout.bucket is None:
            return None
        if self.capture_graphs and not self._holds_the_same(model):
            self.reset()  # first call, or new modules or weights: capture again
            self.slots, self.slots_registrations = _module_slots(model), _registrations[0]
            self.adapter_layers = _adapter_layers(model)
        if self.adapter_layers is None:
            return None  # a module whose Python state a graph could not follow
        if self.adapter_layers:
            state = _adapters_state(self.adapter_layers)
            if state != self.adapter_state:  # toggled since the last call (rare): its key, once
                self.adapter_state, self.adapter_state_key = state, repr(state)
        # The weights' versions count in-place updates (load_state_dict) of the position table.
        versions = tuple(p._version for p in model.embeddings.parameters())
        num_tokens = layout.num_tokens
        # Graph tensors must not be inference tensors: they are written in place on every later call.
        with torch.inference_mode(False), torch.no_grad():
            buffers = self.buffers.get((patches.device, patches.dtype))
            if buffers is None or buffers.positions_of != (grid, versions):
                positions = self._frame_positions(model, layout, patches.device, versions)  # [(h*w, D)] per frame
                buffers = self._buffers(patches, positions[0])
                torch.cat(positions, out=buffers.positions[:num_tokens])
                buffers.positions_of = (grid, versions)
            buffers.patches[:num_tokens].copy_(patches)
            captured = self._captured(model, layout, backend, buffers, self.adapter_state_key)
            self.replays += 1
            last_hidden_state = buffers.last_hidden_state[:num_tokens].clone()
            pooler_output = captured.pooler_output
            if pooler_output is not None:
                pooler_output = pooler_output[: len(layout.frame_shapes)].clone()
        return last_hidden_state, pooler_output

    def _holds_the_same(self, model) -> bool:
        """Whether the modules, parameters and parameter memory the graphs hold are still the model's."""
        if self.slots is None:
            return False
        if _registrations[0] != self.slots_registrations:  # something was registered somewhere: look again
            if not _registries_unchanged(self.slots):
                return False
            self.slots_registrations = _registrations[0]
        return _addresses_unchanged(self.slots)

    def _frame_positions(self, model, layout: Layout, device: torch.device, versions: tuple) -> list:
        """[h*w, D] position rows of each frame: those of shapes seen before from `shape_positions`, the others
        computed in one eager call of the model's own `embeddings.positions` (a frame's rows depend on its shape)."""
        cache = self.shape_positions
        if self.shape_positions_of != (device, versions):
            cache.clear()
            self.shape_positions_of = (device, versions)
        distinct_shapes = dict.fromkeys(layout.frame_shapes)
        new_shapes = [shape for shape in distinct_shapes if shape not in cache]
        if new_shapes:
            grid_thw = torch.tensor([[1, h, w] for h, w in new_shapes], dtype=torch.int64)
            rows = model.embeddings.positions(PackedGrid.from_grid_thw(grid_thw, device))  # [sum of h*w, D]
            for shape, shape_rows in zip(new_shapes, rows.split([h * w for h, w in new_shapes])):
                cache[shape] = shape_rows.clone()  # not a view: each entry's memory is its own to drop
        for shape in distinct_shapes:
            cache.move_to_end(shape)
        positions = [cache[shape] for shape in layout.frame_shapes]
        cached_rows = sum(len(rows) for rows in cache.values())
        while cached_rows > self.max_tokens:  # the least recently used shapes go (never this batch's: see above)
            cached_rows -= len(cache.popitem(last=False)[1])
        return positions

    def _buffers(self, patches: torch.Tensor, positions: torch.Tensor) -> StaticBuffers:
        key = (patches.device, patches.dtype)
        buffers = self.buffers.get(key)
        if buffers is None or buffers.positions.dtype != positions.dtype:
            rows, width = self.max_tokens, positions.shape[1]
            self.buffers[key] = buffers = StaticBuffers(
                patches=patches.new_zeros(rows, patches.shape[1]),
                positions=positions.new_zeros(rows, width),
                last_hidden_state=positions.new_zeros(rows, width),
            )
        return buffers

    def _captured(self, model, layout: Layout, backend: str, buffers: StaticBuffers, adapter_state: str = ""):
        """The bucket's forward, run: replayed (after writing this batch's `cu_seqlens`), or captured first."""
        bucket = layout.bucket
        if not self.capture_graphs:  # the same padded forward, eagerly, with this batch's segments
            packed = bucket.packed(layout.segment_lengths, buffers.patches.device)
            return CapturedForward(None, packed, self._padded_forward(model, bucket, backend, buffers, packed))
        key = (bucket, backend, buffers.patches.dtype, buffers.positions.dtype, buffers.patches.device, adapter_state)
        captured = self.graphs.get(key)
        if captured is None:
            captured = self._capture(model, bucket, backend, buffers, layout.segment_lengths)
            if len(self.graphs) >= self.max_graphs:
                self.graphs.popitem(last=False)  # the least recently used
            self.graphs[key] = captured
        else:
            self.graphs.move_to_end(key)
            if captured.cu_seqlens_of != layout.grid:  # pageable: copied from the host now
                captured.packed.frames.cu_seqlens.copy_(layout.cu_seqlens, non_blocking=True)
            captured.graph.replay()
        captured.cu_seqlens_of = layout.grid
        return captured

    def _padded_forward(self, model, bucket: Bucket, backend: str, buffers: StaticBuffers, packed: PackedGrid):
        """The captured function: embeddings of the static inputs -> encoder -> head, last_hidden_state written to
        the static output. -> pooler_output [segments, D] or None."""
        rows = bucket.tokens
        embeddings = model.embeddings.embed_patches(buffers.patches[:rows]) + buffers.positions[:rows]
        with fused_add_norm_from(self.fused_add_norm_min_tokens):
            last_hidden_state, pooler_output, _ = model.encode(embeddings, packed, backend)
        buffers.last_hidden_state[:rows].copy_(last_hidden_state)
        return pooler_output

    def _capture(self, model, bucket: Bucket, backend: str, buffers: StaticBuffers, segment_lengths):
        device = buffers.patches.device
        packed = bucket.packed(segment_lengths, device)  # this batch's cu_seqlens: the warm-up runs compute it
        # Warm-up off the default stream, as torch's capture docs do; one stream per device for all captures, since
        # cuBLAS keeps a workspace for every stream it ran on.
        if device not in self.warmup_streams:
            self.warmup_streams[device] = torch.cuda.Stream(device)
        side_stream = self.warmup_streams[device]
        side_stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side_stream):
            for _ in range(WARMUP_CALLS):
                self._padded_forward(model, bucket, backend, buffers, packed)
        torch.cuda.current_stream(device).wait_stream(side_stream)
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # "thread_local": this thread's capture must not be broken by another thread's CUDA calls meanwhile (the
        # encode job's preprocessing thread decodes and allocates while a forward of a new bucket is captured); this
        # thread's own unsafe calls still fail the capture, as in the default "global" mode.
        capture = torch.cuda.graph(graph, pool=self.pool, capture_error_mode="thread_local")
        with torch.cuda.device(device), capture:
            pooler_output = self._padded_forward(model, bucket, backend, buffers, packed)
        graph.replay()  # capture records without running: this batch's outputs come from the first replay
        return CapturedForward(graph, packed, pooler_output)
