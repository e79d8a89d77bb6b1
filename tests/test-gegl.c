/* The gd: GEGL operations in real GEGL graphs: in this process (graphs built from chain
 * text, results read back as floats) and through the `gegl` command line (chain files,
 * PNG output, warnings on bad properties).  Checks: per-step graphs give gd:sample's
 * pixels, the ddim_guided reference run through the nodes, gd:sample against
 * `guided sample`, the example graphs of data/graphs, SDEdit and inpainting, the shared
 * model cache, and that every bad property gives a warning and an empty output. */
#include <errno.h>
#include <gegl.h>
#include <glib/gstdio.h>
#include <math.h>
#include <string.h>
#include <unistd.h>

#include "gd-error.h"
#include "gd-metadata.h"
#include "gd-bf16.h"
#include "gd-model-cache.h"
#include "gd-safetensors.h"
#include "gd-sampler.h"
#include "gd-test-reference.h"

static const char *gegl_bin, *guided_bin, *source_dir, *preload;
static char *reference, *tmpdir;
static char *default_dir;   /* data dir whose default models are the gray 28x28 fixtures */
static char *empty_dir;     /* data dir without models */
static char *unet28, *classifier28, *unet16, *classifier16;

static gboolean
have_reference (void)
{
  return gd_test_have_reference (reference);
}

static gboolean
have_gegl_binary (void)
{
  if (gegl_bin && *gegl_bin && g_file_test (gegl_bin, G_FILE_TEST_IS_EXECUTABLE))
    return TRUE;
  const char *msg = "the gegl command line is not installed (apt-get install gegl)";
  g_printerr ("SKIP: %s\n", msg);
  g_test_skip (msg);
  return FALSE;
}

static char *
tmp_path (const char *name)
{
  return g_build_filename (tmpdir, name, NULL);
}

/* ---- running programs ---- */

/* Runs argv with GD_DATA_DIR = data_dir; returns the exit status and the stderr text.
 * A program killed by a signal fails the test: bad input must never crash the host. */
static int
run (char **argv, const char *data_dir, char **err)
{
  char **env = g_get_environ ();
  env = g_environ_setenv (env, "GD_DATA_DIR", data_dir, TRUE);
  /* an instrumented module in the uninstrumented gegl binary needs the sanitizer runtime
   * first; gegl itself frees nothing at exit */
  if (preload && *preload && argv[0] == gegl_bin)
    {
      env = g_environ_setenv (env, "LD_PRELOAD", preload, TRUE);
      env = g_environ_setenv (env, "ASAN_OPTIONS", "detect_leaks=0", TRUE);
    }
  int status = -1;
  char *errtext = NULL;
  GError *error = NULL;
  g_spawn_sync (NULL, argv, env, G_SPAWN_STDOUT_TO_DEV_NULL, NULL, NULL, NULL, &errtext, &status,
                &error);
  g_assert_no_error (error);
  g_strfreev (env);
  if (!WIFEXITED (status))
    g_error ("%s was killed by signal %d: %s", argv[0], WTERMSIG (status), errtext);
  if (err)
    *err = errtext;
  else
    g_free (errtext);
  return WEXITSTATUS (status);
}

/* Runs gegl with the arguments (NULL-terminated). */
static int
run_gegl (const char *data_dir, char **err, ...)
{
  GPtrArray *args = g_ptr_array_new ();
  g_ptr_array_add (args, (char *) gegl_bin);
  va_list ap;
  va_start (ap, err);
  for (const char *a; (a = va_arg (ap, const char *));)
    g_ptr_array_add (args, (char *) a);
  va_end (ap);
  g_ptr_array_add (args, NULL);
  int status = run ((char **) args->pdata, data_dir, err);
  g_ptr_array_unref (args);
  return status;
}

/* Runs `gegl -o OUT -- <chain>` (or with OUT NULL, just the chain, which may end in a sink). */
static int
run_gegl_chain (const char *data_dir, const char *out, const char *chain, char **err)
{
  char **words = NULL;
  GError *error = NULL;
  g_shell_parse_argv (chain, NULL, &words, &error);
  g_assert_no_error (error);
  GPtrArray *args = g_ptr_array_new ();
  g_ptr_array_add (args, (char *) gegl_bin);
  if (out)
    {
      g_ptr_array_add (args, "-o");
      g_ptr_array_add (args, (char *) out);
    }
  g_ptr_array_add (args, "--");
  for (char **w = words; *w; w++)
    g_ptr_array_add (args, *w);
  g_ptr_array_add (args, NULL);
  int status = run ((char **) args->pdata, data_dir, err);
  g_ptr_array_unref (args);
  g_strfreev (words);
  return status;
}

/* The chain text tools/step-graph.sh writes for the arguments. */
static char *
step_graph (const char *args)
{
  char *cmd = g_strdup_printf ("bash %s/tools/step-graph.sh %s", source_dir, args);
  char *out = NULL, *err = NULL;
  int status = 0;
  GError *error = NULL;
  g_spawn_command_line_sync (cmd, &out, &err, &status, &error);
  g_assert_no_error (error);
  if (!g_spawn_check_wait_status (status, NULL))
    g_error ("%s failed: %s", cmd, err);
  g_free (cmd);
  g_free (err);
  return out;
}

/* ---- images and tensors read back ---- */

typedef struct {
  int width, height, channels;
  float *data;        /* interleaved */
} Image;

static void
image_clear (Image *image)
{
  g_free (image->data);
  image->data = NULL;
}

