/* PyTorch checkpoint reader (formats described in gd-torch.h).  The zip archive is read
 * with minizip over the memory-mapped file, so a stored (uncompressed) storage is a
 * pointer into the mapping and loading costs no copy. */
#include "gd-torch.h"
#include "gd-error.h"
#include "gd-pickle.h"

#include <minizip/unzip.h>
#include <zlib.h>
#include <stdio.h>
#include <string.h>

/* The legacy format's magic number 0x1950a86a20f9469cfc6c as LONG1 stores it. */
static const guint8 legacy_magic[10] = { 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19 };
#define LEGACY_PROTOCOL_VERSION 1001
/* Deflate expands at most about 1032:1; a larger claimed size is a zip bomb or damage. */
#define MAX_DEFLATE_RATIO 1032
#define MAX_PICKLE_BYTES ((size_t) 1 << 30)

struct GdTorchFile {
  char *path;
  GdTorchFormat format;
  GBytes *bytes;            /* the whole file */
  GPtrArray *tensors;       /* GdTorchTensor* */
  GHashTable *by_name;
  GPtrArray *buffers;       /* decompressed entries, freed with the file */
};

static void
tensor_free (gpointer data)
{
  GdTorchTensor *t = data;
  g_free (t->name);
  g_free (t);
}

void
gd_torch_free (GdTorchFile *f)
{
  if (!f)
    return;
  g_hash_table_unref (f->by_name);
  g_ptr_array_unref (f->tensors);
  g_ptr_array_unref (f->buffers);
  g_bytes_unref (f->bytes);
  g_free (f->path);
  g_free (f);
}

const char *gd_torch_path (const GdTorchFile *f) { return f->path; }
GdTorchFormat gd_torch_format (const GdTorchFile *f) { return f->format; }
guint gd_torch_count (const GdTorchFile *f) { return f->tensors->len; }
const GdTorchTensor *gd_torch_nth (const GdTorchFile *f, guint i) { return f->tensors->pdata[i]; }

const GdTorchTensor *
gd_torch_find (const GdTorchFile *f, const char *name)
{
  return g_hash_table_lookup (f->by_name, name);
}

/* A format error whose message starts with the file's path. */
static gboolean
fail (GError **error, const char *path, const char *format, ...) G_GNUC_PRINTF (3, 4);

static gboolean
fail (GError **error, const char *path, const char *format, ...)
{
  va_list ap;
  va_start (ap, format);
  GError *local = g_error_new_valist (GD_ERROR, GD_ERROR_FORMAT, format, ap);
  va_end (ap);
  g_prefix_error (&local, "%s: ", path);
  g_propagate_error (error, local);
  return FALSE;
}

/* ---- recognising the format ---- */

static gboolean
is_zip (const guint8 *head, size_t size)
{
  return size >= 4 && memcmp (head, "PK\x03\x04", 4) == 0;
}

/* PROTO n, an optional FRAME, then LONG1 of the 10-byte magic number. */
static gboolean
is_legacy (const guint8 *head, size_t size)
{
  size_t p = 2;
  if (size < 2 || head[0] != 0x80 || head[1] < 2 || head[1] > 5)
    return FALSE;
  if (size > p && head[p] == 0x95)
    p += 9;
  return size >= p + 12 && head[p] == 0x8a && head[p + 1] == sizeof legacy_magic
         && memcmp (head + p + 2, legacy_magic, sizeof legacy_magic) == 0;
}

gboolean
gd_torch_sniff (const guint8 *head, size_t size)
{
  return is_zip (head, size) || is_legacy (head, size);
}

gboolean
gd_torch_file_is_checkpoint (const char *path)
{
  guint8 head[32];
  FILE *fp = fopen (path, "rb");
  if (!fp)
    return FALSE;
  size_t got = fread (head, 1, sizeof head, fp);
  fclose (fp);
  return gd_torch_sniff (head, got);
}

/* ---- tensors of the state_dict ---- */

static size_t
storage_bytes (const GdPickleStorage *s)
{
  return (size_t) s->numel * gd_dtype_size (s->dtype);
}

