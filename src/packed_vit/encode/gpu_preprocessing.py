"""The GPU preprocessing path of the encode job (`--preprocess gpu`, CUDA): Siglip2 and AIMv2 checkpoints.

Workers only read the files (and the image header, to tell JPEGs from the rest). In the pipeline's preprocessing
thread JPEGs are decoded on the GPU by `jpeg_decoders` (nvJPEG, nvImageCodec), a batch per chunk; others arrive decoded
by PIL. Each image is then resized (and, for fixed-size AIMv2, center cropped), rescaled and normalized as the
torch operations of transformers' torchvision backend do it (`Siglip2ImageProcessor`; `CLIPImageProcessor` for AIMv2):
`tvF.resize` with antialias, the backend's center crop, `tvF.normalize` with mean and std divided by the rescale
factor, in float32. Where to resize to is our processors' rule: `naflex_grid` (Siglip2), `fixed_size` + crop (AIMv2
224/336/448, = CLIPImageProcessor's), `native_grid` (AIMv2 native, which transformers has no processor for).
`TorchPreprocessing` runs those torch operations image by image; on CUDA with Triton, `GpuPreprocessing` runs a whole
chunk through `fused_preprocessing`'s two launches instead, to the same bits (tests/test_encode_gpu.py), once their
kernels are ready (the torch operations until then: a machine's first run compiles them).

Exactness: on CUDA the patches equal the torchvision backend's run on the same device for the same decoded pixels
(tests/test_encode_gpu.py). The pixel code (`TorchPreprocessing`) is plain torch and runs on any device; on the CPU
it makes the CUDA path's float resize, which torchvision's CPU uint8 kernels do not, so CPU runs are compared with
our PIL processors within the resize filters' difference (tests/test_torch_preprocessing.py). nvJPEG's pixels may
differ from libjpeg's by a level here and there (up to 51 at a few pixels on the benchmark corpus).

torchvision and nvImageCodec are imported only when `GpuPreprocessing` is made: the rest of the job runs without them.
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import torch

from .inputs import Sample, read_image
from .fused_preprocessing import FusedChunkPreprocessing
from .jpeg_decoders import make_jpeg_decoder
from .pipeline import StageClock

GPU_DECODED_FORMATS = ("JPEG",)
GPU_DECODED_MODES = ("RGB", "L")  # nvJPEG's RGB output equals PIL's convert("RGB") for these; CMYK etc. go by PIL
# transformers' pil_torch_interpolation_mapping, as F.interpolate modes (torchvision's own resize for the rest)
INTERPOLATE_MODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}
EXIF_ORIENTATION = 0x0112  # the EXIF tag of how the stored pixels are to be rotated / mirrored


def read_for_gpu(source) -> tuple[str, tuple[int, int], np.ndarray]:
    """In a worker: ("jpeg", (h, w), file bytes) for a JPEG nvJPEG can decode, else ("decoded", (h, w), [3, H, W]
    uint8 RGB decoded by PIL (alpha on white, as the processors convert)). Raises what PIL raises on a bad file."""
    from ..processing.image_processing_packing import _pil_to_rgb

    if isinstance(source, Sample):
        data = source.read_bytes()
    elif isinstance(source, (str, bytes)) or hasattr(source, "read_bytes"):
        data = source if isinstance(source, bytes) else open(source, "rb").read()
    else:  # an image object (PIL) given to encode_images
        rgb = _pil_to_rgb(source)
        return "decoded", rgb.shape[:2], np.ascontiguousarray(rgb.transpose(2, 0, 1))
    with PIL.Image.open(io.BytesIO(data)) as image:
        upright = image.getexif().get(EXIF_ORIENTATION, 1) == 1  # nvJPEG decodes as stored, ignoring the EXIF
        if upright and image.format in GPU_DECODED_FORMATS and image.mode in GPU_DECODED_MODES:
            return "jpeg", (image.height, image.width), np.frombuffer(data, dtype=np.uint8)
    rgb = _pil_to_rgb(read_image(data))  # upright, as the CPU path and transformers' load_image read it
    return "decoded", rgb.shape[:2], np.ascontiguousarray(rgb.transpose(2, 0, 1))


def tower_of_processor(processor) -> str:
    """"siglip2" | "aimv2" from a packed processor's options (installed or Hub remote code alike)."""
    options = processor.options({}) if callable(getattr(processor, "options", None)) else {}
    if "is_native" in options:
        return "aimv2"
    if "max_num_patches" in options:
        return "siglip2"
    raise ValueError(f"GPU preprocessing exists for the packed Siglip2 and AIMv2 processors, not {type(processor)}")


