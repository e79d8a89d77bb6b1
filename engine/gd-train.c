#include "gd-train.h"
#include "gd-error.h"
#include "gd-kernels.h"

#include <math.h>
#include <string.h>

/* ---- the diffusion loss ---- */

/* Nichol & Dhariwal (2021), appendix: a fast approximation of the standard normal CDF. */
static double
approx_cdf (double x)
{
  return 0.5 * (1.0 + tanh (sqrt (2.0 / M_PI) * (x + 0.044715 * x * x * x)));
}

static double
approx_cdf_derivative (double x)
{
  double u = tanh (sqrt (2.0 / M_PI) * (x + 0.044715 * x * x * x));
  return 0.5 * (1.0 - u * u) * sqrt (2.0 / M_PI) * (1.0 + 3.0 * 0.044715 * x * x);
}

/* log-likelihood of the data x (in [-1, 1], 8-bit bins of width 2/255) under
 * N(mean, exp(log_scale)^2), and its derivative with respect to log_scale
 * (Ho et al. 2020, eq. 13: the decoder at t = 0). */
static double
discretized_log_likelihood (double x, double mean, double log_scale, double *d_log_scale)
{
  double centered = x - mean, inv_std = exp (-log_scale);
  double plus_in = inv_std * (centered + 1.0 / 255.0), min_in = inv_std * (centered - 1.0 / 255.0);
  double cdf_plus = approx_cdf (plus_in), cdf_min = approx_cdf (min_in);
  /* d plus_in / d log_scale = -plus_in, likewise for min_in */
  double d_plus = approx_cdf_derivative (plus_in) * -plus_in;
  double d_min = approx_cdf_derivative (min_in) * -min_in;
  if (x < -0.999)
    {
      *d_log_scale = cdf_plus > 1e-12 ? d_plus / cdf_plus : 0.0;
      return log (MAX (cdf_plus, 1e-12));
    }
  if (x > 0.999)
    {
      double tail = 1.0 - cdf_min;
      *d_log_scale = tail > 1e-12 ? -d_min / tail : 0.0;
      return log (MAX (tail, 1e-12));
    }
  double delta = cdf_plus - cdf_min;
  *d_log_scale = delta > 1e-12 ? (d_plus - d_min) / delta : 0.0;
  return log (MAX (delta, 1e-12));
}

gboolean
gd_train_diffusion_loss (GdModel *model, const GdDiffusion *d, const float *x_start,
                         const float *noise, const int64_t *t, const int64_t *y, int n,
                         GdLossTerms *terms, double *loss, GError **error)
{
  const GdModelConfig *cfg = gd_model_get_config (model);
  int C = cfg->in_channels, h = cfg->image_size, w = cfg->image_size;
  size_t per_image = (size_t) C * h * w;
  gboolean learned = cfg->out_channels == 2 * C;
  if (n < 1)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "empty batch");
      return FALSE;
    }
  if (learned != (d->variance == GD_VARIANCE_LEARNED_RANGE))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                   "%s: its %d output channels do not fit the diffusion's variance type",
                   gd_model_get_origin (model), cfg->out_channels);
      return FALSE;
    }
  for (int i = 0; i < n; i++)
    if (t[i] < 0 || t[i] >= d->num_steps)
      {
        g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "timestep %" G_GINT64_FORMAT
                     " out of range (0 to %d)", t[i], d->num_steps - 1);
        return FALSE;
      }
  float *x_t = g_new (float, n * per_image);
  for (int i = 0; i < n; i++)
    gd_diffusion_q_sample (d, (int) t[i], x_start + i * per_image, noise + i * per_image,
                           per_image, x_t + i * per_image);
  float *out = g_new (float, (size_t) n * cfg->out_channels * h * w);
  int64_t *timesteps = g_new (int64_t, n);
  for (int i = 0; i < n; i++)
    timesteps[i] = d->timestep_map[t[i]];
  gboolean ok = gd_model_forward (model, x_t, n, h, w, timesteps, y, out, error);
  if (!ok)
    goto out;
  float *dout = g_new0 (float, (size_t) n * cfg->out_channels * h * w);
  double total = 0.0;
  for (int i = 0; i < n; i++)
    {
      int k = (int) t[i];
      const float *eps = out + (size_t) i * cfg->out_channels * h * w;
      const float *xs = x_start + i * per_image, *xt = x_t + i * per_image, *z = noise + i * per_image;
      float *deps = dout + (size_t) i * cfg->out_channels * h * w;
      /* mse: mean over the image of (noise - eps)^2 */
      double mse = 0.0;
      for (size_t j = 0; j < per_image; j++)
        {
          double diff = (double) z[j] - eps[j];
          mse += diff * diff;
          deps[j] = (float) (-2.0 * diff / per_image / n);
        }
      mse /= per_image;
      double vb = 0.0;
      if (learned)
        {
          /* The true posterior q(x_{t-1} | x_t, x_0) against p(x_{t-1} | x_t) whose mean
           * comes from the frozen eps (no clipping) and whose variance is learned
           * (Nichol & Dhariwal 2021, eq. 15). */
          double recip = (float) d->sqrt_recip_alphas_cumprod[k];
          double recipm1 = (float) d->sqrt_recipm1_alphas_cumprod[k];
          double coef1 = (float) d->posterior_mean_coef1[k], coef2 = (float) d->posterior_mean_coef2[k];
          double true_log_var = (float) d->posterior_log_variance_clipped[k];
          double min_log = true_log_var, max_log = (float) log (d->betas[k]);
          const float *v = eps + per_image;
          float *dv = deps + per_image;
          for (size_t j = 0; j < per_image; j++)
            {
              double frac = (v[j] + 1.0) / 2.0;
              double log_var = frac * max_log + (1.0 - frac) * min_log;
              double d_log_var_dv = (max_log - min_log) / 2.0;
              double pred_x0 = recip * xt[j] - recipm1 * eps[j];
              double mean = coef1 * pred_x0 + coef2 * xt[j];
              double term, d_term;
              if (k == 0)
                {
                  /* decoder negative log-likelihood, log_scale = log_var / 2 */
                  double d_ll;
                  term = -discretized_log_likelihood (xs[j], mean, 0.5 * log_var, &d_ll);
                  d_term = -0.5 * d_ll;
                }
              else
                {
                  double true_mean = coef1 * xs[j] + coef2 * xt[j];
                  double dm = true_mean - mean;
                  /* KL(N(m1, e^lv1) || N(m2, e^lv2)) */
                  term = 0.5 * (-1.0 + log_var - true_log_var + exp (true_log_var - log_var)
                                + dm * dm * exp (-log_var));
                  d_term = 0.5 * (1.0 - exp (true_log_var - log_var) - dm * dm * exp (-log_var));
                }
              vb += term;
              dv[j] = (float) (d_term * d_log_var_dv / M_LN2 / per_image / n);
            }
          vb = vb / per_image / M_LN2;
        }
      if (terms)
        {
          terms->mse[i] = (float) mse;
          if (terms->vb)
            terms->vb[i] = (float) vb;
          terms->loss[i] = (float) (mse + vb);
        }
      total += mse + vb;
    }
  *loss = total / n;
  gd_model_backward (model, dout, NULL);
  g_free (dout);
