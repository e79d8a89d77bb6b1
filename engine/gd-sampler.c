#include "gd-sampler.h"
#include "gd-error.h"
#include "gd-random.h"

#include <math.h>
#include <string.h>

#define GD_KNOWN_NOISE_STREAM ((uint64_t) 1 << 32)

void
gd_sample_initial_noise (uint64_t seed, int n, size_t per_image, float *x)
{
  for (int j = 0; j < n; j++)
    gd_random_normal (seed + (uint64_t) j, 0, x + (size_t) j * per_image, per_image);
}

void
gd_sample_step_noise (uint64_t seed, int step, int n, size_t per_image, float *noise)
{
  for (int j = 0; j < n; j++)
    gd_random_normal (seed + (uint64_t) j, (uint64_t) step + 1, noise + (size_t) j * per_image,
                      per_image);
}

void
gd_sample_known_noise (uint64_t seed, int step, int n, size_t per_image, float *noise)
{
  for (int j = 0; j < n; j++)
    gd_random_normal (seed + (uint64_t) j, GD_KNOWN_NOISE_STREAM + (uint64_t) step,
                      noise + (size_t) j * per_image, per_image);
}

int64_t
gd_sample_draw_class (uint64_t seed, int image, int class_count)
{
  g_return_val_if_fail (class_count > 0, 0);
  gint64 key = (gint64) (seed + (uint64_t) image);
  return (int64_t) (g_int64_hash (&key) % (guint) class_count);
}

int
gd_sample_steps_for_strength (int num_steps, double strength)
{
  return (int) CLAMP (floor (strength * num_steps + 0.5), 0, num_steps);
}

gboolean
gd_sample_check (const GdSampleOptions *o, int n, int h, int w, GError **error)
{
  const GdModelConfig *mc = gd_model_get_config (o->model);
  if (mc->kind != GD_MODEL_UNET)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s is a classifier, not a diffusion model",
                   gd_model_get_origin (o->model));
      return FALSE;
    }
  gboolean learned = mc->out_channels == 2 * mc->in_channels;
  if (!learned && mc->out_channels != mc->in_channels)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "%s outputs %d channels for %d input channels: neither eps nor eps and variance",
                   gd_model_get_origin (o->model), mc->out_channels, mc->in_channels);
      return FALSE;
    }
  if (learned != (o->diffusion->variance == GD_VARIANCE_LEARNED_RANGE))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   learned ? "%s predicts its variance (learned sigma) but the diffusion settings say fixed variance"
                           : "%s has fixed variance but the diffusion settings say learned sigma",
                   gd_model_get_origin (o->model));
      return FALSE;
    }
  if (mc->num_classes > 0 && !o->labels)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s is class-conditional: a class is needed",
                   gd_model_get_origin (o->model));
      return FALSE;
    }
  if (!gd_model_check_input (o->model, n, mc->in_channels, h, w, mc->num_classes > 0 ? o->labels : NULL, error))
    return FALSE;
  if (o->init_image && !(o->strength >= 0.0 && o->strength <= 1.0))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "strength %g is outside [0, 1]", o->strength);
      return FALSE;
    }
  if (o->mask && !o->init_image)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "inpainting with a mask needs the image to keep");
      return FALSE;
    }
  if (o->classifier)
    {
      const GdModelConfig *cc = gd_model_get_config (o->classifier);
      if (cc->kind != GD_MODEL_CLASSIFIER)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s is not a classifier",
                       gd_model_get_origin (o->classifier));
          return FALSE;
        }
      if (cc->in_channels != mc->in_channels || (cc->pool == GD_POOL_ATTENTION && cc->image_size != h))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "classifier %s (%d channels, %dx%d) does not fit the model's %d channels at %dx%d",
                       gd_model_get_origin (o->classifier), cc->in_channels, cc->image_size,
                       cc->image_size, mc->in_channels, h, w);
          return FALSE;
        }
      if (!o->labels)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "guidance by %s needs a class",
                       gd_model_get_origin (o->classifier));
          return FALSE;
        }
      for (int i = 0; i < n; i++)
        if (o->labels[i] < 0 || o->labels[i] >= cc->out_channels)
          {
            g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                         "class %" G_GINT64_FORMAT " is out of range for classifier %s (0 to %d)",
                         o->labels[i], gd_model_get_origin (o->classifier), cc->out_channels - 1);
            return FALSE;
          }
      if (!gd_model_check_input (o->classifier, n, cc->in_channels, h, w, NULL, error))
        return FALSE;
    }
  return TRUE;
}

