/* Finite-difference checks of every kernel's backward (input and parameter gradients),
 * and of the whole classifier gradient on small random classifiers. */
#include "gd-kernels.h"
#include "gd-model.h"
#include "gd-random.h"
#include "gd-stats.h"

#include <glib.h>
#include <math.h>
#include <omp.h>
#include <string.h>
#include "gd-bf16.h"
#include "gd-blas.h"
#include "gd-gemm.h"

static gboolean openblas_core_was_ours;

static guint64 next_stream = 1;

static float *
random_buffer (size_t count, float scale)
{
  float *p = g_new (float, count);
  gd_random_normal (1234, next_stream++, p, count);
  for (size_t i = 0; i < count; i++)
    p[i] *= scale;
  return p;
}

/* The scalar loss of every check: sum_i r_i y_i, whose gradient with respect to y is r. */
static double
weighted_sum (const float *y, const float *r, size_t count)
{
  double sum = 0.0;
  for (size_t i = 0; i < count; i++)
    sum += (double) y[i] * r[i];
  return sum;
}

typedef double (*LossFn) (void *ctx);

/* Compares an analytic gradient with central differences at up to 48 coordinates,
 * spread evenly over the buffer.  A wrong backward is off by O(1) of the gradient's
 * size; float32 rounding with step 1e-2 stays far below the 2% bound. */
static void
fd_check (const char *what, LossFn loss, void *ctx, float *values, size_t count,
          const float *analytic)
{
  const float step = 1e-2f;
  double max_analytic = 0.0;
  for (size_t i = 0; i < count; i++)
    max_analytic = MAX (max_analytic, fabs (analytic[i]));
  g_assert_cmpfloat (max_analytic, >, 0.0);
  size_t stride = MAX (1, count / 48);
  double worst = 0.0;
  for (size_t i = 0; i < count; i += stride)
    {
      float saved = values[i];
      values[i] = saved + step;
      double plus = loss (ctx);
      values[i] = saved - step;
      double minus = loss (ctx);
      values[i] = saved;
      double numeric = (plus - minus) / (2.0 * step);
      worst = MAX (worst, fabs (numeric - analytic[i]));
    }
  if (worst > 2e-2 * max_analytic)
    g_error ("%s: finite differences differ by %g (gradient scale %g)", what, worst, max_analytic);
  g_test_message ("%s: max |fd - analytic| = %.3g, gradient scale %.3g", what, worst, max_analytic);
}

/* ---- convolution ---- */

typedef struct {
  int n, cin, h, w, cout, k, stride, pad, ho, wo;
  float *x, *weight, *bias, *r, *y, *work;
} ConvCase;

static double
conv_loss (void *p)
{
  ConvCase *c = p;
  gd_conv2d_forward (c->x, c->n, c->cin, c->h, c->w, c->weight, c->bias, c->cout, c->k,
                     c->stride, c->pad, c->y, c->work);
  return weighted_sum (c->y, c->r, (size_t) c->n * c->cout * c->ho * c->wo);
}

static void
check_conv (int k, int stride, int pad, int cin, int cout, int h, int w)
{
  ConvCase c = { .n = 2, .cin = cin, .h = h, .w = w, .cout = cout, .k = k, .stride = stride,
                 .pad = pad };
  c.ho = (c.h + 2 * pad - k) / stride + 1;
  c.wo = (c.w + 2 * pad - k) / stride + 1;
  size_t xs = (size_t) c.n * c.cin * c.h * c.w, ws = (size_t) c.cout * c.cin * k * k;
  size_t ys = (size_t) c.n * c.cout * c.ho * c.wo;
  c.x = random_buffer (xs, 1);
  c.weight = random_buffer (ws, 0.5f);
  c.bias = random_buffer (c.cout, 0.5f);
  c.r = random_buffer (ys, 1);
  c.y = g_new (float, ys);
  c.work = g_new (float, gd_conv2d_work_size (c.cin, c.cout, c.n, c.h, c.w, k, stride, pad));
  float *dx = g_new (float, xs), *dw = g_new0 (float, ws), *db = g_new0 (float, c.cout);
  gd_conv2d_backward (c.x, c.n, c.cin, c.h, c.w, c.weight, c.cout, k, stride, pad, c.r,
                      dx, dw, db, c.work);
  fd_check ("conv dx", conv_loss, &c, c.x, xs, dx);
  fd_check ("conv dweight", conv_loss, &c, c.weight, ws, dw);
  fd_check ("conv dbias", conv_loss, &c, c.bias, c.cout, db);
  g_free (c.x); g_free (c.weight); g_free (c.bias); g_free (c.r); g_free (c.y); g_free (c.work);
  g_free (dx); g_free (dw); g_free (db);
}

static void test_conv3x3 (void) { check_conv (3, 1, 1, 3, 4, 6, 5); }
static void test_conv3x3_stride2 (void) { check_conv (3, 2, 1, 3, 4, 6, 5); }
static void test_conv1x1 (void) { check_conv (1, 1, 0, 3, 4, 6, 5); }

/* with dx the Winograd way and the parameter gradients by im2col */
static void
test_conv3x3_winograd_gradients (void)
{
  g_assert_true (gd_conv2d_winograd (2, 8, 8, 16, 15, 3, 1, 1));
  check_conv (3, 1, 1, 8, 8, 16, 15);
}

/* The textbook sums of a convolution in double: y (with bias) and the input gradient of dy,
 * each with the sum of its terms' magnitudes (the scale of any rounding error). */
typedef struct {
  double *y, *y_scale, *dx, *dx_scale;
} Textbook;

