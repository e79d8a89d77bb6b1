#include "gd-blas.h"

#include <dlfcn.h>
#include <glib.h>
#include <stdlib.h>

typedef void (*SgemmFn) (enum CBLAS_ORDER, enum CBLAS_TRANSPOSE, enum CBLAS_TRANSPOSE,
                         blasint, blasint, blasint, float, const float *, blasint,
                         const float *, blasint, float, float *, blasint);
typedef void (*DsyevFn) (const char *, const char *, const int *, double *, const int *,
                         double *, double *, const int *, int *, size_t, size_t);

static struct
{
  SgemmFn sgemm;
  DsyevFn dsyev;
  void (*set_num_threads) (int);
  char *(*get_corename) (void);
} blas;

const char *
gd_blas_core_for_processor (void)
{
  __builtin_cpu_init ();
  if (__builtin_cpu_supports ("avx512f") && __builtin_cpu_supports ("avx512bw")
      && __builtin_cpu_supports ("avx512vl") && __builtin_cpu_supports ("avx512dq"))
    return __builtin_cpu_supports ("avx512bf16") ? "Cooperlake" : "SkylakeX";
  return NULL;
}

static void *
symbol (void *library, const char *name)
{
  void *address = dlsym (library, name);
  if (!address)
    g_error ("OpenBLAS has no %s: %s", name, dlerror ());
  return address;
}

static gpointer
load (gpointer unused)
{
  (void) unused;
  const char *core = gd_blas_core_for_processor ();
  if (core && !g_getenv ("OPENBLAS_CORETYPE"))
    g_setenv ("OPENBLAS_CORETYPE", core, FALSE);
  static const char *const names[] = { "libopenblas.so.0", "libopenblas.so" };
  void *library = NULL;
  for (size_t i = 0; i < G_N_ELEMENTS (names) && !library; i++)
    library = dlopen (names[i], RTLD_NOW | RTLD_LOCAL);
  if (!library)
    g_error ("cannot load OpenBLAS (libopenblas.so.0): %s", dlerror ());
  blas.sgemm = (SgemmFn) symbol (library, "cblas_sgemm");
  blas.dsyev = (DsyevFn) symbol (library, "dsyev_");
  blas.set_num_threads = (void (*) (int)) symbol (library, "openblas_set_num_threads");
  blas.get_corename = (char *(*) (void)) symbol (library, "openblas_get_corename");
  /* The engine's own thread pool cuts the work; OpenBLAS runs one thread inside it. */
  blas.set_num_threads (1);
  return NULL;
}

static void
ensure_loaded (void)
{
  static GOnce once = G_ONCE_INIT;
  g_once (&once, load, NULL);
}

void
gd_blas_sgemm (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
               float alpha, const float *a, int lda, const float *b, int ldb,
               float beta, float *c, int ldc)
{
  ensure_loaded ();
  blas.sgemm (CblasRowMajor, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

void
gd_blas_dsyev (const char *jobz, const char *uplo, const int *n, double *a, const int *lda,
               double *w, double *work, const int *lwork, int *info)
{
  ensure_loaded ();
  blas.dsyev (jobz, uplo, n, a, lda, w, work, lwork, info, 1, 1);
}

const char *
gd_blas_core (void)
{
  ensure_loaded ();
  return blas.get_corename ();
}
