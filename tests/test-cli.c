/* The `guided sample` command: replay of the reference sampling runs (every step within
 * 2e-3), determinism across thread counts and batch positions, guidance having an effect,
 * and clear failures on bad input with nothing written. */
#include "gd-safetensors.h"

#include <glib.h>
#include <glib/gstdio.h>
#include <math.h>
#include <string.h>

static const char *guided;
static char *reference;
static char *tmpdir;

static gboolean
have_reference (void)
{
  if (g_file_test (reference, G_FILE_TEST_IS_DIR))
    return TRUE;
  char *msg = g_strdup_printf ("reference fixtures %s are missing", reference);
  g_printerr ("SKIP: %s\n", msg);
  g_test_skip (msg);
  g_free (msg);
  return FALSE;
}

static char *
ref_path (const char *a, const char *b)
{
  return g_build_filename (reference, a, b, NULL);
}

static char *
tmp_path (const char *name)
{
  return g_build_filename (tmpdir, name, NULL);
}

/* TRUE: run_guided leaves OMP_WAIT_POLICY out of the environment (guided then starts
 * itself again with it set). */
static gboolean drop_wait_policy;

/* Runs guided with the given arguments (NULL-terminated) and extra environment. */
static int
run_guided (char **err, const char *env_threads, ...)
{
  GPtrArray *args = g_ptr_array_new ();
  g_ptr_array_add (args, (char *) guided);
  va_list ap;
  va_start (ap, env_threads);
  for (const char *a; (a = va_arg (ap, const char *));)
    g_ptr_array_add (args, (char *) a);
  va_end (ap);
  g_ptr_array_add (args, NULL);
  char **env = g_get_environ ();
  if (env_threads)
    env = g_environ_setenv (env, "GD_THREADS", env_threads, TRUE);
  if (drop_wait_policy)
    env = g_environ_unsetenv (env, "OMP_WAIT_POLICY");
  int status = -1;
  char *out = NULL, *errtext = NULL;
  GError *error = NULL;
  g_spawn_sync (NULL, (char **) args->pdata, env, G_SPAWN_DEFAULT, NULL, NULL, &out, &errtext,
                &status, &error);
  g_assert_no_error (error);
  g_strfreev (env);
  g_ptr_array_unref (args);
  g_free (out);
  if (err)
    *err = errtext;
  else
    g_free (errtext);
  return g_spawn_check_wait_status (status, NULL) ? 0 : (WIFEXITED (status) ? WEXITSTATUS (status) : -1);
}

static float *
read_tensor (const char *path, const char *name, int64_t *numel, int64_t *steps)
{
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (path, &error);
  g_assert_no_error (error);
  const GdStTensor *t = gd_safetensors_find (st, name);
  g_assert_nonnull (t);
  float *data = gd_st_tensor_to_f32 (t);
  *numel = t->numel;
  if (steps)
    *steps = t->shape[0];
  gd_safetensors_free (st);
  return data;
}

static void
test_replay (gconstpointer data)
{
  const char *fixture = data;
  if (!have_reference ())
    return;
  char *dir = ref_path ("sampling", fixture);
  char *trace = tmp_path ("trace.safetensors");
  char *io = g_build_filename (dir, "io.safetensors", NULL);
  char *err = NULL;
  int status = run_guided (&err, NULL, "sample", "--replay", dir, "--trace", trace, NULL);
  if (status != 0)
    g_error ("replay of %s failed: %s", fixture, err);
  g_free (err);
  const char *names[] = { "samples", "pred_xstart" };
  for (int k = 0; k < 2; k++)
    {
      int64_t n_got, n_ref, steps;
      float *got = read_tensor (trace, names[k], &n_got, &steps);
      float *ref = read_tensor (io, names[k], &n_ref, NULL);
      g_assert_cmpint (n_got, ==, n_ref);
      int64_t per = n_got / steps;
      double worst = 0.0;
      for (int64_t s = 0; s < steps; s++)
        {
          double step_max = 0.0;
          for (int64_t i = s * per; i < (s + 1) * per; i++)
            step_max = MAX (step_max, fabs ((double) got[i] - ref[i]));
          if (!(step_max <= 2e-3))
            g_error ("%s %s step %" G_GINT64_FORMAT ": max |a - b| = %g exceeds 2e-3",
                     fixture, names[k], s, step_max);
          worst = MAX (worst, step_max);
        }
      g_test_message ("%s %s: worst step max |a - b| = %.3g over %" G_GINT64_FORMAT " steps",
                      fixture, names[k], worst, steps);
      g_free (got);
      g_free (ref);
    }
  g_unlink (trace);
  g_free (dir);
  g_free (trace);
  g_free (io);
}

