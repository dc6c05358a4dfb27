"""Variable-length attention over the segments of a packed sequence, one call for every backend.

Backends (`attn_implementation=`): torch's built-in varlen flash kernel, the flash-attn packages (optional extras),
and a pure-PyTorch path for any device and dtype, the reference. A segment attends only to itself.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .packing import PackedGrid, Segments, host_to_device

# name -> what it needs. "auto" picks the fastest one that needs no extra package.
ATTENTION_BACKENDS = {
    "varlen_attn": "torch >= 2.10 built with CUDA (torch.nn.attention.varlen.varlen_attn); CUDA fp16/bf16",
    "flash_attention_2": "the flash-attn package: pip install 'packed-vit[flash]'; CUDA fp16/bf16",
    "flash_attention_4": "the flash-attn-4 package (CuTe DSL, Hopper/Blackwell): pip install 'packed-vit[flash4]'",
    "sdpa": "pure PyTorch, any device and dtype (one unmasked call per group of equal-length frames)",
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


@dataclass(frozen=True)
class EqualLengthGroup:
    """Segments that share one (query length, key length): one unmasked attention call as a [n, H, L, D] batch."""

    num_segments: int
    query_length: int
    key_length: int
    # the group's tokens in segment order: a contiguous range (a view, no copy) or an index tensor on the device
    query_tokens: slice | torch.Tensor
    key_tokens: slice | torch.Tensor


def _tokens_of(starts: torch.Tensor, segments: torch.Tensor, length: int, device) -> slice | torch.Tensor:
    """The tokens of `segments` (host ids, ascending), each `length` long: a range when they are consecutive."""
    first = int(starts[segments[0]])
    if int(segments[-1] - segments[0]) + 1 == len(segments):  # consecutive segments: consecutive tokens
        return slice(first, first + len(segments) * length)
    tokens = (starts[segments, None] + torch.arange(length)).flatten()  # [n * length], host
    return host_to_device(device, tokens)


def equal_length_groups(query_segments: Segments, key_segments: Segments) -> list[EqualLengthGroup]:
    """The segment pairs grouped by (query length, key length), built on the host once per forward."""
    cached = query_segments.equal_length_groups.get(id(key_segments))
    if cached is not None:
        return cached
    query_starts = torch.cumsum(query_segments.lengths, 0) - query_segments.lengths  # [S], host
    key_starts = torch.cumsum(key_segments.lengths, 0) - key_segments.lengths
    length_pairs = torch.stack([query_segments.lengths, key_segments.lengths], 1)  # [S, 2]
    pairs, group_of_segment = torch.unique(length_pairs, dim=0, return_inverse=True)
    groups = []
    for index, (query_length, key_length) in enumerate(pairs.tolist()):
        if query_length == 0:  # nothing asks (zero-length padding segments, cuda_graphs.py)
            continue
        segments = (group_of_segment == index).nonzero().squeeze(1)  # [n], ascending
        groups.append(
            EqualLengthGroup(
                len(segments), query_length, key_length,
                _tokens_of(query_starts, segments, query_length, query_segments.device),
                _tokens_of(key_starts, segments, key_length, key_segments.device),
            )
        )  # fmt: skip
    query_segments.equal_length_groups[id(key_segments)] = groups
    return groups


def _take(x: torch.Tensor, tokens: slice | torch.Tensor, num_segments: int) -> torch.Tensor:
    """[T, H, D] packed -> [n, H, L, D]: the group's segments as a batch."""
    rows = x[tokens] if isinstance(tokens, slice) else x.index_select(0, tokens)
    return rows.view(num_segments, -1, *x.shape[1:]).transpose(1, 2)


# Pure PyTorch: one unmasked attention call per group of equal-length segments, no padding, the way the reference
# runs each image alone (the same function, one call per distinct length instead of per image). Eager also under
# torch.compile: the calls depend on the batch's set of lengths, which a compiled graph would specialise on.
@torch.compiler.disable
def _grouped_attention(query, key, value, query_segments, key_segments, scale, backend) -> torch.Tensor:
    groups = equal_length_groups(query_segments, key_segments)
    # Each group's result is written straight into its rows: no concatenation and reordering passes.
    packed_out = query.new_empty(query.shape[0], query.shape[1], value.shape[2])  # [Tq, H, D]
    for group in groups:
        q = _take(query, group.query_tokens, group.num_segments)  # [n, H, Lq, D]
        k, v = _take(key, group.key_tokens, group.num_segments), _take(value, group.key_tokens, group.num_segments)
        if group.key_length == 0:  # a query with nothing to attend to (padding, cuda_graphs.py): zeros, as FA2
            out = q.new_zeros(*q.shape[:-1], v.shape[-1])
        elif backend == "sdpa":
            out = F.scaled_dot_product_attention(q, k, v, scale=scale)
        elif backend == "eager":
            scores = torch.matmul(q, k.transpose(-1, -2)) * scale
            out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
        else:
            raise ValueError(f"Unknown attention backend {backend!r}")
        out = out.transpose(1, 2)  # [n, Lq, H, D]
        if isinstance(group.query_tokens, slice):
            if len(groups) == 1 and group.query_tokens == slice(0, query.shape[0]):
                return out.reshape(packed_out.shape)  # one group in token order: its result is the output
            packed_out[group.query_tokens].view(out.shape).copy_(out)
        else:
            packed_out.index_copy_(0, group.query_tokens, out.flatten(0, 1))
    return packed_out


def _records_no_autograd(*tensors: torch.Tensor) -> bool:
    """Inference outside torch.compile (which traces `varlen_attn`'s custom op, not the bare kernel)."""
    if torch.compiler.is_compiling():
        return False
    return not torch.is_grad_enabled() or not any(t.requires_grad for t in tensors)


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
        if _records_no_autograd(query, key, value):
            # The kernel `varlen_attn` runs, called as it calls it: its custom-op wrapper costs the host about 150 us
            # per call (a so400m forward makes 27; the encode job's forwards are bound by the host: RESULTS.md), and
            # it launches a zeros kernel for an RNG state that inference never reads. Same kernel, same bits.
            return torch.ops.aten._flash_attention_forward(
                query, key, value,
                query_segments.cu_seqlens, key_segments.cu_seqlens,
                query_segments.max_seqlen, key_segments.max_seqlen,
                0.0, False, False, scale=scale,  # dropout_p, is_causal, return_debug_mask
            )[0]  # fmt: skip
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

    return _grouped_attention(query, key, value, query_segments, key_segments, scale, backend)


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
