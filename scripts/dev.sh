#!/usr/bin/env bash
# One-command set-up and the two jobs named in the README:
#   bash scripts/dev.sh main [options]   set up, verify every available backend against the
#                                        reference, then benchmark on the hardware present
#                                        (options: scripts/main_job.py --help)
#   bash scripts/dev.sh test [pytest arguments]
#                                        set up, then run the test suite (GPU tests skip
#                                        without a GPU), then the op/compile/nn tests on the
#                                        second torch (scripts/test_torch_compat.sh)
#
# Set-up (idempotent: a rerun with nothing changed takes seconds) creates .venv and puts in
# it what the jobs need:
# - torch: on a machine with a CUDA GPU, the system Python's torch when it has one (as on a
#   GPU machine without a package registry), else torch 2.14.1 (CUDA 13.0 build, about
#   5.5 GB); on a machine without a GPU, the CPU build of torch 2.13.0 (about 1 GB; pip takes
#   the file from this machine's disk, or the PyTorch CPU index elsewhere), unless
#   FAST_ATTN_BUILD_CUDA=1 asks for the CUDA extension, which needs the CUDA build.
# - Triton, numpy, pytest and ninja; where a registry has them (optional otherwise):
#   matplotlib and tqdm (plots, progress bars), transformers (the Hugging Face tests skip
#   without it) and, with a CUDA build of torch, the nvidia-cutlass headers (without them
#   the sm_90a attention kernels are not built).
# - fast_attn in editable mode, rebuilt only when setup.py, the build configuration, csrc/,
#   torch or FAST_ATTN_BUILD_CUDA changed (a stamp in .venv). The CUDA extension is built
#   where a GPU is present, or when FAST_ATTN_BUILD_CUDA=1 (CI sets it, so every submission
#   proves csrc/ compiles; 0 never builds it). Without it the cuda backend JIT-builds on first
#   use. Its object files stay in build/, so ninja recompiles only what changed; the build
#   prints one line per translation unit, and its full log goes to build/install.log.
set -euo pipefail
cd "$(dirname "$0")/.."

job="${1:-}"
shift || true
case "$job" in
  main|test) ;;
  *) echo "usage: bash scripts/dev.sh main|test [extra arguments]" >&2; exit 2 ;;
esac

TORCH_CUDA_PIN="torch==2.14.1"  # CUDA 13.0 build: links the extension against the local nvcc 13.0
TORCH_CPU_VERSION="2.13.0"      # the CPU build, for machines without a GPU
TRITON_FOR_CPU_TORCH="triton==3.7.1"  # torch 2.13.0's CPU wheel requires no Triton; its CUDA wheels pin 3.7.1
CUTLASS_PIN="nvidia-cutlass==4.2.0.0"  # CuTe headers for csrc/attention's sm_90a kernels
TRANSFORMERS_PIN="transformers==5.24.0"  # the version the integration tests were written against
STAMP=.venv/.fast_attn-install-stamp

say() { echo "dev.sh: $*"; }

gpu_present() {
  { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; } || [ -e /dev/nvidia0 ]
}

cuda_build_forced() {
  case "$(echo "${FAST_ATTN_BUILD_CUDA:-}" | tr '[:upper:]' '[:lower:]')" in
    1|true|yes|on) return 0 ;;
    *) return 1 ;;
  esac
}

pip_install() {  # pip_install WHAT ARGS...: quiet pip, with what it does and how long it took
  local what=$1 start=$SECONDS
  shift
  say "installing $what ..."
  # (This machine's pip configuration names index folders that may be missing: pip warns
  # once per package about each; those warnings are dropped, every other line is kept.)
  if "$PY" -m pip install --quiet "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }; then
    say "installed $what in $((SECONDS - start)) s"
  else
    say "could not install $what ($((SECONDS - start)) s)"
    return 1
  fi
}

