#include "gd-tensor-buffer.h"

const Babl *
gd_tensor_format (int channels)
{
  if (channels == 1)
    return babl_format ("Y float");
  if (channels == 3)
    return babl_format ("RGB float");
  return babl_format_n (babl_type ("float"), channels);
}

const Babl *
gd_image_format (int channels)
{
  return babl_format (channels == 1 ? "Y' float" : "R'G'B' float");
}

/* A rows x columns matrix transposed: interleaved pixels [hw, C] <-> planar tensor [C, hw]. */
static float *
transpose (const float *in, size_t rows, size_t columns)
{
  float *out = g_new (float, rows * columns);
  for (size_t r = 0; r < rows; r++)
    for (size_t c = 0; c < columns; c++)
      out[c * rows + r] = in[r * columns + c];
  return out;
}

static float *
read_planar (GeglBuffer *buffer, const GeglRectangle *rect, const Babl *format, int channels)
{
  size_t hw = (size_t) rect->width * rect->height;
  float *pixels = g_new (float, (size_t) channels * hw);
  gegl_buffer_get (buffer, rect, 1.0, format, pixels, GEGL_AUTO_ROWSTRIDE, GEGL_ABYSS_NONE);
  float *tensor = transpose (pixels, hw, channels);
  g_free (pixels);
  return tensor;
}

static void
write_planar (GeglBuffer *buffer, const GeglRectangle *rect, const Babl *format,
              const float *tensor, int channels)
{
  float *pixels = transpose (tensor, channels, (size_t) rect->width * rect->height);
  gegl_buffer_set (buffer, rect, 0, format, pixels, GEGL_AUTO_ROWSTRIDE);
  g_free (pixels);
}

float *
gd_tensor_from_buffer (GeglBuffer *buffer, const GeglRectangle *rect, int channels)
{
  return read_planar (buffer, rect, gd_tensor_format (channels), channels);
}

void
gd_tensor_to_buffer (GeglBuffer *buffer, const GeglRectangle *rect, const float *tensor,
                     int channels)
{
  write_planar (buffer, rect, gd_tensor_format (channels), tensor, channels);
}

float *
gd_tensor_from_image (GeglBuffer *buffer, const GeglRectangle *rect, int channels)
{
  float *tensor = read_planar (buffer, rect, gd_image_format (channels), channels);
  size_t count = (size_t) channels * rect->width * rect->height;
  for (size_t i = 0; i < count; i++)
    tensor[i] = 2.0f * tensor[i] - 1.0f;
  return tensor;
}

void
gd_tensor_to_image (GeglBuffer *buffer, const GeglRectangle *rect, const float *tensor,
                    int channels)
{
  size_t count = (size_t) channels * rect->width * rect->height;
  float *image = g_new (float, count);
  for (size_t i = 0; i < count; i++)
    image[i] = CLAMP ((tensor[i] + 1.0f) / 2.0f, 0.0f, 1.0f);
  write_planar (buffer, rect, gd_image_format (channels), image, channels);
  g_free (image);
}

float *
gd_mask_from_buffer (GeglBuffer *buffer, const GeglRectangle *rect)
{
  return read_planar (buffer, rect, babl_format ("Y float"), 1);
}
