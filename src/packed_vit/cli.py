"""The `packed-vit` command (also `python -m packed_vit`).

    packed-vit encode INPUTS... --model PATH_OR_REPO [--out FILE.safetensors | DIR] [--shard-size N] [--overwrite]
                      [--workers K] [--preprocess auto|cpu|gpu] [--jpeg-decoder auto|nvjpeg|nvimgcodec]
                      [--device D] [--dtype T] [--max-tokens N]
                      [--patch-features] [--revision R] [--attn-implementation A] [--strict] [--cuda-graphs]
                      [--profile]
    torchrun --nproc_per_node N -m packed_vit encode ... --out DIR
    packed-vit check --model PATH_OR_REPO [--revision R] [--images FILES_OR_DIRS...] [--device D] [--dtype T]
                     [--attn-implementation A] [--cuda-graphs] [--max-num-patches N] [--json FILE]
    packed-vit demo

`encode`: see packed_vit.encode and docs/encode-faults.md; `check`: see packed_vit.check; `demo`: see packed_vit.demo.
`encode` exits with 0 when every sample was encoded, 3 when the job completed with samples skipped (each named with
its reason), 1 when it stopped (a write fault, a skip under --strict, another rank failed), 2 when it refused to
start, 128 + N when signal N interrupted it (130 Ctrl-C, 143 SIGTERM; the output folder resumes).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .encode.job import DEFAULT_MAX_TOKENS, DEFAULT_SHARD_SIZE
from .encode.jpeg_decoders import AUTO_JPEG_DECODER, JPEG_DECODERS

DTYPES = ("float32", "bfloat16", "float16")


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def non_negative_int(value: str) -> int:
    number = int(value)
    if number < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or a positive integer, got {value}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="packed-vit", description="Packed Siglip2-NaFlex and AIMv2 vision towers")
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser(
        "encode",
        help="images -> per-image embeddings (safetensors)",
        description="Encodes images with a packed tower: many images per forward, packed by a token budget. "
        "Unreadable files and damaged tar shards are reported and skipped, each with its reason.",
        epilog="exit status: 0 every sample encoded; 3 completed, some samples skipped; 1 stopped (write fault, "
        "--strict, a rank failed); 2 refused to start; 130 / 143 interrupted by Ctrl-C / SIGTERM (run the same "
        "command again to resume)",
    )
    encode.add_argument("inputs", nargs="+", metavar="INPUTS",
                        help="image files; folders (searched recursively for image files, sorted); text files "
                             "*.txt listing one image path per line; webdataset tar shards *.tar, also as brace "
                             "ranges (shards-{000000..000127}.tar)")  # fmt: skip
    encode.add_argument("--model", required=True, metavar="PATH_OR_REPO",
                        help="checkpoint folder or Hub id, in any format the towers load "
                             "(original, transformers, exported)")  # fmt: skip
    encode.add_argument("--revision", help="revision of a Hub --model")
    encode.add_argument("--out", type=Path, default=Path("embeddings.safetensors"),
                        help="FILE.safetensors: one file (small jobs); any other name: a folder of shards with a "
                             "manifest, resumable (default: embeddings.safetensors)")  # fmt: skip
    encode.add_argument("--shard-size", type=positive_int, default=DEFAULT_SHARD_SIZE,
                        help="images per output shard of a folder; memory grows with it, times the patches per "
                             f"image with --patch-features (default {DEFAULT_SHARD_SIZE})")  # fmt: skip
    encode.add_argument("--overwrite", action="store_true",
                        help="replace an output folder that holds another job (model, options or inputs)")  # fmt: skip
    encode.add_argument("--workers", type=non_negative_int,
                        help="decoding processes (0: in this process; default: one per CPU core less two)")  # fmt: skip
    encode.add_argument("--preprocess", choices=("auto", "cpu", "gpu"), default="auto",
                        help="where images are decoded and resized: cpu (PIL in the workers, exactly transformers' "
                             "PIL backend), gpu (nvJPEG and torch on CUDA, exactly transformers' torchvision backend "
                             "on nvJPEG's pixels, which differ from PIL's by up to 51 levels at a few pixels; Siglip2 "
                             "and AIMv2; measured 1.8-2x the cpu path's images/s at 256 patches, on par at 1024: "
                             "docs/encode-performance.md); auto "
                             "(default): gpu where it applies, else cpu")  # fmt: skip
    encode.add_argument("--jpeg-decoder", choices=JPEG_DECODERS, default="auto",
                        help="the GPU path's JPEG decoder (the cpu path decodes with PIL): nvjpeg (torchvision's "
                             "nvJPEG decoder; pixels up to 51 levels from PIL's at a few pixels), nvimgcodec (the "
                             "GPU's hardware JPEG engines, A100/H100/H200, through NVIDIA's nvImageCodec: pixels "
                             "within 1 level of PIL's, progressive JPEGs within 3 by its other backends; needs "
                             "pip install \"packed-vit[nvimgcodec]\"), auto (default): "
                             f"{AUTO_JPEG_DECODER}{', else nvjpeg' if AUTO_JPEG_DECODER != 'nvjpeg' else ''}. "
                             "Measured on an H200 in the job: nvjpeg 1769 images/s, nvimgcodec 1433 (Siglip2, "
                             "256 patches): docs/encode-performance.md")  # fmt: skip
    encode.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    encode.add_argument("--dtype", choices=DTYPES, help="model dtype (default: bfloat16 on CUDA, float32 otherwise)")
    encode.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                        help="most patches per forward; a larger image runs alone "
                             f"(default {DEFAULT_MAX_TOKENS})")  # fmt: skip
    encode.add_argument("--patch-features", action="store_true",
                        help="also write every patch's features (`patch_features` [N, D]) with `grid_thw`")  # fmt: skip
    encode.add_argument("--attn-implementation", help="attention backend (default: the fastest available)")
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")
    encode.add_argument("--cuda-graphs", action="store_true",
                        help="replay the forwards from CUDA graphs (one per size bucket, the usual one captured at the "
                             "start): the host then launches a fraction of the eager forwards' calls, but with the GPU "
                             "path the forwards then wait for the GPU they share with the preprocessing; measured no "
                             "faster on the H200 (12000 JPEGs, images/s, graphs vs eager: AIMv2-224 2458-2472 vs "
                             "2433-2526, Siglip2 256 patches 2009-2013 vs 2084-2145), hence off: "
                             "docs/encode-performance.md")  # fmt: skip
    encode.add_argument("--profile", action="store_true",
                        help="print the start-up steps and each pipeline stage's host seconds at the end")
    encode.add_argument("--strict", action="store_true",
                        help="stop at the first sample that cannot be encoded (exit status 1) instead of skipping "
                             "it; the shards finished before it are kept")  # fmt: skip

    check = commands.add_parser(
        "check",
        help="does the packed tower give transformers' numbers on your checkpoint, device and dtype?",
        description="Runs images and random edge-case grids through transformers' own tower (image by image) and "
        "the packed tower (one packed forward) with the same weights, per attention backend, and checks every "
        "row against DESIGN §7. Exit status: 0 every row holds, 1 some row does not (named), 2 the check could "
        "not run (the loader's message).",
    )
    check.add_argument("--model", required=True, metavar="PATH_OR_REPO",
                       help="checkpoint folder or Hub id, in any format the towers load")  # fmt: skip
    check.add_argument("--revision", help="revision of a Hub --model")
    check.add_argument("--images", nargs="+", default=[], metavar="FILES_OR_DIRS",
                       help="image files or folders (default: six built-in synthetic photo-like images of mixed "
                            "sizes)")  # fmt: skip
    check.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    check.add_argument("--dtype", choices=DTYPES, help="dtype of the checked run (default: bfloat16 on CUDA, "
                       "float32 otherwise); bf16 / fp16 are judged against a float32 reference")  # fmt: skip
    check.add_argument("--attn-implementation", help="check this backend only (default: every one available)")
    check.add_argument("--cuda-graphs", action="store_true",
                       help="also check the CUDA-graph path (model.enable_cuda_graphs())")  # fmt: skip
    check.add_argument("--max-num-patches", type=positive_int,
                       help="the processor's patch budget per image (default: the checkpoint's setting)")  # fmt: skip
    check.add_argument("--json", type=Path, dest="json_path", metavar="FILE", help="also write the report as JSON")

    commands.add_parser(
        "demo",
        help="the embedded default: random original-format checkpoints -> export -> remote code -> photos",
        description="Builds random-weight checkpoints of both towers in their original formats, exports them "
        "as push_to_hub does, loads them back as remote code and encodes scikit-image's photos, checking every "
        "image against transformers' own towers. No network.",
    )
    return parser.parse_args(argv)


def run_encode(args: argparse.Namespace, started: float | None = None) -> int:
    from .encode.job import JobOptions, run_job

    return run_job(JobOptions(
        inputs=args.inputs, model=args.model, out=args.out, revision=args.revision, device=args.device,
        dtype=args.dtype, max_tokens=args.max_tokens, patch_features=args.patch_features,
        attn_implementation=args.attn_implementation, workers=args.workers, preprocess=args.preprocess,
        shard_size=args.shard_size, overwrite=args.overwrite, progress=not args.no_progress, strict=args.strict,
        jpeg_decoder=args.jpeg_decoder, cuda_graphs=args.cuda_graphs, profile=args.profile,
    ), started)  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "encode":
        from .encode.job import process_start_time

        # From the command line, start-up counts from the process start (interpreter and imports included).
        return run_encode(args, process_start_time() if argv is None else None)
    if args.command == "check":
        from .check import CheckOptions, run_check

        options = {name: value for name, value in vars(args).items() if name != "command"}
        return run_check(CheckOptions(**options))
    from .demo import run_demo  # imports skimage and transformers' reference towers only for the demo

    return run_demo()
