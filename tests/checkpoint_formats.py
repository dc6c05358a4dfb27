"""Writers of every checkpoint format of DESIGN §4, from a reference pair of tests/reference.py, as their makers
write them: transformers' own `save_pretrained` where transformers makes the format, and Apple's original layout
written from DESIGN §4's table (conversion_aimv2.APPLE_ORIGINAL_NAMES, read in reverse).

Each writer is `write(ref, ours, folder)`: `ref` the transformers reference tower, `ours` our model holding the same
weights (its state dict is the canonical one on every transformers version).
"""

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Aimv2Config, Aimv2Model, Siglip2Config, Siglip2Model

from packed_vit.modeling.conversion_aimv2 import APPLE_ORIGINAL_NAMES, POSITION_TABLE, compile_name_table, rename_key

REPO = Path(__file__).resolve().parent.parent
TINY_TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
    pad_token_id=1, bos_token_id=2, eos_token_id=3,
)  # fmt: skip


def save_weights(state_dict, folder):
    save_file({k: v.contiguous() for k, v in state_dict.items()}, Path(folder) / "model.safetensors", {"format": "pt"})


def save_config(config: dict, folder):
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))


# ---- transformers' own formats ----------------------------------------------------------------------------------


def vision_model(ref, ours, folder):
    """`Siglip2VisionModel` / `Aimv2VisionModel.save_pretrained`."""
    ref.save_pretrained(folder)


def vision_model_prefixed(ref, ours, folder):
    """A vision model saved with `vision_model.`-prefixed keys, as transformers 4.x saves `Siglip2VisionModel`."""
    ref.config.save_pretrained(folder)
    save_weights({f"vision_model.{k}": v for k, v in ours.state_dict().items()}, folder)


def sharded(ref, ours, folder):
    """`save_pretrained` in small shards: `model.safetensors.index.json` + shard files."""
    ref.save_pretrained(folder, max_shard_size="20KB")
    assert (Path(folder) / "model.safetensors.index.json").exists()


def pickle_bin(ref, ours, folder):
    """An old-style `pytorch_model.bin` (+ config.json)."""
    ref.config.save_pretrained(folder)
    torch.save(ours.state_dict(), Path(folder) / "pytorch_model.bin")


def packed_round_trip(ref, ours, folder):
    """This project's own `save_pretrained` (model_type `*_packing_vision`)."""
    ours.save_pretrained(folder)


def exported_remote_code(ref, ours, folder):
    """This project's Hub export (DESIGN §5), minimally: our save, the code files flat with single-dot imports, and
    `auto_map` so that `AutoModel.from_pretrained(folder, trust_remote_code=True)` runs our `from_pretrained`."""
    ours.save_pretrained(folder)
    code = [f for f in [*REPO.glob("modeling/*.py"), *REPO.glob("configuration/*.py")] if f.name != "__init__.py"]
    for file in code:
        (Path(folder) / file.name).write_text(file.read_text().replace("from ..configuration.", "from ."))
    config = json.loads((Path(folder) / "config.json").read_text())
    tower = config["model_type"].removesuffix("_packing_vision")  # aimv2, siglip2
    config["auto_map"] = {
        "AutoConfig": f"configuration_{tower}_packing.{type(ours.config).__name__}",
        "AutoModel": f"modeling_{tower}_packing.{type(ours).__name__}",
    }
    save_config(config, folder)


def siglip2_full_model(ref, ours, folder):
    """google/siglip2-*-naflex: a whole `Siglip2Model` (vision + text tower, logit scale and bias)."""
    full = Siglip2Model(Siglip2Config(vision_config=ref.config.to_dict(), text_config=TINY_TEXT))
    full.vision_model.load_state_dict(ours.state_dict())
    full.save_pretrained(folder)


def aimv2_lit_model(ref, ours, folder):
    """apple/aimv2-*-lit at current main: a whole `Aimv2Model` (vision + text tower, projections, logit scale)."""
    full = Aimv2Model(Aimv2Config(vision_config=ref.config.to_dict(), text_config=TINY_TEXT))
    full.vision_model.load_state_dict(ours.state_dict())
    full.save_pretrained(folder)


