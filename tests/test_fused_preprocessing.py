"""The GPU path's fused preprocessing kernels (`encode/fused_preprocessing.py`) on the CPU, in Triton's interpreter:
their windows, crops, patch layout and normalization against `TorchPreprocessing` (torch's ops). Skipped where Triton
is not installed (.ci/run installs it for this test). On the CPU torch's antialiased resize is another kernel than
CUDA's, so values may differ by a rounding level where a sum falls within float32's error of a half; on CUDA the
kernels give torch's bits (tests/test_encode_gpu.py)."""

import importlib.util
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

LEVEL = 1 / 255 / 0.26  # one rounding level of 0..255, normalized by the smallest std of both towers (CLIP's ~0.2686)
MAX_SHARE_OFF = 1e-3  # values a level off, at most (a sum within float32's error of a half)


def check_in_interpreter() -> None:
    """Runs in a process with TRITON_INTERPRET=1 (set before Triton is imported)."""
    from packed_vit.encode import fused_preprocessing
    from packed_vit.encode.fused_preprocessing import FusedChunkPreprocessing
    from packed_vit.encode.gpu_preprocessing import TorchPreprocessing
    from packed_vit.processing import Aimv2PackingImageProcessor, Siglip2PackingImageProcessor

    rng = np.random.default_rng(int(os.environ.get("PACKED_VIT_TEST_SEED", "0")))
    processors = {  # small budgets: the interpreter runs each program in numpy
        "siglip2 (bilinear)": Siglip2PackingImageProcessor(max_num_patches=16),
        "aimv2 fixed size (bicubic, center crop)": Aimv2PackingImageProcessor(size={"shortest_edge": 28}, crop_size=28),
        "aimv2 native (bicubic)": Aimv2PackingImageProcessor(is_native=True, min_num_patches=4, max_num_patches=12),
    }
    for name, processor in processors.items():
        ours, fused = TorchPreprocessing(processor), TorchPreprocessing(processor)
        fused.fused = FusedChunkPreprocessing(ours.mode == "bicubic", ours.patch_size, ours.mean, ours.std)
        sizes = [(int(h), int(w)) for h, w in rng.integers(20, 90, (3, 2))] + [(9, 13), (64, 48)]
        images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in sizes]
        images[1] = images[1].permute(1, 2, 0).contiguous().permute(2, 0, 1)  # channel-last strides
        expected, expected_grids = ours.many_patches(images)
        assert torch.equal(expected, torch.cat([ours.patches(image)[0] for image in images])), name
        for budget in (fused_preprocessing.MAX_ROW_SUMS_BYTES, 16 << 10):  # one group; groups of one or two images
            fused_preprocessing.MAX_ROW_SUMS_BYTES = budget
            pixels, grids = fused.many_patches(images)
            assert grids == expected_grids and pixels.shape == expected.shape, (name, pixels.shape, expected.shape)
            off = (pixels - expected).abs()
            assert off.max() <= LEVEL * 1.01, f"{name}, budget {budget}: max difference {off.max()} (a level: {LEVEL})"
            share = (off > 1e-6).float().mean().item()
            assert share <= MAX_SHARE_OFF, f"{name}, budget {budget}: {share:.2%} of the values differ"
        fused_preprocessing.MAX_ROW_SUMS_BYTES = 256 << 20

    # An image smaller than the crop (resized to 20 on its short side, cropped to 28) is zero padded: the chunk goes
    # by the torch ops, to their bits, whatever `fused` is
    processor = Aimv2PackingImageProcessor(size={"shortest_edge": 20}, crop_size=28)
    ours, fused = TorchPreprocessing(processor), TorchPreprocessing(processor)
    fused.fused = FusedChunkPreprocessing(True, ours.patch_size, ours.mean, ours.std)
    fused.fused.patches = None  # must not be called
    images = [torch.from_numpy(rng.integers(0, 256, (3, 30, 50), dtype=np.uint8))]
    assert torch.equal(fused.many_patches(images)[0], ours.many_patches(images)[0])


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton (its interpreter runs on the CPU)")
def test_fused_kernels_in_tritons_interpreter_give_torchs_patches_within_a_rounding_level():
    tests = Path(__file__).parent
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(tests), *sys.path])}
    run = subprocess.run([sys.executable, "-c", "import test_fused_preprocessing as t; t.check_in_interpreter()"],
                         env=env, capture_output=True, text=True, timeout=900)  # fmt: skip
    assert run.returncode == 0, run.stderr[-4000:]


@pytest.mark.parametrize("images", [1, 2, 3, 7])
def test_each_section_of_the_kernels_table_starts_16_bytes_aligned_whatever_the_number_of_images(images):
    """Triton compiles a kernel again for a pointer argument of another 16-byte alignment: a table whose sections
    followed each other unpadded (15 int64 fields per image) gave odd image counts a compile of their own mid-run."""
    from packed_vit.encode.fused_preprocessing import FIELDS, table_sections

    rng = np.random.default_rng(images)
    sections = [rng.integers(0, 1000, images * FIELDS), rng.integers(0, 9, 2 * (images + 1)), rng.integers(0, 9, 6)]
    views = table_sections(sections, torch.device("cpu"))
    assert all(view.data_ptr() % 16 == 0 for view in views)
    for view, section in zip(views, sections):
        assert torch.equal(view, torch.from_numpy(section))


def test_until_the_kernels_warm_up_has_ended_a_chunk_goes_by_the_torch_ops_without_waiting_for_it():
    """On a machine's first run Triton compiles the kernels in their warm-up thread: the first chunks, which the first
    forward waits for, take the torch ops (the same bits on CUDA: tests/test_encode_gpu.py) instead of that wait."""
    from packed_vit.encode.fused_preprocessing import FusedChunkPreprocessing
    from packed_vit.encode.gpu_preprocessing import TorchPreprocessing
    from packed_vit.processing import Siglip2PackingImageProcessor

    processor = Siglip2PackingImageProcessor(max_num_patches=16)
    ours, fused = TorchPreprocessing(processor), TorchPreprocessing(processor)
    fused.fused = FusedChunkPreprocessing(False, ours.patch_size, ours.mean, ours.std)
    compiling, launched = threading.Event(), []
    fused.fused.warming = threading.Thread(target=compiling.wait, args=(20,), daemon=True)
    fused.fused.warming.start()
    fused.fused.make_patches = lambda *args: launched.append(args) or expected
    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, (3, h, w), dtype=np.uint8)) for h, w in [(40, 70), (90, 20)]]
    expected, grids = ours.many_patches(images)
    pixels, fused_grids = fused.many_patches(images)  # waiting for the warm-up would end in 20 s, in the kernels
    assert torch.equal(pixels, expected) and fused_grids == grids and not launched
    compiling.set()
    fused.fused.warming.join()
    assert fused.many_patches(images)[1] == grids and len(launched) == 1  # the kernels from then on
