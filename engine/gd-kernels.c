#include "gd-kernels.h"
#include "gd-bf16.h"

#include "gd-parallel.h"

#include <cblas.h>
#include <glib.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* Loops over spans of elements, compiled for AVX-512, AVX2 and plain x86-64 and chosen at
 * load time for the processor.  Parallel loops around them
 * hand out fixed spans, so results do not depend on the thread count. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define GD_VECTOR_CLONES __attribute__ ((target_clones ("avx512f", "avx2", "default")))
#else
#define GD_VECTOR_CLONES
#endif

/* e^x in single precision, written so that loops of it vectorise: x = n ln2 + r with
 * |r| <= ln2 / 2, e^r by its Taylor polynomial to degree 7 (relative error < 2e-7 before
 * rounding), 2^n put into the exponent bits.  x is clamped to [-87, 88]: below, the result
 * is the smallest normal number's order instead of a denormal or 0. */
static inline float
exp_vectorisable (float x)
{
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  /* n = round (x / ln2): adding 1.5 * 2^23 leaves no fraction bits to round into */
  float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = fmaf (n, -0.693145751953125f, x);
  r = fmaf (n, -1.428606765330187045e-06f, r);
  float p = 1.0f / 5040.0f;
  p = fmaf (p, r, 1.0f / 720.0f);
  p = fmaf (p, r, 1.0f / 120.0f);
  p = fmaf (p, r, 1.0f / 24.0f);
  p = fmaf (p, r, 1.0f / 6.0f);
  p = fmaf (p, r, 0.5f);
  p = fmaf (p, r, 1.0f);
  p = fmaf (p, r, 1.0f);
  int32_t bits = ((int32_t) n + 127) << 23;
  float scale;
  memcpy (&scale, &bits, sizeof scale);
  return p * scale;
}

/* ---- convolution ---- */

static int
conv_out_size (int size, int k, int stride, int pad)
{
  return (size + 2 * pad - k) / stride + 1;
}

/* images per partial sum of the parameter gradients */
#define GRADIENT_CHUNK 8

static int
conv_lanes (int n)
{
  return MIN (n, gd_parallel_threads ());
}

/* Input channels per band: a convolution runs over its input channels in bands whose columns
 * (im2col rows) fit in CONV_BAND_BYTES, each band one product that adds to the output (the
 * product's depth is cut, so nothing is packed twice).  A band is a multiple of 32 channels
 * (so that it starts on a 32-column boundary of packed bf16 weights), or all of them. */
#define CONV_BAND_BYTES ((size_t) 16 << 20)

static int
conv_band (int cin, int k, size_t spatial)
{
  size_t per_channel = (size_t) k * k * spatial * sizeof (float);
  size_t band = MAX (CONV_BAND_BYTES / per_channel / 32 * 32, 32);
  return (int) MIN (band, (size_t) cin);
}

/* The 3x3, stride 1, pad 1 case of im2col and col2im, which nearly every layer is: the
 * row of tap (ky, kx) is the channel shifted by (ky - 1, kx - 1), so it is one flat copy
 * (or sum) of the whole channel, with the column that wrapped around to the next image
 * row set to zero. */
static gboolean
conv_is_3x3_same (int k, int stride, int pad)
{
  return k == 3 && stride == 1 && pad == 1;
}

/* valid output rows [*first, *last) of vertical shift dy; the flat span they cover */
static void
shift_rows (int h, int dy, int *first, int *last)
{
  *first = dy < 0 ? 1 : 0;
  *last = dy > 0 ? h - 1 : h;
}

/* The column of a row of shift dx that wrapped around from the neighbouring image row
 * (the first column for dx < 0, the last for dx > 0), set to zero in rows [first, last). */
static void
zero_wrapped_column (float *row, int w, int first, int last, int dx)
{
  if (dx != 0)
    for (int oy = first; oy < last; oy++)
      row[(size_t) oy * w + (dx < 0 ? 0 : w - 1)] = 0.0f;
}

GD_VECTOR_CLONES static void
im2col_3x3 (const float *x, int cin, int h, int w, float *col, size_t ld)
{
  size_t plane = (size_t) h * w;
  for (int ci = 0; ci < cin; ci++)
    for (int ky = 0; ky < 3; ky++)
      for (int kx = 0; kx < 3; kx++)
        {
          float *row = col + (((size_t) ci * 3 + ky) * 3 + kx) * ld;
          const float *src = x + ci * plane;
          int dy = ky - 1, dx = kx - 1, first, last;
          shift_rows (h, dy, &first, &last);
          memset (row, 0, sizeof (float) * first * w);
          memset (row + (size_t) last * w, 0, sizeof (float) * (h - last) * w);
          size_t span = (size_t) (last - first) * w;
          if (span == 0)
            continue;
          float *dst = row + (size_t) first * w;
          const float *from = src + (size_t) (first + dy) * w;
          /* dst[j] = from[j + dx]; the one element that would be read outside the
           * channel is the wrapped column, zeroed below */
          if (dx < 0)
            memcpy (dst + 1, from, sizeof (float) * (span - 1));
          else if (dx > 0)
            memcpy (dst, from + 1, sizeof (float) * (span - 1));
          else
            memcpy (dst, from, sizeof (float) * span);
          zero_wrapped_column (row, w, first, last, dx);
        }
}

/* The adjoint; col is scratch and its wrapped columns are zeroed first. */
GD_VECTOR_CLONES static void
col2im_3x3 (float *col, size_t ld, int cin, int h, int w, float *dx_image)
{
  size_t plane = (size_t) h * w;
  memset (dx_image, 0, sizeof (float) * cin * plane);
  for (int ci = 0; ci < cin; ci++)
    for (int ky = 0; ky < 3; ky++)
      for (int kx = 0; kx < 3; kx++)
        {
          float *row = col + (((size_t) ci * 3 + ky) * 3 + kx) * ld;
          int dy = ky - 1, dx = kx - 1, first, last;
          shift_rows (h, dy, &first, &last);
          if (last <= first)
            continue;
          zero_wrapped_column (row, w, first, last, dx);
          size_t span = (size_t) (last - first) * w;
          const float *from = row + (size_t) first * w;
          float *to = dx_image + ci * plane + (size_t) (first + dy) * w;
          /* to[j + dx] += from[j], leaving out the element outside the channel */
          size_t begin = dx < 0 ? 1 : 0, end = dx > 0 ? span - 1 : span;
#pragma omp simd
          for (size_t j = begin; j < end; j++)
            to[j + dx] += from[j];
        }
}

/* col[(ci, ky, kx), column + (oy, ox)] = x[ci, oy stride + ky - pad, ox stride + kx - pad]
 * or 0 outside the image; ld is the row length of col. */
