"""The GPU path's JPEG decoders (packed_vit.encode.jpeg_decoders, `--jpeg-decoder`).

On the CPU (CI): nvImageCodec missing is a clear refusal naming the extra (`make_jpeg_decoder`, the command: exit 2,
nothing written), whether or not it is installed here (its import is blocked); `auto` never needs it; an unknown name
is refused; the decoder is part of a job's identity.

On CUDA (skipped without it; the nvimgcodec tests also without nvImageCodec or without hardware JPEG engines), on
scikit-image's photos saved by PIL: the engines' pixels within 1 level of PIL's for baseline 4:4:4, 4:2:2, 4:2:0 and
grayscale; progressive JPEGs through the fallback within 3; a file that cannot be decoded is its exception and the
rest of the batch is decoded; the images are ready on the caller's stream and owned by torch; nvJPEG's decoder is
torchvision's `decode_jpeg`; the GPU path on the engines embeds as the CPU path (tiny Siglip2 tower, fp32).

On the GPU machine, with nvidia-nvimgcodec-cu13[nvjpeg] and torchvision installed:
    python -m pytest -q tests/test_jpeg_decoders.py
"""

import io
import re
import sys

import checkpoint_formats as formats
import numpy as np
import PIL.Image
import pytest
import torch
from reference import siglip2_pair
from skimage import data
from test_encode_job import checkpoint  # noqa: F401 (the tiny Siglip2 checkpoint fixture)

from packed_vit.cli import main
from packed_vit.encode import encode_images, jpeg_decoders, load_model_and_processor
from packed_vit.encode.gpu_preprocessing import GpuPreprocessing
from packed_vit.encode.jpeg_decoders import HardwareJpegDecoder, NvJpegDecoder, check_jpeg_decoder, make_jpeg_decoder
from packed_vit.processing import Siglip2PackingImageProcessor

EXTRA = 'pip install "packed-vit[nvimgcodec]"'
ENGINE_LEVELS = 1  # most levels from PIL's pixels, engines, baseline JPEGs (issue 23: all 3000 corpus JPEGs)
FALLBACK_LEVELS = 3  # most levels from PIL's pixels, nvImageCodec's other backends, progressive JPEGs (issue 23)
MIN_COSINE = 0.99995  # per image, fp32, the GPU path on the engines vs the CPU path (PIL): the resizes differ
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.fixture
def without_nvimgcodec(monkeypatch):
    """nvImageCodec not importable, whether or not it is installed."""
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)


def jpeg(pixels: np.ndarray, **options) -> bytes:
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def pil_rgb(encoded: bytes) -> np.ndarray:
    """[H, W, 3]: what the CPU path decodes (PIL, libjpeg-turbo, convert("RGB"))."""
    with PIL.Image.open(io.BytesIO(encoded)) as image:
        return np.asarray(image.convert("RGB"))


PHOTOS = {"astronaut": data.astronaut(), "chelsea": data.chelsea(), "coffee, odd sides": data.coffee()[:333, :517]}
SUBSAMPLINGS = {"4:4:4": 0, "4:2:2": 1, "4:2:0": 2}  # PIL's `subsampling`


@pytest.fixture(scope="module")
def baseline() -> dict[str, bytes]:
    files = {f"{name} {label}": jpeg(pixels, subsampling=code)
             for name, pixels in PHOTOS.items() for label, code in SUBSAMPLINGS.items()}  # fmt: skip
    files["camera grayscale"] = jpeg(data.camera())
    files["chelsea grayscale"] = jpeg(np.asarray(PIL.Image.fromarray(data.chelsea()).convert("L")))
    return files


@pytest.fixture(scope="module")
def progressive() -> dict[str, bytes]:
    return {f"{name} progressive": jpeg(pixels, progressive=True) for name, pixels in PHOTOS.items()}


def as_views(files: list[bytes]) -> list[torch.Tensor]:
    """The files as the pipeline hands them over: 1-D uint8 views of one larger buffer (a chunk's)."""
    buffer = torch.frombuffer(bytearray(b"".join(files)), dtype=torch.uint8)
    offsets = np.cumsum([0, *map(len, files)])
    return [buffer[start:end] for start, end in zip(offsets[:-1], offsets[1:])]


