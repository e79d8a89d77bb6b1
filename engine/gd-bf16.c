/* bfloat16 matrix products with float accumulation: AMX tiles or AVX512-BF16.
 *
 * Both kernels read the same packed operands:
 *   a: [mp][kp] bfloat16, row-major (mp, kp: m and k rounded up to 32, zero-filled);
 *   b: a block of BLOCK_N columns as [kp / 2][np][2] bfloat16: each row holds, for every
 *      column, the pair (b[2r, col], b[2r + 1, col]) that one float lane sums;
 * and produce 32 x 32 blocks of c, each element summed over k in the same order whatever
 * the number of threads (a block of c belongs to one thread). */
#include "gd-bf16.h"
#include "gd-parallel.h"

#include <omp.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#define BLOCK 32           /* rows and columns of c one kernel call makes */
#define BLOCK_N 256        /* columns of b packed at a time by a thread */
#define KC 512             /* depth of one pass over a block of c */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

typedef enum { KERNEL_UNKNOWN, KERNEL_AMX, KERNEL_AVX512, KERNEL_NONE } Kernel;

static Kernel
detect (void)
{
#if !defined(__x86_64__)
  return KERNEL_NONE;
#else
  unsigned int eax, ebx, ecx, edx;
  __builtin_cpu_init ();
  if (!__builtin_cpu_supports ("avx512f") || !__builtin_cpu_supports ("avx512bw")
      || !__builtin_cpu_supports ("avx512vl")
      || !__get_cpuid_count (7, 1, &eax, &ebx, &ecx, &edx) || !(eax & (1u << 5)))
    return KERNEL_NONE;   /* no AVX512-BF16: nothing to pack with */
  const char *forced = g_getenv ("GD_BF16_KERNEL");
  if (forced && g_ascii_strcasecmp (forced, "avx512") == 0)
    return KERNEL_AVX512;
  /* AMX-BF16 and AMX-TILE (CPUID 7.0 EDX bits 22 and 24), tile state enabled by the
   * kernel (XCR0 bits 17 and 18), and the tile data permission granted to the process */
  if (__get_cpuid_count (7, 0, &eax, &ebx, &ecx, &edx) && (edx & (1u << 22))
      && (edx & (1u << 24)) && __get_cpuid_count (1, 0, &eax, &ebx, &ecx, &edx)
      && (ecx & (1u << 27)))
    {
      unsigned int lo, hi;
      __asm__ volatile ("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
      if ((lo & (3u << 17)) == (3u << 17)
          && syscall (SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0)
        return KERNEL_AMX;
    }
  return KERNEL_AVX512;
#endif
}

static Kernel
kernel (void)
{
  static gsize once;
  static Kernel chosen;
  if (g_once_init_enter (&once))
    {
      chosen = detect ();
      g_once_init_leave (&once, 1);
    }
  return chosen;
}

const char *
gd_bf16_kernel (void)
{
  switch (kernel ())
    {
    case KERNEL_AMX: return "AMX-BF16";
    case KERNEL_AVX512: return "AVX512-BF16";
    default: return NULL;
    }
}

static uint16_t
to_bf16 (float x)
{
  uint32_t u;
  memcpy (&u, &x, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u)
    return (uint16_t) ((u >> 16) | 0x40);   /* NaN stays NaN */
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t) (u >> 16);
}

float
gd_bf16_round (float x)
{
  uint32_t u = (uint32_t) to_bf16 (x) << 16;
  float y;
  memcpy (&y, &u, sizeof y);
  return y;
}

static int
round_up (int x, int to)
{
  return (x + to - 1) / to * to;
}

/* Where b comes from: a row-major float matrix, or the columns of a 3x3 convolution
 * (stride 1, padding 1) read straight from its image [k / 9][h][w]. */
typedef struct {
  const float *b;
  int ldb;
  const float *image;
  int h, w;
} Source;

#if defined(__x86_64__)
/* op(a) as [mp][kp] bfloat16, zero-filled */
__attribute__ ((target ("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
pack_a (gboolean trans, int m, int k, const float *a, int lda, int mp, int kp, uint16_t *ap)
{
  memset (ap, 0, sizeof (uint16_t) * mp * kp);
  for (int i = 0; i < m; i++)
    {
      uint16_t *row = ap + (size_t) i * kp;
      if (trans)
        for (int j = 0; j < k; j++)
          row[j] = to_bf16 (a[(size_t) j * lda + i]);
      else
        for (int j = 0; j < k; j += 16)
          {
            __mmask16 mask = (__mmask16) (k - j >= 16 ? 0xffff : (1u << (k - j)) - 1);
            __m512 v = _mm512_maskz_loadu_ps (mask, a + (size_t) i * lda + j);
            __m256bh h = _mm512_cvtneps_pbh (v);
            _mm256_mask_storeu_epi16 (row + j, mask, (__m256i) h);
          }
    }
}

/* word 2j of the result: the first row's column j; word 2j + 1: the second row's */
static const uint16_t interleave[32] = { 0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22,
                                         7, 23, 8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13,
                                         29, 14, 30, 15, 31 };

/* 16 columns of two rows of b as 16 interleaved pairs */
__attribute__ ((target ("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline void
store_pairs (uint16_t *dst, __m512 lo, __m512 hi)
{
  /* low half: lo's 16 values, high half: hi's */
  __m512i both = (__m512i) _mm512_cvtne2ps_pbh (hi, lo);
  _mm512_storeu_si512 (dst, _mm512_permutexvar_epi16 (_mm512_loadu_si512 (interleave), both));
}

/* columns [n0, n0 + nb) of b as [kp / 2][np][2] bfloat16, zero-filled */
__attribute__ ((target ("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
pack_b (int k, const float *b, int ldb, int n0, int nb, int kp, int np, uint16_t *bp)
{
  for (int r = 0; r < kp / 2; r++)
    {
      const float *row0 = 2 * r < k ? b + (size_t) (2 * r) * ldb + n0 : NULL;
      const float *row1 = 2 * r + 1 < k ? b + (size_t) (2 * r + 1) * ldb + n0 : NULL;
      uint16_t *dst = bp + (size_t) r * np * 2;
      for (int j = 0; j < np; j += 16)
        {
          int valid = CLAMP (nb - j, 0, 16);
          __mmask16 mask = (__mmask16) (valid == 16 ? 0xffff : (1u << valid) - 1);
          __m512 lo = row0 ? _mm512_maskz_loadu_ps (mask, row0 + j) : _mm512_setzero_ps ();
          __m512 hi = row1 ? _mm512_maskz_loadu_ps (mask, row1 + j) : _mm512_setzero_ps ();
          store_pairs (dst + 2 * j, lo, hi);
        }
    }
}

/* One row q of a 3x3 convolution's columns: the image's channel q / 9 read shifted by tap
 * q % 9 (`shift` elements further on), zeros past the depth k. */
typedef struct {
  const float *channel;
  ptrdiff_t shift;
  int tap;
} ImageRow;

static ImageRow
image_row (const Source *s, int k, int q)
{
  if (q >= k)
    return (ImageRow) { NULL, 0, 0 };
  int tap = q % 9;
  return (ImageRow) { s->image + (size_t) (q / 9) * s->h * s->w,
                      (ptrdiff_t) (tap / 3 - 1) * s->w + (tap % 3 - 1), tap };
}

/* 16 values of a row from column p on, where mask says which columns read inside the image */
__attribute__ ((target ("avx512f,avx512bw,avx512vl,avx512bf16"))) static inline __m512
image_row_load (const ImageRow *row, ptrdiff_t plane, int p, __mmask16 mask)
{
  if (!row->channel || !mask)
    return _mm512_setzero_ps ();
  ptrdiff_t at = p + row->shift;
  if (at >= 0 && at + 16 <= plane)
    return _mm512_maskz_loadu_ps (mask, row->channel + at);
  /* near the channel's first or last row the 16 addresses reach outside the channel: the
   * masked load would not fault there, but the pointer itself would lie outside the
   * array, so the values are read one by one, only the masked-in ones */
  float values[16];
  for (int l = 0; l < 16; l++)
    values[l] = mask >> l & 1 ? row->channel[at + l] : 0.0f;
  return _mm512_loadu_ps (values);
}

/* pack_b for a Source with an image: the columns [n0, n0 + nb) of its 3x3 convolution,
 * never written out as floats */
__attribute__ ((target ("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
pack_b_image (int k, const Source *s, int n0, int nb, int kp, int np, uint16_t *bp)
{
  /* inside[tap][g]: which of the columns 16 g ... 16 g + 15 read inside the image */
  __mmask16 inside[9][BLOCK_N / 16];
  for (int tap = 0; tap < 9; tap++)
    for (int g = 0; g < np / 16; g++)
      {
        unsigned mask = 0;
        for (int l = 0; l < 16 && 16 * g + l < nb; l++)
          {
            int p = n0 + 16 * g + l, y = p / s->w + tap / 3 - 1, x = p % s->w + tap % 3 - 1;
            if (y >= 0 && y < s->h && x >= 0 && x < s->w)
              mask |= 1u << l;
          }
        inside[tap][g] = (__mmask16) mask;
      }
  ptrdiff_t plane = (ptrdiff_t) s->h * s->w;
  for (int r = 0; r < kp / 2; r++)
    {
      ImageRow row0 = image_row (s, k, 2 * r), row1 = image_row (s, k, 2 * r + 1);
      uint16_t *dst = bp + (size_t) r * np * 2;
      for (int j = 0; j < np; j += 16)
        store_pairs (dst + 2 * j,
                     image_row_load (&row0, plane, n0 + j, inside[row0.tap][j / 16]),
                     image_row_load (&row1, plane, n0 + j, inside[row1.tap][j / 16]));
    }
}

typedef struct { uint8_t palette, start_row, reserved[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileConfig;

/* eight tiles of 16 rows x 64 bytes: 0-3 c, 4-5 a, 6-7 b */
__attribute__ ((target ("amx-tile"))) static void
amx_configure (void)
{
  TileConfig config;
  memset (&config, 0, sizeof config);
  config.palette = 1;
  for (int t = 0; t < 8; t++)
    {
      config.rows[t] = 16;
      config.colsb[t] = 64;
    }
  /* not _tile_loadconfig: GCC 12's tells the compiler that it reads only a pointer's
   * worth of the configuration, and the stores above it are then dropped */
  __asm__ volatile ("ldtilecfg %0" : : "m" (config));
}

__attribute__ ((target ("amx-tile"))) static void
amx_release (void)
{
  _tile_release ();
}

/* c (32 x 32 floats, row stride ldc) = beta c + a b over kp */
__attribute__ ((target ("amx-tile,amx-bf16"))) static void
amx_block (const uint16_t *ap, int lda, int kp, const uint16_t *bp, int np, float *c, int ldc,
           gboolean accumulate)
{
  size_t stride = sizeof (float) * ldc;
  if (accumulate)
    {
      _tile_loadd (0, c, stride);
      _tile_loadd (1, c + 16, stride);
      _tile_loadd (2, c + (size_t) 16 * ldc, stride);
      _tile_loadd (3, c + (size_t) 16 * ldc + 16, stride);
    }
  else
    {
      _tile_zero (0);
      _tile_zero (1);
      _tile_zero (2);
      _tile_zero (3);
    }
  size_t a_stride = sizeof (uint16_t) * lda, b_stride = sizeof (uint16_t) * 2 * np;
  for (int k0 = 0; k0 < kp; k0 += 32)
    {
      const uint16_t *b0 = bp + (size_t) (k0 / 2) * np * 2;
      _tile_loadd (4, ap + k0, a_stride);
      _tile_loadd (5, ap + (size_t) 16 * lda + k0, a_stride);
      _tile_loadd (6, b0, b_stride);
      _tile_loadd (7, b0 + 32, b_stride);
      _tile_dpbf16ps (0, 4, 6);
      _tile_dpbf16ps (1, 4, 7);
      _tile_dpbf16ps (2, 5, 6);
      _tile_dpbf16ps (3, 5, 7);
    }
  _tile_stored (0, c, stride);
  _tile_stored (1, c + 16, stride);
  _tile_stored (2, c + (size_t) 16 * ldc, stride);
  _tile_stored (3, c + (size_t) 16 * ldc + 16, stride);
}

/* the same with VDPBF16PS, eight rows at a time (16 accumulators of 16 floats) */
__attribute__ ((target ("avx512f,avx512bw,avx512vl,avx512bf16"))) static void
avx512_block (const uint16_t *ap, int lda, int kp, const uint16_t *bp, int np, float *c, int ldc,
              gboolean accumulate)
{
  for (int m0 = 0; m0 < BLOCK; m0 += 8)
    {
      /* fully unrolled, so that the accumulators stay in registers */
      __m512 acc[8][2];
#pragma GCC unroll 8
      for (int i = 0; i < 8; i++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
          acc[i][h] = accumulate ? _mm512_loadu_ps (c + (size_t) (m0 + i) * ldc + 16 * h)
                                 : _mm512_setzero_ps ();
      for (int r = 0; r < kp / 2; r++)
        {
          const uint16_t *brow = bp + (size_t) r * np * 2;
          __m512bh b0 = (__m512bh) _mm512_loadu_si512 (brow);
          __m512bh b1 = (__m512bh) _mm512_loadu_si512 (brow + 32);
#pragma GCC unroll 8
          for (int i = 0; i < 8; i++)
            {
              int32_t pair;
              memcpy (&pair, ap + (size_t) (m0 + i) * lda + 2 * r, sizeof pair);
              __m512bh a = (__m512bh) _mm512_set1_epi32 (pair);
              acc[i][0] = _mm512_dpbf16_ps (acc[i][0], a, b0);
              acc[i][1] = _mm512_dpbf16_ps (acc[i][1], a, b1);
            }
        }
#pragma GCC unroll 8
      for (int i = 0; i < 8; i++)
#pragma GCC unroll 2
        for (int h = 0; h < 2; h++)
          _mm512_storeu_ps (c + (size_t) (m0 + i) * ldc + 16 * h, acc[i][h]);
    }
}

/* One 32 x 32 block of c at (i0, j0), of which rows x cols lie inside c: computed in place
 * when whole, else through a scratch block. */
static void
block (Kernel kind, const uint16_t *ap, int lda, int kp, const uint16_t *bp, int np, float *c,
       int ldc, int rows, int cols, gboolean accumulate)
{
  void (*run) (const uint16_t *, int, int, const uint16_t *, int, float *, int, gboolean)
    = kind == KERNEL_AMX ? amx_block : avx512_block;
  if (rows == BLOCK && cols == BLOCK)
    {
      run (ap, lda, kp, bp, np, c, ldc, accumulate);
      return;
    }
  float scratch[BLOCK * BLOCK] __attribute__ ((aligned (64)));
  memset (scratch, 0, sizeof scratch);
  if (accumulate)
    for (int i = 0; i < rows; i++)
      memcpy (scratch + i * BLOCK, c + (size_t) i * ldc, sizeof (float) * cols);
  run (ap, lda, kp, bp, np, scratch, BLOCK, accumulate);
  for (int i = 0; i < rows; i++)
    memcpy (c + (size_t) i * ldc, scratch + i * BLOCK, sizeof (float) * cols);
}

#endif

struct GdBf16Matrix {
  int m, k, mp, kp;
  uint16_t *data;     /* [mp][kp] */
};

GdBf16Matrix *
gd_bf16_matrix_new (gboolean trans, int m, int k, const float *a, int lda)
{
  g_return_val_if_fail (gd_bf16_kernel () != NULL, NULL);
  GdBf16Matrix *p = g_new (GdBf16Matrix, 1);
  p->m = m;
  p->k = k;
  p->mp = round_up (MAX (m, 1), BLOCK);
  p->kp = round_up (MAX (k, 1), BLOCK);
  p->data = g_aligned_alloc (sizeof (uint16_t), (size_t) p->mp * p->kp, 64);
#if defined(__x86_64__)
  pack_a (trans, m, k, a, lda, p->mp, p->kp, p->data);
#else
  (void) trans, (void) a, (void) lda;
#endif
  return p;
}

void
gd_bf16_matrix_free (GdBf16Matrix *p)
{
  if (!p)
    return;
  g_aligned_free (p->data);
  g_free (p);
}

size_t
gd_bf16_matrix_bytes (const GdBf16Matrix *p)
{
  return p ? sizeof (uint16_t) * p->mp * p->kp : 0;
}

#if defined(__x86_64__)
/* Each thread's packed block of b, kept from call to call: a whole depth of 256 columns is
 * up to a few megabytes, which a fresh allocation would page-fault in every time. */
typedef struct {
  uint16_t *data;
  size_t size;
} PackBuffer;

static void
pack_buffer_free (gpointer data)
{
  PackBuffer *buffer = data;
  g_aligned_free (buffer->data);
  g_free (buffer);
}

static GPrivate pack_buffer = G_PRIVATE_INIT (pack_buffer_free);

static uint16_t *
pack_buffer_get (size_t count)
{
  PackBuffer *buffer = g_private_get (&pack_buffer);
  if (!buffer)
    {
      buffer = g_new0 (PackBuffer, 1);
      g_private_set (&pack_buffer, buffer);
    }
  if (buffer->size < count)
    {
      g_aligned_free (buffer->data);
      buffer->data = g_aligned_alloc (sizeof (uint16_t), count, 64);
      buffer->size = count;
    }
  return buffer->data;
}
#endif

/* c[m, n] = beta c + a[i0_first :, k0 : k0 + k] b, with b from src */
static void
product (const GdBf16Matrix *a, int i0_first, int m, int k0, int k, int n, const Source *src,
         float beta, float *c, int ldc)
{
  Kernel kind = kernel ();
  g_return_if_fail (kind == KERNEL_AMX || kind == KERNEL_AVX512);
  g_return_if_fail (beta == 0.0f || beta == 1.0f);
  g_return_if_fail (k0 % BLOCK == 0 && k0 >= 0 && k0 + k <= a->k);
  g_return_if_fail (i0_first % BLOCK == 0 && i0_first >= 0 && i0_first + m <= a->m);
  if (m <= 0 || n <= 0)
    return;
  gd_count_product (m, n, k);
#if defined(__x86_64__)
  /* columns of a past k0 + k are zero only past a->k: b's rows past k are packed as zeros */
  int kp = round_up (MAX (k, 1), BLOCK);
  int blocks = (n + BLOCK_N - 1) / BLOCK_N, row_blocks = (m + BLOCK - 1) / BLOCK;
  gboolean accumulate = beta != 0.0f;
  int threads = omp_in_parallel () ? 1 : gd_parallel_threads ();
  /* fewer column blocks than threads (small images): the rows are shared out too, each
   * part packing its own copy of b's block.  Every element of c is summed the same way
   * whoever sums it: the same numbers for any thread count. */
  int parts = blocks >= threads ? 1 : MIN ((threads + blocks - 1) / blocks, row_blocks);
  int part_rows = (row_blocks + parts - 1) / parts * BLOCK;
  parts = (m + part_rows - 1) / part_rows;
#pragma omp parallel num_threads (MIN (threads, blocks * parts))
  {
    uint16_t *bp = pack_buffer_get ((size_t) kp * BLOCK_N);
    if (kind == KERNEL_AMX)
      amx_configure ();
#pragma omp for schedule (static)
    for (int task = 0; task < blocks * parts; task++)
      {
        int blk = task / parts, first = task % parts * part_rows, last = MIN (m, first + part_rows);
        int n0 = blk * BLOCK_N, nb = MIN (BLOCK_N, n - n0), np = round_up (nb, BLOCK);
        if (src->image)
          pack_b_image (k, src, n0, nb, kp, np, bp);
        else
          pack_b (k, src->b, src->ldb, n0, nb, kp, np, bp);
        /* KC of the depth at a time: a's 32 rows of it stay in the first-level cache while
         * the blocks of the columns pass, b's KC rows in the second */
        for (int q0 = 0; q0 < kp; q0 += KC)
          for (int i0 = first; i0 < last; i0 += BLOCK)
            for (int j0 = 0; j0 < nb; j0 += BLOCK)
              block (kind, a->data + (size_t) (i0_first + i0) * a->kp + k0 + q0, a->kp,
                     MIN (KC, kp - q0), bp + (size_t) q0 * np + 2 * j0, np,
                     c + (size_t) i0 * ldc + n0 + j0, ldc, MIN (BLOCK, m - i0),
                     MIN (BLOCK, nb - j0), accumulate || q0 > 0);
      }
    if (kind == KERNEL_AMX)
      amx_release ();
  }
#else
  (void) src, (void) c, (void) ldc;   /* no kernel: refused above */
#endif
}

void
gd_gemm_bf16_packed (const GdBf16Matrix *a, int i0, int m, int k0, int k, int n,
                     const float *b, int ldb, float beta, float *c, int ldc)
{
  Source src = { .b = b, .ldb = ldb };
  product (a, i0, m, k0, k, n, &src, beta, c, ldc);
}

void
gd_gemm_bf16_conv3x3 (const GdBf16Matrix *a, int i0, int m, const float *x, int channels,
                      int h, int w, float beta, float *c, int ldc)
{
  Source src = { .image = x, .h = h, .w = w };
  product (a, i0, m, 0, channels * 9, h * w, &src, beta, c, ldc);
}

void
gd_gemm_bf16 (gboolean trans_a, int m, int n, int k, const float *a, int lda,
              const float *b, int ldb, float beta, float *c, int ldc)
{
  if (m <= 0 || n <= 0)
    return;
  GdBf16Matrix *packed = gd_bf16_matrix_new (trans_a, m, k, a, lda);
  gd_gemm_bf16_packed (packed, 0, m, 0, k, n, b, ldb, beta, c, ldc);
  gd_bf16_matrix_free (packed);
}
