#!/usr/bin/env bash
# Install, lint, then run the tests against the package as users get it: a wheel built from
# this tree, installed into a fresh environment outside the checkout (scripts/wheel_env.sh),
# with the tests run from outside the checkout too, so nothing is imported from the source
# folders. Triton kernels run on CPU through the interpreter.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
bash scripts/setup_env.sh  # .venv: the editable development install (ruff, the demo)
.venv/bin/ruff check .
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
bash scripts/wheel_env.sh "$WORK/env" >/dev/null
cd "$WORK"
COST_FAST_CHECKOUT="$ROOT" TRITON_INTERPRET=1 "$WORK/env/venv/bin/python" -m pytest -q -p no:cacheprovider \
    --rootdir "$ROOT" -c "$ROOT/pyproject.toml" "$ROOT/tests" "$@"
