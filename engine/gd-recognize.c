/* Architecture recognition for bare state_dicts (see gd-recognize.h). */
#include "gd-recognize.h"
#include "gd-error.h"
#include "gd-metadata.h"

#include <json-glib/json-glib.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define IMAGENET "imagenet-1000"

/* The released models and the flags their README gives (openai/guided-diffusion).
 * Every U-Net release uses 32,16,8 attention resolutions, learned sigmas, scale-shift
 * norm, residual up/down sampling, 1000 steps and num_heads 4; every classifier 128
 * channels, 32,16,8 attention, scale-shift norm, residual resampling, attention pooling. */
static const GdRelease releases[] = {
  { .name = "64x64_diffusion", .kind = GD_MODEL_UNET, .image_size = 64, .num_channels = 192,
    .num_res_blocks = 3, .class_cond = TRUE, .num_head_channels = 64, .dropout = 0.1,
    .use_new_attention_order = TRUE, .noise_schedule = "cosine", .labels = IMAGENET },
  { .name = "128x128_diffusion", .kind = GD_MODEL_UNET, .image_size = 128, .num_channels = 256,
    .num_res_blocks = 2, .class_cond = TRUE, .num_head_channels = -1, .noise_schedule = "linear",
    .labels = IMAGENET },
  { .name = "256x256_diffusion", .kind = GD_MODEL_UNET, .image_size = 256, .num_channels = 256,
    .num_res_blocks = 2, .class_cond = TRUE, .num_head_channels = 64, .noise_schedule = "linear",
    .labels = IMAGENET },
  /* the next two have the same shapes and sampling settings; only training dropout differs */
  { .name = "256x256_diffusion_uncond", .kind = GD_MODEL_UNET, .image_size = 256,
    .num_channels = 256, .num_res_blocks = 2, .num_head_channels = 64, .noise_schedule = "linear",
    .file_hint = "uncond" },
  { .name = "lsun_bedroom", .kind = GD_MODEL_UNET, .image_size = 256, .num_channels = 256,
    .num_res_blocks = 2, .num_head_channels = 64, .dropout = 0.1, .noise_schedule = "linear",
    .file_hint = "bedroom" },
  { .name = "512x512_diffusion", .kind = GD_MODEL_UNET, .image_size = 512, .num_channels = 256,
    .num_res_blocks = 2, .class_cond = TRUE, .num_head_channels = 64, .noise_schedule = "linear",
    .labels = IMAGENET },
  { .name = "64x64_classifier", .kind = GD_MODEL_CLASSIFIER, .image_size = 64,
    .classifier_depth = 4, .classifier_scale = 1.0, .labels = IMAGENET },
  { .name = "128x128_classifier", .kind = GD_MODEL_CLASSIFIER, .image_size = 128,
    .classifier_depth = 2, .classifier_scale = 0.5, .labels = IMAGENET },
  { .name = "256x256_classifier", .kind = GD_MODEL_CLASSIFIER, .image_size = 256,
    .classifier_depth = 2, .classifier_scale = 1.0, .labels = IMAGENET },
  { .name = "512x512_classifier", .kind = GD_MODEL_CLASSIFIER, .image_size = 512,
    .classifier_depth = 2, .classifier_scale = 4.0, .labels = IMAGENET },
};

guint gd_release_count (void) { return G_N_ELEMENTS (releases); }
const GdRelease *gd_release_nth (guint i) { return i < G_N_ELEMENTS (releases) ? &releases[i] : NULL; }

const GdRelease *
gd_release_find (const char *name)
{
  for (guint i = 0; i < G_N_ELEMENTS (releases); i++)
    if (strcmp (releases[i].name, name) == 0)
      return &releases[i];
  return NULL;
}

static char *
builder_to_text (JsonBuilder *b)
{
  JsonNode *root = json_builder_get_root (b);
  char *text = json_to_string (root, FALSE);
  json_node_unref (root);
  g_object_unref (b);
  return text;
}

#define SET_INT(b, name, value) (json_builder_set_member_name (b, name), json_builder_add_int_value (b, value))
#define SET_BOOL(b, name, value) (json_builder_set_member_name (b, name), json_builder_add_boolean_value (b, value))
#define SET_STRING(b, name, value) (json_builder_set_member_name (b, name), json_builder_add_string_value (b, value))
#define SET_DOUBLE(b, name, value) (json_builder_set_member_name (b, name), json_builder_add_double_value (b, value))

