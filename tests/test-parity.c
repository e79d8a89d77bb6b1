/* Parity with the reference implementation: every fixture in unet/ and classifier/
 * reproduced within max |a - b| <= 1e-4 * max(1, max |ref|) for out, logits and grad. */
#include "gd-bf16.h"
#include "gd-kernels.h"
#include "gd-model.h"
#include "gd-recognize.h"
#include "gd-safetensors.h"
#include "gd-stats.h"

#include <glib.h>
#include <json-glib/json-glib.h>
#include <math.h>

static const char *
reference_dir (void)
{
  const char *dir = g_getenv ("GD_REFERENCE_DIR");
  return dir ? dir : "../shared/reference";
}

/* Skips loudly when the fixtures are absent. */
static char *
fixture_path (const char *fixture, const char *file)
{
  char *path = g_build_filename (reference_dir (), fixture, file, NULL);
  if (!g_file_test (path, G_FILE_TEST_EXISTS))
    {
      char *msg = g_strdup_printf ("reference fixture %s is missing", path);
      g_printerr ("SKIP: %s\n", msg);
      g_test_skip (msg);
      g_free (msg);
      g_free (path);
      return NULL;
    }
  return path;
}

static void
assert_close (const char *fixture, const char *name, const float *got, const GdStTensor *ref)
{
  float *expected = gd_st_tensor_to_f32 (ref);
  double max_ref = 0.0, max_err = 0.0;
  for (int64_t i = 0; i < ref->numel; i++)
    {
      max_ref = MAX (max_ref, fabs (expected[i]));
      max_err = MAX (max_err, fabs ((double) got[i] - expected[i]));
    }
  double bound = 1e-4 * MAX (1.0, max_ref);
  g_test_message ("%s %s: max |a - b| = %.3g (bound %.3g, max |ref| %.3g)",
                  fixture, name, max_err, bound, max_ref);
  g_free (expected);
  if (!(max_err <= bound))
    g_error ("%s %s: max |a - b| = %g exceeds %g", fixture, name, max_err, bound);
}

/* The bf16 path: a U-Net's output in inference mode close to float's (bfloat16 keeps 8 bits
 * of mantissa: about 0.4% per rounding; within 1% rms, 3% of the largest value anywhere),
 * or a classifier's guidance gradient pointing the same way as float's (a direction that
 * guidance scales: cosine >= 0.999, i.e. about 4.5% rms; an input gradient sums terms that
 * partly cancel, so its relative error is larger than an output's); not equal to float's
 * (the products did run in bf16), and the same on every run. */
static void
check_bf16 (const char *fixture, GdModel *model, const float *x, int n, int h, int w,
            const int64_t *t, const int64_t *y, const float *exact)
{
  gboolean classifier = gd_model_get_config (model)->kind == GD_MODEL_CLASSIFIER;
  GError *error = NULL;
  if (!gd_model_set_bf16 (model, TRUE, &error))
    {
      g_printerr ("SKIP (bf16 part of %s): %s\n", fixture, error->message);
      g_test_message ("bf16 part skipped: %s", error->message);
      g_clear_error (&error);
      return;
    }
  size_t count = (size_t) n * (classifier ? gd_model_get_config (model)->in_channels
                                           : gd_model_get_config (model)->out_channels) * h * w;
  float *first = g_new (float, count), *second = g_new (float, count);
  for (int run = 0; run < 2; run++)
    g_assert_true (classifier ? gd_classifier_gradient (model, x, n, h, w, t, y, NULL,
                                                        run ? second : first, &error)
                              : gd_model_forward (model, x, n, h, w, t, y, run ? second : first,
                                                  &error));
  g_assert_cmpmem (first, sizeof (float) * count, second, sizeof (float) * count);
  GdDeviation dev = gd_stats_deviation (first, exact, count);
  g_test_message ("%s in bf16: largest difference %.2e of the largest value, rms %.2e, "
                  "cosine %.6f", fixture, dev.worst / dev.largest, dev.rms, dev.cosine);
  g_assert_cmpfloat (dev.worst, >, 0.0);
  if (classifier)
    g_assert_cmpfloat (dev.cosine, >=, 0.999);
  else
    {
      g_assert_cmpfloat (dev.worst, <=, 3e-2 * dev.largest);
      g_assert_cmpfloat (dev.rms, <=, 1e-2);
    }
  g_assert_true (gd_model_set_bf16 (model, FALSE, &error));
  g_free (first);
  g_free (second);
}

