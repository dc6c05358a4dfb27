"""GPU checks (skipped without CUDA): bf16 parity at real model sizes per backend, and no host sync (DESIGN §3, §7).

bf16 policy (DESIGN §7): against a float32 reference, our bf16 error is no larger than the reference model's own
bf16 error on the same input (ratio <= 1.1), and every frame's cosine similarity to it is >= 0.999.
"""

import pytest
import torch
import torch.nn.functional as F
from reference import aimv2_reference, perturb_, random_packed, rel_err, siglip2_reference, split_frames
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Siglip2VisionConfig, Siglip2VisionModel

from packed_vit import (
    Aimv2PackingVisionConfig,
    Aimv2PackingVisionModel,
    Siglip2PackingVisionConfig,
    Siglip2PackingVisionModel,
)
from packed_vit.modeling import fused_norm
from packed_vit.modeling.attention import (
    ATTENTION_BACKENDS,
    FA4_BACKWARD_HEAD_DIMS,
    check_attn_implementation,
    varlen_attention,
)
from packed_vit.modeling.fused_norm import fused_add_norm
from packed_vit.modeling.packing import Segments
from packed_vit.modeling.position_embeddings import _resize_map

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

BF16_ERROR_RATIO = 1.1
MIN_COSINE = 0.999
SO400M = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, patch_size=16)
AIMV2_LARGE = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=24, num_attention_heads=8, patch_size=14)
# 1x1, elongated, smaller and larger than the 16x16 table, video
SIGLIP2_GRIDS = [(1, 1, 1), (1, 1, 40), (1, 33, 1), (1, 7, 9), (1, 16, 16), (1, 32, 24), (3, 12, 10), (1, 48, 20)]
AIMV2_NATIVE_GRIDS = [(1, 1, 1), (1, 1, 30), (1, 27, 1), (1, 9, 13), (2, 16, 16), (1, 40, 24)]


@pytest.fixture(autouse=True)
def fused_norm_at_every_size(monkeypatch):
    """The towers take the fused add + norm path (Triton) only above a token count; these tests' inputs are
    smaller, and it is that path they must check."""
    monkeypatch.setattr(fused_norm, "FUSED_ADD_NORM_MIN_TOKENS", 0)


def available_backends():
    names = []
    for name in ATTENTION_BACKENDS:
        try:
            check_attn_implementation(name)
            names.append(name)
        except ValueError:
            pass
    return names


def norm_err(frames, ref_frames):
    """Relative error over all frames together: ||a - b|| / ||b||."""
    num = sum((a.double() - b.double()).norm() ** 2 for a, b in zip(frames, ref_frames, strict=True))
    den = sum(b.double().norm() ** 2 for b in ref_frames)
    return (num / den).sqrt().item()


def check_bf16(ref_cls, ref_config, ours, grids, run_reference, backend):
    """Our bf16 forward vs the fp32 reference; the reference's own bf16 run sets the error budget."""
    ref32 = perturb_(ref_cls(ref_config), 0.01).cuda().eval()
    ours.load_state_dict(ref32.state_dict(), strict=True)
    ours.to("cuda", torch.bfloat16).eval()
    ours.config._attn_implementation = backend
    patch_dim = ours.config.num_channels * ours.config.patch_size**2
    hidden_states, grid_thw = random_packed(grids, patch_dim)
    hidden_states = hidden_states.cuda()
    with torch.no_grad():
        last32, pooled32 = run_reference(ref32, hidden_states, grid_thw)
        ref16 = ref32.to(torch.bfloat16)
        last16, pooled16 = run_reference(ref16, hidden_states.bfloat16(), grid_thw)
        out = ours(hidden_states.bfloat16(), grid_thw)
    ours_last = split_frames(out.last_hidden_state, grid_thw)
    pairs = [("last_hidden_state", ours_last, last16, last32)]
    if ours.config.use_head:
        pairs.append(("pooler_output", list(out.pooler_output), pooled16, pooled32))
    assert_bf16_contract(pairs, backend)