install_torch() {
  if gpu_present || cuda_build_forced; then
    pip_install "torch (${TORCH_CUDA_PIN#torch==}, CUDA build, about 5.5 GB)" "$TORCH_CUDA_PIN"
    return
  fi
  # The CPU build: the local file where one lies on disk (pip's find-links), else the
  # PyTorch CPU index; only if neither answers, PyPI's default (CUDA) build.
  pip_install "torch $TORCH_CPU_VERSION (CPU build: no GPU here)" "torch==$TORCH_CPU_VERSION+cpu" \
    || pip_install "torch $TORCH_CPU_VERSION (CPU build, from download.pytorch.org)" \
         "torch==$TORCH_CPU_VERSION" --index-url https://download.pytorch.org/whl/cpu \
    || pip_install "torch (${TORCH_CUDA_PIN#torch==}: no CPU build reachable)" "$TORCH_CUDA_PIN"
}

torch_info() {  # "VERSION CUDA" of the .venv's torch (CUDA "None": a CPU build), read without importing it
  "$PY" - <<'EOF'
import importlib.util, pathlib, re
spec = importlib.util.find_spec("torch")
if spec is not None and spec.origin:
    text = (pathlib.Path(spec.origin).parent / "version.py").read_text()
    version = re.search(r"^__version__\s*=\s*'([^']+)'", text, re.M)
    cuda = re.search(r"^cuda\b[^=]*=\s*'?([^'\n]+)'?", text, re.M)
    print(version.group(1) if version else "?", cuda.group(1) if cuda else "None")
EOF
}

torch_has_cuda() { [ "$(torch_info | cut -d' ' -f2)" != None ]; }

missing_modules() {  # prints the pip names of the modules that are not importable
  "$PY" - "$@" <<'EOF'
import importlib.util, sys
for pair in sys.argv[1:]:
    module, _, requirement = pair.partition("=")
    if importlib.util.find_spec(module) is None:
        print(requirement or module)
EOF
}

install_stamp() {  # what the editable install depends on
  {
    echo "${FAST_ATTN_BUILD_CUDA:-auto} $(gpu_present && echo gpu || echo no-gpu)"
    "$PY" -c "import sys; print(sys.version)"
    torch_info
    cat setup.py pyproject.toml MANIFEST.in fast_attn/_build_config.py
    find csrc -type f | LC_ALL=C sort | xargs cat
  } | sha256sum | cut -c1-32
}

