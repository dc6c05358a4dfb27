"""`packed-vit check` (CPU): every checkpoint format of DESIGN §4 passes against transformers' own tower; a tower
made wrong on purpose fails with exit status 1 and the failing rows named; a checkpoint the loader refuses is its
clear message with exit status 2, never a traceback; `--json` holds what the table says.

The checkpoints are tiny random towers (tests/reference.py) written by tests/checkpoint_formats.py. Most runs take
one small image and one backend to stay quick; one real `python -m packed_vit check` runs the defaults (the built-in
images, every backend on the CPU).
"""

import json
import os
import subprocess
import sys

import checkpoint_formats as formats
import pytest
import torch
from reference import aimv2_pair, siglip2_pair
from safetensors.torch import load_file, save_file

from packed_vit import check
from packed_vit.cli import main

# DESIGN §4's formats (sharded and pickle files are the same formats, read by the same loaders: tests/test_loading.py)
SIGLIP2_FORMATS = [formats.siglip2_full_model, formats.vision_model, formats.vision_model_prefixed,
                   formats.packed_round_trip, formats.exported_remote_code]  # fmt: skip
AIMV2_FORMATS = [formats.vision_model, formats.aimv2_lit_model, formats.apple_original, formats.apple_original_lit,
                 formats.packed_round_trip, formats.exported_remote_code]  # fmt: skip
# The formats transformers' from_pretrained reads: there the reference is loaded by transformers itself.
TRANSFORMERS_FORMATS = (formats.siglip2_full_model, formats.vision_model, formats.vision_model_prefixed,
                        formats.aimv2_lit_model)  # fmt: skip


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("images") / "small.png"
    check.synthetic_photo(96, 64, seed=1).save(path)
    return path


def write_checkpoint(pair, write, folder):
    ref, ours = pair
    folder.mkdir()
    write(ref, ours, folder)
    return folder


def run_main(args, tmp_path, capsys):
    """`packed-vit check ARGS --json FILE` in this process -> (exit status, stdout, stderr, the JSON or None)."""
    json_path = tmp_path / "report.json"
    status = main(["check", *map(str, args), "--json", str(json_path)])
    out, err = capsys.readouterr()
    return status, out, err, json.loads(json_path.read_text()) if json_path.exists() else None


def quick_check(folder, image_file, tmp_path, capsys, *extra):
    return run_main(["--model", folder, "--images", image_file, "--attn-implementation", "sdpa", *extra],
                    tmp_path, capsys)  # fmt: skip


def assert_passed(status, out, report, write):
    assert status == 0, out
    assert report["passed"] and report["failed_rows"] == [] and report["exit_status"] == 0
    assert out.rstrip().endswith(f"PASS: all {len(report['rows'])} rows hold")
    # each row: the image and every random edge grid, last_hidden_state and pooler_output within DESIGN §7's 1e-5
    assert report["rows"][0]["input"].endswith("small.png")
    assert [row["input"] for row in report["rows"]] == [item["name"] for item in report["inputs"]]
    for row in report["rows"]:
        assert row["holds"] and row["backend"] == "sdpa"
        for output in row["outputs"].values():
            assert output["bound"] == 1e-5 and output["rel_err"] <= 1e-5
    own_loader = "transformers' own from_pretrained" in report["reference"]
    assert own_loader == (write in TRANSFORMERS_FORMATS), report["reference"]


@pytest.mark.parametrize("write", SIGLIP2_FORMATS, ids=lambda write: write.__name__)
def test_siglip2_format_passes(write, image_file, tmp_path, capsys):
    folder = write_checkpoint(siglip2_pair(), write, tmp_path / "checkpoint")
    status, out, _, report = quick_check(folder, image_file, tmp_path, capsys, "--max-num-patches", 64)
    assert_passed(status, out, report, write)
    assert report["tower"] == "Siglip2"
    assert all(set(row["outputs"]) == {"last_hidden_state", "pooler_output"} for row in report["rows"])
    image = report["inputs"][0]
    assert image["kind"] == "image" and image["size"] == [96, 64] and image["grid"][1] * image["grid"][2] <= 64


@pytest.mark.parametrize("write", AIMV2_FORMATS, ids=lambda write: write.__name__)
def test_aimv2_format_passes(write, image_file, tmp_path, capsys):
    use_head = write is not formats.apple_original  # Apple's original non-LiT checkpoints have no head
    folder = write_checkpoint(aimv2_pair(use_head=use_head), write, tmp_path / "checkpoint")
    status, out, _, report = quick_check(folder, image_file, tmp_path, capsys)
    assert_passed(status, out, report, write)
    assert report["tower"] == "AIMv2"
    expected_outputs = {"last_hidden_state", "pooler_output"} if use_head else {"last_hidden_state"}
    assert all(set(row["outputs"]) == expected_outputs for row in report["rows"])
    if write in (formats.apple_original, formats.apple_original_lit):
        assert "transformers cannot read Apple's original layout" in report["reference"]


