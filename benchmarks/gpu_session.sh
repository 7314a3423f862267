#!/usr/bin/env bash
# Every check that needs a GPU, in one sitting on a GPU machine: the machine's facts, the tests
# marked `gpu`, then `ember bench load`, `coldstart` and `engine` to cuda:0. It runs ember from
# this source tree with the machine's own python3 and torch (no install: GPU hosts lent for a
# check may reach no package index), so the Ray, S3 and HTTP parts are not exercised here.
#
#   OUT=results-dir STEPS=facts,tests,load,coldstart,engine bash benchmarks/gpu_session.sh \
#       2>&1 | tee results-dir/session.log
#
# LOAD_ARGS, COLDSTART_ARGS and ENGINE_ARGS are appended to each benchmark's arguments (later
# ones win). bench engine's throughput part reads ../shared's ShareGPT lengths, or the file
# EMBER_SHAREGPT_LENGTHS names.
#
# Each step has a time cap and the whole session a deadline (BUDGET_S, default 570 s); a step
# that fails or times out is reported and the next one runs. Results land in $OUT:
# gpu-tests.log, load-cuda.json, coldstart-cuda.json, engine-cuda.json.
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-.cache/gpu-out}
mkdir -p "$OUT"
PY=${PY:-python3}
STEPS=${STEPS:-facts,tests,load,coldstart,engine}
BUDGET_S=${BUDGET_S:-570}
SIZE=${SIZE:-1b}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MASTER_ADDR=127.0.0.1 EMBER_CACHE_DIR=${EMBER_CACHE_DIR:-/tmp/ember-gpu-cache}
START=$(date +%s)

# run NAME CAP_S CMD...: CMD under min(CAP_S, time left), its exit status reported.
run() {
    local name=$1 cap=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    ((cap > left)) && cap=$left
    if ((cap < 10)); then
        echo "== $name: SKIPPED (session budget spent)"
        return
    fi
    echo "== $name (cap ${cap}s, t+$(($(date +%s) - START))s): $*"
    local t0=$(date +%s)
    timeout --kill-after=5 "$cap" "$@"
    local rc=$?
    echo "== $name: rc=$rc in $(($(date +%s) - t0))s"
}

want() { [[ ",$STEPS," == *",$1,"* ]]; }

if want facts; then
    nvidia-smi
    nvidia-smi --query-gpu=name,memory.total,driver_version,pcie.link.gen.max,pcie.link.width.max,pcie.link.gen.current,pcie.link.width.current --format=csv
    $PY -c "import torch, transformers, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__, 'gpu', torch.cuda.get_device_name(0))"
    echo "cores $(nproc)"; free -g; df -h . /dev/shm /tmp; uname -r
fi

# One 1b model for every benchmark: made once, shared through links.
if want load || want coldstart || want engine; then
    run model 120 $PY -c "import sys; sys.path.insert(0, 'benchmarks')
from bench_load import prepare
prepare('$SIZE', ['ember'])"
    mkdir -p .cache/coldstart .cache/gpu-models
    ln -sfn "$PWD/.cache/store/llama-$SIZE" ".cache/coldstart/llama-$SIZE-bf16"
    ln -sfn "$PWD/.cache/store/llama-$SIZE-ember" ".cache/coldstart/llama-$SIZE-ember"
    ln -sfn "$PWD/.cache/store/llama-$SIZE" ".cache/gpu-models/llama-$SIZE"
fi

if want tests; then
    run tests 120 $PY -m pytest -q -m gpu -p no:cacheprovider -o addopts="" \
        tests/integration/test_store_cuda.py tests/integration/test_engine_parallel.py \
        tests/integration/test_engine_exactness.py 2>&1 | tee "$OUT/gpu-tests.log"
fi

if want load; then
    run load 150 $PY benchmarks/bench_load.py --device cuda --size "$SIZE" --runs 3 \
        --no-interleave --out "$OUT/load-cuda.json" ${LOAD_ARGS:-}
fi

if want coldstart; then
    run coldstart 200 $PY benchmarks/bench_coldstart.py --device cuda --sizes "$SIZE" --runs 3 \
        --out "$OUT/coldstart-cuda.json" ${COLDSTART_ARGS:-}
fi

if want engine; then
    run engine 200 $PY benchmarks/bench_engine.py --device cuda --models "$SIZE" \
        --throughput-models "$SIZE" --engines ember,transformers --threads 8 --runs 3 \
        --cold-runs 2 --timeout 150 --models-dir .cache/gpu-models --out "$OUT/engine-cuda.json" \
        ${ENGINE_ARGS:-}
fi
echo "== session done in $(($(date +%s) - START))s"
