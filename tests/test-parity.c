/* Parity with the reference implementation: every fixture in unet/ and classifier/
 * reproduced within max |a - b| <= 1e-4 * max(1, max |ref|) for out, logits and grad. */
#include "gd-model.h"
#include "gd-safetensors.h"

#include <glib.h>
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

int
main (int argc, char **argv)
{
  static const char *fixtures[] = {
    "unet/tiny_cond_learnsigma", "unet/tiny_uncond_legacy", "unet/gray28_uncond",
    "classifier/tiny_attnpool", "classifier/gray28_attnpool", "classifier/tiny_adaptive",
  };
  g_test_init (&argc, &argv, NULL);
  for (guint i = 0; i < G_N_ELEMENTS (fixtures); i++)
    {
      char *name = g_strconcat ("/parity/", fixtures[i], NULL);
      g_test_add_data_func (name, fixtures[i], test_fixture);
      g_free (name);
    }
  return g_test_run ();
}
