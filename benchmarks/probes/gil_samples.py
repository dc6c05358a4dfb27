"""Summarises `py-spy record --gil --threads --format raw` of the encode job (encode_gil.sh): per thread, the
samples in which it held the GIL, and the frames it held it in (the innermost frame of ours, torch's or the
standard library's; the innermost two).

    python3 benchmarks/probes/gil_samples.py RAW_FILE [RATE_HZ] [TOP]
"""

import re
import sys
from collections import Counter, defaultdict

if __name__ == "__main__":
    path, rate = sys.argv[1], float(sys.argv[2]) if len(sys.argv) > 2 else 250.0
    top = int(sys.argv[3]) if len(sys.argv) > 3 else 12
    by_thread, leaves = Counter(), defaultdict(Counter)
    for line in open(path):
        stack, _, count = line.rstrip().rpartition(" ")
        frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", frames[0])
        thread = re.sub(r"Thread-\d+ ", "", thread)
        frames = [re.sub(r" \(/.*/(site-packages|lib/python3\.\d+)/", " (", f) for f in frames[1:]]
        if any("_find_and_load" in f for f in frames):
            thread += " [imports]"
        by_thread[thread] += int(count)
        leaves[thread][" <- ".join(reversed(frames[-2:])) or "(no Python frame)"] += int(count)
    total = sum(by_thread.values())
    print(f"{total} samples holding the GIL ({total / rate:.1f} s at {rate:.0f} Hz)")
    for thread, count in by_thread.most_common():
        print(f"\n{thread}: {count} samples, {count / rate:.2f} s")
        for leaf, n in leaves[thread].most_common(top):
            print(f"  {n / rate:6.2f} s  {leaf}")
