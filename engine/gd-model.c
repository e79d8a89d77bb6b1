/* The ADM U-Net and the encoder-half classifier of guided diffusion
 * (Dhariwal & Nichol 2021, section 3 and appendix), forward and backward. */
#include "gd-model.h"
#include "gd-bf16.h"
#include "gd-checkpoint.h"
#include "gd-error.h"
#include "gd-kernels.h"
#include "gd-random.h"
#include "gd-safetensors.h"

#include <math.h>
#include <string.h>

#define GROUPS 32

typedef struct {
  float *data;
  size_t capacity;
} Buf;

static float *
buf_get (Buf *b, size_t count)
{
  if (count > b->capacity)
    {
      g_free (b->data);
      b->data = g_new (float, count);
      b->capacity = count;
    }
  return b->data;
}

static float *
buf_zero (Buf *b, size_t count)
{
  float *p = buf_get (b, count);
  memset (p, 0, sizeof (float) * count);
  return p;
}

static void
buf_clear (Buf *b)
{
  g_free (b->data);
  b->data = NULL;
  b->capacity = 0;
}

typedef struct { GdParam *weight, *bias; int cin, cout, k, stride, pad; } Conv;
typedef struct { GdParam *weight, *bias; int channels; } Norm;
typedef struct { GdParam *weight, *bias; int in, out; } Linear;

typedef enum { LAYER_CONV, LAYER_RES, LAYER_ATTN, LAYER_DOWN, LAYER_UP } LayerKind;

enum { RESAMPLE_NONE = 0, RESAMPLE_UP = 1, RESAMPLE_DOWN = -1 };

/* What a forward pass keeps for a backward pass: nothing (inference), what the input
 * gradient reads (a classifier's guidance gradient), or also what parameter gradients
 * read (training). */
typedef enum { KEEP_NOTHING, KEEP_INPUT_GRADIENT, KEEP_ALL } Keep;

/* Saved activations and scratch of one layer; names follow the forward pass. */
enum {
  S_A1, S_A2, S_A2U, S_XU, S_H1, S_SE, S_E, S_G, S_G2, S_G3, S_SKIP,
  S_STATS1, S_STATS2, S_T0, S_T1, S_T2, S_T3, N_SAVED
};

typedef struct {
  LayerKind kind;
  int cin, cout;
  /* geometry of the last forward */
  int n, h, w, ho, wo;
  const float *x;
  const float *emb;

  Conv conv;                 /* CONV, DOWN and UP with a convolution */
  gboolean has_conv;

  /* ResBlock */
  Norm in_norm, out_norm;
  Conv in_conv, out_conv, skip;
  gboolean has_skip;
  Linear emb_lin;
  int resample;
  gboolean scale_shift;

  /* AttentionBlock */
  Norm norm;
  Conv qkv, proj;
  int heads, head_channels;
  gboolean legacy;

  Buf out;
  const float *y;            /* where the last forward's output went */
  gboolean persist;          /* its output is read after the next layer has run (a skip) */
  Buf saved[N_SAVED];
} Layer;

typedef struct {
  GPtrArray *layers;    /* Layer* */
  int skip_channels;    /* output blocks: channels of the concatenated skip */
  Buf concat, dskip;     /* output blocks: the concat input; input blocks: gradient of the skip */
  gboolean skip_source;  /* a U-Net input block: an output block reads its output */
  const float *out;
  int c, h, w;
} Block;

struct GdModel {
  GdModelConfig cfg;
  char *origin;
  GdSafetensors *file;
  GHashTable *metadata;      /* keys set by gd_model_set_metadata */
  gpointer data_owner;
  GDestroyNotify data_owner_destroy;
  GPtrArray *params;         /* GdParam* */
  GHashTable *param_by_name;

  int emb_dim;
  Linear time_embed0, time_embed2;
  GdParam *label_emb;
  GPtrArray *input_blocks, *output_blocks;  /* Block* */
  Block *middle;
  int final_channels, final_ds;

  /* heads */
  Norm out_norm;
  Conv out_conv;           /* U-Net output conv, or the adaptive classifier's 1x1 conv */
  GdParam *positional_embedding;
  Conv pool_qkv, pool_proj;
  int pool_heads;

  /* activations of the last forward */
  int n, h, w;
  gboolean grads;             /* parameter gradients are being accumulated */
  gboolean inference;         /* gd_model_set_inference */
  gboolean bf16;              /* gd_model_set_bf16 */
  GHashTable *bf16_weights[2];/* GdParam * (a conv weight) -> GdBf16Matrix *, made on first
                                 use: the weight, and transposed for input gradients */
  Keep kept;                  /* what the last forward kept for a backward pass */
  Buf shared[N_SAVED];        /* scratch that no backward pass reads, shared by all layers */
  Buf dxs[2];                 /* layer input gradients, taking turns (layer_dx) */
  Buf outs[2], concat;        /* layer outputs and concatenations of inference passes */
  int out_turn;
  int dx_turn;
  const int64_t *labels;      /* y of the last forward (class-conditional U-Nets) */
  Buf temb, e1, e1s, emb, head_norm, head_silu, head_stats, pooled, pool_qkv_buf,
      pool_probs, pool_att, pool_out, work, dhead, dtmp, dtmp2, demb, de1;
  const float *trunk_out;
  int trunk_h, trunk_w;
};

/* ---- construction ---- */

static GdParam *
param_new (GdModel *m, const char *prefix, const char *suffix, int ndim,
           int64_t d0, int64_t d1, int64_t d2, int64_t d3)
{
  GdParam *p = g_new0 (GdParam, 1);
  p->name = g_strconcat (prefix, ".", suffix, NULL);
  p->ndim = ndim;
  int64_t dims[4] = { d0, d1, d2, d3 };
  p->numel = 1;
  for (int i = 0; i < ndim; i++)
    {
      p->shape[i] = dims[i];
      p->numel *= (size_t) dims[i];
    }
  g_ptr_array_add (m->params, p);
  g_hash_table_insert (m->param_by_name, p->name, p);
  return p;
}

static void
param_free (gpointer data)
{
  GdParam *p = data;
  if (p->owns_data)
    g_free (p->data);
  g_free (p->grad);
  g_free (p->name);
  g_free (p);
}

/* conv_nd(dims, cin, cout, k): 2-D weights [cout, cin, k, k]; 1-D ones (attention) [cout, cin, 1]. */
static Conv
conv_new (GdModel *m, const char *prefix, int cin, int cout, int k, int stride, int pad,
          gboolean one_d)
{
  Conv c = { NULL, NULL, cin, cout, k, stride, pad };
  if (one_d)
    c.weight = param_new (m, prefix, "weight", 3, cout, cin, 1, 0);
  else
    c.weight = param_new (m, prefix, "weight", 4, cout, cin, k, k);
  c.bias = param_new (m, prefix, "bias", 1, cout, 0, 0, 0);
  return c;
}

static gboolean
norm_new (GdModel *m, const char *prefix, int channels, Norm *norm, GError **error)
{
  if (channels % GROUPS != 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                   "%s: config: GroupNorm(32) cannot split %d channels into 32 groups (%s)",
                   m->origin, channels, prefix);
      return FALSE;
    }
  norm->channels = channels;
  norm->weight = param_new (m, prefix, "weight", 1, channels, 0, 0, 0);
  norm->bias = param_new (m, prefix, "bias", 1, channels, 0, 0, 0);
  return TRUE;
}

static Linear
linear_new (GdModel *m, const char *prefix, int in, int out)
{
  Linear l = { NULL, NULL, in, out };
  l.weight = param_new (m, prefix, "weight", 2, out, in, 0, 0);
  l.bias = param_new (m, prefix, "bias", 1, out, 0, 0, 0);
  return l;
}

static void
layer_free (gpointer data)
{
  Layer *l = data;
  buf_clear (&l->out);
  for (int i = 0; i < N_SAVED; i++)
    buf_clear (&l->saved[i]);
  g_free (l);
}

/* Frees what only a backward pass reads: a layer's saved values, and its output unless
 * inference keeps it too (a U-Net skip). */
static void
block_release_saved (Block *b)
{
  for (guint i = 0; i < b->layers->len; i++)
    {
      Layer *l = b->layers->pdata[i];
      for (int k = 0; k < N_SAVED; k++)
        buf_clear (&l->saved[k]);
      if (!b->skip_source || i + 1 < b->layers->len)
        buf_clear (&l->out);
    }
  buf_clear (&b->dskip);
  buf_clear (&b->concat);
}

static Block *
block_new (void)
{
  Block *b = g_new0 (Block, 1);
  b->layers = g_ptr_array_new_with_free_func (layer_free);
  return b;
}

static void
block_free (gpointer data)
{
  Block *b = data;
  g_ptr_array_unref (b->layers);
  buf_clear (&b->concat);
  buf_clear (&b->dskip);
  g_free (b);
}

