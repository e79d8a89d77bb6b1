/* Writes PyTorch checkpoints for tests (see pt-writer.h).  Zip records follow the
 * PKWARE APPNOTE (local file header 0x04034b50, central directory header 0x02014b50,
 * end of central directory 0x06054b50); pickle opcodes follow Python's pickletools. */
#include "pt-writer.h"

#include <stdio.h>
#include <string.h>
#include <zlib.h>

typedef struct {
  char *type;
  const void *data;
  int64_t numel;
} Storage;

typedef struct {
  char *name;
  guint storage;
  int64_t offset;
  int ndim;
  int64_t shape[8], stride[8];
  gboolean parameter;
} Tensor;

struct PtWriter {
  GArray *storages;    /* Storage */
  GArray *tensors;     /* Tensor */
  char *byteorder;
};

static size_t
element_size (const char *type)
{
  if (strcmp (type, "HalfStorage") == 0 || strcmp (type, "BFloat16Storage") == 0)
    return 2;
  if (strcmp (type, "DoubleStorage") == 0 || strcmp (type, "LongStorage") == 0)
    return 8;
  return 4;
}

PtWriter *
pt_writer_new (void)
{
  PtWriter *w = g_new0 (PtWriter, 1);
  w->storages = g_array_new (FALSE, TRUE, sizeof (Storage));
  w->tensors = g_array_new (FALSE, TRUE, sizeof (Tensor));
  return w;
}

void
pt_writer_free (PtWriter *w)
{
  for (guint i = 0; i < w->storages->len; i++)
    g_free (g_array_index (w->storages, Storage, i).type);
  for (guint i = 0; i < w->tensors->len; i++)
    g_free (g_array_index (w->tensors, Tensor, i).name);
  g_array_unref (w->storages);
  g_array_unref (w->tensors);
  g_free (w->byteorder);
  g_free (w);
}

guint
pt_writer_add_storage (PtWriter *w, const char *type, const void *data, int64_t numel)
{
  Storage s = { g_strdup (type), data, numel };
  g_array_append_val (w->storages, s);
  return w->storages->len - 1;
}

void
pt_writer_add_tensor (PtWriter *w, const char *name, guint storage, int64_t offset, int ndim,
                      const int64_t *shape, const int64_t *stride, gboolean parameter)
{
  Tensor t = { g_strdup (name), storage, offset, ndim, { 0 }, { 0 }, parameter };
  int64_t step = 1;
  for (int d = ndim - 1; d >= 0; d--)
    {
      t.shape[d] = shape[d];
      t.stride[d] = stride ? stride[d] : step;
      step *= shape[d];
    }
  g_array_append_val (w->tensors, t);
}

void
pt_writer_set_byteorder (PtWriter *w, const char *byteorder)
{
  g_free (w->byteorder);
  w->byteorder = g_strdup (byteorder);
}

/* ---- pickles ---- */

void
pt_op (GByteArray *b, guint8 op)
{
  g_byte_array_append (b, &op, 1);
}

static void
put_le (GByteArray *b, uint64_t value, int bytes)
{
  for (int i = 0; i < bytes; i++)
    pt_op (b, (guint8) (value >> (8 * i)));
}

void
pt_string (GByteArray *b, const char *text)
{
  pt_op (b, 'X');
  put_le (b, strlen (text), 4);
  g_byte_array_append (b, (const guint8 *) text, (guint) strlen (text));
}

void
pt_global (GByteArray *b, const char *module, const char *name)
{
  pt_op (b, 'c');
  g_byte_array_append (b, (const guint8 *) module, (guint) strlen (module));
  pt_op (b, '\n');
  g_byte_array_append (b, (const guint8 *) name, (guint) strlen (name));
  pt_op (b, '\n');
}

void
pt_int (GByteArray *b, int64_t value)
{
  if (value >= INT32_MIN && value <= INT32_MAX)
    {
      pt_op (b, 'J');
      put_le (b, (uint64_t) value, 4);
    }
  else
    {
      pt_op (b, 0x8a);
      pt_op (b, 8);
      put_le (b, (uint64_t) value, 8);
    }
}

