#!/usr/bin/env bash
# GPU smoke check (under 10 minutes; see benchmarks/gpu_smoke.py): a 2-block build and a timed fitness call of a
# random-weight Llama-3.1-8B-shaped model beside `tyr plan`, and a balanced fitness call when 2+ GPUs are visible.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec timeout 600 "$PYTHON" -m benchmarks.gpu_smoke "$@"
