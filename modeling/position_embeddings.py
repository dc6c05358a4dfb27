"""Position embeddings of packed tokens: learned tables resized per image without a per-image call, and 2-D sin-cos.

A learned `S x S` table resized to an `h x w` grid (Siglip2's NaFlex positions; AIMv2's learned tables off their
trained grid) is a fixed linear map of the table that depends only on (h, w): `M(h, w) [h*w, S*S]`. Each shape's
map is built once, cached, and all tokens of a batch take their rows of `maps @ table` in one matmul + gather,
exactly and differentiably in the table.

The maps are the weights of `F.interpolate(..., align_corners=False, antialias=True)` written in closed form,
separably per axis, as transformers >= 5.24 computes Siglip2's, rather than taken from `F.interpolate`'s kernels:
those differ between devices (torch's CPU antialias kernel gives every row of a width-1 output the weights of row 0;
its CUDA kernel does not), and a checkpoint must give the same embeddings on every device.
"""

from __future__ import annotations

import functools
import math

import torch

from .packing import PackedGrid, host_to_device


def _triangle(x: torch.Tensor) -> torch.Tensor:
    """The bilinear filter."""
    return (1 - x.abs()).clamp(min=0)


def _keys_cubic(x: torch.Tensor, a: float = -0.5) -> torch.Tensor:
    """The bicubic filter of torch's (and PIL's) antialiased resize: Keys' cubic convolution kernel with a = -0.5."""
    x = x.abs()
    near = ((a + 2) * x - (a + 3)) * x * x + 1  # |x| < 1
    far = (((x - 5) * x + 8) * x - 4) * a  # 1 <= |x| < 2
    return torch.where(x < 1, near, torch.where(x < 2, far, torch.zeros_like(x)))


# mode -> (filter, its radius at scale 1)
RESIZE_FILTERS = {"bilinear": (_triangle, 1.0), "bicubic": (_keys_cubic, 2.0)}


def antialiased_resize_weights(in_size: int, out_size: int, mode: str) -> torch.Tensor:
    """[out_size, in_size] float64: `F.interpolate(mode, align_corners=False, antialias=True)` along one axis.

    Output pixel i covers input coordinates [i*s, (i+1)*s] with s = in/out, centred at c = (i + 0.5) * s; input
    pixel j (centred at j + 0.5) gets filter((j + 0.5 - c) / max(s, 1)): when shrinking, the filter is widened by
    the scale factor, so every input pixel under the output pixel contributes. Weights are normalized to sum to 1
    (taps past the border are dropped, as torch's kernel does).
    """
    if mode not in RESIZE_FILTERS:
        raise ValueError(f"Unknown position resize mode {mode!r}; choose one of {', '.join(RESIZE_FILTERS)}")
    resize_filter, _ = RESIZE_FILTERS[mode]
    scale = in_size / out_size
    centers = (torch.arange(out_size, dtype=torch.float64) + 0.5) * scale  # [out]
    offsets = torch.arange(in_size, dtype=torch.float64) + 0.5 - centers[:, None]  # [out, in]
    weights = resize_filter(offsets / max(scale, 1.0))
    return weights / weights.sum(1, keepdim=True)


@functools.lru_cache(maxsize=512)
def _resize_map(side: int, height: int, width: int, mode: str, device: torch.device) -> torch.Tensor:
    """[h*w, side*side] fp32 map M: M @ table is the side x side table resized to h x w. Cached per shape and device.

    Separable: the weight of table cell (a, b) for output (i, j) is rows[i, a] * cols[j, b], a Kronecker product.
    Built in float64 on the host, so it is the same map on every device.
    """
    rows = antialiased_resize_weights(side, height, mode)  # [h, side]
    cols = antialiased_resize_weights(side, width, mode)  # [w, side]
    return host_to_device(device, torch.kron(rows, cols).float())  # queued: no host sync


def resized_position_embedding(
    table: torch.Tensor,  # [S*S, D] learned table of an S x S grid
    packed: PackedGrid,
    mode: str,
) -> torch.Tensor:  # [N, D] in table's dtype
    """The table resized to every frame's (h, w) (antialiased `mode`, align_corners=False), without a per-image call.

    Each distinct (h, w) of the batch gets its cached map, the maps of all distinct shapes are applied in one
    matmul, and every token gathers its row (no gather where no shape repeats: the rows are already in order).
    """
    # Compiled code always gathers: one graph whichever shapes repeat.
    gather = torch.compiler.is_compiling()
    maps, rows = _position_maps_and_rows(math.isqrt(table.shape[0]), packed, mode, table.device, gather)
    # fp32 like the reference (autocast off: transformers resizes in fp32 outside autocast's reach too).
    with torch.autocast(table.device.type, enabled=False):
        resized = maps @ table.float()  # [sum of distinct h*w, D]
    return (resized if rows is None else resized[rows]).to(table.dtype)


@torch.compiler.disable  # host-side, from grid_thw's values: eager under torch.compile (see pack_inputs)
def _position_maps_and_rows(side: int, packed: PackedGrid, mode: str, device: torch.device, gather: bool):
    """(maps [sum of distinct h*w, side*side] of the batch's distinct shapes in order of appearance, rows [N]: each
    token's row in them, or None where every frame has a shape of its own and not `gather`: then the maps' rows are
    the tokens')."""
    frame_shapes = list(zip(packed.frame_heights.tolist(), packed.frame_widths.tolist()))
    shapes = list(dict.fromkeys(frame_shapes))  # distinct, in order of appearance
    if not shapes:  # fp32 like _resize_map's
        no_maps = torch.zeros(0, side * side, dtype=torch.float32, device=device)
        return no_maps, (torch.zeros(0, dtype=torch.int64, device=device) if gather else None)
    maps = [_resize_map(side, h, w, mode, device) for h, w in shapes]
    maps = maps[0] if len(maps) == 1 else torch.cat(maps)
    if len(shapes) == len(frame_shapes) and not gather:
        return maps, None
    first_row, first_row_of_shape = 0, {}
    for h, w in shapes:
        first_row_of_shape[h, w] = first_row
        first_row += h * w
    first_row_of_frame = torch.tensor([first_row_of_shape[shape] for shape in frame_shapes])  # [F], host
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
    per_coordinate = host_to_device(device, torch.cat([angles.sin(), angles.cos()], dim=1).to(dtype))  # [max_side, D/2]
    return torch.cat([per_coordinate[packed.token_cols], per_coordinate[packed.token_rows]], dim=1)  # [N, D]
