/* The engine's worker threads: one OpenMP pool (GD_THREADS, default every core), with
 * OpenBLAS single-threaded inside it so that two thread pools never fight over the cores.
 * Work is cut into pieces that depend only on the shapes, never on the thread count, so
 * results are bit-identical for any number of threads. */
#pragma once
#include <cblas.h>
#include <glib.h>
#include <stddef.h>

/* The OpenMP threads should sleep between parallel loops rather than spin: spinning
 * threads take the cores from everything else that runs (on a busy 2-core machine a
 * 50-step sampling run took ten times as long).  The OpenMP runtime reads OMP_WAIT_POLICY
 * once, when it is loaded, before main; so a program calls this first thing in main: it
 * starts the program again (same process, arguments and open files) with
 * OMP_WAIT_POLICY=passive.  A policy already in the environment stands. */
void gd_parallel_prefer_sleeping_threads (char **argv);

/* Reads GD_THREADS once; called by every entry below (OpenBLAS runs one thread inside). */
void gd_parallel_init (void);
int gd_parallel_threads (void);

/* Floating-point operations (2 m n k per product) of every matrix product so far; a
 * Winograd convolution counts as the product of the direct convolution it replaces. */
guint64 gd_sgemm_flops (void);
/* Adds an m x n x k product done outside gd_sgemm (the bf16 products, the Winograd
 * convolutions) to that count. */
void gd_count_product (int m, int n, int k);

/* cblas_sgemm (row-major): by the engine's own kernel (gd-gemm.h) where it applies (alpha
 * 1, beta 0 or 1, b not transposed, a processor with AVX-512), else by OpenBLAS as
 * gd_sgemm_openblas.  Inside a parallel region it runs on the calling thread alone. */
void gd_sgemm (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
               float alpha, const float *a, int lda, const float *b, int ldb,
               float beta, float *c, int ldc);

/* gd_sgemm without adding to gd_sgemm_flops (for products that count some other work:
 * Winograd's count the direct convolution's) */
void gd_sgemm_uncounted (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
                         float alpha, const float *a, int lda, const float *b, int ldb,
                         float beta, float *c, int ldc);

/* cblas_sgemm (row-major) by OpenBLAS, computed as fixed blocks of rows or columns in
 * parallel. */
void gd_sgemm_openblas (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
                        float alpha, const float *a, int lda, const float *b, int ldb,
                        float beta, float *c, int ldc);
