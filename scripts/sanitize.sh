#!/usr/bin/env bash
# compute-sanitizer over fast_attn's CUDA kernels: attention (dense, varlen, kv-cache
# split-KV; the sm_80 kernels and the default "auto" choice, i.e. the sm_90a forward on
# an H100), LayerNorm/RMSNorm, GLU and bias+GELU, forward and backward, on the small
# shapes of scripts/sanitize_cases.py. On the GPU machine, after the extension is built
# (pip install --no-build-isolation -e .):
#
#   bash scripts/sanitize.sh [tool ...]        default: memcheck racecheck synccheck initcheck
#
# Per tool (driver size in brackets):
#   memcheck  [small]  out-of-bounds and misaligned global/shared accesses, launch errors
#   racecheck [tiny]   shared-memory data hazards (slowest: tiny grids only)
#   synccheck [tiny]   invalid __syncthreads / barrier use (divergent barriers)
#   initcheck [small]  reads of uninitialised global memory; the driver reads every
#                      output once, so an output element no kernel wrote is reported too
# Every run sets PYTORCH_NO_CUDA_MEMORY_CACHING=1: each tensor is its own cudaMalloc, so
# memcheck sees an overrun past a tensor's end and initcheck sees memory never written
# (the caching allocator would hide both inside its pooled blocks).
#
# Environment:
#   OUT                  log folder (default ./sanitize_out): <tool>.log, preflight.log
#   PYTHON               interpreter (default python3)
#   SANITIZER            compute-sanitizer binary (default: PATH, then $CUDA_HOME, /usr/local/cuda*)
#   SANITIZE_GROUPS      driver groups (default all: attention,varlen,kvcache,norm,glu,bias_gelu)
#   SANITIZE_ARCHS       attention kernel families (default sm80,auto)
#   SANITIZE_BUDGET_S    wall-clock budget of the whole script (default 240); a tool whose
#                        turn comes when its limit no longer fits runs with what is left,
#                        or is reported NOT RUN
#   SANITIZER_ARGS       extra compute-sanitizer arguments (e.g. "--report-api-errors no"
#                        if torch's own benign API errors show up in memcheck)
#
# Prints one line per tool: its error count (racecheck also its warnings), exit status
# and time. Exits 0 when every tool ran and reported 0 errors, 1 otherwise, 2 when the
# sanitizer or the extension is missing (nothing sanitized).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT="${OUT:-$PWD/sanitize_out}"
PYTHON="${PYTHON:-python3}"
GROUPS_ARG="${SANITIZE_GROUPS:-all}"
ARCHS_ARG="${SANITIZE_ARCHS:-sm80,auto}"
BUDGET_S="${SANITIZE_BUDGET_S:-240}"
read -r -a EXTRA_ARGS <<< "${SANITIZER_ARGS:-}"
DRIVER=scripts/sanitize_cases.py
PRINT_LIMIT=20          # errors printed per run (the summary still counts them all)
KILL_GRACE_S=10         # after SIGTERM, a run has this long to flush its log
# Per-tool time limits in seconds on an H100 (unmeasured: the GPU session must time them).
declare -A LIMIT_S=([memcheck]=80 [racecheck]=70 [synccheck]=40 [initcheck]=60)
declare -A SIZE=([memcheck]=small [racecheck]=tiny [synccheck]=tiny [initcheck]=small)

tools=("$@")
[ ${#tools[@]} -eq 0 ] && tools=(memcheck racecheck synccheck initcheck)
for tool in "${tools[@]}"; do
  if [ -z "${LIMIT_S[$tool]+set}" ]; then
    echo "usage: bash scripts/sanitize.sh [memcheck|racecheck|synccheck|initcheck ...]" >&2
    exit 2
  fi
done
mkdir -p "$OUT"
deadline=$((SECONDS + BUDGET_S))

find_sanitizer() {
  if [ -n "${SANITIZER:-}" ]; then echo "$SANITIZER"; return; fi
  if command -v compute-sanitizer >/dev/null 2>&1; then command -v compute-sanitizer; return; fi
  local home candidate
  for home in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV); do
    [ -n "$home" ] || continue
    for candidate in "$home/bin/compute-sanitizer" "$home/compute-sanitizer/compute-sanitizer"; do
      if [ -x "$candidate" ]; then echo "$candidate"; return; fi
    done
  done
}

sanitizer=$(find_sanitizer)
if [ -z "$sanitizer" ] || [ ! -x "$sanitizer" ]; then
  echo "sanitize: compute-sanitizer not found (set SANITIZER or CUDA_HOME)" >&2
  exit 2
fi
echo "== $("$sanitizer" --version 2>/dev/null | tail -n 1) ($sanitizer)"

# Load (or JIT-build) the extension outside the sanitizer: a build under it would crawl.
if ! "$PYTHON" "$DRIVER" --groups "$GROUPS_ARG" --check-only >"$OUT/preflight.log" 2>&1; then
  echo "sanitize: the driver cannot run here:" >&2
  tail -n 5 "$OUT/preflight.log" >&2
  exit 2
fi

failed=0
summary=()
for tool in "${tools[@]}"; do
  log="$OUT/$tool.log"
  limit=${LIMIT_S[$tool]}
  left=$((deadline - SECONDS))
  [ "$limit" -gt "$left" ] && limit=$left
  if [ "$limit" -le 0 ]; then
    summary+=("$(printf '%-10s NOT RUN (the %ss budget is spent)' "$tool" "$BUDGET_S")")
    failed=1
    continue
  fi
  echo "== $tool (size ${SIZE[$tool]}, limit ${limit}s)"
  start=$SECONDS
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout --signal=TERM --kill-after="$KILL_GRACE_S" "$limit" \
    "$sanitizer" --tool "$tool" --error-exitcode 1 --print-limit "$PRINT_LIMIT" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"} \
    "$PYTHON" "$DRIVER" --groups "$GROUPS_ARG" --archs "$ARCHS_ARG" --size "${SIZE[$tool]}" >"$log" 2>&1
  rc=$?
  seconds=$((SECONDS - start))
  counts=$("$PYTHON" "$DRIVER" --summarize "$log")
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    line="TIMEOUT after ${limit}s ($counts so far)"
    failed=1
  elif [ "$counts" = "no summary" ]; then
    line="no sanitizer summary in the log (exit $rc)"
    failed=1
  else
    read -r errors warnings <<< "$counts"
    line="$errors errors"
    [ "$tool" = racecheck ] && line="$line, $warnings warnings"
    line="$line (exit $rc)"
    if [ "$errors" -ne 0 ] || [ "$rc" -ne 0 ]; then failed=1; fi
  fi
  # the driver's own failures (an op raised, NaN output) are in the log as FAIL lines
  driver_failures=$(grep -c '^FAIL ' "$log")
  if [ "$driver_failures" -gt 0 ]; then
    line="$line, $driver_failures driver case(s) FAILED"
    failed=1
  fi
  summary+=("$(printf '%-10s %s, %ss' "$tool" "$line" "$seconds")")
  echo "   $(grep -E 'SUMMARY|cases ran' "$log" | tr '\n' ' ')"
done

echo
echo "== sanitize summary (logs in $OUT)"
printf '%s\n' "${summary[@]}"
exit "$failed"