char *
gd_release_flags_json (const GdRelease *r)
{
  JsonBuilder *b = json_builder_new ();
  json_builder_begin_object (b);
  SET_INT (b, "image_size", r->image_size);
  if (r->kind == GD_MODEL_CLASSIFIER)
    {
      SET_BOOL (b, "classifier_use_fp16", FALSE);
      SET_INT (b, "classifier_width", 128);
      SET_INT (b, "classifier_depth", r->classifier_depth);
      SET_STRING (b, "classifier_attention_resolutions", "32,16,8");
      SET_BOOL (b, "classifier_use_scale_shift_norm", TRUE);
      SET_BOOL (b, "classifier_resblock_updown", TRUE);
      SET_STRING (b, "classifier_pool", "attention");
    }
  else
    {
      SET_INT (b, "num_channels", r->num_channels);
      SET_INT (b, "num_res_blocks", r->num_res_blocks);
      SET_STRING (b, "channel_mult", "");
      SET_BOOL (b, "learn_sigma", TRUE);
      SET_BOOL (b, "class_cond", r->class_cond);
      SET_BOOL (b, "use_checkpoint", FALSE);
      SET_STRING (b, "attention_resolutions", "32,16,8");
      SET_INT (b, "num_heads", 4);
      SET_INT (b, "num_head_channels", r->num_head_channels);
      SET_INT (b, "num_heads_upsample", -1);
      SET_BOOL (b, "use_scale_shift_norm", TRUE);
      SET_DOUBLE (b, "dropout", r->dropout);
      SET_BOOL (b, "resblock_updown", TRUE);
      SET_BOOL (b, "use_fp16", FALSE);
      SET_BOOL (b, "use_new_attention_order", r->use_new_attention_order);
    }
  json_builder_end_object (b);
  return builder_to_text (b);
}

char *
gd_release_diffusion_json (const GdRelease *r)
{
  JsonBuilder *b = json_builder_new ();
  json_builder_begin_object (b);
  if (r->kind == GD_MODEL_CLASSIFIER)
    SET_DOUBLE (b, "classifier_scale", r->classifier_scale);
  else
    {
      SET_INT (b, "diffusion_steps", 1000);
      SET_STRING (b, "noise_schedule", r->noise_schedule);
    }
  json_builder_end_object (b);
  return builder_to_text (b);
}

/* ---- script flags -> constructor arguments ---- */

static JsonObject *
parse_object (const char *text, JsonParser *parser, const char *origin, const char *what,
              GError **error)
{
  GError *local = NULL;
  if (!json_parser_load_from_data (parser, text, -1, &local))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: %s is not valid JSON: %s", origin, what,
                   local->message);
      g_error_free (local);
      return NULL;
    }
  JsonNode *root = json_parser_get_root (parser);
  if (!root || !JSON_NODE_HOLDS_OBJECT (root))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: %s is not a JSON object", origin, what);
      return NULL;
    }
  return json_node_get_object (root);
}

typedef struct {
  JsonObject *obj;
  const char *origin;
  GError **error;
  gboolean ok;
} Flags;

static gboolean
flag_bad (Flags *f, const char *name, const char *expected)
{
  if (f->ok)
    g_set_error (f->error, GD_ERROR, GD_ERROR_CONFIG, "%s: flag '%s' is not %s", f->origin, name,
                 expected);
  f->ok = FALSE;
  return FALSE;
}

static JsonNode *
flag_node (Flags *f, const char *name, GType type)
{
  JsonNode *node = json_object_get_member (f->obj, name);
  if (!node)
    return NULL;
  if (!JSON_NODE_HOLDS_VALUE (node) || json_node_get_value_type (node) != type)
    {
      /* a float flag may be written as an integer (dropout 0) */
      if (!(type == G_TYPE_DOUBLE && JSON_NODE_HOLDS_VALUE (node)
            && json_node_get_value_type (node) == G_TYPE_INT64))
        {
          flag_bad (f, name, type == G_TYPE_BOOLEAN ? "true or false"
                             : type == G_TYPE_STRING ? "a string" : "a number");
          return NULL;
        }
    }
  return node;
}

static int
flag_int (Flags *f, const char *name, int fallback)
{
  JsonNode *node = flag_node (f, name, G_TYPE_INT64);
  if (!node)
    return fallback;
  gint64 v = json_node_get_int (node);
  if (v < -1 || v > 1000000)
    {
      flag_bad (f, name, "an integer between -1 and 10^6");
      return fallback;
    }
  return (int) v;
}

static gboolean
flag_bool (Flags *f, const char *name, gboolean fallback)
{
  JsonNode *node = flag_node (f, name, G_TYPE_BOOLEAN);
  return node ? json_node_get_boolean (node) : fallback;
}

static double
flag_double (Flags *f, const char *name, double fallback)
{
  JsonNode *node = flag_node (f, name, G_TYPE_DOUBLE);
  if (!node)
    return fallback;
  return json_node_get_value_type (node) == G_TYPE_INT64 ? (double) json_node_get_int (node)
                                                         : json_node_get_double (node);
}

static const char *
flag_string (Flags *f, const char *name, const char *fallback)
{
  JsonNode *node = flag_node (f, name, G_TYPE_STRING);
  return node ? json_node_get_string (node) : fallback;
}

