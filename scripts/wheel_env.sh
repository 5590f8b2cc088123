#!/usr/bin/env bash
# Build cost_fast's wheel from the working tree and install it, as a user gets it, into a fresh
# virtual environment outside the checkout: bash scripts/wheel_env.sh DIR (DIR must not exist).
# The wheel is built from a copy of the tracked and untracked-but-not-ignored files, so a stale
# build/ folder can never put a deleted module into it.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${1:?usage: wheel_env.sh DIR}"
PYTHON=${PYTHON:-python3}
if [ -e "$DIR" ]; then echo "wheel_env.sh: $DIR exists; give a new folder" >&2; exit 2; fi
mkdir -p "$DIR/src" "$DIR/dist"
(cd "$ROOT" && git ls-files -co --exclude-standard -z | xargs -0 -I{} cp --parents {} "$DIR/src/")
"$PYTHON" -m venv "$DIR/venv"
"$DIR/venv/bin/python" -m pip install --quiet --upgrade pip
"$DIR/venv/bin/python" -m pip wheel --quiet --no-deps -w "$DIR/dist" "$DIR/src"
WHEEL=$(ls "$DIR"/dist/cost_fast-*.whl)
"$DIR/venv/bin/python" -m pip install --quiet torch==2.13.0 "${WHEEL}[dev,demo,lightning,experiments]"
echo "$DIR/venv"