def center_crop(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """transformers' torchvision backend's `center_crop` of a [C, H, W] image: zero padding (the smaller half
    before) when it is smaller than the crop, then the window at int((H - height) / 2), int((W - width) / 2)."""
    image_height, image_width = image.shape[-2:]
    if height > image_height or width > image_width:
        pad_h, pad_w = max(0, height - image_height), max(0, width - image_width)
        padding = (pad_w // 2, (pad_w + 1) // 2, pad_h // 2, (pad_h + 1) // 2)  # left, right, top, bottom
        image = torch.nn.functional.pad(image, padding)
        image_height, image_width = image.shape[-2:]
    top, left = center_crop_offsets(image_height, image_width, height, width)
    return image[..., top : top + height, left : left + width]


def center_crop_offsets(image_height: int, image_width: int, height: int, width: int) -> tuple[int, int]:
    """(top, left) of the backend's center crop window in an image at least as large as it."""
    return int((image_height - height) / 2.0), int((image_width - width) / 2.0)


class TorchPreprocessing:
    """A packed processor's preprocessing in torch, on the device of the image: [3, H, W] uint8 -> patches.

    Per image only the resize (and crop) runs, at the image's own sizes; the patches of many images are then
    normalized in one pass (`normalized`). Normalizing is elementwise per channel, so normalizing the patches equals
    normalizing the image and then cutting it, to the bit."""

    fused: FusedChunkPreprocessing | None = None  # `many_patches`' kernels: `GpuPreprocessing` sets them on CUDA

    def __init__(self, processor):
        self.tower = tower_of_processor(processor)
        self.options = options = processor.options({"do_convert_rgb": True})
        self.patch_size = options["patch_size"]
        self.mode = INTERPOLATE_MODES.get(options["resample"])  # None: lanczos etc., torchvision's own resize
        # The op `F.interpolate(mode=..., align_corners=False, antialias=True)` ends in, called without its Python
        # checks (about 7 us of host time per image on the CPU machine; the job's host time: RESULTS.md)
        self.antialiased_resize = {"bilinear": torch._C._nn._upsample_bilinear2d_aa,
                                   "bicubic": torch._C._nn._upsample_bicubic2d_aa}.get(self.mode)  # fmt: skip
        # transformers fuses rescale into normalize: mean / factor and std / factor, in float32
        self.mean = self.std = None
        if options["do_normalize"]:
            scale = 1.0 / options["rescale_factor"] if options["do_rescale"] else 1.0
            self.mean = torch.tensor(options["image_mean"]) * scale
            self.std = torch.tensor(options["image_std"]) * scale

    def target_size(self, height: int, width: int) -> tuple[int, int] | None:
        """The resized (height, width) in pixels, by our processor's rule; None: no resize."""
        options, patch_size = self.options, self.patch_size
        if not options["do_resize"]:
            return None
        if self.tower == "siglip2":
            from ..processing.image_processing_siglip2_packing import naflex_grid

            rows, cols = naflex_grid(height, width, patch_size, options["max_num_patches"])
        elif options["is_native"]:
            from ..processing.image_processing_aimv2_packing import native_grid

            rows, cols = native_grid(height, width, patch_size, options["min_num_patches"], options["max_num_patches"])
        else:
            from ..processing.image_processing_aimv2_packing import Aimv2PackingImageProcessor

            return Aimv2PackingImageProcessor.fixed_size(height, width, options["size"])
        return rows * patch_size, cols * patch_size

    def resize(self, image: torch.Tensor, height: int, width: int, finish: bool = True) -> torch.Tensor:
        """`tvF.resize(image, [height, width], antialias=True)` of a [3, H, W] uint8 CUDA image, to the bit.
        `finish=False`: where the resize interpolates in float32, its values before the clamp and round, which
        `finish_resize` applies afterwards; elementwise, so once on many images' patches it gives the same bits
        with two calls fewer per image (the encode job's host time: RESULTS.md). Other images come back uint8.

        Written out because the torchvision call spends about 0.6 ms of host time per image in its dispatch and
        checks (measured on the H200 machine: RESULTS.md), more than the GPU needs for the image. These are the
        torch calls it makes on CUDA (torchvision 0.2x, `resize_image`): no-op at the same size; nearest on uint8;
        otherwise float32, `interpolate(align_corners=False, antialias=True)`, clamp (bicubic), round, uint8. On the
        CPU the same calls run (torchvision itself would take its uint8 kernels there)."""
        if (height, width) == tuple(image.shape[-2:]):
            return image
        if self.mode is None:
            from torchvision.transforms.v2 import InterpolationMode
            from torchvision.transforms.v2 import functional as tvF

            interpolation = InterpolationMode.LANCZOS if self.options["resample"] == 1 else InterpolationMode.BICUBIC
            return tvF.resize(image, [height, width], interpolation=interpolation, antialias=True)
        if self.mode == "nearest":
            return torch.nn.functional.interpolate(image[None], size=[height, width], mode="nearest")[0]
        resized = self.antialiased_resize(image[None].float(), [height, width], False, None)[0]  # align_corners
        return self.finish_resize(resized).to(torch.uint8) if finish else resized

    def finish_resize(self, resized: torch.Tensor) -> torch.Tensor:
        """The float32 values of `resize(..., finish=False)` (any number of images' patches) rounded to 0..255 as
        torchvision does, in place, still float32. A no-op on values already whole (images that were not resized)."""
        if self.mode == "bicubic":
            resized = resized.clamp_(min=0, max=255)
        return resized.round_()

    def model_image(self, image: torch.Tensor, size: tuple[int, int] | None = None,
                    finish: bool = True) -> torch.Tensor:  # fmt: skip
        """[3, H, W] uint8 -> the uint8 image the model sees (resized, cropped), sides multiples of the patch.
        `size`: `target_size` of the image, if already known; `finish`: see `resize`."""
        size = size or self.target_size(image.shape[1], image.shape[2])
        if size is not None:
            image = self.resize(image, *size, finish=finish)
        if self.crop_size is not None:
            image = center_crop(image, *self.crop_size)
        return image

    @property
    def crop_size(self) -> tuple[int, int] | None:
        """(height, width) of the center crop after the resize (fixed-size AIMv2), or None: no crop."""
        options = self.options
        if self.tower == "aimv2" and not options["is_native"] and options["do_center_crop"]:
            return options["crop_size"]["height"], options["crop_size"]["width"]
        return None

    def crop_window(self, height: int, width: int) -> tuple[int, int, int, int] | None:
        """(top, left, height, width) of the model image in the resized one of `height` x `width`: `center_crop`'s
        window, or the whole image where there is no crop. None where the crop is larger than the image (it pads)."""
        if self.crop_size is None:
            return 0, 0, height, width
        crop_h, crop_w = self.crop_size
        if crop_h > height or crop_w > width:
            return None
        return *center_crop_offsets(height, width, crop_h, crop_w), crop_h, crop_w

    def check_whole_patches(self, height: int, width: int) -> None:
        if height % self.patch_size or width % self.patch_size:
            raise ValueError(
                f"Image of {height}x{width} pixels is not a whole number of {self.patch_size}x{self.patch_size} "
                "patches: keep do_resize (or do_center_crop) on"
            )  # the CPU processor's `patchify` refuses it the same way

    def resized_patches(
        self, image: torch.Tensor, size: tuple[int, int] | None = None, finish: bool = True
    ) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[3, H, W] uint8 -> (its model image's patches [h*w, p*p*3] uint8, channel last, (1, h, w)).
        `size`: `target_size` of the image, if already known; `finish`: see `resize`."""
        image, patch_size = self.model_image(image, size, finish), self.patch_size
        channels, height, width = image.shape
        self.check_whole_patches(height, width)
        rows, cols = height // patch_size, width // patch_size
        patches = image.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
        return patches.reshape(rows * cols, -1), (1, rows, cols)

    def many_patches(self, images: list[torch.Tensor], sizes: list | None = None):
        """[3, H, W] uint8 images -> (float32 patches of them all, image after image; their grids), as `patches`
        makes them one by one: by `fused` (`fused_preprocessing`) where it is set, applies and its kernels are ready,
        else by the torch ops (their resized values normalized at once), the same bits. `sizes`: each image's
        `target_size` where known, else None."""
        sizes = sizes or [None] * len(images)
        sizes = [size or self.target_size(image.shape[1], image.shape[2]) for image, size in zip(images, sizes)]
        if self.fused is not None and self.fused.ready():
            crops = [self.crop_window(*size) for size in sizes]
            if None not in crops:  # an image smaller than the crop is zero padded: only the torch ops do that
                for _, _, height, width in crops:
                    self.check_whole_patches(height, width)
                grids = [(1, height // self.patch_size, width // self.patch_size) for _, _, height, width in crops]
                return self.fused.patches(images, sizes, crops), grids
        pieces, grids = [], []
        for image, size in zip(images, sizes):
            patches, grid = self.resized_patches(image, size, finish=False)
            pieces.append(patches)
            grids.append(grid)
        pixels = torch.cat(pieces)  # float32 where any image was resized (uint8 ones exactly converted)
        return self.normalized(self.finish_resize(pixels) if pixels.is_floating_point() else pixels), grids

    def normalized(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches [n, p*p*3] (or float32 ones of the same values, `finish_resize`'s: normalized in place) ->
        float32, as the backend's fused rescale and normalize (`tvF.normalize`: subtract, then divide, in float32)."""
        options = self.options
        if self.mean is not None:
            if self.mean.device != patches.device:
                self.mean, self.std = self.mean.to(patches.device), self.std.to(patches.device)
            pixels = patches.float().view(len(patches), -1, 3)
            return pixels.sub_(self.mean).div_(self.std).view(len(patches), -1)
        if options["do_rescale"]:
            return patches * options["rescale_factor"]
        return patches.float()

    def patches(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[3, H, W] uint8 -> (float32 patches [h*w, p*p*3], (1, h, w)), as the torchvision backend."""
        patches, grid = self.resized_patches(image)
        return self.normalized(patches), grid


class GpuPreprocessing(TorchPreprocessing):
    """`TorchPreprocessing` on a CUDA device, with whole chunks of JPEGs decoded there by `decoder`
    (`jpeg_decoders.make_jpeg_decoder(jpeg_decoder, device)`: "auto", "nvjpeg" or "nvimgcodec"), and resized,
    cropped and normalized by `fused_preprocessing` in two launches per chunk where it applies (`fused`: bilinear
    or bicubic filters, with Triton), to the same bits as the torch ops, which run otherwise."""

    def __init__(self, processor, device: torch.device, jpeg_decoder: str = "auto", fused: bool = True):
        if device.type != "cuda":
            raise ValueError("GPU preprocessing needs a CUDA device: use --preprocess cpu on this one")
        super().__init__(processor)
        self.device = device
        self.mean = self.mean.to(device) if self.mean is not None else None
        self.std = self.std.to(device) if self.std is not None else None
        self.fused = FusedChunkPreprocessing.for_options(self.mode, self.options, self.mean, self.std, device) \
            if fused else None  # fmt: skip
        if self.fused is not None:
            self.fused.start_warm_up(device)  # beside the decoder's making, next
        try:
            self.decoder = make_jpeg_decoder(jpeg_decoder, device)
        except ValueError:  # the pipeline may fork CPU-path workers next: not while a thread of ours runs CUDA work
            if self.fused is not None:
                self.fused.wait_for_warm_up()
            raise

    def prepare_chunk(self, chunk, clock: StageClock | None = None) -> None:
        """Sets `pixels` and `grid` of the chunk's GPU-path entries; a JPEG nvJPEG cannot decode becomes a skip.
        `clock`: where the host seconds of the decode and of the preprocessing launches are added up."""
        clock = clock or StageClock()
        jpegs = [entry for entry in chunk.entries if entry.kind == "jpeg"]
        with clock.timing("decode: JPEG batches (host waits)"):
            decoded = self.decoder.decode([chunk.encoded[entry.rows] for entry in jpegs])
        with clock.timing("preprocess: resize + normalize launches"):
            decoded = dict(zip(map(id, jpegs), decoded))
            mine, images = [], []
            for entry in chunk.entries:
                if entry.kind == "jpeg":
                    image = decoded[id(entry)]
                    if isinstance(image, Exception):
                        entry.kind, entry.why = "skip", f"{type(image).__name__}: {image}"
                        continue
                elif entry.kind == "decoded":
                    image = chunk.decoded[entry.rows.start].to(self.device, non_blocking=True)
                else:
                    continue
                mine.append(entry)
                images.append(image)
            if not mine:
                return
            sizes = [entry.resize_to if tuple(image.shape[1:]) == tuple(entry.size) else None
                     for entry, image in zip(mine, images)]  # fmt: skip
            pixels, grids = self.many_patches(images, sizes)
            for entry, grid, patches in zip(mine, grids, pixels.split([h * w for _, h, w in grids])):
                entry.grid, entry.pixels, entry.block = grid, patches, pixels
