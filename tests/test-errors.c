/* Bad input must fail cleanly (DESIGN.md, "Errors"): the engine returns NULL or FALSE with
 * a GError of the GD_ERROR domain whose single-line message names the file and the cause,
 * and `guided forward` prints exactly that line, exits non-zero and never crashes.
 *
 * Each case writes a broken file into a temporary folder.  Framing and header errors are
 * built by hand; architecture, weight and input errors start from a reference model and
 * rewrite its header. */
#include "gd-error.h"
#include "gd-model.h"
#include "gd-safetensors.h"

#include <errno.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <json-glib/json-glib.h>
#include <string.h>
#include <sys/wait.h>

/* g_assert_nonnull (strstr (...)), but the report quotes both strings. */
#define assert_contains(text, part)                                                     \
  G_STMT_START {                                                                        \
    const char *text_ = (text), *part_ = (part);                                        \
    if (!strstr (text_, part_))                                                         \
      {                                                                                 \
        char *msg_ = g_strdup_printf ("\"%s\" does not contain \"%s\"", text_, part_);  \
        g_assertion_message (G_LOG_DOMAIN, __FILE__, __LINE__, G_STRFUNC, msg_);        \
        g_free (msg_);                                                                  \
      }                                                                                 \
  } G_STMT_END

/* The error must be ours, name `subject` (a path) and `cause`, and fit on one line. */
#define assert_gd_error(error, code, subject, cause)                                    \
  G_STMT_START {                                                                        \
    g_assert_error ((error), GD_ERROR, (int) (code));                                   \
    assert_contains ((error)->message, (subject));                                      \
    assert_contains ((error)->message, (cause));                                        \
    g_assert_null (strchr ((error)->message, '\n'));                                    \
  } G_STMT_END

typedef struct {
  char *dir;
} Fixture;

static void
fixture_setup (Fixture *f, gconstpointer data)
{
  (void) data;
  GError *error = NULL;
  f->dir = g_dir_make_tmp ("gd-test-errors-XXXXXX", &error);
  g_assert_no_error (error);
}

static void
fixture_teardown (Fixture *f, gconstpointer data)
{
  (void) data;
  GError *error = NULL;
  GDir *dir = g_dir_open (f->dir, 0, &error);
  g_assert_no_error (error);
  const char *name;
  while ((name = g_dir_read_name (dir)))
    {
      char *path = g_build_filename (f->dir, name, NULL);
      g_assert_cmpint (g_remove (path), ==, 0);
      g_free (path);
    }
  g_dir_close (dir);
  g_assert_cmpint (g_rmdir (f->dir), ==, 0);
  g_free (f->dir);
}

static char *
write_bytes (Fixture *f, const char *name, const void *bytes, gsize len)
{
  char *path = g_build_filename (f->dir, name, NULL);
  GError *error = NULL;
  g_file_set_contents (path, bytes, (gssize) len, &error);
  g_assert_no_error (error);
  return path;
}

/* safetensors framing: `declared_len` as 8 little-endian bytes, the header, the data. */
static GByteArray *
frame (guint64 declared_len, const char *header, gsize header_len, const guint8 *data, gsize data_len)
{
  GByteArray *bytes = g_byte_array_sized_new ((guint) (8 + header_len + data_len));
  for (int i = 0; i < 8; i++)
    {
      guint8 b = (guint8) (declared_len >> (8 * i));
      g_byte_array_append (bytes, &b, 1);
    }
  g_byte_array_append (bytes, (const guint8 *) header, (guint) header_len);
  if (data_len)
    g_byte_array_append (bytes, data, (guint) data_len);
  return bytes;
}

/* A header followed by data_len zero bytes, with the true header length. */
static char *
write_safetensors (Fixture *f, const char *name, const char *header, gsize data_len)
{
  guint8 *zeros = g_malloc0 (MAX (data_len, 1));
  GByteArray *bytes = frame (strlen (header), header, strlen (header), zeros, data_len);
  char *path = write_bytes (f, name, bytes->data, bytes->len);
  g_byte_array_unref (bytes);
  g_free (zeros);
  return path;
}

/* A well-formed input file for `guided forward`: x [1, c, h, w] of zeros, t = [10] and,
 * when label is given, y = [*label]. */
static char *
write_input (Fixture *f, const char *name, int c, int h, int w, const int64_t *label)
{
  float *x = g_new0 (float, (gsize) c * h * w);
  int64_t x_shape[4] = { 1, c, h, w }, one[1] = { 1 }, t[1] = { 10 };
  GdStWriter *writer = gd_st_writer_new ();
  gd_st_writer_add (writer, "x", GD_DTYPE_F32, 4, x_shape, x);
  gd_st_writer_add (writer, "t", GD_DTYPE_I64, 1, one, t);
  if (label)
    gd_st_writer_add (writer, "y", GD_DTYPE_I64, 1, one, label);
  char *path = g_build_filename (f->dir, name, NULL);
  GError *error = NULL;
  g_assert_true (gd_st_writer_write (writer, path, &error));
  g_assert_no_error (error);
  gd_st_writer_free (writer);
  g_free (x);
  return path;
}