out:
  g_free (x_t);
  g_free (out);
  g_free (timesteps);
  return ok;
}

gboolean
gd_train_classifier_loss (GdModel *model, const GdDiffusion *d, const float *x_start,
                          const float *noise, const int64_t *t, const int64_t *y, int n,
                          float *x_t_out, float *logits_out, double *loss, GError **error)
{
  const GdModelConfig *cfg = gd_model_get_config (model);
  int C = cfg->in_channels, h = cfg->image_size, w = cfg->image_size, classes = cfg->out_channels;
  size_t per_image = (size_t) C * h * w;
  if (n < 1)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "empty batch");
      return FALSE;
    }
  for (int i = 0; i < n; i++)
    if (t[i] < 0 || t[i] >= d->num_steps || y[i] < 0 || y[i] >= classes)
      {
        g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "sample %d: timestep %" G_GINT64_FORMAT
                     " or label %" G_GINT64_FORMAT " out of range", i, t[i], y[i]);
        return FALSE;
      }
  float *x_t = x_t_out ? x_t_out : g_new (float, n * per_image);
  float *logits = logits_out ? logits_out : g_new (float, (size_t) n * classes);
  int64_t *timesteps = g_new (int64_t, n);
  for (int i = 0; i < n; i++)
    {
      if (noise)
        gd_diffusion_q_sample (d, (int) t[i], x_start + i * per_image, noise + i * per_image,
                               per_image, x_t + i * per_image);
      else
        memcpy (x_t + i * per_image, x_start + i * per_image, sizeof (float) * per_image);
      timesteps[i] = d->timestep_map[t[i]];
    }
  gboolean ok = gd_model_forward (model, x_t, n, h, w, timesteps, NULL, logits, error);
  if (ok)
    {
      float *dlogits = g_new (float, (size_t) n * classes);
      gd_log_softmax (logits, n, classes, dlogits);
      double total = 0.0;
      for (int i = 0; i < n; i++)
        {
          total -= dlogits[(size_t) i * classes + y[i]];
          /* d mean CE / d logits = (softmax - onehot) / n */
          for (int k = 0; k < classes; k++)
            {
              float *g = &dlogits[(size_t) i * classes + k];
              *g = (expf (*g) - (k == y[i] ? 1.0f : 0.0f)) / n;
            }
        }
      *loss = total / n;
      gd_model_backward (model, dlogits, NULL);
      g_free (dlogits);
    }
  if (!x_t_out)
    g_free (x_t);
  if (!logits_out)
    g_free (logits);
  g_free (timesteps);
  return ok;
}

