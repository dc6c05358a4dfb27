"""Packing metadata: what the layers of both towers know about the images of a packed batch.

A packed batch is `hidden_states [N, patch_dim]` (the patches of all images, each image row-major, frame-major
for t > 1) plus `grid_thw [B, 3]` in patches. Everything the layers need to know about the images is derived
ONCE per forward from `grid_thw` (`PackedGrid`: sizes on the host, per-token indices built on the device without
a sync) and handed to every layer: the attention kernels see only segments (`cu_seqlens`, `max_seqlen`,
attention.py), the position embeddings only each token's (row, col) (position_embeddings.py).

The shared modules of the packed towers, one concern each: packing.py (this), attention.py (varlen attention
dispatch), position_embeddings.py (position maps), fused_norm.py (residual add + norm), packed_model.py (encoder
and model base). Each tower file imports every one it uses directly (flat Hub remote code needs that).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass, field

import torch

def host_to_device(device: torch.device, tensor: torch.Tensor) -> torch.Tensor:
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
    # A larger `max_seqlen` than the longest segment, for metadata that must fit a fixed bound (cuda_graphs.py)
    max_seqlen_bound: int = 0
    cu_seqlens: torch.Tensor = field(init=False)  # [S + 1] int32, on `device`
    max_seqlen: int = field(init=False)  # Python int, >= every length: kernels size their launch grid with it
    num_tokens: int = field(init=False)
    # attention.py's equal-length groups of this (query) segmentation against a key segmentation, built once per
    # forward and shared by every layer; keyed by id() of the key Segments
    equal_length_groups: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self):
        # In Python ints: each small torch op on the host costs more than these loops over a batch's frames.
        lengths = self.lengths.tolist()
        cu_seqlens = [0, *itertools.accumulate(lengths)]
        self.cu_seqlens = host_to_device(self.device, torch.tensor(cu_seqlens, dtype=torch.int32))
        self.max_seqlen = max(max(lengths, default=0), self.max_seqlen_bound)
        self.num_tokens = cu_seqlens[-1]

    @property
    def num_segments(self) -> int:
        return len(self.lengths)

    @functools.cached_property
    def token_segment(self) -> torch.Tensor:
        """[T] int64 on device: the segment of each token."""
        segments = torch.arange(self.num_segments, device=self.device)
        return segments.repeat_interleave(host_to_device(self.device, self.lengths), output_size=self.num_tokens)

    @functools.cached_property
    def index_in_segment(self) -> torch.Tensor:
        """[T] int64 on device: each token's position inside its segment."""
        starts = self.cu_seqlens[:-1].long()
        return torch.arange(self.num_tokens, device=self.device) - starts[self.token_segment]


@dataclass
class PackedGrid:
    """Per-forward packing metadata derived from `grid_thw` once and shared by every layer."""

    grid_thw: torch.Tensor  # [B, 3] int64, host
    frame_heights: torch.Tensor  # [F] int64, host
    frame_widths: torch.Tensor  # [F] int64, host
    frames: Segments  # one attention segment per frame (Qwen2-VL convention)
    frame_queries: Segments  # one query per frame: the attention-pooling heads

    @classmethod
    @torch.compiler.disable  # host-side, from grid_thw's values: eager under torch.compile (see pack_inputs)
    def from_grid_thw(cls, grid_thw: torch.Tensor, device: torch.device) -> "PackedGrid":
        t, h, w = grid_thw.unbind(1)
        frame_heights, frame_widths = h, w  # [F]: one frame per image, unless videos repeat them
        if len(t) and int(t.max()) > 1:
            frame_heights, frame_widths = h.repeat_interleave(t), w.repeat_interleave(t)
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
        return host_to_device(self.device, per_frame)[self.frames.token_segment]

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
    return PackedGrid.from_grid_thw(check_packed_batch(hidden_states, grid_thw, patch_dim), hidden_states.device)


@torch.compiler.disable
def check_packed_batch(hidden_states: torch.Tensor, grid_thw, patch_dim: int) -> torch.Tensor:
    """Checks a packed batch (DESIGN §9) -> grid_thw [B, 3] int64 on the host (the one device->host copy)."""
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
    return grid_thw
