"""Packed image processors: same grids and patches as transformers' own processors, bad input refused clearly.

References: transformers' PIL-backend processors (`Siglip2ImageProcessorPil` / `CLIPImageProcessorPil` in
transformers 5; the slow `Siglip2ImageProcessor` / `CLIPImageProcessor` in 4.57), run on the same images.
"""

import json

import numpy as np
import PIL.Image
import pytest
import torch
import transformers
from skimage import data
from transformers import AutoImageProcessor

from packed_vit import (
    Aimv2PackingImageProcessor,
    Aimv2PackingVisionConfig,
    Siglip2PackingImageProcessor,
    Siglip2PackingVisionConfig,
)
from packed_vit.processing.image_processing_aimv2_packing import native_grid
from packed_vit.processing.image_processing_siglip2_packing import naflex_grid
from reference import FP32_REL_TOL, aimv2_pair, patches_to_image, rel_err, siglip2_pair

try:  # transformers 5: the PIL backend has its own class; the default one needs torchvision
    from transformers import CLIPImageProcessorPil as ReferenceCLIPProcessor
    from transformers import Siglip2ImageProcessorPil as ReferenceSiglip2Processor
    from transformers.models.siglip2.image_processing_pil_siglip2 import get_image_size_for_max_num_patches
except ImportError:  # transformers 4.57: the slow processors are the PIL ones
    from transformers import CLIPImageProcessor as ReferenceCLIPProcessor
    from transformers import Siglip2ImageProcessor as ReferenceSiglip2Processor
    from transformers.models.siglip2.image_processing_siglip2 import get_image_size_for_max_num_patches

PATCH_TOL = 1e-5  # max abs difference of processed pixels

# RGB conversion changed in transformers 5, which this project follows: 4.57 converted only PIL images and
# dropped their alpha; 5.x composites alpha onto white and converts arrays too. On 4.x those cases are skipped.
TRANSFORMERS_4 = int(transformers.__version__.split(".")[0]) < 5
CONVERSIONS_NEW_IN_5 = {"PIL RGBA", "array HxWx1", "array RGBA"}

# apple/aimv2-large-patch14-224 preprocessor_config.json (a CLIPImageProcessor).
AIMV2_224_SETTINGS = dict(
    do_convert_rgb=True,
    size={"shortest_edge": 224},
    resample=3,
    do_center_crop=True,
    crop_size={"height": 224, "width": 224},
    do_rescale=True,
    rescale_factor=1 / 255,
    do_normalize=True,
    image_mean=[0.48145466, 0.4578275, 0.40821073],
    image_std=[0.26862954, 0.26130258, 0.27577711],
)

PHOTO_NAMES = ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"]


@pytest.fixture(scope="module")
def photos():
    """scikit-image's photos: 512x512 to 1411x1411, aspect ratios 1 to 1.5, uint8 RGB."""
    return [getattr(data, name)() for name in PHOTO_NAMES]


