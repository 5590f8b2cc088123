#!/usr/bin/env bash
# Install, lint, and run the tests; Triton kernels run on CPU through the interpreter.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/ruff check .
TRITON_INTERPRET=1 .venv/bin/python -m pytest -q tests "$@"