/* The state_dict (a dict of str -> tensor) of the pickle's result, with every storage's
 * data already resolved in `data` (indexed like the pickle's storages). */
static gboolean
collect_tensors (GdTorchFile *f, const GdPickleValue *root,
                 const guint8 **data, gboolean big_endian, GError **error)
{
  if (root->kind != GD_PICKLE_DICT)
    return fail (error, f->path, "not a state_dict: the checkpoint holds a %s, not a dict of tensors",
                 gd_pickle_kind_name (root->kind));
  for (guint i = 0; i + 1 < root->items->len; i += 2)
    {
      const GdPickleValue *key = root->items->pdata[i], *value = root->items->pdata[i + 1];
      if (key->kind != GD_PICKLE_STRING)
        return fail (error, f->path, "not a state_dict: a key is a %s, not a name",
                     gd_pickle_kind_name (key->kind));
      char *escaped = g_strescape (key->string, NULL);
      gboolean ok = FALSE;
      if (value->kind != GD_PICKLE_TENSOR)
        fail (error, f->path, "not a state_dict: entry '%s' is a %s, not a tensor", escaped,
              gd_pickle_kind_name (value->kind));
      else if (g_hash_table_contains (f->by_name, key->string))
        fail (error, f->path, "tensor '%s' appears twice", escaped);
      else
        ok = TRUE;
      g_free (escaped);
      if (!ok)
        return FALSE;
      GdTorchTensor *t = g_new0 (GdTorchTensor, 1);
      t->name = g_strdup (key->string);
      t->dtype = value->dtype;
      t->ndim = value->ndim;
      memcpy (t->shape, value->shape, sizeof t->shape);
      memcpy (t->stride, value->stride, sizeof t->stride);
      t->numel = value->numel;
      t->offset = value->offset;
      t->storage = t->numel ? data[value->storage] : NULL;
      t->big_endian = big_endian;
      g_ptr_array_add (f->tensors, t);
      g_hash_table_insert (f->by_name, t->name, t);
    }
  return TRUE;
}

/* Points storage views (legacy view_metadata) into their root storages. */
static void
resolve_views (GdPickle *pickle, const guint8 **data)
{
  for (guint i = 0; i < gd_pickle_n_storages (pickle); i++)
    {
      const GdPickleStorage *s = gd_pickle_storage (pickle, i);
      if (s->root >= 0)
        data[i] = data[s->root] + (size_t) s->root_offset * gd_dtype_size (s->dtype);
    }
}

/* ---- the zip format ---- */

typedef struct {
  const guint8 *data;
  size_t size, pos;
} MemStream;

static voidpf
mem_open (voidpf opaque, const void *filename, int mode)
{
  (void) filename;
  (void) mode;
  return opaque;
}

static uLong
mem_read (voidpf opaque, voidpf stream, void *buf, uLong size)
{
  MemStream *s = stream;
  (void) opaque;
  size_t n = MIN ((size_t) size, s->size - s->pos);
  memcpy (buf, s->data + s->pos, n);
  s->pos += n;
  return (uLong) n;
}

static uLong
mem_write (voidpf opaque, voidpf stream, const void *buf, uLong size)
{
  (void) opaque;
  (void) stream;
  (void) buf;
  (void) size;
  return 0;
}

static ZPOS64_T
mem_tell (voidpf opaque, voidpf stream)
{
  (void) opaque;
  return ((MemStream *) stream)->pos;
}

static long
mem_seek (voidpf opaque, voidpf stream, ZPOS64_T offset, int origin)
{
  MemStream *s = stream;
  (void) opaque;
  ZPOS64_T base = origin == ZLIB_FILEFUNC_SEEK_SET ? 0
                  : origin == ZLIB_FILEFUNC_SEEK_CUR ? s->pos : s->size;
  if (offset > s->size || base > s->size - offset)
    return -1;
  s->pos = (size_t) (base + offset);
  return 0;
}

static int
mem_close (voidpf opaque, voidpf stream)
{
  (void) opaque;
  (void) stream;
  return 0;
}

