"""The GPU path's pixel code (`gpu_preprocessing.TorchPreprocessing`) run on the CPU, against our PIL processors.

The torch code is device-agnostic; on CUDA it equals transformers' torchvision backend to the bit
(tests/test_encode_gpu.py). Here, without a GPU or torchvision: the grids, crops and patch layout equal the PIL
processors' exactly, the patches equal theirs to float32 rounding where no resize runs (both normalize the same
uint8 pixels), and where a resize runs they differ only by the resize filters (PIL's vs torch's antialiased
bicubic / bilinear), which RESIZE_MAX_LEVELS and RESIZE_MEAN_TOLERANCE bound: an error of geometry or layout moves patches by whole units.
"""

import numpy as np
import pytest
import torch

from packed_vit.encode.gpu_preprocessing import (
    EXIF_ORIENTATION,
    TorchPreprocessing,
    center_crop,
    read_for_gpu,
)
from packed_vit.encode.inputs import read_image
from packed_vit.processing import Aimv2PackingImageProcessor, Siglip2PackingImageProcessor

NORMALIZE_TOLERANCE = 1e-5  # float32: fused (x - mean/f) / (std/f) vs (x*f - mean) / std
# The two filters on smooth images, measured here: at most 1 level at any pixel, 0.003 mean (normalized units). A crop
# or a resize one pixel off moves smooth images' patches by 0.018 on average and many levels at the edges.
RESIZE_MAX_LEVELS = 2
RESIZE_MEAN_TOLERANCE = 0.01


def smooth_image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """A smooth RGB photo-like image (H, W, 3) uint8: resize filters differ little on it, as on photos."""
    rng = np.random.default_rng(seed)
    import PIL.Image

    small = PIL.Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    return np.array(small.resize((width, height), resample=PIL.Image.Resampling.BILINEAR))


def both(processor, image: np.ndarray):
    """(ours on the CPU: patches, grid), (the PIL processor: patches, grid)."""
    ours = TorchPreprocessing(processor)
    patches, grid = ours.patches(torch.from_numpy(image).permute(2, 0, 1).contiguous())
    expected = processor(image, return_tensors="pt")
    return (patches, grid), (expected["pixel_values"], tuple(expected["grid_thw"][0].tolist()))


PROCESSORS = {
    "siglip2_256": lambda: Siglip2PackingImageProcessor(max_num_patches=256),
    "aimv2_224": lambda: Aimv2PackingImageProcessor(),
    "aimv2_336": lambda: Aimv2PackingImageProcessor(size={"shortest_edge": 336}, crop_size=336),
    "aimv2_native": lambda: Aimv2PackingImageProcessor(is_native=True, min_num_patches=64, max_num_patches=400),
}


@pytest.mark.parametrize("name", list(PROCESSORS))
@pytest.mark.parametrize("size", [(37, 300), (224, 224), (480, 320), (301, 1003)])
def test_grids_equal_and_patches_differ_by_the_resize_filter_only(name, size):
    processor = PROCESSORS[name]()
    (patches, grid), (expected, expected_grid) = both(processor, smooth_image(*size))
    assert grid == expected_grid
    assert patches.shape == expected.shape and patches.dtype == torch.float32
    level = 1 / (255 * min(processor.image_std))  # one pixel level, normalized
    difference = (patches - expected).abs()
    assert difference.max().item() <= RESIZE_MAX_LEVELS * level, f"{name} {size}: max {difference.max() / level} levels"
    assert difference.mean().item() <= RESIZE_MEAN_TOLERANCE, f"{name} {size}: mean abs difference {difference.mean()}"


@pytest.mark.parametrize(
    "name, size",
    [("aimv2_224", (224, 224)), ("aimv2_224", (224, 301)), ("aimv2_native", (196, 280)), ("siglip2_256", (256, 256))],
)
def test_without_a_resize_the_patches_equal_the_cpu_processor(name, size):
    """Sizes the rule keeps (AIMv2 fixed: shortest edge already 224, only the crop runs; native: a grid in range;
    Siglip2: exactly 16x16 patches): crop, layout and normalization against the PIL processor."""
    processor = PROCESSORS[name]()
    image = np.random.default_rng(1).integers(0, 256, (*size, 3), dtype=np.uint8)  # noise: any shift shows
    (patches, grid), (expected, expected_grid) = both(processor, image)
    assert grid == expected_grid
    assert (patches - expected).abs().max().item() <= NORMALIZE_TOLERANCE