/* "32,16,8" resolutions -> downsample rates image_size // resolution. */
static void
flag_attention (Flags *f, const char *name, const char *fallback, int image_size,
                GdModelConfig *cfg)
{
  const char *text = flag_string (f, name, fallback);
  char **parts = g_strsplit (text, ",", -1);
  cfg->n_attention_resolutions = 0;
  for (char **p = parts; *p && f->ok; p++)
    {
      char *end;
      long res = strtol (*p, &end, 10);
      if (end == *p || *end || res < 1 || res > image_size
          || cfg->n_attention_resolutions >= GD_MAX_ATTENTION_RESOLUTIONS)
        flag_bad (f, name, "a list of resolutions such as \"32,16,8\"");
      else
        cfg->attention_resolutions[cfg->n_attention_resolutions++] = image_size / (int) res;
    }
  g_strfreev (parts);
}

/* channel_mult "" takes the scripts' default for the image size. */
static void
flag_channel_mult (Flags *f, const char *text, int image_size, GdModelConfig *cfg)
{
  static const struct { int size; int n; double mult[GD_MAX_LEVELS]; } defaults[] = {
    { 512, 7, { 0.5, 1, 1, 2, 2, 4, 4 } },
    { 256, 6, { 1, 1, 2, 2, 4, 4 } },
    { 128, 5, { 1, 1, 2, 3, 4 } },
    { 64, 4, { 1, 2, 3, 4 } },
  };
  if (!*text)
    {
      for (guint i = 0; i < G_N_ELEMENTS (defaults); i++)
        if (defaults[i].size == image_size)
          {
            cfg->n_levels = defaults[i].n;
            memcpy (cfg->channel_mult, defaults[i].mult, sizeof cfg->channel_mult);
            return;
          }
      if (f->ok)
        g_set_error (f->error, GD_ERROR, GD_ERROR_CONFIG,
                     "%s: no default channel_mult for image_size %d (64, 128, 256, 512 have one)",
                     f->origin, image_size);
      f->ok = FALSE;
      return;
    }
  char **parts = g_strsplit (text, ",", -1);
  cfg->n_levels = 0;
  for (char **p = parts; *p && f->ok; p++)
    {
      char *end;
      long m = strtol (*p, &end, 10);
      if (end == *p || *end || m < 1 || cfg->n_levels >= GD_MAX_LEVELS)
        flag_bad (f, "channel_mult", "a list of integers such as \"1,2,2,4\"");
      else
        cfg->channel_mult[cfg->n_levels++] = (double) m;
    }
  g_strfreev (parts);
}

static const char *const unet_flags[] = {
  "image_size", "num_channels", "num_res_blocks", "channel_mult", "learn_sigma", "class_cond",
  "use_checkpoint", "attention_resolutions", "num_heads", "num_head_channels",
  "num_heads_upsample", "use_scale_shift_norm", "dropout", "resblock_updown", "use_fp16",
  "use_new_attention_order", "diffusion_steps", "noise_schedule", "timestep_respacing",
  "use_kl", "predict_xstart", "rescale_timesteps", "rescale_learned_sigmas", "sigma_small",
  NULL,
};
static const char *const classifier_flags[] = {
  "image_size", "classifier_use_fp16", "classifier_width", "classifier_depth",
  "classifier_attention_resolutions", "classifier_use_scale_shift_norm",
  "classifier_resblock_updown", "classifier_pool", NULL,
};

