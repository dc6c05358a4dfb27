"""Packed image processor for AIMv2: images of any size -> packed patches + `grid_thw`.

Two modes, as the two kinds of AIMv2 checkpoints:
- fixed size (`is_native=False`, the 224 / 336 / 448 checkpoints): what transformers' `CLIPImageProcessor` does
  with the settings of apple/aimv2-*-224 (`preprocessor_config.json`): resize the shortest edge to 224 (bicubic),
  center crop 224x224, rescale by 1/255, normalize with the OpenAI CLIP mean / std; the crop is then cut into
  14x14 patches, a 16x16 grid;
- native (`is_native=True`, aimv2-*-native): the image keeps its aspect ratio and, when it fits, its resolution;
  see `native_grid` for the rule with `min_num_patches` / `max_num_patches`.
"""

from __future__ import annotations

from math import floor, sqrt
from typing import TypedDict

import numpy as np

from .image_processing_packing import PackingImageProcessor, bisect_scale, center_crop, resize

OPENAI_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
OPENAI_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


def native_grid(
    height: int, width: int, patch_size: int, min_num_patches: int, max_num_patches: int
) -> tuple[int, int]:
    """(rows, cols) in patches for a native-resolution AIMv2 image of height x width pixels.

    The rule: at scale s the grid is (round(height*s/p), round(width*s/p)), each side at least 1. The image keeps
    its own resolution (s = 1: each side moves by at most half a patch to a multiple of p) when that grid has
    between `min_num_patches` and `max_num_patches` patches. A larger image is scaled down to the largest grid
    with at most `max_num_patches` patches; a smaller one up to the smallest grid with at least `min_num_patches`.
    Both sides share one scale, so the aspect ratio is kept to within the rounding of each side (half a patch).
    `max_num_patches` always holds. `min_num_patches` holds unless the aspect ratio makes the grid jump from
    below it to above `max_num_patches` in one step, which needs max_num_patches < 4 * min_num_patches.
    """

    def grid(scale: float) -> tuple[int, int]:
        return max(1, floor(height * scale / patch_size + 0.5)), max(1, floor(width * scale / patch_size + 0.5))

    def area(scale: float) -> int:
        rows, cols = grid(scale)
        return rows * cols

    if area(1.0) > max_num_patches:
        scale, _ = bisect_scale(lambda s: area(s) <= max_num_patches, 0.0, 1.0, 1e-12)
    elif area(1.0) < min_num_patches:
        # A scale at which the short side alone gives enough patches bounds the search from above.
        upper = patch_size * (sqrt(min_num_patches) + 1) / min(height, width)
        below, above = bisect_scale(lambda s: area(s) < min_num_patches, 1.0, upper, upper * 1e-12)
        scale = above if area(above) <= max_num_patches else below
    else:
        scale = 1.0
    return grid(scale)


def _size_dict(size, name: str) -> dict:
    """`size` / `crop_size` as transformers writes them: {"shortest_edge": n}, {"height": h, "width": w}, or an int."""
    if isinstance(size, int) and not isinstance(size, bool):
        return {"shortest_edge": size} if name == "size" else {"height": size, "width": size}
    if isinstance(size, dict) and (set(size) == {"height", "width"} or (name == "size" and set(size) == {"shortest_edge"})):
        return dict(size)
    allowed = '{"shortest_edge": n} or {"height": h, "width": w}' if name == "size" else '{"height": h, "width": w}'
    raise ValueError(f"{name} must be {allowed}, got {size!r}")


class Aimv2PackingImageProcessorKwargs(TypedDict, total=False):
    is_native: bool
    do_resize: bool
    size: dict
    resample: int
    do_center_crop: bool
    crop_size: dict
    min_num_patches: int
    max_num_patches: int
    patch_size: int
    do_rescale: bool
    rescale_factor: float
    do_normalize: bool
    image_mean: list[float]
    image_std: list[float]
    do_convert_rgb: bool


