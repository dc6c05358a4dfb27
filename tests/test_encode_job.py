"""The encode job at scale (packed_vit.encode): DataLoader workers, inputs (list files, webdataset tar shards), the
shard folder with its manifest, resuming after kill -9, refusing another job, torchrun ranks (2 gloo processes).

Small original-format Siglip2 checkpoint (tests/reference.py), fp32 on the CPU. Equalities here are exact
(`torch.equal`): the same images in the same forwards give the same bits, whatever the workers, ranks or restarts.
"""

import io
import itertools
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

import checkpoint_formats as formats
import numpy as np
import PIL.Image
import pytest
import torch
from reference import siglip2_pair

from packed_vit.cli import main
from packed_vit.encode import encode_images, load_embeddings, load_model_and_processor, token_budget_batches
from packed_vit.encode.output import shard_metadata

BUDGET = 600  # patches per forward: a few images each (each image is at most 256 patches)
SKIPPED = 3  # the exit status of a job that completed with samples skipped


def image_bytes(seed: int, fmt: str = "JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    h, w = rng.integers(8, 120, 2)
    buffer = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buffer, fmt)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("siglip2")
    formats.siglip2_full_model(*siglip2_pair(), folder)
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """13 readable images (JPEG and PNG) and a broken one, sorted names."""
    folder = tmp_path_factory.mktemp("photos")
    for i in range(13):
        (folder / f"{i:02d}.{'png' if i % 3 else 'jpg'}").write_bytes(image_bytes(i, "PNG" if i % 3 else "JPEG"))
    (folder / "05b_broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    return folder


def write_tar(path: Path, samples: dict[str, dict[str, bytes]]) -> None:
    """A webdataset shard: each sample's members `key.ext`, consecutive."""
    with tarfile.open(path, "w") as tar:
        for key, members in samples.items():
            for extension, data in members.items():
                info = tarfile.TarInfo(f"{key}.{extension}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def encode(*arguments: str) -> int:
    return main(["encode", *arguments, "--no-progress", "--max-tokens", str(BUDGET)])


# ---- the pipeline ----------------------------------------------------------------------------------------------


def test_every_worker_count_gives_the_in_process_processor_result_to_the_bit(checkpoint, photos):
    model, processor = load_model_and_processor(str(checkpoint))
    paths = sorted(p for p in photos.iterdir() if "broken" not in p.name)
    images = [(p.name, p) for p in paths]
    runs = {workers: encode_images(model, processor, images, BUDGET, progress=False, workers=workers)
            for workers in (0, 1, 3)}  # fmt: skip
    # The processor on each image in the main process, packed by the same budget: what encode did before workers.
    prepared = [processor(PIL.Image.open(p), return_tensors="pt", do_convert_rgb=True) for p in paths]
    expected = []
    with torch.no_grad():
        for batch in token_budget_batches(prepared, BUDGET, tokens=lambda item: len(item["pixel_values"])):
            out = model(torch.cat([b["pixel_values"] for b in batch]), torch.cat([b["grid_thw"] for b in batch]))
            expected.append(out.pooler_output)
    for workers, run in runs.items():
        assert run.names == [p.name for p in paths], workers
        assert run.batch_sizes == [len(b) for b in token_budget_batches(prepared, BUDGET, lambda i: len(i["pixel_values"]))]
        assert torch.equal(run.tensors()["pooled"], torch.cat(expected)), f"workers={workers}"


def test_auto_preprocessing_is_the_cpu_path_off_cuda_and_gpu_is_refused_there(checkpoint, photos):
    model, processor = load_model_and_processor(str(checkpoint))
    images = [(p.name, p) for p in sorted(photos.iterdir())[:4]]
    auto, cpu = (encode_images(model, processor, images, BUDGET, progress=False, preprocess=mode)
                 for mode in ("auto", "cpu"))  # fmt: skip
    assert auto.names == cpu.names and torch.equal(auto.tensors()["pooled"], cpu.tensors()["pooled"])
    with pytest.raises(ValueError, match="needs a CUDA device"):
        encode_images(model, processor, images, BUDGET, progress=False, preprocess="gpu")


def test_the_model_loads_in_a_thread_once_the_workers_are_forked_and_its_error_is_raised_to_the_caller(
    checkpoint, photos
):
    from packed_vit.encode.pipeline import PairsSource, StageClock, encoded_results

    model, processor = load_model_and_processor(str(checkpoint))
    images = [(p.name, p) for p in sorted(photos.iterdir())[:6]]
    clock, seen = StageClock(), {}

    def load():
        seen["thread"], seen["forked"] = threading.current_thread(), "workers forked" in clock.marks
        return model

    loaded = list(encoded_results(load, processor, PairsSource(images), BUDGET, workers=2, clock=clock, device="cpu"))
    given = list(encoded_results(model, processor, PairsSource(images), BUDGET, workers=2))
    assert seen["thread"] is not threading.current_thread() and seen["forked"]
    assert [r.entries[0].name for r in loaded] == [r.entries[0].name for r in given]
    assert torch.equal(torch.cat([r.pooled for r in loaded]), torch.cat([r.pooled for r in given]))

    def broken():
        raise OSError("no weights here")

    with pytest.raises(OSError, match="no weights here"):
        list(encoded_results(broken, processor, PairsSource(images), BUDGET, workers=2, device="cpu"))


@pytest.mark.parametrize("flags, users_value, expected", [
    (["--cuda-graphs"], None, "32"), (["--cuda-graphs"], "4", "4"), ([], None, None), ([], "4", "4"),
])  # fmt: skip
def test_with_cuda_graphs_the_job_sets_32_hardware_queues_before_its_first_cuda_call_unless_the_user_set_them(
    checkpoint, photos, tmp_path, monkeypatch, flags, users_value, expected
):
    """CUDA_DEVICE_MAX_CONNECTIONS is read when the CUDA context is made: beside replayed CUDA graphs the GPU path's
    preprocessing starved at the default 8 (RESULTS.md, encode job, session 11). Eager, 8 measured the same, and a
    context of 32 queues takes 0.3-0.4 s longer to make (session 16): left to the driver."""
    if users_value is None:
        monkeypatch.delenv("CUDA_DEVICE_MAX_CONNECTIONS", raising=False)
    else:
        monkeypatch.setenv("CUDA_DEVICE_MAX_CONNECTIONS", users_value)
    seen_at_first_cuda_call = []
    real_is_available = torch.cuda.is_available

    def is_available():  # the job's first CUDA call: which device to take (ranks.device_of_rank)
        seen_at_first_cuda_call.append(os.environ.get("CUDA_DEVICE_MAX_CONNECTIONS"))
        return real_is_available()

    monkeypatch.setattr(torch.cuda, "is_available", is_available)
    assert encode(str(photos / "00.jpg"), "--model", str(checkpoint), "--out", str(tmp_path / "e.safetensors"),
                  *flags) == 0  # fmt: skip
    assert seen_at_first_cuda_call and seen_at_first_cuda_call[0] == expected


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="the process start comes from /proc (Linux)")
def test_the_process_start_is_when_the_process_started_not_up_to_a_second_before():
    """The start-up the command reports counts from `process_start_time` (the boot time in /proc/stat is whole
    seconds: from it the start came out up to 1 s early)."""
    code = "import time; from packed_vit.encode.job import process_start_time as s; print(s(), time.time())"
    before = time.time()
    start, now = map(float, subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                           check=True).stdout.split())  # fmt: skip
    tick = 0.02  # /proc's start is in clock ticks (10 ms at the usual 100 Hz)
    assert before - tick <= start <= now


