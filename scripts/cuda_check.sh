#!/usr/bin/env bash
# phitune's CUDA paths in one table (issue 32); the logic is in scripts/cuda_check.py.
#   bash scripts/cuda_check.sh                    on a CUDA machine: five paths in <= 10 min;
#                                                 exit 1 if any fails, 3 if some are blocked
#   bash scripts/cuda_check.sh --rehearse-on-cpu  the same paths with device cpu, small sizes
# Without CUDA it says so in one line and exits 0, running nothing.
# On the lent GPU machine (no network), the wheels scripts/cuda_wheels.sh downloaded into .whl/
# are unpacked into a scratch site folder first (a wheel is a zip: no pip, no index).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi

rehearse=0
for a in "$@"; do [ "$a" = "--rehearse-on-cpu" ] && rehearse=1; done
if [ "$rehearse" = 0 ] && [ "${CUDA_CHECK_REHEARSE:-0}" != 1 ]; then
  if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "cuda_check: no CUDA device here (torch.cuda.is_available() is not True): nothing run"
    exit 0
  fi
  wheels=${CUDA_CHECK_WHEELS:-.whl}  # .whl-model for the SmolLM2 call (scripts/cuda_wheels.sh)
  if compgen -G "$wheels/*.whl" >/dev/null; then
    site=${CUDA_CHECK_SITE:-/tmp/cuda-check-site}
    mkdir -p "$site"
    for w in "$wheels"/*.whl; do "$PY" -m zipfile -e "$w" "$site" || exit 2; done
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  fi
fi
export PYTHONUNBUFFERED=1
exec "$PY" scripts/cuda_check.py "$@"
