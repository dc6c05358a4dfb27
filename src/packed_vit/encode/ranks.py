"""Stage 4 of the encode job: many processes (`torchrun --nproc_per_node N -m packed_vit encode ...`).

torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) sets up a gloo process group: the ranks only
agree on when to start and finish and gather their counts, no tensor crosses it, so gloo suits every device. Rank r
encodes the parts whose index is r modulo the world size: deterministic, disjoint, whole parts (a tar shard, or a
run of files), and its output shards are those parts' own. Rank 0 prepares the folder before the others write and
writes the manifest once all have finished. One process without torchrun is rank 0 of 1.

Failures: a rank that fails exits (non-zero); torchrun then ends the others with SIGTERM, which the job turns into a
clean stop (shard in progress dropped, the folder resumable), and a rank waiting in a collective for a rank that
died gets gloo's error at once (the peer's connection closed), never the timeout. Progress: each rank counts its
samples in a small file of the shared output folder (`SharedCounts`), rank 0's bar sums them.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

# The final gather waits for the slowest rank: as long as a rank's share may take. A rank that dies does not leave
# the others waiting that long: torchrun ends them, and gloo fails a collective whose peer has gone.
FINISH_TIMEOUT = timedelta(days=7)
COUNTS_INTERVAL = 2.0  # seconds between two writes of a rank's count, and two reads by rank 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def start() -> tuple[int, int]:
    """(rank, world size), joining torchrun's process group when there is one."""
    if not launched_by_torchrun():
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=FINISH_TIMEOUT)
    return dist.get_rank(), dist.get_world_size()


def parts_of_rank(parts: list, rank: int, world_size: int) -> list:
    return [part for part in parts if part.index % world_size == rank]


def device_of_rank(requested: str | None) -> torch.device:
    """The device asked for; by default CUDA (this rank's local GPU, ranks beyond the GPU count sharing them) or
    the CPU."""
    if requested:
        return torch.device(requested)
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def broadcast_from_rank0(value):
    """Rank 0's `value` on every rank (e.g. rank 0's error preparing the folder, so that all stop)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(value) -> list:
    """Every rank's `value`, on every rank, in rank order."""
    if not dist.is_initialized():
        return [value]
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    return values


def finish() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


class SharedCounts:
    """Each rank's samples done and skipped, in `<folder>/.progress-rank-RRRRR.json` (the output folder is shared by
    the ranks, on one machine or many): ranks other than 0 write theirs every COUNTS_INTERVAL seconds, rank 0 sums
    them. Files, not collectives: a collective from a thread would race the job's own, and a rank busy in a long
    forward would hold everyone's bar."""

    def __init__(self, folder: Path, rank: int, world_size: int):
        self.folder, self.rank, self.world_size = folder, rank, world_size
        self.last = 0.0

    def path(self, rank: int) -> Path:
        return self.folder / f".progress-rank-{rank:05d}.json"

    def publish(self, done: int, skipped: int, force: bool = False) -> None:
        now = time.monotonic()
        if self.rank == 0 or not (force or now - self.last >= COUNTS_INTERVAL):
            return
        self.last = now
        path = self.path(self.rank)
        temporary = path.with_name(path.name + ".tmp")  # this rank's own: only it writes its count
        try:
            temporary.write_text(json.dumps({"done": done, "skipped": skipped}))
            os.replace(temporary, path)
        except OSError:  # a count is only for the bar: never a reason to stop the job
            pass

    def others(self) -> tuple[int, int]:
        """(done, skipped) of every rank but 0, as last written."""
        done = skipped = 0
        for rank in range(1, self.world_size):
            try:
                count = json.loads(self.path(rank).read_text())
                done, skipped = done + count["done"], skipped + count["skipped"]
            except (OSError, ValueError, KeyError):  # not written yet, or being replaced
                pass
        return done, skipped

    @staticmethod
    def remove(folder: Path) -> None:
        for path in folder.glob(".progress-rank-*"):
            path.unlink(missing_ok=True)


def watch_others(counts: SharedCounts, show: Callable[[int, int], None]) -> Callable[[], None]:
    """Rank 0: a thread passes the other ranks' counts to `show` every COUNTS_INTERVAL seconds, also while rank 0
    waits for them at the end. Returns what stops it, once more passing the counts as last written."""
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(COUNTS_INTERVAL):
            show(*counts.others())

    thread = threading.Thread(target=watch, name="packed-vit rank counts", daemon=True)
    thread.start()

    def stop_watching() -> None:
        stop.set()
        thread.join()
        show(*counts.others())

    return stop_watching
