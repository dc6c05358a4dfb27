"""Reference side of the tests: transformers' own towers, run frame by frame, on fresh random weights."""

import contextlib
from unittest import mock

import torch
import transformers
from packaging.version import Version
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Siglip2VisionConfig, Siglip2VisionModel
from transformers.models.siglip2.modeling_siglip2 import Siglip2VisionEmbeddings

from packed_vit import Aimv2PackingVisionConfig, Siglip2PackingVisionConfig
from packed_vit.modeling.conversion_siglip2 import convert_siglip2_state_dict
from packed_vit.demo import patches_to_image  # noqa: F401  (tests import it from here)
from packed_vit.hub_export import rel_err
from packed_vit.original_checkpoints import perturb_

FP32_REL_TOL = 1e-5  # DESIGN §7, CPU float32, per image

SMALL_SIGLIP2 = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=4)
SMALL_AIMV2 = dict(
    hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=4, image_size=32
)


def siglip2_pair(use_head=True, **overrides):
    """(reference Siglip2VisionModel, our model) with the same perturbed random weights, fp32, eval."""
    from packed_vit import Siglip2PackingVisionModel

    fields = {**SMALL_SIGLIP2, "vision_use_head": use_head, **overrides}
    ref = perturb_(Siglip2VisionModel(Siglip2VisionConfig(**fields, attn_implementation="eager"))).eval()
    ours = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(**fields)).eval()
    # transformers 4.57 keeps the tower under `vision_model.`; 5.x does not: the conversion takes either.
    ours.load_state_dict(convert_siglip2_state_dict(ref.state_dict()), strict=True)
    return ref, ours


def aimv2_pair(use_head=True, is_native=True, **overrides):
    from packed_vit import Aimv2PackingVisionModel

    fields = {**SMALL_AIMV2, "use_head": use_head, "is_native": is_native, **overrides}
    ref = perturb_(Aimv2VisionModel(Aimv2VisionConfig(**fields, attn_implementation="eager"))).eval()
    ours = Aimv2PackingVisionModel(Aimv2PackingVisionConfig(**fields)).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def random_packed(grids, patch_dim, generator=None, dtype=torch.float32):
    """Random patches for `grids` [(t, h, w), ...] -> (hidden_states [N, patch_dim], grid_thw [B, 3])."""
    grid_thw = torch.tensor(grids, dtype=torch.int64).reshape(-1, 3)
    total = int(grid_thw.prod(1).sum())
    return torch.randn(total, patch_dim, generator=generator, dtype=dtype), grid_thw


def frames(hidden_states, grid_thw):
    """Yields (patches [h*w, patch_dim], h, w) for every frame of a packed batch, in order."""
    start = 0
    for t, h, w in grid_thw.tolist():
        for _ in range(t):
            yield hidden_states[start : start + h * w], h, w
            start += h * w


# transformers <= 5.23 resized Siglip2's position table with one `F.interpolate(bilinear, antialias=True)` per image,
# and torch's CPU antialias kernel gives every row of a width-1 output the weights of row 0 (its CUDA kernel does
# not). transformers >= 5.24 computes the weights in closed form, as we do. On the older releases, a width-1 frame's
# CPU reference positions come from `definition_resize_positional_embeddings` instead; everything else in the frame's
# forward (and backward) is still transformers' own.
REFERENCE_RESIZE_IS_EXACT = Version(transformers.__version__).release >= (5, 24)


def antialiased_bilinear_weights_by_definition(in_size: int, out_size: int) -> torch.Tensor:
    """[out, in] float64, written out from the definition of an antialiased bilinear resize (align_corners=False).

    Output pixel i spans input coordinates [i * s, (i + 1) * s], s = in / out, centred at c = (i + 0.5) * s. The
    triangle filter, widened by the scale factor when shrinking (width max(s, 1)), weighs input pixel j by its
    centre's distance to c: max(0, 1 - |j + 0.5 - c| / max(s, 1)). The weights of an output pixel sum to 1.
    """
    scale = in_size / out_size
    width = max(scale, 1.0)
    weights = []
    for i in range(out_size):
        center = (i + 0.5) * scale
        row = [max(0.0, 1.0 - abs(j + 0.5 - center) / width) for j in range(in_size)]
        weights.append([w / sum(row) for w in row])
    return torch.tensor(weights, dtype=torch.float64)


