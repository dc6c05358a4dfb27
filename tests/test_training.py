"""Training: gradients equal transformers' (DESIGN §7), with gradient checkpointing and under bf16 autocast.

The reference is transformers' tower run frame by frame; both sides take the same scalar loss of their outputs,
`sum(last_hidden_state * W) + sum(pooler_output * V)` with fixed random W, V, so the gradients of the inputs and of
every parameter must agree (the reference's gradient is the sum of its per-frame runs').
"""

from unittest import mock

import pytest
import torch
from reference import (
    FP32_REL_TOL,
    aimv2_pair,
    assert_same_parameter_gradients,
    aimv2_reference,
    is_key_bias,
    random_packed,
    rel_err,
    siglip2_pair,
    siglip2_reference,
    split_frames,
)

# 1x1, elongated 1xN and Nx1, smaller / larger than Siglip2's 16x16 table, video (t > 1). On transformers <= 5.23
# the reference's Nx1 positions come from the definition of the resize (reference.py says why), and its
# gradient flows through them as through transformers' own.
GRIDS = [(1, 1, 1), (1, 1, 13), (1, 11, 1), (1, 5, 7), (2, 3, 4), (1, 18, 17), (1, 2, 30), (2, 20, 1)]
TOWERS = {"siglip2": (siglip2_pair, siglip2_reference), "aimv2": (aimv2_pair, aimv2_reference)}

GC_WARNING = "ignore:.*gradient_checkpointing_enable.*:FutureWarning"  # transformers 5 renames it; 4.57 has only it


def loss_weights(hidden_states, grid_thw, hidden_size):
    """The fixed random W [N, D] and V [frames, D] of the scalar loss."""
    num_frames = int(grid_thw[:, 0].sum())
    return torch.randn(hidden_states.shape[0], hidden_size), torch.randn(num_frames, hidden_size)


def scalar_loss(last_hidden_state, pooler_output, weights):
    token_weights, frame_weights = weights
    loss = (last_hidden_state * token_weights).sum()
    return loss if pooler_output is None else loss + (pooler_output * frame_weights).sum()


def our_gradients(model, hidden_states, grid_thw, weights):
    """(input gradient [N, patch_dim], {name: parameter gradient}) of the scalar loss."""
    model.zero_grad(set_to_none=True)
    inputs = hidden_states.clone().requires_grad_()
    out = model(inputs, grid_thw)
    scalar_loss(out.last_hidden_state, out.pooler_output, weights).backward()
    return inputs.grad, {name: p.grad for name, p in model.named_parameters()}


def reference_gradients(ref, run_reference, hidden_states, grid_thw, weights):
    """The same, from transformers' tower run on each frame alone (gradients add up over the frames)."""
    ref.zero_grad(set_to_none=True)
    inputs = hidden_states.clone().requires_grad_()
    last, pooled = run_reference(ref, inputs, grid_thw)
    pooled = None if pooled[0] is None else torch.stack(pooled)
    scalar_loss(torch.cat(last), pooled, weights).backward()
    # transformers 4.57 keeps Siglip2's tower under `vision_model.`; our names are 5.x's.
    return inputs.grad, {name.removeprefix("vision_model."): p.grad for name, p in ref.named_parameters()}


def first_layer_parts(model):
    """(attention, feed-forward) modules of the first encoder layer, whatever the tower calls them."""
    layer = model.encoder.layers[0]
    return getattr(layer, "self_attn", None) or layer.attention, getattr(layer, "mlp", None) or layer.ffn


def assert_same_input_gradients(ours, ref, grid_thw):
    for i, (a, b) in enumerate(zip(split_frames(ours, grid_thw), split_frames(ref, grid_thw), strict=True)):
        assert rel_err(a, b) <= FP32_REL_TOL, f"frame {i} input gradient rel err {rel_err(a, b):.2e}"


# --------------------------------------------------------------------------------------------------------------
# Gradient parity with transformers
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("tower", TOWERS)
def test_gradients_match_reference(tower, backend):
    make_pair, run_reference = TOWERS[tower]
    ref, ours = make_pair()
    ours.config._attn_implementation = backend
    hidden_states, grid_thw = random_packed(GRIDS, ours.config.num_channels * ours.config.patch_size**2)
    weights = loss_weights(hidden_states, grid_thw, ours.config.hidden_size)

    ours_input, ours_params = our_gradients(ours, hidden_states, grid_thw, weights)
    ref_input, ref_params = reference_gradients(ref, run_reference, hidden_states, grid_thw, weights)
    assert_same_input_gradients(ours_input, ref_input, grid_thw)
    assert_same_parameter_gradients(ours_params, ref_params)


def test_aimv2_learned_position_gradients_match_reference():
    # The learned table is used through the cached resize map (the identity at the trained 8x8 grid).
    ref, ours = aimv2_pair(is_native=False)
    hidden_states, grid_thw = random_packed([(1, 8, 8), (2, 8, 8)], 48)
    weights = loss_weights(hidden_states, grid_thw, 64)
    ours_input, ours_params = our_gradients(ours, hidden_states, grid_thw, weights)
    ref_input, ref_params = reference_gradients(ref, aimv2_reference, hidden_states, grid_thw, weights)
    assert_same_input_gradients(ours_input, ref_input, grid_thw)
    assert_same_parameter_gradients(ours_params, ref_params)


