"""The encode job with messy data and faults (docs/encode-faults.md): damaged tar shards keep every readable sample
and are named with their reason, bad files are skipped and counted, messy but valid images are read as transformers
reads them, write faults leave no half shard, damaged shards are encoded again on resume, one run at a time holds a
folder, SIGTERM leaves a resumable folder, and a rank's failure under torchrun ends the others.

Small original-format Siglip2 checkpoint (tests/reference.py), fp32 on the CPU, a few dozen small images. Equalities
are exact (`torch.equal`): the same images in the same forwards give the same bits.
"""

import errno
import json
import os
import signal
import socket
import struct
import subprocess
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import pytest
import torch
from test_encode_job import checkpoint, command, encode, image_bytes, write_tar  # noqa: F401 (a fixture)

from packed_vit.encode import encode_images, load_embeddings, load_model_and_processor
from packed_vit.encode.inputs import find_parts

DONE, FAILED, REFUSED, SKIPPED = 0, 1, 2, 3  # the exit statuses (docs/encode-faults.md)



@pytest.fixture(scope="module")
def siglip2(checkpoint):  # noqa: F811 (test_encode_job's tiny checkpoint fixture, built once per module)
    return checkpoint


def samples_of(tar: Path) -> list[tuple[str, str | None]]:
    """(name, None or the error's type) of each sample of a tar shard, as the job reads them."""
    (part,) = find_parts([tar], part_size=10)
    return [(s.name, None if s.error is None else type(s.error).__name__) for _, s in part.samples()]


def members(tar: Path) -> dict[str, tarfile.TarInfo]:
    with tarfile.open(tar) as archive:
        return {m.name: m for m in archive.getmembers()}


@pytest.fixture
def shard(tmp_path) -> Path:
    """A shard of 5 samples (a JPEG and a JSON each); damaged copies of it are cut from its bytes."""
    path = tmp_path / "whole.tar"
    write_tar(path, {f"k{i}": {"jpg": image_bytes(400 + i), "json": b"{}"} for i in range(5)})
    return path


def damaged_copy(shard: Path, name: str, damage) -> Path:
    data = bytearray(shard.read_bytes())
    path = shard.with_name(name)
    path.write_bytes(damage(data, members(shard)))
    return path


# ---- damaged tar shards --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage, kept, where", [
    # the file ends inside k2.jpg's bytes (a partial download): k0, k1 kept, k2 lost with the rest
    (lambda data, m: data[:m["k2.jpg"].offset_data + 10], 2, "cut short in member 'k2.jpg'"),
    # the file ends inside k3.jpg's header: k0, k1, k2 kept
    (lambda data, m: data[:m["k3.jpg"].offset + 100], 3, "cut short in a member header"),
    # the file ends after a member, without the end-of-archive marker
    (lambda data, m: data[:m["k4.jpg"].offset], 4, "without the end-of-archive marker"),
    # a member header overwritten in the middle (tarfile would stop there silently)
    (lambda data, m: data[:m["k1.jpg"].offset] + b"\x7f" * 512 + data[m["k1.jpg"].offset + 512:], 1,
     "corrupt member header"),
], ids=["in-member-data", "in-member-header", "at-member-boundary", "corrupt-header"])  # fmt: skip
def test_a_damaged_tar_shard_keeps_every_sample_before_the_damage_and_names_it(shard, damage, kept, where):
    cut = damaged_copy(shard, "cut.tar", damage)
    read = samples_of(cut)
    assert read[:kept] == [(f"{cut}/k{i}", None) for i in range(kept)]
    assert read[kept:] == [(str(cut), "DamagedTarShard")]  # one more sample: the shard, with what happened
    from packed_vit.encode.inputs import DamagedTarShard

    (_, last), = [(p, s) for p, s in find_parts([cut], 10)[0].samples() if s.name == str(cut)]
    with pytest.raises(DamagedTarShard, match=f"{where}.*{kept} samples? read before the damage"):
        last.read_bytes()


def test_a_sample_whose_image_member_is_cut_is_named_with_the_damage(tmp_path):
    whole = tmp_path / "whole.tar"
    write_tar(whole, {f"k{i}": {"json": b"{}", "jpg": image_bytes(500 + i)} for i in range(3)})  # image second
    cut = damaged_copy(whole, "cut.tar", lambda data, m: data[:m["k1.jpg"].offset_data + 10])
    assert samples_of(cut) == [(f"{cut}/k0", None), (f"{cut}/k1", "DamagedTarShard"), (str(cut), "DamagedTarShard")]


