#include "gd-diffusion.h"
#include "gd-error.h"

#include <fenv.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

gboolean
gd_schedule_from_name (const char *name, GdScheduleKind *kind, GError **error)
{
  if (g_strcmp0 (name, "linear") == 0)
    *kind = GD_SCHEDULE_LINEAR;
  else if (g_strcmp0 (name, "cosine") == 0)
    *kind = GD_SCHEDULE_COSINE;
  else
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                   "unknown noise schedule '%s' (linear or cosine)", name ? name : "");
      return FALSE;
    }
  return TRUE;
}

gboolean
gd_sampler_from_name (const char *name, GdSamplerKind *kind, GError **error)
{
  if (g_strcmp0 (name, "ddpm") == 0)
    *kind = GD_SAMPLER_DDPM;
  else if (g_strcmp0 (name, "ddim") == 0)
    *kind = GD_SAMPLER_DDIM;
  else
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "unknown sampler '%s' (ddpm or ddim)",
                   name ? name : "");
      return FALSE;
    }
  return TRUE;
}

/* Nichol & Dhariwal (2021) eq. 17: alpha_bar(t) = cos^2(((t / T) + s) / (1 + s) * pi / 2), s = 0.008 */
static double
cosine_alpha_bar (double t)
{
  double c = cos ((t + 0.008) / 1.008 * M_PI / 2.0);
  return c * c;
}

double *
gd_beta_schedule (GdScheduleKind kind, int steps)
{
  double *betas = g_new (double, steps);
  if (kind == GD_SCHEDULE_LINEAR)
    {
      /* Ho et al. (2020): 1e-4 to 0.02 over 1000 steps, scaled for other step counts */
      double scale = 1000.0 / steps;
      double start = scale * 0.0001, end = scale * 0.02;
      double delta = (end - start) / (steps > 1 ? steps - 1 : 1);
      for (int i = 0; i < steps; i++)
        betas[i] = start + i * delta;
      if (steps > 1)
        betas[steps - 1] = end;
    }
  else
    for (int i = 0; i < steps; i++)
      {
        double t1 = (double) i / steps, t2 = (double) (i + 1) / steps;
        betas[i] = MIN (1.0 - cosine_alpha_bar (t2) / cosine_alpha_bar (t1), 0.999);
      }
  return betas;
}

static int
compare_int (const void *a, const void *b)
{
  int x = *(const int *) a, y = *(const int *) b;
  return x < y ? -1 : x > y;
}

static gboolean
respacing_error (GError **error, const char *spec, const char *why)
{
  g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "invalid respacing '%s': %s", spec, why);
  return FALSE;
}

static gboolean
parse_count (const char *text, long *value)
{
  char *end;
  if (!*text)
    return FALSE;
  *value = strtol (text, &end, 10);
  return *end == '\0' && *value > 0 && *value < (1L << 30);
}

gboolean
gd_space_timesteps (int steps, const char *spec, int **kept, int *count, GError **error)
{
  GArray *taken = g_array_new (FALSE, FALSE, sizeof (int));
  if (spec == NULL || *spec == '\0')
    {
      for (int i = 0; i < steps; i++)
        g_array_append_val (taken, i);
    }
  else if (g_str_has_prefix (spec, "ddim"))
    {
      long desired;
      if (!parse_count (spec + 4, &desired))
        {
          g_array_unref (taken);
          return respacing_error (error, spec, "expected ddimN with a positive count N");
        }
      /* the smallest integer stride giving exactly `desired` steps */
      int stride = 0;
      for (int i = 1; i < steps && !stride; i++)
        if ((steps + i - 1) / i == desired)
          stride = i;
      if (!stride)
        {
          char *why = g_strdup_printf ("no integer stride gives exactly %ld of %d steps", desired, steps);
          respacing_error (error, spec, why);
          g_free (why);
          g_array_unref (taken);
          return FALSE;
        }
      for (int i = 0; i < steps; i += stride)
        g_array_append_val (taken, i);
    }
  else
    {
      char **parts = g_strsplit (spec, ",", -1);
      int sections = (int) g_strv_length (parts);
      int size_per = steps / sections, extra = steps % sections, start = 0;
      for (int s = 0; s < sections; s++)
        {
          long section_count = 0;
          int size = size_per + (s < extra ? 1 : 0);
          char *why = NULL;
          if (!parse_count (g_strstrip (parts[s]), &section_count))
            why = g_strdup_printf ("'%s' is not a positive step count", parts[s]);
          else if (size < section_count)
            why = g_strdup_printf ("cannot take %ld steps from a section of %d", section_count, size);
          if (why)
            {
              respacing_error (error, spec, why);
              g_free (why);
              g_strfreev (parts);
              g_array_unref (taken);
              return FALSE;
            }
          double stride = section_count <= 1 ? 1.0 : (double) (size - 1) / (double) (section_count - 1);
          double position = 0.0;
          /* Python's round(): halves to even, which rint does in the default rounding mode */
          for (long j = 0; j < section_count; j++)
            {
              int t = start + (int) rint (position);
              g_array_append_val (taken, t);
              position += stride;
            }
          start += size;
        }
      g_strfreev (parts);
    }
  g_array_sort (taken, compare_int);
  /* the reference keeps a set: drop repeats */
  guint unique = 0;
  for (guint i = 0; i < taken->len; i++)
    if (unique == 0 || g_array_index (taken, int, i) != g_array_index (taken, int, unique - 1))
      g_array_index (taken, int, unique++) = g_array_index (taken, int, i);
  *count = (int) unique;
  *kept = (int *) g_array_free (taken, FALSE);
  return TRUE;
}

