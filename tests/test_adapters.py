"""Adapters (PEFT's LoRA / DoRA) on the packed towers == the same adapters on transformers' towers (DESIGN §7, CPU
fp32).

Both towers get the same adapter config and the very same (non-zero) adapter weights; ours runs packed, the
reference frame by frame. Also: the fast paths that read a module's weights directly step aside for a wrapped module
(`modeling/plain_modules.py`), and CUDA graphs key on what an adapter's Python state selects.
"""

import copy

import pytest
import torch
from reference import (
    aimv2_pair,
    aimv2_reference,
    assert_matches_reference,
    random_packed,
    rel_err,
    siglip2_pair,
    siglip2_reference,
    FP32_REL_TOL,
)
from torch import nn

from packed_vit.modeling import cuda_graphs, modeling_siglip2_packing
from packed_vit.modeling.cuda_graphs import CudaGraphRunner
from packed_vit.modeling.plain_modules import is_plain

peft = pytest.importorskip("peft", reason="the adapter tests need peft (pip install -e '.[test]')")
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402

# 1x1, elongated, smaller and larger than the 16x16 table, video (t > 1).
GRIDS = [(1, 1, 1), (1, 1, 9), (1, 7, 1), (1, 5, 7), (1, 18, 17), (2, 4, 6)]
NAMED = {
    "siglip2": ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
    "aimv2": ["q_proj", "k_proj", "v_proj", "out_proj", "gate_proj", "up_proj", "down_proj"],
}
ADAPTERS = {
    "lora-all-linear": lambda tower: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    "lora-named": lambda tower: LoraConfig(r=4, lora_alpha=8, target_modules=NAMED[tower]),
    "dora-all-linear": lambda tower: LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", use_dora=True),
}


def pair(tower: str, **overrides):
    return siglip2_pair(**overrides) if tower == "siglip2" else aimv2_pair(**overrides)


def run_reference(tower: str):
    return siglip2_reference if tower == "siglip2" else aimv2_reference


def patch_dim(ours) -> int:
    config = getattr(ours, "config", None) or ours.get_base_model().config
    return config.num_channels * config.patch_size**2


def reference_name(name: str) -> str:
    return name.replace("vision_model.", "")  # transformers 4.57 keeps the tower under `vision_model.` (and so does
    # its LFM2-VL after replace_vision_towers, which swaps the inner module there)


def with_the_same_adapter(ref, ours, config: LoraConfig, seed: int = 0):
    """Both towers wrapped by PEFT with `config`, then the same random adapter weights in both (LoRA's B starts at
    zero, which would hide an adapter that is not applied)."""
    ref, ours = get_peft_model(ref, copy.deepcopy(config)), get_peft_model(ours, copy.deepcopy(config))
    ref_adapter = {reference_name(n): p for n, p in ref.named_parameters() if "lora_" in n}
    ours_adapter = {reference_name(n): p for n, p in ours.named_parameters() if "lora_" in n}
    assert ours_adapter and ours_adapter.keys() == ref_adapter.keys()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in ours_adapter.items():
            parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
            ref_adapter[name].copy_(parameter)
    return ref.eval(), ours.eval()


def assert_parity(tower: str, ref, ours, grids=GRIDS, has_head=True):
    hidden_states, grid_thw = random_packed(grids, patch_dim(ours))
    with torch.no_grad():
        out = ours(hidden_states, grid_thw)
        ref_last, ref_pooled = run_reference(tower)(ref, hidden_states, grid_thw)
    assert_matches_reference(out, ref_last, ref_pooled, grid_thw, has_head)


# ---- the predicate every fast path asks ----


def test_is_plain_only_for_the_exact_class_without_hooks():
    linear = nn.Linear(4, 4)
    assert is_plain(linear, nn.Linear)
    assert not is_plain(nn.modules.linear.NonDynamicallyQuantizableLinear(4, 4), nn.Linear)  # a subclass
    wrapped = get_peft_model(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), LoraConfig(target_modules=["0"]))
    assert not is_plain(wrapped.base_model.model[0], nn.Linear)  # PEFT's lora.Linear around it
    parametrized = nn.Linear(4, 4)
    nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Identity())
    assert not is_plain(parametrized, nn.Linear)
    for register in (linear.register_forward_hook, linear.register_forward_pre_hook):
        handle = register(lambda *args: None)
        assert not is_plain(linear, nn.Linear)
        handle.remove()
    # global hooks (profilers, FLOP counters) watch every module: they measure the forward as it runs without them
    handle = nn.modules.module.register_module_forward_hook(lambda *args: None)
    try:
        assert is_plain(linear, nn.Linear)
    finally:
        handle.remove()


