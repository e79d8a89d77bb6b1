/* guided train: a tiny model overfits a tiny data set, a killed run resumed from its
 * checkpoint ends exactly where an unbroken run does, and bad data sets fail clearly
 * before any training. */
#include "gd-dataset.h"
#include "gd-safetensors.h"
#include "gd-trainer.h"

#include <glib.h>
#include <glib/gstdio.h>
#include <math.h>
#include <png.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>

static const char *guided;
static char *tmpdir;

static char *
tmp_path (const char *name)
{
  return g_build_filename (tmpdir, name, NULL);
}

/* count 8x8 images of simple class-dependent patterns (a bar whose row is the class). */
static guint8 *
pattern_images (int count, int classes, guint8 *labels)
{
  guint8 *pixels = g_new0 (guint8, (size_t) count * 64);
  for (int i = 0; i < count; i++)
    {
      labels[i] = (guint8) (i % classes);
      for (int x = 0; x < 8; x++)
        {
          pixels[i * 64 + (labels[i] * 2) * 8 + x] = 255;
          pixels[i * 64 + ((i * 3) % 8) * 8 + x] |= 96;
        }
    }
  return pixels;
}

static void
write_idx (const char *path, const guint8 *data, int rank, const int *dims)
{
  GString *s = g_string_new (NULL);
  g_string_append_c (s, 0);
  g_string_append_c (s, 0);
  g_string_append_c (s, 8);
  g_string_append_c (s, (char) rank);
  size_t total = 1;
  for (int i = 0; i < rank; i++)
    {
      for (int b = 3; b >= 0; b--)
        g_string_append_c (s, (char) ((dims[i] >> (8 * b)) & 0xff));
      total *= (size_t) dims[i];
    }
  g_string_append_len (s, (const char *) data, (gssize) total);
  g_assert_true (g_file_set_contents (path, s->str, (gssize) s->len, NULL));
  g_string_free (s, TRUE);
}

static char *
write_config (const char *name, const char *kind, const char *model, int batch, int steps,
              const char *extra)
{
  char *path = tmp_path (name);
  char *text = g_strdup_printf ("{\"kind\": \"%s\", \"model\": %s, \"batch_size\": %d, \"steps\": %d,"
                                " \"lr\": 0.002, \"ema_rate\": 0.9, \"seed\": 3%s}",
                                kind, model, batch, steps, extra);
  g_assert_true (g_file_set_contents (path, text, -1, NULL));
  g_free (text);
  return path;
}

static const char *tiny_unet =
    "{\"image_size\": 8, \"in_channels\": 1, \"model_channels\": 32, \"out_channels\": 1,"
    " \"num_res_blocks\": 1, \"attention_resolutions\": [2], \"channel_mult\": [1, 1],"
    " \"num_head_channels\": 32, \"use_scale_shift_norm\": true, \"resblock_updown\": true}";

static const char *tiny_classifier =
    "{\"image_size\": 8, \"in_channels\": 1, \"model_channels\": 32, \"out_channels\": 4,"
    " \"num_res_blocks\": 1, \"attention_resolutions\": [2], \"channel_mult\": [1, 1],"
    " \"num_head_channels\": 32, \"use_scale_shift_norm\": true, \"resblock_updown\": true,"
    " \"pool\": \"attention\"}";

static GdDataset *
pattern_dataset (int count, int classes)
{
  guint8 labels[64];
  guint8 *pixels = pattern_images (count, classes, labels);
  GdDataset *d = gd_dataset_new (count, 1, 8, 8);
  for (int i = 0; i < count * 64; i++)
    d->images[i] = pixels[i] / 127.5f - 1.0f;
  for (int i = 0; i < count; i++)
    d->labels[i] = labels[i];
  g_free (pixels);
  return d;
}

