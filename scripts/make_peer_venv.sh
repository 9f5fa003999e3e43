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
STAMP_TEXT="$(printf '%s\n' "${REQS[@]}")"
STAMP="$PEER_VENV/.steerscale-peers-complete"

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

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] && OK_LINE="$(check_imports 2>/dev/null)"; then
  echo "peer venv already complete: $PEER_VENV"
  echo "$OK_LINE"
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found (the peer venv needs Python 3.11; set PEER_PYTHON to another interpreter)" >&2
  exit 1
fi

echo "creating peer venv at $PEER_VENV"
[[ -x "$PEER_VENV/bin/python" ]] || "$PYTHON" -m venv "$PEER_VENV"
rm -f "$STAMP"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# Keep any machine-wide constraints (e.g. a local wheel cap) and add ours on top.
if [[ -n "${PIP_CONSTRAINT:-}" && -f "${PIP_CONSTRAINT}" ]]; then cat "$PIP_CONSTRAINT" >>"$CONSTRAINTS"; fi
printf 'torch==%s\nnumpy<2\ntransformers==4.57.*\n' "$TORCH_VERSION" >>"$CONSTRAINTS"

PIP=("$PEER_VENV/bin/python" -m pip --disable-pip-version-check)
# torch first and alone, from the local CPU wheel; no extra index is added.
quiet() { { grep -v "Location 'file:.*is ignored" || true; } }  # drop pip's noise about empty local indexes
if ! "${PIP[@]}" install -q -c "$CONSTRAINTS" "torch==${TORCH_VERSION}" 2>&1 | quiet; then
  echo "error: could not install torch==${TORCH_VERSION} (expected the CPU wheel in pip's find-links, e.g. /opt/wheels);" >&2
  echo "       set PEER_TORCH_VERSION to a torch build available here" >&2
  exit 1
fi
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${REQS[@]}" 2>&1 | quiet

# Fail loudly if anything replaced the CPU build with a CUDA one.
"$PEER_VENV/bin/python" - <<PY
import torch
v = torch.__version__
assert v == "${TORCH_VERSION}" or v.split("+")[0] == "${TORCH_VERSION}", f"torch was changed to {v}"
assert torch.version.cuda is None or v.endswith("+cpu"), f"a CUDA torch was installed ({v}); remove $PEER_VENV and rerun"
PY

check_imports
printf '%s' "$STAMP_TEXT" >"$STAMP"
echo "peer venv ready: $PEER_VENV"
