#!/usr/bin/env bash
# Sets up everything and runs the whole test suite: a normal build, then the same
# suite under AddressSanitizer + UndefinedBehaviorSanitizer.  Ends with the line
# "N passed, N failed".  GD_SKIP_SANITIZERS=1 runs the normal build only.
set -uo pipefail
# OpenMP threads wait passively: meson runs several test programs at once on few cores
export OMP_WAIT_POLICY=passive
cd "$(dirname "$0")/.."
bash tools/install-deps.sh || exit 1

passed=0
failed=0
run_suite() {
  local dir=$1; shift
  if [ ! -f "$dir/build.ninja" ]; then
    meson setup "$dir" "$@" >/dev/null || return 1
  fi
  ninja -C "$dir" || return 1
  meson test -C "$dir" --print-errorlogs
  local status=$?
  # count TAP results of every test program
  local ok notok
  ok=$(grep -cE '^ok ' "$dir/meson-logs/testlog.txt" || true)
  notok=$(grep -cE '^not ok ' "$dir/meson-logs/testlog.txt" || true)
  passed=$((passed + ok))
  failed=$((failed + notok))
  [ "$status" -eq 0 ] || failed=$((failed + (notok == 0 ? 1 : 0)))
  return $status
}

status=0
run_suite build || status=1
if [ "${GD_SKIP_SANITIZERS:-0}" != 1 ]; then
  # OpenBLAS is not built with sanitizers; leak checking still covers the project's code.
  UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
  ASAN_OPTIONS=detect_leaks=1 \
    run_suite build-asan -Db_sanitize=address,undefined -Db_lundef=false || status=1
fi
echo "$passed passed, $failed failed"
exit $status
