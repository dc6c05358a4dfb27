"""Resized position tables: the closed-form antialiased weights, the same on every device (DESIGN §3).

Siglip2's reference (transformers >= 5.24) computes the antialiased-bilinear weights in closed form; we build the
same maps, independently of `F.interpolate`'s kernels, so a checkpoint gives the same embeddings on CPU and GPU.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import (
    FP32_REL_TOL,
    antialiased_bilinear_weights_by_definition,
    definition_resize_positional_embeddings,
    rel_err,
)

from packed_vit.modeling.packing import PackedGrid
from packed_vit.modeling.position_embeddings import (
    _resize_map,
    antialiased_resize_weights,
    resized_position_embedding,
)

# (table side, output side): shrinking, growing, the same size, down to 1
AXES = [(16, 1), (16, 3), (16, 7), (16, 16), (16, 19), (16, 40), (8, 5), (8, 1), (4, 13), (1, 1), (1, 6)]
# Output grids with both sides >= 2 (where torch's CPU antialias kernel is right) in both directions
GRIDS_2D = [(2, 2), (5, 7), (16, 16), (19, 3), (3, 29), (33, 24), (8, 2)]


@pytest.mark.parametrize("side,out", AXES)
def test_bilinear_weights_equal_the_definition(side, out):
    ours = antialiased_resize_weights(side, out, "bilinear")
    assert torch.allclose(ours, antialiased_bilinear_weights_by_definition(side, out), rtol=0, atol=1e-12)
    assert torch.allclose(ours.sum(1), torch.ones(out, dtype=torch.float64))


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("height,width", GRIDS_2D)
def test_map_equals_torch_interpolate_where_its_cpu_kernel_is_right(mode, height, width):
    side = 16
    table = torch.randn(side * side, 24)
    expected = F.interpolate(
        table.T.reshape(1, 24, side, side), size=(height, width), mode=mode, align_corners=False, antialias=True
    )[0].flatten(1).T
    got = _resize_map(side, height, width, mode, torch.device("cpu")) @ table
    assert rel_err(got, expected) <= FP32_REL_TOL


@pytest.mark.parametrize("height", [1, 5, 19, 40])
def test_width_one_frames_take_each_rows_own_weights(height):
    # torch's CPU antialias kernel gives every row of a width-1 output the weights of row 0; the definition does not.
    side = 16
    table = torch.randn(side, side, 8)
    expected = definition_resize_positional_embeddings(table, torch.tensor([[height, 1]]), height)[0]
    got = _resize_map(side, height, 1, "bilinear", torch.device("cpu")) @ table.reshape(side * side, 8)
    assert rel_err(got, expected) <= FP32_REL_TOL
    if height > 1:
        assert rel_err(got[1:], got[:1].expand(height - 1, 8)) > 1e-2  # the rows really differ


def test_packed_batch_takes_each_frames_own_map():
    table = torch.randn(64, 16, requires_grad=True)
    grid_thw = torch.tensor([[1, 3, 1], [2, 4, 5], [1, 3, 1], [1, 1, 9]])
    packed = PackedGrid.from_grid_thw(grid_thw, torch.device("cpu"))
    positions = resized_position_embedding(table, packed, "bilinear")
    start = 0
    for t, h, w in grid_thw.tolist():
        expected = _resize_map(8, h, w, "bilinear", torch.device("cpu")) @ table
        for _ in range(t):
            assert rel_err(positions[start : start + h * w], expected) <= FP32_REL_TOL
            start += h * w
    assert start == positions.shape[0]
    positions.sum().backward()  # differentiable in the table
    assert table.grad is not None and torch.isfinite(table.grad).all()


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match="Unknown position resize mode 'nearest'"):
        antialiased_resize_weights(16, 4, "nearest")