def test_an_empty_or_non_tar_file_is_one_damaged_sample(tmp_path):
    (tmp_path / "empty.tar").write_bytes(b"")
    (tmp_path / "text.tar").write_bytes(b"not a tar at all\n" * 100)
    for name in ("empty.tar", "text.tar"):
        assert samples_of(tmp_path / name) == [(str(tmp_path / name), "DamagedTarShard")]


def test_every_worker_sees_the_same_samples_of_a_damaged_shard(siglip2, shard, tmp_path):
    """Each DataLoader worker reads the whole shard, reading only its own samples' images: where the shard broke
    must not depend on which samples a worker reads, or the workers' round robin would lose its order."""
    from packed_vit.encode.job import PartsSource
    from packed_vit.encode.pipeline import ChunkDataset, CpuPreparation

    cut = damaged_copy(shard, "cut.tar", lambda data, m: data[:m["k3.jpg"].offset_data + 7])
    todo = [(part, 0) for part in find_parts([cut], part_size=10)]
    _, processor = load_model_and_processor(str(siglip2))

    def entries(workers: int) -> list:
        dataset = ChunkDataset(PartsSource(todo), CpuPreparation(processor), gpu_decode=False)
        dataset.chunk_size = 1  # each worker a sample at a time: every worker's reads differ
        loader = torch.utils.data.DataLoader(dataset, batch_size=None, num_workers=workers)
        return [(e.tag, e.name, e.kind, e.why) for chunk in loader for e in chunk.entries]

    alone = entries(0)
    assert [name for _, name, _, _ in alone] == [f"{cut}/k0", f"{cut}/k1", f"{cut}/k2", str(cut)]
    assert entries(2) == alone


def test_the_job_goes_on_past_a_damaged_shard_names_it_and_exits_with_the_skip_status(siglip2, shard, tmp_path,
                                                                                        capsys):
    cut = damaged_copy(shard, "cut.tar", lambda data, m: data[: int(len(data) * 0.6)])  # the issue's partial download
    out = tmp_path / "out"
    assert encode(str(cut), str(shard), "--model", str(siglip2), "--out", str(out), "--workers", "1") == SKIPPED
    captured = capsys.readouterr()
    assert f"skipped {cut}: DamagedTarShard: tar shard {cut} is damaged" in captured.err
    assert "skipped 1 unreadable file (DamagedTarShard: 1)" in captured.out
    result = load_embeddings(out)
    kept = [name for name in result.names if name.startswith(str(cut))]
    assert kept == [f"{cut}/k{i}" for i in range(len(kept))] and len(kept) >= 2
    assert result.names[len(kept):] == [f"{shard}/k{i}" for i in range(5)]  # the shard after it: all encoded
    manifest = json.loads((out / "manifest.json").read_text())
    (entry,) = [s for s in manifest["shards"] if s["skipped"]]
    assert entry["skipped"] == [str(cut)] and f"{len(kept)} samples read before" in entry["skipped_why"][0]
    assert manifest["skipped"] == 1 and manifest["complete"]


def test_strict_stops_at_the_first_skip_and_a_run_without_it_resumes(siglip2, shard, tmp_path, capsys):
    cut = damaged_copy(shard, "cut.tar", lambda data, m: data[:m["k2.jpg"].offset_data + 10])
    out = tmp_path / "out"
    job = [str(shard), str(cut), "--model", str(siglip2), "--out", str(out), "--workers", "0"]
    assert encode(*job, "--strict") == FAILED
    assert f"--strict: {cut} could not be encoded (DamagedTarShard" in capsys.readouterr().err
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    assert [p.name for p in out.glob("part-*")] == ["part-000000-00000.safetensors"]  # the intact shard: kept
    assert encode(*job) == SKIPPED
    assert load_embeddings(out).names == [f"{shard}/k{i}" for i in range(5)] + [f"{cut}/k0", f"{cut}/k1"]


# ---- bad files ---------------------------------------------------------------------------------------------------


