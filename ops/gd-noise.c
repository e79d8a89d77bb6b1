/* gd:noise — x_T, the standard normal tensor a reverse diffusion starts from.  With the
 * same seed it is exactly the x_T gd:sample (and `guided sample`) starts from: stream 0
 * of the Philox key `seed`. */
#include "gd-config-description.h"

#ifdef GEGL_PROPERTIES

property_file_path (model, "Model", "")
  description ("Diffusion model whose image size and channels the noise takes (empty: the default model of the data dir); not read when width, height and channels are all set")
property_string (model_config, "Model config", "")
  description (GD_CONFIG_DESCRIPTION)
property_int (width, "Width", 0)
  description ("Tensor width; 0 takes the model's image size")
  value_range (0, 4096)
  ui_range (0, 512)
property_int (height, "Height", 0)
  description ("Tensor height; 0 takes the model's image size")
  value_range (0, 4096)
  ui_range (0, 512)
property_int (channels, "Channels", 0)
  description ("1 (Y float) or 3 (RGB float); 0 takes the model's input channels")
  value_range (0, 3)
property_seed (seed, "Seed", rand)
  description ("Random seed: the x_T of gd:sample with the same seed")

#else

#define GEGL_OP_SOURCE
#define GEGL_OP_NAME gd_noise
#define GEGL_OP_C_SOURCE gd-noise.c

#include "gegl-op.h"
#include "gd-error.h"
#include "gd-op-common.h"
#include "gd-sampler.h"
#include "gd-tensor-buffer.h"

/* The tensor shape: the properties, and the model for those left at 0. */
static gboolean
plan (GeglOperation *operation, GdOpPlan *p, gboolean *quiet, GError **error)
{
  (void) quiet;
  GeglProperties *o = GEGL_PROPERTIES (operation);
  p->box = (GeglRectangle) { 0, 0, o->width, o->height };
  p->channels = o->channels;
  if (!o->width || !o->height || !o->channels)
    {
      p->model = gd_op_get_model (operation, "gd-model", o->model, o->model_config, GD_MODEL_UNET, error);
      if (!p->model)
        return FALSE;
      const GdModelConfig *cfg = gd_model_get_config (p->model->model);
      if (!o->width)
        p->box.width = cfg->image_size;
      if (!o->height)
        p->box.height = cfg->image_size;
      if (!o->channels)
        p->channels = cfg->in_channels;
    }
  else
    gd_op_drop_model (operation, "gd-model");
  if (p->channels != 1 && p->channels != 3)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "channels %d: tensors in buffers have 1 or 3 channels", p->channels);
      return FALSE;
    }
  return TRUE;
}

static void
prepare (GeglOperation *operation)
{
  GdOpPlan p;
  gboolean ok = gd_op_plan_begin (operation, plan, &p, NULL);
  gegl_operation_set_format (operation, "output", gd_tensor_format (ok ? p.channels : 3));
  gd_op_plan_end (operation, &p, NULL);
}

static gboolean
process (GeglOperation *operation, GeglBuffer *output, const GeglRectangle *result, gint level)
{
  (void) result;
  (void) level;
  GeglProperties *o = GEGL_PROPERTIES (operation);
  GdOpPlan p;
  GError *error = NULL;
  if (gd_op_plan_begin (operation, plan, &p, &error))
    {
      size_t per_image = (size_t) p.channels * p.box.width * p.box.height;
      float *x = g_new (float, per_image);
      gd_sample_initial_noise (o->seed, 1, per_image, x);
      gd_tensor_to_buffer (output, &p.box, x, p.channels);
      g_free (x);
    }
  gd_op_plan_end (operation, &p, error);
  return TRUE;
}

static void
gegl_op_class_init (GeglOpClass *klass)
{
  GeglOperationClass *operation_class = GEGL_OPERATION_CLASS (klass);
  GeglOperationSourceClass *source_class = GEGL_OPERATION_SOURCE_CLASS (klass);

  source_class->process = process;
  gd_op_class_setup (operation_class, prepare, plan, TRUE);

  gegl_operation_class_set_keys (operation_class,
    "name", "gd:noise",
    "title", "Diffusion Noise",
    "categories", "render",
    "description",
      "The starting noise x_T of classifier-guided diffusion (Dhariwal & Nichol 2021): a "
      "standard normal tensor (linear Y float or RGB float, values around 0, not an image) of "
      "the model's size.  The same seed gives the x_T that gd:sample starts from.",
    NULL);
}

#endif
