/* Schedules and respacing against the reference (schedules.safetensors): betas within
 * 1e-12 relative, kept timestep sets exactly; and the respacing errors. */
#include "gd-diffusion.h"
#include "gd-error.h"
#include "gd-safetensors.h"

#include <glib.h>
#include <json-glib/json-glib.h>
#include <math.h>

static GdSafetensors *schedules;

static GdSafetensors *
open_schedules (void)
{
  if (schedules)
    return schedules;
  const char *dir = g_getenv ("GD_REFERENCE_DIR");
  char *path = g_build_filename (dir ? dir : "../shared/reference", "diffusion",
                                 "schedules.safetensors", NULL);
  if (g_file_test (path, G_FILE_TEST_EXISTS))
    {
      GError *error = NULL;
      schedules = gd_safetensors_open (path, &error);
      g_assert_no_error (error);
    }
  else
    {
      char *msg = g_strdup_printf ("reference schedules %s are missing", path);
      g_printerr ("SKIP: %s\n", msg);
      g_test_skip (msg);
      g_free (msg);
    }
  g_free (path);
  return schedules;
}

static void
assert_betas (const char *name, const double *betas, int count)
{
  const GdStTensor *ref = gd_safetensors_find (schedules, name);
  g_assert_nonnull (ref);
  g_assert_cmpint (ref->dtype, ==, GD_DTYPE_F64);
  g_assert_cmpint (ref->numel, ==, count);
  const double *expected = ref->data;
  double worst = 0.0;
  for (int i = 0; i < count; i++)
    worst = MAX (worst, fabs (betas[i] - expected[i]) / fabs (expected[i]));
  g_test_message ("%s: max relative error %.3g", name, worst);
  if (!(worst <= 1e-12))
    g_error ("%s: relative error %g exceeds 1e-12", name, worst);
}

static void
test_schedules (void)
{
  if (!open_schedules ())
    return;
  const int counts[] = { 1000, 4000, 50 };
  for (int s = 0; s < 2; s++)
    for (guint c = 0; c < G_N_ELEMENTS (counts); c++)
      {
        double *betas = gd_beta_schedule (s ? GD_SCHEDULE_COSINE : GD_SCHEDULE_LINEAR, counts[c]);
        char *name = g_strdup_printf ("betas_%s_%d", s ? "cosine" : "linear", counts[c]);
        assert_betas (name, betas, counts[c]);
        g_free (name);
        g_free (betas);
      }
}

static void
test_respaced_betas (void)
{
  if (!open_schedules ())
    return;
  const char *specs[] = { "250", "ddim25" };
  for (int s = 0; s < 2; s++)
    for (guint i = 0; i < G_N_ELEMENTS (specs); i++)
      {
        GError *error = NULL;
        GdDiffusion *d = gd_diffusion_new (s ? GD_SCHEDULE_COSINE : GD_SCHEDULE_LINEAR, 1000,
                                           specs[i], GD_VARIANCE_FIXED_LARGE, &error);
        g_assert_no_error (error);
        char *name = g_strdup_printf ("respaced_betas_%s_1000_%s", s ? "cosine" : "linear", specs[i]);
        assert_betas (name, d->betas, d->num_steps);
        g_free (name);
        gd_diffusion_free (d);
      }
}

static void
test_space_timesteps (void)
{
  if (!open_schedules ())
    return;
  const char *text = gd_safetensors_metadata (schedules, "space_timesteps");
  g_assert_nonnull (text);
  JsonParser *parser = json_parser_new ();
  g_assert_true (json_parser_load_from_data (parser, text, -1, NULL));
  JsonObject *cases = json_node_get_object (json_parser_get_root (parser));
  GList *keys = json_object_get_members (cases);
  int checked = 0;
  for (GList *l = keys; l; l = l->next)
    {
      const char *key = l->data;
      const char *colon = strchr (key, ':');
      g_assert_nonnull (colon);
      int steps = atoi (key);
      JsonArray *expected = json_object_get_array_member (cases, key);
      int *kept, count;
      GError *error = NULL;
      g_assert_true (gd_space_timesteps (steps, colon + 1, &kept, &count, &error));
      g_assert_no_error (error);
      g_assert_cmpint (count, ==, (int) json_array_get_length (expected));
      for (int i = 0; i < count; i++)
        g_assert_cmpint (kept[i], ==, (int) json_array_get_int_element (expected, (guint) i));
      g_free (kept);
      checked++;
    }
  g_test_message ("%d respacing strings match exactly", checked);
  g_assert_cmpint (checked, >=, 5);
  g_list_free (keys);
  g_object_unref (parser);
}

static void
test_respacing_errors (void)
{
  const struct { const char *spec; const char *message; } cases[] = {
    { "ddim999", "no integer stride gives exactly 999 of 1000 steps" },
    { "ddim", "expected ddimN" },
    { "ddimx", "expected ddimN" },
    { "abc", "'abc' is not a positive step count" },
    { "0", "'0' is not a positive step count" },
    { "10,,5", "'' is not a positive step count" },
    { "600,600", "cannot take 600 steps from a section of 500" },
    { "2000", "cannot take 2000 steps from a section of 1000" },
  };
  for (guint i = 0; i < G_N_ELEMENTS (cases); i++)
    {
      int *kept = NULL, count = 0;
      GError *error = NULL;
      g_assert_false (gd_space_timesteps (1000, cases[i].spec, &kept, &count, &error));
      g_assert_error (error, GD_ERROR, GD_ERROR_CONFIG);
      if (!strstr (error->message, cases[i].message))
        g_error ("respacing '%s': message \"%s\" lacks \"%s\"", cases[i].spec, error->message,
                 cases[i].message);
      g_assert_null (kept);
      g_error_free (error);
    }
}

/* The respaced process keeps alpha_bar at every kept timestep.  It is rebuilt as a product
 * of 1 - beta with beta near 1 at the end of the cosine schedule, which cancels digits:
 * the bound is 1e-10 relative, not the 1e-12 of the schedules themselves. */
static void
test_respaced_alpha_bar (void)
{
  GError *error = NULL;
  GdDiffusion *full = gd_diffusion_new (GD_SCHEDULE_COSINE, 1000, "", GD_VARIANCE_FIXED_LARGE, &error);
  GdDiffusion *spaced = gd_diffusion_new (GD_SCHEDULE_COSINE, 1000, "10,15,20", GD_VARIANCE_FIXED_LARGE, &error);
  g_assert_no_error (error);
  g_assert_cmpint (spaced->num_steps, ==, 45);
  for (int k = 0; k < spaced->num_steps; k++)
    {
      double a = spaced->alphas_cumprod[k], b = full->alphas_cumprod[spaced->timestep_map[k]];
      g_assert_cmpfloat (fabs (a - b), <=, 1e-10 * b);
    }
  gd_diffusion_free (full);
  gd_diffusion_free (spaced);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/diffusion/schedules", test_schedules);
  g_test_add_func ("/diffusion/respaced-betas", test_respaced_betas);
  g_test_add_func ("/diffusion/space-timesteps", test_space_timesteps);
  g_test_add_func ("/diffusion/respacing-errors", test_respacing_errors);
  g_test_add_func ("/diffusion/respaced-alpha-bar", test_respaced_alpha_bar);
  int status = g_test_run ();
  gd_safetensors_free (schedules);
  return status;
}