def test_unreadable_vanished_and_missing_files_are_skipped_counted_and_named(siglip2, tmp_path, capsys):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(image_bytes(1))
    (photos / "b_vanished.jpg").symlink_to(tmp_path / "moved-away.jpg")  # listed by its folder, gone when read
    (photos / "c.png").write_bytes(image_bytes(2, "PNG"))
    (photos / "d_not_an_image.png").write_bytes(b"text, not an image")
    (tmp_path / "a_folder.jpg").mkdir()  # a path that cannot be read as a file
    listing = tmp_path / "list.txt"
    listing.write_text(f"{photos / 'a.jpg'}\nnowhere.jpg\n{tmp_path / 'a_folder.jpg'}\n")
    write_tar(tmp_path / "t.tar", {"x": {"json": b"{}"}, "y": {"jpg": image_bytes(3)}})  # x has no image
    out = tmp_path / "e.safetensors"
    assert encode(str(photos), str(listing), str(tmp_path / "t.tar"), "--model", str(siglip2), "--out",
                  str(out)) == SKIPPED  # fmt: skip
    result = load_embeddings(out)
    assert result.names == [str(photos / "a.jpg"), str(photos / "c.png"), str(photos / "a.jpg"), f"{tmp_path}/t.tar/y"]
    why = dict(result.skipped)
    assert list(why) == [str(photos / "b_vanished.jpg"), str(photos / "d_not_an_image.png"),
                         str(tmp_path / "nowhere.jpg"), str(tmp_path / "a_folder.jpg"), f"{tmp_path}/t.tar/x"]
    assert why[str(photos / "b_vanished.jpg")].startswith("FileNotFoundError")
    assert why[str(tmp_path / "a_folder.jpg")].startswith("IsADirectoryError")
    assert why[f"{tmp_path}/t.tar/x"].startswith("NoImageInSample: no member with an image extension")
    printed = capsys.readouterr()
    assert ("skipped 5 unreadable files (FileNotFoundError: 2, IsADirectoryError: 1, NoImageInSample: 1, "
            "UnidentifiedImageError: 1)") in printed.out  # fmt: skip
    for name in why:
        assert f"skipped {name}: " in printed.err


# ---- messy but valid images --------------------------------------------------------------------------------------


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header says width x height (its pixels never come): what PIL's decompression-bomb check sees."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    pixels = chunk(b"IDAT", zlib.compress(b"\0" * 64))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + pixels + chunk(b"IEND", b"")


def messy_images(folder: Path) -> dict[str, Path]:
    """Valid images of the kinds datasets hold, each a file."""
    rng = np.random.default_rng(7)
    rgb = PIL.Image.fromarray(rng.integers(0, 256, (40, 70, 3), dtype=np.uint8))
    frames = [PIL.Image.fromarray(rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)) for _ in range(3)]
    palette = rgb.convert("P", palette=PIL.Image.Palette.ADAPTIVE, colors=16)
    rotated = PIL.Image.Exif()
    rotated[0x0112] = 6  # EXIF orientation 6: the camera was turned, the picture must be rotated 90 degrees
    images = {
        "cmyk.jpg": (rgb.convert("CMYK"), "JPEG", {}),
        "16-bit.png": (PIL.Image.fromarray(rng.integers(0, 65536, (40, 70), dtype=np.uint16)), "PNG", {}),
        "1-bit.png": (rgb.convert("1"), "PNG", {}),
        "palette-transparency.png": (palette, "PNG", {"transparency": 3}),
        "animated.gif": (frames[0], "GIF", {"save_all": True, "append_images": frames[1:]}),
        "animated.webp": (frames[0], "WEBP", {"save_all": True, "append_images": frames[1:], "lossless": True}),
        "exif-rotated.jpg": (rgb, "JPEG", {"exif": rotated}),
        "1x1.png": (PIL.Image.new("RGB", (1, 1), (200, 30, 60)), "PNG", {}),
    }
    paths = {}
    for name, (image, fmt, options) in images.items():
        paths[name] = folder / name
        image.save(paths[name], fmt, **options)
    return paths


