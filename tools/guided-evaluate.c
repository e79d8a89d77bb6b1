/* guided evaluate: how classifier guidance trades variety for fidelity (Dhariwal & Nichol
 * 2021, section 4): for each guidance scale, samples of every class judged by a separate
 * clean classifier: intended-class accuracy, Frechet distance of the judge's features to the
 * test set, and the mean pairwise feature distance within a class (variety). */
#include "guided.h"
#include "gd-dataset.h"
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-png.h"
#include "gd-sampler.h"
#include "gd-stats.h"

#include <errno.h>
#include <glib/gstdio.h>
#include <math.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

typedef struct {
  char *model, *classifier, *judge, *data, *split, *scales, *grid, *table, *tsv, *samples_dir;
  int samples, steps, batch, test_images;
  gint64 seed;
} Options;

/* What the PNG holds: x quantised to 8 bits as the writer does. */
static void
quantise (float *x, size_t count)
{
  for (size_t i = 0; i < count; i++)
    x[i] = gd_png_level (x[i]) / 127.5f - 1.0f;
}

static gboolean
judge_batch (GdModel *judge, const float *x, int n, int size, int classes, float *features,
             int *predictions, GError **error)
{
  int64_t *t = g_new0 (int64_t, n);
  float *logits = g_new (float, (size_t) n * classes);
  gd_model_set_inference (judge, TRUE);
  gboolean ok = gd_classifier_features (judge, x, n, size, size, t, logits, features, error);
  for (int i = 0; ok && i < n; i++)
    {
      int best = 0;
      for (int k = 1; k < classes; k++)
        if (logits[(size_t) i * classes + k] > logits[(size_t) i * classes + best])
          best = k;
      predictions[i] = best;
    }
  g_free (t);
  g_free (logits);
  return ok;
}

static double
class_variety (const float *features, const int *classes_of, int n, int d, int classes)
{
  double total = 0.0;
  int counted = 0;
  float *subset = g_new (float, (size_t) n * d);
  for (int c = 0; c < classes; c++)
    {
      int m = 0;
      for (int i = 0; i < n; i++)
        if (classes_of[i] == c)
          memcpy (subset + (size_t) m++ * d, features + (size_t) i * d, sizeof (float) * d);
      if (m >= 2)
        {
          total += gd_stats_mean_pairwise_distance (subset, m, d);
          counted++;
        }
    }
  g_free (subset);
  return counted ? total / counted : 0.0;
}

/* --samples-dir: each batch of samples is kept as a file once made, so that a stopped
 * evaluation resumes where it was and another judge can be run on the same samples.  The
 * folder's `made-with` file names the models and settings; other ones are refused. */
static gboolean
samples_dir_open (const Options *opt, GError **error)
{
  if (g_mkdir_with_parents (opt->samples_dir, 0755) != 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: cannot create the folder: %s",
                   opt->samples_dir, g_strerror (errno));
      return FALSE;
    }
  GStatBuf model_stat, classifier_stat;
  if (g_stat (opt->model, &model_stat) != 0 || g_stat (opt->classifier, &classifier_stat) != 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "cannot read the models' file sizes");
      return FALSE;
    }
  char *key = g_strdup_printf ("model %s (%" G_GINT64_FORMAT " bytes, modified %" G_GINT64_FORMAT
                               ")\nclassifier %s (%" G_GINT64_FORMAT " bytes, modified %"
                               G_GINT64_FORMAT ")\nDDIM %d steps, batches of %d, first seed %"
                               G_GINT64_FORMAT "\n", opt->model, (gint64) model_stat.st_size,
                               (gint64) model_stat.st_mtime, opt->classifier,
                               (gint64) classifier_stat.st_size, (gint64) classifier_stat.st_mtime,
                               opt->steps, opt->batch, opt->seed);
  char *path = g_build_filename (opt->samples_dir, "made-with", NULL), *old = NULL;
  gboolean ok = TRUE;
  if (g_file_get_contents (path, &old, NULL, NULL))
    {
      if (strcmp (old, key) != 0)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "%s holds samples made with other models or settings (see its made-with "
                       "file); choose another folder", opt->samples_dir);
          ok = FALSE;
        }
    }
  else
    ok = g_file_set_contents (path, key, -1, error);
  g_free (old);
  g_free (path);
  g_free (key);
  return ok;
}

static char *
samples_path (const Options *opt, double scale, int first)
{
  char name[64];
  g_snprintf (name, sizeof name, "scale-%g-from-%d.f32", scale, first);
  return g_build_filename (opt->samples_dir, name, NULL);
}

