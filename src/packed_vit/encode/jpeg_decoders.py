"""The GPU path's JPEG decoders (`--jpeg-decoder`): a chunk of JPEG files -> [3, H, W] uint8 RGB images on a GPU.

One interface, `decode(encoded) -> list[torch.Tensor | Exception]`: each item a file's bytes (a 1-D uint8 CPU tensor,
possibly a view of a larger buffer); each result the image on the decoder's CUDA device, ready for the work the caller
queues on its current CUDA stream after the call (no device-wide wait is needed), or the exception of a file that
cannot be decoded (the pipeline names it as a skip; the other files of the batch are decoded all the same). Files go
as stored: the pipeline sends only RGB / grayscale JPEGs without an EXIF rotation (`gpu_preprocessing.read_for_gpu`).

- `nvjpeg` (`NvJpegDecoder`): torchvision's `decode_jpeg` on CUDA (nvJPEG with its default flags). Its pixels are up to
  51 levels off libjpeg-turbo's (PIL's) at a few pixels (mean 0.41 on the benchmark corpus: RESULTS.md).
- `nvimgcodec` (`HardwareJpegDecoder`): the GPU's hardware JPEG engines (A100, H100, H200...) through NVIDIA's
  nvImageCodec, an optional extra: within 1 level of PIL on the 3000-JPEG corpus (issue 23's probe).
- `auto`: `AUTO_JPEG_DECODER`, or nvJPEG where that one cannot be made.

Both import their library only when made, so the rest of the job runs without torchvision or nvImageCodec.
"""

from __future__ import annotations

import importlib
import importlib.util
import io
import os

import numpy as np
import PIL.Image
import torch

JPEG_DECODERS = ("auto", "nvjpeg", "nvimgcodec")
# What `auto` takes: nvJPEG, measured faster inside the job on the H200 in every pair (Siglip2 256 patches: 1769 vs
# 1433 images/s eager, 1652 vs 1283 with CUDA graphs; AIMv2-224: 2224 vs 1762, 1950 vs 1454; benchmarks/RESULTS.md,
# encode job, session 8). Were it nvimgcodec, `auto` would fall back to nvJPEG where nvImageCodec is not installed or
# the GPU has no hardware JPEG engines.
AUTO_JPEG_DECODER = "nvjpeg"
INSTALL_NVIMGCODEC = (
    'pip install "packed-vit[nvimgcodec]" (NVIDIA\'s nvidia-nvimgcodec-cu13[nvjpeg] for CUDA 13; '
    "nvidia-nvimgcodec-cu12[nvjpeg] for CUDA 12)"
)
# libjpeg-turbo's default chroma upsampling ("fancy", interpolating), which PIL decodes with. nvImageCodec 0.9's nvJPEG
# extensions default to it; 0.8's Python Decoder turned it off. Said explicitly so that every version decodes alike.
NVIMGCODEC_OPTIONS = ":fancy_upsampling=1"


def tiny_jpeg(side: int = 8) -> bytes:
    """A baseline 4:2:0 JPEG of side x side pixels (a gradient): decoded once when a decoder is made, to find out that
    it works."""
    ramp = np.linspace(0, 255, side, dtype=np.uint8)
    pixels = np.stack(np.broadcast_arrays(ramp[:, None], ramp[None, :], ramp[::-1, None]), axis=-1)
    buffer = io.BytesIO()
    PIL.Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="JPEG")
    return buffer.getvalue()


def cuda_device(device) -> torch.device:
    device = torch.device(device)
    if device.type != "cuda":
        raise ValueError("GPU preprocessing needs a CUDA device: use --preprocess cpu on this one")
    return device


def missing_nvimgcodec(reason: str) -> ValueError:
    return ValueError(f"--jpeg-decoder nvimgcodec needs NVIDIA's nvImageCodec, not importable here ({reason}): "
                      f"{INSTALL_NVIMGCODEC}; or use --jpeg-decoder nvjpeg")  # fmt: skip


def check_jpeg_decoder(name: str) -> None:
    """Refuses (ValueError) an unknown name, and `nvimgcodec` when its package is not installed, without importing it
    or touching a GPU: what the job checks before it writes anything."""
    if name not in JPEG_DECODERS:
        raise ValueError(f"jpeg_decoder must be one of {', '.join(JPEG_DECODERS)}, got {name!r}")
    if name == "nvimgcodec":
        try:
            found = importlib.util.find_spec("nvidia.nvimgcodec") is not None
        except (ImportError, ValueError):  # no `nvidia` package at all; a module in sys.modules without a spec
            found = False
        if not found:
            raise missing_nvimgcodec("no module nvidia.nvimgcodec")


