/* Training: the reference's training steps reproduced (losses within 1e-4 relative, every
 * parameter gradient within 1e-3 * max |ref|), and finite-difference checks of the
 * parameter gradients of every layer of a U-Net and of a classifier. */
#include "gd-diffusion.h"
#include "gd-model.h"
#include "gd-random.h"
#include "gd-safetensors.h"
#include "gd-train.h"

#include <glib.h>
#include <json-glib/json-glib.h>
#include <math.h>
#include <string.h>

static const char *
reference_dir (void)
{
  const char *dir = g_getenv ("GD_REFERENCE_DIR");
  return dir ? dir : "../shared/reference";
}

static gboolean
require (const char *path)
{
  if (g_file_test (path, G_FILE_TEST_EXISTS))
    return TRUE;
  char *msg = g_strdup_printf ("reference fixture %s is missing", path);
  g_printerr ("SKIP: %s\n", msg);
  g_test_skip (msg);
  g_free (msg);
  return FALSE;
}

static void
assert_relative (const char *what, double got, double expected, double bound)
{
  double err = fabs (got - expected) / MAX (fabs (expected), 1e-30);
  g_test_message ("%s: %.7g vs %.7g (relative error %.2g)", what, got, expected, err);
  if (!(err <= bound))
    g_error ("%s: %.9g differs from the reference %.9g by %.3g relative (bound %g)",
             what, got, expected, err, bound);
}

