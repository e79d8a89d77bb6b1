/* guided bench: speed of the engine on the released 64x64 architectures (random weights,
 * no files needed), against the machine's own measured sgemm peak. */
#include "guided.h"
#include "gd-bf16.h"
#include "gd-blas.h"
#include "gd-diffusion.h"
#include "gd-error.h"
#include "gd-gemm.h"
#include "gd-model.h"
#include "gd-parallel.h"
#include "gd-random.h"
#include "gd-recognize.h"
#include "gd-safetensors.h"
#include "gd-stats.h"

#include <glib/gstdio.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>

typedef gboolean (*Work) (gpointer data, GError **error);

static int
compare_doubles (const void *a, const void *b)
{
  double x = *(const double *) a, y = *(const double *) b;
  return x < y ? -1 : x > y;
}

/* When set: the sgemm that measures the peak, run again next to every run of a measured
 * work, so that the share of the peak compares two things measured at the same moment (a
 * shared or virtual machine's speed can drift by a factor of two within minutes). */
static Work peak_work;
static gpointer peak_data;
static double peak_gflop;

static double
seconds_of (Work work, gpointer data, GError **error)
{
  gint64 start = g_get_monotonic_time ();
  if (!work (data, error))
    return -1.0;
  return (g_get_monotonic_time () - start) / 1e6;
}

/* Median seconds of `runs` runs after one warm-up; the GFLOP of one run; with peak_work,
 * the median over the runs of the run's GFLOPS over the peak's measured right after it
 * (else *share is 0). */
static gboolean
measure (Work work, gpointer data, int runs, double *seconds, double *gflop, double *share,
         GError **error)
{
  if (!work (data, error))
    return FALSE;
  double *times = g_new (double, runs), *shares = g_new0 (double, runs);
  guint64 flops = 0;
  gboolean ok = TRUE;
  for (int r = 0; r < runs && ok; r++)
    {
      guint64 before = gd_sgemm_flops ();
      times[r] = seconds_of (work, data, error);
      flops += gd_sgemm_flops () - before;
      ok = times[r] >= 0;
      if (ok && peak_work)
        {
          double peak_seconds = seconds_of (peak_work, peak_data, error);
          ok = peak_seconds > 0;
          if (ok)
            shares[r] = ((gd_sgemm_flops () - before) / 1e9 - peak_gflop) / times[r]
                        / (peak_gflop / peak_seconds);
        }
    }
  if (ok)
    {
      *gflop = flops / 1e9 / runs;
      qsort (times, runs, sizeof (double), compare_doubles);
      qsort (shares, runs, sizeof (double), compare_doubles);
      *seconds = times[runs / 2];
      *share = shares[runs / 2];
    }
  g_free (times);
  g_free (shares);
  return ok;
}

/* One product: OpenBLAS's sgemm (the peak the shares are taken of), or the engine's */
typedef struct {
  int m, n, k;
  float *a, *b, *c;
  gboolean engine;
} Gemm;

static gboolean
run_gemm (gpointer data, GError **error)
{
  (void) error;
  Gemm *g = data;
  (g->engine ? gd_sgemm : gd_sgemm_openblas) (CblasNoTrans, CblasNoTrans, g->m, g->n, g->k,
                                               1.0f, g->a, g->k, g->b, g->n, 0.0f, g->c, g->n);
  return TRUE;
}

static double
gemm_gflops (int m, int n, int k, gboolean engine, int runs)
{
  Gemm g = { m, n, k, g_new (float, (size_t) m * k), g_new (float, (size_t) k * n),
             g_new (float, (size_t) m * n), engine };
  gd_random_uniform (1, 1, g.a, (size_t) m * k);
  gd_random_uniform (1, 2, g.b, (size_t) k * n);
  double seconds, gflop, share;
  measure (run_gemm, &g, runs, &seconds, &gflop, &share, NULL);
  g_free (g.a);
  g_free (g.b);
  g_free (g.c);
  return gflop / seconds;
}

typedef struct {
  GdModel *unet, *classifier;
  GdDiffusion *diffusion;
  int n, size;
  float *x, *out, *grad, *x_prev, *pred;
  int64_t *t, *y;
} Step;

static gboolean
run_unet (gpointer data, GError **error)
{
  Step *s = data;
  return gd_model_forward (s->unet, s->x, s->n, s->size, s->size, s->t,
                           gd_model_get_config (s->unet)->num_classes > 0 ? s->y : NULL, s->out, error);
}

static gboolean
run_classifier (gpointer data, GError **error)
{
  Step *s = data;
  return gd_classifier_gradient (s->classifier, s->x, s->n, s->size, s->size, s->t, s->y, NULL,
                                 s->grad, error);
}

