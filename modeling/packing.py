"""What both packed towers share: packing metadata, varlen attention, position maps, the PreTrainedModel base.

A packed batch is `hidden_states [N, patch_dim]` (the patches of all images, each image row-major, frame-major
for t > 1) plus `grid_thw [B, 3]` in patches. Everything the layers need to know about the images is derived
ONCE per forward from `grid_thw` (`PackedGrid`: sizes on the host, per-token indices built on the device without
a sync) and handed to every layer: the attention kernels see only segments (`cu_seqlens`, `max_seqlen`), the
position embeddings see only each token's (row, col).
"""

from __future__ import annotations

import functools
import importlib.metadata
import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import BaseModelOutput, BaseModelOutputWithPooling

from .checkpoint_loading import load_pretrained

# --------------------------------------------------------------------------------------------------------------
# Packing metadata
# --------------------------------------------------------------------------------------------------------------


def _to(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
    # Host -> device without a host sync: the copy is queued, no CUDA call waits for the GPU.
    return tensor.to(device, non_blocking=True)


@dataclass
class Segments:
    """Consecutive variable-length segments of a packed sequence, in the form every varlen kernel takes.

    Sizes come from the host (`lengths`); per-token index tensors are built on the device from per-segment
    ones, with sizes known on the host, so nothing ever waits for the GPU.
    """

    lengths: torch.Tensor  # [S] int64, host
    device: torch.device
    cu_seqlens: torch.Tensor = field(init=False)  # [S + 1] int32, on `device`
    max_seqlen: int = field(init=False)  # Python int: kernels size their launch grid with it
    num_tokens: int = field(init=False)

    def __post_init__(self):
        cu_seqlens = torch.zeros(len(self.lengths) + 1, dtype=torch.int32)
        torch.cumsum(self.lengths, 0, out=cu_seqlens[1:])
        self.cu_seqlens = _to(self.device, cu_seqlens)
        self.max_seqlen = int(self.lengths.max()) if len(self.lengths) else 0
        self.num_tokens = int(self.lengths.sum())

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def token_segment(self) -> torch.Tensor:
        """[T] int64 on device: the segment of each token."""
        segments = torch.arange(self.num_segments, device=self.device)
        return segments.repeat_interleave(_to(self.device, self.lengths), output_size=self.num_tokens)

    @functools.cached_property
    def index_in_segment(self) -> torch.Tensor:
        """[T] int64 on device: each token's position inside its segment."""
        starts = self.cu_seqlens[:-1].long()
        return torch.arange(self.num_tokens, device=self.device) - starts[self.token_segment]

    @functools.cached_property
    def padded_layout(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(slot [T], valid [S, max_seqlen]) of the padded `[S, max_seqlen]` batch of the pure-PyTorch path."""
        slot = self.token_segment * self.max_seqlen + self.index_in_segment
        valid = torch.arange(self.max_seqlen, device=self.device)[None, :] < _to(self.device, self.lengths)[:, None]
        return slot, valid


@dataclass
class PackedGrid:
    """Per-forward packing metadata derived from `grid_thw` once and shared by every layer."""

    grid_thw: torch.Tensor  # [B, 3] int64, host
    frame_heights: torch.Tensor  # [F] int64, host
    frame_widths: torch.Tensor  # [F] int64, host
    frames: Segments  # one attention segment per frame (Qwen2-VL convention)
    frame_queries: Segments  # one query per frame: the attention-pooling heads

    @classmethod
    def from_grid_thw(cls, grid_thw: torch.Tensor, device: torch.device) -> "PackedGrid":
        t, h, w = grid_thw.unbind(1)
        frame_heights, frame_widths = h.repeat_interleave(t), w.repeat_interleave(t)  # [F]
        frame_lengths = frame_heights * frame_widths
        return cls(
            grid_thw=grid_thw,
            frame_heights=frame_heights,
            frame_widths=frame_widths,
            frames=Segments(frame_lengths, device),
            frame_queries=Segments(torch.ones_like(frame_lengths), device),
        )

    @property
    def num_tokens(self) -> int:
        return self.frames.num_tokens

    @property
    def num_frames(self) -> int:
        return self.frames.num_segments

    @property
    def device(self) -> torch.device:
        return self.frames.device

    def per_token(self, per_frame: torch.Tensor) -> torch.Tensor:
        """[F] host values -> [N] on device: each token gets its frame's value."""
        return _to(self.device, per_frame)[self.frames.token_segment]

    @functools.cached_property
    def _token_widths(self) -> torch.Tensor:
        return self.per_token(self.frame_widths)  # [N] on device: shared by rows and cols

    @functools.cached_property
    def token_rows(self) -> torch.Tensor:
        """[N] int64 on device: row of each token inside its frame."""
        return self.frames.index_in_segment // self._token_widths

    @functools.cached_property
    def token_cols(self) -> torch.Tensor:
        """[N] int64 on device: column of each token inside its frame."""
        return self.frames.index_in_segment % self._token_widths


# Host-side metadata is built eagerly even under `torch.compile`: it reads `grid_thw`'s values (`.tolist()`,
# `unique`, `repeat_interleave`), which would otherwise break graphs and guard on every new set of grids. The
# compiled graphs then only see the tensors it produces (dynamic sizes), so new grids do not recompile.
@torch.compiler.disable
def pack_inputs(hidden_states: torch.Tensor, grid_thw, patch_dim: int) -> PackedGrid:
    """Checks a packed batch (DESIGN §9) and returns its metadata. At most one device->host copy (`grid_thw`)."""
    if not isinstance(hidden_states, torch.Tensor):
        raise TypeError(f"hidden_states must be a torch.Tensor of patches, got {type(hidden_states).__name__}")
    if hidden_states.dim() != 2 or hidden_states.shape[1] != patch_dim:
        raise ValueError(
            f"hidden_states must be [total_patches, patch_size*patch_size*num_channels] = [N, {patch_dim}], "
            f"got shape {tuple(hidden_states.shape)}"
        )
    if not hidden_states.is_floating_point():
        raise TypeError(f"hidden_states must be a floating-point tensor, got {hidden_states.dtype}")
    if grid_thw is None:
        raise ValueError("grid_thw is required: [num_images, 3] integer (t, h, w) in patches")
    if not isinstance(grid_thw, torch.Tensor):
        grid_thw = torch.as_tensor(grid_thw)
    if grid_thw.is_floating_point() or grid_thw.is_complex() or grid_thw.dtype == torch.bool:
        raise TypeError(f"grid_thw must be an integer tensor, got {grid_thw.dtype}")
    if grid_thw.numel() == 0:
        grid_thw = grid_thw.reshape(0, 3)
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3:
        raise ValueError(f"grid_thw must be [num_images, 3] (t, h, w), got shape {tuple(grid_thw.shape)}")
    grid_thw = grid_thw.to("cpu", torch.int64)  # the one device->host copy of a forward (none if already here)
    if (grid_thw <= 0).any():
        bad = grid_thw[(grid_thw <= 0).any(1)].tolist()
        raise ValueError(f"grid_thw entries must be positive (t, h, w >= 1), got {bad}")
    total = int(grid_thw.prod(1).sum())
    if total != hidden_states.shape[0]:
        raise ValueError(
            f"grid_thw describes sum(t*h*w) = {total} patches but hidden_states has {hidden_states.shape[0]}"
        )
    # Checking finiteness of a GPU tensor would cost a host sync every forward; the CPU check is free.
    if hidden_states.device.type == "cpu" and not torch.isfinite(hidden_states).all():
        raise ValueError("hidden_states contains NaN or Inf")
    return PackedGrid.from_grid_thw(grid_thw, hidden_states.device)


# --------------------------------------------------------------------------------------------------------------
# Varlen attention dispatch
# --------------------------------------------------------------------------------------------------------------

# name -> what it needs. "auto" picks the fastest one that needs no extra package.
ATTENTION_BACKENDS = {
    "varlen_attn": "torch >= 2.10 built with CUDA (torch.nn.attention.varlen.varlen_attn); CUDA fp16/bf16",
    "flash_attention_2": "the flash-attn package: pip install 'packed-vit[flash]'; CUDA fp16/bf16",
    "flash_attention_4": "the flash-attn-4 package (CuTe DSL, Hopper/Blackwell): pip install 'packed-vit[flash4]'",
    "sdpa": "pure PyTorch, any device and dtype (padded per-frame batch, masked)",
    "eager": "pure PyTorch matmul + fp32 softmax, any device and dtype (the reference math)",
}
FLASH_BACKENDS = ("varlen_attn", "flash_attention_2", "flash_attention_4")
# The import that holds each flash-attn package's `flash_attn_varlen_func`.
FLASH_ATTN_MODULES = {"flash_attention_2": "flash_attn", "flash_attention_4": "flash_attn.cute"}

# flash-attn-4 head dims whose backward matched an fp64 reference (dq, dk, dv) on an H200; see benchmarks/RESULTS.md.
FA4_BACKWARD_HEAD_DIMS = (64, 96, 128)


def _distribution_installed(name: str) -> bool:
    # By distribution, not by module: flash-attn 2 and 4 both install the `flash_attn` package.
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def _torch_varlen_attn():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def check_attn_implementation(name: str | None) -> str:
    """Validates a requested backend name at construction time; returns it ("auto" when none was asked)."""
    if name is None or name == "auto":
        return "auto"
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"Unknown attn_implementation={name!r}; choose one of 'auto', {', '.join(ATTENTION_BACKENDS)}")
    if name == "varlen_attn" and _torch_varlen_attn() is None:
        raise ValueError(f"attn_implementation='varlen_attn' needs torch >= 2.10; this is torch {torch.__version__}")
    if name == "flash_attention_2" and not _distribution_installed("flash-attn"):
        raise ValueError("attn_implementation='flash_attention_2' needs flash-attn: pip install 'packed-vit[flash]'")
    if name == "flash_attention_4" and not _distribution_installed("flash-attn-4"):
        raise ValueError("attn_implementation='flash_attention_4' needs flash-attn-4: pip install 'packed-vit[flash4]'")
    return name


def resolve_attn_implementation(name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend a forward on (device, dtype) will use; a requested one that cannot run there is an error."""
    runs_flash = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    if name == "auto":
        return "varlen_attn" if runs_flash and _torch_varlen_attn() is not None else "sdpa"
    if name in FLASH_BACKENDS and not runs_flash:
        raise ValueError(
            f"attn_implementation={name!r} runs on CUDA fp16/bf16 only, got {device.type} {dtype}: cast the model "
            "(model.to(torch.bfloat16)) or choose attn_implementation='sdpa'"
        )
    return name


@torch.compiler.disable  # host-side, data-dependent shapes: eager under torch.compile (see pack_inputs)
def _padded_layouts(query_segments: Segments, key_segments: Segments):
    """Both layouts in one call, so an attention under torch.compile has one graph break, not one per tensor."""
    return query_segments.padded_layout, key_segments.padded_layout


def _pad(x: torch.Tensor, slot: torch.Tensor, segments: Segments) -> torch.Tensor:
    """[T, H, D] packed -> [S, H, L, D] padded with zeros (differentiable)."""
    padded = x.new_zeros(segments.num_segments * segments.max_seqlen, *x.shape[1:]).index_copy(0, slot, x)
    return padded.view(segments.num_segments, segments.max_seqlen, *x.shape[1:]).transpose(1, 2)


def _unpad(x: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[S, H, L, D] padded -> [T, H, D] packed."""
    return x.transpose(1, 2).flatten(0, 1)[slot]


def varlen_attention(
    query: torch.Tensor,  # [Tq, H, D]
    key: torch.Tensor,  # [Tk, H, D]
    value: torch.Tensor,  # [Tk, H, D]
    query_segments: Segments,
    key_segments: Segments,
    scale: float,
    backend: str,
) -> torch.Tensor:  # [Tq, H, D]
    """Attention of each query segment over the key segment of the same index, nothing across segments."""
    if query.shape[0] == 0 or key_segments.num_segments == 0:
        return query.new_zeros(query.shape[0], query.shape[1], value.shape[2])
    if backend == "varlen_attn":
        # torch 2.10 has no `scale=`: the 7 positional args run on 2.10 and 2.11+; the default scale is ours.
        if not math.isclose(scale, query.shape[-1] ** -0.5):
            query = query * (scale * query.shape[-1] ** 0.5)
        return _torch_varlen_attn()(
            query, key, value,
            query_segments.cu_seqlens, key_segments.cu_seqlens,
            query_segments.max_seqlen, key_segments.max_seqlen,
        )  # fmt: skip
    if backend == "flash_attention_4" and torch.is_grad_enabled() and query.shape[-1] not in FA4_BACKWARD_HEAD_DIMS:
        if any(t.requires_grad for t in (query, key, value)):
            raise ValueError(
                f"attn_implementation='flash_attention_4' cannot train with head_dim {query.shape[-1]}: flash-attn-4 "
                f"4.0.0b36's Hopper backward returned a wrong query gradient for head_dim 72 and 80 (checked head dims "
                f"that match fp64: {FA4_BACKWARD_HEAD_DIMS}). Train with attn_implementation='varlen_attn'."
            )
    if backend in FLASH_ATTN_MODULES:
        # Not `from flash_attn import ...`: transformers' remote-code loader (Hub repos) refuses a file that
        # imports, anywhere outside try/except, a package that is not installed, and flash-attn is optional.
        flash_attn_varlen_func = importlib.import_module(FLASH_ATTN_MODULES[backend]).flash_attn_varlen_func
        with torch.cuda.device(query.device):  # flash-attn-4 launches on the current stream (as Triton does)
            out = flash_attn_varlen_func(
                query, key, value,
                cu_seqlens_q=query_segments.cu_seqlens, cu_seqlens_k=key_segments.cu_seqlens,
                max_seqlen_q=query_segments.max_seqlen, max_seqlen_k=key_segments.max_seqlen,
                softmax_scale=scale,
            )  # fmt: skip
        return out[0] if isinstance(out, tuple) else out  # flash-attn 4 returns (out, lse)

    # Pure PyTorch: one padded [segments, heads, max_len, head_dim] batch, padding keys masked out. Every
    # query row sees at least one real key, so no row is fully masked.
    (query_slot, _), (key_slot, key_valid) = _padded_layouts(query_segments, key_segments)
    mask = key_valid[:, None, None, :]  # [S, 1, 1, Lk]
    q = _pad(query, query_slot, query_segments)
    k, v = _pad(key, key_slot, key_segments), _pad(value, key_slot, key_segments)
    if backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    elif backend == "eager":
        scores = torch.matmul(q, k.transpose(-1, -2)) * scale
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
    else:
        raise ValueError(f"Unknown attention backend {backend!r}")
    return _unpad(out, query_slot)


class PackedSelfAttention(nn.Module):
    """Multi-head self-attention over the frames of a packed sequence. Keys: `{q,k,v,out}_proj` (both towers)."""

    def __init__(self, hidden_size: int, num_heads: int, bias: bool, attention_dropout: float):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_attention_heads {num_heads}")
        if attention_dropout:
            raise ValueError("attention_dropout > 0 is not supported by the packed attention kernels")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.scale = self.head_dim**-0.5
        self.q_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.k_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.v_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.out_proj = nn.Linear(hidden_size, hidden_size, bias=bias)

    def forward(self, hidden_states: torch.Tensor, packed: PackedGrid, backend: str) -> torch.Tensor:
        heads = (hidden_states.shape[0], self.num_heads, self.head_dim)
        query = self.q_proj(hidden_states).view(heads)  # [N, H, Dh]
        key = self.k_proj(hidden_states).view(heads)
        value = self.v_proj(hidden_states).view(heads)
        out = varlen_attention(query, key, value, packed.frames, packed.frames, self.scale, backend)
        return self.out_proj(out.reshape(hidden_states.shape))  # [N, D]


# --------------------------------------------------------------------------------------------------------------
# Position embeddings
# --------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=512)
def _resize_map(side: int, height: int, width: int, mode: str, antialias: bool, device: torch.device):
    """[h*w, side*side] matrix M with `F.interpolate(table, (h, w))` == M @ table for any side x side table.

    Built by resizing the identity basis through `F.interpolate` itself, on the table's device, so it is
    whatever torch computes there, quirks included: torch's CPU antialiased bilinear kernel, for one, gives
    every row of a width-1 output the weights of row 0, which a separable re-derivation would not reproduce.
    Cached per (side, h, w, mode, device): a shape's map is built once and serves every image of that shape.
    """
    basis = torch.eye(side * side, dtype=torch.float32, device=device).reshape(side * side, 1, side, side)
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    resized = F.interpolate(basis, size=(height, width), mode=mode, antialias=antialias, **kwargs)
    return resized.reshape(side * side, height * width).t().contiguous()


def resized_position_embedding(
    table: torch.Tensor,  # [S*S, D] learned table of an S x S grid
    packed: PackedGrid,
    mode: str,
    antialias: bool,
) -> torch.Tensor:  # [N, D] in table's dtype
    """`F.interpolate(table as [D, S, S], size=(h, w), mode, antialias)` for every frame, without a per-image call.

    Resizing is linear in the table: each distinct (h, w) of the batch gets its cached map, the maps of all
    distinct shapes are applied in one matmul, and every token gathers its row. Same numbers as one
    `F.interpolate` per image up to fp32 rounding, and differentiable in the table.
    """
    maps, rows = _position_maps_and_rows(math.isqrt(table.shape[0]), packed, mode, antialias, table.device)
    # fp32 like the reference on CPU (autocast off: the reference's F.interpolate is not autocast either); on GPU
    # the reference resizes in the table's dtype, which we beat.
    with torch.autocast(table.device.type, enabled=False):
        resized = maps @ table.float()  # [sum of distinct h*w, D]
    return resized[rows].to(table.dtype)


@torch.compiler.disable  # host-side, from grid_thw's values: eager under torch.compile (see pack_inputs)
def _position_maps_and_rows(side: int, packed: PackedGrid, mode: str, antialias: bool, device: torch.device):
    """(maps [sum of distinct h*w, side*side] of the batch's distinct shapes, rows [N]: each token's row in them)."""
    if packed.num_tokens == 0:
        no_maps = torch.zeros(0, side * side, dtype=torch.float32, device=device)  # fp32 like _resize_map's
        return no_maps, torch.zeros(0, dtype=torch.int64, device=device)
    frame_shapes = torch.stack([packed.frame_heights, packed.frame_widths], 1)  # [F, 2]
    shapes, shape_of_frame = torch.unique(frame_shapes, dim=0, return_inverse=True)  # [U, 2], [F]
    maps = torch.cat([_resize_map(side, h, w, mode, antialias, device) for h, w in shapes.tolist()])
    sizes = shapes.prod(1)
    first_row_of_frame = (torch.cumsum(sizes, 0) - sizes)[shape_of_frame]  # [F]: where its shape's map starts
    rows = packed.per_token(first_row_of_frame) + packed.frames.index_in_segment  # [N]
    return maps, rows


@torch.compiler.disable  # host-side, no parameters: eager under torch.compile (see pack_inputs)
def sincos_position_embedding(packed: PackedGrid, dim: int, device, dtype, temperature: float = 10000.0):
    """2-D sin-cos embedding of every token's (row, col), `[sin_w | cos_w | sin_h | cos_h]`, in one gather.

    Computed as AIMv2 computes it (float64, then cast), for the coordinates 0..max_side only: a token's
    vector is the row of its column followed by the row of its row.
    """
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float64) / quarter)  # [D/4]
    max_side = int(max(packed.frame_heights.max(), packed.frame_widths.max())) if packed.num_frames else 1
    angles = torch.arange(max_side, dtype=torch.float64)[:, None] * omega  # [max_side, D/4]
    per_coordinate = _to(device, torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype))  # [max_side, D/2]
    return torch.cat([per_coordinate[packed.token_cols], per_coordinate[packed.token_rows]], dim=1)  # [N, D]


