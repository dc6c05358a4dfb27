#!/usr/bin/env bash
# GPU checks recorded in benchmarks/RESULTS.md: the CUDA tests and the multi-GPU equivalence checks.
# Usage (repo root): bash benchmarks/gpu_checks.sh [LOG_DIR]
#   needs 2 GPUs for the distributed part (skipped with a message on fewer).
set -uo pipefail
log_dir=${1:-.}
source benchmarks/device_env.sh
status=0

(cd tests && python3 -m pytest -q -rs -s -p no:cacheprovider test_cuda.py test_cuda_graphs.py test_encode_gpu.py test_vlm_drop_in.py &&
    python3 -m pytest -q -rs -s -p no:cacheprovider test_training.py test_compile.py -k cuda) \
    2>&1 | tee "$log_dir/cuda_tests.log" | grep -E "passed|failed|err |FAILED|SKIPPED" || status=1
grep -q " failed" "$log_dir/cuda_tests.log" && status=1

gpus=$(python3 -c "import torch; print(torch.cuda.device_count())")
if [ "$gpus" -ge 2 ]; then
    run="python3 -m torch.distributed.run --standalone --nproc_per_node 2 examples/train_packed.py"
    for args in "--strategy ddp --check" "--strategy fsdp2 --check" "--strategy ddp --check --bf16" \
                "--strategy fsdp2 --check --bf16 --gradient-checkpointing" "--strategy fsdp2 --check --bf16 --tower aimv2" \
                "--strategy ddp --check --bf16 --compile"; do
        echo "== torchrun --nproc_per_node 2 examples/train_packed.py $args"
        $run $args 2>&1 | grep -vi warn | tail -4 || status=1
    done 2>&1 | tee "$log_dir/distributed.log"
    grep -qE "FAIL|Error|error" "$log_dir/distributed.log" && status=1
else
    echo "distributed checks skipped: $gpus GPU(s)"
fi
exit $status
