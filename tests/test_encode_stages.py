"""The encode pipeline's stage plumbing on the CPU: the stage clock, the warm-up's graph bucket, the preprocessing
thread's life, and the GPU path's reading stage (what the workers hand over before any GPU work)."""

import collections
import functools
import gc
import sys
import threading
import time
import types

import numpy as np
import PIL.Image
import pytest
import torch

from packed_vit.encode.fused_preprocessing import hash_triton_compiler, start_hashing_triton_compiler
from packed_vit.encode.gpu_preprocessing import TorchPreprocessing
from packed_vit.encode.pipeline import ChunkDataset, CpuPreparation, PairsSource, StageClock, in_background
from packed_vit.processing import Aimv2PackingImageProcessor, Siglip2PackingImageProcessor


def test_stage_clock_adds_up_the_time_spent_waiting_for_each_item():
    clock = StageClock()

    def slow():
        for i in range(3):
            time.sleep(0.02)
            yield i

    assert list(clock.timed(slow(), "read")) == [0, 1, 2]
    with clock.timing("work"):
        time.sleep(0.01)
    assert clock.seconds["read"] >= 0.06 and 0.01 <= clock.seconds["work"] < clock.seconds["read"]


def test_the_head_start_on_triton_fills_the_cache_key_its_first_launch_asks_for():
    # Triton's private function: should it move, the head start would silently be gone (.ci/run runs this where
    # Triton is installed; it needs no GPU).
    cache = pytest.importorskip("triton.runtime.cache")
    cache.triton_key.cache_clear()
    hash_triton_compiler()
    assert cache.triton_key.cache_info().currsize == 1


