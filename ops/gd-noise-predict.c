/* gd:noise-predict — one forward pass of the diffusion U-Net on x_t at respaced step
 * `step`: the predicted noise eps (and, for learned-sigma models, the variance values
 * that interpolate between beta_t and the posterior variance, Nichol & Dhariwal 2021). */
#include "gd-config-description.h"

#ifdef GEGL_PROPERTIES

property_file_path (model, "Model", "")
  description ("Diffusion model file (.safetensors or .pt); empty: the default model of the data dir")
property_string (model_config, "Model config", "")
  description (GD_CONFIG_DESCRIPTION)
property_int (class, "Class", -1)
  description ("Class label for a class-conditional model (-1: none)")
  value_range (-1, 100000)
  ui_range (-1, 1000)
property_string (label, "Label", "")
  description ("Class by name from the model's label list, instead of the index")
#include "gd-step-property.h"
#include "gd-schedule-properties.h"
property_boolean (bf16, "bf16", FALSE)
  description ("Run the diffusion model's convolutions in bfloat16 with float sums (processors with AMX-BF16 or AVX512-BF16): faster, slightly less exact")

#else

#define GEGL_OP_FILTER
#define GEGL_OP_NAME gd_noise_predict
#define GEGL_OP_C_SOURCE gd-noise-predict.c

#include "gd-op-common.h"
#include "gegl-op.h"
#include "gd-error.h"
#include "gd-tensor-buffer.h"

static gboolean
plan (GeglOperation *operation, GdOpPlan *p, gboolean *quiet, GError **error)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  p->model = gd_op_get_model (operation, "gd-model", o->model, o->model_config, GD_MODEL_UNET, error);
  if (!p->model)
    return FALSE;
  const GdModelConfig *cfg = gd_model_get_config (p->model->model);
  if (!gd_op_class (NULL, p->model->model, o->class, o->label, &p->label, error))
    return FALSE;
  p->diffusion = gd_op_diffusion (p->model->model, o->steps, o->respacing, o->sampler, error);
  if (!p->diffusion || !gd_op_check_step (o->step, p->diffusion, error))
    return FALSE;
  if (!gd_op_source_box (operation, "input", &p->box, quiet, error)
      || !gd_op_check_channels (operation, "input", "x_t", cfg->in_channels, p->model->model, error))
    return FALSE;
  return gd_op_check_size (p->model->model, cfg->in_channels, &p->box,
                           cfg->num_classes > 0 && p->label >= 0 ? &p->label : NULL, error);
}

static void
prepare (GeglOperation *operation)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdCachedModel *model = gd_op_get_model (operation, "gd-model", o->model, o->model_config, GD_MODEL_UNET, NULL);
  const GdModelConfig *cfg = model ? gd_model_get_config (model->model) : NULL;
  gegl_operation_set_format (operation, "input", gd_tensor_format (cfg ? cfg->in_channels : 3));
  gegl_operation_set_format (operation, "output", gd_tensor_format (cfg ? cfg->out_channels : 3));
}

static gboolean
process (GeglOperation *operation, GeglBuffer *input, GeglBuffer *output,
         const GeglRectangle *result, gint level)
{
  (void) result;
  (void) level;
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdOpPlan p;
  GError *error = NULL;
  if (gd_op_plan_begin (operation, plan, &p, &error))
    {
      const GdModelConfig *cfg = gd_model_get_config (p.model->model);
      float *x = gd_tensor_from_buffer (input, &p.box, cfg->in_channels);
      float *out = g_new (float, (size_t) cfg->out_channels * p.box.width * p.box.height);
      int64_t t = p.diffusion->timestep_map[o->step];
      g_mutex_lock (&p.model->lock);
      gd_model_set_inference (p.model->model, TRUE);
      gboolean ok = gd_model_set_bf16 (p.model->model, o->bf16, &error)
                    && gd_model_forward (p.model->model, x, 1, p.box.height, p.box.width, &t,
                                         cfg->num_classes > 0 ? &p.label : NULL, out, &error);
      g_mutex_unlock (&p.model->lock);
      if (ok)
        gd_tensor_to_buffer (output, &p.box, out, cfg->out_channels);
      g_free (x);
      g_free (out);
    }
  gd_op_plan_end (operation, &p, error);
  return TRUE;
}

static void
gegl_op_class_init (GeglOpClass *klass)
{
  GeglOperationClass *operation_class = GEGL_OPERATION_CLASS (klass);
  GeglOperationFilterClass *filter_class = GEGL_OPERATION_FILTER_CLASS (klass);

  filter_class->process = process;
  gd_op_class_setup (operation_class, prepare, plan, TRUE);

  gegl_operation_class_set_keys (operation_class,
    "name", "gd:noise-predict",
    "title", "Diffusion Noise Prediction",
    "categories", "render",
    "description",
      "Runs the diffusion U-Net on x_t (a linear Y float / RGB float tensor) at respaced step "
      "`step` and outputs its prediction: eps with C channels, or for learned-sigma models 2C "
      "channels (eps, then the variance values) in an N-channel float format that only "
      "gd:scheduler-step reads.",
    NULL);
}

#endif
