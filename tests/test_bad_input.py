"""Every bad input of DESIGN §9 gets a clear ValueError/TypeError naming the problem; 0 images -> empty outputs."""

import pytest
import torch
from reference import aimv2_pair, random_packed, siglip2_pair


@pytest.fixture(params=["siglip2", "aimv2"])
def model(request):
    _, ours = siglip2_pair() if request.param == "siglip2" else aimv2_pair()
    return ours


def patch_dim(model):
    return model.config.num_channels * model.config.patch_size**2


@pytest.mark.parametrize(
    "make_input, error, message",
    [
        (lambda d: (torch.randn(2, 3, d), torch.tensor([[1, 1, 2]])), ValueError, r"\[N, \d+\]"),
        (lambda d: (torch.randn(4, d + 1), torch.tensor([[1, 2, 2]])), ValueError, r"\[N, \d+\]"),
        (lambda d: (torch.randn(4, d), torch.tensor([1, 2, 2])), ValueError, r"\[num_images, 3\]"),
        (lambda d: (torch.randn(4, d), torch.tensor([[1, 2, 2, 1]])), ValueError, r"\[num_images, 3\]"),
        (lambda d: (torch.randn(4, d), torch.tensor([[1.0, 2.0, 2.0]])), TypeError, "integer"),
        (lambda d: (torch.randn(4, d), torch.tensor([[1, 0, 2]])), ValueError, "positive"),
        (lambda d: (torch.randn(4, d), torch.tensor([[1, -2, -2]])), ValueError, "positive"),
        (lambda d: (torch.randn(5, d), torch.tensor([[1, 2, 2]])), ValueError, r"sum\(t\*h\*w\) = 4 .* 5"),
        (lambda d: (torch.randn(4, d), None), ValueError, "grid_thw is required"),
        (lambda d: (torch.randint(0, 9, (4, d)), torch.tensor([[1, 2, 2]])), TypeError, "floating-point"),
        (lambda d: (torch.full((4, d), float("nan")), torch.tensor([[1, 2, 2]])), ValueError, "NaN or Inf"),
        (lambda d: (torch.full((4, d), float("inf")), torch.tensor([[1, 2, 2]])), ValueError, "NaN or Inf"),
    ],
    ids=[
        "hidden_3d", "wrong_patch_dim", "grid_1d", "grid_4_cols", "grid_float", "grid_zero", "grid_negative",
        "total_mismatch", "grid_missing", "integer_patches", "nan", "inf",
    ],
)  # fmt: skip
def test_bad_input_is_refused(model, make_input, error, message):
    hidden_states, grid_thw = make_input(patch_dim(model))
    with pytest.raises(error, match=message):
        model(hidden_states, grid_thw)


def test_zero_images_give_empty_outputs(model):
    out = model(torch.empty(0, patch_dim(model)), torch.empty(0, 3, dtype=torch.long), output_hidden_states=True)
    assert out.last_hidden_state.shape == (0, model.config.hidden_size)
    assert out.pooler_output.shape == (0, model.config.hidden_size)
    assert all(h.shape[0] == 0 for h in out.hidden_states)


def test_grid_as_list_is_accepted(model):
    hidden_states, grid_thw = random_packed([(1, 2, 3)], patch_dim(model))
    torch.testing.assert_close(
        model(hidden_states, grid_thw.tolist()).last_hidden_state, model(hidden_states, grid_thw).last_hidden_state
    )


def test_unknown_backend_is_refused():
    from packed_vit import Siglip2PackingVisionConfig, Siglip2PackingVisionModel

    with pytest.raises(ValueError, match="Unknown attn_implementation='flash_attention_9'"):
        Siglip2PackingVisionModel(Siglip2PackingVisionConfig(num_hidden_layers=1, attn_implementation="flash_attention_9"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of a CUDA-only kernel")
@pytest.mark.parametrize("backend", ["varlen_attn", "flash_attention_2"])
def test_flash_backend_on_cpu_says_so(model, backend):
    from packed_vit.modeling.attention import check_attn_implementation

    hidden_states, grid_thw = random_packed([(1, 2, 3)], patch_dim(model))
    try:
        check_attn_implementation(backend)
    except ValueError as err:  # not installed here: the error names what to install
        assert "pip install" in str(err) or "torch >=" in str(err)
        return
    model.config._attn_implementation = backend
    with pytest.raises(ValueError, match="CUDA fp16/bf16 only"):
        model(hidden_states, grid_thw)