static Textbook
textbook_conv (const float *x, int n, int cin, int h, int w, const float *weight,
               const float *bias, int cout, int k, int stride, int pad, const float *dy)
{
  int ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
  size_t xs = (size_t) n * cin * h * w, ys = (size_t) n * cout * ho * wo;
  Textbook t = { g_new0 (double, ys), g_new0 (double, ys), g_new0 (double, xs),
                 g_new0 (double, xs) };
  for (int i = 0; i < n; i++)
    for (int co = 0; co < cout; co++)
      for (int oy = 0; oy < ho; oy++)
        for (int ox = 0; ox < wo; ox++)
          {
            size_t out = (((size_t) i * cout + co) * ho + oy) * wo + ox;
            double sum = bias ? bias[co] : 0.0, scale = fabs (sum), g = dy[out];
            for (int ci = 0; ci < cin; ci++)
              for (int ky = 0; ky < k; ky++)
                for (int kx = 0; kx < k; kx++)
                  {
                    int iy = oy * stride + ky - pad, ix = ox * stride + kx - pad;
                    if (iy < 0 || iy >= h || ix < 0 || ix >= w)
                      continue;
                    double wv = weight[(((size_t) co * cin + ci) * k + ky) * k + kx];
                    size_t at = (((size_t) i * cin + ci) * h + iy) * w + ix;
                    sum += wv * x[at];
                    scale += fabs (wv * x[at]);
                    t.dx[at] += wv * g;
                    t.dx_scale[at] += fabs (wv * g);
                  }
            t.y[out] = sum;
            t.y_scale[out] = scale;
          }
  return t;
}

static void
textbook_free (Textbook *t)
{
  g_free (t->y);
  g_free (t->y_scale);
  g_free (t->dx);
  g_free (t->dx_scale);
}

/* Convolutions against the textbook sums, on shapes down to one pixel (the 3x3 fast path
 * shifts whole channels, so image edges and 1-wide images are where it could go wrong):
 * the forward pass, and the input gradient alone as the sampler's guidance computes it. */
static void
test_conv_direct (void)
{
  const int shapes[][2] = { { 1, 1 }, { 1, 4 }, { 4, 1 }, { 2, 3 }, { 7, 7 }, { 5, 9 } };
  const int kinds[][3] = { { 3, 1, 1 }, { 3, 2, 1 }, { 1, 1, 0 } };
  for (guint s = 0; s < G_N_ELEMENTS (shapes); s++)
    for (guint q = 0; q < G_N_ELEMENTS (kinds); q++)
      {
        int n = 2, cin = 3, cout = 4, h = shapes[s][0], w = shapes[s][1];
        int k = kinds[q][0], stride = kinds[q][1], pad = kinds[q][2];
        int ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
        size_t xs = (size_t) n * cin * h * w, ys = (size_t) n * cout * ho * wo;
        g_assert_false (gd_conv2d_winograd (n, cin, cout, h, w, k, stride, pad));
        float *x = random_buffer (xs, 1), *weight = random_buffer ((size_t) cout * cin * k * k, 0.5f);
        float *bias = random_buffer (cout, 0.5f), *dy = random_buffer (ys, 1);
        float *y = g_new (float, ys), *dx = g_new (float, xs);
        float *work = g_new (float, gd_conv2d_work_size (cin, cout, n, h, w, k, stride, pad));
        gd_conv2d_forward (x, n, cin, h, w, weight, bias, cout, k, stride, pad, y, work);
        gd_conv2d_backward (x, n, cin, h, w, weight, cout, k, stride, pad, dy, dx, NULL, NULL, work);
        Textbook want = textbook_conv (x, n, cin, h, w, weight, bias, cout, k, stride, pad, dy);
        for (size_t j = 0; j < ys; j++)
          g_assert_cmpfloat (fabs (y[j] - want.y[j]), <, 1e-5);
        for (size_t j = 0; j < xs; j++)
          g_assert_cmpfloat (fabs (dx[j] - want.dx[j]), <, 1e-5);
        g_free (x); g_free (weight); g_free (bias); g_free (dy); g_free (y); g_free (dx);
        g_free (work); textbook_free (&want);
      }
}

/* Winograd convolutions against the textbook sums: the smallest batch and channel counts
 * that take it (two 16x16 images, 8 -> 8 channels), odd sizes (tiles reaching past the
 * image), one-row and one-column images, no bias, and 900 channels over two 33x29 images,
 * whose tiles go through in chunks of 19 tile rows (the first chunk holds the first image's
 * 17 and two of the second's).  Each value within 1e-6 of the sum of its terms'
 * magnitudes: float rounding; a wrong transform misses by far more. */