/* Samples of the tiny class-conditional model guided by the tiny classifier. */
static float *
sample_tensor (const char *threads, const char *seed, const char *batch, const char *scale,
               const char *sampler, int64_t *numel)
{
  char *model = ref_path ("unet/tiny_cond_learnsigma", "model.safetensors");
  char *classifier = ref_path ("classifier/tiny_attnpool", "model.safetensors");
  char *png = tmp_path ("sample.png"), *tensor = tmp_path ("sample.safetensors");
  char *err = NULL;
  int status = run_guided (&err, threads, "sample", "--model", model, "--classifier", classifier,
                           "--class", "3", "--steps", "8", "--sampler", sampler, "--eta", "0.5",
                           "--seed", seed, "--batch", batch, "--scale", scale, "-o", png,
                           "--tensor", tensor, NULL);
  if (status != 0)
    g_error ("guided sample failed: %s", err);
  g_assert_true (g_file_test (png, G_FILE_TEST_IS_REGULAR));
  float *x = read_tensor (tensor, "x0", numel, NULL);
  g_free (err);
  g_free (model);
  g_free (classifier);
  g_free (png);
  g_free (tensor);
  return x;
}

static void
test_thread_count_determinism (void)
{
  if (!have_reference ())
    return;
  const char *samplers[] = { "ddpm", "ddim" };
  for (int s = 0; s < 2; s++)
    {
      int64_t n1, n2;
      float *one = sample_tensor ("1", "11", "4", "10", samplers[s], &n1);
      float *two = sample_tensor ("2", "11", "4", "10", samplers[s], &n2);
      g_assert_cmpint (n1, ==, n2);
      g_assert_cmpint (memcmp (one, two, sizeof (float) * n1), ==, 0);
      /* without OMP_WAIT_POLICY guided starts itself again once, and computes the same */
      drop_wait_policy = TRUE;
      int64_t n3;
      float *again = sample_tensor ("2", "11", "4", "10", samplers[s], &n3);
      drop_wait_policy = FALSE;
      g_assert_cmpint (n3, ==, n1);
      g_assert_cmpint (memcmp (one, again, sizeof (float) * n1), ==, 0);
      g_free (again);
      g_free (one);
      g_free (two);
    }
}

/* Image j of a batch with seed S is the single image of seed S + j: the same random
 * numbers, and the same arithmetic up to float rounding (a batch runs each layer as one
 * larger matrix product, whose blocking differs from a single image's). */
static void
test_batch_position_independence (void)
{
  if (!have_reference ())
    return;
  int64_t n_batch, n_single;
  float *batch = sample_tensor (NULL, "20", "3", "10", "ddpm", &n_batch);
  float *single = sample_tensor (NULL, "22", "1", "10", "ddpm", &n_single);
  g_assert_cmpint (n_batch, ==, 3 * n_single);
  double worst = 0.0;
  for (int64_t i = 0; i < n_single; i++)
    worst = MAX (worst, fabs (batch[2 * n_single + i] - single[i]));
  g_test_message ("batch image 2 vs single image: max |a - b| = %.3g", worst);
  g_assert_cmpfloat (worst, <=, 1e-4);
  g_free (batch);
  g_free (single);
}

static void
test_guidance_changes_result (void)
{
  if (!have_reference ())
    return;
  int64_t n0, n1;
  float *plain = sample_tensor (NULL, "3", "2", "0", "ddim", &n0);
  float *guided_x = sample_tensor (NULL, "3", "2", "10", "ddim", &n1);
  double diff = 0.0;
  for (int64_t i = 0; i < n0; i++)
    diff += fabs (plain[i] - guided_x[i]);
  diff /= (double) n0;
  g_test_message ("mean |guided - unguided| = %.3g", diff);
  g_assert_cmpfloat (diff, >, 1e-2);
  g_free (plain);
  g_free (guided_x);
}

