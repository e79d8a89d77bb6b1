/* Tensors in GEGL buffers.  A tensor [C, h, w] of one image travels as linear `Y float`
 * (C = 1) or `RGB float` (C = 3), formats that stock GEGL arithmetic keeps bit-exact;
 * any other channel count (the 2C outputs of learned-sigma models) as an N-component
 * float format, meant for gd:scheduler-step only.  Images are perceptual `Y' float` /
 * `R'G'B' float`; model space maps them by x = 2v - 1 and back by v = clamp((x + 1) / 2). */
#pragma once
#include <gegl.h>

G_BEGIN_DECLS

const Babl *gd_tensor_format (int channels);
const Babl *gd_image_format (int channels);

/* Planar [C, h, w] copy of `rect` of a buffer, read as a C-channel tensor. */
float *gd_tensor_from_buffer (GeglBuffer *buffer, const GeglRectangle *rect, int channels);
void gd_tensor_to_buffer (GeglBuffer *buffer, const GeglRectangle *rect, const float *tensor,
                          int channels);

/* Image pixels of `rect` in model space (2v - 1), [C, h, w]. */
float *gd_tensor_from_image (GeglBuffer *buffer, const GeglRectangle *rect, int channels);
/* Writes clamp((x + 1) / 2) of a [C, h, w] tensor as image pixels. */
void gd_tensor_to_image (GeglBuffer *buffer, const GeglRectangle *rect, const float *tensor,
                         int channels);

/* One value per pixel of `rect`, read as linear `Y float` (masks). */
float *gd_mask_from_buffer (GeglBuffer *buffer, const GeglRectangle *rect);

G_END_DECLS