def test_aimv2_learned_positions_check_the_trained_grid(image_file, tmp_path, capsys):
    folder = write_checkpoint(aimv2_pair(is_native=False), formats.apple_original, tmp_path / "checkpoint")
    status, out, _, report = quick_check(folder, image_file, tmp_path, capsys)
    assert status == 0, out
    # transformers' learned-position tower runs only its trained grid (image_size 32 / patch 4): so do the inputs
    assert {tuple(item["grid"][1:]) for item in report["inputs"]} == {(8, 8)}
    assert any(item["grid"][0] == 2 for item in report["inputs"])


def test_defaults_in_a_fresh_process(tmp_path):
    """The real command with its defaults: built-in images, every CPU backend, the table and the JSON."""
    folder = write_checkpoint(siglip2_pair(), formats.siglip2_full_model, tmp_path / "checkpoint")
    json_path = tmp_path / "report.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "packed_vit", "check", "--model", str(folder), "--device", "cpu",
                          "--json", str(json_path)], capture_output=True, text=True, env=env)  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    assert "Traceback" not in run.stderr
    report = json.loads(json_path.read_text())
    assert report["device"] == "cpu" and report["dtype"] == "float32" and report["passed"]
    assert {row["backend"] for row in report["rows"]} == {"sdpa", "eager"}  # every backend the CPU runs
    names = [item["name"] for item in report["inputs"]]
    assert names[: len(check.BUILTIN_IMAGE_SIZES)] == list(check.BUILTIN_IMAGE_SIZES)
    assert {tuple(item["size"]) for item in report["inputs"] if item["kind"] == "image"} == set(
        check.BUILTIN_IMAGE_SIZES.values()
    )
    grids = {tuple(item["grid"]) for item in report["inputs"] if item["kind"] == "random"}
    assert {(1, 1, 1), (1, 1, 35), (1, 16, 16), (1, 32, 24), (3, 12, 10)} <= grids  # 1x1, 1xN, table, larger, t>1
    width_one_compared = (1, 33, 1) in grids
    assert width_one_compared == (not check.SIGLIP2_CPU_REFERENCE_WRONG_AT_WIDTH_1)
    assert width_one_compared == (not report["not_compared"])
    # the table: one line per row, each with its verdict
    table = [line for line in run.stdout.splitlines() if line.startswith(("sdpa ", "eager "))]
    assert len(table) == len(report["rows"]) and all(line.endswith("yes") for line in table)


def test_bf16_judges_the_error_ratio_over_all_inputs(image_file, tmp_path, capsys):
    # headless: last_hidden_state's ratio averages over many tokens, so the check of the check itself is not noise
    folder = write_checkpoint(siglip2_pair(use_head=False), formats.vision_model, tmp_path / "checkpoint")
    status, out, _, report = quick_check(folder, image_file, tmp_path, capsys, "--dtype", "bfloat16")
    assert status == 0, out
    *per_input, combined = report["rows"]
    assert combined["input"] == check.ALL_INPUTS and combined["grid"] is None
    total = combined["outputs"]["last_hidden_state"]
    assert total["bound"] == pytest.approx(1.1 * total["reference_rel_err"]) and total["rel_err"] <= total["bound"]
    assert 1e-4 < total["reference_rel_err"] < 1e-1  # bf16 rounding was measured, not a float32 run
    for row in per_input:
        output = row["outputs"]["last_hidden_state"]
        assert output["bound"] is None and output["min_cosine"] == 0.999 and output["cosine"] >= 0.999


def test_a_tower_made_wrong_fails_and_names_the_rows(image_file, tmp_path, capsys, monkeypatch):
    """One weight of the packed tower's head perturbed after loading: every row's pooler_output fails, and only it."""
    load = check.load_packed_tower

    def load_and_break(*args):
        model = load(*args)
        with torch.no_grad():
            model.head.mlp.fc2.weight[0] += 0.5
        return model

    monkeypatch.setattr(check, "load_packed_tower", load_and_break)
    folder = write_checkpoint(siglip2_pair(), formats.siglip2_full_model, tmp_path / "checkpoint")
    status, out, _, report = quick_check(folder, image_file, tmp_path, capsys)
    assert status == 1
    names = [row["name"] for row in report["rows"]]
    assert report["failed_rows"] == names and not report["passed"] and report["exit_status"] == 1
    assert f"FAIL: {len(names)} of {len(names)} rows do not hold: {', '.join(names)}" in out
    for row in report["rows"]:
        assert row["outputs"]["last_hidden_state"]["holds"] and not row["outputs"]["pooler_output"]["holds"]