/* The output of a node, whole, in `format`. */
static Image
blit (GeglNode *node, const char *format_name)
{
  const Babl *format = babl_format (format_name);
  GeglRectangle box = gegl_node_get_bounding_box (node);
  Image image = { box.width, box.height, babl_format_get_n_components (format), NULL };
  image.data = g_new0 (float, (size_t) image.width * image.height * image.channels + 1);
  gegl_node_blit (node, 1.0, &box, format, image.data, GEGL_AUTO_ROWSTRIDE, GEGL_BLIT_DEFAULT);
  return image;
}

/* The result of chain text as `format`, optionally starting from `start` (its first ops
 * then attach to it). */
static Image
run_chain (const char *chain, GeglNode *start, const char *format)
{
  GeglNode *graph = start ? g_object_ref (gegl_node_get_parent (start)) : gegl_node_new ();
  GeglNode *end = gegl_node_new_child (graph, "operation", "gegl:nop", NULL);
  GError *error = NULL;
  gegl_create_chain (chain, start, end, 0.0, 0, source_dir, &error);
  g_assert_no_error (error);
  Image image = blit (end, format);
  g_object_unref (graph);
  return image;
}

/* Image pixels of a PNG as R'G'B' float (gray replicated), whatever its bit depth. */
static Image
read_png (const char *path)
{
  g_assert_true (g_file_test (path, G_FILE_TEST_EXISTS));
  GeglNode *graph = gegl_node_new ();
  GeglNode *load = gegl_node_new_child (graph, "operation", "gegl:png-load", "path", path, NULL);
  Image image = blit (load, "R'G'B' float");
  g_object_unref (graph);
  return image;
}

static double
max_difference (const Image *a, const Image *b)
{
  g_assert_cmpint (a->width, ==, b->width);
  g_assert_cmpint (a->height, ==, b->height);
  g_assert_cmpint (a->channels, ==, b->channels);
  double worst = 0.0;
  size_t count = (size_t) a->width * a->height * a->channels;
  for (size_t i = 0; i < count; i++)
    {
      double d = fabs ((double) a->data[i] - b->data[i]);
      if (!(d <= worst))
        worst = isnan (d) ? INFINITY : d;
    }
  return worst;
}

static float *
read_tensor (const char *path, const char *name, int64_t *shape)
{
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (path, &error);
  g_assert_no_error (error);
  const GdStTensor *t = gd_safetensors_find (st, name);
  g_assert_nonnull (t);
  for (int i = 0; shape && i < t->ndim; i++)
    shape[i] = t->shape[i];
  float *data = gd_st_tensor_to_f32 (t);
  gd_safetensors_free (st);
  return data;
}

/* ---- the module ---- */

static void
test_registered (void)
{
  const char *ops[] = { "gd:noise", "gd:noise-predict", "gd:classifier-gradient",
                        "gd:scheduler-step", "gd:encode", "gd:decode", "gd:sample" };
  for (guint i = 0; i < G_N_ELEMENTS (ops); i++)
    {
      g_assert_true (gegl_has_operation (ops[i]));
      g_assert_cmpstr (gegl_operation_get_key (ops[i], "categories"), ==, "render");
      g_assert_nonnull (gegl_operation_get_key (ops[i], "title"));
      g_assert_nonnull (gegl_operation_get_key (ops[i], "description"));
    }
  g_assert_cmpstr (gegl_operation_get_key ("gd:sample", "gimp:menu-path"), ==,
                   "<Image>/Filters/Render/Diffusion");
  g_assert_nonnull (gegl_operation_get_key ("gd:sample", "gimp:menu-label"));
  /* the interface of the issue: these property names exist */
  const char *props[][2] = {
    { "gd:noise", "seed" }, { "gd:noise", "width" }, { "gd:noise", "channels" },
    { "gd:noise-predict", "respacing" }, { "gd:classifier-gradient", "label" },
    { "gd:scheduler-step", "guidance-scale" }, { "gd:scheduler-step", "clip-denoised" },
    { "gd:scheduler-step", "eta" }, { "gd:sample", "strength" }, { "gd:sample", "classifier" },
  };
  for (guint i = 0; i < G_N_ELEMENTS (props); i++)
    {
      GParamSpec *pspec = gegl_operation_find_property (props[i][0], props[i][1]);
      g_assert_nonnull (pspec);
      g_assert_nonnull (g_param_spec_get_blurb (pspec));
    }
}

/* gd:noise seed=S is x_T of the sampler: stream 0 of key S. */
static void
test_noise (void)
{
  Image x = run_chain ("gd:noise seed=42 width=8 height=6 channels=3", NULL, "RGB float");
  g_assert_cmpint (x.width, ==, 8);
  g_assert_cmpint (x.height, ==, 6);
  float expected[3 * 48];
  gd_sample_initial_noise (42, 1, 3 * 48, expected);
  for (int c = 0; c < 3; c++)
    for (int i = 0; i < 48; i++)
      g_assert_cmpfloat (x.data[i * 3 + c], ==, expected[c * 48 + i]);
  image_clear (&x);
}