def levels_from_pil(image: torch.Tensor, encoded: bytes) -> int:
    """Most levels between a decoded [3, H, W] image and PIL's pixels of the same file."""
    expected = torch.from_numpy(pil_rgb(encoded).copy()).permute(2, 0, 1)
    assert image.shape == expected.shape and image.dtype == torch.uint8
    return (image.cpu().int() - expected.int()).abs().max().item()


@pytest.fixture(scope="module")
def hardware() -> HardwareJpegDecoder:
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    try:
        return HardwareJpegDecoder(torch.device("cuda"))
    except ValueError as refusal:  # only these two skip: any other refusal is a failure
        if "not importable" in str(refusal) or "no hardware JPEG engines" in str(refusal):
            pytest.skip(str(refusal))
        raise


# ---- on the CPU: the extra absent, auto, names, the job ---------------------------------------------------------


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_nvimgcodec_without_its_package_is_refused_naming_the_extra(without_nvimgcodec, device):
    with pytest.raises(ValueError, match=re.escape(EXTRA)):
        make_jpeg_decoder("nvimgcodec", torch.device(device))
    with pytest.raises(ValueError, match=re.escape(EXTRA)):
        check_jpeg_decoder("nvimgcodec")


@pytest.mark.parametrize("auto", ["nvjpeg", "nvimgcodec"])
def test_auto_does_not_need_nvimgcodec(without_nvimgcodec, monkeypatch, auto):
    monkeypatch.setattr(jpeg_decoders, "AUTO_JPEG_DECODER", auto)  # whatever the lead's measurement sets
    check_jpeg_decoder("auto")
    # off CUDA: the GPU path's own refusal, not the extra's
    with pytest.raises(ValueError, match="needs a CUDA device") as refusal:
        make_jpeg_decoder("auto", torch.device("cpu"))
    assert "nvimgcodec" not in str(refusal.value)
    with pytest.raises(ValueError, match="needs a CUDA device"):
        GpuPreprocessing(Siglip2PackingImageProcessor(), torch.device("cpu"))
    if torch.cuda.is_available():
        pytest.importorskip("torchvision")
        assert isinstance(make_jpeg_decoder("auto", torch.device("cuda")), NvJpegDecoder)


def test_an_unknown_decoder_is_refused_even_where_auto_would_take_the_cpu_path(checkpoint, tmp_path):  # noqa: F811
    with pytest.raises(ValueError, match="one of auto, nvjpeg, nvimgcodec, got 'libjpeg'"):
        make_jpeg_decoder("libjpeg", torch.device("cpu"))
    model, processor = load_model_and_processor(str(checkpoint))
    (tmp_path / "a.jpg").write_bytes(jpeg(data.chelsea()))
    with pytest.raises(ValueError, match="got 'libjpeg'"):
        encode_images(model, processor, [("a", tmp_path / "a.jpg")], progress=False, preprocess="auto",
                      jpeg_decoder="libjpeg")  # fmt: skip


@pytest.fixture
def two_photos(tmp_path) -> str:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(jpeg(data.chelsea()[:120, :160]))
    (folder / "b.jpg").write_bytes(jpeg(data.coffee()[:90, :130]))
    return str(folder)


@pytest.mark.parametrize("out", ["folder", "e.safetensors"])
def test_the_command_refuses_nvimgcodec_without_it_and_writes_nothing(
    checkpoint, two_photos, tmp_path, capsys, without_nvimgcodec, out  # noqa: F811
):
    target = tmp_path / out
    status = main(["encode", two_photos, "--model", str(checkpoint), "--out", str(target), "--jpeg-decoder",
                   "nvimgcodec", "--no-progress"])  # fmt: skip
    assert status == 2
    error = capsys.readouterr().err
    assert error.startswith("packed-vit encode: --jpeg-decoder nvimgcodec needs") and EXTRA in error
    assert "Traceback" not in error and not target.exists()


