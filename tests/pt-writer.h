/* Test helper: writes PyTorch checkpoints the way torch.save lays them out, without
 * Python: state_dict pickles (protocol 2) built opcode by opcode, the zip format (entries
 * stored with their data 64-byte aligned as torch.save writes them, stored misaligned,
 * or deflated) and the legacy format.  Also raw zip archives of arbitrary entries, for
 * damaged and hostile files. */
#pragma once
#include <glib.h>
#include <stdint.h>

typedef enum {
  PT_ZIP_ALIGNED,     /* what torch.save writes */
  PT_ZIP_MISALIGNED,  /* stored, but data at an offset of 2 mod 4 */
  PT_ZIP_DEFLATED,
  PT_LEGACY,
} PtLayout;

typedef struct PtWriter PtWriter;

PtWriter *pt_writer_new (void);
void pt_writer_free (PtWriter *w);
/* A storage of `numel` elements of the storage type `type` ("FloatStorage", "HalfStorage",
 * "BFloat16Storage", "DoubleStorage", "LongStorage"); `data` (numel elements) is borrowed
 * until the file is written.  Returns its index; its key is the index in decimal. */
guint pt_writer_add_storage (PtWriter *w, const char *type, const void *data, int64_t numel);
/* A tensor view of a storage; stride NULL means contiguous.  parameter wraps it in
 * torch._utils._rebuild_parameter, as an nn.Parameter is saved. */
void pt_writer_add_tensor (PtWriter *w, const char *name, guint storage, int64_t offset,
                           int ndim, const int64_t *shape, const int64_t *stride,
                           gboolean parameter);
/* Sets the archive's byteorder record (zip layouts; NULL: none, the default). */
void pt_writer_set_byteorder (PtWriter *w, const char *byteorder);

/* The state_dict pickle (data.pkl; legacy: persistent ids of six items). */
GByteArray *pt_writer_pickle (PtWriter *w, gboolean legacy);
gboolean pt_writer_write (PtWriter *w, const char *path, PtLayout layout, GError **error);
GBytes *pt_writer_to_bytes (PtWriter *w, PtLayout layout);

/* A zip archive of the given entries (names[i] holds contents[i]). */
GBytes *pt_zip_bytes (const char *const *names, GBytes *const *contents, guint n, PtLayout layout);

/* Pickle building blocks, for hand-made (also hostile) pickles. */
void pt_op (GByteArray *b, guint8 op);
void pt_string (GByteArray *b, const char *text);            /* BINUNICODE */
void pt_global (GByteArray *b, const char *module, const char *name);  /* GLOBAL */
void pt_int (GByteArray *b, int64_t value);                   /* BININT or LONG1 */

gboolean pt_write_file (const char *path, GBytes *bytes, GError **error);
