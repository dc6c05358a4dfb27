"""GPU: in a fresh process, what does nvJPEG's first batch of real JPEGs cost after the decoder's one-image test
decode (`jpeg_decoders.NvJpegDecoder`, what the job makes before its first chunk), and does a warm-up batch of larger
baseline JPEGs take that cost off the first chunk? In the job's start-up the first chunk's decode took ~0.55 s at low
CPU, on the longest chain (RESULTS.md, encode job, sessions 16-17). Each variant runs in a fresh process, the variants
alternating round by round; seconds for the decoder's making, the warm-up, then two batches of the corpus's JPEGs
(the first and a second, other files), each waited for.

    python3 benchmarks/probes/nvjpeg_first_batch.py CORPUS_DIR [ROUNDS] [BATCH]
"""

import json
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = {  # name: the warm-up batch after the test decode, (side, count) of tiny_jpeg(side)
    "test decode only (the job)": None,
    "+ 2 JPEGs of 256 px": (256, 2),
    "+ 64 JPEGs of 256 px": (256, 64),
}


def child(variant: str, corpus: Path, batch: int) -> dict:
    import torch
    import torchvision.io

    from packed_vit.encode.jpeg_decoders import NvJpegDecoder, tiny_jpeg

    seconds, start = {}, time.perf_counter()

    def step(name):
        nonlocal start
        torch.cuda.synchronize()
        now = time.perf_counter()
        seconds[name] = round(now - start, 4)
        start = now

    files = sorted(corpus.glob("*.jpg"))[: 2 * batch]
    encoded = [torchvision.io.read_file(str(path)) for path in files]
    torch.zeros(1, device="cuda")
    step("context")
    decoder = NvJpegDecoder(torch.device("cuda"))
    step("decoder made (its test decode)")
    if VARIANTS[variant] is not None:
        side, count = VARIANTS[variant]
        jpeg = torch.frombuffer(bytearray(tiny_jpeg(side)), dtype=torch.uint8)
        decoder.decode([jpeg] * count)
    step("warm-up batch")
    decoder.decode(encoded[:batch])
    step(f"first batch of {batch}")
    decoder.decode(encoded[batch:])
    step(f"second batch of {batch}")
    return seconds


def main() -> None:
    if sys.argv[1] == "--child":
        print(json.dumps(child(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))))
        return
    corpus, rounds = Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 2
    batch = int(sys.argv[3]) if len(sys.argv) > 3 else 128
    for round in range(rounds):
        for variant in VARIANTS if round % 2 == 0 else reversed(VARIANTS):
            done = subprocess.run([sys.executable, __file__, "--child", variant, str(corpus), str(batch)],
                                  capture_output=True, text=True)  # fmt: skip
            result = done.stdout.strip().splitlines()[-1] if done.returncode == 0 else done.stderr[-2000:]
            print(f"round {round + 1}, {variant}: {result}", flush=True)


if __name__ == "__main__":
    main()