def test_a_checkpoint_missing_a_weight_is_the_loaders_message(image_file, tmp_path, capsys):
    folder = write_checkpoint(siglip2_pair(), formats.vision_model, tmp_path / "checkpoint")
    weights = load_file(folder / "model.safetensors")
    (dropped,) = [key for key in weights if key.endswith("post_layernorm.weight")]  # 4.57 saves `vision_model.`
    del weights[dropped]
    save_file(weights, folder / "model.safetensors", {"format": "pt"})
    status, out, err, report = quick_check(folder, image_file, tmp_path, capsys)
    assert status == 2 and report is None and out == ""
    assert "missing from the checkpoint" in err and "post_layernorm.weight" in err and "Traceback" not in err


def test_unknown_checkpoint_format_is_a_clear_message(tmp_path, capsys):
    (tmp_path / "checkpoint").mkdir()
    (tmp_path / "checkpoint" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    status, _, err, _ = run_main(["--model", tmp_path / "checkpoint"], tmp_path, capsys)
    assert status == 2 and "Unknown checkpoint model_type 'bert'" in err


def test_missing_folder_unreadable_image_and_damaged_weights_are_clear_messages(tmp_path, capsys):
    status, _, err, _ = run_main(["--model", tmp_path / "absent"], tmp_path, capsys)
    assert status == 2 and str(tmp_path / "absent") in err
    folder = write_checkpoint(siglip2_pair(), formats.vision_model, tmp_path / "checkpoint")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    status, _, err, _ = run_main(["--model", folder, "--images", tmp_path / "broken.png"], tmp_path, capsys)
    assert status == 2 and "cannot read image" in err and "broken.png" in err
    (folder / "model.safetensors").write_bytes(b"\xff" * 64)
    status, _, err, _ = run_main(["--model", folder], tmp_path, capsys)
    assert status == 2 and "cannot read its weights" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusals")
def test_options_the_cpu_cannot_run_are_refused(tmp_path, capsys):
    folder = write_checkpoint(siglip2_pair(), formats.vision_model, tmp_path / "checkpoint")
    status, _, err, _ = run_main(["--model", folder, "--cuda-graphs"], tmp_path, capsys)
    assert status == 2 and "--cuda-graphs" in err and "CUDA" in err
    status, _, err, _ = run_main(["--model", folder, "--attn-implementation", "varlen_attn"], tmp_path, capsys)
    assert status == 2 and "varlen_attn" in err


@pytest.fixture
def graph_path_on_the_cpu(monkeypatch):
    """--cuda-graphs' wiring on the CPU: the device check let through, sdpa taken as a graph backend, and the
    runner's padded bucket forward run eagerly (`capture_graphs=False`, how tests/test_cuda_graphs.py checks it).
    Yields a setter: `capture(True)` makes the runner a real capturing one, which serves nothing on the CPU."""
    from packed_vit.modeling.cuda_graphs import CudaGraphRunner
    from packed_vit.modeling.packed_model import PackedVisionPreTrainedModel

    capture_graphs = [False]

    def enable_cuda_graphs(self, **kwargs):
        self.cuda_graphs = CudaGraphRunner(**kwargs, capture_graphs=capture_graphs[0])
        return self

    monkeypatch.setattr(check, "resolve_device_and_dtype", lambda options: (torch.device("cpu"), torch.float32))
    monkeypatch.setattr(check, "GRAPH_BACKENDS", ("sdpa",))
    monkeypatch.setattr(PackedVisionPreTrainedModel, "enable_cuda_graphs", enable_cuda_graphs)
    yield lambda capture: capture_graphs.__setitem__(0, capture)


def test_cuda_graphs_adds_the_graph_path_rows(graph_path_on_the_cpu, image_file, tmp_path, capsys):
    folder = write_checkpoint(siglip2_pair(), formats.vision_model, tmp_path / "checkpoint")
    status, out, _, report = quick_check(folder, image_file, tmp_path, capsys, "--cuda-graphs")
    assert status == 0, out
    graph_rows = [row for row in report["rows"] if row["graphs"]]
    assert len(graph_rows) == len(report["inputs"]) == len(report["rows"]) // 2
    assert all(row["name"].startswith("sdpa+graphs/") and row["holds"] for row in graph_rows)


def test_a_graph_path_that_did_not_run_fails(graph_path_on_the_cpu, image_file, tmp_path, capsys):
    graph_path_on_the_cpu(True)  # a capturing runner on the CPU: every forward runs eagerly instead
    folder = write_checkpoint(siglip2_pair(), formats.vision_model, tmp_path / "checkpoint")
    status, out, _, report = quick_check(folder, image_file, tmp_path, capsys, "--cuda-graphs")
    assert status == 1
    failed = [row for row in report["rows"] if not row["holds"]]
    assert failed and all(row["graphs"] and row["note"] == "the CUDA-graph path did not run" for row in failed)
    assert report["failed_rows"] == [row["name"] for row in report["rows"] if row["graphs"]]
