"""Stage 4 of the encode job: many processes (`torchrun --nproc_per_node N -m packed_vit encode ...`).

torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR...) sets up a gloo process group: the ranks only
agree on when to start and finish and gather their counts, no tensor crosses it, so gloo suits every device. Rank r
encodes the parts whose index is r modulo the world size: deterministic, disjoint, whole parts (a tar shard, or a
run of files), and its output shards are those parts' own. Rank 0 prepares the folder before the others write and
writes the manifest once all have finished. One process without torchrun is rank 0 of 1.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

# The final barrier waits for the slowest rank: as long as a rank's share may take. torchrun ends every rank when
# one fails, so this does not leave a job hanging on a dead rank.
FINISH_TIMEOUT = timedelta(days=7)


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
