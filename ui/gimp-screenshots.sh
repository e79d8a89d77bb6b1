#!/usr/bin/env bash
# The pictures of docs/gimp.md, taken from GIMP 2.10 under Xvfb with the built plug-in in
# a temporary GIMP profile and the default models of data/:
#   gimp-result.png        four classes generated into the quarters of an image (PDB calls)
#   gimp-inpaint.png       a layer, the selection, the selection inpainted (PDB calls)
#   gimp-menu.png          Filters > Render > Diffusion > Guided Diffusion...
#   gimp-dialog.png        the dialog
#   gimp-class-search.png  type-to-search in the 1000 ImageNet class names
#   gimp-progress.png      a run in progress: the dialog's and GIMP's progress bars
# The dialog is driven with xdotool (keyboard mnemonics), captured with ImageMagick.
# usage: bash ui/gimp-screenshots.sh [BUILD_DIR]      (needs xvfb, xdotool, imagemagick)
# GD_SCREENSHOTS_OUT=DIR writes the pictures there instead of docs/images; the plug-in's
# sanitizer reports (a build-asan plug-in) are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
build=${1:-build}
plugin=$PWD/$build/ui/guided-diffusion-gimp
out=${GD_SCREENSHOTS_OUT:-$PWD/docs/images}
[ -x "$plugin" ] || { echo "$plugin is missing: build first (bash tools/build.sh)" >&2; exit 1; }
if [ -z "${GD_SCREENSHOTS_XVFB:-}" ]; then
  exec env GD_SCREENSHOTS_XVFB=1 xvfb-run -a -s "-screen 0 1920x1080x24" bash "$0" "$@"
fi

tmp=$(mktemp -d)
gimp_pid=""
cleanup() {
  [ -n "$gimp_pid" ] && kill "$gimp_pid" 2>/dev/null || true
  rm -rf "$tmp"
}
trap cleanup EXIT
export GIMP2_DIRECTORY=$tmp/profile GD_DATA_DIR=$PWD/data OMP_WAIT_POLICY=passive
mkdir -p "$GIMP2_DIRECTORY/plug-ins/guided-diffusion-gimp"
cp "$plugin" "$GIMP2_DIRECTORY/plug-ins/guided-diffusion-gimp/"

cat > "$tmp/shots.scm" <<EOF
(define (gd-generate image layer class seed steps)
  (plug-in-guided-diffusion RUN-NONINTERACTIVE image layer 0 "" "" class 4.0 steps 0 0.0 seed 1 0.6 "" ""))
(define (gd-white-image size)
  (let* ((image (car (gimp-image-new size size RGB)))
         (layer (car (gimp-layer-new image size size RGB-IMAGE "Background" 100 LAYER-MODE-NORMAL))))
    (gimp-image-insert-layer image layer 0 0)
    (gimp-drawable-fill layer FILL-WHITE)
    (list image layer)))
(define (gd-save image file)
  (let* ((copy (car (gimp-image-duplicate image)))
         (flat (car (gimp-image-flatten copy))))
    (file-png-save RUN-NONINTERACTIVE copy flat file file 0 9 0 0 0 0 0)
    (gimp-image-delete copy)))

; inpainting: a sneaker whose upper part (the selection) becomes an ankle boot's
(let* ((made (gd-white-image 280)) (image (car made)) (bg (cadr made)))
  (gd-generate image bg "Sneaker" 8 50)
  (let ((sneaker (car (gimp-image-get-active-layer image))))
    (gd-save image "$tmp/inpaint-1.png")
    (gimp-image-select-rectangle image CHANNEL-OP-REPLACE 0 0 280 150)
    (plug-in-guided-diffusion RUN-NONINTERACTIVE image sneaker 2 "" "" "Ankle boot" 4.0 50 0 0.0 1 1 1.0 "" "")
    (gimp-selection-none image)
    (gd-save image "$tmp/inpaint-3.png")
    (gimp-image-delete image)))

; the result: four classes generated into the quarters of a 560x560 image
(let* ((made (gd-white-image 560)) (image (car made)) (bg (cadr made)))
  (gimp-image-select-rectangle image CHANNEL-OP-REPLACE 0 0 280 280)
  (gd-generate image bg "Trouser" 8 50)
  (gimp-image-select-rectangle image CHANNEL-OP-REPLACE 280 0 280 280)
  (gd-generate image bg "Sneaker" 8 50)
  (gimp-image-select-rectangle image CHANNEL-OP-REPLACE 0 280 280 280)
  (gd-generate image bg "Bag" 8 50)
  (gimp-image-select-rectangle image CHANNEL-OP-REPLACE 280 280 280 280)
  (gd-generate image bg "Ankle boot" 8 50)
  (gimp-selection-none image)
  (gimp-image-clean-all image)
  (gimp-display-new image)
  (gimp-displays-flush))
