/* guided sample: classifier-guided image generation (Dhariwal & Nichol 2021,
 * Algorithms 1 and 2), and --replay of the reference's recorded sampling runs. */
#include "guided.h"
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-png.h"
#include "gd-safetensors.h"
#include "gd-sampler.h"

#include <json-glib/json-glib.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef struct {
  /* replay: recorded noise per iteration, and the trace being collected */
  const float *recorded_noise;
  size_t per_step;
  int recorded_steps;
  float *trace_samples, *trace_pred_xstart;
  /* progress */
  gboolean show_progress;
  gint64 start_time;
} RunState;

static void
replay_noise (void *user, int iteration, float *noise, size_t count)
{
  RunState *state = user;
  g_assert (iteration < state->recorded_steps && count == state->per_step);
  memcpy (noise, state->recorded_noise + (size_t) iteration * count, sizeof (float) * count);
}

static void
record_trace (void *user, int iteration, const float *sample, const float *pred_xstart)
{
  RunState *state = user;
  memcpy (state->trace_samples + (size_t) iteration * state->per_step, sample,
          sizeof (float) * state->per_step);
  memcpy (state->trace_pred_xstart + (size_t) iteration * state->per_step, pred_xstart,
          sizeof (float) * state->per_step);
}

/* A progress bar on stderr: steps done, elapsed and estimated time left. */
static gboolean
show_progress (void *user, int done, int total)
{
  RunState *state = user;
  if (!state->show_progress)
    return TRUE;
  double elapsed = (g_get_monotonic_time () - state->start_time) / 1e6;
  double left = done > 0 ? elapsed / done * (total - done) : 0.0;
  const int width = 30;
  int filled = total > 0 ? done * width / total : width;
  char bar[64];
  for (int i = 0; i < width; i++)
    bar[i] = i < filled ? '#' : '.';
  bar[width] = '\0';
  fprintf (stderr, "\rstep %d/%d [%s] %.1f s, %.1f s left ", done, total, bar, elapsed, left);
  if (done == total)
    fputc ('\n', stderr);
  fflush (stderr);
  return TRUE;
}

/* ---- replay of a recorded reference run ---- */

static JsonObject *
read_json_object (const char *path, JsonParser **parser, GError **error)
{
  *parser = json_parser_new ();
  GError *local = NULL;
  if (!json_parser_load_from_file (*parser, path, &local))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: %s", path, local->message);
      g_error_free (local);
      return NULL;
    }
  JsonNode *root = json_parser_get_root (*parser);
  if (!root || !JSON_NODE_HOLDS_OBJECT (root))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: not a JSON object", path);
      return NULL;
    }
  return json_node_get_object (root);
}