/* A copy of the tiny classifier whose metadata names its classes. */
static char *
labelled_classifier (void)
{
  char *src = ref_path ("classifier/tiny_attnpool", "model.safetensors");
  char *dst = tmp_path ("labelled.safetensors");
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (src, &error);
  g_assert_no_error (error);
  GdStWriter *w = gd_st_writer_new ();
  gd_st_writer_set_metadata (w, "kind", gd_safetensors_metadata (st, "kind"));
  gd_st_writer_set_metadata (w, "config", gd_safetensors_metadata (st, "config"));
  gd_st_writer_set_metadata (w, "labels", "[\"airplane\", \"automobile\", \"bird\", \"cat\", \"deer\","
                                          " \"dog\", \"frog\", \"horse\", \"ship\", \"truck\"]");
  for (guint i = 0; i < gd_safetensors_count (st); i++)
    {
      const GdStTensor *t = gd_safetensors_nth (st, i);
      gd_st_writer_add (w, t->name, t->dtype, t->ndim, t->shape, t->data);
    }
  g_assert_true (gd_st_writer_write (w, dst, &error));
  gd_st_writer_free (w);
  gd_safetensors_free (st);
  g_free (src);
  return dst;
}

/* Runs a failing sample command: non-zero exit, one line on stderr naming the cause,
 * and no output file. */
static void
expect_failure (const char *what, const char *expected, const char *output, ...)
{
  GPtrArray *args = g_ptr_array_new ();
  g_ptr_array_add (args, (char *) guided);
  g_ptr_array_add (args, (char *) "sample");
  va_list ap;
  va_start (ap, output);
  for (const char *a; (a = va_arg (ap, const char *));)
    g_ptr_array_add (args, (char *) a);
  va_end (ap);
  g_ptr_array_add (args, (char *) "-o");
  g_ptr_array_add (args, (char *) output);
  g_ptr_array_add (args, NULL);
  char *out = NULL, *err = NULL;
  int status = 0;
  GError *error = NULL;
  g_spawn_sync (NULL, (char **) args->pdata, NULL, G_SPAWN_DEFAULT, NULL, NULL, &out, &err,
                &status, &error);
  g_assert_no_error (error);
  if (g_spawn_check_wait_status (status, NULL))
    g_error ("%s: expected a failure, got success", what);
  if (!strstr (err, expected))
    g_error ("%s: stderr \"%s\" lacks \"%s\"", what, err, expected);
  const char *newline = strchr (err, '\n');
  if (!newline || newline[1] != '\0')
    g_error ("%s: expected one line on stderr, got \"%s\"", what, err);
  g_assert_false (g_file_test (output, G_FILE_TEST_EXISTS));
  g_test_message ("%s: %s", what, g_strchomp (err));
  g_free (out);
  g_free (err);
  g_ptr_array_unref (args);
}

/* --bf16: both models' convolutions in bfloat16.  With the shipped Fashion-MNIST models,
 * 5 guided steps from the same noise: the same picture as float's to the eye (on average
 * within 1/255 of the range, no pixel off by more than 8/255), yet not identical (the
 * products did run in bf16), and the same for 1 and 2 threads.  Where the processor has no
 * bf16 product: a clear error. */
