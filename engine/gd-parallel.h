/* The engine's worker threads: one OpenMP pool (GD_THREADS, default every core), with
 * OpenBLAS single-threaded inside it so that two thread pools never fight over the cores.
 * Work is cut into pieces that depend only on the shapes, never on the thread count, so
 * results are bit-identical for any number of threads. */
#pragma once
#include <cblas.h>
#include <glib.h>
#include <stddef.h>

/* Reads GD_THREADS once; called by every entry below (OpenBLAS runs one thread inside). */
void gd_parallel_init (void);
int gd_parallel_threads (void);

/* Floating-point operations (2 m n k per product) of every gd_sgemm call so far. */
guint64 gd_sgemm_flops (void);

/* cblas_sgemm (row-major) computed as fixed blocks of rows or columns in parallel. */
void gd_sgemm (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
               float alpha, const float *a, int lda, const float *b, int ldb,
               float beta, float *c, int ldc);
