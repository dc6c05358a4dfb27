#!/usr/bin/env bash
# The encode job's GPU checks and benchmark in one device call (issue 13/14). Run from the repository root:
#   bash benchmarks/gpu_encode_checks.sh OUT_DIR
set -uo pipefail
out=${1:-/tmp/gpu_encode}; mkdir -p "$out"
source benchmarks/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/tests
python -c "import packed_vit, torchvision; print('packed_vit', packed_vit.__file__, 'torchvision', torchvision.__version__)"
# CUDA tests of the encode job (GPU preprocessing vs transformers' torchvision backend; 2 ranks on one GPU)
timeout 150 python -m pytest -q -p no:warnings tests/test_encode_gpu.py 2>&1 | tail -40 | tee "$out/pytest_gpu.log"
timeout 380 python benchmarks/bench_encode.py --work /tmp/bench_encode --out "$out/results_encode.json" 2>&1 | tee "$out/bench.log" | tail -40