static void
test_bf16 (void)
{
  const char *source = g_getenv ("GD_SOURCE_DIR");
  g_assert_nonnull (source);
  char *model = g_build_filename (source, "data", "models", "default-unet.safetensors", NULL);
  char *classifier = g_build_filename (source, "data", "models", "default-classifier.safetensors", NULL);
  char *png = tmp_path ("bf16.png"), *exact = tmp_path ("exact.safetensors");
  char *rounded = tmp_path ("bf16.safetensors"), *err = NULL;
  int status = run_guided (&err, NULL, "sample", "--model", model, "--classifier", classifier,
                           "--each-class", "--steps", "5", "--seed", "3", "--scale", "4",
                           "-o", png, "--tensor", exact, NULL);
  if (status != 0)
    g_error ("guided sample failed: %s", err);
  g_clear_pointer (&err, g_free);
  status = run_guided (&err, "2", "sample", "--model", model, "--classifier", classifier,
                       "--each-class", "--steps", "5", "--seed", "3", "--scale", "4", "--bf16",
                       "-o", png, "--tensor", rounded, NULL);
  if (status != 0 && err && strstr (err, "bf16 needs a processor"))
    {
      g_printerr ("SKIP (bf16 sampling): %s", err);
      g_test_skip ("this processor has no bf16 product");
    }
  else
    {
      if (status != 0)
        g_error ("guided sample --bf16 failed: %s", err);
      int64_t count, count_bf16;
      float *a = read_tensor (exact, "x0", &count, NULL), *b = read_tensor (rounded, "x0", &count_bf16, NULL);
      g_assert_cmpint (count, ==, count_bf16);
      double worst = 0.0, sum = 0.0;
      for (int64_t i = 0; i < count; i++)
        {
          double d = fabs (a[i] - b[i]);
          worst = MAX (worst, d);
          sum += d;
        }
      /* samples span [-1, 1]: 1/255 of the range is 2/255 */
      g_test_message ("--bf16 against float, 5 steps: mean |a - b| %.3g, max %.3g", sum / count, worst);
      g_assert_cmpfloat (worst, >, 0.0);
      g_assert_cmpfloat (sum / count, <=, 2.0 / 255);
      g_assert_cmpfloat (worst, <=, 16.0 / 255);
      g_clear_pointer (&err, g_free);
      g_assert_cmpint (run_guided (&err, "1", "sample", "--model", model, "--classifier", classifier,
                                   "--each-class", "--steps", "5", "--seed", "3", "--scale", "4",
                                   "--bf16", "-o", png, "--tensor", exact, NULL), ==, 0);
      int64_t count_one;
      float *one = read_tensor (exact, "x0", &count_one, NULL);
      g_assert_cmpint (count_one, ==, count);
      g_assert_cmpmem (one, sizeof (float) * count, b, sizeof (float) * count);
      g_free (one);
      g_free (a);
      g_free (b);
      g_unlink (rounded);
    }
  g_free (err);
  g_unlink (png);
  g_unlink (exact);
  g_free (model);
  g_free (classifier);
  g_free (png);
  g_free (exact);
  g_free (rounded);
}

/* --each-class: B images of every class in class order; image i is the one a single run
 * of its class with seed + i makes.  Bad combinations fail before sampling. */
static void
test_each_class (void)
{
  if (!have_reference ())
    return;
  char *model = ref_path ("unet/tiny_cond_learnsigma", "model.safetensors");
  char *uncond = ref_path ("unet/tiny_uncond_legacy", "model.safetensors");
  char *classifier = ref_path ("classifier/tiny_attnpool", "model.safetensors");
  char *png = tmp_path ("each.png"), *tensor = tmp_path ("each.safetensors");
  char *single = tmp_path ("single.safetensors"), *err = NULL;
  int status = run_guided (&err, NULL, "sample", "--model", model, "--classifier", classifier,
                           "--each-class", "--batch", "2", "--steps", "3", "--seed", "40",
                           "--scale", "5", "-o", png, "--tensor", tensor, NULL);
  if (status != 0)
    g_error ("guided sample --each-class failed: %s", err);
  g_free (err);
  status = run_guided (&err, NULL, "sample", "--model", model, "--classifier", classifier,
                       "--class", "3", "--batch", "1", "--steps", "3", "--seed", "47",
                       "--scale", "5", "-o", png, "--tensor", single, NULL);
  g_assert_cmpint (status, ==, 0);
  int64_t n_all, n_one;
  float *all = read_tensor (tensor, "x0", &n_all, NULL), *one = read_tensor (single, "x0", &n_one, NULL);
  g_assert_cmpint (n_all, ==, 20 * n_one);
  double worst = 0.0;
  for (int64_t i = 0; i < n_one; i++)
    worst = MAX (worst, fabs (all[7 * n_one + i] - one[i]));
  g_test_message ("--each-class image 7 vs class 3 alone with seed 47: max |a - b| = %.3g", worst);
  g_assert_cmpfloat (worst, <=, 1e-4);
  g_unlink (png);
  char *bad = tmp_path ("each-bad.png");
  expect_failure ("--each-class with --class", "give one of --class, --label and --each-class",
                  bad, "--model", model, "--classifier", classifier, "--each-class", "--class", "1", NULL);
  expect_failure ("--each-class without classes", "--each-class needs a classifier", bad,
                  "--model", uncond, "--each-class", NULL);
  expect_failure ("--each-class, too many", "more than 1024", bad, "--model", model,
                  "--classifier", classifier, "--each-class", "--batch", "200", NULL);
  g_unlink (tensor);
  g_unlink (single);
  g_free (all);
  g_free (one);
  g_free (bad);
  g_free (err);
  g_free (model);
  g_free (uncond);
  g_free (classifier);
  g_free (png);
  g_free (tensor);
  g_free (single);
}

