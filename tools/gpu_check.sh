#!/usr/bin/env bash
# Everything that needs a GPU, in one go: the CUDA tests, then the GPU-side benchmarks.
# Run on a machine with CUDA after `make setup` (or let it set up a venv with the CUDA torch).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
$PY -m pytest -q -rs tests/test_cuda.py
status=$?
for bench in tools/bench_gpu*.py; do
    [ -e "$bench" ] && $PY "$bench"
done
exit $status