class Aimv2PackingImageProcessor(PackingImageProcessor):
    """AIMv2 preprocessing, packed.

    Fixed size (default): `size` (shortest edge 224, or an exact height / width), `resample` (bicubic),
    `crop_size` (224x224, sides multiples of `patch_size`), then rescale / normalize (OpenAI CLIP mean / std),
    exactly as transformers' `CLIPImageProcessor` with the apple/aimv2-*-224 settings.
    Native (`is_native=True`): each image resized (bicubic) to `native_grid(H, W, patch_size, min_num_patches,
    max_num_patches)` patches; `size` / `crop_size` are not used. Defaults 256..1024 patches span the fixed-size
    checkpoints' 224..448 px.
    RGB conversion (grayscale, RGBA composited on white) is on by default, as in the AIMv2 configs.

    `processor(images, return_tensors="pt")` -> `pixel_values [N, p*p*3]`, `grid_thw [B, 3]`, which
    `Aimv2PackingVisionModel(**...)` takes as they are.
    """

    valid_kwargs = Aimv2PackingImageProcessorKwargs

    def __init__(
        self,
        is_native: bool = False,
        do_resize: bool = True,
        size: dict | int | None = None,
        resample: int = 3,  # PIL bicubic
        do_center_crop: bool = True,
        crop_size: dict | int | None = None,
        min_num_patches: int = 256,
        max_num_patches: int = 1024,
        patch_size: int = 14,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        do_convert_rgb: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.is_native = is_native
        self.do_resize = do_resize
        self.size = _size_dict(size if size is not None else {"shortest_edge": 224}, "size")
        self.resample = int(resample)
        self.do_center_crop = do_center_crop
        self.crop_size = _size_dict(crop_size if crop_size is not None else {"height": 224, "width": 224}, "crop_size")
        self.min_num_patches = min_num_patches
        self.max_num_patches = max_num_patches
        self.patch_size = patch_size
        self.do_rescale = do_rescale
        self.rescale_factor = rescale_factor
        self.do_normalize = do_normalize
        self.image_mean = list(image_mean) if image_mean is not None else list(OPENAI_CLIP_MEAN)
        self.image_std = list(image_std) if image_std is not None else list(OPENAI_CLIP_STD)
        self.do_convert_rgb = do_convert_rgb
        self.options({})  # checks the options now rather than at the first call

    def options(self, overrides: dict) -> dict:
        overrides = {
            name: _size_dict(value, name) if name in ("size", "crop_size") else value
            for name, value in overrides.items()
        }
        return super().options(overrides)

    def check_options(self, options: dict) -> None:
        super().check_options(options)
        low, high = options["min_num_patches"], options["max_num_patches"]
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in (low, high)) or not 1 <= low <= high:
            raise ValueError(f"Need integers 1 <= min_num_patches <= max_num_patches, got {low!r}, {high!r}")
        crop, patch_size = options["crop_size"], options["patch_size"]
        if options["do_center_crop"] and (crop["height"] % patch_size or crop["width"] % patch_size):
            raise ValueError(f"crop_size {crop} must be a whole number of {patch_size}x{patch_size} patches")

    def resized_frame(self, frame: np.ndarray, options: dict) -> np.ndarray:
        height, width = frame.shape[:2]
        if options["is_native"]:
            if options["do_resize"]:
                patch_size = options["patch_size"]
                rows, cols = native_grid(
                    height, width, patch_size, options["min_num_patches"], options["max_num_patches"]
                )
                frame = resize(frame, rows * patch_size, cols * patch_size, options["resample"])
            return frame
        if options["do_resize"]:
            frame = resize(frame, *self.fixed_size(height, width, options["size"]), options["resample"])
        if options["do_center_crop"]:
            frame = center_crop(frame, options["crop_size"]["height"], options["crop_size"]["width"])
        return frame

    @staticmethod
    def fixed_size(height: int, width: int, size: dict) -> tuple[int, int]:
        """Resized (height, width) in pixels: exact, or the shortest edge to `shortest_edge` with the long edge
        scaled and truncated, as transformers' `get_resize_output_image_size(default_to_square=False)`."""
        if "height" in size:
            return size["height"], size["width"]
        short, long = sorted((height, width))
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)


__all__ = ["Aimv2PackingImageProcessor", "native_grid"]
