#!/usr/bin/env bash
# Installs what is missing, then configures (once) and builds into ./build.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/install-deps.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build
