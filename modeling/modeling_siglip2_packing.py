"""Packed Siglip2-NaFlex vision tower: many images of any size in one forward, no padding.

Reads like transformers' `modeling_siglip2.py` minus padding: embeddings -> encoder layers -> post layernorm ->
attention-pooling head. Module names are the checkpoint's keys (no `vision_model.` prefix), so a
`Siglip2VisionModel` state dict loads with `strict=True`. The packing itself (segments, varlen attention,
position-map resize) lives in the shared modules (`packing.py` and the files it lists).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN
from transformers.modeling_layers import GradientCheckpointingLayer

from ..configuration.configuration_siglip2_packing import Siglip2PackingVisionConfig
from .conversion_siglip2 import convert_siglip2_config, convert_siglip2_state_dict
# Remote code on transformers 4.57 copies only the direct relative imports of a local folder's modeling file into
# its module cache: every module this file needs, even through another, is imported here.
from .checkpoint_loading import load_pretrained  # noqa: F401
from .attention import PackedSelfAttention, varlen_attention
from .cuda_graphs import CudaGraphRunner  # noqa: F401
from .fused_norm import PackedLayerNorm, add_and_norm
from .packed_model import LastHiddenStateModule, PackedEncoder, PackedVisionPreTrainedModel
from .packing import PackedGrid
from .plain_modules import is_plain
from .position_embeddings import resized_position_embedding
from .reference_calls import PaddedBatch, siglip2_padded_to_packed


class Siglip2PackingVisionEmbeddings(nn.Module):
    """Linear patch embedding + the learned position table resized to each image's grid."""

    def __init__(self, config: Siglip2PackingVisionConfig):
        super().__init__()
        self.patch_embedding = nn.Linear(config.num_channels * config.patch_size**2, config.hidden_size)
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)  # a sqrt x sqrt grid

    def forward(self, patches: torch.Tensor, packed: PackedGrid) -> torch.Tensor:
        return self.embed_patches(patches) + self.positions(packed)

    def embed_patches(self, patches: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(patches.to(self.patch_embedding.weight.dtype))  # [N, D]

    def positions(self, packed: PackedGrid) -> torch.Tensor:
        # transformers resizes with bilinear + antialias, align_corners=False
        return resized_position_embedding(self.position_embedding.weight, packed, "bilinear")  # [N, D]


# Where cuBLASLt's GELU epilogue is used (tests run it on the CPU too, where torch has the op as well).
GELU_EPILOGUE_DEVICES = ("cuda",)


class Siglip2PackingMLP(nn.Module):
    def __init__(self, config: Siglip2PackingVisionConfig):
        super().__init__()
        self.activation_fn = ACT2FN[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.gelu_in_epilogue = config.hidden_act == "gelu_pytorch_tanh"

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.gelu_in_epilogue_applies(hidden_states):
            # cuBLASLt applies tanh-GELU (= gelu_pytorch_tanh) in fc1's GEMM epilogue: one pass less over the
            # [N, intermediate] activations. Inference only: this op has no autograd formula.
            hidden_states = torch._addmm_activation(self.fc1.bias, hidden_states, self.fc1.weight.t(), use_gelu=True)
        else:
            hidden_states = self.activation_fn(self.fc1(hidden_states))
        return self.fc2(hidden_states)

    def gelu_in_epilogue_applies(self, hidden_states: torch.Tensor) -> bool:
        """CUDA inference, fc1 a plain `nn.Linear` (an adapter on fc1 is applied by calling fc1: plain_modules.py)."""
        return (
            self.gelu_in_epilogue and hidden_states.device.type in GELU_EPILOGUE_DEVICES and not torch.is_grad_enabled()
            and is_plain(self.fc1, nn.Linear)
        )  # fmt: skip


class Siglip2PackingEncoderLayer(GradientCheckpointingLayer):
    def __init__(self, config: Siglip2PackingVisionConfig):
        super().__init__()
        self.layer_norm1 = PackedLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = PackedSelfAttention(
            config.hidden_size, config.num_attention_heads, bias=True, attention_dropout=config.attention_dropout
        )
        self.layer_norm2 = PackedLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Siglip2PackingMLP(config)

    def forward(self, hidden_states: torch.Tensor, packed: PackedGrid, backend: str) -> torch.Tensor:
        attention_output = self.self_attn(self.layer_norm1(hidden_states), packed, backend)
        hidden_states, normed = add_and_norm(self.layer_norm2, hidden_states, attention_output)
        return hidden_states + self.mlp(normed)


class Siglip2PackingMultiheadAttentionPoolingHead(nn.Module):
    """Attention pooling, one learned probe per frame over that frame's tokens (a varlen attention).

    Keeps `nn.MultiheadAttention`'s parameters (`attention.in_proj_weight`, `in_proj_bias`, `out_proj`) so the
    checkpoint loads unchanged, and applies them to packed tokens.
    """

    def __init__(self, config: Siglip2PackingVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.randn(1, 1, config.hidden_size))
        self.attention = nn.MultiheadAttention(config.hidden_size, config.num_attention_heads, batch_first=True)
        self.layernorm = PackedLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = Siglip2PackingMLP(config)
        self.num_heads = config.num_attention_heads

    def forward(self, hidden_states: torch.Tensor, packed: PackedGrid, backend: str) -> torch.Tensor:
        if is_plain(self.attention, nn.MultiheadAttention):
            pooled = self.packed_attention(hidden_states, packed, backend)
        else:  # e.g. PEFT's LoRA on the `nn.MultiheadAttention` itself: only calling it applies the adapter
            pooled = self.called_attention(hidden_states, packed)
        return pooled + self.mlp(self.layernorm(pooled))  # [F, D]

    def packed_attention(self, hidden_states: torch.Tensor, packed: PackedGrid, backend: str) -> torch.Tensor:
        """`nn.MultiheadAttention`'s computation as a varlen attention over packed tokens. Its parameters are read as
        `F.multi_head_attention_forward` reads them, `out_proj.weight` included: an adapter on `out_proj` alone
        (PEFT's "all-linear" puts one there) is not applied by the reference either, and is not applied here."""
        num_frames, dim = packed.num_frames, hidden_states.shape[-1]
        head_dim = dim // self.num_heads
        w_q, w_k, w_v = self.attention.in_proj_weight.chunk(3)
        b_q, b_k, b_v = self.attention.in_proj_bias.chunk(3)
        query = nn.functional.linear(self.probe.reshape(1, dim), w_q, b_q).view(1, self.num_heads, head_dim)
        query = query.expand(num_frames, -1, -1)  # [F, H, Dh]: the same probe for every frame
        key = nn.functional.linear(hidden_states, w_k, b_k).view(-1, self.num_heads, head_dim)  # [N, H, Dh]
        value = nn.functional.linear(hidden_states, w_v, b_v).view(-1, self.num_heads, head_dim)
        pooled = varlen_attention(query, key, value, packed.frame_queries, packed.frames, head_dim**-0.5, backend)
        out_proj = self.attention.out_proj
        return nn.functional.linear(pooled.reshape(num_frames, dim), out_proj.weight, out_proj.bias)  # [F, D]

    def called_attention(self, hidden_states: torch.Tensor, packed: PackedGrid) -> torch.Tensor:
        """The `attention` module called on all frames at once: one probe per frame over every token, each masked to
        its own frame's tokens (device-side, so CUDA graphs can capture it). O(frames x tokens) scores: the path of
        a wrapped module only."""
        num_tokens, dim = hidden_states.shape
        token_index = torch.arange(num_tokens, device=hidden_states.device, dtype=packed.frames.cu_seqlens.dtype)
        frame_of_token = torch.searchsorted(packed.frames.cu_seqlens[1:], token_index, right=True)  # [N]
        frame_index = torch.arange(packed.num_frames, device=hidden_states.device)
        other_frame = frame_of_token[None, :] != frame_index[:, None]  # [F, N]: True = not attended
        probes = self.probe.expand(1, packed.num_frames, dim)
        tokens = hidden_states[None]  # [1, N, D]
        return self.attention(probes, tokens, tokens, attn_mask=other_frame, need_weights=False)[0][0]  # [F, D]


class Siglip2PackingPreTrainedModel(PackedVisionPreTrainedModel):
    config_class = Siglip2PackingVisionConfig
    base_model_prefix = "siglip2_packing"
    _no_split_modules = ["Siglip2PackingVisionEmbeddings", "Siglip2PackingEncoderLayer"]
    # How from_pretrained reads every Siglip2 checkpoint format (DESIGN §4): conversion_siglip2.py
    convert_checkpoint_config = staticmethod(convert_siglip2_config)
    convert_checkpoint_state_dict = staticmethod(convert_siglip2_state_dict)

    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, Siglip2PackingMultiheadAttentionPoolingHead):
            nn.init.xavier_uniform_(module.probe)


class Siglip2PackingVisionModel(Siglip2PackingPreTrainedModel):
    """Siglip2 vision tower on packed patches.

    forward(hidden_states [N, p*p*C] patches (row, col, channel), grid_thw [B, 3]) -> BaseModelOutputWithPooling
    with last_hidden_state [N, D] and pooler_output [num_frames, D] (None without head).
    Also `Siglip2VisionModel`'s call: forward(pixel_values [B, P, p*p*C], pixel_attention_mask [B, P],
    spatial_shapes [B, 2]) -> last_hidden_state [B, P, D] (padding rows zero), pooler_output [B, D].
    """

    def __init__(self, config: Siglip2PackingVisionConfig):
        super().__init__(config)
        self.embeddings = Siglip2PackingVisionEmbeddings(config)
        self.encoder = PackedEncoder([Siglip2PackingEncoderLayer(config) for _ in range(config.num_hidden_layers)])
        self.post_layernorm = PackedLayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.vision_use_head:
            self.head = Siglip2PackingMultiheadAttentionPoolingHead(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Module:
        return self.embeddings.patch_embedding

    @property
    def final_norm(self) -> nn.Module:
        return self.post_layernorm

    def pack_reference_call(self, patches, pixel_attention_mask, spatial_shapes) -> PaddedBatch | None:
        """`Siglip2VisionModel`'s padded call (pixel_values [B, P, p*p*C], pixel_attention_mask, spatial_shapes)."""
        is_padded = isinstance(patches, torch.Tensor) and patches.dim() == 3
        if not is_padded and pixel_attention_mask is None and spatial_shapes is None:
            return None  # packed: hidden_states [N, p*p*C] with grid_thw
        if spatial_shapes is None:
            raise ValueError(
                "A padded batch pixel_values [B, P, p*p*C] needs spatial_shapes [B, 2] (and pixel_attention_mask "
                "[B, P]), by keyword, as Siglip2VisionModel takes them"
            )
        return siglip2_padded_to_packed(
            patches, pixel_attention_mask, spatial_shapes, self.config.num_channels * self.config.patch_size**2
        )


class Siglip2NaflexPacking(LastHiddenStateModule):
    """Seed-compatible alias: `Siglip2NaflexPacking(ckpt=..., device=...)(hidden_states, grid_thw)`."""

    model_class = Siglip2PackingVisionModel
