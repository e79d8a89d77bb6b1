#include "gd-metadata.h"
#include "gd-error.h"

#include <json-glib/json-glib.h>
#include <string.h>

static JsonNode *
parse_json (const char *text, const char *origin, const char *key, GError **error)
{
  JsonParser *parser = json_parser_new ();
  GError *local = NULL;
  JsonNode *root = NULL;
  if (json_parser_load_from_data (parser, text, -1, &local))
    root = json_node_copy (json_parser_get_root (parser));
  else
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: metadata '%s' is not valid JSON: %s",
                   origin, key, local->message);
      g_error_free (local);
    }
  g_object_unref (parser);
  return root;
}

gboolean
gd_model_diffusion_settings (const GdModel *model, GdDiffusionSettings *s, GError **error)
{
  const GdModelConfig *cfg = gd_model_get_config (model);
  const char *origin = gd_model_get_origin (model);
  gboolean learn_sigma = cfg->out_channels == 2 * cfg->in_channels, sigma_small = FALSE;
  s->schedule = GD_SCHEDULE_LINEAR;
  s->steps = 1000;
  const char *text = gd_model_get_metadata (model, "diffusion");
  if (text)
    {
      JsonNode *root = parse_json (text, origin, "diffusion", error);
      if (!root)
        return FALSE;
      gboolean ok = JSON_NODE_HOLDS_OBJECT (root);
      if (ok)
        {
          JsonObject *obj = json_node_get_object (root);
          if (json_object_has_member (obj, "diffusion_steps"))
            s->steps = (int) json_object_get_int_member (obj, "diffusion_steps");
          if (json_object_has_member (obj, "learn_sigma"))
            learn_sigma = json_object_get_boolean_member (obj, "learn_sigma");
          if (json_object_has_member (obj, "sigma_small"))
            sigma_small = json_object_get_boolean_member (obj, "sigma_small");
          if (json_object_has_member (obj, "noise_schedule"))
            {
              GError *local = NULL;
              ok = gd_schedule_from_name (json_object_get_string_member (obj, "noise_schedule"),
                                          &s->schedule, &local);
              if (!ok)
                {
                  g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: %s", origin, local->message);
                  g_error_free (local);
                }
            }
        }
      else
        g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: metadata 'diffusion' is not an object", origin);
      json_node_unref (root);
      if (!ok)
        return FALSE;
    }
  s->variance = learn_sigma ? GD_VARIANCE_LEARNED_RANGE
                : sigma_small ? GD_VARIANCE_FIXED_SMALL : GD_VARIANCE_FIXED_LARGE;
  return TRUE;
}

char *
gd_diffusion_settings_to_json (const GdDiffusionSettings *s)
{
  return g_strdup_printf ("{\"diffusion_steps\": %d, \"noise_schedule\": \"%s\", "
                          "\"learn_sigma\": %s, \"sigma_small\": %s}",
                          s->steps, s->schedule == GD_SCHEDULE_COSINE ? "cosine" : "linear",
                          s->variance == GD_VARIANCE_LEARNED_RANGE ? "true" : "false",
                          s->variance == GD_VARIANCE_FIXED_SMALL ? "true" : "false");
}

GPtrArray *
gd_model_labels (const GdModel *model, GError **error)
{
  const char *text = gd_model_get_metadata (model, "labels");
  if (!text)
    return NULL;
  JsonNode *root = parse_json (text, gd_model_get_origin (model), "labels", error);
  if (!root)
    return NULL;
  GPtrArray *labels = NULL;
  if (JSON_NODE_HOLDS_ARRAY (root))
    {
      JsonArray *array = json_node_get_array (root);
      labels = g_ptr_array_new_with_free_func (g_free);
      for (guint i = 0; i < json_array_get_length (array); i++)
        {
          const char *name = json_node_get_string (json_array_get_element (array, i));
          g_ptr_array_add (labels, g_strdup (name ? name : ""));
        }
    }
  else
    g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: metadata 'labels' is not a JSON array",
                 gd_model_get_origin (model));
  json_node_unref (root);
  return labels;
}

GPtrArray *
gd_labels_read_tsv (const char *path, GError **error)
{
  char *text = NULL;
  GError *local = NULL;
  if (!g_file_get_contents (path, &text, NULL, &local))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: %s", path, local->message);
      g_error_free (local);
      return NULL;
    }
  GPtrArray *labels = g_ptr_array_new_with_free_func (g_free);
  char **lines = g_strsplit (text, "\n", -1);
  gboolean ok = TRUE;
  for (int i = 0; lines[i] && ok; i++)
    {
      if (!*g_strstrip (lines[i]))
        continue;
      char *tab = strchr (lines[i], '\t');
      char *end = NULL;
      long index = tab ? strtol (lines[i], &end, 10) : -1;
      if (!tab || end != tab || index != (long) labels->len)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_FORMAT,
                       "%s: line %d is not \"%u<TAB>name\"", path, i + 1, labels->len);
          ok = FALSE;
        }
      else
        g_ptr_array_add (labels, g_strdup (tab + 1));
    }
  g_strfreev (lines);
  g_free (text);
  if (!ok)
    g_clear_pointer (&labels, g_ptr_array_unref);
  return labels;
}

/* Levenshtein distance, for suggesting names close to a mistyped one. */
static guint
edit_distance (const char *a, const char *b)
{
  size_t la = strlen (a), lb = strlen (b);
  guint *row = g_new (guint, lb + 1);
  for (size_t j = 0; j <= lb; j++)
    row[j] = (guint) j;
  for (size_t i = 1; i <= la; i++)
    {
      guint diagonal = row[0];
      row[0] = (guint) i;
      for (size_t j = 1; j <= lb; j++)
        {
          guint above = row[j];
          guint cost = g_ascii_tolower (a[i - 1]) == g_ascii_tolower (b[j - 1]) ? 0 : 1;
          row[j] = MIN (MIN (row[j] + 1, row[j - 1] + 1), diagonal + cost);
          diagonal = above;
        }
    }
  guint result = row[lb];
  g_free (row);
  return result;
}

int
gd_labels_lookup (GPtrArray *labels, const char *name, const char *origin, GError **error)
{
  for (guint i = 0; i < labels->len; i++)
    if (strcmp (labels->pdata[i], name) == 0)
      return (int) i;
  for (guint i = 0; i < labels->len; i++)
    if (g_ascii_strcasecmp (labels->pdata[i], name) == 0)
      return (int) i;
  GString *close = g_string_new (NULL);
  int shown = 0;
  char *needle = g_ascii_strdown (name, -1);
  guint limit = MAX (2, (guint) strlen (name) / 3);
  for (guint i = 0; i < labels->len && shown < 8; i++)
    {
      char *hay = g_ascii_strdown (labels->pdata[i], -1);
      if (strstr (hay, needle) || edit_distance (hay, needle) <= limit)
        {
          g_string_append_printf (close, "%s'%s' (%u)", shown ? ", " : "", (char *) labels->pdata[i], i);
          shown++;
        }
      g_free (hay);
    }
  g_free (needle);
  if (shown)
    g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "unknown label '%s' in %s; close matches: %s",
                 name, origin, close->str);
  else
    g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "unknown label '%s' in %s (%u labels, none close)",
                 name, origin, labels->len);
  g_string_free (close, TRUE);
  return -1;
}