def assert_bf16_contract(pairs, label: str = ""):
    """pairs: (output name, our frames, the reference's bf16 frames, its fp32 frames): DESIGN §7's bf16 contract."""
    for name, got, ref_bf16, ref_fp32 in pairs:
        ours_err, ref_err = norm_err(got, ref_fp32), norm_err(ref_bf16, ref_fp32)
        print(f"{label} {name}: ours bf16 err {ours_err:.3e}, reference bf16 err {ref_err:.3e}")
        assert ours_err <= BF16_ERROR_RATIO * ref_err, f"{name}: {ours_err:.3e} > 1.1 x {ref_err:.3e}"
        for i, (a, b) in enumerate(zip(got, ref_fp32)):
            cos = torch.nn.functional.cosine_similarity(a.double().flatten(), b.double().flatten(), dim=0).item()
            assert cos >= MIN_COSINE, f"{name} frame {i}: cosine {cos:.5f}"


@pytest.mark.parametrize("backend", available_backends())
def test_siglip2_so400m_bf16(backend):
    config = dict(SO400M, vision_use_head=True)
    ours = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(**config))
    ref_config = Siglip2VisionConfig(**config, attn_implementation="sdpa")
    check_bf16(Siglip2VisionModel, ref_config, ours, SIGLIP2_GRIDS, siglip2_reference, backend)


@pytest.mark.parametrize("backend", available_backends())
def test_aimv2_large_native_bf16(backend):
    config = dict(AIMV2_LARGE, is_native=True, use_head=True)
    ours = Aimv2PackingVisionModel(Aimv2PackingVisionConfig(**config))
    ref_config = Aimv2VisionConfig(**config, attn_implementation="sdpa")
    check_bf16(Aimv2VisionModel, ref_config, ours, AIMV2_NATIVE_GRIDS, aimv2_reference, backend)


@pytest.mark.parametrize("backend", available_backends())
def test_aimv2_large_224_bf16(backend):
    config = dict(AIMV2_LARGE, image_size=224, is_native=False, use_head=True)
    ours = Aimv2PackingVisionModel(Aimv2PackingVisionConfig(**config))
    ref_config = Aimv2VisionConfig(**config, attn_implementation="sdpa")
    check_bf16(Aimv2VisionModel, ref_config, ours, [(1, 16, 16)] * 6 + [(2, 16, 16)], aimv2_reference, backend)


def test_default_backend_on_cuda_bf16_is_varlen():
    model = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(num_hidden_layers=1)).cuda().bfloat16()
    expected = "varlen_attn" if "varlen_attn" in available_backends() else "sdpa"
    assert model.attention_backend(torch.device("cuda"), torch.bfloat16) == expected


@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_forward_with_cpu_grid_does_not_sync(tower):
    if tower == "siglip2":
        model = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(num_hidden_layers=2))
    else:
        model = Aimv2PackingVisionModel(Aimv2PackingVisionConfig(num_hidden_layers=2, is_native=True))
    model = model.cuda().bfloat16().eval()
    patch_dim = model.config.num_channels * model.config.patch_size**2
    hidden_states, grid_thw = random_packed([(1, 5, 7), (2, 16, 16), (1, 1, 30)], patch_dim)
    hidden_states = hidden_states.cuda().bfloat16()
    other, other_grid = random_packed([(1, 9, 4), (1, 3, 3)], patch_dim)
    other = other.cuda().bfloat16()
    with torch.no_grad():
        model(hidden_states, grid_thw)  # warm the per-shape caches
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            out = model(hidden_states, grid_thw)
            model(other, other_grid)  # new shapes: maps built on the GPU, still no sync
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(out.last_hidden_state.float()).all()


def test_grid_on_gpu_matches_grid_on_cpu():
    model = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(num_hidden_layers=2)).cuda().bfloat16().eval()
    hidden_states, grid_thw = random_packed([(1, 5, 7), (1, 16, 16)], 768)
    hidden_states = hidden_states.cuda().bfloat16()
    with torch.no_grad():
        torch.testing.assert_close(
            model(hidden_states, grid_thw.cuda()).last_hidden_state, model(hidden_states, grid_thw).last_hidden_state
        )


