#!/usr/bin/env bash
# Set up (scripts/setup.sh), then the main job on the embedded default: train the
# tiny planned-diffusion and autoregressive models and compare the decoders.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV="${PDL_VENV:-.venv}"
exec "$VENV/bin/pdlightning" demo "$@"