/* Mean loss over the first and the last `window` steps of a run. */
static void
overfit (const char *kind, const char *model, const char *extra, int steps, double *first, double *last)
{
  char *json = g_strdup_printf ("{\"kind\": \"%s\", \"model\": %s, \"batch_size\": 4, \"steps\": %d,"
                                " \"lr\": 0.002, \"seed\": 5, \"warmup_steps\": 10%s}", kind, model,
                                steps, extra);
  GdTrainConfig cfg;
  GError *error = NULL;
  g_assert_true (gd_train_config_parse (&cfg, json, "test", &error));
  GdDataset *data = pattern_dataset (4, 4);
  GdTrainer *tr = gd_trainer_new (&cfg, data, &error);
  g_assert_no_error (error);
  const int window = 20;
  double sum_first = 0, sum_last = 0;
  for (int s = 0; s < steps; s++)
    {
      double loss;
      g_assert_true (gd_trainer_step (tr, &loss, &error));
      if (s < window)
        sum_first += loss;
      if (s >= steps - window)
        sum_last += loss;
    }
  *first = sum_first / window;
  *last = sum_last / window;
  gd_trainer_free (tr);
  gd_dataset_free (data);
  g_free (json);
}

static void
test_overfit_classifier (void)
{
  double first, last;
  overfit ("classifier", tiny_classifier, ", \"noised\": false", 100, &first, &last);
  g_test_message ("classifier on 4 clean images: cross-entropy %.3f -> %.3f", first, last);
  /* ln 4 = 1.39 is chance */
  g_assert_cmpfloat (last, <, 0.05);
}

static void
test_overfit_diffusion (void)
{
  double first, last;
  overfit ("unet", tiny_unet, "", 300, &first, &last);
  g_test_message ("diffusion model on 4 images: mse %.3f -> %.3f", first, last);
  g_assert_cmpfloat (last, <, 0.35);
  g_assert_cmpfloat (last, <, 0.5 * first);
}

/* Writes 16 pattern images as IDX files in a folder of their own. */
static char *
idx_folder (void)
{
  char *dir = tmp_path ("idx");
  g_mkdir_with_parents (dir, 0755);
  guint8 labels[16];
  guint8 *pixels = pattern_images (16, 4, labels);
  int image_dims[3] = { 16, 8, 8 }, label_dims[1] = { 16 };
  char *images = g_build_filename (dir, "train-images-idx3-ubyte", NULL);
  char *label_path = g_build_filename (dir, "train-labels-idx1-ubyte", NULL);
  write_idx (images, pixels, 3, image_dims);
  write_idx (label_path, labels, 1, label_dims);
  g_free (images);
  g_free (label_path);
  g_free (pixels);
  return dir;
}

static int
spawn_wait (char **argv, char **err)
{
  int status = 0;
  GError *error = NULL;
  g_spawn_sync (NULL, argv, NULL, G_SPAWN_DEFAULT, NULL, NULL, NULL, err, &status, &error);
  g_assert_no_error (error);
  return status;
}

static void
assert_same_models (const char *a, const char *b)
{
  GError *error = NULL;
  GdSafetensors *sa = gd_safetensors_open (a, &error), *sb = gd_safetensors_open (b, &error);
  g_assert_no_error (error);
  g_assert_cmpuint (gd_safetensors_count (sa), ==, gd_safetensors_count (sb));
  for (guint i = 0; i < gd_safetensors_count (sa); i++)
    {
      const GdStTensor *ta = gd_safetensors_nth (sa, i);
      const GdStTensor *tb = gd_safetensors_find (sb, ta->name);
      g_assert_nonnull (tb);
      g_assert_cmpuint (ta->nbytes, ==, tb->nbytes);
      if (memcmp (ta->data, tb->data, ta->nbytes) != 0)
        g_error ("%s differs between %s and %s", ta->name, a, b);
    }
  gd_safetensors_free (sa);
  gd_safetensors_free (sb);
}

