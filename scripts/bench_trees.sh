#!/usr/bin/env bash
# The same `qllm bench` workload on two source trees, alternating, so that both see the same machine:
#   scripts/bench_trees.sh BEFORE_TREE AFTER_TREE OUT_DIR [ROUNDS] [-- extra qllm bench arguments]
# Each tree runs from its own qllm/ (PYTHONPATH) with this checkout's .venv (override with PYTHON).
# Writes OUT_DIR/{before,after}-N.json (qllm bench's JSON) and prints a JSON summary of the
# headline figures per round.
set -euo pipefail
before=$(cd "$1" && pwd); after=$(cd "$2" && pwd); out=$3; rounds=${4:-1}
shift $(( $# >= 4 ? 4 : 3 )); [[ "${1:-}" == "--" ]] && shift
python=${PYTHON:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
mkdir -p "$out"
for ((i = 1; i <= rounds; i++)); do
  for side in before after; do
    tree=$before; [[ $side == after ]] && tree=$after
    (cd "$tree" && PYTHONPATH="$tree" "$python" -m qllm bench "$@" --json "$out/$side-$i.json" >/dev/null)
  done
done
"$python" - "$out" "$rounds" <<'PY'
import json, sys
out, rounds = sys.argv[1], int(sys.argv[2])
keys = ("throughput_vs_transformers_cb", "ls_p99_over_isolated", "be_retained")
rows = []
for i in range(1, rounds + 1):
    for side in ("before", "after"):
        headline = json.load(open(f"{out}/{side}-{i}.json")).get("headline", {})
        rows.append({"round": i, "tree": side, **{k: v for k, v in headline.items() if not isinstance(v, dict | list)}})
print(json.dumps(rows, indent=1))
PY
