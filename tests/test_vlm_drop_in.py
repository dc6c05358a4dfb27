"""Drop-in for transformers VLMs (DESIGN §13): the packed towers take the reference towers' own calls, and
`replace_vision_towers` swaps them into a real client, transformers' LFM2-VL, without changing what it computes.

The client: `Lfm2VlForConditionalGeneration` with a small random config, CPU float32. It runs its Siglip2 tower on a
padded batch (`pixel_values [B, P, p*p*C]`, `pixel_attention_mask [B, P]`, `spatial_shapes [B, 2]`); after the swap,
its logits, greedy generations (tokens and scores) and gradients must equal those of an untouched copy.
"""

import copy

import pytest
import torch
from reference import (
    FP32_REL_TOL,
    aimv2_pair,
    assert_same_parameter_gradients,
    rel_err,
    siglip2_pair,
)
from transformers import Siglip2VisionConfig

from packed_vit import Aimv2PackingVisionModel, Siglip2PackingVisionModel, replace_vision_towers
from packed_vit.modeling.attention import check_attn_implementation
from packed_vit.original_checkpoints import perturb_

lfm2_vl = pytest.importorskip("transformers.models.lfm2_vl", reason="this transformers has no LFM2-VL")
from transformers import Lfm2Config, Lfm2VlConfig, Lfm2VlForConditionalGeneration  # noqa: E402

PATCH_DIM = 48  # 4 x 4 patches, 3 channels (reference.SMALL_SIGLIP2)
IMAGE_TOKEN_ID = 100
# (h, w) in patches: different sizes, each a multiple of LFM2-VL's 2x2 downsampling; padded to the largest (24).
IMAGE_SHAPES = [(4, 6), (2, 8), (6, 4), (2, 2)]
SIGLIP2_GC_WARNING = "ignore:.*gradient_checkpointing_enable.*:FutureWarning"


def small_lfm2_vl(seed: int = 0, **vision_overrides) -> Lfm2VlForConditionalGeneration:
    """A random LFM2-VL (2 conv + attention text layers, 2-layer Siglip2 tower as LFM2-VL has it: no head), eval."""
    torch.manual_seed(seed)
    vision = Siglip2VisionConfig(
        hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, patch_size=4,
        vision_use_head=False, **vision_overrides,
    )  # fmt: skip
    text = Lfm2Config(
        vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, layer_types=["conv", "full_attention"], block_auto_adjust_ff_dim=False,
    )  # fmt: skip
    config = Lfm2VlConfig(
        vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_id=IMAGE_TOKEN_ID,
        projector_hidden_size=64,
    )  # fmt: skip
    model = Lfm2VlForConditionalGeneration(config).eval()
    with torch.no_grad():
        perturb_(model, scale=0.2)  # off the init (norms, biases): nothing may rely on init values
    return model


def padded_images(shapes=IMAGE_SHAPES, seed: int = 1) -> dict:
    """What LFM2-VL's processor gives its tower: the patches of each image first in its row, then padding."""
    generator = torch.Generator().manual_seed(seed)
    max_patches = max(h * w for h, w in shapes)
    pixel_values = torch.randn(len(shapes), max_patches, PATCH_DIM, generator=generator)
    pixel_attention_mask = torch.zeros(len(shapes), max_patches, dtype=torch.long)
    for i, (h, w) in enumerate(shapes):
        pixel_attention_mask[i, : h * w] = 1
        pixel_values[i, h * w :] = 0  # the processors pad with zeros
    spatial_shapes = torch.tensor(shapes)
    return dict(pixel_values=pixel_values, pixel_attention_mask=pixel_attention_mask, spatial_shapes=spatial_shapes)


