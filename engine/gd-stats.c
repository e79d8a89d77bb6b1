#include "gd-stats.h"
#include "gd-blas.h"
#include "gd-error.h"

#include <math.h>
#include <string.h>

void
gd_stats_mean_cov (const float *x, int n, int d, double *mean, double *cov)
{
  memset (mean, 0, sizeof (double) * d);
  memset (cov, 0, sizeof (double) * d * d);
  for (int i = 0; i < n; i++)
    for (int a = 0; a < d; a++)
      mean[a] += x[(size_t) i * d + a];
  for (int a = 0; a < d; a++)
    mean[a] /= n;
  double *centered = g_new (double, d);
  for (int i = 0; i < n; i++)
    {
      for (int a = 0; a < d; a++)
        centered[a] = x[(size_t) i * d + a] - mean[a];
      for (int a = 0; a < d; a++)
        for (int b = a; b < d; b++)
          cov[(size_t) a * d + b] += centered[a] * centered[b];
    }
  for (int a = 0; a < d; a++)
    for (int b = a; b < d; b++)
      {
        double v = cov[(size_t) a * d + b] / MAX (n - 1, 1);
        cov[(size_t) a * d + b] = cov[(size_t) b * d + a] = v;
      }
  g_free (centered);
}

/* Eigenvalues (ascending) and, in a, the eigenvectors (columns in Fortran order = rows here). */
static gboolean
eigen (double *a, int d, double *values, GError **error)
{
  int lwork = -1, info = 0;
  double query;
  gd_blas_dsyev ("V", "U", &d, a, &d, values, &query, &lwork, &info);
  lwork = (int) query;
  double *work = g_new (double, MAX (lwork, 1));
  gd_blas_dsyev ("V", "U", &d, a, &d, values, work, &lwork, &info);
  g_free (work);
  if (info != 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "eigendecomposition failed (info %d)", info);
      return FALSE;
    }
  return TRUE;
}

gboolean
gd_stats_frechet_distance (const double *mu1, const double *cov1, const double *mu2,
                           const double *cov2, int d, double *distance, GError **error)
{
  size_t dd = (size_t) d * d;
  double *vectors = g_memdup2 (cov1, sizeof (double) * dd);
  double *values = g_new (double, d);
  double *root = g_new0 (double, dd), *tmp = g_new0 (double, dd), *product = g_new0 (double, dd);
  gboolean ok = eigen (vectors, d, values, error);
  if (ok)
    {
      /* S1^1/2 = V diag(sqrt(l)) V^T; vector k is row k of `vectors` (column-major storage) */
      for (int k = 0; k < d; k++)
        {
          double s = sqrt (MAX (values[k], 0.0));
          for (int a = 0; a < d; a++)
            for (int b = 0; b < d; b++)
              root[(size_t) a * d + b] += s * vectors[(size_t) k * d + a] * vectors[(size_t) k * d + b];
        }
      /* M = S1^1/2 S2 S1^1/2, symmetric positive semi-definite */
      for (int a = 0; a < d; a++)
        for (int b = 0; b < d; b++)
          {
            double sum = 0.0;
            for (int k = 0; k < d; k++)
              sum += root[(size_t) a * d + k] * cov2[(size_t) k * d + b];
            tmp[(size_t) a * d + b] = sum;
          }
      for (int a = 0; a < d; a++)
        for (int b = 0; b < d; b++)
          {
            double sum = 0.0;
            for (int k = 0; k < d; k++)
              sum += tmp[(size_t) a * d + k] * root[(size_t) k * d + b];
            product[(size_t) a * d + b] = sum;
          }
      for (int a = 0; a < d; a++)
        for (int b = a + 1; b < d; b++)
          product[(size_t) a * d + b] = product[(size_t) b * d + a] =
              0.5 * (product[(size_t) a * d + b] + product[(size_t) b * d + a]);
      ok = eigen (product, d, values, error);
    }
  if (ok)
    {
      double trace_root = 0.0, trace1 = 0.0, trace2 = 0.0, mean_term = 0.0;
      for (int k = 0; k < d; k++)
        {
          trace_root += sqrt (MAX (values[k], 0.0));
          trace1 += cov1[(size_t) k * d + k];
          trace2 += cov2[(size_t) k * d + k];
          mean_term += (mu1[k] - mu2[k]) * (mu1[k] - mu2[k]);
        }
      *distance = mean_term + trace1 + trace2 - 2.0 * trace_root;
    }
  g_free (vectors);
  g_free (values);
  g_free (root);
  g_free (tmp);
  g_free (product);
  return ok;
}

double
gd_stats_mean_pairwise_distance (const float *x, int n, int d)
{
  if (n < 2)
    return 0.0;
  double total = 0.0;
  for (int i = 0; i < n; i++)
    for (int j = i + 1; j < n; j++)
      {
        double sum = 0.0;
        for (int a = 0; a < d; a++)
          {
            double diff = (double) x[(size_t) i * d + a] - x[(size_t) j * d + a];
            sum += diff * diff;
          }
        total += sqrt (sum);
      }
  return total / ((double) n * (n - 1) / 2.0);
}

GdDeviation
gd_stats_deviation (const float *got, const float *exact, size_t count)
{
  double worst = 0.0, largest = 0.0, diff2 = 0.0, ref2 = 0.0, got2 = 0.0, dot = 0.0;
  for (size_t i = 0; i < count; i++)
    {
      double d = fabs ((double) got[i] - exact[i]);
      worst = MAX (worst, d);
      largest = MAX (largest, fabs (exact[i]));
      diff2 += d * d;
      ref2 += (double) exact[i] * exact[i];
      got2 += (double) got[i] * got[i];
      dot += (double) got[i] * exact[i];
    }
  return (GdDeviation) { worst, largest, sqrt (diff2 / ref2), dot / sqrt (ref2 * got2) };
}