static void
test_bad_input (void)
{
  if (!have_reference ())
    return;
  char *model = ref_path ("unet/tiny_cond_learnsigma", "model.safetensors");
  char *uncond = ref_path ("unet/tiny_uncond_legacy", "model.safetensors");
  char *gray_classifier = ref_path ("classifier/gray28_attnpool", "model.safetensors");
  char *labelled = labelled_classifier ();
  char *out = tmp_path ("never.png");

  expect_failure ("unknown label", "unknown label 'dgo'", out, "--model", model,
                  "--classifier", labelled, "--label", "dgo", NULL);
  expect_failure ("unknown label lists close matches", "close matches: 'dog' (5)", out,
                  "--model", model, "--classifier", labelled, "--label", "dgo", NULL);
  expect_failure ("label without a list", "--label needs a model or classifier with a label list",
                  out, "--model", uncond, "--label", "dog", NULL);
  expect_failure ("class out of range", "class 12 is out of range", out, "--model", model,
                  "--classifier", labelled, "--class", "12", NULL);
  expect_failure ("class out of range for the model", "class 10 is out of range", out,
                  "--model", model, "--class", "10", NULL);
  expect_failure ("classifier that does not fit", "does not fit the model's 3 channels at 16x16",
                  out, "--model", uncond, "--classifier", gray_classifier, "--class", "1", NULL);
  expect_failure ("invalid respacing", "invalid respacing 'ddim999'", out, "--model", uncond,
                  "--respacing", "ddim999", NULL);
  expect_failure ("invalid respacing", "invalid respacing 'ten'", out, "--model", uncond,
                  "--respacing", "ten", NULL);
  expect_failure ("unknown sampler", "unknown sampler 'euler'", out, "--model", uncond,
                  "--sampler", "euler", NULL);
  expect_failure ("unwritable output", "/nonexistent-folder/x.png: folder is not writable",
                  "/nonexistent-folder/x.png", "--model", uncond, "--steps", "2", NULL);
  expect_failure ("missing model file", "no-such-model.safetensors", out,
                  "--model", "no-such-model.safetensors", NULL);

  char *gray_model = ref_path ("unet/gray28_uncond", "model.safetensors");
  char *list = g_build_filename (reference, "..", "labels", "fashion-mnist.tsv", NULL);
  expect_failure ("unknown label from a list file", "close matches: 'Shirt' (6)", out,
                  "--model", gray_model, "--classifier", gray_classifier, "--labels", list,
                  "--label", "shirts", NULL);
  expect_failure ("missing list file", "no-such-list.tsv", out, "--model", gray_model,
                  "--classifier", gray_classifier, "--labels", "no-such-list.tsv",
                  "--label", "Shirt", NULL);
  g_free (gray_model);
  g_free (list);

  /* a label that exists works, case-insensitively */
  char *err = NULL;
  int status = run_guided (&err, NULL, "sample", "--model", model, "--classifier", labelled,
                           "--label", "Dog", "--steps", "2", "--seed", "1", "-o", out, NULL);
  if (status != 0)
    g_error ("--label Dog failed: %s", err);
  g_assert_true (g_file_test (out, G_FILE_TEST_IS_REGULAR));
  g_unlink (out);
  g_unlink (labelled);
  g_free (err);
  g_free (model);
  g_free (uncond);
  g_free (gray_classifier);
  g_free (labelled);
  g_free (out);
}

/* guided evaluate on the random-weight 28x28 fixtures: the table has a row per scale with
 * numbers in range (the networks are untrained, so only the mechanics are judged). */