def test_workers_report_unreadable_files_in_order_and_go_on(checkpoint, photos, tmp_path, capsys):
    assert encode(str(photos), "--model", str(checkpoint), "--out", str(tmp_path / "e.safetensors"),
                  "--workers", "2") == SKIPPED  # fmt: skip
    result = load_embeddings(tmp_path / "e.safetensors")
    assert result.names == [str(p) for p in sorted(photos.iterdir()) if "broken" not in p.name]
    assert [name for name, _ in result.skipped] == [str(photos / "05b_broken.jpg")]
    assert f"skipped {photos / '05b_broken.jpg'}: OSError" in capsys.readouterr().err


def test_spawned_workers_get_the_dataset_pickled_and_give_the_same_chunks(checkpoint, photos, tmp_path):
    """Workers started by spawn (the DataLoader's default on macOS and Windows) get the dataset and its sample source
    pickled: files and tar shards, resumed parts, in order, unreadable files kept as skips."""
    from packed_vit.encode.inputs import find_parts
    from packed_vit.encode.job import PartsSource
    from packed_vit.encode.pipeline import ChunkDataset, CpuPreparation

    write_tar(tmp_path / "s.tar", {"a": {"jpg": image_bytes(100)}, "b": {"png": image_bytes(101, "PNG")}})
    parts = find_parts([photos, tmp_path / "s.tar"], part_size=5)
    todo = [(part, 1 if part.index == 1 else 0) for part in parts]  # the second part resumed at its second image
    _, processor = load_model_and_processor(str(checkpoint))

    def chunks(num_workers: int, context: str | None) -> list:
        dataset = ChunkDataset(PartsSource(todo), CpuPreparation(processor), gpu_decode=False)
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                             multiprocessing_context=context)  # fmt: skip
        return [(entry.tag, entry.name, entry.kind, entry.grid, chunk.uint8_pixels[entry.rows].sum().item())
                for chunk in loader for entry in chunk.entries]  # fmt: skip

    in_process = chunks(0, None)
    photos_left = len(list(photos.iterdir())) - 1  # the resumed part starts at its second image
    assert len(in_process) == photos_left + 2 and [kind for *_, kind, _, _ in in_process].count("skip") == 1
    assert chunks(2, "spawn") == in_process


