/* PyTorch checkpoints: the fixtures' model.pt, model_fp16.pt and model_legacy.pt load to
 * the weights of their model.safetensors and reproduce the reference outputs; every
 * released model is built from its flags to exactly its key list and recognised back
 * from it; strided, offset and converted tensors; hostile pickles refused by name;
 * damaged files fail with one line naming the file; the convert and info commands. */
#include "gd-checkpoint.h"
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-pickle.h"
#include "gd-recognize.h"
#include "gd-safetensors.h"
#include "gd-torch.h"
#include "pt-writer.h"

#include <glib.h>
#include <glib/gstdio.h>
#include <json-glib/json-glib.h>
#include <math.h>
#include <string.h>
#include <sys/wait.h>

static const char *reference;
static const char *guided;
static char *tmpdir;

#define check_error(error, subject, cause) \
  check_error_at (__FILE__, __LINE__, (error), (subject), (cause))

/* The error is the engine's, one line, and names its subject and its cause. */
static void
check_error_at (const char *file, int line, GError *error, const char *subject, const char *cause)
{
  char *problem = NULL;
  if (!error)
    problem = g_strdup_printf ("no error (expected one naming %s: %s)", subject, cause);
  else if (error->domain != GD_ERROR)
    problem = g_strdup_printf ("error outside GD_ERROR: %s", error->message);
  else if (strchr (error->message, '\n'))
    problem = g_strdup_printf ("error of several lines: %s", error->message);
  else if (!strstr (error->message, subject))
    problem = g_strdup_printf ("\"%s\" does not name \"%s\"", error->message, subject);
  else if (!strstr (error->message, cause))
    problem = g_strdup_printf ("\"%s\" does not say \"%s\"", error->message, cause);
  if (problem)
    g_assertion_message (G_LOG_DOMAIN, file, line, G_STRFUNC, problem);
  g_free (problem);
}

/* A reference fixture, or NULL after reporting the case skipped (printed, with the reason). */
static char *
fixture (const char *relative)
{
  char *path = g_build_filename (reference, relative, NULL);
  if (g_file_test (path, G_FILE_TEST_EXISTS))
    return path;
  char *msg = g_strdup_printf ("reference fixture %s is missing", path);
  g_printerr ("SKIP: %s\n", msg);
  g_test_skip (msg);
  g_free (msg);
  g_free (path);
  return NULL;
}

static char *
tmp_path (const char *name)
{
  return g_build_filename (tmpdir, name, NULL);
}

static char *
read_text (const char *path)
{
  char *text = NULL;
  GError *error = NULL;
  g_file_get_contents (path, &text, NULL, &error);
  g_assert_no_error (error);
  return text;
}

/* ---- the fixtures ---- */

typedef struct {
  const char *folder;
  const char *file;
} FixtureCase;

static const FixtureCase fixture_cases[] = {
  { "unet/tiny_cond_learnsigma", "model.pt" },
  { "unet/tiny_cond_learnsigma", "model_fp16.pt" },
  { "unet/tiny_cond_learnsigma", "model_legacy.pt" },
  { "unet/tiny_uncond_legacy", "model.pt" },
  { "unet/gray28_uncond", "model.pt" },
  { "classifier/tiny_attnpool", "model.pt" },
  { "classifier/gray28_attnpool", "model.pt" },
  { "classifier/tiny_adaptive", "model.pt" },
};

/* Loads FOLDER/FILE with FOLDER/config.json as the override (the fixtures are not
 * released models); NULL after a skip. */
static GdModel *
load_fixture (const FixtureCase *c, char **pt_path)
{
  char *relative = g_build_filename (c->folder, c->file, NULL);
  char *path = fixture (relative);
  g_free (relative);
  relative = g_build_filename (c->folder, "config.json", NULL);
  char *config_path = path ? fixture (relative) : NULL;
  g_free (relative);
  if (!config_path)
    {
      g_free (path);
      return NULL;
    }
  char *config = read_text (config_path);
  GdLoadOptions options = { .config = config };
  GError *error = NULL;
  GdModel *model = gd_checkpoint_load (path, &options, &error);
  g_assert_no_error (error);
  g_free (config);
  g_free (config_path);
  *pt_path = path;
  return model;
}

static void
test_fixture_weights (gconstpointer data)
{
  const FixtureCase *c = data;
  char *pt_path = NULL;
  GdModel *model = load_fixture (c, &pt_path);
  char *relative = g_build_filename (c->folder, "model.safetensors", NULL);
  char *st_path = model ? fixture (relative) : NULL;
  g_free (relative);
  if (!st_path)
    {
      gd_model_free (model);
      g_free (pt_path);
      return;
    }
  GError *error = NULL;
  GdModel *expected = gd_model_load (st_path, &error);
  g_assert_no_error (error);
  gboolean half = strstr (c->file, "fp16") != NULL, legacy = strstr (c->file, "legacy") != NULL;
  g_assert_cmpuint (gd_model_n_params (model), ==, gd_model_n_params (expected));
  size_t rounded = 0, borrowed = 0;
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      GdParam *p = gd_model_param (model, i), *e = gd_model_param (expected, i);
      g_assert_cmpstr (p->name, ==, e->name);
      g_assert_cmpuint (p->numel, ==, e->numel);
      borrowed += !p->owns_data;
      for (size_t j = 0; j < p->numel; j++)
        {
          float a = p->data[j], b = e->data[j];
          if (!half)
            {
              if (memcmp (&a, &b, sizeof a) != 0)
                g_error ("%s %s[%zu]: %.9g, the safetensors file has %.9g", pt_path, p->name, j, a, b);
              continue;
            }
          /* float16 keeps 11 significant bits; below 2^-14 its steps are 2^-24 */
          double bound = fabs (b) * ldexp (1, -11) + ldexp (1, -25);
          if (!(fabs ((double) a - b) <= bound))
            g_error ("%s %s[%zu]: %.9g is not %.9g rounded to float16", pt_path, p->name, j, a, b);
          rounded += a != b;
        }
    }
  /* zip files written by torch.save align their storages, so float32 weights are used
   * where they lie in the mapping; converted and legacy weights are copies */
  if (!half && !legacy)
    g_assert_cmpuint (borrowed, ==, gd_model_n_params (model));
  else
    g_assert_cmpuint (borrowed, ==, 0);
  if (half)
    g_assert_cmpuint (rounded, >, 0);
  g_assert_cmpstr (gd_model_get_metadata (model, "source_format"), ==,
                   legacy ? "pytorch-legacy" : "pytorch-zip");
  g_assert_cmpstr (gd_model_get_metadata (model, "source_dtypes"), ==, half ? "F16" : "F32");
  gd_model_free (expected);
  gd_model_free (model);
  g_free (st_path);
  g_free (pt_path);
}

/* max |a - b| <= 1e-4 * max(1, max |ref|), the reference's tolerance for network outputs */
static void
assert_matches_reference (const char *what, const float *got, const GdStTensor *ref)
{
  g_assert_nonnull (ref);
  float *expected = gd_st_tensor_to_f32 (ref);
  double max_ref = 0, max_err = 0;
  for (int64_t i = 0; i < ref->numel; i++)
    {
      max_ref = MAX (max_ref, fabs (expected[i]));
      max_err = MAX (max_err, fabs ((double) got[i] - expected[i]));
    }
  g_free (expected);
  g_test_message ("%s: max |a - b| = %.3g", what, max_err);
  if (!(max_err <= 1e-4 * MAX (1.0, max_ref)))
    g_error ("%s: max |a - b| = %g, more than 1e-4 * max(1, %g)", what, max_err, max_ref);
}

static int run_guided (char **out, char **err, ...);
static gboolean have_guided (void);

