"""`torch.compile(model)` trains and infers on changing grids without recompiling per set of shapes, == eager.

The packing metadata is built on the host from `grid_thw`'s values, outside the graphs (`torch.compiler.disable`
in packing.py), so the compiled graphs only see tensors whose sizes change with the batch. torch.compile's default
(automatic dynamic shapes) compiles the graphs once static, once dynamic when a second set of shapes comes, and once
more for a batch of a single frame (torch specialises sizes 0 and 1); after that, no grid compiles anything.
"""

import shutil

import pytest
import torch
from reference import FP32_REL_TOL, aimv2_pair, assert_same_parameter_gradients, random_packed, rel_err, siglip2_pair
from torch._dynamo.testing import CompileCounterWithBackend

# What the default settings need before every graph exists: two many-frame batches and a one-frame batch.
WARM_UP = [[(1, 3, 4), (1, 5, 5)], [(1, 2, 7), (1, 6, 6), (1, 4, 4)], [(1, 6, 5)]]
# New grids after that: 1x1, 1xN, Nx1, video (t > 1), a one-frame batch of a new shape.
NEW_GRIDS = [[(1, 1, 1), (1, 1, 9), (2, 3, 3)], [(3, 4, 2), (1, 7, 1)], [(1, 9, 2)], [(1, 8, 8), (1, 2, 2), (1, 1, 5)]]
TOWERS = {"siglip2": siglip2_pair, "aimv2": aimv2_pair}


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()  # no compiled code carried over from another test
    yield
    torch._dynamo.reset()


def outputs_and_gradients(run, model, hidden_states, grid_thw):
    """([last_hidden_state, pooler_output, input gradient], {name: gradient of model's parameter}) of a scalar
    loss of `run` (the model itself, or the compiled model, which shares its parameters)."""
    model.zero_grad(set_to_none=True)
    inputs = hidden_states.clone().requires_grad_()
    out = run(inputs, grid_thw)
    token_weights = torch.linspace(-1, 1, out.last_hidden_state.shape[1], device=inputs.device)
    ((out.last_hidden_state * token_weights).sum() + out.pooler_output.square().sum()).backward()
    outputs = [out.last_hidden_state.detach(), out.pooler_output.detach(), inputs.grad]
    return outputs, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("tower", TOWERS)
def test_compiled_training_matches_eager_without_recompiling_for_new_grids(tower):
    # aot_eager: torch.compile's graph capture and AOTAutograd (the training path) without inductor's codegen,
    # which takes ~1 min per graph set on a small CPU (see test_inductor_matches_eager).
    _, model = TOWERS[tower]()
    model.train()
    compiles = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(model, backend=compiles)

    def check(grids):
        hidden_states, grid_thw = random_packed(grids, 48)
        ours, ours_grads = outputs_and_gradients(compiled, model, hidden_states, grid_thw)
        eager, eager_grads = outputs_and_gradients(model, model, hidden_states, grid_thw)
        for what, a, b in zip(["last_hidden_state", "pooler_output", "input gradient"], ours, eager, strict=True):
            assert rel_err(a, b) <= FP32_REL_TOL, f"{grids}: {what} rel err {rel_err(a, b):.2e}"
        assert_same_parameter_gradients(ours_grads, eager_grads)

    for grids in WARM_UP:
        check(grids)
    graphs_after_warm_up = compiles.frame_count
    assert graphs_after_warm_up > 0  # it did compile
    for grids in NEW_GRIDS:
        check(grids)
    assert compiles.frame_count == graphs_after_warm_up, "new grids compiled new graphs"


NO_CXX = shutil.which("c++") is None and shutil.which("g++") is None


@pytest.mark.skipif(NO_CXX, reason="inductor's CPU codegen needs a C++ compiler")
def test_inductor_matches_eager():
    # One small inference case: inductor's C++ codegen of ~20 graphs takes 15-45 s on 2 busy cores with a cold
    # cache (~8 s warm); a training step ~50-80 s, so the training path is covered by aot_eager above and by
    # `examples/train_packed.py --compile` (DDP, inductor: --check passes, 45 s).
    _, model = siglip2_pair(num_hidden_layers=1)
    compiles = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=compiles)
    with torch.no_grad():
        for grids in WARM_UP[:2] + NEW_GRIDS[:1]:
            hidden_states, grid_thw = random_packed(grids, 48)
            ours, eager = compiled(hidden_states, grid_thw), model(hidden_states, grid_thw)
            assert rel_err(ours.last_hidden_state, eager.last_hidden_state) <= FP32_REL_TOL
            assert rel_err(ours.pooler_output, eager.pooler_output) <= FP32_REL_TOL
            if grids is WARM_UP[1]:
                graphs_after_warm_up = compiles.frame_count
    assert compiles.frame_count == graphs_after_warm_up, "new grids compiled new graphs"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_compiled_bf16_training_on_the_flash_kernel_does_not_recompile_for_new_grids():
    # bf16 weights on CUDA: the varlen flash kernel (a torch custom op with `max_seqlen` as a Python int), inductor.
    _, model = siglip2_pair()
    model = model.cuda().to(torch.bfloat16).train()
    assert model.attention_backend(torch.device("cuda"), torch.bfloat16) == "varlen_attn"
    compiles = CompileCounterWithBackend("inductor")
    compiled = torch.compile(model, backend=compiles)
    for i, grids in enumerate(WARM_UP + NEW_GRIDS):
        hidden_states, grid_thw = random_packed(grids, 48)
        hidden_states = hidden_states.cuda().to(torch.bfloat16)
        ours, _ = outputs_and_gradients(compiled, model, hidden_states, grid_thw)
        eager, _ = outputs_and_gradients(model, model, hidden_states, grid_thw)
        for a, b in zip(ours, eager, strict=True):  # two bf16 evaluations of the same math
            assert torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0) >= 0.999
        if i == len(WARM_UP) - 1:
            graphs_after_warm_up = compiles.frame_count
    assert compiles.frame_count == graphs_after_warm_up, "new grids compiled new graphs"
