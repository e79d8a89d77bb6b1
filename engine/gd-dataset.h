/* Training images held in memory in model space ([-1, 1], NCHW) with their labels. */
#pragma once
#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef struct {
  int count, channels, height, width;
  float *images;          /* [count, channels, height, width], 2 v / 255 - 1 */
  int64_t *labels;        /* [count] */
  GPtrArray *label_names; /* class names, or NULL */
} GdDataset;

/* Reads an IDX image file (unsigned bytes, [count, height, width]) and its IDX label file;
 * either may be gzip-compressed. */
GdDataset *gd_dataset_read_idx (const char *images_path, const char *labels_path, GError **error);

/* An empty data set for count images of the given shape (filled by the caller). */
GdDataset *gd_dataset_new (int count, int channels, int height, int width);
void gd_dataset_free (GdDataset *data);

G_END_DECLS
