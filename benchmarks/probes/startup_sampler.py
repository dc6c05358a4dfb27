"""GPU: what each thread of the encode job does during its start-up, on a timeline. Runs the CLI in this process
with a sampler thread beside it: every few milliseconds the sampler reads each thread's CPU time from the kernel
(/proc/self/task/TID/schedstat, nanoseconds on a CPU) and each Python thread's stack (sys._current_frames()). The
report gives, per thread and per time bin, the share of a core it used and the stack it was seen in most (the
innermost frame of packed_vit, then the innermost frame); threads without Python frames (the CUDA driver's, the
DataLoader workers' are other processes) are summed as "native threads".

    python3 benchmarks/probes/startup_sampler.py [--every-ms 5] [--bin 0.1] [--from-mark "workers forked"] \
        -- encode DIR --model CKPT --out F --no-progress --profile

Why not py-spy: its chrome trace keeps a thread's last stack through the samples in which the thread was idle, so
busy and waiting look the same; its raw output has no times. The sampler needs the GIL to look at the stacks, so a
sample waits for a thread that holds it (up to the switch interval, 5 ms): the CPU times are exact, the stacks are
those at the moment the sampler got the GIL. Times are seconds from the process's start, as the CLI's --profile marks.
"""

from __future__ import annotations

import argparse
import os
import runpy
import sys
import threading
import time
from collections import Counter, defaultdict


def process_start() -> float:
    with open("/proc/self/stat") as stat:
        ticks = int(stat.read().rpartition(")")[2].split()[19])
    with open("/proc/uptime") as uptime:
        age = float(uptime.read().split()[0]) - ticks / os.sysconf("SC_CLK_TCK")
    return time.time() - age


def cpu_seconds(tid: int) -> float | None:
    try:
        with open(f"/proc/self/task/{tid}/schedstat") as stat:
            return int(stat.read().split()[0]) / 1e9
    except OSError:  # the thread ended
        return None


def stack_label(frame) -> str:
    names = []
    while frame is not None:
        code = frame.f_code
        names.append((code.co_name, code.co_filename, frame.f_lineno))
        frame = frame.f_back
    leaf = f"{names[0][0]} ({os.path.basename(names[0][1])}:{names[0][2]})"
    ours = next((n for n, filename, _ in names if "packed_vit" in filename), None)
    return leaf if ours is None or ours == names[0][0] else f"{ours} > {leaf}"


class Sampler:
    def __init__(self, every: float):
        self.every, self.rows, self.stop = every, [], threading.Event()
        self.thread = threading.Thread(target=self.run, name="sampler", daemon=True)

    def run(self) -> None:
        me = threading.get_native_id()
        while not self.stop.is_set():
            now = time.time()
            frames = sys._current_frames()
            python = {t.native_id: (t.name, frames.get(t.ident)) for t in threading.enumerate()}
            row = {}
            for tid in map(int, os.listdir("/proc/self/task")):
                if tid == me:
                    continue
                seconds = cpu_seconds(tid)
                if seconds is None:
                    continue
                name, frame = python.get(tid, ("native threads", None))
                row[tid] = (name, seconds, stack_label(frame) if frame is not None else "")
            self.rows.append((now, row))
            time.sleep(self.every)

    def report(self, zero: float, start: float, width: float) -> str:
        """Per thread: per bin from `start` (s after `zero`), the share of a core and the most seen stack."""
        used = defaultdict(lambda: defaultdict(float))  # name -> bin -> CPU seconds
        seen = defaultdict(lambda: defaultdict(Counter))  # name -> bin -> stack -> samples
        totals = defaultdict(float)
        for (before, old), (now, new) in zip(self.rows, self.rows[1:]):
            if now - zero < start:
                continue
            for tid, (name, seconds, stack) in new.items():
                label = name if name == "native threads" else f"{name} [{tid}]"
                spent = seconds - old[tid][1] if tid in old else 0.0
                totals[label] += spent
                # spread over the bins between the two samples (the sampler waits while a thread holds the GIL)
                at = max(before - zero, start)
                while at < now - zero:
                    index = int((at - start) // width)
                    piece = min(now - zero, start + (index + 1) * width) - at
                    used[label][index] += spent * piece / max(now - zero - max(before - zero, start), 1e-9)
                    at += max(piece, 1e-9)
                if stack:
                    seen[label][int((now - zero - start) // width)][stack] += 1
        lines = []
        for label in sorted(used, key=lambda name: -totals[name]):
            if totals[label] < 0.005:
                continue
            lines.append(f"\n== {label}: {totals[label]:.2f} CPU s after {start:.2f} s")
            for index in sorted(used[label]):
                stacks = seen[label][index]
                top = stacks.most_common(1)[0][0] if stacks else ""
                share = used[label][index] / width
                if share >= 0.01 or top:
                    lines.append(f"  {start + index * width:6.2f}  {share:4.0%}  {top}")
        return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--every-ms", type=float, default=5.0)
    parser.add_argument("--bin", type=float, default=0.1)
    parser.add_argument("--start", type=float, default=None, help="s after the process start (default: 1 s "
                        "before the end of the imports, found as the first thread other than the main one)")
    parser.add_argument("cli", nargs=argparse.REMAINDER, help="-- and the arguments of python -m packed_vit")
    args = parser.parse_args()
    zero = process_start()
    sampler = Sampler(args.every_ms / 1000)
    sampler.thread.start()
    sys.argv = ["packed_vit"] + [a for a in args.cli if a != "--"]
    status = 0
    try:
        runpy.run_module("packed_vit", run_name="__main__", alter_sys=True)
    except SystemExit as exit_:
        status = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sampler.stop.set()
        sampler.thread.join()
        start = args.start
        if start is None:  # the first sample with a second Python thread: the job's threads start after the fork
            first = next((now for now, row in sampler.rows
                          if sum(1 for name, _, _ in row.values() if name not in ("native threads", "MainThread"))),
                         sampler.rows[0][0] + 1)  # fmt: skip
            start = max(0.0, first - zero - 1.0)
        print(sampler.report(zero, start, args.bin), file=sys.stderr)
    sys.exit(status)
