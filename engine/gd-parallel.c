#include "gd-parallel.h"
#include "gd-blas.h"
#include "gd-gemm.h"

#include <glib.h>
#include <omp.h>
#include <stdlib.h>
#include <unistd.h>

static int threads;
static guint64 flops;

guint64
gd_sgemm_flops (void)
{
  return __atomic_load_n (&flops, __ATOMIC_RELAXED);
}

void
gd_count_product (int m, int n, int k)
{
  __atomic_fetch_add (&flops, 2ull * (guint64) m * (guint64) n * (guint64) k, __ATOMIC_RELAXED);
}

static gpointer
initialise (gpointer unused)
{
  (void) unused;
  threads = omp_get_num_procs ();
  const char *env = g_getenv ("GD_THREADS");
  if (env)
    {
      long count = strtol (env, NULL, 10);
      if (count >= 1 && count <= 1024)
        threads = (int) count;
      else
        g_warning ("GD_THREADS=%s is not a thread count; using %d", env, threads);
    }
  omp_set_num_threads (threads);
  return NULL;
}

void
gd_parallel_prefer_sleeping_threads (char **argv)
{
  if (g_getenv ("OMP_WAIT_POLICY"))
    return;
  g_setenv ("OMP_WAIT_POLICY", "passive", TRUE);
  execv ("/proc/self/exe", argv);
  /* no /proc: the threads spin, which is slower on a busy machine but correct */
}

void
gd_parallel_init (void)
{
  static GOnce once = G_ONCE_INIT;
  g_once (&once, initialise, NULL);
}

int
gd_parallel_threads (void)
{
  gd_parallel_init ();
  return threads;
}

/* Pieces of at least 128 rows or columns, at most 16 of them. */
static int
block_count (int size)
{
  return size >= 256 ? MIN (16, size / 128) : 1;
}

static int
block_size (int size, int blocks)
{
  int size_per = (size + blocks - 1) / blocks;
  return (size_per + 15) / 16 * 16;
}

/* OpenBLAS's product in blocks of rows or columns, on the engine's threads */
static void
openblas_pieces (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
                 float alpha, const float *a, int lda, const float *b, int ldb,
                 float beta, float *c, int ldc)
{
  int column_blocks = block_count (n), row_blocks = column_blocks > 1 ? 1 : block_count (m);
  if (omp_in_parallel () || (column_blocks == 1 && row_blocks == 1))
    {
      gd_blas_sgemm (trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
      return;
    }
  if (column_blocks > 1)
    {
      int size = block_size (n, column_blocks);
      int pieces = (n + size - 1) / size;
#pragma omp parallel for schedule(dynamic)
      for (int p = 0; p < pieces; p++)
        {
          int first = p * size, count = MIN (size, n - first);
          const float *bp = trans_b == CblasNoTrans ? b + first : b + (size_t) first * ldb;
          gd_blas_sgemm (trans_a, trans_b, m, count, k, alpha, a, lda, bp, ldb,
                       beta, c + first, ldc);
        }
    }
  else
    {
      int size = block_size (m, row_blocks);
      int pieces = (m + size - 1) / size;
#pragma omp parallel for schedule(dynamic)
      for (int p = 0; p < pieces; p++)
        {
          int first = p * size, count = MIN (size, m - first);
          const float *ap = trans_a == CblasNoTrans ? a + (size_t) first * lda : a + first;
          gd_blas_sgemm (trans_a, trans_b, count, n, k, alpha, ap, lda, b, ldb,
                       beta, c + (size_t) first * ldc, ldc);
        }
    }
}

void
gd_sgemm_uncounted (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
                    float alpha, const float *a, int lda, const float *b, int ldb,
                    float beta, float *c, int ldc)
{
  gd_parallel_init ();
  if (alpha == 1.0f && (beta == 0.0f || beta == 1.0f) && trans_b == CblasNoTrans
      && gd_gemm_available ())
    gd_gemm (m, n, k, a, trans_a == CblasNoTrans ? lda : 1, trans_a == CblasNoTrans ? 1 : lda,
             b, ldb, beta, c, ldc);
  else
    openblas_pieces (trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void
gd_sgemm (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
          float alpha, const float *a, int lda, const float *b, int ldb,
          float beta, float *c, int ldc)
{
  gd_count_product (m, n, k);
  gd_sgemm_uncounted (trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void
gd_sgemm_openblas (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
                   float alpha, const float *a, int lda, const float *b, int ldb,
                   float beta, float *c, int ldc)
{
  gd_parallel_init ();
  gd_count_product (m, n, k);
  openblas_pieces (trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}