# --------------------------------------------------------------------------------------------------------------
# Gradient checkpointing
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings(GC_WARNING)
@pytest.mark.parametrize("tower", TOWERS)
def test_gradient_checkpointing_gives_the_same_gradients(tower):
    _, ours = TOWERS[tower][0]()
    hidden_states, grid_thw = random_packed(GRIDS, 48)
    weights = loss_weights(hidden_states, grid_thw, 64)
    plain_input, plain_params = our_gradients(ours.train(), hidden_states, grid_thw, weights)

    ours.gradient_checkpointing_enable()
    ours.train()
    # Checkpointing re-runs each encoder layer in the backward pass: count the runs of a module inside a layer
    # (its `forward`: torch's checkpoint does not fire forward hooks when it recomputes).
    _, feed_forward = first_layer_parts(ours)
    with mock.patch.object(feed_forward, "forward", wraps=feed_forward.forward) as runs:
        checkpointed_input, checkpointed_params = our_gradients(ours, hidden_states, grid_thw, weights)

    assert runs.call_count == 2, f"the layer ran {runs.call_count} time(s): checkpointing did not recompute it"
    assert rel_err(checkpointed_input, plain_input) <= FP32_REL_TOL
    assert_same_parameter_gradients(checkpointed_params, plain_params)


# --------------------------------------------------------------------------------------------------------------
# bf16 autocast, fp32 master weights
# --------------------------------------------------------------------------------------------------------------

# bf16 keeps 8 significant bits: each matmul output is rounded to ~2^-9 = 2e-3 relative, and a tiny tower
# (2 layers) compounds a handful of such roundings, so a parameter's gradient lands within a few 1e-3 of the
# fp32 one (measured: <= 2e-2 on CPU). 0.1 relative / cosine 0.995 catches a wrong or missing gradient path
# (a dropped term, fp32/bf16 mix-up giving NaN) with margin.
BF16_GRAD_REL_TOL = 0.1


@pytest.mark.parametrize("tower", TOWERS)
def test_bf16_autocast_trains_with_fp32_master_weights(tower):
    _, ours = TOWERS[tower][0]()
    ours.train()
    hidden_states, grid_thw = random_packed(GRIDS, 48)
    weights = loss_weights(hidden_states, grid_thw, 64)
    _, fp32_params = our_gradients(ours, hidden_states, grid_thw, weights)
    attention, _ = first_layer_parts(ours)
    query_dtypes = []
    hook = attention.q_proj.register_forward_hook(lambda module, args, out: query_dtypes.append(out.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ours(hidden_states, grid_thw)
    hook.remove()
    assert query_dtypes == [torch.bfloat16]  # autocast did run the layers' matmuls in bf16
    ours.zero_grad(set_to_none=True)
    scalar_loss(out.last_hidden_state.float(), out.pooler_output.float(), weights).backward()

    for name, p in ours.named_parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32, name
        assert torch.isfinite(p.grad).all(), name
        if not is_key_bias(name):  # exact gradient 0: nothing to compare (see is_key_bias)
            error = rel_err(p.grad, fp32_params[name])
            assert error <= BF16_GRAD_REL_TOL, f"{name}: bf16 gradient rel err {error:.2e}"
    everything = torch.cat([p.grad.flatten() for p in ours.parameters()])
    reference = torch.cat([g.flatten() for g in fp32_params.values()])
    assert torch.nn.functional.cosine_similarity(everything, reference, dim=0) >= 0.995


# --------------------------------------------------------------------------------------------------------------
# GPU: mixed precision on the flash kernels (skipped without CUDA)
# --------------------------------------------------------------------------------------------------------------


def whole_gradient(grads: dict):
    # By name: the towers declare their parameters in different orders (transformers: k, v, q; ours: q, k, v).
    return torch.cat([grads[name].flatten().double() for name in sorted(grads) if not is_key_bias(name)])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("tower", TOWERS)
def test_cuda_autocast_trains_on_the_flash_kernel_with_fp32_master_weights(tower, dtype):
    """fp32 weights under autocast: attention runs on torch's varlen flash kernel, gradients per DESIGN §7.

    Against the fp32 reference, our gradient's error is no larger than transformers' own under the same autocast
    (ratio <= 1.1, whole gradient), and its cosine is >= 0.999.
    """
    make_pair, run_reference = TOWERS[tower]
    ref, ours = make_pair()
    ref, ours = ref.cuda(), ours.cuda().train()
    hidden_states, grid_thw = random_packed(GRIDS, 48)
    hidden_states = hidden_states.cuda()
    weights = tuple(w.cuda() for w in loss_weights(hidden_states, grid_thw, 64))
    _, truth = reference_gradients(ref, run_reference, hidden_states, grid_thw, weights)  # fp32
    with torch.autocast("cuda", dtype=dtype):
        assert ours.attention_backend(hidden_states.device, torch.float32) == "varlen_attn"
        _, ours_grads = our_gradients(ours, hidden_states, grid_thw, weights)
        _, ref_grads = reference_gradients(ref, run_reference, hidden_states, grid_thw, weights)

    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() for g in ours_grads.values())
    truth, ours_all, ref_all = whole_gradient(truth), whole_gradient(ours_grads), whole_gradient(ref_grads)
    ours_err, ref_err = rel_err(ours_all, truth), rel_err(ref_all, truth)
    assert ours_err <= 1.1 * ref_err, f"gradient rel err {ours_err:.2e} vs transformers' own {ref_err:.2e}"
    assert torch.nn.functional.cosine_similarity(ours_all, truth, dim=0) >= 0.999