GD_VECTOR_CLONES static void
im2col (const float *x, int cin, int h, int w, int k, int stride, int pad, float *col, size_t ld)
{
  if (conv_is_3x3_same (k, stride, pad))
    {
      im2col_3x3 (x, cin, h, w, col, ld);
      return;
    }
  int ho = conv_out_size (h, k, stride, pad), wo = conv_out_size (w, k, stride, pad);
  for (int ci = 0; ci < cin; ci++)
    for (int ky = 0; ky < k; ky++)
      for (int kx = 0; kx < k; kx++)
        {
          float *row = col + (((size_t) ci * k + ky) * k + kx) * ld;
          /* the output columns whose input column lies inside the image */
          int first = 0, last = wo;
          while (first < wo && first * stride + kx - pad < 0)
            first++;
          while (last > first && (last - 1) * stride + kx - pad >= w)
            last--;
          for (int oy = 0; oy < ho; oy++)
            {
              int iy = oy * stride + ky - pad;
              float *dst = row + (size_t) oy * wo;
              if (iy < 0 || iy >= h)
                {
                  memset (dst, 0, sizeof (float) * wo);
                  continue;
                }
              const float *src = x + ((size_t) ci * h + iy) * w + kx - pad;
              for (int ox = 0; ox < first; ox++)
                dst[ox] = 0.0f;
              if (stride == 1)
#pragma omp simd
                for (int ox = first; ox < last; ox++)
                  dst[ox] = src[ox];
              else
                for (int ox = first; ox < last; ox++)
                  dst[ox] = src[ox * stride];
              for (int ox = last; ox < wo; ox++)
                dst[ox] = 0.0f;
            }
        }
}

/* The adjoint of im2col: dx[ci, iy, ix] = sum of the col entries that read it (col is
 * scratch: the 3x3 case writes zeros into it). */
GD_VECTOR_CLONES static void
col2im (float *col, size_t ld, int cin, int h, int w, int k, int stride, int pad, float *dx)
{
  if (conv_is_3x3_same (k, stride, pad))
    {
      col2im_3x3 (col, ld, cin, h, w, dx);
      return;
    }
  int ho = conv_out_size (h, k, stride, pad), wo = conv_out_size (w, k, stride, pad);
  memset (dx, 0, sizeof (float) * (size_t) cin * h * w);
  for (int ci = 0; ci < cin; ci++)
    for (int ky = 0; ky < k; ky++)
      for (int kx = 0; kx < k; kx++)
        {
          const float *row = col + (((size_t) ci * k + ky) * k + kx) * ld;
          int first = 0, last = wo;
          while (first < wo && first * stride + kx - pad < 0)
            first++;
          while (last > first && (last - 1) * stride + kx - pad >= w)
            last--;
          for (int oy = 0; oy < ho; oy++)
            {
              int iy = oy * stride + ky - pad;
              if (iy < 0 || iy >= h)
                continue;
              float *dst = dx + ((size_t) ci * h + iy) * w + kx - pad;
              const float *src = row + (size_t) oy * wo;
              if (stride == 1)
#pragma omp simd
                for (int ox = first; ox < last; ox++)
                  dst[ox] += src[ox];
              else
                for (int ox = first; ox < last; ox++)
                  dst[ox * stride] += src[ox];
            }
        }
}

static gboolean
conv_is_pointwise (int k, int stride, int pad)
{
  return k == 1 && stride == 1 && pad == 0;
}

/* y[co, :] = bias[co] (the product then adds to it); nothing without a bias */
static void
conv_fill_bias (const float *bias, int cout, int spatial, float *y)
{
  if (!bias)
    return;
  for (int co = 0; co < cout; co++)
    {
      float *row = y + (size_t) co * spatial, value = bias[co];
#pragma omp simd
      for (int s = 0; s < spatial; s++)
        row[s] = value;
    }
}

/* ---- Winograd F(2x2, 3x3) ----
 *
 * A 3x3 convolution with stride 1 and padding 1 that has enough 2x2 output tiles is done the
 * Winograd way: each 4x4 input patch d (tiles overlap by two pixels) goes to V = B^T d B and
 * each 3x3 filter g to U = G g G^T, sixteen products M[xi] = U[xi] V[xi] (one per element xi
 * of the 4x4 patch; channels are the depth, tiles the columns) sum over the input channels,
 * and A^T M A is the 2x2 output tile.  That is 16 products in place of 36 multiplications
 * per output tile and channel pair: 2.25 times less arithmetic, with errors of a few units of
 * rounding of the terms' magnitudes, as the direct sum's (the transforms only add, subtract
 * and halve).
 *
 *   B^T = | 1  0 -1  0 |    G = | 1    0    0   |    A^T = | 1  1  1  0 |
 *         | 0  1  1  0 |        | 1/2  1/2  1/2 |          | 0  1 -1 -1 |
 *         | 0 -1  1  0 |        | 1/2 -1/2  1/2 |
 *         | 0  1  0 -1 |        | 0    0    1   |
 *
 * The input gradient is the convolution of dy with the flipped filters, input and output
 * channels exchanged.  G with its columns reversed (a flipped filter) is G with its rows 0
 * and 3 swapped, so the flipped filters' transform is U'[a][b][ci][co] = U[s(a)][s(b)][co][ci]
 * with s swapping 0 and 3: the same U serves both, its channel matrices read transposed.
 *
 * The filters are transformed at every call (5% of a 64x64 U-Net forward pass; kept, they
 * would take 16/9 of those layers' weights again), and the tiles of all images go through
 * in chunks of whole tile rows whose V and M fit in WINOGRAD_CHUNK_BYTES.  Every value is
 * computed by one thread in an order that does not depend on the thread count. */

/* Where it pays, measured one convolution at a time against im2col on this project's
 * machine: from 128 tiles in the batch (two 16x16 images: 1.11 times as fast; one 16x16
 * image, 64 tiles: 0.85 to 1.01; 64x64 and 32x32 at batch 1: 1.45 to 1.66), and with
 * cin cout >= 4 (cin + cout), as the transforms cost in proportion to cin + cout and the
 * products save in proportion to cin cout (3 -> 192 channels at 64x64: 0.30; 192 -> 6:
 * 1.32). */
#define WINOGRAD_MIN_TILES 128
#define WINOGRAD_CHUNK_BYTES ((size_t) 16 << 20)
#define WINOGRAD_XI 16

typedef struct {
  int n, cx, cy, h, w;          /* images; channels transformed in (x) and out (y) */
  int th, tw;                   /* tile rows and columns per image */
  int chunk_rows;               /* tile rows (of all images in turn) per chunk */
} Winograd;

static Winograd
winograd_plan (int n, int cx, int cy, int h, int w)
{
  Winograd g = { .n = n, .cx = cx, .cy = cy, .h = h, .w = w, .th = (h + 1) / 2,
                 .tw = (w + 1) / 2 };
  size_t per_tile = (size_t) WINOGRAD_XI * (cx + cy) * sizeof (float);
  size_t tiles = MAX (WINOGRAD_CHUNK_BYTES / per_tile, (size_t) g.tw);
  g.chunk_rows = (int) MIN (tiles / g.tw, (size_t) n * g.th);
  return g;
}

int
gd_conv2d_winograd (int n, int cin, int cout, int h, int w, int k, int stride, int pad)
{
  return conv_is_3x3_same (k, stride, pad)
         && (size_t) n * ((h + 1) / 2) * ((w + 1) / 2) >= WINOGRAD_MIN_TILES
         && (gint64) cin * cout >= 4 * ((gint64) cin + cout);
}

/* floats of work: U, then one chunk's V and M */
static size_t
winograd_work_size (const Winograd *g)
{
  size_t columns = (size_t) g->chunk_rows * g->tw;
  return (size_t) WINOGRAD_XI * ((size_t) g->cx * g->cy + columns * (g->cx + g->cy));
}

/* u[xi][co][ci] = (G g G^T)[xi] of filter weight[co, ci] (3x3), for output channel co.
 * Sixteen input channels at a time have their taps set side by side first, so that the
 * arithmetic runs in vectors. */