static void
test_training_fixture (gconstpointer data)
{
  const char *fixture = data;
  char *dir = g_build_filename (reference_dir (), "training", fixture, NULL);
  char *config_path = g_build_filename (dir, "config.json", NULL);
  char *io_path = g_build_filename (dir, "io.safetensors", NULL);
  if (!require (config_path) || !require (io_path))
    goto done;
  JsonParser *parser = json_parser_new ();
  g_assert_true (json_parser_load_from_file (parser, config_path, NULL));
  JsonObject *cfg = json_node_get_object (json_parser_get_root (parser));
  char *model_path = g_build_filename (reference_dir (), json_object_get_string_member (cfg, "model"),
                                       "model.safetensors", NULL);
  GError *error = NULL;
  GdModel *model = gd_model_load (model_path, &error);
  g_assert_no_error (error);
  GdScheduleKind schedule;
  g_assert_true (gd_schedule_from_name (json_object_get_string_member (cfg, "noise_schedule"), &schedule, NULL));
  gboolean learn_sigma = json_object_get_boolean_member (cfg, "learn_sigma");
  GdDiffusion *d = gd_diffusion_new (schedule, (int) json_object_get_int_member (cfg, "diffusion_steps"), "",
                                     learn_sigma ? GD_VARIANCE_LEARNED_RANGE : GD_VARIANCE_FIXED_LARGE, &error);
  g_assert_no_error (error);
  gboolean is_classifier = g_strcmp0 (json_object_get_string_member (cfg, "kind"), "classifier") == 0;

  GdSafetensors *io = gd_safetensors_open (io_path, &error);
  g_assert_no_error (error);
  const GdStTensor *xs = gd_safetensors_find (io, "x_start");
  int n = (int) xs->shape[0];
  float *x_start = gd_st_tensor_to_f32 (xs);
  float *noise = gd_st_tensor_to_f32 (gd_safetensors_find (io, "noise"));
  int64_t *t = NULL, *y = NULL;
  g_assert_true (gd_st_tensor_to_i64 (gd_safetensors_find (io, "t"), &t, NULL));
  if (gd_safetensors_find (io, "y"))
    g_assert_true (gd_st_tensor_to_i64 (gd_safetensors_find (io, "y"), &y, NULL));
  float *ref_loss = gd_st_tensor_to_f32 (gd_safetensors_find (io, "loss"));

  gd_model_enable_grads (model);
  double loss = 0.0;
  if (is_classifier)
    {
      const GdModelConfig *mc = gd_model_get_config (model);
      float *logits = g_new (float, (size_t) n * mc->out_channels);
      g_assert_true (gd_train_classifier_loss (model, d, x_start, noise, t, y, n, NULL, logits, &loss, &error));
      float *ref_logits = gd_st_tensor_to_f32 (gd_safetensors_find (io, "logits"));
      for (int i = 0; i < n * mc->out_channels; i++)
        g_assert_cmpfloat (fabs (logits[i] - ref_logits[i]), <=, 1e-4 * MAX (1.0, fabs (ref_logits[i])));
      g_free (logits);
      g_free (ref_logits);
    }
  else
    {
      float mse[8], vb[8], per[8];
      GdLossTerms terms = { mse, learn_sigma ? vb : NULL, per };
      g_assert_cmpint (n, <=, 8);
      g_assert_true (gd_train_diffusion_loss (model, d, x_start, noise, t, y, n, &terms, &loss, &error));
      const char *names[] = { "terms.mse", "terms.vb", "terms.loss" };
      float *values[] = { mse, vb, per };
      for (int k = 0; k < 3; k++)
        {
          const GdStTensor *ref = gd_safetensors_find (io, names[k]);
          if (!ref)
            continue;
          float *expected = gd_st_tensor_to_f32 (ref);
          for (int i = 0; i < n; i++)
            {
              char *what = g_strdup_printf ("%s %s[%d] (t = %" G_GINT64_FORMAT ")", fixture, names[k], i, t[i]);
              assert_relative (what, values[k][i], expected[i], 1e-4);
              g_free (what);
            }
          g_free (expected);
        }
    }
  g_assert_no_error (error);
  char *what = g_strdup_printf ("%s loss", fixture);
  assert_relative (what, loss, ref_loss[0], 1e-4);
  g_free (what);

  /* A parameter whose effect a following GroupNorm with one channel per group removes
   * (a conv bias, or the timestep embedding added without scale-shift, at 32 channels)
   * has a gradient of exactly zero; the reference then holds float32 rounding noise
   * (~1e-8), against which "1e-3 * max |ref|" cannot be met by anyone.  Such tensors are
   * recognised by both gradients being below 1e-6 of the largest gradient of the model
   * (float32 resolution is 1.2e-7), and are listed. */
  double global_max = 0.0;
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      GdParam *p = gd_model_param (model, i);
      char *name = g_strconcat ("grad.", p->name, NULL);
      const GdStTensor *ref = gd_safetensors_find (io, name);
      if (!ref)
        g_error ("%s: the reference has no %s", fixture, name);
      float *expected = gd_st_tensor_to_f32 (ref);
      for (int64_t j = 0; j < ref->numel; j++)
        global_max = MAX (global_max, fabs (expected[j]));
      g_free (expected);
      g_free (name);
    }
  guint checked = 0, structural_zeros = 0;
  double worst_ratio = 0.0;
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      GdParam *p = gd_model_param (model, i);
      char *name = g_strconcat ("grad.", p->name, NULL);
      const GdStTensor *ref = gd_safetensors_find (io, name);
      g_assert_cmpint (ref->numel, ==, (gint64) p->numel);
      float *expected = gd_st_tensor_to_f32 (ref);
      double max_ref = 0.0, max_err = 0.0, max_got = 0.0;
      for (size_t j = 0; j < p->numel; j++)
        {
          max_ref = MAX (max_ref, fabs (expected[j]));
          max_got = MAX (max_got, fabs (p->grad[j]));
          max_err = MAX (max_err, fabs ((double) p->grad[j] - expected[j]));
        }
      if (max_err <= 1e-3 * max_ref)
        {
          if (max_ref > 0)
            worst_ratio = MAX (worst_ratio, max_err / max_ref);
        }
      else if (max_ref <= 1e-6 * global_max && max_got <= 1e-6 * global_max)
        {
          g_test_message ("%s: %s is structurally zero (max |ref| %.2g, max |ours| %.2g, "
                          "largest gradient %.2g)", fixture, p->name, max_ref, max_got, global_max);
          structural_zeros++;
        }
      else
        g_error ("%s: gradient of %s differs by %g (bound %g)", fixture, p->name, max_err, 1e-3 * max_ref);
      checked++;
      g_free (expected);
      g_free (name);
    }
  g_test_message ("%s: %u structurally zero gradients", fixture, structural_zeros);
  g_test_message ("%s: %u parameter gradients, worst max|a - b| / max|ref| = %.3g", fixture,
                  checked, worst_ratio);
  g_assert_cmpuint (checked, >, 10);

  g_free (x_start);
  g_free (noise);
  g_free (t);
  g_free (y);
  g_free (ref_loss);
  gd_safetensors_free (io);
  gd_diffusion_free (d);
  gd_model_free (model);
  g_free (model_path);
  g_object_unref (parser);
done:
  g_free (dir);
  g_free (config_path);
  g_free (io_path);
}

/* ---- finite differences of every parameter tensor ---- */

typedef struct {
  GdModel *model;
  float *x, *r, *out;
  int n, size;
  int64_t t[2], y[2];
  size_t out_count;
} FdCase;

static double
fd_loss (FdCase *c)
{
  g_assert_true (gd_model_forward (c->model, c->x, c->n, c->size, c->size, c->t, c->y, c->out, NULL));
  double sum = 0.0;
  for (size_t i = 0; i < c->out_count; i++)
    sum += (double) c->out[i] * c->r[i];
  return sum;
}

