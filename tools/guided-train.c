/* guided train diffusion|classifier: training with resumable checkpoints. */
#include "guided.h"
#include "gd-dataset.h"
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-trainer.h"

#include <glib/gstdio.h>
#include <png.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static volatile sig_atomic_t stop_requested;

static int
compare_names (gconstpointer a, gconstpointer b)
{
  return strcmp (*(char *const *) a, *(char *const *) b);
}

static void
on_signal (int sig)
{
  (void) sig;
  stop_requested = 1;
}

/* A folder with one sub-folder of PNG images per class (sorted names = labels 0, 1, ...),
 * converted to `channels` (1 gray, 3 RGB). */
static GdDataset *
read_png_folder (const char *dir, int channels, GError **error)
{
  GPtrArray *classes = g_ptr_array_new_with_free_func (g_free);
  GPtrArray *files = g_ptr_array_new_with_free_func (g_free);
  GArray *labels = g_array_new (FALSE, FALSE, sizeof (int64_t));
  GdDataset *data = NULL;
  GDir *top = g_dir_open (dir, 0, error);
  if (!top)
    goto out;
  for (const char *name; (name = g_dir_read_name (top));)
    {
      char *path = g_build_filename (dir, name, NULL);
      if (g_file_test (path, G_FILE_TEST_IS_DIR))
        g_ptr_array_add (classes, g_strdup (name));
      g_free (path);
    }
  g_dir_close (top);
  g_ptr_array_sort (classes, compare_names);
  for (guint c = 0; c < classes->len; c++)
    {
      char *sub = g_build_filename (dir, classes->pdata[c], NULL);
      GDir *d = g_dir_open (sub, 0, error);
      if (!d)
        {
          g_free (sub);
          goto out;
        }
      GPtrArray *names = g_ptr_array_new_with_free_func (g_free);
      for (const char *name; (name = g_dir_read_name (d));)
        if (g_str_has_suffix (name, ".png") || g_str_has_suffix (name, ".PNG"))
          g_ptr_array_add (names, g_build_filename (sub, name, NULL));
      g_dir_close (d);
      g_ptr_array_sort (names, compare_names);
      for (guint i = 0; i < names->len; i++)
        {
          g_ptr_array_add (files, g_strdup (names->pdata[i]));
          int64_t label = c;
          g_array_append_val (labels, label);
        }
      g_ptr_array_unref (names);
      g_free (sub);
    }
  if (files->len == 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "%s: no PNG images in class sub-folders (nor IDX files)", dir);
      goto out;
    }
  int width = 0, height = 0;
  for (guint i = 0; i < files->len; i++)
    {
      png_image image = { .version = PNG_IMAGE_VERSION };
      const char *path = files->pdata[i];
      if (!png_image_begin_read_from_file (&image, path))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: cannot read PNG: %s", path, image.message);
          goto out;
        }
      if (!data)
        {
          width = (int) image.width;
          height = (int) image.height;
          data = gd_dataset_new ((int) files->len, channels, height, width);
        }
      if ((int) image.width != width || (int) image.height != height)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s is %ux%u; the other images are %dx%d",
                       path, image.width, image.height, width, height);
          png_image_free (&image);
          goto out;
        }
      image.format = channels == 1 ? PNG_FORMAT_GRAY : PNG_FORMAT_RGB;
      guint8 *pixels = g_malloc (PNG_IMAGE_SIZE (image));
      if (!png_image_finish_read (&image, NULL, pixels, 0, NULL))
        {
          g_set_error (error, GD_ERROR, GD_ERROR_FORMAT, "%s: corrupt PNG: %s", path, image.message);
          g_free (pixels);
          goto out;
        }
      float *dst = data->images + (size_t) i * channels * height * width;
      for (int c = 0; c < channels; c++)
        for (int p = 0; p < height * width; p++)
          dst[(size_t) c * height * width + p] = pixels[(size_t) p * channels + c] / 127.5f - 1.0f;
      data->labels[i] = g_array_index (labels, int64_t, i);
      g_free (pixels);
    }
  data->label_names = g_ptr_array_ref (classes);
out:
  if (error && *error)
    g_clear_pointer (&data, gd_dataset_free);
  g_ptr_array_unref (classes);
  g_ptr_array_unref (files);
  g_array_unref (labels);
  return data;
}

