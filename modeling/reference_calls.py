"""The reference towers' own calls on the packed towers: padded batches in, the reference's shapes out, packed inside.

transformers' vision-language models call their towers the way transformers' towers take input:
- `Siglip2VisionModel(pixel_values [B, P, p*p*C], pixel_attention_mask [B, P], spatial_shapes [B, 2])`: image i's
  h_i*w_i patches are rows [0, h_i*w_i) of row i (the Siglip2 processors pad at the end), mask 1 there, 0 after;
  -> last_hidden_state [B, P, D], pooler_output [B, D].
- `Aimv2VisionModel(pixel_values [B, C, H, W])`: same-size images -> last_hidden_state [B, h*w, D], pooler [B, D].

Here such a call becomes a packed batch (only the real patches, as `(hidden_states [N, p*p*C], grid_thw [B, 3])`),
runs through the packed forward, and its outputs are put back into the padded shapes: padding rows are ZEROS
(the reference returns whatever its layers computed for them; no client reads them: LFM2-VL drops them).
One device->host copy per forward at most: the per-image sizes (and the mask's validity), in one tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling

from .packing import Segments


@dataclass
class PaddedBatch:
    """A reference call, packed: the packed inputs and where each packed token sits in the padded batch."""

    patches: torch.Tensor  # [N, p*p*C], the real patches of all images, image after image
    grid_thw: torch.Tensor  # [B, 3] int64 on the host: (1, h, w)
    max_patches: int  # P, the padded length
    token_slots: torch.Tensor | None  # [N] int64 on device: i * P + j of each packed token; None when nothing is padded

    def pad(self, packed: torch.Tensor) -> torch.Tensor:
        """[N, D] packed -> [B, P, D], padding rows zero (differentiable)."""
        batch_size = self.grid_thw.shape[0]
        if self.token_slots is None:  # every image fills its row: the packed tensor already is the batch
            return packed.view(batch_size, self.max_patches, *packed.shape[1:])
        padded = packed.new_zeros(batch_size * self.max_patches, *packed.shape[1:])
        padded = padded.index_copy(0, self.token_slots, packed)
        return padded.view(batch_size, self.max_patches, *packed.shape[1:])

    def unpack_output(self, output: BaseModelOutputWithPooling) -> BaseModelOutputWithPooling:
        """The packed forward's output in the reference's shapes (one frame per image: pooler_output is [B, D])."""
        hidden_states = output.hidden_states
        return BaseModelOutputWithPooling(
            last_hidden_state=self.pad(output.last_hidden_state),
            pooler_output=output.pooler_output,
            hidden_states=None if hidden_states is None else tuple(self.pad(h) for h in hidden_states),
        )


def _require_tensor(name: str, value, dims: int, shape_text: str) -> torch.Tensor:
    if not isinstance(value, torch.Tensor) or value.dim() != dims:
        got = f"shape {tuple(value.shape)}" if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"{name} must be {shape_text}, got {got}")
    return value


def siglip2_padded_to_packed(
    pixel_values: torch.Tensor,  # [B, P, p*p*C]
    pixel_attention_mask: torch.Tensor | None,  # [B, P], 1 on each image's patches (a prefix of its row)
    spatial_shapes: torch.Tensor,  # [B, 2] (h, w) in patches
    patch_dim: int,
) -> PaddedBatch:
    """`Siglip2VisionModel`'s padded call -> the packed batch of its real patches. One device->host copy."""
    _require_tensor("pixel_values", pixel_values, 3, f"[batch, max_patches, {patch_dim}] (padded patches)")
    batch_size, max_patches, _ = pixel_values.shape
    _require_tensor("spatial_shapes", spatial_shapes, 2, "[batch, 2] (height, width) in patches")
    if spatial_shapes.shape[0] != batch_size or spatial_shapes.shape[1] != 2:
        raise ValueError(f"spatial_shapes must be [{batch_size}, 2] (height, width), got {tuple(spatial_shapes.shape)}")
    if spatial_shapes.is_floating_point():
        raise TypeError(f"spatial_shapes must be an integer tensor, got {spatial_shapes.dtype}")
    if pixel_attention_mask is None:  # the reference then attends to every row: each image must fill its row
        pixel_attention_mask = torch.ones(batch_size, max_patches, dtype=torch.bool, device=pixel_values.device)
    _require_tensor("pixel_attention_mask", pixel_attention_mask, 2, f"[{batch_size}, {max_patches}]")
    if tuple(pixel_attention_mask.shape) != (batch_size, max_patches):
        raise ValueError(
            f"pixel_attention_mask must be [{batch_size}, {max_patches}] like pixel_values' first two dims, "
            f"got {tuple(pixel_attention_mask.shape)}"
        )

    # Per image (h, w, number of masked-in patches, whether they are the row's first ones), in ONE host copy.
    valid = pixel_attention_mask.bool()
    num_valid = valid.sum(1)  # [B]
    is_prefix = (valid == (torch.arange(max_patches, device=valid.device) < num_valid[:, None])).all(1)
    per_image = torch.stack([*spatial_shapes.to(valid.device, torch.int64).unbind(1), num_valid, is_prefix], 1)
    heights, widths, num_valid, is_prefix = per_image.cpu().unbind(1)  # the forward's one device->host copy

    if not is_prefix.all():
        bad = torch.nonzero(~is_prefix).flatten().tolist()
        raise ValueError(
            f"pixel_attention_mask of image(s) {bad} is not ones then zeros: the packed tower takes each image's "
            "patches as the first entries of its row, as Siglip2's image processors pad them"
        )
    if (heights <= 0).any() or (widths <= 0).any() or (heights * widths != num_valid).any():
        bad = torch.nonzero((heights <= 0) | (widths <= 0) | (heights * widths != num_valid)).flatten().tolist()
        raise ValueError(
            f"spatial_shapes (h, w) of image(s) {bad} do not match their pixel_attention_mask: h * w must equal the "
            f"number of masked-in patches (h, w >= 1); got {torch.stack([heights, widths], 1)[bad].tolist()} for "
            f"{num_valid[bad].tolist()} patches"
        )

    grid_thw = torch.stack([torch.ones_like(heights), heights, widths], 1)  # [B, 3] host
    flat = pixel_values.reshape(batch_size * max_patches, pixel_values.shape[-1])
    if bool((num_valid == max_patches).all()):
        return PaddedBatch(flat, grid_thw, max_patches, token_slots=None)
    images = Segments(num_valid, pixel_values.device)  # index tensors built on the device, sizes from the host
    token_slots = images.token_segment * max_patches + images.index_in_segment  # [N]
    return PaddedBatch(flat.index_select(0, token_slots), grid_thw, max_patches, token_slots)