static void
check_parameter_gradients (GdModelKind kind, const char *config)
{
  GdModelConfig cfg;
  gd_model_config_init (&cfg, kind);
  g_assert_true (gd_model_config_parse (&cfg, config, "test", NULL));
  GError *error = NULL;
  GdModel *model = gd_model_new (&cfg, "test", &error);
  g_assert_no_error (error);
  gd_model_init_random (model, 99);
  gd_model_enable_grads (model);
  FdCase c = { .model = model, .n = 2, .size = cfg.image_size, .t = { 3, 800 }, .y = { 1, 4 } };
  size_t in_count = (size_t) c.n * cfg.in_channels * c.size * c.size;
  c.out_count = kind == GD_MODEL_UNET ? (size_t) c.n * cfg.out_channels * c.size * c.size
                                      : (size_t) c.n * cfg.out_channels;
  c.x = g_new (float, in_count);
  gd_random_normal (5, 1, c.x, in_count);
  c.r = g_new (float, c.out_count);
  gd_random_normal (5, 2, c.r, c.out_count);
  c.out = g_new (float, c.out_count);
  if (kind == GD_MODEL_CLASSIFIER)
    {
      c.y[0] = c.y[1] = 0;  /* unused by a classifier's forward */
    }
  fd_loss (&c);
  g_assert_true (gd_model_backward (model, c.r, NULL));
  const float step = 1e-2f;
  guint tensors = 0;
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      GdParam *p = gd_model_param (model, i);
      double scale = 0.0;
      for (size_t j = 0; j < p->numel; j++)
        scale = MAX (scale, fabs (p->grad[j]));
      size_t stride = MAX (1, p->numel / 3);
      for (size_t j = 0; j < p->numel; j += stride)
        {
          float saved = p->data[j];
          p->data[j] = saved + step;
          double plus = fd_loss (&c);
          p->data[j] = saved - step;
          double minus = fd_loss (&c);
          p->data[j] = saved;
          double numeric = (plus - minus) / (2.0 * step);
          if (!(fabs (numeric - p->grad[j]) <= 2e-2 * scale + 1e-3))
            g_error ("%s[%zu]: finite difference %g, backward %g (tensor scale %g)", p->name, j,
                     numeric, p->grad[j], scale);
        }
      tensors++;
    }
  g_test_message ("%u parameter tensors checked", tensors);
  g_free (c.x);
  g_free (c.r);
  g_free (c.out);
  gd_model_free (model);
}

static void
test_unet_parameter_gradients (void)
{
  /* class-conditional, learned sigma, scale-shift, resblock up/down, new attention order */
  check_parameter_gradients (GD_MODEL_UNET,
      "{\"image_size\": 8, \"in_channels\": 3, \"model_channels\": 32, \"out_channels\": 6,"
      " \"num_res_blocks\": 1, \"attention_resolutions\": [2], \"channel_mult\": [1, 2],"
      " \"num_classes\": 5, \"num_head_channels\": 16, \"use_scale_shift_norm\": true,"
      " \"resblock_updown\": true, \"use_new_attention_order\": true}");
}

static void
test_unet_legacy_parameter_gradients (void)
{
  /* no scale-shift, conv resampling, legacy attention order */
  check_parameter_gradients (GD_MODEL_UNET,
      "{\"image_size\": 8, \"in_channels\": 1, \"model_channels\": 32, \"out_channels\": 1,"
      " \"num_res_blocks\": 1, \"attention_resolutions\": [1, 2], \"channel_mult\": [1, 2],"
      " \"num_heads\": 2, \"use_scale_shift_norm\": false, \"resblock_updown\": false}");
}

static void
test_classifier_parameter_gradients (void)
{
  check_parameter_gradients (GD_MODEL_CLASSIFIER,
      "{\"image_size\": 8, \"in_channels\": 3, \"model_channels\": 32, \"out_channels\": 4,"
      " \"num_res_blocks\": 1, \"attention_resolutions\": [2], \"channel_mult\": [1, 2],"
      " \"num_head_channels\": 16, \"use_scale_shift_norm\": true, \"resblock_updown\": true,"
      " \"pool\": \"attention\"}");
  check_parameter_gradients (GD_MODEL_CLASSIFIER,
      "{\"image_size\": 8, \"in_channels\": 1, \"model_channels\": 32, \"out_channels\": 3,"
      " \"num_res_blocks\": 1, \"attention_resolutions\": [2], \"channel_mult\": [1, 2],"
      " \"num_heads\": 2, \"pool\": \"adaptive\"}");
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  static const char *fixtures[] = { "unet_hybrid_loss", "unet_simple_loss", "classifier_noised" };
  for (guint i = 0; i < G_N_ELEMENTS (fixtures); i++)
    {
      char *name = g_strconcat ("/training/reference/", fixtures[i], NULL);
      g_test_add_data_func (name, fixtures[i], test_training_fixture);
      g_free (name);
    }
  g_test_add_func ("/training/fd/unet", test_unet_parameter_gradients);
  g_test_add_func ("/training/fd/unet-legacy", test_unet_legacy_parameter_gradients);
  g_test_add_func ("/training/fd/classifier", test_classifier_parameter_gradients);
  return g_test_run ();
}
