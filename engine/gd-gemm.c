/* The float product: c is made in tiles of 12 rows x 32 columns, each tile held in 24
 * AVX-512 registers while the depth passes.  At every step of the depth the tile's two
 * vectors of b are multiplied by the 12 values of a's column broadcast one by one.
 *
 * Blocking: a thread takes a block of up to 256 columns (and, when there are fewer blocks
 * than threads, a share of the rows), and goes through the depth 256 at a time.  For each
 * such slice it copies b's 256 x 256 block into panels of [depth][32] (256 KB, kept in the
 * second-level cache), then runs the rows' tiles over the panels; a's 12 x 256 slice stays
 * in the first-level cache while the panels pass. */
#include "gd-gemm.h"
#include "gd-parallel.h"

#include <omp.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MR 12     /* rows of a tile */
#define NR 32     /* columns of a tile: two vectors */
#define KC 256    /* depth of one pass */
#define NB 256    /* columns of a thread's block */

/* NULL when the kernel runs here, else why not */
static const char *
unavailable (void)
{
  static gsize once;
  static const char *why;
  if (g_once_init_enter (&once))
    {
      const char *choice = g_getenv ("GD_SGEMM");
      gboolean openblas = choice && g_ascii_strcasecmp (choice, "openblas") == 0;
      if (choice && !openblas && g_ascii_strcasecmp (choice, "engine") != 0)
        g_warning ("GD_SGEMM=%s is neither \"engine\" nor \"openblas\"; using the engine's kernel "
                   "where the processor has one", choice);
      why = "this processor has no AVX-512";
#if defined(__x86_64__)
      __builtin_cpu_init ();
      if (__builtin_cpu_supports ("avx512f"))
        why = NULL;
#endif
      if (openblas)
        why = "GD_SGEMM=openblas";
      g_once_init_leave (&once, 1);
    }
  return why;
}

gboolean
gd_gemm_available (void)
{
  return unavailable () == NULL;
}

const char *
gd_gemm_unavailable_reason (void)
{
  return unavailable ();
}

#if defined(__x86_64__)
#define GD_AVX512 __attribute__ ((target ("avx512f")))

/* The tile: c [rows][NR] (row stride ldc) = (accumulate ? c : 0) + a b over kc, a's
 * element (i, q) at a[i * a_row + q * a_col], b packed as [kc][NR].  Inlined into the
 * callers below, each compiled for one row count (rows <= MR) and one layout of a. */
GD_AVX512 static inline __attribute__ ((always_inline)) void
tile (int rows, int kc, const float *a, ptrdiff_t a_row, ptrdiff_t a_col, const float *bp,
      float *c, int ldc, gboolean accumulate)
{
  __m512 lo[MR], hi[MR];
#pragma GCC unroll 12
  for (int i = 0; i < rows; i++)
    {
      lo[i] = accumulate ? _mm512_loadu_ps (c + (size_t) i * ldc) : _mm512_setzero_ps ();
      hi[i] = accumulate ? _mm512_loadu_ps (c + (size_t) i * ldc + 16) : _mm512_setzero_ps ();
    }
  for (int q = 0; q < kc; q++)
    {
      __m512 b0 = _mm512_load_ps (bp + (size_t) q * NR);
      __m512 b1 = _mm512_load_ps (bp + (size_t) q * NR + 16);
      const float *aq = a + q * a_col;
#pragma GCC unroll 12
      for (int i = 0; i < rows; i++)
        {
          __m512 x = _mm512_set1_ps (aq[i * a_row]);
          lo[i] = _mm512_fmadd_ps (x, b0, lo[i]);
          hi[i] = _mm512_fmadd_ps (x, b1, hi[i]);
        }
    }
#pragma GCC unroll 12
  for (int i = 0; i < rows; i++)
    {
      _mm512_storeu_ps (c + (size_t) i * ldc, lo[i]);
      _mm512_storeu_ps (c + (size_t) i * ldc + 16, hi[i]);
    }
}

typedef void (*TileFn) (int kc, const float *a, ptrdiff_t stride, const float *bp, float *c,
                        int ldc, gboolean accumulate);

