"""benchmarks/bench.py: its FLOP formula, and a --smoke run end to end on the CPU (every step, every output file)."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks" / "bench.py")
bench = sys.modules["bench"] = importlib.util.module_from_spec(_spec)  # dataclasses look their module up
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("tower", ["siglip2_so400m", "aimv2_large_224", "aimv2_large_native"])
def test_useful_flops_equals_the_matmul_flops_of_a_forward(tower):
    spec = bench.TOWERS[tower]
    fields, family = spec.smoke_fields, spec.family
    config_cls, model_cls = {
        "siglip2": (bench.packed_vit.Siglip2PackingVisionConfig, bench.packed_vit.Siglip2PackingVisionModel),
        "aimv2": (bench.packed_vit.Aimv2PackingVisionConfig, bench.packed_vit.Aimv2PackingVisionModel),
    }[family]
    model = model_cls(config_cls(**fields, attn_implementation="eager")).eval()
    # Images of one size (the learned tables' own), so the eager path's per-frame padding adds nothing.
    side = math.isqrt(fields["num_patches"]) if family == "siglip2" else fields["image_size"] // fields["patch_size"]
    grid_thw = torch.tensor([[1, side, side]] * 3)
    patches = torch.randn(3 * side * side, 3 * fields["patch_size"] ** 2)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(patches, grid_thw)
    # Not useful work, so not in the formula: our resize of a learned position table, one (h*w, S*S) @ (S*S, D).
    learned = family == "siglip2" or not fields["is_native"]
    position_resize = 2 * side * side * side * side * fields["hidden_size"] if learned else 0
    forward = counter.get_total_flops() - position_resize

    image_tokens = [side * side] * 3
    assert bench.useful_flops(fields, family, image_tokens) == forward
    assert bench.useful_flops(fields, family, image_tokens, backward=True) == 3 * forward


def test_out_of_memory_is_recorded_as_none():
    def runs_out():
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert bench.unless_out_of_memory(runs_out) is None


@pytest.fixture
def one_thread():
    # Tiny tensors: extra threads only add synchronization, which on a busy shared CPU slows the run several times.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_smoke_run_writes_every_output_and_keeps_the_notes(tmp_path, one_thread):
    (tmp_path / "RESULTS.md").write_text("# stale\n\n| old table |\n\n## Notes\n\nhand-written, keep me\n")
    results = bench.main(["--smoke", "--repeats", "1", "--out-dir", str(tmp_path)])

    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["workloads"].keys() == {"W1", "W2", "W3", "W4", "W5"}
    for record in saved["workloads"].values():
        for key in ("ours_ms", "reference_ms", "speedup_vs_reference", "useful_tflops", "pct_of_matmul_ceiling"):
            assert record[key] > 0, (record["id"], key)
        assert record["device"] == results["environment"]["device"] and record["command"].startswith("python")
        # both sides ran the same images: bf16 outputs agree closely, image by image
        assert record["min_image_cosine_vs_reference"] > 0.99, record["id"]
    assert [p["target_tokens"] for p in saved["token_sweep"]] == list(bench.SMOKE_SWEEP.tokens)
    assert all(p["ours_tokens_per_s"] > 0 and p["reference_tokens_per_s"] > 0 for p in saved["token_sweep"])

    markdown = (tmp_path / "RESULTS.md").read_text()
    assert "stale" not in markdown and markdown.endswith("## Notes\n\nhand-written, keep me\n")
    assert all(f"| {key} |" in markdown for key in saved["workloads"])
    has_matplotlib = importlib.util.find_spec("matplotlib") is not None
    assert (tmp_path / "scaling.png").exists() == has_matplotlib


def test_vlm_smoke_run_measures_both_towers_and_they_agree(tmp_path, one_thread):
    # benchmarks/bench_vlm.py on a tiny LFM2-VL: every step of both sides, the JSON, and the same logits (fp32).
    _vlm_spec = importlib.util.spec_from_file_location("bench_vlm", ROOT / "benchmarks" / "bench_vlm.py")
    bench_vlm = importlib.util.module_from_spec(_vlm_spec)
    _vlm_spec.loader.exec_module(bench_vlm)
    out = tmp_path / "vlm.json"
    bench_vlm.main(["--smoke", "--images", "2,3", "--repeats", "1", "--warmup", "0", "--out", str(out)])

    saved = json.loads(out.read_text())
    assert [w["images"] for w in saved["workloads"]] == [2, 3]
    assert saved["sides"] == ["original", "replaced", "graphs"]
    for workload in saved["workloads"]:
        for side in ("original", "replaced"):
            assert all(workload[side][step]["ms"] > 0 for step in ("tower", "prefill", "train")), side
        # replace_vision_towers(model, cuda_graphs=True): no train step (training runs eagerly)
        assert workload["graphs"].keys() == {"tower", "prefill"}
        assert all(workload["graphs"][step]["ms"] > 0 for step in ("tower", "prefill"))
        assert workload["patches"] < workload["padded_patches"]  # mixed sizes (seed 0), padded
        assert workload["tower_cosine"] > 0.999999 and workload["logits_cosine"] > 0.999999
        # on the CPU the graphs never replay: the eager packed tower, the same outputs
        assert workload["graphs_tower_cosine"] > 0.999999 and workload["graphs_logits_cosine"] > 0.999999


def test_bench_encode_reads_the_start_up_marks_the_job_prints(capsys):
    """bench_encode.startup_marks parses `packed-vit encode --profile`'s lines (job.print_profile), both sides here."""
    from packed_vit.encode.job import print_profile
    from packed_vit.encode.pipeline import StageClock

    spec = importlib.util.spec_from_file_location("bench_encode", ROOT / "benchmarks" / "bench_encode.py")
    bench_encode = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_encode)
    clock = StageClock()
    clock.marks.update({"imports done": 110.0, "workers forked": 111.25})
    clock.add("forward: launches", 1.5)
    print_profile(clock, 100.0, 112.5, 114.0, "")
    marks = bench_encode.startup_marks(capsys.readouterr().err.splitlines())
    assert marks == {"process start": 0.0, "imports done": 10.0, "workers forked": 11.25, "first forward": 12.5,
                     "end": 14.0}  # fmt: skip