/* The reference outputs from the .pt file: guided convert --config writes the weights it
 * loaded, guided forward runs them on the fixture's inputs. */
static void
test_fixture_parity (gconstpointer data)
{
  const FixtureCase *c = data;
  char *relative = g_build_filename (c->folder, c->file, NULL);
  char *pt = fixture (relative);
  g_free (relative);
  relative = g_build_filename (c->folder, "config.json", NULL);
  char *config = pt ? fixture (relative) : NULL;
  g_free (relative);
  relative = g_build_filename (c->folder, "io.safetensors", NULL);
  char *io = config ? fixture (relative) : NULL;
  g_free (relative);
  if (io && have_guided ())
    {
      char *converted = tmp_path ("parity.safetensors"), *result = tmp_path ("parity-out.safetensors");
      g_assert_cmpint (run_guided (NULL, NULL, "convert", "--config", config, pt, converted, NULL), ==, 0);
      g_assert_cmpint (run_guided (NULL, NULL, "forward", converted, io, result, NULL), ==, 0);
      GError *error = NULL;
      GdSafetensors *got = gd_safetensors_open (result, &error), *want = gd_safetensors_open (io, &error);
      g_assert_no_error (error);
      static const char *outputs[] = { "out", "logits", "grad" };
      guint compared = 0;
      for (guint i = 0; i < G_N_ELEMENTS (outputs); i++)
        {
          const GdStTensor *t = gd_safetensors_find (got, outputs[i]);
          if (!t)
            continue;
          char *what = g_strdup_printf ("%s/%s %s", c->folder, c->file, outputs[i]);
          float *values = gd_st_tensor_to_f32 (t);
          assert_matches_reference (what, values, gd_safetensors_find (want, outputs[i]));
          g_free (values);
          g_free (what);
          compared++;
        }
      g_assert_cmpuint (compared, ==, strstr (c->folder, "classifier") ? 2 : 1);
      gd_safetensors_free (got);
      gd_safetensors_free (want);
      g_remove (result);
      g_remove (converted);
      g_free (result);
      g_free (converted);
    }
  g_free (pt);
  g_free (config);
  g_free (io);
}

/* ---- the released models ---- */

typedef struct {
  JsonParser *parser;
  JsonObject *root;
  const char *name;
  GdModelKind kind;
  GdKeyShape *keys;
  int64_t *shapes;
  guint n;
} Official;

static gboolean
official_open (const char *name, Official *o)
{
  char *relative = g_strdup_printf ("official/%s.json", name);
  char *path = fixture (relative);
  g_free (relative);
  memset (o, 0, sizeof *o);
  if (!path)
    return FALSE;
  GError *error = NULL;
  o->parser = json_parser_new ();
  json_parser_load_from_file (o->parser, path, &error);
  g_assert_no_error (error);
  g_free (path);
  o->root = json_node_get_object (json_parser_get_root (o->parser));
  o->name = json_object_get_string_member (o->root, "name");
  o->kind = strcmp (json_object_get_string_member (o->root, "kind"), "classifier") == 0
            ? GD_MODEL_CLASSIFIER : GD_MODEL_UNET;
  JsonArray *list = json_object_get_array_member (o->root, "state_dict");
  o->n = json_array_get_length (list);
  o->keys = g_new0 (GdKeyShape, o->n);
  o->shapes = g_new0 (int64_t, (size_t) o->n * 4);
  for (guint i = 0; i < o->n; i++)
    {
      JsonArray *entry = json_array_get_array_element (list, i);
      JsonArray *shape = json_array_get_array_element (entry, 1);
      o->keys[i].name = json_array_get_string_element (entry, 0);
      o->keys[i].ndim = (int) json_array_get_length (shape);
      g_assert_cmpint (o->keys[i].ndim, <=, 4);
      for (int d = 0; d < o->keys[i].ndim; d++)
        o->shapes[i * 4 + (guint) d] = json_array_get_int_element (shape, (guint) d);
      o->keys[i].shape = &o->shapes[i * 4];
    }
  return TRUE;
}

static void
official_clear (Official *o)
{
  g_free (o->keys);
  g_free (o->shapes);
  g_clear_object (&o->parser);
}

static char *
member_json (JsonObject *obj, const char *member)
{
  return json_to_string (json_object_get_member (obj, member), FALSE);
}

/* The JSON objects have the same members with equal values (numbers compared as numbers). */
static void
assert_same_object (const char *what, const char *expected_json, const char *actual_json)
{
  JsonNode *a = json_from_string (expected_json, NULL), *b = json_from_string (actual_json, NULL);
  g_assert_nonnull (a);
  g_assert_nonnull (b);
  JsonObject *oa = json_node_get_object (a), *ob = json_node_get_object (b);
  GList *members = json_object_get_members (oa);
  g_assert_cmpuint (json_object_get_size (oa), ==, json_object_get_size (ob));
  for (GList *l = members; l; l = l->next)
    {
      JsonNode *va = json_object_get_member (oa, l->data), *vb = json_object_get_member (ob, l->data);
      if (!vb)
        g_error ("%s: '%s' is missing from %s", what, (char *) l->data, actual_json);
      gboolean equal = json_node_equal (va, vb);
      if (!equal && JSON_NODE_HOLDS_VALUE (va) && JSON_NODE_HOLDS_VALUE (vb)
          && json_node_get_value_type (va) != G_TYPE_STRING && json_node_get_value_type (vb) != G_TYPE_STRING
          && json_node_get_value_type (va) != G_TYPE_BOOLEAN && json_node_get_value_type (vb) != G_TYPE_BOOLEAN)
        equal = json_node_get_double (va) == json_node_get_double (vb);
      if (!equal)
        g_error ("%s: '%s' is %s, expected %s", what, (char *) l->data,
                 json_to_string (vb, FALSE), json_to_string (va, FALSE));
    }
  g_list_free (members);
  json_node_unref (a);
  json_node_unref (b);
}

/* The architecture built from the release's flags has exactly its keys, shapes and
 * parameter count, in state_dict order. */
