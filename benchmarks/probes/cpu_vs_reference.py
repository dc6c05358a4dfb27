"""CPU (issue 16): packed forward vs transformers run image by image (sdpa), both towers, small random-weight towers,
one thread (THREADS=N in the environment: N), interleaved calls, the fastest of REPEATS;
also ours with other pass limits (tokens per pass, whatever the threads; "one" = one pass).
Usage: python benchmarks/probes/cpu_vs_reference.py [REPEATS] [CASES] [LIMITS, default "one"]"""
import os, statistics, sys, time
import torch
sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[2] / "tests"))
from reference import random_packed, frames
from transformers import Aimv2VisionConfig, Aimv2VisionModel, Siglip2VisionConfig, Siglip2VisionModel
from packed_vit import Aimv2PackingVisionConfig, Aimv2PackingVisionModel, Siglip2PackingVisionConfig, Siglip2PackingVisionModel
from packed_vit.modeling.conversion_siglip2 import convert_siglip2_state_dict
from packed_vit.modeling import packed_model
torch.manual_seed(0); torch.set_num_threads(int(os.environ.get("THREADS", "1")))
FIELDS = dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=6)
MIXED = [(1, 32, 24), (1, 20, 30), (1, 16, 16), (1, 40, 12), (1, 8, 50), (1, 28, 28)]
SAME = [(1, 16, 16)] * 4
def towers(name):
    if name == "siglip2":
        f = dict(FIELDS, patch_size=16, vision_use_head=True)
        ref = Siglip2VisionModel(Siglip2VisionConfig(**f, attn_implementation="sdpa")).eval()
        ours = Siglip2PackingVisionModel(Siglip2PackingVisionConfig(**f)).eval()
        ours.load_state_dict(convert_siglip2_state_dict(ref.state_dict()))
        def run_ref(hs, grid):
            for p, h, w in frames(hs, grid):
                ref(pixel_values=p[None], pixel_attention_mask=torch.ones(1, h * w, dtype=torch.long), spatial_shapes=torch.tensor([[h, w]]))
    else:
        f = dict(FIELDS, patch_size=14, use_head=False, is_native=True)
        ref = Aimv2VisionModel(Aimv2VisionConfig(**f, attn_implementation="sdpa")).eval()
        ours = Aimv2PackingVisionModel(Aimv2PackingVisionConfig(**f)).eval()
        ours.load_state_dict(ref.state_dict())
        def run_ref(hs, grid):
            for p, h, w in frames(hs, grid):
                ref(pixel_values=p.view(1, h, w, 14, 14, 3).permute(0, 5, 1, 3, 2, 4).reshape(1, 3, h * 14, w * 14))
    return ours, run_ref, f["patch_size"] ** 2 * 3
REPEATS = int(sys.argv[1]) if len(sys.argv) > 1 else 5
CASES = sys.argv[2].split(",") if len(sys.argv) > 2 and sys.argv[2] else ["6 mixed", "4 x 16x16", "1 x 24x24"]
LIMITS = sys.argv[3].split(",") if len(sys.argv) > 3 else ["one"]
ALL_CASES = (("6 mixed", MIXED), ("4 x 16x16", SAME), ("1 x 24x24", [(1, 24, 24)]), ("8 x 16x16", SAME * 2),
             ("16 x 8x8", [(1, 8, 8)] * 16), ("2 x 32x32", [(1, 32, 32)] * 2))
for name in ("siglip2", "aimv2"):
    ours, run_ref, pdim = towers(name)
    for label, grids in [c for c in ALL_CASES if c[0] in CASES]:
        hs, grid = random_packed(grids, pdim)
        default = packed_model.cpu_tokens_per_pass
        def with_limit(limit):  # ours with another pass limit
            packed_model.cpu_tokens_per_pass = lambda: 1 << 40 if limit == "one" else int(limit)
            try: ours(hs, grid)
            finally: packed_model.cpu_tokens_per_pass = default
        calls = {"packed": lambda: ours(hs, grid), "transformers": lambda: run_ref(hs, grid),
                 **{limit: (lambda limit=limit: with_limit(limit)) for limit in LIMITS}}
        times = {key: [] for key in calls}
        with torch.no_grad():
            for call in calls.values(): call()
            for _ in range(REPEATS):
                for key, call in calls.items():
                    s = time.perf_counter(); call(); times[key].append(time.perf_counter() - s)
        best = {key: min(t) * 1e3 for key, t in times.items()}
        r = best["transformers"]
        others = ", ".join(f"limit {limit} {best[limit]:.1f} ({r / best[limit]:.2f})" for limit in LIMITS)
        print(f"{name:8s} {label:10s} ({hs.shape[0]} tokens): packed {best['packed']:7.1f} ms, transformers per image "
              f"{r:7.1f} ms, ratio ref/ours {r / best['packed']:.2f}; {others}", flush=True)
