"""from_pretrained reads every checkpoint format of DESIGN §4, strictly (CPU; no Hub: the tests write the checkpoints).

Each format is written from a reference pair (transformers' tower + ours with the same perturbed weights), loaded
back with our `from_pretrained`, and must give the reference's numbers (DESIGN §7, fp32) and exactly its weights.
"""

import os
import re
import subprocess
import sys

import checkpoint_formats as formats
import pytest
import torch
from reference import (
    FP32_REL_TOL,
    aimv2_pair,
    aimv2_reference,
    random_packed,
    rel_err,
    siglip2_pair,
    siglip2_reference,
    split_frames,
)
from safetensors.torch import load_file, save_file

from packed_vit import Aimv2PackingVisionModel, Siglip2PackingVisionModel
from packed_vit.modeling.conversion_aimv2 import convert_aimv2_config, convert_aimv2_state_dict
from packed_vit.modeling.conversion_siglip2 import convert_siglip2_state_dict

SIGLIP2_GRIDS = [(1, 1, 1), (1, 3, 7), (2, 5, 4), (1, 17, 2)]
AIMV2_NATIVE_GRIDS = [(1, 1, 5), (1, 6, 4), (2, 3, 3)]
AIMV2_TRAINED_GRIDS = [(1, 8, 8), (2, 8, 8)]  # SMALL_AIMV2: image_size 32, patch 4; the reference runs only there


def assert_loaded(model, ours, ref, run_reference, grids):
    """`model` holds exactly `ours`' weights, and matches the reference tower within FP32_REL_TOL."""
    expected = ours.state_dict()
    assert model.state_dict().keys() == expected.keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, expected[name]), name
    config = model.config
    hidden_states, grid_thw = random_packed(grids, config.num_channels * config.patch_size**2)
    with torch.no_grad():
        out = model(hidden_states, grid_thw)
        ref_last, ref_pooled = run_reference(ref, hidden_states, grid_thw)
    for i, (a, b) in enumerate(zip(split_frames(out.last_hidden_state, grid_thw), ref_last, strict=True)):
        assert rel_err(a, b) <= FP32_REL_TOL, f"frame {i} last_hidden_state rel err {rel_err(a, b):.2e}"
    if config.use_head:
        for i, (a, b) in enumerate(zip(out.pooler_output, ref_pooled, strict=True)):
            assert rel_err(a, b) <= FP32_REL_TOL, f"frame {i} pooler_output rel err {rel_err(a, b):.2e}"
    else:
        assert out.pooler_output is None


# ---- every format loads, with the reference's numbers ------------------------------------------------------------

SIGLIP2_FORMATS = [
    formats.siglip2_full_model,
    formats.vision_model,
    formats.vision_model_prefixed,
    formats.sharded,
    formats.pickle_bin,
    formats.packed_round_trip,
    formats.exported_remote_code,
]


@pytest.mark.parametrize("write", SIGLIP2_FORMATS, ids=lambda write: write.__name__)
def test_siglip2_format_loads(write, tmp_path):
    ref, ours = siglip2_pair()
    write(ref, ours, tmp_path)
    model = Siglip2PackingVisionModel.from_pretrained(tmp_path)
    assert_loaded(model, ours, ref, siglip2_reference, SIGLIP2_GRIDS)


def test_siglip2_without_head(tmp_path):
    ref, ours = siglip2_pair(use_head=False)
    formats.siglip2_full_model(ref, ours, tmp_path)
    model = Siglip2PackingVisionModel.from_pretrained(tmp_path)
    assert not model.config.vision_use_head
    assert_loaded(model, ours, ref, siglip2_reference, SIGLIP2_GRIDS)