static void
ordered_dict (GByteArray *b)
{
  pt_global (b, "collections", "OrderedDict");
  pt_op (b, ')');
  pt_op (b, 'R');
}

GByteArray *
pt_writer_pickle (PtWriter *w, gboolean legacy)
{
  GByteArray *b = g_byte_array_new ();
  pt_op (b, 0x80);
  pt_op (b, 2);
  ordered_dict (b);
  pt_op (b, '(');
  for (guint i = 0; i < w->tensors->len; i++)
    {
      const Tensor *t = &g_array_index (w->tensors, Tensor, i);
      const Storage *s = &g_array_index (w->storages, Storage, t->storage);
      char key[16];
      g_snprintf (key, sizeof key, "%u", t->storage);
      pt_string (b, t->name);
      if (t->parameter)
        {
          pt_global (b, "torch._utils", "_rebuild_parameter");
          pt_op (b, '(');
        }
      pt_global (b, "torch._utils", "_rebuild_tensor_v2");
      pt_op (b, '(');
      /* persistent id ('storage', type, key, location, numel[, view_metadata]) */
      pt_op (b, '(');
      pt_string (b, "storage");
      pt_global (b, "torch", s->type);
      pt_string (b, key);
      pt_string (b, "cpu");
      pt_int (b, s->numel);
      if (legacy)
        pt_op (b, 'N');
      pt_op (b, 't');
      pt_op (b, 'Q');
      pt_int (b, t->offset);
      pt_op (b, '(');
      for (int d = 0; d < t->ndim; d++)
        pt_int (b, t->shape[d]);
      pt_op (b, 't');
      pt_op (b, '(');
      for (int d = 0; d < t->ndim; d++)
        pt_int (b, t->stride[d]);
      pt_op (b, 't');
      pt_op (b, 0x89);
      ordered_dict (b);
      pt_op (b, 't');
      pt_op (b, 'R');
      if (t->parameter)
        {
          pt_op (b, 0x88);
          ordered_dict (b);
          pt_op (b, 't');
          pt_op (b, 'R');
        }
    }
  pt_op (b, 'u');
  pt_op (b, '.');
  return b;
}

/* ---- output ---- */

typedef struct {
  FILE *fp;
  GByteArray *buffer;
  uint64_t offset;
  gboolean failed;
} Sink;

static void
sink_write (Sink *s, const void *data, size_t n)
{
  if (s->fp)
    s->failed |= n && fwrite (data, 1, n, s->fp) != n;
  else
    {
      const guint8 *p = data;
      while (n)
        {
          guint chunk = (guint) MIN (n, (size_t) 1 << 30);
          g_byte_array_append (s->buffer, p, chunk);
          p += chunk;
          n -= chunk;
        }
    }
}

static void
sink_le (Sink *s, uint64_t value, int bytes)
{
  guint8 b[8];
  for (int i = 0; i < bytes; i++)
    b[i] = (guint8) (value >> (8 * i));
  sink_write (s, b, (size_t) bytes);
  s->offset += (uint64_t) bytes;
}

static void
sink_bytes (Sink *s, const void *data, size_t n)
{
  sink_write (s, data, n);
  s->offset += n;
}

/* ---- zip ---- */

typedef struct {
  const char *name;
  const guint8 *data;
  size_t size;
} Entry;

static GBytes *
deflate_raw (const guint8 *data, size_t size)
{
  z_stream z = { 0 };
  deflateInit2 (&z, 6, Z_DEFLATED, -15, 8, Z_DEFAULT_STRATEGY);
  uLong bound = deflateBound (&z, (uLong) size);
  guint8 *out = g_malloc (bound);
  z.next_in = (Bytef *) data;
  z.avail_in = (uInt) size;
  z.next_out = out;
  z.avail_out = (uInt) bound;
  deflate (&z, Z_FINISH);
  size_t produced = z.total_out;
  deflateEnd (&z);
  return g_bytes_new_take (out, produced);
}

