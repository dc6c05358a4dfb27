"""AIMv2 checkpoints (DESIGN §4) -> our config kwargs and the canonical state dict.

Canonical names are transformers' `Aimv2VisionModel` keys. Sources (config model_type; weight keys):
- apple/aimv2-* at current main, transformers `Aimv2VisionModel`: `aimv2_vision_model`; canonical.
- transformers `Aimv2Model` (LiT at current main): `aimv2`, the tower under `vision_config`; `vision_model.*`, beside
  the text tower, projections and logit scale (dropped).
- apple/aimv2-* in their original format (the pinned revisions): Apple's `AIMv2Config`, `aimv2`, flat fields;
  `preprocessor.*`, `trunk.*` (`APPLE_ORIGINAL_NAMES` below).
- Apple's original LiT: `aimv2`, Apple's fields under `vision_config`; the same under `image_encoder.`, with the
  head, beside the text tower, projections and logit scale (dropped).
- this project's saves: `aimv2_packing_vision`; canonical.

Apple's configs do not state what their weights show: a native-resolution checkpoint is the one without a position
table (`is_native`), and a LiT one has the attention-pooling head (`use_head`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

import torch

from .checkpoint_loading import CheckpointFormat, check_model_type, config_fields, detect_format, tower_tensors

MODEL_TYPES = ("aimv2", "aimv2_vision_model", "aimv2_packing_vision")

APPLE_MARKER = "preprocessor.patchifier.proj.weight"
CANONICAL_MARKER = "embeddings.patch_embed.weight"
POSITION_TABLE = "embeddings.position_embedding.weight"
FORMATS = (
    CheckpointFormat("Apple original LiT", "image_encoder.", APPLE_MARKER, position_key="preprocessor.pos_embed"),
    CheckpointFormat("Apple original", "", APPLE_MARKER, position_key="preprocessor.pos_embed"),
    CheckpointFormat("transformers Aimv2Model", "vision_model.", CANONICAL_MARKER, position_key=POSITION_TABLE),
    CheckpointFormat("canonical / Aimv2VisionModel", "", CANONICAL_MARKER, position_key=POSITION_TABLE),
)  # fmt: skip

# Keys of AIMv2 checkpoints that are not the vision tower's weights: dropped on purpose, never an error.
DROPPED_KEYS = re.compile(
    r"text_model\..*|text_encoder\..*"  # the text tower (transformers / Apple names)
    r"|visual_projection\..*|text_projection\..*|image_projector\..*|text_projector\..*"  # contrastive projections
    r"|logit_scale|log_logit_scale"
    r"|(vision_model\.)?embeddings\.position_ids"  # an index buffer some saves contain
)

# Apple's original names -> canonical. "{n}" is a block index; a name ending in "." maps that module's weight and
# bias. Two tensors also change form, after renaming: the position table (1, N, D) is squeezed to (N, D), and the
# fused qkv projection [3D, ...] is split in thirds into q_proj, k_proj, v_proj.
APPLE_ORIGINAL_NAMES = {
    "preprocessor.patchifier.proj.": "embeddings.patch_embed.",
    "preprocessor.patchifier.norm.": "embeddings.rms_norm.",
    "preprocessor.pos_embed": POSITION_TABLE,
    "trunk.blocks.{n}.attn.qkv.": "encoder.layers.{n}.attention.qkv.",
    "trunk.blocks.{n}.attn.proj.": "encoder.layers.{n}.attention.out_proj.",
    "trunk.blocks.{n}.mlp.fc1.": "encoder.layers.{n}.ffn.gate_proj.",  # SwiGLU: fc2(silu(fc1(x)) * fc3(x))
    "trunk.blocks.{n}.mlp.fc2.": "encoder.layers.{n}.ffn.down_proj.",
    "trunk.blocks.{n}.mlp.fc3.": "encoder.layers.{n}.ffn.up_proj.",
    "trunk.blocks.{n}.norm_1.": "encoder.layers.{n}.rms_norm1.",
    "trunk.blocks.{n}.norm_2.": "encoder.layers.{n}.rms_norm2.",
    "trunk.post_trunk_norm.": "rms_norm.",
    "head.cls_token": "head.cls_token",
    "head.k.": "head.k_proj.",
    "head.v.": "head.v_proj.",
    "head.linear.": "head.output_proj.",
}
FUSED_QKV = re.compile(r"(?P<module>encoder\.layers\.\d+\.attention\.)qkv\.(?P<param>weight|bias)")

# Aimv2VisionConfig's fields: our config takes them with the same names and defaults.
VISION_CONFIG_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_channels", "image_size",
    "patch_size", "hidden_act", "attention_dropout", "rms_norm_eps", "qkv_bias", "mlp_bias", "initializer_range",
    "use_head", "is_native",
)  # fmt: skip
APPLE_CONFIG_NAMES = {"use_bias": "mlp_bias"}  # Apple's field -> ours (its qkv_bias is ours already)


def compile_name_table(names: Mapping[str, str]) -> list[tuple[re.Pattern, str]]:
    """`{source name: target name}` as above ("{n}" a block index, a trailing "." for weight and bias) -> patterns."""
    table = []
    for source, target in names.items():
        pattern = re.escape(source).replace(r"\{n\}", r"(?P<n>\d+)")
        table.append((re.compile(pattern + (r"(?P<param>weight|bias)" if source.endswith(".") else "")), target))
    return table


def rename_key(key: str, table: list[tuple[re.Pattern, str]]) -> str:
    """`key` renamed by the first entry of `table` that matches it whole; unchanged when none does."""
    for pattern, target in table:
        match = pattern.fullmatch(key)
        if match:
            groups = match.groupdict()
            return target.replace("{n}", groups.get("n") or "") + (groups.get("param") or "")
    return key


APPLE_ORIGINAL_TABLE = compile_name_table(APPLE_ORIGINAL_NAMES)


def from_apple_original(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Apple's original tower tensors (prefix removed) -> canonical names and shapes."""
    canonical = {}
    for key, tensor in tensors.items():
        name = rename_key(key, APPLE_ORIGINAL_TABLE)
        if name == POSITION_TABLE and key != name:
            if tensor.dim() != 3 or tensor.shape[0] != 1:
                raise ValueError(f"{key} must be (1, num_positions, hidden_size), got {tuple(tensor.shape)}")
            tensor = tensor[0]
        fused = FUSED_QKV.fullmatch(name)
        if fused is None:
            canonical[name] = tensor
            continue
        if tensor.shape[0] % 3:
            raise ValueError(f"{key}: a fused qkv projection's first dim must divide by 3, got {tuple(tensor.shape)}")
        for part, chunk in zip("qkv", tensor.chunk(3)):
            # clone: views of one fused storage could not be saved back to safetensors as separate tensors
            canonical[f"{fused['module']}{part}_proj.{fused['param']}"] = chunk.clone()
    return canonical