def random_rgb(height, width, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


# Tiny, odd and very elongated sizes (height, width), as PIL images so that no channel axis is ambiguous.
SYNTHETIC_SIZES = [(1, 1), (1, 2), (3, 1), (2, 2), (16, 16), (17, 33), (20, 300), (300, 20), (7, 300), (1, 1000)]


def reference_siglip2_patches(images, input_data_format=None, **options):
    """transformers' padded output -> per image (grid (h, w), non-padding patches [h*w, p*p*C])."""
    out = ReferenceSiglip2Processor(**options)(images, return_tensors="np", input_data_format=input_data_format)
    return [
        (tuple(shape), values[mask.astype(bool)])
        for shape, values, mask in zip(out["spatial_shapes"], out["pixel_values"], out["pixel_attention_mask"])
    ]


def per_image(out):
    """Our packed output -> per entry (grid (t, h, w), patches [t*h*w, p*p*C])."""
    grids = [tuple(g) for g in np.asarray(out["grid_thw"]).tolist()]
    patches = np.split(np.asarray(out["pixel_values"]), np.cumsum([t * h * w for t, h, w in grids])[:-1])
    return list(zip(grids, patches))


def assert_siglip2_like_reference(images, input_data_format=None, **options):
    ours = per_image(Siglip2PackingImageProcessor(**options)(images, input_data_format=input_data_format))
    reference = reference_siglip2_patches(images, input_data_format=input_data_format, **options)
    assert len(ours) == len(reference)
    for ((t, h, w), patches), (ref_grid, ref_patches) in zip(ours, reference):
        assert (t, h, w) == (1, *ref_grid)
        assert np.abs(patches - ref_patches).max() <= PATCH_TOL


# --------------------------------------------------------------------------------------------------------------
# Siglip2: same grid, same patches as transformers' Siglip2ImageProcessor
# --------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("max_num_patches", [64, 256, 1024])
def test_siglip2_photos_match_reference(photos, max_num_patches):
    assert_siglip2_like_reference(photos, max_num_patches=max_num_patches)


def test_siglip2_grid_rule_is_references(photos):
    rng = np.random.default_rng(0)
    sizes = [(int(h), int(w)) for h, w in rng.integers(1, 3000, (300, 2))] + SYNTHETIC_SIZES + [(1, 100000)]
    for height, width in sizes:
        for patch_size, max_num_patches in ((16, 256), (14, 1024), (16, 3)):
            ref_h, ref_w = get_image_size_for_max_num_patches(height, width, patch_size, max_num_patches)
            assert naflex_grid(height, width, patch_size, max_num_patches) == (ref_h // patch_size, ref_w // patch_size)


@pytest.mark.parametrize("height,width", SYNTHETIC_SIZES)
def test_siglip2_tiny_and_elongated_images_match_reference(height, width):
    # channels_last: transformers 4.57 reads PIL images through arrays and would take (1, 2, 3) as channels first.
    image = PIL.Image.fromarray(random_rgb(height, width))
    assert_siglip2_like_reference(image, input_data_format="channels_last", max_num_patches=64)


def test_siglip2_array_forms_and_dtypes_match_reference():
    image = random_rgb(37, 53)
    forms = [
        image,  # (H, W, C) uint8
        image.transpose(2, 0, 1).copy(),  # (C, H, W)
        torch.from_numpy(image).permute(2, 0, 1),  # torch (C, H, W) uint8
        torch.from_numpy(image).permute(2, 0, 1).float(),  # torch float, integer values 0..255
        image.astype(np.int64),
    ]
    for form in forms:
        assert_siglip2_like_reference(form, max_num_patches=64)
    # Floats in [0, 1] are already rescaled: do_rescale=False, as with transformers.
    assert_siglip2_like_reference(image.astype(np.float32) / 255, max_num_patches=64, do_rescale=False)


def test_siglip2_mixed_sizes_pack_in_order(photos):
    """One call on images of different sizes = each image processed alone, concatenated in input order."""
    images = [photos[1], random_rgb(5, 300), photos[0]]
    processor = Siglip2PackingImageProcessor(max_num_patches=64)
    packed = processor(images)
    alone = [processor(image) for image in images]
    np.testing.assert_array_equal(packed["pixel_values"], np.concatenate([a["pixel_values"] for a in alone]))
    np.testing.assert_array_equal(packed["grid_thw"], np.concatenate([a["grid_thw"] for a in alone]))


# --------------------------------------------------------------------------------------------------------------
# Grayscale, RGBA and 2-D arrays: as transformers' processors
# --------------------------------------------------------------------------------------------------------------


def grayscale_and_rgba_images():
    rgb = random_rgb(29, 41)
    rgba = np.concatenate([rgb, np.random.default_rng(1).integers(0, 256, (29, 41, 1), dtype=np.uint8)], -1)
    return {
        "PIL L": PIL.Image.fromarray(rgb[..., 0]),
        "PIL RGBA": PIL.Image.fromarray(rgba),
        "PIL LA": PIL.Image.fromarray(rgb).convert("LA"),
        "PIL P": PIL.Image.fromarray(rgb).convert("P"),
        "array HxWx1": rgb[..., :1],
        "array RGBA": rgba,
    }


@pytest.mark.parametrize("name", list(grayscale_and_rgba_images()))
def test_grayscale_and_rgba_refused_without_convert_rgb_like_reference(name):
    image = grayscale_and_rgba_images()[name]
    with pytest.raises(ValueError):
        ReferenceSiglip2Processor(max_num_patches=64)(image)
    with pytest.raises(ValueError, match="do_convert_rgb=True"):
        Siglip2PackingImageProcessor(max_num_patches=64)(image)


@pytest.mark.parametrize("name", list(grayscale_and_rgba_images()))
def test_grayscale_and_rgba_converted_with_convert_rgb_like_reference(name):
    if TRANSFORMERS_4 and name in CONVERSIONS_NEW_IN_5:
        pytest.skip("transformers 4.57 converts this differently (see CONVERSIONS_NEW_IN_5)")
    image = grayscale_and_rgba_images()[name]
    assert_siglip2_like_reference(image, max_num_patches=64, do_convert_rgb=True)


def test_2d_arrays_refused_like_reference():
    gray = random_rgb(20, 30)[..., 0]
    with pytest.raises(ValueError):
        ReferenceSiglip2Processor(do_convert_rgb=True)(gray)
    with pytest.raises(ValueError, match="add a channel axis"):
        Siglip2PackingImageProcessor(do_convert_rgb=True)(gray)


# --------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the problem
# --------------------------------------------------------------------------------------------------------------

BAD_IMAGES = {
    "2 channels": (np.zeros((10, 12, 2), np.uint8), ValueError, "channel axis"),
    "5 channels": (np.zeros((10, 12, 5), np.uint8), ValueError, "channel axis"),
    "2 channels, channels_last": (np.zeros((10, 12, 2), np.uint8), ValueError, "2 channels"),
    "empty": (np.zeros((0, 12, 3), np.uint8), ValueError, "Empty image"),
    "empty width": (np.zeros((3, 10, 0), np.uint8), ValueError, "Empty image"),
    "bool": (np.ones((10, 12, 3), bool), TypeError, "dtype bool"),
    "complex": (np.ones((10, 12, 3), np.complex64), TypeError, "dtype complex64"),
    "object array": (np.full((10, 12, 3), None, dtype=object), TypeError, "dtype object"),
    "NaN": (np.full((10, 12, 3), np.nan, np.float32), ValueError, "NaN"),
    "float out of range": (np.full((10, 12, 3), 1.5, np.float32), ValueError, r"\[0, 1\]"),
    "uint16 out of range": (np.full((10, 12, 3), 1000, np.uint16), ValueError, r"\[0, 255\]"),
    "1-D array": (np.zeros(30, np.uint8), ValueError, "must be 3-D"),
    "5-D array": (np.zeros((1, 2, 10, 12, 3), np.uint8), ValueError, "must be 3-D"),
    "string": ("cat.jpg", TypeError, "got str"),
    "None": (None, TypeError, "got NoneType"),
    "dict": ({"pixels": 1}, TypeError, "got dict"),
    "number in a list": ([random_rgb(8, 8), 3], TypeError, "got int"),
    "video with no frames": ([[]], ValueError, "no frames"),
    "video frames of two sizes": ([[random_rgb(8, 8), random_rgb(8, 9)]], ValueError, "one size"),
}


@pytest.mark.parametrize("name", list(BAD_IMAGES))
@pytest.mark.parametrize("processor_class", [Siglip2PackingImageProcessor, Aimv2PackingImageProcessor])
def test_bad_images_refused_clearly(processor_class, name):
    image, error, message = BAD_IMAGES[name]
    data_format = "channels_last" if "channels_last" in name else None
    with pytest.raises(error, match=message):
        processor_class(do_convert_rgb=False)(image, input_data_format=data_format)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(patch_size=0), "patch_size"),
        (dict(max_num_patches=0), "max_num_patches"),
        (dict(image_mean=[0.5, 0.5]), "image_mean"),
        (dict(resample=42), "resample"),
    ],
)
def test_bad_siglip2_options_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Siglip2PackingImageProcessor(**options)
    with pytest.raises(ValueError, match=message):  # the same check for per-call options
        Siglip2PackingImageProcessor()(random_rgb(8, 8), **options)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(min_num_patches=10, max_num_patches=5), "min_num_patches"),
        (dict(crop_size={"height": 100, "width": 224}), "crop_size"),
        (dict(size={"longest_edge": 224}), "size must be"),
    ],
)
def test_bad_aimv2_options_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Aimv2PackingImageProcessor(**options)