# The fused residual add + norm (Triton) against the torch ops it replaces, at the towers' widths and an odd one.
def reference_norm(summed, weight, bias, eps, rms, exact):
    """The towers' reference norms as transformers computes them, or (exact) the same math in fp64."""
    if exact:
        summed, weight, bias = summed.double(), weight.double(), None if bias is None else bias.double()
    if rms:  # Aimv2RMSNorm: statistics in fp32, the normalized value rounded to the input dtype before the weight
        x = summed.double() if exact else summed.float()
        return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)).to(summed.dtype)
    return torch.nn.functional.layer_norm(summed, summed.shape[-1:], weight, bias, eps)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
def test_position_maps_equal_torch_cuda_interpolate_and_the_cpu_maps(mode):
    # torch's CUDA antialias kernel has no width-1 defect (its CPU kernel has): there it is the truth for every
    # shape, and our maps, built on the host in closed form, must equal it and be the same on both devices.
    side, dim = 16, 32
    table = torch.randn(side * side, dim, device="cuda")
    for height, width in [(1, 1), (19, 1), (29, 1), (5, 1), (1, 23), (7, 9), (16, 16), (40, 24), (3, 64)]:
        expected = F.interpolate(
            table.T.reshape(1, dim, side, side), size=(height, width), mode=mode, align_corners=False, antialias=True
        )[0].flatten(1).T
        cuda_map = _resize_map(side, height, width, mode, torch.device("cuda"))
        assert rel_err(cuda_map @ table, expected) <= 1e-5, (height, width)
        assert torch.equal(cuda_map.cpu(), _resize_map(side, height, width, mode, torch.device("cpu")))


