#!/usr/bin/env bash
# Probe: does a change to modeling/ cost speed? The same benchmark on an older modeling/ and on this checkout's,
# in separate processes, interleaved old, new, old, new, in one device call (a difference smaller than the spread
# between the two runs of one side is noise).
# Usage (repo root, on the GPU): bash benchmarks/probes/ab_modeling.sh OLD_MODELING_DIR OUT_DIR [bench.py args...]
#   OLD_MODELING_DIR: e.g. made here with `mkdir -p .ab/old && git archive COMMIT modeling | tar -x -C .ab/old`
#   (.ab ignored through .git/info/exclude, named in the device call's carry) -> .ab/old/modeling
set -euo pipefail
old=$1 out=$2
shift 2
source benchmarks/device_env.sh
mkdir -p /tmp/pv_old/packed_vit "$out"
cp -r src/packed_vit/. /tmp/pv_old/packed_vit/
ln -sfn "$PWD/$old" /tmp/pv_old/packed_vit/modeling
for sub in configuration processing; do ln -sfn "$PWD/$sub" /tmp/pv_old/packed_vit/$sub; done
for round in 1 2; do
    PYTHONPATH=/tmp/pv_old python3 benchmarks/bench.py --out-dir "$out/old$round" "$@" > "$out/old$round.log" 2>&1
    python3 benchmarks/bench.py --out-dir "$out/new$round" "$@" > "$out/new$round.log" 2>&1
done
grep -H -E "W1|x 256|x 1024" "$out"/*.log | grep -v -i warn
