#!/usr/bin/env bash
# Everything that needs a GPU, in one go, writing what it printed under OUT:
#   tools/gpu_check.sh OUT
# For a machine with Python, a CUDA build of torch and no package registry: the
# project is installed against that torch (--no-build-isolation --no-deps, the
# extensions built there), then the CUDA tests and the GPU benchmarks run. Weights are
# generated in memory; nothing is packed to disk.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: tools/gpu_check.sh OUT}
mkdir -p "$OUT"
PY=${PY:-python3}
status=0
run() {   # name, command...: its output to OUT/name.txt and the screen
    local name=$1; shift
    echo "== $name: $*"
    "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -eq 0 ] || { echo "== $name failed: rc $rc"; status=1; }
}
run env $PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else '')"
run install env MOED_BUILD_JOBS=8 $PY -m pip install --no-build-isolation --no-deps -e .
run tests $PY -m pytest -q -rs tests/test_cuda.py tests/test_accel_device.py \
    tests/test_accel_streamed.py tests/test_accel_tiles.py tests/test_hybrid.py \
    tests/test_planner.py tests/test_dslp_engine.py
for bench in tools/bench_gpu*.py; do
    [ -e "$bench" ] && run "$(basename "$bench" .py)" $PY "$bench"
done
exit $status
