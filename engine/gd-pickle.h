/* A restricted reader of Python pickles (protocols 2 to 5), just enough for PyTorch
 * checkpoints: a state_dict of tensors.  It never runs anything a file names.  The only
 * globals it accepts are collections.OrderedDict, torch._utils._rebuild_tensor_v2,
 * torch._utils._rebuild_parameter and the storage types of float32, float16, bfloat16,
 * float64 and int64 (torch.FloatStorage, ...); any other global is refused with an error
 * that names it.  Persistent ids are PyTorch's storage references:
 *   ('storage', storage_type, key, location, numel)                  (zip format)
 *   ('storage', storage_type, root_key, location, numel, view_meta)  (legacy format)
 * with view_meta None or (view_key, element_offset, view_numel). */
#pragma once
#include "gd-safetensors.h"

#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef enum {
  GD_PICKLE_NONE,
  GD_PICKLE_BOOL,
  GD_PICKLE_INT,
  GD_PICKLE_BIGINT,     /* an integer wider than 64 bits: its little-endian bytes */
  GD_PICKLE_FLOAT,
  GD_PICKLE_STRING,
  GD_PICKLE_BYTES,
  GD_PICKLE_TUPLE,
  GD_PICKLE_LIST,
  GD_PICKLE_DICT,       /* dict or OrderedDict: items holds key, value, key, value, ... */
  GD_PICKLE_GLOBAL,     /* an allow-listed global, not yet called */
  GD_PICKLE_STORAGE,    /* a persistent storage reference */
  GD_PICKLE_TENSOR,     /* the result of _rebuild_tensor_v2 / _rebuild_parameter */
} GdPickleKind;

typedef enum {
  GD_GLOBAL_ORDERED_DICT,
  GD_GLOBAL_REBUILD_TENSOR_V2,
  GD_GLOBAL_REBUILD_PARAMETER,
  GD_GLOBAL_STORAGE_TYPE,
} GdPickleGlobal;

/* A storage that the pickle refers to.  root is -1 for a whole storage, else the index
 * of the storage this one is a view of (legacy format), starting root_offset elements in. */
typedef struct {
  char *key;
  GdDtype dtype;
  int64_t numel;
  int root;
  int64_t root_offset;
} GdPickleStorage;

typedef struct GdPickleValue GdPickleValue;
struct GdPickleValue {
  GdPickleKind kind;
  int64_t integer;          /* BOOL, INT; GLOBAL: the GdPickleGlobal */
  double real;              /* FLOAT */
  char *string;             /* STRING, BYTES (NUL-terminated copy), BIGINT bytes */
  size_t length;            /* bytes in string */
  GPtrArray *items;         /* TUPLE, LIST, DICT (borrowed GdPickleValue*) */
  GdDtype dtype;            /* GLOBAL storage type, STORAGE, TENSOR */
  int storage;              /* STORAGE, TENSOR: index of the storage */
  int64_t offset;           /* TENSOR: first element, in elements of the storage */
  int ndim;                 /* TENSOR */
  int64_t shape[GD_MAX_DIMS];
  int64_t stride[GD_MAX_DIMS];
  int64_t numel;
};

/* One reading context: values live as long as it does; storages accumulate over every
 * pickle parsed with it (the legacy format is a sequence of pickles). */
typedef struct GdPickle GdPickle;

/* origin names the file in error messages. */
GdPickle *gd_pickle_new (const char *origin);
void gd_pickle_free (GdPickle *pickle);

/* Reads one pickle from data and returns its value; *consumed (may be NULL) receives the
 * number of bytes up to and including STOP. */
GdPickleValue *gd_pickle_parse (GdPickle *pickle, const guint8 *data, size_t size,
                                size_t *consumed, GError **error);

guint gd_pickle_n_storages (const GdPickle *pickle);
const GdPickleStorage *gd_pickle_storage (const GdPickle *pickle, guint index);
int gd_pickle_find_storage (const GdPickle *pickle, const char *key);

/* "dict", "tensor", ...: what a value is, for messages. */
const char *gd_pickle_kind_name (GdPickleKind kind);

G_END_DECLS
