/* Statistics of feature vectors for judging samples: means and covariances, the Frechet
 * distance between two Gaussians (Heusel et al. 2017, the FID formula), and the average
 * pairwise distance within a set (variety). */
#pragma once
#include <glib.h>

G_BEGIN_DECLS

/* mean[d] and cov[d * d] (unbiased) of n vectors of dimension d. */
void gd_stats_mean_cov (const float *x, int n, int d, double *mean, double *cov);

/* |mu1 - mu2|^2 + tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2), by symmetric eigendecompositions. */
gboolean gd_stats_frechet_distance (const double *mu1, const double *cov1, const double *mu2,
                                    const double *cov2, int d, double *distance, GError **error);

/* Mean Euclidean distance over all pairs of the n vectors (0 when n < 2). */
double gd_stats_mean_pairwise_distance (const float *x, int n, int d);

/* How far `got` lies from `exact`: the largest absolute difference, the largest |exact|,
 * the root mean square of the differences over that of `exact`, and the cosine of the
 * angle between the two (what matters for a gradient that is scaled). */
typedef struct { double worst, largest, rms, cosine; } GdDeviation;
GdDeviation gd_stats_deviation (const float *got, const float *exact, size_t count);

G_END_DECLS
