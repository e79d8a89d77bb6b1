/* The sampler's starts other than x_T: SDEdit (start from an image noised to step
 * round(strength * steps)) and inpainting (the known image, noised to the step reached,
 * replaces the sample outside the mask), and the class drawn for an image when none is
 * given. */
#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-sampler.h"
#include "gd-test-reference.h"

#include <math.h>
#include <string.h>

static char *reference;

static gboolean
have_reference (void)
{
  return gd_test_have_reference (reference);
}

/* The fixed-variance 16x16 RGB U-Net with a 10-step DDPM process. */
typedef struct {
  GdModel *model;
  GdDiffusion *diffusion;
  GdSampleOptions options;
  int n, channels, h, w;
  size_t count;
  float *image, *x_T;
} Setup;

static gboolean
setup (Setup *s, int n)
{
  memset (s, 0, sizeof *s);
  if (!have_reference ())
    return FALSE;
  GError *error = NULL;
  char *path = g_build_filename (reference, "unet", "tiny_uncond_legacy", "model.safetensors", NULL);
  s->model = gd_model_load (path, &error);
  g_assert_no_error (error);
  g_free (path);
  GdDiffusionSettings settings;
  gd_model_diffusion_settings (s->model, &settings, &error);
  g_assert_no_error (error);
  s->diffusion = gd_diffusion_new (settings.schedule, settings.steps, "10", settings.variance, &error);
  g_assert_no_error (error);
  const GdModelConfig *cfg = gd_model_get_config (s->model);
  s->n = n;
  s->channels = cfg->in_channels;
  s->h = s->w = cfg->image_size;
  s->count = (size_t) n * s->channels * s->h * s->w;
  s->image = g_new (float, s->count);
  for (size_t i = 0; i < s->count; i++)
    s->image[i] = (float) sin (0.01 * (double) i);   /* a smooth "image" in [-1, 1] */
  s->x_T = g_new (float, s->count);
  gd_sample_initial_noise (3, n, s->count / n, s->x_T);
  s->options = (GdSampleOptions) {
    .model = s->model, .diffusion = s->diffusion, .seed = 3,
    .settings = { .sampler = GD_SAMPLER_DDPM, .clip_denoised = TRUE },
  };
  return TRUE;
}

static void
teardown (Setup *s)
{
  gd_model_free (s->model);
  gd_diffusion_free (s->diffusion);
  g_free (s->image);
  g_free (s->x_T);
}

/* Runs the sampler from x_T with the options; returns x_0. */
static float *
sample (Setup *s, const GdSampleOptions *options)
{
  float *x = g_memdup2 (s->x_T, sizeof (float) * s->count);
  GError *error = NULL;
  g_assert_true (gd_sample_run (options, x, s->n, s->h, s->w, &error));
  g_assert_no_error (error);
  return x;
}

static double
max_difference (const float *a, const float *b, size_t count)
{
  double worst = 0.0;
  for (size_t i = 0; i < count; i++)
    worst = MAX (worst, fabs ((double) a[i] - b[i]));
  return worst;
}

static void
test_steps_for_strength (void)
{
  g_assert_cmpint (gd_sample_steps_for_strength (10, 0.0), ==, 0);
  g_assert_cmpint (gd_sample_steps_for_strength (10, 0.3), ==, 3);
  g_assert_cmpint (gd_sample_steps_for_strength (10, 0.25), ==, 3);
  g_assert_cmpint (gd_sample_steps_for_strength (10, 0.5), ==, 5);
  g_assert_cmpint (gd_sample_steps_for_strength (10, 1.0), ==, 10);
  g_assert_cmpint (gd_sample_steps_for_strength (50, 0.01), ==, 1);
}

/* The rule `guided sample` always used: image j draws g_int64_hash(seed + j) % classes. */
static void
test_draw_class (void)
{
  gboolean differs = FALSE;
  for (gint64 seed = 0; seed < 50; seed++)
    for (int j = 0; j < 3; j++)
      {
        gint64 key = seed + j;
        int64_t drawn = gd_sample_draw_class ((uint64_t) seed, j, 10);
        g_assert_cmpint (drawn, ==, (int64_t) (g_int64_hash (&key) % 10u));
        g_assert_cmpint (drawn, >=, 0);
        g_assert_cmpint (drawn, <, 10);
        differs |= drawn != gd_sample_draw_class ((uint64_t) seed, 0, 10);
      }
  g_assert_true (differs);
}

static gboolean
count_total (void *user, int done, int total)
{
  (void) done;
  *(int *) user = total;
  return TRUE;
}

/* Strength 0 gives the image back; strength s runs round(s * steps) steps, starting from
 * q_sample(image, that step, x_T); the result moves further from the image as s grows. */