def make_jpeg_decoder(name: str, device):
    """The decoder `name` ("auto", "nvjpeg", "nvimgcodec") on the CUDA `device`; ValueError (the reason and what to do)
    where it cannot be made. "auto" never fails for the lack of nvImageCodec."""
    check_jpeg_decoder(name)
    if name == "auto":
        if AUTO_JPEG_DECODER == "nvimgcodec":
            try:
                return HardwareJpegDecoder(device)
            except ValueError:  # not installed, no CUDA device, no hardware engines: nvJPEG says what it lacks, if any
                pass
        return NvJpegDecoder(device)
    return NvJpegDecoder(device) if name == "nvjpeg" else HardwareJpegDecoder(device)


class NvJpegDecoder:
    """torchvision's nvJPEG decoder on CUDA, a batch per call.

    Pixels vs PIL (libjpeg-turbo): up to 51 levels apart at a few pixels, mean 0.41 on the benchmark corpus. From
    torchvision's source (0.19 on), not measured here: its batch decode sends baseline JPEGs to nvJPEG's hardware
    backend where the GPU has one (the same engines as `nvimgcodec`) and the rest to nvJPEG's hybrid decoder, both with
    NVJPEG_FLAGS_DEFAULT, i.e. without libjpeg's interpolating chroma upsampling, which nvImageCodec turns on: the
    likely source of most of the difference. Ordering: the call returns once the batch is decoded (torchvision waits
    for its decoder's stream), so any work queued after it sees the pixels."""

    name = "nvjpeg"

    def __init__(self, device):
        self.device = cuda_device(device)
        try:
            import torchvision.io
        except ImportError as error:
            raise ValueError(f"GPU preprocessing needs torchvision ({error}): use --preprocess cpu") from None
        self.io = torchvision.io
        try:  # a torchvision built without nvJPEG fails here, not on every image
            self.io.decode_jpeg(torch.frombuffer(bytearray(tiny_jpeg()), dtype=torch.uint8), device=self.device)
        except RuntimeError as error:
            raise ValueError(f"GPU preprocessing needs torchvision's nvJPEG decoder ({error}): use --preprocess cpu") \
                from None  # fmt: skip

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        """JPEG bytes -> [3, H, W] uint8 on the GPU, a batch at a time; a file nvJPEG refuses gets the error."""
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


def import_nvimgcodec():
    # nvImageCodec logs a warning per file a backend declines (every progressive JPEG at the engines, which the
    # fallback then decodes): errors only, unless the user set PYNVIMGCODEC_VERBOSITY. Read once, at its import.
    os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "1")
    try:
        return importlib.import_module("nvidia.nvimgcodec")
    except (ImportError, OSError) as error:  # not installed; installed without its CUDA libraries
        raise missing_nvimgcodec(str(error)) from None


