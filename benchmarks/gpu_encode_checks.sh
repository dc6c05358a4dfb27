#!/usr/bin/env bash
# The encode job's GPU checks and benchmark in one device call (issues 13, 14, 23). Run from the repository root:
#   [CONFIGS=siglip2_256,...] [TESTS=0] [BENCH_ARGS=...] [BEFORE_CONFIGS=...] \
#       bash benchmarks/gpu_encode_checks.sh OUT_DIR [BEFORE_DIR]
# BEFORE_DIR: a copy of an earlier src/packed_vit, whose GPU path is run on the same corpus and checkpoints after the
# benchmark (the before / after of a change, in the same run).
set -uo pipefail
out=${1:-/tmp/gpu_encode}; before=${2:-}; mkdir -p "$out"
source benchmarks/device_env.sh
export PYTHONPATH=$PYTHONPATH:$PWD/tests
python -c "import packed_vit, torchvision, transformers; print('packed_vit', packed_vit.__file__, 'torchvision',
torchvision.__version__, 'transformers', transformers.__version__)"
# CUDA tests of the encode job (GPU preprocessing vs transformers' torchvision backend; worker counts; 2 ranks)
[ "${TESTS:-1}" = 1 ] && timeout 120 python -m pytest -q -p no:warnings tests/test_encode_gpu.py 2>&1 \
    | tail -40 > "$out/pytest_gpu.log" && tail -3 "$out/pytest_gpu.log"
configs=${CONFIGS:-siglip2_256,siglip2_1024,aimv2_224,aimv2_native}
timeout 370 python benchmarks/bench_encode.py --work /tmp/be --out "$out/results_encode.json" --profile \
    --configs "$configs" ${BENCH_ARGS:-} 2>&1 \
    | tee "$out/bench.log" | tail -14
if [ -n "$before" ]; then  # the earlier code's GPU path, as users ran it
    mkdir -p /tmp/pvb/packed_vit && cp -r "$before"/. /tmp/pvb/packed_vit/
    for sub in modeling configuration processing; do ln -sfn "$PWD/$sub" /tmp/pvb/packed_vit/$sub; done
    for name in $(echo "${BEFORE_CONFIGS:-$configs}" | tr , ' '); do
        name=${name%%:*}
        [[ $name == siglip2* ]] || continue  # the earlier code had no GPU path for AIMv2
        PYTHONPATH=/tmp/pvb timeout 60 python -m packed_vit encode /tmp/be/corpus --model /tmp/be/$name \
            --out /tmp/be/before_$name.safetensors --no-progress --preprocess gpu 2>&1 | tail -1 | tee -a "$out/before.log"
    done
fi