static int
replay (const char *dir, const char *trace_path, const char *png_path, GError **error)
{
  char *config_path = g_build_filename (dir, "config.json", NULL);
  char *io_path = g_build_filename (dir, "io.safetensors", NULL);
  char *parent = g_path_get_dirname (dir), *root = g_path_get_dirname (parent);
  JsonParser *parser = NULL;
  GdSafetensors *io = NULL;
  GdModel *model = NULL, *classifier = NULL;
  GdDiffusion *diffusion = NULL;
  float *x = NULL, *noise = NULL;
  int64_t *labels = NULL;
  RunState state = { 0 };
  int status = 1;

  JsonObject *cfg = read_json_object (config_path, &parser, error);
  if (!cfg)
    goto out;
  io = gd_safetensors_open (io_path, error);
  if (!io)
    goto out;
  char *model_path = g_build_filename (root, json_object_get_string_member (cfg, "model"),
                                       "model.safetensors", NULL);
  model = gd_model_load (model_path, error);
  g_free (model_path);
  if (!model)
    goto out;
  JsonNode *classifier_node = json_object_get_member (cfg, "classifier");
  if (classifier_node && !JSON_NODE_HOLDS_NULL (classifier_node))
    {
      char *path = g_build_filename (root, json_node_get_string (classifier_node),
                                     "model.safetensors", NULL);
      classifier = gd_model_load (path, error);
      g_free (path);
      if (!classifier)
        goto out;
    }
  GdScheduleKind schedule;
  if (!gd_schedule_from_name (json_object_get_string_member (cfg, "noise_schedule"), &schedule, error))
    goto out;
  GdSampleOptions o = { 0 };
  if (!gd_sampler_from_name (json_object_get_string_member (cfg, "sampler"), &o.settings.sampler, error))
    goto out;
  GdVarianceKind variance = json_object_get_boolean_member (cfg, "learn_sigma")
                            ? GD_VARIANCE_LEARNED_RANGE : GD_VARIANCE_FIXED_LARGE;
  diffusion = gd_diffusion_new (schedule, (int) json_object_get_int_member (cfg, "diffusion_steps"),
                                json_object_get_string_member (cfg, "timestep_respacing"),
                                variance, error);
  if (!diffusion)
    goto out;

  const GdStTensor *xt = gd_safetensors_find (io, "x_T"), *nt = gd_safetensors_find (io, "noise");
  const GdStTensor *yt = gd_safetensors_find (io, "y");
  if (!xt || xt->ndim != 4 || !nt || nt->ndim != 5 || nt->shape[0] != diffusion->num_steps)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT,
                   "%s: needs x_T [N, C, H, W] and noise [%d, N, C, H, W]", io_path,
                   diffusion->num_steps);
      goto out;
    }
  int n = (int) xt->shape[0], c = (int) xt->shape[1], h = (int) xt->shape[2], w = (int) xt->shape[3];
  if (yt && !gd_st_tensor_to_i64 (yt, &labels, error))
    {
      g_prefix_error (error, "%s: ", io_path);
      goto out;
    }
  x = gd_st_tensor_to_f32 (xt);
  noise = gd_st_tensor_to_f32 (nt);

  o.model = model;
  o.classifier = classifier;
  o.diffusion = diffusion;
  o.settings.eta = json_object_get_double_member (cfg, "eta");
  o.settings.guidance_scale = json_object_get_double_member (cfg, "classifier_scale");
  o.settings.clip_denoised = json_object_get_boolean_member (cfg, "clip_denoised");
  o.labels = labels;
  o.user = &state;
  o.noise_fn = replay_noise;
  o.trace_fn = record_trace;
  state.recorded_noise = noise;
  state.per_step = (size_t) n * c * h * w;
  state.recorded_steps = diffusion->num_steps;
  state.trace_samples = g_new (float, state.per_step * diffusion->num_steps);
  state.trace_pred_xstart = g_new (float, state.per_step * diffusion->num_steps);
  if (!gd_sample_run (&o, x, n, h, w, error))
    goto out;

  GdStWriter *writer = gd_st_writer_new ();
  int64_t shape[5] = { diffusion->num_steps, n, c, h, w };
  gd_st_writer_add (writer, "samples", GD_DTYPE_F32, 5, shape, state.trace_samples);
  gd_st_writer_add (writer, "pred_xstart", GD_DTYPE_F32, 5, shape, state.trace_pred_xstart);
  int64_t *map = g_new (int64_t, diffusion->num_steps);
  for (int k = 0; k < diffusion->num_steps; k++)
    map[k] = diffusion->timestep_map[k];
  gd_st_writer_add (writer, "timestep_map", GD_DTYPE_I64, 1, shape, map);
  gd_st_writer_add (writer, "betas", GD_DTYPE_F64, 1, shape, diffusion->betas);
  g_free (map);
  gboolean written = gd_st_writer_write (writer, trace_path, error);
  gd_st_writer_free (writer);
  if (written && png_path)
    written = gd_png_write_grid (png_path, x, n, c, h, w, error);
  status = written ? 0 : 1;

out:
  g_clear_object (&parser);
  gd_safetensors_free (io);
  gd_model_free (model);
  gd_model_free (classifier);
  gd_diffusion_free (diffusion);
  g_free (x);
  g_free (noise);
  g_free (labels);
  g_free (state.trace_samples);
  g_free (state.trace_pred_xstart);
  g_free (config_path);
  g_free (io_path);
  g_free (parent);
  g_free (root);
  return status;
}

/* ---- generation ---- */

