/* PyTorch checkpoints written by torch.save, read without Python:
 * - the zip format (PyTorch >= 1.6): a zip archive whose entries share one folder,
 *   ARCHIVE/data.pkl (the pickle), ARCHIVE/data/KEY (the raw bytes of each storage),
 *   optionally ARCHIVE/byteorder ("little" or "big");
 * - the legacy format: pickles in sequence (magic number 0x1950a86a20f9469cfc6c,
 *   protocol version 1001, system info, the object, the list of storage keys), then every
 *   storage in the order of that list as an int64 element count and its raw bytes.
 * The file is memory-mapped; storages stored uncompressed are used where they lie.
 * The object must be a state_dict: a dict of names to tensors (see gd-pickle.h for what
 * the pickle may contain). */
#pragma once
#include "gd-safetensors.h"

#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef enum { GD_TORCH_ZIP, GD_TORCH_LEGACY } GdTorchFormat;

typedef struct {
  char *name;
  GdDtype dtype;              /* F32, F16, BF16, F64 or I64 */
  int ndim;
  int64_t shape[GD_MAX_DIMS];
  int64_t stride[GD_MAX_DIMS];  /* in elements */
  int64_t numel;
  const guint8 *storage;      /* the storage's first element (NULL when numel is 0) */
  int64_t offset;             /* first element of the view within the storage */
  gboolean big_endian;        /* the archive's byteorder record says "big" */
} GdTorchTensor;

typedef struct GdTorchFile GdTorchFile;

/* TRUE when the bytes start like a PyTorch checkpoint (zip or legacy). */
gboolean gd_torch_sniff (const guint8 *head, size_t size);
/* TRUE when the file at path starts like one (FALSE if it cannot be read). */
gboolean gd_torch_file_is_checkpoint (const char *path);

GdTorchFile *gd_torch_open (const char *path, GError **error);
/* Reads a checkpoint held in memory (kept referenced); origin names it in errors. */
GdTorchFile *gd_torch_open_bytes (GBytes *bytes, const char *origin, GError **error);
void gd_torch_free (GdTorchFile *file);

const char *gd_torch_path (const GdTorchFile *file);
GdTorchFormat gd_torch_format (const GdTorchFile *file);
guint gd_torch_count (const GdTorchFile *file);
const GdTorchTensor *gd_torch_nth (const GdTorchFile *file, guint i);
const GdTorchTensor *gd_torch_find (const GdTorchFile *file, const char *name);

/* The tensor's float32 values in place (inside the mapping) when it is a contiguous,
 * aligned, little-endian float32 view; else NULL. */
const float *gd_torch_tensor_f32_in_place (const GdTorchTensor *t);
/* A new contiguous float32 copy of any tensor (strided views gathered, F16/BF16/F64/I64
 * converted); NULL when there is no memory for it (a broadcast view may be huge). */
float *gd_torch_tensor_to_f32 (const GdTorchTensor *t);

G_END_DECLS
