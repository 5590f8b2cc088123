#!/usr/bin/env bash
# One run on a lent CUDA machine (see README "GPU checks"): install the checkout, run the test
# suite on CUDA, the two GPU measurement scripts of ../shared/gpu (copied into the git-ignored
# .gpu/ and carried), then the benchmark suites. Every step has its own time limit, so that one
# that hangs leaves the others' results; everything lands under $OUT (at most 8 files come back,
# so the benchmark folders are packed into one archive).
set -uo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python3}
step() { echo "== $* ($(date +%T))"; }

step install
$PY -m pip install -q --no-deps --no-build-isolation -e . >/tmp/install.log 2>&1 || { tail -20 /tmp/install.log; exit 1; }
{
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv 2>/dev/null
    $PY -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no cuda')"
} | tee "$OUT/device.txt"

step tests
# -v (no -q) so that each test is named as it ends: a run cut off by its time limit still
# says which failed; --timeout (pytest-timeout, on the device image) names a test that hangs.
# shellcheck disable=SC2086  # TEST_ARGS is a list of arguments
timeout "${TESTS_S:-150}" $PY -m pytest -p no:cacheprovider ${TEST_ARGS:--n 15 -v --timeout 120 --tb=short --durations=20 tests} >"$OUT/tests.log" 2>&1
echo "tests exit $?"; grep -E " (passed|failed)" "$OUT/tests.log" | tail -3
grep -E "(FAILED|ERROR) tests/" "$OUT/tests.log" | sed 's/^\[gw[0-9]*\] \[ *[0-9]*%\] //' | sort -u | head -40

if [ -d .gpu ] && [ -z "${TESTS_ONLY:-}" ]; then
    step gram_roofline
    timeout "${ROOFLINE_S:-100}" $PY .gpu/gram_roofline.py "$OUT" >"$OUT/roofline.log" 2>&1
    echo "roofline exit $?"; tail -25 "$OUT/roofline.log"
    step pertask
    timeout "${PERTASK_S:-60}" $PY .gpu/pertask.py "$OUT" >"$OUT/pertask.log" 2>&1
    echo "pertask exit $?"; tail -12 "$OUT/pertask.log"
fi

[ -n "${TESTS_ONLY:-}" ] && exit 0
BENCH=$(mktemp -d)
# suite:seconds; the solvers are K x K float64 work on the CPU, left out here
for entry in ${SUITES:-gram:45 grads:45 teleport:60 launches:60 epoch:70}; do
    suite=${entry%%:*}
    step "bench $suite"
    timeout "${entry##*:}" $PY -m cost_fast.apps.cli bench --out "$BENCH/$suite" --suites "$suite" \
        >"$BENCH/$suite.log" 2>&1
    echo "bench $suite exit $?"; tail -4 "$BENCH/$suite.log"
    tar czf "$OUT/bench.tgz" -C "$BENCH" .
done
step done
