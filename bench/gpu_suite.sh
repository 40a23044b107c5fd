#!/usr/bin/env bash
# The GPU check (bench/gpu_suite.py says what it runs): one summary, $OUT/gpu_suite.tsv, and every step's output in
# $OUT/gpu_suite.log; without OUT set they go to results/gpu_suite/ (or to --out DIR). Installs nothing.
#   bench/gpu_suite.sh                          # on a CUDA machine: full sizes, <= 12 min
#   bench/gpu_suite.sh --steps env,student_speed   # a subset (e.g. to fit a 10-minute call), see --help
#   bench/gpu_suite.sh --device cpu --quick     # the same steps on tiny shapes (tests/test_gpu_suite.py)
# PYTHON picks the interpreter: by default the project's .venv when there is one, else python3, e.g. on a GPU
# machine whose packages come from PYTHONPATH=/tmp/site (README, "GPU check"). The repository is put on PYTHONPATH.
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$repo"
exec "$PYTHON" "$repo/bench/gpu_suite.py" --out "${OUT:-$repo/results/gpu_suite}" "$@"
