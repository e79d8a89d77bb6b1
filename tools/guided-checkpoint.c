/* guided convert IN OUT.safetensors   and   guided info FILE
 * Both read any model file (safetensors, or a PyTorch .pt recognised from its keys and
 * shapes) and accept --config for files that are not released models. */
#include "guided.h"
#include "gd-checkpoint.h"
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-recognize.h"
#include "gd-safetensors.h"

#include <stdio.h>
#include <string.h>

typedef struct {
  const char *command;
  char *config_argument;
  char **files;
  GOptionContext *context;
} Command;

/* Parses "--config X" and the positional files; returns 0, or the exit status. */
static int
command_parse (Command *c, int *argc, char ***argv, const char *parameters, const char *summary,
               int n_files)
{
  GOptionEntry entries[] = {
    { "config", 0, 0, G_OPTION_ARG_STRING, &c->config_argument,
      "Settings the weights do not reveal: a JSON object or a JSON file (see docs/checkpoints.md)",
      "JSON|FILE" },
    { G_OPTION_REMAINING, 0, 0, G_OPTION_ARG_FILENAME_ARRAY, &c->files, NULL, NULL },
    { NULL }
  };
  c->context = g_option_context_new (parameters);
  g_option_context_add_main_entries (c->context, entries, NULL);
  g_option_context_set_summary (c->context, summary);
  GError *error = NULL;
  if (!g_option_context_parse (c->context, argc, argv, &error))
    {
      fprintf (stderr, "guided %s: %s\n", c->command, error->message);
      g_error_free (error);
      return 2;
    }
  if (!c->files || g_strv_length (c->files) != (guint) n_files)
    {
      fprintf (stderr, "usage: guided %s [--config JSON|FILE] %s\n", c->command, parameters);
      return 2;
    }
  return 0;
}

static void
command_clear (Command *c)
{
  g_option_context_free (c->context);
  g_free (c->config_argument);
  g_strfreev (c->files);
}

static GdModel *
command_load (Command *c, gboolean shapes_only, GError **error)
{
  GdLoadOptions options = { .shapes_only = shapes_only };
  char *config = NULL;
  if (c->config_argument)
    {
      config = gd_checkpoint_read_config (c->config_argument, error);
      if (!config)
        return NULL;
      options.config = config;
    }
  GdModel *model = gd_checkpoint_load (c->files[0], &options, error);
  g_free (config);
  return model;
}

static int
finish (Command *c, int status, GError *error)
{
  if (error)
    {
      fprintf (stderr, "guided %s: %s\n", c->command, error->message);
      g_error_free (error);
    }
  command_clear (c);
  return status;
}

/* ---- convert ---- */

int
guided_convert_main (int argc, char **argv)
{
  Command c = { .command = "convert" };
  int status = command_parse (&c, &argc, &argv, "IN OUT.safetensors",
      "Writes a model as a self-describing safetensors file: float32 weights, and in\n"
      "__metadata__ its kind, constructor arguments (config), diffusion settings and class\n"
      "names when they are known.  IN may be a PyTorch checkpoint (.pt, zip or legacy\n"
      "format; float16, bfloat16 and float64 weights become float32) or a safetensors file.", 2);
  if (status)
    return finish (&c, status, NULL);
  GError *error = NULL;
  GdModel *model = command_load (&c, FALSE, &error);
  if (!model)
    return finish (&c, 1, error);
  const GdModelConfig *cfg = gd_model_get_config (model);
  GdStWriter *writer = gd_st_writer_new ();
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      const GdParam *p = gd_model_param (model, i);
      gd_st_writer_add (writer, p->name, GD_DTYPE_F32, p->ndim, p->shape, p->data);
    }
  char *config = gd_model_config_to_json (cfg);
  gd_st_writer_set_metadata (writer, "kind", cfg->kind == GD_MODEL_UNET ? "unet" : "classifier");
  gd_st_writer_set_metadata (writer, "config", config);
  g_free (config);
  static const char *carried[] = { "diffusion", "labels", "labels_name", "release" };
  for (guint i = 0; i < G_N_ELEMENTS (carried); i++)
    {
      const char *value = gd_model_get_metadata (model, carried[i]);
      if (value)
        gd_st_writer_set_metadata (writer, carried[i], value);
    }
  const char *labels_name = gd_model_get_metadata (model, "labels_name");
  if (labels_name && !gd_model_get_metadata (model, "labels"))
    fprintf (stderr, "guided convert: label list '%s' not found (set GD_DATA_DIR): "
             "writing the model without class names\n", labels_name);
  gboolean written = gd_st_writer_write (writer, c.files[1], &error);
  gd_st_writer_free (writer);
  if (written)
    {
      const char *release = gd_model_get_metadata (model, "release");
      printf ("%s: %s%s%s, %zu parameters\n", c.files[1],
              cfg->kind == GD_MODEL_UNET ? "U-Net" : "classifier", release ? " " : "",
              release ? release : "", gd_model_parameter_count (model));
    }
  gd_model_free (model);
  return finish (&c, written ? 0 : 1, error);
}