gboolean
gd_flags_to_config (const char *flags_json, GdModelKind kind, const char *origin,
                    GdModelConfig *cfg, char **diffusion_json, GError **error)
{
  JsonParser *parser = json_parser_new ();
  Flags f = { .origin = origin, .error = error, .ok = TRUE };
  if (diffusion_json)
    *diffusion_json = NULL;
  f.obj = parse_object (flags_json, parser, origin, "the flags", error);
  if (!f.obj)
    {
      g_object_unref (parser);
      return FALSE;
    }
  const char *const *known = kind == GD_MODEL_UNET ? unet_flags : classifier_flags;
  GList *members = json_object_get_members (f.obj);
  for (GList *l = members; l && f.ok; l = l->next)
    if (!g_strv_contains (known, l->data))
      {
        g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: unknown %s flag '%s'", origin,
                     kind == GD_MODEL_UNET ? "model" : "classifier", (const char *) l->data);
        f.ok = FALSE;
      }
  g_list_free (members);

  gd_model_config_init (cfg, kind);
  int image_size = flag_int (&f, "image_size", 64);
  if (f.ok && image_size < 1)
    flag_bad (&f, "image_size", "positive");
  cfg->image_size = image_size;
  if (kind == GD_MODEL_UNET && f.ok)
    {
      gboolean learn_sigma = flag_bool (&f, "learn_sigma", FALSE);
      cfg->model_channels = flag_int (&f, "num_channels", 128);
      cfg->out_channels = learn_sigma ? 6 : 3;
      cfg->num_res_blocks = flag_int (&f, "num_res_blocks", 2);
      flag_channel_mult (&f, flag_string (&f, "channel_mult", ""), image_size, cfg);
      flag_attention (&f, "attention_resolutions", "16,8", image_size, cfg);
      cfg->dropout = flag_double (&f, "dropout", 0.0);
      cfg->num_classes = flag_bool (&f, "class_cond", FALSE) ? 1000 : 0;
      cfg->num_heads = flag_int (&f, "num_heads", 4);
      cfg->num_head_channels = flag_int (&f, "num_head_channels", -1);
      cfg->num_heads_upsample = flag_int (&f, "num_heads_upsample", -1);
      cfg->use_scale_shift_norm = flag_bool (&f, "use_scale_shift_norm", TRUE);
      cfg->resblock_updown = flag_bool (&f, "resblock_updown", FALSE);
      cfg->use_new_attention_order = flag_bool (&f, "use_new_attention_order", FALSE);
      GdDiffusionSettings settings = { .steps = flag_int (&f, "diffusion_steps", 1000) };
      gboolean sigma_small = flag_bool (&f, "sigma_small", FALSE);
      settings.variance = learn_sigma ? GD_VARIANCE_LEARNED_RANGE
                          : sigma_small ? GD_VARIANCE_FIXED_SMALL : GD_VARIANCE_FIXED_LARGE;
      const char *schedule = flag_string (&f, "noise_schedule", "linear");
      GError *local = NULL;
      if (f.ok && !gd_schedule_from_name (schedule, &settings.schedule, &local))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: %s", origin, local->message);
          g_error_free (local);
          f.ok = FALSE;
        }
      if (f.ok && settings.steps < 1)
        flag_bad (&f, "diffusion_steps", "positive");
      if (f.ok && diffusion_json)
        *diffusion_json = gd_diffusion_settings_to_json (&settings);
    }
  else if (f.ok)
    {
      cfg->model_channels = flag_int (&f, "classifier_width", 128);
      cfg->out_channels = 1000;
      cfg->num_res_blocks = flag_int (&f, "classifier_depth", 2);
      flag_channel_mult (&f, "", image_size, cfg);
      flag_attention (&f, "classifier_attention_resolutions", "32,16,8", image_size, cfg);
      cfg->num_head_channels = 64;
      cfg->use_scale_shift_norm = flag_bool (&f, "classifier_use_scale_shift_norm", TRUE);
      cfg->resblock_updown = flag_bool (&f, "classifier_resblock_updown", TRUE);
      const char *pool = flag_string (&f, "classifier_pool", "attention");
      if (strcmp (pool, "attention") == 0)
        cfg->pool = GD_POOL_ATTENTION;
      else if (strcmp (pool, "adaptive") == 0)
        cfg->pool = GD_POOL_ADAPTIVE;
      else
        flag_bad (&f, "classifier_pool", "'attention' or 'adaptive' (the pools this engine runs)");
    }
  if (!f.ok && diffusion_json)
    g_clear_pointer (diffusion_json, g_free);
  g_object_unref (parser);
  return f.ok;
}

/* ---- keys and shapes -> constructor arguments ---- */

typedef struct {
  GHashTable *by_name;        /* name -> const GdKeyShape* */
  const GdKeyShape *tensors;
  guint n;
  const char *origin;
} Keys;

static const GdKeyShape *
key (const Keys *k, const char *fmt, ...) G_GNUC_PRINTF (2, 3);

static const GdKeyShape *
key (const Keys *k, const char *fmt, ...)
{
  va_list ap;
  va_start (ap, fmt);
  char *name = g_strdup_vprintf (fmt, ap);
  va_end (ap);
  const GdKeyShape *e = g_hash_table_lookup (k->by_name, name);
  g_free (name);
  return e;
}

/* 1 + the largest block index among keys "PREFIX.<index>.", or 0. */
static int
count_blocks (const Keys *k, const char *prefix)
{
  size_t len = strlen (prefix);
  long count = 0;
  for (guint i = 0; i < k->n; i++)
    if (strncmp (k->tensors[i].name, prefix, len) == 0 && k->tensors[i].name[len] == '.')
      {
        char *end;
        long index = strtol (k->tensors[i].name + len + 1, &end, 10);
        if (end != k->tensors[i].name + len + 1 && *end == '.' && index >= 0 && index < 10000)
          count = MAX (count, index + 1);
      }
  return (int) count;
}

/* Whether the architecture of cfg has exactly these keys and shapes; else *why says the
 * first difference. */