static void
test_fixture (gconstpointer data)
{
  const char *fixture = data;
  char *model_path = fixture_path (fixture, "model.safetensors");
  char *io_path = model_path ? fixture_path (fixture, "io.safetensors") : NULL;
  if (!io_path)
    {
      g_free (model_path);
      return;
    }
  GError *error = NULL;
  GdModel *model = gd_model_load (model_path, &error);
  g_assert_no_error (error);
  GdSafetensors *io = gd_safetensors_open (io_path, &error);
  g_assert_no_error (error);

  const GdStTensor *xt = gd_safetensors_find (io, "x");
  g_assert_nonnull (xt);
  int n = (int) xt->shape[0], c = (int) xt->shape[1], h = (int) xt->shape[2], w = (int) xt->shape[3];
  float *x = gd_st_tensor_to_f32 (xt);
  int64_t *t = NULL, *y = NULL;
  g_assert_true (gd_st_tensor_to_i64 (gd_safetensors_find (io, "t"), &t, &error));
  if (gd_safetensors_find (io, "y"))
    g_assert_true (gd_st_tensor_to_i64 (gd_safetensors_find (io, "y"), &y, &error));

  const GdModelConfig *cfg = gd_model_get_config (model);
  if (cfg->kind == GD_MODEL_UNET)
    {
      float *out = g_new (float, (size_t) n * cfg->out_channels * h * w);
      g_assert_true (gd_model_forward (model, x, n, h, w, t, y, out, &error));
      assert_close (fixture, "out", out, gd_safetensors_find (io, "out"));
      /* inference mode (layers sharing their scratch) computes the same numbers */
      float *again = g_new (float, (size_t) n * cfg->out_channels * h * w);
      gd_model_set_inference (model, TRUE);
      g_assert_true (gd_model_forward (model, x, n, h, w, t, y, again, &error));
      g_assert_cmpmem (out, sizeof (float) * n * cfg->out_channels * h * w,
                       again, sizeof (float) * n * cfg->out_channels * h * w);
      g_free (again);
      check_bf16 (fixture, model, x, n, h, w, t, y, out);
      /* and a backward pass after it is refused, not run on missing activations */
      g_test_expect_message ("guided", G_LOG_LEVEL_CRITICAL, "*inference mode*");
      g_assert_false (gd_model_backward (model, out, NULL));
      g_test_assert_expected_messages ();
      g_free (out);
    }
  else
    {
      float *logits = g_new (float, (size_t) n * cfg->out_channels);
      float *grad = g_new (float, (size_t) n * c * h * w);
      g_assert_true (gd_classifier_gradient (model, x, n, h, w, t, y, logits, grad, &error));
      assert_close (fixture, "logits", logits, gd_safetensors_find (io, "logits"));
      assert_close (fixture, "grad", grad, gd_safetensors_find (io, "grad"));
      check_bf16 (fixture, model, x, n, h, w, t, y, grad);
      /* that forward kept only what the input gradient reads and computed the rest again;
       * with parameter gradients on it keeps everything: the same input gradient */
      float *kept_all = g_new (float, (size_t) n * c * h * w);
      gd_model_enable_grads (model);
      g_assert_true (gd_classifier_gradient (model, x, n, h, w, t, y, NULL, kept_all, &error));
      g_assert_cmpmem (grad, sizeof (float) * n * c * h * w, kept_all, sizeof (float) * n * c * h * w);
      g_free (kept_all);
      g_free (logits);
      g_free (grad);
    }
  g_free (x);
  g_free (t);
  g_free (y);
  gd_safetensors_free (io);
  gd_model_free (model);
  g_free (model_path);
  g_free (io_path);
}

/* A released 64x64 architecture with its width cut to `width` channels (same levels, blocks
 * and attention; heads of head_channels), random weights. */
static GdModel *
narrow_release (const char *name, const char *width_flag, int width, int head_channels)
{
  const GdRelease *release = gd_release_find (name);
  g_assert_nonnull (release);
  char *flags = gd_release_flags_json (release);
  JsonNode *node = json_from_string (flags, NULL);
  JsonObject *object = json_node_get_object (node);
  json_object_set_int_member (object, width_flag, width);
  char *narrow = json_to_string (node, FALSE);
  GdModelConfig cfg;
  GError *error = NULL;
  gboolean ok = gd_flags_to_config (narrow, release->kind, name, &cfg, NULL, &error);
  g_assert_no_error (error);
  g_assert_true (ok);
  cfg.num_head_channels = head_channels;
  GdModel *model = gd_model_new (&cfg, name, &error);
  g_assert_no_error (error);
  gd_model_init_random (model, 5);
  g_free (narrow);
  json_node_unref (node);
  g_free (flags);
  return model;
}

