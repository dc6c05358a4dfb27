"""Siglip2PackingVisionModel == transformers' Siglip2VisionModel run frame by frame (DESIGN §7, CPU fp32)."""

import pytest
import torch
from reference import check_parity, random_packed, siglip2_pair

# 1x1, elongated 1xN and Nx1, smaller / equal / larger than the 16x16 table, video (t > 1).
GRIDS = [(1, 1, 1), (1, 1, 23), (1, 19, 1), (1, 5, 7), (1, 16, 16), (1, 24, 20), (3, 4, 6), (1, 2, 40)]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_many_images_every_grid_shape(backend):
    check_parity(*siglip2_pair(), GRIDS, backend)


@pytest.mark.parametrize("grid", GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_single_image(grid):
    check_parity(*siglip2_pair(), [grid])


def test_without_head():
    check_parity(*siglip2_pair(use_head=False), GRIDS[:4])


def test_non_square_table_sizes_and_patch_size():
    # A 64-entry (8x8) table and 2x2x3 patches: nothing hard-wired to 16x16 / p=16.
    check_parity(*siglip2_pair(num_patches=64, patch_size=2), [(1, 3, 11), (1, 12, 9), (2, 8, 8)])


def test_random_mixed_batch():
    grids = [(int(torch.randint(1, 3, ())), *torch.randint(1, 30, (2,)).tolist()) for _ in range(12)]
    check_parity(*siglip2_pair(), grids)


def test_hidden_states_per_layer():
    ref, ours = siglip2_pair()
    hidden_states, grid_thw = random_packed([(1, 3, 4), (1, 2, 2)], 48)
    with torch.no_grad():
        out = ours(hidden_states, grid_thw, output_hidden_states=True)
    assert len(out.hidden_states) == ours.config.num_hidden_layers + 1
    assert all(h.shape == (16, 64) for h in out.hidden_states)
    # the last entry is the encoder output before post_layernorm
    torch.testing.assert_close(ours.post_layernorm(out.hidden_states[-1]), out.last_hidden_state)