static int
mem_error (voidpf opaque, voidpf stream)
{
  (void) opaque;
  (void) stream;
  return 0;
}

typedef struct {
  unz64_file_pos position;   /* to return to the entry */
  uLong method;
  uLong flag;
  uLong crc;
  ZPOS64_T compressed, uncompressed;
} ZipEntry;

typedef struct {
  GdTorchFile *file;
  unzFile zip;
  GHashTable *entries;        /* name -> ZipEntry*, for names inside the archive folder */
  char *folder;               /* "ARCHIVE/" */
  MemStream stream;
} Zip;

#define MAX_ENTRY_NAME 1024

/* Lists the central directory; picks the folder that holds data.pkl. */
static gboolean
zip_list (Zip *z, GError **error)
{
  const char *path = z->file->path;
  char name[MAX_ENTRY_NAME + 1];
  GPtrArray *pickles = g_ptr_array_new_with_free_func (g_free);
  int err;
  for (err = unzGoToFirstFile (z->zip); err == UNZ_OK; err = unzGoToNextFile (z->zip))
    {
      unz_file_info64 info;
      if (unzGetCurrentFileInfo64 (z->zip, &info, name, sizeof name, NULL, 0, NULL, 0) != UNZ_OK)
        break;
      if (info.size_filename > MAX_ENTRY_NAME)
        continue;  /* longer than any name of a torch archive */
      name[info.size_filename] = '\0';
      if (strlen (name) != info.size_filename || g_hash_table_contains (z->entries, name))
        continue;
      ZipEntry *e = g_new0 (ZipEntry, 1);
      if (unzGetFilePos64 (z->zip, &e->position) != UNZ_OK)
        {
          g_free (e);
          break;
        }
      e->method = info.compression_method;
      e->flag = info.flag;
      e->crc = info.crc;
      e->compressed = info.compressed_size;
      e->uncompressed = info.uncompressed_size;
      g_hash_table_insert (z->entries, g_strdup (name), e);
      const char *slash = strchr (name, '/');
      if (slash && strcmp (slash, "/data.pkl") == 0)
        g_ptr_array_add (pickles, g_strndup (name, (size_t) (slash - name) + 1));
    }
  gboolean ok = TRUE;
  if (err != UNZ_END_OF_LIST_OF_FILE)
    ok = fail (error, path, "zip central directory is damaged");
  else if (pickles->len == 0)
    ok = fail (error, path, "zip archive without ARCHIVE/data.pkl: not a PyTorch checkpoint");
  else if (pickles->len > 1)
    ok = fail (error, path, "zip archive holds %u data.pkl files in different folders", pickles->len);
  else
    {
      z->folder = g_strdup (pickles->pdata[0]);
      char *constants = g_strconcat (z->folder, "constants.pkl", NULL);
      if (g_hash_table_contains (z->entries, constants))
        ok = fail (error, path, "a TorchScript archive (torch.jit.save), not a state_dict saved by torch.save");
      g_free (constants);
    }
  g_ptr_array_unref (pickles);
  return ok;
}

/* The bytes of an entry: a pointer into the mapping when stored, else inflated into a
 * buffer owned by the file.  At most `limit` bytes are wanted (the entry may be longer);
 * *length receives how many are available. */