/* A folder with IDX files (Fashion-MNIST's layout: PREFIX-images-idx3-ubyte[.gz] and
 * PREFIX-labels-idx1-ubyte[.gz]) or a folder of class sub-folders of PNG images. */
static GdDataset *
read_data (const char *dir, const char *split, int channels, GError **error)
{
  const char *suffixes[] = { ".gz", "" };
  for (int i = 0; i < 2; i++)
    {
      char *images_name = g_strdup_printf ("%s-images-idx3-ubyte%s", split, suffixes[i]);
      char *labels_name = g_strdup_printf ("%s-labels-idx1-ubyte%s", split, suffixes[i]);
      char *images = g_build_filename (dir, images_name, NULL);
      char *labels = g_build_filename (dir, labels_name, NULL);
      GdDataset *data = NULL;
      gboolean found = g_file_test (images, G_FILE_TEST_EXISTS);
      if (found)
        data = gd_dataset_read_idx (images, labels, error);
      g_free (images_name);
      g_free (labels_name);
      g_free (images);
      g_free (labels);
      if (found)
        return data;
    }
  if (!g_file_test (dir, G_FILE_TEST_IS_DIR))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: not a folder", dir);
      return NULL;
    }
  return read_png_folder (dir, channels, error);
}

typedef struct {
  char *data, *config, *output, *checkpoint, *labels, *split;
  gboolean resume;
  gint64 steps;
} Options;

static int
train (const char *what, Options *opt, GError **error)
{
  char *config_text = NULL;
  GdDataset *data = NULL;
  GdTrainer *trainer = NULL;
  char *checkpoint = opt->checkpoint ? g_strdup (opt->checkpoint) : g_strconcat (opt->output, ".ckpt", NULL);
  int status = 1;
  GdTrainConfig cfg;

  if (!g_file_get_contents (opt->config, &config_text, NULL, error))
    goto out;
  if (!gd_train_config_parse (&cfg, config_text, opt->config, error))
    goto out;
  GdModelKind wanted = strcmp (what, "diffusion") == 0 ? GD_MODEL_UNET : GD_MODEL_CLASSIFIER;
  if (cfg.model.kind != wanted)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: trains a %s, not a %s", opt->config,
                   cfg.model.kind == GD_MODEL_UNET ? "diffusion model" : "classifier", what);
      goto out;
    }
  if (opt->steps > 0)
    cfg.steps = opt->steps;
  data = read_data (opt->data, opt->split, cfg.model.in_channels, error);
  if (!data)
    goto out;
  if (opt->labels)
    {
      GPtrArray *names = gd_labels_read_tsv (opt->labels, error);
      if (!names)
        goto out;
      if (data->label_names)
        g_ptr_array_unref (data->label_names);
      data->label_names = names;
    }
  trainer = gd_trainer_new (&cfg, data, error);
  if (!trainer)
    {
      g_prefix_error (error, "%s: ", opt->data);
      goto out;
    }
  if (opt->resume && g_file_test (checkpoint, G_FILE_TEST_EXISTS))
    {
      if (!gd_trainer_load_checkpoint (trainer, checkpoint, error))
        goto out;
      fprintf (stderr, "guided train: resumed %s at step %" G_GINT64_FORMAT "\n", checkpoint,
               gd_trainer_get_step (trainer));
    }
  else if (opt->resume)
    fprintf (stderr, "guided train: no checkpoint %s yet, starting from step 0\n", checkpoint);
  fprintf (stderr, "guided train: %d images of %dx%d, %zu parameters, batch %d, %" G_GINT64_FORMAT " steps\n",
           data->count, data->width, data->height, gd_model_parameter_count (gd_trainer_get_model (trainer)),
           cfg.batch_size, cfg.steps);

  signal (SIGINT, on_signal);
  signal (SIGTERM, on_signal);
  gboolean tty = isatty (STDERR_FILENO);
  gint64 start = g_get_monotonic_time (), last_report = 0, last_checkpoint = start;
  gint64 first_step = gd_trainer_get_step (trainer);
  double loss_sum = 0.0;
  int loss_count = 0;
  while (gd_trainer_get_step (trainer) < cfg.steps && !stop_requested)
    {
      double loss;
      if (!gd_trainer_step (trainer, &loss, error))
        goto out;
      loss_sum += loss;
      loss_count++;
      gint64 now = g_get_monotonic_time ();
      gint64 step = gd_trainer_get_step (trainer);
      if (now - last_report > (tty ? 1000000 : 30000000) || step == cfg.steps)
        {
          double elapsed = (now - start) / 1e6;
          double rate = (step - first_step) * (double) cfg.batch_size / elapsed;
          double left = (cfg.steps - step) * (double) cfg.batch_size / MAX (rate, 1e-9);
          fprintf (stderr, "%sstep %" G_GINT64_FORMAT "/%" G_GINT64_FORMAT "  loss %.5f  %.1f images/s  %.0f min left%s",
                   tty ? "\r" : "", step, cfg.steps, loss_sum / loss_count, rate, left / 60,
                   tty ? "   " : "\n");
          fflush (stderr);
          loss_sum = 0.0;
          loss_count = 0;
          last_report = now;
        }
      if (now - last_checkpoint > cfg.checkpoint_minutes * 60e6)
        {
          if (!gd_trainer_save_checkpoint (trainer, checkpoint, error))
            goto out;
          last_checkpoint = now;
        }
    }
  if (tty)
    fputc ('\n', stderr);
  if (!gd_trainer_save_checkpoint (trainer, checkpoint, error))
    goto out;
  if (stop_requested)
    {
      fprintf (stderr, "guided train: stopped at step %" G_GINT64_FORMAT "; checkpoint %s "
               "(continue with --resume)\n", gd_trainer_get_step (trainer), checkpoint);
      status = 130;
      goto out;
    }
  if (!gd_trainer_save_model (trainer, opt->output, error))
    goto out;
  fprintf (stderr, "guided train: wrote %s (EMA weights after %" G_GINT64_FORMAT " steps)\n",
           opt->output, gd_trainer_get_step (trainer));
  status = 0;