def prompt_with_images(shapes=IMAGE_SHAPES) -> torch.Tensor:
    """[1, L] token ids: a few text tokens and, per image, one placeholder per 2x2 block of its patches."""
    ids = []
    for h, w in shapes:
        ids += [5, 6] + [IMAGE_TOKEN_ID] * ((h // 2) * (w // 2))
    return torch.tensor([ids + [7, 8, 9]])


def original_and_replaced(**vision_overrides):
    """(untouched LFM2-VL, a copy of it with its tower replaced)."""
    original = small_lfm2_vl(**vision_overrides)
    replaced = copy.deepcopy(original)
    assert replace_vision_towers(replaced) == 1
    return original, replaced


def vision_tower_of(model) -> torch.nn.Module:
    return model.model.vision_tower


def packed_tower_of(model) -> torch.nn.Module:
    """The packed tower after the swap (transformers 4.57 keeps its `Siglip2VisionModel` wrapper around it)."""
    tower = vision_tower_of(model)
    return tower if isinstance(tower, Siglip2PackingVisionModel) else tower.vision_model


# --------------------------------------------------------------------------------------------------------------
# The client computes the same
# --------------------------------------------------------------------------------------------------------------


def test_logits_and_greedy_generation_do_not_change():
    original, replaced = original_and_replaced()
    inputs = dict(input_ids=prompt_with_images(), **padded_images())
    with torch.no_grad():
        error = rel_err(replaced(**inputs).logits, original(**inputs).logits)
    assert error <= FP32_REL_TOL, f"logits rel err {error:.2e}"

    generate = dict(max_new_tokens=6, do_sample=False, return_dict_in_generate=True, output_scores=True)
    expected, got = original.generate(**inputs, **generate), replaced.generate(**inputs, **generate)
    assert torch.equal(got.sequences, expected.sequences)
    for step, (a, b) in enumerate(zip(got.scores, expected.scores, strict=True)):
        assert rel_err(a, b) <= FP32_REL_TOL, f"generation step {step}: scores rel err {rel_err(a, b):.2e}"


def training_gradients(model, inputs) -> dict:
    """{name: gradient} of the language-modelling loss of one batch, every parameter of the VLM."""
    model.zero_grad(set_to_none=True)
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_ID, -100)
    model(**inputs, labels=labels).loss.backward()
    return {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.filterwarnings(SIGLIP2_GC_WARNING)
@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient-checkpointing"])
def test_training_gradients_do_not_change(checkpointing):
    # The vision tower's weights (and every other) get the same gradients; with checkpointing on before the swap,
    # the packed tower's layers recompute in backward as the reference's did.
    original, replaced = small_lfm2_vl().train(), None
    if checkpointing:
        original.gradient_checkpointing_enable()
    replaced = copy.deepcopy(original)
    assert replace_vision_towers(replaced) == 1
    tower = vision_tower_of(replaced)
    packed = tower if isinstance(tower, Siglip2PackingVisionModel) else tower.vision_model  # 4.57 keeps a wrapper
    assert packed.training
    assert [layer.gradient_checkpointing for layer in packed.encoder.layers] == [checkpointing] * 2

    inputs = dict(input_ids=prompt_with_images(), **padded_images())
    expected = training_gradients(original, inputs)
    got = training_gradients(replaced, inputs)
    assert any(name.startswith("model.vision_tower.") for name in got)
    assert_same_parameter_gradients(got, expected)


# --------------------------------------------------------------------------------------------------------------
# In place, shared parameters, idempotent
# --------------------------------------------------------------------------------------------------------------


def test_the_tower_keeps_its_parameter_objects_state_dict_keys_and_mode():
    model = small_lfm2_vl()
    parameters_before = dict(model.named_parameters())
    keys_before = sorted(model.state_dict())
    replace_vision_towers(model)

    assert isinstance(vision_tower_of(model), Siglip2PackingVisionModel) or isinstance(
        vision_tower_of(model).vision_model, Siglip2PackingVisionModel
    )
    parameters_after = dict(model.named_parameters())
    assert parameters_after.keys() == parameters_before.keys()  # a save loads into the unpatched model, and back
    assert sorted(model.state_dict()) == keys_before  # (transformers declares k_proj before q_proj, we q_proj first)
    # The same objects: same device, dtype and values, and every reference to them (optimizers) stays valid.
    assert all(parameters_after[name] is p for name, p in parameters_before.items()), "a parameter was copied"
    assert not any(m.training for m in vision_tower_of(model).modules())  # eval, as before


def test_an_optimizer_built_before_the_swap_keeps_training_the_tower():
    # Both copies take one SGD step, each with an optimizer built before one of them was swapped: if the packed
    # tower held other tensors than the optimizer's, the two would disagree after the step. (SGD: its step is linear
    # in the gradient, so equal gradients give equal steps. Adam's first step is lr * sign(gradient) and turns the
    # rounding noise of a gradient entry near 0, e.g. k_proj.bias's, into a full step of either sign.)
    original = small_lfm2_vl().train()
    replaced = copy.deepcopy(original)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.5, momentum=0.9) for m in (original, replaced)]
    replace_vision_towers(replaced)
    inputs = dict(input_ids=prompt_with_images(), **padded_images())
    tower_weight = vision_tower_of(original).get_input_embeddings().weight
    weight_before = tower_weight.detach().clone()
    for model, optimizer in zip((original, replaced), optimizers):
        training_gradients(model, inputs)
        optimizer.step()
    assert not torch.equal(tower_weight, weight_before)  # the step did move the tower
    with torch.no_grad():
        error = rel_err(replaced(**inputs).logits, original(**inputs).logits)
    assert error <= FP32_REL_TOL, f"after a step: logits rel err {error:.2e}"