static gboolean
res_block_new (GdModel *m, Block *block, const char *prefix, int cin, int cout, int resample,
               GError **error)
{
  Layer *l = g_new0 (Layer, 1);
  g_ptr_array_add (block->layers, l);
  l->kind = LAYER_RES;
  l->cin = cin;
  l->cout = cout;
  l->resample = resample;
  l->scale_shift = m->cfg.use_scale_shift_norm;
  char *p;
  gboolean ok;
  p = g_strconcat (prefix, ".in_layers.0", NULL);
  ok = norm_new (m, p, cin, &l->in_norm, error);
  g_free (p);
  if (!ok)
    return FALSE;
  p = g_strconcat (prefix, ".in_layers.2", NULL);
  l->in_conv = conv_new (m, p, cin, cout, 3, 1, 1, FALSE);
  g_free (p);
  p = g_strconcat (prefix, ".emb_layers.1", NULL);
  l->emb_lin = linear_new (m, p, m->emb_dim, l->scale_shift ? 2 * cout : cout);
  g_free (p);
  p = g_strconcat (prefix, ".out_layers.0", NULL);
  ok = norm_new (m, p, cout, &l->out_norm, error);
  g_free (p);
  if (!ok)
    return FALSE;
  p = g_strconcat (prefix, ".out_layers.3", NULL);
  l->out_conv = conv_new (m, p, cout, cout, 3, 1, 1, FALSE);
  g_free (p);
  if (cout != cin)
    {
      /* ResBlock(use_conv=False): a 1x1 convolution on the skip path */
      p = g_strconcat (prefix, ".skip_connection", NULL);
      l->skip = conv_new (m, p, cin, cout, 1, 1, 0, FALSE);
      l->has_skip = TRUE;
      g_free (p);
    }
  return TRUE;
}

static gboolean
attention_new (GdModel *m, Block *block, const char *prefix, int channels, int num_heads,
               GError **error)
{
  int heads;
  if (m->cfg.num_head_channels == -1)
    {
      heads = num_heads;
      if (heads < 1 || channels % heads != 0)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                       "%s: config: %d attention heads do not divide %d channels (%s)",
                       m->origin, heads, channels, prefix);
          return FALSE;
        }
    }
  else
    {
      if (m->cfg.num_head_channels < 1 || channels % m->cfg.num_head_channels != 0)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                       "%s: config: num_head_channels %d does not divide %d channels (%s)",
                       m->origin, m->cfg.num_head_channels, channels, prefix);
          return FALSE;
        }
      heads = channels / m->cfg.num_head_channels;
    }
  Layer *l = g_new0 (Layer, 1);
  g_ptr_array_add (block->layers, l);
  l->kind = LAYER_ATTN;
  l->cin = l->cout = channels;
  l->heads = heads;
  l->head_channels = channels / heads;
  l->legacy = !m->cfg.use_new_attention_order;
  char *p = g_strconcat (prefix, ".norm", NULL);
  gboolean ok = norm_new (m, p, channels, &l->norm, error);
  g_free (p);
  if (!ok)
    return FALSE;
  p = g_strconcat (prefix, ".qkv", NULL);
  l->qkv = conv_new (m, p, channels, 3 * channels, 1, 1, 0, TRUE);
  g_free (p);
  p = g_strconcat (prefix, ".proj_out", NULL);
  l->proj = conv_new (m, p, channels, channels, 1, 1, 0, TRUE);
  g_free (p);
  return TRUE;
}

static void
resample_new (GdModel *m, Block *block, const char *prefix, int channels, LayerKind kind)
{
  Layer *l = g_new0 (Layer, 1);
  g_ptr_array_add (block->layers, l);
  l->kind = kind;
  l->cin = l->cout = channels;
  if (m->cfg.conv_resample)
    {
      l->has_conv = TRUE;
      char *p = g_strconcat (prefix, kind == LAYER_DOWN ? ".op" : ".conv", NULL);
      l->conv = conv_new (m, p, channels, channels, 3, kind == LAYER_DOWN ? 2 : 1, 1, FALSE);
      g_free (p);
    }
}

static gboolean
has_attention (const GdModelConfig *cfg, int ds)
{
  for (int i = 0; i < cfg->n_attention_resolutions; i++)
    if (cfg->attention_resolutions[i] == ds)
      return TRUE;
  return FALSE;
}

static gboolean
check_config (const GdModelConfig *cfg, const char *origin, GError **error)
{
  const char *problem = NULL;
  if (cfg->image_size < 1)
    problem = "image_size must be positive";
  else if (cfg->in_channels < 1)
    problem = "in_channels must be positive";
  else if (cfg->model_channels < 1)
    problem = "model_channels must be positive";
  else if (cfg->out_channels < 1)
    problem = "out_channels must be positive";
  else if (cfg->num_res_blocks < 0)
    problem = "num_res_blocks must not be negative";
  else if (cfg->n_levels < 1)
    problem = "channel_mult must not be empty";
  else if (cfg->num_classes < 0)
    problem = "num_classes must be positive or null";
  else if (cfg->num_head_channels == -1 && cfg->num_heads < 1)
    problem = "num_heads must be positive when num_head_channels is -1";
  else if (cfg->num_head_channels != -1 && cfg->num_head_channels < 1)
    problem = "num_head_channels must be positive or -1";
  else if (cfg->kind == GD_MODEL_CLASSIFIER && cfg->pool == GD_POOL_ATTENTION
           && cfg->num_head_channels == -1)
    problem = "attention pooling needs num_head_channels";
  for (int i = 0; i < cfg->n_levels && !problem; i++)
    if (!(cfg->channel_mult[i] * cfg->model_channels >= 1.0)
        || cfg->channel_mult[i] * cfg->model_channels > 1e6)
      problem = "every channel_mult value must give between 1 and 10^6 channels";
  if (problem)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_CONFIG, "%s: config: %s", origin, problem);
      return FALSE;
    }
  return TRUE;
}

static int
level_channels (const GdModelConfig *cfg, int level)
{
  return (int) (cfg->channel_mult[level] * cfg->model_channels);
}

static gboolean
build (GdModel *m, GError **error)
{
  const GdModelConfig *cfg = &m->cfg;
  char name[128];
  m->emb_dim = 4 * cfg->model_channels;
  m->time_embed0 = linear_new (m, "time_embed.0", cfg->model_channels, m->emb_dim);
  m->time_embed2 = linear_new (m, "time_embed.2", m->emb_dim, m->emb_dim);
  if (cfg->kind == GD_MODEL_UNET && cfg->num_classes > 0)
    m->label_emb = param_new (m, "label_emb", "weight", 2, cfg->num_classes, m->emb_dim, 0, 0);

  int ch = level_channels (cfg, 0), input_ch = ch;
  Block *first = block_new ();
  g_ptr_array_add (m->input_blocks, first);
  Layer *stem = g_new0 (Layer, 1);
  stem->kind = LAYER_CONV;
  stem->cin = cfg->in_channels;
  stem->cout = ch;
  stem->has_conv = TRUE;
  stem->conv = conv_new (m, "input_blocks.0.0", cfg->in_channels, ch, 3, 1, 1, FALSE);
  g_ptr_array_add (first->layers, stem);
  first->c = ch;

  GArray *chans = g_array_new (FALSE, FALSE, sizeof (int));
  g_array_append_val (chans, ch);
  int ds = 1;
  gboolean ok = TRUE;
  for (int level = 0; level < cfg->n_levels && ok; level++)
    {
      for (int r = 0; r < cfg->num_res_blocks && ok; r++)
        {
          Block *b = block_new ();
          g_ptr_array_add (m->input_blocks, b);
          int out = level_channels (cfg, level);
          g_snprintf (name, sizeof name, "input_blocks.%u.0", m->input_blocks->len - 1);
          ok = res_block_new (m, b, name, ch, out, RESAMPLE_NONE, error);
          ch = out;
          if (ok && has_attention (cfg, ds))
            {
              g_snprintf (name, sizeof name, "input_blocks.%u.1", m->input_blocks->len - 1);
              ok = attention_new (m, b, name, ch, cfg->num_heads, error);
            }
          b->c = ch;
          g_array_append_val (chans, ch);
        }
      if (ok && level != cfg->n_levels - 1)
        {
          Block *b = block_new ();
          g_ptr_array_add (m->input_blocks, b);
          g_snprintf (name, sizeof name, "input_blocks.%u.0", m->input_blocks->len - 1);
          if (cfg->resblock_updown)
            ok = res_block_new (m, b, name, ch, ch, RESAMPLE_DOWN, error);
          else
            resample_new (m, b, name, ch, LAYER_DOWN);
          b->c = ch;
          g_array_append_val (chans, ch);
          ds *= 2;
        }
    }
  if (ok)
    {
      ok = res_block_new (m, m->middle, "middle_block.0", ch, ch, RESAMPLE_NONE, error)
           && attention_new (m, m->middle, "middle_block.1", ch, cfg->num_heads, error)
           && res_block_new (m, m->middle, "middle_block.2", ch, ch, RESAMPLE_NONE, error);
      m->middle->c = ch;
    }
  m->final_ds = ds;

  if (ok && cfg->kind == GD_MODEL_UNET)
    {
      int heads_up = cfg->num_heads_upsample == -1 ? cfg->num_heads : cfg->num_heads_upsample;
      for (int level = cfg->n_levels - 1; level >= 0 && ok; level--)
        for (int i = 0; i <= cfg->num_res_blocks && ok; i++)
          {
            Block *b = block_new ();
            g_ptr_array_add (m->output_blocks, b);
            unsigned index = m->output_blocks->len - 1;
            int skip = g_array_index (chans, int, chans->len - 1);
            g_array_set_size (chans, chans->len - 1);
            b->skip_channels = skip;
            int out = level_channels (cfg, level);
            g_snprintf (name, sizeof name, "output_blocks.%u.0", index);
            ok = res_block_new (m, b, name, ch + skip, out, RESAMPLE_NONE, error);
            ch = out;
            int next = 1;
            if (ok && has_attention (cfg, ds))
              {
                g_snprintf (name, sizeof name, "output_blocks.%u.%d", index, next++);
                ok = attention_new (m, b, name, ch, heads_up, error);
              }
            if (ok && level && i == cfg->num_res_blocks)
              {
                g_snprintf (name, sizeof name, "output_blocks.%u.%d", index, next);
                if (cfg->resblock_updown)
                  ok = res_block_new (m, b, name, ch, ch, RESAMPLE_UP, error);
                else
                  resample_new (m, b, name, ch, LAYER_UP);
                ds /= 2;
              }
            b->c = ch;
          }
      if (ok)
        ok = norm_new (m, "out.0", ch, &m->out_norm, error);
      m->out_conv = conv_new (m, "out.2", input_ch, cfg->out_channels, 3, 1, 1, FALSE);
    }
  else if (ok)
    {
      ok = norm_new (m, "out.0", ch, &m->out_norm, error);
      if (ok && cfg->pool == GD_POOL_ADAPTIVE)
        m->out_conv = conv_new (m, "out.3", ch, cfg->out_channels, 1, 1, 0, FALSE);
      else if (ok)
        {
          /* AttentionPool2d(image_size // ds, ch, num_head_channels, out_channels) */
          int side = cfg->image_size / ds;
          if (ch % cfg->num_head_channels != 0)
            {
              g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                           "%s: config: num_head_channels %d does not divide %d channels (out.2)",
                           m->origin, cfg->num_head_channels, ch);
              ok = FALSE;
            }
          else if (side < 1)
            {
              g_set_error (error, GD_ERROR, GD_ERROR_CONFIG,
                           "%s: config: image_size %d is too small for %d downsamplings",
                           m->origin, cfg->image_size, cfg->n_levels - 1);
              ok = FALSE;
            }
          else
            {
              m->pool_heads = ch / cfg->num_head_channels;
              m->positional_embedding = param_new (m, "out.2", "positional_embedding", 2, ch,
                                                   (int64_t) side * side + 1, 0, 0);
              m->pool_qkv = conv_new (m, "out.2.qkv_proj", ch, 3 * ch, 1, 1, 0, TRUE);
              m->pool_proj = conv_new (m, "out.2.c_proj", ch, cfg->out_channels, 1, 1, 0, TRUE);
            }
        }
    }
  m->final_channels = ch;
  g_array_unref (chans);
  return ok;
}