def test_unknown_option_refused():
    with pytest.raises(TypeError, match="max_patches"):
        Siglip2PackingImageProcessor()(random_rgb(8, 8), max_patches=10)


def test_sides_not_multiple_of_patch_refused_without_resize():
    with pytest.raises(ValueError, match="whole number of 16x16 patches"):
        Siglip2PackingImageProcessor(do_resize=False)(random_rgb(20, 32))


# --------------------------------------------------------------------------------------------------------------
# Batches, videos, output types
# --------------------------------------------------------------------------------------------------------------


def test_video_is_one_entry_with_t_frames():
    frames = [random_rgb(40, 60, seed) for seed in range(3)]
    processor = Siglip2PackingImageProcessor(max_num_patches=64)
    image = random_rgb(25, 25, seed=9)
    out = processor([image, frames, np.stack(frames)])  # an image, a video as a list, a video as a 4-D array
    (_, h0, w0), (t, h, w) = processor(image)["grid_thw"][0], processor(frames[0])["grid_thw"][0]
    np.testing.assert_array_equal(out["grid_thw"], [[1, h0, w0], [3, h, w], [3, h, w]])
    video_patches = np.concatenate([processor(frame)["pixel_values"] for frame in frames])
    np.testing.assert_array_equal(out["pixel_values"], np.concatenate([processor(image)["pixel_values"], *[video_patches] * 2]))