GD_VECTOR_CLONES static void
winograd_filters (const float *weight, int cout, int cin, int co, float *u)
{
  size_t plane = (size_t) cout * cin;
  const float *f = weight + (size_t) co * cin * 9;
  for (int c0 = 0; c0 < cin; c0 += 16)
    {
      int count = MIN (16, cin - c0);
      float k[9][16] = { { 0 } }, r[4][3][16], out[16][16];
      for (int l = 0; l < count; l++)
        for (int j = 0; j < 9; j++)
          k[j][l] = f[(size_t) (c0 + l) * 9 + j];
      /* G g, row by row, then times G^T along each row */
      for (int l = 0; l < 16; l++)
        for (int x = 0; x < 3; x++)
          {
            r[0][x][l] = k[x][l];
            r[1][x][l] = 0.5f * (k[x][l] + k[3 + x][l] + k[6 + x][l]);
            r[2][x][l] = 0.5f * (k[x][l] - k[3 + x][l] + k[6 + x][l]);
            r[3][x][l] = k[6 + x][l];
          }
      for (int a = 0; a < 4; a++)
        for (int l = 0; l < 16; l++)
          {
            out[a * 4 + 0][l] = r[a][0][l];
            out[a * 4 + 1][l] = 0.5f * (r[a][0][l] + r[a][1][l] + r[a][2][l]);
            out[a * 4 + 2][l] = 0.5f * (r[a][0][l] - r[a][1][l] + r[a][2][l]);
            out[a * 4 + 3][l] = r[a][2][l];
          }
      for (int xi = 0; xi < WINOGRAD_XI; xi++)
        memcpy (u + xi * plane + (size_t) co * cin + c0, out[xi], count * sizeof (float));
    }
}

/* V of channel c for tile rows [row0, row0 + rows) into v[xi][c][column] (ld columns);
 * scratch: 5 (2 tw + 2) floats, the first 2 tw + 2 zero.  The four input rows of a tile row
 * (the zero row where they leave the image) are combined as B^T's rows first, padded with
 * zeros to x = -1 .. 2 tw, then along each tile's four columns. */
GD_VECTOR_CLONES static void
winograd_input (const Winograd *g, const float *x, int c, int row0, int rows, float *v,
                size_t ld, float *scratch)
{
  int h = g->h, w = g->w, tw = g->tw, wp = 2 * tw + 2;
  size_t plane = (size_t) h * w, stride = (size_t) g->cx * ld;
  const float *zero = scratch;
  float *s = scratch + wp;
  for (int r = 0; r < rows; r++)
    {
      int image = (row0 + r) / g->th, ty = (row0 + r) % g->th;
      const float *channel = x + ((size_t) image * g->cx + c) * plane, *d[4];
      for (int k = 0; k < 4; k++)
        {
          int y = 2 * ty - 1 + k;
          d[k] = y >= 0 && y < h ? channel + (size_t) y * w : zero;
        }
      float *s0 = s, *s1 = s + wp, *s2 = s + 2 * wp, *s3 = s + 3 * wp;
#pragma omp simd
      for (int p = 0; p < w; p++)
        {
          s0[p + 1] = d[0][p] - d[2][p];
          s1[p + 1] = d[1][p] + d[2][p];
          s2[p + 1] = d[2][p] - d[1][p];
          s3[p + 1] = d[1][p] - d[3][p];
        }
      for (int p = 0; p < wp; p += p == 0 ? w + 1 : 1)
        s0[p] = s1[p] = s2[p] = s3[p] = 0.0f;
      float *out = v + (size_t) c * ld + (size_t) r * tw;
      for (int a = 0; a < 4; a++)
        {
          const float *sa = s + a * wp;
          float *o0 = out + (a * 4) * stride, *o1 = o0 + stride, *o2 = o1 + stride,
                *o3 = o2 + stride;
#pragma omp simd
          for (int t = 0; t < tw; t++)
            {
              const float *p = sa + 2 * t;
              o0[t] = p[0] - p[2];
              o1[t] = p[1] + p[2];
              o2[t] = p[2] - p[1];
              o3[t] = p[1] - p[3];
            }
        }
    }
}

/* The output tiles A^T M A of channel c for tile rows [row0, row0 + rows), plus bias (or
 * NULL), into y [n, cy, h, w]; scratch: 4 tw floats. */
GD_VECTOR_CLONES static void
winograd_output (const Winograd *g, const float *m, size_t ld, int c, int row0, int rows,
                 const float *bias, float *y, float *scratch)
{
  int h = g->h, w = g->w, tw = g->tw;
  size_t plane = (size_t) h * w, stride = (size_t) g->cy * ld;
  float offset = bias ? bias[c] : 0.0f;
  float *y0 = scratch, *y1 = scratch + 2 * tw;
  for (int r = 0; r < rows; r++)
    {
      int image = (row0 + r) / g->th, ty = (row0 + r) % g->th;
      const float *mm = m + (size_t) c * ld + (size_t) r * tw;
#pragma omp simd
      for (int t = 0; t < tw; t++)
        {
          /* A^T M: rows 0 + 1 + 2 and 1 - 2 - 3 of M, for each of its four columns */
#define WINOGRAD_M(a, j) mm[((a) * 4 + (j)) * stride + t]
#define WINOGRAD_SUM(j) (WINOGRAD_M (0, j) + WINOGRAD_M (1, j) + WINOGRAD_M (2, j))
#define WINOGRAD_DIFFERENCE(j) (WINOGRAD_M (1, j) - WINOGRAD_M (2, j) - WINOGRAD_M (3, j))
          float a0 = WINOGRAD_SUM (0), a1 = WINOGRAD_SUM (1), a2 = WINOGRAD_SUM (2),
                a3 = WINOGRAD_SUM (3);
          float b0 = WINOGRAD_DIFFERENCE (0), b1 = WINOGRAD_DIFFERENCE (1),
                b2 = WINOGRAD_DIFFERENCE (2), b3 = WINOGRAD_DIFFERENCE (3);
#undef WINOGRAD_M
#undef WINOGRAD_SUM
#undef WINOGRAD_DIFFERENCE
          /* then times A along each row */
          y0[2 * t] = a0 + a1 + a2 + offset;
          y0[2 * t + 1] = a1 - a2 - a3 + offset;
          y1[2 * t] = b0 + b1 + b2 + offset;
          y1[2 * t + 1] = b1 - b2 - b3 + offset;
        }
      float *channel = y + ((size_t) image * g->cy + c) * plane;
      memcpy (channel + (size_t) 2 * ty * w, y0, w * sizeof (float));
      if (2 * ty + 1 < h)
        memcpy (channel + (size_t) (2 * ty + 1) * w, y1, w * sizeof (float));
    }
}

/* forward: from = x [n, cin, h, w], to = y [n, cout, h, w];
 * input gradient: from = dy [n, cout, h, w], to = dx [n, cin, h, w] (bias NULL) */
