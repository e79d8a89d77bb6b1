/* Load time of a 2 GB float32 PyTorch checkpoint: the architecture of the released
 * 256x256_diffusion_uncond model (552 814 086 parameters, 2.2 GB), written as torch.save
 * lays it out, then loaded by gd_model_load() as every consumer does: once with the file
 * evicted from the page cache (cold) and once warm.  Reports the time to a usable model
 * and the time until every weight has been read once.
 *   bench-checkpoint [FOLDER]   (default: $TMPDIR or /tmp; needs 2.3 GB free there)
 * Not part of the test suite: `meson test --benchmark checkpoint-2gb` runs it. */
#include "gd-model.h"
#include "gd-recognize.h"
#include "pt-writer.h"

#include <fcntl.h>
#include <glib.h>
#include <glib/gstdio.h>
#include <math.h>
#include <stdio.h>
#include <sys/statvfs.h>
#include <unistd.h>

#define SKIP 77

static double
value_at (guint param, size_t index)
{
  return (double) ((param * 31 + index) % 1009) * 1e-3 - 0.5;
}

/* Sum of every weight, read in order: touches every page of the mapping. */
static double
weight_sum (GdModel *model)
{
  double sum = 0;
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      const GdParam *p = gd_model_param (model, i);
      for (size_t j = 0; j < p->numel; j++)
        sum += p->data[j];
    }
  return sum;
}

static gboolean
evict (const char *path)
{
  int fd = open (path, O_RDONLY);
  if (fd < 0)
    return FALSE;
  gboolean ok = fdatasync (fd) == 0 && posix_fadvise (fd, 0, 0, POSIX_FADV_DONTNEED) == 0;
  close (fd);
  return ok;
}

static gboolean
measure (const char *path, const char *label, double expected_sum)
{
  GError *error = NULL;
  gint64 start = g_get_monotonic_time ();
  GdModel *model = gd_model_load (path, &error);
  gint64 loaded = g_get_monotonic_time ();
  if (!model)
    {
      fprintf (stderr, "bench-checkpoint: %s\n", error->message);
      g_error_free (error);
      return FALSE;
    }
  double sum = weight_sum (model);
  gint64 read = g_get_monotonic_time ();
  gboolean borrowed = !gd_model_param (model, 0)->owns_data;
  printf ("%s: gd_model_load %.3f s (%s), every weight read once %.3f s after the start; "
          "recognised as %s\n", label, (loaded - start) / 1e6,
          borrowed ? "weights mapped in place" : "weights copied", (read - start) / 1e6,
          gd_model_get_metadata (model, "release"));
  gd_model_free (model);
  if (G_APPROX_VALUE (sum, expected_sum, 1e-6 * MAX (1.0, fabs (expected_sum))) == FALSE)
    {
      fprintf (stderr, "bench-checkpoint: weights sum to %.6f, %.6f were written\n", sum, expected_sum);
      return FALSE;
    }
  return TRUE;
}

int
main (int argc, char **argv)
{
  const char *folder = argc > 1 ? argv[1] : g_get_tmp_dir ();
  struct statvfs fs;
  if (statvfs (folder, &fs) == 0 && (double) fs.f_bavail * fs.f_frsize < 2.3e9)
    {
      printf ("SKIP: %s has less than 2.3 GB free for the 2.2 GB checkpoint\n", folder);
      return SKIP;
    }
  const GdRelease *release = gd_release_find ("256x256_diffusion_uncond");
  char *flags = gd_release_flags_json (release);
  GdModelConfig cfg;
  GError *error = NULL;
  if (!gd_flags_to_config (flags, release->kind, release->name, &cfg, NULL, &error))
    g_error ("%s", error->message);
  g_free (flags);
  GdModel *model = gd_model_new (&cfg, release->name, &error);
  if (!model)
    g_error ("%s", error->message);

  PtWriter *writer = pt_writer_new ();
  double expected_sum = 0;
  for (guint i = 0; i < gd_model_n_params (model); i++)
    {
      GdParam *p = gd_model_param (model, i);
      p->data = g_new (float, p->numel);
      p->owns_data = TRUE;
      for (size_t j = 0; j < p->numel; j++)
        {
          p->data[j] = (float) value_at (i, j);
          expected_sum += p->data[j];
        }
      guint storage = pt_writer_add_storage (writer, "FloatStorage", p->data, (int64_t) p->numel);
      pt_writer_add_tensor (writer, p->name, storage, 0, p->ndim, p->shape, NULL, TRUE);
    }
  size_t bytes = gd_model_parameter_count (model) * sizeof (float);
  char *path = g_build_filename (folder, "256x256_diffusion_uncond.pt", NULL);
  gint64 start = g_get_monotonic_time ();
  if (!pt_writer_write (writer, path, PT_ZIP_ALIGNED, &error))
    g_error ("%s", error->message);
  printf ("wrote %s: %zu parameters, %.2f GB of float32 weights, in %.1f s\n", path,
          gd_model_parameter_count (model), bytes / 1e9, (g_get_monotonic_time () - start) / 1e6);
  pt_writer_free (writer);
  gd_model_free (model);

  gboolean ok = TRUE;
  if (evict (path))
    ok = measure (path, "cold (file evicted from the page cache)", expected_sum);
  else
    printf ("cold: the file could not be evicted from the page cache; not measured\n");
  ok = ok && measure (path, "warm", expected_sum);
  g_remove (path);
  g_free (path);
  return ok ? 0 : 1;
}