static void
test_sdedit (void)
{
  Setup s;
  if (!setup (&s, 2))
    return;
  GdSampleOptions o = s.options;
  o.init_image = s.image;
  o.strength = 0.0;
  float *kept = sample (&s, &o);
  g_assert_cmpfloat (max_difference (kept, s.image, s.count), ==, 0.0);

  int total = -1;
  o.strength = 0.5;
  o.user = &total;
  o.progress_fn = count_total;
  float *half = sample (&s, &o);
  g_assert_cmpint (total, ==, 5);

  /* the same run by hand: q_sample to respaced step 4, then steps 4..0 from there */
  float *x = g_memdup2 (s.x_T, sizeof (float) * s.count);
  gd_diffusion_q_sample (s.diffusion, 4, s.image, s.x_T, s.count, x);
  float *model_out = g_new (float, s.count), *x_prev = g_new (float, s.count);
  float *pred = g_new (float, s.count), *noise = g_new (float, s.count);
  int64_t t[2];
  GError *error = NULL;
  for (int k = 4; k >= 0; k--)
    {
      t[0] = t[1] = s.diffusion->timestep_map[k];
      g_assert_true (gd_model_forward (s.model, x, s.n, s.h, s.w, t, NULL, model_out, &error));
      if (k > 0)
        gd_sample_step_noise (3, k, s.n, s.count / s.n, noise);
      gd_diffusion_step (s.diffusion, &o.settings, k, x, model_out, s.n, s.channels, s.channels,
                         s.h * s.w, NULL, k > 0 ? noise : NULL, x_prev, pred);
      memcpy (x, x_prev, sizeof (float) * s.count);
    }
  g_assert_cmpfloat (max_difference (x, half, s.count), ==, 0.0);

  o.strength = 1.0;
  float *full = sample (&s, &o);
  double mean_half = 0.0, mean_full = 0.0;
  for (size_t i = 0; i < s.count; i++)
    {
      mean_half += fabs (half[i] - s.image[i]) / s.count;
      mean_full += fabs (full[i] - s.image[i]) / s.count;
    }
  g_test_message ("mean |x_0 - image|: strength 0.5 %.3f, strength 1 %.3f", mean_half, mean_full);
  g_assert_cmpfloat (mean_half, >, 0.0);
  g_assert_cmpfloat (mean_full, >, mean_half);
  g_free (kept);
  g_free (half);
  g_free (full);
  g_free (x);
  g_free (model_out);
  g_free (x_prev);
  g_free (pred);
  g_free (noise);
  teardown (&s);
}

/* Inpainting: outside the mask x_0 is the image exactly; an all-white mask changes
 * nothing; a mask changes the inside. */
static void
test_inpainting (void)
{
  Setup s;
  if (!setup (&s, 2))
    return;
  size_t hw = (size_t) s.h * s.w;
  float *left = g_new (float, s.n * hw), *white = g_new (float, s.n * hw);
  for (size_t i = 0; i < s.n * hw; i++)
    {
      left[i] = (i % s.w) < (size_t) s.w / 2 ? 1.0f : 0.0f;
      white[i] = 1.0f;
    }
  GdSampleOptions o = s.options;
  o.init_image = s.image;
  o.strength = 1.0;
  float *free_run = sample (&s, &o);
  o.mask = white;
  float *all_white = sample (&s, &o);
  g_assert_cmpfloat (max_difference (all_white, free_run, s.count), ==, 0.0);
  o.mask = left;
  float *painted = sample (&s, &o);
  double inside = 0.0;
  for (size_t i = 0; i < s.count; i++)
    {
      size_t pixel = i % hw, image = i / (s.channels * hw);
      if (left[image * hw + pixel] == 0.0f)
        g_assert_cmpfloat (painted[i], ==, s.image[i]);
      else
        inside = MAX (inside, fabs (painted[i] - s.image[i]));
    }
  g_assert_cmpfloat (inside, >, 0.1);
  /* the kept half steers the inside: it differs from the run without a mask */
  g_assert_cmpfloat (max_difference (painted, free_run, s.count), >, 0.0);
  g_free (free_run);
  g_free (all_white);
  g_free (painted);
  g_free (left);
  g_free (white);
  teardown (&s);
}

static void
test_bad_options (void)
{
  Setup s;
  if (!setup (&s, 1))
    return;
  float *mask = g_new0 (float, (size_t) s.h * s.w);
  GdSampleOptions o = s.options;
  o.mask = mask;
  GError *error = NULL;
  float *x = g_memdup2 (s.x_T, sizeof (float) * s.count);
  g_assert_false (gd_sample_run (&o, x, 1, s.h, s.w, &error));
  g_assert_error (error, GD_ERROR, GD_ERROR_INPUT);
  g_assert_nonnull (strstr (error->message, "needs the image"));
  g_clear_error (&error);
  o.mask = NULL;
  o.init_image = s.image;
  o.strength = 1.5;
  g_assert_false (gd_sample_run (&o, x, 1, s.h, s.w, &error));
  g_assert_error (error, GD_ERROR, GD_ERROR_INPUT);
  g_assert_nonnull (strstr (error->message, "strength 1.5"));
  g_clear_error (&error);
  g_free (x);
  g_free (mask);
  teardown (&s);
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  reference = gd_test_reference_dir ();
  g_test_add_func ("/sampler/steps-for-strength", test_steps_for_strength);
  g_test_add_func ("/sampler/draw-class", test_draw_class);
  g_test_add_func ("/sampler/sdedit", test_sdedit);
  g_test_add_func ("/sampler/inpainting", test_inpainting);
  g_test_add_func ("/sampler/bad-options", test_bad_options);
  int status = g_test_run ();
  g_free (reference);
  return status;
}
