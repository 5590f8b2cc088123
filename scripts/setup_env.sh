#!/usr/bin/env bash
# Create .venv (if missing) and install cost_fast with its dev tools into it.
# torch is pinned to the 2.13.0 CPU build (a wheel of it is on the project's machines);
# a user with a CUDA torch already installed can simply `pip install -e .` instead.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet torch==2.13.0 -e '.[dev,demo,lightning,experiments]'