static gboolean
same_architecture (const GdModelConfig *cfg, const Keys *k, char **why)
{
  GError *local = NULL;
  GdModel *model = gd_model_new (cfg, k->origin, &local);
  if (!model)
    {
      *why = g_strdup (local->message);
      g_error_free (local);
      return FALSE;
    }
  gboolean same = gd_model_n_params (model) == k->n;
  *why = NULL;
  for (guint i = 0; i < gd_model_n_params (model) && !*why; i++)
    {
      const GdParam *p = gd_model_param (model, i);
      const GdKeyShape *e = g_hash_table_lookup (k->by_name, p->name);
      gboolean shape_ok = e && e->ndim == p->ndim;
      for (int d = 0; shape_ok && d < p->ndim; d++)
        shape_ok = e->shape[d] == p->shape[d];
      if (!e)
        *why = g_strdup_printf ("no weight '%s'", p->name);
      else if (!shape_ok)
        {
          char *want = gd_shape_text (p->ndim, p->shape), *have = gd_shape_text (e->ndim, e->shape);
          *why = g_strdup_printf ("weight '%s' is %s, not %s", p->name, have, want);
          g_free (want);
          g_free (have);
        }
    }
  if (!same && !*why)
    for (guint i = 0; i < k->n && !*why; i++)
      if (!gd_model_find_param (model, k->tensors[i].name))
        *why = g_strdup_printf ("unexpected weight '%s'", k->tensors[i].name);
  gd_model_free (model);
  return !*why;
}

typedef struct {
  GdModelConfig cfg;
  gboolean image_size_known;
  gboolean has_attention;     /* attention layers or attention pooling: heads matter */
} Inferred;

static int64_t
dim (const GdKeyShape *e, int d)
{
  return e && d < e->ndim ? e->shape[d] : -1;
}

/* Channel and class counts far beyond any diffusion model are damage; they would also
 * overflow the architecture's int sizes. */
#define MAX_SIZE (1 << 20)

static int
size_dim (const GdKeyShape *e, int d)
{
  int64_t v = dim (e, d);
  return v >= 0 && v <= MAX_SIZE ? (int) v : -1;
}

/* The scripts' default channel_mult per image size, read backwards. */
static int
image_size_from_mult (const GdModelConfig *cfg)
{
  static const struct { int size; const char *mult; } defaults[] = {
    { 512, "0.5,1,1,2,2,4,4" }, { 256, "1,1,2,2,4,4" }, { 128, "1,1,2,3,4" }, { 64, "1,2,3,4" },
  };
  GString *text = g_string_new (NULL);
  for (int i = 0; i < cfg->n_levels; i++)
    g_string_append_printf (text, "%s%g", i ? "," : "", cfg->channel_mult[i]);
  int size = 0;
  for (guint i = 0; i < G_N_ELEMENTS (defaults) && !size; i++)
    if (strcmp (text->str, defaults[i].mult) == 0)
      size = defaults[i].size;
  g_string_free (text, TRUE);
  return size;
}

/* Tries num_res_blocks = r: input block 0 is the stem, then per level r residual blocks
 * and (but for the last level) one downsampling block. */
