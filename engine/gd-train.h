/* Training: the losses of guided diffusion with their gradients, AdamW, gradient-norm
 * clipping and the exponential moving average of the weights. */
#pragma once
#include "gd-diffusion.h"
#include "gd-model.h"

G_BEGIN_DECLS

typedef struct {
  float *mse;   /* [n] mean squared error of eps */
  float *vb;    /* [n] variational bound term in bits per dimension (learned sigma), else NULL */
  float *loss;  /* [n] mse + vb */
} GdLossTerms;

/* The diffusion loss of Ho et al. (2020) and, for learned-sigma models, the hybrid loss of
 * Nichol & Dhariwal (2021): x_t = q_sample(x_start, t, noise); loss = mse(eps) + vb, where
 * vb sees the eps prediction frozen and is the decoder log-likelihood at t = 0.
 * `diffusion` is the unrespaced process; t are its timesteps.  Returns the batch mean
 * (what is differentiated) and, when the model's gradients are enabled, accumulates them.
 * terms may be NULL. */
gboolean gd_train_diffusion_loss (GdModel *model, const GdDiffusion *diffusion,
                                  const float *x_start, const float *noise, const int64_t *t,
                                  const int64_t *y, int n, GdLossTerms *terms, double *loss,
                                  GError **error);

/* The noisy classifier's loss: mean cross-entropy of classifier(q_sample(x_start, t, noise), t)
 * against y.  noise NULL trains on the clean images (x_t = x_start).  x_t and logits may
 * be NULL. */
gboolean gd_train_classifier_loss (GdModel *model, const GdDiffusion *diffusion,
                                   const float *x_start, const float *noise, const int64_t *t,
                                   const int64_t *y, int n, float *x_t, float *logits,
                                   double *loss, GError **error);

typedef struct {
  double lr;
  double beta1, beta2, eps;
  double weight_decay;   /* decoupled (AdamW) */
  double grad_clip;      /* global norm bound; 0 = none */
  int warmup_steps;      /* linear learning-rate warm-up */
  gint64 decay_steps;    /* cosine decay of the learning rate to 0 over the last decay_steps */
  gint64 total_steps;    /* ... of this many (decay_steps 0: constant after the warm-up) */
  double ema_rate;
} GdOptimSettings;

/* The learning rate of update number step (1, 2, ...): lr, scaled by step / warmup_steps
 * during the warm-up and by (1 + cos(pi d / decay_steps)) / 2 at d steps into the decay. */
double gd_optim_learning_rate (const GdOptimSettings *settings, gint64 step);

typedef struct GdOptimizer GdOptimizer;

/* Takes over the model's parameters: they become owned copies (so the file mapping is no
 * longer written through) and get gradients. */
GdOptimizer *gd_optimizer_new (GdModel *model, const GdOptimSettings *settings);
void gd_optimizer_free (GdOptimizer *opt);
/* One update from the accumulated gradients, then zeroes them.  Returns the gradient norm
 * before clipping. */
double gd_optimizer_step (GdOptimizer *opt);
gint64 gd_optimizer_get_step (const GdOptimizer *opt);
/* The EMA weights of parameter i (same order as the model's parameters). */
float *gd_optimizer_ema (GdOptimizer *opt, guint i);
/* Adam moments of parameter i, for checkpoints. */
float *gd_optimizer_moment (GdOptimizer *opt, guint i, int which);
void gd_optimizer_set_step (GdOptimizer *opt, gint64 step);

G_END_DECLS
