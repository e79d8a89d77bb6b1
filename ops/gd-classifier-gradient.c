/* gd:classifier-gradient — d/dx_t log p(y | x_t) of a classifier trained on noisy images,
 * the guidance term of Dhariwal & Nichol (2021), Algorithms 1 and 2, before any scale.
 * The classifier sees x_t and the original timestep of respaced step `step`. */
#include "gd-config-description.h"

#ifdef GEGL_PROPERTIES

property_file_path (classifier, "Classifier", "")
  description ("Noisy classifier file (.safetensors or .pt); empty: the default classifier of the data dir")
property_string (classifier_config, "Classifier config", "")
  description (GD_CONFIG_DESCRIPTION)
property_int (class, "Class", -1)
  description ("Class y whose log-probability the gradient increases")
  value_range (-1, 100000)
  ui_range (-1, 1000)
property_string (label, "Label", "")
  description ("Class by name from the classifier's label list, instead of the index")
#include "gd-step-property.h"
#include "gd-schedule-properties.h"
property_boolean (bf16, "bf16", FALSE)
  description ("Run the classifier's convolutions in bfloat16 with float sums (processors with AMX-BF16 or AVX512-BF16): faster, slightly less exact")

#else

#define GEGL_OP_FILTER
#define GEGL_OP_NAME gd_classifier_gradient
#define GEGL_OP_C_SOURCE gd-classifier-gradient.c

#include "gd-op-common.h"
#include "gegl-op.h"
#include "gd-error.h"
#include "gd-tensor-buffer.h"

static gboolean
plan (GeglOperation *operation, GdOpPlan *p, gboolean *quiet, GError **error)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  p->classifier = gd_op_get_model (operation, "gd-classifier", o->classifier, o->classifier_config,
                                   GD_MODEL_CLASSIFIER, error);
  if (!p->classifier)
    return FALSE;
  GdModel *classifier = p->classifier->model;
  if (!gd_op_class (classifier, NULL, o->class, o->label, &p->label, error))
    return FALSE;
  if (p->label < 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "no class: set class (0 to %d) or label to guide toward",
                   gd_model_get_config (classifier)->out_channels - 1);
      return FALSE;
    }
  p->diffusion = gd_op_diffusion (classifier, o->steps, o->respacing, o->sampler, error);
  if (!p->diffusion || !gd_op_check_step (o->step, p->diffusion, error))
    return FALSE;
  p->channels = gd_model_get_config (classifier)->in_channels;
  if (!gd_op_source_box (operation, "input", &p->box, quiet, error)
      || !gd_op_check_channels (operation, "input", "x_t", p->channels, classifier, error))
    return FALSE;
  return gd_op_check_size (classifier, p->channels, &p->box, NULL, error);
}

static void
prepare (GeglOperation *operation)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdCachedModel *classifier = gd_op_get_model (operation, "gd-classifier", o->classifier, o->classifier_config,
                                               GD_MODEL_CLASSIFIER, NULL);
  const Babl *format = gd_tensor_format (classifier ? gd_model_get_config (classifier->model)->in_channels : 3);
  gegl_operation_set_format (operation, "input", format);
  gegl_operation_set_format (operation, "output", format);
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
      size_t count = (size_t) p.channels * p.box.width * p.box.height;
      float *x = gd_tensor_from_buffer (input, &p.box, p.channels);
      float *grad = g_new (float, count);
      int64_t t = p.diffusion->timestep_map[o->step];
      g_mutex_lock (&p.classifier->lock);
      gboolean ok = gd_model_set_bf16 (p.classifier->model, o->bf16, &error)
                    && gd_classifier_gradient (p.classifier->model, x, 1, p.box.height,
                                               p.box.width, &t, &p.label, NULL, grad, &error);
      g_mutex_unlock (&p.classifier->lock);
      if (ok)
        gd_tensor_to_buffer (output, &p.box, grad, p.channels);
      g_free (x);
      g_free (grad);
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
    "name", "gd:classifier-gradient",
    "title", "Diffusion Classifier Gradient",
    "categories", "render",
    "description",
      "The classifier guidance gradient d/dx log p(y | x_t) of a noisy classifier, unscaled, "
      "as a tensor shaped like x_t (linear Y float / RGB float).  Feed it to the aux2 pad of "
      "gd:scheduler-step; sum two of them with gegl:add to guide toward two classes, or "
      "multiply one by a mask with gegl:multiply to guide one region only.",
    NULL);
}

#endif
