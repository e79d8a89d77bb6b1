/* Float matrix products with the engine's own AVX-512 kernel.
 *
 * The first operand (the weights, in the convolutions) is read where it lies, row-major or
 * transposed, and never copied: OpenBLAS packs it again for every block of columns that
 * gd_sgemm hands it, which on the convolutions' shapes cost more than the packing saves.
 * The second operand is copied a block at a time into panels of 32 columns.
 *
 * Each element of c is summed over the depth in the same order (256 at a time, in order)
 * whichever thread computes it and however the rows and columns are cut, so the results
 * are the same for any thread count. */
#pragma once
#include <glib.h>
#include <stddef.h>

/* Whether the products below run here: the processor has AVX-512F and GD_SGEMM is not
 * "openblas" (which sends every product to OpenBLAS, for comparisons; "engine", the
 * default, and unset keep this kernel; other values are warned about). */
gboolean gd_gemm_available (void);
/* Why not, when not: "GD_SGEMM=openblas" or "this processor has no AVX-512"; else NULL. */
const char *gd_gemm_unavailable_reason (void);

/* c [m][n] (row stride ldc) = beta c + a b, beta 0 or 1.  a's element (i, q) lies at
 * a[i * a_row + q * a_col]: a row-major matrix has a_row = lda, a_col = 1, its transpose
 * a_row = 1, a_col = lda.  b is row-major [k][n] with row stride ldb.  The engine's threads
 * share the work, unless this is called inside a parallel region.  Only when
 * gd_gemm_available (). */
void gd_gemm (int m, int n, int k, const float *a, ptrdiff_t a_row, ptrdiff_t a_col,
              const float *b, int ldb, float beta, float *c, int ldc);