/* The model's own buffers (not those of its layers). */
#define MODEL_BUFS (23 + N_SAVED)

static guint
model_bufs (GdModel *m, Buf *bufs[MODEL_BUFS])
{
  Buf *own[] = { &m->temb, &m->e1, &m->e1s, &m->emb, &m->head_norm, &m->head_silu,
                 &m->head_stats, &m->pooled, &m->pool_qkv_buf, &m->pool_probs, &m->pool_att,
                 &m->pool_out, &m->work, &m->dhead, &m->dtmp, &m->dtmp2, &m->demb, &m->de1,
                 &m->dxs[0], &m->dxs[1], &m->outs[0], &m->outs[1], &m->concat };
  G_STATIC_ASSERT (G_N_ELEMENTS (own) + N_SAVED == MODEL_BUFS);
  guint count = 0;
  for (guint i = 0; i < G_N_ELEMENTS (own); i++)
    bufs[count++] = own[i];
  for (int i = 0; i < N_SAVED; i++)
    bufs[count++] = &m->shared[i];
  return count;
}

GdModel *
gd_model_new (const GdModelConfig *cfg, const char *origin, GError **error)
{
  if (!check_config (cfg, origin, error))
    return NULL;
  GdModel *m = g_new0 (GdModel, 1);
  m->cfg = *cfg;
  m->origin = g_strdup (origin);
  m->params = g_ptr_array_new_with_free_func (param_free);
  m->param_by_name = g_hash_table_new (g_str_hash, g_str_equal);
  m->input_blocks = g_ptr_array_new_with_free_func (block_free);
  m->output_blocks = g_ptr_array_new_with_free_func (block_free);
  m->middle = block_new ();
  if (!build (m, error))
    {
      gd_model_free (m);
      return NULL;
    }
  for (guint i = 0; cfg->kind == GD_MODEL_UNET && i < m->input_blocks->len; i++)
    ((Block *) m->input_blocks->pdata[i])->skip_source = TRUE;
  return m;
}

void
gd_model_free (GdModel *m)
{
  if (!m)
    return;
  g_ptr_array_unref (m->input_blocks);
  g_ptr_array_unref (m->output_blocks);
  block_free (m->middle);
  g_hash_table_unref (m->param_by_name);
  g_ptr_array_unref (m->params);
  Buf *bufs[MODEL_BUFS];
  for (guint i = 0, count = model_bufs (m, bufs); i < count; i++)
    buf_clear (bufs[i]);
  for (int i = 0; i < 2; i++)
    if (m->bf16_weights[i])
      g_hash_table_unref (m->bf16_weights[i]);
  gd_safetensors_free (m->file);
  if (m->metadata)
    g_hash_table_unref (m->metadata);
  if (m->data_owner && m->data_owner_destroy)
    m->data_owner_destroy (m->data_owner);
  g_free (m->origin);
  g_free (m);
}

const GdModelConfig *gd_model_get_config (const GdModel *m) { return &m->cfg; }
const char *gd_model_get_origin (const GdModel *m) { return m->origin; }
guint gd_model_n_params (const GdModel *m) { return m->params->len; }
GdParam *gd_model_param (GdModel *m, guint i) { return m->params->pdata[i]; }

GdParam *
gd_model_find_param (GdModel *m, const char *name)
{
  return g_hash_table_lookup (m->param_by_name, name);
}

size_t
gd_model_parameter_count (const GdModel *m)
{
  size_t total = 0;
  for (guint i = 0; i < m->params->len; i++)
    total += ((GdParam *) m->params->pdata[i])->numel;
  return total;
}

const char *
gd_model_get_metadata (const GdModel *m, const char *key)
{
  const char *value = m->metadata ? g_hash_table_lookup (m->metadata, key) : NULL;
  if (!value && m->file)
    value = gd_safetensors_metadata (m->file, key);
  return value;
}

void
gd_model_set_metadata (GdModel *m, const char *key, const char *value)
{
  if (!m->metadata)
    m->metadata = g_hash_table_new_full (g_str_hash, g_str_equal, g_free, g_free);
  g_hash_table_insert (m->metadata, g_strdup (key), g_strdup (value));
}

void
gd_model_set_data_owner (GdModel *m, gpointer owner, GDestroyNotify destroy)
{
  if (m->data_owner && m->data_owner_destroy)
    m->data_owner_destroy (m->data_owner);
  m->data_owner = owner;
  m->data_owner_destroy = destroy;
}

/* Gives a parameter fresh memory of its own (its values are then set by the caller). */
static void
param_take_new_data (GdParam *p)
{
  if (p->owns_data)
    g_free (p->data);
  p->data = g_new (float, p->numel);
  p->owns_data = TRUE;
}

/* Drops the packed bf16 weights: the weights are about to change. */
static void
bf16_forget (GdModel *m)
{
  for (int i = 0; i < 2; i++)
    if (m->bf16_weights[i])
      g_hash_table_remove_all (m->bf16_weights[i]);
}

void
gd_model_init_random (GdModel *m, uint64_t seed)
{
  bf16_forget (m);
  for (guint i = 0; i < m->params->len; i++)
    {
      GdParam *p = m->params->pdata[i];
      param_take_new_data (p);
      gboolean is_bias = g_str_has_suffix (p->name, ".bias");
      if (p->ndim == 2 && (g_str_has_suffix (p->name, "positional_embedding")
                           || g_str_has_prefix (p->name, "label_emb")))
        {
          gd_random_normal (seed, i, p->data, p->numel);
          float scale = g_str_has_prefix (p->name, "label_emb") ? 1.0f : 1.0f / sqrtf ((float) p->shape[0]);
          for (size_t j = 0; j < p->numel; j++)
            p->data[j] *= scale;
          continue;
        }
      gd_random_uniform (seed, i, p->data, p->numel);
      float bound, center = 0.0f;
      if (p->ndim == 1 && !is_bias)
        {
          bound = 0.1f;    /* GroupNorm scale */
          center = 1.0f;
        }
      else if (is_bias)
        bound = 0.1f;
      else
        bound = 1.0f / sqrtf ((float) (p->numel / (size_t) p->shape[0]));
      for (size_t j = 0; j < p->numel; j++)
        p->data[j] = center + bound * (2.0f * p->data[j] - 1.0f);
    }
}

static gboolean
zero_initialised (const char *name)
{
  return strstr (name, ".out_layers.3.") || strstr (name, ".proj_out.")
         || g_str_has_prefix (name, "out.2.weight") || g_str_has_prefix (name, "out.2.bias")
         || g_str_has_prefix (name, "out.3.");
}

void
gd_model_init_training (GdModel *m, uint64_t seed)
{
  bf16_forget (m);
  for (guint i = 0; i < m->params->len; i++)
    {
      GdParam *p = m->params->pdata[i];
      param_take_new_data (p);
      gboolean is_bias = g_str_has_suffix (p->name, ".bias");
      if (zero_initialised (p->name))
        memset (p->data, 0, sizeof (float) * p->numel);
      else if (g_str_has_suffix (p->name, "positional_embedding") || g_str_has_prefix (p->name, "label_emb"))
        {
          gd_random_normal (seed, i, p->data, p->numel);
          if (g_str_has_suffix (p->name, "positional_embedding"))
            for (size_t j = 0; j < p->numel; j++)
              p->data[j] /= sqrtf ((float) p->shape[0]);
        }
      else
        {
          /* a bias shares its layer's fan-in, found from the weight of the same layer;
           * GroupNorm is the layer whose weight is 1-D */
          GdParam *weight = p;
          if (is_bias)
            {
              char *stem = g_strndup (p->name, strlen (p->name) - strlen (".bias"));
              char *weight_name = g_strconcat (stem, ".weight", NULL);
              weight = g_hash_table_lookup (m->param_by_name, weight_name);
              g_free (stem);
              g_free (weight_name);
            }
          if (weight && weight->ndim == 1)
            {
              for (size_t j = 0; j < p->numel; j++)
                p->data[j] = is_bias ? 0.0f : 1.0f;
              continue;
            }
          size_t fan_in = weight ? weight->numel / (size_t) weight->shape[0] : 1;
          float bound = 1.0f / sqrtf ((float) fan_in);
          gd_random_uniform (seed, i, p->data, p->numel);
          for (size_t j = 0; j < p->numel; j++)
            p->data[j] = bound * (2.0f * p->data[j] - 1.0f);
        }
    }
}