typedef struct {
  char *model, *classifier, *model_config, *classifier_config, *label, *labels_file, *respacing, *sampler, *output, *tensor, *replay, *trace;
  int class_index, steps, batch;
  double scale, eta;
  gint64 seed;
  gboolean no_clip, each_class, bf16;
} Options;

/* The class list that names classes: the classifier's, else the model's. */
static GPtrArray *
find_labels (GdModel *classifier, GdModel *model, const char **origin, GError **error)
{
  GdModel *sources[2] = { classifier, model };
  for (int i = 0; i < 2; i++)
    if (sources[i])
      {
        GPtrArray *labels = gd_model_labels (sources[i], error);
        if (labels || (error && *error))
          {
            *origin = gd_model_get_origin (sources[i]);
            return labels;
          }
      }
  return NULL;
}

static int
generate (Options *opt, GError **error)
{
  GdModel *model = NULL, *classifier = NULL;
  GdDiffusion *diffusion = NULL;
  GPtrArray *labels = NULL;
  int64_t *classes = NULL;
  float *x = NULL;
  char *respacing = NULL;
  int status = 1;
  RunState state = { .show_progress = isatty (STDERR_FILENO), .start_time = g_get_monotonic_time () };

  GdSampleOptions o = { 0 };
  if (!gd_sampler_from_name (opt->sampler, &o.settings.sampler, error))
    goto out;
  if (opt->batch < 1 || opt->batch > 1024)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "--batch %d out of range (1 to 1024)", opt->batch);
      goto out;
    }
  if (opt->eta < 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "--eta must not be negative");
      goto out;
    }
  if ((opt->class_index >= 0) + (opt->label != NULL) + opt->each_class > 1)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "give one of --class, --label and --each-class");
      goto out;
    }
  /* the output must be writable before minutes of sampling are spent */
  char *out_dir = g_path_get_dirname (opt->output);
  gboolean writable = access (out_dir, W_OK) == 0;
  g_free (out_dir);
  if (!writable)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: folder is not writable", opt->output);
      goto out;
    }
  model = guided_load_model (opt->model, opt->model_config, error);
  if (!model || (opt->bf16 && !gd_model_set_bf16 (model, TRUE, error)))
    goto out;
  if (opt->classifier)
    {
      classifier = guided_load_model (opt->classifier, opt->classifier_config, error);
      if (!classifier || (opt->bf16 && !gd_model_set_bf16 (classifier, TRUE, error)))
        goto out;
    }
  GdDiffusionSettings settings;
  if (!gd_model_diffusion_settings (model, &settings, error))
    goto out;
  respacing = opt->respacing ? g_strdup (opt->respacing)
              : g_strdup_printf ("%s%d", o.settings.sampler == GD_SAMPLER_DDIM ? "ddim" : "",
                                 opt->steps);
  diffusion = gd_diffusion_new (settings.schedule, settings.steps, respacing, settings.variance, error);
  if (!diffusion)
    goto out;

  const GdModelConfig *mc = gd_model_get_config (model);
  int n = opt->batch, h = mc->image_size, w = mc->image_size, c = mc->in_channels;
  gboolean needs_class = mc->num_classes > 0 || classifier;
  int class_count = classifier ? gd_model_get_config (classifier)->out_channels : mc->num_classes;
  if (opt->each_class)
    {
      if (!needs_class)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "--each-class needs a classifier or a "
                       "class-conditional model: %s has no classes", gd_model_get_origin (model));
          goto out;
        }
      if ((gint64) class_count * opt->batch > 1024)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "--each-class with --batch %d makes %"
                       G_GINT64_FORMAT " images, more than 1024", opt->batch,
                       (gint64) class_count * opt->batch);
          goto out;
        }
      n = class_count * opt->batch;
    }
  int chosen = opt->class_index;
  if (opt->label)
    {
      const char *origin = opt->labels_file;
      labels = opt->labels_file ? gd_labels_read_tsv (opt->labels_file, error)
                                : find_labels (classifier, model, &origin, error);
      if (!labels)
        {
          if (error && !*error)
            g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                         "--label needs a model or classifier with a label list (or --labels FILE); use --class N");
          goto out;
        }
      chosen = gd_labels_lookup (labels, opt->label, origin, error);
      if (chosen < 0)
        goto out;
    }
  if (needs_class)
    {
      classes = g_new (int64_t, n);
      for (int i = 0; i < n; i++)
        {
          classes[i] = opt->each_class ? i / opt->batch
                       : chosen >= 0 ? chosen : gd_sample_draw_class ((uint64_t) opt->seed, i, class_count);
          if (classes[i] >= class_count)
            {
              g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "class %" G_GINT64_FORMAT
                           " is out of range: %s has %d classes (0 to %d)", classes[i],
                           classifier ? gd_model_get_origin (classifier) : gd_model_get_origin (model),
                           class_count, class_count - 1);
              goto out;
            }
        }
      if (chosen < 0 && !opt->each_class)
        fprintf (stderr, "guided sample: no class given, drew class %" G_GINT64_FORMAT "%s\n",
                 classes[0], n > 1 ? " (and others) per image" : "");
    }
  if (!classifier && opt->scale != 0.0 && opt->scale != 1.0)
    fprintf (stderr, "guided sample: --scale has no effect without --classifier\n");

  o.model = model;
  o.classifier = classifier;
  o.diffusion = diffusion;
  o.settings.eta = opt->eta;
  o.settings.guidance_scale = opt->scale;
  o.settings.clip_denoised = !opt->no_clip;
  o.labels = classes;
  o.seed = (uint64_t) opt->seed;
  o.user = &state;
  o.progress_fn = show_progress;
  if (!gd_sample_check (&o, n, h, w, error))
    goto out;
  x = g_new (float, (size_t) n * c * h * w);
  gd_sample_initial_noise (o.seed, n, (size_t) c * h * w, x);
  if (!gd_sample_run (&o, x, n, h, w, error))
    goto out;
  if (opt->tensor)
    {
      GdStWriter *writer = gd_st_writer_new ();
      int64_t shape[4] = { n, c, h, w };
      gd_st_writer_add (writer, "x0", GD_DTYPE_F32, 4, shape, x);
      gboolean written = gd_st_writer_write (writer, opt->tensor, error);
      gd_st_writer_free (writer);
      if (!written)
        goto out;
    }
  /* --each-class: a row per class */
  if (!(opt->each_class ? gd_png_write_grid_columns (opt->output, x, n, n > class_count ? opt->batch : n, c, h, w, error)
                        : gd_png_write_grid (opt->output, x, n, c, h, w, error)))
    goto out;
  fprintf (stderr, "guided sample: wrote %s (%d image%s of %dx%d, %s, %d steps, seed %" G_GINT64_FORMAT ")\n",
           opt->output, n, n > 1 ? "s" : "", w, h, opt->sampler, diffusion->num_steps, opt->seed);
  status = 0;