static void
test_conv_winograd (void)
{
  const struct { int n, cin, cout, h, w; gboolean bias; } cases[] = {
    { 2, 8, 8, 16, 16, TRUE }, { 2, 6, 12, 15, 17, TRUE }, { 1, 8, 8, 1, 256, TRUE },
    { 1, 8, 8, 255, 1, FALSE }, { 3, 12, 6, 13, 13, FALSE }, { 2, 900, 8, 33, 29, TRUE },
  };
  g_assert_false (gd_conv2d_winograd (1, 8, 8, 16, 16, 3, 1, 1));     /* 64 tiles */
  g_assert_false (gd_conv2d_winograd (2, 7, 8, 16, 16, 3, 1, 1));     /* too few channels */
  g_assert_false (gd_conv2d_winograd (1, 3, 192, 64, 64, 3, 1, 1));
  g_assert_false (gd_conv2d_winograd (2, 8, 8, 32, 32, 3, 2, 1));
  g_assert_false (gd_conv2d_winograd (2, 8, 8, 32, 32, 1, 1, 0));
  for (guint c = 0; c < G_N_ELEMENTS (cases); c++)
    {
      int n = cases[c].n, cin = cases[c].cin, cout = cases[c].cout, h = cases[c].h, w = cases[c].w;
      g_assert_true (gd_conv2d_winograd (n, cin, cout, h, w, 3, 1, 1));
      size_t xs = (size_t) n * cin * h * w, ys = (size_t) n * cout * h * w;
      float *x = random_buffer (xs, 1), *weight = random_buffer ((size_t) cout * cin * 9, 0.5f);
      float *bias = cases[c].bias ? random_buffer (cout, 0.5f) : NULL, *dy = random_buffer (ys, 1);
      float *y = g_new (float, ys), *dx = g_new (float, xs);
      float *work = g_new (float, gd_conv2d_work_size (cin, cout, n, h, w, 3, 1, 1));
      gd_conv2d_forward (x, n, cin, h, w, weight, bias, cout, 3, 1, 1, y, work);
      gd_conv2d_backward (x, n, cin, h, w, weight, cout, 3, 1, 1, dy, dx, NULL, NULL, work);
      Textbook want = textbook_conv (x, n, cin, h, w, weight, bias, cout, 3, 1, 1, dy);
      double worst[2] = { 0.0, 0.0 };
      for (size_t j = 0; j < ys; j++)
        worst[0] = MAX (worst[0], fabs (y[j] - want.y[j]) / want.y_scale[j]);
      for (size_t j = 0; j < xs; j++)
        worst[1] = MAX (worst[1], fabs (dx[j] - want.dx[j]) / want.dx_scale[j]);
      g_test_message ("Winograd, %d image(s), %d -> %d channels at %dx%d%s: largest difference "
                      "%.2e (forward), %.2e (input gradient) of the terms' magnitudes",
                      n, cin, cout, h, w, bias ? "" : " (no bias)", worst[0], worst[1]);
      g_assert_cmpfloat (worst[0], <=, 1e-6);
      g_assert_cmpfloat (worst[1], <=, 1e-6);
      g_free (x); g_free (weight); g_free (bias); g_free (dy); g_free (y); g_free (dx);
      g_free (work); textbook_free (&want);
    }
}

/* ---- linear ---- */

typedef struct { int n, in, out; float *x, *weight, *bias, *r, *y; } LinearCase;

static double
linear_loss (void *p)
{
  LinearCase *c = p;
  gd_linear_forward (c->x, c->n, c->in, c->weight, c->bias, c->out, c->y);
  return weighted_sum (c->y, c->r, (size_t) c->n * c->out);
}

static void
test_linear (void)
{
  LinearCase c = { .n = 3, .in = 7, .out = 5 };
  c.x = random_buffer (21, 1);
  c.weight = random_buffer (35, 0.5f);
  c.bias = random_buffer (5, 0.5f);
  c.r = random_buffer (15, 1);
  c.y = g_new (float, 15);
  float *dx = g_new (float, 21), *dw = g_new0 (float, 35), *db = g_new0 (float, 5);
  gd_linear_backward (c.x, c.n, c.in, c.weight, c.out, c.r, dx, dw, db);
  fd_check ("linear dx", linear_loss, &c, c.x, 21, dx);
  fd_check ("linear dweight", linear_loss, &c, c.weight, 35, dw);
  fd_check ("linear dbias", linear_loss, &c, c.bias, 5, db);
  g_free (c.x); g_free (c.weight); g_free (c.bias); g_free (c.r); g_free (c.y);
  g_free (dx); g_free (dw); g_free (db);
}

/* ---- group norm ---- */

typedef struct { int n, c, hw, groups; float *x, *gamma, *beta, *r, *y, *mean, *rstd; } NormCase;

static double
norm_loss (void *p)
{
  NormCase *c = p;
  gd_group_norm_forward (c->x, c->n, c->c, c->hw, c->groups, c->gamma, c->beta, c->y, c->mean, c->rstd);
  return weighted_sum (c->y, c->r, (size_t) c->n * c->c * c->hw);
}

static void
test_group_norm (void)
{
  NormCase c = { .n = 2, .c = 64, .hw = 6, .groups = 32 };
  size_t size = (size_t) c.n * c.c * c.hw;
  c.x = random_buffer (size, 2);
  c.gamma = random_buffer (c.c, 1);
  c.beta = random_buffer (c.c, 1);
  c.r = random_buffer (size, 1);
  c.y = g_new (float, size);
  c.mean = g_new (float, c.n * c.groups);
  c.rstd = g_new (float, c.n * c.groups);
  norm_loss (&c);
  float *dx = g_new (float, size), *dg = g_new0 (float, c.c), *db = g_new0 (float, c.c);
  gd_group_norm_backward (c.x, c.n, c.c, c.hw, c.groups, c.gamma, c.mean, c.rstd, c.r, dx, dg, db);
  fd_check ("group norm dx", norm_loss, &c, c.x, size, dx);
  fd_check ("group norm dgamma", norm_loss, &c, c.gamma, c.c, dg);
  fd_check ("group norm dbeta", norm_loss, &c, c.beta, c.c, db);
  g_free (c.x); g_free (c.gamma); g_free (c.beta); g_free (c.r); g_free (c.y);
  g_free (c.mean); g_free (c.rstd); g_free (dx); g_free (dg); g_free (db);
}

/* ---- scale-shift, channel bias, SiLU, resampling ---- */

typedef struct { int n, c, hw; float *x, *ss, *r, *y; } ModCase;

static double
scale_shift_loss (void *p)
{
  ModCase *c = p;
  gd_scale_shift_forward (c->x, c->n, c->c, c->hw, c->ss, c->y);
  return weighted_sum (c->y, c->r, (size_t) c->n * c->c * c->hw);
}