/* ---- loading ---- */

char *
gd_shape_text (int ndim, const int64_t *shape)
{
  GString *s = g_string_new ("[");
  for (int i = 0; i < ndim; i++)
    g_string_append_printf (s, "%s%" G_GINT64_FORMAT, i ? ", " : "", shape[i]);
  g_string_append_c (s, ']');
  return g_string_free (s, FALSE);
}

char *
gd_param_mismatch (const GdParam *p, gboolean found, int ndim, const int64_t *shape)
{
  if (!found)
    return g_strdup_printf ("missing weight '%s'", p->name);
  gboolean same = ndim == p->ndim;
  for (int d = 0; same && d < p->ndim; d++)
    same = shape[d] == p->shape[d];
  if (same)
    return NULL;
  char *want = gd_shape_text (p->ndim, p->shape), *have = gd_shape_text (ndim, shape);
  char *why = g_strdup_printf ("weight '%s' has shape %s, the architecture needs %s", p->name, have, want);
  g_free (want);
  g_free (have);
  return why;
}

static gboolean
attach_weights (GdModel *m, GdSafetensors *st, GError **error)
{
  const char *path = gd_safetensors_path (st);
  for (guint i = 0; i < m->params->len; i++)
    {
      GdParam *p = m->params->pdata[i];
      const GdStTensor *t = gd_safetensors_find (st, p->name);
      char *why = gd_param_mismatch (p, t != NULL, t ? t->ndim : 0, t ? t->shape : NULL);
      if (why)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS, "%s: %s", path, why);
          g_free (why);
          return FALSE;
        }
      if (t->dtype != GD_DTYPE_F32 && t->dtype != GD_DTYPE_F16 && t->dtype != GD_DTYPE_BF16
          && t->dtype != GD_DTYPE_F64)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS, "%s: weight '%s' has dtype %s, not a float",
                       path, p->name, gd_dtype_name (t->dtype));
          return FALSE;
        }
      if (t->dtype == GD_DTYPE_F32 && ((uintptr_t) t->data % sizeof (float)) == 0)
        {
          p->data = (float *) t->data;  /* read-only mapping: never written through */
          p->owns_data = FALSE;
        }
      else
        {
          p->data = gd_st_tensor_to_f32 (t);
          p->owns_data = TRUE;
        }
    }
  if (gd_safetensors_count (st) != m->params->len)
    for (guint i = 0; i < gd_safetensors_count (st); i++)
      {
        const GdStTensor *t = gd_safetensors_nth (st, i);
        if (!g_hash_table_contains (m->param_by_name, t->name))
          {
            g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS,
                         "%s: unexpected weight '%s' (not part of the architecture in the metadata)",
                         path, t->name);
            return FALSE;
          }
      }
  return TRUE;
}

GdModel *
gd_model_load (const char *path, GError **error)
{
  /* PyTorch checkpoints (zip or legacy pickle stream), told apart by their first bytes */
  if (gd_torch_file_is_checkpoint (path))
    return gd_torch_load_model (path, NULL, error);
  GdSafetensors *st = gd_safetensors_open (path, error);
  if (!st)
    return NULL;
  const char *kind_name = gd_safetensors_metadata (st, "kind");
  const char *config = gd_safetensors_metadata (st, "config");
  GdModelKind kind;
  if (!kind_name || !config)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT,
                   "%s: no architecture: __metadata__ needs 'kind' and 'config'", path);
      gd_safetensors_free (st);
      return NULL;
    }
  if (strcmp (kind_name, "unet") == 0)
    kind = GD_MODEL_UNET;
  else if (strcmp (kind_name, "classifier") == 0)
    kind = GD_MODEL_CLASSIFIER;
  else
    {
      g_set_error (error, GD_ERROR, GD_ERROR_FORMAT,
                   "%s: unknown model kind '%s' (unet or classifier)", path, kind_name);
      gd_safetensors_free (st);
      return NULL;
    }
  GdModelConfig cfg;
  gd_model_config_init (&cfg, kind);
  if (!gd_model_config_parse (&cfg, config, path, error))
    {
      gd_safetensors_free (st);
      return NULL;
    }
  GdModel *m = gd_model_new (&cfg, path, error);
  if (!m)
    {
      gd_safetensors_free (st);
      return NULL;
    }
  m->file = st;
  if (!attach_weights (m, st, error))
    {
      gd_model_free (m);
      return NULL;
    }
  return m;
}

/* ---- layer forward and backward ---- */

/* A convolution's weight in bfloat16, packed at first use for the forward pass or
 * (transposed) for the input gradient. */
static GdBf16Matrix *
bf16_weight (GdModel *m, const Conv *c, gboolean transposed)
{
  GdBf16Matrix *packed = g_hash_table_lookup (m->bf16_weights[transposed], c->weight);
  if (!packed)
    {
      packed = gd_conv2d_bf16_weight (transposed, c->weight->data, c->cout, c->cin, c->k,
                                      c->stride, c->pad);
      g_hash_table_insert (m->bf16_weights[transposed], c->weight, packed);
    }
  return packed;
}

static void
conv_forward (GdModel *m, const Conv *c, const float *x, int n, int h, int w, float *y)
{
  float *work = buf_get (&m->work, gd_conv2d_work_size (c->cin, c->cout, n, h, w, c->k, c->stride, c->pad));
  /* bf16 products unless parameter gradients follow */
  if (m->bf16 && m->kept != KEEP_ALL)
    {
      GdBf16Matrix *packed = bf16_weight (m, c, FALSE);
      gd_conv2d_forward_bf16 (x, n, c->cin, h, w, packed, c->bias->data, c->cout, c->k,
                              c->stride, c->pad, y, work);
      return;
    }
  gd_conv2d_forward (x, n, c->cin, h, w, c->weight->data, c->bias->data, c->cout,
                     c->k, c->stride, c->pad, y, work);
}

static void
conv_backward (GdModel *m, const Conv *c, const float *x, int n, int h, int w,
               const float *dy, float *dx)
{
  float *work = buf_get (&m->work, gd_conv2d_work_size (c->cin, c->cout, n, h, w, c->k, c->stride, c->pad));
  if (m->bf16 && !c->weight->grad && dx)
    {
      gd_conv2d_input_gradient_bf16 (dy, n, c->cin, h, w, bf16_weight (m, c, TRUE), c->cout,
                                     c->k, c->stride, c->pad, dx, work);
      return;
    }
  gd_conv2d_backward (x, n, c->cin, h, w, c->weight->data, c->cout, c->k, c->stride, c->pad,
                      dy, dx, c->weight->grad, c->bias->grad, work);
}

static int
conv_out (int size, const Conv *c)
{
  return (size + 2 * c->pad - c->k) / c->stride + 1;
}

static void
norm_forward (const Norm *nm, const float *x, int n, int hw, float *y, float *stats)
{
  gd_group_norm_forward (x, n, nm->channels, hw, GROUPS, nm->weight->data, nm->bias->data,
                         y, stats, stats + n * GROUPS);
}

/* GroupNorm (then the scale-shift ss, if not NULL) and SiLU in one pass; y (the value before
 * SiLU) may be NULL when no backward pass will read it. */
static void
norm_act_forward (const Norm *nm, const float *x, int n, int hw, const float *ss, float *y,
                  float *act, float *stats)
{
  gd_group_norm_act_forward (x, n, nm->channels, hw, GROUPS, nm->weight->data, nm->bias->data,
                             ss, y, act, stats, stats + n * GROUPS);
}

static void
norm_backward (const Norm *nm, const float *x, int n, int hw, const float *stats,
               const float *dy, float *dx)
{
  gd_group_norm_backward (x, n, nm->channels, hw, GROUPS, nm->weight->data, stats,
                          stats + n * GROUPS, dy, dx, nm->weight->grad, nm->bias->grad);
}

static void
resample_forward (int resample, const float *x, int n, int c, int h, int w, float *y)
{
  if (resample == RESAMPLE_UP)
    gd_upsample2_forward (x, n, c, h, w, y);
  else
    gd_avg_pool2_forward (x, n, c, h, w, y);
}

static void
resample_backward (int resample, int n, int c, int h, int w, const float *dy, float *dx)
{
  if (resample == RESAMPLE_UP)
    gd_upsample2_backward (n, c, h, w, dy, dx);
  else
    gd_avg_pool2_backward (n, c, h, w, dy, dx);
}

/* Where a layer's output goes: its own buffer when something reads it after the next layer
 * has run (the backward pass, or an output block through a U-Net skip), else one of two
 * buffers that the layers of an inference pass take turns on (a layer reads the other). */
static float *
layer_out (GdModel *m, Layer *l, size_t count)
{
  Buf *b = &l->out;
  if (m->kept == KEEP_NOTHING && !l->persist)
    {
      m->out_turn ^= 1;
      b = &m->outs[m->out_turn];
    }
  l->y = buf_get (b, count);
  return (float *) l->y;
}

/* Whether the backward pass of layer l reads slot k of its forward pass when it computes
 * the input gradient only: a ResBlock's h1, e and GroupNorm statistics (it computes the
 * values before each SiLU again from them and its input), the attention's qkv and
 * probabilities.  The rest (the inputs of convolutions) only parameter gradients read. */
