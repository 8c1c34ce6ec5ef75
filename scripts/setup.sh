#!/usr/bin/env bash
# Create .venv (or $PDL_VENV) and install pdlightning with its dev and eval extras.
# torch==2.13.0 first: a CPU build that pip takes from this machine's disk; a bare
# "torch" requirement would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${PDL_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install --quiet --disable-pip-version-check torch==2.13.0
"$VENV/bin/pip" install --quiet --disable-pip-version-check -e ".[dev,eval]"
echo "pdlightning installed in $VENV"