/* gd:encode is 2v - 1, gd:decode clamp((x + 1) / 2); tensors survive gegl:add exactly. */
static void
test_encode_decode (void)
{
  Image image = run_chain ("gegl:linear-gradient start-x=0 start-y=0 end-x=16 end-y=0 start-color=black end-color=white "
                           "gegl:crop width=16 height=4", NULL, "R'G'B' float");
  Image tensor = run_chain ("gegl:linear-gradient start-x=0 start-y=0 end-x=16 end-y=0 start-color=black end-color=white "
                            "gegl:crop width=16 height=4 gd:encode", NULL, "RGB float");
  for (size_t i = 0; i < 16 * 4 * 3; i++)
    g_assert_cmpfloat_with_epsilon (tensor.data[i], 2.0f * image.data[i] - 1.0f, 1e-6);
  Image back = run_chain ("gegl:linear-gradient start-x=0 start-y=0 end-x=16 end-y=0 start-color=black end-color=white "
                          "gegl:crop width=16 height=4 gd:encode gd:decode", NULL, "R'G'B' float");
  g_assert_cmpfloat (max_difference (&back, &image), <=, 1e-6);
  /* out-of-range model values clamp; negative tensors pass gegl:add bit-exact */
  Image noise = run_chain ("gd:noise seed=3 width=8 height=8 channels=1", NULL, "Y float");
  Image doubled = run_chain ("gd:noise seed=3 width=8 height=8 channels=1 id=a gegl:add aux=[ ref=a ]",
                             NULL, "Y float");
  Image decoded = run_chain ("gd:noise seed=3 width=8 height=8 channels=1 gd:decode", NULL, "Y' float");
  for (int i = 0; i < 64; i++)
    {
      g_assert_cmpfloat (doubled.data[i], ==, noise.data[i] + noise.data[i]);
      g_assert_cmpfloat (decoded.data[i], ==, CLAMP ((noise.data[i] + 1.0f) / 2.0f, 0.0f, 1.0f));
    }
  image_clear (&image);
  image_clear (&tensor);
  image_clear (&back);
  image_clear (&noise);
  image_clear (&doubled);
  image_clear (&decoded);
}

/* ---- per-step graphs against gd:sample ---- */

typedef struct {
  const char *name, *sampler;
  int steps;
  double eta;
} StepCase;

static void
test_steps_match_sample (gconstpointer data)
{
  const StepCase *c = data;
  if (!have_reference ())
    return;
  char *args = g_strdup_printf ("--steps %d --seed 7 --class 3 --scale 10 --sampler %s --eta %g "
                                "--model %s --classifier %s", c->steps, c->sampler, c->eta,
                                unet28, classifier28);
  char *graph = step_graph (args);
  char *sample = g_strdup_printf ("gd:sample model=%s classifier=%s class=3 guidance-scale=10 "
                                  "steps=%d sampler=%s eta=%g seed=7", unet28, classifier28,
                                  c->steps, c->sampler, c->eta);
  Image by_steps = run_chain (graph, NULL, "Y' float");
  Image whole = run_chain (sample, NULL, "Y' float");
  g_assert_cmpint (by_steps.width, ==, 28);
  double diff = max_difference (&by_steps, &whole);
  g_test_message ("%s: %d steps, per-step graph vs gd:sample max |a - b| = %g", c->name, c->steps,
                  diff);
  g_assert_cmpfloat (diff, <=, 1e-5);
  /* and the run is not trivial: another seed gives another image */
  char *other = g_strdup_printf ("gd:sample model=%s classifier=%s class=3 guidance-scale=10 "
                                 "steps=%d sampler=%s eta=%g seed=8", unet28, classifier28,
                                 c->steps, c->sampler, c->eta);
  Image reseeded = run_chain (other, NULL, "Y' float");
  g_assert_cmpfloat (max_difference (&reseeded, &whole), >, 0.01);
  image_clear (&by_steps);
  image_clear (&whole);
  image_clear (&reseeded);
  g_free (args);
  g_free (graph);
  g_free (sample);
  g_free (other);
}

/* The reference's ddim_guided run (two images, classes 3 and 7, scale 10, ddim10) through
 * the per-step nodes, each x_T put in a buffer; every step within 2e-3. */
static void
test_fixture_ddim_guided (void)
{
  if (!have_reference ())
    return;
  char *io = g_build_filename (reference, "sampling", "ddim_guided", "io.safetensors", NULL);
  int64_t shape[5], sshape[5], yshape[1];
  float *x_T = read_tensor (io, "x_T", shape);
  float *samples = read_tensor (io, "samples", sshape);
  float *y = read_tensor (io, "y", yshape);
  int n = (int) shape[0], channels = (int) shape[1], h = (int) shape[2], w = (int) shape[3];
  int steps = (int) sshape[0];
  size_t per_image = (size_t) channels * h * w;
  g_assert_cmpint (channels, ==, 3);
  double worst = 0.0;
  for (int j = 0; j < n; j++)
    {
      GeglRectangle box = { 0, 0, w, h };
      GeglBuffer *buffer = gegl_buffer_new (&box, babl_format ("RGB float"));
      float *pixels = g_new (float, per_image);
      for (size_t i = 0; i < (size_t) h * w; i++)
        for (int c = 0; c < channels; c++)
          pixels[i * channels + c] = x_T[j * per_image + c * h * w + i];
      gegl_buffer_set (buffer, &box, 0, babl_format ("RGB float"), pixels, GEGL_AUTO_ROWSTRIDE);
      g_free (pixels);
      /* stop after each step in turn to compare the whole trajectory */
      for (int done = 1; done <= steps; done++)
        {
          char *args = g_strdup_printf ("--steps %d --class %d --scale 10 --model %s "
                                        "--classifier %s --start '' --tensor", steps, (int) y[j],
                                        unet16, classifier16);
          char *graph = step_graph (args);
          /* keep the first `done` steps: cut the text before step steps - done - 1 */
          char *cut = g_strdup_printf ("gd:scheduler-step step=%d ", steps - done - 1);
          char *end = done < steps ? strstr (graph, cut) : NULL;
          if (end)
            *end = '\0';
          GeglNode *graph_node = gegl_node_new ();
          GeglNode *source = gegl_node_new_child (graph_node, "operation", "gegl:buffer-source",
                                                  "buffer", buffer, NULL);
          Image x = run_chain (graph, source, "RGB float");
          g_object_unref (graph_node);
          const float *ref = samples + ((size_t) (done - 1) * n + j) * per_image;
          double step_max = 0.0;
          for (size_t i = 0; i < (size_t) h * w; i++)
            for (int c = 0; c < channels; c++)
              step_max = MAX (step_max, fabs ((double) x.data[i * channels + c] - ref[c * h * w + i]));
          if (!(step_max <= 2e-3))
            g_error ("ddim_guided image %d step %d: max |a - b| = %g exceeds 2e-3", j, done, step_max);
          worst = MAX (worst, step_max);
          image_clear (&x);
          g_free (args);
          g_free (graph);
          g_free (cut);
        }
      g_object_unref (buffer);
    }
  g_test_message ("ddim_guided through GEGL nodes: worst step max |a - b| = %.3g over %d steps x %d images",
                  worst, steps, n);
  g_free (x_T);
  g_free (samples);
  g_free (y);
  g_free (io);
}

