/* PNG output of model-space tensors. */
#pragma once
#include <glib.h>

/* The 8-bit level a model-space value x in [-1, 1] is written as. */
guint8 gd_png_level (float x);

/* Writes n images [n, C, h, w] (C = 1 or 3, values in model space [-1, 1]) to one PNG,
 * as a grid of ceil(sqrt(n)) columns with a 2-pixel gap; pixel = gd_png_level (x).
 * Written to a temporary file and renamed, so a failure leaves no partial file. */
gboolean gd_png_write_grid (const char *path, const float *images, int n, int channels,
                            int h, int w, GError **error);
/* The same with the number of columns given (image i in row i / columns). */
gboolean gd_png_write_grid_columns (const char *path, const float *images, int n, int columns,
                                    int channels, int h, int w, GError **error);
