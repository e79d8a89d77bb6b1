#include "gd-dataset.h"
#include "gd-error.h"

#include <errno.h>
#include <zlib.h>

GdDataset *
gd_dataset_new (int count, int channels, int height, int width)
{
  GdDataset *d = g_new0 (GdDataset, 1);
  d->count = count;
  d->channels = channels;
  d->height = height;
  d->width = width;
  d->images = g_new (float, (size_t) count * channels * height * width);
  d->labels = g_new0 (int64_t, count);
  return d;
}

void
gd_dataset_free (GdDataset *d)
{
  if (!d)
    return;
  g_free (d->images);
  g_free (d->labels);
  if (d->label_names)
    g_ptr_array_unref (d->label_names);
  g_free (d);
}

/* IDX: a big-endian header 0, 0, type (0x08 = unsigned byte), rank, then rank big-endian
 * 32-bit sizes, then the data.  gzread reads compressed and plain files alike. */
static guint8 *
read_idx (const char *path, int rank, int32_t *dims, GError **error)
{
  gzFile f = gzopen (path, "rb");
  if (!f)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: %s", path, g_strerror (errno));
      return NULL;
    }
  guint8 header[4];
  guint8 *data = NULL;
  if (gzread (f, header, 4) != 4 || header[0] != 0 || header[1] != 0 || header[2] != 0x08
      || header[3] != rank)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT,
                   "%s: not an IDX file of unsigned bytes with %d dimensions", path, rank);
      goto out;
    }
  uint64_t total = 1;
  for (int i = 0; i < rank; i++)
    {
      guint8 b[4];
      if (gzread (f, b, 4) != 4)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: truncated header", path);
          goto out;
        }
      dims[i] = (int32_t) ((uint32_t) b[0] << 24 | (uint32_t) b[1] << 16 | (uint32_t) b[2] << 8 | b[3]);
      if (dims[i] <= 0 || dims[i] > (1 << 24))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: dimension %d is %d", path, i, dims[i]);
          goto out;
        }
      total *= (uint64_t) dims[i];
    }
  if (total > ((uint64_t) 1 << 34))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: %" G_GUINT64_FORMAT " values is too many",
                   path, total);
      goto out;
    }
  data = g_malloc (total);
  uint64_t done = 0;
  while (done < total)
    {
      unsigned chunk = (unsigned) MIN (total - done, (uint64_t) 1 << 30);
      int got = gzread (f, data + done, chunk);
      if (got <= 0)
        {
          int code;
          const char *why = gzerror (f, &code);
          g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: truncated data (%" G_GUINT64_FORMAT
                       " of %" G_GUINT64_FORMAT " bytes%s%s)", path, done, total,
                       code != Z_OK ? ": " : "", code != Z_OK ? why : "");
          g_clear_pointer (&data, g_free);
          goto out;
        }
      done += (uint64_t) got;
    }
out:
  gzclose (f);
  return data;
}

GdDataset *
gd_dataset_read_idx (const char *images_path, const char *labels_path, GError **error)
{
  int32_t image_dims[3], label_dims[1];
  guint8 *pixels = read_idx (images_path, 3, image_dims, error);
  if (!pixels)
    return NULL;
  guint8 *labels = read_idx (labels_path, 1, label_dims, error);
  if (!labels)
    {
      g_free (pixels);
      return NULL;
    }
  if (label_dims[0] != image_dims[0])
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: %d labels for %d images in %s",
                   labels_path, label_dims[0], image_dims[0], images_path);
      g_free (pixels);
      g_free (labels);
      return NULL;
    }
  GdDataset *d = gd_dataset_new (image_dims[0], 1, image_dims[1], image_dims[2]);
  size_t total = (size_t) d->count * d->height * d->width;
  for (size_t i = 0; i < total; i++)
    d->images[i] = pixels[i] / 127.5f - 1.0f;
  for (int i = 0; i < d->count; i++)
    d->labels[i] = labels[i];
  g_free (pixels);
  g_free (labels);
  return d;
}
