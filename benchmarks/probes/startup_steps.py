"""GPU: what does each step of the encode job's start-up after the imports cost on its own, one after the other in a
fresh process (the job overlaps them: RESULTS.md, encode job, session 12)? Seconds per step. `--cprofile`: the
zero-weight warm-up and the load run under cProfile (their seconds then include its overhead), and the functions
with the most own time in each are printed.

    python3 benchmarks/probes/startup_steps.py CHECKPOINT [MAX_TOKENS] [--cprofile]
"""

import cProfile
import io
import pstats
import sys
import time

start = time.perf_counter()
steps = []


def step(name: str) -> None:
    global start
    now = time.perf_counter()
    steps.append((name, now - start))
    start = now


from packed_vit.encode import job  # noqa: E402 - the CLI's imports, timed as the first step

import torch  # noqa: E402

step("the CLI's imports (packed_vit.encode.job)")
arguments = [a for a in sys.argv[1:] if a != "--cprofile"]
checkpoint = arguments[0]
max_tokens = int(arguments[1]) if len(arguments) > 1 else job.DEFAULT_MAX_TOKENS
profiles = {}


def profiled(name: str, fn):
    """fn() under cProfile when --cprofile was given; its top functions printed at the end."""
    if "--cprofile" not in sys.argv:
        return fn()
    profiler = cProfile.Profile()
    result = profiler.runcall(fn)
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
    profiles[name] = text.getvalue()
    return result


tower = job.source_tower(checkpoint)
config, processor = job.load_config_and_processor(checkpoint, tower=tower)
step("config and processor")
import torchvision.io  # noqa: E402, F401

step("import torchvision.io")
torch.cuda.init()
step("torch.cuda.init() (driver)")
torch.zeros(1, device="cuda")
step("first CUDA tensor (the context)")
from packed_vit.encode.jpeg_decoders import make_jpeg_decoder  # noqa: E402

make_jpeg_decoder("nvjpeg", torch.device("cuda"))
step("nvJPEG decoder made (with its test decode)")
from packed_vit.encode.fused_preprocessing import hash_triton_compiler  # noqa: E402
from packed_vit.encode.pipeline import warm_up  # noqa: E402

hash_triton_compiler()
step("Triton's cache key (the job hashes it in a thread of its own)")
profiled("warm-up forward on zero weights", lambda: job.warm_up_on_zero_weights(
    tower.model_class, config, processor, max_tokens, torch.device("cuda"), torch.bfloat16, job.StageClock()))
step(f"warm-up forward on zero weights ({max_tokens} patches)")
model = profiled("load_model", lambda: job.load_model(checkpoint, device=torch.device("cuda"), dtype=torch.bfloat16,
                                                      tower=tower))  # fmt: skip
torch.cuda.synchronize()
step("load_model onto the GPU")
warm_up(model, processor, max_tokens, torch.cuda.Stream())
step("warm-up forward on the weights")
for name, seconds in steps:
    print(f"{seconds:6.2f} s  {name}", flush=True)
for name, text in profiles.items():
    print(f"--- cProfile: {name} ---\n{text}", flush=True)