# ---- inputs ------------------------------------------------------------------------------------------------------


def test_list_files_and_tar_shards_with_brace_ranges(checkpoint, photos, tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_tar(shards / "s-000.tar", {"a": {"jpg": image_bytes(100), "json": b"{}"}, "b": {"txt": b"no image"},
                                     "c": {"png": image_bytes(101, "PNG"), "cls": b"3"}})  # fmt: skip
    write_tar(shards / "s-001.tar", {"d": {"jpeg": image_bytes(102)}, "e": {"jpg": b"corrupt"}})
    listing = tmp_path / "list.txt"
    listing.write_text(f"# two photos\n{photos / '00.jpg'}\n\n{photos / '01.png'}\nmissing.jpg\n")
    out = tmp_path / "out"
    assert encode(str(shards / "s-{000..001}.tar"), str(listing), "--model", str(checkpoint), "--out", str(out),
                  "--workers", "2") == SKIPPED  # fmt: skip
    result = load_embeddings(out)
    assert result.names == [f"{shards}/s-000.tar/a", f"{shards}/s-000.tar/c", f"{shards}/s-001.tar/d",
                            str(photos / "00.jpg"), str(photos / "01.png")]  # fmt: skip
    skipped = dict(result.skipped)
    assert sorted(skipped) == sorted([f"{shards}/s-000.tar/b", f"{shards}/s-001.tar/e", str(tmp_path / "missing.jpg")])
    assert "no member with an image extension" in skipped[f"{shards}/s-000.tar/b"]
    assert "No such file" in skipped[str(tmp_path / "missing.jpg")]
    # the tar member's image is that image (alone in its forward here: equal to fp32 rounding)
    alone = load_embeddings_of(checkpoint, [("x", io.BytesIO(image_bytes(100)))])
    assert torch.allclose(result.tensors()["pooled"][0], alone[0], rtol=1e-5, atol=1e-5)


def load_embeddings_of(checkpoint, images):
    model, processor = load_model_and_processor(str(checkpoint))
    return encode_images(model, processor, [(n, PIL.Image.open(f)) for n, f in images], progress=False).tensors()["pooled"]


# ---- the shard folder --------------------------------------------------------------------------------------------


def test_folder_of_shards_equals_the_single_file(checkpoint, photos, tmp_path):
    common = [str(photos), "--model", str(checkpoint), "--workers", "1", "--patch-features"]
    assert encode(*common, "--out", str(tmp_path / "one.safetensors")) == SKIPPED
    assert encode(*common, "--out", str(tmp_path / "folder"), "--shard-size", "4") == SKIPPED
    manifest = json.loads((tmp_path / "folder" / "manifest.json").read_text())
    assert manifest["complete"] and manifest["images"] == 13 and manifest["skipped"] == 1
    assert [len(s["images"]) + len(s["skipped"]) for s in manifest["shards"]] == [4, 4, 4, 2]  # 14 files
    assert manifest["job"]["model"] == str(checkpoint) and manifest["job"]["shard_size"] == 4
    one, folder = load_embeddings(tmp_path / "one.safetensors"), load_embeddings(tmp_path / "folder")
    assert folder.names == one.names
    # forwards never span shards, so the batches differ; the embeddings agree to fp32 rounding
    for name in ("pooled", "patch_features", "grid_thw"):
        assert torch.allclose(folder.tensors()[name], one.tensors()[name], rtol=1e-5, atol=1e-5), name


def test_another_job_in_the_folder_is_refused_unless_overwrite(checkpoint, photos, tmp_path, capsys):
    out = tmp_path / "out"
    assert encode(str(photos / "00.jpg"), "--model", str(checkpoint), "--out", str(out)) == 0
    assert encode(str(photos / "01.png"), "--model", str(checkpoint), "--out", str(out)) == 2
    assert "holds another job (it differs in: inputs)" in capsys.readouterr().err
    assert encode(str(photos / "00.jpg"), "--model", str(checkpoint), "--out", str(out), "--patch-features") == 2
    assert encode(str(photos / "01.png"), "--model", str(checkpoint), "--out", str(out), "--overwrite") == 0
    assert load_embeddings(out).names == [str(photos / "01.png")]
    capsys.readouterr()
    assert encode(str(photos / "01.png"), "--model", str(checkpoint), "--out", str(out), "--cuda-graphs") == 2
    assert "differs in: cuda_graphs" in capsys.readouterr().err
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.md").write_text("mine")
    assert encode(str(photos / "00.jpg"), "--model", str(checkpoint), "--out", str(tmp_path / "other")) == 2
    assert "is not an encode output folder" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "other").iterdir()) == ["notes.md"]  # refused before any lock file