/* ---- stock ops on gradients ---- */

/* Two gradient nodes summed with gegl:add are the sum of the two gradients, and a gradient
 * times a mask with gegl:multiply is the gradient where the mask is white, 0 elsewhere. */
static void
test_gradient_arithmetic (void)
{
  if (!have_reference ())
    return;
  char *base = g_strdup_printf ("gd:noise seed=5 model=%s id=x gd:classifier-gradient classifier=%s "
                                "steps=10 step=6", unet28, classifier28);
  char *one = g_strdup_printf ("%s class=3", base);
  char *two = g_strdup_printf ("%s class=7", base);
  char *sum = g_strdup_printf ("%s class=3 gegl:add aux=[ ref=x gd:classifier-gradient classifier=%s "
                               "steps=10 step=6 class=7 ]", base, classifier28);
  char *masked = g_strdup_printf ("%s class=3 gegl:multiply aux=[ gegl:load path=data/graphs/mask-left-half.png ]",
                                  base);
  Image a = run_chain (one, NULL, "Y float"), b = run_chain (two, NULL, "Y float");
  Image s = run_chain (sum, NULL, "Y float"), m = run_chain (masked, NULL, "Y float");
  double largest = 0.0;
  for (int i = 0; i < 28 * 28; i++)
    {
      g_assert_cmpfloat (s.data[i], ==, a.data[i] + b.data[i]);
      g_assert_cmpfloat (m.data[i], ==, (i % 28) < 14 ? a.data[i] : 0.0f);
      largest = MAX (largest, fabs (a.data[i]));
    }
  g_assert_cmpfloat (largest, >, 0.0);
  image_clear (&a);
  image_clear (&b);
  image_clear (&s);
  image_clear (&m);
  g_free (base);
  g_free (one);
  g_free (two);
  g_free (sum);
  g_free (masked);
}

/* The bf16 property of gd:noise-predict: its eps close to the float one (bfloat16 keeps 8
 * bits of mantissa), not equal (the products did run in bf16); on a processor without a
 * bf16 product the node fails with the reason, tested loudly as a skip. */
static void
test_bf16 (void)
{
  if (!have_reference ())
    return;
  if (!gd_bf16_kernel ())
    {
      g_printerr ("SKIP (bf16 property): this processor has neither AMX-BF16 nor AVX512-BF16\n");
      g_test_skip ("this processor has no bf16 product");
      return;
    }
  char *exact = g_strdup_printf ("gd:noise seed=8 model=%s gd:noise-predict model=%s steps=10 step=4",
                                 unet28, unet28);
  char *rounded = g_strdup_printf ("%s bf16=true", exact);
  Image a = run_chain (exact, NULL, "Y float"), b = run_chain (rounded, NULL, "Y float");
  double largest = 0.0;
  for (int i = 0; i < 28 * 28; i++)
    largest = MAX (largest, fabs (a.data[i]));
  double worst = max_difference (&a, &b);
  g_test_message ("gd:noise-predict bf16=true: largest difference %.2e of the largest eps", worst / largest);
  g_assert_cmpfloat (worst, >, 0.0);
  g_assert_cmpfloat (worst, <=, 3e-2 * largest);
  image_clear (&a);
  image_clear (&b);
  g_free (exact);
  g_free (rounded);
}

/* ---- gd:sample with an image ---- */