/* Path of a reference fixture, or NULL after marking the case skipped with the reason. */
static char *
reference_file (const char *relative)
{
  const char *dir = g_getenv ("GD_REFERENCE_DIR");
  if (!dir || !*dir)
    {
      g_test_skip ("GD_REFERENCE_DIR is not set (meson sets it to the reference fixtures)");
      return NULL;
    }
  if (!g_file_test (dir, G_FILE_TEST_IS_DIR))
    {
      g_test_skip_printf ("reference fixtures missing: %s is not a directory", dir);
      return NULL;
    }
  char *path = g_build_filename (dir, relative, NULL);
  if (!g_file_test (path, G_FILE_TEST_IS_REGULAR))
    {
      g_test_skip_printf ("reference fixture missing: %s", path);
      g_free (path);
      return NULL;
    }
  return path;
}

static GdModel *
load_reference_model (const char *folder, char **path_out)
{
  char *relative = g_build_filename (folder, "model.safetensors", NULL);
  char *path = reference_file (relative);
  g_free (relative);
  *path_out = path;
  if (!path)
    return NULL;
  GError *error = NULL;
  GdModel *model = gd_model_load (path, &error);
  g_assert_no_error (error);
  g_assert_nonnull (model);
  return model;
}

/* ---- the command line ---- */

typedef struct {
  char *out_path;
  gboolean exited;
  int exit_status;
  int signal;
  char *stdout_text, *stderr_text;
} CliRun;

/* Runs `guided forward model in OUT` with OUT in the temporary folder; FALSE (after
 * marking the case skipped) when the binary is not known. */
static gboolean
cli_run (Fixture *f, const char *model, const char *in, const char *out, CliRun *run)
{
  memset (run, 0, sizeof *run);
  const char *guided = g_getenv ("GUIDED");
  if (!guided || !*guided)
    {
      g_test_skip ("GUIDED is not set (meson sets it to the guided binary): command line not checked");
      return FALSE;
    }
  run->out_path = out ? g_strdup (out) : g_build_filename (f->dir, "out.safetensors", NULL);
  const char *argv[] = { guided, "forward", model, in, run->out_path, NULL };
  int wait_status = 0;
  GError *error = NULL;
  g_spawn_sync (NULL, (char **) argv, NULL, G_SPAWN_DEFAULT, NULL, NULL,
                &run->stdout_text, &run->stderr_text, &wait_status, &error);
  g_assert_no_error (error);
  run->exited = WIFEXITED (wait_status);
  run->exit_status = run->exited ? WEXITSTATUS (wait_status) : -1;
  run->signal = WIFSIGNALED (wait_status) ? WTERMSIG (wait_status) : 0;
  return TRUE;
}

static void
cli_run_clear (CliRun *run)
{
  g_free (run->out_path);
  g_free (run->stdout_text);
  g_free (run->stderr_text);
}

/* Lines of text, counting an unterminated last line. */
static guint
count_lines (const char *text)
{
  guint lines = 0;
  for (const char *p = text; *p; p++)
    if (*p == '\n' || p[1] == '\0')
      lines++;
  return lines;
}

/* Why `run` is not a clean failure that names subject and cause, or NULL when it is.
 * Only the first line of stderr is quoted: it identifies the fault, and a sanitizer
 * report would run to pages. */
static char *
cli_failure_problem (const CliRun *run, const char *subject, const char *cause)
{
  const char *text = run->stderr_text, *newline = strchr (text, '\n');
  char *first = g_strndup (text, newline ? (gsize) (newline - text) : strlen (text));
  char *shown = g_strescape (first, NULL);
  guint lines = count_lines (text);
  char *problem = NULL;
  if (!run->exited)
    problem = g_strdup_printf ("guided was killed by signal %d (stderr: %u lines, the first \"%s\")",
                               run->signal, lines, shown);
  else if (run->exit_status == 0)
    problem = g_strdup_printf ("guided exited with status 0 (stderr: %u lines, the first \"%s\")",
                               lines, shown);
  else if (!newline || newline[1] != '\0')
    problem = g_strdup_printf ("stderr is not exactly one line: %u lines, the first \"%s\"",
                               lines, shown);
  else if (!strstr (text, subject))
    problem = g_strdup_printf ("stderr \"%s\" does not name %s", shown, subject);
  else if (!strstr (text, cause))
    problem = g_strdup_printf ("stderr \"%s\" does not say \"%s\"", shown, cause);
  else if (g_file_test (run->out_path, G_FILE_TEST_EXISTS))
    problem = g_strdup_printf ("the failed run left %s behind", run->out_path);
  g_free (shown);
  g_free (first);
  return problem;
}

/* The command line must fail cleanly; a failure is reported at the caller's line. */
static void
cli_fails_at (const char *file, int line, const char *func, Fixture *f, const char *model,
              const char *in, const char *out, const char *subject, const char *cause)
{
  CliRun run;
  if (!cli_run (f, model, in, out, &run))
    return;
  char *problem = cli_failure_problem (&run, subject, cause);
  if (problem)
    g_assertion_message (G_LOG_DOMAIN, file, line, func, problem);
  g_free (problem);
  cli_run_clear (&run);
}

#define assert_cli_fails_with_output(f, model, in, out, subject, cause) \
  cli_fails_at (__FILE__, __LINE__, G_STRFUNC, (f), (model), (in), (out), (subject), (cause))
#define assert_cli_fails(f, model, in, subject, cause) \
  assert_cli_fails_with_output ((f), (model), (in), NULL, (subject), (cause))

/* ---- broken framing: the length field and the file size ---- */

typedef struct {
  const char *name;
  gboolean custom_length;   /* write declared_len instead of the header's own length */
  guint64 declared_len;
  const char *header;
  gssize keep;              /* keep only this many bytes of the file (-1: all) */
  const char *cause;
  gboolean cli;
} FramingCase;

