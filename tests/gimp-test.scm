; The GIMP plug-in through its PDB procedure, in gimp-console's Script-Fu; run by
; tests/test-gimp.sh, which defines before loading this file:
;   gd-results     the file the TAP lines go to
;   gd-part        "main" (generate, inpaint, vary, bad input) or "stop" (a run stopped)
;   gd-mismatch    a classifier of another size than the default model, or ""
; Messages of the plug-in go to GIMP's stderr, which test-gimp.sh checks.

(define gd-out (open-output-file gd-results))
(define gd-count 0)

(define (gd-report ok description detail)
  (set! gd-count (+ gd-count 1))
  (display (if ok "ok " "not ok ") gd-out)
  (display gd-count gd-out)
  (display " - " gd-out)
  (display description gd-out)
  (if (and (not ok) detail)
      (begin (display " # got " gd-out) (write detail gd-out)))
  (newline gd-out))

(define (gd-skip description reason)
  (set! gd-count (+ gd-count 1))
  (display (string-append "ok " (number->string gd-count) " - " description " # SKIP " reason) gd-out)
  (newline gd-out))

; a failing PDB call: #f, and its error in gd-last-error
(define gd-last-error #f)
(define (gd-try thunk)
  (set! gd-last-error #f)
  (let ((saved *error-hook*))
    (set! *error-hook* (lambda args (set! gd-last-error args) (apply throw args)))
    (let ((result (catch #f (thunk))))
      (set! *error-hook* saved)
      result)))

(define (gd-contains? text part)
  (let ((n (string-length text)) (m (string-length part)))
    (let loop ((i 0))
      (cond ((> (+ i m) n) #f)
            ((string=? (substring text i (+ i m)) part) #t)
            (else (loop (+ i 1)))))))

(define (gd-layer-count image) (car (gimp-image-get-layers image)))

; mean and standard deviation (0..255) of a channel over the selection, or everything
(define (gd-stats drawable channel)
  (let ((h (gimp-drawable-histogram drawable channel 0.0 1.0)))
    (list (car h) (cadr h))))

; the plug-in with the test's usual settings: 8 DDIM steps, seed 1, one image
(define (gd-run image drawable mode model classifier class-name scale steps strength)
  (plug-in-guided-diffusion RUN-NONINTERACTIVE image drawable mode model classifier class-name
                            scale steps 0 0.0 1 1 strength "" ""))

; a 64x48 RGB image whose background is a red-to-blue gradient
(define (gd-test-image)
  (let* ((image (car (gimp-image-new 64 48 RGB)))
         (bg (car (gimp-layer-new image 64 48 RGB-IMAGE "Background" 100 LAYER-MODE-NORMAL))))
    (gimp-image-insert-layer image bg 0 0)
    (gimp-context-set-foreground '(255 0 0))
    (gimp-context-set-background '(0 0 255))
    (gimp-drawable-edit-gradient-fill bg GRADIENT-LINEAR 0 FALSE 1 0 TRUE 0 0 64 48)
    (list image bg)))

; |a - b| over the whole image, as a new layer on top (the visible layers as they are)
(define (gd-difference-from image layer)
  (let* ((composite (car (gimp-layer-new-from-visible image image "composite")))
         (copy (car (gimp-layer-copy layer FALSE))))
    (gimp-image-insert-layer image composite 0 0)
    (gimp-image-insert-layer image copy 0 0)
    (gimp-layer-set-mode copy LAYER-MODE-DIFFERENCE)
    (car (gimp-image-merge-down image copy CLIP-TO-IMAGE))))

; a call that must fail and leave the image's layers as they were
(define (gd-refused image description thunk)
  (let* ((before (gd-layer-count image)) (result (gd-try thunk)))
    (gd-report (and (not result) gd-last-error) (string-append description ": the call fails") result)
    (gd-report (= (gd-layer-count image) before) (string-append description ": no layer added")
               (gd-layer-count image))))

(define (gd-main)
  (let* ((made (gd-test-image)) (image (car made)) (bg (cadr made)))
    ; generate: a new layer the size of the canvas, from the 28x28 grayscale model
    (let* ((result (gd-try (lambda () (gd-run image bg 0 "" "" "Trouser" 4.0 8 0.6))))
           (ok (and result (= (car result) 1)))
           (layer (if ok (aref (cadr result) 0) -1)))
      (gd-report ok "generate returns one new layer" result)
      (gd-report (= (gd-layer-count image) 2) "generate: the image has 2 layers" (gd-layer-count image))
      (if ok
          (let ((size (list (car (gimp-drawable-width layer)) (car (gimp-drawable-height layer))))
                (offsets (gimp-drawable-offsets layer))
                (value (gd-stats layer HISTOGRAM-VALUE))
                (red (gd-stats layer HISTOGRAM-RED))
                (green (gd-stats layer HISTOGRAM-GREEN))
                (blue (gd-stats layer HISTOGRAM-BLUE)))
            (gd-report (equal? size '(64 48)) "generate: the layer is 64x48, the canvas" size)
            (gd-report (equal? offsets '(0 0)) "generate: the layer is at 0, 0" offsets)
            (gd-report (= (car (gimp-drawable-is-rgb layer)) 1) "generate: an RGB layer in an RGB image" #f)
            (gd-report (> (cadr value) 10.0) "generate: the content is not uniform (std dev > 10 of 255)" value)
            (gd-report (and (equal? red green) (equal? green blue))
                       "generate: the grayscale model fills R, G and B alike" (list red green blue))
            (gd-report (gd-contains? (car (gimp-item-get-name layer)) "Trouser")
                       "generate: the layer is named after the class" (gimp-item-get-name layer))
            (gimp-item-set-visible layer FALSE))
          (gd-skip "generate: layer checks" "no layer")))

    ; inpaint an L-shaped selection: a new layer over its bounds, the selection its alpha;
    ; outside the selection (also inside the bounds) nothing changes
    (gimp-image-select-rectangle image CHANNEL-OP-REPLACE 16 8 24 20)
    (gimp-image-select-rectangle image CHANNEL-OP-ADD 16 8 8 36)
    (let* ((before (gd-layer-count image))
           (result (gd-try (lambda () (gd-run image bg 2 "" "" "Sneaker" 4.0 8 1.0))))
           (ok (and result (= (car result) 1)))
           (layer (if ok (aref (cadr result) 0) -1)))
      (gd-report ok "inpaint returns one new layer" result)
      (gd-report (= (gd-layer-count image) (+ before 1)) "inpaint: one more layer" (gd-layer-count image))
      (if ok
          (let ((size (list (car (gimp-drawable-width layer)) (car (gimp-drawable-height layer))))
                (offsets (gimp-drawable-offsets layer))
                (diff (gd-difference-from image bg)))
            (gd-report (equal? size '(24 36)) "inpaint: the layer covers the selection bounds (24x36)" size)
            (gd-report (equal? offsets '(16 8)) "inpaint: the layer is at the selection bounds (16, 8)" offsets)
            (gd-report (= (car (gimp-drawable-has-alpha layer)) 1) "inpaint: the layer has the selection as alpha" #f)
            (let ((inside (gd-stats diff HISTOGRAM-VALUE)))
              (gd-report (> (car inside) 1.0) "inpaint: the selection changed" inside))
            (gimp-selection-invert image)
            (let ((outside (gd-stats diff HISTOGRAM-VALUE)))
              (gd-report (and (= (car outside) 0) (= (cadr outside) 0)) "inpaint: every pixel outside the selection is unchanged" outside))
            (gimp-image-remove-layer image diff)
            (gimp-item-set-visible layer FALSE))
          (gd-skip "inpaint: layer checks" "no layer")))

    ; vary the whole layer (no selection)
    (gimp-selection-none image)
    (let* ((result (gd-try (lambda () (gd-run image bg 1 "" "" "Bag" 4.0 8 0.5))))
           (ok (and result (= (car result) 1)))
           (layer (if ok (aref (cadr result) 0) -1)))
      (gd-report ok "vary returns one new layer" result)
      (if ok
          (let ((size (list (car (gimp-drawable-width layer)) (car (gimp-drawable-height layer)))))
            (gd-report (equal? size '(64 48)) "vary: the layer covers the varied layer (64x48)" size)
            (gd-report (= (car (gimp-drawable-has-alpha layer)) 0) "vary without a selection: an opaque layer" #f)
            (gimp-item-set-visible layer FALSE))
          (gd-skip "vary: layer checks" "no layer")))

    ; a grayscale image gets a grayscale layer
    (let* ((gray (car (gimp-image-new 40 40 GRAY)))
           (layer (car (gimp-layer-new gray 40 40 GRAY-IMAGE "Background" 100 LAYER-MODE-NORMAL))))
      (gimp-image-insert-layer gray layer 0 0)
      (let* ((result (gd-try (lambda () (gd-run gray layer 0 "" "" "" 0.0 8 0.6))))
             (ok (and result (= (car result) 1))))
        (gd-report (and ok (= (car (gimp-drawable-is-gray (aref (cadr result) 0))) 1))
                   "generate in a grayscale image, no class and no guidance: a grayscale layer" result))
      (gimp-image-delete gray))

    ; bad input: the call fails, the image keeps its layers; test-gimp.sh checks the messages
    (gd-refused image "a model file that does not exist"
                (lambda () (gd-run image bg 0 "/nonexistent/model.safetensors" "" "Trouser" 4.0 8 0.6)))
    (gd-refused image "a model file that is not a model"
                (lambda () (gd-run image bg 0 gd-not-a-model "" "Trouser" 4.0 8 0.6)))
    (gd-refused image "a class name not in the list"
                (lambda () (gd-run image bg 0 "" "" "Bogus" 4.0 8 0.6)))
    (gd-refused image "a classifier as the diffusion model"
                (lambda () (gd-run image bg 0 gd-default-classifier "" "Trouser" 4.0 8 0.6)))
    (gd-refused image "inpainting without a selection"
                (lambda () (gd-run image bg 2 "" "" "Trouser" 4.0 8 1.0)))
    (if (string=? gd-mismatch "")
        (gd-skip "a classifier whose size does not fit the model" "reference fixture missing")
        (gd-refused image "a classifier whose size does not fit the model"
                    (lambda () (gd-run image bg 0 "" gd-mismatch "Trouser" 4.0 8 0.6))))
    (gimp-image-delete image)))

; a stop at step 3 of 40 (GD_GIMP_STOP_AFTER_STEP=3): nothing added
(define (gd-stop)
  (let* ((made (gd-test-image)) (image (car made)) (bg (cadr made)))
    (let ((result (gd-try (lambda () (gd-run image bg 0 "" "" "Trouser" 4.0 40 0.6)))))
      (gd-report (not (and result (car result) (> (car result) 0))) "a stopped run returns no layer" result)
      (gd-report (= (gd-layer-count image) 1) "a stopped run leaves the image with its one layer"
                 (gd-layer-count image)))
    (gimp-image-delete image)))

(if (string=? gd-part "stop") (gd-stop) (gd-main))
(display (string-append "1.." (number->string gd-count)) gd-out)
(newline gd-out)
(close-output-port gd-out)
