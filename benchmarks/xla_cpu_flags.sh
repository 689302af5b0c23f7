#!/usr/bin/env bash
# XLA:CPU flags against the MoE layer's step (issue 25, item 7): benchmarks/moe_profile.py once per flag set,
# then one table of top-1 / top-2 wall and CPU time per step with the CPU it ran on. Run it on each CPU to compare:
#
#   bash benchmarks/xla_cpu_flags.sh                 # -> benchmarks/results/xla_cpu_flags.md (about 12 minutes idle)
#   OUT=/tmp/x STEPS=5 bash benchmarks/xla_cpu_flags.sh
#
# CPU time per step moves least when other processes share the machine; wall time is what a user sees.
set -uo pipefail
OUT="${OUT:-benchmarks/results}"
STEPS="${STEPS:-10}"
TMP="$(mktemp -d)"
PY="${PYTHON:-python3}"
VARIANTS=(
    "default:"
    "AVX2 only (an AVX2 CPU):--xla_cpu_max_isa=AVX2"
    "512-bit vectors:--xla_cpu_prefer_vector_width=512"
    "no Eigen threads in dots:--xla_cpu_multi_thread_eigen=false"
    "default again:"
)
for i in "${!VARIANTS[@]}"; do
    flags="${VARIANTS[$i]#*:}"
    echo "== ${VARIANTS[$i]%%:*} ($flags)"
    XLA_FLAGS="$flags" timeout 900 "$PY" benchmarks/moe_profile.py --steps "$STEPS" --warmup 3 --trace-steps 1 \
        --out "$TMP/$i" > "$TMP/$i.log" 2>&1 || echo "   failed: see $TMP/$i.log"
done
mkdir -p "$OUT"
"$PY" - "$TMP" "$OUT" "${VARIANTS[@]}" <<'PYEOF'
import json, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
tmp, out, variants = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3:]
lines = ["# XLA:CPU flags and the MoE layer step", "",
         "Regenerate: `bash benchmarks/xla_cpu_flags.sh` (benchmarks/moe_profile.py per flag set: E=8, D=256, "
         "F=1024, 8 groups of 1024 tokens, mesh (1,8,1) of 8 simulated CPU devices).", "",
         "| flags | top-1 wall ms | top-1 CPU ms | top-2 wall ms | top-2 CPU ms | top-2/top-1 (wall) | load avg |",
         "|---|---|---|---|---|---|---|"]
machine = None
for i, variant in enumerate(variants):
    name, flags = variant.split(":", 1)
    path = tmp / str(i) / "moe_profile.json"
    if not path.exists():
        lines.append(f"| {name} `{flags}` | failed | | | | | |")
        continue
    d = json.loads(path.read_text())
    machine = d["machine"]
    (t1, t2) = d["rows"][:2]
    lines.append(f"| {name} `{flags or '(none)'}` | {t1['wall_ms']:.1f} | {t1['cpu_ms']:.1f} | {t2['wall_ms']:.1f} | "
                 f"{t2['cpu_ms']:.1f} | {d['top2_over_top1']['wall']:.2f} | {machine.get('load_avg', [None])[0]} |")
if machine:
    import _common
    lines += ["", _common.cpu_line(machine)]
(out / "xla_cpu_flags.md").write_text("\n".join(lines) + "\n")
print("\n".join(lines))
PYEOF
