#!/usr/bin/env bash
# Builds the libFuzzer targets with clang (ASan + UBSan) and runs each one
# for a fixed time, one after the other. `make fuzz SECONDS=N` calls this.
#
#   fuzz/run.sh [--seconds N] [--build DIR] [--build-only] [--werror] [target ...]
#
# Defaults: 30 s per target, build dir build-fuzz, every target. Each
# target starts from its seeds in fuzz/corpus/<target> (read only) plus
# the inputs earlier runs found in DIR/corpus/<target>, with the dictionary
# fuzz/dict/<target>.dict when there is one. Crashes, leaks, timeouts and
# out-of-memory inputs land in DIR/artifacts/<target>/; the log of each run
# is DIR/logs/<target>.log. Exits 1 when any target failed.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
root=$(dirname "$here")
secs=30
build="$root/build-fuzz"
build_only=false
werror=OFF
targets=()
while [ $# -gt 0 ]; do
  case "$1" in
    --seconds) secs="$2"; shift 2 ;;
    --build) build="$2"; shift 2 ;;
    --build-only) build_only=true; shift ;;
    --werror) werror=ON; shift ;;
    -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
    -*) echo "run.sh: unknown option $1" >&2; exit 2 ;;
    *) targets+=("$1"); shift ;;
  esac
done
case "$build" in /*) ;; *) build="$root/$build" ;; esac
if ! [[ "$secs" =~ ^[0-9]+$ ]] || [ "$secs" -lt 1 ]; then
  echo "run.sh: --seconds needs a whole number of seconds >= 1, not '$secs'" >&2
  exit 2
fi

# The whole tree is built with clang and the fuzzer's coverage hooks; each
# target links libFuzzer on top (fuzz/targets.cmake, read via inject.cmake).
flags="-fsanitize=fuzzer-no-link,address,undefined -fno-sanitize-recover=undefined"
flags="$flags -fno-omit-frame-pointer -g"
if ! command -v clang >/dev/null; then
  echo "run.sh: clang is missing: apt-get install clang libclang-rt-14-dev" >&2
  exit 1
fi
cmake -S "$root" -B "$build" -DCMAKE_C_COMPILER=clang -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DPN_TESTS=OFF -DPN_SANITIZE=OFF -DPN_WERROR=$werror "-DCMAKE_C_FLAGS=$flags" \
  "-DCMAKE_PROJECT_proxynode_INCLUDE=$here/inject.cmake" >/dev/null
cmake --build "$build" --target fuzz_all -j "$(nproc)"
$build_only && exit 0

if [ ${#targets[@]} -eq 0 ]; then
  for f in "$here"/fuzz_*.c; do
    t=$(basename "$f" .c)
    [ -x "$build/$t" ] && targets+=("$t")
  done
fi

export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:abort_on_error=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
mkdir -p "$build/logs"
failed=()
for t in "${targets[@]}"; do
  if [ ! -x "$build/$t" ]; then
    echo "run.sh: no such target: $t" >&2
    failed+=("$t")
    continue
  fi
  mkdir -p "$build/corpus/$t" "$build/artifacts/$t"
  args=(-max_total_time="$secs" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1
        -artifact_prefix="$build/artifacts/$t/")
  [ -f "$here/dict/$t.dict" ] && args+=(-dict="$here/dict/$t.dict")
  seeds=()
  [ -d "$here/corpus/$t" ] && seeds+=("$here/corpus/$t")
  printf '%-20s %4ss ... ' "$t" "$secs"
  touch "$build/logs/$t.start"
  if "$build/$t" "${args[@]}" "$build/corpus/$t" "${seeds[@]}" >"$build/logs/$t.log" 2>&1; then
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$build/logs/$t.log" |
           grep -o '[0-9]*$' || echo "?")
    cov=$(grep -o 'cov: [0-9]*' "$build/logs/$t.log" | tail -1 || true)
    echo "ok ($runs runs, $cov)"
  else
    echo "FAILED"
    { grep -E '^(==[0-9]+==ERROR|SUMMARY|fuzz_|.*runtime error)' "$build/logs/$t.log" || true; } |
      head -5 | sed 's/^/    /'
    find "$build/artifacts/$t" -type f -newer "$build/logs/$t.start" | sed 's/^/    artifact: /'
    failed+=("$t")
  fi
done
if [ ${#failed[@]} -gt 0 ]; then
  echo "fuzzing failed: ${failed[*]} (logs in $build/logs)" >&2
  exit 1
fi
echo "fuzzing: ${#targets[@]} targets, ${secs}s each, no failures"