# ---- Apple's original AIMv2 layout (the pinned revisions) -------------------------------------------------------

CANONICAL_TO_APPLE = compile_name_table({canonical: original for original, canonical in APPLE_ORIGINAL_NAMES.items()})
SEPARATE_QKV = re.compile(r"(?P<module>encoder\.layers\.\d+\.attention\.)q_proj\.(?P<param>weight|bias)")


def to_apple_original(canonical: dict) -> dict:
    """Canonical AIMv2 tensors -> Apple's original names and shapes: q/k/v fused, the position table (1, N, D)."""
    state_dict = dict(canonical)
    for key in list(state_dict):
        separate = SEPARATE_QKV.fullmatch(key)
        if separate:
            module, param = separate["module"], separate["param"]
            parts = [state_dict.pop(f"{module}{part}_proj.{param}") for part in "qkv"]
            state_dict[f"{module}qkv.{param}"] = torch.cat(parts)
    if POSITION_TABLE in state_dict:
        state_dict[POSITION_TABLE] = state_dict[POSITION_TABLE][None]
    original = {rename_key(key, CANONICAL_TO_APPLE): tensor for key, tensor in state_dict.items()}
    unmapped = [key for key in original if not key.startswith(("preprocessor.", "trunk.", "head."))]
    assert not unmapped, f"DESIGN §4's table does not cover {unmapped}"
    return original


def apple_config(config) -> dict:
    """Apple's `AIMv2Config` fields for a reference config: flat, `use_bias` for the MLP and projection biases."""
    return {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_channels": config.num_channels, "image_size": config.image_size, "patch_size": config.patch_size,
        "rms_norm_eps": config.rms_norm_eps, "attention_dropout": 0.0, "projection_dropout": 0.0,
        "qkv_bias": config.qkv_bias, "use_bias": config.mlp_bias,
        "model_type": "aimv2", "torch_dtype": "float32", "transformers_version": "4.46.0",
    }  # fmt: skip


def apple_original(ref, ours, folder):
    """apple/aimv2-* original (224/336/448, or native without `pos_embed`): flat config, `preprocessor.*`/`trunk.*`."""
    config = {**apple_config(ref.config), "architectures": ["AIMv2Model"]}
    config["auto_map"] = {"AutoConfig": "configuration_aimv2.AIMv2Config", "AutoModel": "modeling_aimv2.AIMv2Model"}
    save_config(config, folder)
    save_weights(to_apple_original(ours.state_dict()), folder)


def apple_original_lit(ref, ours, folder):
    """apple/aimv2-*-lit original: Apple's vision/text configs nested, the tower (with its head) under
    `image_encoder.`, and the text tower, projections and logit scale beside it."""
    text = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_context_length": 8, "model_type": "aimv2"}  # fmt: skip
    vision = {**apple_config(ref.config), "num_queries": 1}
    save_config({"model_type": "aimv2", "architectures": ["AIMv2Model"], "projection_dim": 16,
                 "vision_config": vision, "text_config": text}, folder)  # fmt: skip
    tensors = {f"image_encoder.{k}": v for k, v in to_apple_original(ours.state_dict()).items()}
    tensors.update({
        "text_encoder.preprocessor.text_embedding.weight": torch.randn(64, 32),
        "text_encoder.preprocessor.positional_embedding": torch.randn(8, 32),
        "text_encoder.trunk.blocks.0.attn.qkv.weight": torch.randn(96, 32),
        "text_encoder.trunk.post_trunk_norm.weight": torch.randn(32),
        "image_projector.weight": torch.randn(16, ref.config.hidden_size),
        "text_projector.weight": torch.randn(16, 32),
        "log_logit_scale": torch.tensor(2.6592),
    })  # fmt: skip
    save_weights(tensors, folder)


# ---- the Hub cache -----------------------------------------------------------------------------------------------


def put_in_hub_cache(cache_dir, repo_id: str, folder, commit: str, main: bool = True) -> None:
    """`folder` as snapshot `commit` of model repo `repo_id` in an HF hub cache (the layout huggingface_hub reads
    offline: models--org--name/snapshots/<commit>/..., refs/main)."""
    repo = Path(cache_dir) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / commit)
    if main:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)