static void
test_evaluate (void)
{
  const char *fashion = "/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz";
  if (!have_reference ())
    return;
  if (!g_file_test (fashion, G_FILE_TEST_EXISTS))
    {
      g_printerr ("SKIP: %s is missing (Debian package dataset-fashion-mnist)\n", fashion);
      g_test_skip ("Fashion-MNIST test set missing");
      return;
    }
  char *model = ref_path ("unet/gray28_uncond", "model.safetensors");
  char *classifier = ref_path ("classifier/gray28_attnpool", "model.safetensors");
  char *tsv = tmp_path ("evaluate.tsv"), *grid = tmp_path ("evaluate.png");
  char *samples = tmp_path ("evaluate-samples"), *err = NULL;
  int status = run_guided (&err, NULL, "evaluate", "-m", model, "-c", classifier, "-j", classifier,
                           "-d", "/usr/share/datasets/fashion-mnist", "--test-images", "100",
                           "--samples", "20", "--batch", "10", "--steps", "2", "--scales", "0,8",
                           "--tsv", tsv, "--grid", grid, "--samples-dir", samples, NULL);
  if (status != 0)
    g_error ("guided evaluate failed: %s", err);
  char *text = NULL;
  g_assert_true (g_file_get_contents (tsv, &text, NULL, NULL));
  /* the samples were kept, a batch a file; a rerun takes them and gives the same numbers */
  const char *kept[] = { "made-with", "scale-0-from-0.f32", "scale-0-from-10.f32",
                         "scale-8-from-0.f32", "scale-8-from-10.f32" };
  for (guint i = 0; i < G_N_ELEMENTS (kept); i++)
    {
      char *path = g_build_filename (samples, kept[i], NULL);
      g_assert_true (g_file_test (path, G_FILE_TEST_IS_REGULAR));
      g_free (path);
    }
  char *tsv_again = tmp_path ("evaluate-again.tsv"), *text_again = NULL;
  g_free (err);
  status = run_guided (&err, NULL, "evaluate", "-m", model, "-c", classifier, "-j", classifier,
                       "-d", "/usr/share/datasets/fashion-mnist", "--test-images", "100",
                       "--samples", "20", "--batch", "10", "--steps", "2", "--scales", "0,8",
                       "--tsv", tsv_again, "--samples-dir", samples, NULL);
  g_assert_cmpint (status, ==, 0);
  g_assert_true (g_file_get_contents (tsv_again, &text_again, NULL, NULL));
  g_assert_cmpstr (text, ==, text_again);
  /* other settings do not mix with them */
  g_free (err);
  status = run_guided (&err, NULL, "evaluate", "-m", model, "-c", classifier, "-j", classifier,
                       "-d", "/usr/share/datasets/fashion-mnist", "--test-images", "100",
                       "--samples", "20", "--batch", "10", "--steps", "3", "--scales", "0,8",
                       "--samples-dir", samples, NULL);
  g_assert_cmpint (status, !=, 0);
  g_assert_nonnull (strstr (err, "other models or settings"));
  for (guint i = 0; i < G_N_ELEMENTS (kept); i++)
    {
      char *path = g_build_filename (samples, kept[i], NULL);
      g_unlink (path);
      g_free (path);
    }
  g_rmdir (samples);
  g_unlink (tsv_again);
  g_free (tsv_again);
  g_free (text_again);
  g_free (samples);
  char **lines = g_strsplit (g_strchomp (text), "\n", -1);
  g_assert_cmpuint (g_strv_length (lines), ==, 3);
  for (int i = 1; i < 3; i++)
    {
      double scale, accuracy, frechet, variety;
      g_assert_cmpint (sscanf (lines[i], "%lf\t%lf\t%lf\t%lf", &scale, &accuracy, &frechet, &variety), ==, 4);
      g_assert_cmpfloat (scale, ==, i == 1 ? 0.0 : 8.0);
      g_assert_cmpfloat (accuracy, >=, 0.0);
      g_assert_cmpfloat (accuracy, <=, 1.0);
      g_assert_cmpfloat (frechet, >=, -1e-6);
      g_assert_cmpfloat (variety, >, 0.0);
    }
  g_assert_true (g_file_test (grid, G_FILE_TEST_IS_REGULAR));
  g_strfreev (lines);
  g_free (text);
  g_unlink (tsv);
  g_unlink (grid);
  g_free (tsv);
  g_free (grid);
  g_free (err);
  g_free (model);
  g_free (classifier);
}