def test_replacing_again_changes_nothing():
    model = small_lfm2_vl()
    assert replace_vision_towers(model) == 1
    modules = list(model.modules())
    assert replace_vision_towers(model) == 0
    assert list(model.modules()) == modules


def test_cuda_graphs_option_enables_the_graphs_of_every_packed_tower_and_on_the_cpu_changes_nothing():
    # On the CPU the runner is attached but never replays (graphs need CUDA): the same logits, eagerly.
    original, replaced = small_lfm2_vl(), small_lfm2_vl()
    assert replace_vision_towers(replaced, cuda_graphs=True) == 1
    runner = packed_tower_of(replaced).cuda_graphs
    assert runner is not None and runner.max_tokens == 16384  # enable_cuda_graphs()' defaults
    inputs = dict(input_ids=prompt_with_images(), **padded_images())
    with torch.no_grad():
        error = rel_err(replaced(**inputs).logits, original(**inputs).logits)
    assert error <= FP32_REL_TOL, f"logits rel err {error:.2e}"
    assert runner.replays == 0 and not runner.graphs

    # Again: nothing to replace, the runner (and whatever it captured) kept; a tower swapped before gets one.
    assert replace_vision_towers(replaced, cuda_graphs=True) == 0
    assert packed_tower_of(replaced).cuda_graphs is runner
    earlier = small_lfm2_vl()
    replace_vision_towers(earlier)
    assert packed_tower_of(earlier).cuda_graphs is None
    assert replace_vision_towers(earlier, cuda_graphs=True) == 0
    assert packed_tower_of(earlier).cuda_graphs is not None


def test_cuda_graphs_option_must_be_a_bool_and_a_wrong_one_changes_nothing():
    model = small_lfm2_vl()
    with pytest.raises(TypeError, match="cuda_graphs must be True or False"):
        replace_vision_towers(model, cuda_graphs="yes")
    assert not any(isinstance(module, Siglip2PackingVisionModel) for module in model.modules())  # nothing swapped


GRAPH_MIN_COSINE = 0.999  # tests/test_cuda.py's bound for a replayed bf16 forward against the eager one


def varlen_attn_available() -> bool:
    try:
        return check_attn_implementation("varlen_attn") == "varlen_attn"
    except ValueError:  # torch < 2.10
        return False


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.skipif(not varlen_attn_available(), reason="the graphs replay torch's varlen_attn kernel")
def test_cuda_graphs_option_replays_the_tower_in_a_bf16_prefill_on_cuda():
    model = small_lfm2_vl().cuda().bfloat16()
    replace_vision_towers(model, cuda_graphs=True)
    tower, packed = vision_tower_of(model), packed_tower_of(model)
    inputs = {k: v.cuda() for k, v in dict(input_ids=prompt_with_images(), **padded_images()).items()}
    inputs["pixel_values"] = inputs["pixel_values"].bfloat16()
    vision = {k: inputs[k] for k in ("pixel_values", "pixel_attention_mask", "spatial_shapes")}
    runner = packed.cuda_graphs
    with torch.no_grad():
        replayed_logits = model(**inputs).logits.float()
        prefill_replays = runner.replays  # the prefill's tower call(s) replayed a graph
        replayed = tower(**vision).last_hidden_state.float()
        packed.cuda_graphs = None
        eager_logits = model(**inputs).logits.float()
        eager = tower(**vision).last_hidden_state.float()
    assert prefill_replays >= 1 and runner.replays == prefill_replays + 1 and runner.graphs
    real = inputs["pixel_attention_mask"] > 0
    for name, a, b in (("tower tokens", replayed[real], eager[real]), ("logits", replayed_logits, eager_logits)):
        cos = torch.nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()
        assert cos >= GRAPH_MIN_COSINE, f"{name}: cosine {cos:.5f}"