static void
winograd_conv (gboolean input_gradient, const float *from, int n, int cin, int h, int w,
               const float *weight, const float *bias, int cout, float *to, float *work)
{
  Winograd g = input_gradient ? winograd_plan (n, cout, cin, h, w)
                              : winograd_plan (n, cin, cout, h, w);
  int lanes = gd_parallel_threads (), total_rows = n * g.th;
  size_t columns = (size_t) g.chunk_rows * g.tw;
  float *u = work, *v = u + (size_t) WINOGRAD_XI * cin * cout;
  float *m = v + (size_t) WINOGRAD_XI * g.cx * columns;
  /* the work the products replace, for the GFLOPS of the benchmark */
  for (int i = 0; i < n; i++)
    gd_count_product (g.cy, h * w, g.cx * 9);
#pragma omp parallel num_threads (lanes) if (lanes > 1 && !omp_in_parallel ())
  {
    /* a zero row for the input transform, then the transforms' rows */
    float *scratch = g_new0 (float, 5 * ((size_t) 2 * g.tw + 2));
#pragma omp for schedule (static)
    for (int co = 0; co < cout; co++)
      winograd_filters (weight, cout, cin, co, u);
    for (int row0 = 0; row0 < total_rows; row0 += g.chunk_rows)
      {
        int rows = MIN (g.chunk_rows, total_rows - row0);
        int cols = rows * g.tw;
#pragma omp for schedule (static)
        for (int c = 0; c < g.cx; c++)
          winograd_input (&g, from, c, row0, rows, v, cols, scratch);
#pragma omp for schedule (dynamic)
        for (int xi = 0; xi < WINOGRAD_XI; xi++)
          {
            float *mx = m + (size_t) xi * g.cy * cols;
            const float *vx = v + (size_t) xi * g.cx * cols;
            if (input_gradient)
              {
                int a = xi / 4, b = xi % 4;
                int swapped = (a == 0 ? 3 : a == 3 ? 0 : a) * 4 + (b == 0 ? 3 : b == 3 ? 0 : b);
                gd_sgemm_uncounted (CblasTrans, CblasNoTrans, cin, cols, cout, 1.0f,
                                    u + (size_t) swapped * cout * cin, cin, vx, cols, 0.0f, mx,
                                    cols);
              }
            else
              gd_sgemm_uncounted (CblasNoTrans, CblasNoTrans, cout, cols, cin, 1.0f,
                                  u + (size_t) xi * cout * cin, cin, vx, cols, 0.0f, mx, cols);
          }
#pragma omp for schedule (static)
        for (int c = 0; c < g.cy; c++)
          winograd_output (&g, m, cols, c, row0, rows, bias, to, scratch + 2 * g.tw + 2);
      }
    g_free (scratch);
  }
}

/* The work buffer of a convolution: one band of one image's columns per thread (no more
 * threads than images), or a Winograd plan's U, V and M. */
size_t
gd_conv2d_work_size (int cin, int cout, int n, int h, int w, int k, int stride, int pad)
{
  size_t spatial = (size_t) conv_out_size (h, k, stride, pad) * conv_out_size (w, k, stride, pad);
  size_t depth = (size_t) conv_band (cin, k, spatial) * k * k;
  size_t columns = (size_t) conv_lanes (n) * depth * spatial;
  if (!gd_conv2d_winograd (n, cin, cout, h, w, k, stride, pad))
    return columns;
  /* the parameter gradients still take columns; the forward and the input gradient take
   * the same Winograd plan (it depends on cin + cout and cin cout only) */
  Winograd plan = winograd_plan (n, cin, cout, h, w);
  return MAX (columns, winograd_work_size (&plan));
}

/* Forward passes and input gradients that do not take the Winograd way go image by image,
 * each thread taking whole images: an image's columns are still in the cache when its
 * product reads them, and the product lands in NCHW without a copy.  One image alone is
 * one product that gd_sgemm cuts into blocks for the threads.  The work buffer holds one
 * image's columns per thread. */

/* One convolution's arguments, for its image-by-image and chunk-by-chunk loops. */
typedef struct {
  gboolean input_gradient;
  const float *from, *weight, *bias;
  int cin, h, w, cout, k, stride, pad;
  float *to;
  const GdBf16Matrix *bf16;
  /* parameter gradients: n images in chunks, each chunk's partial sums (dW: [chunks]
   * [cout, depth], or NULL; db: [chunks][cout], or NULL); dx or NULL */
  const float *x, *dy;
  float *dx, *partial_w;
  double *partial_b;
  int n;
  /* derived */
  int spatial, depth, kk, band;
  size_t image, result, plane;
  gboolean pointwise;
} ConvJob;

static ConvJob
conv_job (int cin, int h, int w, const float *weight, int cout, int k, int stride, int pad)
{
  ConvJob job = { .weight = weight, .cin = cin, .h = h, .w = w, .cout = cout, .k = k,
                  .stride = stride, .pad = pad };
  job.spatial = conv_out_size (h, k, stride, pad) * conv_out_size (w, k, stride, pad);
  job.kk = k * k;
  job.depth = cin * job.kk;
  job.image = (size_t) cin * h * w;
  job.result = (size_t) cout * job.spatial;
  job.plane = (size_t) h * w;
  job.pointwise = conv_is_pointwise (k, stride, pad);
  job.band = job.pointwise ? cin : conv_band (cin, k, job.spatial);
  return job;
}

/* The columns of thread `lane` in the work buffer (1x1 convolutions read their input as it
 * is: none). */
static float *
conv_columns (const ConvJob *j, float *work, int lane)
{
  return j->pointwise ? NULL : work + (size_t) lane * j->band * j->kk * j->spatial;
}

/* Runs body (job, item, columns) for items 0 .. count - 1, on `lanes` threads taking whole
 * items.  With one lane no parallel region is opened: the products inside then share out
 * their own work, and do not start new threads as a region nested in another would at
 * every call. */
static void
conv_items (const ConvJob *job, int count, int lanes, float *work,
            void (*body) (const ConvJob *, int, float *))
{
  if (lanes <= 1)
    {
      for (int i = 0; i < count; i++)
        body (job, i, conv_columns (job, work, 0));
      return;
    }
#pragma omp parallel num_threads (lanes)
  {
    float *col = conv_columns (job, work, omp_get_thread_num ());
#pragma omp for schedule (dynamic)
    for (int i = 0; i < count; i++)
      body (job, i, col);
  }
}

/* The input gradient of input channels [c0, c0 + cb) of one image: dcol = W^T dy (W^T
 * packed in bf16 when the job has it), then summed back onto the pixels it was read from.
 * dy: [cout, ho, wo]; dx: [cin, h, w]. */
static void
conv_band_input_gradient (const ConvJob *j, const float *dy, int c0, int cb, float *dx,
                          float *col)
{
  int kk = j->kk, spatial = j->spatial;
  float *dcol = j->pointwise ? dx + c0 * j->plane : col;
  if (j->bf16)
    gd_gemm_bf16_packed (j->bf16, c0 * kk, cb * kk, 0, j->cout, spatial, dy, spatial, 0.0f,
                         dcol, spatial);
  else
    gd_sgemm (CblasTrans, CblasNoTrans, cb * kk, spatial, j->cout, 1.0f,
              j->weight + (size_t) c0 * kk, j->depth, dy, spatial, 0.0f, dcol, spatial);
  if (!j->pointwise)
    col2im (col, spatial, cb, j->h, j->w, j->k, j->stride, j->pad, dx + c0 * j->plane);
}

/* forward: from = x [n, cin, h, w], to = y [n, cout, ho, wo];
 * input gradient: from = dy [n, cout, ho, wo], to = dx [n, cin, h, w] (bias unused). */