/* One guided DDIM step as gd:sample runs it: model, classifier gradient, Algorithm 2. */
static gboolean
run_step (gpointer data, GError **error)
{
  Step *s = data;
  if (!run_unet (s, error) || !run_classifier (s, error))
    return FALSE;
  GdStepSettings settings = { GD_SAMPLER_DDIM, 0.0, 1.0, TRUE };
  const GdModelConfig *mc = gd_model_get_config (s->unet);
  gd_diffusion_step (s->diffusion, &settings, s->diffusion->num_steps / 2, s->x, s->out, s->n,
                     mc->in_channels, mc->out_channels, s->size * s->size, s->grad, NULL, s->x_prev,
                     s->pred);
  return TRUE;
}

static GdModel *
release_model (const char *name, GError **error)
{
  const GdRelease *release = gd_release_find (name);
  if (!release)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "no release named %s", name);
      return NULL;
    }
  char *flags = gd_release_flags_json (release);
  GdModelConfig cfg;
  gboolean ok = gd_flags_to_config (flags, release->kind, name, &cfg, NULL, error);
  g_free (flags);
  if (!ok)
    return NULL;
  GdModel *model = gd_model_new (&cfg, name, error);
  if (model)
    gd_model_init_random (model, 11);
  return model;
}

static void
step_alloc (Step *s, int n)
{
  const GdModelConfig *mc = gd_model_get_config (s->unet);
  size_t count = (size_t) n * mc->in_channels * s->size * s->size;
  s->n = n;
  s->x = g_new (float, count);
  gd_random_normal (3, 0, s->x, count);
  s->out = g_new (float, (size_t) n * mc->out_channels * s->size * s->size);
  s->grad = g_new (float, count);
  s->x_prev = g_new (float, count);
  s->pred = g_new (float, count);
  s->t = g_new (int64_t, n);
  s->y = g_new (int64_t, n);
  for (int i = 0; i < n; i++)
    {
      s->t[i] = 500;
      s->y[i] = 7 * i + 1;
    }
}

static void
step_clear (Step *s)
{
  g_clear_pointer (&s->x, g_free);
  g_clear_pointer (&s->out, g_free);
  g_clear_pointer (&s->grad, g_free);
  g_clear_pointer (&s->x_prev, g_free);
  g_clear_pointer (&s->pred, g_free);
  g_clear_pointer (&s->t, g_free);
  g_clear_pointer (&s->y, g_free);
}

static void
report (const char *what, double seconds, double gflop, double share)
{
  printf ("| %s | %.3f s | %.1f | %.1f | %.0f%% |\n", what, seconds, gflop, gflop / seconds,
          100.0 * share);
  fflush (stdout);
}

static GdDeviation bf16_unet, bf16_gradient;

/* The U-Net forward, the classifier gradient and the guided step with both models in bf16,
 * and how far their outputs move from float's. */
static gboolean
bench_bf16 (Step *s, int runs, GError **error)
{
  const GdModelConfig *mc = gd_model_get_config (s->unet);
  size_t count = (size_t) s->n * mc->out_channels * s->size * s->size;
  size_t grad_count = (size_t) s->n * mc->in_channels * s->size * s->size;
  if (!run_unet (s, error) || !run_classifier (s, error))
    return FALSE;
  float *exact = g_memdup2 (s->out, sizeof (float) * count);
  float *exact_grad = g_memdup2 (s->grad, sizeof (float) * grad_count);
  double seconds, gflop, share;
  char what[128];
  gboolean ok = gd_model_set_bf16 (s->unet, TRUE, error)
                && gd_model_set_bf16 (s->classifier, TRUE, error)
                && run_unet (s, error) && run_classifier (s, error);
  if (ok)
    {
      bf16_unet = gd_stats_deviation (s->out, exact, count);
      bf16_gradient = gd_stats_deviation (s->grad, exact_grad, grad_count);
      g_snprintf (what, sizeof what, "64x64 U-Net forward, batch %d, bf16 (%s)", s->n, gd_bf16_kernel ());
      ok = measure (run_unet, s, runs, &seconds, &gflop, &share, error);
      if (ok)
        report (what, seconds, gflop, share);
    }
  if (ok)
    {
      g_snprintf (what, sizeof what, "64x64 classifier forward + input gradient, batch %d, bf16", s->n);
      ok = measure (run_classifier, s, runs, &seconds, &gflop, &share, error);
      if (ok)
        report (what, seconds, gflop, share);
    }
  if (ok)
    {
      g_snprintf (what, sizeof what, "64x64 guided DDIM step, batch %d, bf16", s->n);
      ok = measure (run_step, s, runs, &seconds, &gflop, &share, error);
      if (ok)
        report (what, seconds, gflop, share);
    }
  gd_model_set_bf16 (s->unet, FALSE, NULL);
  gd_model_set_bf16 (s->classifier, FALSE, NULL);
  g_free (exact);
  g_free (exact_grad);
  return ok;
}