@pytest.mark.parametrize("rms", [False, True], ids=["layernorm", "rmsnorm"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("width", [1152, 1024, 100])
@pytest.mark.parametrize("with_delta", [True, False])
def test_fused_add_norm_matches_torch_ops(rms, dtype, width, with_delta):
    g = torch.Generator(device="cuda").manual_seed(width)
    rand = lambda *shape: torch.randn(*shape, device="cuda", generator=g)  # noqa: E731
    hidden_states = (3 * rand(3001, width) + 1).to(dtype)
    delta = rand(3001, width).to(dtype) if with_delta else None
    weight, bias = (1 + 0.5 * rand(width)).to(dtype), (0.5 * rand(width)).to(dtype)
    bias = None if rms else bias
    summed, out = fused_add_norm(hidden_states, delta, weight, bias, 1e-6, rms)
    ref_sum = hidden_states if delta is None else hidden_states + delta
    assert torch.equal(summed, ref_sum)  # the same rounding of the sum
    ref64 = reference_norm(ref_sum, weight, bias, 1e-6, rms, exact=True)
    torch_out = reference_norm(ref_sum, weight, bias, 1e-6, rms, exact=False)
    ours_err, torch_err = rel_err(out, ref64), rel_err(torch_out, ref64)
    assert ours_err <= max(1.1 * torch_err, 1e-6), f"{ours_err:.3e} vs torch's {torch_err:.3e}"
    empty = hidden_states[:0]
    assert [t.shape for t in fused_add_norm(empty, empty if with_delta else None, weight, bias, 1e-6, rms)] == [
        empty.shape, empty.shape
    ]


# flash-attn-4: gradients where it is allowed to train, a clear refusal where its backward was found wrong.
def fa4_and_varlen_gradient_errors(head_dim):
    lengths = torch.tensor([1, 37, 300, 129, 64])
    segments = Segments(lengths, torch.device("cuda"))
    q, k, v = (torch.randn(int(lengths.sum()), 4, head_dim, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    grad_out = torch.randn_like(q)

    def grads(backend, dtype):
        inputs = [t.to(dtype).requires_grad_() for t in (q, k, v)]
        varlen_attention(*inputs, segments, segments, head_dim**-0.5, backend).backward(grad_out.to(dtype))
        return [t.grad.double() for t in inputs]

    exact = grads("eager", torch.float64)
    err = lambda got: max(rel_err(a, b) for a, b in zip(got, exact))  # noqa: E731
    return err(grads("flash_attention_4", torch.bfloat16)), err(grads("varlen_attn", torch.bfloat16))


needs_fa4 = pytest.mark.skipif("flash_attention_4" not in available_backends(), reason="needs flash-attn-4")


@needs_fa4
@pytest.mark.parametrize("head_dim", FA4_BACKWARD_HEAD_DIMS)
def test_flash_attention_4_gradients(head_dim):
    fa4_err, varlen_err = fa4_and_varlen_gradient_errors(head_dim)
    assert fa4_err <= BF16_ERROR_RATIO * varlen_err, f"{fa4_err:.3e} vs varlen_attn's {varlen_err:.3e}"


@needs_fa4
def test_flash_attention_4_refuses_training_at_head_dim_72():
    segments = Segments(torch.tensor([5, 9]), torch.device("cuda"))
    q = torch.randn(14, 16, 72, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(ValueError, match="cannot train with head_dim 72"):
        varlen_attention(q, q, q, segments, segments, 72**-0.5, "flash_attention_4")
    with torch.no_grad():  # inference is fine
        assert varlen_attention(q, q, q, segments, segments, 72**-0.5, "flash_attention_4").shape == q.shape


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_fused_add_norm_on_a_gpu_other_than_the_current_one():
    """Same bits on cuda:1 (not the current device) as on cuda:0: the kernel ran where its tensors live."""
    shapes = [(100, 1152), (100, 1152), (1152,), (1152,)]  # hidden_states, delta, weight, bias
    on_gpu0 = [torch.randn(*shape, device="cuda:0").bfloat16() for shape in shapes]
    on_gpu1 = [t.to("cuda:1") for t in on_gpu0]
    assert torch.cuda.current_device() == 0
    expected = fused_add_norm(*on_gpu0, 1e-6, rms=False)
    got = fused_add_norm(*on_gpu1, 1e-6, rms=False)
    torch.cuda.synchronize(1)
    for a, b in zip(got, expected):
        assert a.device == torch.device("cuda:1") and torch.equal(a.cpu(), b.cpu())


# CUDA graphs (modeling/cuda_graphs.py): replay within the bf16 contract, new batches in old buckets, no host sync.
needs_varlen = pytest.mark.skipif("varlen_attn" not in available_backends(), reason="graphs replay varlen_attn")


@needs_varlen
@pytest.mark.parametrize("tower", ["siglip2", "aimv2_native"])
def test_cuda_graph_replay_bf16(tower):
    if tower == "siglip2":
        config = dict(SO400M, vision_use_head=True)
        ours = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(**config)).enable_cuda_graphs()
        ref_config = Siglip2VisionConfig(**config, attn_implementation="sdpa")
        check_bf16(Siglip2VisionModel, ref_config, ours, SIGLIP2_GRIDS, siglip2_reference, "varlen_attn")
    else:
        config = dict(AIMV2_LARGE, is_native=True, use_head=True)
        ours = Aimv2PackingVisionModel(Aimv2PackingVisionConfig(**config)).enable_cuda_graphs()
        ref_config = Aimv2VisionConfig(**config, attn_implementation="sdpa")
        check_bf16(Aimv2VisionModel, ref_config, ours, AIMV2_NATIVE_GRIDS, aimv2_reference, "varlen_attn")
    assert ours.cuda_graphs.replays == 1 and len(ours.cuda_graphs.graphs) == 1  # the graph served the forward


def per_frame_cosines(a, b, grid_thw):
    return [F.cosine_similarity(x.double().flatten(), y.double().flatten(), dim=0).item()
            for x, y in zip(split_frames(a, grid_thw), split_frames(b, grid_thw), strict=True)]  # fmt: skip


@needs_varlen
def test_cuda_graphs_replay_new_batches_like_eager_and_again_bit_for_bit():
    model = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(**dict(SO400M, num_hidden_layers=4)))
    model = model.cuda().bfloat16().eval().enable_cuda_graphs()
    batches = [
        [(1, 16, 16)], [(1, 16, 16)],  # one bucket, no padding; new data
        [(1, 10, 20), (1, 7, 8)], [(1, 12, 20), (1, 4, 4)],  # one bucket (256 tokens, 2 frames), new cu_seqlens
        [(1, 5, 7), (3, 4, 6), (1, 1, 1), (1, 1, 30)],  # padding: a dummy segment and empty ones
    ]
    inputs = [random_packed(grids, 768) for grids in batches]
    inputs = [(x.cuda().bfloat16(), grid_thw) for x, grid_thw in inputs]
    with torch.no_grad():
        first = [model(x, grid_thw) for x, grid_thw in inputs]
        again = [model(x, grid_thw) for x, grid_thw in inputs]  # after the other graphs ran in the shared pool
        graphs, model.cuda_graphs = model.cuda_graphs, None
        eager = [model(x, grid_thw) for x, grid_thw in inputs]
    assert graphs.replays == 2 * len(batches) and len(graphs.graphs) == 3
    for (x, grid_thw), replayed, replayed_again, reference in zip(inputs, first, again, eager, strict=True):
        assert torch.equal(replayed.last_hidden_state, replayed_again.last_hidden_state)
        assert torch.equal(replayed.pooler_output, replayed_again.pooler_output)
        assert replayed.pooler_output.shape == reference.pooler_output.shape
        assert min(per_frame_cosines(replayed.last_hidden_state, reference.last_hidden_state, grid_thw)) >= MIN_COSINE
        pooled = F.cosine_similarity(replayed.pooler_output.double(), reference.pooler_output.double(), dim=1)
        assert pooled.min() >= MIN_COSINE


@needs_varlen
def test_cuda_graph_replay_does_not_sync_and_recaptures_for_new_modules():
    model = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(**dict(SO400M, num_hidden_layers=2)))
    model = model.cuda().bfloat16().eval().enable_cuda_graphs()
    x, grid_thw = random_packed([(1, 9, 11), (1, 3, 3)], 768)
    x = x.cuda().bfloat16()
    with torch.no_grad():
        model(x, grid_thw)  # captures (capturing synchronizes)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            model(x, grid_thw)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        model.encoder.layers[1].mlp.fc2 = torch.nn.Linear(4304, 1152).cuda().bfloat16()  # as PEFT swaps modules
        replayed = model(x, grid_thw)
        graphs, model.cuda_graphs = model.cuda_graphs, None
        eager = model(x, grid_thw)
    assert graphs.replays == 3
    assert min(per_frame_cosines(replayed.last_hidden_state, eager.last_hidden_state, grid_thw)) >= MIN_COSINE


@needs_varlen
@pytest.mark.parametrize("scale", [None, 0.05], ids=["default_scale", "other_scale"])
def test_varlen_attn_inference_calls_the_kernel_of_the_custom_op_bit_for_bit(scale):
    """Inference calls `varlen_attn`'s flash kernel directly (its custom-op wrapper costs the host ~150 us a call):
    the same bits as the wrapper, which training still goes through (its autograd formula)."""
    torch.manual_seed(0)
    segments = Segments(torch.tensor([1, 37, 256, 90, 1024]), torch.device("cuda"))
    q, k, v = (torch.randn(segments.num_tokens, 16, 72, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    scale = 72**-0.5 if scale is None else scale
    with torch.no_grad():
        direct = varlen_attention(q, k, v, segments, segments, scale, "varlen_attn")
    trained = [t.clone().requires_grad_() for t in (q, k, v)]
    through_wrapper = varlen_attention(*trained, segments, segments, scale, "varlen_attn")
    through_wrapper.sum().backward()  # the wrapper's path: it records autograd
    assert trained[0].grad is not None
    if scale == 72**-0.5:  # the wrapper takes no scale on torch 2.10: other scales are applied to the query first
        assert torch.equal(direct, through_wrapper.detach())
    else:
        assert (direct.float() - through_wrapper.detach().float()).abs().max() < 2e-2
