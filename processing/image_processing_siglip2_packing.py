"""Packed image processor for Siglip2-NaFlex: images of any size -> packed patches + `grid_thw`, no padding.

The resize rule, rescale and normalization are those of transformers' `Siglip2ImageProcessor` (its PIL backend):
for the same image, the grid equals its `spatial_shapes` and the patches equal its non-padding patches. What
changes is the output: the patches of all images concatenated, `[N, p*p*C]`, with `grid_thw [B, 3]`, instead of
a `[B, max_num_patches, p*p*C]` padded batch with a mask.
"""

from __future__ import annotations

from math import ceil
from typing import TypedDict

import numpy as np

from .image_processing_packing import PackingImageProcessor, bisect_scale, resize


def naflex_grid(height: int, width: int, patch_size: int, max_num_patches: int, eps: float = 1e-5) -> tuple[int, int]:
    """(rows, cols) in patches of an image resized Siglip2's way (transformers' `get_image_size_for_max_num_patches`).

    Both sides are scaled by one factor (aspect kept), rounded UP to whole patches (at least one), and the factor
    is the largest, to within `eps`, that keeps rows * cols <= max_num_patches. The same bisection as transformers'
    (same bounds, same steps), so the same grid to the last patch.
    """

    def grid(scale: float) -> tuple[int, int]:
        return max(1, ceil(height * scale / patch_size)), max(1, ceil(width * scale / patch_size))

    def fits(scale: float) -> bool:
        rows, cols = grid(scale)
        return rows * cols <= max_num_patches

    scale, _ = bisect_scale(fits, eps / 10, 100.0, eps)
    return grid(scale)


class Siglip2PackingImageProcessorKwargs(TypedDict, total=False):
    do_resize: bool
    patch_size: int
    max_num_patches: int
    resample: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: list[float]
    image_std: list[float]
    do_convert_rgb: bool | None


class Siglip2PackingImageProcessor(PackingImageProcessor):
    """Siglip2-NaFlex preprocessing, packed.

    Each image is resized (bilinear, aspect kept) to the largest grid of `patch_size` patches with at most
    `max_num_patches` patches (`naflex_grid`), rescaled by `rescale_factor`, normalized with `image_mean` /
    `image_std`, and cut into patches. Same options and defaults as transformers' `Siglip2ImageProcessor`.
    Grayscale / RGBA images need `do_convert_rgb=True` (off by default, as there).

    `processor(images, return_tensors="pt")` -> `pixel_values [N, p*p*3]`, `grid_thw [B, 3]`, which
    `Siglip2PackingVisionModel(**...)` takes as they are.
    """

    valid_kwargs = Siglip2PackingImageProcessorKwargs

    def __init__(
        self,
        do_resize: bool = True,
        patch_size: int = 16,
        max_num_patches: int = 256,
        resample: int = 2,  # PIL bilinear
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        do_convert_rgb: bool | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.do_resize = do_resize
        self.patch_size = patch_size
        self.max_num_patches = max_num_patches
        self.resample = int(resample)
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else [0.5, 0.5, 0.5]
        self.image_std = list(image_std) if image_std is not None else [0.5, 0.5, 0.5]
        self.do_convert_rgb = do_convert_rgb
        self.options({})  # checks the options now rather than at the first call

    def check_options(self, options: dict) -> None:
        super().check_options(options)
        max_num_patches = options["max_num_patches"]
        if isinstance(max_num_patches, bool) or not isinstance(max_num_patches, int) or max_num_patches < 1:
            raise ValueError(f"max_num_patches must be a positive integer, got {max_num_patches!r}")

    def resized_frame(self, frame: np.ndarray, options: dict) -> np.ndarray:
        if not options["do_resize"]:
            return frame
        patch_size = options["patch_size"]
        rows, cols = naflex_grid(frame.shape[0], frame.shape[1], patch_size, options["max_num_patches"])
        return resize(frame, rows * patch_size, cols * patch_size, options["resample"])


__all__ = ["Siglip2PackingImageProcessor", "naflex_grid"]
