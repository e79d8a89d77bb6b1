#include "gd-trainer.h"
#include "gd-error.h"
#include "gd-random.h"
#include "gd-safetensors.h"

#include <json-glib/json-glib.h>
#include <string.h>

/* Random streams of the trainer; each number depends only on (seed, stream, position in
 * the sequence of training samples), so a resumed run draws what an unbroken one would. */
#define STREAM_PERMUTATION (1ull << 40)
#define STREAM_FLIP (2ull << 40)
#define STREAM_TIMESTEP (3ull << 40)
#define STREAM_NOISE (1ull << 48)

static gboolean
config_error (GError **error, const char *origin, const char *what)
{
  g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: training config: %s", origin, what);
  return FALSE;
}

gboolean
gd_train_config_parse (GdTrainConfig *cfg, const char *json, const char *origin, GError **error)
{
  JsonParser *parser = json_parser_new ();
  GError *local = NULL;
  gboolean ok = FALSE;
  if (!json_parser_load_from_data (parser, json, -1, &local))
    {
      char *why = g_strdup_printf ("malformed JSON: %s", local->message);
      config_error (error, origin, why);
      g_free (why);
      g_error_free (local);
      goto out;
    }
  JsonNode *root = json_parser_get_root (parser);
  if (!root || !JSON_NODE_HOLDS_OBJECT (root))
    {
      config_error (error, origin, "not a JSON object");
      goto out;
    }
  JsonObject *obj = json_node_get_object (root);
  const char *kind = json_object_get_string_member_with_default (obj, "kind", "");
  GdModelKind model_kind;
  if (strcmp (kind, "unet") == 0)
    model_kind = GD_MODEL_UNET;
  else if (strcmp (kind, "classifier") == 0)
    model_kind = GD_MODEL_CLASSIFIER;
  else
    {
      config_error (error, origin, "\"kind\" must be \"unet\" or \"classifier\"");
      goto out;
    }
  memset (cfg, 0, sizeof *cfg);
  gd_model_config_init (&cfg->model, model_kind);
  JsonNode *model = json_object_get_member (obj, "model");
  if (!model || !JSON_NODE_HOLDS_OBJECT (model))
    {
      config_error (error, origin, "\"model\" must be an object of constructor arguments");
      goto out;
    }
  char *model_json = json_to_string (model, FALSE);
  gboolean model_ok = gd_model_config_parse (&cfg->model, model_json, origin, error);
  g_free (model_json);
  if (!model_ok)
    goto out;

  cfg->diffusion.schedule = GD_SCHEDULE_LINEAR;
  cfg->diffusion.steps = 1000;
  gboolean learn_sigma = cfg->model.out_channels == 2 * cfg->model.in_channels, sigma_small = FALSE;
  JsonNode *diffusion = json_object_get_member (obj, "diffusion");
  if (diffusion && JSON_NODE_HOLDS_OBJECT (diffusion))
    {
      JsonObject *d = json_node_get_object (diffusion);
      cfg->diffusion.steps = (int) json_object_get_int_member_with_default (d, "diffusion_steps", 1000);
      learn_sigma = json_object_get_boolean_member_with_default (d, "learn_sigma", learn_sigma);
      sigma_small = json_object_get_boolean_member_with_default (d, "sigma_small", FALSE);
      const char *schedule = json_object_get_string_member_with_default (d, "noise_schedule", "linear");
      if (!gd_schedule_from_name (schedule, &cfg->diffusion.schedule, &local))
        {
          config_error (error, origin, local->message);
          g_error_free (local);
          goto out;
        }
    }
  cfg->diffusion.variance = learn_sigma ? GD_VARIANCE_LEARNED_RANGE
                            : sigma_small ? GD_VARIANCE_FIXED_SMALL : GD_VARIANCE_FIXED_LARGE;
  cfg->batch_size = (int) json_object_get_int_member_with_default (obj, "batch_size", 32);
  cfg->steps = json_object_get_int_member_with_default (obj, "steps", 10000);
  cfg->seed = (guint64) json_object_get_int_member_with_default (obj, "seed", 0);
  cfg->optim.lr = json_object_get_double_member_with_default (obj, "lr", 1e-4);
  cfg->optim.beta1 = 0.9;
  cfg->optim.beta2 = 0.999;
  cfg->optim.eps = 1e-8;
  cfg->optim.weight_decay = json_object_get_double_member_with_default (obj, "weight_decay", 0.0);
  cfg->optim.ema_rate = json_object_get_double_member_with_default (obj, "ema_rate", 0.9999);
  cfg->optim.grad_clip = json_object_get_double_member_with_default (obj, "grad_clip", 1.0);
  cfg->optim.warmup_steps = (int) json_object_get_int_member_with_default (obj, "warmup_steps", 0);
  cfg->optim.decay_steps = json_object_get_int_member_with_default (obj, "lr_decay_steps", 0);
  cfg->flip = json_object_get_boolean_member_with_default (obj, "flip", FALSE);
  cfg->noised = json_object_get_boolean_member_with_default (obj, "noised", TRUE);
  cfg->checkpoint_minutes = json_object_get_double_member_with_default (obj, "checkpoint_minutes", 5.0);
  if (cfg->batch_size < 1 || cfg->batch_size > 4096)
    config_error (error, origin, "batch_size must be 1 to 4096");
  else if (cfg->steps < 1)
    config_error (error, origin, "steps must be positive");
  else if (!(cfg->optim.lr > 0) || cfg->optim.weight_decay < 0 || cfg->optim.grad_clip < 0
           || !(cfg->optim.ema_rate >= 0 && cfg->optim.ema_rate < 1) || cfg->optim.warmup_steps < 0)
    config_error (error, origin, "lr must be positive, weight_decay, grad_clip and warmup_steps "
                  "not negative, ema_rate in [0, 1)");
  else if (cfg->optim.decay_steps < 0)
    config_error (error, origin, "lr_decay_steps must not be negative");
  else if (!(cfg->checkpoint_minutes > 0))
    config_error (error, origin, "checkpoint_minutes must be positive");
  else
    ok = TRUE;
out:
  g_object_unref (parser);
  return ok;
}

