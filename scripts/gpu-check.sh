#!/usr/bin/env bash
# CUDA checks on a GPU machine (its python3 holds a CUDA torch; msgspec, structlog and
# pytest-asyncio travel as wheels in .whl/). Prints versions, runs the CUDA tests and
# scripts/cuda_check.py. Usage: scripts/gpu-check.sh [--bench]
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# qllm is not pip-installed there: declare its entry points (the built-in policies) by hand.
mkdir -p /tmp/site/qllm-0.1.0.dist-info
printf 'Metadata-Version: 2.1\nName: qllm\nVersion: 0.1.0\n' > /tmp/site/qllm-0.1.0.dist-info/METADATA
python3 - <<'PY'
import tomllib
eps = tomllib.load(open("pyproject.toml", "rb"))["project"]["entry-points"]
with open("/tmp/site/qllm-0.1.0.dist-info/entry_points.txt", "w") as f:
    for group, items in eps.items():
        f.write(f"[{group}]\n" + "".join(f"{k} = {v}\n" for k, v in items.items()))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider -o filterwarnings=default tests/test_tensor_manager.py tests/test_kv_blocks.py tests/test_smoke.py 2>&1 | tail -15
# Expert parallel over NCCL (one GPU per rank: skipped, with its reason, on a one-GPU machine).
python3 -m pytest -q -rs -p no:cacheprovider -o filterwarnings=default tests/test_expert_parallel.py -k nccl 2>&1 | tail -5
python3 scripts/cuda_check.py "$@"
