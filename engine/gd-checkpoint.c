/* Model loading from PyTorch checkpoints: recognition, weights, metadata. */
#include "gd-checkpoint.h"
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-paths.h"
#include "gd-recognize.h"
#include "gd-torch.h"

#include <json-glib/json-glib.h>
#include <string.h>

char *
gd_labels_find (const char *name)
{
  if (strchr (name, '/') || g_str_has_suffix (name, ".tsv"))
    return g_file_test (name, G_FILE_TEST_IS_REGULAR) ? g_strdup (name) : NULL;
  const char *dirs[] = { g_getenv ("GD_DATA_DIR"), GD_INSTALLED_DATA_DIR, GD_SOURCE_DATA_DIR };
  char *file = g_strconcat (name, ".tsv", NULL);
  char *found = NULL;
  for (guint i = 0; i < G_N_ELEMENTS (dirs) && !found; i++)
    {
      if (!dirs[i])
        continue;
      char *path = g_build_filename (dirs[i], "labels", file, NULL);
      if (g_file_test (path, G_FILE_TEST_IS_REGULAR))
        found = path;
      else
        g_free (path);
    }
  g_free (file);
  return found;
}

char *
gd_checkpoint_read_config (const char *argument, GError **error)
{
  const char *p = argument;
  while (g_ascii_isspace (*p))
    p++;
  if (*p == '{')
    return g_strdup (argument);
  char *text = NULL;
  GError *local = NULL;
  if (!g_file_get_contents (argument, &text, NULL, &local))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "--config: %s", local->message);
      g_error_free (local);
    }
  return text;
}

static char *
labels_json (GPtrArray *labels)
{
  JsonArray *array = json_array_sized_new (labels->len);
  for (guint i = 0; i < labels->len; i++)
    json_array_add_string_element (array, labels->pdata[i]);
  JsonNode *root = json_node_new (JSON_NODE_ARRAY);
  json_node_take_array (root, array);
  char *text = json_to_string (root, FALSE);
  json_node_unref (root);
  return text;
}

/* Sets `labels` and `labels_name` from a list name or path; a list that cannot be found
 * leaves only the name (the model still works, class names are just unknown). */
static gboolean
attach_labels (GdModel *model, const char *name, GError **error)
{
  gd_model_set_metadata (model, "labels_name", name);
  char *path = gd_labels_find (name);
  if (!path)
    return TRUE;
  GPtrArray *labels = gd_labels_read_tsv (path, error);
  g_free (path);
  if (!labels)
    return FALSE;
  char *json = labels_json (labels);
  gd_model_set_metadata (model, "labels", json);
  g_free (json);
  g_ptr_array_unref (labels);
  return TRUE;
}

/* Checks every parameter against the file and (unless shapes_only) points it at its
 * values: in place for aligned contiguous float32, else a converted copy.  *borrowed
 * says whether any parameter points into the file. */
static gboolean
attach_tensors (GdModel *model, GdTorchFile *file, gboolean shapes_only, gboolean *borrowed,
                GError **error)
{
  const char *path = gd_torch_path (file);
  *borrowed = FALSE;
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      GdParam *p = gd_model_param (model, i);
      const GdTorchTensor *t = gd_torch_find (file, p->name);
      char *why = gd_param_mismatch (p, t != NULL, t ? t->ndim : 0, t ? t->shape : NULL);
      if (why)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS, "%s: %s", path, why);
          g_free (why);
          return FALSE;
        }
      if (t->dtype == GD_DTYPE_I64)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS, "%s: weight '%s' holds integers, not floats",
                       path, p->name);
          return FALSE;
        }
      if (shapes_only)
        continue;
      const float *in_place = gd_torch_tensor_f32_in_place (t);
      if (in_place)
        {
          p->data = (float *) in_place;  /* read-only mapping: never written through */
          p->owns_data = FALSE;
          *borrowed = TRUE;
        }
      else
        {
          p->data = gd_torch_tensor_to_f32 (t);
          p->owns_data = TRUE;
          if (!p->data)
            {
              g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS, "%s: no memory for weight '%s' (%zu values)",
                           path, p->name, p->numel);
              return FALSE;
            }
        }
    }
  if (gd_torch_count (file) != gd_model_n_params (model))
    for (guint i = 0; i < gd_torch_count (file); i++)
      {
        const char *name = gd_torch_nth (file, i)->name;
        if (!gd_model_find_param (model, name))
          {
            char *escaped = g_strescape (name, NULL);
            g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS,
                         "%s: unexpected weight '%s' (not part of the architecture)", path, escaped);
            g_free (escaped);
            return FALSE;
          }
      }
  return TRUE;
}

