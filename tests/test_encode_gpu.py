"""The encode job on CUDA: the GPU preprocessing path (Siglip2, AIMv2 fixed-size and native) against transformers'
torchvision backend, the same embeddings for every worker count, and torchrun ranks sharing one GPU. Skipped without
CUDA or torchvision."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch

pytest.importorskip("torchvision")
pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

import checkpoint_formats as formats  # noqa: E402
from reference import aimv2_pair, siglip2_pair  # noqa: E402

from packed_vit.encode import encode_images, load_embeddings, load_model_and_processor  # noqa: E402
from packed_vit.encode import fused_preprocessing  # noqa: E402
from packed_vit.encode.gpu_preprocessing import GpuPreprocessing  # noqa: E402
from packed_vit.processing import Aimv2PackingImageProcessor, Siglip2PackingImageProcessor  # noqa: E402

MIN_COSINE = 0.9999  # per image, fp32 model: only the decoder and the resize backend differ


def both_paths(ours: GpuPreprocessing, image: torch.Tensor):
    """(what, patches, grid) of `image` by the torch ops one by one and by `fused_preprocessing` (one image; where
    Triton is installed, as with torch's CUDA wheels for Linux)."""
    paths = [("torch ops", *ours.patches(image))]
    if fused_preprocessing.triton is not None:
        assert ours.fused is not None, "CUDA with Triton: the fused path applies"
        ours.fused.wait_for_warm_up()  # the torch ops until then
        pixels, (grid,) = ours.many_patches([image])
        paths.append(("fused", pixels, grid))
    return paths


def jpegs(folder: Path, count: int = 12) -> list[Path]:
    rng = np.random.default_rng(0)
    paths = []
    for i in range(count):
        h, w = rng.integers(20, 700, 2)
        smooth = PIL.Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((int(w), int(h)))
        paths.append(folder / f"{i:03d}.jpg")
        smooth.save(paths[-1], quality=90)
    return paths


@pytest.mark.parametrize("max_num_patches", [64, 256, 1024])
def test_gpu_patches_equal_transformers_torchvision_backend_on_cuda(tmp_path, max_num_patches):
    import torchvision.io
    from transformers import Siglip2ImageProcessor

    ours = GpuPreprocessing(Siglip2PackingImageProcessor(max_num_patches=max_num_patches), torch.device("cuda"))
    theirs = Siglip2ImageProcessor(patch_size=16, max_num_patches=max_num_patches)
    assert getattr(theirs, "backend", "torchvision") == "torchvision"
    for path in jpegs(tmp_path):
        image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), device="cuda")
        expected = theirs(image, return_tensors="pt", device="cuda")
        for what, patches, (_, h, w) in both_paths(ours, image):
            assert tuple(expected["spatial_shapes"][0].tolist()) == (h, w)
            difference = (patches - expected["pixel_values"][0, : h * w].to(patches.device)).abs().max().item()
            assert difference <= 1e-6, f"{path.name}, {what}: max abs difference {difference}"


@pytest.mark.parametrize("side", [224, 336])
def test_aimv2_fixed_size_gpu_patches_equal_clip_image_processor_torchvision_backend_on_cuda(tmp_path, side):
    import torchvision.io
    from transformers import CLIPImageProcessor

    ours = GpuPreprocessing(Aimv2PackingImageProcessor(size={"shortest_edge": side}, crop_size=side),
                            torch.device("cuda"))  # fmt: skip
    theirs = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    assert getattr(theirs, "backend", "torchvision") == "torchvision"
    for path in jpegs(tmp_path):
        image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), device="cuda")
        expected = theirs(image, return_tensors="pt", device="cuda")["pixel_values"][0]  # [3, side, side]
        h = w = side // 14
        expected = expected.reshape(3, h, 14, w, 14).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
        for what, patches, grid in both_paths(ours, image):
            assert grid == (1, h, w)
            difference = (patches - expected.to(patches.device)).abs().max().item()
            assert difference <= 1e-6, f"{path.name}, {what}: max abs difference {difference}"


