/* Constructor arguments of UNetModel / EncoderUNetModel, with the reference's defaults. */
#include "gd-model.h"
#include "gd-error.h"

#include <json-glib/json-glib.h>
#include <math.h>
#include <string.h>

void
gd_model_config_init (GdModelConfig *cfg, GdModelKind kind)
{
  static const double default_mult[] = { 1, 2, 4, 8 };
  memset (cfg, 0, sizeof *cfg);
  cfg->kind = kind;
  cfg->in_channels = 3;
  cfg->num_res_blocks = 2;
  cfg->n_levels = 4;
  memcpy (cfg->channel_mult, default_mult, sizeof default_mult);
  cfg->conv_resample = TRUE;
  cfg->num_heads = 1;
  cfg->num_head_channels = -1;
  cfg->num_heads_upsample = -1;
  cfg->pool = GD_POOL_ADAPTIVE;
}

static gboolean
bad (GError **error, const char *origin, const char *fmt, ...) G_GNUC_PRINTF (3, 4);

static gboolean
bad (GError **error, const char *origin, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *msg = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: config: %s", origin, msg);
  g_free (msg);
  return FALSE;
}

static gboolean
node_number (JsonNode *node, double *out)
{
  if (!JSON_NODE_HOLDS_VALUE (node))
    return FALSE;
  GType type = json_node_get_value_type (node);
  if (type == G_TYPE_INT64)
    *out = (double) json_node_get_int (node);
  else if (type == G_TYPE_DOUBLE)
    *out = json_node_get_double (node);
  else
    return FALSE;
  return TRUE;
}

static gboolean
node_int (JsonNode *node, int *out)
{
  double d;
  if (!node_number (node, &d) || d != floor (d) || fabs (d) > 1e9)
    return FALSE;
  *out = (int) d;
  return TRUE;
}

static gboolean
node_bool (JsonNode *node, gboolean *out)
{
  if (!JSON_NODE_HOLDS_VALUE (node) || json_node_get_value_type (node) != G_TYPE_BOOLEAN)
    return FALSE;
  *out = json_node_get_boolean (node);
  return TRUE;
}

/* attention_resolutions may be a list of ints or the flag string "16,8". */
static gboolean
parse_int_list (JsonNode *node, int *values, int max, int *count)
{
  *count = 0;
  if (JSON_NODE_HOLDS_VALUE (node) && json_node_get_value_type (node) == G_TYPE_STRING)
    {
      char **parts = g_strsplit (json_node_get_string (node), ",", -1);
      gboolean ok = TRUE;
      for (char **p = parts; *p && ok; p++)
        {
          char *end;
          long v = strtol (*p, &end, 10);
          if (end == *p || *end != '\0' || *count >= max)
            ok = FALSE;
          else
            values[(*count)++] = (int) v;
        }
      g_strfreev (parts);
      return ok;
    }
  if (!JSON_NODE_HOLDS_ARRAY (node))
    return FALSE;
  JsonArray *array = json_node_get_array (node);
  guint len = json_array_get_length (array);
  if ((int) len > max)
    return FALSE;
  for (guint i = 0; i < len; i++)
    if (!node_int (json_array_get_element (array, i), &values[i]))
      return FALSE;
  *count = (int) len;
  return TRUE;
}