def test_the_gelu_epilogue_steps_aside_for_an_adapter_on_fc1(monkeypatch):
    """The CUDA fast path that read fc1's base weight (and dropped its LoRA), run here on the CPU: with the adapter,
    fc1 is called and the tower equals transformers' with the same adapter."""
    monkeypatch.setattr(modeling_siglip2_packing, "GELU_EPILOGUE_DEVICES", ("cpu",))
    calls = []
    addmm_activation = torch._addmm_activation
    monkeypatch.setattr(torch, "_addmm_activation", lambda *a, **k: calls.append(1) or addmm_activation(*a, **k))
    ref, ours = siglip2_pair()
    hidden_states, grid_thw = random_packed([(1, 3, 4)], patch_dim(ours))
    with torch.no_grad():
        ours(hidden_states, grid_thw)
    assert calls, "the plain tower takes the epilogue path"
    calls.clear()
    ref, ours = with_the_same_adapter(ref, ours, LoraConfig(r=4, target_modules=["fc1"]))
    mlp = ours.base_model.model.encoder.layers[0].mlp
    assert not mlp.gelu_in_epilogue_applies(hidden_states)
    assert_parity("siglip2", ref, ours)
    assert not calls


def test_a_norm_replaced_by_another_module_is_called():
    ref, ours = siglip2_pair()
    for layer_of in (lambda m: m.encoder.layers[1], lambda m: m.vision_model.encoder.layers[1]):
        try:
            layer = layer_of(ref)
        except AttributeError:
            continue
        ours.encoder.layers[1].layer_norm2 = layer.layer_norm2  # transformers' nn.LayerNorm: no residual_delta
    assert_parity("siglip2", ref, ours)


# ---- outputs and gradients against transformers with the same adapter ----


@pytest.mark.parametrize("adapter", ADAPTERS)
@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_inference_with_an_adapter(tower, adapter):
    ref, ours = with_the_same_adapter(*pair(tower), ADAPTERS[adapter](tower))
    assert_parity(tower, ref, ours)


@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_training_gradients_with_an_adapter(tower):
    # The adapter's gradients are what this test checks, so ours runs the reference's own attention (eager: matmul,
    # softmax, matmul); the packed kernels' gradients are test_training.py's. torch's CPU flash kernel (sdpa, fp32)
    # rounds the query/key gradients 2-3x more than its math kernel (against a float64 reference, 4 draws: 0.9-1.6e-5
    # against 0.35-0.54e-5 for AIMv2's second layer), and the adapters' added query/key weights sharpen the softmax
    # enough that this noise crossed 1e-5 in 5 of 40 draws; eager against eager: 0 of 40, at most 6.8e-6.
    ref, ours = pair(tower)
    ours.config._attn_implementation = "eager"
    ref, ours = with_the_same_adapter(ref, ours, ADAPTERS["lora-all-linear"](tower))
    hidden_states, grid_thw = random_packed(GRIDS[2:], patch_dim(ours))
    hidden_ours, hidden_ref = hidden_states.clone().requires_grad_(), hidden_states.clone().requires_grad_()
    out = ours(hidden_ours, grid_thw)
    ref_last, ref_pooled = run_reference(tower)(ref, hidden_ref, grid_thw)
    generator = torch.Generator().manual_seed(3)
    weights = torch.randn(out.last_hidden_state.shape, generator=generator)
    pooled_weights = torch.randn(out.pooler_output.shape, generator=generator)
    ((out.last_hidden_state * weights).sum() + (out.pooler_output * pooled_weights).sum()).backward()
    ((torch.cat(ref_last) * weights).sum() + (torch.stack(ref_pooled) * pooled_weights).sum()).backward()
    assert rel_err(hidden_ours.grad, hidden_ref.grad) <= FP32_REL_TOL
    ref_grads = {reference_name(n): p.grad for n, p in ref.named_parameters() if "lora_" in n}
    for name, parameter in ours.named_parameters():
        if "lora_" not in name:
            continue
        if ref_grads[reference_name(name)] is None:  # one the reference does not apply (the head's out_proj: below)
            assert parameter.grad is None, name
        else:
            assert rel_err(parameter.grad, ref_grads[reference_name(name)]) <= FP32_REL_TOL, name