static double
channel_bias_loss (void *p)
{
  ModCase *c = p;
  gd_add_channel_bias_forward (c->x, c->n, c->c, c->hw, c->ss, c->y);
  return weighted_sum (c->y, c->r, (size_t) c->n * c->c * c->hw);
}

static void
test_modulation (void)
{
  ModCase c = { .n = 2, .c = 3, .hw = 5 };
  size_t size = 30;
  c.x = random_buffer (size, 1);
  c.ss = random_buffer (12, 1);
  c.r = random_buffer (size, 1);
  c.y = g_new (float, size);
  float *dx = g_new (float, size), *dss = g_new0 (float, 12);
  gd_scale_shift_backward (c.x, c.n, c.c, c.hw, c.ss, c.r, dx, dss);
  fd_check ("scale-shift dx", scale_shift_loss, &c, c.x, size, dx);
  fd_check ("scale-shift dscale/dshift", scale_shift_loss, &c, c.ss, 12, dss);
  memset (dss, 0, sizeof (float) * 12);
  gd_add_channel_bias_backward (c.n, c.c, c.hw, c.r, dx, dss);
  fd_check ("channel bias dx", channel_bias_loss, &c, c.x, size, dx);
  fd_check ("channel bias db", channel_bias_loss, &c, c.ss, 6, dss);
  g_free (c.x); g_free (c.ss); g_free (c.r); g_free (c.y); g_free (dx); g_free (dss);
}

typedef struct { int kind, n, c, h, w; size_t in_size, out_size; float *x, *r, *y; } PointCase;

static double
point_loss (void *p)
{
  PointCase *c = p;
  if (c->kind == 0)
    gd_silu_forward (c->x, c->in_size, c->y);
  else if (c->kind == 1)
    gd_avg_pool2_forward (c->x, c->n, c->c, c->h, c->w, c->y);
  else
    gd_upsample2_forward (c->x, c->n, c->c, c->h, c->w, c->y);
  return weighted_sum (c->y, c->r, c->out_size);
}

static void
check_pointwise (int kind, const char *what)
{
  PointCase c = { .kind = kind, .n = 2, .c = 3, .h = 4, .w = 6 };
  c.in_size = (size_t) c.n * c.c * c.h * c.w;
  c.out_size = kind == 0 ? c.in_size : kind == 1 ? c.in_size / 4 : c.in_size * 4;
  c.x = random_buffer (c.in_size, 2);
  c.r = random_buffer (c.out_size, 1);
  c.y = g_new (float, c.out_size);
  float *dx = g_new (float, c.in_size);
  if (kind == 0)
    gd_silu_backward (c.x, c.in_size, c.r, dx);
  else if (kind == 1)
    gd_avg_pool2_backward (c.n, c.c, c.h, c.w, c.r, dx);
  else
    gd_upsample2_backward (c.n, c.c, c.h, c.w, c.r, dx);
  fd_check (what, point_loss, &c, c.x, c.in_size, dx);
  g_free (c.x); g_free (c.r); g_free (c.y); g_free (dx);
}

static void test_silu (void) { check_pointwise (0, "silu dx"); }
static void test_avg_pool (void) { check_pointwise (1, "avg pool dx"); }
static void test_upsample (void) { check_pointwise (2, "upsample dx"); }

/* ---- attention ---- */

typedef struct { int n, heads, ch, L, legacy; float *qkv, *r, *y, *probs; } AttnCase;

static double
attn_loss (void *p)
{
  AttnCase *c = p;
  gd_attention_forward (c->qkv, c->n, c->heads, c->ch, c->L, c->legacy, c->y, c->probs);
  return weighted_sum (c->y, c->r, (size_t) c->n * c->heads * c->ch * c->L);
}

static void
check_attention (int legacy)
{
  AttnCase c = { .n = 2, .heads = 2, .ch = 4, .L = 5, .legacy = legacy };
  size_t in = (size_t) c.n * 3 * c.heads * c.ch * c.L, out = in / 3;
  c.qkv = random_buffer (in, 1);
  c.r = random_buffer (out, 1);
  c.y = g_new (float, out);
  c.probs = g_new (float, (size_t) c.n * c.heads * c.L * c.L);
  attn_loss (&c);
  float *dqkv = g_new (float, in);
  gd_attention_backward (c.qkv, c.n, c.heads, c.ch, c.L, legacy, c.probs, c.r, dqkv);
  fd_check (legacy ? "legacy attention dqkv" : "attention dqkv", attn_loss, &c, c.qkv, in, dqkv);
  g_free (c.qkv); g_free (c.r); g_free (c.y); g_free (c.probs); g_free (dqkv);
}

static void test_attention (void) { check_attention (0); }
static void test_attention_legacy (void) { check_attention (1); }

/* The two head orders must really differ: the same qkv gives different outputs. */
static void
test_attention_orders_differ (void)
{
  int n = 1, heads = 2, ch = 4, L = 3;
  size_t in = (size_t) n * 3 * heads * ch * L;
  float *qkv = random_buffer (in, 1), *a = g_new (float, in / 3), *b = g_new (float, in / 3);
  float *probs = g_new (float, (size_t) heads * L * L);
  gd_attention_forward (qkv, n, heads, ch, L, 0, a, probs);
  gd_attention_forward (qkv, n, heads, ch, L, 1, b, probs);
  double diff = 0;
  for (size_t i = 0; i < in / 3; i++)
    diff = MAX (diff, fabs (a[i] - b[i]));
  g_assert_cmpfloat (diff, >, 1e-3);
  g_free (qkv); g_free (a); g_free (b); g_free (probs);
}

/* ---- timestep embedding ---- */