static void
zip_write (Sink *s, const Entry *entries, guint n, PtLayout layout)
{
  uint64_t *offsets = g_new (uint64_t, n);
  uint32_t *crcs = g_new (uint32_t, n);
  size_t *stored_sizes = g_new (size_t, n);
  for (guint i = 0; i < n; i++)
    {
      const Entry *e = &entries[i];
      size_t name_len = strlen (e->name);
      GBytes *packed = layout == PT_ZIP_DEFLATED ? deflate_raw (e->data, e->size) : NULL;
      const guint8 *payload = packed ? g_bytes_get_data (packed, NULL) : e->data;
      size_t payload_size = packed ? g_bytes_get_size (packed) : e->size;
      crcs[i] = (uint32_t) crc32_z (0, e->data, e->size);
      stored_sizes[i] = payload_size;
      offsets[i] = s->offset;
      /* an extra field pads the header so that the data starts 64-byte aligned (or, to
       * test copying, at 2 mod 4) */
      uint64_t data_start = s->offset + 30 + name_len;
      size_t pad = 0;
      if (layout == PT_ZIP_ALIGNED)
        {
          pad = (size_t) ((64 - data_start % 64) % 64);
          if (pad && pad < 4)
            pad += 64;
        }
      else if (layout == PT_ZIP_MISALIGNED)
        pad = 4 + (size_t) ((6 - (data_start + 4) % 4) % 4);
      sink_le (s, 0x04034b50, 4);
      sink_le (s, 20, 2);
      sink_le (s, 0, 2);
      sink_le (s, packed ? 8 : 0, 2);
      sink_le (s, 0, 2);
      sink_le (s, 0x21, 2);
      sink_le (s, crcs[i], 4);
      sink_le (s, payload_size, 4);
      sink_le (s, e->size, 4);
      sink_le (s, name_len, 2);
      sink_le (s, pad, 2);
      sink_bytes (s, e->name, name_len);
      if (pad)
        {
          sink_le (s, 0x4246, 2);
          sink_le (s, pad - 4, 2);
          for (size_t k = 4; k < pad; k++)
            sink_le (s, 'Z', 1);
        }
      sink_bytes (s, payload, payload_size);
      if (packed)
        g_bytes_unref (packed);
    }
  uint64_t directory = s->offset;
  for (guint i = 0; i < n; i++)
    {
      size_t name_len = strlen (entries[i].name);
      sink_le (s, 0x02014b50, 4);
      sink_le (s, 20, 2);
      sink_le (s, 20, 2);
      sink_le (s, 0, 2);
      sink_le (s, layout == PT_ZIP_DEFLATED ? 8 : 0, 2);
      sink_le (s, 0, 2);
      sink_le (s, 0x21, 2);
      sink_le (s, crcs[i], 4);
      sink_le (s, stored_sizes[i], 4);
      sink_le (s, entries[i].size, 4);
      sink_le (s, name_len, 2);
      sink_le (s, 0, 2);
      sink_le (s, 0, 2);
      sink_le (s, 0, 2);
      sink_le (s, 0, 2);
      sink_le (s, 0, 4);
      sink_le (s, offsets[i], 4);
      sink_bytes (s, entries[i].name, name_len);
    }
  uint64_t directory_size = s->offset - directory;
  sink_le (s, 0x06054b50, 4);
  sink_le (s, 0, 2);
  sink_le (s, 0, 2);
  sink_le (s, n, 2);
  sink_le (s, n, 2);
  sink_le (s, directory_size, 4);
  sink_le (s, directory, 4);
  sink_le (s, 0, 2);
  g_free (offsets);
  g_free (crcs);
  g_free (stored_sizes);
}

GBytes *
pt_zip_bytes (const char *const *names, GBytes *const *contents, guint n, PtLayout layout)
{
  Entry *entries = g_new (Entry, MAX (n, 1));
  for (guint i = 0; i < n; i++)
    entries[i] = (Entry) { names[i], g_bytes_get_data (contents[i], NULL), g_bytes_get_size (contents[i]) };
  Sink s = { .buffer = g_byte_array_new () };
  zip_write (&s, entries, n, layout);
  g_free (entries);
  return g_byte_array_free_to_bytes (s.buffer);
}

/* ---- whole checkpoints ---- */

