#!/usr/bin/env bash
# GPU: does the preprocessing starve beside replayed CUDA graphs because its work shares a hardware queue with the
# forwards'? A CUDA context has CUDA_DEVICE_MAX_CONNECTIONS hardware work queues (8 by default, at most 32); streams
# beyond that share them, and work on a shared queue waits behind all that was queued before it, on whatever stream
# (a replayed graph queues a whole forward at once). The other suspect, a device-wide wait inside the decoders, would
# grow with the forwards queued (QUEUED=1 or 0 instead of 2). Answered in session 11 (RESULTS.md): the queues; the
# encode job now asks for 32 itself.
# Runs decode_beside_forwards.py (thread only) with the defaults, at 32 queues, with QUEUED=1 and QUEUED=0 (PROBE=0
# skips it), then the CLI on the corpus linked 4 times for each of VARIANTS, "ENVIRONMENT|OPTIONS" separated by ';'
# (default: eager and --cuda-graphs at 8 queues and at the job's own setting), interleaved over ROUNDS rounds.
#   [PROBE=1] [ROUNDS=1] [VARIANTS=...] bash benchmarks/probes/connections.sh OUT_DIR [CONFIGS]
# Measured: the probe part ~4.5 minutes per config, a CLI run ~20-25 s; keep each device call under 10 minutes.
set -uo pipefail
out=${1:-/tmp/connections}; configs=${2:-aimv2_224}; mkdir -p "$out"
source benchmarks/device_env.sh
python3 benchmarks/probes/encode_corpus.py "$configs"
log=$out/connections.log
# The CLI runs, "ENVIRONMENT|OPTIONS" separated by ';' (the job sets 32 queues itself unless the variable is set).
variants=${VARIANTS:-"CUDA_DEVICE_MAX_CONNECTIONS=8|;CUDA_DEVICE_MAX_CONNECTIONS=8|--cuda-graphs;|;|--cuda-graphs"}
for name in ${configs//,/ }; do
    if [ "${PROBE:-1}" = 1 ]; then
        for setting in "" CUDA_DEVICE_MAX_CONNECTIONS=32 QUEUED=1 QUEUED=0; do
            echo "== [$name] probe ${setting:-(defaults)}" | tee -a $log
            env $setting timeout 150 python3 benchmarks/probes/decode_beside_forwards.py /tmp/be/$name \
                /tmp/be/corpus 1024 4 thread 2>>$out/errors.log | tee -a $log
        done
    fi
done
for round in $(seq ${ROUNDS:-1}); do
    for name in ${configs//,/ }; do
        IFS=';' read -ra runs <<< "$variants"
        for run in "${runs[@]}"; do
            setting=${run%%|*}; options=${run#*|}
            echo "[$name] CLI ${setting:-(job default)} ${options:-eager} round $round: $(env $setting \
                timeout 80 python3 -m packed_vit encode /tmp/be/corpus4x --model /tmp/be/$name \
                --out /tmp/be/o.safetensors --no-progress --profile $options 2>>$out/errors.log | tail -1)" \
                | tee -a $log
            rm -f /tmp/be/o.safetensors*
        done
    done
done