def test_an_adapter_on_the_heads_out_proj_is_not_applied_as_in_transformers():
    """`nn.MultiheadAttention` reads `out_proj.weight` itself, so transformers' head never calls the LoRA layer
    PEFT's "all-linear" puts on `head.attention.out_proj`; ours does the same (else pooler_output would differ)."""
    ref, ours = with_the_same_adapter(*siglip2_pair(), LoraConfig(r=4, target_modules=["out_proj"]))
    assert not is_plain(ours.base_model.model.head.attention.out_proj, nn.Linear)
    assert_parity("siglip2", ref, ours)
    hidden_states, grid_thw = random_packed([(1, 3, 4)], patch_dim(ours))
    ours(hidden_states, grid_thw).pooler_output.sum().backward()
    head_adapter = ours.base_model.model.head.attention.out_proj.lora_B["default"].weight
    layer_adapter = ours.base_model.model.encoder.layers[0].self_attn.out_proj.lora_B["default"].weight
    assert head_adapter.grad is None and layer_adapter.grad is not None


def test_an_adapter_on_the_heads_multihead_attention_itself():
    # target "attention" matches the head's nn.MultiheadAttention (PEFT's lora.MultiheadAttention wraps it)
    ref, ours = with_the_same_adapter(*siglip2_pair(), LoraConfig(r=4, target_modules=["attention"]))
    assert not is_plain(ours.base_model.model.head.attention, nn.MultiheadAttention)
    assert_parity("siglip2", ref, ours)


def test_aimv2_patch_embedding_and_learned_positions_with_adapters():
    """Both read their module's weight on the fast path (the Conv2d as a linear map, the position table): with an
    adapter they are called, as `Aimv2VisionEmbeddings` calls them."""
    config = LoraConfig(r=4, target_modules=["patch_embed", "position_embedding", "q_proj"])
    ref, ours = with_the_same_adapter(*aimv2_pair(is_native=False), config)
    grids = [(1, 8, 8), (1, 8, 8), (2, 8, 8)]  # the trained 8x8 grid (image_size 32 / patch 4)
    assert_parity("aimv2", ref, ours, grids)


@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_adapter_disabled_and_merged(tower):
    base_ref, base_ours = pair(tower)
    ref, ours = with_the_same_adapter(copy.deepcopy(base_ref), base_ours, ADAPTERS["lora-all-linear"](tower))
    with ours.disable_adapter():
        assert_parity(tower, base_ref, ours)  # the tower without any adapter
    assert_parity(tower, ref, ours)
    assert_parity(tower, ref.merge_and_unload(), ours.merge_and_unload())


@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_saved_adapter_reloads(tower, tmp_path):
    base_ref, base_ours = pair(tower)
    pristine = copy.deepcopy(base_ours)
    ref, ours = with_the_same_adapter(base_ref, base_ours, ADAPTERS["lora-named"](tower))
    ours.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(pristine, tmp_path).eval()
    assert_parity(tower, ref, reloaded)


# ---- CUDA graphs ----


@pytest.mark.parametrize("tower", ["siglip2", "aimv2"])
def test_graphs_padded_forward_with_an_adapter(tower):
    """The forward the graphs capture (bucket padding, dummy segments), run eagerly on the CPU, with adapters on
    every linear layer and on the head's attention itself."""
    config = ADAPTERS["lora-all-linear"](tower)
    if tower == "siglip2":
        config = LoraConfig(r=4, target_modules=NAMED["siglip2"] + ["attention"])
    ref, ours = with_the_same_adapter(*pair(tower), config)
    ours.base_model.model.cuda_graphs = CudaGraphRunner(capture_graphs=False)
    assert_parity(tower, ref, ours)
    assert ours.base_model.model.cuda_graphs.replays == 1