static int
bench (int runs, gboolean big, GError **error)
{
  int status = 1;
  Step s = { 0 };
  double rss_batch1 = 0.0, rss_weights = 0.0;
  printf ("threads: %d; OpenBLAS kernels: %s; bf16 kernel: %s\n\n", gd_parallel_threads (),
          gd_blas_core (), gd_bf16_kernel () ? gd_bf16_kernel () : "none");
  double peak = gemm_gflops (2048, 2048, 2048, FALSE, runs);
  double conv_shaped = gemm_gflops (192, 4096, 1728, FALSE, runs);
  printf ("OpenBLAS sgemm peak (2048^3): %.1f GFLOPS; conv-shaped (192 x 4096 x 1728): %.1f GFLOPS\n",
          peak, conv_shaped);
  if (gd_gemm_available ())
    printf ("the engine's float kernel: 2048^3 %.1f GFLOPS; conv-shaped %.1f GFLOPS\n",
            gemm_gflops (2048, 2048, 2048, TRUE, runs), gemm_gflops (192, 4096, 1728, TRUE, runs));
  else
    printf ("the engine's float products go to OpenBLAS (%s)\n", gd_gemm_unavailable_reason ());
  printf ("\nshare of peak: each run's GFLOPS over those of a 2048^3 OpenBLAS sgemm run right after it "
          "(the median of the runs); GFLOP: the matrix products of the direct convolutions, also "
          "where the float path takes Winograd's 2.25 times fewer\n\n");
  printf ("| work | time (median of %d) | GFLOP | GFLOPS | share of peak |\n| --- | --- | --- | --- | --- |\n", runs);
  Gemm peak_gemm = { 2048, 2048, 2048, g_new (float, 2048 * 2048), g_new (float, 2048 * 2048),
                     g_new (float, 2048 * 2048), FALSE };
  gd_random_uniform (1, 1, peak_gemm.a, 2048 * 2048);
  gd_random_uniform (1, 2, peak_gemm.b, 2048 * 2048);
  peak_work = run_gemm;
  peak_data = &peak_gemm;
  peak_gflop = 2.0 * 2048 * 2048 * 2048 / 1e9;
  s.unet = release_model ("64x64_diffusion", error);
  s.classifier = s.unet ? release_model ("64x64_classifier", error) : NULL;
  if (!s.classifier)
    goto out;
  /* as in sampling: the diffusion model runs forward only */
  gd_model_set_inference (s.unet, TRUE);
  s.size = 64;
  s.diffusion = gd_diffusion_new (GD_SCHEDULE_COSINE, 1000, "ddim25", GD_VARIANCE_LEARNED_RANGE, error);
  if (!s.diffusion)
    goto out;
  const int batches[] = { 1, 4 };
  for (int b = 0; b < 2; b++)
    {
      double seconds, gflop, share;
      char what[96];
      step_alloc (&s, batches[b]);
      g_snprintf (what, sizeof what, "64x64 U-Net forward, batch %d", batches[b]);
      if (!measure (run_unet, &s, runs, &seconds, &gflop, &share, error))
        goto out;
      report (what, seconds, gflop, share);
      g_snprintf (what, sizeof what, "64x64 classifier forward + input gradient, batch %d", batches[b]);
      if (!measure (run_classifier, &s, runs, &seconds, &gflop, &share, error))
        goto out;
      report (what, seconds, gflop, share);
      g_snprintf (what, sizeof what, "64x64 guided DDIM step, batch %d", batches[b]);
      if (!measure (run_step, &s, runs, &seconds, &gflop, &share, error))
        goto out;
      report (what, seconds, gflop, share);
      if (batches[b] == 1)
        {
          /* the float path's memory, before the bf16 runs add their packed weights */
          struct rusage usage;
          getrusage (RUSAGE_SELF, &usage);
          double weights = 4.0 * (gd_model_parameter_count (s.unet)
                                  + gd_model_parameter_count (s.classifier)) / (1 << 20);
          rss_batch1 = usage.ru_maxrss / 1024.0;
          rss_weights = weights;
          if (gd_bf16_kernel () && !bench_bf16 (&s, runs, error))
            goto out;
        }
      step_clear (&s);
    }

  /* load time of the 64x64 model from a file */
  char *dir = g_dir_make_tmp ("gd-bench-XXXXXX", error);
  if (!dir)
    goto out;
  char *path = g_build_filename (dir, "64x64_diffusion.safetensors", NULL);
  GdStWriter *writer = gd_st_writer_new ();
  gd_st_writer_set_metadata (writer, "kind", "unet");
  char *config = gd_model_config_to_json (gd_model_get_config (s.unet));
  gd_st_writer_set_metadata (writer, "config", config);
  g_free (config);
  for (guint i = 0; i < gd_model_n_params (s.unet); i++)
    {
      GdParam *p = gd_model_param (s.unet, i);
      gd_st_writer_add (writer, p->name, GD_DTYPE_F32, p->ndim, p->shape, p->data);
    }
  gboolean written = gd_st_writer_write (writer, path, error);
  gd_st_writer_free (writer);
  if (written)
    {
      gint64 start = g_get_monotonic_time ();
      GdModel *loaded = gd_model_load (path, error);
      double load = (g_get_monotonic_time () - start) / 1e6;
      if (loaded)
        printf ("\n64x64 U-Net: %zu parameters, load from safetensors %.3f s (mapped)\n",
                gd_model_parameter_count (loaded), load);
      gd_model_free (loaded);
      g_unlink (path);
    }
  g_rmdir (dir);
  g_free (path);
  g_free (dir);
  if (!written)
    goto out;

  if (big)
    {
      Step large = { .size = 256 };
      large.unet = release_model ("256x256_diffusion_uncond", error);
      if (!large.unet)
        goto out;
      gd_model_set_inference (large.unet, TRUE);
      step_alloc (&large, 1);
      double seconds, gflop, share;
      gboolean ok = measure (run_unet, &large, MAX (1, runs / 2), &seconds, &gflop, &share, error);
      if (ok)
        {
          printf ("\n| work | time | GFLOP | GFLOPS | share of peak |\n| --- | --- | --- | --- | --- |\n");
          report ("256x256 unconditional U-Net forward, batch 1", seconds, gflop, share);
        }
      step_clear (&large);
      gd_model_free (large.unet);
      if (!ok)
        goto out;
    }
  if (gd_bf16_kernel ())
    printf ("\nbf16 against float (batch 1): U-Net output: largest difference %.2e of the "
            "largest value, root mean square %.2e of the values'; classifier gradient: %.2e, "
            "%.2e, cosine %.6f\n", bf16_unet.worst / bf16_unet.largest, bf16_unet.rms,
            bf16_gradient.worst / bf16_gradient.largest, bf16_gradient.rms, bf16_gradient.cosine);
  else
    printf ("\nbf16: this processor has neither AMX-BF16 nor AVX512-BF16\n");
  struct rusage usage;
  getrusage (RUSAGE_SELF, &usage);
  printf ("\npeak RSS: %.0f MB; after the float batch-1 runs: %.0f MB, of which the weights of the "
          "two 64x64 models are %.0f MB (+%.0f MB)\n", usage.ru_maxrss / 1024.0, rss_batch1,
          rss_weights, rss_batch1 - rss_weights);
  status = 0;
out:
  peak_work = NULL;
  g_free (peak_gemm.a);
  g_free (peak_gemm.b);
  g_free (peak_gemm.c);
  step_clear (&s);
  gd_model_free (s.unet);
  gd_model_free (s.classifier);
  gd_diffusion_free (s.diffusion);
  return status;
}

int
guided_bench_main (int argc, char **argv)
{
  int runs = 5;
  gboolean skip_big = FALSE;
  GOptionEntry entries[] = {
    { "runs", 'r', 0, G_OPTION_ARG_INT, &runs, "Timed runs per measurement (default 5)", "N" },
    { "skip-256", 0, 0, G_OPTION_ARG_NONE, &skip_big, "Leave out the 256x256 U-Net", NULL },
    { NULL }
  };
  GOptionContext *context = g_option_context_new ("- speed of the engine on the released architectures");
  g_option_context_add_main_entries (context, entries, NULL);
  GError *error = NULL;
  int status = 2;
  if (g_option_context_parse (context, &argc, &argv, &error))
    {
      if (runs < 1)
        g_set_error (&error, GD_ERROR, GD_ERROR_INPUT, "--runs must be positive");
      else
        status = bench (runs, !skip_big, &error);
    }
  if (error)
    {
      fprintf (stderr, "guided bench: %s\n", error->message);
      g_error_free (error);
      if (status == 0)
        status = 1;
    }
  g_option_context_free (context);
  return status;
}
