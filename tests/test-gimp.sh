#!/usr/bin/env bash
# The GIMP plug-in in gimp-console (no display): installed into a temporary GIMP profile,
# called through its PDB procedure by tests/gimp-test.scm with the default models of the
# source tree: generate, inpaint, vary, a grayscale image, bad input (the messages are
# checked here, in GIMP's output) and a run stopped at step 3.  Prints TAP lines; exits 77
# (skipped) when gimp-console is not installed.
#
# Environment (set by tests/meson.build): GD_GIMP_PLUGIN (the built plug-in, empty when
# libgimp2.0-dev was missing at configure time), GD_SOURCE_DIR, GD_REFERENCE_DIR.
set -u
console=$(command -v gimp-console || true)
if [ -z "$console" ]; then
  echo "SKIP: gimp-console is not installed (apt-get install gimp): the GIMP plug-in is NOT tested"
  exit 77
fi
if [ -z "${GD_GIMP_PLUGIN:-}" ] || [ ! -x "$GD_GIMP_PLUGIN" ]; then
  echo "not ok 1 - gimp-console is installed but the plug-in was not built (install libgimp2.0-dev, then reconfigure)"
  exit 1
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
export GIMP2_DIRECTORY=$tmp/profile
mkdir -p "$GIMP2_DIRECTORY/plug-ins/guided-diffusion-gimp"
for d in brushes dynamics fonts gradients palettes patterns tool-presets; do
  mkdir -p "$GIMP2_DIRECTORY/$d"
done
cp "$GD_GIMP_PLUGIN" "$GIMP2_DIRECTORY/plug-ins/guided-diffusion-gimp/"
export GD_DATA_DIR=$GD_SOURCE_DIR/data
unset DISPLAY
mismatch=${GD_REFERENCE_DIR:-}/classifier/tiny_attnpool/model.safetensors
[ -f "$mismatch" ] || mismatch=""

# runs gimp-test.scm's part $1 (extra environment in the rest); TAP lines in $tmp/$1.tap
run_part() {
  local part=$1; shift
  local start=$SECONDS
  env "$@" "$console" -i -d -f --no-splash -b "(begin
      (define gd-results \"$tmp/$part.tap\")
      (define gd-part \"$part\")
      (define gd-mismatch \"$mismatch\")
      (define gd-not-a-model \"$GD_SOURCE_DIR/data/labels/imagenet-1000.tsv\")
      (define gd-default-classifier \"$GD_DATA_DIR/models/default-classifier.safetensors\")
      (load \"$GD_SOURCE_DIR/tests/gimp-test.scm\"))" \
    -b '(gimp-quit 0)' > "$tmp/$part.log" 2>&1
  echo "# gimp-console, part $part: exit $?, $((SECONDS - start)) s"
}
run_part main
run_part stop GD_GIMP_STOP_AFTER_STEP=3

n=0
failed=0
report() {  # report OK|FAIL description
  n=$((n + 1))
  if [ "$1" = OK ]; then echo "ok $n - $2"; else echo "not ok $n - $2"; failed=$((failed + 1)); fi
}
for part in main stop; do
  if [ ! -f "$tmp/$part.tap" ] || ! grep -q '^1\.\.' "$tmp/$part.tap"; then
    report FAIL "gimp-test.scm part $part ran to its end"
    continue
  fi
  planned=$(sed -n 's/^1\.\.//p' "$tmp/$part.tap")
  seen=$(grep -cE '^(not )?ok ' "$tmp/$part.tap")
  [ "$planned" = "$seen" ] && report OK "part $part: $seen checks" || report FAIL "part $part: $seen of $planned checks"
  while IFS= read -r line; do
    case $line in
      "ok "*) report OK "${line#ok [0-9]* - }" ;;
      "not ok "*) report FAIL "${line#not ok [0-9]* - }" ;;
    esac
  done < "$tmp/$part.tap"
done

# the messages GIMP shows for bad input: what is wrong, in words
expect_message() {  # expect_message PART TEXT DESCRIPTION
  if grep -qF -- "$2" "$tmp/$1.log"; then report OK "message: $3"
  else report FAIL "message: $3 (no '$2' in GIMP's output)"; fi
}
expect_message main "/nonexistent/model.safetensors" "a missing model file is named"
expect_message main "imagenet-1000.tsv" "a file that is not a model is named"
expect_message main "unknown label 'Bogus'" "an unknown class name is named"
expect_message main "is a classifier, not a diffusion model" "a classifier given as the model"
expect_message main "Inpainting regenerates the selection" "inpainting needs a selection"
[ -n "$mismatch" ] && expect_message main "does not fit the model" "a classifier of another size"
# stopped at step 3 (asked when the progress showed it): within one step
stopped=$(grep -o 'stopped after [0-9]* of 40 steps' "$tmp/stop.log" | grep -o 'after [0-9]*' | grep -o '[0-9]*')
if [ "$stopped" = 3 ] || [ "$stopped" = 4 ]; then
  report OK "stop asked at step 3 of 40: stopped after step $stopped"
else
  report FAIL "stop asked at step 3 of 40: stopped after step '${stopped}'"
fi
# a sanitizer build of the plug-in reports to GIMP's output (GEGL's own leaks suppressed)
if grep -qE 'ERROR: (Leak|Address)Sanitizer|runtime error:' "$tmp/main.log" "$tmp/stop.log"; then
  report FAIL "no sanitizer report from the plug-in"
else
  report OK "no sanitizer report from the plug-in"
fi
if grep -qiE 'segmentation fault|plug-in crashed|fatal error' "$tmp/main.log" "$tmp/stop.log"; then
  report FAIL "no crash of GIMP or the plug-in"
else
  report OK "no crash of GIMP or the plug-in"
fi

echo "1..$n"
if [ "$failed" -gt 0 ]; then
  for part in main stop; do
    echo "# --- GIMP's output, part $part ---"
    sed 's/^/# /' "$tmp/$part.log"
  done
  exit 1
fi
exit 0
