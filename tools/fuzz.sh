#!/usr/bin/env bash
# Fuzzes the checkpoint readers with libFuzzer (clang, AddressSanitizer + UBSan): the
# pickle reader, the PyTorch checkpoint reader (zip and legacy) and safetensors files.
#   bash tools/fuzz.sh [SECONDS]     each target for SECONDS (default 600), one after another
# Builds into build-fuzz/, corpora in build-fuzz/corpus/TARGET, crashing inputs in
# build-fuzz/artifacts/TARGET.  Ends with one line per target: executions, crashes.
# A crash is fixed, then its input goes to tests/fuzz/regressions/TARGET/ (replayed by
# the checkpoint test).  Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."
seconds=${1:-600}
bash tools/install-deps.sh
missing=()
for p in clang libclang-rt-14-dev; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get install -y -qq "${missing[@]}"
fi
if [ ! -f build-fuzz/build.ninja ]; then
  CC=clang meson setup build-fuzz -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false \
    -Dc_args=-fsanitize=fuzzer-no-link -Dbuildtype=debugoptimized >/dev/null
fi
ninja -C build-fuzz
fuzz=build-fuzz/tests/fuzz
"$fuzz/fuzz-seeds" build-fuzz/seeds
summary=()
for target in pickle torch safetensors; do
  case $target in
    pickle) dict=tests/fuzz/pickle.dict; max_len=65536 ;;
    torch) dict=tests/fuzz/zip.dict; max_len=262144 ;;
    safetensors) dict=tests/fuzz/safetensors.dict; max_len=65536 ;;
  esac
  corpus=build-fuzz/corpus/$target
  artifacts=build-fuzz/artifacts/$target
  mkdir -p "$corpus" "$artifacts"
  log=build-fuzz/fuzz-$target.log
  echo "fuzzing $target for $seconds s (log: $log)"
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 ASAN_OPTIONS=detect_leaks=1 \
    "$fuzz/fuzz-$target" -max_total_time="$seconds" -print_final_stats=1 -timeout=10 \
      -rss_limit_mb=2048 -max_len=$max_len -dict="$dict" -artifact_prefix="$artifacts/" \
      "$corpus" "build-fuzz/seeds/$target" >"$log" 2>&1 || true
  runs=$(grep -oE 'stat::number_of_executed_units: *[0-9]+' "$log" | grep -oE '[0-9]+$' || echo "?")
  crashes=$(find "$artifacts" -type f | wc -l)
  summary+=("$target: $runs executions, $crashes crashes, corpus $(ls "$corpus" | wc -l) inputs")
done
printf '%s\n' "${summary[@]}"