def test_4d_array_is_a_batch_of_images_as_in_transformers():
    images = np.stack([random_rgb(30, 50, seed) for seed in range(2)])
    processor = Siglip2PackingImageProcessor(max_num_patches=64)
    batched, listed = processor(images), processor(list(images))
    np.testing.assert_array_equal(batched["grid_thw"], listed["grid_thw"])
    np.testing.assert_array_equal(batched["pixel_values"], listed["pixel_values"])
    assert batched["grid_thw"][:, 0].tolist() == [1, 1]


def test_empty_batch_gives_empty_outputs():
    out = Siglip2PackingImageProcessor()([], return_tensors="pt")
    assert out["pixel_values"].shape == (0, 16 * 16 * 3) and out["grid_thw"].shape == (0, 3)


def test_return_tensors():
    image = random_rgb(30, 40)
    as_torch = Siglip2PackingImageProcessor()(image, return_tensors="pt")
    as_numpy = Siglip2PackingImageProcessor()(image)
    assert as_torch["pixel_values"].dtype == torch.float32 and as_torch["grid_thw"].dtype == torch.int64
    assert isinstance(as_numpy["pixel_values"], np.ndarray)
    np.testing.assert_array_equal(as_torch["pixel_values"].numpy(), as_numpy["pixel_values"])


# --------------------------------------------------------------------------------------------------------------
# AIMv2 fixed size: transformers' CLIPImageProcessor with the aimv2-*-224 settings
# --------------------------------------------------------------------------------------------------------------


def assert_aimv2_like_clip_processor(images, ours: Aimv2PackingImageProcessor, **clip_settings):
    # channels_last for the PIL images of transformers 4.57, as in the Siglip2 tests; arrays here are (H, W, C).
    reference = ReferenceCLIPProcessor(**clip_settings)(images, return_tensors="pt", input_data_format="channels_last")
    reference = reference["pixel_values"]
    out = per_image(ours(images, input_data_format="channels_last"))
    assert len(out) == len(reference)
    for ((t, h, w), patches), ref_image in zip(out, reference):
        assert t == 1 and (h * 14, w * 14) == tuple(ref_image.shape[1:])
        image = patches_to_image(torch.from_numpy(patches), h, w, patch_size=14)[0]
        assert (image - ref_image).abs().max() <= PATCH_TOL


