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

# ---- Issue 25: both XLA:GPU flag profiles (xla.gpu_profile) on one training run each, and a jax.profiler trace
# of steps 30..32 in the first (open $OUT/run_default/profile with xprof or TensorBoard's profile tab). One GPU has
# no collectives for the latency-hiding scheduler to overlap, so a tie is expected here; multi-GPU is where it counts.
RUN25=(train.py --config configs/tiny.yaml steps=40 mesh.data=1 mesh.expert=1 mesh.tensor=1 data.source=synthetic
       model.d_model=1024 model.n_layers=8 model.n_heads=8 model.d_ff=4096 model.expert_d_ff=4096 model.max_len=1024
       data.seq_len=1024 data.batch_size=16 log.every=10 log.eval_every=0 log.progress=false checkpoint.every=0)
step 150 "$PY" "${RUN25[@]}" xla.gpu_profile=default log.dir="$OUT/run_default" 'log.profile_steps=[30,33]'
step 150 "$PY" "${RUN25[@]}" xla.gpu_profile=throughput log.dir="$OUT/run_throughput"
"$PY" - "$OUT" <<'PYEOF' | tee "$OUT/xla_profiles.md"
import json, sys
from pathlib import Path
print("| xla.gpu_profile | tokens/s (steps 31-40) | MFU | compute dtype |\n|---|---|---|---|")
for name in ("default", "throughput"):
    path = Path(sys.argv[1], f"run_{name}", "metrics.jsonl")
    records = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    train = [r for r in records if r["kind"] == "train"]
    start = next((r for r in records if r["kind"] == "start"), {})
    last = train[-1] if train else {}
    print(f"| {name} | {last.get('tokens_per_s', float('nan')):,.0f} | {last.get('mfu', float('nan')):.1%} "
          f"| {start.get('compute_dtype')} |")
PYEOF
ls -R "$OUT/run_default/profile" 2>/dev/null | head -5

# Dropless (issue 23): ragged_all_to_all against its emulation (and the static exchange with > 1 GPU), equal
# outputs and gradients; the ragged_dot grouped FFN's time on the worst-case buffer over the routed rows (<= 1.3)
step 120 "$PY" benchmarks/dropless.py --gpu-check --out "$OUT"
