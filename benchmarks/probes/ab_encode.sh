#!/usr/bin/env bash
# GPU: does a change to the encode job (src/packed_vit) move its speed or its start-up? The CLI on an older
# src/packed_vit and on this checkout's, interleaved in one device call (a difference smaller than the spread between
# the rounds of one side is noise): images/s from the first forward on (the corpus linked 4 times, 12000 JPEGs) and
# the start-up (128 JPEGs), each with its --profile; and transformers' own load, the start-up goal's reference
# (bench_encode.transformers_startup), once per config and round, first in the even rounds.
#   [CORPORA=startup_corpus] bash benchmarks/probes/ab_encode.sh OLD_TREE OUT_DIR [CONFIGS] [ROUNDS]
#   CORPORA: which of the two runs each round makes (default both; startup_corpus alone: the start-up only)
#   FRESH_TRITON_CACHE=1: each CLI run gets an empty TRITON_CACHE_DIR, as a machine's first run (Triton compiles)
#   OLD_TREE: made here with `mkdir -p .ab/old && git archive COMMIT src/packed_vit modeling configuration processing
#   | tar -x -C .ab/old` (.ab ignored through .git/info/exclude, named in the device call's carry) -> .ab/old
# Measured: a CLI run ~20-25 s (corpus4x), ~13 s (start-up); keep each device call under 10 minutes.
set -uo pipefail
old=$1 out=$2 configs=${3:-siglip2_256,aimv2_224} rounds=${4:-2} corpora=${CORPORA:-corpus4x startup_corpus}
source benchmarks/device_env.sh
python3 benchmarks/probes/encode_corpus.py "$configs"
mkdir -p /tmp/pv_old/packed_vit /tmp/be/startup_corpus "$out"
cp -r "$old"/src/packed_vit/. /tmp/pv_old/packed_vit/
for sub in modeling configuration processing; do ln -sfn "$PWD/$old/$sub" /tmp/pv_old/packed_vit/$sub; done
ls /tmp/be/corpus/*.jpg | head -128 | xargs -I{} ln -sf {} /tmp/be/startup_corpus/
log=$out/ab_encode.log
run() {  # side name corpus
    local path=${PYTHONPATH:-}
    [ "$1" = old ] && path=/tmp/pv_old${PYTHONPATH:+:$PYTHONPATH}
    local cache=()
    [ "${FRESH_TRITON_CACHE:-0}" = 1 ] && cache=(TRITON_CACHE_DIR=$(mktemp -d /tmp/triton_cache.XXXX))
    echo "[$2] $1 $(basename $3): $(env PYTHONPATH=$path "${cache[@]}" timeout 90 python3 -m packed_vit encode $3 --model /tmp/be/$2 \
        --out /tmp/be/ab.safetensors --no-progress --profile 2>$out/last.err | tail -1)" | tee -a $log
    grep -A30 "start-up and run" $out/last.err >> $out/profiles.log; rm -f /tmp/be/ab.safetensors*
}
transformers_load() {  # name
    echo "[$1] transformers' load: $(cd benchmarks && python3 -c "from bench_encode import *; \
        print(transformers_startup(Path('/tmp/be/$1'), '$1'))")" | tee -a $log
}
# The order turns round by round (old, new, transformers; then transformers, new, old): the first run of a fresh
# machine reads the libraries and the checkpoint from disk, and that should not fall on one side only.
for round in $(seq $rounds); do
    for name in ${configs//,/ }; do
        [ $((round % 2)) = 0 ] && transformers_load $name
        for corpus in $corpora; do
            sides="old new"; [ $((round % 2)) = 0 ] && sides="new old"
            for side in $sides; do run $side $name /tmp/be/$corpus; done
        done
        [ $((round % 2)) = 1 ] && transformers_load $name
    done
done