/* TRUE and x filled when the batch was made before. */
static gboolean
samples_load (const Options *opt, double scale, int first, float *x, size_t count)
{
  if (!opt->samples_dir)
    return FALSE;
  char *path = samples_path (opt, scale, first), *data = NULL;
  gsize length = 0;
  gboolean found = g_file_get_contents (path, &data, &length, NULL) && length == count * sizeof (float);
  if (found)
    memcpy (x, data, length);
  g_free (data);
  g_free (path);
  return found;
}

static gboolean
samples_save (const Options *opt, double scale, int first, const float *x, size_t count,
              GError **error)
{
  if (!opt->samples_dir)
    return TRUE;
  char *path = samples_path (opt, scale, first);
  gboolean ok = g_file_set_contents (path, (const char *) x, (gssize) (count * sizeof (float)), error);
  g_free (path);
  return ok;
}

static int
evaluate (Options *opt, GError **error)
{
  GdModel *model = NULL, *classifier = NULL, *judge = NULL;
  GdDataset *test = NULL;
  GdDiffusion *diffusion = NULL;
  GArray *scales = g_array_new (FALSE, FALSE, sizeof (double));
  GString *table = g_string_new (NULL), *tsv = g_string_new ("scale\taccuracy\tfrechet\tvariety\n");
  float *test_features = NULL, *features = NULL, *x = NULL, *grid = NULL;
  int *predictions = NULL, *intended = NULL;
  double *test_mean = NULL, *test_cov = NULL, *mean = NULL, *cov = NULL;
  int status = 1;

  char **parts = g_strsplit (opt->scales, ",", -1);
  for (char **p = parts; *p; p++)
    {
      char *end;
      double s = g_ascii_strtod (*p, &end);
      if (end == *p || *end)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "--scales: '%s' is not a number", *p);
          g_strfreev (parts);
          goto out;
        }
      g_array_append_val (scales, s);
    }
  g_strfreev (parts);
  if (opt->samples_dir && !samples_dir_open (opt, error))
    goto out;
  if (!(model = gd_model_load (opt->model, error)) || !(classifier = gd_model_load (opt->classifier, error))
      || !(judge = gd_model_load (opt->judge, error)))
    goto out;
  const GdModelConfig *mc = gd_model_get_config (model);
  int size = mc->image_size, channels = mc->in_channels;
  int classes = gd_model_get_config (classifier)->out_channels;
  if (gd_model_get_config (judge)->out_channels != classes)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "the judge has %d classes, the classifier %d",
                   gd_model_get_config (judge)->out_channels, classes);
      goto out;
    }
  char *images = g_strdup_printf ("%s/%s-images-idx3-ubyte.gz", opt->data, opt->split);
  char *labels = g_strdup_printf ("%s/%s-labels-idx1-ubyte.gz", opt->data, opt->split);
  test = gd_dataset_read_idx (images, labels, error);
  g_free (images);
  g_free (labels);
  if (!test)
    goto out;
  if (opt->test_images > 0 && opt->test_images < test->count)
    test->count = opt->test_images;

  /* the judge on the real test images */
  int d = gd_classifier_feature_size (judge);
  test_features = g_new (float, (size_t) test->count * d);
  predictions = g_new (int, MAX (test->count, opt->samples));
  size_t per_image = (size_t) channels * size * size;
  int correct = 0;
  for (int i = 0; i < test->count; i += opt->batch)
    {
      int n = MIN (opt->batch, test->count - i);
      if (!judge_batch (judge, test->images + (size_t) i * per_image, n, size, classes,
                        test_features + (size_t) i * d, predictions + i, error))
        goto out;
      for (int j = 0; j < n; j++)
        correct += predictions[i + j] == test->labels[i + j];
    }
  double judge_accuracy = (double) correct / test->count;
  test_mean = g_new (double, d);
  test_cov = g_new (double, (size_t) d * d);
  gd_stats_mean_cov (test_features, test->count, d, test_mean, test_cov);
  int *test_classes = g_new (int, test->count);
  for (int i = 0; i < test->count; i++)
    test_classes[i] = (int) test->labels[i];
  /* variety of real images, on as many per class as the samples have */
  int real_n = MIN (test->count, opt->samples);
  double real_variety = class_variety (test_features, test_classes, real_n, d, classes);
  g_free (test_classes);
  fprintf (stderr, "guided evaluate: judge accuracy on %d %s images: %.4f\n", test->count, opt->split,
           judge_accuracy);
  g_string_append_printf (table, "Judge: %s, accuracy %.4f on the %d %s images; variety of real "
                          "images %.3f (first %d).\n\n", opt->judge, judge_accuracy, test->count,
                          opt->split, real_variety, real_n);
  g_string_append_printf (table, "| scale | intended-class accuracy | Frechet distance | variety |\n"
                                 "| --- | --- | --- | --- |\n");

  GdDiffusionSettings settings;
  if (!gd_model_diffusion_settings (model, &settings, error))
    goto out;
  char *respacing = g_strdup_printf ("ddim%d", opt->steps);
  diffusion = gd_diffusion_new (settings.schedule, settings.steps, respacing, settings.variance, error);
  g_free (respacing);
  if (!diffusion)
    goto out;

  features = g_new (float, (size_t) opt->samples * d);
  intended = g_new (int, opt->samples);
  x = g_new (float, (size_t) opt->batch * per_image);
  mean = g_new (double, d);
  cov = g_new (double, (size_t) d * d);
  /* grid: one row per class, one column per scale, the first sample of each */
  grid = g_new0 (float, (size_t) classes * scales->len * per_image);
  int64_t *labels_batch = g_new (int64_t, opt->batch);
  gint64 start = g_get_monotonic_time ();
  for (guint s = 0; s < scales->len; s++)
    {
      double scale = g_array_index (scales, double, s);
      correct = 0;
      for (int i = 0; i < opt->samples; i += opt->batch)
        {
          int n = MIN (opt->batch, opt->samples - i);
          for (int j = 0; j < n; j++)
            labels_batch[j] = intended[i + j] = (i + j) % classes;
          GdSampleOptions o = { .model = model, .classifier = classifier, .diffusion = diffusion,
                                .labels = labels_batch, .seed = (uint64_t) opt->seed + i };
          o.settings.sampler = GD_SAMPLER_DDIM;
          o.settings.guidance_scale = scale;
          o.settings.clip_denoised = TRUE;
          if (!samples_load (opt, scale, i, x, n * per_image))
            {
              gd_sample_initial_noise (o.seed, n, per_image, x);
              if (!gd_sample_run (&o, x, n, size, size, error))
                {
                  g_free (labels_batch);
                  goto out;
                }
              quantise (x, n * per_image);
              if (!samples_save (opt, scale, i, x, n * per_image, error))
                {
                  g_free (labels_batch);
                  goto out;
                }
            }
          if (!judge_batch (judge, x, n, size, classes, features + (size_t) i * d, predictions + i, error))
            {
              g_free (labels_batch);
              goto out;
            }
          for (int j = 0; j < n; j++)
            {
              correct += predictions[i + j] == intended[i + j];
              if (i + j < classes)
                memcpy (grid + ((size_t) (i + j) * scales->len + s) * per_image, x + (size_t) j * per_image,
                        sizeof (float) * per_image);
            }
          double elapsed = (g_get_monotonic_time () - start) / 1e6;
          int done = (int) s * opt->samples + i + n, total = (int) scales->len * opt->samples;
          fprintf (stderr, "\rscale %g: %d/%d samples, %.0f s, %.0f s left   ", scale, i + n,
                   opt->samples, elapsed, elapsed / done * (total - done));
        }
      fputc ('\n', stderr);
      double accuracy = (double) correct / opt->samples, frechet;
      gd_stats_mean_cov (features, opt->samples, d, mean, cov);
      if (!gd_stats_frechet_distance (mean, cov, test_mean, test_cov, d, &frechet, error))
        {
          g_free (labels_batch);
          goto out;
        }
      double variety = class_variety (features, intended, opt->samples, d, classes);
      g_string_append_printf (table, "| %g | %.3f | %.2f | %.3f |\n", scale, accuracy, frechet, variety);
      g_string_append_printf (tsv, "%g\t%.5f\t%.4f\t%.5f\n", scale, accuracy, frechet, variety);
      fprintf (stderr, "scale %g: accuracy %.3f, Frechet distance %.2f, variety %.3f\n", scale,
               accuracy, frechet, variety);
    }
  g_free (labels_batch);
  g_string_append_printf (table, "\n%d samples per scale (classes in turn), DDIM %d steps, seeds %"
                          G_GINT64_FORMAT " to %" G_GINT64_FORMAT ".\n", opt->samples, opt->steps,
                          opt->seed, opt->seed + opt->samples - 1);
  fputs (table->str, stdout);
  if (opt->table && !g_file_set_contents (opt->table, table->str, -1, error))
    goto out;
  if (opt->tsv && !g_file_set_contents (opt->tsv, tsv->str, -1, error))
    goto out;
  if (opt->grid)
    {
      /* one picture: class c is row c, scale s is column s */
      int cols = (int) scales->len, w = size * cols, h = size * classes;
      float *picture = g_new (float, (size_t) channels * h * w);
      for (int c = 0; c < classes; c++)
        for (int s = 0; s < cols; s++)
          for (int ch = 0; ch < channels; ch++)
            for (int y = 0; y < size; y++)
              memcpy (picture + ((size_t) ch * h + (size_t) c * size + y) * w + (size_t) s * size,
                      grid + (((size_t) c * cols + s) * channels + ch) * size * size + (size_t) y * size,
                      sizeof (float) * size);
      gboolean ok = gd_png_write_grid (opt->grid, picture, 1, channels, h, w, error);
      g_free (picture);
      if (!ok)
        goto out;
    }
  status = 0;