/* ---- info ---- */

static void
print_labels (GdModel *model)
{
  const char *name = gd_model_get_metadata (model, "labels_name");
  GError *error = NULL;
  GPtrArray *labels = gd_model_labels (model, &error);
  if (error)
    {
      printf ("labels:       unreadable (%s)\n", error->message);
      g_error_free (error);
      return;
    }
  if (!labels && !name)
    {
      printf ("labels:       none\n");
      return;
    }
  if (!labels)
    {
      printf ("labels:       %s (list not found: set GD_DATA_DIR)\n", name);
      return;
    }
  printf ("labels:       %s%s%u names:", name ? name : "", name ? ", " : "", labels->len);
  for (guint i = 0; i < MIN (labels->len, 3u); i++)
    printf (" %u %s%s", i, (const char *) labels->pdata[i], i + 1 < MIN (labels->len, 3u) ? "," : "");
  printf ("%s\n", labels->len > 3 ? ", ..." : "");
  g_ptr_array_unref (labels);
}

int
guided_info_main (int argc, char **argv)
{
  Command c = { .command = "info" };
  int status = command_parse (&c, &argc, &argv, "FILE",
      "Describes a model file: its format, what it was recognised as, its architecture,\n"
      "parameter count, diffusion settings and classes.  The weights themselves are not read.", 1);
  if (status)
    return finish (&c, status, NULL);
  GError *error = NULL;
  GdModel *model = command_load (&c, TRUE, &error);
  if (!model)
    return finish (&c, 1, error);
  const GdModelConfig *cfg = gd_model_get_config (model);
  const char *format = gd_model_get_metadata (model, "source_format");
  const char *dtypes = gd_model_get_metadata (model, "source_dtypes");
  const char *release_name = gd_model_get_metadata (model, "release");
  const GdRelease *release = release_name ? gd_release_find (release_name) : NULL;
  printf ("file:         %s\n", c.files[0]);
  printf ("format:       %s", !format ? "safetensors"
          : strcmp (format, "pytorch-zip") == 0 ? "PyTorch checkpoint (zip)" : "PyTorch checkpoint (legacy)");
  if (dtypes && strcmp (dtypes, "F32") != 0)
    printf (", %s weights read as float32", dtypes);
  printf ("\n");
  printf ("model:        %s\n", cfg->kind == GD_MODEL_UNET ? "U-Net (noise predictor)" : "noisy classifier");
  if (release_name)
    printf ("release:      %s\n", release_name);
  else
    printf ("release:      none (%s)\n", format ? "settings from --config or the weights"
                                                : "settings from the file's metadata");
  char *config = gd_model_config_to_json (cfg);
  printf ("config:       %s\n", config);
  g_free (config);
  printf ("parameters:   %zu in %u tensors\n", gd_model_parameter_count (model), gd_model_n_params (model));
  printf ("image size:   %d\n", cfg->image_size);
  if (cfg->kind == GD_MODEL_UNET)
    {
      GdDiffusionSettings settings;
      if (gd_model_diffusion_settings (model, &settings, &error))
        printf ("diffusion:    %d steps, %s schedule, %s%s\n", settings.steps,
                settings.schedule == GD_SCHEDULE_COSINE ? "cosine" : "linear",
                settings.variance == GD_VARIANCE_LEARNED_RANGE ? "learned sigma"
                : settings.variance == GD_VARIANCE_FIXED_SMALL ? "fixed small sigma" : "fixed large sigma",
                gd_model_get_metadata (model, "diffusion") ? "" : " (assumed: the file does not say)");
      else
        {
          printf ("diffusion:    unreadable (%s)\n", error->message);
          g_clear_error (&error);
        }
      if (cfg->num_classes > 0)
        printf ("classes:      %d (class-conditional)\n", cfg->num_classes);
      else
        printf ("classes:      none (unconditional)\n");
    }
  else
    {
      printf ("classes:      %d\n", cfg->out_channels);
      if (release)
        printf ("guidance:     the paper samples with classifier scale %g\n", release->classifier_scale);
    }
  print_labels (model);
  gd_model_free (model);
  return finish (&c, 0, NULL);
}
