#include "gd-safetensors.h"
#include "gd-error.h"

#include <errno.h>
#include <json-glib/json-glib.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <glib/gstdio.h>
#include <sys/stat.h>
#include <unistd.h>

G_DEFINE_QUARK (gd-error-quark, gd_error)

/* A header longer than this is not a tensor file but an attempt to exhaust memory. */
#define GD_MAX_HEADER_BYTES (100u * 1024u * 1024u)

struct GdSafetensors {
  char *path;
  GMappedFile *mapping;
  GPtrArray *tensors;        /* GdStTensor* in header order */
  GHashTable *by_name;       /* name -> GdStTensor* */
  GHashTable *metadata;      /* key -> value (owned strings) */
};

static const struct { const char *name; GdDtype dtype; size_t size; } dtype_table[] = {
  { "F32", GD_DTYPE_F32, 4 }, { "F64", GD_DTYPE_F64, 8 }, { "F16", GD_DTYPE_F16, 2 },
  { "BF16", GD_DTYPE_BF16, 2 }, { "I64", GD_DTYPE_I64, 8 }, { "I32", GD_DTYPE_I32, 4 },
  { "U8", GD_DTYPE_U8, 1 },
};

size_t
gd_dtype_size (GdDtype dtype)
{
  for (guint i = 0; i < G_N_ELEMENTS (dtype_table); i++)
    if (dtype_table[i].dtype == dtype)
      return dtype_table[i].size;
  return 0;
}

const char *
gd_dtype_name (GdDtype dtype)
{
  for (guint i = 0; i < G_N_ELEMENTS (dtype_table); i++)
    if (dtype_table[i].dtype == dtype)
      return dtype_table[i].name;
  return "?";
}

static gboolean
dtype_from_name (const char *name, GdDtype *dtype)
{
  for (guint i = 0; i < G_N_ELEMENTS (dtype_table); i++)
    if (strcmp (dtype_table[i].name, name) == 0)
      {
        *dtype = dtype_table[i].dtype;
        return TRUE;
      }
  return FALSE;
}

static void
st_tensor_free (gpointer p)
{
  GdStTensor *t = p;
  g_free (t->name);
  g_free (t);
}

void
gd_safetensors_free (GdSafetensors *st)
{
  if (!st)
    return;
  g_clear_pointer (&st->by_name, g_hash_table_unref);
  g_clear_pointer (&st->tensors, g_ptr_array_unref);
  g_clear_pointer (&st->metadata, g_hash_table_unref);
  g_clear_pointer (&st->mapping, g_mapped_file_unref);
  g_free (st->path);
  g_free (st);
}

static gboolean
fail (GError **error, const char *path, const char *fmt, ...) G_GNUC_PRINTF (3, 4);

static gboolean
fail (GError **error, const char *path, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: %s", path, msg);
  g_free (msg);
  return FALSE;
}

static gboolean
json_int (JsonNode *node, int64_t *out)
{
  if (!node || !JSON_NODE_HOLDS_VALUE (node) || json_node_get_value_type (node) != G_TYPE_INT64)
    return FALSE;
  *out = json_node_get_int (node);
  return TRUE;
}

static int
compare_offsets (gconstpointer a, gconstpointer b)
{
  const GdStTensor *ta = *(GdStTensor *const *) a, *tb = *(GdStTensor *const *) b;
  uintptr_t da = (uintptr_t) ta->data, db = (uintptr_t) tb->data;
  return da < db ? -1 : da > db ? 1 : 0;
}

