/* gd:encode — an image into model space: x = 2v - 1 of each perceptual value v, so that
 * an 8-bit image maps to [-1, 1] as the models were trained. */
#ifdef GEGL_PROPERTIES

property_int (channels, "Channels", 0)
  description ("Tensor channels: 1 (gray, Y') or 3 (R'G'B'); 0 follows the input (gray images give 1)")
  value_range (0, 3)

#else

#define GEGL_OP_FILTER
#define GEGL_OP_NAME gd_encode
#define GEGL_OP_C_SOURCE gd-encode.c

#include "gegl-op.h"
#include "gd-error.h"
#include "gd-op-common.h"
#include "gd-tensor-buffer.h"

/* The tensor channels: the property, else 1 for an input in a Y model, else 3. */
static int
encode_channels (GeglOperation *operation)
{
  GeglProperties *o = GEGL_PROPERTIES (operation);
  if (o->channels)
    return o->channels;
  const Babl *source = gegl_operation_get_source_format (operation, "input");
  if (source && !babl_format_is_format_n (source))
    {
      const char *model = babl_get_name (babl_format_get_model (source));
      if (model[0] == 'Y')
        return 1;
    }
  return 3;
}

static gboolean
plan (GeglOperation *operation, GdOpPlan *p, gboolean *quiet, GError **error)
{
  p->channels = encode_channels (operation);
  if (p->channels != 1 && p->channels != 3)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "channels %d: tensors in buffers have 1 or 3 channels", p->channels);
      return FALSE;
    }
  return gd_op_source_box (operation, "input", &p->box, quiet, error);
}

static void
prepare (GeglOperation *operation)
{
  int channels = encode_channels (operation) == 1 ? 1 : 3;
  gegl_operation_set_format (operation, "input", gd_image_format (channels));
  gegl_operation_set_format (operation, "output", gd_tensor_format (channels));
}

static gboolean
process (GeglOperation *operation, GeglBuffer *input, GeglBuffer *output,
         const GeglRectangle *result, gint level)
{
  (void) level;
  int channels = encode_channels (operation);
  if (channels != 1 && channels != 3)
    return TRUE;
  float *x = gd_tensor_from_image (input, result, channels);
  gd_tensor_to_buffer (output, result, x, channels);
  g_free (x);
  return TRUE;
}

static void
gegl_op_class_init (GeglOpClass *klass)
{
  GeglOperationClass *operation_class = GEGL_OPERATION_CLASS (klass);
  GeglOperationFilterClass *filter_class = GEGL_OPERATION_FILTER_CLASS (klass);

  filter_class->process = process;
  gd_op_class_setup (operation_class, prepare, plan, FALSE);

  gegl_operation_class_set_keys (operation_class,
    "name", "gd:encode",
    "title", "Diffusion Encode",
    "categories", "render",
    "description",
      "An image into the model space of a diffusion model: x = 2v - 1 of each perceptual "
      "(R'G'B' or Y') value, as a linear RGB float / Y float tensor that stock GEGL arithmetic "
      "keeps exact.  gd:decode goes back.",
    NULL);
}

#endif