static const guint8 *
zip_entry_data (Zip *z, const char *name, size_t limit, gboolean check_crc, size_t *length,
                GError **error)
{
  const char *path = z->file->path;
  ZipEntry *e = g_hash_table_lookup (z->entries, name);
  char *escaped = g_strescape (name, NULL);
  const guint8 *result = NULL;
  if (!e)
    {
      fail (error, path, "zip entry '%s' is missing", escaped);
      goto out;
    }
  if (e->flag & 1)
    {
      fail (error, path, "zip entry '%s' is encrypted", escaped);
      goto out;
    }
  if (e->method != 0 && e->method != Z_DEFLATED)
    {
      fail (error, path, "zip entry '%s' uses compression method %lu (stored or deflated are read)",
            escaped, e->method);
      goto out;
    }
  if (unzGoToFilePos64 (z->zip, &e->position) != UNZ_OK || unzOpenCurrentFile (z->zip) != UNZ_OK)
    {
      fail (error, path, "zip entry '%s' has a damaged local header", escaped);
      goto out;
    }
  if (e->method == 0)
    {
      ZPOS64_T start = unzGetCurrentFileZStreamPos64 (z->zip);
      unzCloseCurrentFile (z->zip);
      if (e->compressed != e->uncompressed || start > z->stream.size
          || e->compressed > z->stream.size - start)
        {
          fail (error, path, "zip entry '%s' lies outside the file", escaped);
          goto out;
        }
      result = z->stream.data + start;
      *length = (size_t) e->compressed;
      if (check_crc && crc32_z (0, result, *length) != e->crc)
        {
          fail (error, path, "zip entry '%s' fails its CRC check", escaped);
          result = NULL;
        }
      goto out;
    }
  size_t want = (size_t) MIN ((ZPOS64_T) limit, e->uncompressed);
  if (e->uncompressed / MAX_DEFLATE_RATIO > e->compressed + 1)
    {
      unzCloseCurrentFile (z->zip);
      fail (error, path, "zip entry '%s' claims more data than deflate can hold", escaped);
      goto out;
    }
  guint8 *buffer = g_try_malloc (MAX (want, 1));
  if (!buffer)
    {
      unzCloseCurrentFile (z->zip);
      fail (error, path, "no memory to inflate zip entry '%s' (%zu bytes)", escaped, want);
      goto out;
    }
  size_t got = 0;
  while (got < want)
    {
      int n = unzReadCurrentFile (z->zip, buffer + got, (unsigned) MIN (want - got, (size_t) 1 << 30));
      if (n <= 0)
        break;
      got += (size_t) n;
    }
  /* the CRC covers the whole entry, so it is checked only when all of it was read */
  int closed = unzCloseCurrentFile (z->zip);
  if (got != want || (want == e->uncompressed && closed != UNZ_OK))
    {
      g_free (buffer);
      fail (error, path, "zip entry '%s' does not inflate to its %" G_GUINT64_FORMAT " bytes%s",
            escaped, (guint64) e->uncompressed, closed == UNZ_CRCERROR ? " (CRC mismatch)" : "");
      goto out;
    }
  g_ptr_array_add (z->file->buffers, buffer);
  result = buffer;
  *length = got;
out:
  g_free (escaped);
  return result;
}

static gboolean
zip_byteorder (Zip *z, gboolean *big_endian, GError **error)
{
  char *name = g_strconcat (z->folder, "byteorder", NULL);
  gboolean ok = TRUE;
  *big_endian = FALSE;
  if (g_hash_table_contains (z->entries, name))
    {
      size_t length = 0;
      const guint8 *text = zip_entry_data (z, name, 16, TRUE, &length, error);
      if (!text)
        ok = FALSE;
      else if (length == 3 && memcmp (text, "big", 3) == 0)
        *big_endian = TRUE;
      else if (!(length == 6 && memcmp (text, "little", 6) == 0))
        ok = fail (error, z->file->path, "byteorder record is neither 'little' nor 'big'");
    }
  g_free (name);
  return ok;
}

/* The end of central directory record (signature 0x06054b50, 22 bytes and a comment of
 * the length it states) must end the file; minizip tolerates a few missing bytes there,
 * which would let a truncated download pass. */
static gboolean
ends_with_directory_record (const guint8 *data, size_t size)
{
  if (size < 22)
    return FALSE;
  size_t lowest = size - 22 > 0xffff ? size - 22 - 0xffff : 0;
  for (size_t p = size - 22 + 1; p-- > lowest;)
    if (memcmp (data + p, "PK\x05\x06", 4) == 0 && p + 22 + (data[p + 20] | (data[p + 21] << 8)) == size)
      return TRUE;
  return FALSE;
}

