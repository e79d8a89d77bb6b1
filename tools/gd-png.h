/* PNG output of model-space tensors. */
#pragma once
#include <glib.h>

/* Writes n images [n, C, h, w] (C = 1 or 3, values in model space [-1, 1]) to one PNG,
 * as a grid of ceil(sqrt(n)) columns with a 2-pixel gap; pixel = clamp((x + 1) * 127.5)
 * rounded to the nearest of 256 levels.  Written to a temporary file and renamed, so a
 * failure leaves no partial file. */
/* The 8-bit level a model-space value x in [-1, 1] is written as. */
guint8 gd_png_level (float x);

gboolean gd_png_write_grid (const char *path, const float *images, int n, int channels,
                            int h, int w, GError **error);