/* tile_rowsR: a row-major (rows a stride apart, each contiguous); tile_columnsR: a packed
 * as [kc][MR] by pack_columns.  The channel counts of the models are multiples of 4, so
 * the last tile of rows has 12, 8 or 4 of them. */
#define TILE_FUNCTIONS(R)                                                                  \
  GD_AVX512 static void                                                                    \
  tile_rows##R (int kc, const float *a, ptrdiff_t lda, const float *bp, float *c, int ldc, \
                gboolean accumulate)                                                       \
  {                                                                                        \
    tile (R, kc, a, lda, 1, bp, c, ldc, accumulate);                                       \
  }                                                                                        \
  GD_AVX512 static void                                                                    \
  tile_columns##R (int kc, const float *a, ptrdiff_t unused, const float *bp, float *c,    \
                   int ldc, gboolean accumulate)                                           \
  {                                                                                        \
    (void) unused;                                                                         \
    tile (R, kc, a, 1, MR, bp, c, ldc, accumulate);                                        \
  }
TILE_FUNCTIONS (12)
TILE_FUNCTIONS (8)
TILE_FUNCTIONS (4)
#undef TILE_FUNCTIONS

/* The function for a tile of `rows` rows, or NULL (then tile_part) */
static TileFn
tile_function (int rows, gboolean transposed)
{
  switch (rows)
    {
    case 12: return transposed ? tile_columns12 : tile_rows12;
    case 8: return transposed ? tile_columns8 : tile_rows8;
    case 4: return transposed ? tile_columns4 : tile_rows4;
    default: return NULL;
    }
}

/* `rows` (<= MR) of a transposed a's columns (row stride lda), over kc rows, as [kc][MR].
 * Read in place, the depth's rows lie a row of a apart, often in the same few sets of the
 * first-level cache, and evict each other before the next tile reads the rest of their
 * lines. */
GD_AVX512 static void
pack_columns (int kc, const float *a, ptrdiff_t lda, int rows, float *panel)
{
  __mmask16 mask = (__mmask16) ((1u << rows) - 1);
  for (int q = 0; q < kc; q++)
    _mm512_mask_storeu_ps (panel + q * MR, mask, _mm512_maskz_loadu_ps (mask, a + q * lda));
}

/* Any other tile: only rows x cols of it lie inside c and a.  a's rows are copied into a
 * zero-filled panel, c's into a scratch tile; each element is summed exactly as a whole
 * tile sums it. */
GD_AVX512 static void
tile_part (int kc, const float *a, ptrdiff_t a_row, ptrdiff_t a_col, const float *bp,
           float *c, int ldc, int rows, int cols, gboolean accumulate)
{
  float panel[MR * KC] __attribute__ ((aligned (64)));
  float scratch[MR * NR] __attribute__ ((aligned (64)));
  memset (panel, 0, sizeof panel);
  memset (scratch, 0, sizeof scratch);
  for (int i = 0; i < rows; i++)
    for (int q = 0; q < kc; q++)
      panel[i * KC + q] = a[i * a_row + q * a_col];
  if (accumulate)
    for (int i = 0; i < rows; i++)
      memcpy (scratch + i * NR, c + (size_t) i * ldc, sizeof (float) * cols);
  tile_rows12 (kc, panel, KC, bp, scratch, NR, accumulate);
  for (int i = 0; i < rows; i++)
    memcpy (c + (size_t) i * ldc, scratch + i * NR, sizeof (float) * cols);
}

/* b's rows [0, kc) and columns [0, nb) (row stride ldb) as panels [np / NR][kc][NR], the
 * columns past nb zero */
GD_AVX512 static void
pack_b (int kc, const float *b, int ldb, int nb, float *bp)
{
  int np = (nb + NR - 1) / NR * NR;
  for (int j = 0; j < np; j += 16)
    {
      int valid = CLAMP (nb - j, 0, 16);
      __mmask16 mask = (__mmask16) (valid == 16 ? 0xffff : (1u << valid) - 1);
      float *panel = bp + (size_t) (j / NR) * kc * NR + j % NR;
      for (int q = 0; q < kc; q++)
        _mm512_store_ps (panel + (size_t) q * NR,
                         _mm512_maskz_loadu_ps (mask, b + (size_t) q * ldb + j));
    }
}

