"""`python -m packed_vit encode` / `demo` (packed_vit.cli, packed_vit.encode, packed_vit.demo).

encode runs on small original-format checkpoints (tests/reference.py's SMALL_* towers, written by
tests/checkpoint_formats.py) and a folder of PNG / JPEG files of different sizes with broken files among them; its
embeddings must equal the tower run on each image alone, `model(**processor(image))`, fp32 rel err <= 1e-5.
"""

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import checkpoint_formats as formats
import numpy as np
import PIL.Image
import pytest
import torch
from reference import FP32_REL_TOL, aimv2_pair, rel_err, siglip2_pair
from safetensors import safe_open

from packed_vit import (
    Aimv2PackingImageProcessor,
    Aimv2PackingVisionModel,
    Siglip2PackingImageProcessor,
    Siglip2PackingVisionModel,
)
from packed_vit.cli import main
from packed_vit.encode import (
    POOLED_BY_HEAD,
    POOLED_BY_MEAN,
    encode_images,
    find_images,
    load_model_and_processor,
    token_budget_batches,
)

REPO_ROOT = Path(__file__).resolve().parents[1]

# (file under the folder, (height, width), PIL mode): readable images of different sizes, formats and modes.
GOOD_IMAGES = [
    ("a_wide.png", (23, 61), "RGB"),
    ("b_tall.jpg", (70, 18), "RGB"),
    ("c_gray.png", (33, 33), "L"),
    ("d_alpha.png", (12, 40), "RGBA"),
    ("sub/e_small.jpeg", (5, 9), "RGB"),
]
BROKEN_FILES = {  # name -> bytes: what a photo folder also holds
    "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(random.Random(0).randrange(256) for _ in range(200)),
    "notes.png": b"shopping list: not an image\n",
}


def write_image(path: Path, size, mode: str, seed: int) -> None:
    height, width = size
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    PIL.Image.fromarray(pixels[..., 0] if mode == "L" else pixels, mode).save(path)


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("photos")
    for seed, (name, size, mode) in enumerate(GOOD_IMAGES):
        write_image(folder / name, size, mode, seed)
    for name, content in BROKEN_FILES.items():
        (folder / name).write_bytes(content)
    (folder / "readme.md").write_text("not an image extension: not read at all")
    return folder


# Small original-format checkpoints: google-style Siglip2Model (with head), Apple's original native AIMv2 (no head).
CHECKPOINTS = {
    "siglip2": (siglip2_pair, formats.siglip2_full_model, Siglip2PackingVisionModel, Siglip2PackingImageProcessor),
    "aimv2": (lambda: aimv2_pair(is_native=True, use_head=False), formats.apple_original, Aimv2PackingVisionModel,
              Aimv2PackingImageProcessor),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(CHECKPOINTS))
def checkpoint(request, tmp_path_factory):
    """(tower name, checkpoint folder in its original format)."""
    make_pair, write, _, _ = CHECKPOINTS[request.param]
    folder = tmp_path_factory.mktemp(f"{request.param}_original")
    write(*make_pair(), folder)
    return request.param, folder