static void
test_resume_after_kill (void)
{
  char *data = idx_folder ();
  /* checkpoints every 0.03 s, so that one is on disk long before the run ends */
  char *config = write_config ("resume.json", "unet", tiny_unet, 4, 150, ", \"checkpoint_minutes\": 0.0005");
  char *whole = tmp_path ("whole.safetensors"), *resumed = tmp_path ("resumed.safetensors");
  char *checkpoint = g_strconcat (resumed, ".ckpt", NULL);

  char *unbroken[] = { (char *) guided, "train", "diffusion", "--data", data, "--config", config,
                       "-o", whole, NULL };
  char *err = NULL;
  int status = spawn_wait (unbroken, &err);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("unbroken run failed: %s", err);
  g_free (err);

  char *argv[] = { (char *) guided, "train", "diffusion", "--data", data, "--config", config,
                   "-o", resumed, "--resume", NULL };
  GPid pid;
  GError *error = NULL;
  g_assert_true (g_spawn_async (NULL, argv, NULL, G_SPAWN_DO_NOT_REAP_CHILD | G_SPAWN_STDERR_TO_DEV_NULL,
                                NULL, NULL, &pid, &error));
  for (int i = 0; i < 2000 && !g_file_test (checkpoint, G_FILE_TEST_EXISTS); i++)
    g_usleep (5000);
  g_assert_true (g_file_test (checkpoint, G_FILE_TEST_EXISTS));
  kill (pid, SIGKILL);
  int wait_status;
  waitpid (pid, &wait_status, 0);
  g_spawn_close_pid (pid);
  g_assert_true (WIFSIGNALED (wait_status));
  g_assert_false (g_file_test (resumed, G_FILE_TEST_EXISTS));

  GdSafetensors *ckpt = gd_safetensors_open (checkpoint, &error);
  g_assert_no_error (error);
  gint64 killed_at = g_ascii_strtoll (gd_safetensors_metadata (ckpt, "step"), NULL, 10);
  gd_safetensors_free (ckpt);
  g_test_message ("killed with a checkpoint at step %" G_GINT64_FORMAT " of 150", killed_at);
  g_assert_cmpint (killed_at, <, 150);

  status = spawn_wait (argv, &err);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("resumed run failed: %s", err);
  g_assert_nonnull (strstr (err, "resumed"));
  g_free (err);
  assert_same_models (whole, resumed);
  /* the training time is summed over both runs and covers every step */
  GdSafetensors *model = gd_safetensors_open (resumed, &error);
  g_assert_no_error (error);
  const char *seconds = gd_safetensors_metadata (model, "training_seconds");
  g_assert_nonnull (seconds);
  double value = g_ascii_strtod (seconds, NULL);
  g_assert_cmpfloat (value, >=, 0.0);
  g_assert_cmpfloat (value, <, 600.0);
  g_assert_null (gd_safetensors_metadata (model, "training_seconds_from_step"));
  gd_safetensors_free (model);

  g_unlink (whole);
  g_unlink (resumed);
  g_unlink (checkpoint);
  g_unlink (config);
  g_free (whole);
  g_free (resumed);
  g_free (checkpoint);
  g_free (config);
  g_free (data);
}

/* Training gives the same weights with one thread and with two: gradients are summed in
 * fixed chunks of images, whatever the number of threads (batch 16: two chunks). */
static void
test_thread_count_independence (void)
{
  char *data = idx_folder ();
  char *config = write_config ("threads.json", "unet", tiny_unet, 16, 12, "");
  char *models[2] = { tmp_path ("threads-1.safetensors"), tmp_path ("threads-2.safetensors") };
  for (int t = 0; t < 2; t++)
    {
      char **env = g_environ_setenv (g_get_environ (), "GD_THREADS", t == 0 ? "1" : "2", TRUE);
      char *argv[] = { (char *) guided, "train", "diffusion", "--data", data, "--config", config,
                       "-o", models[t], NULL };
      int status = 0;
      char *err = NULL;
      GError *error = NULL;
      g_spawn_sync (NULL, argv, env, G_SPAWN_DEFAULT, NULL, NULL, NULL, &err, &status, &error);
      g_assert_no_error (error);
      if (!g_spawn_check_wait_status (status, NULL))
        g_error ("training with GD_THREADS=%d failed: %s", t + 1, err);
      g_free (err);
      g_strfreev (env);
    }
  assert_same_models (models[0], models[1]);
  for (int t = 0; t < 2; t++)
    {
      char *checkpoint = g_strconcat (models[t], ".ckpt", NULL);
      g_unlink (checkpoint);
      g_unlink (models[t]);
      g_free (checkpoint);
      g_free (models[t]);
    }
  g_unlink (config);
  g_free (config);
  g_free (data);
}

/* The learning-rate schedule: linear warm-up, constant, cosine decay to 0 over the last
 * lr_decay_steps; a run may be extended with a decay added on resume. */
