/* The classifier-guided sampling loop: from x_T down to x_0 through the respaced steps,
 * running the diffusion model and (when guiding) the classifier gradient at each step. */
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
} GdSampleOptions;

/* Random numbers of the sampler.  Image j of a batch draws from key seed + j, so an
 * image does not depend on its batch; x_T is stream 0, the noise of respaced step k is
 * stream k + 1. */
void gd_sample_initial_noise (uint64_t seed, int n, size_t per_image, float *x);
void gd_sample_step_noise (uint64_t seed, int step, int n, size_t per_image, float *noise);

/* Checks that the model, classifier, diffusion and labels fit together for n images of h x w. */
gboolean gd_sample_check (const GdSampleOptions *o, int n, int h, int w, GError **error);

/* Runs every step on x (in: x_T, out: x_0), [n, C, h, w]. */
gboolean gd_sample_run (const GdSampleOptions *o, float *x, int n, int h, int w, GError **error);

G_END_DECLS