/* Each thread's packed block of b, kept from call to call (a fresh one would be
 * page-faulted in at every call). */
static void
pack_buffer_free (gpointer data)
{
  g_aligned_free (data);
}

static GPrivate pack_buffer = G_PRIVATE_INIT (pack_buffer_free);

static float *
pack_buffer_get (void)
{
  float *buffer = g_private_get (&pack_buffer);
  if (!buffer)
    {
      buffer = g_aligned_alloc (sizeof (float), (size_t) KC * NB, 64);
      g_private_set (&pack_buffer, buffer);
    }
  return buffer;
}

/* Rows [first, last) of c's column block [n0, n0 + nb) */
GD_AVX512 static void
block (int first, int last, int n0, int nb, int k, const float *a, ptrdiff_t a_row,
       ptrdiff_t a_col, const float *b, int ldb, gboolean accumulate, float *c, int ldc,
       float *bp)
{
  float panel_a[KC * MR] __attribute__ ((aligned (64)));
  for (int q0 = 0; q0 < k; q0 += KC)
    {
      int kc = MIN (KC, k - q0);
      gboolean sum = accumulate || q0 > 0;
      pack_b (kc, b + (size_t) q0 * ldb + n0, ldb, nb, bp);
      for (int i0 = first; i0 < last; i0 += MR)
        {
          const float *ai = a + i0 * a_row + q0 * a_col;
          int rows = MIN (MR, last - i0);
          gboolean transposed = a_col != 1;
          TileFn run = tile_function (rows, transposed);
          if (run && transposed)
            pack_columns (kc, ai, a_col, rows, panel_a);
          for (int j0 = 0; j0 < nb; j0 += NR)
            {
              const float *panel = bp + (size_t) j0 * kc;
              float *cij = c + (size_t) i0 * ldc + n0 + j0;
              int cols = MIN (NR, nb - j0);
              if (!run || cols < NR)
                tile_part (kc, ai, a_row, a_col, panel, cij, ldc, rows, cols, sum);
              else
                run (kc, transposed ? panel_a : ai, a_row, panel, cij, ldc, sum);
            }
        }
    }
}
#endif

void
gd_gemm (int m, int n, int k, const float *a, ptrdiff_t a_row, ptrdiff_t a_col,
         const float *b, int ldb, float beta, float *c, int ldc)
{
  g_return_if_fail (gd_gemm_available ());
  g_return_if_fail (beta == 0.0f || beta == 1.0f);
  if (m <= 0 || n <= 0)
    return;
  if (k <= 0)
    {
      if (beta == 0.0f)
        for (int i = 0; i < m; i++)
          memset (c + (size_t) i * ldc, 0, sizeof (float) * n);
      return;
    }
#if defined(__x86_64__)
  int blocks = (n + NB - 1) / NB, row_tiles = (m + MR - 1) / MR;
  int threads = omp_in_parallel () ? 1 : gd_parallel_threads ();
  /* fewer column blocks than threads: the rows are shared out too, in whole tiles */
  int parts = blocks >= threads ? 1 : MIN ((threads + blocks - 1) / blocks, row_tiles);
  int part_rows = (row_tiles + parts - 1) / parts * MR;
  parts = (m + part_rows - 1) / part_rows;
  int tasks = blocks * parts;
  gboolean accumulate = beta != 0.0f;
#pragma omp parallel num_threads (MIN (threads, tasks)) if (threads > 1 && tasks > 1)
  {
    float *bp = pack_buffer_get ();
#pragma omp for schedule (dynamic)
    for (int task = 0; task < tasks; task++)
      {
        int n0 = task / parts * NB, first = task % parts * part_rows;
        block (first, MIN (m, first + part_rows), n0, MIN (NB, n - n0), k, a, a_row, a_col,
               b, ldb, accumulate, c, ldc, bp);
      }
  }
#else
  (void) a, (void) a_row, (void) a_col, (void) b, (void) ldb, (void) c, (void) ldc;
#endif
}
