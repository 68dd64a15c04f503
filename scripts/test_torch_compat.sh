#!/usr/bin/env bash
# The tests on the second torch that CI runs: the op, torch.compile, nn and integration
# tests on torch 2.13.0 (CPU build), in their own virtual environment .venv-torch2.13, so
# that every torch release setup.py declares is tested (2.14 is the main .venv of
# `bash scripts/dev.sh test`, 2.11 the GPU machine's, recorded by scripts/gpu_session.sh).
# `bash scripts/dev.sh test` runs this after the main suite; on its own:
#
#   bash scripts/test_torch_compat.sh [pytest arguments, default: the selection below]
#
# Set-up, idempotent (a present venv with the right versions is reused; about 2.5 min when
# new): torch 2.13.0 (on the CI machine pip takes the CPU wheel that lies on its disk; on
# another Linux machine PyPI's CUDA build), the Triton release torch 2.13.0's Linux wheels
# require (the CPU wheel requires none; the Triton-interpreter tests need it), numpy,
# pytest, transformers, and fast_attn in editable mode without the CUDA extension
# (FAST_ATTN_BUILD_CUDA=0: it would be built against this torch, in the checkout, where
# the main .venv's build lives).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv-torch2.13
TORCH_VERSION=2.13.0
TRITON_VERSION=3.7.1  # what torch 2.13.0's Linux (CUDA) wheels pin: triton==3.7.1
TRANSFORMERS_PIN="${TRANSFORMERS_PIN:-transformers==5.24.0}"  # scripts/dev.sh passes its own

# The selection: every op test (the custom ops, the torch backend's ATen paths, the Triton
# kernels under the interpreter), nn, the integrations, the backend choice, and every test
# that calls torch.compile (tests/ops/test_custom_ops.py, tests/integrations/test_huggingface.py).
TESTS=(
  tests/ops
  tests/torch_backend
  tests/nn
  tests/integrations/test_sdpa.py
  tests/integrations/test_flash_attn_api.py
  tests/integrations/test_huggingface.py
  tests/test_backends.py
)

PY=$VENV/bin/python
[ -x "$PY" ] || python3 -m venv "$VENV"

# has DIST VERSION: the distribution is installed at VERSION (a local label like +cpu aside).
has() {
  "$PY" -c "import importlib.metadata as m, sys; sys.exit(m.version('$1').split('+')[0] != '$2')" \
    >/dev/null 2>&1
}
start=$SECONDS
has torch "$TORCH_VERSION" || "$PY" -m pip install --quiet "torch==$TORCH_VERSION"
has triton "$TRITON_VERSION" || "$PY" -m pip install --quiet "triton==$TRITON_VERSION"
missing=()
for module in numpy pytest setuptools wheel; do
  "$PY" -c "import $module" >/dev/null 2>&1 || missing+=("$module")
done
if [ "${#missing[@]}" -gt 0 ]; then
  "$PY" -m pip install --quiet "${missing[@]}"
fi
"$PY" -c "import transformers" >/dev/null 2>&1 || "$PY" -m pip install --quiet "$TRANSFORMERS_PIN" \
  || echo "test_torch_compat.sh: transformers unavailable: the Hugging Face tests will be skipped"
FAST_ATTN_BUILD_CUDA=0 "$PY" -m pip install --quiet --no-deps --no-build-isolation -e .
"$PY" -c "import sys, torch, triton; print(f'test_torch_compat.sh: {sys.argv[1]} ready in {sys.argv[2]} s: torch {torch.__version__}, triton {triton.__version__}')" \
  "$VENV" "$((SECONDS - start))"

if [ "$#" -eq 0 ]; then
  for path in "${TESTS[@]}"; do
    [ -e "$path" ] || { echo "test_torch_compat.sh: $path is gone: update TESTS in $0" >&2; exit 2; }
  done
  set -- "${TESTS[@]}"
fi
exec "$PY" -m pytest -q "$@"