/* ---- optimiser ---- */

struct GdOptimizer {
  GdModel *model;
  GdOptimSettings s;
  gint64 step;
  GPtrArray *m, *v, *ema;   /* float* per parameter */
};

GdOptimizer *
gd_optimizer_new (GdModel *model, const GdOptimSettings *settings)
{
  GdOptimizer *o = g_new0 (GdOptimizer, 1);
  o->model = model;
  o->s = *settings;
  o->m = g_ptr_array_new_with_free_func (g_free);
  o->v = g_ptr_array_new_with_free_func (g_free);
  o->ema = g_ptr_array_new_with_free_func (g_free);
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      GdParam *p = gd_model_param (model, i);
      if (!p->owns_data)
        {
          p->data = g_memdup2 (p->data, sizeof (float) * p->numel);
          p->owns_data = TRUE;
        }
      g_ptr_array_add (o->m, g_new0 (float, p->numel));
      g_ptr_array_add (o->v, g_new0 (float, p->numel));
      g_ptr_array_add (o->ema, g_memdup2 (p->data, sizeof (float) * p->numel));
    }
  gd_model_enable_grads (model);
  return o;
}

void
gd_optimizer_free (GdOptimizer *o)
{
  if (!o)
    return;
  g_ptr_array_unref (o->m);
  g_ptr_array_unref (o->v);
  g_ptr_array_unref (o->ema);
  g_free (o);
}

gint64 gd_optimizer_get_step (const GdOptimizer *o) { return o->step; }
void gd_optimizer_set_step (GdOptimizer *o, gint64 step) { o->step = step; }
float *gd_optimizer_ema (GdOptimizer *o, guint i) { return o->ema->pdata[i]; }

float *
gd_optimizer_moment (GdOptimizer *o, guint i, int which)
{
  return which == 0 ? o->m->pdata[i] : o->v->pdata[i];
}

double
gd_optim_learning_rate (const GdOptimSettings *s, gint64 step)
{
  double lr = s->lr;
  if (s->warmup_steps > 0 && step < s->warmup_steps)
    lr *= (double) step / s->warmup_steps;
  gint64 decay_start = s->total_steps - s->decay_steps;
  if (s->decay_steps > 0 && step > decay_start)
    {
      double done = MIN (1.0, (double) (step - decay_start) / (double) s->decay_steps);
      lr *= 0.5 * (1.0 + cos (G_PI * done));
    }
  return lr;
}

double
gd_optimizer_step (GdOptimizer *o)
{
  guint count = gd_model_n_params (o->model);
  double norm2 = 0.0;
  for (guint i = 0; i < count; i++)
    {
      GdParam *p = gd_model_param (o->model, i);
      for (size_t j = 0; j < p->numel; j++)
        norm2 += (double) p->grad[j] * p->grad[j];
    }
  double norm = sqrt (norm2);
  double clip = (o->s.grad_clip > 0 && norm > o->s.grad_clip) ? o->s.grad_clip / norm : 1.0;
  o->step++;
  double lr = gd_optim_learning_rate (&o->s, o->step);
  /* Loshchilov & Hutter (2019), Algorithm 2: Adam with decoupled weight decay */
  double bias1 = 1.0 - pow (o->s.beta1, (double) o->step);
  double bias2 = 1.0 - pow (o->s.beta2, (double) o->step);
  /* the EMA's decay grows with the step count, (1 + t) / (10 + t), up to ema_rate, so that
   * the average of a short run is not dominated by the initial weights */
  double ema_decay = MIN (o->s.ema_rate, (1.0 + o->step) / (10.0 + o->step));
  float b1 = (float) o->s.beta1, b2 = (float) o->s.beta2, ema_rate = (float) ema_decay;
  float decay = (float) (1.0 - lr * o->s.weight_decay);
  float step_size = (float) (lr / bias1), sqrt_bias2 = (float) sqrt (bias2), eps = (float) o->s.eps;
  for (guint i = 0; i < count; i++)
    {
      GdParam *p = gd_model_param (o->model, i);
      float *m = o->m->pdata[i], *v = o->v->pdata[i], *ema = o->ema->pdata[i];
      for (size_t j = 0; j < p->numel; j++)
        {
          float g = p->grad[j] * (float) clip;
          m[j] = b1 * m[j] + (1.0f - b1) * g;
          v[j] = b2 * v[j] + (1.0f - b2) * g * g;
          p->data[j] *= decay;
          p->data[j] -= step_size * m[j] / (sqrtf (v[j]) / sqrt_bias2 + eps);
          ema[j] = ema_rate * ema[j] + (1.0f - ema_rate) * p->data[j];
        }
    }
  gd_model_zero_grads (o->model);
  return norm;
}
