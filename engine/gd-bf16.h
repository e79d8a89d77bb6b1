/* Matrix products in bfloat16 with float accumulation, for the opt-in bf16 path.
 *
 * The operands are rounded to bfloat16 (8 bits of mantissa, round to nearest even) as they
 * are packed; products are summed in float.  Two kernels: the AMX tile unit
 * (TDPBF16PS, 16x16 results from 16x32 by 32x16 tiles) where the processor has it and
 * the kernel lets the process use it, else AVX512-BF16 (VDPBF16PS).  On a processor with
 * neither, gd_bf16_kernel () is NULL and the bf16 path is not offered. */
#pragma once
#include <glib.h>

/* "AMX-BF16", "AVX512-BF16", or NULL when this processor has no bf16 product. */
const char *gd_bf16_kernel (void);

/* c[m, n] = beta c + op(a) b, with op(a)[m, k] = a[m * lda + k], or a[k * lda + m] when
 * trans_a; b[k, n] = b[k * ldb + n]; all row-major float.  beta is 0 or 1.  Runs on the
 * engine's threads unless called from inside a parallel region.  Needs gd_bf16_kernel (). */
void gd_gemm_bf16 (gboolean trans_a, int m, int n, int k, const float *a, int lda,
                   const float *b, int ldb, float beta, float *c, int ldc);

/* op(a) ([m, k]) rounded and packed once, for many products. */
typedef struct GdBf16Matrix GdBf16Matrix;
GdBf16Matrix *gd_bf16_matrix_new (gboolean trans_a, int m, int k, const float *a, int lda);
void gd_bf16_matrix_free (GdBf16Matrix *packed);
size_t gd_bf16_matrix_bytes (const GdBf16Matrix *packed);

/* c[m, n] = beta c + a[i0 : i0 + m, k0 : k0 + k] b[k, n], with a packed; i0 and k0
 * multiples of 32. */
void gd_gemm_bf16_packed (const GdBf16Matrix *a, int i0, int m, int k0, int k, int n,
                          const float *b, int ldb, float beta, float *c, int ldc);

/* The same product with b the columns of a 3x3 convolution (stride 1, padding 1) of the
 * image x [channels, h, w]: b[(ci, ky, kx), (oy, ox)] = x[ci, oy + ky - 1, ox + kx - 1],
 * or 0 outside the image; depth 9 x channels, n = h x w.  The columns are read from x as they
 * are packed, never written out in float. */
void gd_gemm_bf16_conv3x3 (const GdBf16Matrix *a, int i0, int m, const float *x, int channels,
                           int h, int w, float beta, float *c, int ldc);

/* Rounds x to the nearest bfloat16 (ties to even), as the products see their operands. */
float gd_bf16_round (float x);
