#!/usr/bin/env bash
# Plots the TSV of `guided evaluate --tsv` (scale, accuracy, frechet, variety) as a PNG:
# intended-class accuracy and variety against the guidance scale.
# usage: tools/plot-evaluation.sh EVALUATION.tsv OUT.png
set -euo pipefail
[ $# -eq 2 ] || { echo "usage: $0 EVALUATION.tsv OUT.png" >&2; exit 2; }
command -v gnuplot >/dev/null || { echo "$0: gnuplot is missing (apt-get install gnuplot-nox)" >&2; exit 1; }
gnuplot <<GNUPLOT
set terminal pngcairo size 720,440 font ",11"
set output "$2"
set datafile separator "\t"
set key top center horizontal
set xlabel "guidance scale"
set ylabel "intended-class accuracy (judge)"
set y2label "variety (mean pairwise feature distance)"
set yrange [0:1]
set ytics nomirror
set y2tics
set grid
plot "$1" using 1:2 skip 1 with linespoints lw 2 pt 7 title "accuracy", \
     "$1" using 1:4 skip 1 axes x1y2 with linespoints lw 2 pt 5 title "variety"
GNUPLOT