/* x <- mask * x + (1 - mask) * known, the mask shared by the channels of each image. */
static void
replace_known (float *x, const float *known, const float *mask, int n, int channels, int hw)
{
  for (int j = 0; j < n; j++)
    for (int c = 0; c < channels; c++)
      {
        float *xc = x + ((size_t) j * channels + c) * hw;
        const float *kc = known + ((size_t) j * channels + c) * hw, *m = mask + (size_t) j * hw;
        for (int i = 0; i < hw; i++)
          xc[i] = m[i] * xc[i] + (1.0f - m[i]) * kc[i];
      }
}

gboolean
gd_sample_run (const GdSampleOptions *o, float *x, int n, int h, int w, GError **error)
{
  if (!gd_sample_check (o, n, h, w, error))
    return FALSE;
  const GdModelConfig *mc = gd_model_get_config (o->model);
  const GdDiffusion *d = o->diffusion;
  int channels = mc->in_channels, out_channels = mc->out_channels, hw = h * w;
  size_t per_image = (size_t) channels * hw, count = (size_t) n * per_image;
  int runs = d->num_steps;
  if (o->init_image)
    {
      runs = gd_sample_steps_for_strength (d->num_steps, o->strength);
      /* SDEdit: x_t = q_sample(image, t) at the first step run, x (x_T) being the noise */
      if (runs > 0)
        gd_diffusion_q_sample (d, runs - 1, o->init_image, x, count, x);
      else
        memcpy (x, o->init_image, sizeof (float) * count);
    }
  float *model_out = g_new (float, (size_t) n * out_channels * hw);
  gboolean guided = o->classifier && o->settings.guidance_scale != 0.0;
  float *grad = guided ? g_new (float, count) : NULL;
  float *noise = g_new (float, count), *x_prev = g_new (float, count);
  float *pred_xstart = g_new (float, count);
  float *known = o->mask ? g_new (float, count) : NULL;
  int64_t *t = g_new (int64_t, n);
  gboolean ok = TRUE;
  /* the diffusion model runs forward only: its layers share their scratch */
  gboolean was_inference = gd_model_get_inference (o->model);
  gd_model_set_inference (o->model, TRUE);

  for (int it = 0; it < runs && ok; it++)
    {
      int k = runs - 1 - it;
      for (int i = 0; i < n; i++)
        t[i] = d->timestep_map[k];
      ok = gd_model_forward (o->model, x, n, h, w, t, mc->num_classes > 0 ? o->labels : NULL,
                             model_out, error);
      /* the classifier sees x_t and the original timestep */
      if (ok && guided)
        ok = gd_classifier_gradient (o->classifier, x, n, h, w, t, o->labels, NULL, grad, error);
      if (!ok)
        break;
      gboolean stochastic = k > 0 && (o->settings.sampler == GD_SAMPLER_DDPM || o->settings.eta != 0.0);
      const float *step_noise = NULL;
      if (o->noise_fn)
        {
          o->noise_fn (o->user, it, noise, count);
          step_noise = noise;
        }
      else if (stochastic)
        {
          gd_sample_step_noise (o->seed, k, n, per_image, noise);
          step_noise = noise;
        }
      gd_diffusion_step (d, &o->settings, k, x, model_out, n, channels, out_channels, hw,
                         guided ? grad : NULL, step_noise, x_prev, pred_xstart);
      memcpy (x, x_prev, sizeof (float) * count);
      if (o->mask)
        {
          /* the known image at the step just reached: x_{k-1} noised, or x_0 itself */
          if (k > 0)
            {
              gd_sample_known_noise (o->seed, k - 1, n, per_image, known);
              gd_diffusion_q_sample (d, k - 1, o->init_image, known, count, known);
            }
          else
            memcpy (known, o->init_image, sizeof (float) * count);
          replace_known (x, known, o->mask, n, channels, hw);
        }
      if (o->trace_fn)
        o->trace_fn (o->user, it, x, pred_xstart);
      if (o->progress_fn && !o->progress_fn (o->user, it + 1, runs))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_CANCELLED, "sampling stopped after %d of %d steps",
                       it + 1, runs);
          ok = FALSE;
        }
    }
  g_free (model_out);
  g_free (grad);
  g_free (noise);
  g_free (x_prev);
  g_free (pred_xstart);
  g_free (known);
  g_free (t);
  gd_model_set_inference (o->model, was_inference);
  return ok;
}
