/* Layer kernels of the ADM U-Net and its classifier, each forward next to its backward.
 * Tensors are float32, NCHW, contiguous.  Conventions of every backward:
 *   - the input gradient (dx) is overwritten, and may be NULL when not wanted;
 *   - parameter gradients (dweight, dbias, ...) are accumulated (+=), and may be NULL. */
#pragma once
#include <stddef.h>
#include <stdint.h>

/* Convolution with a square kernel k, zero padding pad, stride stride, as im2col + sgemm
 * image by image, or (3x3, stride 1, padding 1, enough pixels in the batch and channels: see
 * gd_conv2d_winograd) as Winograd F(2x2, 3x3) products over the whole batch.
 * weight: [cout, cin, k, k]; bias: [cout] or NULL.
 * Output size: (h + 2 pad - k) / stride + 1.  work: scratch of gd_conv2d_work_size() floats. */
size_t gd_conv2d_work_size (int cin, int cout, int n, int h, int w, int k, int stride, int pad);
/* Nonzero when the forward and the input gradient of this shape take the Winograd way (the
 * parameter gradients always take im2col). */
int gd_conv2d_winograd (int n, int cin, int cout, int h, int w, int k, int stride, int pad);
void gd_conv2d_forward (const float *x, int n, int cin, int h, int w,
                        const float *weight, const float *bias, int cout,
                        int k, int stride, int pad, float *y, float *work);
/* The same with the products in bfloat16 with float sums (gd-bf16.h), weight packed once by
 * gd_conv2d_bf16_weight (FALSE, ...).  3x3 convolutions with stride 1 and padding 1 pack
 * their columns from the image as the product goes and leave work unused (here and in
 * gd_conv2d_input_gradient_bf16). */
typedef struct GdBf16Matrix GdBf16Matrix;
void gd_conv2d_forward_bf16 (const float *x, int n, int cin, int h, int w,
                             const GdBf16Matrix *weight, const float *bias, int cout,
                             int k, int stride, int pad, float *y, float *work);
/* The input gradient alone in bfloat16, weight_t packed once by gd_conv2d_bf16_weight (TRUE, ...). */
void gd_conv2d_input_gradient_bf16 (const float *dy, int n, int cin, int h, int w,
                                    const GdBf16Matrix *weight_t, int cout, int k, int stride,
                                    int pad, float *dx, float *work);
/* A convolution's weight [cout, cin, k, k] rounded and packed for gd_conv2d_forward_bf16, or
 * (input_gradient nonzero) for gd_conv2d_input_gradient_bf16: transposed, and for 3x3 convolutions
 * with stride 1 and padding 1 also flipped, to [cin, cout 3 3]. */
GdBf16Matrix *gd_conv2d_bf16_weight (int input_gradient, const float *weight, int cout,
                                     int cin, int k, int stride, int pad);
void gd_conv2d_backward (const float *x, int n, int cin, int h, int w,
                         const float *weight, int cout, int k, int stride, int pad,
                         const float *dy, float *dx, float *dweight, float *dbias, float *work);

/* y[n, out] = x[n, in] W^T + b, with W: [out, in]. */
void gd_linear_forward (const float *x, int n, int in, const float *weight, const float *bias,
                        int out, float *y);
void gd_linear_backward (const float *x, int n, int in, const float *weight, int out,
                         const float *dy, float *dx, float *dweight, float *dbias);

/* GroupNorm over `groups` groups of c / groups channels and hw positions (eps 1e-5),
 * computed in float32 with float64 statistics.  mean and rstd: [n * groups], saved for backward. */
#define GD_GROUP_NORM_EPS 1e-5
void gd_group_norm_forward (const float *x, int n, int c, int hw, int groups,
                            const float *gamma, const float *beta,
                            float *y, float *mean, float *rstd);
/* GroupNorm, then optionally the timestep modulation v (1 + scale) + shift (ss: [n, 2c],
 * scales then shifts, or NULL), in one pass: the result goes to y (or NULL) and its SiLU to
 * act (or NULL).  The same numbers as the kernels run one after the other. */
void gd_group_norm_act_forward (const float *x, int n, int c, int hw, int groups,
                                const float *gamma, const float *beta, const float *ss,
                                float *y, float *act, float *mean, float *rstd);
void gd_group_norm_backward (const float *x, int n, int c, int hw, int groups,
                             const float *gamma, const float *mean, const float *rstd,
                             const float *dy, float *dx, float *dgamma, float *dbeta);

/* FiLM modulation of the ResBlock with use_scale_shift_norm:
 * y = x * (1 + scale[n, c]) + shift[n, c], where ss = [n, 2c] holds scale then shift. */
void gd_scale_shift_forward (const float *x, int n, int c, int hw, const float *ss, float *y);
void gd_scale_shift_backward (const float *x, int n, int c, int hw, const float *ss,
                              const float *dy, float *dx, float *dss);

/* y = x + b[n, c] broadcast over hw (the timestep embedding added without scale-shift). */
void gd_add_channel_bias_forward (const float *x, int n, int c, int hw, const float *b, float *y);
void gd_add_channel_bias_backward (int n, int c, int hw, const float *dy, float *dx, float *db);

/* e^x as the vectorised kernels compute it (relative error below 1e-6 for x in [-87, 88]). */
float gd_exp (float x);

/* SiLU(x) = x * sigmoid(x). In-place forward allowed (y == x). */
void gd_silu_forward (const float *x, size_t count, float *y);
void gd_silu_backward (const float *x, size_t count, const float *dy, float *dx);

/* 2x2 average pooling with stride 2 (h and w even or odd: floor, as avg_pool2d). */
void gd_avg_pool2_forward (const float *x, int n, int c, int h, int w, float *y);
void gd_avg_pool2_backward (int n, int c, int h, int w, const float *dy, float *dx);

/* Nearest-neighbour upsampling by 2. */
void gd_upsample2_forward (const float *x, int n, int c, int h, int w, float *y);
void gd_upsample2_backward (int n, int c, int h, int w, const float *dy, float *dx);

/* Multi-head QKV attention on qkv: [n, 3 * heads * ch, L] -> out: [n, heads * ch, L].
 * legacy: channels grouped per head as (q, k, v) (QKVAttentionLegacy); otherwise all q,
 * then all k, then all v (QKVAttention).  weight = softmax(q^T k / sqrt(ch)) over keys.
 * probs: [n, heads, L, L] softmax weights, saved for backward, or NULL (not kept).  */
void gd_attention_forward (const float *qkv, int n, int heads, int ch, int L, int legacy,
                           float *out, float *probs);
void gd_attention_backward (const float *qkv, int n, int heads, int ch, int L, int legacy,
                            const float *probs, const float *dout, float *dqkv);

/* Sinusoidal timestep embedding [n, dim] as the reference computes it in float32:
 * cos(t * f_i) for the first half, sin(t * f_i) for the second, f_i = exp(-ln(10000) i / half). */
void gd_timestep_embedding (const int64_t *t, int n, int dim, float *out);

/* Row-wise log-softmax of [n, k]. */
void gd_log_softmax (const float *x, int n, int k, float *y);

/* y = a + b elementwise; accumulate y += x. */
void gd_add (const float *a, const float *b, size_t count, float *y);
void gd_accumulate (float *y, const float *x, size_t count);