def test_every_tower_of_a_model_is_replaced_and_computes_the_same():
    # Both kinds of tower side by side in one container; each called as its client calls it.
    siglip2, _ = siglip2_pair()
    aimv2, _ = aimv2_pair()
    towers = torch.nn.ModuleDict(dict(siglip2=siglip2, aimv2=aimv2))
    original = copy.deepcopy(towers)
    assert replace_vision_towers(towers) == 2
    assert isinstance(towers["aimv2"], Aimv2PackingVisionModel)
    siglip2_inputs = padded_images([(3, 5), (4, 4), (1, 7)])
    images = torch.randn(2, 3, 32, 24)
    with torch.no_grad():
        for name, inputs in (("siglip2", siglip2_inputs), ("aimv2", dict(pixel_values=images))):
            got, expected = towers[name](**inputs), original[name](**inputs)
            valid = (inputs.get("pixel_attention_mask", torch.ones(got.last_hidden_state.shape[:2])) > 0)
            assert rel_err(got.last_hidden_state[valid], expected.last_hidden_state[valid]) <= FP32_REL_TOL, name
            assert rel_err(got.pooler_output, expected.pooler_output) <= FP32_REL_TOL, name


# --------------------------------------------------------------------------------------------------------------
# Towers it cannot take
# --------------------------------------------------------------------------------------------------------------


def test_a_tower_with_attention_dropout_is_refused_and_the_model_left_unchanged():
    model = small_lfm2_vl(attention_dropout=0.1)
    tower = vision_tower_of(model)
    with pytest.raises(ValueError, match=r"model\.vision_tower.*attention_dropout"):
        replace_vision_towers(model)
    assert vision_tower_of(model) is tower and type(getattr(tower, "vision_model", tower)).__module__.startswith(
        "transformers."
    )


def test_a_modified_tower_is_refused():
    # e.g. an adapter added to a layer: its parameters are not the packed tower's
    model = small_lfm2_vl()
    tower = vision_tower_of(model)
    encoder = getattr(tower, "vision_model", tower).encoder
    encoder.layers[0].adapter = torch.nn.Linear(64, 64)
    with pytest.raises(ValueError, match=r"adapter"):
        replace_vision_towers(model)


def test_a_tower_offloaded_or_spread_over_devices_is_refused():
    model = small_lfm2_vl()
    tower = vision_tower_of(model)
    getattr(tower, "vision_model", tower).post_layernorm.to("meta")  # as accelerate leaves offloaded weights
    with pytest.raises(ValueError, match="offloaded or spread over devices"):
        replace_vision_towers(model)


def test_a_bare_tower_is_refused_with_what_to_do_instead():
    reference, _ = aimv2_pair()
    with pytest.raises(ValueError, match="from_pretrained"):
        replace_vision_towers(reference)


# --------------------------------------------------------------------------------------------------------------
# The reference towers' own calls, on the packed towers directly
# --------------------------------------------------------------------------------------------------------------


def padded_call_loss(output, mask, weights):
    """A scalar of the real rows of last_hidden_state [B, P, D] and of pooler_output [B, D] (fixed weights)."""
    token_weights, image_weights = weights
    return (output.last_hidden_state[mask > 0] * token_weights).sum() + (output.pooler_output * image_weights).sum()