def definition_resize_positional_embeddings(positional_embeddings, spatial_shapes, max_length):
    """Drop-in for `Siglip2VisionEmbeddings.resize_positional_embeddings` (one image, no padding) by the definition."""
    (height, width), = spatial_shapes.tolist()
    assert height * width == max_length
    side, _, dim = positional_embeddings.shape
    rows = antialiased_bilinear_weights_by_definition(side, height)  # [h, side]
    cols = antialiased_bilinear_weights_by_definition(side, width)  # [w, side]
    table = positional_embeddings.float()
    # resized[i, j] = sum_ab rows[i, a] * cols[j, b] * table[a, b]
    resized = torch.einsum("ia,jb,abd->ijd", rows.float(), cols.float(), table)
    return resized.reshape(1, height * width, dim).to(positional_embeddings.dtype)


def reference_positions_for(height: int, width: int, device: torch.device):
    """Context for one reference frame: transformers' own resize, except CPU width-1 frames on transformers <= 5.23."""
    if REFERENCE_RESIZE_IS_EXACT or width != 1 or device.type != "cpu":
        return contextlib.nullcontext()
    return mock.patch.object(
        Siglip2VisionEmbeddings, "resize_positional_embeddings", staticmethod(definition_resize_positional_embeddings)
    )


def siglip2_reference(ref, hidden_states, grid_thw):
    """Runs transformers' Siglip2VisionModel on each frame alone: lists of last_hidden_state and pooler_output."""
    last, pooled = [], []
    for patches, h, w in frames(hidden_states, grid_thw):
        with reference_positions_for(h, w, patches.device):
            out = ref(
                pixel_values=patches[None],
                pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long, device=patches.device),
                spatial_shapes=torch.tensor([[h, w]], device=patches.device),
            )
        last.append(out.last_hidden_state[0])
        pooled.append(None if out.pooler_output is None else out.pooler_output[0])
    return last, pooled


def aimv2_reference(ref, hidden_states, grid_thw):
    last, pooled = [], []
    p = ref.config.patch_size
    for patches, h, w in frames(hidden_states, grid_thw):
        out = ref(pixel_values=patches_to_image(patches, h, w, p, ref.config.num_channels))
        last.append(out.last_hidden_state[0])
        pooled.append(None if out.pooler_output is None else out.pooler_output[0])
    return last, pooled


def split_frames(tensor, grid_thw):
    """Packed [N, D] -> list of per-frame [h*w, D]."""
    return list(tensor.split(grid_thw[:, 1:].prod(1).repeat_interleave(grid_thw[:, 0]).tolist()))


def assert_matches_reference(out, ref_last, ref_pooled, grid_thw, has_head: bool, tol: float = FP32_REL_TOL):
    """Per frame: our last_hidden_state and pooler_output against the reference's, rel err <= tol."""
    for i, (a, b) in enumerate(zip(split_frames(out.last_hidden_state, grid_thw), ref_last, strict=True)):
        assert rel_err(a, b) <= tol, f"frame {i} last_hidden_state rel err {rel_err(a, b):.2e}"
    if not has_head:
        assert out.pooler_output is None
        return
    assert out.pooler_output.shape[0] == len(ref_pooled)
    for i, (a, b) in enumerate(zip(out.pooler_output, ref_pooled, strict=True)):
        assert rel_err(a, b) <= tol, f"frame {i} pooler_output rel err {rel_err(a, b):.2e}"


def check_parity(ref, ours, grids, backend="sdpa", tol: float = FP32_REL_TOL):
    """Fresh random patches for `grids`, our packed forward vs the reference frame by frame."""
    ours.config._attn_implementation = backend
    patch_dim = ours.config.num_channels * ours.config.patch_size**2
    hidden_states, grid_thw = random_packed(grids, patch_dim)
    run_reference = siglip2_reference if isinstance(ref, Siglip2VisionModel) else aimv2_reference
    with torch.no_grad():
        out = ours(hidden_states, grid_thw)
        ref_last, ref_pooled = run_reference(ref, hidden_states, grid_thw)
    assert_matches_reference(out, ref_last, ref_pooled, grid_thw, ours.config.use_head, tol)


def is_key_bias(name: str) -> bool:
    # A key bias adds the same score q.b to every key of a query, which softmax cancels: its exact gradient is 0.
    return name.endswith("k_proj.bias")


def assert_same_parameter_gradients(ours: dict, ref: dict, tol: float = FP32_REL_TOL):
    assert ours.keys() == ref.keys()
    for name, grad in ours.items():
        assert grad is not None, f"{name} got no gradient"
        if is_key_bias(name):
            # Both sides hold rounding noise; ours must be noise at the scale of the layer's key-weight gradient.
            scale = ref[name.replace("bias", "weight")].norm()
            assert grad.norm() <= tol * scale, f"{name}: gradient {grad.norm():.2e} is not 0 (scale {scale:.2e})"
        else:
            assert rel_err(grad, ref[name]) <= tol, f"{name} gradient rel err {rel_err(grad, ref[name]):.2e}"
