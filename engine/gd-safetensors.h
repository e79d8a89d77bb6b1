/* safetensors files: an 8-byte little-endian header length, a JSON header
 * (name -> dtype, shape, data_offsets; optional "__metadata__" of strings),
 * then the raw little-endian tensor bytes.  Reading maps the file; tensor data
 * pointers point into the mapping. */
#pragma once
#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef enum {
  GD_DTYPE_F32,
  GD_DTYPE_F64,
  GD_DTYPE_F16,
  GD_DTYPE_BF16,
  GD_DTYPE_I64,
  GD_DTYPE_I32,
  GD_DTYPE_U8,
} GdDtype;

#define GD_MAX_DIMS 8

typedef struct {
  char *name;
  GdDtype dtype;
  int ndim;
  int64_t shape[GD_MAX_DIMS];
  int64_t numel;
  const void *data;   /* inside the mapping; may be unaligned */
  size_t nbytes;
} GdStTensor;

typedef struct GdSafetensors GdSafetensors;

GdSafetensors *gd_safetensors_open (const char *path, GError **error);
void gd_safetensors_free (GdSafetensors *st);
const char *gd_safetensors_path (const GdSafetensors *st);
guint gd_safetensors_count (const GdSafetensors *st);
const GdStTensor *gd_safetensors_nth (const GdSafetensors *st, guint i);
const GdStTensor *gd_safetensors_find (const GdSafetensors *st, const char *name);
/* NULL when the header has no such metadata key. */
const char *gd_safetensors_metadata (const GdSafetensors *st, const char *key);

size_t gd_dtype_size (GdDtype dtype);
const char *gd_dtype_name (GdDtype dtype);

/* Copies a tensor into newly allocated float32 (F32, F64, F16, BF16, I64, I32 accepted). */
float *gd_st_tensor_to_f32 (const GdStTensor *t);
/* Copies an integer or float tensor into newly allocated int64 (floats must be whole numbers). */
gboolean gd_st_tensor_to_i64 (const GdStTensor *t, int64_t **out, GError **error);

/* Writing: collect tensors (the data is copied when added), then write atomically
 * (temporary file in the same folder, then rename). */
typedef struct GdStWriter GdStWriter;
GdStWriter *gd_st_writer_new (void);
void gd_st_writer_add (GdStWriter *w, const char *name, GdDtype dtype,
                       int ndim, const int64_t *shape, const void *data);
void gd_st_writer_set_metadata (GdStWriter *w, const char *key, const char *value);
gboolean gd_st_writer_write (GdStWriter *w, const char *path, GError **error);
void gd_st_writer_free (GdStWriter *w);

/* Creates a temporary file beside `path` (template written to *tmp_path) with the
 * permissions a new file gets from the umask (mkstemp alone gives 0600). */
int gd_create_temporary_beside (const char *path, char **tmp_path);

G_END_DECLS