class HardwareJpegDecoder:
    """The GPU's hardware JPEG engines through nvImageCodec (`nvidia.nvimgcodec`), a batch per call, with a fallback.

    Two nvImageCodec decoders on the device: `engines` has the hardware backend only (`BackendKind.HW_GPU_ONLY`);
    `fallback` has nvImageCodec's default backends (all of them: GPU, hybrid GPU / CPU, CPU libjpeg-turbo; a file one
    declines goes to the next) and gets what `engines` declined: progressive JPEGs (all 60 of the corpus), chroma
    subsamplings the engines lack (4:1:1...), any file a failed batch left undecoded.
    Pixels vs PIL (libjpeg-turbo), on issue 23's 3000-JPEG corpus:
    - engines: within 1 level, mean difference 0.0000; 4:4:4 and grayscale identical, 4:2:2 within 1;
    - fallback: within 3 levels on the corpus's progressive JPEGs.
    Both decode with libjpeg's chroma interpolation (`NVIMGCODEC_OPTIONS`). Grayscale JPEGs come out as RGB with three
    equal channels, as PIL's convert("RGB"). A file neither can decode gets a RuntimeError (nvImageCodec returns no
    reason; with PYNVIMGCODEC_VERBOSITY=2 or more it logs a warning per file on stderr).

    Ordering and memory: both decode on the caller's current CUDA stream (`cuda_stream=`), and nvImageCodec allocates
    each image there (stream-ordered, `cudaMallocAsync`), so work queued on that stream after the call sees the pixels.
    No copy: each image becomes a torch tensor through DLPack (`torch.from_dlpack`, which also orders the caller's
    stream after the image's), and the tensor owns it from then on: the buffer is freed when the tensor is, ordered on
    that same stream, so after the work queued on it. HWC viewed as CHW (`permute`): a [3, H, W] view of channel-last
    memory, which the resize reads as any strided tensor (tests/test_jpeg_decoders.py: the same patches as a copy).
    """

    name = "nvimgcodec"

    def __init__(self, device):
        self.nvimgcodec = nvimgcodec = import_nvimgcodec()
        self.device = cuda_device(device)
        index = self.device.index if self.device.index is not None else torch.cuda.current_device()
        self.device = torch.device("cuda", index)
        engines = [nvimgcodec.Backend(nvimgcodec.BackendKind.HW_GPU_ONLY)]
        try:
            self.engines = nvimgcodec.Decoder(device_id=index, backends=engines, options=NVIMGCODEC_OPTIONS)
            self.fallback = nvimgcodec.Decoder(device_id=index, options=NVIMGCODEC_OPTIONS)
        except Exception as error:  # noqa: BLE001 (nvImageCodec raises its own exception types)
            raise ValueError(f"nvImageCodec cannot make a decoder on {self.device} ({error}): "
                             "use --jpeg-decoder nvjpeg") from None  # fmt: skip
        # As stored, no EXIF rotation (the pipeline sends only upright JPEGs), RGB out (grayscale replicated).
        self.params = nvimgcodec.DecodeParams(apply_exif_orientation=False, color_spec=nvimgcodec.ColorSpec.SRGB)
        (probe,) = self.decode_with(self.engines, [np.frombuffer(tiny_jpeg(256), dtype=np.uint8)])
        if not isinstance(probe, torch.Tensor):  # a GPU without the engines decodes nothing here
            raise ValueError(f"{torch.cuda.get_device_name(self.device)} has no hardware JPEG engines nvImageCodec can "
                             "use (A100, H100, H200 and others have them): use --jpeg-decoder nvjpeg")  # fmt: skip

    def decode_with(self, decoder, encoded: list[np.ndarray]) -> list[torch.Tensor | Exception | None]:
        """One nvImageCodec batch on the current stream: the images; the exception of a file whose header cannot be
        read; None where the decoder declined the file or failed on it."""
        results: list = [None] * len(encoded)
        streams = {}
        for i, data in enumerate(encoded):
            try:
                streams[i] = self.nvimgcodec.CodeStream(data)
            except Exception as error:  # noqa: BLE001 (nvImageCodec raises its own types for a header it cannot read)
                results[i] = RuntimeError(f"nvImageCodec cannot read this JPEG: {error}")
        if streams:
            stream = torch.cuda.current_stream(self.device).cuda_stream
            images = decoder.decode(list(streams.values()), params=self.params, cuda_stream=stream)
            for i, image in zip(streams, images):
                results[i] = None if image is None else self.as_tensor(image)
        return results

    def as_tensor(self, image) -> torch.Tensor:
        """An nvImageCodec image (HWC, on the device) -> [3, H, W] uint8, the same memory, owned by torch."""
        pixels = torch.from_dlpack(image).permute(2, 0, 1)
        if pixels.shape[0] == 1:  # a grayscale image, should a backend keep one channel: RGB as PIL's convert("RGB")
            pixels = pixels.expand(3, -1, -1)
        return pixels

    def decode(self, encoded: list[torch.Tensor]) -> list[torch.Tensor | Exception]:
        """JPEG bytes -> [3, H, W] uint8 on the GPU: the engines first, the fallback for what they decline."""
        if not encoded:
            return []
        arrays = [data.numpy() for data in encoded]  # views: nvImageCodec reads the bytes where they are
        decoded = self.decode_with(self.engines, arrays)
        declined = [i for i, image in enumerate(decoded) if image is None]
        if declined:
            for i, image in zip(declined, self.decode_with(self.fallback, [arrays[i] for i in declined])):
                decoded[i] = RuntimeError("nvImageCodec could not decode this JPEG") if image is None else image
        return decoded