static void
conv_image (const ConvJob *j, int i, float *col)
{
  int cin = j->cin, cout = j->cout, h = j->h, w = j->w, k = j->k, stride = j->stride;
  int pad = j->pad, spatial = j->spatial, kk = j->kk, depth = j->depth, band = j->band;
  size_t image = j->image, result = j->result, plane = j->plane;
  gboolean pointwise = j->pointwise;
  const float *from = j->from, *weight = j->weight, *bias = j->bias;
  const GdBf16Matrix *bf16 = j->bf16;
  float *to = j->to;
  if (bf16 && conv_is_3x3_same (k, stride, pad))
    {
      /* the columns are packed from the image as the product reads them; the input
       * gradient is a convolution of dy with the flipped, transposed weights */
      if (j->input_gradient)
        gd_gemm_bf16_conv3x3 (bf16, 0, cin, from + i * result, cout, h, w, 0.0f,
                              to + i * image, spatial);
      else
        {
          conv_fill_bias (bias, cout, spatial, to + i * result);
          gd_gemm_bf16_conv3x3 (bf16, 0, cout, from + i * image, cin, h, w,
                                bias ? 1.0f : 0.0f, to + i * result, spatial);
        }
      return;
    }
  if (j->input_gradient)
    {
      /* a band of input channels at a time */
      for (int c0 = 0; c0 < cin; c0 += band)
        conv_band_input_gradient (j, from + i * result, c0, MIN (band, cin - c0),
                                  to + i * image, col);
      return;
    }
  const float *xi = from + i * image;
  float *yi = to + i * result;
  float beta = bias ? 1.0f : 0.0f;
  conv_fill_bias (bias, cout, spatial, yi);
  for (int c0 = 0; c0 < cin; c0 += band)
    {
      int cb = MIN (band, cin - c0);
      if (!pointwise)
        im2col (xi + c0 * plane, cb, h, w, k, stride, pad, col, spatial);
      if (bf16)
        gd_gemm_bf16_packed (bf16, 0, cout, c0 * kk, cb * kk, spatial, pointwise ? xi : col,
                             spatial, c0 == 0 ? beta : 1.0f, yi, spatial);
      else
        gd_sgemm (CblasNoTrans, CblasNoTrans, cout, spatial, cb * kk, 1.0f,
                  weight + (size_t) c0 * kk, depth, pointwise ? xi : col, spatial,
                  c0 == 0 ? beta : 1.0f, yi, spatial);
    }
}

static void
conv_per_image (gboolean input_gradient, const float *from, int n, int cin, int h, int w,
                const float *weight, const float *bias, int cout, int k, int stride, int pad,
                float *to, float *work, const GdBf16Matrix *bf16)
{
  ConvJob job = conv_job (cin, h, w, weight, cout, k, stride, pad);
  job.input_gradient = input_gradient;
  job.from = from;
  job.bias = bias;
  job.to = to;
  job.bf16 = bf16;
  conv_items (&job, n, conv_lanes (n), work, conv_image);
}

void
gd_conv2d_forward (const float *x, int n, int cin, int h, int w,
                   const float *weight, const float *bias, int cout,
                   int k, int stride, int pad, float *y, float *work)
{
  if (gd_conv2d_winograd (n, cin, cout, h, w, k, stride, pad))
    winograd_conv (FALSE, x, n, cin, h, w, weight, bias, cout, y, work);
  else
    conv_per_image (FALSE, x, n, cin, h, w, weight, bias, cout, k, stride, pad, y, work, NULL);
}

void
gd_conv2d_forward_bf16 (const float *x, int n, int cin, int h, int w,
                        const GdBf16Matrix *weight, const float *bias, int cout,
                        int k, int stride, int pad, float *y, float *work)
{
  conv_per_image (FALSE, x, n, cin, h, w, NULL, bias, cout, k, stride, pad, y, work, weight);
}

GdBf16Matrix *
gd_conv2d_bf16_weight (int input_gradient, const float *weight, int cout, int cin, int k,
                       int stride, int pad)
{
  int depth = cin * k * k;
  if (!input_gradient)
    return gd_bf16_matrix_new (FALSE, cout, depth, weight, depth);
  if (!conv_is_3x3_same (k, stride, pad))
    return gd_bf16_matrix_new (TRUE, depth, cout, weight, depth);
  /* flipped[ci, (co, ky, kx)] = weight[co, ci, 2 - ky, 2 - kx]: dx is the convolution of dy
   * with it, as 3x3 convolutions with padding 1 are their own adjoint up to the flip */
  float *flipped = g_new (float, (size_t) cin * cout * 9);
  for (int ci = 0; ci < cin; ci++)
    for (int co = 0; co < cout; co++)
      for (int tap = 0; tap < 9; tap++)
        flipped[((size_t) ci * cout + co) * 9 + tap] = weight[((size_t) co * cin + ci) * 9 + 8 - tap];
  GdBf16Matrix *packed = gd_bf16_matrix_new (FALSE, cin, cout * 9, flipped, cout * 9);
  g_free (flipped);
  return packed;
}

void
gd_conv2d_input_gradient_bf16 (const float *dy, int n, int cin, int h, int w,
                               const GdBf16Matrix *weight_t, int cout, int k, int stride, int pad,
                               float *dx, float *work)
{
  conv_per_image (TRUE, dy, n, cin, h, w, NULL, NULL, cout, k, stride, pad, dx, work, weight_t);
}

/* The parameter gradients (and dx) of chunk c of the images, into the chunk's partial sums */
static void
conv_gradient_chunk (const ConvJob *j, int c, float *col)
{
  int cin = j->cin, cout = j->cout, h = j->h, w = j->w, k = j->k, stride = j->stride;
  int pad = j->pad, spatial = j->spatial, kk = j->kk, depth = j->depth, band = j->band;
  size_t plane = j->plane, weights = (size_t) cout * depth;
  gboolean pointwise = j->pointwise;
  for (int i = c * GRADIENT_CHUNK; i < MIN (j->n, (c + 1) * GRADIENT_CHUNK); i++)
    {
      const float *xi = j->x + i * j->image, *dyi = j->dy + i * j->result;
      if (j->partial_b)
        for (int co = 0; co < cout; co++)
          {
            double sum = 0.0;
            const float *row = dyi + (size_t) co * spatial;
#pragma omp simd reduction(+ : sum)
            for (int q = 0; q < spatial; q++)
              sum += row[q];
            j->partial_b[(size_t) c * cout + co] += sum;
          }
      /* a band of input channels at a time: its columns, their part of dW, then dcol
       * = W^T dy in the columns that dW no longer needs, summed back onto the pixels */
      for (int c0 = 0; c0 < cin; c0 += band)
        {
          int cb = MIN (band, cin - c0);
          if (j->partial_w)
            {
              if (!pointwise)
                im2col (xi + c0 * plane, cb, h, w, k, stride, pad, col, spatial);
              gd_sgemm (CblasNoTrans, CblasTrans, cout, cb * kk, spatial, 1.0f, dyi, spatial,
                        pointwise ? xi : col, spatial, i == c * GRADIENT_CHUNK ? 0.0f : 1.0f,
                        j->partial_w + (size_t) c * weights + (size_t) c0 * kk, depth);
            }
          if (j->dx)
            conv_band_input_gradient (j, dyi, c0, cb, j->dx + i * j->image, col);
        }
    }
}

