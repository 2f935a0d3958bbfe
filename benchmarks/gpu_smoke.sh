#!/usr/bin/env bash
# One command for a lent GPU machine with no network: checks what dpo.py needs, installs what is missing from wheels
# carried in ./.whl (benchmarks/gpu_smoke.py's docstring says which and how), then runs benchmarks/gpu_smoke.py.
#   bash benchmarks/gpu_smoke.sh            # on the GPU: 10 LoRA-DPO steps of a Qwen2.5-7B shape, 5 full-FT steps of 0.5B
#   bash benchmarks/gpu_smoke.sh --tiny     # the same pipeline on CPU with tiny configs (tests/test_benchmarks_run.py)
# PYTHON chooses the interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
missing=$("$PY" benchmarks/gpu_smoke.py --check)
if [ -n "$missing" ] && compgen -G ".whl/*.whl" > /dev/null; then
  echo "gpu_smoke: missing $(echo $missing); installing the wheels in .whl into /tmp/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  missing=$("$PY" benchmarks/gpu_smoke.py --check)
fi
if [ -n "$missing" ]; then
  echo "gpu_smoke: missing $(echo $missing): carry their wheels in ./.whl (see benchmarks/gpu_smoke.py)" >&2
  exit 3
fi
exec "$PY" benchmarks/gpu_smoke.py "$@"
