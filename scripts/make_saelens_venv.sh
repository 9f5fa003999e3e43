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
STAMP_TEXT="$(printf '%s\n' "${REQS[@]}")"
STAMP="$SAELENS_VENV/.steerscale-saelens-complete"

check_imports() {
  "$SAELENS_VENV/bin/python" - <<'PY'
import torch, safetensors, sae_lens  # noqa: F401
from sae_lens import SAE, JumpReLUSAE, StandardSAE, TopKSAE  # noqa: F401  (what bench/peers/sae_lens_parity.py uses)
print(f"saelens venv ok: torch {torch.__version__}, sae-lens {sae_lens.__version__}")
PY
}

if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]] && OK_LINE="$(check_imports 2>/dev/null)"; then
  echo "saelens venv already complete: $SAELENS_VENV"
  echo "$OK_LINE"
  exit 0
fi

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  echo "error: $PYTHON not found (the saelens venv needs Python 3.11; set SAELENS_VENV_PYTHON to another interpreter)" >&2
  exit 1
fi

echo "creating saelens venv at $SAELENS_VENV"
[[ -x "$SAELENS_VENV/bin/python" ]] || "$PYTHON" -m venv "$SAELENS_VENV"
rm -f "$STAMP"

CONSTRAINTS="$(mktemp)"
trap 'rm -f "$CONSTRAINTS"' EXIT
# Keep any machine-wide constraints (e.g. a local wheel cap) and add ours on top.
if [[ -n "${PIP_CONSTRAINT:-}" && -f "${PIP_CONSTRAINT}" ]]; then cat "$PIP_CONSTRAINT" >>"$CONSTRAINTS"; fi
printf 'torch==%s\n' "$TORCH_VERSION" >>"$CONSTRAINTS"

PIP=("$SAELENS_VENV/bin/python" -m pip --disable-pip-version-check)
# torch first and alone, from the local CPU wheel; no extra index is added.
quiet() { { grep -v "Location 'file:.*is ignored" || true; } }  # drop pip's noise about empty local indexes
if ! "${PIP[@]}" install -q -c "$CONSTRAINTS" "torch==${TORCH_VERSION}" 2>&1 | quiet; then
  echo "error: could not install torch==${TORCH_VERSION} (expected the CPU wheel in pip's find-links, e.g. /opt/wheels);" >&2
  echo "       set SAELENS_TORCH_VERSION to a torch build available here" >&2
  exit 1
fi
"${PIP[@]}" install -q -c "$CONSTRAINTS" "${REQS[@]}" 2>&1 | quiet

# Fail loudly if anything replaced the CPU build with a CUDA one.
"$SAELENS_VENV/bin/python" - <<PY
import torch
v = torch.__version__
assert v == "${TORCH_VERSION}" or v.split("+")[0] == "${TORCH_VERSION}", f"torch was changed to {v}"
assert torch.version.cuda is None or v.endswith("+cpu"), f"a CUDA torch was installed ({v}); remove $SAELENS_VENV and rerun"
PY

check_imports
printf '%s' "$STAMP_TEXT" >"$STAMP"
echo "saelens venv ready: $SAELENS_VENV"