def test_the_cpu_path_does_not_use_a_jpeg_decoder(checkpoint, two_photos, tmp_path, without_nvimgcodec):  # noqa: F811
    assert main(["encode", two_photos, "--model", str(checkpoint), "--out", str(tmp_path / "e.safetensors"),
                 "--preprocess", "cpu", "--jpeg-decoder", "nvimgcodec", "--no-progress"]) == 0  # fmt: skip


def test_another_jpeg_decoder_is_another_job(checkpoint, two_photos, tmp_path, capsys):  # noqa: F811
    out = str(tmp_path / "out")
    common = ["encode", two_photos, "--model", str(checkpoint), "--out", out, "--no-progress"]
    assert main(common) == 0
    assert main([*common, "--jpeg-decoder", "nvjpeg"]) == 2
    assert "differs in: jpeg_decoder" in capsys.readouterr().err


# ---- on CUDA: the hardware engines and their fallback -----------------------------------------------------------


def test_the_engines_decode_baseline_jpegs_within_one_level_of_pil(hardware, baseline):
    names, files = list(baseline), list(baseline.values())
    by_engines = hardware.decode_with(hardware.engines, [view.numpy() for view in as_views(files)])
    decoded = hardware.decode(as_views(files))
    for name, encoded, engine_image, image in zip(names, files, by_engines, decoded):
        assert isinstance(engine_image, torch.Tensor), f"{name}: the engines declined it ({engine_image})"
        assert torch.equal(image, engine_image), name  # decode() took the engines' result
        assert image.device == hardware.device and image.shape[0] == 3
        assert levels_from_pil(image, encoded) <= ENGINE_LEVELS, name
        if "grayscale" in name:  # RGB as PIL's convert("RGB"): three equal channels
            assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2]), name


def test_progressive_jpegs_are_decoded_by_the_fallback_within_three_levels(hardware, baseline, progressive):
    mixed = {**progressive, **baseline}  # in one batch: what the engines decline does not hold back the rest
    decoded = hardware.decode(as_views(list(mixed.values())))
    for (name, encoded), image in zip(mixed.items(), decoded):
        assert isinstance(image, torch.Tensor), f"{name}: {image}"
        bound = FALLBACK_LEVELS if name in progressive else ENGINE_LEVELS
        assert levels_from_pil(image, encoded) <= bound, name


BROKEN = {"zeros after the marker": b"\xff\xd8\xff\xe0" + bytes(100), "not a JPEG": b"GIF89a, not a JPEG at all"}


@pytest.mark.parametrize("which", ["nvimgcodec", "nvjpeg"])
def test_a_file_that_cannot_be_decoded_is_its_exception_and_the_others_are_decoded(request, baseline, which):
    if which == "nvimgcodec":
        decoder = request.getfixturevalue("hardware")
    else:
        if not torch.cuda.is_available():
            pytest.skip("needs CUDA")
        pytest.importorskip("torchvision")
        decoder = NvJpegDecoder(torch.device("cuda"))
    good = [baseline["astronaut 4:2:0"], baseline["chelsea 4:2:2"], baseline["camera grayscale"]]
    files = [good[0], BROKEN["zeros after the marker"], good[1], BROKEN["not a JPEG"], good[2]]
    decoded = decoder.decode(as_views(files))
    assert len(decoded) == len(files)
    assert isinstance(decoded[1], Exception) and isinstance(decoded[3], Exception)
    for i, encoded in zip((0, 2, 4), good):
        assert isinstance(decoded[i], torch.Tensor), decoded[i]
        if which == "nvimgcodec":
            assert levels_from_pil(decoded[i], encoded) <= ENGINE_LEVELS
        else:
            assert decoded[i].shape == (3, *pil_rgb(encoded).shape[:2])