char *
gd_train_config_to_json (const GdTrainConfig *cfg)
{
  char *model = gd_model_config_to_json (&cfg->model);
  char *diffusion = gd_diffusion_settings_to_json (&cfg->diffusion);
  char *text = g_strdup_printf (
      "{\"kind\": \"%s\", \"model\": %s, \"diffusion\": %s, \"batch_size\": %d, "
      "\"steps\": %" G_GINT64_FORMAT ", \"seed\": %" G_GUINT64_FORMAT ", \"lr\": %.17g, "
      "\"weight_decay\": %.17g, \"ema_rate\": %.17g, \"grad_clip\": %.17g, \"warmup_steps\": %d, "
      "\"lr_decay_steps\": %" G_GINT64_FORMAT ", \"flip\": %s, \"noised\": %s, "
      "\"checkpoint_minutes\": %.17g}",
      cfg->model.kind == GD_MODEL_UNET ? "unet" : "classifier", model, diffusion, cfg->batch_size,
      cfg->steps, cfg->seed, cfg->optim.lr, cfg->optim.weight_decay, cfg->optim.ema_rate,
      cfg->optim.grad_clip, cfg->optim.warmup_steps, cfg->optim.decay_steps,
      cfg->flip ? "true" : "false",
      cfg->noised ? "true" : "false", cfg->checkpoint_minutes);
  g_free (model);
  g_free (diffusion);
  return text;
}

struct GdTrainer {
  GdTrainConfig cfg;
  const GdDataset *data;
  GdModel *model;
  GdDiffusion *diffusion;
  GdOptimizer *optimizer;
  int *permutation;
  gint64 permutation_epoch;
  float *batch, *noise;
  int64_t *t, *y;
  /* training time: seconds of earlier runs (from the checkpoint), counted from step
   * timed_from (a checkpoint without the record starts the count at its step) */
  double seconds_before;
  gint64 timed_from, started;
};

/* Training time so far as metadata: "training_seconds" and, when it does not cover every
 * step, "training_seconds_from_step". */
static void
set_time_metadata (GdTrainer *tr, GdStWriter *w)
{
  double seconds = tr->seconds_before + (g_get_monotonic_time () - tr->started) / 1e6;
  char text[64];
  g_snprintf (text, sizeof text, "%.0f", seconds);
  gd_st_writer_set_metadata (w, "training_seconds", text);
  if (tr->timed_from > 0)
    {
      g_snprintf (text, sizeof text, "%" G_GINT64_FORMAT, tr->timed_from);
      gd_st_writer_set_metadata (w, "training_seconds_from_step", text);
    }
}