static gboolean
read_zip (GdTorchFile *f, GError **error)
{
  Zip z = { .file = f };
  z.stream.data = g_bytes_get_data (f->bytes, &z.stream.size);
  if (!ends_with_directory_record (z.stream.data, z.stream.size))
    return fail (error, f->path, "truncated or damaged zip archive (its end of central directory record is missing)");
  zlib_filefunc64_def io = {
    .zopen64_file = mem_open, .zread_file = mem_read, .zwrite_file = mem_write,
    .ztell64_file = mem_tell, .zseek64_file = mem_seek, .zclose_file = mem_close,
    .zerror_file = mem_error, .opaque = &z.stream,
  };
  z.zip = unzOpen2_64 (f->path, &io);
  if (!z.zip)
    return fail (error, f->path, "not a readable zip archive (no valid end of central directory)");
  z.entries = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  GdPickle *pickle = gd_pickle_new (f->path);
  const guint8 **data = NULL;
  gboolean big_endian = FALSE;
  gboolean ok = zip_list (&z, error) && zip_byteorder (&z, &big_endian, error);
  if (ok)
    {
      char *name = g_strconcat (z.folder, "data.pkl", NULL);
      size_t length = 0;
      const guint8 *bytes = zip_entry_data (&z, name, MAX_PICKLE_BYTES, TRUE, &length, error);
      g_free (name);
      GdPickleValue *root = bytes ? gd_pickle_parse (pickle, bytes, length, NULL, error) : NULL;
      ok = root != NULL;
      if (ok)
        {
          guint n = gd_pickle_n_storages (pickle);
          data = g_new0 (const guint8 *, MAX (n, 1));
          for (guint i = 0; i < n && ok; i++)
            {
              const GdPickleStorage *s = gd_pickle_storage (pickle, i);
              if (s->root >= 0)
                continue;
              size_t need = storage_bytes (s), have = 0;
              char *entry = g_strconcat (z.folder, "data/", s->key, NULL);
              data[i] = zip_entry_data (&z, entry, need, FALSE, &have, error);
              ok = data[i] != NULL;
              if (ok && have < need)
                ok = fail (error, f->path, "storage '%s' holds %zu bytes, its tensors need %zu",
                           entry, have, need);
              g_free (entry);
            }
          if (ok)
            {
              resolve_views (pickle, data);
              ok = collect_tensors (f, root, data, big_endian, error);
            }
        }
    }
  g_free (data);
  gd_pickle_free (pickle);
  g_free (z.folder);
  g_hash_table_unref (z.entries);
  unzClose (z.zip);
  return ok;
}

/* ---- the legacy format ---- */