def test_aimv2_fixed_size_matches_clip_processor_on_photos(photos):
    out = Aimv2PackingImageProcessor()(photos)
    assert out["grid_thw"].tolist() == [[1, 16, 16]] * len(photos)
    assert_aimv2_like_clip_processor(photos, Aimv2PackingImageProcessor(), **AIMV2_224_SETTINGS)


def test_aimv2_fixed_size_matches_clip_processor_on_synthetic_images():
    # (1, 1000) left out: its shortest edge resized to 224 makes a 224 x 224000 image, slow in both processors.
    images = [PIL.Image.fromarray(random_rgb(h, w)) for h, w in SYNTHETIC_SIZES if (h, w) != (1, 1000)]
    # Grayscale and RGBA images are converted to RGB by default, as in the AIMv2 configs.
    images += [image for name, image in grayscale_and_rgba_images().items() if not (TRANSFORMERS_4 and name in CONVERSIONS_NEW_IN_5)]
    assert_aimv2_like_clip_processor(images, Aimv2PackingImageProcessor(), **AIMV2_224_SETTINGS)


def test_aimv2_336_checkpoint_settings_match_clip_processor(photos):
    settings = {**AIMV2_224_SETTINGS, "size": {"shortest_edge": 336}, "crop_size": {"height": 336, "width": 336}}
    ours = Aimv2PackingImageProcessor(size=settings["size"], crop_size=settings["crop_size"])
    assert ours(photos[1])["grid_thw"].tolist() == [[1, 24, 24]]
    assert_aimv2_like_clip_processor(photos[:2], ours, **settings)


# --------------------------------------------------------------------------------------------------------------
# AIMv2 native: aspect kept within min / max patch bounds
# --------------------------------------------------------------------------------------------------------------


def scale_interval(side_patches: int, pixels: int, patch_size: int) -> tuple[float, float]:
    """Scales s at which round(pixels * s / p) (at least 1) gives side_patches."""
    low = 0.0 if side_patches == 1 else (side_patches - 0.5) * patch_size / pixels
    return low, (side_patches + 0.5) * patch_size / pixels


NATIVE_SIZES = [(int(h), int(w)) for h, w in np.random.default_rng(0).integers(1, 4000, (300, 2))] + [
    *SYNTHETIC_SIZES,
    (1, 100000),
    (100000, 3),
    (224, 224),
    (230, 450),
]


@pytest.mark.parametrize("bounds", [(256, 1024), (64, 256), (1, 16), (100, 100)])
def test_aimv2_native_grid_keeps_aspect_within_bounds(bounds):
    min_num_patches, max_num_patches = bounds
    for height, width in NATIVE_SIZES:
        rows, cols = native_grid(height, width, 14, min_num_patches, max_num_patches)
        assert rows * cols <= max_num_patches
        if max_num_patches >= 4 * min_num_patches:
            assert rows * cols >= min_num_patches
        # Aspect: one scale s gives both sides by rounding (half a patch each side).
        (row_low, row_high), (col_low, col_high) = scale_interval(rows, height, 14), scale_interval(cols, width, 14)
        assert max(row_low, col_low) < min(row_high, col_high), (height, width, rows, cols)


def test_aimv2_native_grid_keeps_resolution_when_within_bounds():
    for height, width in NATIVE_SIZES:
        rows, cols = max(1, round(height / 14)), max(1, round(width / 14))
        if 256 <= rows * cols <= 1024 and height % 14 != 7 and width % 14 != 7:  # clear of rounding ties
            assert native_grid(height, width, 14, 256, 1024) == (rows, cols)