/* A PyTorch checkpoint that is not a release, with its architecture given on the command
 * line, samples exactly what its safetensors twin does. */
static void
test_pt_with_config (void)
{
  if (!have_reference ())
    return;
  char *names[2][3] = { { NULL } };
  const char *fixtures[2] = { "unet/tiny_cond_learnsigma", "classifier/tiny_attnpool" };
  for (int i = 0; i < 2; i++)
    {
      names[i][0] = ref_path (fixtures[i], "model.pt");
      names[i][1] = ref_path (fixtures[i], "config.json");
      names[i][2] = ref_path (fixtures[i], "model.safetensors");
    }
  char *png = tmp_path ("pt.png"), *from_pt = tmp_path ("pt.safetensors"), *from_st = tmp_path ("st.safetensors");
  char *err = NULL;
  int status = run_guided (&err, NULL, "sample", "-m", names[0][0], "--model-config", names[0][1],
                           "-c", names[1][0], "--classifier-config", names[1][1], "--class", "2",
                           "--steps", "4", "--seed", "4", "-o", png, "--tensor", from_pt, NULL);
  if (status != 0)
    g_error ("sampling from .pt files failed: %s", err);
  g_free (err);
  status = run_guided (&err, NULL, "sample", "-m", names[0][2], "-c", names[1][2], "--class", "2",
                       "--steps", "4", "--seed", "4", "-o", png, "--tensor", from_st, NULL);
  g_assert_cmpint (status, ==, 0);
  g_free (err);
  int64_t n_pt, n_st;
  float *a = read_tensor (from_pt, "x0", &n_pt, NULL), *b = read_tensor (from_st, "x0", &n_st, NULL);
  g_assert_cmpint (n_pt, ==, n_st);
  g_assert_cmpint (memcmp (a, b, sizeof (float) * n_pt), ==, 0);
  /* without the override the file is refused with the reason */
  status = run_guided (&err, NULL, "sample", "-m", names[0][0], "--class", "2", "--steps", "2",
                       "-o", png, NULL);
  g_assert_cmpint (status, !=, 0);
  g_assert_nonnull (strstr (err, "model.pt"));
  g_free (err);
  for (int i = 0; i < 2; i++)
    for (int j = 0; j < 3; j++)
      g_free (names[i][j]);
  g_unlink (png);
  g_unlink (from_pt);
  g_unlink (from_st);
  g_free (png);
  g_free (from_pt);
  g_free (from_st);
  g_free (a);
  g_free (b);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  guided = g_getenv ("GUIDED");
  if (!guided)
    g_error ("GUIDED (path of the guided command) is not set");
  const char *dir = g_getenv ("GD_REFERENCE_DIR");
  reference = g_strdup (dir ? dir : "../shared/reference");
  tmpdir = g_dir_make_tmp ("gd-cli-XXXXXX", NULL);
  static const char *fixtures[] = { "ddpm_guided", "ddim_guided", "ddpm_uncond_fixedvar",
                                    "ddim_eta_cosine_gray" };
  for (guint i = 0; i < G_N_ELEMENTS (fixtures); i++)
    {
      char *name = g_strconcat ("/cli/replay/", fixtures[i], NULL);
      g_test_add_data_func (name, fixtures[i], test_replay);
      g_free (name);
    }
  g_test_add_func ("/cli/determinism/thread-count", test_thread_count_determinism);
  g_test_add_func ("/cli/determinism/batch-position", test_batch_position_independence);
  g_test_add_func ("/cli/guidance-changes-result", test_guidance_changes_result);
  g_test_add_func ("/cli/bad-input", test_bad_input);
  g_test_add_func ("/cli/each-class", test_each_class);
  g_test_add_func ("/cli/bf16", test_bf16);
  g_test_add_func ("/cli/evaluate", test_evaluate);
  g_test_add_func ("/cli/pt-with-config", test_pt_with_config);
  int status = g_test_run ();
  char *png = tmp_path ("sample.png"), *tensor = tmp_path ("sample.safetensors");
  g_unlink (png);
  g_unlink (tensor);
  g_rmdir (tmpdir);
  g_free (png);
  g_free (tensor);
  g_free (tmpdir);
  g_free (reference);
  return status;
}