static gboolean
input_gradient_reads (const Layer *l, int k)
{
  switch (l->kind)
    {
    case LAYER_RES:
      return k == S_H1 || k == S_E || k == S_STATS1 || k == S_STATS2;
    case LAYER_ATTN:
      return k == S_A2 || k == S_G || k == S_STATS1;
    default:
      return FALSE;
    }
}

/* Where slot k of a layer's forward results goes: the layer's own buffer when the coming
 * backward pass reads it, else a buffer shared by all layers (a layer reads only its own
 * while it runs). */
static Buf *
slot (GdModel *m, Layer *l, int k)
{
  gboolean own = m->kept == KEEP_ALL || (m->kept == KEEP_INPUT_GRADIENT && input_gradient_reads (l, k));
  return own ? &l->saved[k] : &m->shared[k];
}

static void
res_forward (GdModel *m, Layer *l, const float *x, const float *emb)
{
  int n = l->n, h = l->h, w = l->w, cin = l->cin, cout = l->cout;
  size_t in_size = (size_t) n * cin * h * w;
  if (l->resample == RESAMPLE_UP)
    l->ho = 2 * h, l->wo = 2 * w;
  else if (l->resample == RESAMPLE_DOWN)
    l->ho = h / 2, l->wo = w / 2;
  else
    l->ho = h, l->wo = w;
  int hwo = l->ho * l->wo;
  size_t out_size = (size_t) n * cout * hwo;

  /* in_layers: GroupNorm, SiLU, (resample), conv; the skip path is resampled alike */
  float *a1 = m->kept != KEEP_NOTHING ? buf_get (slot (m, l, S_A1), in_size) : NULL;
  float *a2 = buf_get (slot (m, l, S_A2), in_size);
  norm_act_forward (&l->in_norm, x, n, h * w, NULL, a1, a2,
                    buf_get (slot (m, l, S_STATS1), 2 * n * GROUPS));
  const float *a2u = a2, *xu = x;
  if (l->resample != RESAMPLE_NONE)
    {
      float *up = buf_get (slot (m, l, S_A2U), (size_t) n * cin * hwo);
      resample_forward (l->resample, a2, n, cin, h, w, up);
      float *xr = buf_get (slot (m, l, S_XU), (size_t) n * cin * hwo);
      resample_forward (l->resample, x, n, cin, h, w, xr);
      a2u = up;
      xu = xr;
    }
  float *h1 = buf_get (slot (m, l, S_H1), out_size);
  conv_forward (m, &l->in_conv, a2u, n, l->ho, l->wo, h1);

  /* emb_layers: SiLU, linear */
  float *se = buf_get (slot (m, l, S_SE), (size_t) n * m->emb_dim);
  gd_silu_forward (emb, (size_t) n * m->emb_dim, se);
  float *e = buf_get (slot (m, l, S_E), (size_t) n * l->emb_lin.out);
  gd_linear_forward (se, n, m->emb_dim, l->emb_lin.weight->data, l->emb_lin.bias->data,
                     l->emb_lin.out, e);

  /* out_layers: GroupNorm with the embedding as scale-shift (or added before it), SiLU, conv */
  float *g3 = buf_get (slot (m, l, S_G3), out_size);
  float *stats2 = buf_get (slot (m, l, S_STATS2), 2 * n * GROUPS);
  /* one pass when nothing reads the steps in between */
  gboolean fused_scale_shift = m->kept == KEEP_NOTHING && l->scale_shift;
  float *g = fused_scale_shift ? NULL : buf_get (slot (m, l, S_G), out_size);
  if (m->kept == KEEP_NOTHING)
    {
      if (fused_scale_shift)
        norm_act_forward (&l->out_norm, h1, n, hwo, e, NULL, g3, stats2);
      else
        {
          gd_add_channel_bias_forward (h1, n, cout, hwo, e, g);
          norm_act_forward (&l->out_norm, g, n, hwo, NULL, NULL, g3, stats2);
        }
    }
  else if (l->scale_shift)
    {
      float *g2 = buf_get (slot (m, l, S_G2), out_size);
      norm_forward (&l->out_norm, h1, n, hwo, g, stats2);
      gd_scale_shift_forward (g, n, cout, hwo, e, g2);
      gd_silu_forward (g2, out_size, g3);
    }
  else
    {
      float *g2 = buf_get (slot (m, l, S_G2), out_size);
      gd_add_channel_bias_forward (h1, n, cout, hwo, e, g);
      norm_act_forward (&l->out_norm, g, n, hwo, NULL, g2, g3, stats2);
    }
  float *out = layer_out (m, l, out_size);
  conv_forward (m, &l->out_conv, g3, n, l->ho, l->wo, out);
  if (l->has_skip)
    {
      float *skip = buf_get (slot (m, l, S_SKIP), out_size);
      conv_forward (m, &l->skip, xu, n, l->ho, l->wo, skip);
      gd_accumulate (out, skip, out_size);
    }
  else
    gd_accumulate (out, xu, out_size);
}

/* The input gradient of the layer whose backward pass runs.  Two buffers take turns: a
 * layer reads the gradient the layer after it wrote, never the one it writes, and nothing
 * reads a layer's input gradient after the layer before it has run. */
static float *
layer_dx (GdModel *m, size_t count)
{
  m->dx_turn ^= 1;
  return buf_get (&m->dxs[m->dx_turn], count);
}

/* The values before each SiLU of a ResBlock (a1; g and the scale-shifted g2), computed again
 * into the shared buffers exactly as its forward pass computed them, from what a forward
 * that kept only what the input gradient reads left: the block's input, h1 and e. */
static void
res_recompute (GdModel *m, Layer *l)
{
  int n = l->n, hw = l->h * l->w, hwo = l->ho * l->wo, cout = l->cout;
  size_t in_size = (size_t) n * l->cin * hw, out_size = (size_t) n * cout * hwo;
  Buf *sh = m->shared;
  float *stats = buf_get (&sh[S_STATS1], 2 * n * GROUPS);
  norm_act_forward (&l->in_norm, l->x, n, hw, NULL, buf_get (&sh[S_A1], in_size),
                    buf_get (&sh[S_A2], in_size), stats);
  const float *h1 = l->saved[S_H1].data, *e = l->saved[S_E].data;
  float *g = buf_get (&sh[S_G], out_size), *g2 = buf_get (&sh[S_G2], out_size);
  if (l->scale_shift)
    {
      norm_forward (&l->out_norm, h1, n, hwo, g, stats);
      gd_scale_shift_forward (g, n, cout, hwo, e, g2);
    }
  else
    {
      gd_add_channel_bias_forward (h1, n, cout, hwo, e, g);
      norm_act_forward (&l->out_norm, g, n, hwo, NULL, g2, buf_get (&sh[S_G3], out_size), stats);
    }
}

static const float *
res_backward (GdModel *m, Layer *l, const float *dy, float *demb)
{
  int n = l->n, h = l->h, w = l->w, cin = l->cin, cout = l->cout, hwo = l->ho * l->wo;
  size_t in_size = (size_t) n * cin * h * w, out_size = (size_t) n * cout * hwo;
  size_t in_resampled = (size_t) n * cin * hwo;
  Buf *s = l->saved;
  /* a1, g and g2: kept, or computed again */
  const Buf *pre = s;
  if (m->kept != KEEP_ALL)
    {
      res_recompute (m, l);
      pre = m->shared;
    }
  const float *x = l->x;
  const float *xu = l->resample != RESAMPLE_NONE ? s[S_XU].data : x;
  const float *a2u = l->resample != RESAMPLE_NONE ? s[S_A2U].data : s[S_A2].data;

  float *dg = buf_get (&m->shared[S_T0], out_size);
  conv_backward (m, &l->out_conv, s[S_G3].data, n, l->ho, l->wo, dy, dg);
  gd_silu_backward (pre[S_G2].data, out_size, dg, dg);
  float *dh1 = buf_get (&m->shared[S_T1], out_size);
  float *de = buf_zero (&m->shared[S_T2], (size_t) n * l->emb_lin.out);
  const float *stats2 = s[S_STATS2].data;
  if (l->scale_shift)
    {
      float *dnorm = buf_get (&m->shared[S_T3], out_size);
      gd_scale_shift_backward (pre[S_G].data, n, cout, hwo, s[S_E].data, dg, dnorm, de);
      norm_backward (&l->out_norm, s[S_H1].data, n, hwo, stats2, dnorm, dh1);
    }
  else
    {
      norm_backward (&l->out_norm, pre[S_G].data, n, hwo, stats2, dg, dh1);
      gd_add_channel_bias_backward (n, cout, hwo, dh1, NULL, de);
    }
  if (demb || l->emb_lin.weight->grad)
    {
      float *dse = buf_get (&m->shared[S_T3], (size_t) n * m->emb_dim);
      gd_linear_backward (s[S_SE].data, n, m->emb_dim, l->emb_lin.weight->data, l->emb_lin.out,
                          de, dse, l->emb_lin.weight->grad, l->emb_lin.bias->grad);
      if (demb)
        {
          gd_silu_backward (l->emb, (size_t) n * m->emb_dim, dse, dse);
          gd_accumulate (demb, dse, (size_t) n * m->emb_dim);
        }
    }
  float *da = buf_get (&m->shared[S_T0], MAX (in_resampled, in_size));
  conv_backward (m, &l->in_conv, a2u, n, l->ho, l->wo, dh1, da);
  float *dx = layer_dx (m, in_size);
  float *dskip = buf_get (&m->shared[S_T1], MAX (in_resampled, in_size));
  if (l->has_skip)
    conv_backward (m, &l->skip, xu, n, l->ho, l->wo, dy, dskip);
  else
    memcpy (dskip, dy, sizeof (float) * out_size);
  float *da2 = da;
  if (l->resample != RESAMPLE_NONE)
    {
      da2 = buf_get (&m->shared[S_T3], in_size);
      resample_backward (l->resample, n, cin, h, w, da, da2);
      resample_backward (l->resample, n, cin, h, w, dskip, da);  /* da is free again */
      dskip = da;
    }
  gd_silu_backward (pre[S_A1].data, in_size, da2, da2);
  norm_backward (&l->in_norm, x, n, h * w, s[S_STATS1].data, da2, dx);
  gd_accumulate (dx, dskip, in_size);
  return dx;
}

