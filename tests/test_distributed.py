"""examples/train_packed.py on 2 CPU processes (gloo): one DDP / FSDP2 step == one process on the global batch.

Each rank packs different images; `--check` compares the loss and every module's gradient with a single process
running the concatenated batch (fp32 tolerance 1e-5; bf16 autocast: as close to the fp32 result as the
one-process bf16 step, ratio <= 1.1) and exits non-zero otherwise. FSDP2 (`fully_shard` per
encoder layer, then the root) runs on CPU with gloo in torch 2.13: its parameters are DTensor shards there too.
"""

import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_packed.py"


def torchrun(*args: str, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run(
        [*command, str(EXAMPLE), "--device", "cpu", *args], capture_output=True, text=True, timeout=300
    )


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch built without gloo")
@pytest.mark.parametrize(
    "strategy, extra",
    [("ddp", ()), ("fsdp2", ("--gradient-checkpointing",)), ("ddp", ("--bf16",))],
    ids=["ddp", "fsdp2-gradient-checkpointing", "ddp-bf16-autocast"],
)
def test_one_step_equals_one_process_on_the_concatenated_batch(strategy, extra):
    result = torchrun("--strategy", strategy, "--check", *extra)
    report = [line for line in result.stdout.splitlines() if line.startswith("check")]
    assert result.returncode == 0, "\n".join(report) + result.stderr[-3000:]
    assert any("PASS" in line for line in report), result.stdout
    if strategy == "fsdp2":
        assert any("DTensor" in line for line in report), "FSDP2 did not shard the parameters"
