/* The Gaussian diffusion process of guided diffusion: beta schedules, timestep respacing,
 * posterior mean and variance, and the two guided samplers of Dhariwal & Nichol (2021):
 * Algorithm 1 (DDPM, mean shifted by s * Sigma * grad) and Algorithm 2 (DDIM, eps shifted
 * by -sqrt(1 - alpha_bar) * s * grad).  Schedules are float64; per-step coefficients are
 * rounded to float32 before use, as the reference does. */
#pragma once
#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef enum { GD_SCHEDULE_LINEAR, GD_SCHEDULE_COSINE } GdScheduleKind;
typedef enum {
  GD_VARIANCE_LEARNED_RANGE,  /* learned-sigma models: interpolate log beta and log posterior variance */
  GD_VARIANCE_FIXED_LARGE,    /* beta_t (posterior variance at t = 0) */
  GD_VARIANCE_FIXED_SMALL,    /* posterior variance */
} GdVarianceKind;
typedef enum { GD_SAMPLER_DDPM, GD_SAMPLER_DDIM } GdSamplerKind;

gboolean gd_schedule_from_name (const char *name, GdScheduleKind *kind, GError **error);
gboolean gd_sampler_from_name (const char *name, GdSamplerKind *kind, GError **error);

/* betas[0..steps) of the named schedule. */
double *gd_beta_schedule (GdScheduleKind kind, int steps);

/* The kept timesteps (sorted, distinct) of a respacing string for `steps` diffusion steps:
 * "250" (evenly spaced count), "ddim25" (an exact integer stride), "10,15,20" (counts per
 * equal section), or "" (all steps). */
gboolean gd_space_timesteps (int steps, const char *spec, int **kept, int *count, GError **error);

typedef struct {
  int original_steps;
  int num_steps;                 /* steps of the respaced process */
  int *timestep_map;             /* respaced index -> original timestep the networks receive */
  GdVarianceKind variance;
  double *betas, *alphas_cumprod, *alphas_cumprod_prev;
  double *sqrt_recip_alphas_cumprod, *sqrt_recipm1_alphas_cumprod;
  double *posterior_variance, *posterior_log_variance_clipped;
  double *posterior_mean_coef1, *posterior_mean_coef2;
} GdDiffusion;

/* The respaced process: betas recomputed so that its alpha_bar equals the original's at
 * every kept timestep. */
GdDiffusion *gd_diffusion_new (GdScheduleKind schedule, int steps, const char *respacing,
                               GdVarianceKind variance, GError **error);
void gd_diffusion_free (GdDiffusion *d);

typedef struct {
  GdSamplerKind sampler;
  double eta;                 /* DDIM: 0 = deterministic */
  double guidance_scale;      /* s; 0 = no guidance */
  gboolean clip_denoised;     /* clamp the predicted x_0 to [-1, 1] */
} GdStepSettings;

/* One reverse step at respaced index `step` for n images of `count` values each.
 * model_out: [n, 2C, ...] for learned-range models (eps then variance values),
 * else [n, C, ...]; `model_channels_out` says which.  grad: the classifier gradient
 * d/dx log p(y | x_t) (unscaled) or NULL.  noise: standard normal numbers or NULL (zero).
 * Writes x_prev and pred_xstart (the model's x_0 estimate; after guidance for DDIM). */
void gd_diffusion_step (const GdDiffusion *d, const GdStepSettings *settings, int step,
                        const float *x, const float *model_out, int n, int channels,
                        int model_channels_out, int hw, const float *grad, const float *noise,
                        float *x_prev, float *pred_xstart);

/* x_t = sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) noise at respaced index `step`
 * (q_sample, for SDEdit-style variation and inpainting). */
void gd_diffusion_q_sample (const GdDiffusion *d, int step, const float *x0, const float *noise,
                            size_t count, float *xt);

G_END_DECLS