install_is_current() {
  [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$1" ] || return 1
  # The editable install points at this checkout (not another clone's).
  "$PY" -c "import importlib.util, os, sys
spec = importlib.util.find_spec('fast_attn')
sys.exit(spec is None or os.path.realpath(spec.origin) != os.path.realpath('fast_attn/__init__.py'))" \
    || return 1
  # A build that was asked for left its extension here.
  if cuda_build_forced || { gpu_present && torch_has_cuda; }; then
    compgen -G "fast_attn/_C*.so" >/dev/null || return 1
  fi
}

install_fast_attn() {
  local stamp start=$SECONDS
  stamp=$(install_stamp)
  if install_is_current "$stamp"; then
    say "fast_attn is installed and up to date (nothing changed since the last install)"
    return
  fi
  rm -f "$STAMP"
  mkdir -p build
  if cuda_build_forced || { gpu_present && torch_has_cuda; }; then
    say "installing fast_attn and building its CUDA extension (from scratch: about 7 min on 2 idle" \
        "cores, 20 on busy ones; after a change, only the changed files) ..."
  else
    say "installing fast_attn (without the CUDA extension: no GPU here) ..."
  fi
  # pip -v shows setup.py's own lines and ninja's: one line per translation unit, with the
  # time since the start; everything goes to build/install.log.
  if ! "$PY" -m pip install -v --no-deps --no-build-isolation -e . 2>&1 | tee build/install.log \
      | "$PY" -u scripts/build_progress.py; then
    say "the install failed; the end of build/install.log:"
    tail -n 40 build/install.log
    exit 1
  fi
  echo "$stamp" >"$STAMP"
  say "fast_attn installed in $((SECONDS - start)) s"
}

setup() {
  local start=$SECONDS
  if [ ! -x .venv/bin/python ]; then
    if gpu_present && python3 -c "import torch" >/dev/null 2>&1; then
      say "creating .venv on the system Python's torch"
      python3 -m venv --system-site-packages .venv
    else
      say "creating .venv"
      python3 -m venv .venv
    fi
  fi
  PY=.venv/bin/python
  if [ -z "$(torch_info)" ]; then
    install_torch
  elif cuda_build_forced && ! torch_has_cuda; then
    # FAST_ATTN_BUILD_CUDA=1 in a .venv made on a CPU-only machine: the extension needs CUDA headers.
    pip_install "torch (${TORCH_CUDA_PIN#torch==}, CUDA build: FAST_ATTN_BUILD_CUDA=1)" "$TORCH_CUDA_PIN"
  fi
  local triton=triton
  torch_has_cuda || triton="$TRITON_FOR_CPU_TORCH"
  local missing
  mapfile -t missing < <(missing_modules numpy pytest ninja setuptools wheel "triton=$triton")
  if [ "${#missing[@]}" -gt 0 ]; then
    pip_install "${missing[*]}" "${missing[@]}"
  fi
  # Optional, for a machine without a package registry: plots and progress bars (the
  # benchmarks and the training demo run without them), and transformers (the `hf` extra;
  # the Hugging Face tests then skip and say so).
  mapfile -t missing < <(missing_modules matplotlib tqdm)
  if [ "${#missing[@]}" -gt 0 ]; then
    pip_install "${missing[*]}" "${missing[@]}" || say "${missing[*]} unavailable: no plots or progress bars"
  fi
  if [ -n "$(missing_modules transformers)" ]; then
    pip_install "$TRANSFORMERS_PIN" "$TRANSFORMERS_PIN" \
      || say "transformers unavailable: the Hugging Face tests will be skipped"
  fi
  # The CuTe headers of the Hopper attention kernels (the nvidia-cutlass wheel, headers only;
  # its Python dependencies are not needed), for a CUDA build only. Without it the sm_90a
  # kernels are not built and Hopper runs the sm_80 attention kernels.
  if torch_has_cuda && [ -n "$(missing_modules cutlass_library)" ]; then
    pip_install "$CUTLASS_PIN" --no-deps "$CUTLASS_PIN" \
      || say "nvidia-cutlass unavailable: the sm_90a attention kernels will not be built"
  fi
  install_fast_attn
  say "set-up done in $((SECONDS - start)) s: torch $(torch_info | cut -d' ' -f1)," \
      "$(du -sh .venv 2>/dev/null | cut -f1) in .venv; activate it with: source .venv/bin/activate"
}

setup
if [ "$job" = main ]; then
  exec "$PY" scripts/main_job.py "$@"
fi
status=0
"$PY" -m pytest -q "$@" || status=$?
# The second torch (scripts/test_torch_compat.sh: torch 2.13.0 in .venv-torch2.13): with
# the full suite (no extra arguments), or when FAST_ATTN_TEST_COMPAT=1; never when =0. On a
# machine whose .venv already runs torch 2.13 (no GPU), the main suite was that run.
compat="${FAST_ATTN_TEST_COMPAT:-auto}"
if [ "$compat" = 1 ] || { [ "$compat" = auto ] && [ "$#" -eq 0 ]; }; then
  if [[ "$(torch_info)" == "$TORCH_CPU_VERSION"* ]]; then
    say "not running scripts/test_torch_compat.sh: .venv already runs torch $TORCH_CPU_VERSION" \
        "(CI tests torch ${TORCH_CUDA_PIN#torch==} and $TORCH_CPU_VERSION both)"
  else
    TRANSFORMERS_PIN="$TRANSFORMERS_PIN" bash scripts/test_torch_compat.sh || status=$?
  fi
fi
exit "$status"
