/* The classifier-guided sampling loop: from x_T down to x_0 through the respaced steps,
 * running the diffusion model and (when guiding) the classifier gradient at each step.
 * Optionally it starts from a given image noised part of the way (SDEdit, Meng et al.
 * 2022) and keeps the image outside a mask (inpainting by replacing the known region with
 * the known image noised to the current step). */
#pragma once
#include "gd-diffusion.h"
#include "gd-model.h"

G_BEGIN_DECLS

typedef struct {
  GdModel *model;                 /* the diffusion model (U-Net) */
  GdModel *classifier;            /* noisy classifier, or NULL: no guidance */
  const GdDiffusion *diffusion;
  GdStepSettings settings;
  const int64_t *labels;          /* [n] classes for a class-conditional model and the classifier */
  uint64_t seed;

  /* Optional hooks. iteration counts from 0 (the noisiest step, index num_steps - 1). */
  void *user;
  /* Replaces the drawn noise of an iteration (replay of recorded runs). */
  void (*noise_fn) (void *user, int iteration, float *noise, size_t count);
  void (*trace_fn) (void *user, int iteration, const float *sample, const float *pred_xstart);
  /* Called after each step; returning FALSE stops the run with GD_ERROR_CANCELLED. */
  gboolean (*progress_fn) (void *user, int done, int total);

  /* SDEdit: init_image [n, C, h, w] (model space) noised to respaced step
   * gd_sample_steps_for_strength (num_steps, strength) - 1, with the x given to
   * gd_sample_run as the noise; only those steps run.  NULL: start from x = x_T. */
  const float *init_image;
  double strength;                /* in [0, 1]; 0 returns init_image unchanged */
  /* Inpainting (needs init_image): mask [n, h, w], 1 = regenerate, 0 = keep.  After every
   * step x <- mask * x + (1 - mask) * known, known being init_image noised to the step
   * reached (init_image itself after the last step). */
  const float *mask;
} GdSampleOptions;

/* Random numbers of the sampler.  Image j of a batch draws from key seed + j, so an
 * image does not depend on its batch; x_T is stream 0, the noise of respaced step k is
 * stream k + 1. */
void gd_sample_initial_noise (uint64_t seed, int n, size_t per_image, float *x);
void gd_sample_step_noise (uint64_t seed, int step, int n, size_t per_image, float *noise);
/* The noise that takes the known image of inpainting to respaced step k: stream 2^32 + k,
 * apart from the sampler's own streams. */
void gd_sample_known_noise (uint64_t seed, int step, int n, size_t per_image, float *noise);

/* The class of image j when none is chosen: drawn from its own key seed + j, as the
 * reference's sampling script draws random classes; in [0, class_count). */
int64_t gd_sample_draw_class (uint64_t seed, int image, int class_count);

/* How many respaced steps an SDEdit run takes: round(strength * num_steps). */
int gd_sample_steps_for_strength (int num_steps, double strength);

/* Checks that the model, classifier, diffusion and labels fit together for n images of h x w. */
gboolean gd_sample_check (const GdSampleOptions *o, int n, int h, int w, GError **error);

/* Runs every step on x (in: x_T, out: x_0), [n, C, h, w]. */
gboolean gd_sample_run (const GdSampleOptions *o, float *x, int n, int h, int w, GError **error);

G_END_DECLS
