"""The `packed-vit` command (also `python -m packed_vit`).

    packed-vit encode IMAGES_OR_FOLDERS... --model PATH_OR_REPO [--out FILE] [--device D] [--dtype T]
                      [--max-tokens N] [--patch-features] [--revision R] [--attn-implementation A]
    packed-vit demo

`encode`: see packed_vit.encode; `demo`: see packed_vit.demo.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .encode import DEFAULT_MAX_TOKENS, encode_images, find_images, load_model_and_processor, save_embeddings

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="packed-vit", description="Packed Siglip2-NaFlex and AIMv2 vision towers")
    commands = parser.add_subparsers(dest="command", required=True)

    encode = commands.add_parser(
        "encode",
        help="images -> per-image embeddings (safetensors)",
        description="Encodes images with a packed tower: many images per forward, packed by a token budget. "
        "Unreadable files are reported and skipped.",
    )
    encode.add_argument("inputs", nargs="+", metavar="IMAGES_OR_FOLDER",
                        help="image files, and folders (searched recursively for image files, sorted)")  # fmt: skip
    encode.add_argument("--model", required=True, metavar="PATH_OR_REPO",
                        help="checkpoint folder or Hub id, in any format the towers load "
                             "(original, transformers, exported)")  # fmt: skip
    encode.add_argument("--revision", help="revision of a Hub --model")
    encode.add_argument("--out", type=Path, default=Path("embeddings.safetensors"),
                        help="output safetensors file (default: embeddings.safetensors)")  # fmt: skip
    encode.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    encode.add_argument("--dtype", choices=DTYPES, help="model dtype (default: bfloat16 on CUDA, float32 otherwise)")
    encode.add_argument("--max-tokens", type=positive_int, default=DEFAULT_MAX_TOKENS,
                        help="most patches per forward; a larger image runs alone "
                             f"(default {DEFAULT_MAX_TOKENS})")  # fmt: skip
    encode.add_argument("--patch-features", action="store_true",
                        help="also write every patch's features (`patch_features` [N, D]) with `grid_thw`")  # fmt: skip
    encode.add_argument("--attn-implementation", help="attention backend (default: the fastest available)")
    encode.add_argument("--no-progress", action="store_true", help="no progress bar")

    commands.add_parser(
        "demo",
        help="the embedded default: random original-format checkpoints -> export -> remote code -> photos",
        description="Builds random-weight checkpoints of both towers in their original formats, exports them "
        "as push_to_hub does, loads them back as remote code and encodes scikit-image's photos, checking every "
        "image against transformers' own towers. No network.",
    )
    return parser.parse_args(argv)


def run_encode(args: argparse.Namespace) -> int:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype] if args.dtype else (torch.bfloat16 if device.type == "cuda" else torch.float32)
    try:
        paths = find_images(args.inputs)
    except FileNotFoundError as error:
        print(f"packed-vit encode: {error}", file=sys.stderr)
        return 2
    if not paths:
        print(f"packed-vit encode: no image files in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    try:
        model, processor = load_model_and_processor(args.model, args.revision, device, dtype, args.attn_implementation)
    except (OSError, ValueError, TypeError) as error:  # not a checkpoint, unknown format, unreachable, bad option
        print(f"packed-vit encode: cannot load --model {args.model}: {error}", file=sys.stderr)
        return 2
    embeddings = encode_images(
        model,
        processor,
        ((str(path), path) for path in paths),
        max_tokens=args.max_tokens,
        patch_features=args.patch_features,
        total=len(paths),
        progress=not args.no_progress,
    )
    skipped = len(embeddings.skipped)
    if not embeddings.names:
        print(f"packed-vit encode: none of the {len(paths)} files could be read; nothing written", file=sys.stderr)
        return 1
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_embeddings(args.out, embeddings, args.model)
    images, patches, forwards = len(embeddings.names), sum(embeddings.batch_tokens), len(embeddings.batch_sizes)
    print(
        f"Encoded {images} image{'s' * (images != 1)} ({patches} patches, {forwards} forward{'s' * (forwards != 1)} "
        f"of at most {args.max_tokens} patches) in {embeddings.total_seconds:.2f} s "
        f"({images / embeddings.total_seconds:.1f} images/s); skipped {skipped} unreadable file{'s' * (skipped != 1)}; "
        f"wrote {args.out} (pooled: {embeddings.pooled_kind})"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.command == "encode":
        return run_encode(args)
    from .demo import run_demo  # imports skimage and transformers' reference towers only for the demo

    return run_demo()
