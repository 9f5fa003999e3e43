# Sourced by scripts/make_peer_venv.sh and scripts/make_saelens_venv.sh: build a side venv for tests/benches whose
# torch is pinned, through a constraints file, to the CPU build on this machine's disk (so no dependency can swap
# it, and pip can never fall back to PyPI's multi-GB CUDA build: without the local wheel the install fails instead).
#
#   pinned_venv NAME VENV PYTHON TORCH_VERSION OVERRIDE_VARS EXTRA_PINS REQUIREMENT...
#
# NAME: for messages and the stamp file; OVERRIDE_VARS: "PYTHON_VAR TORCH_VAR", the variables a user sets to pick
# another interpreter / torch build (named in errors); EXTRA_PINS: more constraint lines ("" for none). The caller
# defines check_imports (prints one "ok" line, fails when the venv is incomplete). Idempotent: a finished venv
# carries a stamp of the requirement set and is left alone.

pinned_venv() {
  local name="$1" venv="$2" python="$3" torch_version="$4" overrides="$5" extra_pins="$6"
  shift 6
  local reqs=("$@") stamp_text stamp ok_line constraints
  local python_var="${overrides%% *}" torch_var="${overrides##* }"
  stamp_text="$(printf '%s\n' "${reqs[@]}")"
  stamp="$venv/.steerscale-$name-complete"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_text" ]] && ok_line="$(check_imports 2>/dev/null)"; then
    echo "$name venv already complete: $venv"
    echo "$ok_line"
    return 0
  fi
  if ! command -v "$python" >/dev/null 2>&1; then
    echo "error: $python not found (the $name venv needs Python 3.11; set $python_var to another interpreter)" >&2
    return 1
  fi
  echo "creating $name venv at $venv"
  [[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
  rm -f "$stamp"

  constraints="$(mktemp)"
  # Keep any machine-wide constraints (e.g. a local wheel cap) and add ours on top.
  if [[ -n "${PIP_CONSTRAINT:-}" && -f "${PIP_CONSTRAINT}" ]]; then cat "$PIP_CONSTRAINT" >>"$constraints"; fi
  printf 'torch==%s\n' "$torch_version" >>"$constraints"
  [[ -z "$extra_pins" ]] || printf '%s\n' "$extra_pins" >>"$constraints"

  local pip=("$venv/bin/python" -m pip --disable-pip-version-check)
  quiet() { { grep -v "Location 'file:.*is ignored" || true; } }  # drop pip's noise about empty local indexes
  # torch first and alone, from the local CPU wheel; no extra index is added.
  if ! "${pip[@]}" install -q -c "$constraints" "torch==${torch_version}" 2>&1 | quiet; then
    echo "error: could not install torch==${torch_version} (expected the CPU wheel in pip's find-links, e.g. /opt/wheels);" >&2
    echo "       set $torch_var to a torch build available here" >&2
    rm -f "$constraints"
    return 1
  fi
  "${pip[@]}" install -q -c "$constraints" "${reqs[@]}" 2>&1 | quiet
  rm -f "$constraints"

  # Fail loudly if anything replaced the CPU build with a CUDA one.
  "$venv/bin/python" - <<PY
import torch
v = torch.__version__
assert v == "${torch_version}" or v.split("+")[0] == "${torch_version}", f"torch was changed to {v}"
assert torch.version.cuda is None or v.endswith("+cpu"), f"a CUDA torch was installed ({v}); remove $venv and rerun"
PY

  check_imports
  printf '%s' "$stamp_text" >"$stamp"
  echo "$name venv ready: $venv"
}