void
gd_diffusion_free (GdDiffusion *d)
{
  if (!d)
    return;
  g_free (d->timestep_map);
  g_free (d->betas);
  g_free (d->alphas_cumprod);
  g_free (d->alphas_cumprod_prev);
  g_free (d->sqrt_recip_alphas_cumprod);
  g_free (d->sqrt_recipm1_alphas_cumprod);
  g_free (d->posterior_variance);
  g_free (d->posterior_log_variance_clipped);
  g_free (d->posterior_mean_coef1);
  g_free (d->posterior_mean_coef2);
  g_free (d);
}

GdDiffusion *
gd_diffusion_new (GdScheduleKind schedule, int steps, const char *respacing,
                  GdVarianceKind variance, GError **error)
{
  if (steps < 2 || steps > 100000)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "diffusion steps %d out of range (2 to 100000)", steps);
      return NULL;
    }
  int *kept, count;
  if (!gd_space_timesteps (steps, respacing, &kept, &count, error))
    return NULL;
  double *base = gd_beta_schedule (schedule, steps);
  GdDiffusion *d = g_new0 (GdDiffusion, 1);
  d->original_steps = steps;
  d->num_steps = count;
  d->timestep_map = kept;
  d->variance = variance;
  int N = count;
  d->betas = g_new (double, N);
  /* Respacing: keep alpha_bar at the kept timesteps, beta_k = 1 - alpha_bar_k / alpha_bar_{k-1} */
  double alpha_bar = 1.0, last = 1.0;
  int next = 0;
  for (int t = 0; t < steps && next < N; t++)
    {
      alpha_bar *= 1.0 - base[t];
      if (t == kept[next])
        {
          d->betas[next++] = 1.0 - alpha_bar / last;
          last = alpha_bar;
        }
    }
  g_free (base);

  d->alphas_cumprod = g_new (double, N);
  d->alphas_cumprod_prev = g_new (double, N);
  d->sqrt_recip_alphas_cumprod = g_new (double, N);
  d->sqrt_recipm1_alphas_cumprod = g_new (double, N);
  d->posterior_variance = g_new (double, N);
  d->posterior_log_variance_clipped = g_new (double, N);
  d->posterior_mean_coef1 = g_new (double, N);
  d->posterior_mean_coef2 = g_new (double, N);
  double cumprod = 1.0;
  for (int k = 0; k < N; k++)
    {
      d->alphas_cumprod_prev[k] = cumprod;
      cumprod *= 1.0 - d->betas[k];
      d->alphas_cumprod[k] = cumprod;
    }
  for (int k = 0; k < N; k++)
    {
      double ab = d->alphas_cumprod[k], ab_prev = d->alphas_cumprod_prev[k], beta = d->betas[k];
      d->sqrt_recip_alphas_cumprod[k] = sqrt (1.0 / ab);
      d->sqrt_recipm1_alphas_cumprod[k] = sqrt (1.0 / ab - 1.0);
      /* Ho et al. (2020) eq. 7: the posterior q(x_{t-1} | x_t, x_0) */
      d->posterior_variance[k] = beta * (1.0 - ab_prev) / (1.0 - ab);
      d->posterior_mean_coef1[k] = beta * sqrt (ab_prev) / (1.0 - ab);
      d->posterior_mean_coef2[k] = (1.0 - ab_prev) * sqrt (1.0 - beta) / (1.0 - ab);
    }
  /* the posterior variance is 0 at the first step: its log is clipped to the next value */
  for (int k = 0; k < N; k++)
    d->posterior_log_variance_clipped[k] =
        log (k == 0 && N > 1 ? d->posterior_variance[1] : d->posterior_variance[k]);
  return d;
}