out:
  gd_model_free (model);
  gd_model_free (classifier);
  gd_model_free (judge);
  gd_dataset_free (test);
  gd_diffusion_free (diffusion);
  g_array_unref (scales);
  g_string_free (table, TRUE);
  g_string_free (tsv, TRUE);
  g_free (test_features);
  g_free (features);
  g_free (x);
  g_free (grid);
  g_free (predictions);
  g_free (intended);
  g_free (test_mean);
  g_free (test_cov);
  g_free (mean);
  g_free (cov);
  return status;
}

int
guided_evaluate_main (int argc, char **argv)
{
  Options opt = { .samples = 1000, .steps = 50, .batch = 50, .seed = 0 };
  GOptionEntry entries[] = {
    { "model", 'm', 0, G_OPTION_ARG_FILENAME, &opt.model, "Diffusion model", "FILE" },
    { "classifier", 'c', 0, G_OPTION_ARG_FILENAME, &opt.classifier, "Guiding noisy classifier", "FILE" },
    { "judge", 'j', 0, G_OPTION_ARG_FILENAME, &opt.judge, "Separate clean classifier that judges", "FILE" },
    { "data", 'd', 0, G_OPTION_ARG_FILENAME, &opt.data, "Folder of the IDX test set", "DIR" },
    { "split", 0, 0, G_OPTION_ARG_STRING, &opt.split, "IDX prefix of the test set (default t10k)", "NAME" },
    { "scales", 0, 0, G_OPTION_ARG_STRING, &opt.scales, "Guidance scales (default 0,1,2,4,8)", "LIST" },
    { "samples", 'n', 0, G_OPTION_ARG_INT, &opt.samples, "Samples per scale (default 1000)", "N" },
    { "steps", 0, 0, G_OPTION_ARG_INT, &opt.steps, "DDIM steps (default 50)", "N" },
    { "batch", 'b', 0, G_OPTION_ARG_INT, &opt.batch, "Images per batch (default 50)", "N" },
    { "seed", 0, 0, G_OPTION_ARG_INT64, &opt.seed, "First seed (default 0)", "N" },
    { "test-images", 0, 0, G_OPTION_ARG_INT, &opt.test_images, "Use only the first N test images (default all)", "N" },
    { "grid", 0, 0, G_OPTION_ARG_FILENAME, &opt.grid, "PNG: a row per class, a column per scale", "FILE" },
    { "table", 0, 0, G_OPTION_ARG_FILENAME, &opt.table, "Markdown table", "FILE" },
    { "tsv", 0, 0, G_OPTION_ARG_FILENAME, &opt.tsv, "The numbers as TSV (for plotting)", "FILE" },
    { "samples-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt.samples_dir, "Keep the samples here; a rerun resumes from them", "DIR" },
    { NULL }
  };
  GOptionContext *context = g_option_context_new ("- judge guided samples across guidance scales");
  g_option_context_add_main_entries (context, entries, NULL);
  GError *error = NULL;
  int status = 2;
  if (!g_option_context_parse (context, &argc, &argv, &error))
    goto done;
  if (!opt.model || !opt.classifier || !opt.judge || !opt.data)
    {
      g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "--model, --classifier, --judge and --data are required");
      goto done;
    }
  if (opt.samples < 2 || opt.batch < 1 || opt.steps < 1)
    {
      g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "--samples >= 2, --batch >= 1 and --steps >= 1 are needed");
      goto done;
    }
  if (!opt.split)
    opt.split = g_strdup ("t10k");
  if (!opt.scales)
    opt.scales = g_strdup ("0,1,2,4,8");
  status = evaluate (&opt, &error);
done:
  if (error)
    {
      fprintf (stderr, "guided evaluate: %s\n", error->message);
      g_error_free (error);
      if (status == 0)
        status = 1;
    }
  g_option_context_free (context);
  g_free (opt.model);
  g_free (opt.classifier);
  g_free (opt.judge);
  g_free (opt.data);
  g_free (opt.split);
  g_free (opt.scales);
  g_free (opt.grid);
  g_free (opt.table);
  g_free (opt.tsv);
  g_free (opt.samples_dir);
  return status;
}