static void
test_timestep_embedding (void)
{
  int64_t t[2] = { 0, 999 };
  float e[2 * 8];
  gd_timestep_embedding (t, 2, 8, e);
  for (int j = 0; j < 4; j++)
    {
      g_assert_cmpfloat (e[j], ==, 1.0f);      /* cos(0) */
      g_assert_cmpfloat (e[4 + j], ==, 0.0f);  /* sin(0) */
    }
  /* frequency j is 10000^(-j/4): the first pair is cos/sin(999) itself */
  g_assert_cmpfloat (fabs (e[8] - cos (999.0)), <, 1e-4);
  g_assert_cmpfloat (fabs (e[12] - sin (999.0)), <, 1e-4);
  g_assert_cmpfloat (fabs (e[9] - cos (999.0 * pow (10000.0, -0.25))), <, 1e-4);
}

/* ---- whole classifier gradient ---- */

typedef struct { GdModel *model; float *x; int n, h, w; int64_t t[2], y[2]; float *logits; } ModelCase;

static double
classifier_loss (void *p)
{
  ModelCase *c = p;
  int classes = gd_model_get_config (c->model)->out_channels;
  g_assert_true (gd_model_forward (c->model, c->x, c->n, c->h, c->w, c->t, NULL, c->logits, NULL));
  float *logp = g_new (float, (size_t) c->n * classes);
  gd_log_softmax (c->logits, c->n, classes, logp);
  double sum = 0.0;
  for (int i = 0; i < c->n; i++)
    sum += logp[(size_t) i * classes + c->y[i]];
  g_free (logp);
  return sum;
}

static void
check_classifier (const char *config_json)
{
  GdModelConfig cfg;
  gd_model_config_init (&cfg, GD_MODEL_CLASSIFIER);
  GError *error = NULL;
  g_assert_true (gd_model_config_parse (&cfg, config_json, "test", &error));
  g_assert_no_error (error);
  GdModel *model = gd_model_new (&cfg, "test", &error);
  g_assert_no_error (error);
  gd_model_init_random (model, 7);
  ModelCase c = { .model = model, .n = 2, .h = cfg.image_size, .w = cfg.image_size,
                  .t = { 10, 700 }, .y = { 1, 3 } };
  size_t size = (size_t) c.n * cfg.in_channels * c.h * c.w;
  c.x = random_buffer (size, 1);
  c.logits = g_new (float, (size_t) c.n * cfg.out_channels);
  float *grad = g_new (float, size);
  g_assert_true (gd_classifier_gradient (model, c.x, c.n, c.h, c.w, c.t, c.y, c.logits, grad, &error));
  fd_check ("classifier gradient", classifier_loss, &c, c.x, size, grad);
  g_free (c.x); g_free (c.logits); g_free (grad);
  gd_model_free (model);
}

static void
test_classifier_attention_pool (void)
{
  check_classifier ("{\"image_size\": 8, \"in_channels\": 3, \"model_channels\": 32,"
                    " \"out_channels\": 4, \"num_res_blocks\": 1, \"attention_resolutions\": [2],"
                    " \"channel_mult\": [1, 2], \"num_head_channels\": 16,"
                    " \"use_scale_shift_norm\": true, \"resblock_updown\": true, \"pool\": \"attention\"}");
}

static void
test_classifier_adaptive_pool (void)
{
  check_classifier ("{\"image_size\": 8, \"in_channels\": 1, \"model_channels\": 32,"
                    " \"out_channels\": 5, \"num_res_blocks\": 1, \"attention_resolutions\": [1, 2],"
                    " \"channel_mult\": [1, 2], \"num_heads\": 2,"
                    " \"use_scale_shift_norm\": false, \"resblock_updown\": false, \"pool\": \"adaptive\"}");
}

/* Frechet distances with known answers: N(m, I) against N(m + delta, 4 I) in d dimensions
 * is |delta|^2 + d (1 + 4 - 2 * 2) = |delta|^2 + d; a set against itself is 0. */
static void
test_frechet_distance (void)
{
  const int d = 6, n = 4000;
  float *a = random_buffer ((size_t) n * d, 1.0f), *b = random_buffer ((size_t) n * d, 2.0f);
  for (int i = 0; i < n; i++)
    b[(size_t) i * d] += 3.0f;
  double mu_a[6], mu_b[6], cov_a[36], cov_b[36], distance;
  gd_stats_mean_cov (a, n, d, mu_a, cov_a);
  gd_stats_mean_cov (b, n, d, mu_b, cov_b);
  GError *error = NULL;
  g_assert_true (gd_stats_frechet_distance (mu_a, cov_a, mu_a, cov_a, d, &distance, &error));
  g_assert_cmpfloat (fabs (distance), <, 1e-9);
  g_assert_true (gd_stats_frechet_distance (mu_a, cov_a, mu_b, cov_b, d, &distance, &error));
  g_test_message ("Frechet distance %.3f, expected about %d", distance, 9 + d);
  g_assert_cmpfloat (fabs (distance - (9.0 + d)), <, 0.6);
  /* pairwise distance of unit normals in d dimensions is about sqrt(2 d) */
  double pairwise = gd_stats_mean_pairwise_distance (a, 500, d);
  g_assert_cmpfloat (fabs (pairwise - sqrt (2.0 * d)), <, 0.3);
  g_free (a);
  g_free (b);
}