# (writer, reference pair options): the Apple original is headless (its LiT variant has the head) and learned-
# position unless native; the transformers formats are tried both ways.
AIMV2_FORMATS = [
    (formats.vision_model, dict(is_native=True)),
    (formats.vision_model, dict(is_native=False, use_head=False)),
    (formats.aimv2_lit_model, dict(is_native=False)),
    (formats.apple_original, dict(is_native=False, use_head=False)),
    (formats.apple_original, dict(is_native=True, use_head=False)),
    (formats.apple_original_lit, dict(is_native=False, use_head=True)),
    (formats.sharded, dict(is_native=True, qkv_bias=True, mlp_bias=True)),
    (formats.packed_round_trip, dict(is_native=False)),
]


@pytest.mark.parametrize(
    "write, pair_options",
    AIMV2_FORMATS,
    ids=[f"{write.__name__}-{'native' if o['is_native'] else 'learned'}" for write, o in AIMV2_FORMATS],
)
def test_aimv2_format_loads(write, pair_options, tmp_path):
    ref, ours = aimv2_pair(**pair_options)
    write(ref, ours, tmp_path)
    model = Aimv2PackingVisionModel.from_pretrained(tmp_path)
    assert (model.config.is_native, model.config.use_head) == (ref.config.is_native, ref.config.use_head)
    grids = AIMV2_NATIVE_GRIDS if ref.config.is_native else AIMV2_TRAINED_GRIDS
    assert_loaded(model, ours, ref, aimv2_reference, grids)


def test_apple_original_bias_flags(tmp_path):
    # Apple's `use_bias` (MLP and projection biases) is our `mlp_bias`; with qkv_bias both, every bias is there.
    ref, ours = aimv2_pair(is_native=True, use_head=False, qkv_bias=True, mlp_bias=True)
    formats.apple_original(ref, ours, tmp_path)
    model = Aimv2PackingVisionModel.from_pretrained(tmp_path)
    assert model.config.mlp_bias and model.config.qkv_bias
    assert_loaded(model, ours, ref, aimv2_reference, AIMV2_NATIVE_GRIDS)


# ---- the pure conversions ----------------------------------------------------------------------------------------


def test_apple_original_names_and_shapes():
    # DESIGN §4's table, written out for block 0 independently of the conversion's own table.
    dim, qkv = 4, torch.arange(12 * 4.0).reshape(12, 4)
    original = {
        "preprocessor.patchifier.proj.weight": torch.zeros(dim, 3, 2, 2),
        "preprocessor.patchifier.proj.bias": torch.zeros(dim),
        "preprocessor.patchifier.norm.weight": torch.zeros(dim),
        "preprocessor.pos_embed": torch.arange(9 * dim * 1.0).reshape(1, 9, dim),
        "trunk.blocks.0.attn.qkv.weight": qkv,
        "trunk.blocks.0.attn.proj.weight": torch.zeros(dim, dim),
        "trunk.blocks.0.mlp.fc1.weight": torch.full((6, dim), 1.0),
        "trunk.blocks.0.mlp.fc2.weight": torch.full((dim, 6), 2.0),
        "trunk.blocks.0.mlp.fc3.weight": torch.full((6, dim), 3.0),
        "trunk.blocks.0.norm_1.weight": torch.zeros(dim),
        "trunk.blocks.0.norm_2.weight": torch.zeros(dim),
        "trunk.post_trunk_norm.weight": torch.zeros(dim),
    }
    canonical = convert_aimv2_state_dict(original)
    assert sorted(canonical) == sorted([
        "embeddings.patch_embed.weight", "embeddings.patch_embed.bias", "embeddings.rms_norm.weight",
        "embeddings.position_embedding.weight", "encoder.layers.0.attention.q_proj.weight",
        "encoder.layers.0.attention.k_proj.weight", "encoder.layers.0.attention.v_proj.weight",
        "encoder.layers.0.attention.out_proj.weight", "encoder.layers.0.ffn.gate_proj.weight",
        "encoder.layers.0.ffn.down_proj.weight", "encoder.layers.0.ffn.up_proj.weight",
        "encoder.layers.0.rms_norm1.weight", "encoder.layers.0.rms_norm2.weight", "rms_norm.weight",
    ])  # fmt: skip
    assert torch.equal(canonical["encoder.layers.0.attention.q_proj.weight"], qkv[0:4])
    assert torch.equal(canonical["encoder.layers.0.attention.k_proj.weight"], qkv[4:8])
    assert torch.equal(canonical["encoder.layers.0.attention.v_proj.weight"], qkv[8:12])
    assert torch.equal(canonical["embeddings.position_embedding.weight"], original["preprocessor.pos_embed"][0])
    # SwiGLU: down(silu(gate(x)) * up(x)) is Apple's fc2(silu(fc1(x)) * fc3(x))
    assert canonical["encoder.layers.0.ffn.gate_proj.weight"].eq(1).all()
    assert canonical["encoder.layers.0.ffn.down_proj.weight"].eq(2).all()
    assert canonical["encoder.layers.0.ffn.up_proj.weight"].eq(3).all()