static void
test_official_build (gconstpointer data)
{
  Official o;
  if (!official_open (data, &o))
    return;
  char *flags = member_json (o.root, "flags");
  GdModelConfig cfg;
  GError *error = NULL;
  g_assert_true (gd_flags_to_config (flags, o.kind, o.name, &cfg, NULL, &error));
  g_assert_no_error (error);
  GdModel *model = gd_model_new (&cfg, o.name, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (gd_model_n_params (model), ==, o.n);
  for (guint i = 0; i < o.n; i++)
    {
      const GdParam *p = gd_model_param (model, i);
      g_assert_cmpstr (p->name, ==, o.keys[i].name);
      g_assert_cmpint (p->ndim, ==, o.keys[i].ndim);
      for (int d = 0; d < p->ndim; d++)
        g_assert_cmpint (p->shape[d], ==, o.keys[i].shape[d]);
    }
  g_assert_cmpuint (gd_model_parameter_count (model), ==,
                    (size_t) json_object_get_int_member (o.root, "parameters"));
  gd_model_free (model);
  g_free (flags);
  official_clear (&o);
}

/* Recognition from the key/shape list gives back the release and its flags. */
static void
test_official_recognise (gconstpointer data)
{
  Official o;
  if (!official_open (data, &o))
    return;
  char *file_name = g_strconcat (o.name, ".pt", NULL);
  GdRecognition rec;
  GError *error = NULL;
  g_assert_true (gd_recognize (o.keys, o.n, NULL, file_name, file_name, &rec, &error));
  g_assert_no_error (error);
  g_assert_nonnull (rec.release);
  g_assert_cmpstr (rec.release->name, ==, o.name);
  char *flags = gd_release_flags_json (rec.release), *expected = member_json (o.root, "flags");
  assert_same_object (o.name, expected, flags);
  char *diffusion = gd_release_diffusion_json (rec.release);
  char *expected_diffusion = member_json (o.root, "diffusion");
  assert_same_object (o.name, expected_diffusion, diffusion);
  gboolean imagenet = o.kind == GD_MODEL_CLASSIFIER
                      || json_object_get_boolean_member (json_object_get_object_member (o.root, "flags"), "class_cond");
  g_assert_cmpstr (rec.labels, ==, imagenet ? "imagenet-1000" : NULL);
  /* the recognised constructor arguments are those the flags give */
  GdModelConfig from_flags;
  g_assert_true (gd_flags_to_config (expected, o.kind, o.name, &from_flags, NULL, &error));
  char *a = gd_model_config_to_json (&from_flags), *b = gd_model_config_to_json (&rec.config);
  g_assert_cmpstr (a, ==, b);
  g_free (a);
  g_free (b);
  gd_recognition_clear (&rec);

  /* without the file name only training dropout may differ (releases of equal shapes) */
  g_assert_true (gd_recognize (o.keys, o.n, NULL, NULL, o.name, &rec, &error));
  from_flags.dropout = rec.config.dropout = 0;
  a = gd_model_config_to_json (&from_flags);
  b = gd_model_config_to_json (&rec.config);
  g_assert_cmpstr (a, ==, b);
  g_free (a);
  g_free (b);
  gd_recognition_clear (&rec);
  g_free (flags);
  g_free (expected);
  g_free (diffusion);
  g_free (expected_diffusion);
  g_free (file_name);
  official_clear (&o);
}

/* Every release the engine knows has its reference list. */
static void
test_official_table (void)
{
  char *dir = fixture ("official");
  if (!dir)
    return;
  for (guint i = 0; i < gd_release_count (); i++)
    {
      char *path = g_strdup_printf ("%s/%s.json", dir, gd_release_nth (i)->name);
      if (!g_file_test (path, G_FILE_TEST_EXISTS))
        g_error ("release %s has no %s", gd_release_nth (i)->name, path);
      g_free (path);
    }
  GDir *listing = g_dir_open (dir, 0, NULL);
  guint files = 0;
  for (const char *name; (name = g_dir_read_name (listing));)
    files += g_str_has_suffix (name, ".json");
  g_dir_close (listing);
  g_assert_cmpuint (files, ==, gd_release_count ());
  g_free (dir);
}

/* A checkpoint with a release's keys and shapes whose tensors all view one element (a
 * stride-0 broadcast, as torch.Tensor.expand saves): small on disk. */
static char *
write_release_file (const Official *o, const char *file_name)
{
  static const float value = 0.5f;
  PtWriter *w = pt_writer_new ();
  guint storage = pt_writer_add_storage (w, "FloatStorage", &value, 1);
  int64_t zeros[4] = { 0 };
  for (guint i = 0; i < o->n; i++)
    pt_writer_add_tensor (w, o->keys[i].name, storage, 0, o->keys[i].ndim, o->keys[i].shape, zeros, TRUE);
  char *path = tmp_path (file_name);
  GError *error = NULL;
  g_assert_true (pt_writer_write (w, path, PT_ZIP_ALIGNED, &error));
  g_assert_no_error (error);
  pt_writer_free (w);
  return path;
}

static int
run_guided (char **out, char **err, ...)
{
  GPtrArray *args = g_ptr_array_new ();
  g_ptr_array_add (args, (char *) guided);
  va_list ap;
  va_start (ap, err);
  for (const char *a; (a = va_arg (ap, const char *));)
    g_ptr_array_add (args, (char *) a);
  va_end (ap);
  g_ptr_array_add (args, NULL);
  int status = -1;
  GError *error = NULL;
  /* what is not captured must not reach the test's own output (the TAP stream) */
  GSpawnFlags flags = (out ? 0 : G_SPAWN_STDOUT_TO_DEV_NULL) | (err ? 0 : G_SPAWN_STDERR_TO_DEV_NULL);
  g_spawn_sync (NULL, (char **) args->pdata, NULL, flags, NULL, NULL, out, err, &status, &error);
  g_assert_no_error (error);
  g_ptr_array_unref (args);
  if (WIFSIGNALED (status))
    g_error ("guided was killed by signal %d", WTERMSIG (status));
  return WIFEXITED (status) ? WEXITSTATUS (status) : -1;
}

/* A released model's file needs no flags: `guided info` and the loader name the release,
 * its settings and its labels. */
static void
test_official_file (gconstpointer data)
{
  Official o;
  if (!official_open (data, &o))
    return;
  char *file_name = g_strconcat (o.name, ".pt", NULL);
  char *path = write_release_file (&o, file_name);
  GdLoadOptions options = { .shapes_only = TRUE };
  GError *error = NULL;
  GdModel *model = gd_checkpoint_load (path, &options, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (gd_model_get_metadata (model, "release"), ==, o.name);
  JsonObject *flags = json_object_get_object_member (o.root, "flags");
  gboolean imagenet = o.kind == GD_MODEL_CLASSIFIER || json_object_get_boolean_member (flags, "class_cond");
  GPtrArray *labels = gd_model_labels (model, &error);
  g_assert_no_error (error);
  if (imagenet)
    {
      g_assert_cmpstr (gd_model_get_metadata (model, "labels_name"), ==, "imagenet-1000");
      g_assert_nonnull (labels);
      g_assert_cmpuint (labels->len, ==, 1000);
      g_assert_cmpstr (labels->pdata[0], ==, "tench");
      g_ptr_array_unref (labels);
    }
  else
    g_assert_null (labels);
  if (o.kind == GD_MODEL_UNET)
    {
      GdDiffusionSettings settings;
      g_assert_true (gd_model_diffusion_settings (model, &settings, &error));
      JsonObject *diffusion = json_object_get_object_member (o.root, "diffusion");
      g_assert_cmpint (settings.steps, ==, json_object_get_int_member (diffusion, "diffusion_steps"));
      g_assert_cmpint (settings.schedule, ==,
                       strcmp (json_object_get_string_member (diffusion, "noise_schedule"), "cosine") == 0
                       ? GD_SCHEDULE_COSINE : GD_SCHEDULE_LINEAR);
      g_assert_cmpint (settings.variance, ==, GD_VARIANCE_LEARNED_RANGE);
      const GdModelConfig *cfg = gd_model_get_config (model);
      g_assert_cmpint (cfg->num_heads, ==, json_object_get_int_member (flags, "num_heads"));
      g_assert_cmpint (cfg->num_head_channels, ==, json_object_get_int_member (flags, "num_head_channels"));
      g_assert_cmpint (cfg->use_new_attention_order, ==,
                       json_object_get_boolean_member (flags, "use_new_attention_order"));
    }
  gd_model_free (model);
  if (have_guided ())
    {
      char *out = NULL, *err = NULL;
      int status = run_guided (&out, &err, "info", path, NULL);
      g_assert_cmpint (status, ==, 0);
      g_assert_nonnull (strstr (out, o.name));
      g_assert_nonnull (strstr (out, imagenet ? "imagenet-1000, 1000 names: 0 tench" : "labels:       none"));
      g_free (out);
      g_free (err);
    }
  g_remove (path);
  g_free (path);
  g_free (file_name);
  official_clear (&o);
}

/* gd_model_load (what every consumer calls) reads a release's .pt with its weights. */
static void
test_official_load_weights (void)
{
  Official o;
  if (!official_open ("64x64_classifier", &o))
    return;
  char *path = write_release_file (&o, "64x64_classifier.pt");
  GError *error = NULL;
  GdModel *model = gd_model_load (path, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (gd_model_get_metadata (model, "release"), ==, "64x64_classifier");
  g_assert_cmpuint (gd_model_parameter_count (model), ==,
                    (size_t) json_object_get_int_member (o.root, "parameters"));
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      const GdParam *p = gd_model_param (model, i);
      g_assert_true (p->owns_data);
      g_assert_cmpfloat (p->data[0], ==, 0.5f);
      g_assert_cmpfloat (p->data[p->numel - 1], ==, 0.5f);
    }
  gd_model_free (model);
  g_remove (path);
  g_free (path);
  official_clear (&o);
}

/* ---- views and dtypes ---- */

static const float counting[24] = { 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15,
                                    16, 17, 18, 19, 20, 21, 22, 23 };

typedef struct {
  const char *name;
  int n;
  float values[6];
} Expected;

static const Expected view_values[] = {
  { "contiguous", 6, { 5, 6, 7, 8, 9, 10 } },
  { "transposed", 6, { 0, 3, 1, 4, 2, 5 } },
  { "broadcast", 6, { 7, 8, 9, 7, 8, 9 } },
  { "scalar", 1, { 23 } },
  { "parameter", 4, { 0, 1, 2, 3 } },
  { "every_other", 3, { 1, 3, 5 } },
  { "half", 4, { 1, -2, 0.5f, 65504 } },
  { "bfloat16", 4, { 1, -2, 0.5f, 3.140625f } },
  { "double", 3, { 1.5f, -2.25f, 1e10f } },
  { "long", 3, { 1, -2, 3 } },
};

static PtWriter *
views_writer (void)
{
  static const guint16 half[] = { 0x3c00, 0xc000, 0x3800, 0x7bff };
  static const guint16 bf16[] = { 0x3f80, 0xc000, 0x3f00, 0x4049 };
  static const double f64[] = { 1.5, -2.25, 1e10 };
  static const int64_t i64[] = { 1, -2, 3 };
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", counting, 24);
  pt_writer_add_tensor (w, "contiguous", s, 5, 2, (int64_t[]) { 2, 3 }, NULL, FALSE);
  pt_writer_add_tensor (w, "transposed", s, 0, 2, (int64_t[]) { 3, 2 }, (int64_t[]) { 1, 3 }, FALSE);
  pt_writer_add_tensor (w, "broadcast", s, 7, 2, (int64_t[]) { 2, 3 }, (int64_t[]) { 0, 1 }, FALSE);
  pt_writer_add_tensor (w, "empty", s, 24, 2, (int64_t[]) { 0, 4 }, NULL, FALSE);
  pt_writer_add_tensor (w, "scalar", s, 23, 0, NULL, NULL, FALSE);
  pt_writer_add_tensor (w, "parameter", s, 0, 1, (int64_t[]) { 4 }, NULL, TRUE);
  pt_writer_add_tensor (w, "every_other", s, 1, 1, (int64_t[]) { 3 }, (int64_t[]) { 2 }, FALSE);
  pt_writer_add_tensor (w, "half", pt_writer_add_storage (w, "HalfStorage", half, 4), 0, 1,
                        (int64_t[]) { 4 }, NULL, FALSE);
  pt_writer_add_tensor (w, "bfloat16", pt_writer_add_storage (w, "BFloat16Storage", bf16, 4), 0, 1,
                        (int64_t[]) { 4 }, NULL, FALSE);
  pt_writer_add_tensor (w, "double", pt_writer_add_storage (w, "DoubleStorage", f64, 3), 0, 1,
                        (int64_t[]) { 3 }, NULL, FALSE);
  pt_writer_add_tensor (w, "long", pt_writer_add_storage (w, "LongStorage", i64, 3), 0, 1,
                        (int64_t[]) { 3 }, NULL, FALSE);
  return w;
}

static void
test_views (gconstpointer data)
{
  PtLayout layout = GPOINTER_TO_INT (data);
  PtWriter *w = views_writer ();
  char *path = tmp_path ("views.pt");
  GError *error = NULL;
  g_assert_true (pt_writer_write (w, path, layout, &error));
  pt_writer_free (w);
  GdTorchFile *file = gd_torch_open (path, &error);
  g_assert_no_error (error);
  g_assert_cmpint (gd_torch_format (file), ==, layout == PT_LEGACY ? GD_TORCH_LEGACY : GD_TORCH_ZIP);
  g_assert_cmpuint (gd_torch_count (file), ==, G_N_ELEMENTS (view_values) + 1);
  for (guint i = 0; i < G_N_ELEMENTS (view_values); i++)
    {
      const Expected *e = &view_values[i];
      const GdTorchTensor *t = gd_torch_find (file, e->name);
      g_assert_nonnull (t);
      g_assert_cmpint (t->numel, ==, e->n);
      float *values = gd_torch_tensor_to_f32 (t);
      for (int j = 0; j < e->n; j++)
        if (values[j] != e->values[j])
          g_error ("%s[%d] = %g, expected %g", e->name, j, values[j], e->values[j]);
      g_free (values);
    }
  g_assert_cmpint (gd_torch_find (file, "empty")->numel, ==, 0);
  g_assert_cmpint (gd_torch_find (file, "half")->dtype, ==, GD_DTYPE_F16);
  g_assert_cmpint (gd_torch_find (file, "long")->dtype, ==, GD_DTYPE_I64);
  /* only a contiguous float32 view inside an aligned stored entry is used in place */
  const float *in_place = gd_torch_tensor_f32_in_place (gd_torch_find (file, "contiguous"));
  if (layout == PT_ZIP_ALIGNED || layout == PT_ZIP_DEFLATED)
    {
      g_assert_nonnull (in_place);
      g_assert_cmpfloat (in_place[0], ==, 5);
    }
  else
    g_assert_null (in_place);
  g_assert_null (gd_torch_tensor_f32_in_place (gd_torch_find (file, "transposed")));
  g_assert_null (gd_torch_tensor_f32_in_place (gd_torch_find (file, "half")));
  gd_torch_free (file);
  g_remove (path);
  g_free (path);
}

/* A broadcast view can describe more values than memory holds: no copy, no abort. */
static void
test_huge_view (void)
{
  static const float one = 1;
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", &one, 1);
  pt_writer_add_tensor (w, "huge", s, 0, 2, (int64_t[]) { (int64_t) 1 << 31, (int64_t) 1 << 31 },
                        (int64_t[]) { 0, 0 }, FALSE);
  GBytes *bytes = pt_writer_to_bytes (w, PT_ZIP_ALIGNED);
  GError *error = NULL;
  GdTorchFile *file = gd_torch_open_bytes (bytes, "huge.pt", &error);
  g_assert_no_error (error);
  const GdTorchTensor *t = gd_torch_find (file, "huge");
  g_assert_cmpint (t->numel, ==, (int64_t) 1 << 62);
  g_assert_null (gd_torch_tensor_to_f32 (t));
  gd_torch_free (file);
  g_bytes_unref (bytes);
  pt_writer_free (w);
}

/* An archive saved on a big-endian machine says so; its values are byte-swapped on load. */
static void
test_big_endian (void)
{
  guint8 swapped[24 * 4];
  for (int i = 0; i < 24; i++)
    for (int b = 0; b < 4; b++)
      swapped[i * 4 + b] = ((const guint8 *) &counting[i])[3 - b];
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", swapped, 24);
  pt_writer_add_tensor (w, "w", s, 2, 1, (int64_t[]) { 3 }, NULL, FALSE);
  pt_writer_set_byteorder (w, "big");
  GBytes *bytes = pt_writer_to_bytes (w, PT_ZIP_ALIGNED);
  GError *error = NULL;
  GdTorchFile *file = gd_torch_open_bytes (bytes, "big.pt", &error);
  g_assert_no_error (error);
  const GdTorchTensor *t = gd_torch_find (file, "w");
  g_assert_null (gd_torch_tensor_f32_in_place (t));
  float *values = gd_torch_tensor_to_f32 (t);
  g_assert_cmpfloat (values[0], ==, 2);
  g_assert_cmpfloat (values[2], ==, 4);
  g_free (values);
  gd_torch_free (file);
  g_bytes_unref (bytes);
  pt_writer_set_byteorder (w, "middle");
  bytes = pt_writer_to_bytes (w, PT_ZIP_ALIGNED);
  g_assert_null (gd_torch_open_bytes (bytes, "middle.pt", &error));
  check_error (error, "middle.pt", "byteorder record is neither");
  g_clear_error (&error);
  g_bytes_unref (bytes);
  pt_writer_free (w);
}

/* ---- hostile pickles ---- */

static const char *const refused_globals[][2] = {
  { "os", "system" },
  { "posix", "system" },
  { "builtins", "eval" },
  { "builtins", "exec" },
  { "builtins", "__import__" },
  { "__builtin__", "eval" },
  { "subprocess", "Popen" },
  { "torch", "load" },
  { "torch._utils", "_rebuild_tensor" },
  { "torch.storage", "_load_from_bytes" },
  { "torch", "IntStorage" },
  { "collections", "defaultdict" },
  { "numpy.core.multiarray", "_reconstruct" },
};

/* PROTO 2; OrderedDict(); then 'x': module.name('echo pwned'); a refusal names module.name. */
static GByteArray *
hostile_pickle (const char *module, const char *name, gboolean stack_global)
{
  GByteArray *b = g_byte_array_new ();
  pt_op (b, 0x80);
  pt_op (b, 2);
  pt_global (b, "collections", "OrderedDict");
  pt_op (b, ')');
  pt_op (b, 'R');
  pt_string (b, "x");
  if (stack_global)
    {
      pt_string (b, module);
      pt_string (b, name);
      pt_op (b, 0x93);
    }
  else
    pt_global (b, module, name);
  pt_op (b, '(');
  pt_string (b, "echo pwned");
  pt_op (b, 't');
  pt_op (b, 'R');
  pt_op (b, 's');
  pt_op (b, '.');
  return b;
}

static void
test_refused_globals (void)
{
  for (guint i = 0; i < G_N_ELEMENTS (refused_globals); i++)
    for (int stack_global = 0; stack_global < 2; stack_global++)
      {
        const char *module = refused_globals[i][0], *name = refused_globals[i][1];
        char *full = g_strdup_printf ("'%s.%s'", module, name);
        GByteArray *pickle = hostile_pickle (module, name, stack_global);
        GdPickle *p = gd_pickle_new ("hostile.pkl");
        GError *error = NULL;
        g_assert_null (gd_pickle_parse (p, pickle->data, pickle->len, NULL, &error));
        check_error (error, "hostile.pkl", full);
        g_clear_error (&error);
        gd_pickle_free (p);
        /* the same inside a checkpoint, through the loader every consumer uses */
        const char *names[] = { "archive/data.pkl" };
        GBytes *contents[] = { g_byte_array_free_to_bytes (pickle) };
        GBytes *zip = pt_zip_bytes (names, contents, 1, PT_ZIP_ALIGNED);
        char *path = tmp_path ("hostile.pt");
        g_assert_true (pt_write_file (path, zip, &error));
        g_assert_null (gd_model_load (path, &error));
        check_error (error, path, full);
        check_error (error, path, "refused global");
        g_clear_error (&error);
        g_remove (path);
        g_free (path);
        g_bytes_unref (zip);
        g_bytes_unref (contents[0]);
        g_free (full);
      }
}

typedef struct {
  const char *label;
  const char *bytes;     /* a pickle, as C string escapes */
  size_t length;
  const char *cause;
} PickleCase;

#define PICKLE(label, text, cause) { label, text, sizeof text - 1, cause }

static const PickleCase bad_pickles[] = {
  PICKLE ("inst", "\x80\x02(ios\nsystem\nX\x01\x00\x00\x00x.", "INST"),
  PICKLE ("obj", "\x80\x02(ccollections\nOrderedDict\no.", "OBJ"),
  PICKLE ("newobj", "\x80\x02\x63\x63ollections\nOrderedDict\n)\x81.", "NEWOBJ"),
  PICKLE ("text int", "\x80\x02I1\n.", "text (protocol 0)"),
  PICKLE ("protocol 1", "\x80\x01N.", "protocol 1"),
  PICKLE ("unknown opcode", "\x80\x02\xff.", "unknown opcode 0xff"),
  PICKLE ("no stop", "\x80\x02N", "ends without STOP"),
  PICKLE ("underflow", "\x80\x02R.", "stack underflow"),
  PICKLE ("memo", "\x80\x02h\x07.", "memo entry 7"),
  PICKLE ("long string", "\x80\x02X\xff\xff\xff\x7f.", "runs past the end"),
  PICKLE ("bad utf-8", "\x80\x02X\x02\x00\x00\x00\xc3\x28.", "not valid UTF-8"),
  PICKLE ("nul in string", "\x80\x02X\x02\x00\x00\x00" "a\x00.", "not valid UTF-8"),
  PICKLE ("reduce non-global", "\x80\x02N)R.", "REDUCE calls a None"),
  PICKLE ("storage call", "\x80\x02\x63torch\nFloatStorage\n)R.", "storage type is called"),
  PICKLE ("ordered dict args", "\x80\x02\x63\x63ollections\nOrderedDict\n(K\x01tR.", "only created empty"),
  PICKLE ("build on list", "\x80\x02]}b.", "BUILD on a list"),
  PICKLE ("pid not storage", "\x80\x02X\x01\x00\x00\x00xQ.", "not a storage reference"),
  PICKLE ("pid bad key", "\x80\x02(X\x07\x00\x00\x00storage\x63torch\nFloatStorage\nX\x05\x00\x00\x00../..X\x03\x00\x00\x00" "cpuK\x01tQ.",
          "storage key"),
  PICKLE ("setitems odd", "\x80\x02}(K\x01u.", "odd number"),
  PICKLE ("append to dict", "\x80\x02}K\x01\x61.", "elements added to a dict"),
  PICKLE ("global no newline", "\x80\x02\x63os", "GLOBAL name is not a line"),
};

static void
test_bad_pickles (void)
{
  for (guint i = 0; i < G_N_ELEMENTS (bad_pickles); i++)
    {
      const PickleCase *c = &bad_pickles[i];
      GdPickle *p = gd_pickle_new ("bad.pkl");
      GError *error = NULL;
      if (gd_pickle_parse (p, (const guint8 *) c->bytes, c->length, NULL, &error))
        g_error ("pickle '%s' was accepted", c->label);
      check_error (error, "bad.pkl", c->cause);
      g_clear_error (&error);
      gd_pickle_free (p);
    }
}

/* A tensor view that reaches outside its storage, and nesting beyond any state_dict. */
static void
test_pickle_limits (void)
{
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", counting, 24);
  pt_writer_add_tensor (w, "outside", s, 20, 1, (int64_t[]) { 5 }, NULL, FALSE);
  GByteArray *pickle = pt_writer_pickle (w, FALSE);
  GdPickle *p = gd_pickle_new ("outside.pkl");
  GError *error = NULL;
  g_assert_null (gd_pickle_parse (p, pickle->data, pickle->len, NULL, &error));
  check_error (error, "outside.pkl", "reaches element 24 of storage '0', which has 24");
  g_clear_error (&error);
  gd_pickle_free (p);
  g_byte_array_unref (pickle);
  pt_writer_free (w);

  GByteArray *marks = g_byte_array_new ();
  pt_op (marks, 0x80);
  pt_op (marks, 2);
  for (int i = 0; i < 70000; i++)
    pt_op (marks, '(');
  pt_op (marks, '.');
  p = gd_pickle_new ("marks.pkl");
  g_assert_null (gd_pickle_parse (p, marks->data, marks->len, NULL, &error));
  check_error (error, "marks.pkl", "too many nested MARKs");
  g_clear_error (&error);
  gd_pickle_free (p);
  g_byte_array_unref (marks);
}

/* ---- damaged files ---- */

static GBytes *
small_checkpoint (PtLayout layout)
{
  PtWriter *w = views_writer ();
  GBytes *bytes = pt_writer_to_bytes (w, layout);
  pt_writer_free (w);
  return bytes;
}

/* Every truncation of a valid file fails cleanly. */
static void
test_truncated (gconstpointer data)
{
  PtLayout layout = GPOINTER_TO_INT (data);
  GBytes *whole = small_checkpoint (layout);
  size_t size = g_bytes_get_size (whole);
  for (size_t length = 0; length < size; length++)
    {
      GBytes *cut = g_bytes_new_from_bytes (whole, 0, length);
      GError *error = NULL;
      GdTorchFile *file = gd_torch_open_bytes (cut, "cut.pt", &error);
      if (file)
        g_error ("a checkpoint cut to %zu of %zu bytes was accepted", length, size);
      check_error (error, "cut.pt", "");
      g_clear_error (&error);
      g_bytes_unref (cut);
    }
  g_bytes_unref (whole);
}

typedef struct {
  const char *label;
  const char *cause;
} DamageCase;

/* Archives assembled from parts: each lacks or spoils one thing. */
static GBytes *
damaged_archive (const char *label)
{
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", counting, 24);
  pt_writer_add_tensor (w, "w", s, 0, 1, (int64_t[]) { 24 }, NULL, FALSE);
  GByteArray *pickle = pt_writer_pickle (w, FALSE);
  pt_writer_free (w);
  const char *names[4] = { "archive/data.pkl", "archive/data/0", NULL, NULL };
  GBytes *contents[4] = { g_bytes_new (pickle->data, pickle->len), g_bytes_new_static (counting, sizeof counting), NULL, NULL };
  guint n = 2;
  g_byte_array_unref (pickle);
  if (strcmp (label, "missing storage") == 0)
    n = 1;
  else if (strcmp (label, "short storage") == 0)
    {
      g_bytes_unref (contents[1]);
      contents[1] = g_bytes_new_static (counting, 40);
    }
  else if (strcmp (label, "no data.pkl") == 0)
    names[0] = "archive/other.pkl";
  else if (strcmp (label, "torchscript") == 0)
    {
      names[n] = "archive/constants.pkl";
      contents[n++] = g_bytes_new_static ("\x80\x02).", 4);
    }
  else if (strcmp (label, "two archives") == 0)
    {
      names[n] = "second/data.pkl";
      contents[n] = g_bytes_ref (contents[0]);
      n++;
    }
  else if (strcmp (label, "not a dict") == 0)
    {
      g_bytes_unref (contents[0]);
      contents[0] = g_bytes_new_static ("\x80\x02].", 4);
    }
  else if (strcmp (label, "not a tensor") == 0)
    {
      g_bytes_unref (contents[0]);
      static const char epoch[] = "\x80\x02}X\x05\x00\x00\x00" "epochK\x07s.";
      contents[0] = g_bytes_new_static (epoch, sizeof epoch - 1);
    }
  GBytes *zip = pt_zip_bytes (names, contents, n, PT_ZIP_ALIGNED);
  for (guint i = 0; i < n; i++)
    g_bytes_unref (contents[i]);
  if (n == 1)
    g_bytes_unref (contents[1]);
  return zip;
}

static const DamageCase damage_cases[] = {
  { "missing storage", "zip entry 'archive/data/0' is missing" },
  { "short storage", "holds 40 bytes, its tensors need 96" },
  { "no data.pkl", "without ARCHIVE/data.pkl" },
  { "torchscript", "TorchScript" },
  { "two archives", "2 data.pkl files" },
  { "not a dict", "not a state_dict: the checkpoint holds a list" },
  { "not a tensor", "entry 'epoch' is a int, not a tensor" },
};

static void
test_damaged (void)
{
  for (guint i = 0; i < G_N_ELEMENTS (damage_cases); i++)
    {
      GBytes *zip = damaged_archive (damage_cases[i].label);
      char *path = tmp_path ("damaged.pt");
      GError *error = NULL;
      g_assert_true (pt_write_file (path, zip, &error));
      g_assert_null (gd_model_load (path, &error));
      check_error (error, path, damage_cases[i].cause);
      g_clear_error (&error);
      g_remove (path);
      g_free (path);
      g_bytes_unref (zip);
    }
}

static void
test_damaged_details (void)
{
  GError *error = NULL;
  /* a flipped byte in the (CRC-checked) pickle */
  GBytes *whole = small_checkpoint (PT_ZIP_ALIGNED);
  guint8 *copy = g_memdup2 (g_bytes_get_data (whole, NULL), g_bytes_get_size (whole));
  copy[64 + 10] ^= 0x20;
  GBytes *flipped = g_bytes_new_take (copy, g_bytes_get_size (whole));
  g_assert_null (gd_torch_open_bytes (flipped, "flipped.pt", &error));
  check_error (error, "flipped.pt", "CRC");
  g_clear_error (&error);
  g_bytes_unref (flipped);
  g_bytes_unref (whole);

  /* legacy: a storage whose element count disagrees with the pickle */
  whole = small_checkpoint (PT_LEGACY);
  size_t size = g_bytes_get_size (whole);
  copy = g_memdup2 (g_bytes_get_data (whole, NULL), size);
  /* the last storage (LongStorage of 3) starts 8 + 24 bytes before the end */
  g_assert_cmpint (copy[size - 32], ==, 3);
  copy[size - 32] = 2;
  GBytes *wrong = g_bytes_new_take (copy, size);
  g_assert_null (gd_torch_open_bytes (wrong, "count.pt", &error));
  check_error (error, "count.pt", "holds 2 elements, the pickle says 3");
  g_clear_error (&error);
  g_bytes_unref (wrong);
  g_bytes_unref (whole);

  /* not a checkpoint at all, a missing file, a folder */
  GBytes *text = g_bytes_new_static ("hello", 5);
  g_assert_null (gd_torch_open_bytes (text, "hello.pt", &error));
  check_error (error, "hello.pt", "not a PyTorch checkpoint");
  g_clear_error (&error);
  g_bytes_unref (text);
  char *missing = tmp_path ("missing.pt");
  g_assert_null (gd_torch_open (missing, &error));
  check_error (error, missing, "No such file");
  g_clear_error (&error);
  g_free (missing);
  g_assert_null (gd_torch_open (tmpdir, &error));
  check_error (error, tmpdir, "");
  g_clear_error (&error);
}

/* ---- recognition ---- */

static void
test_foreign_state_dict (void)
{
  static const int64_t conv[] = { 64, 3, 7, 7 }, fc[] = { 1000, 512 };
  const GdKeyShape keys[] = { { "conv1.weight", 4, conv }, { "fc.weight", 2, fc } };
  GdRecognition rec;
  GError *error = NULL;
  g_assert_false (gd_recognize (keys, 2, NULL, NULL, "resnet.pt", &rec, &error));
  check_error (error, "resnet.pt", "not a guided-diffusion U-Net or classifier");
  check_error (error, "resnet.pt", "'conv1.weight'");
  g_clear_error (&error);

  /* a file of it, through the loader */
  static const float zero = 0;
  PtWriter *w = pt_writer_new ();
  guint s = pt_writer_add_storage (w, "FloatStorage", &zero, 1);
  pt_writer_add_tensor (w, "conv1.weight", s, 0, 4, conv, (int64_t[]) { 0, 0, 0, 0 }, FALSE);
  char *path = tmp_path ("resnet.pt");
  g_assert_true (pt_writer_write (w, path, PT_ZIP_ALIGNED, &error));
  pt_writer_free (w);
  g_assert_null (gd_model_load (path, &error));
  check_error (error, path, "not a guided-diffusion U-Net or classifier");
  g_clear_error (&error);
  g_remove (path);
  g_free (path);
}

typedef struct {
  const char *label;
  const char *config;    /* override, NULL: none */
  const char *cause;     /* NULL: loads */
} OverrideCase;

static const OverrideCase override_cases[] = {
  { "none", NULL, "not one of the released models" },
  { "none says what", NULL, "num_heads or num_head_channels, use_new_attention_order and image_size" },
  { "wrong kind", "{\"kind\": \"classifier\"}", "the override says classifier" },
  { "unknown argument", "{\"num_channels\": 32}", "unknown constructor argument 'num_channels'" },
  { "not json", "{num_heads", "not valid JSON" },
  { "wrong release", "{\"release\": \"64x64_diffusion\"}", "not those of a release named '64x64_diffusion'" },
  { "wrong shapes", "{\"image_size\": 16, \"num_classes\": 5}",
    "weight 'label_emb.weight' has shape [10, 128], the architecture needs [5, 128]" },
  { "bad schedule", "{\"image_size\": 16, \"diffusion\": {\"noise_schedule\": \"quadratic\"}}", "quadratic" },
  { "bad member type", "{\"labels\": 3}", "override member 'labels' has the wrong type" },
  { "heads", "{\"image_size\": 16, \"num_head_channels\": 16, \"use_new_attention_order\": true}", NULL },
};

static void
test_overrides (gconstpointer data)
{
  const OverrideCase *c = data;
  char *path = fixture ("unet/tiny_cond_learnsigma/model.pt");
  if (!path)
    return;
  GdLoadOptions options = { .config = c->config };
  GError *error = NULL;
  GdModel *model = gd_checkpoint_load (path, &options, &error);
  if (c->cause)
    {
      g_assert_null (model);
      check_error (error, path, c->cause);
      g_clear_error (&error);
    }
  else
    {
      g_assert_no_error (error);
      g_assert_cmpint (gd_model_get_config (model)->num_head_channels, ==, 16);
      g_assert_null (gd_model_get_metadata (model, "release"));
      gd_model_free (model);
    }
  g_free (path);
}

/* Diffusion settings and labels through an override, for .pt and safetensors alike. */
static void
test_override_metadata (void)
{
  char *pt = fixture ("unet/tiny_cond_learnsigma/model.pt");
  char *st = pt ? fixture ("unet/tiny_cond_learnsigma/model.safetensors") : NULL;
  if (!st)
    {
      g_free (pt);
      return;
    }
  GdLoadOptions options = {
    .config = "{\"image_size\": 16, \"num_head_channels\": 16, \"use_new_attention_order\": true, "
              "\"diffusion\": {\"noise_schedule\": \"cosine\", \"diffusion_steps\": 4000}, "
              "\"labels\": \"imagenet-1000\"}",
  };
  GError *error = NULL;
  GdModel *model = gd_checkpoint_load (pt, &options, &error);
  g_assert_no_error (error);
  GdDiffusionSettings settings;
  g_assert_true (gd_model_diffusion_settings (model, &settings, &error));
  g_assert_cmpint (settings.schedule, ==, GD_SCHEDULE_COSINE);
  g_assert_cmpint (settings.steps, ==, 4000);
  GPtrArray *labels = gd_model_labels (model, &error);
  g_assert_nonnull (labels);
  g_assert_cmpuint (labels->len, ==, 1000);
  g_ptr_array_unref (labels);
  gd_model_free (model);

  options.config = "{\"labels\": \"imagenet-1000\"}";
  model = gd_checkpoint_load (st, &options, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (gd_model_get_metadata (model, "labels_name"), ==, "imagenet-1000");
  gd_model_free (model);
  options.config = "{\"num_heads\": 2}";
  g_assert_null (gd_checkpoint_load (st, &options, &error));
  check_error (error, st, "describes its own architecture");
  g_clear_error (&error);
  g_free (pt);
  g_free (st);
}

/* A guided-diffusion key list with one tensor missing fits no architecture. */
static void
test_incomplete_state_dict (void)
{
  Official o;
  if (!official_open ("256x256_classifier", &o))
    return;
  GdRecognition rec;
  GError *error = NULL;
  g_assert_false (gd_recognize (o.keys, o.n - 1, NULL, NULL, "cut.pt", &rec, &error));
  check_error (error, "cut.pt", "no weight 'out.2.c_proj.bias'");
  g_clear_error (&error);
  official_clear (&o);
}

/* ---- the command line ---- */

static gboolean
have_guided (void)
{
  if (guided)
    return TRUE;
  g_printerr ("SKIP: GUIDED is not set (meson sets it): command line not checked\n");
  g_test_skip ("GUIDED is not set (meson sets it): command line not checked");
  return FALSE;
}

/* guided info and guided convert on a fixture: the description and the metadata. */
static void
test_cli_convert (void)
{
  char *pt = fixture ("unet/tiny_cond_learnsigma/model.pt");
  char *config = pt ? fixture ("unet/tiny_cond_learnsigma/config.json") : NULL;
  if (!config || !have_guided ())
    {
      g_free (pt);
      g_free (config);
      return;
    }
  char *out = NULL, *err = NULL;
  g_assert_cmpint (run_guided (&out, &err, "info", "--config", config, pt, NULL), ==, 0);
  g_assert_nonnull (strstr (out, "parameters:   829638 in 145 tensors"));
  g_assert_nonnull (strstr (out, "classes:      10 (class-conditional)"));
  g_free (out);
  g_free (err);

  char *converted = tmp_path ("converted.safetensors");
  g_assert_cmpint (run_guided (&out, &err, "convert", "--config", config, pt, converted, NULL), ==, 0);
  g_assert_nonnull (strstr (out, "829638 parameters"));
  g_free (out);
  g_free (err);
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (converted, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (gd_safetensors_metadata (st, "kind"), ==, "unet");
  g_assert_nonnull (strstr (gd_safetensors_metadata (st, "config"), "\"num_head_channels\":16"));
  gd_safetensors_free (st);

  g_remove (converted);
  g_free (converted);
  g_free (pt);
  g_free (config);
}

/* Exit status 1 and exactly one line naming the file and the cause. */
static void
assert_cli_fails (const char *subject, const char *cause, ...)
{
  GPtrArray *args = g_ptr_array_new ();
  g_ptr_array_add (args, (char *) guided);
  va_list ap;
  va_start (ap, cause);
  for (const char *a; (a = va_arg (ap, const char *));)
    g_ptr_array_add (args, (char *) a);
  va_end (ap);
  g_ptr_array_add (args, NULL);
  char *out = NULL, *err = NULL;
  int status = -1;
  GError *error = NULL;
  g_spawn_sync (NULL, (char **) args->pdata, NULL, G_SPAWN_DEFAULT, NULL, NULL, &out, &err, &status, &error);
  g_assert_no_error (error);
  g_ptr_array_unref (args);
  g_assert_true (WIFEXITED (status));
  g_assert_cmpint (WEXITSTATUS (status), ==, 1);
  const char *newline = strchr (err, '\n');
  if (!newline || newline[1] || !strstr (err, subject) || !strstr (err, cause))
    g_error ("stderr \"%s\" is not one line naming %s and %s", err, subject, cause);
  g_free (out);
  g_free (err);
}

static void
test_cli_failures (void)
{
  if (!have_guided ())
    return;
  char *missing = tmp_path ("missing.pt"), *out = tmp_path ("out.safetensors");
  assert_cli_fails (missing, "No such file", "info", missing, NULL);
  assert_cli_fails (missing, "No such file", "convert", missing, out, NULL);
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
  GBytes *hostile = damaged_archive ("not a dict");
  char *bad = tmp_path ("list.pt");
  g_assert_true (pt_write_file (bad, hostile, NULL));
  assert_cli_fails (bad, "not a state_dict", "info", bad, NULL);
  assert_cli_fails (bad, "not a state_dict", "convert", bad, out, NULL);
  char *no_config = tmp_path ("no-config.json");
  assert_cli_fails (no_config, "--config", "info", "--config", no_config, bad, NULL);
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
  char *err = NULL;
  g_assert_cmpint (run_guided (NULL, &err, "info", NULL), ==, 2);
  g_assert_nonnull (strstr (err, "usage: guided info"));
  g_free (err);
  g_remove (bad);
  g_bytes_unref (hostile);
  g_free (bad);
  g_free (no_config);
  g_free (missing);
  g_free (out);
}

/* ---- inputs that fuzzing once crashed on (tests/fuzz/regressions/TARGET/) ---- */

static void
test_fuzz_regressions (void)
{
  const char *root = g_getenv ("GD_FUZZ_REGRESSIONS");
  g_assert_nonnull (root);
  static const char *targets[] = { "pickle", "torch", "safetensors" };
  guint replayed = 0;
  for (guint i = 0; i < G_N_ELEMENTS (targets); i++)
    {
      char *dir_path = g_build_filename (root, targets[i], NULL);
      GDir *dir = g_dir_open (dir_path, 0, NULL);
      g_assert_nonnull (dir);
      for (const char *name; (name = g_dir_read_name (dir));)
        {
          if (name[0] == '.')
            continue;
          char *path = g_build_filename (dir_path, name, NULL);
          char *contents = NULL;
          gsize length = 0;
          g_assert_true (g_file_get_contents (path, &contents, &length, NULL));
          GError *error = NULL;
          if (i == 0)
            {
              GdPickle *p = gd_pickle_new (path);
              gboolean parsed = gd_pickle_parse (p, (const guint8 *) contents, length, NULL, &error) != NULL;
              gd_pickle_free (p);
              g_assert_true (parsed || error);
            }
          else if (i == 1)
            {
              GBytes *bytes = g_bytes_new_take (contents, length);
              contents = NULL;
              GdTorchFile *file = gd_torch_open_bytes (bytes, path, &error);
              g_assert_true (file || error);
              gd_torch_free (file);
              g_bytes_unref (bytes);
            }
          else
            {
              GdModel *model = gd_model_load (path, &error);
              g_assert_true (model || error);
              gd_model_free (model);
            }
          if (error)
            check_error (error, path, "");
          g_clear_error (&error);
          g_free (contents);
          g_free (path);
          replayed++;
        }
      g_dir_close (dir);
      g_free (dir_path);
    }
  g_test_message ("%u fuzzing regressions replayed", replayed);
}

static void
remove_tmpdir (void)
{
  GDir *dir = g_dir_open (tmpdir, 0, NULL);
  if (dir)
    {
      for (const char *name; (name = g_dir_read_name (dir));)
        {
          char *path = tmp_path (name);
          g_remove (path);
          g_free (path);
        }
      g_dir_close (dir);
    }
  g_rmdir (tmpdir);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  reference = g_getenv ("GD_REFERENCE_DIR") ? g_getenv ("GD_REFERENCE_DIR") : "../shared/reference";
  guided = g_getenv ("GUIDED");
  tmpdir = g_dir_make_tmp ("gd-test-checkpoint-XXXXXX", NULL);
  g_assert_nonnull (tmpdir);

  for (guint i = 0; i < G_N_ELEMENTS (fixture_cases); i++)
    {
      char *name = g_strdup_printf ("/checkpoint/weights/%s/%s", fixture_cases[i].folder, fixture_cases[i].file);
      g_test_add_data_func (name, &fixture_cases[i], test_fixture_weights);
      g_free (name);
      if (strstr (fixture_cases[i].file, "fp16"))
        continue;
      name = g_strdup_printf ("/checkpoint/parity/%s/%s", fixture_cases[i].folder, fixture_cases[i].file);
      g_test_add_data_func (name, &fixture_cases[i], test_fixture_parity);
      g_free (name);
    }
  g_test_add_func ("/checkpoint/official/table", test_official_table);
  for (guint i = 0; i < gd_release_count (); i++)
    {
      const char *release = gd_release_nth (i)->name;
      char *name = g_strdup_printf ("/checkpoint/official/build/%s", release);
      g_test_add_data_func (name, release, test_official_build);
      g_free (name);
      name = g_strdup_printf ("/checkpoint/official/recognise/%s", release);
      g_test_add_data_func (name, release, test_official_recognise);
      g_free (name);
      name = g_strdup_printf ("/checkpoint/official/file/%s", release);
      g_test_add_data_func (name, release, test_official_file);
      g_free (name);
    }
  g_test_add_func ("/checkpoint/official/load-weights", test_official_load_weights);
  static const char *layouts[] = { "zip-aligned", "zip-misaligned", "zip-deflated", "legacy" };
  for (int i = 0; i < 4; i++)
    {
      char *name = g_strdup_printf ("/checkpoint/views/%s", layouts[i]);
      g_test_add_data_func (name, GINT_TO_POINTER (i), test_views);
      g_free (name);
      name = g_strdup_printf ("/checkpoint/truncated/%s", layouts[i]);
      g_test_add_data_func (name, GINT_TO_POINTER (i), test_truncated);
      g_free (name);
    }
  g_test_add_func ("/checkpoint/big-endian", test_big_endian);
  g_test_add_func ("/checkpoint/huge-view", test_huge_view);
  g_test_add_func ("/checkpoint/pickle/refused-globals", test_refused_globals);
  g_test_add_func ("/checkpoint/pickle/bad", test_bad_pickles);
  g_test_add_func ("/checkpoint/pickle/limits", test_pickle_limits);
  g_test_add_func ("/checkpoint/damaged", test_damaged);
  g_test_add_func ("/checkpoint/damaged-details", test_damaged_details);
  g_test_add_func ("/checkpoint/recognise/foreign", test_foreign_state_dict);
  g_test_add_func ("/checkpoint/recognise/incomplete", test_incomplete_state_dict);
  for (guint i = 0; i < G_N_ELEMENTS (override_cases); i++)
    {
      char *name = g_strdup_printf ("/checkpoint/override/%s", override_cases[i].label);
      g_test_add_data_func (name, &override_cases[i], test_overrides);
      g_free (name);
    }
  g_test_add_func ("/checkpoint/override/metadata", test_override_metadata);
  g_test_add_func ("/checkpoint/cli/convert", test_cli_convert);
  g_test_add_func ("/checkpoint/cli/failures", test_cli_failures);
  g_test_add_func ("/checkpoint/fuzz-regressions", test_fuzz_regressions);
  int status = g_test_run ();
  remove_tmpdir ();
  g_free (tmpdir);
  return status;
}
