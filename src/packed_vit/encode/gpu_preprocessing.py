"""The GPU preprocessing path of the encode job (`--preprocess gpu`, Siglip2 checkpoints, CUDA).

Workers only read the files (and the image header, to tell JPEGs from the rest). In the main process JPEGs are
decoded on the GPU by torchvision's nvJPEG decoder, a batch per chunk; other formats arrive decoded by PIL. Each
image is then resized, rescaled and normalized on the GPU with the very calls of transformers' torchvision backend
of `Siglip2ImageProcessor` (`tvF.resize` with antialias, then `tvF.normalize` with mean and std divided by the
rescale factor, in float32), and cut into patches as there. So the patches equal that backend's run on the same
device for the same decoded pixels; nvJPEG's pixels may differ from libjpeg's by a level here and there.

torchvision is imported only here, so the rest of the job runs without it.
"""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import torch

from .inputs import Sample

GPU_DECODED_FORMATS = ("JPEG",)
GPU_DECODED_MODES = ("RGB", "L")  # nvJPEG's RGB output equals PIL's convert("RGB") for these; CMYK etc. go by PIL


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
        if image.format in GPU_DECODED_FORMATS and image.mode in GPU_DECODED_MODES:
            return "jpeg", (image.height, image.width), np.frombuffer(data, dtype=np.uint8)
        image.load()
        rgb = _pil_to_rgb(image)
    return "decoded", rgb.shape[:2], np.ascontiguousarray(rgb.transpose(2, 0, 1))


def tiny_jpeg() -> bytes:
    buffer = io.BytesIO()
    PIL.Image.new("RGB", (8, 8)).save(buffer, format="JPEG")
    return buffer.getvalue()