def direct_embeddings(tower: str, folder: Path, image_paths) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Each image alone: `model(**processor(image))` -> (pooled or mean patch features [D], patch features [n, D])."""
    _, _, model_class, processor_class = CHECKPOINTS[tower]
    model = model_class.from_pretrained(folder)
    processor = processor_class(patch_size=model.config.patch_size, do_convert_rgb=True)
    if tower == "aimv2":
        processor = processor_class(patch_size=model.config.patch_size, is_native=True)
    pooled, patches = [], []
    with torch.no_grad():
        for path in image_paths:
            out = model(**processor(PIL.Image.open(path), return_tensors="pt"))
            patches.append(out.last_hidden_state)
            pooled.append(out.pooler_output[0] if out.pooler_output is not None else out.last_hidden_state.mean(0))
    return pooled, patches


def read_output(path: Path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, f.metadata()


# ---- encode: the command ----------------------------------------------------------------------------------------


def test_encode_folder_skips_broken_files_and_matches_each_image_alone(checkpoint, photo_folder, tmp_path, capsys):
    tower, folder = checkpoint
    out = tmp_path / "emb.safetensors"
    budget = 700  # a few images per forward (each is at most 256 (Siglip2) / 1024 (AIMv2) patches)
    argv = ["encode", str(photo_folder), "--model", str(folder), "--out", str(out), "--max-tokens", str(budget)]
    assert main(argv + ["--patch-features", "--device", "cpu", "--no-progress"]) == 3  # completed, files skipped

    printed = capsys.readouterr()
    assert "skipped 2 unreadable files" in printed.out
    for name in BROKEN_FILES:  # each broken file named on stderr, with the reason
        assert f"skipped {photo_folder / name}:" in printed.err
    tensors, meta = read_output(out)
    good_paths = [photo_folder / name for name, _, _ in GOOD_IMAGES]  # sorted order, the sub-folder's file included
    assert json.loads(meta["names"]) == [str(p) for p in good_paths]
    assert sorted(json.loads(meta["skipped"])) == sorted(str(photo_folder / name) for name in BROKEN_FILES)
    assert json.loads(meta["image_sizes"]) == [list(size) for _, size, _ in GOOD_IMAGES]
    assert meta["pooled"] == (POOLED_BY_HEAD if tower == "siglip2" else POOLED_BY_MEAN)

    pooled, patches = direct_embeddings(tower, folder, good_paths)
    grids = tensors["grid_thw"]
    assert tensors["pooled"].shape == (len(GOOD_IMAGES), pooled[0].shape[0])
    assert grids.shape == (len(GOOD_IMAGES), 3)
    assert tensors["patch_features"].shape == (int(grids.prod(1).sum()), pooled[0].shape[0])
    assert all(n <= budget for n in json.loads(meta["batch_tokens"]))
    assert len(json.loads(meta["batch_tokens"])) > 1  # the budget did split the images
    for i, (ours, ref) in enumerate(zip(tensors["pooled"], pooled, strict=True)):
        assert rel_err(ours, ref) <= FP32_REL_TOL, f"image {i} pooled rel err {rel_err(ours, ref):.2e}"
    features = tensors["patch_features"].split(grids.prod(1).tolist())
    for i, (ours, ref) in enumerate(zip(features, patches, strict=True)):
        assert ours.shape == ref.shape and rel_err(ours, ref) <= FP32_REL_TOL, f"image {i} patch features"


def test_encode_without_patch_features_writes_only_pooled_and_grids(checkpoint, photo_folder, tmp_path):
    _, folder = checkpoint
    out = tmp_path / "emb.safetensors"
    assert main(["encode", str(photo_folder / "a_wide.png"), "--model", str(folder), "--out", str(out)]) == 0
    tensors, meta = read_output(out)
    assert sorted(tensors) == ["grid_thw", "pooled"]
    assert tensors["pooled"].shape[0] == 1 and json.loads(meta["skipped"]) == []


def test_encode_with_nothing_readable_fails_and_writes_nothing(checkpoint, photo_folder, tmp_path, capsys):
    _, folder = checkpoint
    out = tmp_path / "emb.safetensors"
    broken = [str(photo_folder / name) for name in BROKEN_FILES]
    assert main(["encode", *broken, "--model", str(folder), "--out", str(out), "--no-progress"]) == 1
    assert "none of the 2 files could be read" in capsys.readouterr().err
    assert not out.exists()


def test_encode_missing_input_is_an_error(checkpoint, tmp_path, capsys):
    _, folder = checkpoint
    assert main(["encode", str(tmp_path / "nowhere"), "--model", str(folder)]) == 2
    assert "No such file or folder" in capsys.readouterr().err


def test_encode_refuses_a_model_folder_that_is_not_a_checkpoint(photo_folder, tmp_path, capsys):
    assert main(["encode", str(photo_folder), "--model", str(tmp_path), "--out", str(tmp_path / "e.safetensors")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_find_images_scans_folders_sorted_by_extension_and_takes_named_files(photo_folder):
    found = find_images([photo_folder, photo_folder / "readme.md"])
    expected = sorted([name for name, _, _ in GOOD_IMAGES] + list(BROKEN_FILES))
    assert [p.relative_to(photo_folder).as_posix() for p in found] == expected + ["readme.md"]


def test_folder_listing_sorts_by_path_keeps_dangling_links_and_does_not_enter_linked_folders(tmp_path):
    for name in ["x.JPG", "y.png", "z.txt", "b/1.jpeg", "b/c/2.webp", "a/3.tif", "a b.jpg", "b/Z.gif", "b-x.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "folder.jpg").mkdir()  # a folder with an image extension is no image
    (tmp_path / "link.png").symlink_to(tmp_path / "y.png")
    (tmp_path / "dangling.jpg").symlink_to(tmp_path / "gone.png")  # reported and skipped when read
    (tmp_path / "linked").symlink_to(tmp_path / "b")  # not entered: its images would come twice
    (tmp_path / "folder_link.jpg").symlink_to(tmp_path / "folder.jpg")
    found = find_images([tmp_path])
    assert [p.relative_to(tmp_path).as_posix() for p in found] == [
        "a b.jpg", "a/3.tif", "b-x.jpg", "b/1.jpeg", "b/Z.gif", "b/c/2.webp", "dangling.jpg", "link.png", "x.JPG",
        "y.png",
    ]  # fmt: skip
    assert all(p.parent == tmp_path or tmp_path in p.parents for p in found)


# ---- token-budget packing ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [1, 5, 17, 40, 1000])
def test_token_budget_batches_are_greedy_in_order_and_within_budget(budget):
    tokens = [random.randint(1, 30) for _ in range(60)]
    batches = list(token_budget_batches(list(enumerate(tokens)), budget, tokens=lambda item: item[1]))
    assert [item for batch in batches for item in batch] == list(enumerate(tokens))  # every item, in order
    for i, batch in enumerate(batches):
        size = sum(n for _, n in batch)
        assert size <= budget or len(batch) == 1  # over the budget only alone
        if i + 1 < len(batches):  # greedy: the next item would not have fit
            assert size + batches[i + 1][0][1] > budget


def test_token_budget_must_be_positive():
    with pytest.raises(ValueError, match="max_tokens"):
        list(token_budget_batches([1], 0, tokens=lambda n: n))


def test_embeddings_do_not_depend_on_the_budget(checkpoint, photo_folder):
    _, folder = checkpoint
    model, processor = load_model_and_processor(str(folder))
    paths = [photo_folder / name for name, _, _ in GOOD_IMAGES]
    runs = {}
    for budget in (1, 300, 100_000):  # every image alone, a few per forward, all in one
        result = encode_images(model, processor, [(p.name, p) for p in paths], max_tokens=budget, progress=False)
        assert all(n <= budget for n, images in zip(result.batch_tokens, result.batch_sizes) if images > 1)
        runs[budget] = result
    assert runs[1].batch_sizes == [1] * len(paths) and runs[100_000].batch_sizes == [len(paths)]
    alone = torch.cat(runs[1].pooled)
    for budget in (300, 100_000):
        for i, (a, b) in enumerate(zip(torch.cat(runs[budget].pooled), alone, strict=True)):
            assert rel_err(a, b) <= FP32_REL_TOL, f"budget {budget}, image {i}: rel err {rel_err(a, b):.2e}"


def test_progress_falls_back_to_lines_without_tqdm(checkpoint, photo_folder, monkeypatch, capsys):
    _, folder = checkpoint
    monkeypatch.setitem(sys.modules, "tqdm", None)  # `import tqdm` / `from tqdm.auto import ...` now fail
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)
    model, processor = load_model_and_processor(str(folder))
    images = [("corrupt", photo_folder / "corrupt.jpg"), ("wide", photo_folder / "a_wide.png")]
    result = encode_images(model, processor, images, max_tokens=10_000, total=2)
    err = capsys.readouterr().err
    assert result.names == ["wide"] and [name for name, _ in result.skipped] == ["corrupt"]
    assert "skipped corrupt:" in err and "2/2 images (1 skipped)" in err


# ---- demo -------------------------------------------------------------------------------------------------------


def test_demo_runs_end_to_end(capsys):
    start = time.perf_counter()
    run = subprocess.run([sys.executable, "-m", "packed_vit", "demo"], capture_output=True, text=True, cwd=REPO_ROOT)
    wall = time.perf_counter() - start
    with capsys.disabled():
        print(f"\n[python -m packed_vit demo: {wall:.1f} s wall]")
    assert run.returncode == 0, run.stdout + run.stderr
    for photo in ["astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "retina"]:
        rows = [line for line in run.stdout.splitlines() if line.strip().startswith(photo)]
        assert len(rows) == 2, f"{photo}: a row per tower expected in\n{run.stdout}"
        for row in rows:
            assert float(row.split()[-2]) >= 0.9999  # the cosine column
    assert run.stdout.count("cosine vs transformers") == 2
    assert run.stdout.count("transformers_modules.") == 4  # both towers' model and processor ran as remote code
    assert "PASS" in run.stdout
    # the timings: medians of warm, interleaved calls per tower, what they mean, where the GPU results are
    assert run.stdout.count("interleaved calls of each") == 2 and run.stdout.count("packed / transformers:") == 2
    assert "What the timings mean" in run.stdout and "docs/results.md" in run.stdout