GdModel *gd_trainer_get_model (GdTrainer *tr) { return tr->model; }
gint64 gd_trainer_get_step (const GdTrainer *tr) { return gd_optimizer_get_step (tr->optimizer); }

GdTrainer *
gd_trainer_new (const GdTrainConfig *cfg, const GdDataset *data, GError **error)
{
  const GdModelConfig *mc = &cfg->model;
  int classes = mc->kind == GD_MODEL_CLASSIFIER ? mc->out_channels : mc->num_classes;
  if (data->count < 1)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "the data set is empty");
      return NULL;
    }
  if (data->channels != mc->in_channels || data->height != mc->image_size || data->width != mc->image_size)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "the data set holds %d-channel %dx%d images; the model takes %d channels at %dx%d",
                   data->channels, data->width, data->height, mc->in_channels, mc->image_size,
                   mc->image_size);
      return NULL;
    }
  if (mc->kind == GD_MODEL_UNET && mc->out_channels != mc->in_channels
      && mc->out_channels != 2 * mc->in_channels)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "a U-Net needs out_channels = in_channels "
                   "(fixed variance) or 2 * in_channels (learned sigma)");
      return NULL;
    }
  if (classes > 0)
    for (int i = 0; i < data->count; i++)
      if (data->labels[i] < 0 || data->labels[i] >= classes)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "image %d has label %" G_GINT64_FORMAT " but the model has %d classes", i,
                       data->labels[i], classes);
          return NULL;
        }
  GdModel *model = gd_model_new (mc, "training", error);
  if (!model)
    return NULL;
  GdDiffusion *diffusion = gd_diffusion_new (cfg->diffusion.schedule, cfg->diffusion.steps, "",
                                             cfg->diffusion.variance, error);
  if (!diffusion)
    {
      gd_model_free (model);
      return NULL;
    }
  GdTrainer *tr = g_new0 (GdTrainer, 1);
  tr->started = g_get_monotonic_time ();
  tr->cfg = *cfg;
  tr->data = data;
  tr->model = model;
  tr->diffusion = diffusion;
  gd_model_init_training (model, cfg->seed);
  GdOptimSettings settings = cfg->optim;
  settings.total_steps = cfg->steps;
  tr->optimizer = gd_optimizer_new (model, &settings);
  tr->permutation = g_new (int, data->count);
  tr->permutation_epoch = -1;
  size_t per_image = (size_t) data->channels * data->height * data->width;
  tr->batch = g_new (float, cfg->batch_size * per_image);
  tr->noise = g_new (float, cfg->batch_size * per_image);
  tr->t = g_new (int64_t, cfg->batch_size);
  tr->y = g_new (int64_t, cfg->batch_size);
  return tr;
}

void
gd_trainer_free (GdTrainer *tr)
{
  if (!tr)
    return;
  gd_optimizer_free (tr->optimizer);
  gd_model_free (tr->model);
  gd_diffusion_free (tr->diffusion);
  g_free (tr->permutation);
  g_free (tr->batch);
  g_free (tr->noise);
  g_free (tr->t);
  g_free (tr->y);
  g_free (tr);
}

static uint64_t
random_u64 (uint64_t seed, uint64_t stream, uint64_t index)
{
  uint32_t r[4];
  gd_philox (seed, stream, index, r);
  return (uint64_t) r[0] << 32 | r[1];
}

/* Each epoch visits the images in its own random order (Fisher-Yates). */
static int
image_at (GdTrainer *tr, gint64 position)
{
  int count = tr->data->count;
  gint64 epoch = position / count;
  if (epoch != tr->permutation_epoch)
    {
      for (int i = 0; i < count; i++)
        tr->permutation[i] = i;
      for (int i = count - 1; i > 0; i--)
        {
          int j = (int) (random_u64 (tr->cfg.seed, STREAM_PERMUTATION + (uint64_t) epoch, (uint64_t) i)
                         % (uint64_t) (i + 1));
          int swap = tr->permutation[i];
          tr->permutation[i] = tr->permutation[j];
          tr->permutation[j] = swap;
        }
      tr->permutation_epoch = epoch;
    }
  return tr->permutation[position % count];
}

