"""Packed AIMv2 vision tower: many images of any size in one forward, no padding.

Reads like transformers' `modeling_aimv2.py` minus padding: patch embedding + RMSNorm + positions -> encoder
layers (RMSNorm, SwiGLU) -> RMSNorm -> attention-pooling head. Module names are `Aimv2VisionModel`'s keys, the
Conv2d patch embedding keeps its shape, so its state dict loads with `strict=True` both ways.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from ..configuration.configuration_aimv2_packing import Aimv2PackingVisionConfig
from .conversion_aimv2 import convert_aimv2_config, convert_aimv2_state_dict
# Remote code on transformers 4.57 copies only the direct relative imports of a local folder's modeling file into
# its module cache: every module this file needs, even through another, is imported here.
from .checkpoint_loading import load_pretrained  # noqa: F401
from .attention import PackedSelfAttention, varlen_attention
from .cuda_graphs import CudaGraphRunner  # noqa: F401
from .fused_norm import ResidualNorm, add_and_norm
from .packed_model import LastHiddenStateModule, PackedEncoder, PackedVisionPreTrainedModel
from .packing import PackedGrid
from .plain_modules import is_plain
from .position_embeddings import resized_position_embedding, sincos_position_embedding
from .reference_calls import PaddedBatch, images_to_packed


class Aimv2PackingRMSNorm(ResidualNorm):
    """RMSNorm with statistics in fp32, as `Aimv2RMSNorm`, plus the fused residual add of `ResidualNorm`.

    `Aimv2RMSNorm` spells it out in 7 elementwise ops (each a pass over [N, D]); `F.rms_norm` is one pass. Same
    function; in bf16 it rounds once instead of twice (before and after the weight), i.e. no less accurate.
    """

    rms = True
    bias = None

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def normalize(self, hidden_states: torch.Tensor) -> torch.Tensor:
        # The output dtype of `weight * normed.to(input dtype)`: fp32 for fp32 (master) weights under autocast,
        # which keeps the residual stream in fp32 there, as the reference does.
        dtype = torch.promote_types(hidden_states.dtype, self.weight.dtype)
        return F.rms_norm(hidden_states.to(dtype), self.weight.shape, self.weight.to(dtype), self.eps)


class Aimv2PackingVisionEmbeddings(nn.Module):
    """Conv2d patch embedding applied as a linear map on the patches, RMSNorm, then position embeddings.

    Positions: native checkpoints (`is_native`) use 2-D sin-cos of each token's (row, col); learned-position
    checkpoints use their `image_size // patch_size` square table, exact at that grid and resized to other grids
    with `config.position_resize_mode` (antialiased bicubic by default, as timm's `resample_abs_pos_embed`),
    or refused when that is `None`.
    """

    def __init__(self, config: Aimv2PackingVisionConfig):
        super().__init__()
        self.config = config
        self.patch_embed = nn.Conv2d(
            config.num_channels, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size
        )
        self.rms_norm = Aimv2PackingRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.trained_side = config.image_size // config.patch_size
        if not config.is_native:
            self.position_embedding = nn.Embedding(self.trained_side**2, config.hidden_size)

    def forward(self, patches: torch.Tensor, packed: PackedGrid) -> torch.Tensor:
        return self.embed_patches(patches) + self.positions(packed)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        if is_plain(self.patch_embed, nn.Conv2d):
            # Conv2d weight [D, C, p, p] -> [D, p*p*C] in the patches' (row, col, channel) order: no image rebuilt.
            weight = self.patch_embed.weight.permute(0, 2, 3, 1).flatten(1)
            hidden_states = F.linear(patches.to(weight.dtype), weight, self.patch_embed.bias)  # [N, D]
        else:  # a wrapped patch_embed (an adapter, plain_modules.py): called on each patch as a p x p image
            size, channels = self.config.patch_size, self.config.num_channels
            pixels = patches.view(-1, size, size, channels).permute(0, 3, 1, 2)  # [N, C, p, p]
            hidden_states = self.patch_embed(pixels.to(self.patch_embed.weight.dtype)).flatten(1)  # [N, D]
        return self.rms_norm(hidden_states)

    def positions(self, packed: PackedGrid) -> torch.Tensor:
        """[N, D]: sin-cos in the dtype `embed_patches` returns (its RMSNorm's: input and weight promoted)."""
        if not self.config.is_native:
            return self.learned_positions(packed)
        dtype = torch.promote_types(self.patch_embed.weight.dtype, self.rms_norm.weight.dtype)
        return sincos_position_embedding(packed, self.config.hidden_size, self.rms_norm.weight.device, dtype)

    def learned_positions(self, packed: PackedGrid) -> torch.Tensor:
        mode = self.config.position_resize_mode
        if mode is None:
            side = self.trained_side
            off_grid = (packed.grid_thw[:, 1] != side) | (packed.grid_thw[:, 2] != side)
            if off_grid.any():
                raise ValueError(
                    f"This learned-position AIMv2 checkpoint serves only its trained {side}x{side} grid "
                    f"(image_size {self.config.image_size}); got grids "
                    f"{packed.grid_thw[off_grid][:, 1:].tolist()}. Set config.position_resize_mode='bicubic' "
                    "to resize the table."
                )
            mode = "bicubic"  # every grid is the trained one: the resize map is the identity
        return resized_position_embedding(self.position_table(), packed, mode)

    def position_table(self) -> torch.Tensor:
        """[side*side, D]: `Aimv2VisionEmbeddings` calls its `position_embedding` on every position id, so a wrapped
        one (an adapter) is called here too; a plain one's weight is that table."""
        if is_plain(self.position_embedding, nn.Embedding):
            return self.position_embedding.weight
        ids = torch.arange(self.trained_side**2, device=self.position_embedding.weight.device)
        return self.position_embedding(ids)


class Aimv2PackingMLP(nn.Module):
    """SwiGLU feed-forward."""

    def __init__(self, config: Aimv2PackingVisionConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=config.mlp_bias)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act_fn = ACT2FN[config.hidden_act]

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(hidden_states)) * self.up_proj(hidden_states))