class GpuPreprocessing:
    """Siglip2 preprocessing on a CUDA device, as transformers' torchvision backend does it.

    Per image only the resize runs (its sizes are the image's own); the patches of a whole chunk are then normalized
    in one pass. Normalizing is elementwise per channel, so normalizing the patches equals normalizing the image
    and then cutting it, to the bit."""

    def __init__(self, processor, device: torch.device):
        if device.type != "cuda":
            raise ValueError("GPU preprocessing needs a CUDA device: use --preprocess cpu on this one")
        if not hasattr(processor, "max_num_patches") or hasattr(processor, "is_native"):
            raise ValueError("GPU preprocessing exists for Siglip2 checkpoints only: use --preprocess cpu")
        try:
            import torchvision.io
            from torchvision.transforms.v2 import InterpolationMode
            from torchvision.transforms.v2 import functional as tvF
        except ImportError as error:
            raise ValueError(f"GPU preprocessing needs torchvision ({error}): use --preprocess cpu") from None
        self.io, self.tvF = torchvision.io, tvF
        self.device = device
        try:  # a torchvision built without nvJPEG fails here, not on every image
            self.io.decode_jpeg(torch.frombuffer(bytearray(tiny_jpeg()), dtype=torch.uint8), device=device)
        except RuntimeError as error:
            raise ValueError(f"GPU preprocessing needs torchvision's nvJPEG decoder ({error}): use --preprocess cpu") \
                from None  # fmt: skip
        self.options = options = processor.options({"do_convert_rgb": True})
        # transformers' pil_torch_interpolation_mapping, for the PIL filters Siglip2 checkpoints use
        self.interpolation = {0: InterpolationMode.NEAREST, 2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC,
                              1: InterpolationMode.LANCZOS}[options["resample"]]  # fmt: skip
        self.mode = {InterpolationMode.NEAREST: "nearest", InterpolationMode.BILINEAR: "bilinear",
                     InterpolationMode.BICUBIC: "bicubic"}.get(self.interpolation)  # fmt: skip
        # transformers fuses rescale into normalize: mean / factor and std / factor, in float32 on the device
        self.mean = self.std = None
        if options["do_rescale"] and options["do_normalize"]:
            self.mean = torch.tensor(options["image_mean"], device=device) * (1.0 / options["rescale_factor"])
            self.std = torch.tensor(options["image_std"], device=device) * (1.0 / options["rescale_factor"])
        elif options["do_normalize"]:
            self.mean = torch.as_tensor(options["image_mean"], dtype=torch.float32, device=device)
            self.std = torch.as_tensor(options["image_std"], dtype=torch.float32, device=device)

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        """JPEG bytes -> [3, H, W] uint8 on the GPU, a batch at a time; a file nvJPEG refuses gets the error.
        The call returns once the batch is decoded (torchvision waits for its decoder's stream)."""
        if not encoded:
            return []
        read_rgb = self.io.ImageReadMode.RGB
        try:
            return list(self.io.decode_jpeg(encoded, mode=read_rgb, device=self.device))
        except RuntimeError:  # one bad file fails the batch: find it
            decoded = []
            for data in encoded:
                try:
                    decoded.append(self.io.decode_jpeg(data, mode=read_rgb, device=self.device))
                except RuntimeError as error:
                    decoded.append(error)
            return decoded

    def resize(self, image: torch.Tensor, height: int, width: int) -> torch.Tensor:
        """`tvF.resize(image, [height, width], antialias=True)` of a [3, H, W] uint8 CUDA image, to the bit.

        Written out because the torchvision call spends about 0.6 ms of host time per image in its dispatch and
        checks (measured on the H200 machine: RESULTS.md), more than the GPU needs for the image. These are the
        torch calls it makes on CUDA (torchvision 0.2x, `resize_image`): no-op at the same size; nearest on uint8;
        otherwise float32, `interpolate(align_corners=False, antialias=True)`, clamp (bicubic), round, uint8."""
        if (height, width) == tuple(image.shape[-2:]):
            return image
        if self.mode is None:  # lanczos: torchvision's own path
            return self.tvF.resize(image, [height, width], interpolation=self.interpolation, antialias=True)
        if self.mode == "nearest":
            return torch.nn.functional.interpolate(image[None], size=[height, width], mode="nearest")[0]
        resized = torch.nn.functional.interpolate(image[None].float(), size=[height, width], mode=self.mode,
                                                  align_corners=False, antialias=True)[0]  # fmt: skip
        if self.mode == "bicubic":
            resized = resized.clamp_(min=0, max=255)
        return resized.round_().to(torch.uint8)

    def resized_patches(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[3, H, W] uint8 on the GPU -> (its resized image's patches [h*w, p*p*3] uint8, channel last, (1, h, w))."""
        from ..processing.image_processing_siglip2_packing import naflex_grid

        options, patch_size = self.options, self.options["patch_size"]
        if options["do_resize"]:
            rows, cols = naflex_grid(image.shape[1], image.shape[2], patch_size, options["max_num_patches"])
            image = self.resize(image, rows * patch_size, cols * patch_size)
        channels, height, width = image.shape
        rows, cols = height // patch_size, width // patch_size
        patches = image.reshape(channels, rows, patch_size, cols, patch_size).permute(1, 3, 2, 4, 0)
        return patches.reshape(rows * cols, -1), (1, rows, cols)

    def normalized(self, patches: torch.Tensor) -> torch.Tensor:
        """uint8 patches [n, p*p*3] -> float32, as the backend's fused rescale and normalize (`tvF.normalize`:
        subtract, then divide, in float32)."""
        options = self.options
        if self.mean is not None:
            pixels = patches.float().view(len(patches), -1, 3)
            return pixels.sub_(self.mean).div_(self.std).view(len(patches), -1)
        if options["do_rescale"]:
            return patches * options["rescale_factor"]
        return patches.float()

    def patches(self, image: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int, int]]:
        """[3, H, W] uint8 on the GPU -> (float32 patches [h*w, p*p*3], (1, h, w)), as the torchvision backend."""
        patches, grid = self.resized_patches(image)
        return self.normalized(patches), grid

    def prepare_chunk(self, chunk) -> None:
        """Sets `pixels` and `grid` of the chunk's GPU-path entries; a JPEG nvJPEG cannot decode becomes a skip."""
        jpegs = [entry for entry in chunk.entries if entry.kind == "jpeg"]
        decoded = self.decode([chunk.encoded[entry.rows] for entry in jpegs])
        images = dict(zip(map(id, jpegs), decoded))
        mine, pieces = [], []
        for entry in chunk.entries:
            if entry.kind == "jpeg":
                image = images[id(entry)]
                if isinstance(image, Exception):
                    entry.kind, entry.why = "skip", f"{type(image).__name__}: {image}"
                    continue
            elif entry.kind == "decoded":
                image = chunk.decoded[entry.rows.start].to(self.device, non_blocking=True)
            else:
                continue
            patches, entry.grid = self.resized_patches(image)
            mine.append(entry)
            pieces.append(patches)
        if not mine:
            return
        pixels = self.normalized(torch.cat(pieces))
        start = 0
        for entry, patches in zip(mine, pieces):
            entry.pixels = pixels[start : start + len(patches)]
            start += len(patches)