gboolean
gd_trainer_step (GdTrainer *tr, double *loss, GError **error)
{
  const GdDataset *data = tr->data;
  int B = tr->cfg.batch_size, h = data->height, w = data->width, c = data->channels;
  size_t per_image = (size_t) c * h * w;
  gint64 step = gd_optimizer_get_step (tr->optimizer);
  for (int i = 0; i < B; i++)
    {
      uint64_t position = (uint64_t) step * B + i;
      int index = image_at (tr, (gint64) position);
      const float *src = data->images + (size_t) index * per_image;
      float *dst = tr->batch + i * per_image;
      gboolean flip = tr->cfg.flip && (random_u64 (tr->cfg.seed, STREAM_FLIP, position) & 1);
      for (int ch = 0; ch < c; ch++)
        for (int yy = 0; yy < h; yy++)
          for (int xx = 0; xx < w; xx++)
            dst[((size_t) ch * h + yy) * w + xx] = src[((size_t) ch * h + yy) * w + (flip ? w - 1 - xx : xx)];
      tr->y[i] = data->labels[index];
      tr->t[i] = (int64_t) (random_u64 (tr->cfg.seed, STREAM_TIMESTEP, position)
                            % (uint64_t) tr->diffusion->num_steps);
      gd_random_normal (tr->cfg.seed, STREAM_NOISE + position, tr->noise + i * per_image, per_image);
    }
  gboolean ok;
  if (tr->cfg.model.kind == GD_MODEL_UNET)
    ok = gd_train_diffusion_loss (tr->model, tr->diffusion, tr->batch, tr->noise, tr->t,
                                  tr->cfg.model.num_classes > 0 ? tr->y : NULL, B, NULL, loss, error);
  else
    {
      if (!tr->cfg.noised)
        memset (tr->t, 0, sizeof (int64_t) * B);
      ok = gd_train_classifier_loss (tr->model, tr->diffusion, tr->batch,
                                     tr->cfg.noised ? tr->noise : NULL, tr->t, tr->y, B, NULL,
                                     NULL, loss, error);
    }
  if (ok)
    gd_optimizer_step (tr->optimizer);
  return ok;
}

static const char *const checkpoint_prefixes[] = { "param.", "ema.", "adam_m.", "adam_v." };

static float *
checkpoint_slot (GdTrainer *tr, guint i, int which)
{
  switch (which)
    {
    case 0: return gd_model_param (tr->model, i)->data;
    case 1: return gd_optimizer_ema (tr->optimizer, i);
    case 2: return gd_optimizer_moment (tr->optimizer, i, 0);
    default: return gd_optimizer_moment (tr->optimizer, i, 1);
    }
}

gboolean
gd_trainer_save_checkpoint (GdTrainer *tr, const char *path, GError **error)
{
  GdStWriter *w = gd_st_writer_new ();
  char *config = gd_train_config_to_json (&tr->cfg);
  char *step = g_strdup_printf ("%" G_GINT64_FORMAT, gd_optimizer_get_step (tr->optimizer));
  gd_st_writer_set_metadata (w, "kind", "training-checkpoint");
  gd_st_writer_set_metadata (w, "training", config);
  gd_st_writer_set_metadata (w, "step", step);
  set_time_metadata (tr, w);
  for (int which = 0; which < 4; which++)
    for (guint i = 0; i < gd_model_n_params (tr->model); i++)
      {
        GdParam *p = gd_model_param (tr->model, i);
        char *name = g_strconcat (checkpoint_prefixes[which], p->name, NULL);
        gd_st_writer_add (w, name, GD_DTYPE_F32, p->ndim, p->shape, checkpoint_slot (tr, i, which));
        g_free (name);
      }
  gboolean ok = gd_st_writer_write (w, path, error);
  gd_st_writer_free (w);
  g_free (config);
  g_free (step);
  return ok;
}