void
gd_conv2d_backward (const float *x, int n, int cin, int h, int w,
                    const float *weight, int cout, int k, int stride, int pad,
                    const float *dy, float *dx, float *dweight, float *dbias, float *work)
{
  if (dx && gd_conv2d_winograd (n, cin, cout, h, w, k, stride, pad))
    {
      /* the input gradient the same with and without parameter gradients */
      winograd_conv (TRUE, dy, n, cin, h, w, weight, NULL, cout, dx, work);
      dx = NULL;
    }
  if (!dx && !dweight && !dbias)
    return;
  if (dx && !dweight && !dbias)
    {
      conv_per_image (TRUE, dy, n, cin, h, w, weight, NULL, cout, k, stride, pad, dx, work, NULL);
      return;
    }
  /* Parameter gradients: images in fixed chunks, each chunk summed by one thread into its
   * own partial sums (image by image, the columns of one image in the cache), the partial
   * sums then added in chunk order: the same numbers for any thread count. */
  ConvJob job = conv_job (cin, h, w, weight, cout, k, stride, pad);
  int chunks = (n + GRADIENT_CHUNK - 1) / GRADIENT_CHUNK;
  size_t weights = (size_t) cout * job.depth;
  job.x = x;
  job.dy = dy;
  job.dx = dx;
  job.n = n;
  job.partial_w = dweight ? g_new (float, (size_t) chunks * weights) : NULL;
  job.partial_b = dbias ? g_new0 (double, (size_t) chunks * cout) : NULL;
  conv_items (&job, chunks, conv_lanes (chunks), work, conv_gradient_chunk);
  float *partial_w = job.partial_w;
  double *partial_b = job.partial_b;
  for (int c = 0; c < chunks; c++)
    {
      if (dweight)
        gd_accumulate (dweight, partial_w + (size_t) c * weights, weights);
      if (dbias)
        for (int co = 0; co < cout; co++)
          dbias[co] += (float) partial_b[(size_t) c * cout + co];
    }
  g_free (partial_w);
  g_free (partial_b);
}

/* ---- linear ---- */

void
gd_linear_forward (const float *x, int n, int in, const float *weight, const float *bias,
                   int out, float *y)
{
  float beta = 0.0f;
  if (bias)
    {
      for (int i = 0; i < n; i++)
        memcpy (y + (size_t) i * out, bias, sizeof (float) * out);
      beta = 1.0f;
    }
  gd_sgemm (CblasNoTrans, CblasTrans, n, out, in,
               1.0f, x, in, weight, in, beta, y, out);
}

void
gd_linear_backward (const float *x, int n, int in, const float *weight, int out,
                    const float *dy, float *dx, float *dweight, float *dbias)
{
  if (dx)
    gd_sgemm (CblasNoTrans, CblasNoTrans, n, in, out,
                 1.0f, dy, out, weight, in, 0.0f, dx, in);
  if (dweight)
    gd_sgemm (CblasTrans, CblasNoTrans, out, in, n,
                 1.0f, dy, out, x, in, 1.0f, dweight, in);
  if (dbias)
    for (int o = 0; o < out; o++)
      {
        double sum = 0.0;
        for (int i = 0; i < n; i++)
          sum += dy[(size_t) i * out + o];
        dbias[o] += (float) sum;
      }
}

/* ---- group normalisation ---- */

/* One group of one image: its mean and 1/std, and the normalised, scaled and shifted
 * values v of its cg channels, then optionally v (1 + ss_scale) + ss_shift, written to y
 * (if not NULL) and as SiLU(v) to act (if not NULL). */
GD_VECTOR_CLONES static void
group_norm_group (const float *xg, int cg, int hw, const float *gamma, const float *beta,
                  const float *ss_scale, const float *ss_shift, float *yg, float *actg,
                  float *mean, float *rstd)
{
  size_t count = (size_t) cg * hw;
  double sum = 0.0;
#pragma omp simd reduction(+ : sum)
  for (size_t j = 0; j < count; j++)
    sum += xg[j];
  double mu = sum / (double) count;
  double var = 0.0;
#pragma omp simd reduction(+ : var)
  for (size_t j = 0; j < count; j++)
    {
      double d = xg[j] - mu;
      var += d * d;
    }
  var /= (double) count;
  double r = 1.0 / sqrt (var + GD_GROUP_NORM_EPS);
  *mean = (float) mu;
  *rstd = (float) r;
  for (int cc = 0; cc < cg; cc++)
    {
      float scale = (float) r * gamma[cc];
      float offset = beta[cc] - (float) mu * scale;
      float modulate = ss_scale ? 1.0f + ss_scale[cc] : 1.0f, shift = ss_shift ? ss_shift[cc] : 0.0f;
      const float *xc = xg + (size_t) cc * hw;
      float *yc = yg ? yg + (size_t) cc * hw : NULL, *ac = actg ? actg + (size_t) cc * hw : NULL;
      if (!ss_scale && yc && !ac)
        {
#pragma omp simd
          for (int s = 0; s < hw; s++)
            yc[s] = xc[s] * scale + offset;
          continue;
        }
      for (int s0 = 0; s0 < hw; s0 += 256)
        {
          /* a stretch at a time, so that each loop below stays simple to vectorise */
          float v[256];
          int len = MIN (256, hw - s0);
#pragma omp simd
          for (int s = 0; s < len; s++)
            v[s] = xc[s0 + s] * scale + offset;
          if (ss_scale)
#pragma omp simd
            for (int s = 0; s < len; s++)
              v[s] = v[s] * modulate + shift;
          if (yc)
            memcpy (yc + s0, v, sizeof (float) * len);
          if (ac)
#pragma omp simd
            for (int s = 0; s < len; s++)
              ac[s0 + s] = v[s] / (1.0f + exp_vectorisable (-v[s]));
        }
    }
}

void
gd_group_norm_forward (const float *x, int n, int c, int hw, int groups,
                       const float *gamma, const float *beta,
                       float *y, float *mean, float *rstd)
{
  gd_group_norm_act_forward (x, n, c, hw, groups, gamma, beta, NULL, y, NULL, mean, rstd);
}

void
gd_group_norm_act_forward (const float *x, int n, int c, int hw, int groups,
                           const float *gamma, const float *beta, const float *ss,
                           float *y, float *act, float *mean, float *rstd)
{
  int cg = c / groups;
#pragma omp parallel for collapse(2)
  for (int i = 0; i < n; i++)
    for (int g = 0; g < groups; g++)
      {
        size_t offset = ((size_t) i * c + (size_t) g * cg) * hw;
        const float *ss_scale = ss ? ss + (size_t) i * 2 * c + (size_t) g * cg : NULL;
        const float *ss_shift = ss ? ss + (size_t) i * 2 * c + c + (size_t) g * cg : NULL;
        group_norm_group (x + offset, cg, hw, gamma + g * cg, beta + g * cg, ss_scale, ss_shift,
                          y ? y + offset : NULL, act ? act + offset : NULL,
                          mean + i * groups + g, rstd + i * groups + g);
      }
}

/* One group of one image: dgamma and dbeta of its channels (added to), and dx. */
GD_VECTOR_CLONES static void
group_norm_group_backward (const float *xg, int cg, int hw, const float *gamma, double mu,
                           double r, const float *dyg, float *dxg, float *dgamma,
                           float *dbeta)
{
  size_t count = (size_t) cg * hw;
  /* With xhat = (x - mu) r and g = dy * gamma:
   * dx = r (g - mean(g) - xhat mean(g xhat)). */
  double sum_g = 0.0, sum_g_xhat = 0.0;
  for (int cc = 0; cc < cg; cc++)
    {
      const float *xc = xg + (size_t) cc * hw, *dyc = dyg + (size_t) cc * hw;
      double dgamma_c = 0.0, dbeta_c = 0.0;
#pragma omp simd reduction(+ : dgamma_c, dbeta_c)
      for (int s = 0; s < hw; s++)
        {
          double xhat = (xc[s] - mu) * r;
          dgamma_c += dyc[s] * xhat;
          dbeta_c += dyc[s];
        }
      sum_g += dbeta_c * gamma[cc];
      sum_g_xhat += dgamma_c * gamma[cc];
      if (dgamma)
        dgamma[cc] += (float) dgamma_c;
      if (dbeta)
        dbeta[cc] += (float) dbeta_c;
    }
  if (!dxg)
    return;
  double mean_g = sum_g / (double) count, mean_g_xhat = sum_g_xhat / (double) count;
  for (int cc = 0; cc < cg; cc++)
    {
      const float *xc = xg + (size_t) cc * hw, *dyc = dyg + (size_t) cc * hw;
      float *dxc = dxg + (size_t) cc * hw;
      double gamma_c = gamma[cc];
#pragma omp simd
      for (int s = 0; s < hw; s++)
        {
          double xhat = (xc[s] - mu) * r;
          dxc[s] = (float) (r * (dyc[s] * gamma_c - mean_g - xhat * mean_g_xhat));
        }
    }
}