def test_aimv2_native_gpu_patches_are_torchvisions_resize_and_normalize_at_our_grid(tmp_path):
    """No transformers processor exists for native AIMv2: the reference is our rule (`native_grid`, as the CPU
    processor) with the torchvision backend's operations (tvF.resize bicubic antialias, fused tvF.normalize)."""
    import torchvision.io
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as tvF

    from packed_vit.processing.image_processing_aimv2_packing import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

    processor = Aimv2PackingImageProcessor(is_native=True, min_num_patches=64, max_num_patches=400)
    ours = GpuPreprocessing(processor, torch.device("cuda"))
    for path in jpegs(tmp_path):
        image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), device="cuda")
        grid = tuple(processor(image.permute(1, 2, 0).cpu().numpy())["grid_thw"][0])
        _, h, w = grid
        resized = tvF.resize(image, [h * 14, w * 14], interpolation=InterpolationMode.BICUBIC, antialias=True)
        mean, std = (torch.tensor(v, device="cuda") * 255.0 for v in (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD))
        expected = tvF.normalize(resized.float(), mean, std)
        expected = expected.reshape(3, h, 14, w, 14).permute(1, 3, 2, 4, 0).reshape(h * w, -1)
        for what, patches, ours_grid in both_paths(ours, image):
            assert ours_grid == grid and torch.equal(patches, expected), f"{path.name}, {what}"


@pytest.mark.parametrize("tower", ["siglip2", "aimv2_native", "aimv2_fixed"])
def test_every_worker_count_gives_the_same_gpu_path_embeddings_to_the_bit(tmp_path, monkeypatch, tower):
    from packed_vit.encode import pipeline

    monkeypatch.setattr(pipeline, "GPU_CHUNK", 4)  # several chunks per worker, dealt round robin
    folder = tmp_path / "ckpt"
    pair = siglip2_pair() if tower == "siglip2" else aimv2_pair(is_native=tower == "aimv2_native")
    (formats.siglip2_full_model if tower == "siglip2" else formats.vision_model)(*pair, folder)
    model, processor = load_model_and_processor(str(folder), device="cuda", dtype=torch.float32)
    paths = jpegs(tmp_path, 23)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    images = [(str(p), p) for p in [*paths[:9], tmp_path / "broken.jpg", *paths[9:]]]
    runs = [encode_images(model, processor, images, max_tokens=300, progress=False, workers=workers,
                          preprocess="gpu") for workers in (0, 1, 3)]  # fmt: skip
    for run in runs:
        assert run.names == [str(p) for p in paths]
        assert [name for name, _ in run.skipped] == [str(tmp_path / "broken.jpg")]
        assert torch.equal(run.tensors()["pooled"], runs[0].tensors()["pooled"])


@pytest.mark.parametrize("tower", ["siglip2", "aimv2_fixed"])
def test_the_warm_up_on_zero_weights_runs_a_whole_forward_of_the_budget(tmp_path, tower):
    """It swallows its errors (a head start only), so this is what tells that it works at all."""
    from packed_vit.encode.job import load_config_and_processor, source_tower, warm_up_on_zero_weights
    from packed_vit.encode.pipeline import StageClock

    folder = tmp_path / "ckpt"
    pair = siglip2_pair() if tower == "siglip2" else aimv2_pair(is_native=False)
    (formats.siglip2_full_model if tower == "siglip2" else formats.vision_model)(*pair, folder)
    config, processor = load_config_and_processor(str(folder))
    clock = StageClock()
    layers = config.num_hidden_layers
    warm_up_on_zero_weights(source_tower(str(folder)).model_class, config, processor, 600, torch.device("cuda"),
                            torch.bfloat16, clock)  # fmt: skip
    assert "kernels warmed up (zero weights)" in clock.marks
    assert config.num_hidden_layers == layers  # its one-layer copy left the job's config as it was


@pytest.mark.parametrize("preprocess", ["gpu", "cpu"])
def test_cuda_graph_forwards_give_the_eager_embeddings_and_the_same_bits_for_every_worker_count(tmp_path, preprocess):
    """The job's forwards replayed from CUDA graphs (bf16: graphs apply to the varlen_attn backend): per image what
    the eager forwards give, within bf16 rounding; new buckets captured mid-run, while the preprocessing runs."""
    folder = tmp_path / "ckpt"
    formats.siglip2_full_model(*siglip2_pair(), folder)
    eager, processor = load_model_and_processor(str(folder), device="cuda", dtype=torch.bfloat16)
    graphed, _ = load_model_and_processor(str(folder), device="cuda", dtype=torch.bfloat16)
    paths = jpegs(tmp_path, 40)
    images = [(str(p), p) for p in paths]
    reference = encode_images(eager, processor, images, max_tokens=300, progress=False, workers=2,
                              preprocess=preprocess)  # fmt: skip
    assert eager.cuda_graphs is None
    runs = [encode_images(graphed, processor, images, max_tokens=300, progress=False, workers=workers,
                          preprocess=preprocess, cuda_graphs=True) for workers in (0, 2, 3)]  # fmt: skip
    assert graphed.cuda_graphs.replays > len(reference.batch_sizes)  # every forward of the three runs, + warm-ups
    assert len(graphed.cuda_graphs.graphs) > 1  # the warm-up's bucket and others, captured during the runs
    for run in runs:
        assert run.names == reference.names == [str(p) for p in paths]
        assert torch.equal(run.tensors()["pooled"], runs[0].tensors()["pooled"])
    cosine = torch.nn.functional.cosine_similarity(runs[0].tensors()["pooled"].double(),
                                                   reference.tensors()["pooled"].double(), dim=1)  # fmt: skip
    assert cosine.min() >= 0.999, cosine  # bf16: the graphs pad each forward to its bucket (other matmul shapes)