static void
test_variation_and_inpainting (void)
{
  if (!have_reference ())
    return;
  const char *picture = "gegl:linear-gradient start-x=0 start-y=0 end-x=28 end-y=0 start-color=black end-color=white "
                        "gegl:crop width=28 height=28";
  char *common = g_strdup_printf ("model=%s guidance-scale=0 steps=10 seed=2", unet28);
  char *keep = g_strdup_printf ("%s gd:sample %s strength=0", picture, common);
  char *half = g_strdup_printf ("%s gd:sample %s strength=0.5", picture, common);
  char *full = g_strdup_printf ("%s gd:sample %s strength=1", picture, common);
  char *inpaint = g_strdup_printf ("%s gd:sample %s aux=[ gegl:load path=data/graphs/mask-left-half.png ]",
                                   picture, common);
  Image original = run_chain (picture, NULL, "Y' float");
  Image kept = run_chain (keep, NULL, "Y' float");
  Image varied = run_chain (half, NULL, "Y' float");
  Image redrawn = run_chain (full, NULL, "Y' float");
  Image painted = run_chain (inpaint, NULL, "Y' float");
  /* strength 0 runs no step: the image comes back */
  g_assert_cmpfloat (max_difference (&kept, &original), <=, 1e-6);
  /* more strength, further from the image */
  double mean_half = 0.0, mean_full = 0.0;
  for (int i = 0; i < 28 * 28; i++)
    {
      mean_half += fabs (varied.data[i] - original.data[i]) / (28 * 28);
      mean_full += fabs (redrawn.data[i] - original.data[i]) / (28 * 28);
    }
  g_test_message ("mean |sample - image|: strength 0.5 %.3f, strength 1 %.3f", mean_half, mean_full);
  g_assert_cmpfloat (mean_half, >, 0.0);
  g_assert_cmpfloat (mean_full, >, mean_half);
  /* inpainting: the black half of the mask keeps the image exactly, the white half changes */
  double kept_max = 0.0, changed = 0.0;
  for (int i = 0; i < 28 * 28; i++)
    {
      double d = fabs (painted.data[i] - original.data[i]);
      if (i % 28 >= 14)
        kept_max = MAX (kept_max, d);
      else
        changed += d;
    }
  g_assert_cmpfloat (kept_max, <=, 1e-6);
  g_assert_cmpfloat (changed, >, 1.0);
  image_clear (&original);
  image_clear (&kept);
  image_clear (&varied);
  image_clear (&redrawn);
  image_clear (&painted);
  g_free (common);
  g_free (keep);
  g_free (half);
  g_free (full);
  g_free (inpaint);
}

static void
count_progress (GeglNode *node, gdouble progress, gpointer user)
{
  (void) node;
  GArray *seen = user;
  g_array_append_val (seen, progress);
}

/* gd:sample reports its progress: 0, then after every step, ending at 1. */
static void
test_progress (void)
{
  if (!have_reference ())
    return;
  GeglNode *graph = gegl_node_new ();
  GeglNode *sample = gegl_node_new_child (graph, "operation", "gd:sample", "model", unet28,
                                          "guidance-scale", 0.0, "steps", 4, NULL);
  GArray *seen = g_array_new (FALSE, FALSE, sizeof (double));
  g_signal_connect (sample, "progress", G_CALLBACK (count_progress), seen);
  Image image = blit (sample, "Y' float");
  g_assert_cmpint (seen->len, ==, 5);
  g_assert_cmpfloat (g_array_index (seen, double, 0), ==, 0.0);
  g_assert_cmpfloat (g_array_index (seen, double, 4), ==, 1.0);
  image_clear (&image);
  g_array_unref (seen);
  g_object_unref (graph);
}

/* ---- the shared model cache ---- */

static void
test_model_cache (void)
{
  if (!have_reference ())
    return;
  GError *error = NULL;
  guint before = gd_model_cache_count ();
  GdCachedModel *a = gd_model_cache_acquire (unet28, NULL, &error);
  g_assert_no_error (error);
  /* another spelling of the same file is the same model */
  char *dir = g_path_get_dirname (unet28);
  char *other = g_build_filename (dir, ".", "model.safetensors", NULL);
  GdCachedModel *b = gd_model_cache_acquire (other, "", &error);
  g_assert_no_error (error);
  g_assert_true (a == b);
  g_assert_cmpuint (gd_model_cache_count (), ==, before + 1);
  GdCachedModel *c = gd_model_cache_acquire (classifier28, NULL, &error);
  g_assert_no_error (error);
  g_assert_true (c != a);
  g_assert_cmpuint (gd_model_cache_count (), ==, before + 2);
  gd_model_cache_release (a);
  g_assert_cmpuint (gd_model_cache_count (), ==, before + 2);
  gd_model_cache_release (b);
  gd_model_cache_release (c);
  g_assert_cmpuint (gd_model_cache_count (), ==, before);
  g_assert_null (gd_model_cache_acquire ("/nonexistent/model.safetensors", NULL, &error));
  g_assert_error (error, GD_ERROR, GD_ERROR_IO);
  g_clear_error (&error);

  /* a .pt that is not a release: refused without its architecture, loaded with it (a file
   * or inline JSON), and then holding the weights of its safetensors twin */
  char *pt = g_build_filename (dir, "model.pt", NULL);
  char *config = g_build_filename (dir, "config.json", NULL);
  g_assert_null (gd_model_cache_acquire (pt, NULL, &error));
  g_assert_nonnull (error);
  g_clear_error (&error);
  GdCachedModel *from_pt = gd_model_cache_acquire (pt, config, &error);
  g_assert_no_error (error);
  GdCachedModel *twin = gd_model_cache_acquire (unet28, NULL, &error);
  g_assert_no_error (error);
  g_assert_true (from_pt != twin);
  for (guint i = 0; i < gd_model_n_params (twin->model); i++)
    {
      GdParam *p = gd_model_param (twin->model, i), *q = gd_model_param (from_pt->model, i);
      g_assert_cmpstr (p->name, ==, q->name);
      g_assert_cmpint (memcmp (p->data, q->data, sizeof (float) * p->numel), ==, 0);
    }
  gd_model_cache_release (from_pt);
  gd_model_cache_release (twin);
  g_assert_cmpuint (gd_model_cache_count (), ==, before);
  g_free (pt);
  g_free (config);
  g_free (dir);
  g_free (other);
}

/* ---- the gegl command line ---- */

/* gegl writes the image `guided sample` writes: exactly with an 8-bit PNG, within the
 * rounding of 16 bits for the default (16-bit) PNG of -o. */