void
gd_group_norm_backward (const float *x, int n, int c, int hw, int groups,
                        const float *gamma, const float *mean, const float *rstd,
                        const float *dy, float *dx, float *dgamma, float *dbeta)
{
  int cg = c / groups;
  /* groups own disjoint channels, so their dgamma and dbeta sums never collide; the
   * images of a group are summed in order */
#pragma omp parallel for
  for (int g = 0; g < groups; g++)
    for (int i = 0; i < n; i++)
      {
        size_t base = ((size_t) i * c + (size_t) g * cg) * hw;
        group_norm_group_backward (x + base, cg, hw, gamma + g * cg, mean[i * groups + g],
                                   rstd[i * groups + g], dy + base, dx ? dx + base : NULL,
                                   dgamma ? dgamma + g * cg : NULL,
                                   dbeta ? dbeta + g * cg : NULL);
      }
}

/* ---- timestep-embedding modulation ---- */

void
gd_scale_shift_forward (const float *x, int n, int c, int hw, const float *ss, float *y)
{
#pragma omp parallel for collapse(2)
  for (int i = 0; i < n; i++)
    for (int ch = 0; ch < c; ch++)
      {
        float scale = 1.0f + ss[(size_t) i * 2 * c + ch], shift = ss[(size_t) i * 2 * c + c + ch];
        const float *xc = x + ((size_t) i * c + ch) * hw;
        float *yc = y + ((size_t) i * c + ch) * hw;
        for (int s = 0; s < hw; s++)
          yc[s] = xc[s] * scale + shift;
      }
}

void
gd_scale_shift_backward (const float *x, int n, int c, int hw, const float *ss,
                         const float *dy, float *dx, float *dss)
{
#pragma omp parallel for collapse(2)
  for (int i = 0; i < n; i++)
    for (int ch = 0; ch < c; ch++)
      {
        float scale = 1.0f + ss[(size_t) i * 2 * c + ch];
        const float *xc = x + ((size_t) i * c + ch) * hw;
        const float *dyc = dy + ((size_t) i * c + ch) * hw;
        double dscale = 0.0, dshift = 0.0;
        for (int s = 0; s < hw; s++)
          {
            dscale += (double) dyc[s] * xc[s];
            dshift += dyc[s];
          }
        if (dx)
          {
            float *dxc = dx + ((size_t) i * c + ch) * hw;
            for (int s = 0; s < hw; s++)
              dxc[s] = dyc[s] * scale;
          }
        if (dss)
          {
            dss[(size_t) i * 2 * c + ch] += (float) dscale;
            dss[(size_t) i * 2 * c + c + ch] += (float) dshift;
          }
      }
}

void
gd_add_channel_bias_forward (const float *x, int n, int c, int hw, const float *b, float *y)
{
#pragma omp parallel for
  for (size_t ic = 0; ic < (size_t) n * c; ic++)
    for (int s = 0; s < hw; s++)
      y[ic * hw + s] = x[ic * hw + s] + b[ic];
}

void
gd_add_channel_bias_backward (int n, int c, int hw, const float *dy, float *dx, float *db)
{
#pragma omp parallel for
  for (size_t ic = 0; ic < (size_t) n * c; ic++)
    {
      double sum = 0.0;
      for (int s = 0; s < hw; s++)
        sum += dy[ic * hw + s];
      if (db)
        db[ic] += (float) sum;
    }
  if (dx && dx != dy)
    memcpy (dx, dy, sizeof (float) * (size_t) n * c * hw);
}

/* ---- SiLU ---- */

#define SPAN 8192


float
gd_exp (float x)
{
  return exp_vectorisable (x);
}

GD_VECTOR_CLONES static void
silu_span (const float *x, size_t count, float *y)
{
#pragma omp simd
  for (size_t i = 0; i < count; i++)
    y[i] = x[i] / (1.0f + exp_vectorisable (-x[i]));
}

GD_VECTOR_CLONES static void
silu_backward_span (const float *x, size_t count, const float *dy, float *dx)
{
#pragma omp simd
  for (size_t i = 0; i < count; i++)
    {
      float s = 1.0f / (1.0f + exp_vectorisable (-x[i]));
      dx[i] = dy[i] * s * (1.0f + x[i] * (1.0f - s));
    }
}

void
gd_silu_forward (const float *x, size_t count, float *y)
{
  size_t spans = (count + SPAN - 1) / SPAN;
#pragma omp parallel for if (spans > 2)
  for (size_t i = 0; i < spans; i++)
    silu_span (x + i * SPAN, MIN (SPAN, count - i * SPAN), y + i * SPAN);
}

void
gd_silu_backward (const float *x, size_t count, const float *dy, float *dx)
{
  size_t spans = (count + SPAN - 1) / SPAN;
#pragma omp parallel for if (spans > 2)
  for (size_t i = 0; i < spans; i++)
    silu_backward_span (x + i * SPAN, MIN (SPAN, count - i * SPAN), dy + i * SPAN, dx + i * SPAN);
}

/* ---- resampling ---- */

void
gd_avg_pool2_forward (const float *x, int n, int c, int h, int w, float *y)
{
  int ho = h / 2, wo = w / 2;
#pragma omp parallel for
  for (size_t ic = 0; ic < (size_t) n * c; ic++)
    {
      const float *xc = x + ic * h * w;
      float *yc = y + ic * ho * wo;
      for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < wo; ox++)
          {
            const float *p = xc + (size_t) 2 * oy * w + 2 * ox;
            yc[oy * wo + ox] = (p[0] + p[1] + p[w] + p[w + 1]) * 0.25f;
          }
    }
}

void
gd_avg_pool2_backward (int n, int c, int h, int w, const float *dy, float *dx)
{
  int ho = h / 2, wo = w / 2;
  memset (dx, 0, sizeof (float) * (size_t) n * c * h * w);
#pragma omp parallel for
  for (size_t ic = 0; ic < (size_t) n * c; ic++)
    {
      const float *dyc = dy + ic * ho * wo;
      float *dxc = dx + ic * h * w;
      for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < wo; ox++)
          {
            float g = dyc[oy * wo + ox] * 0.25f;
            float *p = dxc + (size_t) 2 * oy * w + 2 * ox;
            p[0] = g;
            p[1] = g;
            p[w] = g;
            p[w + 1] = g;
          }
    }
}

