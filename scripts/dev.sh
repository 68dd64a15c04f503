#!/usr/bin/env bash
# One-command set-up and the two jobs named in the README:
#   bash scripts/dev.sh main   set up, verify every available backend against the reference,
#                              then run the benchmark suite on the hardware present
#   bash scripts/dev.sh test   set up, then run the test suite (GPU tests skip without a GPU),
#                              then the op/compile/nn tests on torch 2.13 in .venv-torch2.13
#                              (scripts/test_torch_compat.sh; only without extra arguments,
#                              unless FAST_ATTN_TEST_COMPAT=1; FAST_ATTN_TEST_COMPAT=0 skips it)
# Set-up creates .venv (reusing a preinstalled torch when the system Python has one, as on
# a GPU machine without a package registry), installs what is missing, and installs
# fast_attn in editable mode, building the CUDA extension when torch has CUDA and nvcc exists.
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
shift || true
case "$job" in
  main|test) ;;
  *) echo "usage: bash scripts/dev.sh main|test [extra arguments]" >&2; exit 2 ;;
esac

TORCH_PIN="torch==2.14.1"  # CUDA 13.0 build: links the extension against the local nvcc 13.0
CUTLASS_PIN="nvidia-cutlass==4.2.0.0"  # CuTe headers for csrc/attention's sm_90a kernels
TRANSFORMERS_PIN="transformers==5.24.0"  # the version the integration tests were written against

setup() {
  if [ ! -x .venv/bin/python ]; then
    if python3 -c "import torch" >/dev/null 2>&1; then
      python3 -m venv --system-site-packages .venv
    else
      python3 -m venv .venv
    fi
  fi
  PY=.venv/bin/python
  if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    "$PY" -m pip install --quiet "$TORCH_PIN"
  fi
  local missing=()
  for module in numpy pytest ninja setuptools wheel; do
    "$PY" -c "import $module" >/dev/null 2>&1 || missing+=("$module")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    "$PY" -m pip install --quiet "${missing[@]}"
  fi
  # The Hugging Face integration's tests need transformers (the `hf` extra). Optional on a
  # machine without a package registry, where those tests then skip and say so.
  "$PY" -c "import transformers" >/dev/null 2>&1 || "$PY" -m pip install --quiet "$TRANSFORMERS_PIN" \
    || echo "dev.sh: transformers unavailable: the Hugging Face tests will be skipped"
  # The CuTe headers of the Hopper attention kernels (the nvidia-cutlass wheel, headers
  # only; its Python dependencies are not needed). Without it the sm_90a kernels are not
  # built and Hopper runs the sm_80 attention kernels.
  "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('cutlass_library') is None)" \
    || "$PY" -m pip install --quiet --no-deps "$CUTLASS_PIN" \
    || echo "dev.sh: nvidia-cutlass unavailable: the sm_90a attention kernels will not be built"
  local start=$SECONDS
  "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
  echo "dev.sh: fast_attn installed in $((SECONDS - start)) s"
}

setup
if [ "$job" = main ]; then
  # Plots and progress bars are optional: without a package registry the suite still runs.
  "$PY" -c "import matplotlib, tqdm" >/dev/null 2>&1 || "$PY" -m pip install --quiet matplotlib tqdm \
    || echo "dev.sh: matplotlib/tqdm unavailable: the report will have no plots"
  status=0
  "$PY" -m fast_attn.verify "$@" || status=$?
  "$PY" -m benchmarks "$@" || status=$?
  exit "$status"
else
  status=0
  "$PY" -m pytest -q "$@" || status=$?
  # The second torch (scripts/test_torch_compat.sh: torch 2.13.0 in .venv-torch2.13): with
  # the full suite (no extra arguments), or when FAST_ATTN_TEST_COMPAT=1; never when =0.
  compat="${FAST_ATTN_TEST_COMPAT:-auto}"
  if [ "$compat" = 1 ] || { [ "$compat" = auto ] && [ "$#" -eq 0 ]; }; then
    TRANSFORMERS_PIN="$TRANSFORMERS_PIN" bash scripts/test_torch_compat.sh || status=$?
  fi
  exit "$status"
fi