static void
test_cli_matches_guided (gconstpointer data)
{
  gboolean with_class = GPOINTER_TO_INT (data);
  if (!have_reference () || !have_gegl_binary ())
    return;
  char *by_guided = tmp_path ("guided.png"), *by_gegl8 = tmp_path ("gegl8.png");
  char *by_gegl16 = tmp_path ("gegl16.png");
  const char *class_arg = with_class ? " class=3" : "";
  char *chain = g_strdup_printf ("gd:sample model=%s classifier=%s%s guidance-scale=10 steps=10 seed=11",
                                 unet16, classifier16, class_arg);
  char *chain8 = g_strdup_printf ("%s gegl:png-save path=%s bitdepth=8", chain, by_gegl8);
  char *err = NULL;
  g_assert_cmpint (run_gegl_chain (empty_dir, NULL, chain8, &err), ==, 0);
  g_assert_null (strstr (err, "guided-WARNING"));
  g_free (err);
  g_assert_cmpint (run_gegl_chain (empty_dir, by_gegl16, chain, NULL), ==, 0);
  char *argv[] = { (char *) guided_bin, "sample", "--model", unet16, "--classifier", classifier16,
                   "--scale", "10", "--steps", "10", "--seed", "11", "-o", by_guided,
                   with_class ? "--class" : NULL, "3", NULL };
  g_assert_cmpint (run (argv, empty_dir, NULL), ==, 0);
  Image a = read_png (by_guided), b = read_png (by_gegl8), c = read_png (by_gegl16);
  g_assert_cmpfloat (max_difference (&a, &b), ==, 0.0);
  double diff16 = max_difference (&a, &c) * 255.0;
  g_test_message ("gegl -o (16-bit PNG) vs guided sample (8-bit): max %.3f levels of 255", diff16);
  g_assert_cmpfloat (diff16, <=, 0.5 + 1e-3);
  image_clear (&a);
  image_clear (&b);
  image_clear (&c);
  g_free (by_guided);
  g_free (by_gegl8);
  g_free (by_gegl16);
  g_free (chain);
  g_free (chain8);
}

/* The example chain files of data/graphs run with `gegl FILE -o out.png` on the default
 * models; the node-by-node DDIM gives gd:sample's image, the two-class and one-region
 * graphs differ from it (their guidance has an effect). */
static void
test_graph_files (void)
{
  if (!have_reference () || !have_gegl_binary ())
    return;
  const char *files[] = { "guided-ddim-10.gegl", "two-classes.gegl", "region-guidance.gegl" };
  Image results[3];
  for (int i = 0; i < 3; i++)
    {
      char *path = g_build_filename (source_dir, "data", "graphs", files[i], NULL);
      char *out = tmp_path ("graph.png");
      g_remove (out);
      char *err = NULL;
      g_assert_cmpint (run_gegl (default_dir, &err, path, "-o", out, NULL), ==, 0);
      if (strstr (err, "guided-WARNING"))
        g_error ("%s: %s", files[i], err);
      results[i] = read_png (out);
      g_assert_cmpint (results[i].width, ==, 28);
      g_free (path);
      g_free (out);
      g_free (err);
    }
  char *out = tmp_path ("sample.png");
  g_assert_cmpint (run_gegl_chain (default_dir, out, "gd:sample steps=10 seed=1 class=3 guidance-scale=10",
                                   NULL), ==, 0);
  Image sample = read_png (out);
  g_assert_cmpfloat (max_difference (&results[0], &sample), ==, 0.0);
  g_assert_cmpfloat (max_difference (&results[1], &sample), >, 0.05);
  g_assert_cmpfloat (max_difference (&results[2], &sample), >, 0.05);
  for (int i = 0; i < 3; i++)
    image_clear (&results[i]);
  image_clear (&sample);
  g_free (out);
}

/* A classifier fixture with the Fashion-MNIST class names as its label list. */
static char *
labelled_classifier (void)
{
  char *path = tmp_path ("labelled-classifier.safetensors");
  if (g_file_test (path, G_FILE_TEST_EXISTS))
    return path;
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (classifier28, &error);
  g_assert_no_error (error);
  GdStWriter *writer = gd_st_writer_new ();
  for (guint i = 0; i < gd_safetensors_count (st); i++)
    {
      const GdStTensor *t = gd_safetensors_nth (st, i);
      gd_st_writer_add (writer, t->name, t->dtype, t->ndim, t->shape, t->data);
    }
  const char *keys[] = { "kind", "config", "diffusion" };
  for (guint i = 0; i < G_N_ELEMENTS (keys); i++)
    if (gd_safetensors_metadata (st, keys[i]))
      gd_st_writer_set_metadata (writer, keys[i], gd_safetensors_metadata (st, keys[i]));
  gd_st_writer_set_metadata (writer, "labels",
                             "[\"T-shirt/top\", \"Trouser\", \"Pullover\", \"Dress\", \"Coat\", "
                             "\"Sandal\", \"Shirt\", \"Sneaker\", \"Bag\", \"Ankle boot\"]");
  gd_st_writer_write (writer, path, &error);
  g_assert_no_error (error);
  gd_st_writer_free (writer);
  gd_safetensors_free (st);
  return path;
}

/* A label from the classifier's list picks that class: the same gradient as its index. */
static void
test_label (void)
{
  if (!have_reference ())
    return;
  char *classifier = labelled_classifier ();
  char *by_name = g_strdup_printf ("gd:noise seed=5 model=%s gd:classifier-gradient classifier=%s steps=10 step=4 label=sneaker",
                                   unet28, classifier);
  char *by_index = g_strdup_printf ("gd:noise seed=5 model=%s gd:classifier-gradient classifier=%s steps=10 step=4 class=7",
                                    unet28, classifier);
  Image a = run_chain (by_name, NULL, "Y float"), b = run_chain (by_index, NULL, "Y float");
  g_assert_cmpfloat (max_difference (&a, &b), ==, 0.0);
  image_clear (&a);
  image_clear (&b);
  g_free (classifier);
  g_free (by_name);
  g_free (by_index);
}

