/* gd:scheduler-step — one guided reverse step x_t -> x_{t-1}: DDPM with the mean shifted
 * by s * Sigma * grad (Dhariwal & Nichol 2021, Algorithm 1) or DDIM with eps shifted by
 * -sqrt(1 - alpha_bar) * s * grad (Algorithm 2).  The noise of a stochastic step k is
 * stream k + 1 of key `seed`, the noise gd:sample draws at that step. */
#include "gd-config-description.h"

#ifdef GEGL_PROPERTIES

property_file_path (model, "Model", "")
  description ("Diffusion model whose schedule and variance the step uses (empty: the default model of the data dir)")
property_string (model_config, "Model config", "")
  description (GD_CONFIG_DESCRIPTION)
property_double (eta, "Eta", 0.0)
  description ("DDIM noise: 0 is deterministic, 1 matches DDPM's variance")
  value_range (0.0, 10.0)
  ui_range (0.0, 1.0)
#include "gd-step-property.h"
#include "gd-schedule-properties.h"
property_double (guidance_scale, "Guidance scale", 1.0)
  description ("Scale s of the classifier gradient on aux2 (0: no guidance)")
  value_range (-1000.0, 1000.0)
  ui_range (0.0, 30.0)
property_seed (seed, "Seed", rand)
  description ("Random seed of the step's noise (DDPM, or DDIM with eta > 0)")
property_boolean (clip_denoised, "Clip denoised", TRUE)
  description ("Clamp the predicted x_0 to [-1, 1]")

#else

#define GEGL_OP_COMPOSER3
#define GEGL_OP_NAME gd_scheduler_step
#define GEGL_OP_C_SOURCE gd-scheduler-step.c

#include "gd-op-common.h"
#include "gegl-op.h"
#include "gd-error.h"
#include "gd-sampler.h"
#include "gd-tensor-buffer.h"

/* A pad's tensor must cover the same pixels as x_t. */
static gboolean
check_same_box (const char *pad, const GeglRectangle *box, const GeglRectangle *input,
                GError **error)
{
  if (gegl_rectangle_equal (box, input))
    return TRUE;
  g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
               "the %s tensor covers %dx%d at (%d, %d) but x_t covers %dx%d at (%d, %d)", pad,
               box->width, box->height, box->x, box->y, input->width, input->height, input->x,
               input->y);
  return FALSE;
}

static gboolean
plan (GeglOperation *operation, GdOpPlan *p, gboolean *quiet, GError **error)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  p->model = gd_op_get_model (operation, "gd-model", o->model, o->model_config, GD_MODEL_UNET, error);
  if (!p->model)
    return FALSE;
  const GdModelConfig *cfg = gd_model_get_config (p->model->model);
  p->diffusion = gd_op_diffusion (p->model->model, o->steps, o->respacing, o->sampler, error);
  if (!p->diffusion || !gd_op_check_step (o->step, p->diffusion, error))
    return FALSE;
  gboolean learned = cfg->out_channels == 2 * cfg->in_channels;
  if (learned != (p->diffusion->variance == GD_VARIANCE_LEARNED_RANGE))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "%s: its %d output channels do not fit the variance of its diffusion settings",
                   gd_model_get_origin (p->model->model), cfg->out_channels);
      return FALSE;
    }
  if (!gd_op_source_box (operation, "input", &p->box, quiet, error))
    {
      if (!*quiet)
        g_prefix_error (error, "x_t missing: ");
      return FALSE;
    }
  if (!gd_op_check_channels (operation, "input", "x_t", cfg->in_channels, p->model->model, error))
    return FALSE;
  /* the step does not use the class; any valid one lets the size be checked */
  int64_t any_class = 0;
  if (!gd_op_check_size (p->model->model, cfg->in_channels, &p->box,
                         cfg->num_classes > 0 ? &any_class : NULL, error))
    return FALSE;
  GeglRectangle aux;
  if (!gd_op_source_box (operation, "aux", &aux, quiet, error))
    {
      if (!*quiet)
        g_prefix_error (error, "model output missing (connect gd:noise-predict to aux): ");
      return FALSE;
    }
  if (!check_same_box ("aux (model output)", &aux, &p->box, error)
      || !gd_op_check_channels (operation, "aux", "the model output on aux", cfg->out_channels,
                                p->model->model, error))
    return FALSE;
  if (gegl_operation_get_source_node (operation, "aux2"))
    {
      GeglRectangle gradient;
      if (!gd_op_source_box (operation, "aux2", &gradient, quiet, error))
        return FALSE;
      if (!check_same_box ("aux2 (gradient)", &gradient, &p->box, error)
          || !gd_op_check_channels (operation, "aux2", "the gradient on aux2", cfg->in_channels,
                                    p->model->model, error))
        return FALSE;
      p->has_gradient = TRUE;
    }
  return TRUE;
}