static void
attn_forward (GdModel *m, Layer *l, const float *x)
{
  int n = l->n, c = l->cin, L = l->h * l->w;
  size_t size = (size_t) n * c * L;
  l->ho = l->h;
  l->wo = l->w;
  float *a = buf_get (slot (m, l, S_A1), size);
  norm_forward (&l->norm, x, n, L, a, buf_get (slot (m, l, S_STATS1), 2 * n * GROUPS));
  float *qkv = buf_get (slot (m, l, S_A2), 3 * size);
  conv_forward (m, &l->qkv, a, n, L, 1, qkv);
  /* the probabilities only for a backward pass; else a head's at a time, inside */
  float *probs = m->kept != KEEP_NOTHING ? buf_get (slot (m, l, S_G), (size_t) n * l->heads * L * L) : NULL;
  float *att = buf_get (slot (m, l, S_G2), size);
  gd_attention_forward (qkv, n, l->heads, l->head_channels, L, l->legacy, att, probs);
  float *out = layer_out (m, l, size);
  conv_forward (m, &l->proj, att, n, L, 1, out);
  gd_accumulate (out, x, size);
}

static const float *
attn_backward (GdModel *m, Layer *l, const float *dy)
{
  int n = l->n, c = l->cin, L = l->h * l->w;
  size_t size = (size_t) n * c * L;
  Buf *s = l->saved;
  float *datt = buf_get (&m->shared[S_T0], size);
  conv_backward (m, &l->proj, s[S_G2].data, n, L, 1, dy, datt);
  float *dqkv = buf_get (&m->shared[S_T1], 3 * size);
  gd_attention_backward (s[S_A2].data, n, l->heads, l->head_channels, L, l->legacy,
                         s[S_G].data, datt, dqkv);
  float *da = buf_get (&m->shared[S_T0], size);
  conv_backward (m, &l->qkv, s[S_A1].data, n, L, 1, dqkv, da);
  float *dx = layer_dx (m, size);
  norm_backward (&l->norm, l->x, n, L, s[S_STATS1].data, da, dx);
  gd_accumulate (dx, dy, size);
  return dx;
}

/* CONV (the stem), DOWN (strided conv or average pool), UP (nearest, then optional conv). */
static void
plain_forward (GdModel *m, Layer *l, const float *x)
{
  int n = l->n, h = l->h, w = l->w;
  if (l->kind == LAYER_UP)
    {
      l->ho = 2 * h;
      l->wo = 2 * w;
      size_t size = (size_t) n * l->cin * l->ho * l->wo;
      float *up = l->has_conv ? buf_get (slot (m, l, S_A1), size) : layer_out (m, l, size);
      gd_upsample2_forward (x, n, l->cin, h, w, up);
      if (l->has_conv)
        conv_forward (m, &l->conv, up, n, l->ho, l->wo, layer_out (m, l, size));
    }
  else if (l->has_conv)
    {
      l->ho = conv_out (h, &l->conv);
      l->wo = conv_out (w, &l->conv);
      conv_forward (m, &l->conv, x, n, h, w,
                    layer_out (m, l, (size_t) n * l->cout * l->ho * l->wo));
    }
  else
    {
      l->ho = h / 2;
      l->wo = w / 2;
      gd_avg_pool2_forward (x, n, l->cin, h, w, layer_out (m, l, (size_t) n * l->cin * l->ho * l->wo));
    }
}

static const float *
plain_backward (GdModel *m, Layer *l, const float *dy)
{
  int n = l->n, h = l->h, w = l->w;
  float *dx = layer_dx (m, (size_t) n * l->cin * h * w);
  if (l->kind == LAYER_UP)
    {
      if (l->has_conv)
        {
          float *dup = buf_get (&m->shared[S_T0], (size_t) n * l->cin * l->ho * l->wo);
          conv_backward (m, &l->conv, l->saved[S_A1].data, n, l->ho, l->wo, dy, dup);
          dy = dup;
        }
      gd_upsample2_backward (n, l->cin, h, w, dy, dx);
    }
  else if (l->has_conv)
    conv_backward (m, &l->conv, l->x, n, h, w, dy, dx);
  else
    gd_avg_pool2_backward (n, l->cin, h, w, dy, dx);
  return dx;
}

static const float *
layer_forward (GdModel *m, Layer *l, const float *x, int n, int h, int w, const float *emb)
{
  l->x = x;
  l->emb = emb;
  l->n = n;
  l->h = h;
  l->w = w;
  switch (l->kind)
    {
    case LAYER_RES: res_forward (m, l, x, emb); break;
    case LAYER_ATTN: attn_forward (m, l, x); break;
    default: plain_forward (m, l, x); break;
    }
  return l->y;
}

static const float *
layer_backward (GdModel *m, Layer *l, const float *dy, float *demb)
{
  switch (l->kind)
    {
    case LAYER_RES: return res_backward (m, l, dy, demb);
    case LAYER_ATTN: return attn_backward (m, l, dy);
    default: return plain_backward (m, l, dy);
    }
}

static const float *
block_forward (GdModel *m, Block *b, const float *x, int n, int *h, int *w, const float *emb)
{
  for (guint i = 0; i < b->layers->len; i++)
    {
      Layer *l = b->layers->pdata[i];
      l->persist = b->skip_source && i + 1 == b->layers->len;
      x = layer_forward (m, l, x, n, *h, *w, emb);
      *h = l->ho;
      *w = l->wo;
    }
  b->out = x;
  b->h = *h;
  b->w = *w;
  return x;
}

static const float *
block_backward (GdModel *m, Block *b, const float *dy, float *demb)
{
  for (guint i = b->layers->len; i-- > 0;)
    dy = layer_backward (m, b->layers->pdata[i], dy, demb);
  return dy;
}

/* ---- whole networks ---- */

static int
downsamplings (const GdModelConfig *cfg)
{
  return cfg->n_levels - 1;
}

gboolean
gd_model_check_input (const GdModel *m, int n, int c, int h, int w, const int64_t *y,
                      GError **error)
{
  const GdModelConfig *cfg = &m->cfg;
  int factor = 1 << downsamplings (cfg);
  if (n < 1 || h < 1 || w < 1)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "input of shape [%d, %d, %d, %d] is empty",
                   n, c, h, w);
      return FALSE;
    }
  if (c != cfg->in_channels)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "input of shape [%d, %d, %d, %d] does not fit %s: it takes %d channels",
                   n, c, h, w, m->origin, cfg->in_channels);
      return FALSE;
    }
  if (cfg->kind == GD_MODEL_CLASSIFIER && cfg->pool == GD_POOL_ATTENTION
      && (h != cfg->image_size || w != cfg->image_size))
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "input of %dx%d does not fit %s: its attention pooling needs %dx%d",
                   h, w, m->origin, cfg->image_size, cfg->image_size);
      return FALSE;
    }
  if (h % factor != 0 || w % factor != 0)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "input of %dx%d does not fit %s: height and width must be multiples of %d",
                   h, w, m->origin, factor);
      return FALSE;
    }
  if (cfg->kind == GD_MODEL_UNET && cfg->num_classes > 0)
    {
      if (!y)
        {
          g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                       "%s is class-conditional: class labels y are needed", m->origin);
          return FALSE;
        }
      for (int i = 0; i < n; i++)
        if (y[i] < 0 || y[i] >= cfg->num_classes)
          {
            g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                         "class label %" G_GINT64_FORMAT " is out of range for %s (0 to %d)",
                         y[i], m->origin, cfg->num_classes - 1);
            return FALSE;
          }
    }
  for (guint i = 0; i < m->params->len; i++)
    if (!((GdParam *) m->params->pdata[i])->data)
      {
        g_set_error (error, GD_ERROR, GD_ERROR_WEIGHTS, "%s: weight '%s' has no value",
                     m->origin, ((GdParam *) m->params->pdata[i])->name);
        return FALSE;
      }
  return TRUE;
}

/* emb = time_embed(timestep_embedding(t)) (+ label_emb(y)) */
static const float *
embed (GdModel *m, const int64_t *t, const int64_t *y, int n)
{
  int mc = m->cfg.model_channels, E = m->emb_dim;
  float *temb = buf_get (&m->temb, (size_t) n * mc);
  gd_timestep_embedding (t, n, mc, temb);
  float *e1 = buf_get (&m->e1, (size_t) n * E);
  gd_linear_forward (temb, n, mc, m->time_embed0.weight->data, m->time_embed0.bias->data, E, e1);
  float *e1s = buf_get (&m->e1s, (size_t) n * E);
  gd_silu_forward (e1, (size_t) n * E, e1s);
  float *emb = buf_get (&m->emb, (size_t) n * E);
  gd_linear_forward (e1s, n, E, m->time_embed2.weight->data, m->time_embed2.bias->data, E, emb);
  if (m->label_emb && y)
    for (int i = 0; i < n; i++)
      gd_accumulate (emb + (size_t) i * E, m->label_emb->data + (size_t) y[i] * E, E);
  return emb;
}