/* The memory plan: an inference pass keeps one layer's scratch, two turns of layer outputs
 * and the U-Net's skips; a guidance gradient keeps only what the input gradient reads.
 * Both far below a forward that keeps everything for training, and reused, not grown, by
 * the next call. */
static void
test_buffers (void)
{
  const int n = 1, side = 64;
  size_t count = (size_t) n * 3 * side * side;
  float *x = g_new (float, count), *out = g_new (float, 2 * count), *grad = g_new (float, count);
  for (size_t i = 0; i < count; i++)
    x[i] = (float) sin (0.37 * (double) i);
  int64_t t[] = { 300 }, y[] = { 7 };
  GError *error = NULL;

  size_t bytes[2][2];
  for (int inference = 0; inference < 2; inference++)
    {
      GdModel *unet = narrow_release ("64x64_diffusion", "num_channels", 32, 32);
      if (inference)
        gd_model_set_inference (unet, TRUE);
      else
        gd_model_enable_grads (unet);
      g_assert_true (gd_model_forward (unet, x, n, side, side, t, y, out, &error));
      bytes[0][inference] = gd_model_buffer_bytes (unet);
      g_assert_true (gd_model_forward (unet, x, n, side, side, t, y, out, &error));
      g_assert_cmpuint (gd_model_buffer_bytes (unet), ==, bytes[0][inference]);
      gd_model_free (unet);

      GdModel *classifier = narrow_release ("64x64_classifier", "classifier_width", 64, 64);
      if (!inference)
        gd_model_enable_grads (classifier);
      g_assert_true (gd_classifier_gradient (classifier, x, n, side, side, t, y, NULL, grad, &error));
      bytes[1][inference] = gd_model_buffer_bytes (classifier);
      g_assert_true (gd_classifier_gradient (classifier, x, n, side, side, t, y, NULL, grad, &error));
      g_assert_cmpuint (gd_model_buffer_bytes (classifier), ==, bytes[1][inference]);
      gd_model_free (classifier);
    }
  g_test_message ("U-Net forward: %.1f MB kept for training, %.1f MB in inference; classifier "
                  "gradient: %.1f MB with parameter gradients, %.1f MB without",
                  bytes[0][0] / 1048576.0, bytes[0][1] / 1048576.0, bytes[1][0] / 1048576.0,
                  bytes[1][1] / 1048576.0);
  g_assert_cmpuint (bytes[0][1] * 4, <, bytes[0][0]);
  g_assert_cmpuint (bytes[1][1] * 4, <, bytes[1][0] * 3);
  g_free (x);
  g_free (out);
  g_free (grad);
}

/* The 28x28 fixtures (batch 2, 32 channels at full size) are where the reference checks the
 * float Winograd convolutions: their full-size 3x3 convolutions, forward and (classifier)
 * input gradient, take that way; the 14x14 ones and the 1-channel input convolution do not. */
static void
test_winograd_covered (void)
{
  g_assert_true (gd_conv2d_winograd (2, 32, 32, 28, 28, 3, 1, 1));
  g_assert_false (gd_conv2d_winograd (2, 64, 64, 14, 14, 3, 1, 1));
  g_assert_false (gd_conv2d_winograd (2, 1, 32, 28, 28, 3, 1, 1));
}

int
main (int argc, char **argv)
{
  static const char *fixtures[] = {
    "unet/tiny_cond_learnsigma", "unet/tiny_uncond_legacy", "unet/gray28_uncond",
    "classifier/tiny_attnpool", "classifier/gray28_attnpool", "classifier/tiny_adaptive",
  };
  g_test_init (&argc, &argv, NULL);
  /* run for a chosen bf16 kernel (meson's parity-bf16-avx512): pointless without one */
  if (g_getenv ("GD_BF16_KERNEL") && !gd_bf16_kernel ())
    {
      g_printerr ("SKIP: GD_BF16_KERNEL is set but this processor has no bf16 product\n");
      return 77;
    }
  for (guint i = 0; i < G_N_ELEMENTS (fixtures); i++)
    {
      char *name = g_strconcat ("/parity/", fixtures[i], NULL);
      g_test_add_data_func (name, fixtures[i], test_fixture);
      g_free (name);
    }
  g_test_add_func ("/model/buffers", test_buffers);
  g_test_add_func ("/parity/winograd-covered", test_winograd_covered);
  return g_test_run ();
}