class Aimv2PackingEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Aimv2PackingVisionConfig):
        super().__init__()
        self.attention = PackedSelfAttention(
            config.hidden_size, config.num_attention_heads, config.qkv_bias, config.attention_dropout
        )
        self.ffn = Aimv2PackingMLP(config)
        self.rms_norm1 = Aimv2PackingRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rms_norm2 = Aimv2PackingRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, packed: PackedGrid, backend: str) -> torch.Tensor:
        attention_output = self.attention(self.rms_norm1(hidden_states), packed, backend)
        hidden_states, normed = add_and_norm(self.rms_norm2, hidden_states, attention_output)
        return hidden_states + self.ffn(normed)


class Aimv2PackingAttentionPoolingHead(nn.Module):
    """A learned cls query per frame attends over that frame's tokens (varlen), then a linear projection."""

    def __init__(self, config: Aimv2PackingVisionConfig):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=config.qkv_bias)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.hidden_size))
        self.output_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)

    def forward(self, hidden_states: torch.Tensor, packed: PackedGrid, backend: str) -> torch.Tensor:
        dim = hidden_states.shape[-1]
        head_dim = dim // self.num_heads
        query = self.cls_token.reshape(1, self.num_heads, head_dim).expand(packed.num_frames, -1, -1)  # [F, H, Dh]
        key = self.k_proj(hidden_states).view(-1, self.num_heads, head_dim)  # [N, H, Dh]
        value = self.v_proj(hidden_states).view(-1, self.num_heads, head_dim)
        pooled = varlen_attention(
            query.to(key.dtype), key, value, packed.frame_queries, packed.frames, head_dim**-0.5, backend
        )
        return self.output_proj(pooled.reshape(packed.num_frames, dim))  # [F, D]


class Aimv2PackingPreTrainedModel(PackedVisionPreTrainedModel):
    config_class = Aimv2PackingVisionConfig
    base_model_prefix = "aimv2_packing"
    _no_split_modules = ["Aimv2PackingVisionEmbeddings", "Aimv2PackingEncoderLayer"]
    # How from_pretrained reads every Aimv2 checkpoint format (DESIGN §4): conversion_aimv2.py
    convert_checkpoint_config = staticmethod(convert_aimv2_config)
    convert_checkpoint_state_dict = staticmethod(convert_aimv2_state_dict)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Aimv2PackingAttentionPoolingHead):
            nn.init.normal_(module.cls_token, std=self.config.initializer_range)
        elif isinstance(module, Aimv2PackingRMSNorm):
            nn.init.ones_(module.weight)


class Aimv2PackingVisionModel(Aimv2PackingPreTrainedModel):
    """AIMv2 vision tower on packed patches.

    forward(hidden_states [N, p*p*C] patches (row, col, channel), grid_thw [B, 3]) -> BaseModelOutputWithPooling
    with last_hidden_state [N, D] and pooler_output [num_frames, D] (None without head).
    Also `Aimv2VisionModel`'s call: forward(pixel_values [B, C, H, W]) -> last_hidden_state [B, h*w, D],
    pooler_output [B, D].
    """

    def __init__(self, config: Aimv2PackingVisionConfig):
        super().__init__(config)
        self.embeddings = Aimv2PackingVisionEmbeddings(config)
        self.encoder = PackedEncoder([Aimv2PackingEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.rms_norm = Aimv2PackingRMSNorm(config.hidden_size, config.rms_norm_eps)
        if config.use_head:
            self.head = Aimv2PackingAttentionPoolingHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embed

    @property
    def final_norm(self) -> nn.Module:
        return self.rms_norm

    def pack_reference_call(self, patches, pixel_attention_mask, spatial_shapes) -> PaddedBatch | None:
        """`Aimv2VisionModel`'s call: same-size images pixel_values [B, C, H, W]."""
        if pixel_attention_mask is not None or spatial_shapes is not None:
            raise ValueError(
                "AIMv2 takes no pixel_attention_mask / spatial_shapes: pass images [B, C, H, W] or packed patches"
            )
        if not (isinstance(patches, torch.Tensor) and patches.dim() == 4):
            return None  # packed: hidden_states [N, p*p*C] with grid_thw
        return images_to_packed(patches, self.config.patch_size, self.config.num_channels)


class AIMv2Packing(LastHiddenStateModule):
    """Seed-compatible alias: `AIMv2Packing(ckpt=..., device=...)(hidden_states, grid_thw)`."""

    model_class = Aimv2PackingVisionModel