/* Input blocks and middle block; returns the trunk output. */
static const float *
trunk_forward (GdModel *m, const float *x, int n, int *h, int *w, const float *emb)
{
  for (guint i = 0; i < m->input_blocks->len; i++)
    x = block_forward (m, m->input_blocks->pdata[i], x, n, h, w, emb);
  x = block_forward (m, m->middle, x, n, h, w, emb);
  m->trunk_out = x;
  m->trunk_h = *h;
  m->trunk_w = *w;
  return x;
}

static void
unet_forward (GdModel *m, const float *x, int n, int h, int w, const float *emb, float *out)
{
  x = trunk_forward (m, x, n, &h, &w, emb);
  int c = m->middle->c;
  for (guint i = 0; i < m->output_blocks->len; i++)
    {
      Block *b = m->output_blocks->pdata[i];
      Block *skip = m->input_blocks->pdata[m->input_blocks->len - 1 - i];
      /* th.cat([h, hs.pop()], dim=1) */
      size_t hw = (size_t) h * w;
      float *cat = buf_get (m->kept == KEEP_NOTHING ? &m->concat : &b->concat,
                            (size_t) n * (c + b->skip_channels) * hw);
      for (int j = 0; j < n; j++)
        {
          memcpy (cat + (size_t) j * (c + b->skip_channels) * hw, x + (size_t) j * c * hw,
                  sizeof (float) * c * hw);
          memcpy (cat + ((size_t) j * (c + b->skip_channels) + c) * hw,
                  skip->out + (size_t) j * b->skip_channels * hw,
                  sizeof (float) * b->skip_channels * hw);
        }
      x = block_forward (m, b, cat, n, &h, &w, emb);
      c = b->c;
    }
  size_t size = (size_t) n * c * h * w;
  float *normed = m->kept != KEEP_NOTHING ? buf_get (&m->head_norm, size) : NULL;
  float *act = buf_get (&m->head_silu, size);
  norm_act_forward (&m->out_norm, x, n, h * w, NULL, normed, act,
                    buf_get (&m->head_stats, 2 * n * GROUPS));
  m->trunk_out = x;   /* for a U-Net: the input of the output head */
  m->trunk_h = h;
  m->trunk_w = w;
  conv_forward (m, &m->out_conv, act, n, h, w, out);
}

/* The classifier head: GroupNorm, SiLU, then adaptive average pooling + 1x1 conv, or
 * AttentionPool2d (the mean token prepended, positional embedding, QKV attention with
 * the new head order, output projection, first token). */
static void
classifier_head_forward (GdModel *m, const float *x, int n, int h, int w, float *logits)
{
  int c = m->final_channels, hw = h * w, classes = m->cfg.out_channels;
  size_t size = (size_t) n * c * hw;
  float *normed = m->kept != KEEP_NOTHING ? buf_get (&m->head_norm, size) : NULL;
  float *act = buf_get (&m->head_silu, size);
  norm_act_forward (&m->out_norm, x, n, hw, NULL, normed, act,
                    buf_get (&m->head_stats, 2 * n * GROUPS));
  if (m->cfg.pool == GD_POOL_ADAPTIVE)
    {
      float *pooled = buf_get (&m->pooled, (size_t) n * c);
      for (size_t ic = 0; ic < (size_t) n * c; ic++)
        {
          double sum = 0.0;
          for (int s = 0; s < hw; s++)
            sum += act[ic * hw + s];
          pooled[ic] = (float) (sum / hw);
        }
      conv_forward (m, &m->out_conv, pooled, n, 1, 1, logits);
      return;
    }
  int L = hw + 1;
  float *tokens = buf_get (&m->pooled, (size_t) n * c * L);
  const float *pos = m->positional_embedding->data;
  for (int i = 0; i < n; i++)
    for (int ch = 0; ch < c; ch++)
      {
        const float *src = act + ((size_t) i * c + ch) * hw;
        float *dst = tokens + ((size_t) i * c + ch) * L;
        double sum = 0.0;
        for (int s = 0; s < hw; s++)
          sum += src[s];
        dst[0] = (float) (sum / hw) + pos[(size_t) ch * L];
        for (int s = 0; s < hw; s++)
          dst[1 + s] = src[s] + pos[(size_t) ch * L + 1 + s];
      }
  float *qkv = buf_get (&m->pool_qkv_buf, (size_t) n * 3 * c * L);
  conv_forward (m, &m->pool_qkv, tokens, n, L, 1, qkv);
  float *probs = buf_get (&m->pool_probs, (size_t) n * m->pool_heads * L * L);
  float *att = buf_get (&m->pool_att, (size_t) n * c * L);
  gd_attention_forward (qkv, n, m->pool_heads, c / m->pool_heads, L, FALSE, att, probs);
  float *proj = buf_get (&m->pool_out, (size_t) n * classes * L);
  conv_forward (m, &m->pool_proj, att, n, L, 1, proj);
  for (int i = 0; i < n; i++)
    for (int k = 0; k < classes; k++)
      logits[(size_t) i * classes + k] = proj[((size_t) i * classes + k) * L];
}

/* dlogits -> gradient at the trunk output. */
static const float *
classifier_head_backward (GdModel *m, const float *dlogits, int n, int h, int w)
{
  int c = m->final_channels, hw = h * w, classes = m->cfg.out_channels;
  size_t size = (size_t) n * c * hw;
  float *dact = buf_get (&m->dtmp, size);
  if (m->cfg.pool == GD_POOL_ADAPTIVE)
    {
      float *dpooled = buf_get (&m->dtmp2, (size_t) n * c);
      conv_backward (m, &m->out_conv, m->pooled.data, n, 1, 1, dlogits, dpooled);
      for (size_t ic = 0; ic < (size_t) n * c; ic++)
        for (int s = 0; s < hw; s++)
          dact[ic * hw + s] = dpooled[ic] / hw;
    }
  else
    {
      int L = hw + 1;
      float *dproj = buf_zero (&m->dhead, (size_t) n * classes * L);
      for (int i = 0; i < n; i++)
        for (int k = 0; k < classes; k++)
          dproj[((size_t) i * classes + k) * L] = dlogits[(size_t) i * classes + k];
      float *datt = buf_get (&m->dtmp2, (size_t) n * c * L);
      conv_backward (m, &m->pool_proj, m->pool_att.data, n, L, 1, dproj, datt);
      float *dqkv = buf_get (&m->dhead, (size_t) n * 3 * c * L);
      gd_attention_backward (m->pool_qkv_buf.data, n, m->pool_heads, c / m->pool_heads, L, FALSE,
                             m->pool_probs.data, datt, dqkv);
      float *dtokens = buf_get (&m->dtmp2, (size_t) n * c * L);
      conv_backward (m, &m->pool_qkv, m->pooled.data, n, L, 1, dqkv, dtokens);
      float *dpos = m->positional_embedding->grad;
      for (int i = 0; i < n; i++)
        for (int ch = 0; ch < c; ch++)
          {
            const float *src = dtokens + ((size_t) i * c + ch) * L;
            float *dst = dact + ((size_t) i * c + ch) * hw;
            float mean_share = src[0] / hw;
            for (int s = 0; s < hw; s++)
              dst[s] = src[1 + s] + mean_share;
            if (dpos)
              gd_accumulate (dpos + (size_t) ch * L, src, L);
          }
    }
  gd_silu_backward (m->head_norm.data, size, dact, dact);
  float *dx = buf_get (&m->dhead, size);
  norm_backward (&m->out_norm, m->trunk_out, n, hw, m->head_stats.data, dact, dx);
  return dx;
}

static gboolean
model_forward (GdModel *m, const float *x, int n, int h, int w, const int64_t *t,
               const int64_t *y, float *out, Keep keep, GError **error)
{
  if (!gd_model_check_input (m, n, m->cfg.in_channels, h, w, y, error))
    return FALSE;
  m->kept = keep;
  m->out_turn = 0;   /* every pass takes the same turns: the buffers fit it after one */
  m->n = n;
  m->h = h;
  m->w = w;
  m->labels = m->cfg.kind == GD_MODEL_UNET ? y : NULL;
  const float *emb = embed (m, t, m->cfg.kind == GD_MODEL_UNET ? y : NULL, n);
  if (m->cfg.kind == GD_MODEL_UNET)
    unet_forward (m, x, n, h, w, emb, out);
  else
    {
      int th = h, tw = w;
      const float *features = trunk_forward (m, x, n, &th, &tw, emb);
      classifier_head_forward (m, features, n, th, tw, out);
    }
  return TRUE;
}

gboolean
gd_model_forward (GdModel *m, const float *x, int n, int h, int w,
                  const int64_t *t, const int64_t *y, float *out, GError **error)
{
  Keep keep = m->grads ? KEEP_ALL : m->inference ? KEEP_NOTHING : KEEP_INPUT_GRADIENT;
  return model_forward (m, x, n, h, w, t, y, out, keep, error);
}

void
gd_model_set_inference (GdModel *m, gboolean inference)
{
  if (m->inference == inference)
    return;
  m->inference = inference;
  if (!inference)
    return;
  /* what earlier forward passes kept for a backward pass is not needed any more */
  m->kept = KEEP_NOTHING;
  GPtrArray *groups[] = { m->input_blocks, m->output_blocks };
  for (guint g = 0; g < G_N_ELEMENTS (groups); g++)
    for (guint b = 0; groups[g] && b < groups[g]->len; b++)
      block_release_saved (groups[g]->pdata[b]);
  if (m->middle)
    block_release_saved (m->middle);
  buf_clear (&m->dxs[0]);
  buf_clear (&m->dxs[1]);
}

static size_t
block_buffer_bytes (const Block *b)
{
  size_t count = b->concat.capacity + b->dskip.capacity;
  for (guint i = 0; i < b->layers->len; i++)
    {
      const Layer *l = b->layers->pdata[i];
      count += l->out.capacity;
      for (int k = 0; k < N_SAVED; k++)
        count += l->saved[k].capacity;
    }
  return count * sizeof (float);
}

