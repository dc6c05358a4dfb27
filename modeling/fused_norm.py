"""Residual add + norm in one pass (inference on CUDA), and the norms of both towers built on it."""

from __future__ import annotations

import contextlib
import threading

import torch
from torch import nn

from .plain_modules import is_plain

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


# A lower threshold for one thread at a time: cuda_graphs.py captures graphs (which launch nothing from the host)
# with its own. Per thread, so that a capture in one thread neither changes another thread's eager forwards nor,
# when two captures overlap, leaves the module's default changed behind them.
_threshold_of_this_thread = threading.local()


@contextlib.contextmanager
def fused_add_norm_from(min_tokens: int):
    """Within, in this thread: the fused pass runs from `min_tokens` tokens."""
    saved = getattr(_threshold_of_this_thread, "min_tokens", None)
    _threshold_of_this_thread.min_tokens = min_tokens
    try:
        yield
    finally:
        _threshold_of_this_thread.min_tokens = saved


def fused_add_norm_min_tokens() -> int:
    """The threshold in this thread: `fused_add_norm_from`'s, else FUSED_ADD_NORM_MIN_TOKENS."""
    min_tokens = getattr(_threshold_of_this_thread, "min_tokens", None)
    return FUSED_ADD_NORM_MIN_TOKENS if min_tokens is None else min_tokens


def fused_add_norm_applies(hidden_states: torch.Tensor, weight: torch.Tensor) -> bool:
    """The Triton pass runs for inference on CUDA (no autograd formula) on enough tokens to keep the GPU busy;
    torch.compile fuses the plain ops itself (checked before the threshold: compiled code never reads it)."""
    return (
        triton is not None
        and hidden_states.is_cuda
        and not torch.is_grad_enabled()
        and not torch.compiler.is_compiling()
        and hidden_states.dim() == 2
        and hidden_states.dtype == weight.dtype
        and hidden_states.shape[0] >= fused_add_norm_min_tokens()
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


def add_and_norm(norm: nn.Module, hidden_states: torch.Tensor, delta: torch.Tensor):  # -> (sum, normed), [N, D] each
    """(hidden_states + delta, norm(hidden_states + delta)): `norm`'s fused pass where it is one of ours with no
    hooks; otherwise the sum, then `norm` called as any module (a wrapped or replaced norm: plain_modules.py)."""
    if isinstance(norm, ResidualNorm) and is_plain(norm, type(norm)):
        return norm(hidden_states, residual_delta=delta)
    hidden_states = hidden_states + delta
    return hidden_states, norm(hidden_states)


class PackedLayerNorm(ResidualNorm, nn.LayerNorm):
    """`nn.LayerNorm` (same keys and math) with the fused residual add of `ResidualNorm`."""

    rms = False
    normalize = nn.LayerNorm.forward
