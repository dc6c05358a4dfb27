"""Checkpoints in the original formats of DESIGN §4, written from a vision config and its canonical weights.

What `python -m packed_vit demo` loads (no network: it makes its checkpoints) and what the loading tests write:

- `write_siglip2_full_model`: google/siglip2-*-naflex, a whole transformers `Siglip2Model` (vision tower under
  `vision_model.*`, a small text tower, `logit_scale` / `logit_bias`), saved by transformers itself;
- `write_apple_original`: apple/aimv2-* at their pinned revisions, Apple's own layout (`preprocessor.*`, `trunk.*`,
  fused qkv, flat `AIMv2Config`), written from DESIGN §4's table read in reverse (conversion_aimv2's
  `APPLE_ORIGINAL_NAMES`), since transformers cannot write it.

`canonical` weights are a state dict under transformers' vision-model names without prefix (our models' state dict,
or transformers' `Siglip2VisionModel` / `Aimv2VisionModel` one).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import Siglip2Config, Siglip2Model

from .modeling.conversion_aimv2 import APPLE_ORIGINAL_NAMES, POSITION_TABLE, compile_name_table, rename_key

# The text tower a full Siglip2Model checkpoint carries beside the vision tower: as small as transformers allows.
TINY_TEXT = dict(
    vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
    pad_token_id=1, bos_token_id=2, eos_token_id=3,
)  # fmt: skip


@torch.no_grad()
def perturb_(model: torch.nn.Module, scale: float = 0.05) -> torch.nn.Module:
    """Moves every parameter off its init (biases and norms included) so no check relies on init values."""
    for p in model.parameters():
        p.add_(torch.randn_like(p) * scale)
    return model


def save_weights(state_dict: Mapping[str, torch.Tensor], folder) -> None:
    save_file({k: v.contiguous() for k, v in state_dict.items()}, Path(folder) / "model.safetensors", {"format": "pt"})


def save_config(config: dict, folder) -> None:
    (Path(folder) / "config.json").write_text(json.dumps(config, indent=2))


# ---- google/siglip2-*-naflex ------------------------------------------------------------------------------------


def write_siglip2_full_model(vision_config, canonical: Mapping[str, torch.Tensor], folder) -> None:
    """A whole `Siglip2Model` (model_type siglip2, nested vision/text configs) whose vision tower holds `canonical`.

    `vision_config`: a `Siglip2VisionConfig` (or its dict). The text tower keeps its random init.
    """
    if not isinstance(vision_config, dict):
        vision_config = vision_config.to_dict()
    full = Siglip2Model(Siglip2Config(vision_config=vision_config, text_config=TINY_TEXT))
    full.vision_model.load_state_dict(canonical)
    full.save_pretrained(folder)


# ---- Apple's original AIMv2 layout ------------------------------------------------------------------------------

CANONICAL_TO_APPLE = compile_name_table({canonical: original for original, canonical in APPLE_ORIGINAL_NAMES.items()})
SEPARATE_QKV = re.compile(r"(?P<module>encoder\.layers\.\d+\.attention\.)q_proj\.(?P<param>weight|bias)")


def to_apple_original(canonical: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
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
    if unmapped:
        raise ValueError(f"DESIGN §4's table does not cover {unmapped}")
    return original


def apple_config(config) -> dict:
    """Apple's `AIMv2Config` fields for an `Aimv2VisionConfig`: flat, `use_bias` for the MLP and projection biases."""
    return {
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers, "num_attention_heads": config.num_attention_heads,
        "num_channels": config.num_channels, "image_size": config.image_size, "patch_size": config.patch_size,
        "rms_norm_eps": config.rms_norm_eps, "attention_dropout": 0.0, "projection_dropout": 0.0,
        "qkv_bias": config.qkv_bias, "use_bias": config.mlp_bias,
        "model_type": "aimv2", "torch_dtype": "float32", "transformers_version": "4.46.0",
    }  # fmt: skip


def write_apple_original(vision_config, canonical: Mapping[str, torch.Tensor], folder) -> None:
    """apple/aimv2-* original (224/336/448, or native without `pos_embed`): flat config, `preprocessor.*`/`trunk.*`.

    `vision_config`: an `Aimv2VisionConfig` (or ours); `canonical`: a headless tower's weights (Apple's original
    non-LiT checkpoints have no head).
    """
    config = {**apple_config(vision_config), "architectures": ["AIMv2Model"]}
    config["auto_map"] = {"AutoConfig": "configuration_aimv2.AIMv2Config", "AutoModel": "modeling_aimv2.AIMv2Model"}
    save_config(config, folder)
    save_weights(to_apple_original(canonical), folder)
