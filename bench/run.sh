#!/usr/bin/env bash
# Run the microbenchmarks on this machine (CUDA if present) and write JSON + PNG to bench/results/.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
tag=$($PY -c "import torch; print('cuda' if torch.cuda.is_available() else 'cpu')")
for name in gram grads solvers teleport epoch; do
  $PY -m pytest "bench/test_bench_${name}.py" -q -p no:cacheprovider \
    --benchmark-json="bench/results/${name}_${tag}.json" --benchmark-columns=median,iqr,rounds
done
$PY -m bench.report "bench/results/gram_${tag}.json" "bench/results/grads_${tag}.json" "bench/results/solvers_${tag}.json" "bench/results/teleport_${tag}.json" "bench/results/epoch_${tag}.json"
