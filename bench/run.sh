#!/usr/bin/env bash
# Run every benchmark suite on this machine (CUDA if present) into bench/results/ (JSON, PNG, summary).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
"${PY:-.venv/bin/python}" -m cost_fast.apps.cli bench --out bench/results "$@"