static gboolean
read_legacy (GdTorchFile *f, GError **error)
{
  size_t size, pos = 0, used = 0;
  const guint8 *bytes = g_bytes_get_data (f->bytes, &size);
  GdPickle *pickle = gd_pickle_new (f->path);
  const guint8 **data = NULL;
  gboolean ok = FALSE, big_endian = FALSE;

  GdPickleValue *magic = gd_pickle_parse (pickle, bytes, size, &used, error);
  if (!magic)
    goto out;
  pos += used;
  if (magic->kind != GD_PICKLE_BIGINT || magic->length != sizeof legacy_magic
      || memcmp (magic->string, legacy_magic, sizeof legacy_magic) != 0)
    {
      fail (error, f->path, "wrong magic number for a legacy PyTorch checkpoint");
      goto out;
    }
  GdPickleValue *version = gd_pickle_parse (pickle, bytes + pos, size - pos, &used, error);
  if (!version)
    goto out;
  pos += used;
  if (version->kind != GD_PICKLE_INT || version->integer != LEGACY_PROTOCOL_VERSION)
    {
      fail (error, f->path, "legacy checkpoint protocol version is not %d", LEGACY_PROTOCOL_VERSION);
      goto out;
    }
  GdPickleValue *sys_info = gd_pickle_parse (pickle, bytes + pos, size - pos, &used, error);
  if (!sys_info)
    goto out;
  pos += used;
  if (sys_info->kind != GD_PICKLE_DICT)
    {
      fail (error, f->path, "legacy checkpoint system info is a %s, not a dict",
            gd_pickle_kind_name (sys_info->kind));
      goto out;
    }
  for (guint i = 0; i + 1 < sys_info->items->len; i += 2)
    {
      const GdPickleValue *k = sys_info->items->pdata[i], *v = sys_info->items->pdata[i + 1];
      if (k->kind == GD_PICKLE_STRING && strcmp (k->string, "little_endian") == 0
          && v->kind == GD_PICKLE_BOOL)
        big_endian = !v->integer;
    }
  GdPickleValue *root = gd_pickle_parse (pickle, bytes + pos, size - pos, &used, error);
  if (!root)
    goto out;
  pos += used;
  GdPickleValue *keys = gd_pickle_parse (pickle, bytes + pos, size - pos, &used, error);
  if (!keys)
    goto out;
  pos += used;
  if (keys->kind != GD_PICKLE_LIST)
    {
      fail (error, f->path, "legacy checkpoint storage keys are a %s, not a list",
            gd_pickle_kind_name (keys->kind));
      goto out;
    }
  guint n = gd_pickle_n_storages (pickle);
  data = g_new0 (const guint8 *, MAX (n, 1));
  for (guint i = 0; i < keys->items->len; i++)
    {
      const GdPickleValue *key = keys->items->pdata[i];
      int index = key->kind == GD_PICKLE_STRING ? gd_pickle_find_storage (pickle, key->string) : -1;
      const GdPickleStorage *s = index >= 0 ? gd_pickle_storage (pickle, (guint) index) : NULL;
      if (!s || s->root >= 0 || data[index])
        {
          fail (error, f->path, "legacy storage list entry %u names no storage of the state_dict (or one twice)", i);
          goto out;
        }
      /* each storage: int64 element count, then the elements */
      int64_t count = 0;
      if (size - pos < 8)
        {
          fail (error, f->path, "truncated before storage '%s'", s->key);
          goto out;
        }
      for (int b = 7; b >= 0; b--)
        count = (int64_t) (((uint64_t) count << 8) | bytes[pos + (size_t) b]);
      pos += 8;
      if (count != s->numel)
        {
          fail (error, f->path, "storage '%s' holds %" G_GINT64_FORMAT " elements, the pickle says %"
                G_GINT64_FORMAT, s->key, count, s->numel);
          goto out;
        }
      size_t need = storage_bytes (s);
      if (need > size - pos)
        {
          fail (error, f->path, "truncated inside storage '%s'", s->key);
          goto out;
        }
      data[index] = bytes + pos;
      pos += need;
    }
  for (guint i = 0; i < n; i++)
    if (gd_pickle_storage (pickle, i)->root < 0 && !data[i])
      {
        fail (error, f->path, "storage '%s' has no data", gd_pickle_storage (pickle, i)->key);
        goto out;
      }
  resolve_views (pickle, data);
  ok = collect_tensors (f, root, data, big_endian, error);
out:
  g_free (data);
  gd_pickle_free (pickle);
  return ok;
}

/* ---- opening ---- */

GdTorchFile *
gd_torch_open_bytes (GBytes *bytes, const char *origin, GError **error)
{
  GdTorchFile *f = g_new0 (GdTorchFile, 1);
  f->path = g_strdup (origin);
  f->bytes = g_bytes_ref (bytes);
  f->tensors = g_ptr_array_new_with_free_func (tensor_free);
  f->by_name = g_hash_table_new (g_str_hash, g_str_equal);
  f->buffers = g_ptr_array_new_with_free_func (g_free);
  size_t size;
  const guint8 *head = g_bytes_get_data (bytes, &size);
  gboolean ok;
  if (is_zip (head, size))
    {
      f->format = GD_TORCH_ZIP;
      ok = read_zip (f, error);
    }
  else if (is_legacy (head, size))
    {
      f->format = GD_TORCH_LEGACY;
      ok = read_legacy (f, error);
    }
  else
    ok = fail (error, f->path, "not a PyTorch checkpoint (neither a zip archive nor the legacy format)");
  if (!ok)
    {
      gd_torch_free (f);
      return NULL;
    }
  return f;
}