def test_a_folder_written_before_the_newer_job_options_resumes(checkpoint, photos, tmp_path):
    """Options added since version 1 of the manifest (--jpeg-decoder, --cuda-graphs) are in its job only when not at
    their defaults: a folder an older release left half done resumes with the defaults."""
    out = tmp_path / "out"
    images = [str(photos / "00.jpg"), str(photos / "01.png")]
    assert encode(*images, "--model", str(checkpoint), "--out", str(out), "--shard-size", "1") == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert not {"jpeg_decoder", "cuda_graphs"} & set(manifest["job"])
    manifest["complete"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert encode(*images, "--model", str(checkpoint), "--out", str(out), "--shard-size", "1") == 0


def command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "packed_vit", "encode", *arguments, "--no-progress", "--max-tokens", str(BUDGET)]


def shard_files(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.glob("part-*.safetensors")}


def test_resume_after_kill_9_redoes_no_finished_shard_and_equals_an_uninterrupted_run(checkpoint, tmp_path):
    photos = tmp_path / "many"
    photos.mkdir()
    for i in range(60):
        (photos / f"{i:03d}.jpg").write_bytes(image_bytes(1000 + i))
    job = [str(photos), "--model", str(checkpoint), "--shard-size", "3", "--workers", "0"]
    killed = subprocess.Popen(command(*job, "--out", str(tmp_path / "killed")), stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.time() + 120
    while len(shard_files(tmp_path / "killed")) < 3 and time.time() < deadline and killed.poll() is None:
        time.sleep(0.05)
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    before = shard_files(tmp_path / "killed")
    assert 3 <= len(before) < 20, f"{len(before)} shards when killed"
    assert encode(*job, "--out", str(tmp_path / "killed")) == 0
    after = shard_files(tmp_path / "killed")
    assert len(after) == 20 and all(after[name] == before[name] for name in before)  # none rewritten
    assert encode(*job, "--out", str(tmp_path / "whole")) == 0
    resumed, whole = load_embeddings(tmp_path / "killed"), load_embeddings(tmp_path / "whole")
    assert resumed.names == whole.names and len(whole.names) == 60
    assert torch.equal(resumed.tensors()["pooled"], whole.tensors()["pooled"])
    manifest = (tmp_path / "killed" / "manifest.json").read_text()
    assert encode(*job, "--out", str(tmp_path / "killed")) == 0  # a finished job: nothing to do, nothing changes
    assert shard_files(tmp_path / "killed") == after
    assert json.loads((tmp_path / "killed" / "manifest.json").read_text())["shards"] == json.loads(manifest)["shards"]


# ---- torchrun --------------------------------------------------------------------------------------------------


def test_torchrun_a_failing_rank_ends_the_others_the_rerun_resumes_counts_every_rank_and_equals_one_process(
        checkpoint, photos, tmp_path):  # fmt: skip
    """2 gloo ranks. With --strict, rank 0 stops at the broken photo (in its part): rank 1 ends too, cleanly (gloo
    tells it the peer has gone, or torchrun's SIGTERM), no hang. The same command without --strict resumes; rank 0's
    bar counts both ranks' samples (the whole job); the merged result equals one process."""
    write_tar(tmp_path / "t-0.tar", {f"k{i}": {"jpg": image_bytes(200 + i)} for i in range(5)})
    write_tar(tmp_path / "t-1.tar", {f"k{i}": {"jpg": image_bytes(300 + i)} for i in range(4)})
    job = [str(tmp_path / "t-{0..1}.tar"), str(photos), "--model", str(checkpoint), "--shard-size", "3",
           "--workers", "1", "--device", "cpu"]  # fmt: skip
    # parts: the two tars (0, 1), the 14 photos by 3 (2..6); 05b_broken.jpg opens part 4: rank 0's
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "packed_vit"]
    stopped = subprocess.run([*torchrun, *command(*job, "--out", str(tmp_path / "two"), "--strict")[3:]],
                             capture_output=True, text=True, timeout=300)  # fmt: skip
    assert stopped.returncode != 0
    assert f"rank 0: --strict: {photos / '05b_broken.jpg'} could not be encoded" in stopped.stderr
    assert "rank 1: another rank failed" in stopped.stderr or "rank 1: interrupted by SIGTERM" in stopped.stderr, \
        stopped.stderr[-3000:]  # fmt: skip
    kept = sum(len(json.loads(shard_metadata(p)["names"])) + len(json.loads(shard_metadata(p)["skipped"]))
               for p in (tmp_path / "two").glob("part-*.safetensors"))  # shards finished before the stop

    with_bar = ["encode", *job, "--out", str(tmp_path / "two"), "--max-tokens", str(BUDGET)]
    two = subprocess.run([*torchrun, *with_bar], capture_output=True, text=True, timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]  # skips end a torchrun job with 0: torchrun fails any other
    final = [line for line in two.stderr.replace("\r", "\n").splitlines() if line.startswith("2 ranks: 100%")]
    assert final and final[-1].split("|")[2].split()[0] == f"{23 - kept}/{23 - kept}", two.stderr[-3000:]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun sets each rank (OMP_NUM_THREADS=1): the CPU kernels then sum alike
    try:
        assert encode(*job, "--out", str(tmp_path / "one")) == SKIPPED  # the broken photo
    finally:
        torch.set_num_threads(threads)
    one, merged = load_embeddings(tmp_path / "one"), load_embeddings(tmp_path / "two")
    assert merged.names == one.names and len(one.names) == 9 + 13
    assert torch.equal(merged.tensors()["pooled"], one.tensors()["pooled"])
    manifest = json.loads((tmp_path / "two" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["complete"]
    assert "Encoded 22 images" in two.stdout and "2 ranks" in two.stdout  # rank 0 sums every rank
    assert two.stdout.count("Encoded") == 1


# ---- the preprocessing thread ------------------------------------------------------------------------------------


def test_in_background_keeps_order_raises_the_producers_error_and_stops_when_closed():
    import threading

    from packed_vit.encode.pipeline import in_background

    assert list(in_background(iter(range(50)), depth=3)) == list(range(50))

    def failing():
        yield 1
        raise ValueError("bad chunk")

    consumed = []
    with pytest.raises(ValueError, match="bad chunk"):
        for item in in_background(failing(), depth=2):
            consumed.append(item)
    assert consumed == [1]

    produced = []

    def endless():
        for i in itertools.count():
            produced.append(i)
            yield i

    stream = in_background(endless(), depth=2)
    assert [next(stream) for _ in range(5)] == list(range(5))
    stream.close()  # the thread stops: no thread left behind, and it made at most `depth` + 2 items more
    assert not any(t.name == "packed-vit preprocessing" for t in threading.enumerate())
    assert len(produced) <= 5 + 2 + 2


@pytest.mark.parametrize("checkpoint_format", ["pickle_bin", "sharded"])
def test_the_job_loads_pickle_and_sharded_checkpoints(checkpoint_format, photos, tmp_path):
    """A pickle checkpoint's config needs its weights (loaded before the workers start); a sharded one's tensor
    names come from its index (loaded while they run): both give the embeddings of the one-file checkpoint (to fp32
    rounding: the same weights, read into other memory)."""
    images = [str(photos / "00.jpg"), str(photos / "01.png")]
    reference_folder, folder = tmp_path / "one_file", tmp_path / checkpoint_format
    pair = siglip2_pair()
    formats.vision_model(*pair, reference_folder)
    getattr(formats, checkpoint_format)(*pair, folder)
    for checkpoint_folder in (reference_folder, folder):
        out = tmp_path / f"{checkpoint_folder.name}.safetensors"
        assert encode(*images, "--model", str(checkpoint_folder), "--out", str(out)) == 0
    expected = load_embeddings(tmp_path / "one_file.safetensors").tensors()["pooled"]
    pooled = load_embeddings(tmp_path / f"{checkpoint_format}.safetensors").tensors()["pooled"]
    assert torch.allclose(pooled, expected, rtol=1e-5, atol=1e-5)