(let ((port (open-output-file "$tmp/ready"))) (display "ready" port) (close-output-port port))
EOF

gimp --no-splash -b "(load \"$tmp/shots.scm\")" > "$tmp/gimp.log" 2>&1 &
gimp_pid=$!
for _ in $(seq 300); do [ -f "$tmp/ready" ] && break; sleep 1; done
[ -f "$tmp/ready" ] || { cat "$tmp/gimp.log"; echo "GIMP did not get ready" >&2; exit 1; }
sleep 3
main=$(xdotool search --name 'GIMP$' | tail -1)
xdotool windowmove "$main" 0 0
sleep 1

shot_window() { import -window "$1" "$out/$2"; }
# the screen around a window (popups and menus are windows of their own)
shot_area() {
  eval "$(xdotool getwindowgeometry --shell "$1" | grep -E '^(X|Y|WIDTH|HEIGHT)=')"
  import -window root -crop "$((WIDTH + $4))x$((HEIGHT + $5))+$((X + $2))+$((Y + $3))" +repage "$out/$6"
}
# keys and text go to the window in $focus (there is no window manager to give it focus)
focus=""
keys() { xdotool windowfocus --sync "$focus"; xdotool key --delay 80 "$@"; sleep 0.5; }
text() { xdotool type --delay 60 "$1"; sleep 0.5; }
# a class by name: typed, then the first name the completion offers taken (Down Return
# does nothing when it offers none)
class() { keys alt+a ctrl+a; text "$1"; sleep 0.5; keys Down Return; }

# the pictures made by PDB calls
convert "$tmp/inpaint-1.png" \( "$tmp/inpaint-1.png" -fill '#ff4060' -draw 'fill-opacity 0.35 rectangle 0,0 279,149' \) \
  "$tmp/inpaint-3.png" -bordercolor white -border 4 +append -strip "$out/gimp-inpaint.png"
shot_window "$main" gimp-result.png

# the menu
focus=$main
keys alt+r r Down Down Down Down Right
shot_area "$main" 0 0 300 0 gimp-menu.png
keys Return
dialog=$(timeout 60 xdotool search --sync --name '^Guided Diffusion$' | head -1)
sleep 1
eval "$(xdotool getwindowgeometry --shell "$main" | grep '^WIDTH=')"
xdotool windowmove "$dialog" "$((WIDTH + 16))" 0
sleep 0.5
focus=$dialog

# the dialog: a class, 50 steps, a fixed seed
class "Sneaker"
keys alt+t ctrl+a; text "50"; keys Tab
keys alt+r alt+d ctrl+a; text "7"; keys Tab
shot_window "$dialog" gimp-dialog.png

# type-to-search among 1000 names: the classifier's label list overridden by ImageNet's
keys alt+k; sleep 1; keys alt+f; text '{"labels": "imagenet-1000"}'; keys Return
sleep 3   # the dialog reads the files again
keys alt+a ctrl+a; text "retriev"
sleep 3
shot_area "$dialog" 0 0 0 0 gimp-class-search.png
keys Down Return alt+f ctrl+a BackSpace Return
sleep 3
keys alt+k
class "Sneaker"

# a run in progress (1000 steps, 4 images), then stopped with the dialog's Cancel
keys alt+t ctrl+a; text "1000"; keys Tab
keys alt+u ctrl+a; text "4"; keys Tab
keys alt+o
sleep 6
eval "$(xdotool getwindowgeometry --shell "$dialog" | grep -E '^(X|WIDTH)=')"
import -window root -crop "$((X + WIDTH))x900+0+0" +repage "$out/gimp-progress.png"
keys alt+c
sleep 3
kill "$gimp_pid" 2>/dev/null || true
wait "$gimp_pid" 2>/dev/null || true
gimp_pid=""
grep -E -A30 'ERROR: (Leak|Address)Sanitizer|runtime error:' "$tmp/gimp.log" || true
echo "wrote $out/gimp-{result,inpaint,menu,dialog,class-search,progress}.png"