GdTorchFile *
gd_torch_open (const char *path, GError **error)
{
  GError *local = NULL;
  GMappedFile *mapped = g_mapped_file_new (path, FALSE, &local);
  if (!mapped)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s", local->message);
      g_error_free (local);
      return NULL;
    }
  GBytes *bytes = g_mapped_file_get_bytes (mapped);
  g_mapped_file_unref (mapped);
  GdTorchFile *f = gd_torch_open_bytes (bytes, path, error);
  g_bytes_unref (bytes);
  return f;
}

/* ---- tensor values ---- */

static gboolean
is_contiguous (const GdTorchTensor *t)
{
  int64_t expected = 1;
  for (int d = t->ndim - 1; d >= 0; d--)
    {
      if (t->shape[d] != 1 && t->stride[d] != expected)
        return FALSE;
      expected *= t->shape[d];
    }
  return TRUE;
}

const float *
gd_torch_tensor_f32_in_place (const GdTorchTensor *t)
{
  if (t->dtype != GD_DTYPE_F32 || t->big_endian || !t->storage || !is_contiguous (t))
    return NULL;
  const guint8 *p = t->storage + (size_t) t->offset * sizeof (float);
  return (uintptr_t) p % sizeof (float) == 0 ? (const float *) p : NULL;
}

/* Copies the view's elements, in row-major order, into out. */
static void
gather (const GdTorchTensor *t, guint8 *out)
{
  size_t es = gd_dtype_size (t->dtype);
  if (t->numel == 0)
    return;
  if (is_contiguous (t))
    memcpy (out, t->storage + (size_t) t->offset * es, (size_t) t->numel * es);
  else
    {
      int nd = t->ndim;
      int64_t index[GD_MAX_DIMS] = { 0 };
      int64_t inner = t->shape[nd - 1], inner_stride = t->stride[nd - 1];
      for (int64_t done = 0; done < t->numel; done += inner)
        {
          int64_t base = t->offset;
          for (int d = 0; d < nd - 1; d++)
            base += index[d] * t->stride[d];
          for (int64_t i = 0; i < inner; i++)
            memcpy (out + (size_t) (done + i) * es, t->storage + (size_t) (base + i * inner_stride) * es, es);
          for (int d = nd - 2; d >= 0; d--)
            {
              if (++index[d] < t->shape[d])
                break;
              index[d] = 0;
            }
        }
    }
  if (t->big_endian && es > 1)
    for (int64_t i = 0; i < t->numel; i++)
      {
        guint8 *e = out + (size_t) i * es;
        for (size_t a = 0, b = es - 1; a < b; a++, b--)
          {
            guint8 tmp = e[a];
            e[a] = e[b];
            e[b] = tmp;
          }
      }
}

/* Converted a slice at a time, so that no second full-size float buffer is needed. */
#define CONVERT_CHUNK ((size_t) 1 << 20)

float *
gd_torch_tensor_to_f32 (const GdTorchTensor *t)
{
  size_t n = (size_t) t->numel, es = gd_dtype_size (t->dtype);
  float *out = g_try_new (float, MAX (n, 1));
  if (!out || t->dtype == GD_DTYPE_F32)
    {
      if (out)
        gather (t, (guint8 *) out);
      return out;
    }
  guint8 *raw = g_try_malloc_n (MAX (n, 1), es);
  if (!raw)
    {
      g_free (out);
      return NULL;
    }
  gather (t, raw);
  for (size_t done = 0; done < n; done += CONVERT_CHUNK)
    {
      size_t count = MIN (CONVERT_CHUNK, n - done);
      GdStTensor slice = { .name = t->name, .dtype = t->dtype, .numel = (int64_t) count,
                           .data = raw + done * es };
      float *part = gd_st_tensor_to_f32 (&slice);
      memcpy (out + done, part, count * sizeof (float));
      g_free (part);
    }
  g_free (raw);
  return out;
}