out:
  gd_model_free (model);
  gd_model_free (classifier);
  gd_diffusion_free (diffusion);
  if (labels)
    g_ptr_array_unref (labels);
  g_free (classes);
  g_free (x);
  g_free (respacing);
  return status;
}

int
guided_sample_main (int argc, char **argv)
{
  Options opt = { .class_index = -1, .steps = 50, .batch = 1, .scale = 1.0, .eta = 0.0,
                  .seed = -1, .sampler = NULL };
  GOptionEntry entries[] = {
    { "model", 'm', 0, G_OPTION_ARG_FILENAME, &opt.model, "Diffusion model (.safetensors)", "FILE" },
    { "classifier", 'c', 0, G_OPTION_ARG_FILENAME, &opt.classifier, "Noisy classifier that guides", "FILE" },
    { "model-config", 0, 0, G_OPTION_ARG_STRING, &opt.model_config, "Architecture override for a .pt model (JSON or file)", "JSON" },
    { "classifier-config", 0, 0, G_OPTION_ARG_STRING, &opt.classifier_config, "Architecture override for a .pt classifier", "JSON" },
    { "class", 0, 0, G_OPTION_ARG_INT, &opt.class_index, "Class index to guide toward", "N" },
    { "label", 'l', 0, G_OPTION_ARG_STRING, &opt.label, "Class name from the model's label list", "NAME" },
    { "labels", 0, 0, G_OPTION_ARG_FILENAME, &opt.labels_file, "Label list (index<TAB>name per line) for --label, instead of the model's", "FILE" },
    { "scale", 's', 0, G_OPTION_ARG_DOUBLE, &opt.scale, "Guidance scale (default 1; 0 = no guidance)", "S" },
    { "steps", 'n', 0, G_OPTION_ARG_INT, &opt.steps, "Sampling steps (default 50)", "N" },
    { "respacing", 0, 0, G_OPTION_ARG_STRING, &opt.respacing, "Timestep respacing: 250, ddim25, 10,15,20", "STR" },
    { "sampler", 0, 0, G_OPTION_ARG_STRING, &opt.sampler, "ddim (default) or ddpm", "NAME" },
    { "eta", 0, 0, G_OPTION_ARG_DOUBLE, &opt.eta, "DDIM eta (default 0: deterministic)", "E" },
    { "seed", 0, 0, G_OPTION_ARG_INT64, &opt.seed, "Random seed (default: a new one, printed)", "N" },
    { "batch", 'b', 0, G_OPTION_ARG_INT, &opt.batch, "Images to make, written as one grid (default 1)", "B" },
    { "each-class", 0, 0, G_OPTION_ARG_NONE, &opt.each_class, "One image of every class (with --batch B: B of each, a row per class)", NULL },
    { "no-clip", 0, 0, G_OPTION_ARG_NONE, &opt.no_clip, "Do not clamp the predicted x_0 to [-1, 1]", NULL },
    { "bf16", 0, 0, G_OPTION_ARG_NONE, &opt.bf16, "Run the models' convolutions in bfloat16 (AMX or AVX512-BF16; faster, less exact)", NULL },
    { "output", 'o', 0, G_OPTION_ARG_FILENAME, &opt.output, "Output PNG", "FILE" },
    { "tensor", 0, 0, G_OPTION_ARG_FILENAME, &opt.tensor, "Also write the samples x0 [B, C, H, W] in model space (safetensors)", "FILE" },
    { "replay", 0, 0, G_OPTION_ARG_FILENAME, &opt.replay, "Replay a reference sampling fixture folder", "DIR" },
    { "trace", 0, 0, G_OPTION_ARG_FILENAME, &opt.trace, "With --replay: write samples and pred_xstart of every step", "FILE" },
    { NULL }
  };
  GOptionContext *context = g_option_context_new ("- classifier-guided sampling");
  g_option_context_add_main_entries (context, entries, NULL);
  g_option_context_set_summary (context,
      "Generates images with a diffusion model, optionally guided toward a class by a noisy\n"
      "classifier (Dhariwal & Nichol 2021). A batch is written as one PNG grid.");
  GError *error = NULL;
  int status = 2;
  if (!g_option_context_parse (context, &argc, &argv, &error))
    goto done;
  if (argc > 1)
    {
      g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "unexpected argument '%s'", argv[1]);
      goto done;
    }
  if (opt.replay)
    {
      if (!opt.trace)
        {
          g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "--replay needs --trace OUT.safetensors");
          goto done;
        }
      status = replay (opt.replay, opt.trace, opt.output, &error);
      goto done;
    }
  if (!opt.model || !opt.output)
    {
      g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "--model and --output are required (see --help)");
      goto done;
    }
  if (opt.seed < 0)
    opt.seed = g_random_int () & 0x7fffffff;
  if (!opt.sampler)
    opt.sampler = g_strdup ("ddim");
  status = generate (&opt, &error);
done:
  if (error)
    {
      fprintf (stderr, "guided sample: %s\n", error->message);
      g_error_free (error);
      if (status == 0)
        status = 1;
    }
  g_option_context_free (context);
  g_free (opt.model);
  g_free (opt.classifier);
  g_free (opt.model_config);
  g_free (opt.classifier_config);
  g_free (opt.label);
  g_free (opt.labels_file);
  g_free (opt.respacing);
  g_free (opt.sampler);
  g_free (opt.output);
  g_free (opt.tensor);
  g_free (opt.replay);
  g_free (opt.trace);
  return status;
}