static gboolean
infer_with_blocks (const Keys *k, GdModelKind kind, int n_input, int r, Inferred *out, char **why)
{
  GdModelConfig *cfg = &out->cfg;
  int levels = n_input / (r + 1);
  const GdKeyShape *time0 = key (k, "time_embed.0.weight"), *stem = key (k, "input_blocks.0.0.weight");
  gd_model_config_init (cfg, kind);
  cfg->model_channels = size_dim (time0, 1);
  cfg->in_channels = size_dim (stem, 1);
  cfg->num_res_blocks = r;
  cfg->n_levels = levels;
  cfg->n_attention_resolutions = 0;
  out->has_attention = FALSE;
  if (levels < 1 || levels > GD_MAX_LEVELS || cfg->model_channels < 1 || cfg->in_channels < 1)
    return FALSE;
  int down_kind = -1;  /* 0 parameter-free pooling, 1 strided conv, 2 residual block */
  for (int level = 0; level < levels; level++)
    {
      int first = 1 + level * (r + 1);
      int64_t channels = size_dim (key (k, "input_blocks.%d.0.in_layers.2.weight", first), 0);
      gboolean attention = key (k, "input_blocks.%d.1.qkv.weight", first) != NULL;
      if (channels < 1)
        return FALSE;
      for (int j = 0; j < r; j++)
        if (dim (key (k, "input_blocks.%d.0.in_layers.2.weight", first + j), 0) != channels
            || (key (k, "input_blocks.%d.1.qkv.weight", first + j) != NULL) != attention)
          return FALSE;
      /* the builder truncates mult * model_channels: never let rounding lose a channel */
      cfg->channel_mult[level] = (double) channels / cfg->model_channels;
      while ((int64_t) (cfg->channel_mult[level] * cfg->model_channels) < channels)
        cfg->channel_mult[level] = nextafter (cfg->channel_mult[level], INFINITY);
      if (attention)
        {
          if (cfg->n_attention_resolutions >= GD_MAX_ATTENTION_RESOLUTIONS)
            return FALSE;
          cfg->attention_resolutions[cfg->n_attention_resolutions++] = 1 << level;
          out->has_attention = TRUE;
        }
      if (level == levels - 1)
        continue;
      int down = first + r;
      int kind_here = key (k, "input_blocks.%d.0.in_layers.0.weight", down) ? 2
                      : key (k, "input_blocks.%d.0.op.weight", down) ? 1 : 0;
      if (down_kind >= 0 && kind_here != down_kind)
        return FALSE;
      down_kind = kind_here;
    }
  cfg->resblock_updown = down_kind == 2;
  cfg->conv_resample = down_kind != 0;
  int64_t emb_out = dim (key (k, "input_blocks.1.0.emb_layers.1.weight"), 0);
  cfg->use_scale_shift_norm = emb_out == 2 * (int64_t) (cfg->channel_mult[0] * cfg->model_channels);
  if (kind == GD_MODEL_UNET)
    {
      cfg->out_channels = size_dim (key (k, "out.2.weight"), 0);
      const GdKeyShape *label = key (k, "label_emb.weight");
      cfg->num_classes = label ? size_dim (label, 0) : 0;
    }
  else if (key (k, "out.2.positional_embedding"))
    {
      cfg->pool = GD_POOL_ATTENTION;
      cfg->out_channels = size_dim (key (k, "out.2.c_proj.weight"), 0);
      out->has_attention = TRUE;
      /* positional_embedding: [channels, side^2 + 1] for a side x side final grid */
      int64_t tokens = dim (key (k, "out.2.positional_embedding"), 1) - 1;
      int64_t side = (int64_t) llround (sqrt ((double) MAX (tokens, 0)));
      if (tokens < 1 || side * side != tokens || side > (1 << 16))
        return FALSE;
      cfg->image_size = (int) (side << (levels - 1));
      out->image_size_known = TRUE;
    }
  else
    {
      cfg->pool = GD_POOL_ADAPTIVE;
      cfg->out_channels = size_dim (key (k, "out.3.weight"), 0);
    }
  if (!out->image_size_known)
    {
      cfg->image_size = image_size_from_mult (cfg);
      out->image_size_known = cfg->image_size > 0;
      if (!out->image_size_known)
        cfg->image_size = 1 << (levels - 1);
    }
  if (cfg->out_channels < 1 || cfg->num_classes < 0)
    return FALSE;
  /* heads do not change shapes: one head of any width builds the same weights */
  cfg->num_heads = 1;
  cfg->num_head_channels = cfg->pool == GD_POOL_ATTENTION && kind == GD_MODEL_CLASSIFIER ? 1 : -1;
  return same_architecture (cfg, k, why);
}

static gboolean
infer (const Keys *k, Inferred *out, GError **error)
{
  const GdKeyShape *time0 = key (k, "time_embed.0.weight"), *stem = key (k, "input_blocks.0.0.weight");
  if (!time0 || !stem || time0->ndim != 2 || stem->ndim != 4)
    {
      GString *first = g_string_new (NULL);
      for (guint i = 0; i < MIN (k->n, 3u); i++)
        {
          char *escaped = g_strescape (k->tensors[i].name, NULL);
          g_string_append_printf (first, "%s'%s'", i ? ", " : "", escaped);
          g_free (escaped);
        }
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                   "%s: a state_dict of %u tensors, but not a guided-diffusion U-Net or classifier "
                   "(it lacks time_embed.0.weight or input_blocks.0.0.weight; its first keys: %s)",
                   k->origin, k->n, k->n ? first->str : "none");
      g_string_free (first, TRUE);
      return FALSE;
    }
  GdModelKind kind = count_blocks (k, "output_blocks") > 0 ? GD_MODEL_UNET : GD_MODEL_CLASSIFIER;
  int n_input = count_blocks (k, "input_blocks");
  char *why = NULL;
  for (int r = 1; r < n_input; r++)
    {
      if (n_input % (r + 1) != 0)
        continue;
      char *reason = NULL;
      memset (out, 0, sizeof *out);
      if (infer_with_blocks (k, kind, n_input, r, out, &reason))
        {
          g_free (why);
          return TRUE;
        }
      /* the first layout whose blocks fit explains best what is wrong */
      if (!why)
        why = reason;
      else
        g_free (reason);
    }
  g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
               "%s: a state_dict with guided-diffusion names, but no %s architecture fits its "
               "%u tensors%s%s", k->origin, kind == GD_MODEL_UNET ? "U-Net" : "classifier", k->n,
               why ? ": " : "", why ? why : "");
  g_free (why);
  return FALSE;
}