static const FramingCase framing_cases[] = {
  { "empty-file", FALSE, 0, "{}", 0, "file is 0 bytes, too short for a safetensors header", TRUE },
  { "shorter-than-length-field", FALSE, 0, "{}", 5,
    "file is 5 bytes, too short for a safetensors header", FALSE },
  { "header-length-past-end", TRUE, 1000, "{}", -1,
    "header length 1000 runs past the end of the file (10 bytes)", TRUE },
  { "header-length-max", TRUE, G_MAXUINT64, "{}", -1,
    "header length 18446744073709551615 runs past the end of the file", FALSE },
  { "header-length-zero", TRUE, 0, "{}", -1, "header length 0 is implausible", FALSE },
};

static void
test_framing (Fixture *f, gconstpointer data)
{
  const FramingCase *c = data;
  gsize header_len = strlen (c->header);
  GByteArray *bytes = frame (c->custom_length ? c->declared_len : header_len,
                             c->header, header_len, NULL, 0);
  gsize len = c->keep >= 0 ? MIN ((gsize) c->keep, bytes->len) : bytes->len;
  char *path = write_bytes (f, "model.safetensors", bytes->data, len);
  g_byte_array_unref (bytes);

  GError *error = NULL;
  g_assert_null (gd_safetensors_open (path, &error));
  assert_gd_error (error, GD_ERROR_FORMAT, path, c->cause);
  g_clear_error (&error);
  g_assert_null (gd_model_load (path, &error));
  assert_gd_error (error, GD_ERROR_FORMAT, path, c->cause);
  g_clear_error (&error);

  if (c->cli)
    {
      int64_t label[1] = { 0 };
      char *in = write_input (f, "in.safetensors", 3, 16, 16, label);
      assert_cli_fails (f, path, in, path, c->cause);
      g_free (in);
    }
  g_free (path);
}

/* ---- broken JSON headers ---- */

typedef struct {
  const char *name;
  const char *header;
  gsize data_len;
  const char *cause;
  gboolean cli;
} HeaderCase;

static const HeaderCase header_cases[] = {
  { "malformed-json", "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], ", 0, "malformed JSON header", TRUE },
  { "header-not-object/array", "[1, 2, 3]", 0, "JSON header is not an object", TRUE },
  { "header-not-object/number", "42", 0, "JSON header is not an object", FALSE },
  { "unknown-dtype", "{\"w\": {\"dtype\": \"Q7\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16,
    "tensor 'w' has unknown dtype 'Q7'", TRUE },
  { "offsets-out-of-range/past-end",
    "{\"w\": {\"dtype\": \"F32\", \"shape\": [100], \"data_offsets\": [0, 400]}}", 16,
    "tensor 'w' data offsets [0, 400] out of range (data section is 16 bytes)", TRUE },
  { "offsets-out-of-range/negative",
    "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [-16, 0]}}", 16,
    "tensor 'w' data offsets [-16, 0] out of range", FALSE },
  { "offsets-out-of-range/reversed",
    "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [16, 0]}}", 16,
    "tensor 'w' data offsets [16, 0] out of range", FALSE },
  { "overlapping-offsets",
    "{\"a\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 16]},"
    " \"b\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [8, 24]}}", 24,
    "tensors 'a' and 'b' overlap in the data section", FALSE },
  { "byte-count-mismatch/shape",
    "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0, 12]}}", 12,
    "tensor 'w' holds 12 bytes but its shape and dtype need 16", TRUE },
  { "byte-count-mismatch/dtype",
    "{\"w\": {\"dtype\": \"F64\", \"shape\": [4], \"data_offsets\": [0, 16]}}", 16,
    "tensor 'w' holds 16 bytes but its shape and dtype need 32", FALSE },
  { "entry-not-object", "{\"w\": 5}", 0, "header entry 'w' is not an object", FALSE },
  { "no-dtype", "{\"w\": {\"shape\": [4], \"data_offsets\": [0, 16]}}", 16,
    "tensor 'w' has no dtype string", FALSE },
  { "no-shape", "{\"w\": {\"dtype\": \"F32\", \"data_offsets\": [0, 16]}}", 16,
    "tensor 'w' has no shape array", FALSE },
  { "negative-dimension", "{\"w\": {\"dtype\": \"F32\", \"shape\": [-4], \"data_offsets\": [0, 16]}}", 16,
    "tensor 'w' has an invalid shape", FALSE },
  { "overflowing-shape",
    "{\"w\": {\"dtype\": \"F32\", \"shape\": [4294967296, 4294967296], \"data_offsets\": [0, 16]}}", 16,
    "tensor 'w' has an invalid shape", FALSE },
  { "too-many-dimensions",
    "{\"w\": {\"dtype\": \"F32\", \"shape\": [1, 1, 1, 1, 1, 1, 1, 1, 1], \"data_offsets\": [0, 4]}}", 4,
    "tensor 'w' has 9 dimensions (at most 8 supported)", FALSE },
  { "no-data-offsets", "{\"w\": {\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [0]}}", 16,
    "tensor 'w' has no [begin, end] data_offsets", FALSE },
  { "metadata-not-object", "{\"__metadata__\": [1]}", 0, "__metadata__ is not an object", FALSE },
  { "metadata-not-string", "{\"__metadata__\": {\"kind\": 1}}", 0,
    "__metadata__ value 'kind' is not a string", FALSE },
};

