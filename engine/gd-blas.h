/* OpenBLAS, loaded at run time so that its kernels can be chosen for this processor.
 *
 * OpenBLAS picks its kernels once, when it is loaded, from the processor model.  A model
 * newer than the library (Debian 12 ships 0.3.21) gets its generic SSE3 kernels, about
 * five times slower than the AVX-512 ones the processor could run.  Loading the library
 * ourselves lets the engine set OPENBLAS_CORETYPE first, from the instruction sets the
 * processor reports; a value already in the environment is left alone. */
#pragma once
#include <cblas.h>

void gd_blas_sgemm (CBLAS_TRANSPOSE trans_a, CBLAS_TRANSPOSE trans_b, int m, int n, int k,
                    float alpha, const float *a, int lda, const float *b, int ldb,
                    float beta, float *c, int ldc);

/* LAPACK's symmetric eigensolver (OpenBLAS carries LAPACK). */
void gd_blas_dsyev (const char *jobz, const char *uplo, const int *n, double *a,
                    const int *lda, double *w, double *work, const int *lwork, int *info);

/* The kernel family OpenBLAS runs ("SkylakeX", "Haswell", ...). */
const char *gd_blas_core (void);

/* The OPENBLAS_CORETYPE the engine sets for this processor, or NULL (OpenBLAS chooses). */
const char *gd_blas_core_for_processor (void);