def test_apple_lit_head_names():
    head = {"cls_token": torch.zeros(1, 1, 4), "k.weight": torch.zeros(4, 4), "v.weight": torch.zeros(4, 4),
            "linear.weight": torch.zeros(4, 4), "linear.bias": torch.zeros(4)}  # fmt: skip
    lit = {f"image_encoder.head.{k}": v for k, v in head.items()}
    lit["image_encoder.preprocessor.patchifier.proj.weight"] = torch.zeros(4, 3, 2, 2)
    lit["text_encoder.trunk.post_trunk_norm.weight"] = torch.zeros(4)  # dropped: the text tower
    assert sorted(convert_aimv2_state_dict(lit)) == [
        "embeddings.patch_embed.weight", "head.cls_token", "head.k_proj.weight", "head.output_proj.bias",
        "head.output_proj.weight", "head.v_proj.weight",
    ]  # fmt: skip


def test_siglip2_full_model_drops_text_tower_and_logit_scalars():
    tensors = {"vision_model.embeddings.patch_embedding.weight": torch.zeros(2), "text_model.x.weight": torch.zeros(2),
               "logit_scale": torch.zeros(()), "logit_bias": torch.zeros(())}  # fmt: skip
    assert list(convert_siglip2_state_dict(tensors)) == ["embeddings.patch_embedding.weight"]


def test_apple_config_reads_the_weights_for_native_and_head():
    config = {"model_type": "aimv2", "hidden_size": 8, "use_bias": True, "qkv_bias": False}
    native = ["preprocessor.patchifier.proj.weight", "trunk.blocks.0.norm_1.weight"]
    lit = [f"image_encoder.{k}" for k in [*native, "preprocessor.pos_embed", "head.k.weight"]]
    expected = dict(hidden_size=8, mlp_bias=True, qkv_bias=False, is_native=True, use_head=False)
    assert convert_aimv2_config(config, native) == expected
    lit_config = convert_aimv2_config({"model_type": "aimv2", "vision_config": config, "text_config": {}}, lit)
    assert (lit_config["is_native"], lit_config["use_head"]) == (False, True)


# ---- strictness: refused, naming the keys -----------------------------------------------------------------------


@pytest.fixture
def siglip2_checkpoint(tmp_path):
    """(folder, weights) of a Siglip2VisionModel checkpoint with unprefixed keys, for the tests to spoil."""
    ref, ours = siglip2_pair()
    ref.config.save_pretrained(tmp_path)
    formats.save_weights(ours.state_dict(), tmp_path)
    return tmp_path, load_file(tmp_path / "model.safetensors")


def rewrite(folder, tensors):
    save_file(tensors, folder / "model.safetensors", {"format": "pt"})


def test_missing_key_is_refused(siglip2_checkpoint):
    folder, tensors = siglip2_checkpoint
    del tensors["encoder.layers.1.mlp.fc2.bias"]
    rewrite(folder, tensors)
    with pytest.raises(ValueError, match=r"missing from the checkpoint .*: encoder\.layers\.1\.mlp\.fc2\.bias"):
        Siglip2PackingVisionModel.from_pretrained(folder)