static void
test_header (Fixture *f, gconstpointer data)
{
  const HeaderCase *c = data;
  char *path = write_safetensors (f, "model.safetensors", c->header, c->data_len);

  GError *error = NULL;
  g_assert_null (gd_safetensors_open (path, &error));
  assert_gd_error (error, GD_ERROR_FORMAT, path, c->cause);
  g_clear_error (&error);
  g_assert_null (gd_model_load (path, &error));
  assert_gd_error (error, GD_ERROR_FORMAT, path, c->cause);
  g_clear_error (&error);

  if (c->cli)
    {
      int64_t label[1] = { 0 };
      char *in = write_input (f, "in.safetensors", 3, 16, 16, label);
      assert_cli_fails (f, path, in, path, c->cause);
      g_free (in);
    }
  g_free (path);
}

static void
test_missing_file (Fixture *f, gconstpointer data)
{
  (void) data;
  char *path = g_build_filename (f->dir, "no-such-model.safetensors", NULL);
  GError *error = NULL;
  g_assert_null (gd_model_load (path, &error));
  assert_gd_error (error, GD_ERROR_IO, path, g_strerror (ENOENT));
  g_clear_error (&error);
  int64_t label[1] = { 0 };
  char *in = write_input (f, "in.safetensors", 3, 16, 16, label);
  assert_cli_fails (f, path, in, path, g_strerror (ENOENT));
  g_free (in);
  g_free (path);
}

/* ---- reference models with a rewritten header ---- */

/* A safetensors file taken apart for editing. */
typedef struct {
  JsonNode *header;     /* the JSON header (an object) */
  GByteArray *data;     /* the data section */
  JsonNode *config;     /* __metadata__.config, parsed on first use, written back on save */
} StFile;