def test_messy_images_are_encoded_as_transformers_reads_them(siglip2, tmp_path, capsys):
    """Each is encoded, equal to the bit to transformers' reading of the file: EXIF orientation applied as its
    `load_image` does (processors given a path read it so), then the processor's own RGB conversion of the first
    frame (transparency composited onto white). An image past PIL's decompression-bomb limit is refused, named."""
    from transformers.image_utils import load_image

    folder = tmp_path / "messy"
    folder.mkdir()
    paths = messy_images(folder)
    (folder / "zz-bomb.png").write_bytes(png_claiming(40_000, 40_000))  # 1.6 G pixels claimed: never allocated
    out = tmp_path / "e.safetensors"
    budget = 1  # every image alone in its forward, as the reference below
    assert main_encode(str(folder), "--model", str(siglip2), "--out", str(out), "--max-tokens", str(budget)) == SKIPPED
    result = load_embeddings(out)
    assert result.names == [str(p) for p in sorted(paths.values())]
    ((bomb, why),) = result.skipped
    assert bomb == str(folder / "zz-bomb.png")
    assert why.startswith("DecompressionBombError: Image size (1600000000 pixels) exceeds limit")

    model, processor = load_model_and_processor(str(siglip2))
    upright = [(str(p), PIL.ImageOps.exif_transpose(PIL.Image.open(p))) for p in sorted(paths.values())]
    reference = encode_images(model, processor, upright, budget, progress=False)
    assert torch.equal(result.tensors()["pooled"], reference.tensors()["pooled"])
    assert result.sizes == [(im.height, im.width) for _, im in upright]
    assert result.sizes[result.names.index(str(paths["exif-rotated.jpg"]))] == (70, 40)  # turned upright
    assert load_image(str(paths["exif-rotated.jpg"])).size == (40, 70)  # transformers' load_image: the same way up
    assert result.sizes[result.names.index(str(paths["animated.gif"]))] == (30, 50)  # the first frame


def main_encode(*arguments: str) -> int:
    from packed_vit.cli import main

    return main(["encode", *arguments, "--no-progress"])


# ---- write faults and damaged shards -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("many")
    for i in range(12):
        (folder / f"{i:03d}.jpg").write_bytes(image_bytes(1000 + i))
    return folder