static gboolean
parse_entry (GdSafetensors *st, const char *name, JsonNode *node,
             const char *data_base, uint64_t data_size, GError **error)
{
  const char *path = st->path;
  if (!JSON_NODE_HOLDS_OBJECT (node))
    return fail (error, path, "header entry '%s' is not an object", name);
  JsonObject *obj = json_node_get_object (node);

  JsonNode *dtype_node = json_object_get_member (obj, "dtype");
  if (!dtype_node || !JSON_NODE_HOLDS_VALUE (dtype_node)
      || json_node_get_value_type (dtype_node) != G_TYPE_STRING)
    return fail (error, path, "tensor '%s' has no dtype string", name);
  GdDtype dtype;
  const char *dtype_name = json_node_get_string (dtype_node);
  if (!dtype_from_name (dtype_name, &dtype))
    return fail (error, path, "tensor '%s' has unknown dtype '%s'", name, dtype_name);

  JsonNode *shape_node = json_object_get_member (obj, "shape");
  if (!shape_node || !JSON_NODE_HOLDS_ARRAY (shape_node))
    return fail (error, path, "tensor '%s' has no shape array", name);
  JsonArray *shape = json_node_get_array (shape_node);
  guint ndim = json_array_get_length (shape);
  if (ndim > GD_MAX_DIMS)
    return fail (error, path, "tensor '%s' has %u dimensions (at most %d supported)",
                 name, ndim, GD_MAX_DIMS);

  GdStTensor *t = g_new0 (GdStTensor, 1);
  t->name = g_strdup (name);
  t->dtype = dtype;
  t->ndim = (int) ndim;
  uint64_t numel = 1;
  for (guint i = 0; i < ndim; i++)
    {
      int64_t d;
      if (!json_int (json_array_get_element (shape, i), &d) || d < 0
          || (d > 0 && numel > (UINT64_MAX / 16) / (uint64_t) d))
        {
          st_tensor_free (t);
          return fail (error, path, "tensor '%s' has an invalid shape", name);
        }
      t->shape[i] = d;
      numel *= (uint64_t) d;
    }
  t->numel = (int64_t) numel;

  JsonNode *off_node = json_object_get_member (obj, "data_offsets");
  int64_t begin, end;
  if (!off_node || !JSON_NODE_HOLDS_ARRAY (off_node)
      || json_array_get_length (json_node_get_array (off_node)) != 2
      || !json_int (json_array_get_element (json_node_get_array (off_node), 0), &begin)
      || !json_int (json_array_get_element (json_node_get_array (off_node), 1), &end))
    {
      st_tensor_free (t);
      return fail (error, path, "tensor '%s' has no [begin, end] data_offsets", name);
    }
  if (begin < 0 || end < begin || (uint64_t) end > data_size)
    {
      st_tensor_free (t);
      return fail (error, path,
                   "tensor '%s' data offsets [%" G_GINT64_FORMAT ", %" G_GINT64_FORMAT
                   "] out of range (data section is %" G_GUINT64_FORMAT " bytes)",
                   name, begin, end, data_size);
    }
  uint64_t expected = numel * gd_dtype_size (dtype);
  if ((uint64_t) (end - begin) != expected)
    {
      st_tensor_free (t);
      return fail (error, path,
                   "tensor '%s' holds %" G_GINT64_FORMAT " bytes but its shape and dtype need %"
                   G_GUINT64_FORMAT, name, end - begin, expected);
    }
  t->data = data_base + begin;
  t->nbytes = (size_t) expected;
  g_ptr_array_add (st->tensors, t);
  g_hash_table_insert (st->by_name, t->name, t);
  return TRUE;
}

