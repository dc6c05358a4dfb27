"""Original checkpoint -> verified trust_remote_code Hub repo (DESIGN §5).

    python push_to_hub.py SOURCE --repo-id USER/NAME [--revision R] [--output-dir DIR] [--no-push] [--private]
                                 [--overwrite] [--max-shard-size 5GB]

SOURCE: a local checkpoint folder or a Hub id, in any format the towers' `from_pretrained` accepts. The folder is
built, proved in a fresh process without packed-vit (`AutoModel.from_pretrained(folder, trust_remote_code=True)`
vs the source model on random packed input), and only then uploaded. The work is in `packed_vit.hub_export`.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from packed_vit.hub_export import VerificationError, export_folder, upload_folder


def repo_id(value: str) -> str:
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", value):
        raise argparse.ArgumentTypeError(f"--repo-id must be USER/NAME, got {value!r}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("source", metavar="SOURCE", help="local checkpoint folder or Hub id")
    parser.add_argument("--repo-id", type=repo_id, required=True, help="USER/NAME of the Hub repo to create")
    parser.add_argument("--revision", help="revision (branch, tag, commit) of a Hub SOURCE")
    parser.add_argument("--output-dir", type=Path, help="where to write the folder (default: exports/NAME)")
    parser.add_argument("--no-push", action="store_true", help="build and verify the folder, do not upload")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output-dir")
    parser.add_argument("--max-shard-size", default="5GB", help="largest safetensors shard (default 5GB)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    output_dir = args.output_dir or Path("exports") / args.repo_id.split("/")[1]
    try:
        folder, report = export_folder(
            args.source,
            output_dir,
            revision=args.revision,
            overwrite=args.overwrite,
            max_shard_size=args.max_shard_size,
            repo_id=args.repo_id,
        )
    except (FileExistsError, ValueError, VerificationError) as error:
        print(f"push_to_hub: {error}\nNothing was uploaded.", file=sys.stderr)
        return 1
    print(
        f"{report.tower} tower of {args.source} exported to {folder} ({', '.join(report.files)}); verified in a fresh "
        f"process ({report.verified_with}): max rel err {report.max_rel_err:.2e}"
    )
    if args.no_push:
        return 0
    print(f"Uploading {folder} to {args.repo_id}")
    print(f"Uploaded: {upload_folder(folder, args.repo_id, private=args.private)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