void
gd_upsample2_forward (const float *x, int n, int c, int h, int w, float *y)
{
  int wo = 2 * w;
#pragma omp parallel for
  for (size_t ic = 0; ic < (size_t) n * c; ic++)
    {
      const float *xc = x + ic * h * w;
      float *yc = y + ic * 4 * h * w;
      for (int iy = 0; iy < h; iy++)
        {
          float *row = yc + (size_t) 2 * iy * wo;
          for (int ix = 0; ix < w; ix++)
            row[2 * ix] = row[2 * ix + 1] = xc[iy * w + ix];
          memcpy (row + wo, row, sizeof (float) * wo);
        }
    }
}

void
gd_upsample2_backward (int n, int c, int h, int w, const float *dy, float *dx)
{
  int wo = 2 * w;
#pragma omp parallel for
  for (size_t ic = 0; ic < (size_t) n * c; ic++)
    {
      const float *dyc = dy + ic * 4 * h * w;
      float *dxc = dx + ic * h * w;
      for (int iy = 0; iy < h; iy++)
        for (int ix = 0; ix < w; ix++)
          {
            const float *p = dyc + (size_t) 2 * iy * wo + 2 * ix;
            dxc[iy * w + ix] = p[0] + p[1] + p[wo] + p[wo + 1];
          }
    }
}

/* ---- attention ---- */

/* Where head `head` of batch item `b` keeps its q, k and v rows (each ch x L). */
static void
qkv_rows (int heads, int ch, int L, int legacy, int head,
          size_t *q_offset, size_t *k_offset, size_t *v_offset)
{
  size_t width = (size_t) heads * ch;
  if (legacy)
    {
      size_t start = (size_t) head * 3 * ch;
      *q_offset = start * L;
      *k_offset = (start + ch) * L;
      *v_offset = (start + 2 * (size_t) ch) * L;
    }
  else
    {
      *q_offset = (size_t) head * ch * L;
      *k_offset = (width + (size_t) head * ch) * L;
      *v_offset = (2 * width + (size_t) head * ch) * L;
    }
}

GD_VECTOR_CLONES static void
softmax_rows (float *p, int rows, int cols)
{
  for (int r = 0; r < rows; r++)
    {
      float *row = p + (size_t) r * cols;
      float max = row[0];
#pragma omp simd reduction(max : max)
      for (int j = 1; j < cols; j++)
        max = MAX (max, row[j]);
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int j = 0; j < cols; j++)
        {
          row[j] = exp_vectorisable (row[j] - max);
          sum += row[j];
        }
      float inv = 1.0f / sum;
#pragma omp simd
      for (int j = 0; j < cols; j++)
        row[j] *= inv;
    }
}

void
gd_attention_forward (const float *qkv, int n, int heads, int ch, int L, int legacy,
                      float *out, float *probs)
{
  size_t width = (size_t) heads * ch;
  float scale2 = (float) (1.0 / sqrt ((double) ch));
#pragma omp parallel for collapse(2)
  for (int b = 0; b < n; b++)
    for (int hd = 0; hd < heads; hd++)
      {
        const float *base = qkv + (size_t) b * 3 * width * L;
        size_t qo, ko, vo;
        qkv_rows (heads, ch, L, legacy, hd, &qo, &ko, &vo);
        float *p = probs ? probs + ((size_t) b * heads + hd) * L * L : g_new (float, (size_t) L * L);
        /* S[t, s] = sum_c q[c, t] k[c, s] / sqrt(ch) */
        gd_sgemm (CblasTrans, CblasNoTrans, L, L, ch,
                     scale2, base + qo, L, base + ko, L, 0.0f, p, L);
        softmax_rows (p, L, L);
        /* a[c, t] = sum_s v[c, s] P[t, s] */
        float *a = out + ((size_t) b * width + (size_t) hd * ch) * L;
        gd_sgemm (CblasNoTrans, CblasTrans, ch, L, L,
                     1.0f, base + vo, L, p, L, 0.0f, a, L);
        if (!probs)
          g_free (p);
      }
}

void
gd_attention_backward (const float *qkv, int n, int heads, int ch, int L, int legacy,
                       const float *probs, const float *dout, float *dqkv)
{
  size_t width = (size_t) heads * ch;
  float scale2 = (float) (1.0 / sqrt ((double) ch));
#pragma omp parallel for collapse(2)
  for (int b = 0; b < n; b++)
    for (int hd = 0; hd < heads; hd++)
      {
        float *dscore = g_new (float, (size_t) L * L);
        const float *base = qkv + (size_t) b * 3 * width * L;
        float *dbase = dqkv + (size_t) b * 3 * width * L;
        size_t qo, ko, vo;
        qkv_rows (heads, ch, L, legacy, hd, &qo, &ko, &vo);
        const float *p = probs + ((size_t) b * heads + hd) * L * L;
        const float *da = dout + ((size_t) b * width + (size_t) hd * ch) * L;
        /* dV = dA P */
        gd_sgemm (CblasNoTrans, CblasNoTrans, ch, L, L,
                     1.0f, da, L, p, L, 0.0f, dbase + vo, L);
        /* dP = dA^T V, then the softmax backward dS = P (dP - rowsum(P dP)) */
        gd_sgemm (CblasTrans, CblasNoTrans, L, L, ch,
                     1.0f, da, L, base + vo, L, 0.0f, dscore, L);
        for (int t = 0; t < L; t++)
          {
            const float *pr = p + (size_t) t * L;
            float *dr = dscore + (size_t) t * L;
            double dot = 0.0;
            for (int s = 0; s < L; s++)
              dot += (double) pr[s] * dr[s];
            for (int s = 0; s < L; s++)
              dr[s] = pr[s] * (dr[s] - (float) dot);
          }
        /* dQ = K dS^T / sqrt(ch), dK = Q dS / sqrt(ch) */
        gd_sgemm (CblasNoTrans, CblasTrans, ch, L, L,
                     scale2, base + ko, L, dscore, L, 0.0f, dbase + qo, L);
        gd_sgemm (CblasNoTrans, CblasNoTrans, ch, L, L,
                     scale2, base + qo, L, dscore, L, 0.0f, dbase + ko, L);
        g_free (dscore);
      }
}

/* ---- embeddings and heads ---- */

void
gd_timestep_embedding (const int64_t *t, int n, int dim, float *out)
{
  int half = dim / 2;
  const float neg_log_period = (float) -log (10000.0);
  for (int i = 0; i < n; i++)
    {
      float *row = out + (size_t) i * dim;
      for (int j = 0; j < half; j++)
        {
          float freq = expf (neg_log_period * (float) j / (float) half);
          float arg = (float) t[i] * freq;
          row[j] = cosf (arg);
          row[half + j] = sinf (arg);
        }
      if (dim % 2)
        row[dim - 1] = 0.0f;
    }
}

void
gd_log_softmax (const float *x, int n, int k, float *y)
{
  for (int i = 0; i < n; i++)
    {
      const float *xr = x + (size_t) i * k;
      float *yr = y + (size_t) i * k;
      double max = xr[0];
      for (int j = 1; j < k; j++)
        max = MAX (max, xr[j]);
      double sum = 0.0;
      for (int j = 0; j < k; j++)
        sum += exp (xr[j] - max);
      double lse = max + log (sum);
      for (int j = 0; j < k; j++)
        yr[j] = (float) (xr[j] - lse);
    }
}

void
gd_add (const float *a, const float *b, size_t count, float *y)
{
  for (size_t i = 0; i < count; i++)
    y[i] = a[i] + b[i];
}

void
gd_accumulate (float *y, const float *x, size_t count)
{
#pragma omp simd
  for (size_t i = 0; i < count; i++)
    y[i] += x[i];
}
