"""What both packed image processors share: reading images, the PIL resize, rescale/normalize, patchify, packing.

A packed batch is `pixel_values [N, p*p*C]` (the patches of all images, each image row-major, frame-major for
videos, each patch laid out (patch_row, patch_col, channel) as transformers' `Siglip2ImageProcessor` lays it out)
plus `grid_thw [B, 3]` (frames, rows, columns in patches). The two processors differ only in how big each
image becomes (`resized_frame`); everything else is here.

The pixel arithmetic mirrors transformers' PIL ("slow") image processors step by step (8-bit PIL resize, rescale
in float64 then float32, normalize in the image dtype), so the patches equal theirs. This file needs only numpy,
PIL and public transformers classes, and no other file of this project: it ships as Hub remote code next to the
processors, and runs on transformers 4.57 and 5.x.
"""

from __future__ import annotations

from math import ceil
from typing import Any

import numpy as np
import PIL.Image
from transformers.image_processing_utils import BaseImageProcessor, BatchFeature
from transformers.utils import logging

logger = logging.get_logger(__name__)

RGB_CHANNELS = 3

# --------------------------------------------------------------------------------------------------------------
# Reading inputs: images, batches, videos
# --------------------------------------------------------------------------------------------------------------


def _is_torch_tensor(obj) -> bool:
    # Checked by module name so that torch is not imported for users who pass only PIL / numpy images.
    return type(obj).__module__.split(".")[0] == "torch" and hasattr(obj, "detach")


def _is_array(obj) -> bool:
    return isinstance(obj, np.ndarray) or _is_torch_tensor(obj)


def _to_numpy(image) -> np.ndarray:
    if _is_torch_tensor(image):
        image = image.detach().cpu()
        if str(image.dtype) == "torch.bfloat16":  # numpy has no bfloat16; float32 holds it exactly
            image = image.float()
        return image.numpy()
    return image


def split_entries(images) -> list[list[Any]]:
    """The batch as a list of entries, each a list of frames (one frame for an image, t frames for a video).

    - one image: a PIL image, or an array / tensor of shape (H, W, C) or (C, H, W);
    - a batch of images: a list / tuple of images, or a 4-D array / tensor (B, ...), as transformers reads it;
    - inside a list, an entry that is itself a list / tuple of images or a 4-D array / tensor (T, ...) is one
      video of T frames.
    """
    if isinstance(images, PIL.Image.Image) or (_is_array(images) and images.ndim != 4):
        return [[images]]
    if _is_array(images):
        return [[frame] for frame in images]
    if not isinstance(images, (list, tuple)):
        raise TypeError(
            f"images must be a PIL image, a numpy array or torch tensor, or a list of them (a nested list or a 4-D "
            f"array is a video); got {type(images).__name__}"
        )
    entries = []
    for index, entry in enumerate(images):
        frames = list(entry) if isinstance(entry, (list, tuple)) or (_is_array(entry) and entry.ndim == 4) else [entry]
        if not frames:
            raise ValueError(f"images[{index}] is a video with no frames")
        entries.append(frames)
    return entries


def _channels_last(image: np.ndarray, input_data_format: str | None) -> np.ndarray:
    """(H, W, C) from a 3-D array, finding the channel axis as transformers does (first if it holds 1, 3 or 4
    entries, else last) unless `input_data_format` ("channels_first" / "channels_last") says it."""
    if input_data_format is None:
        if image.shape[0] in (1, 3, 4):
            input_data_format = "channels_first"
        elif image.shape[-1] in (1, 3, 4):
            input_data_format = "channels_last"
        else:
            raise ValueError(
                f"Cannot find the channel axis of an image of shape {tuple(image.shape)}: neither the first nor the "
                "last axis has 1, 3 or 4 channels"
            )
    input_data_format = getattr(input_data_format, "value", input_data_format)  # ChannelDimension enum or str
    if input_data_format == "channels_first":
        return np.moveaxis(image, 0, -1)
    if input_data_format == "channels_last":
        return image
    raise ValueError(f"input_data_format must be 'channels_first' or 'channels_last', got {input_data_format!r}")


def _pil_to_rgb(image: PIL.Image.Image) -> np.ndarray:
    # As transformers' convert_to_rgb: transparency is composited onto white.
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        background = PIL.Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = PIL.Image.alpha_composite(background, image.convert("RGBA"))
    return np.array(image.convert("RGB"))


def _array_to_rgb(image: np.ndarray) -> np.ndarray:
    """(H, W, 1 or 3 or 4) -> (H, W, 3) as transformers' convert_to_rgb: gray repeated, alpha composited on white."""
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 4:
        floating = np.issubdtype(image.dtype, np.floating)
        if floating and (image.min() < 0 or image.max() > 1):
            raise ValueError(f"An RGBA float image must hold values in [0, 1], got [{image.min()}, {image.max()}]")
        white = 1.0 if floating else 255
        alpha = image[..., 3:4] / white
        composite = alpha * image[..., :3] + (1 - alpha) * white
        return composite.astype(image.dtype) if floating else np.round(composite).astype(image.dtype)
    return image