def convert_aimv2_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Any AIMv2 checkpoint's tensors -> the canonical vision-tower state dict (pure; the layout is read from the
    keys). Keys neither of the tower nor on `DROPPED_KEYS` are kept as they are, for the strict check to name."""
    checkpoint_format = detect_format(FORMATS, state_dict, "AIMv2")
    tensors = tower_tensors(state_dict, checkpoint_format.prefix, DROPPED_KEYS)
    return from_apple_original(tensors) if checkpoint_format.marker == APPLE_MARKER else tensors


def convert_aimv2_config(config: Mapping, checkpoint_keys: Iterable[str]) -> dict:
    """An AIMv2 config.json dict (+ the checkpoint's keys, for what Apple's configs leave out) ->
    `Aimv2PackingVisionConfig` kwargs. Other fields it leaves out get transformers' `Aimv2VisionConfig` defaults,
    which are ours (`hidden_act="silu"` is also what Apple's original code hard-wires)."""
    model_type = check_model_type(config, MODEL_TYPES, "AIMv2")
    if model_type == "aimv2_packing_vision":
        return dict(config)  # our own: every field, ours included
    vision = (config.get("vision_config") or config) if model_type == "aimv2" else config
    kwargs = config_fields(vision, VISION_CONFIG_FIELDS)
    for apple_name, name in APPLE_CONFIG_NAMES.items():
        if apple_name in vision and name not in vision:
            kwargs[name] = vision[apple_name]
    checkpoint_keys = list(checkpoint_keys)
    checkpoint_format = detect_format(FORMATS, checkpoint_keys, "AIMv2")
    prefix = checkpoint_format.prefix
    tower_keys = [key[len(prefix) :] for key in checkpoint_keys if key.startswith(prefix)]
    kwargs.setdefault("is_native", checkpoint_format.position_key not in tower_keys)
    kwargs.setdefault("use_head", any(key.startswith("head.") for key in tower_keys))
    return kwargs
