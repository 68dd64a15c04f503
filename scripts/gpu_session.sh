#!/usr/bin/env bash
# The one script a GPU session runs on the H100 test machine (a copy of the repository,
# a preinstalled torch, no package registry):
#   1. install fast_attn in editable mode, building the CUDA extension (MAX_JOBS=16);
#   2. the GPU tests:        python3 -m pytest -m gpu;
#   3. every kernel against the reference:  python3 -m fast_attn.verify;
#   4. the benchmark suite:  python3 -m benchmarks --out $OUT/bench;
#   5. a summary table.
# Every step runs even when an earlier one failed; the exit status is 1 if any failed.
#
#   bash scripts/gpu_session.sh [quick|full|tests|sanitize] [budget_s]
#
# tests: install, then only the GPU tests, with the whole budget (there are ~2500 of
# them, more than the 150 s the quick/full modes give them). sanitize: install, then
# scripts/sanitize.sh. A session runs `tests` and `sanitize` in their own calls (the
# machine stays warm between calls, so the second install only re-links).
#
# quick (default): verify --quick and benchmarks --quick. full: the full verify and the
# full protocol. budget_s (default 570) is the wall-clock budget of the whole script: the
# device machine runs a command for 10 minutes at most. Each step has a time limit within
# it, and the suite is told (--budget-s) to start no case once its share is spent, so it
# always writes its files; a full run that does not fit records the rest as skipped.
#
# Output in $OUT (default ./gpu_session_out), eight files, what the device returns:
#   install.log tests.log verify.log bench.log
#   bench/results.json bench/results.csv bench/report.md
#   bench.tar.gz   (the whole results folder, plots included)
#
# The device machine has no package registry: the CuTe headers of the Hopper attention
# kernels come from the nvidia-cutlass wheel, which the session carries in .wheels/
# (fetch it here first: pip download --no-deps nvidia-cutlass==4.2.0.0 -d .wheels, then
# pass carry=[".wheels"]). Without it the extension builds without the sm_90a kernels.
set -uo pipefail
cd "$(dirname "$0")/.."

mode="${1:-quick}"
budget_s="${2:-570}"
case "$mode" in
  quick|full|tests|sanitize) ;;
  *) echo "usage: bash scripts/gpu_session.sh [quick|full|tests|sanitize] [budget_s]" >&2; exit 2 ;;
esac
OUT="${OUT:-$PWD/gpu_session_out}"
mkdir -p "$OUT"
PY=python3
quick_flag=()
[ "$mode" = quick ] && quick_flag=(--quick)

# Step limits in seconds (capped by what is left of the budget). The install builds the
# CUDA extension; the suite gets whatever is left after the other steps.
INSTALL_LIMIT_S=240
TESTS_LIMIT_S=150
VERIFY_LIMIT_S=$([ "$mode" = quick ] && echo 90 || echo 300)
PACKING_RESERVE_S=15   # tar and the summary at the end
KILL_GRACE_S=15        # after SIGTERM, a step has this long to write its files
deadline=$((SECONDS + budget_s))

names=(); results=(); durations=()
failed=0

left() { echo $((deadline - SECONDS - PACKING_RESERVE_S)); }

# step NAME LIMIT_S LOG COMMAND...: run with a time limit, log to $OUT/LOG, record the result.
step() {
  local name=$1 limit=$2 log=$OUT/$3
  shift 3
  local remaining
  remaining=$(left)
  [ "$limit" -gt "$remaining" ] && limit=$remaining
  if [ "$limit" -le 0 ]; then
    echo "== $name: not run, the time budget is spent" | tee "$log"
    names+=("$name"); results+=("NOT RUN (budget)"); durations+=(0); failed=1
    return
  fi
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS rc
  timeout --signal=TERM --kill-after="$KILL_GRACE_S" "$limit" "$@" >"$log" 2>&1
  rc=$?
  local result=ok
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    result="TIMEOUT (${limit}s)"
  elif [ "$rc" -ne 0 ]; then
    result="FAILED (exit $rc)"
  fi
  [ "$result" != ok ] && failed=1
  names+=("$name"); results+=("$result"); durations+=($((SECONDS - start)))
  tail -n 4 "$log" | sed 's/^/   | /'
}

