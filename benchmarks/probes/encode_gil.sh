#!/usr/bin/env bash
# GPU: in the encode job as users run it, which thread holds the GIL, doing what, and does the interpreter's switch
# interval matter? py-spy (carried as a wheel in .whl/) samples the CLI, only the thread holding the GIL
# (`--gil`), on a corpus of 4x the benchmark's 3000 JPEGs (links) so that the steady state dominates; the CLI is
# also run on the 3000 JPEGs with the default switch interval (5 ms) and shorter ones, interleaved.
#   bash benchmarks/probes/encode_gil.sh OUT_DIR [CONFIGS]      (summary: python3 benchmarks/probes/gil_samples.py)
set -uo pipefail
out=${1:-/tmp/encode_gil}; configs=${2:-siglip2_256,aimv2_224}; mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
export PATH=/tmp/site/bin:$PATH PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
source benchmarks/device_env.sh
python3 benchmarks/probes/encode_corpus.py "$configs"
SWITCH='import sys, runpy; sys.setswitchinterval(float(sys.argv.pop(1))); runpy.run_module("packed_vit", run_name="__main__", alter_sys=True)'
for name in ${configs//,/ }; do
    ckpt=/tmp/be/$name
    timeout 90 py-spy record --gil --threads --format raw -r 250 -o "$out/gil_$name.txt" -- \
        python3 -m packed_vit encode /tmp/be/corpus4x --model $ckpt --out /tmp/be/o_spy.safetensors --no-progress \
        --profile > "$out/spy_$name.log" 2>&1; tail -2 "$out/spy_$name.log"
    for round in 1 2; do
        for interval in 0.005 0.0002; do
            echo "[$name] switch interval $interval round $round: $(timeout 60 python3 -c "$SWITCH" $interval encode \
                /tmp/be/corpus --model $ckpt --out /tmp/be/o_$interval.safetensors --no-progress --profile \
                2>"$out/si_${name}_${interval}_$round.err" | tail -1)" | tee -a "$out/switch.log"
        done
    done
    timeout 90 python3 benchmarks/probes/forward_host_time.py $ckpt /tmp/be/corpus 2>&1 | grep round | tee -a "$out/host.log"
done