GdSafetensors *
gd_safetensors_open (const char *path, GError **error)
{
  GError *local = NULL;
  GMappedFile *mapping = g_mapped_file_new (path, FALSE, &local);
  if (!mapping)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: %s", path, local->message);
      g_error_free (local);
      return NULL;
    }
  GdSafetensors *st = g_new0 (GdSafetensors, 1);
  st->path = g_strdup (path);
  st->mapping = mapping;
  st->tensors = g_ptr_array_new_with_free_func (st_tensor_free);
  st->by_name = g_hash_table_new (g_str_hash, g_str_equal);
  st->metadata = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);

  const char *bytes = g_mapped_file_get_contents (mapping);
  uint64_t size = g_mapped_file_get_length (mapping);
  JsonParser *parser = NULL;

  if (size < 8)
    {
      fail (error, path, "file is %" G_GUINT64_FORMAT " bytes, too short for a safetensors header", size);
      goto error;
    }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; i--)
    header_len = (header_len << 8) | (uint8_t) bytes[i];
  if (header_len > size - 8)
    {
      fail (error, path, "header length %" G_GUINT64_FORMAT " runs past the end of the file (%"
            G_GUINT64_FORMAT " bytes)", header_len, size);
      goto error;
    }
  if (header_len > GD_MAX_HEADER_BYTES || header_len < 2)
    {
      fail (error, path, "header length %" G_GUINT64_FORMAT " is implausible", header_len);
      goto error;
    }

  parser = json_parser_new ();
  if (!json_parser_load_from_data (parser, bytes + 8, (gssize) header_len, &local))
    {
      fail (error, path, "malformed JSON header: %s", local->message);
      g_clear_error (&local);
      goto error;
    }
  JsonNode *root = json_parser_get_root (parser);
  if (!root || !JSON_NODE_HOLDS_OBJECT (root))
    {
      fail (error, path, "JSON header is not an object");
      goto error;
    }
  JsonObject *header = json_node_get_object (root);
  const char *data_base = bytes + 8 + header_len;
  uint64_t data_size = size - 8 - header_len;

  GList *members = json_object_get_members (header);
  gboolean ok = TRUE;
  for (GList *l = members; l && ok; l = l->next)
    {
      const char *name = l->data;
      JsonNode *node = json_object_get_member (header, name);
      if (strcmp (name, "__metadata__") == 0)
        {
          if (!JSON_NODE_HOLDS_OBJECT (node))
            ok = fail (error, path, "__metadata__ is not an object");
          else
            {
              JsonObject *md = json_node_get_object (node);
              GList *keys = json_object_get_members (md);
              for (GList *k = keys; k && ok; k = k->next)
                {
                  JsonNode *v = json_object_get_member (md, k->data);
                  if (!JSON_NODE_HOLDS_VALUE (v) || json_node_get_value_type (v) != G_TYPE_STRING)
                    ok = fail (error, path, "__metadata__ value '%s' is not a string",
                               (const char *) k->data);
                  else
                    g_hash_table_insert (st->metadata, g_strdup (k->data),
                                         g_strdup (json_node_get_string (v)));
                }
              g_list_free (keys);
            }
        }
      else
        ok = parse_entry (st, name, node, data_base, data_size, error);
    }
  g_list_free (members);
  if (!ok)
    goto error;

  /* Overlapping tensors would alias each other's bytes: refuse them. */
  GPtrArray *sorted = g_ptr_array_sized_new (st->tensors->len);
  for (guint i = 0; i < st->tensors->len; i++)
    g_ptr_array_add (sorted, st->tensors->pdata[i]);
  g_ptr_array_sort (sorted, compare_offsets);
  for (guint i = 1; i < sorted->len; i++)
    {
      const GdStTensor *a = sorted->pdata[i - 1], *b = sorted->pdata[i];
      if (a->nbytes > 0 && b->nbytes > 0
          && (const char *) a->data + a->nbytes > (const char *) b->data)
        {
          fail (error, path, "tensors '%s' and '%s' overlap in the data section", a->name, b->name);
          g_ptr_array_unref (sorted);
          goto error;
        }
    }
  g_ptr_array_unref (sorted);
  g_object_unref (parser);
  return st;

error:
  g_clear_object (&parser);
  gd_safetensors_free (st);
  return NULL;
}

const char *gd_safetensors_path (const GdSafetensors *st) { return st->path; }
guint gd_safetensors_count (const GdSafetensors *st) { return st->tensors->len; }

const GdStTensor *
gd_safetensors_nth (const GdSafetensors *st, guint i)
{
  return i < st->tensors->len ? st->tensors->pdata[i] : NULL;
}

const GdStTensor *
gd_safetensors_find (const GdSafetensors *st, const char *name)
{
  return g_hash_table_lookup (st->by_name, name);
}

const char *
gd_safetensors_metadata (const GdSafetensors *st, const char *key)
{
  return g_hash_table_lookup (st->metadata, key);
}

/* IEEE 754 binary16 -> binary32, exact for every value including subnormals. */
static float
half_to_float (uint16_t h)
{
  uint32_t sign = (uint32_t) (h & 0x8000u) << 16;
  uint32_t exponent = (h >> 10) & 0x1fu;
  uint32_t mantissa = h & 0x3ffu;
  uint32_t bits;
  if (exponent == 0x1f)
    bits = sign | 0x7f800000u | (mantissa << 13);
  else if (exponent != 0)
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  else if (mantissa == 0)
    bits = sign;
  else
    {
      int shift = 0;
      while (!(mantissa & 0x400u))
        {
          mantissa <<= 1;
          shift++;
        }
      mantissa &= 0x3ffu;
      bits = sign | ((uint32_t) (113 - shift) << 23) | (mantissa << 13);
    }
  float f;
  memcpy (&f, &bits, 4);
  return f;
}