def read_frame(image, do_convert_rgb: bool | None, input_data_format: str | None) -> np.ndarray:
    """One image -> (H, W, 3) numpy array, in its own dtype (uint8, another integer type, or float).

    Grayscale and RGBA images are converted to RGB only with `do_convert_rgb` (as transformers' processors do),
    otherwise refused. 2-D arrays are refused, as transformers' processors refuse them: the channel axis must be
    explicit ((H, W, 1) or (1, H, W)), or pass a PIL "L" image.
    """
    if isinstance(image, PIL.Image.Image):
        if do_convert_rgb:
            image = _pil_to_rgb(image)
        else:
            image = np.array(image)
            image = image[..., None] if image.ndim == 2 else image  # single-band modes: L, I, F, P, 1
    elif _is_array(image):
        image = _to_numpy(image)
        if image.ndim != 3:
            raise ValueError(
                f"An image array must be 3-D, (H, W, C) or (C, H, W), got shape {tuple(image.shape)}"
                + (": add a channel axis to a grayscale (H, W) array" if image.ndim == 2 else "")
            )
        image = _channels_last(image, input_data_format)
    else:
        raise TypeError(f"An image must be a PIL image, a numpy array or a torch tensor, got {type(image).__name__}")

    if image.dtype == np.bool_ or not (np.issubdtype(image.dtype, np.integer) or np.issubdtype(image.dtype, np.floating)):
        raise TypeError(f"Image pixels must be integers or floats, got dtype {image.dtype}")
    if image.shape[0] == 0 or image.shape[1] == 0:
        raise ValueError(f"Empty image: height x width = {image.shape[0]} x {image.shape[1]}")
    if np.issubdtype(image.dtype, np.floating) and not np.isfinite(image).all():
        raise ValueError("The image contains NaN or Inf")
    if do_convert_rgb:
        image = _array_to_rgb(image)
    if image.shape[-1] != RGB_CHANNELS:
        raise ValueError(
            f"The image has {image.shape[-1]} channels, the processor takes RGB (3): pass do_convert_rgb=True to "
            "convert grayscale and RGBA images"
        )
    return image


# --------------------------------------------------------------------------------------------------------------
# Pixel operations, as transformers' PIL backend does them
# --------------------------------------------------------------------------------------------------------------


def rescale(image: np.ndarray, factor: float) -> np.ndarray:
    return (image.astype(np.float64) * factor).astype(np.float32)  # float64 product, float32 result


def normalize(image: np.ndarray, mean, std) -> np.ndarray:
    if not np.issubdtype(image.dtype, np.floating):
        image = image.astype(np.float32)
    return (image - np.array(mean, dtype=image.dtype)) / np.array(std, dtype=image.dtype)


def _to_uint8(image: np.ndarray) -> tuple[np.ndarray, bool]:
    """8-bit copy for PIL, and whether it was scaled by 255 (floats in [0, 1]) and must be scaled back."""
    if image.dtype == np.uint8:
        return image, False
    if np.allclose(image, image.astype(np.int64)):
        if image.min() < 0 or image.max() > 255:
            raise ValueError(f"Integer-valued pixels must lie in [0, 255], got [{image.min()}, {image.max()}]")
        return image.astype(np.uint8), False
    if image.min() < 0 or image.max() > 1:
        raise ValueError(
            f"Float pixels must be integer values in [0, 255] or lie in [0, 1], got [{image.min()}, {image.max()}]"
        )
    return rescale(image, 255).astype(np.uint8), True


def resize(image: np.ndarray, height: int, width: int, resample: int) -> np.ndarray:
    """(H, W, 3) -> (height, width, 3) with PIL, through 8 bits, like transformers' PIL backend."""
    pixels, scaled = _to_uint8(image)
    resized = np.array(PIL.Image.fromarray(pixels).resize((width, height), resample=resample))
    return rescale(resized, 1 / 255) if scaled else resized


def center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Center crop; an image smaller than the crop is first zero-padded around its center (transformers' rule)."""
    pad_h, pad_w = max(0, height - image.shape[0]), max(0, width - image.shape[1])
    if pad_h or pad_w:
        top, left = ceil(pad_h / 2), ceil(pad_w / 2)
        image = np.pad(image, ((top, pad_h - top), (left, pad_w - left), (0, 0)))
    top, left = (image.shape[0] - height) // 2, (image.shape[1] - width) // 2
    return image[top : top + height, left : left + width]


def patchify(image: np.ndarray, patch_size: int) -> np.ndarray:
    """(h*p, w*p, C) -> [h*w, p*p*C], patches row-major, each laid out (patch_row, patch_col, channel)."""
    height, width, channels = image.shape
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"Image of {height}x{width} pixels is not a whole number of {patch_size}x{patch_size} patches: "
            "keep do_resize (or do_center_crop) on, or give images whose sides are multiples of the patch size"
        )
    rows, cols = height // patch_size, width // patch_size
    patches = image.reshape(rows, patch_size, cols, patch_size, channels).transpose(0, 2, 1, 3, 4)
    return patches.reshape(rows * cols, patch_size * patch_size * channels)