gboolean
gd_model_config_parse (GdModelConfig *cfg, const char *json, const char *origin, GError **error)
{
  GError *local = NULL;
  JsonParser *parser = json_parser_new ();
  gboolean ok = FALSE;
  if (!json_parser_load_from_data (parser, json, -1, &local))
    {
      bad (error, origin, "malformed JSON: %s", local->message);
      g_error_free (local);
      goto out;
    }
  JsonNode *root = json_parser_get_root (parser);
  if (!root || !JSON_NODE_HOLDS_OBJECT (root))
    {
      bad (error, origin, "not a JSON object");
      goto out;
    }
  JsonObject *obj = json_node_get_object (root);
  GList *members = json_object_get_members (obj);
  ok = TRUE;
  for (GList *l = members; l && ok; l = l->next)
    {
      const char *key = l->data;
      JsonNode *v = json_object_get_member (obj, key);
      gboolean is_null = JSON_NODE_HOLDS_NULL (v);
      gboolean valid;
      if (strcmp (key, "image_size") == 0)
        valid = node_int (v, &cfg->image_size);
      else if (strcmp (key, "in_channels") == 0)
        valid = node_int (v, &cfg->in_channels);
      else if (strcmp (key, "model_channels") == 0)
        valid = node_int (v, &cfg->model_channels);
      else if (strcmp (key, "out_channels") == 0)
        valid = node_int (v, &cfg->out_channels);
      else if (strcmp (key, "num_res_blocks") == 0)
        valid = node_int (v, &cfg->num_res_blocks);
      else if (strcmp (key, "attention_resolutions") == 0)
        valid = parse_int_list (v, cfg->attention_resolutions, GD_MAX_ATTENTION_RESOLUTIONS,
                                &cfg->n_attention_resolutions);
      else if (strcmp (key, "channel_mult") == 0)
        {
          valid = JSON_NODE_HOLDS_ARRAY (v)
                  && json_array_get_length (json_node_get_array (v)) <= GD_MAX_LEVELS;
          if (valid)
            {
              JsonArray *a = json_node_get_array (v);
              cfg->n_levels = (int) json_array_get_length (a);
              for (int i = 0; i < cfg->n_levels && valid; i++)
                valid = node_number (json_array_get_element (a, (guint) i), &cfg->channel_mult[i]);
            }
        }
      else if (strcmp (key, "dropout") == 0)
        valid = node_number (v, &cfg->dropout);
      else if (strcmp (key, "conv_resample") == 0)
        valid = node_bool (v, &cfg->conv_resample);
      else if (strcmp (key, "dims") == 0)
        {
          int dims = 0;
          valid = node_int (v, &dims);
          if (valid && dims != 2)
            {
              ok = bad (error, origin, "dims = %d: only 2-D models are supported", dims);
              break;
            }
        }
      else if (strcmp (key, "num_classes") == 0)
        valid = is_null ? (cfg->num_classes = 0, TRUE) : node_int (v, &cfg->num_classes);
      else if (strcmp (key, "use_checkpoint") == 0 || strcmp (key, "use_fp16") == 0)
        {
          gboolean ignored;  /* memory/precision switches of the PyTorch code: no effect here */
          valid = node_bool (v, &ignored);
        }
      else if (strcmp (key, "num_heads") == 0)
        valid = node_int (v, &cfg->num_heads);
      else if (strcmp (key, "num_head_channels") == 0)
        valid = node_int (v, &cfg->num_head_channels);
      else if (strcmp (key, "num_heads_upsample") == 0)
        valid = node_int (v, &cfg->num_heads_upsample);
      else if (strcmp (key, "use_scale_shift_norm") == 0)
        valid = node_bool (v, &cfg->use_scale_shift_norm);
      else if (strcmp (key, "resblock_updown") == 0)
        valid = node_bool (v, &cfg->resblock_updown);
      else if (strcmp (key, "use_new_attention_order") == 0)
        valid = node_bool (v, &cfg->use_new_attention_order);
      else if (strcmp (key, "pool") == 0 && cfg->kind == GD_MODEL_CLASSIFIER)
        {
          valid = JSON_NODE_HOLDS_VALUE (v) && json_node_get_value_type (v) == G_TYPE_STRING;
          if (valid)
            {
              const char *pool = json_node_get_string (v);
              if (strcmp (pool, "adaptive") == 0)
                cfg->pool = GD_POOL_ADAPTIVE;
              else if (strcmp (pool, "attention") == 0)
                cfg->pool = GD_POOL_ATTENTION;
              else
                {
                  ok = bad (error, origin, "pool '%s' is not supported (adaptive, attention)", pool);
                  break;
                }
            }
        }
      else if (strcmp (key, "kind") == 0)
        valid = TRUE;  /* fixture configs repeat the kind; the metadata's kind decides */
      else
        {
          ok = bad (error, origin, "unknown constructor argument '%s'", key);
          break;
        }
      if (!valid)
        ok = bad (error, origin, "'%s' has a value of the wrong type", key);
    }
  g_list_free (members);
out:
  g_object_unref (parser);
  return ok;
}

char *
gd_model_config_to_json (const GdModelConfig *cfg)
{
  JsonBuilder *b = json_builder_new ();
  json_builder_begin_object (b);
#define INT_MEMBER(name) json_builder_set_member_name (b, #name); json_builder_add_int_value (b, cfg->name)
#define BOOL_MEMBER(name) json_builder_set_member_name (b, #name); json_builder_add_boolean_value (b, cfg->name)
  INT_MEMBER (image_size);
  INT_MEMBER (in_channels);
  INT_MEMBER (model_channels);
  INT_MEMBER (out_channels);
  INT_MEMBER (num_res_blocks);
  json_builder_set_member_name (b, "attention_resolutions");
  json_builder_begin_array (b);
  for (int i = 0; i < cfg->n_attention_resolutions; i++)
    json_builder_add_int_value (b, cfg->attention_resolutions[i]);
  json_builder_end_array (b);
  json_builder_set_member_name (b, "channel_mult");
  json_builder_begin_array (b);
  for (int i = 0; i < cfg->n_levels; i++)
    {
      if (cfg->channel_mult[i] == floor (cfg->channel_mult[i]))
        json_builder_add_int_value (b, (gint64) cfg->channel_mult[i]);
      else
        json_builder_add_double_value (b, cfg->channel_mult[i]);
    }
  json_builder_end_array (b);
  json_builder_set_member_name (b, "dropout");
  json_builder_add_double_value (b, cfg->dropout);
  BOOL_MEMBER (conv_resample);
  if (cfg->kind == GD_MODEL_UNET)
    {
      json_builder_set_member_name (b, "num_classes");
      if (cfg->num_classes > 0)
        json_builder_add_int_value (b, cfg->num_classes);
      else
        json_builder_add_null_value (b);
    }
  INT_MEMBER (num_heads);
  INT_MEMBER (num_head_channels);
  INT_MEMBER (num_heads_upsample);
  BOOL_MEMBER (use_scale_shift_norm);
  BOOL_MEMBER (resblock_updown);
  BOOL_MEMBER (use_new_attention_order);
  if (cfg->kind == GD_MODEL_CLASSIFIER)
    {
      json_builder_set_member_name (b, "pool");
      json_builder_add_string_value (b, cfg->pool == GD_POOL_ATTENTION ? "attention" : "adaptive");
    }
#undef INT_MEMBER
#undef BOOL_MEMBER
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
