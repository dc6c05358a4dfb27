"""The encode probes' inputs in /tmp/be: bench_encode.py's 3000-JPEG corpus, a checkpoint per config, and the corpus
linked 4 times (`corpus4x`, 12000 images: long enough a run that its steady state dominates the start-up).

    python3 benchmarks/probes/encode_corpus.py CONFIGS      (comma-separated bench_encode.py config names)
"""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench_encode import write_checkpoint, write_corpus  # noqa: E402

WORK = Path("/tmp/be")

if __name__ == "__main__":
    write_corpus(WORK / "corpus", 3000)
    for name in sys.argv[1].split(","):
        write_checkpoint(WORK / name, name)
    linked = WORK / "corpus4x"
    linked.mkdir(exist_ok=True)
    for path in sorted((WORK / "corpus").glob("*.jpg")):
        for copy in range(4):
            link = linked / f"{copy}_{path.name}"
            if not link.exists():
                os.symlink(path, link)