def test_the_images_are_ready_on_the_callers_stream_and_owned_by_torch(hardware, baseline, progressive):
    """Decoded on a side stream and read there at once (a copy queued right after the call); then more batches are
    decoded, whose buffers would take the first batch's memory had it been freed when nvImageCodec's objects went."""
    files = [*baseline.values(), *progressive.values()]
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        images = hardware.decode(as_views(files))
        copies = [image.clone() for image in images]  # queued on `side` right after the call: no wait in between
        for _ in range(3):
            later = hardware.decode(as_views(files[::-1]))
        del later
    side.synchronize()
    for encoded, image, copy in zip(files, images, copies):
        assert torch.equal(image, copy)
        assert levels_from_pil(image, encoded) <= FALLBACK_LEVELS


@needs_cuda
def test_the_nvjpeg_decoder_is_torchvisions_decode_jpeg(baseline):
    torchvision_io = pytest.importorskip("torchvision.io")
    decoder = make_jpeg_decoder("nvjpeg", torch.device("cuda"))
    files = list(baseline.values())
    for view, image in zip(as_views(files), decoder.decode(as_views(files))):
        expected = torchvision_io.decode_jpeg(view, mode=torchvision_io.ImageReadMode.RGB, device="cuda")
        assert torch.equal(image, expected)


def test_the_engines_images_give_the_torchvision_backends_patches(hardware, baseline):
    """The engines' images are [3, H, W] views of channel-last memory: the same patches as a contiguous copy, and as
    transformers' torchvision backend makes of it."""
    pytest.importorskip("torchvision")
    from transformers import Siglip2ImageProcessor

    ours = GpuPreprocessing(Siglip2PackingImageProcessor(max_num_patches=256), torch.device("cuda"), "nvimgcodec")
    assert isinstance(ours.decoder, HardwareJpegDecoder)
    theirs = Siglip2ImageProcessor(patch_size=16, max_num_patches=256)
    for name, image in zip(baseline, ours.decoder.decode(as_views(list(baseline.values())))):
        patches, (_, h, w) = ours.patches(image)
        assert torch.equal(patches, ours.patches(image.contiguous())[0]), name
        expected = theirs(image.contiguous(), return_tensors="pt", device="cuda")["pixel_values"][0, : h * w]
        assert (patches - expected.to(patches.device)).abs().max().item() <= 1e-6, name


def test_the_gpu_path_on_the_engines_embeds_as_the_cpu_path(hardware, baseline, progressive, tmp_path, capsys):
    folder = tmp_path / "ckpt"
    formats.siglip2_full_model(*siglip2_pair(), folder)
    model, processor = load_model_and_processor(str(folder), device="cuda", dtype=torch.float32)
    paths = []
    for i, encoded in enumerate([*baseline.values(), *progressive.values()]):
        paths.append(tmp_path / f"{i:02d}.jpg")
        paths[-1].write_bytes(encoded)
    (tmp_path / "broken.jpg").write_bytes(BROKEN["zeros after the marker"])
    images = [(str(p), p) for p in [*paths[:4], tmp_path / "broken.jpg", *paths[4:]]]
    gpu, gpu_workers = (encode_images(model, processor, images, max_tokens=700, progress=False, workers=workers,
                                      preprocess="gpu", jpeg_decoder="nvimgcodec") for workers in (0, 2))  # fmt: skip
    cpu = encode_images(model, processor, images, max_tokens=700, progress=False, preprocess="cpu")
    assert gpu.names == cpu.names == [str(p) for p in paths]
    assert [name for name, _ in gpu.skipped] == [str(tmp_path / "broken.jpg")]
    assert torch.equal(gpu.tensors()["pooled"], gpu_workers.tensors()["pooled"])  # any worker count, the same bits
    cosine = torch.nn.functional.cosine_similarity(gpu.tensors()["pooled"].double(), cpu.tensors()["pooled"].double())
    with capsys.disabled():  # information for RESULTS.md: how close the two paths come
        print(f"\n[gpu path on the engines vs cpu path, fp32 embeddings: min cosine {cosine.min():.7f}]")
    for path, value in zip(paths, cosine):
        assert value >= MIN_COSINE, f"{path.name}: {value}"
