#include "gd-png.h"
#include "gd-error.h"
#include "gd-safetensors.h"

#include <errno.h>
#include <glib/gstdio.h>
#include <math.h>
#include <png.h>
#include <stdio.h>
#include <unistd.h>

/* Rounded to the nearest level, as GEGL (babl) converts the float images of gd:decode, so
 * that the command line and the GEGL nodes write the same pixels. */
guint8
gd_png_level (float v)
{
  float scaled = (v + 1.0f) * 127.5f + 0.5f;
  return (guint8) CLAMP (scaled, 0.0f, 255.0f);
}

gboolean
gd_png_write_grid (const char *path, const float *images, int n, int channels, int h, int w,
                   GError **error)
{
  return gd_png_write_grid_columns (path, images, n, (int) ceil (sqrt ((double) n)), channels,
                                    h, w, error);
}

gboolean
gd_png_write_grid_columns (const char *path, const float *images, int n, int columns,
                           int channels, int h, int w, GError **error)
{
  const int gap = 2;
  int rows = (n + columns - 1) / columns;
  int width = columns * w + (columns - 1) * gap, height = rows * h + (rows - 1) * gap;
  guint8 *pixels = g_malloc0 ((size_t) width * height * channels);
  for (int i = 0; i < n; i++)
    {
      int x0 = (i % columns) * (w + gap), y0 = (i / columns) * (h + gap);
      const float *image = images + (size_t) i * channels * h * w;
      for (int y = 0; y < h; y++)
        for (int x = 0; x < w; x++)
          for (int c = 0; c < channels; c++)
            pixels[((size_t) (y0 + y) * width + x0 + x) * channels + c] =
                gd_png_level (image[((size_t) c * h + y) * w + x]);
    }

  char *tmp;
  int fd = gd_create_temporary_beside (path, &tmp);
  gboolean ok = FALSE;
  FILE *f = NULL;
  png_structp png = NULL;
  png_infop info = NULL;
  if (fd < 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: cannot create: %s", path, g_strerror (errno));
      goto out;
    }
  f = fdopen (fd, "wb");
  png = png_create_write_struct (PNG_LIBPNG_VER_STRING, NULL, NULL, NULL);
  info = png ? png_create_info_struct (png) : NULL;
  if (!f || !info)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: cannot start writing", path);
      goto out;
    }
  if (setjmp (png_jmpbuf (png)))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: write failed", path);
      goto out;
    }
  png_init_io (png, f);
  png_set_IHDR (png, info, (png_uint_32) width, (png_uint_32) height, 8,
                channels == 1 ? PNG_COLOR_TYPE_GRAY : PNG_COLOR_TYPE_RGB, PNG_INTERLACE_NONE,
                PNG_COMPRESSION_TYPE_DEFAULT, PNG_FILTER_TYPE_DEFAULT);
  png_write_info (png, info);
  for (int y = 0; y < height; y++)
    png_write_row (png, pixels + (size_t) y * width * channels);
  png_write_end (png, NULL);
  ok = TRUE;
out:
  if (png)
    png_destroy_write_struct (&png, info ? &info : NULL);
  if (f)
    {
      if (fflush (f) != 0 || fsync (fileno (f)) != 0)
        ok = FALSE;
      if (fclose (f) != 0)
        ok = FALSE;
    }
  else if (fd >= 0)
    close (fd);
  if (ok && g_rename (tmp, path) != 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: cannot rename into place: %s", path,
                   g_strerror (errno));
      ok = FALSE;
    }
  if (!ok && fd >= 0)
    {
      if (error && !*error)
        g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: write failed", path);
      g_unlink (tmp);
    }
  g_free (tmp);
  g_free (pixels);
  return ok;
}
