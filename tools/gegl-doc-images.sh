#!/usr/bin/env bash
# Makes the pictures of docs/gegl.md with the gegl command line and the example graphs of
# data/graphs, the "default models" being the reference fixtures (random weights: the
# pictures are noise-like).  Each is scaled up 8x (nearest) to be seen.
# Usage: tools/gegl-doc-images.sh [BUILD_DIR] [REFERENCE_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
build=$(realpath "${1:-build}")
reference=$(realpath "${2:-../shared/reference}")
out=$root/docs/images
mkdir -p "$out"
data=$(mktemp -d)
trap 'rm -rf "$data"' EXIT
mkdir -p "$data/models"
ln -s "$reference/unet/gray28_uncond/model.safetensors" "$data/models/default-unet.safetensors"
ln -s "$reference/classifier/gray28_attnpool/model.safetensors" "$data/models/default-classifier.safetensors"
export GD_DATA_DIR=$data
export GEGL_PATH=$build/plugin:$(pkg-config --variable=pluginsdir gegl-0.4)
enlarge="gegl:scale-ratio x=8 y=8 sampler=nearest gegl:png-save bitdepth=8 path"

picture() { # $1: name, rest: chain (run in data/graphs so that relative paths resolve)
  local name=$1
  shift
  (cd "$root/data/graphs" && gegl -- "$@" $enlarge="$out/$name.png" 2>&1 | grep -E 'guided-WARNING' || true)
  echo "docs/images/$name.png"
}
graph() { # $1: name, $2: chain file of data/graphs
  # shellcheck disable=SC2046 # the chain file's words are the arguments
  picture "$1" $(grep -v '^#' "$root/data/graphs/$2")
}

image="gegl:linear-gradient start-x=0 start-y=0 end-x=28 end-y=0 start-color=black end-color=white gegl:crop width=28 height=28"
picture input $image
picture sample gd:sample steps=10 seed=1 class=3 guidance-scale=10
picture unguided gd:sample steps=10 seed=1 guidance-scale=0
graph guided-ddim-10 guided-ddim-10.gegl
graph two-classes two-classes.gegl
graph region-guidance region-guidance.gegl
picture mask gegl:load path=mask-left-half.png
picture variation $image gd:sample steps=10 seed=1 class=3 guidance-scale=10 strength=0.5
picture inpainting $image gd:sample steps=10 seed=1 class=3 guidance-scale=10 aux=[ gegl:load path=mask-left-half.png ]
picture noise gd:noise seed=1 gd:decode
picture rgb-sample gd:sample model="$reference/unet/tiny_cond_learnsigma/model.safetensors" \
  classifier="$reference/classifier/tiny_attnpool/model.safetensors" steps=10 seed=1 class=3 guidance-scale=10