gboolean
gd_trainer_load_checkpoint (GdTrainer *tr, const char *path, GError **error)
{
  GdSafetensors *st = gd_safetensors_open (path, error);
  if (!st)
    return FALSE;
  gboolean ok = FALSE;
  char *config = gd_train_config_to_json (&tr->cfg);
  const char *saved = gd_safetensors_metadata (st, "training");
  const char *step_text = gd_safetensors_metadata (st, "step");
  if (g_strcmp0 (gd_safetensors_metadata (st, "kind"), "training-checkpoint") != 0 || !saved || !step_text)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: not a training checkpoint", path);
      goto out;
    }
  /* the number of steps may grow on resume; everything else must match */
  GdTrainConfig other;
  if (!gd_train_config_parse (&other, saved, path, error))
    goto out;
  other.steps = tr->cfg.steps;
  /* so may the learning-rate decay at the end (a run extended and then annealed) */
  other.optim.decay_steps = tr->cfg.optim.decay_steps;
  other.checkpoint_minutes = tr->cfg.checkpoint_minutes;
  char *other_json = gd_train_config_to_json (&other);
  gboolean same = strcmp (other_json, config) == 0;
  g_free (other_json);
  if (!same)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                   "%s: written with another training configuration: %s", path, saved);
      goto out;
    }
  for (int which = 0; which < 4; which++)
    for (guint i = 0; i < gd_model_n_params (tr->model); i++)
      {
        GdParam *p = gd_model_param (tr->model, i);
        char *name = g_strconcat (checkpoint_prefixes[which], p->name, NULL);
        const GdStTensor *t = gd_safetensors_find (st, name);
        gboolean fits = t && t->dtype == GD_DTYPE_F32 && t->numel == (gint64) p->numel;
        if (!fits)
          g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS, "%s: missing or misshapen '%s'", path, name);
        else
          memcpy (checkpoint_slot (tr, i, which), t->data, sizeof (float) * p->numel);
        g_free (name);
        if (!fits)
          goto out;
      }
  gd_optimizer_set_step (tr->optimizer, g_ascii_strtoll (step_text, NULL, 10));
  const char *seconds = gd_safetensors_metadata (st, "training_seconds");
  const char *from = gd_safetensors_metadata (st, "training_seconds_from_step");
  tr->seconds_before = seconds ? g_ascii_strtod (seconds, NULL) : 0.0;
  tr->timed_from = seconds ? (from ? g_ascii_strtoll (from, NULL, 10) : 0)
                           : g_ascii_strtoll (step_text, NULL, 10);
  tr->started = g_get_monotonic_time ();
  ok = TRUE;
out:
  g_free (config);
  gd_safetensors_free (st);
  return ok;
}

gboolean
gd_trainer_save_model (GdTrainer *tr, const char *path, GError **error)
{
  GdStWriter *w = gd_st_writer_new ();
  char *config = gd_model_config_to_json (&tr->cfg.model);
  char *training = gd_train_config_to_json (&tr->cfg);
  gd_st_writer_set_metadata (w, "kind", tr->cfg.model.kind == GD_MODEL_UNET ? "unet" : "classifier");
  gd_st_writer_set_metadata (w, "config", config);
  if (tr->cfg.model.kind == GD_MODEL_UNET)
    {
      char *diffusion = gd_diffusion_settings_to_json (&tr->cfg.diffusion);
      gd_st_writer_set_metadata (w, "diffusion", diffusion);
      g_free (diffusion);
    }
  if (tr->data->label_names)
    {
      JsonBuilder *b = json_builder_new ();
      json_builder_begin_array (b);
      for (guint i = 0; i < tr->data->label_names->len; i++)
        json_builder_add_string_value (b, tr->data->label_names->pdata[i]);
      json_builder_end_array (b);
      JsonNode *root = json_builder_get_root (b);
      char *labels = json_to_string (root, FALSE);
      gd_st_writer_set_metadata (w, "labels", labels);
      g_free (labels);
      json_node_unref (root);
      g_object_unref (b);
    }
  gd_st_writer_set_metadata (w, "training", training);
  char *step = g_strdup_printf ("%" G_GINT64_FORMAT, gd_optimizer_get_step (tr->optimizer));
  gd_st_writer_set_metadata (w, "training_steps", step);
  set_time_metadata (tr, w);
  for (guint i = 0; i < gd_model_n_params (tr->model); i++)
    {
      GdParam *p = gd_model_param (tr->model, i);
      gd_st_writer_add (w, p->name, GD_DTYPE_F32, p->ndim, p->shape, gd_optimizer_ema (tr->optimizer, i));
    }
  gboolean ok = gd_st_writer_write (w, path, error);
  gd_st_writer_free (w);
  g_free (config);
  g_free (training);
  g_free (step);
  return ok;
}