def test_aimv2_native_resizes_to_native_grid_like_clip_processor(photos):
    ours = Aimv2PackingImageProcessor(is_native=True, min_num_patches=64, max_num_patches=1024)
    out = ours(photos)
    for (t, h, w), photo in zip(out["grid_thw"].tolist(), photos):
        assert t == 1 and (h, w) == native_grid(*photo.shape[:2], 14, 64, 1024)
    # The pixels: transformers' CLIP processor resized to the same size, no crop.
    for photo, (_, h, w) in zip(photos, out["grid_thw"].tolist()):
        settings = {**AIMV2_224_SETTINGS, "size": {"height": h * 14, "width": w * 14}, "do_center_crop": False}
        assert_aimv2_like_clip_processor([photo], ours, **settings)


# --------------------------------------------------------------------------------------------------------------
# Saving, loading, AutoImageProcessor
# --------------------------------------------------------------------------------------------------------------

PROCESSORS = [
    Siglip2PackingImageProcessor(max_num_patches=100, patch_size=8),
    Aimv2PackingImageProcessor(is_native=True, min_num_patches=16, max_num_patches=300),
]


@pytest.mark.parametrize("processor", PROCESSORS, ids=lambda p: type(p).__name__)
def test_save_pretrained_reloads(processor, tmp_path, photos):
    processor.save_pretrained(tmp_path)
    for loaded in (type(processor).from_pretrained(tmp_path), AutoImageProcessor.from_pretrained(tmp_path)):
        assert type(loaded) is type(processor)
        assert loaded.to_dict() == processor.to_dict()
        np.testing.assert_array_equal(loaded(photos[1])["pixel_values"], processor(photos[1])["pixel_values"])


@pytest.mark.parametrize(
    "processor,config_class",
    list(zip(PROCESSORS, [Siglip2PackingVisionConfig, Aimv2PackingVisionConfig])),
    ids=lambda p: type(p).__name__,
)
def test_auto_image_processor_found_through_model_config(processor, config_class, tmp_path):
    """Without `image_processor_type`, AutoImageProcessor goes config.json -> config class -> our processor."""
    processor.save_pretrained(tmp_path)
    path = tmp_path / "preprocessor_config.json"
    settings = json.loads(path.read_text())
    del settings["image_processor_type"]
    path.write_text(json.dumps(settings))
    config_class().save_pretrained(tmp_path)
    loaded = AutoImageProcessor.from_pretrained(tmp_path)
    assert type(loaded) is type(processor) and loaded.to_dict() == processor.to_dict()


# --------------------------------------------------------------------------------------------------------------
# Processor + model, end to end, against transformers' processor + model
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_siglip2_end_to_end_matches_transformers(photos):
    ref_model, model = siglip2_pair(patch_size=16)
    images = photos + [PIL.Image.fromarray(random_rgb(20, 300))]
    ref = ref_model(**ReferenceSiglip2Processor(max_num_patches=64)(images, return_tensors="pt"))
    inputs = Siglip2PackingImageProcessor(max_num_patches=64)(images, return_tensors="pt")
    ours = model(**inputs)
    lengths = inputs["grid_thw"].prod(1).tolist()
    for i, (last, n) in enumerate(zip(ours.last_hidden_state.split(lengths), lengths)):
        assert rel_err(last, ref.last_hidden_state[i, :n]) <= FP32_REL_TOL
        assert rel_err(ours.pooler_output[i], ref.pooler_output[i]) <= FP32_REL_TOL


@torch.no_grad()
def test_aimv2_fixed_size_end_to_end_matches_transformers(photos):
    ref_model, model = aimv2_pair(is_native=False, patch_size=14, image_size=224)
    images = photos[:3]
    ref = ref_model(pixel_values=ReferenceCLIPProcessor(**AIMV2_224_SETTINGS)(images, return_tensors="pt")["pixel_values"])
    ours = model(**Aimv2PackingImageProcessor()(images, return_tensors="pt"))
    for i, last in enumerate(ours.last_hidden_state.split(256)):
        assert rel_err(last, ref.last_hidden_state[i]) <= FP32_REL_TOL
        assert rel_err(ours.pooler_output[i], ref.pooler_output[i]) <= FP32_REL_TOL