static gboolean
same_shapes (const GdModelConfig *a, const GdModelConfig *b, gboolean compare_image_size)
{
  if (a->kind != b->kind || a->in_channels != b->in_channels
      || a->model_channels != b->model_channels || a->out_channels != b->out_channels
      || a->num_res_blocks != b->num_res_blocks || a->n_levels != b->n_levels
      || a->n_attention_resolutions != b->n_attention_resolutions
      || a->use_scale_shift_norm != b->use_scale_shift_norm
      || a->resblock_updown != b->resblock_updown
      || (!a->resblock_updown && a->conv_resample != b->conv_resample)
      || (a->kind == GD_MODEL_UNET && a->num_classes != b->num_classes)
      || (a->kind == GD_MODEL_CLASSIFIER && a->pool != b->pool)
      || (compare_image_size && a->image_size != b->image_size))
    return FALSE;
  for (int i = 0; i < a->n_levels; i++)
    if (a->channel_mult[i] != b->channel_mult[i])
      return FALSE;
  for (int i = 0; i < a->n_attention_resolutions; i++)
    {
      gboolean found = FALSE;
      for (int j = 0; j < b->n_attention_resolutions; j++)
        found |= a->attention_resolutions[i] == b->attention_resolutions[j];
      if (!found)
        return FALSE;
    }
  return TRUE;
}

static gboolean
release_config (const GdRelease *r, GdModelConfig *cfg, char **diffusion, const char *origin,
                GError **error)
{
  /* the diffusion flags of a release are not model flags: add them for the conversion */
  char *flags = gd_release_flags_json (r);
  if (r->kind == GD_MODEL_UNET)
    {
      char *with_diffusion = g_strdup_printf ("%.*s, \"diffusion_steps\": 1000, \"noise_schedule\": \"%s\"}",
                                              (int) strlen (flags) - 1, flags, r->noise_schedule);
      g_free (flags);
      flags = with_diffusion;
    }
  gboolean ok = gd_flags_to_config (flags, r->kind, origin, cfg, diffusion, error);
  g_free (flags);
  return ok;
}

/* The releases whose shapes are these; ties broken by the file name. */
static const GdRelease *
match_release (const Inferred *inferred, const char *file_name)
{
  const GdRelease *match = NULL;
  char *lower = file_name ? g_ascii_strdown (file_name, -1) : NULL;
  for (guint i = 0; i < G_N_ELEMENTS (releases); i++)
    {
      GdModelConfig cfg;
      if (releases[i].kind != inferred->cfg.kind
          || !release_config (&releases[i], &cfg, NULL, "release", NULL)
          || !same_shapes (&inferred->cfg, &cfg, inferred->image_size_known))
        continue;
      if (!match || (lower && releases[i].file_hint && strstr (lower, releases[i].file_hint)
                     && !(match->file_hint && strstr (lower, match->file_hint))))
        match = &releases[i];
    }
  g_free (lower);
  return match;
}

static char *
describe (const GdModelConfig *cfg)
{
  GString *s = g_string_new (NULL);
  g_string_append_printf (s, "%s, model_channels %d, channel_mult ",
                          cfg->kind == GD_MODEL_UNET ? "U-Net" : "classifier", cfg->model_channels);
  for (int i = 0; i < cfg->n_levels; i++)
    g_string_append_printf (s, "%s%g", i ? "," : "", cfg->channel_mult[i]);
  g_string_append_printf (s, ", num_res_blocks %d", cfg->num_res_blocks);
  return g_string_free (s, FALSE);
}

/* Splits an override into constructor arguments (returned as JSON text, NULL if none)
 * and the members this module reads itself. */
static gboolean
split_override (const char *override_json, const char *origin, GdRecognition *result,
                char **release_name, char **args_json, gboolean *sets_image_size,
                GdModelKind *kind, gboolean *has_kind, GError **error)
{
  JsonParser *parser = json_parser_new ();
  JsonObject *obj = parse_object (override_json, parser, origin, "the configuration override", error);
  gboolean ok = obj != NULL;
  JsonBuilder *args = json_builder_new ();
  json_builder_begin_object (args);
  guint n_args = 0;
  GList *members = ok ? json_object_get_members (obj) : NULL;
  for (GList *l = members; l && ok; l = l->next)
    {
      const char *name = l->data;
      JsonNode *v = json_object_get_member (obj, name);
      gboolean is_string = JSON_NODE_HOLDS_VALUE (v) && json_node_get_value_type (v) == G_TYPE_STRING;
      if (strcmp (name, "kind") == 0)
        {
          const char *text = is_string ? json_node_get_string (v) : "";
          *has_kind = TRUE;
          if (strcmp (text, "unet") == 0)
            *kind = GD_MODEL_UNET;
          else if (strcmp (text, "classifier") == 0)
            *kind = GD_MODEL_CLASSIFIER;
          else
            ok = FALSE;
        }
      else if (strcmp (name, "release") == 0 && is_string)
        *release_name = g_strdup (json_node_get_string (v));
      else if (strcmp (name, "labels") == 0 && is_string)
        {
          g_free (result->labels);
          result->labels = g_strdup (json_node_get_string (v));
        }
      else if (strcmp (name, "diffusion") == 0 && JSON_NODE_HOLDS_OBJECT (v))
        {
          g_free (result->diffusion_json);
          result->diffusion_json = json_to_string (v, FALSE);
        }
      else if (strcmp (name, "kind") != 0 && strcmp (name, "release") != 0
               && strcmp (name, "labels") != 0 && strcmp (name, "diffusion") != 0)
        {
          json_builder_set_member_name (args, name);
          json_builder_add_value (args, json_node_copy (v));
          n_args++;
          *sets_image_size |= strcmp (name, "image_size") == 0;
        }
      else
        ok = FALSE;
      if (!ok)
        g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                     "%s: override member '%s' has the wrong type (kind: \"unet\" or \"classifier\"; "
                     "release, labels: strings; diffusion: an object)", origin, name);
    }
  g_list_free (members);
  json_builder_end_object (args);
  char *text = builder_to_text (args);
  if (ok && n_args)
    *args_json = text;
  else
    g_free (text);
  g_object_unref (parser);
  return ok;
}