install() {
  if compgen -G ".wheels/nvidia_cutlass-*.whl" >/dev/null; then
    "$PY" -m pip install --no-deps --no-index .wheels/nvidia_cutlass-*.whl || return
  fi
  "$PY" -m pip install --no-deps --no-build-isolation -e .
}
export -f install
step install "$INSTALL_LIMIT_S" install.log \
  env MAX_JOBS=16 PIP_BREAK_SYSTEM_PACKAGES=1 PY="$PY" bash -c install
# The versions this session tested (setup.py declares only tested torch versions): at the
# end of install.log and in the summary.
versions=$(timeout 120 "$PY" -c '
import sys, torch
try:
    import triton; tv = triton.__version__
except Exception as exc:
    tv = f"none ({type(exc).__name__})"
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
print(f"versions: torch {torch.__version__} (CUDA {torch.version.cuda}), triton {tv}, "
      f"python {sys.version.split()[0]}, GPU {gpu}")' 2>&1 | tail -n 1)
echo "$versions" | tee -a "$OUT/install.log"
if [ "$mode" = tests ]; then
  step tests "$(left)" tests.log "$PY" -m pytest -m gpu -q -rf
elif [ "$mode" = sanitize ]; then
  step sanitize "$(left)" sanitize.log env OUT="$OUT/sanitize" SANITIZE_BUDGET_S="$(($(left) - 10))" \
    bash scripts/sanitize.sh
  tar -czf "$OUT/sanitize.tar.gz" -C "$OUT" sanitize 2>/dev/null && rm -rf "$OUT/sanitize"
fi
if [ "$mode" = tests ] || [ "$mode" = sanitize ]; then
  echo "== summary ($mode, $((SECONDS)) s of a ${budget_s} s budget)"
  echo "$versions"
  for i in "${!names[@]}"; do printf '%-12s %-22s %s\n' "${names[$i]}" "${results[$i]}" "${durations[$i]}"; done
  tail -n 3 "$OUT/$mode.log"
  exit "$failed"
fi
step tests "$TESTS_LIMIT_S" tests.log "$PY" -m pytest -m gpu -q
step verify "$VERIFY_LIMIT_S" verify.log "$PY" -m fast_attn.verify "${quick_flag[@]}"
# The suite stops starting cases a little before its limit, so it finishes and writes
# its files instead of being stopped.
BENCH_FINISH_S=45      # the suite's last case, the report and the plots, after its budget
bench_limit=$(left)
bench_budget=$((bench_limit > 2 * BENCH_FINISH_S ? bench_limit - BENCH_FINISH_S : bench_limit / 2))
step benchmarks "$bench_limit" bench.log \
  "$PY" -m benchmarks "${quick_flag[@]}" --out "$OUT/bench" --budget-s "$bench_budget"

# Pack everything (plots included) into one file, then drop the plots from $OUT/bench so
# that $OUT holds eight files, as many as the device machine returns.
if [ -d "$OUT/bench" ]; then
  tar -czf "$OUT/bench.tar.gz" -C "$OUT" bench && rm -rf "$OUT/bench/plots"
fi

echo
echo "== summary ($mode, $((SECONDS)) s of a ${budget_s} s budget)"
echo "$versions"
printf '%-12s %-22s %s\n' step result seconds
for i in "${!names[@]}"; do
  printf '%-12s %-22s %s\n' "${names[$i]}" "${results[$i]}" "${durations[$i]}"
done
echo "-- tests:  $(tail -n 1 "$OUT/tests.log" 2>/dev/null)"
echo "-- verify: $(grep -E 'cells, [0-9]+ failure' "$OUT/verify.log" 2>/dev/null | tail -n 1)"
if [ -f "$OUT/bench.log" ]; then
  sed -n '/^== ours against the best peer/,/^NOTE\|^$/p' "$OUT/bench.log"
  grep -E '^[0-9]+ rows:' "$OUT/bench.log"
fi
exit "$failed"
