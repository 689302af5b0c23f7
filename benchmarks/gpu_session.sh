#!/usr/bin/env bash
# The GPU check, prepared to run in one go when a GPU is lent (device time is short: ~15 minutes in all,
# start-up included). Records the card, then MFU (benchmarks/mfu.py), the MoE step vs its dense twin
# (benchmarks/overhead.py), the MoE-layer profile (benchmarks/moe_profile.py) and the dropless checks
# (benchmarks/dropless.py --gpu-check: the ragged exchange and grouped GEMM) on one GPU.
#
#   OUT=/dir/for/results bash benchmarks/gpu_session.sh     # in the repository root, on the GPU machine
#
# Uses the machine's own jax/flax/optax/orbax (tedjax is put on PYTHONPATH, nothing is installed); each step
# has its own time limit, so one that hangs cannot eat the others' time. Results: $OUT/*.json, *.md, log.txt.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY="${PYTHON:-python3}"

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$OUT/card.csv"
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
    | tee "$OUT/versions.txt"

step() {  # step SECONDS COMMAND...: run with a limit, keep going whatever it returns
    local limit=$1
    shift
    echo "== $* (limit ${limit}s)" | tee -a "$OUT/log.txt"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/log.txt"
    echo "== rc ${PIPESTATUS[0]}" | tee -a "$OUT/log.txt"
}

step 270 "$PY" benchmarks/mfu.py --out "$OUT"
step 150 "$PY" benchmarks/overhead.py --layouts 1,1,1 --no-before --out "$OUT"
step 120 "$PY" benchmarks/moe_profile.py --layout 1,1,1 --out "$OUT"
# Dropless (issue 23): ragged_all_to_all against its emulation (and the static exchange with > 1 GPU), equal
# outputs and gradients; the ragged_dot grouped FFN's time on the worst-case buffer over the routed rows (<= 1.3)
step 120 "$PY" benchmarks/dropless.py --gpu-check --out "$OUT"