def images_to_packed(pixel_values: torch.Tensor, patch_size: int, num_channels: int) -> PaddedBatch:
    """`Aimv2VisionModel`'s call on images [B, C, H, W] -> patches in (row, col, channel) order. No host copy.

    Like the reference's stride-p convolution, pixels past the last whole patch (H % p rows, W % p columns) are
    not read.
    """
    _require_tensor("pixel_values", pixel_values, 4, f"[batch, {num_channels}, height, width] (images)")
    batch_size, channels, height, width = pixel_values.shape
    if channels != num_channels:
        raise ValueError(f"pixel_values must have {num_channels} channels, got shape {tuple(pixel_values.shape)}")
    rows, cols = height // patch_size, width // patch_size
    if rows == 0 or cols == 0:
        raise ValueError(f"images of {height}x{width} pixels are smaller than one {patch_size}x{patch_size} patch")
    images = pixel_values[:, :, : rows * patch_size, : cols * patch_size]
    patches = images.reshape(batch_size, channels, rows, patch_size, cols, patch_size)
    patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(batch_size * rows * cols, patch_size * patch_size * channels)
    grid_thw = torch.tensor([[1, rows, cols]], dtype=torch.int64).repeat(batch_size, 1)  # [B, 3] host
    return PaddedBatch(patches, grid_thw, rows * cols, token_slots=None)