static void
prepare (GeglOperation *operation)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdCachedModel *model = gd_op_get_model (operation, "gd-model", o->model, o->model_config, GD_MODEL_UNET, NULL);
  const GdModelConfig *cfg = model ? gd_model_get_config (model->model) : NULL;
  const Babl *tensor = gd_tensor_format (cfg ? cfg->in_channels : 3);
  gegl_operation_set_format (operation, "input", tensor);
  gegl_operation_set_format (operation, "aux", gd_tensor_format (cfg ? cfg->out_channels : 3));
  gegl_operation_set_format (operation, "aux2", tensor);
  gegl_operation_set_format (operation, "output", tensor);
}

static gboolean
process (GeglOperation *operation, GeglBuffer *input, GeglBuffer *aux, GeglBuffer *aux2,
         GeglBuffer *output, const GeglRectangle *result, gint level)
{
  (void) result;
  (void) level;
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdOpPlan p;
  GError *error = NULL;
  if (gd_op_plan_begin (operation, plan, &p, &error) && input && aux)
    {
      const GdModelConfig *cfg = gd_model_get_config (p.model->model);
      int channels = cfg->in_channels, hw = p.box.width * p.box.height;
      size_t count = (size_t) channels * hw;
      GdStepSettings settings = {
        .sampler = gd_op_sampler_kind (o->sampler),
        .eta = o->eta,
        .guidance_scale = o->guidance_scale,
        .clip_denoised = o->clip_denoised,
      };
      float *x = gd_tensor_from_buffer (input, &p.box, channels);
      float *model_out = gd_tensor_from_buffer (aux, &p.box, cfg->out_channels);
      gboolean guided = p.has_gradient && aux2 && o->guidance_scale != 0.0;
      float *grad = guided ? gd_tensor_from_buffer (aux2, &p.box, channels) : NULL;
      float *noise = NULL;
      if (o->step > 0 && (settings.sampler == GD_SAMPLER_DDPM || settings.eta != 0.0))
        {
          noise = g_new (float, count);
          gd_sample_step_noise (o->seed, o->step, 1, count, noise);
        }
      float *x_prev = g_new (float, count), *pred_xstart = g_new (float, count);
      gd_diffusion_step (p.diffusion, &settings, o->step, x, model_out, 1, channels,
                         cfg->out_channels, hw, grad, noise, x_prev, pred_xstart);
      gd_tensor_to_buffer (output, &p.box, x_prev, channels);
      g_free (x);
      g_free (model_out);
      g_free (grad);
      g_free (noise);
      g_free (x_prev);
      g_free (pred_xstart);
    }
  gd_op_plan_end (operation, &p, error);
  return TRUE;
}

static void
gegl_op_class_init (GeglOpClass *klass)
{
  GeglOperationClass *operation_class = GEGL_OPERATION_CLASS (klass);
  GeglOperationComposer3Class *composer_class = GEGL_OPERATION_COMPOSER3_CLASS (klass);

  composer_class->process = process;
  composer_class->aux_label = "Model output";
  composer_class->aux_description =
    "eps from gd:noise-predict (2C channels, eps then variance values, for learned-sigma models)";
  composer_class->aux2_label = "Gradient";
  composer_class->aux2_description =
    "d/dx log p(y | x_t) from gd:classifier-gradient (optional: without it, no guidance)";
  gd_op_class_setup (operation_class, prepare, plan, TRUE);

  gegl_operation_class_set_keys (operation_class,
    "name", "gd:scheduler-step",
    "title", "Diffusion Scheduler Step",
    "categories", "render",
    "description",
      "One classifier-guided reverse diffusion step: x_t on input, the model output on aux, "
      "the classifier gradient on aux2 (optional), x_{t-1} out.  DDPM shifts the mean by "
      "s * Sigma * gradient (Algorithm 1 of Dhariwal & Nichol 2021); DDIM shifts eps by "
      "-sqrt(1 - alpha_bar) * s * gradient (Algorithm 2).",
    NULL);
}

#endif
