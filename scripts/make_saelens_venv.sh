#!/usr/bin/env bash
# Build the test-only SAELens virtual environment that tests/test_sae.py's file-format parity test
# (test_saelens_loads_our_files_and_we_load_its_files) runs bench/peers/sae_lens_parity.py in. sae-lens 6.x pulls
# transformer-lens 3.x, transformers 5.x, numpy 2.x, datasets, plotly, nltk and wandb, which clash with the peer
# venv's pins (transformers 4.57, numpy<2), so it lives apart from both the main venv and the peer venv.
#
#   bash scripts/make_saelens_venv.sh            # creates /work/main/.venv-saelens (or $SAELENS_VENV)
#   SAELENS_VENV=/tmp/saelens bash scripts/make_saelens_venv.sh
#
# Idempotent: a finished venv carries a stamp of the requirement set and is left alone. torch is pinned
# through a constraints file to the CPU build 2.13.0+cpu (the wheel on this machine's disk), so no dependency
# can swap it and pip can never fall back to PyPI's multi-GB CUDA build: without the local wheel the install
# fails instead. Override with SAELENS_TORCH_VERSION.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SAELENS_VENV="${SAELENS_VENV:-$ROOT/.venv-saelens}"
PYTHON="${SAELENS_VENV_PYTHON:-python3.11}"
TORCH_VERSION="${SAELENS_TORCH_VERSION:-2.13.0+cpu}"

REQS=(
  "torch==${TORCH_VERSION}"
  "sae-lens==6.54.12"
  "safetensors"
)
check_imports() {
  "$SAELENS_VENV/bin/python" - <<'PY'
import torch, safetensors, sae_lens  # noqa: F401
from sae_lens import SAE, JumpReLUSAE, StandardSAE, TopKSAE  # noqa: F401  (what bench/peers/sae_lens_parity.py uses)
print(f"saelens venv ok: torch {torch.__version__}, sae-lens {sae_lens.__version__}")
PY
}

# shellcheck source=scripts/pinned_venv.sh
. "$ROOT/scripts/pinned_venv.sh"
pinned_venv saelens "$SAELENS_VENV" "$PYTHON" "$TORCH_VERSION" "SAELENS_VENV_PYTHON SAELENS_TORCH_VERSION" "" \
  "${REQS[@]}"