def test_center_crop_is_the_torchvision_backends():
    """transformers' torchvision backend: window at int((H - h) / 2); a smaller image padded with zeros, the
    smaller half of the padding before."""
    image = torch.arange(3 * 5 * 8, dtype=torch.uint8).reshape(3, 5, 8)
    assert torch.equal(center_crop(image, 3, 5), image[:, 1:4, 1:6])
    padded = center_crop(image, 8, 11)
    assert padded.shape == (3, 8, 11)
    assert torch.equal(padded[:, 1:6, 1:9], image)  # 3 rows of padding: 1 above, 2 below; 3 columns: 1 left, 2 right
    assert padded[:, 0].sum() == 0 and padded[:, 6:].sum() == 0 and padded[:, :, 0].sum() == 0


def test_a_model_image_that_is_not_whole_patches_is_refused_as_the_cpu_processor_does():
    processor = Aimv2PackingImageProcessor(do_center_crop=False)  # 224 x (long side) is rarely whole patches
    with pytest.raises(ValueError, match="not a whole number of 14x14 patches"):
        TorchPreprocessing(processor).patches(torch.zeros(3, 224, 300, dtype=torch.uint8))
    with pytest.raises(ValueError, match="not a whole number of 14x14 patches"):
        processor(np.zeros((224, 300, 3), dtype=np.uint8))


def test_normalizing_many_images_patches_at_once_equals_each_image_alone():
    ours = TorchPreprocessing(PROCESSORS["aimv2_native"]())
    sizes = [(90, 150), (300, 200)]
    images = [torch.from_numpy(smooth_image(h, w, seed=h)).permute(2, 0, 1).contiguous() for h, w in sizes]
    pieces = [ours.resized_patches(image)[0] for image in images]
    together = ours.normalized(torch.cat(pieces))
    alone = torch.cat([ours.patches(image)[0] for image in images])
    assert torch.equal(together, alone)


@pytest.mark.parametrize("name", list(PROCESSORS))
def test_rounding_many_images_resizes_at_once_equals_each_image_alone(name):
    """The job rounds a chunk's resized patches in one pass (`finish=False`, then `finish_resize`): the same bits as
    each image resized and rounded alone, also beside an image that needs no resize (uint8 in the concatenation)."""
    ours = TorchPreprocessing(PROCESSORS[name]())
    # (256, 256): Siglip2's grid at 256 patches as is; (224, 300): AIMv2-224's shortest edge as is (crop only)
    sizes = [(90, 150), (256, 256), (224, 300), (301, 1003)]
    images = [torch.from_numpy(smooth_image(h, w, seed=h)).permute(2, 0, 1).contiguous() for h, w in sizes]
    unfinished = torch.cat([ours.resized_patches(image, finish=False)[0] for image in images])
    together = ours.normalized(ours.finish_resize(unfinished))
    alone = torch.cat([ours.patches(image)[0] for image in images])
    assert unfinished.is_floating_point() and torch.equal(together, alone)
    if name in ("siglip2_256", "aimv2_224"):
        assert any(ours.resized_patches(image, finish=False)[0].dtype == torch.uint8 for image in images)


def test_not_one_of_our_processors_is_a_clear_error():
    from packed_vit.encode.gpu_preprocessing import tower_of_processor

    with pytest.raises(ValueError, match="packed Siglip2 and AIMv2 processors"):
        tower_of_processor(object())


def test_a_jpeg_with_an_exif_rotation_is_read_upright_for_the_gpu_path():
    """nvJPEG decodes the stored pixels and ignores the EXIF orientation: such a JPEG goes by PIL, upright, as the
    CPU path and transformers' load_image read it; an upright one goes to nvJPEG as its bytes."""
    import io

    import PIL.Image

    pixels = np.random.default_rng(0).integers(0, 256, (24, 40, 3), dtype=np.uint8)
    upright, rotated = io.BytesIO(), io.BytesIO()
    PIL.Image.fromarray(pixels).save(upright, format="JPEG")
    exif = PIL.Image.Exif()
    exif[EXIF_ORIENTATION] = 6  # rotate 90 degrees clockwise to display
    PIL.Image.fromarray(pixels).save(rotated, format="JPEG", exif=exif.tobytes())
    kind, size, _ = read_for_gpu(upright.getvalue())
    assert (kind, size) == ("jpeg", (24, 40))
    kind, size, rgb = read_for_gpu(rotated.getvalue())
    assert (kind, size) == ("decoded", (40, 24))
    expected = np.asarray(read_image(rotated.getvalue()).convert("RGB")).transpose(2, 0, 1)
    assert np.array_equal(rgb, expected)
