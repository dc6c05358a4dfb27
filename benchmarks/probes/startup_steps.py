"""GPU: what does each step of the encode job's start-up after the imports cost on its own, one after the other in a
fresh process (the job overlaps them: RESULTS.md, encode job, session 12)? Seconds per step.

    python3 benchmarks/probes/startup_steps.py CHECKPOINT
"""

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
checkpoint = sys.argv[1]
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
job.warm_up_on_zero_weights(tower.model_class, config, processor, 16384, torch.device("cuda"), torch.bfloat16,
                            job.StageClock())  # fmt: skip
step("warm-up forward on zero weights")
model = job.load_model(checkpoint, device=torch.device("cuda"), dtype=torch.bfloat16, tower=tower)
torch.cuda.synchronize()
step("load_model onto the GPU")
from packed_vit.encode.pipeline import warm_up  # noqa: E402

warm_up(model, processor, 16384, torch.cuda.Stream())
step("warm-up forward on the weights")
for name, seconds in steps:
    print(f"{seconds:6.2f} s  {name}", flush=True)