static void
test_learning_rate_schedule (void)
{
  GdOptimSettings s = { .lr = 0.01, .warmup_steps = 10, .decay_steps = 100, .total_steps = 1000 };
  g_assert_cmpfloat (fabs (gd_optim_learning_rate (&s, 5) - 0.005), <, 1e-12);
  g_assert_cmpfloat (fabs (gd_optim_learning_rate (&s, 500) - 0.01), <, 1e-12);
  g_assert_cmpfloat (fabs (gd_optim_learning_rate (&s, 900) - 0.01), <, 1e-12);
  g_assert_cmpfloat (fabs (gd_optim_learning_rate (&s, 950) - 0.005), <, 1e-12);
  g_assert_cmpfloat (fabs (gd_optim_learning_rate (&s, 1000)), <, 1e-12);
  s.decay_steps = 0;
  g_assert_cmpfloat (fabs (gd_optim_learning_rate (&s, 1000) - 0.01), <, 1e-12);

  char *data = idx_folder ();
  char *plain = write_config ("decay-0.json", "unet", tiny_unet, 4, 6, "");
  char *annealed = write_config ("decay-1.json", "unet", tiny_unet, 4, 12, ", \"lr_decay_steps\": 6");
  char *model = tmp_path ("decay.safetensors"), *checkpoint = g_strconcat (model, ".ckpt", NULL);
  char *first[] = { (char *) guided, "train", "diffusion", "--data", data, "--config", plain,
                    "-o", model, NULL };
  char *second[] = { (char *) guided, "train", "diffusion", "--data", data, "--config", annealed,
                     "-o", model, "--resume", NULL };
  char *err = NULL;
  g_assert_true (g_spawn_check_wait_status (spawn_wait (first, &err), NULL));
  g_free (err);
  int status = spawn_wait (second, &err);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("resuming with a learning-rate decay added failed: %s", err);
  g_assert_nonnull (strstr (err, "resumed"));
  g_free (err);
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (model, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (gd_safetensors_metadata (st, "training_steps"), ==, "12");
  g_assert_nonnull (strstr (gd_safetensors_metadata (st, "training"), "\"lr_decay_steps\": 6"));
  gd_safetensors_free (st);
  g_unlink (model);
  g_unlink (checkpoint);
  g_unlink (plain);
  g_unlink (annealed);
  g_free (model);
  g_free (checkpoint);
  g_free (plain);
  g_free (annealed);
  g_free (data);
}

/* A failing train command: non-zero exit, the cause on stderr, no model written. */
static void
expect_train_failure (const char *what, const char *kind, const char *data, const char *config,
                      const char *expected)
{
  char *out = tmp_path ("never.safetensors");
  char *argv[] = { (char *) guided, "train", (char *) kind, "--data", (char *) data, "--config",
                   (char *) config, "-o", out, NULL };
  char *err = NULL;
  int status = spawn_wait (argv, &err);
  if (g_spawn_check_wait_status (status, NULL))
    g_error ("%s: expected a failure", what);
  if (!strstr (err, expected))
    g_error ("%s: stderr \"%s\" lacks \"%s\"", what, err, expected);
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
  g_test_message ("%s: %s", what, g_strchomp (err));
  g_free (err);
  g_free (out);
}

static void
write_png (const char *path, int width, int height, guint8 value)
{
  png_image image = { .version = PNG_IMAGE_VERSION, .width = (png_uint_32) width,
                      .height = (png_uint_32) height, .format = PNG_FORMAT_GRAY };
  guint8 *pixels = g_malloc ((size_t) width * height);
  memset (pixels, value, (size_t) width * height);
  g_assert_true (png_image_write_to_file (&image, path, 0, pixels, 0, NULL));
  g_free (pixels);
}

static void
test_bad_data (void)
{
  char *config = write_config ("bad.json", "unet", tiny_unet, 4, 5, "");
  char *classifier_config = write_config ("badc.json", "classifier", tiny_classifier, 4, 5, "");

  /* IDX problems */
  char *dir = tmp_path ("bad-idx");
  g_mkdir_with_parents (dir, 0755);
  char *images = g_build_filename (dir, "train-images-idx3-ubyte", NULL);
  char *labels = g_build_filename (dir, "train-labels-idx1-ubyte", NULL);
  g_assert_true (g_file_set_contents (images, "\x00\x00\x09\x03garbage", 11, NULL));
  expect_train_failure ("IDX of the wrong type", "diffusion", dir, config, "not an IDX file");
  guint8 label_bytes[4];
  guint8 *pixels = pattern_images (4, 4, label_bytes);
  int dims[3] = { 4, 8, 8 }, label_dims[1] = { 4 };
  write_idx (images, pixels, 3, dims);
  g_assert_true (g_file_set_contents (labels, "\x00\x00\x08\x01\x00\x00\x00\x04\x01", 9, NULL));
  expect_train_failure ("truncated IDX", "diffusion", dir, config, "truncated data");
  int big_dims[3] = { 2, 16, 8 }, two[1] = { 2 };
  write_idx (images, pixels, 3, big_dims);
  write_idx (labels, label_bytes, 1, two);
  expect_train_failure ("data of another size", "diffusion", dir, config,
                        "holds 1-channel 8x16 images; the model takes 1 channels at 8x8");
  write_idx (images, pixels, 3, dims);
  label_bytes[2] = 9;
  write_idx (labels, label_bytes, 1, label_dims);
  expect_train_failure ("label beyond the classes", "classifier", dir, classifier_config,
                        "image 2 has label 9 but the model has 4 classes");
  expect_train_failure ("config of the other kind", "classifier", dir, config,
                        "trains a diffusion model, not a classifier");

  /* PNG folder problems */
  char *png_dir = tmp_path ("bad-png");
  char *class_a = g_build_filename (png_dir, "a", NULL), *class_b = g_build_filename (png_dir, "b", NULL);
  g_mkdir_with_parents (class_a, 0755);
  g_mkdir_with_parents (class_b, 0755);
  char *good = g_build_filename (class_a, "1.png", NULL), *odd = g_build_filename (class_b, "2.png", NULL);
  write_png (good, 8, 8, 200);
  write_png (odd, 9, 8, 100);
  expect_train_failure ("PNG of another size", "diffusion", png_dir, config, "2.png is 9x8");
  g_assert_true (g_file_set_contents (odd, "\x89PNG\r\n\x1a\nbroken", 14, NULL));
  expect_train_failure ("corrupt PNG", "diffusion", png_dir, config, "2.png: cannot read PNG");
  g_unlink (odd);
  expect_train_failure ("missing folder", "diffusion", "/nonexistent-data", config,
                        "/nonexistent-data: not a folder");

  /* a clean PNG folder trains: labels come from the folder names */
  write_png (odd, 8, 8, 30);
  char *out = tmp_path ("png.safetensors");
  char *argv[] = { (char *) guided, "train", "classifier", "--data", png_dir, "--config",
                   classifier_config, "-o", out, NULL };
  char *err = NULL;
  int status = spawn_wait (argv, &err);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("training on a PNG folder failed: %s", err);
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (out, &error);
  g_assert_no_error (error);
  g_assert_cmpstr (gd_safetensors_metadata (st, "labels"), ==, "[\"a\",\"b\"]");
  gd_safetensors_free (st);
  g_free (err);
  g_unlink (out);
  g_free (out);

  g_free (pixels);
  g_free (dir);
  g_free (images);
  g_free (labels);
  g_free (png_dir);
  g_free (class_a);
  g_free (class_b);
  g_free (good);
  g_free (odd);
  g_free (config);
  g_free (classifier_config);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  guided = g_getenv ("GUIDED");
  if (!guided)
    g_error ("GUIDED (path of the guided command) is not set");
  tmpdir = g_dir_make_tmp ("gd-train-XXXXXX", NULL);
  g_test_add_func ("/train/overfit/classifier", test_overfit_classifier);
  g_test_add_func ("/train/overfit/diffusion", test_overfit_diffusion);
  g_test_add_func ("/train/resume-after-kill", test_resume_after_kill);
  g_test_add_func ("/train/thread-count-independence", test_thread_count_independence);
  g_test_add_func ("/train/learning-rate-schedule", test_learning_rate_schedule);
  g_test_add_func ("/train/bad-data", test_bad_data);
  int status = g_test_run ();
  char *rm[] = { "rm", "-rf", tmpdir, NULL };
  g_spawn_sync (NULL, rm, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL, NULL, NULL, NULL, NULL);
  g_free (tmpdir);
  return status;
}