def test_siglip2_padded_call_equals_the_reference_padded_call_forward_and_backward():
    # Images of different sizes (1x7, 16 > 3x5, 4x4, 2x2), padded to 16 as Siglip2's processors pad them.
    reference, ours = siglip2_pair()
    inputs = padded_images([(3, 5), (4, 4), (1, 7), (2, 2)])
    mask = inputs["pixel_attention_mask"]
    num_real = int(mask.sum())
    weights = torch.randn(num_real, 64), torch.randn(len(mask), 64)

    grads = []
    for model in (ours, reference):
        pixel_values = inputs["pixel_values"].clone().requires_grad_()
        model.zero_grad(set_to_none=True)
        output = model(**{**inputs, "pixel_values": pixel_values})
        padded_call_loss(output, mask, weights).backward()
        parameters = {name.removeprefix("vision_model."): p.grad for name, p in model.named_parameters()}
        grads.append((output, pixel_values.grad, parameters))
    (got, got_input_grad, got_grads), (expected, expected_input_grad, expected_grads) = grads

    assert got.last_hidden_state.shape == expected.last_hidden_state.shape == (4, 16, 64)
    assert got.pooler_output.shape == expected.pooler_output.shape == (4, 64)
    for i, length in enumerate(mask.sum(1).tolist()):
        error = rel_err(got.last_hidden_state[i, :length], expected.last_hidden_state[i, :length])
        assert error <= FP32_REL_TOL, f"image {i}: last_hidden_state rel err {error:.2e}"
        assert rel_err(got.pooler_output[i], expected.pooler_output[i]) <= FP32_REL_TOL, f"image {i}: pooler_output"
        assert torch.all(got.last_hidden_state[i, length:] == 0)  # padding rows: zeros (documented)
        assert torch.all(got_input_grad[i, length:] == 0)
    real = mask > 0
    assert rel_err(got_input_grad[real], expected_input_grad[real]) <= FP32_REL_TOL
    assert_same_parameter_gradients(got_grads, expected_grads)


def test_siglip2_padded_call_without_padding_and_with_hidden_states():
    reference, ours = siglip2_pair()
    inputs = padded_images([(4, 4), (2, 8)])  # both fill their row of 16
    with torch.no_grad():
        got = ours(**inputs, output_hidden_states=True)
        expected = reference(**inputs, output_hidden_states=True)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3  # embeddings + 2 layers
    for layer, (a, b) in enumerate(zip(got.hidden_states, expected.hidden_states, strict=True)):
        assert a.shape == b.shape and rel_err(a, b) <= FP32_REL_TOL, f"hidden_states[{layer}]"
    assert rel_err(got.last_hidden_state, expected.last_hidden_state) <= FP32_REL_TOL


@pytest.mark.parametrize("height, width", [(32, 24), (30, 27)], ids=["whole-patches", "pixels-past-the-last-patch"])
def test_aimv2_image_call_equals_the_reference(height, width):
    # The reference's stride-4 convolution reads 28x24 of a 30x27 image; so must we.
    reference, ours = aimv2_pair()
    images = torch.randn(3, 3, height, width)
    with torch.no_grad():
        got, expected = ours(images), reference(pixel_values=images)
    assert got.last_hidden_state.shape == expected.last_hidden_state.shape == (3, (height // 4) * (width // 4), 64)
    assert rel_err(got.last_hidden_state, expected.last_hidden_state) <= FP32_REL_TOL
    assert rel_err(got.pooler_output, expected.pooler_output) <= FP32_REL_TOL


def padding_first(inputs):
    inputs["pixel_attention_mask"][1] = inputs["pixel_attention_mask"][1].flip(0)


def wrong_shape(inputs):
    inputs["spatial_shapes"][1] = torch.tensor([3, 3])  # 9 patches, but the mask has 12


BAD_PADDED_CALLS = {
    "mask-not-a-prefix": (padding_first, "not ones then zeros"),
    "shape-vs-mask": (wrong_shape, r"image\(s\) \[1\].*h \* w"),
    "no-spatial-shapes": (lambda inputs: inputs.pop("spatial_shapes"), "needs spatial_shapes"),
    "with-grid_thw": (lambda inputs: inputs.update(grid_thw=torch.tensor([[1, 4, 4], [1, 2, 6]])), "not both"),
    "wrong-patch-dim": (lambda inputs: inputs.update(pixel_values=inputs["pixel_values"][..., :40]), "must be"),
}


@pytest.mark.parametrize("bad_call", BAD_PADDED_CALLS)
def test_siglip2_padded_call_refuses_what_it_cannot_pack(bad_call):
    _, ours = siglip2_pair()
    inputs = padded_images([(4, 4), (2, 6)])
    change, message = BAD_PADDED_CALLS[bad_call]
    change(inputs)
    with pytest.raises(ValueError, match=message):
        ours(**inputs)


def test_aimv2_image_call_refuses_siglip2_arguments():
    _, ours = aimv2_pair()
    with pytest.raises(ValueError, match="AIMv2 takes no pixel_attention_mask"):
        ours(torch.randn(1, 3, 16, 16), spatial_shapes=torch.tensor([[4, 4]]))