typedef struct {
  const char *name;
  const char *chain;      /* {unet}: the 28x28 U-Net, {classifier}: its classifier,
                           * {labelled}: that classifier with a label list */
  const char *op;         /* the node the warning names */
  const char *cause;      /* in the warning */
} BadCase;

static const BadCase bad_cases[] = {
  { "missing-model", "gd:noise seed=1 model={unet} gd:noise-predict model=/nonexistent/unet.safetensors id=eps9",
    "gd:noise-predict (node 'eps9')", "/nonexistent/unet.safetensors: No such file" },
  { "missing-default-model", "gd:sample guidance-scale=0 steps=2",
    "gd:sample", "default-unet.safetensors" },
  { "missing-default-classifier", "gd:noise seed=1 model={unet} gd:classifier-gradient class=1",
    "gd:classifier-gradient", "default-classifier.safetensors" },
  { "not-a-model", "gd:noise seed=1 model={unet} gd:noise-predict model={classifier}",
    "gd:noise-predict", "is a classifier, not a diffusion model" },
  { "unknown-label", "gd:noise seed=1 model={unet} gd:classifier-gradient classifier={labelled} label=Sneakr",
    "gd:classifier-gradient", "unknown label 'Sneakr'" },
  { "label-without-list", "gd:noise seed=1 model={unet} gd:classifier-gradient classifier={classifier} label=Bag",
    "gd:classifier-gradient", "has no label list" },
  { "class-out-of-range", "gd:noise seed=1 model={unet} gd:classifier-gradient classifier={classifier} class=10",
    "gd:classifier-gradient", "class 10 is out of range" },
  { "sample-class-out-of-range", "gd:sample model={unet} classifier={classifier} class=12 steps=2",
    "gd:sample", "class 12 is out of range" },
  { "no-class", "gd:noise seed=1 model={unet} gd:classifier-gradient classifier={classifier}",
    "gd:classifier-gradient", "no class" },
  { "size-mismatch", "gd:noise seed=1 width=30 height=30 channels=1 gd:noise-predict model={unet}",
    "gd:noise-predict", "multiples of 4" },
  { "classifier-size-mismatch", "gd:noise seed=1 width=32 height=32 channels=1 gd:classifier-gradient classifier={classifier} class=1",
    "gd:classifier-gradient", "attention pooling needs 28x28" },
  { "channel-mismatch", "gd:noise seed=1 width=28 height=28 channels=3 gd:noise-predict model={unet}",
    "gd:noise-predict", "x_t has 3 channels" },
  { "aux-missing", "gd:noise seed=1 model={unet} gd:scheduler-step model={unet} steps=10 step=3",
    "gd:scheduler-step", "model output missing" },
  { "step-out-of-range", "gd:noise seed=1 model={unet} gd:noise-predict model={unet} steps=10 step=10",
    "gd:noise-predict", "step 10 is out of range" },
  { "scheduler-step-out-of-range", "gd:noise seed=1 model={unet} id=x gd:scheduler-step model={unet} steps=5 step=7 aux=[ ref=x gd:noise-predict model={unet} steps=5 step=0 ]",
    "gd:scheduler-step", "step 7 is out of range" },
  { "bad-respacing", "gd:noise seed=1 model={unet} gd:noise-predict model={unet} respacing=ddim999",
    "gd:noise-predict", "ddim999" },
  { "mask-without-image", "gd:sample model={unet} guidance-scale=0 steps=2 aux=[ gegl:color value=white gegl:crop width=28 height=28 ]",
    "gd:sample", "needs the image" },
  { "sample-image-size", "gegl:color value=gray gegl:crop width=30 height=30 gd:sample model={unet} guidance-scale=0 steps=2",
    "gd:sample", "does not fit" },
  { "decode-learned-sigma", "gd:noise seed=1 model={unet} gd:noise-predict model={unet} steps=10 step=1 gd:decode",
    "gd:decode", "has 2 channels" },
};

/* Every bad property: a warning naming the node and the cause, no output file, no crash. */
static void
test_bad_property (gconstpointer data)
{
  const BadCase *c = data;
  if (!have_reference () || !have_gegl_binary ())
    return;
  char *classifier = labelled_classifier ();
  char *chain = g_strdup (c->chain);
  const char *names[][2] = { { "{unet}", unet28 }, { "{classifier}", classifier28 },
                             { "{labelled}", classifier } };
  for (guint i = 0; i < G_N_ELEMENTS (names); i++)
    {
      char **parts = g_strsplit (chain, names[i][0], -1);
      g_free (chain);
      chain = g_strjoinv (names[i][1], parts);
      g_strfreev (parts);
    }
  char *out = tmp_path ("bad.png");
  g_remove (out);
  char *err = NULL;
  int status = run_gegl_chain (empty_dir, out, chain, &err);
  if (!strstr (err, "guided-WARNING **") || !strstr (err, c->op) || !strstr (err, c->cause))
    g_error ("%s: expected a warning of %s naming '%s'; gegl said:\n%s", c->name, c->op, c->cause, err);
  g_assert_cmpint (status, ==, 0);
  g_assert_false (g_file_test (out, G_FILE_TEST_EXISTS));
  g_free (classifier);
  g_free (chain);
  g_free (out);
  g_free (err);
}