static StFile *
st_file_read (const char *path)
{
  char *contents;
  gsize len;
  GError *error = NULL;
  g_file_get_contents (path, &contents, &len, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (len, >=, 8);
  guint64 header_len = 0;
  for (int i = 7; i >= 0; i--)
    header_len = (header_len << 8) | (guint8) contents[i];
  g_assert_cmpuint (header_len, <=, len - 8);

  StFile *s = g_new0 (StFile, 1);
  JsonParser *parser = json_parser_new ();
  json_parser_load_from_data (parser, contents + 8, (gssize) header_len, &error);
  g_assert_no_error (error);
  s->header = json_node_copy (json_parser_get_root (parser));
  g_assert_true (JSON_NODE_HOLDS_OBJECT (s->header));
  g_object_unref (parser);
  s->data = g_byte_array_sized_new ((guint) (len - 8 - header_len));
  g_byte_array_append (s->data, (const guint8 *) contents + 8 + header_len,
                       (guint) (len - 8 - header_len));
  g_free (contents);
  return s;
}

static void
st_file_free (StFile *s)
{
  json_node_unref (s->header);
  if (s->config)
    json_node_unref (s->config);
  g_byte_array_unref (s->data);
  g_free (s);
}

static JsonObject *
st_file_header (StFile *s)
{
  return json_node_get_object (s->header);
}

static JsonObject *
st_file_metadata (StFile *s)
{
  JsonObject *metadata = json_object_get_object_member (st_file_header (s), "__metadata__");
  g_assert_nonnull (metadata);
  return metadata;
}

static JsonObject *
st_file_config (StFile *s)
{
  if (!s->config)
    {
      GError *error = NULL;
      s->config = json_from_string (json_object_get_string_member (st_file_metadata (s), "config"),
                                    &error);
      g_assert_no_error (error);
      g_assert_true (JSON_NODE_HOLDS_OBJECT (s->config));
    }
  return json_node_get_object (s->config);
}

/* Replaces (or adds) a member of a header entry with a JSON value. */
static void
st_file_set (StFile *s, const char *tensor, const char *member, const char *value_json)
{
  JsonObject *entry = json_object_get_object_member (st_file_header (s), tensor);
  g_assert_nonnull (entry);
  GError *error = NULL;
  JsonNode *value = json_from_string (value_json, &error);
  g_assert_no_error (error);
  json_object_set_member (entry, member, value);
}

static char *
st_file_write (StFile *s, Fixture *f, const char *name)
{
  if (s->config)
    {
      char *config = json_to_string (s->config, FALSE);
      json_object_set_string_member (st_file_metadata (s), "config", config);
      g_free (config);
    }
  char *header = json_to_string (s->header, FALSE);
  GByteArray *bytes = frame (strlen (header), header, strlen (header), s->data->data, s->data->len);
  char *path = write_bytes (f, name, bytes->data, bytes->len);
  g_byte_array_unref (bytes);
  g_free (header);
  return path;
}

static void
edit_drop_metadata (StFile *s)
{
  json_object_remove_member (st_file_header (s), "__metadata__");
}

static void
edit_drop_kind (StFile *s)
{
  json_object_remove_member (st_file_metadata (s), "kind");
}

static void
edit_drop_config (StFile *s)
{
  json_object_remove_member (st_file_metadata (s), "config");
}

static void
edit_unknown_kind (StFile *s)
{
  json_object_set_string_member (st_file_metadata (s), "kind", "vae");
}

static void
edit_drop_weight (StFile *s)
{
  json_object_remove_member (st_file_header (s), "out.3.bias");
}

/* A well-formed tensor of its own bytes that no layer of the architecture owns. */
static void
edit_extra_weight (StFile *s)
{
  static const float values[4] = { 1, 2, 3, 4 };
  char *entry = g_strdup_printf ("{\"dtype\": \"F32\", \"shape\": [4], \"data_offsets\": [%u, %u]}",
                                 s->data->len, s->data->len + (guint) sizeof values);
  g_byte_array_append (s->data, (const guint8 *) values, sizeof values);
  GError *error = NULL;
  JsonNode *node = json_from_string (entry, &error);
  g_assert_no_error (error);
  json_object_set_member (st_file_header (s), "extra.weight", node);
  g_free (entry);
}

/* Same bytes, transposed shape: only the shape check can catch it. */
static void
edit_wrong_shape (StFile *s)
{
  st_file_set (s, "out.3.weight", "shape", "[64, 5, 1, 1]");
}

static void
edit_integer_weight (StFile *s)
{
  st_file_set (s, "out.3.bias", "dtype", "\"I32\"");
}

typedef struct {
  const char *name;
  const char *fixture;          /* folder under the reference dir */
  const char *config_changes;   /* JSON object merged into the config, or NULL */
  const char *config_text;      /* replaces the config string, or NULL */
  void (*edit) (StFile *s);     /* other header edits, or NULL */
  GdErrorCode code;
  const char *cause;
  gboolean cli;
} ModelCase;

#define ADAPTIVE "classifier/tiny_adaptive"
#define ATTNPOOL "classifier/tiny_attnpool"
#define COND_UNET "unet/tiny_cond_learnsigma"

static const ModelCase model_cases[] = {
  /* metadata */
  { "metadata/none", ADAPTIVE, NULL, NULL, edit_drop_metadata, GD_ERROR_FORMAT,
    "no architecture: __metadata__ needs 'kind' and 'config'", TRUE },
  { "metadata/no-kind", ADAPTIVE, NULL, NULL, edit_drop_kind, GD_ERROR_FORMAT,
    "no architecture: __metadata__ needs 'kind' and 'config'", FALSE },
  { "metadata/no-config", ADAPTIVE, NULL, NULL, edit_drop_config, GD_ERROR_FORMAT,
    "no architecture: __metadata__ needs 'kind' and 'config'", FALSE },
  { "metadata/unknown-kind", ADAPTIVE, NULL, NULL, edit_unknown_kind, GD_ERROR_FORMAT,
    "unknown model kind 'vae' (unet or classifier)", TRUE },
  /* weights */
  { "weights/missing", ADAPTIVE, NULL, NULL, edit_drop_weight, GD_ERROR_WEIGHTS,
    "missing weight 'out.3.bias'", TRUE },
  { "weights/extra", ADAPTIVE, NULL, NULL, edit_extra_weight, GD_ERROR_WEIGHTS,
    "unexpected weight 'extra.weight' (not part of the architecture in the metadata)", FALSE },
  { "weights/wrong-shape", ADAPTIVE, NULL, NULL, edit_wrong_shape, GD_ERROR_WEIGHTS,
    "weight 'out.3.weight' has shape [64, 5, 1, 1], the architecture needs [5, 64, 1, 1]", TRUE },
  { "weights/integer-dtype", ADAPTIVE, NULL, NULL, edit_integer_weight, GD_ERROR_WEIGHTS,
    "weight 'out.3.bias' has dtype I32, not a float", FALSE },
  /* configurations the architecture cannot be built from */
  { "config/group-norm-channels", ADAPTIVE, "{\"model_channels\": 48}", NULL, NULL, GD_ERROR_CONFIG,
    "config: GroupNorm(32) cannot split 48 channels into 32 groups", TRUE },
  { "config/head-channels-not-dividing", ATTNPOOL, "{\"num_head_channels\": 24}", NULL, NULL,
    GD_ERROR_CONFIG, "config: num_head_channels 24 does not divide 64 channels", FALSE },
  { "config/heads-not-dividing", ADAPTIVE, "{\"num_heads\": 3, \"num_head_channels\": -1}", NULL,
    NULL, GD_ERROR_CONFIG, "config: 3 attention heads do not divide 64 channels", TRUE },
  { "config/unknown-key", ADAPTIVE, "{\"use_magic\": true}", NULL, NULL, GD_ERROR_CONFIG,
    "config: unknown constructor argument 'use_magic'", FALSE },
  { "config/wrong-type", ADAPTIVE, "{\"model_channels\": \"32\"}", NULL, NULL, GD_ERROR_CONFIG,
    "config: 'model_channels' has a value of the wrong type", FALSE },
  { "config/not-positive", ADAPTIVE, "{\"model_channels\": 0}", NULL, NULL, GD_ERROR_CONFIG,
    "config: model_channels must be positive", FALSE },
  { "config/unsupported-dims", ADAPTIVE, "{\"dims\": 3}", NULL, NULL, GD_ERROR_CONFIG,
    "config: dims = 3: only 2-D models are supported", FALSE },
  { "config/unsupported-pool", ADAPTIVE, "{\"pool\": \"max\"}", NULL, NULL, GD_ERROR_CONFIG,
    "config: pool 'max' is not supported (adaptive, attention)", FALSE },
  { "config/attention-pool-without-head-channels", ATTNPOOL, "{\"num_head_channels\": -1}", NULL,
    NULL, GD_ERROR_CONFIG, "config: attention pooling needs num_head_channels", FALSE },
  { "config/malformed-json", ADAPTIVE, NULL, "{\"image_size\": 16, \"in_channels\": ", NULL,
    GD_ERROR_CONFIG, "config: malformed JSON", TRUE },
  { "config/not-object", ADAPTIVE, NULL, "[16, 3, 32]", NULL, GD_ERROR_CONFIG,
    "config: not a JSON object", FALSE },
};

static char *
write_model_case (Fixture *f, const ModelCase *c)
{
  char *relative = g_build_filename (c->fixture, "model.safetensors", NULL);
  char *source = reference_file (relative);
  g_free (relative);
  if (!source)
    return NULL;
  StFile *s = st_file_read (source);
  g_free (source);
  if (c->config_changes)
    {
      GError *error = NULL;
      JsonNode *changes = json_from_string (c->config_changes, &error);
      g_assert_no_error (error);
      JsonObject *config = st_file_config (s), *changed = json_node_get_object (changes);
      GList *keys = json_object_get_members (changed);
      for (GList *k = keys; k; k = k->next)
        json_object_set_member (config, k->data,
                                json_node_copy (json_object_get_member (changed, k->data)));
      g_list_free (keys);
      json_node_unref (changes);
    }
  if (c->config_text)
    json_object_set_string_member (st_file_metadata (s), "config", c->config_text);
  if (c->edit)
    c->edit (s);
  char *path = st_file_write (s, f, "model.safetensors");
  st_file_free (s);
  return path;
}

static void
test_model (Fixture *f, gconstpointer data)
{
  const ModelCase *c = data;
  char *path = write_model_case (f, c);
  if (!path)
    return;
  GError *error = NULL;
  g_assert_null (gd_model_load (path, &error));
  assert_gd_error (error, c->code, path, c->cause);
  g_clear_error (&error);
  if (c->cli)
    {
      int64_t label[1] = { 0 };
      char *in = write_input (f, "in.safetensors", 3, 16, 16, label);
      assert_cli_fails (f, path, in, path, c->cause);
      g_free (in);
    }
  g_free (path);
}

/* The adaptive-pool reference model cut to its first `keep` bytes (keep < 0: all but the
 * last -keep), or NULL (skipped) when the fixture is missing. */
static char *
truncated_reference_model (Fixture *f, gssize keep)
{
  char *source = reference_file (ADAPTIVE "/model.safetensors");
  if (!source)
    return NULL;
  char *contents;
  gsize len;
  GError *error = NULL;
  g_file_get_contents (source, &contents, &len, &error);
  g_assert_no_error (error);
  char *path = write_bytes (f, "model.safetensors", contents, keep < 0 ? len + keep : (gsize) keep);
  g_free (contents);
  g_free (source);
  return path;
}

/* A reference model whose file is cut short: the header is intact, the last tensor's
 * offsets run past the end of what is left. */
static void
test_data_cut_short (Fixture *f, gconstpointer data)
{
  (void) data;
  char *path = truncated_reference_model (f, -4);
  if (!path)
    return;
  GError *error = NULL;
  const char *cause = "out of range (data section is";
  g_assert_null (gd_safetensors_open (path, &error));
  assert_gd_error (error, GD_ERROR_FORMAT, path, cause);
  g_clear_error (&error);
  g_assert_null (gd_model_load (path, &error));
  assert_gd_error (error, GD_ERROR_FORMAT, path, cause);
  g_clear_error (&error);

  int64_t label[1] = { 0 };
  char *in = write_input (f, "in.safetensors", 3, 16, 16, label);
  assert_cli_fails (f, path, in, path, cause);
  g_free (in);
  g_free (path);
}

/* A reference model cut inside its JSON header. */
static void
test_header_cut_short (Fixture *f, gconstpointer data)
{
  (void) data;
  char *path = truncated_reference_model (f, 100);
  if (!path)
    return;
  GError *error = NULL;
  const char *cause = "runs past the end of the file (100 bytes)";
  g_assert_null (gd_model_load (path, &error));
  assert_gd_error (error, GD_ERROR_FORMAT, path, cause);
  g_clear_error (&error);
  g_free (path);
}

/* A channel_mult that rounds a level's width down to 0 channels is a config error (it
 * once passed every check and crashed while building zero attention heads). */
static void
test_zero_channel_level (Fixture *f, gconstpointer data)
{
  (void) data;
  static const ModelCase c = { "config/zero-channel-level", ATTNPOOL,
                               "{\"channel_mult\": [1, 0.01]}", NULL, NULL, GD_ERROR_CONFIG,
                               "config:", TRUE };
  char *path = write_model_case (f, &c);
  if (!path)
    return;
  int64_t label[1] = { 0 };
  char *in = write_input (f, "in.safetensors", 3, 16, 16, label);
  CliRun run;
  if (cli_run (f, path, in, NULL, &run))
    {
      char *problem = cli_failure_problem (&run, path, c.cause);
      if (problem)
        g_error ("a level of 0 channels (channel_mult [1, 0.01]) is not rejected: %s", problem);
      else
        {
          /* Only safe to call in this process once the command line survived it. */
          GError *error = NULL;
          g_assert_null (gd_model_load (path, &error));
          assert_gd_error (error, GD_ERROR_CONFIG, path, c.cause);
          g_clear_error (&error);
        }
      g_free (problem);
      cli_run_clear (&run);
    }
  g_free (in);
  g_free (path);
}

/* ---- inputs that do not fit the model ---- */

static void
test_input_channels (Fixture *f, gconstpointer data)
{
  (void) data;
  char *model_path;
  GdModel *model = load_reference_model (ADAPTIVE, &model_path);
  if (!model)
    return;
  const char *cause = "it takes 3 channels";
  GError *error = NULL;
  g_assert_false (gd_model_check_input (model, 1, 4, 16, 16, NULL, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, cause);
  g_clear_error (&error);
  gd_model_free (model);

  int64_t label[1] = { 0 };
  char *in = write_input (f, "in.safetensors", 4, 16, 16, label);
  assert_cli_fails (f, model_path, in, model_path, cause);
  g_free (in);
  g_free (model_path);
}

static void
test_input_size_not_multiple (Fixture *f, gconstpointer data)
{
  (void) data;
  char *model_path;
  GdModel *model = load_reference_model (ADAPTIVE, &model_path);
  if (!model)
    return;
  const char *cause = "input of 15x15 does not fit";
  GError *error = NULL;
  g_assert_false (gd_model_check_input (model, 1, 3, 15, 15, NULL, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, cause);
  assert_contains (error->message, "height and width must be multiples of 2");
  g_clear_error (&error);
  gd_model_free (model);

  int64_t label[1] = { 0 };
  char *in = write_input (f, "in.safetensors", 3, 15, 15, label);
  assert_cli_fails (f, model_path, in, model_path, cause);
  g_free (in);
  g_free (model_path);
}

/* AttentionPool2d has a positional embedding for image_size only. */
static void
test_input_attention_pool_size (Fixture *f, gconstpointer data)
{
  (void) data;
  char *model_path;
  GdModel *model = load_reference_model (ATTNPOOL, &model_path);
  if (!model)
    return;
  const char *cause = "its attention pooling needs 16x16";
  int64_t t[1] = { 10 }, y[1] = { 0 };
  float *x = g_new0 (float, 3 * 8 * 8), *grad = g_new0 (float, 3 * 8 * 8), logits[10];
  GError *error = NULL;
  g_assert_false (gd_model_check_input (model, 1, 3, 8, 8, NULL, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, cause);
  g_clear_error (&error);
  g_assert_false (gd_model_forward (model, x, 1, 8, 8, t, NULL, logits, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, cause);
  g_clear_error (&error);
  g_assert_false (gd_classifier_gradient (model, x, 1, 8, 8, t, y, logits, grad, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, cause);
  g_clear_error (&error);
  g_free (x);
  g_free (grad);
  gd_model_free (model);

  char *in = write_input (f, "in.safetensors", 3, 8, 8, y);
  assert_cli_fails (f, model_path, in, model_path, cause);
  g_free (in);
  g_free (model_path);
}

static void
test_input_unet_label (Fixture *f, gconstpointer data)
{
  (void) data;
  char *model_path;
  GdModel *model = load_reference_model (COND_UNET, &model_path);
  if (!model)
    return;
  int64_t t[1] = { 10 }, too_big[1] = { 10 }, negative[1] = { -1 };
  float *x = g_new0 (float, 3 * 16 * 16), *out = g_new0 (float, 6 * 16 * 16);
  GError *error = NULL;
  g_assert_false (gd_model_check_input (model, 1, 3, 16, 16, too_big, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, "class label 10 is out of range");
  assert_contains (error->message, "(0 to 9)");
  g_clear_error (&error);
  g_assert_false (gd_model_forward (model, x, 1, 16, 16, t, negative, out, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, "class label -1 is out of range");
  g_clear_error (&error);
  g_assert_false (gd_model_forward (model, x, 1, 16, 16, t, NULL, out, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, "is class-conditional: class labels y are needed");
  g_clear_error (&error);
  g_free (x);
  g_free (out);
  gd_model_free (model);

  char *in = write_input (f, "in.safetensors", 3, 16, 16, too_big);
  assert_cli_fails (f, model_path, in, model_path, "class label 10 is out of range");
  g_free (in);
  in = write_input (f, "in-unlabelled.safetensors", 3, 16, 16, NULL);
  assert_cli_fails (f, model_path, in, model_path, "class labels y are needed");
  g_free (in);
  g_free (model_path);
}

static void
test_input_classifier_label (Fixture *f, gconstpointer data)
{
  (void) data;
  char *model_path;
  GdModel *model = load_reference_model (ADAPTIVE, &model_path);
  if (!model)
    return;
  const char *cause = "class label 5 is out of range";
  int64_t t[1] = { 10 }, y[1] = { 5 };
  float *x = g_new0 (float, 3 * 16 * 16), *grad = g_new0 (float, 3 * 16 * 16), logits[5];
  GError *error = NULL;
  g_assert_false (gd_classifier_gradient (model, x, 1, 16, 16, t, y, logits, grad, &error));
  assert_gd_error (error, GD_ERROR_INPUT, model_path, cause);
  assert_contains (error->message, "(0 to 4)");
  g_clear_error (&error);
  g_free (x);
  g_free (grad);
  gd_model_free (model);

  char *in = write_input (f, "in.safetensors", 3, 16, 16, y);
  assert_cli_fails (f, model_path, in, model_path, cause);
  g_free (in);
  g_free (model_path);
}

/* Engine bug: gd_st_tensor_to_i64's message names the tensor but not its file, so the
 * command line cannot say which input file holds the bad timestep. */
static void
test_input_timestep_not_whole (Fixture *f, gconstpointer data)
{
  (void) data;
  char *model_path;
  GdModel *model = load_reference_model (ADAPTIVE, &model_path);
  if (!model)
    return;
  gd_model_free (model);

  float x[3 * 16 * 16] = { 0 }, t[1] = { 0.5f };
  int64_t x_shape[4] = { 1, 3, 16, 16 }, one[1] = { 1 }, y[1] = { 0 };
  GdStWriter *writer = gd_st_writer_new ();
  gd_st_writer_add (writer, "x", GD_DTYPE_F32, 4, x_shape, x);
  gd_st_writer_add (writer, "t", GD_DTYPE_F32, 1, one, t);
  gd_st_writer_add (writer, "y", GD_DTYPE_I64, 1, one, y);
  char *in = g_build_filename (f->dir, "in.safetensors", NULL);
  GError *error = NULL;
  g_assert_true (gd_st_writer_write (writer, in, &error));
  g_assert_no_error (error);
  gd_st_writer_free (writer);

  const char *cause = "holds 0.5 where a whole number is needed";
  GdSafetensors *st = gd_safetensors_open (in, &error);
  g_assert_no_error (error);
  int64_t *values = NULL;
  g_assert_false (gd_st_tensor_to_i64 (gd_safetensors_find (st, "t"), &values, &error));
  g_assert_null (values);
  g_assert_error (error, GD_ERROR, GD_ERROR_INPUT);
  assert_contains (error->message, cause);
  g_clear_error (&error);
  gd_safetensors_free (st);

  CliRun run;
  if (cli_run (f, model_path, in, NULL, &run))
    {
      char *problem = cli_failure_problem (&run, in, cause);
      if (problem)
        g_error ("a non-whole timestep is not reported against its file: %s", problem);
      g_free (problem);
      cli_run_clear (&run);
    }
  g_free (in);
  g_free (model_path);
}

/* ---- the command line's own files ---- */

static void
test_cli_broken_input_file (Fixture *f, gconstpointer data)
{
  (void) data;
  char *model_path = reference_file (ADAPTIVE "/model.safetensors");
  if (!model_path)
    return;
  char *in = write_bytes (f, "in.safetensors", "\x10\x00\x00", 3);
  assert_cli_fails (f, model_path, in, in, "file is 3 bytes, too short for a safetensors header");
  g_free (in);
  in = write_safetensors (f, "in-without-x.safetensors",
                          "{\"t\": {\"dtype\": \"I64\", \"shape\": [1], \"data_offsets\": [0, 8]}}", 8);
  assert_cli_fails (f, model_path, in, in, "needs a 4-D tensor 'x' [N, C, H, W]");
  g_free (in);
  g_free (model_path);
}

/* The writer creates a temporary file beside the output: a missing folder is reported
 * against the output path, and nothing is left behind. */
static void
test_unwritable_output (Fixture *f, gconstpointer data)
{
  (void) data;
  char *out = g_build_filename (f->dir, "no-such-dir", "out.safetensors", NULL);
  const char *cause = "cannot create";
  float value = 1;
  int64_t one[1] = { 1 };
  GdStWriter *writer = gd_st_writer_new ();
  gd_st_writer_add (writer, "v", GD_DTYPE_F32, 1, one, &value);
  GError *error = NULL;
  g_assert_false (gd_st_writer_write (writer, out, &error));
  assert_gd_error (error, GD_ERROR_IO, out, cause);
  assert_contains (error->message, g_strerror (ENOENT));
  g_clear_error (&error);

  /* An existing folder in place of the output file. */
  char *folder = g_build_filename (f->dir, "a-folder", NULL);
  g_assert_cmpint (g_mkdir (folder, 0700), ==, 0);
  g_assert_false (gd_st_writer_write (writer, folder, &error));
  assert_gd_error (error, GD_ERROR_IO, folder, "cannot rename into place");
  g_clear_error (&error);
  gd_st_writer_free (writer);
  g_free (folder);

  char *model_path = reference_file (ADAPTIVE "/model.safetensors");
  if (model_path)
    {
      int64_t label[1] = { 0 };
      char *in = write_input (f, "in.safetensors", 3, 16, 16, label);
      assert_cli_fails_with_output (f, model_path, in, out, out, cause);
      g_free (in);
      g_free (model_path);
    }
  g_free (out);
}

static void
add (const char *path, gconstpointer data, void (*test) (Fixture *, gconstpointer))
{
  g_test_add (path, Fixture, data, fixture_setup, test, fixture_teardown);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  char *path;
  for (guint i = 0; i < G_N_ELEMENTS (framing_cases); i++)
    {
      path = g_strconcat ("/errors/safetensors/", framing_cases[i].name, NULL);
      add (path, &framing_cases[i], test_framing);
      g_free (path);
    }
  for (guint i = 0; i < G_N_ELEMENTS (header_cases); i++)
    {
      path = g_strconcat ("/errors/safetensors/", header_cases[i].name, NULL);
      add (path, &header_cases[i], test_header);
      g_free (path);
    }
  add ("/errors/safetensors/missing-file", NULL, test_missing_file);
  add ("/errors/safetensors/data-cut-short", NULL, test_data_cut_short);
  add ("/errors/safetensors/header-cut-short", NULL, test_header_cut_short);
  for (guint i = 0; i < G_N_ELEMENTS (model_cases); i++)
    {
      path = g_strconcat ("/errors/model/", model_cases[i].name, NULL);
      add (path, &model_cases[i], test_model);
      g_free (path);
    }
  add ("/errors/model/config/zero-channel-level", NULL, test_zero_channel_level);
  add ("/errors/input/wrong-channels", NULL, test_input_channels);
  add ("/errors/input/size-not-multiple", NULL, test_input_size_not_multiple);
  add ("/errors/input/attention-pool-size", NULL, test_input_attention_pool_size);
  add ("/errors/input/unet-label", NULL, test_input_unet_label);
  add ("/errors/input/classifier-label", NULL, test_input_classifier_label);
  add ("/errors/input/timestep-not-whole", NULL, test_input_timestep_not_whole);
  add ("/errors/cli/broken-input-file", NULL, test_cli_broken_input_file);
  add ("/errors/cli/unwritable-output", NULL, test_unwritable_output);
  return g_test_run ();
}
