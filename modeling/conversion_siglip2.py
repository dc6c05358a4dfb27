"""Siglip2 checkpoints (DESIGN §4) -> our config kwargs and the canonical state dict.

Canonical names are transformers' `Siglip2VisionModel` keys without any `vision_model.` prefix, so the conversion
is only: find the tower's keys, strip their prefix, drop the parts of the checkpoint that are not the tower.

Sources (config model_type; weight keys):
- google/siglip2-*-naflex, a full `Siglip2Model`: `siglip2`, the tower under `vision_config`; `vision_model.*`,
  beside the text tower and the logit scale and bias (dropped).
- a transformers `Siglip2VisionModel`: `siglip2_vision_model`; `vision_model.*` (4.x saves) or unprefixed (5.x).
- this project's saves: `siglip2_packing_vision`; canonical.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from .checkpoint_loading import CheckpointFormat, check_model_type, config_fields, detect_format, tower_tensors

MODEL_TYPES = ("siglip2", "siglip2_vision_model", "siglip2_packing_vision")

FORMATS = (
    CheckpointFormat("transformers, vision_model.-prefixed", "vision_model.", "embeddings.patch_embedding.weight"),
    CheckpointFormat("canonical / transformers 5 Siglip2VisionModel", "", "embeddings.patch_embedding.weight"),
)

# Keys of Siglip2 checkpoints that are not the vision tower's weights: dropped on purpose, never an error.
DROPPED_KEYS = re.compile(
    r"text_model\..*"  # the text tower of a full Siglip2Model
    r"|logit_scale|logit_bias"  # its contrastive-loss scalars
    r"|(vision_model\.)?embeddings\.position_ids"  # an index buffer some older saves contain
)

# Siglip2VisionConfig's fields: our config takes them with the same names and defaults.
VISION_CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "patch_size",
    "hidden_act", "layer_norm_eps", "attention_dropout", "vision_use_head", "num_patches", "initializer_range",
)  # fmt: skip


def convert_siglip2_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any Siglip2 checkpoint's tensors -> the canonical vision-tower state dict (pure; the layout is read from the
    keys). Keys neither of the tower nor on `DROPPED_KEYS` are kept as they are, for the strict check to name."""
    checkpoint_format = detect_format(FORMATS, state_dict, "Siglip2")
    return tower_tensors(state_dict, checkpoint_format.prefix, DROPPED_KEYS)


def convert_siglip2_config(config: Mapping, checkpoint_keys: Iterable[str] = ()) -> dict:
    """A Siglip2 config.json dict -> `Siglip2PackingVisionConfig` kwargs. Fields it leaves out get the defaults of
    transformers' `Siglip2VisionConfig`, which are ours."""
    model_type = check_model_type(config, MODEL_TYPES, "Siglip2")
    if model_type == "siglip2_packing_vision":
        return dict(config)  # our own: every field, ours included
    vision = (config.get("vision_config") or {}) if model_type == "siglip2" else config
    return config_fields(vision, VISION_CONFIG_FIELDS)