# --------------------------------------------------------------------------------------------------------------
# Residual add + norm in one pass (inference on CUDA)
# --------------------------------------------------------------------------------------------------------------
# Written by hand because torch has no fused "residual add + LayerNorm/RMSNorm" op, and its LayerNorm kernel moves
# [N, 1152] bf16 at about a third of an H200's bandwidth (profile in benchmarks/RESULTS.md). One Triton program per
# token reads the residual and the branch output once and writes both the new residual and its normalization. It
# rounds where the reference does: the sum to the activation dtype before the statistics (fp32), and for RMSNorm the
# normalized value to the activation dtype before the weight (`Aimv2RMSNorm`).

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the unfused torch ops run instead
    triton = None

if triton is not None:

    @triton.jit
    def _add_norm_kernel(
        x_ptr, delta_ptr, sum_ptr, out_ptr, weight_ptr, bias_ptr, width, eps,
        HAS_DELTA: tl.constexpr, RMS: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        row = tl.program_id(0).to(tl.int64) * width
        cols = tl.arange(0, BLOCK)
        in_row = cols < width
        x = tl.load(x_ptr + row + cols, mask=in_row, other=0.0)
        if HAS_DELTA:
            x = x.to(tl.float32) + tl.load(delta_ptr + row + cols, mask=in_row, other=0.0).to(tl.float32)
            x = x.to(sum_ptr.dtype.element_ty)
            tl.store(sum_ptr + row + cols, x, mask=in_row)
        x = x.to(tl.float32)
        if RMS:
            normed = x * tl.rsqrt(tl.sum(x * x, axis=0) / width + eps)
            normed = normed.to(out_ptr.dtype.element_ty).to(tl.float32)
        else:
            centered = tl.where(in_row, x - tl.sum(x, axis=0) / width, 0.0)
            normed = centered * tl.rsqrt(tl.sum(centered * centered, axis=0) / width + eps)
        out = normed * tl.load(weight_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        if HAS_BIAS:
            out += tl.load(bias_ptr + cols, mask=in_row, other=0.0).to(tl.float32)
        tl.store(out_ptr + row + cols, out.to(out_ptr.dtype.element_ty), mask=in_row)


# Below this many tokens a forward is bound by the host's kernel launches, not the GPU, and a Triton launch costs
# the host more than torch's kernels do (H200 host: 24 us for fused add + LayerNorm vs 20 us for torch's add and
# LayerNorm, 14 us for its LayerNorm alone), more than the pass saves on the GPU (benchmarks/RESULTS.md).
FUSED_ADD_NORM_MIN_TOKENS = 8192


def fused_add_norm_applies(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton pass runs for inference on CUDA (no autograd formula) on enough tokens to keep the GPU busy;
    torch.compile fuses the plain ops itself."""
    return (
        triton is not None
        and hidden_states.is_cuda
        and hidden_states.shape[0] >= FUSED_ADD_NORM_MIN_TOKENS
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and hidden_states.dim() == 2
        and hidden_states.dtype == weight.dtype
    )


def fused_add_norm(
    hidden_states: torch.Tensor,  # [N, D]
    delta: torch.Tensor | None,  # [N, D] residual branch output, or None for the norm alone
    weight: torch.Tensor,  # [D]
    bias: torch.Tensor | None,
    eps: float,
    rms: bool,
) -> tuple[torch.Tensor, torch.Tensor]:  # (hidden_states + delta, norm of it), both [N, D]
    hidden_states = hidden_states.contiguous()
    summed = hidden_states if delta is None else torch.empty_like(hidden_states)
    out = torch.empty_like(hidden_states)
    if hidden_states.shape[0]:
        width = hidden_states.shape[1]
        with torch.cuda.device(hidden_states.device):  # Triton launches on the current device, not the tensors'
            _add_norm_kernel[(hidden_states.shape[0],)](
                hidden_states, hidden_states if delta is None else delta.contiguous(), summed, out, weight,
                weight if bias is None else bias, width, eps,
                HAS_DELTA=delta is not None, RMS=rms, HAS_BIAS=bias is not None, BLOCK=triton.next_power_of_2(width),
            )  # fmt: skip
    return summed, out


class ResidualNorm(nn.Module):
    """Base of the towers' norms: `norm(x)` normalizes; `norm(x, residual_delta=d)` returns `(x + d, norm(x + d))`,
    in one fused pass where `fused_add_norm_applies`. Subclasses give `weight`, `bias`, `eps`, `rms` and `normalize`
    (the plain torch ops, which run everywhere else)."""

    rms: bool

    def forward(self, hidden_states: torch.Tensor, residual_delta: torch.Tensor | None = None):
        if fused_add_norm_applies(hidden_states, self.weight):
            summed, out = fused_add_norm(hidden_states, residual_delta, self.weight, self.bias, self.eps, self.rms)
            return out if residual_delta is None else (summed, out)
        if residual_delta is None:
            return self.normalize(hidden_states)
        hidden_states = hidden_states + residual_delta
        return hidden_states, self.normalize(hidden_states)


class PackedLayerNorm(ResidualNorm, nn.LayerNorm):
    """`nn.LayerNorm` (same keys and math) with the fused residual add of `ResidualNorm`."""

    rms = False
    normalize = nn.LayerNorm.forward


# --------------------------------------------------------------------------------------------------------------
# Encoder and model base
# --------------------------------------------------------------------------------------------------------------


class PackedEncoder(nn.Module):
    """The stack of encoder layers, all run on the same per-forward `packed` metadata (key prefix `layers.N`)."""

    def __init__(self, layers: list[nn.Module]):
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, hidden_states, packed: PackedGrid, backend: str, output_hidden_states: bool = False):
        all_hidden_states = (hidden_states,) if output_hidden_states else None
        for layer in self.layers:
            hidden_states = layer(hidden_states, packed=packed, backend=backend)
            if output_hidden_states:
                all_hidden_states += (hidden_states,)
        return BaseModelOutput(last_hidden_state=hidden_states, hidden_states=all_hidden_states)


class PackedVisionPreTrainedModel(PreTrainedModel):
    """Base of both towers: the packed forward, and attention-backend selection.

    A tower defines `embeddings(patches, packed)`, `encoder` (a `PackedEncoder`), `final_norm` and, when the
    checkpoint has one, `head(last_hidden_state, packed, backend)`.
    """

    main_input_name = "hidden_states"
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_flash_attn = True

    def _check_and_adjust_attn_implementation(self, attn_implementation, is_init_check=False, **kwargs):
        # Our backends are our own (varlen kernels on packed tokens), not transformers' per-model attention
        # interfaces, so we validate the names ourselves, on every transformers version.
        return check_attn_implementation(attn_implementation)

    def attention_backend(self, device: torch.device, dtype: torch.dtype) -> str:
        requested = getattr(self.config, "_attn_implementation", None)
        if torch.is_autocast_enabled(device.type):  # fp32 master weights under autocast: attention runs in its dtype
            dtype = torch.get_autocast_dtype(device.type)
        return resolve_attn_implementation(check_attn_implementation(requested), device, dtype)

    def forward(
        self,
        hidden_states: torch.Tensor | None = None,  # [N, p*p*C] patches, (row, col, channel) each
        grid_thw: torch.Tensor | None = None,  # [B, 3] (t, h, w) in patches
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        pixel_values: torch.Tensor | None = None,  # the image processors' name for `hidden_states`
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """-> last_hidden_state [N, D]; pooler_output [num_frames, D] (None without head); hidden_states."""
        patches = hidden_states if hidden_states is not None else pixel_values
        config = self.config
        packed = pack_inputs(patches, grid_thw, config.num_channels * config.patch_size**2)
        backend = self.attention_backend(patches.device, self.get_input_embeddings().weight.dtype)
        if output_hidden_states is None:
            output_hidden_states = config.output_hidden_states

        embeddings = self.embeddings(patches, packed)  # [N, D]
        encoded = self.encoder(embeddings, packed, backend, output_hidden_states)
        last_hidden_state = self.final_norm(encoded.last_hidden_state)
        head = getattr(self, "head", None)
        pooler_output = head(last_hidden_state, packed, backend) if head is not None else None  # [F, D]

        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooler_output, hidden_states=encoded.hidden_states
        )
        return output if return_dict is not False else output.to_tuple()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """Any checkpoint of DESIGN §4 (local folder or Hub id), converted and loaded strictly: checkpoint_loading.py."""
        return load_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs)


class LastHiddenStateModule(nn.Module):
    """Seed-compatible wrapper: `Cls(ckpt=..., device=...)`, `forward(hidden_states, grid_thw) -> last_hidden_state`."""

    model_class: type[PreTrainedModel]

    def __init__(self, ckpt: str, device="cpu", dtype: torch.dtype | None = None, **from_pretrained_kwargs):
        super().__init__()
        if dtype is not None:
            from_pretrained_kwargs["dtype"] = dtype
        self.model = self.model_class.from_pretrained(ckpt, **from_pretrained_kwargs).to(device).eval()

    def forward(self, hidden_states: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        return self.model(hidden_states, grid_thw).last_hidden_state