out:
  gd_trainer_free (trainer);
  gd_dataset_free (data);
  g_free (config_text);
  g_free (checkpoint);
  return status;
}

int
guided_train_main (int argc, char **argv)
{
  Options opt = { .steps = 0 };
  GOptionEntry entries[] = {
    { "data", 'd', 0, G_OPTION_ARG_FILENAME, &opt.data, "Folder of IDX files or of class sub-folders of PNGs", "DIR" },
    { "split", 0, 0, G_OPTION_ARG_STRING, &opt.split, "IDX file prefix (default train)", "NAME" },
    { "config", 0, 0, G_OPTION_ARG_FILENAME, &opt.config, "Training configuration (JSON)", "FILE" },
    { "labels", 0, 0, G_OPTION_ARG_FILENAME, &opt.labels, "Class names (index<TAB>name per line)", "FILE" },
    { "output", 'o', 0, G_OPTION_ARG_FILENAME, &opt.output, "The trained model (EMA weights)", "FILE" },
    { "checkpoint", 0, 0, G_OPTION_ARG_FILENAME, &opt.checkpoint, "Checkpoint file (default OUTPUT.ckpt)", "FILE" },
    { "resume", 0, 0, G_OPTION_ARG_NONE, &opt.resume, "Continue from the checkpoint when it exists", NULL },
    { "steps", 0, 0, G_OPTION_ARG_INT64, &opt.steps, "Total optimiser steps (overrides the config)", "N" },
    { NULL }
  };
  GOptionContext *context = g_option_context_new ("diffusion|classifier - train a model");
  g_option_context_add_main_entries (context, entries, NULL);
  GError *error = NULL;
  int status = 2;
  if (!g_option_context_parse (context, &argc, &argv, &error))
    goto done;
  if (argc != 2 || (strcmp (argv[1], "diffusion") != 0 && strcmp (argv[1], "classifier") != 0))
    {
      g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "say what to train: diffusion or classifier");
      goto done;
    }
  if (!opt.data || !opt.config || !opt.output)
    {
      g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "--data, --config and --output are required");
      goto done;
    }
  if (!opt.split)
    opt.split = g_strdup ("train");
  status = train (argv[1], &opt, &error);
done:
  if (error)
    {
      fprintf (stderr, "guided train: %s\n", error->message);
      g_error_free (error);
      if (status == 0)
        status = 1;
    }
  g_option_context_free (context);
  g_free (opt.data);
  g_free (opt.config);
  g_free (opt.output);
  g_free (opt.checkpoint);
  g_free (opt.labels);
  g_free (opt.split);
  return status;
}