def test_extra_key_is_refused(siglip2_checkpoint):
    folder, tensors = siglip2_checkpoint
    tensors["encoder.layers.0.mlp.fc3.weight"] = torch.zeros(3)
    rewrite(folder, tensors)
    with pytest.raises(ValueError, match=r"neither used nor on the known drop-list: encoder\.layers\.0\.mlp\.fc3\."):
        Siglip2PackingVisionModel.from_pretrained(folder)


def test_wrong_shape_is_refused(siglip2_checkpoint):
    folder, tensors = siglip2_checkpoint
    tensors["embeddings.position_embedding.weight"] = torch.zeros(100, 64)
    rewrite(folder, tensors)
    expected = r"shape mismatch: embeddings\.position_embedding\.weight \(checkpoint \(100, 64\), model \(256, 64\)\)"
    with pytest.raises(ValueError, match=expected):
        Siglip2PackingVisionModel.from_pretrained(folder)


def test_apple_original_missing_block_is_refused(tmp_path):
    ref, ours = aimv2_pair(is_native=True, use_head=False)
    formats.apple_original(ref, ours, tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["trunk.blocks.1.attn.qkv.weight"]
    rewrite(tmp_path, tensors)
    with pytest.raises(ValueError, match=r"missing .*encoder\.layers\.1\.attention\.k_proj\.weight"):
        Aimv2PackingVisionModel.from_pretrained(tmp_path)


def test_unknown_weight_format_is_refused(siglip2_checkpoint):
    folder, tensors = siglip2_checkpoint
    rewrite(folder, {f"backbone.{k}": v for k, v in tensors.items()})
    with pytest.raises(ValueError, match=r"Unknown checkpoint format: not a Siglip2 checkpoint .* backbone\.embed"):
        Siglip2PackingVisionModel.from_pretrained(folder)


def test_unknown_config_format_is_refused(siglip2_checkpoint):
    folder, _ = siglip2_checkpoint
    formats.save_config({"model_type": "clip_vision_model", "hidden_size": 64}, folder)
    with pytest.raises(ValueError, match="Unknown checkpoint format: config.json has model_type 'clip_vision_model'"):
        Siglip2PackingVisionModel.from_pretrained(folder)


def test_other_towers_checkpoint_is_refused(tmp_path):
    ref, ours = aimv2_pair()
    formats.vision_model(ref, ours, tmp_path)
    with pytest.raises(ValueError, match="model_type 'aimv2_vision_model', which is not a Siglip2 checkpoint"):
        Siglip2PackingVisionModel.from_pretrained(tmp_path)


def test_pickle_is_loaded_weights_only(tmp_path):
    # weights_only=True refuses a pickle that would build arbitrary objects (here a stand-in for code execution).
    ref, ours = siglip2_pair()
    formats.pickle_bin(ref, ours, tmp_path)
    torch.save({"embeddings.patch_embedding.weight": torch.nn.Linear(2, 2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights only load failed|weights_only"):
        Siglip2PackingVisionModel.from_pretrained(tmp_path)


def test_safetensors_come_before_pickle(siglip2_checkpoint):
    folder, tensors = siglip2_checkpoint
    torch.save({k: torch.zeros_like(v) for k, v in tensors.items()}, folder / "pytorch_model.bin")
    from_safetensors = Siglip2PackingVisionModel.from_pretrained(folder)
    assert torch.equal(from_safetensors.post_layernorm.weight, tensors["post_layernorm.weight"])
    from_pickle = Siglip2PackingVisionModel.from_pretrained(folder, use_safetensors=False)
    assert from_pickle.post_layernorm.weight.eq(0).all()


def test_missing_weights_are_refused(tmp_path):
    ref, ours = siglip2_pair()
    ref.config.save_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="has no weights"):
        Siglip2PackingVisionModel.from_pretrained(tmp_path)


# ---- by Hub id, from the HF cache, offline ------------------------------------------------------------------------

REPO_ID, COMMIT_A, COMMIT_B = "google/siglip2-tiny-naflex", "a" * 40, "b" * 40


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An HF cache holding repo `google/siglip2-tiny-naflex` (full Siglip2Model format) at two commits, main = B;
    offline. Returns (cache_dir, {commit: our model with that commit's weights}, reference of commit B)."""
    cache, expected = tmp_path / "hub", {}
    for commit in (COMMIT_A, COMMIT_B):
        ref, ours = siglip2_pair()
        formats.siglip2_full_model(ref, ours, tmp_path / commit)
        formats.put_in_hub_cache(cache, REPO_ID, tmp_path / commit, commit, main=commit == COMMIT_B)
        expected[commit] = ours
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache, expected, ref


def test_hub_id_from_cache_offline(hub_cache):
    cache, expected, ref = hub_cache
    model = Siglip2PackingVisionModel.from_pretrained(REPO_ID, cache_dir=cache)
    assert_loaded(model, expected[COMMIT_B], ref, siglip2_reference, SIGLIP2_GRIDS)


def test_hub_revision_is_honoured(hub_cache):
    cache, expected, _ = hub_cache
    model = Siglip2PackingVisionModel.from_pretrained(REPO_ID, revision=COMMIT_A, cache_dir=cache)
    assert torch.equal(model.post_layernorm.weight, expected[COMMIT_A].post_layernorm.weight)


def test_hub_revision_not_in_cache_offline(hub_cache):
    cache, _, _ = hub_cache
    with pytest.raises(FileNotFoundError, match="offline: only the local HF cache was searched"):
        Siglip2PackingVisionModel.from_pretrained(REPO_ID, revision="c" * 40, cache_dir=cache)


def test_hub_id_with_hf_hub_cache_and_offline_env(hub_cache, tmp_path):
    # What a user runs: HF_HUB_CACHE / HF_HUB_OFFLINE in the environment (read by huggingface_hub at import, hence
    # a fresh process), the Hub id alone in the call.
    cache, expected, _ = hub_cache
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    script = (
        "import sys, torch; from packed_vit import Siglip2PackingVisionModel as M; "
        "torch.save(M.from_pretrained(sys.argv[2]).state_dict(), sys.argv[1])"
    )
    command = [sys.executable, "-c", script, tmp_path / "loaded.pt", REPO_ID]
    subprocess.run(command, env=env, check=True, capture_output=True)
    loaded = torch.load(tmp_path / "loaded.pt", weights_only=True)
    assert all(torch.equal(t, loaded[k]) for k, t in expected[COMMIT_B].state_dict().items())


# ---- from_pretrained's options -------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    ref, ours = aimv2_pair(is_native=False)
    ours.save_pretrained(tmp_path)
    return tmp_path, ours


@pytest.mark.parametrize("dtype_kwargs", [{"dtype": torch.bfloat16}, {"torch_dtype": "bfloat16"}], ids=str)
def test_dtype(saved, dtype_kwargs):
    folder, ours = saved
    model = Aimv2PackingVisionModel.from_pretrained(folder, **dtype_kwargs)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert torch.equal(model.rms_norm.weight, ours.rms_norm.weight.bfloat16())


def test_dtype_defaults_to_the_checkpoints(saved, tmp_path):
    folder, ours = saved
    ours.to(torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert Aimv2PackingVisionModel.from_pretrained(tmp_path / "bf16").dtype == torch.bfloat16
    assert Aimv2PackingVisionModel.from_pretrained(folder).dtype == torch.float32


def test_attn_implementation(saved):
    folder, _ = saved
    model = Aimv2PackingVisionModel.from_pretrained(folder, attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="Unknown attn_implementation='flash_attention_9'"):
        Aimv2PackingVisionModel.from_pretrained(folder, attn_implementation="flash_attention_9")


def test_config_overrides(saved):
    folder, _ = saved
    model = Aimv2PackingVisionModel.from_pretrained(folder, position_resize_mode=None, output_hidden_states=True)
    assert model.config.position_resize_mode is None and model.config.output_hidden_states


def test_transformers_loading_plumbing_is_ignored(saved):
    # What AutoModel.from_pretrained(..., trust_remote_code=True) passes along on transformers 4.57 and 5.x.
    folder, ours = saved
    plumbing = dict(trust_remote_code=True, _from_auto=True, code_revision=None, _commit_hash="0" * 40,
                    adapter_kwargs={}, low_cpu_mem_usage=True, force_download=False, local_files_only=False,
                    revision=None, subfolder="", token=None, cache_dir=None)  # fmt: skip
    model = Aimv2PackingVisionModel.from_pretrained(folder, config=ours.config, **plumbing)
    assert torch.equal(model.rms_norm.weight, ours.rms_norm.weight)


UNSUPPORTED_REQUESTS = {  # what transformers would honour, which we refuse rather than ignore -> the error says
    "variant": ({"variant": "fp16"}, "variant='fp16'"),
    "device_map": ({"device_map": "auto"}, "device_map='auto' is not supported"),
    "weights_only": ({"weights_only": False}, "weights_only=False"),
    "ignore_mismatched_sizes": ({"ignore_mismatched_sizes": True}, "ignore_mismatched_sizes=True"),
    "adapter": ({"adapter_kwargs": {"_adapter_model_path": "some/adapter"}}, "a PEFT adapter"),
    "quantization": ({"quantization_config": {"load_in_8bit": True}}, "quantization_config="),
}


@pytest.mark.parametrize("request_kwargs, message", UNSUPPORTED_REQUESTS.values(), ids=UNSUPPORTED_REQUESTS)
def test_unsupported_loading_requests_are_refused(saved, request_kwargs, message):
    folder, _ = saved
    with pytest.raises(ValueError, match=re.escape(message)):
        Aimv2PackingVisionModel.from_pretrained(folder, **request_kwargs)


def test_unknown_kwarg_is_refused(saved):
    folder, _ = saved
    with pytest.raises(TypeError, match="unexpected keyword argument.*: not_a_field"):
        Aimv2PackingVisionModel.from_pretrained(folder, not_a_field=1)


def test_auto_model_remote_code_runs_our_loader(tmp_path):
    # AutoModel.from_pretrained(export, trust_remote_code=True) as a user runs it on the exported folder (fresh
    # process, its own module cache), passing dtype and backend through AutoModel's own kwargs plumbing.
    ref, ours = aimv2_pair(is_native=False)
    formats.exported_remote_code(ref, ours, tmp_path / "export")
    torch.save(ours.state_dict(), tmp_path / "expected.pt")
    script = (
        "import sys, torch, transformers; "
        "m = transformers.AutoModel.from_pretrained(sys.argv[1], trust_remote_code=True, dtype=torch.bfloat16, "
        "attn_implementation='eager'); expected = torch.load(sys.argv[2], weights_only=True); "
        "assert m.config._attn_implementation == 'eager', m.config._attn_implementation; "
        "assert m.state_dict().keys() == expected.keys(); "
        "assert all(torch.equal(t, expected[k].bfloat16()) for k, t in m.state_dict().items()); "
        "assert 'packed_vit' not in sys.modules and type(m).__module__.startswith('transformers_modules')"
    )
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", script, tmp_path / "export", tmp_path / "expected.pt"], env=env,
                          capture_output=True, text=True, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]


def test_auto_model_and_seed_alias(saved):
    import transformers

    from packed_vit import AIMv2Packing

    folder, ours = saved
    model = transformers.AutoModel.from_pretrained(folder)
    assert type(model) is Aimv2PackingVisionModel
    assert torch.equal(model.rms_norm.weight, ours.rms_norm.weight)
    assert torch.equal(AIMv2Packing(ckpt=str(folder)).model.rms_norm.weight, ours.rms_norm.weight)