gboolean
gd_recognize (const GdKeyShape *tensors, guint n, const char *override_json,
              const char *file_name, const char *origin, GdRecognition *result, GError **error)
{
  memset (result, 0, sizeof *result);
  Keys k = { .tensors = tensors, .n = n, .origin = origin,
             .by_name = g_hash_table_new (g_str_hash, g_str_equal) };
  for (guint i = 0; i < n; i++)
    g_hash_table_insert (k.by_name, (gpointer) tensors[i].name, (gpointer) &tensors[i]);
  Inferred inferred;
  char *release_name = NULL, *args = NULL;
  gboolean sets_image_size = FALSE, has_kind = FALSE;
  GdModelKind override_kind = GD_MODEL_UNET;
  gboolean ok = infer (&k, &inferred, error);
  if (ok && override_json)
    ok = split_override (override_json, origin, result, &release_name, &args, &sets_image_size,
                         &override_kind, &has_kind, error);
  if (ok && has_kind && override_kind != inferred.cfg.kind)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: the override says %s, the weights are a %s",
                   origin, override_kind == GD_MODEL_UNET ? "unet" : "classifier",
                   inferred.cfg.kind == GD_MODEL_UNET ? "U-Net" : "classifier");
      ok = FALSE;
    }
  const GdRelease *release = NULL;
  if (ok && release_name)
    {
      GdModelConfig cfg;
      release = gd_release_find (release_name);
      if (!release || release->kind != inferred.cfg.kind
          || !release_config (release, &cfg, NULL, origin, NULL)
          || !same_shapes (&inferred.cfg, &cfg, inferred.image_size_known))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: the weights are not those of a "
                       "release named '%s'", origin, release_name);
          ok = FALSE;
        }
    }
  else if (ok)
    release = match_release (&inferred, file_name);

  if (ok && release)
    {
      char *diffusion = NULL;
      ok = release_config (release, &result->config, &diffusion, origin, error);
      result->release = release;
      if (!result->diffusion_json)
        result->diffusion_json = diffusion;
      else
        g_free (diffusion);
      if (!result->labels && release->labels)
        result->labels = g_strdup (release->labels);
    }
  else if (ok)
    {
      /* not a release: what shapes leave open takes the constructor defaults, unless the
       * override is silent about something that matters */
      GdModelConfig defaults;
      gd_model_config_init (&defaults, inferred.cfg.kind);
      result->config = inferred.cfg;
      result->config.num_heads = defaults.num_heads;
      result->config.num_head_channels = defaults.num_head_channels;
      result->config.num_heads_upsample = defaults.num_heads_upsample;
      result->config.use_new_attention_order = defaults.use_new_attention_order;
      if (args)
        ok = gd_model_config_parse (&result->config, args, origin, error);
      gboolean heads_missing = inferred.has_attention && !override_json;
      gboolean size_missing = !inferred.image_size_known && !sets_image_size;
      if (ok && (heads_missing || size_missing))
        {
          char *what = describe (&inferred.cfg);
          g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                       "%s: a guided-diffusion %s, but not one of the released models; its weights "
                       "do not tell %s%s%s: give %s with --config (see docs/checkpoints.md)",
                       origin, what,
                       heads_missing ? "the attention heads and their order" : "",
                       heads_missing && size_missing ? " or " : "",
                       size_missing ? "the image size" : "",
                       heads_missing && size_missing
                         ? "num_heads or num_head_channels, use_new_attention_order and image_size"
                         : heads_missing ? "num_heads or num_head_channels and use_new_attention_order"
                         : "image_size");
          g_free (what);
          ok = FALSE;
        }
    }
  if (ok && release && args)
    ok = gd_model_config_parse (&result->config, args, origin, error);
  g_free (args);
  g_free (release_name);
  g_hash_table_unref (k.by_name);
  if (!ok)
    gd_recognition_clear (result);
  return ok;
}

void
gd_recognition_clear (GdRecognition *result)
{
  g_clear_pointer (&result->diffusion_json, g_free);
  g_clear_pointer (&result->labels, g_free);
  result->release = NULL;
}