/* The default models of the data dir serve an empty model property. */
static void
test_default_models (void)
{
  if (!have_reference () || !have_gegl_binary ())
    return;
  char *by_default = tmp_path ("default.png"), *named = tmp_path ("named.png");
  char *explicit = g_strdup_printf ("gd:sample model=%s classifier=%s steps=3 seed=4 class=2",
                                    unet28, classifier28);
  g_assert_cmpint (run_gegl_chain (default_dir, by_default, "gd:sample steps=3 seed=4 class=2", NULL), ==, 0);
  g_assert_cmpint (run_gegl_chain (empty_dir, named, explicit, NULL), ==, 0);
  Image a = read_png (by_default), b = read_png (named);
  g_assert_cmpint (a.width, ==, 28);
  g_assert_cmpfloat (max_difference (&a, &b), ==, 0.0);
  image_clear (&a);
  image_clear (&b);
  g_free (by_default);
  g_free (named);
  g_free (explicit);
}

static void
link_file (const char *from, const char *to)
{
  if (symlink (from, to) != 0)
    g_error ("cannot link %s to %s: %s", to, from, g_strerror (errno));
}

int
main (int argc, char **argv)
{
  g_test_init (&argc, &argv, NULL);
  gegl_bin = g_getenv ("GEGL_BIN");
  guided_bin = g_getenv ("GUIDED");
  source_dir = g_getenv ("GD_SOURCE_DIR");
  preload = g_getenv ("GD_GEGL_PRELOAD");
  g_assert_nonnull (guided_bin);
  g_assert_nonnull (source_dir);
  g_assert_nonnull (g_getenv ("GEGL_PATH"));
  reference = gd_test_reference_dir ();
  tmpdir = g_dir_make_tmp ("gd-gegl-XXXXXX", NULL);
  g_assert_nonnull (tmpdir);
  unet28 = g_build_filename (reference, "unet", "gray28_uncond", "model.safetensors", NULL);
  classifier28 = g_build_filename (reference, "classifier", "gray28_attnpool", "model.safetensors", NULL);
  unet16 = g_build_filename (reference, "unet", "tiny_cond_learnsigma", "model.safetensors", NULL);
  classifier16 = g_build_filename (reference, "classifier", "tiny_attnpool", "model.safetensors", NULL);
  default_dir = tmp_path ("data");
  empty_dir = tmp_path ("empty");
  char *models = g_build_filename (default_dir, "models", NULL);
  g_mkdir_with_parents (models, 0755);
  g_mkdir_with_parents (empty_dir, 0755);
  char *unet_link = g_build_filename (models, "default-unet.safetensors", NULL);
  char *classifier_link = g_build_filename (models, "default-classifier.safetensors", NULL);
  link_file (unet28, unet_link);
  link_file (classifier28, classifier_link);
  /* in this process no default models unless a test says so */
  g_setenv ("GD_DATA_DIR", empty_dir, TRUE);
  gegl_init (&argc, &argv);

  g_test_add_func ("/gegl/registered", test_registered);
  g_test_add_func ("/gegl/noise", test_noise);
  g_test_add_func ("/gegl/encode-decode", test_encode_decode);
  static const StepCase step_cases[] = {
    { "ddim", "ddim", 10, 0.0 }, { "ddim-eta", "ddim", 5, 0.7 }, { "ddpm", "ddpm", 5, 0.0 },
  };
  for (guint i = 0; i < G_N_ELEMENTS (step_cases); i++)
    {
      char *name = g_strdup_printf ("/gegl/steps-match-sample/%s", step_cases[i].name);
      g_test_add_data_func (name, &step_cases[i], test_steps_match_sample);
      g_free (name);
    }
  g_test_add_func ("/gegl/fixture/ddim_guided", test_fixture_ddim_guided);
  g_test_add_func ("/gegl/gradient-arithmetic", test_gradient_arithmetic);
  g_test_add_func ("/gegl/bf16", test_bf16);
  g_test_add_func ("/gegl/variation-and-inpainting", test_variation_and_inpainting);
  g_test_add_func ("/gegl/progress", test_progress);
  g_test_add_func ("/gegl/model-cache", test_model_cache);
  g_test_add_func ("/gegl/label", test_label);
  g_test_add_func ("/gegl/cli/default-models", test_default_models);
  g_test_add_data_func ("/gegl/cli/matches-guided/class", GINT_TO_POINTER (TRUE), test_cli_matches_guided);
  g_test_add_data_func ("/gegl/cli/matches-guided/drawn-class", GINT_TO_POINTER (FALSE), test_cli_matches_guided);
  g_test_add_func ("/gegl/cli/graph-files", test_graph_files);
  for (guint i = 0; i < G_N_ELEMENTS (bad_cases); i++)
    {
      char *name = g_strdup_printf ("/gegl/cli/bad/%s", bad_cases[i].name);
      g_test_add_data_func (name, &bad_cases[i], test_bad_property);
      g_free (name);
    }
  int status = g_test_run ();

  gegl_exit ();
  char *rm[] = { "rm", "-rf", tmpdir, NULL };
  g_spawn_sync (NULL, rm, NULL, G_SPAWN_SEARCH_PATH, NULL, NULL, NULL, NULL, NULL, NULL);
  g_free (models);
  g_free (unet_link);
  g_free (classifier_link);
  g_free (unet28);
  g_free (classifier28);
  g_free (unet16);
  g_free (classifier16);
  g_free (default_dir);
  g_free (empty_dir);
  g_free (reference);
  g_free (tmpdir);
  return status;
}