/* The variance and log-variance of p(x_{t-1} | x_t) at step k for one value of the
 * model's variance output v (learned range: Nichol & Dhariwal 2021, eq. 15). */
static void
step_variance (const GdDiffusion *d, int k, float v, float *variance, float *log_variance)
{
  switch (d->variance)
    {
    case GD_VARIANCE_LEARNED_RANGE:
      {
        float min_log = (float) d->posterior_log_variance_clipped[k];
        float max_log = (float) log (d->betas[k]);
        float frac = (v + 1.0f) / 2.0f;
        *log_variance = frac * max_log + (1.0f - frac) * min_log;
        *variance = expf (*log_variance);
        break;
      }
    case GD_VARIANCE_FIXED_LARGE:
      {
        double var = (k == 0 && d->num_steps > 1) ? d->posterior_variance[1] : d->betas[k];
        *variance = (float) var;
        *log_variance = (float) log (var);
        break;
      }
    case GD_VARIANCE_FIXED_SMALL:
      *variance = (float) d->posterior_variance[k];
      *log_variance = (float) d->posterior_log_variance_clipped[k];
      break;
    }
}

void
gd_diffusion_step (const GdDiffusion *d, const GdStepSettings *s, int k,
                   const float *x, const float *model_out, int n, int channels,
                   int model_channels_out, int hw, const float *grad, const float *noise,
                   float *x_prev, float *pred_xstart)
{
  gboolean learned = model_channels_out == 2 * channels;
  float recip = (float) d->sqrt_recip_alphas_cumprod[k];
  float recipm1 = (float) d->sqrt_recipm1_alphas_cumprod[k];
  float coef1 = (float) d->posterior_mean_coef1[k], coef2 = (float) d->posterior_mean_coef2[k];
  float alpha_bar = (float) d->alphas_cumprod[k], alpha_bar_prev = (float) d->alphas_cumprod_prev[k];
  float scale = (float) s->guidance_scale;
  float nonzero = k != 0 ? 1.0f : 0.0f;
  /* DDIM (Song et al. 2021, eq. 16): sigma = eta sqrt((1 - ab') / (1 - ab)) sqrt(1 - ab / ab') */
  float sigma = (float) s->eta * sqrtf ((1.0f - alpha_bar_prev) / (1.0f - alpha_bar))
                * sqrtf (1.0f - alpha_bar / alpha_bar_prev);
  float sqrt_one_minus_ab = sqrtf (1.0f - alpha_bar);
  size_t per_image = (size_t) channels * hw;
  for (int i = 0; i < n; i++)
    for (size_t j = 0; j < per_image; j++)
      {
        size_t idx = (size_t) i * per_image + j;
        const float *out_image = model_out + (size_t) i * model_channels_out * hw;
        float eps = out_image[j];
        float xt = x[idx];
        float x0 = recip * xt - recipm1 * eps;
        if (s->clip_denoised)
          x0 = CLAMP (x0, -1.0f, 1.0f);
        float g = grad ? grad[idx] * scale : 0.0f;
        float z = noise ? noise[idx] : 0.0f;
        float result;
        if (s->sampler == GD_SAMPLER_DDPM)
          {
            float variance = 0.0f, log_variance = 0.0f;
            step_variance (d, k, learned ? out_image[per_image + j] : 0.0f, &variance, &log_variance);
            float mean = coef1 * x0 + coef2 * xt;
            /* Algorithm 1: mean + s * Sigma * grad */
            mean = mean + variance * g;
            result = mean + nonzero * expf (0.5f * log_variance) * z;
          }
        else
          {
            float e = (recip * xt - x0) / recipm1;
            if (grad)
              {
                /* Algorithm 2: eps - sqrt(1 - alpha_bar) * s * grad, and x_0 from it */
                e = e - sqrt_one_minus_ab * g;
                x0 = recip * xt - recipm1 * e;
              }
            float mean = x0 * sqrtf (alpha_bar_prev)
                         + sqrtf (1.0f - alpha_bar_prev - sigma * sigma) * e;
            result = mean + nonzero * sigma * z;
          }
        x_prev[idx] = result;
        if (pred_xstart)
          pred_xstart[idx] = x0;
      }
}

void
gd_diffusion_q_sample (const GdDiffusion *d, int k, const float *x0, const float *noise,
                       size_t count, float *xt)
{
  float a = (float) sqrt (d->alphas_cumprod[k]), b = (float) sqrt (1.0 - d->alphas_cumprod[k]);
  for (size_t i = 0; i < count; i++)
    xt[i] = a * x0[i] + b * noise[i];
}