@pytest.mark.parametrize("tower", ["siglip2", "aimv2_224"])
def test_a_chunk_is_normalized_at_once_to_the_same_bits_as_each_image(tmp_path, tower):
    from packed_vit.encode.pipeline import ChunkDataset, CpuPreparation, PairsSource

    processor = Siglip2PackingImageProcessor(max_num_patches=256) if tower == "siglip2" else \
        Aimv2PackingImageProcessor()  # fmt: skip
    ours = GpuPreprocessing(processor, torch.device("cuda"))
    paths = jpegs(tmp_path, 9)
    dataset = ChunkDataset(PairsSource([(str(p), str(p)) for p in paths]), CpuPreparation(processor), True)
    (chunk,) = list(dataset)
    ours.prepare_chunk(chunk)
    decoded = ours.decoder.decode([torch.from_numpy(np.fromfile(p, dtype=np.uint8)) for p in paths])
    for entry, image in zip(chunk.entries, decoded):
        patches, grid = ours.patches(image)
        assert entry.grid == grid and torch.equal(entry.pixels, patches), entry.name


PROCESSORS = {
    "siglip2_64": lambda: Siglip2PackingImageProcessor(max_num_patches=64),
    "siglip2_256": lambda: Siglip2PackingImageProcessor(max_num_patches=256),
    "siglip2_1024": lambda: Siglip2PackingImageProcessor(max_num_patches=1024),
    "aimv2_224": lambda: Aimv2PackingImageProcessor(),
    "aimv2_native": lambda: Aimv2PackingImageProcessor(is_native=True),
}


@pytest.mark.skipif(fused_preprocessing.triton is None, reason="needs Triton")
@pytest.mark.parametrize("config", list(PROCESSORS))
def test_fused_preprocessing_gives_the_torch_ops_bits_for_a_chunk_of_every_kind_of_image(config, monkeypatch):
    """Down- and upscaled, extreme aspect ratios, already at the target size (no resize), channel-last strides (as
    nvImageCodec's images), in one call and in groups of a smaller row-sum budget: the same bits as the torch ops."""
    processor = PROCESSORS[config]()
    fused, torch_ops = (GpuPreprocessing(processor, torch.device("cuda"), fused=f) for f in (True, False))
    assert fused.fused is not None and torch_ops.fused is None
    fused.fused.wait_for_warm_up()  # the torch ops until then
    rng = np.random.default_rng(1)
    sizes = [(int(h), int(w)) for h, w in rng.integers(16, 1700, (14, 2))]
    sizes += [(9, 700), (1600, 23), (31, 17), (224, 224), (256, 256), (448, 448), (1200, 1600), (1601, 1199)]
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)).cuda() for h, w in sizes]
    images[3] = images[3].permute(1, 2, 0).contiguous().permute(2, 0, 1)  # [3, H, W] view of [H, W, 3]
    expected, expected_grids = torch_ops.many_patches(images)
    for budget in (fused_preprocessing.MAX_ROW_SUMS_BYTES, 8 << 20):
        monkeypatch.setattr(fused_preprocessing, "MAX_ROW_SUMS_BYTES", budget)
        pixels, grids = fused.many_patches(images)
        assert grids == expected_grids
        different = (pixels != expected).any(dim=1)
        assert not different.any(), (
            f"budget {budget}: {int(different.sum())} of {len(pixels)} patches differ, "
            f"max {(pixels - expected).abs().max().item()}"
        )