def bisect_scale(fits, low: float, high: float, eps: float) -> tuple[float, float]:
    """(low, high) bracketing where a monotone predicate `fits(scale)` turns from True to False, to within eps."""
    while high - low >= eps:
        middle = (low + high) / 2
        if fits(middle):
            low = middle
        else:
            high = middle
    return low, high


# --------------------------------------------------------------------------------------------------------------
# The processor base
# --------------------------------------------------------------------------------------------------------------


class PackingImageProcessor(BaseImageProcessor):
    """Images of any size (and videos) -> `BatchFeature(pixel_values [N, p*p*C] float32, grid_thw [B, 3] int64)`.

    Subclasses set `valid_kwargs` (a TypedDict naming their options, which `preprocess` also takes per call) and
    implement `resized_frame`: one RGB frame -> the frame the model sees, sides multiples of `patch_size`.
    """

    model_input_names = ["pixel_values", "grid_thw"]
    valid_kwargs: type  # TypedDict of the options

    @classmethod
    def option_names(cls) -> list[str]:
        return list(cls.valid_kwargs.__annotations__)

    def options(self, overrides: dict) -> dict:
        """This processor's options, with the ones given to this call instead, checked."""
        unknown = sorted(set(overrides) - set(self.option_names()))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown options {unknown}; it takes {self.option_names()}")
        options = {name: overrides.get(name, getattr(self, name)) for name in self.option_names()}
        self.check_options(options)
        return options

    def check_options(self, options: dict) -> None:
        patch_size = options["patch_size"]
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size < 1:
            raise ValueError(f"patch_size must be a positive integer, got {patch_size!r}")
        for name in ("image_mean", "image_std"):
            if options["do_normalize"] and len(options[name]) != RGB_CHANNELS:
                raise ValueError(f"{name} must have 3 values (R, G, B), got {options[name]!r}")
        try:
            PIL.Image.Resampling(options["resample"])
        except ValueError:
            raise ValueError(f"resample must be a PIL resampling filter (0..5), got {options['resample']!r}") from None

    def resized_frame(self, frame: np.ndarray, options: dict) -> np.ndarray:
        raise NotImplementedError

    def preprocess(self, images, return_tensors=None, input_data_format=None, **overrides) -> BatchFeature:
        """
        images: one image (PIL image, numpy array or torch tensor, (H, W, C) or (C, H, W)), a list of them, or a
            4-D array (a batch). Inside a list, a list of frames or a 4-D array is one video: one entry with
            t = number of frames, all frames of the same size.
        return_tensors: "pt" for torch tensors, None or "np" for numpy arrays.
        input_data_format: "channels_first" / "channels_last" for arrays whose channel axis is ambiguous.
        overrides: any option of this processor, for this call only.

        Returns BatchFeature with `pixel_values [N, p*p*C]` (float32) and `grid_thw [B, 3]` (int64).
        """
        options = self.options(overrides)
        patch_dim = options["patch_size"] ** 2 * RGB_CHANNELS
        patches, grids = [], []
        for index, frames in enumerate(split_entries(images)):
            frames = [read_frame(frame, options["do_convert_rgb"], input_data_format) for frame in frames]
            sizes = {frame.shape[:2] for frame in frames}
            if len(sizes) > 1:
                raise ValueError(f"The frames of video images[{index}] must have one size, got sizes {sorted(sizes)}")
            frames = [self.rescaled_and_normalized(self.resized_frame(frame, options), options) for frame in frames]
            patches.extend(patchify(frame, options["patch_size"]) for frame in frames)
            height, width = frames[0].shape[:2]
            grids.append((len(frames), height // options["patch_size"], width // options["patch_size"]))

        pixel_values = np.concatenate(patches).astype(np.float32) if patches else np.zeros((0, patch_dim), np.float32)
        grid_thw = np.array(grids, dtype=np.int64).reshape(-1, 3)
        return BatchFeature(data={"pixel_values": pixel_values, "grid_thw": grid_thw}, tensor_type=return_tensors)

    @staticmethod
    def rescaled_and_normalized(frame: np.ndarray, options: dict) -> np.ndarray:
        if options["do_rescale"]:
            if np.issubdtype(frame.dtype, np.floating) and frame.min() >= 0 and frame.max() <= 1:
                logger.warning_once(
                    "It looks like you are trying to rescale already rescaled images (floats in [0, 1]): pass "
                    "do_rescale=False if they are"
                )
            frame = rescale(frame, options["rescale_factor"])
        if options["do_normalize"]:
            frame = normalize(frame, options["image_mean"], options["image_std"])
        return frame
