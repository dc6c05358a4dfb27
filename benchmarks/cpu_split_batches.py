"""CPU (issue 16): the 6 mixed images of cpu_vs_reference.py in one packed forward, in 3 forwards of 2 images, one
forward per image, and transformers per image (fastest of 8). Usage: python benchmarks/cpu_split_batches.py"""
import sys, torch, time
exec(open(__import__("pathlib").Path(__file__).with_name("cpu_vs_reference.py")).read().split("REPEATS = ")[0])
torch.set_num_threads(1)
for tower in ("siglip2", "aimv2"):
    ours, run_ref, pdim = towers(tower)
    hs, grid = random_packed(MIXED, pdim)
    split = [2, 2, 2]
    parts = list(zip(hs.split([int(g.prod(1).sum()) for g in grid.split(split)]), grid.split(split)))
    res = {"one forward": [], "3 forwards of 2 images": [], "per image (ours)": [], "reference": []}
    per_image = list(zip(hs.split(grid.prod(1).tolist()), grid.split(1)))
    with torch.no_grad():
        for _ in range(8):
            for name, f in (("one forward", lambda: ours(hs, grid)), ("3 forwards of 2 images", lambda: [ours(x, g) for x, g in parts]),
                            ("per image (ours)", lambda: [ours(x, g) for x, g in per_image]), ("reference", lambda: run_ref(hs, grid))):
                s = time.perf_counter(); f(); res[name].append(time.perf_counter() - s)
    print(tower, {k: round(min(v) * 1e3, 1) for k, v in res.items()})