def test_threads_that_ask_for_triton_s_cache_key_at_once_hash_it_once(monkeypatch):
    # The job's start-up has three threads that need the key (its head start, the zero-weight warm-up's norms, the
    # preprocessing kernels' warm-up); triton_key's lru_cache alone lets each one that comes before the first hash
    # has ended hash again. A stand-in for Triton's module: the same cache, a slow hash.
    hashes = []

    @functools.lru_cache
    def triton_key():
        hashes.append(threading.get_ident())
        time.sleep(0.2)
        return "key"

    def at_once(target):
        threads = [threading.Thread(target=target) for _ in range(3)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    at_once(triton_key)
    assert len(hashes) == 3  # the premise: the cache keeps results, not a hash in progress
    triton_key.cache_clear()
    hashes.clear()
    monkeypatch.setitem(sys.modules, "triton.runtime.cache", types.SimpleNamespace(triton_key=triton_key))
    at_once(hash_triton_compiler)
    assert len(hashes) == 1


def test_the_job_s_head_start_hashes_triton_s_key_once_in_a_thread_of_its_own(monkeypatch):
    # The job starts it before the fork and the pipeline again after it: one thread, one hash, and a thread that
    # asks for the key meanwhile waits for that hash instead of making its own.
    hashes, started = [], threading.Event()

    @functools.lru_cache
    def triton_key():
        hashes.append(threading.current_thread().name)
        started.set()
        time.sleep(0.2)
        return "key"

    monkeypatch.setitem(sys.modules, "triton.runtime.cache", types.SimpleNamespace(triton_key=triton_key))
    start_hashing_triton_compiler.cache_clear()  # as in a new process
    start_hashing_triton_compiler()
    start_hashing_triton_compiler()
    assert started.wait(5)
    hash_triton_compiler()  # the warm-ups' call: returns once the hash in progress has ended
    assert triton_key.cache_info().currsize == 1
    assert hashes == ["packed-vit hash_triton_compiler"]
    start_hashing_triton_compiler.cache_clear()  # the real one's head start for the tests after this one


@pytest.mark.parametrize("max_tokens", [16384, 32768])
@pytest.mark.parametrize("tower,budget", [("siglip2", 256), ("siglip2", 1024), ("aimv2_native", 1024),
                                           ("aimv2_fixed", None)])  # fmt: skip
def test_the_warm_up_forward_captures_the_graph_bucket_most_forwards_of_a_mixed_corpus_replay(
    tower, budget, max_tokens
):
    """The warm-up's forward is where the CUDA graph of the job's usual bucket is captured (pipeline.warm_up): it
    must be the bucket that most full forwards of a corpus of mixed sizes fall in, or they would capture their own
    during the run."""
    from packed_vit.encode.pipeline import token_budget_batches, warm_up_grids
    from packed_vit.modeling.cuda_graphs import Bucket

    if tower == "siglip2":
        processor = Siglip2PackingImageProcessor(max_num_patches=budget)
    else:
        settings = {"is_native": True, "max_num_patches": budget} if tower == "aimv2_native" else {}
        processor = Aimv2PackingImageProcessor(**settings)
    rule, patch_size = TorchPreprocessing(processor), processor.options({})["patch_size"]
    rng = np.random.default_rng(0)
    grids = []
    for height, width in rng.integers(200, 1601, (3000, 2)):
        size = rule.target_size(int(height), int(width))
        if rule.tower == "aimv2" and not rule.options["is_native"]:  # cropped to its square
            size = (rule.options["crop_size"]["height"], rule.options["crop_size"]["width"])
        grids.append((1, size[0] // patch_size, size[1] // patch_size))

    def bucket(batch):
        lengths = [h * w for _, h, w in batch]
        return Bucket.fitting(sum(lengths), len(lengths), max(lengths))

    batches = list(token_budget_batches(grids, max_tokens, tokens=lambda grid: grid[1] * grid[2]))[:-1]  # full ones
    buckets = collections.Counter(bucket(batch) for batch in batches)
    usual, count = buckets.most_common(1)[0]
    assert bucket(warm_up_grids(processor, max_tokens)) == usual
    assert count >= 0.6 * len(batches), buckets  # one graph serves most forwards


def test_mean_per_image_is_each_images_mean_of_its_own_patches():
    from packed_vit.encode.pipeline import mean_per_image

    grid_thw = torch.tensor([[1, 3, 5], [1, 1, 1], [1, 7, 2], [2, 2, 2]])
    features = torch.randn(int(grid_thw.prod(1).sum()), 6, dtype=torch.bfloat16)
    expected = torch.stack([piece.float().mean(0) for piece in features.split(grid_thw.prod(1).tolist())])
    torch.testing.assert_close(mean_per_image(features, grid_thw), expected, rtol=1e-6, atol=1e-6)


def test_the_preprocessing_thread_starts_at_once_and_stops_when_its_consumer_is_dropped():
    produced = threading.Event()

    def endless():
        while True:
            produced.set()
            yield 0

    consumer = in_background(endless(), depth=2)
    assert produced.wait(5)  # before any next(): the caller may warm up meanwhile
    del consumer
    gc.collect()
    deadline = time.time() + 5
    while any(t.name == "packed-vit preprocessing" for t in threading.enumerate()) and time.time() < deadline:
        time.sleep(0.05)
    assert not any(t.name == "packed-vit preprocessing" for t in threading.enumerate())


@pytest.mark.parametrize(
    "processor",
    [Siglip2PackingImageProcessor(max_num_patches=64), Aimv2PackingImageProcessor(),
     Aimv2PackingImageProcessor(is_native=True, min_num_patches=16, max_num_patches=100)],  # fmt: skip
    ids=["siglip2", "aimv2_fixed", "aimv2_native"],
)
def test_gpu_path_workers_hand_over_the_file_bytes_and_each_images_resize_target(tmp_path, processor):
    rng = np.random.default_rng(0)
    paths = []
    for i, (h, w) in enumerate([(40, 90), (301, 200), (224, 224)]):
        paths.append(tmp_path / f"{i}.jpg")
        PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(paths[-1])
    (tmp_path / "a.png").write_bytes(b"not an image")
    items = [(str(p), str(p)) for p in [*paths, tmp_path / "a.png"]]
    (chunk,) = list(ChunkDataset(PairsSource(items), CpuPreparation(processor), gpu_decode=True))
    rule = TorchPreprocessing(processor)
    for entry, path in zip(chunk.entries, paths):
        assert entry.kind == "jpeg" and entry.size == PIL.Image.open(path).size[::-1]
        assert entry.resize_to == rule.target_size(*entry.size)
        assert chunk.encoded[entry.rows].numpy().tobytes() == path.read_bytes()
    assert chunk.entries[-1].kind == "skip" and "UnidentifiedImageError" in chunk.entries[-1].why