float *
gd_st_tensor_to_f32 (const GdStTensor *t)
{
  float *out = g_new (float, t->numel > 0 ? t->numel : 1);
  const uint8_t *src = t->data;
  for (int64_t i = 0; i < t->numel; i++)
    {
      switch (t->dtype)
        {
        case GD_DTYPE_F32: memcpy (&out[i], src + 4 * i, 4); break;
        case GD_DTYPE_F64: { double d; memcpy (&d, src + 8 * i, 8); out[i] = (float) d; break; }
        case GD_DTYPE_F16: { uint16_t h; memcpy (&h, src + 2 * i, 2); out[i] = half_to_float (h); break; }
        case GD_DTYPE_BF16:
          {
            uint16_t h;
            memcpy (&h, src + 2 * i, 2);
            uint32_t bits = (uint32_t) h << 16;
            memcpy (&out[i], &bits, 4);
            break;
          }
        case GD_DTYPE_I64: { int64_t v; memcpy (&v, src + 8 * i, 8); out[i] = (float) v; break; }
        case GD_DTYPE_I32: { int32_t v; memcpy (&v, src + 4 * i, 4); out[i] = (float) v; break; }
        case GD_DTYPE_U8: out[i] = src[i]; break;
        }
    }
  return out;
}

gboolean
gd_st_tensor_to_i64 (const GdStTensor *t, int64_t **out, GError **error)
{
  int64_t *values = g_new (int64_t, t->numel > 0 ? t->numel : 1);
  const uint8_t *src = t->data;
  for (int64_t i = 0; i < t->numel; i++)
    {
      double d = 0;
      switch (t->dtype)
        {
        case GD_DTYPE_I64: memcpy (&values[i], src + 8 * i, 8); continue;
        case GD_DTYPE_I32: { int32_t v; memcpy (&v, src + 4 * i, 4); values[i] = v; continue; }
        case GD_DTYPE_U8: values[i] = src[i]; continue;
        case GD_DTYPE_F64: memcpy (&d, src + 8 * i, 8); break;
        default:
          {
            float f[1];
            GdStTensor one = *t;
            one.numel = 1;
            one.data = src + gd_dtype_size (t->dtype) * i;
            float *conv = gd_st_tensor_to_f32 (&one);
            f[0] = conv[0];
            g_free (conv);
            d = f[0];
          }
        }
      /* whole and inside int64 (2^63 itself is not), checked before any conversion */
      if (!(d >= -9223372036854775808.0 && d < 9223372036854775808.0) || d != floor (d))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "tensor '%s' holds %g where a whole number is needed", t->name, d);
          g_free (values);
          return FALSE;
        }
      values[i] = (int64_t) d;
    }
  *out = values;
  return TRUE;
}

/* ---- writing ---- */

typedef struct {
  char *name;
  GdDtype dtype;
  int ndim;
  int64_t shape[GD_MAX_DIMS];
  GBytes *bytes;
} WriterEntry;

struct GdStWriter {
  GPtrArray *entries;
  GPtrArray *metadata_keys;
  GHashTable *metadata;
};

static void
writer_entry_free (gpointer p)
{
  WriterEntry *e = p;
  g_free (e->name);
  g_bytes_unref (e->bytes);
  g_free (e);
}

GdStWriter *
gd_st_writer_new (void)
{
  GdStWriter *w = g_new0 (GdStWriter, 1);
  w->entries = g_ptr_array_new_with_free_func (writer_entry_free);
  w->metadata_keys = g_ptr_array_new_with_free_func (g_free);
  w->metadata = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  return w;
}

void
gd_st_writer_free (GdStWriter *w)
{
  if (!w)
    return;
  g_ptr_array_unref (w->entries);
  g_ptr_array_unref (w->metadata_keys);
  g_hash_table_unref (w->metadata);
  g_free (w);
}

void
gd_st_writer_add (GdStWriter *w, const char *name, GdDtype dtype,
                  int ndim, const int64_t *shape, const void *data)
{
  g_return_if_fail (ndim >= 0 && ndim <= GD_MAX_DIMS);
  WriterEntry *e = g_new0 (WriterEntry, 1);
  e->name = g_strdup (name);
  e->dtype = dtype;
  e->ndim = ndim;
  size_t n = gd_dtype_size (dtype);
  for (int i = 0; i < ndim; i++)
    {
      e->shape[i] = shape[i];
      n *= (size_t) shape[i];
    }
  e->bytes = g_bytes_new (data, n);
  g_ptr_array_add (w->entries, e);
}

void
gd_st_writer_set_metadata (GdStWriter *w, const char *key, const char *value)
{
  if (!g_hash_table_contains (w->metadata, key))
    g_ptr_array_add (w->metadata_keys, g_strdup (key));
  g_hash_table_insert (w->metadata, g_strdup (key), g_strdup (value));
}