/* The vectorised exp against libm's double exp over the whole range it serves. */
static void
test_exp (void)
{
  double worst = 0.0;
  for (int i = 0; i <= 1750000; i++)
    {
      float x = -87.0f + 1e-4f * (float) i;
      double want = exp ((double) x);
      worst = MAX (worst, fabs (gd_exp (x) - want) / want);
    }
  g_test_message ("worst relative error of gd_exp on [-87, 88]: %.2g", worst);
  g_assert_cmpfloat (worst, <, 1e-6);
  g_assert_cmpfloat (gd_exp (-1000.0f), <, 1e-37f);
  g_assert_cmpfloat (gd_exp (-1000.0f), >=, 0.0f);
  g_assert_true (isfinite (gd_exp (1000.0f)));
}

/* OpenBLAS runs the kernels the engine chose for this processor, not its generic fallback
 * (which a processor newer than the library gets, at a fifth of the speed). */
static void
test_blas_core (void)
{
  const char *wanted = gd_blas_core_for_processor ();
  if (g_getenv ("OPENBLAS_CORETYPE") && !openblas_core_was_ours)
    {
      g_test_skip ("OPENBLAS_CORETYPE is set in the environment: OpenBLAS runs what it names");
      return;
    }
  if (!wanted)
    {
      g_test_skip ("this processor has no AVX-512: OpenBLAS chooses its own kernels");
      return;
    }
  g_assert_cmpstr (gd_blas_core (), ==, wanted);
  float a[4] = { 1, 2, 3, 4 }, b[4] = { 5, 6, 7, 8 }, c[4] = { 1, 1, 1, 1 };
  gd_blas_sgemm (CblasNoTrans, CblasNoTrans, 2, 2, 2, 1.0f, a, 2, b, 2, 1.0f, c, 2);
  g_assert_cmpfloat (c[0], ==, 20.0f);
  g_assert_cmpfloat (c[1], ==, 23.0f);
  g_assert_cmpfloat (c[2], ==, 44.0f);
  g_assert_cmpfloat (c[3], ==, 51.0f);
}

/* A product c = beta c + op(a) b as the engine computes it, a transposed when trans */
typedef void (*ProductFn) (gboolean trans, int m, int n, int k, const float *a, int lda,
                           const float *b, int ldb, float beta, float *c, int ldc);

/* Shapes with every padded edge of both kernels: the bf16 kernel's blocks of 32 and 256
 * columns, the float kernel's tiles of 12 rows (and its last tiles of 8, 4 and other
 * counts of rows), of 32 columns, its blocks of 256 columns and passes of 256 deep (also a
 * transposed a over several blocks and passes) */
static const int product_shapes[][3] = {
  { 1, 1, 1 }, { 32, 32, 32 }, { 33, 65, 31 }, { 7, 300, 70 }, { 64, 256, 64 },
  { 70, 530, 97 }, { 3, 1000, 200 }, { 45, 90, 700 }, { 12, 32, 256 }, { 13, 33, 257 },
  { 20, 64, 300 }, { 16, 40, 7 }, { 96, 256, 520 }, { 40, 300, 600 }
};

/* product on random operands of every shape, both layouts of a, both betas, against a
 * double-precision product of the operands as `round` leaves them: only the float
 * accumulation may differ.  Where beta is 0, c starts as NaN, which must not come through;
 * the part of c's rows past n must stay as it was. */
static void
check_products (const char *name, ProductFn product, float (*round) (float))
{
  for (guint s = 0; s < G_N_ELEMENTS (product_shapes); s++)
    for (int trans = 0; trans < 2; trans++)
      for (int accumulate = 0; accumulate < 2; accumulate++)
        {
          int m = product_shapes[s][0], n = product_shapes[s][1], k = product_shapes[s][2];
          int lda = (trans ? m : k) + 3, ldb = n + 5, ldc = n + 2;
          float *a = random_buffer ((size_t) (trans ? k : m) * lda, 1.0f);
          float *b = random_buffer ((size_t) k * ldb, 1.0f);
          float *c = random_buffer ((size_t) m * ldc, 1.0f);
          for (int i = 0; i < m && !accumulate; i++)
            for (int j = 0; j < n; j++)
              c[(size_t) i * ldc + j] = NAN;
          float *before = g_memdup2 (c, sizeof (float) * m * ldc);
          product (trans, m, n, k, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc);
          double worst = 0.0;
          for (int i = 0; i < m; i++)
            for (int j = 0; j < ldc; j++)
              {
                float got = c[(size_t) i * ldc + j];
                if (j >= n)
                  {
                    /* outside the product: untouched */
                    g_assert_cmpfloat (got, ==, before[(size_t) i * ldc + j]);
                    continue;
                  }
                double sum = accumulate ? before[(size_t) i * ldc + j] : 0.0, size = fabs (sum);
                for (int q = 0; q < k; q++)
                  {
                    double av = round (trans ? a[(size_t) q * lda + i] : a[(size_t) i * lda + q]);
                    double term = av * round (b[(size_t) q * ldb + j]);
                    sum += term;
                    size += fabs (term);
                  }
                double error = fabs (got - sum) / MAX (size, 1e-30);
                worst = isnan (error) ? INFINITY : MAX (worst, error);
              }
          /* float accumulation of k terms: a few units of float rounding of their sizes */
          if (worst > 1e-6 * (1 + k / 16.0))
            g_error ("%s product %dx%dx%d (trans %d, beta %d): error %.3g of the terms' size",
                     name, m, n, k, trans, accumulate, worst);
          g_free (a);
          g_free (b);
          g_free (c);
          g_free (before);
        }
}

static void
product_bf16 (gboolean trans, int m, int n, int k, const float *a, int lda, const float *b,
              int ldb, float beta, float *c, int ldc)
{
  gd_gemm_bf16 (trans, m, n, k, a, lda, b, ldb, beta, c, ldc);
}

/* The bf16 product against a double-precision product of the same bf16-rounded operands.
 * GD_BF16_KERNEL=avx512 runs the AVX512-BF16 kernel instead of AMX (meson runs this test
 * both ways). */