@pytest.fixture(scope="module")
def uninterrupted(siglip2, many, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    assert encode(*job_of(siglip2, many), "--out", str(out)) == DONE
    return out


def job_of(siglip2, many) -> list[str]:
    return [str(many), "--model", str(siglip2), "--shard-size", "3", "--workers", "0"]


def assert_equal_runs(folder: Path, reference: Path) -> None:
    got, expected = load_embeddings(folder), load_embeddings(reference)
    assert got.names == expected.names and len(expected.names) == 12
    assert torch.equal(got.tensors()["pooled"], expected.tensors()["pooled"])


def no_temporaries(folder: Path) -> bool:
    return not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_a_full_disk_while_writing_a_shard_leaves_no_half_shard_and_the_rerun_resumes(siglip2, many, uninterrupted,
                                                                                     tmp_path, monkeypatch, capsys):
    import packed_vit.encode.output as output

    real_save_file, temporaries = output.save_file, []

    def disk_full_at_the_fourth_shard(tensors, filename, metadata=None):
        temporaries.append(Path(filename))
        if len(temporaries) == 4:
            Path(filename).write_bytes(b"half a shard")  # what a disk that fills up mid-write leaves
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(tensors, filename, metadata=metadata)

    monkeypatch.setattr(output, "save_file", disk_full_at_the_fourth_shard)
    out = tmp_path / "out"
    assert encode(*job_of(siglip2, many), "--out", str(out)) == FAILED
    err = capsys.readouterr().err
    assert f"cannot write {out / 'part-000003-00000.safetensors'}: [Errno 28] No space left on device" in err
    assert "no half-written shard is left, the 3 shards this run finished are kept" in err
    assert len(list(out.glob("part-*"))) == 3 and no_temporaries(out)
    assert not json.loads((out / "manifest.json").read_text())["complete"]
    # temporary names are the writer's own: host and pid in them
    assert all(f".{socket.gethostname()}-{os.getpid()}-" in t.name for t in temporaries)

    monkeypatch.setattr(output, "save_file", real_save_file)  # the disk has space again
    assert encode(*job_of(siglip2, many), "--out", str(out)) == DONE
    assert_equal_runs(out, uninterrupted)


def test_a_fault_writing_the_manifest_leaves_the_old_one_and_the_rerun_writes_it(siglip2, many, uninterrupted,
                                                                                tmp_path, monkeypatch, capsys):
    real_write_text = Path.write_text

    def failing_for_the_final_manifest(self, text, *args, **kwargs):
        if self.name.startswith(".manifest.json.") and '"complete": true' in text:
            real_write_text(self, text[:100])
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real_write_text(self, text, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", failing_for_the_final_manifest)
    out = tmp_path / "out"
    assert encode(*job_of(siglip2, many), "--out", str(out)) == FAILED
    assert f"cannot write {out / 'manifest.json'}: [Errno 5] Input/output error" in capsys.readouterr().err
    assert not json.loads((out / "manifest.json").read_text())["complete"] and no_temporaries(out)
    monkeypatch.setattr(Path, "write_text", real_write_text)
    assert encode(*job_of(siglip2, many), "--out", str(out)) == DONE
    assert_equal_runs(out, uninterrupted)


def test_damaged_or_missing_shards_are_found_on_resume_and_encoded_again(siglip2, many, uninterrupted, tmp_path,
                                                                        capsys):
    import shutil

    out = tmp_path / "out"
    shutil.copytree(uninterrupted, out)
    shards = sorted(out.glob("part-*.safetensors"))
    truncated, flipped, deleted = shards[0], shards[2], shards[3]
    truncated.write_bytes(truncated.read_bytes()[:-100])  # a machine crash: a shard's end never reached the disk
    cut = truncated.stat().st_size
    data = bytearray(flipped.read_bytes())
    data[-5] ^= 0xFF  # a flipped bit in its embeddings: the size is right, the checksum is not
    flipped.write_bytes(data)
    deleted.unlink()  # removed by hand
    untouched = {p.name: p.stat().st_mtime_ns for p in shards if p not in (truncated, flipped, deleted)}
    assert encode(*job_of(siglip2, many), "--out", str(out)) == DONE
    err = capsys.readouterr().err
    assert f"shard {truncated} is damaged ({cut} bytes, its header says {cut + 100})" in err
    assert f"shard {flipped} is damaged (the sha256 of its pooled differs from the one written)" in err
    assert_equal_runs(out, uninterrupted)
    rewritten = {p.name for p in out.glob("part-*.safetensors") if untouched.get(p.name) != p.stat().st_mtime_ns}
    assert {truncated.name, flipped.name, deleted.name} <= rewritten
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(s["bytes"] == (out / s["file"]).stat().st_size and set(s["sha256"]) == {"pooled", "grid_thw"}
               for s in manifest["shards"])  # fmt: skip


# ---- two runs, interrupts, torchrun ------------------------------------------------------------------------------


def start(*arguments: str) -> subprocess.Popen:
    return subprocess.Popen(command(*arguments), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(condition, process: subprocess.Popen, seconds: float = 300) -> None:
    deadline = time.time() + seconds
    while not condition() and time.time() < deadline and process.poll() is None:
        time.sleep(0.05)
    assert condition(), f"the run ended first: {process.poll()}"


def test_a_second_run_on_a_folder_in_use_is_refused_naming_the_first(siglip2, many, uninterrupted, tmp_path):
    """Two real processes: the second is refused at once, naming the first (pid, host); the first is undisturbed."""
    out = tmp_path / "out"
    first = start(*job_of(siglip2, many), "--out", str(out))
    wait_for(lambda: f"pid {first.pid} " in ((out / ".lock").read_text() if (out / ".lock").exists() else ""), first)
    os.kill(first.pid, signal.SIGSTOP)  # holding its lock, however long the second takes to start on a busy machine
    try:
        second = subprocess.run(command(*job_of(siglip2, many), "--out", str(out)), capture_output=True,
                                text=True, timeout=120)  # fmt: skip
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert second.returncode == REFUSED, second.stderr[-2000:]
    assert f"is in use by another encode run (pid {first.pid} on host {socket.gethostname()}" in second.stderr
    stdout, stderr = first.communicate(timeout=300)
    assert first.returncode == DONE, stderr[-2000:]
    assert_equal_runs(out, uninterrupted)
    assert encode(*job_of(siglip2, many), "--out", str(out)) == DONE  # the lock went with the first run


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_sigterm_or_ctrl_c_leaves_a_resumable_folder_and_says_so(siglip2, many, uninterrupted, tmp_path, signum,
                                                                 monkeypatch, capsys):
    """The signal is sent to this very process once its second shard is written (in the writer: at a known point,
    not at whatever point a timer would hit)."""
    import packed_vit.encode.output as output

    real_close_shard = output.ShardWriter.close_shard

    def signalled_after_the_second_shard(self, part_complete):
        real_close_shard(self, part_complete)
        if self.written == 2:
            os.kill(os.getpid(), signum)

    monkeypatch.setattr(output.ShardWriter, "close_shard", signalled_after_the_second_shard)
    # Ctrl-C as a foreground process gets it: a shell starts background jobs (`cmd &`, nohup) with SIGINT ignored,
    # and Python then installs no KeyboardInterrupt handler for it.
    previous_sigint = signal.signal(signal.SIGINT, signal.default_int_handler)
    out = tmp_path / "out"
    try:
        code = encode(*job_of(siglip2, many), "--out", str(out))
    finally:
        signal.signal(signal.SIGINT, previous_sigint)
    assert code == 128 + signum
    err = capsys.readouterr().err
    assert f"interrupted by {signal.Signals(signum).name}: the shards finished so far are kept in {out}" in err
    assert "run the same command again to resume" in err
    assert len(list(out.glob("part-*.safetensors"))) == 2 and no_temporaries(out)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the job's handler is gone with the job
    monkeypatch.setattr(output.ShardWriter, "close_shard", real_close_shard)
    assert encode(*job_of(siglip2, many), "--out", str(out)) == DONE
    assert_equal_runs(out, uninterrupted)



# ---- all of it at once -------------------------------------------------------------------------------------------


def test_good_inputs_mixed_with_every_bad_one_complete_and_equal_the_good_alone(siglip2, shard, tmp_path, capsys):
    good = tmp_path / "good"
    good.mkdir()
    messy_images(good)
    for i in range(5):
        (good / f"photo-{i}.jpg").write_bytes(image_bytes(600 + i))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 broken")
    (bad / "vanished.png").symlink_to(tmp_path / "gone.png")
    (bad / "bomb.png").write_bytes(png_claiming(40_000, 40_000))
    listing = tmp_path / "list.txt"
    listing.write_text(f"missing.jpg\n{bad}\n")
    write_tar(tmp_path / "no-image.tar", {"x": {"txt": b"a caption, no image"}})
    cut = damaged_copy(shard, "cut.tar", lambda data, m: data[:m["k2.jpg"].offset_data + 10])
    corrupt = damaged_copy(shard, "corrupt.tar", lambda data, m: b"\x7f" * 512 + data[512:])  # its first header
    (tmp_path / "empty.tar").write_bytes(b"")
    inputs = [str(good), str(shard)]
    bad_inputs = [str(bad), str(cut), str(listing), str(tmp_path / "no-image.tar"), str(corrupt),
                  str(tmp_path / "empty.tar")]  # fmt: skip
    common = ["--model", str(siglip2), "--shard-size", "4", "--workers", "2"]
    assert encode(*inputs, *bad_inputs, *common, "--out", str(tmp_path / "mixed")) == SKIPPED
    assert encode(*inputs, *common, "--out", str(tmp_path / "good-alone")) == DONE
    mixed, alone = load_embeddings(tmp_path / "mixed"), load_embeddings(tmp_path / "good-alone")
    assert mixed.names[: len(alone.names)] == alone.names
    assert mixed.names[len(alone.names):] == [f"{cut}/k0", f"{cut}/k1"]  # the readable part of the cut shard
    assert torch.equal(mixed.tensors()["pooled"][: len(alone.names)], alone.tensors()["pooled"])  # to the bit
    assert sorted(name for name, _ in mixed.skipped) == sorted([
        str(bad / "bomb.png"), str(bad / "corrupt.jpg"), str(bad / "vanished.png"), str(cut),
        str(tmp_path / "missing.jpg"), str(bad), f"{tmp_path}/no-image.tar/x", str(corrupt),
        str(tmp_path / "empty.tar"),
    ])  # fmt: skip
    assert "skipped 9 unreadable files" in capsys.readouterr().out