def test_graphs_are_keyed_on_the_adapters_state():
    """Enabling, disabling, merging an adapter or changing its scale changes no module and no memory the graphs
    check, only the LoRA layers' Python state: it is part of each graph's key."""
    _, ours = siglip2_pair()
    ours = get_peft_model(ours, LoraConfig(r=4, target_modules="all-linear", use_dora=True))
    layers = cuda_graphs._adapter_layers(ours.base_model.model)
    assert len(layers) == 1 + 2 * 6 + 3  # patch embedding; q, k, v, out, fc1, fc2 per layer; head out_proj, fc1, fc2
    def state():
        return repr(cuda_graphs._adapters_state(layers))

    states = {state()}
    with ours.disable_adapter():
        states.add(state())
    assert len(states) == 2 and state() in states  # back to the first state
    ours.base_model.model.encoder.layers[0].mlp.fc1.scale_layer(0.5)
    states.add(state())
    ours.merge_adapter()
    states.add(state())
    assert len(states) == 4
    _, plain = siglip2_pair()
    assert cuda_graphs._adapter_layers(plain) == []  # nothing to look at on a plain tower


def test_graphs_run_eagerly_with_a_module_they_cannot_follow():
    ref, ours = siglip2_pair()

    class Scaled(nn.Module):  # a user's wrapper: what it computes may change with no trace the graphs could see
        def __init__(self, inner):
            super().__init__()
            self.inner, self.factor = inner, 1.0

        def forward(self, x):
            return self.inner(x) * self.factor

    ours.encoder.layers[0].mlp.fc2 = Scaled(ours.encoder.layers[0].mlp.fc2)
    assert cuda_graphs._adapter_layers(ours) is None
    ours.cuda_graphs = CudaGraphRunner()  # capturing: on the CPU it never applies, so ask the runner directly
    ours.cuda_graphs.capture_graphs = True
    ours.cuda_graphs.applies = lambda *args: True
    hidden_states, grid_thw = random_packed([(1, 3, 4)], patch_dim(ours))
    with torch.no_grad():
        assert ours.cuda_graphs.forward(ours, hidden_states, grid_thw, "sdpa", False) is None


# ---- inside a VLM (replace_vision_towers) ----

VISION_LINEARS = r".*vision_tower.*\.(q_proj|k_proj|v_proj|out_proj|fc1|fc2)"


def test_adapters_attached_after_replace_vision_towers_give_the_vlms_logits_and_gradients():
    pytest.importorskip("transformers.models.lfm2_vl", reason="this transformers has no LFM2-VL")
    from test_vlm_drop_in import IMAGE_TOKEN_ID, padded_images, prompt_with_images, small_lfm2_vl

    from packed_vit import replace_vision_towers

    original = small_lfm2_vl()
    replaced = copy.deepcopy(original)
    assert replace_vision_towers(replaced) == 1
    original, replaced = with_the_same_adapter(original, replaced, LoraConfig(r=4, target_modules=VISION_LINEARS))
    inputs = dict(input_ids=prompt_with_images(), **padded_images())
    with torch.no_grad():
        assert rel_err(replaced(**inputs).logits, original(**inputs).logits) <= FP32_REL_TOL
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    for model in (original, replaced):
        model.train()
        model(**inputs, labels=labels).loss.backward()
    ref_grads = {reference_name(n): p.grad for n, p in original.named_parameters() if "lora_" in n}
    for name, parameter in replaced.named_parameters():
        if "lora_" in name:
            assert rel_err(parameter.grad, ref_grads[reference_name(name)]) <= FP32_REL_TOL, name


def test_replace_vision_towers_refuses_a_tower_that_already_has_adapters():
    pytest.importorskip("transformers.models.lfm2_vl", reason="this transformers has no LFM2-VL")
    from test_vlm_drop_in import small_lfm2_vl

    from packed_vit import replace_vision_towers

    model = get_peft_model(small_lfm2_vl(), LoraConfig(r=4, target_modules=VISION_LINEARS))
    with pytest.raises(ValueError, match=r"adapter layers \(PEFT.*replace the towers first, then attach"):
        replace_vision_towers(model)
