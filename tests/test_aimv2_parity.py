"""Aimv2PackingVisionModel == transformers' Aimv2VisionModel run image by image (DESIGN §7, CPU fp32)."""

import pytest
import torch
import torch.nn.functional as F
from packed_vit.modeling.packing import pack_inputs
from reference import FP32_REL_TOL, aimv2_pair, check_parity, random_packed, rel_err

NATIVE_GRIDS = [(1, 1, 1), (1, 1, 17), (1, 13, 1), (1, 5, 7), (1, 12, 9), (2, 4, 6), (1, 2, 30)]


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("use_head", [True, False])
def test_native_many_grids(backend, use_head):
    check_parity(*aimv2_pair(use_head=use_head, is_native=True), NATIVE_GRIDS, backend)


@pytest.mark.parametrize("grid", NATIVE_GRIDS, ids=lambda g: "x".join(map(str, g)))
def test_native_single_image(grid):
    check_parity(*aimv2_pair(is_native=True), [grid])


@pytest.mark.parametrize("use_head", [True, False])
def test_learned_positions_at_trained_grid(use_head):
    # image_size 32, patch 4 -> the table is 8x8; the reference only runs at that grid.
    ref, ours = aimv2_pair(use_head=use_head, is_native=False)
    check_parity(ref, ours, [(1, 8, 8), (3, 8, 8), (1, 8, 8)])


def test_bias_flags():
    check_parity(*aimv2_pair(qkv_bias=True, mlp_bias=True), NATIVE_GRIDS[:4])


def test_sincos_layout_is_width_first():
    # [sin_w | cos_w | sin_h | cos_h]: in a 1-row image only the first half varies along the row.
    from packed_vit.modeling.packing import PackedGrid
    from packed_vit.modeling.position_embeddings import sincos_position_embedding

    packed = PackedGrid.from_grid_thw(torch.tensor([[1, 1, 5]]), torch.device("cpu"))
    pos = sincos_position_embedding(packed, 16, "cpu", torch.float64)
    assert not torch.allclose(pos[0, :8], pos[1, :8])
    torch.testing.assert_close(pos[:, 8:], pos[:1, 8:].expand(5, 8))
    torch.testing.assert_close(pos[0], torch.tensor([0.0] * 4 + [1.0] * 4 + [0.0] * 4 + [1.0] * 4, dtype=torch.float64))


def test_learned_positions_resized_off_grid_like_timm():
    # Other grids: the 8x8 table resized with antialiased bicubic interpolation, like timm's resample_abs_pos_embed.
    _, ours = aimv2_pair(is_native=False)
    table = ours.embeddings.position_embedding.weight  # [64, D]
    hidden_states, grid_thw = random_packed([(1, 5, 11), (1, 8, 8), (1, 12, 3)], 48)
    with torch.no_grad():
        embeddings = ours.embeddings(hidden_states, pack_inputs(hidden_states, grid_thw, 48))
        weight = ours.embeddings.patch_embed.weight.permute(0, 2, 3, 1).flatten(1)
        no_positions = ours.embeddings.rms_norm(F.linear(hidden_states, weight, ours.embeddings.patch_embed.bias))
    start = 0
    for _, h, w in grid_thw.tolist():
        expected = F.interpolate(
            table.detach().T.reshape(1, -1, 8, 8), size=(h, w), mode="bicubic", align_corners=False, antialias=True
        )[0].flatten(1).T
        got = embeddings[start : start + h * w] - no_positions[start : start + h * w]
        assert rel_err(got, expected) <= FP32_REL_TOL
        start += h * w


def test_learned_positions_refuse_other_grids_when_resizing_is_off():
    _, ours = aimv2_pair(is_native=False, position_resize_mode=None)
    hidden_states, grid_thw = random_packed([(1, 8, 8), (1, 5, 11)], 48)
    with pytest.raises(ValueError, match=r"trained 8x8 grid.*\[\[5, 11\]\]"):
        ours(hidden_states, grid_thw)
    ok_states, ok_grid = random_packed([(2, 8, 8)], 48)
    assert ours(ok_states, ok_grid).last_hidden_state.shape == (128, 64)
