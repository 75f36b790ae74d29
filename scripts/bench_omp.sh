#!/usr/bin/env bash
# Single-request and batch decode against transformers' generate (`qllm bench kernel`'s batch32
# and single parts) under two OpenMP wait settings, on idle cores, beside a busy process (one core
# spinning in a plain Python loop) and beside a memory-bound one (one thread copying 512 MiB
# between two tensors, over and over), one run each: the trade of docs/engine.md ("OpenMP
# threads"), measured on the machine it runs on.
#
#   scripts/bench_omp.sh [OUT_DIR] [extra qllm bench kernel options]
#
# Writes OUT_DIR/omp-{passive,short,spin}-{idle,busy,memory}.json (default OUT_DIR docs/results)
# and prints one summary line per run. passive: helpers sleep at once (OMP_WAIT_POLICY=PASSIVE);
# short: they spin about 0.3 ms first (GOMP_SPINCOUNT=30000); spin: about 3 ms
# (OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000). SETTINGS="passive spin" runs a subset.
set -euo pipefail
out=${1:-docs/results}
shift || true
qllm=${QLLM:-.venv/bin/qllm}
mkdir -p "$out"
declare -A settings=(
  [passive]="OMP_WAIT_POLICY=PASSIVE"
  [short]="OMP_WAIT_POLICY=PASSIVE GOMP_SPINCOUNT=30000"
  [spin]="OMP_WAIT_POLICY=ACTIVE GOMP_SPINCOUNT=300000"
)
hog=
trap '[ -n "$hog" ] && kill "$hog" 2>/dev/null || true' EXIT
python=${PYTHON:-.venv/bin/python}
for load in idle busy memory; do
  if [ "$load" = busy ]; then
    python3 -c 'while True: pass' &
    hog=$!
    sleep 1
  elif [ "$load" = memory ]; then
    "$python" -c 'import torch
torch.set_num_threads(1)
a = torch.ones(1 << 27); b = torch.empty_like(a)
while True: b.copy_(a)' &
    hog=$!
    sleep 2
  fi
  for name in ${SETTINGS:-passive short spin}; do
    file="$out/omp-$name-$load.json"
    env ${settings[$name]} "$qllm" bench kernel --model small-random \
      --skip policies,overhead,placement,kv --single-rounds 4 --rounds 1 "$@" > "$file"
    python3 - "$file" "$name" "$load" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
parts = []
for key in ("single", "batch32"):
    p = d[key]
    lo, hi = p["ratio_min_max"]
    parts.append(f"{key} {p['engine_decode_tokens_per_s']:.1f} vs {p['transformers_decode_tokens_per_s']:.1f} tok/s"
                 f" = {p['ratio']:.2f}x [{lo:.2f}-{hi:.2f}] equal={p['tokens_equal']}")
print(f"{sys.argv[2]:8} {sys.argv[3]:5} " + "; ".join(parts))
PY
  done
  if [ -n "$hog" ]; then kill "$hog"; hog=; fi
done