size_t
gd_model_buffer_bytes (const GdModel *m)
{
  size_t bytes = 0;
  const GPtrArray *groups[] = { m->input_blocks, m->output_blocks };
  for (guint g = 0; g < G_N_ELEMENTS (groups); g++)
    for (guint b = 0; b < groups[g]->len; b++)
      bytes += block_buffer_bytes (groups[g]->pdata[b]);
  if (m->middle)
    bytes += block_buffer_bytes (m->middle);
  Buf *bufs[MODEL_BUFS];
  for (guint i = 0, count = model_bufs ((GdModel *) m, bufs); i < count; i++)
    bytes += bufs[i]->capacity * sizeof (float);
  return bytes;
}

gboolean
gd_model_set_bf16 (GdModel *m, gboolean bf16, GError **error)
{
  if (bf16 && !gd_bf16_kernel ())
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                   "bf16 needs a processor with AMX-BF16 or AVX512-BF16, which this one lacks");
      return FALSE;
    }
  if (m->bf16 == bf16)
    return TRUE;
  m->bf16 = bf16;
  /* made again from the weights as they are now at the next bf16 pass */
  for (int i = 0; i < 2; i++)
    {
      g_clear_pointer (&m->bf16_weights[i], g_hash_table_unref);
      if (bf16)
        m->bf16_weights[i] = g_hash_table_new_full (NULL, NULL, NULL,
                                                    (GDestroyNotify) gd_bf16_matrix_free);
    }
  return TRUE;
}

gboolean
gd_model_get_bf16 (const GdModel *m)
{
  return m->bf16;
}

gboolean
gd_model_get_inference (const GdModel *m)
{
  return m->inference;
}

/* Backward of emb = time_embed(timestep_embedding(t)) (+ label_emb(y)): parameter
 * gradients only (t and y are integers). */
static void
embed_backward (GdModel *m, const float *demb, int n)
{
  int mc = m->cfg.model_channels, E = m->emb_dim;
  if (m->label_emb && m->label_emb->grad && m->labels)
    for (int i = 0; i < n; i++)
      gd_accumulate (m->label_emb->grad + (size_t) m->labels[i] * E, demb + (size_t) i * E, E);
  float *de1 = buf_get (&m->de1, (size_t) n * E);
  gd_linear_backward (m->e1s.data, n, E, m->time_embed2.weight->data, E, demb, de1,
                      m->time_embed2.weight->grad, m->time_embed2.bias->grad);
  gd_silu_backward (m->e1.data, (size_t) n * E, de1, de1);
  gd_linear_backward (m->temb.data, n, mc, m->time_embed0.weight->data, E, de1, NULL,
                      m->time_embed0.weight->grad, m->time_embed0.bias->grad);
}

/* dout: gradient at the U-Net output -> gradient at its input, through the output head,
 * the output blocks (splitting each concatenation into the running path and its skip),
 * the middle block and the input blocks (each receiving its skip gradient as well). */
static const float *
unet_backward (GdModel *m, const float *dout, float *demb)
{
  int n = m->n, h = m->trunk_h, w = m->trunk_w, c = m->final_channels;
  size_t size = (size_t) n * c * h * w;
  float *dact = buf_get (&m->dtmp, size);
  conv_backward (m, &m->out_conv, m->head_silu.data, n, h, w, dout, dact);
  gd_silu_backward (m->head_norm.data, size, dact, dact);
  float *dh = buf_get (&m->dhead, size);
  norm_backward (&m->out_norm, m->trunk_out, n, h * w, m->head_stats.data, dact, dh);
  const float *dy = dh;
  guint blocks = m->output_blocks->len;
  for (guint i = blocks; i-- > 0;)
    {
      Block *b = m->output_blocks->pdata[i];
      Block *skip = m->input_blocks->pdata[blocks - 1 - i];
      Layer *first = b->layers->pdata[0];
      const float *dcat = block_backward (m, b, dy, demb);
      int running = first->cin - b->skip_channels;
      size_t hw = (size_t) first->h * first->w;
      float *dskip = buf_get (&skip->dskip, (size_t) n * b->skip_channels * hw);
      float *drun = buf_get (&b->dskip, (size_t) n * running * hw);
      for (int j = 0; j < n; j++)
        {
          const float *src = dcat + (size_t) j * first->cin * hw;
          memcpy (drun + (size_t) j * running * hw, src, sizeof (float) * running * hw);
          memcpy (dskip + (size_t) j * b->skip_channels * hw, src + (size_t) running * hw,
                  sizeof (float) * b->skip_channels * hw);
        }
      dy = drun;
    }
  dy = block_backward (m, m->middle, dy, demb);
  for (guint j = m->input_blocks->len; j-- > 0;)
    {
      Block *b = m->input_blocks->pdata[j];
      /* d out_j = d (input of the next block) + d skip_j, summed in the next block's
       * input-gradient buffer, which nothing reads again */
      float *sum = (float *) dy;
      gd_accumulate (sum, b->dskip.data, (size_t) n * b->c * b->h * b->w);
      dy = block_backward (m, b, sum, demb);
    }
  return dy;
}

gboolean
gd_model_backward (GdModel *m, const float *dout, float *dx)
{
  if (m->kept == KEEP_NOTHING || (m->grads && m->kept != KEEP_ALL))
    {
      g_critical ("%s: a backward pass needs a forward pass that kept its activations "
                  "(the model is in inference mode), one that kept what parameter gradients read when "
                  "they are enabled", m->origin);
      return FALSE;
    }
  int n = m->n;
  m->dx_turn = 0;
  float *demb = m->grads ? buf_zero (&m->demb, (size_t) n * m->emb_dim) : NULL;
  const float *dy;
  if (m->cfg.kind == GD_MODEL_UNET)
    dy = unet_backward (m, dout, demb);
  else
    {
      dy = classifier_head_backward (m, dout, n, m->trunk_h, m->trunk_w);
      dy = block_backward (m, m->middle, dy, demb);
      for (guint i = m->input_blocks->len; i-- > 0;)
        dy = block_backward (m, m->input_blocks->pdata[i], dy, demb);
    }
  if (demb)
    embed_backward (m, demb, n);
  if (dx)
    memcpy (dx, dy, sizeof (float) * (size_t) n * m->cfg.in_channels * m->h * m->w);
  return TRUE;
}

int
gd_classifier_feature_size (const GdModel *m)
{
  return m->final_channels;
}

gboolean
gd_classifier_features (GdModel *m, const float *x, int n, int h, int w, const int64_t *t,
                        float *logits, float *features, GError **error)
{
  if (m->cfg.kind != GD_MODEL_CLASSIFIER)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s is not a classifier", m->origin);
      return FALSE;
    }
  float *own = logits ? logits : g_new (float, (size_t) n * m->cfg.out_channels);
  gboolean ok = gd_model_forward (m, x, n, h, w, t, NULL, own, error);
  if (ok)
    {
      int c = m->final_channels;
      if (m->cfg.pool == GD_POOL_ADAPTIVE)
        memcpy (features, m->pooled.data, sizeof (float) * (size_t) n * c);
      else
        {
          int L = m->trunk_h * m->trunk_w + 1;
          for (size_t ic = 0; ic < (size_t) n * c; ic++)
            features[ic] = m->pool_att.data[ic * L];
        }
    }
  if (!logits)
    g_free (own);
  return ok;
}

void
gd_model_enable_grads (GdModel *m)
{
  for (guint i = 0; i < m->params->len; i++)
    {
      GdParam *p = m->params->pdata[i];
      if (!p->grad)
        p->grad = g_new0 (float, p->numel);
    }
  m->grads = TRUE;
}

void
gd_model_zero_grads (GdModel *m)
{
  for (guint i = 0; i < m->params->len; i++)
    {
      GdParam *p = m->params->pdata[i];
      if (p->grad)
        memset (p->grad, 0, sizeof (float) * p->numel);
    }
}

gboolean
gd_classifier_gradient (GdModel *m, const float *x, int n, int h, int w,
                        const int64_t *t, const int64_t *y,
                        float *logits, float *grad, GError **error)
{
  const GdModelConfig *cfg = &m->cfg;
  if (cfg->kind != GD_MODEL_CLASSIFIER)
    {
      g_set_error (error, GD_ERROR, GD_ERROR_INPUT, "%s is not a classifier", m->origin);
      return FALSE;
    }
  int classes = cfg->out_channels;
  for (int i = 0; i < n; i++)
    if (y[i] < 0 || y[i] >= classes)
      {
        g_set_error (error, GD_ERROR, GD_ERROR_INPUT,
                     "class label %" G_GINT64_FORMAT " is out of range for %s (0 to %d)",
                     y[i], m->origin, classes - 1);
        return FALSE;
      }
  float *own_logits = logits ? logits : g_new (float, (size_t) n * classes);
  gboolean ok = model_forward (m, x, n, h, w, t, NULL, own_logits,
                               m->grads ? KEEP_ALL : KEEP_INPUT_GRADIENT, error);
  if (ok)
    {
      /* d/dlogits of log_softmax(logits)[y] = onehot(y) - softmax(logits) */
      float *dlogits = g_new (float, (size_t) n * classes);
      gd_log_softmax (own_logits, n, classes, dlogits);
      for (int i = 0; i < n; i++)
        for (int k = 0; k < classes; k++)
          {
            float *d = &dlogits[(size_t) i * classes + k];
            *d = (k == y[i] ? 1.0f : 0.0f) - expf (*d);
          }
      gd_model_backward (m, dlogits, grad);
      g_free (dlogits);
    }
  if (!logits)
    g_free (own_logits);
  return ok;
}
