/* gd:decode — a model-space tensor back to an image: v = clamp((x + 1) / 2) as the
 * perceptual value, the inverse of gd:encode on [-1, 1]. */
#ifdef GEGL_PROPERTIES

#else

#define GEGL_OP_FILTER
#define GEGL_OP_NAME gd_decode
#define GEGL_OP_C_SOURCE gd-decode.c

#include "gegl-op.h"
#include "gd-error.h"
#include "gd-op-common.h"
#include "gd-tensor-buffer.h"

/* The tensor channels of the input: 1 for a Y model, 3 for the other color models,
 * 0 for an N-channel tensor (which has no image meaning). */
static int
decode_channels (GeglOperation *operation)
{
  const Babl *source = gegl_operation_get_source_format (operation, "input");
  if (!source)
    return 3;
  if (babl_format_is_format_n (source))
    return 0;
  return babl_get_name (babl_format_get_model (source))[0] == 'Y' ? 1 : 3;
}

static gboolean
plan (GeglOperation *operation, GdOpPlan *p, gboolean *quiet, GError **error)
{
  if (!gd_op_source_box (operation, "input", &p->box, quiet, error))
    return FALSE;
  p->channels = decode_channels (operation);
  if (p->channels == 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "the input has %d channels, not an image tensor (a learned-sigma model output "
                   "belongs on the aux pad of gd:scheduler-step)",
                   babl_format_get_n_components (gegl_operation_get_source_format (operation, "input")));
      return FALSE;
    }
  return TRUE;
}

static void
prepare (GeglOperation *operation)
{
  int channels = decode_channels (operation) == 1 ? 1 : 3;
  gegl_operation_set_format (operation, "input", gd_tensor_format (channels));
  gegl_operation_set_format (operation, "output", gd_image_format (channels));
}

static gboolean
process (GeglOperation *operation, GeglBuffer *input, GeglBuffer *output,
         const GeglRectangle *result, gint level)
{
  (void) level;
  int channels = decode_channels (operation);
  if (channels == 0)
    return TRUE;
  float *x = gd_tensor_from_buffer (input, result, channels);
  gd_tensor_to_image (output, result, x, channels);
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
    "name", "gd:decode",
    "title", "Diffusion Decode",
    "categories", "render",
    "description",
      "A model-space tensor (linear Y float / RGB float, images in [-1, 1]) back to an image: "
      "each perceptual value is clamp((x + 1) / 2).  The end of a graph of gd:scheduler-step "
      "nodes.",
    NULL);
}

#endif