static void
test_gemm_bf16 (void)
{
  const char *kernel = gd_bf16_kernel ();
  if (!kernel)
    {
      g_printerr ("SKIP: this processor has neither AMX-BF16 nor AVX512-BF16\n");
      g_test_skip ("this processor has neither AMX-BF16 nor AVX512-BF16");
      return;
    }
  g_test_message ("bf16 kernel: %s", kernel);
  check_products ("bf16", product_bf16, gd_bf16_round);
  /* a band of a packed matrix's columns (as the convolutions' channel bands use it) */
  {
    int m = 40, k = 100, k0 = 64, kb = 30, n = 70;
    float *a = random_buffer ((size_t) m * k, 1.0f), *b = random_buffer ((size_t) kb * n, 1.0f);
    float *c = g_new (float, (size_t) m * n);
    GdBf16Matrix *packed = gd_bf16_matrix_new (FALSE, m, k, a, k);
    gd_gemm_bf16_packed (packed, 0, m, k0, kb, n, b, n, 0.0f, c, n);
    double worst = 0.0;
    for (int i = 0; i < m; i++)
      for (int j = 0; j < n; j++)
        {
          double sum = 0.0, size = 0.0;
          for (int q = 0; q < kb; q++)
            {
              double term = (double) gd_bf16_round (a[(size_t) i * k + k0 + q])
                            * gd_bf16_round (b[(size_t) q * n + j]);
              sum += term;
              size += fabs (term);
            }
          worst = MAX (worst, fabs (c[(size_t) i * n + j] - sum) / size);
        }
    g_assert_cmpfloat (worst, <=, 1e-6 * (1 + kb / 16.0));
    gd_bf16_matrix_free (packed);
    g_free (a);
    g_free (b);
    g_free (c);
  }
  /* rounding: ties to even, and the values that do not move */
  g_assert_cmpfloat (gd_bf16_round (1.0f), ==, 1.0f);
  g_assert_cmpfloat (gd_bf16_round (1.0f + 1.0f / 256), ==, 1.0f);             /* tie, to even */
  g_assert_cmpfloat (gd_bf16_round (1.0f + 3.0f / 256), ==, 1.0f + 4.0f / 256); /* tie, to even */
  g_assert_cmpfloat (gd_bf16_round (1.0f + 1.5f / 256), ==, 1.0f + 2.0f / 256);
  g_assert_true (isnan (gd_bf16_round (NAN)));
}

static float
unrounded (float x)
{
  return x;
}

static void
product_float (gboolean trans, int m, int n, int k, const float *a, int lda, const float *b,
               int ldb, float beta, float *c, int ldc)
{
  gd_gemm (m, n, k, a, trans ? 1 : lda, trans ? lda : 1, b, ldb, beta, c, ldc);
}

/* The engine's float product against a double-precision product; and the same bits
 * whether the engine's threads share it out or one thread makes it alone. */
static void
test_gemm_float (void)
{
  if (!gd_gemm_available ())
    {
      char *why = g_strdup_printf ("%s: the products go to OpenBLAS",
                                   gd_gemm_unavailable_reason ());
      g_printerr ("SKIP: %s\n", why);
      g_test_skip (why);
      g_free (why);
      return;
    }
  check_products ("float", product_float, unrounded);
  for (guint s = 0; s < G_N_ELEMENTS (product_shapes); s++)
    for (int trans = 0; trans < 2; trans++)
      {
        int m = product_shapes[s][0], n = product_shapes[s][1], k = product_shapes[s][2];
        float *a = random_buffer ((size_t) m * k, 1.0f), *b = random_buffer ((size_t) k * n, 1.0f);
        float *shared = g_new (float, (size_t) m * n), *alone = g_new (float, (size_t) m * n);
        product_float (trans, m, n, k, a, trans ? m : k, b, n, 0.0f, shared, n);
#pragma omp parallel num_threads (2)
        {
#pragma omp single
          {
            g_assert_true (omp_in_parallel () || omp_get_num_threads () == 1);
            product_float (trans, m, n, k, a, trans ? m : k, b, n, 0.0f, alone, n);
          }
        }
        g_assert_cmpmem (shared, sizeof (float) * m * n, alone, sizeof (float) * m * n);
        g_free (a);
        g_free (b);
        g_free (shared);
        g_free (alone);
      }
}

/* One bf16 convolution, forward and input gradient, against the float convolution of the
 * same bf16-rounded input, weights and output gradient: only the float sums may differ. */
