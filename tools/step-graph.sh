#!/usr/bin/env bash
# Writes a GEGL chain file of classifier-guided sampling spelled out node by node:
#   gd:noise -> steps x [gd:noise-predict, gd:classifier-gradient, gd:scheduler-step] -> gd:decode
# It gives the pixels of `gd:sample` with the same settings.  --class2 guides toward a second
# class too (the two gradients summed with gegl:add); --mask guides only where the mask is
# white (the gradient times the mask, gegl:multiply).  Models left out mean the default
# models of the data dir.
set -euo pipefail
steps=10 seed=1 class=0 class2="" scale=1 sampler=ddim eta=0 mask="" model="" classifier=""
start=gd:noise has_start=0 decode=1
usage() {
  echo "usage: $0 [--steps N] [--seed S] [--class C] [--class2 C] [--scale S] [--sampler ddim|ddpm]" >&2
  echo "          [--eta E] [--mask FILE] [--model FILE] [--classifier FILE] [--start OPS] [--tensor]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --steps) steps=$2 ;;
    --seed) seed=$2 ;;
    --class) class=$2 ;;
    --class2) class2=$2 ;;
    --scale) scale=$2 ;;
    --sampler) sampler=$2 ;;
    --eta) eta=$2 ;;
    --mask) mask=$2 ;;
    --model) model=$2 ;;
    --classifier) classifier=$2 ;;
    # x_T from these ops instead of gd:noise (e.g. gegl:gegl-buffer-load path=F); empty: from
    # the node the chain is attached to
    --start) start=$2 has_start=1 ;;
    # end with the x_0 tensor instead of the decoded image
    --tensor) decode=0; shift; continue ;;
    *) usage ;;
  esac
  [ $# -ge 2 ] || usage
  shift 2
done

model_arg=${model:+ model=$model}
classifier_arg=${classifier:+ classifier=$classifier}
common="steps=$steps sampler=$sampler"
gradient() { # $1: step, $2: class
  echo "gd:classifier-gradient step=$1 $common class=$2$classifier_arg"
}

echo "# $steps-step classifier-guided ${sampler^^} (Dhariwal & Nichol 2021), one node per operation."
echo "# Written by tools/step-graph.sh."
if [ -n "$class2" ]; then
  echo "# Guided toward classes $class and $class2 at once (the two gradients summed by gegl:add)."
elif [ -n "$mask" ]; then
  echo "# Guided only where $mask is white (the gradient times the mask, gegl:multiply)."
else
  echo "# The pixels of: gd:sample steps=$steps sampler=$sampler eta=$eta seed=$seed class=$class guidance-scale=$scale"
fi
if [ "$has_start" = 1 ]; then
  echo "${start:+$start }id=x$((steps - 1))"
else
  echo "gd:noise seed=$seed$model_arg id=x$((steps - 1))"
fi
for ((k = steps - 1; k >= 0; k--)); do
  echo
  echo "gd:scheduler-step step=$k $common eta=$eta guidance-scale=$scale seed=$seed$model_arg"
  echo "  aux=[ ref=x$k gd:noise-predict step=$k $common class=$class$model_arg ]"
  line="  aux2=[ ref=x$k $(gradient "$k" "$class")"
  [ -n "$class2" ] && line+=" gegl:add aux=[ ref=x$k $(gradient "$k" "$class2") ]"
  [ -n "$mask" ] && line+=" gegl:multiply aux=[ gegl:load path=$mask ]"
  echo "$line ]"
  [ "$k" -gt 0 ] && echo "  id=x$((k - 1))"
done
if [ "$decode" = 1 ]; then
  echo
  echo "gd:decode"
fi
