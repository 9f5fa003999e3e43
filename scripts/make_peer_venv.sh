#!/usr/bin/env bash
# Build the bench/test-only "peer" virtual environment with the reference steering libraries
# (repeng, steering-vectors) that bench/extract_speed.py, bench/steer_overhead.py and tests/test_parity.py
# compare against. They need transformers 4.x and numpy 1.x, so they live apart from the main venv.
#
#   bash scripts/make_peer_venv.sh            # creates /work/main/.venv-peers (or $PEER_VENV)
#   PEER_VENV=/tmp/peers bash scripts/make_peer_venv.sh
#
# Idempotent: a finished venv carries a stamp of the requirement set and is left alone. torch is pinned
# through a constraints file to the CPU build 2.13.0+cpu (the wheel on this machine's disk), so neither
# repeng's nor steering-vectors' dependencies can swap it, and pip can never fall back to PyPI's multi-GB CUDA
# build of 2.13.0: without the local wheel the install fails instead. Override with PEER_TORCH_VERSION.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PEER_VENV="${PEER_VENV:-$ROOT/.venv-peers}"
PYTHON="${PEER_PYTHON:-python3.11}"
TORCH_VERSION="${PEER_TORCH_VERSION:-2.13.0+cpu}"

REQS=(
  "torch==${TORCH_VERSION}"
  "transformers==4.57.*"
  "numpy<2"
  "repeng==0.4.0"
  "steering-vectors==0.12.*"
  "safetensors"
  "gguf"
  "accelerate"
)
check_imports() {
  "$PEER_VENV/bin/python" - <<'PY'
import numpy, torch, transformers, repeng, steering_vectors, safetensors  # noqa: F401
from importlib.metadata import version
assert transformers.__version__.startswith("4.57"), transformers.__version__
assert numpy.__version__.startswith("1."), numpy.__version__
print(f"peer venv ok: torch {torch.__version__}, transformers {transformers.__version__}, numpy {numpy.__version__}, "
      f"repeng {version('repeng')}, steering-vectors {version('steering-vectors')}")
PY
}

# shellcheck source=scripts/pinned_venv.sh
. "$ROOT/scripts/pinned_venv.sh"
pinned_venv peers "$PEER_VENV" "$PYTHON" "$TORCH_VERSION" "PEER_PYTHON PEER_TORCH_VERSION" \
  "$(printf 'numpy<2\ntransformers==4.57.*')" "${REQS[@]}"