static char *
writer_header (GdStWriter *w)
{
  JsonBuilder *b = json_builder_new ();
  json_builder_begin_object (b);
  if (w->metadata_keys->len)
    {
      json_builder_set_member_name (b, "__metadata__");
      json_builder_begin_object (b);
      for (guint i = 0; i < w->metadata_keys->len; i++)
        {
          const char *key = w->metadata_keys->pdata[i];
          json_builder_set_member_name (b, key);
          json_builder_add_string_value (b, g_hash_table_lookup (w->metadata, key));
        }
      json_builder_end_object (b);
    }
  uint64_t offset = 0;
  for (guint i = 0; i < w->entries->len; i++)
    {
      WriterEntry *e = w->entries->pdata[i];
      json_builder_set_member_name (b, e->name);
      json_builder_begin_object (b);
      json_builder_set_member_name (b, "dtype");
      json_builder_add_string_value (b, gd_dtype_name (e->dtype));
      json_builder_set_member_name (b, "shape");
      json_builder_begin_array (b);
      for (int d = 0; d < e->ndim; d++)
        json_builder_add_int_value (b, e->shape[d]);
      json_builder_end_array (b);
      json_builder_set_member_name (b, "data_offsets");
      json_builder_begin_array (b);
      json_builder_add_int_value (b, (gint64) offset);
      offset += g_bytes_get_size (e->bytes);
      json_builder_add_int_value (b, (gint64) offset);
      json_builder_end_array (b);
      json_builder_end_object (b);
    }
  json_builder_end_object (b);
  JsonGenerator *gen = json_generator_new ();
  JsonNode *root = json_builder_get_root (b);
  json_generator_set_root (gen, root);
  char *text = json_generator_to_data (gen, NULL);
  json_node_unref (root);
  g_object_unref (gen);
  g_object_unref (b);
  return text;
}

int
gd_create_temporary_beside (const char *path, char **tmp_path)
{
  *tmp_path = g_strdup_printf ("%s.tmp-XXXXXX", path);
  int fd = g_mkstemp (*tmp_path);
  if (fd >= 0)
    {
      mode_t mask = umask (0);
      umask (mask);
      if (fchmod (fd, 0666 & ~mask) != 0)
        g_warning ("%s: cannot set permissions: %s", *tmp_path, g_strerror (errno));
    }
  return fd;
}

gboolean
gd_st_writer_write (GdStWriter *w, const char *path, GError **error)
{
  char *header = writer_header (w);
  size_t len = strlen (header);
  size_t padded = (len + 7) & ~(size_t) 7;  /* keeps every tensor 8-byte aligned */
  char *tmp_path;
  int fd = gd_create_temporary_beside (path, &tmp_path);
  gboolean ok = FALSE;
  FILE *f = NULL;
  if (fd < 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: cannot create: %s", path, g_strerror (errno));
      goto out;
    }
  f = fdopen (fd, "wb");
  if (!f)
    {
      close (fd);
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: cannot write: %s", path, g_strerror (errno));
      goto out_unlink;
    }
  uint8_t le[8];
  for (int i = 0; i < 8; i++)
    le[i] = (uint8_t) ((uint64_t) padded >> (8 * i));
  gboolean io_ok = fwrite (le, 1, 8, f) == 8 && fwrite (header, 1, len, f) == len;
  for (size_t i = len; i < padded && io_ok; i++)
    io_ok = fputc (' ', f) != EOF;
  for (guint i = 0; i < w->entries->len && io_ok; i++)
    {
      gsize n;
      const void *data = g_bytes_get_data (((WriterEntry *) w->entries->pdata[i])->bytes, &n);
      io_ok = n == 0 || fwrite (data, 1, n, f) == n;
    }
  io_ok = (fflush (f) == 0) && io_ok;
  io_ok = (fsync (fileno (f)) == 0) && io_ok;
  io_ok = (fclose (f) == 0) && io_ok;
  if (!io_ok)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: write failed: %s", path, g_strerror (errno));
      goto out_unlink;
    }
  if (g_rename (tmp_path, path) != 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: cannot rename into place: %s", path,
                   g_strerror (errno));
      goto out_unlink;
    }
  ok = TRUE;
  goto out;
out_unlink:
  g_unlink (tmp_path);
out:
  g_free (tmp_path);
  g_free (header);
  return ok;
}
