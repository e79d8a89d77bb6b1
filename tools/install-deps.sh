#!/usr/bin/env bash
# Installs the Debian 12 packages the project builds, tests and runs with.
# Runs apt-get only when something is missing; needs root (or sudo) then.
set -euo pipefail
packages=(
  build-essential meson ninja-build pkg-config
  libglib2.0-dev libjson-glib-dev libopenblas-dev zlib1g-dev libpng-dev
  dataset-fashion-mnist gnuplot-nox
  libminizip-dev
  libgegl-dev gegl
  # the GIMP 2.10 plug-in and its test; a display and capture for ui/gimp-screenshots.sh
  gimp libgimp2.0-dev gtk2-engines-pixbuf
  xvfb xauth xdotool imagemagick
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  export DEBIAN_FRONTEND=noninteractive
  $SUDO apt-get update -qq
  $SUDO apt-get install -y -qq "${missing[@]}"
fi
