#!/usr/bin/env bash
# The main job: install, then a small demo training run on CPU. Extra arguments go to `cost-fast demo`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup_env.sh
.venv/bin/cost-fast demo "$@"