static void
write_checkpoint (PtWriter *w, Sink *s, PtLayout layout)
{
  guint n_storages = w->storages->len;
  if (layout == PT_LEGACY)
    {
      static const guint8 magic[] = { 0x80, 2, 0x8a, 10, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20,
                                      0x6a, 0xa8, 0x50, 0x19, '.' };
      static const guint8 version[] = { 0x80, 2, 'M', 0xe9, 0x03, '.' };
      sink_bytes (s, magic, sizeof magic);
      sink_bytes (s, version, sizeof version);
      GByteArray *info = g_byte_array_new ();
      pt_op (info, 0x80);
      pt_op (info, 2);
      pt_op (info, '}');
      pt_op (info, '(');
      pt_string (info, "protocol_version");
      pt_int (info, 1001);
      pt_string (info, "little_endian");
      pt_op (info, 0x88);
      pt_op (info, 'u');
      pt_op (info, '.');
      sink_bytes (s, info->data, info->len);
      g_byte_array_unref (info);
      GByteArray *pickle = pt_writer_pickle (w, TRUE);
      sink_bytes (s, pickle->data, pickle->len);
      g_byte_array_unref (pickle);
      GByteArray *keys = g_byte_array_new ();
      pt_op (keys, 0x80);
      pt_op (keys, 2);
      pt_op (keys, ']');
      pt_op (keys, '(');
      for (guint i = 0; i < n_storages; i++)
        {
          char key[16];
          g_snprintf (key, sizeof key, "%u", i);
          pt_string (keys, key);
        }
      pt_op (keys, 'e');
      pt_op (keys, '.');
      sink_bytes (s, keys->data, keys->len);
      g_byte_array_unref (keys);
      for (guint i = 0; i < n_storages; i++)
        {
          const Storage *st = &g_array_index (w->storages, Storage, i);
          sink_le (s, (uint64_t) st->numel, 8);
          sink_bytes (s, st->data, (size_t) st->numel * element_size (st->type));
        }
      return;
    }
  GByteArray *pickle = pt_writer_pickle (w, FALSE);
  guint n = 0;
  Entry *entries = g_new (Entry, n_storages + 3);
  GPtrArray *names = g_ptr_array_new_with_free_func (g_free);
  entries[n++] = (Entry) { "archive/data.pkl", pickle->data, pickle->len };
  if (w->byteorder)
    entries[n++] = (Entry) { "archive/byteorder", (const guint8 *) w->byteorder, strlen (w->byteorder) };
  for (guint i = 0; i < n_storages; i++)
    {
      const Storage *st = &g_array_index (w->storages, Storage, i);
      char *name = g_strdup_printf ("archive/data/%u", i);
      g_ptr_array_add (names, name);
      entries[n++] = (Entry) { name, st->data, (size_t) st->numel * element_size (st->type) };
    }
  entries[n++] = (Entry) { "archive/version", (const guint8 *) "3\n", 2 };
  zip_write (s, entries, n, layout);
  g_free (entries);
  g_ptr_array_unref (names);
  g_byte_array_unref (pickle);
}

GBytes *
pt_writer_to_bytes (PtWriter *w, PtLayout layout)
{
  Sink s = { .buffer = g_byte_array_new () };
  write_checkpoint (w, &s, layout);
  return g_byte_array_free_to_bytes (s.buffer);
}

gboolean
pt_writer_write (PtWriter *w, const char *path, PtLayout layout, GError **error)
{
  Sink s = { .fp = fopen (path, "wb") };
  if (!s.fp)
    {
      g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_FAILED, "cannot write %s", path);
      return FALSE;
    }
  write_checkpoint (w, &s, layout);
  gboolean ok = !s.failed;
  ok &= fclose (s.fp) == 0;
  if (!ok)
    g_set_error (error, G_FILE_ERROR, G_FILE_ERROR_FAILED, "cannot write %s", path);
  return ok;
}

gboolean
pt_write_file (const char *path, GBytes *bytes, GError **error)
{
  return g_file_set_contents (path, g_bytes_get_data (bytes, NULL), (gssize) g_bytes_get_size (bytes), error);
}