def test_auto_takes_the_gpu_path_on_cuda(tmp_path):
    folder = tmp_path / "ckpt"
    formats.siglip2_full_model(*siglip2_pair(), folder)
    model, processor = load_model_and_processor(str(folder), device="cuda", dtype=torch.float32)
    images = [(str(p), p) for p in jpegs(tmp_path, 6)]
    runs = {mode: encode_images(model, processor, images, progress=False, preprocess=mode) for mode in ("auto", "gpu")}
    assert torch.equal(runs["auto"].tensors()["pooled"], runs["gpu"].tensors()["pooled"])


def test_gpu_preprocessing_embeddings_match_transformers_torchvision_backend(tmp_path, capsys):
    import torchvision.io
    from transformers import Siglip2ImageProcessor

    folder = tmp_path / "ckpt"
    formats.siglip2_full_model(*siglip2_pair(), folder)
    model, processor = load_model_and_processor(str(folder), device="cuda", dtype=torch.float32)
    paths = jpegs(tmp_path)
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0" + bytes(100))
    images = [(str(p), p) for p in [*paths[:3], tmp_path / "broken.jpg", *paths[3:]]]
    gpu = encode_images(model, processor, images, max_tokens=700, progress=False, workers=2, preprocess="gpu")
    cpu = encode_images(model, processor, images, max_tokens=700, progress=False, workers=2)
    assert gpu.names == cpu.names == [str(p) for p in paths]
    assert [name for name, _ in gpu.skipped] == [str(tmp_path / "broken.jpg")]
    theirs = Siglip2ImageProcessor(patch_size=processor.patch_size, max_num_patches=processor.max_num_patches)
    for path, ours in zip(paths, gpu.tensors()["pooled"]):
        image = torchvision.io.decode_jpeg(torchvision.io.read_file(str(path)), device="cuda")
        inputs = theirs(image, return_tensors="pt", device="cuda")
        with torch.no_grad():  # our tower on the padded batch: the drop-in call (DESIGN §13)
            grid = inputs["spatial_shapes"].cpu()
            n = int(grid.prod())
            expected = model(inputs["pixel_values"][0, :n].cuda(), torch.tensor([[1, *grid[0].tolist()]]))
        cosine = torch.nn.functional.cosine_similarity(ours.double(), expected.pooler_output[0].double().cpu(), dim=0)
        assert cosine >= MIN_COSINE, f"{path.name}: {cosine}"
    # information: the two decoders and resizers (PIL vs nvJPEG + torchvision) on the same files
    cosine = torch.nn.functional.cosine_similarity(gpu.tensors()["pooled"], cpu.tensors()["pooled"], dim=1)
    with capsys.disabled():
        print(f"\n[gpu vs cpu preprocessing, fp32 embeddings: min cosine {cosine.min():.6f}]")


def test_two_ranks_sharing_one_gpu_equal_one_process(tmp_path):
    folder = tmp_path / "ckpt"
    formats.siglip2_full_model(*siglip2_pair(), folder)
    paths = jpegs(tmp_path, 20)
    common = ["encode", str(tmp_path), "--model", str(folder), "--shard-size", "3", "--no-progress", "--workers", "1"]
    one = subprocess.run([sys.executable, "-m", "packed_vit", *common, "--out", str(tmp_path / "one")],
                         capture_output=True, text=True)  # fmt: skip
    assert one.returncode == 0, one.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "packed_vit"]
    two = subprocess.run([*torchrun, *common, "--out", str(tmp_path / "two")], capture_output=True, text=True)
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = load_embeddings(tmp_path / "one"), load_embeddings(tmp_path / "two")
    assert a.names == b.names == [str(p) for p in paths]
    assert torch.equal(a.tensors()["pooled"], b.tensors()["pooled"])


def test_mean_per_image_queues_without_a_host_sync():
    """Headless towers (AIMv2 native) are pooled after every forward: a host sync there waits for the forward, and
    the next one is queued only then."""
    from packed_vit.encode.pipeline import mean_per_image

    grid_thw = torch.tensor([[1, 16, 16], [1, 3, 40], [1, 1, 1]])
    features = torch.randn(int(grid_thw.prod(1).sum()), 64, device="cuda", dtype=torch.bfloat16)
    expected = torch.stack([piece.float().mean(0) for piece in features.split(grid_thw.prod(1).tolist())])
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        pooled = mean_per_image(features, grid_thw)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(pooled, expected, rtol=1e-6, atol=1e-6)