static void
check_conv_bf16 (int n, int cin, int cout, int h, int w, int k, int stride, int pad,
                 gboolean with_bias)
{
  int ho = (h + 2 * pad - k) / stride + 1, wo = (w + 2 * pad - k) / stride + 1;
  size_t in = (size_t) n * cin * h * w, out = (size_t) n * cout * ho * wo, depth = (size_t) cin * k * k;
  float *x = random_buffer (in, 1.0f), *weight = random_buffer (cout * depth, 0.05f);
  float *bias = with_bias ? random_buffer (cout, 0.1f) : NULL, *dy = random_buffer (out, 1.0f);
  for (size_t i = 0; i < in; i++)
    x[i] = gd_bf16_round (x[i]);
  for (size_t i = 0; i < cout * depth; i++)
    weight[i] = gd_bf16_round (weight[i]);
  for (size_t i = 0; i < out; i++)
    dy[i] = gd_bf16_round (dy[i]);
  float *work = g_new (float, gd_conv2d_work_size (cin, cout, n, h, w, k, stride, pad));
  float *exact = g_new (float, MAX (in, out)), *got = g_new (float, MAX (in, out));
  GdBf16Matrix *packed = gd_conv2d_bf16_weight (FALSE, weight, cout, cin, k, stride, pad);
  GdBf16Matrix *packed_t = gd_conv2d_bf16_weight (TRUE, weight, cout, cin, k, stride, pad);
  for (int pass = 0; pass < 2; pass++)
    {
      size_t count = pass ? in : out;
      if (pass == 0)
        {
          gd_conv2d_forward (x, n, cin, h, w, weight, bias, cout, k, stride, pad, exact, work);
          gd_conv2d_forward_bf16 (x, n, cin, h, w, packed, bias, cout, k, stride, pad, got, work);
        }
      else
        {
          gd_conv2d_backward (x, n, cin, h, w, weight, cout, k, stride, pad, dy, exact, NULL,
                              NULL, work);
          gd_conv2d_input_gradient_bf16 (dy, n, cin, h, w, packed_t, cout, k, stride, pad, got,
                                         work);
        }
      GdDeviation dev = gd_stats_deviation (got, exact, count);
      g_test_message ("bf16 %dx%d conv, stride %d, %d -> %d channels at %dx%d, %s%s: largest "
                      "difference %.2e of the largest value", k, k, stride, cin, cout, h, w,
                      pass ? "input gradient" : "forward", with_bias ? "" : " (no bias)",
                      dev.worst / dev.largest);
      g_assert_cmpfloat (dev.largest, >, 0.0);
      g_assert_cmpfloat (dev.worst, <=, 1e-5 * dev.largest);
    }
  gd_bf16_matrix_free (packed);
  gd_bf16_matrix_free (packed_t);
  g_free (x);
  g_free (weight);
  g_free (bias);
  g_free (dy);
  g_free (work);
  g_free (exact);
  g_free (got);
}

/* bf16 convolutions of every kind the models have: 3x3 with stride 1 (columns packed from
 * the image: wide and narrow images, odd sizes, more than one block of 256 columns, images
 * of fewer than 16 pixels, no bias), stride 2 over two bands of input channels (160
 * channels, 64x64 output: bands of 96 and 64; the input gradient reads the transposed
 * weights from row 96 on), and 1x1. */
static void
test_conv_bf16 (void)
{
  if (!gd_bf16_kernel ())
    {
      g_printerr ("SKIP: this processor has neither AMX-BF16 nor AVX512-BF16\n");
      g_test_skip ("this processor has no bf16 product");
      return;
    }
  check_conv_bf16 (2, 160, 40, 64, 64, 3, 1, 1, TRUE);
  check_conv_bf16 (1, 40, 24, 8, 8, 3, 1, 1, TRUE);
  check_conv_bf16 (3, 7, 5, 5, 13, 3, 1, 1, TRUE);
  check_conv_bf16 (1, 3, 64, 17, 31, 3, 1, 1, FALSE);
  const int tiny[][2] = { { 1, 1 }, { 2, 2 }, { 3, 3 }, { 1, 20 }, { 20, 1 } };
  for (size_t i = 0; i < G_N_ELEMENTS (tiny); i++)
    check_conv_bf16 (2, 40, 8, tiny[i][0], tiny[i][1], 3, 1, 1, TRUE);
  g_assert_cmpint (gd_conv2d_work_size (160, 8, 1, 128, 128, 3, 2, 1), ==, 96 * 9 * 64 * 64);
  check_conv_bf16 (1, 160, 8, 128, 128, 3, 2, 1, TRUE);
  check_conv_bf16 (2, 64, 40, 16, 16, 1, 1, 0, TRUE);
}

int
main (int argc, char **argv)
{
  openblas_core_was_ours = g_getenv ("OPENBLAS_CORETYPE") == NULL;
  g_test_init (&argc, &argv, NULL);
  g_test_add_func ("/kernels/blas-core", test_blas_core);
  g_test_add_func ("/kernels/exp", test_exp);
  g_test_add_func ("/kernels/gemm-float", test_gemm_float);
  g_test_add_func ("/kernels/bf16/gemm", test_gemm_bf16);
  g_test_add_func ("/kernels/bf16/conv", test_conv_bf16);
  g_test_add_func ("/kernels/conv3x3", test_conv3x3);
  g_test_add_func ("/kernels/conv3x3-stride2", test_conv3x3_stride2);
  g_test_add_func ("/kernels/conv1x1", test_conv1x1);
  g_test_add_func ("/kernels/conv-direct", test_conv_direct);
  g_test_add_func ("/kernels/conv-winograd", test_conv_winograd);
  g_test_add_func ("/kernels/conv3x3-winograd-gradients", test_conv3x3_winograd_gradients);
  g_test_add_func ("/kernels/linear", test_linear);
  g_test_add_func ("/kernels/group-norm", test_group_norm);
  g_test_add_func ("/kernels/scale-shift-and-bias", test_modulation);
  g_test_add_func ("/kernels/silu", test_silu);
  g_test_add_func ("/kernels/avg-pool", test_avg_pool);
  g_test_add_func ("/kernels/upsample", test_upsample);
  g_test_add_func ("/kernels/attention", test_attention);
  g_test_add_func ("/kernels/attention-legacy", test_attention_legacy);
  g_test_add_func ("/kernels/attention-orders-differ", test_attention_orders_differ);
  g_test_add_func ("/kernels/timestep-embedding", test_timestep_embedding);
  g_test_add_func ("/model/classifier-gradient-attention-pool", test_classifier_attention_pool);
  g_test_add_func ("/model/classifier-gradient-adaptive-pool", test_classifier_adaptive_pool);
  g_test_add_func ("/stats/frechet-distance", test_frechet_distance);
  return g_test_run ();
}
