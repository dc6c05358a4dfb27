"""Adapters on the GPU (skipped without CUDA or peft): the CUDA fast paths (GELU epilogue, fused add + norm, graphs)
with LoRA on every linear layer, against transformers' tower with the same adapter, under the bf16 contract of
DESIGN §7 (tests/test_cuda.py); inference equals what autograd-enabled forwards give, eager and replayed."""

import copy

import pytest
import torch
from reference import aimv2_reference, perturb_, random_packed, siglip2_reference, split_frames
from test_adapters import reference_name
from test_cuda import assert_bf16_contract, norm_err
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Siglip2VisionConfig, Siglip2VisionModel

from packed_vit import (
    Aimv2PackingVisionConfig,
    Aimv2PackingVisionModel,
    Siglip2PackingVisionConfig,
    Siglip2PackingVisionModel,
)
from packed_vit.modeling import fused_norm

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
peft = pytest.importorskip("peft")
from peft import LoraConfig, get_peft_model  # noqa: E402

# so400m's and AIMv2-large's widths, 4 layers: every fast path at its real shapes, in a few seconds
SIGLIP2 = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=4, num_attention_heads=16, patch_size=16)
AIMV2 = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=8, patch_size=14)
GRIDS = [(1, 1, 1), (1, 1, 40), (1, 33, 1), (1, 7, 9), (1, 16, 16), (1, 32, 24), (3, 12, 10)]
TOWERS = {
    "siglip2": (Siglip2VisionModel, Siglip2VisionConfig, Siglip2PackingVisionModel, Siglip2PackingVisionConfig,
                dict(SIGLIP2, vision_use_head=True), siglip2_reference),
    "aimv2": (Aimv2VisionModel, Aimv2VisionConfig, Aimv2PackingVisionModel, Aimv2PackingVisionConfig,
              dict(AIMV2, is_native=True, use_head=True), aimv2_reference),
}  # fmt: skip


@pytest.fixture(autouse=True)
def fused_norm_at_every_size(monkeypatch):
    monkeypatch.setattr(fused_norm, "FUSED_ADD_NORM_MIN_TOKENS", 0)  # these inputs are smaller than its threshold


def lora_towers(tower: str):
    """(transformers' tower fp32, ours bf16), both with LoRA r=8 on every linear layer, the same non-zero weights."""
    ref_cls, ref_config_cls, ours_cls, ours_config_cls, fields, _ = TOWERS[tower]
    ref = perturb_(ref_cls(ref_config_cls(**fields, attn_implementation="sdpa")), 0.01).cuda().eval()
    ours = ours_cls(ours_config_cls(**fields))
    ours.load_state_dict(ref.state_dict(), strict=True)
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    ref, ours = get_peft_model(ref, copy.deepcopy(config)), get_peft_model(ours.cuda(), config)
    ref_adapter = {reference_name(n): p for n, p in ref.named_parameters() if "lora_" in n}
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, parameter in ours.named_parameters():
            if "lora_" in name:
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator).cuda())
                ref_adapter[name].copy_(parameter)
    return ref.eval(), ours.to(torch.bfloat16).eval()


def assert_meets_the_bf16_contract(out, hidden_states, grid_thw, ref32, run_reference):
    with torch.no_grad():
        last32, pooled32 = run_reference(ref32, hidden_states, grid_thw)
        ref16 = copy.deepcopy(ref32).to(torch.bfloat16)
        last16, pooled16 = run_reference(ref16, hidden_states.bfloat16(), grid_thw)
    assert_bf16_contract([("last_hidden_state", split_frames(out.last_hidden_state, grid_thw), last16, last32),
                          ("pooler_output", list(out.pooler_output), pooled16, pooled32)], "lora")  # fmt: skip


@pytest.mark.parametrize("tower", TOWERS)
def test_lora_inference_eager_and_replayed_meets_the_bf16_contract(tower):
    ref32, ours = lora_towers(tower)
    run_reference = TOWERS[tower][-1]
    patch_dim = ours.get_base_model().config.num_channels * ours.get_base_model().config.patch_size**2
    hidden_states, grid_thw = random_packed(GRIDS, patch_dim)
    hidden_states = hidden_states.cuda()
    with torch.no_grad():
        eager = ours(hidden_states.bfloat16(), grid_thw)  # GELU epilogue, fused add + norm: the path
    assert_meets_the_bf16_contract(eager, hidden_states, grid_thw, ref32, run_reference)
    with torch.enable_grad():
        trained = ours(hidden_states.bfloat16(), grid_thw)  # the autograd path: no fast path
    assert norm_err([eager.pooler_output.float()], [trained.pooler_output.float()]) < 5e-2  # dropped: > 0.5

    model = ours.get_base_model().enable_cuda_graphs()
    with torch.no_grad():
        for _ in range(2):  # capture, then replay
            replayed = ours(hidden_states.bfloat16(), grid_thw)
        assert model.cuda_graphs.replays == 2
        assert_meets_the_bf16_contract(replayed, hidden_states, grid_thw, ref32, run_reference)
        # an adapter's Python state selects what the graph computes: disabled and merged replay their own graphs
        with ours.disable_adapter():
            without = ours(hidden_states.bfloat16(), grid_thw)
            model.disable_cuda_graphs()
            without_eager = ours(hidden_states.bfloat16(), grid_thw)
            model.enable_cuda_graphs()
        assert norm_err([without.pooler_output.float()], [without_eager.pooler_output.float()]) < 2e-2
        assert norm_err([without.pooler_output.float()], [replayed.pooler_output.float()]) > 0.05  # it mattered
        ours.merge_adapter()  # in place: the same memory, another state
        replays = model.cuda_graphs.replays
        merged = ours(hidden_states.bfloat16(), grid_thw)
        assert model.cuda_graphs.replays == replays + 1
        model.disable_cuda_graphs()
        merged_eager = ours(hidden_states.bfloat16(), grid_thw)
        assert norm_err([merged.pooler_output.float()], [merged_eager.pooler_output.float()]) < 2e-2
        # not applied twice. last_hidden_state: merging also puts Siglip2's head.attention.out_proj adapter into the
        # weight nn.MultiheadAttention reads, which changes pooler_output, in transformers too (docs/adapters.md)
        assert norm_err([merged.last_hidden_state.float()], [replayed.last_hidden_state.float()]) < 0.1