static char *
dtype_list (GdTorchFile *file)
{
  gboolean seen[GD_DTYPE_U8 + 1] = { FALSE };
  GString *s = g_string_new (NULL);
  for (guint i = 0; i < gd_torch_count (file); i++)
    {
      GdDtype dtype = gd_torch_nth (file, i)->dtype;
      if (!seen[dtype])
        g_string_append_printf (s, "%s%s", s->len ? "," : "", gd_dtype_name (dtype));
      seen[dtype] = TRUE;
    }
  return g_string_free (s, FALSE);
}

GdModel *
gd_torch_load_model (const char *path, const GdLoadOptions *options, GError **error)
{
  GdTorchFile *file = gd_torch_open (path, error);
  if (!file)
    return NULL;
  guint n = gd_torch_count (file);
  GdKeyShape *keys = g_new0 (GdKeyShape, MAX (n, 1));
  for (guint i = 0; i < n; i++)
    {
      const GdTorchTensor *t = gd_torch_nth (file, i);
      keys[i] = (GdKeyShape) { t->name, t->ndim, t->shape };
    }
  GdRecognition rec;
  char *base = g_path_get_basename (path);
  gboolean ok = gd_recognize (keys, n, options ? options->config : NULL, base, path, &rec, error);
  g_free (base);
  g_free (keys);
  GdModel *model = ok ? gd_model_new (&rec.config, path, error) : NULL;
  gboolean borrowed = FALSE;
  ok = model && attach_tensors (model, file, options && options->shapes_only, &borrowed, error);
  if (ok)
    {
      if (rec.diffusion_json)
        gd_model_set_metadata (model, "diffusion", rec.diffusion_json);
      if (rec.release)
        gd_model_set_metadata (model, "release", rec.release->name);
      gd_model_set_metadata (model, "source_format",
                             gd_torch_format (file) == GD_TORCH_ZIP ? "pytorch-zip" : "pytorch-legacy");
      char *dtypes = dtype_list (file);
      gd_model_set_metadata (model, "source_dtypes", dtypes);
      g_free (dtypes);
      if (rec.labels)
        ok = attach_labels (model, rec.labels, error);
    }
  if (ok && rec.diffusion_json)
    {
      GdDiffusionSettings settings;
      ok = gd_model_diffusion_settings (model, &settings, error);
    }
  gd_recognition_clear (&rec);
  if (!ok)
    {
      gd_model_free (model);
      gd_torch_free (file);
      return NULL;
    }
  if (borrowed)
    gd_model_set_data_owner (model, file, (GDestroyNotify) gd_torch_free);
  else
    gd_torch_free (file);
  return model;
}

/* For a safetensors file the architecture is its own; an override may only add
 * diffusion settings and labels. */
static gboolean
apply_safetensors_override (GdModel *model, const char *config, const char *path, GError **error)
{
  JsonParser *parser = json_parser_new ();
  GError *local = NULL;
  gboolean ok = json_parser_load_from_data (parser, config, -1, &local);
  JsonNode *root = ok ? json_parser_get_root (parser) : NULL;
  if (!ok || !root || !JSON_NODE_HOLDS_OBJECT (root))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: the configuration override is not a JSON object%s%s",
                   path, local ? ": " : "", local ? local->message : "");
      g_clear_error (&local);
      g_object_unref (parser);
      return FALSE;
    }
  ok = TRUE;
  JsonObject *obj = json_node_get_object (root);
  GList *members = json_object_get_members (obj);
  for (GList *l = members; l && ok; l = l->next)
    {
      const char *name = l->data;
      JsonNode *v = json_object_get_member (obj, name);
      if (strcmp (name, "diffusion") == 0 && JSON_NODE_HOLDS_OBJECT (v))
        {
          char *text = json_to_string (v, FALSE);
          gd_model_set_metadata (model, "diffusion", text);
          g_free (text);
          GdDiffusionSettings settings;
          ok = gd_model_diffusion_settings (model, &settings, error);
        }
      else if (strcmp (name, "labels") == 0 && JSON_NODE_HOLDS_VALUE (v)
               && json_node_get_value_type (v) == G_TYPE_STRING)
        ok = attach_labels (model, json_node_get_string (v), error);
      else
        {
          g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                       "%s: a safetensors model describes its own architecture; an override may "
                       "only give 'diffusion' (an object) and 'labels' (a name), not '%s'", path, name);
          ok = FALSE;
        }
    }
  g_list_free (members);
  g_object_unref (parser);
  return ok;
}

GdModel *
gd_checkpoint_load (const char *path, const GdLoadOptions *options, GError **error)
{
  if (gd_torch_file_is_checkpoint (path))
    return gd_torch_load_model (path, options, error);
  GdModel *model = gd_model_load (path, error);
  if (model && options && options->config
      && !apply_safetensors_override (model, options->config, path, error))
    g_clear_pointer (&model, gd_model_free);
  return model;
}
