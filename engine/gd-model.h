/* The networks of guided diffusion: the ADM U-Net (UNetModel) and the noisy classifier
 * (EncoderUNetModel), built from the reference's constructor arguments, with parameters
 * named as in its PyTorch state_dict. */
#pragma once
#include <glib.h>
#include <stdint.h>

G_BEGIN_DECLS

typedef enum { GD_MODEL_UNET, GD_MODEL_CLASSIFIER } GdModelKind;
typedef enum { GD_POOL_ADAPTIVE, GD_POOL_ATTENTION } GdPool;

#define GD_MAX_LEVELS 8
#define GD_MAX_ATTENTION_RESOLUTIONS 8

typedef struct {
  GdModelKind kind;
  int image_size;
  int in_channels;
  int model_channels;
  int out_channels;
  int num_res_blocks;
  int attention_resolutions[GD_MAX_ATTENTION_RESOLUTIONS]; /* downsample rates ds */
  int n_attention_resolutions;
  double channel_mult[GD_MAX_LEVELS];
  int n_levels;
  double dropout;
  gboolean conv_resample;
  int num_classes;                  /* 0: unconditional */
  int num_heads;
  int num_head_channels;            /* -1: use num_heads */
  int num_heads_upsample;           /* -1: same as num_heads */
  gboolean use_scale_shift_norm;
  gboolean resblock_updown;
  gboolean use_new_attention_order;
  GdPool pool;                      /* classifier head */
} GdModelConfig;

/* Fills cfg with the reference constructor's defaults for `kind`. */
void gd_model_config_init (GdModelConfig *cfg, GdModelKind kind);
/* Parses a JSON object of constructor arguments on top of the defaults.  `origin`
 * (a file name) starts every error message. */
gboolean gd_model_config_parse (GdModelConfig *cfg, const char *json, const char *origin,
                                GError **error);
/* The constructor arguments as a JSON object (the `config` metadata value). */
char *gd_model_config_to_json (const GdModelConfig *cfg);

typedef struct {
  char *name;           /* state_dict key */
  int ndim;
  int64_t shape[4];
  size_t numel;
  float *data;          /* NULL until loaded or initialised */
  float *grad;          /* NULL unless parameter gradients are wanted */
  gboolean owns_data;
} GdParam;

typedef struct GdModel GdModel;

/* Builds the architecture (parameters without values). origin names the source in errors. */
GdModel *gd_model_new (const GdModelConfig *cfg, const char *origin, GError **error);
/* Loads a self-describing safetensors file: architecture from __metadata__ (kind, config),
 * weights memory-mapped (copied only when stored as another dtype or unaligned). */
GdModel *gd_model_load (const char *path, GError **error);
void gd_model_free (GdModel *model);
/* Gives every parameter random values (owned copies), reproducibly from seed: weights and
 * biases uniform in +-1/sqrt(fan_in), norm scales near 1, embeddings normal.  For tests,
 * benchmarks and the start of training. */
void gd_model_init_random (GdModel *model, uint64_t seed);
/* The reference's initialisation for training from scratch: PyTorch's default
 * uniform(+-1/sqrt(fan_in)) for weights and biases, GroupNorm scale 1 and shift 0, normal
 * embeddings, and zeros for the layers the reference zero-initialises (the last conv of
 * each ResBlock, attention output projections, the output layer). */
void gd_model_init_training (GdModel *model, uint64_t seed);

const GdModelConfig *gd_model_get_config (const GdModel *model);
const char *gd_model_get_origin (const GdModel *model);
guint gd_model_n_params (const GdModel *model);
GdParam *gd_model_param (GdModel *model, guint i);
GdParam *gd_model_find_param (GdModel *model, const char *name);
size_t gd_model_parameter_count (const GdModel *model);
/* Value of a metadata key: one set with gd_model_set_metadata, else the __metadata__ of
 * the safetensors file the model came from, else NULL. */
const char *gd_model_get_metadata (const GdModel *model, const char *key);
void gd_model_set_metadata (GdModel *model, const char *key, const char *value);
/* Keeps `owner` (e.g. the mapping that parameter data points into) alive as long as the
 * model; `destroy` is called on it when the model is freed. */
void gd_model_set_data_owner (GdModel *model, gpointer owner, GDestroyNotify destroy);

/* "[3, 64, 3, 3]": a shape for messages. */
char *gd_shape_text (int ndim, const int64_t *shape);
/* Why a stored tensor cannot hold parameter p ("missing weight ..." when !found, or the
 * shape mismatch), or NULL when it can.  Loaders prefix it with the file name. */
char *gd_param_mismatch (const GdParam *p, gboolean found, int ndim, const int64_t *shape);

/* Checks that an input of n x c x h x w (and labels y when given) fits the model. */
gboolean gd_model_check_input (const GdModel *model, int n, int c, int h, int w,
                               const int64_t *y, GError **error);

/* Forward pass. x: [n, in_channels, h, w]; t: [n] timesteps as the network receives them;
 * y: [n] class labels (class-conditional U-Nets only, else NULL).
 * out: [n, out_channels, h, w] for a U-Net, [n, out_channels] logits for a classifier. */
gboolean gd_model_forward (GdModel *model, const float *x, int n, int h, int w,
                           const int64_t *t, const int64_t *y, float *out, GError **error);

/* Inference mode: forward passes keep nothing for a backward pass, and all layers share
 * one set of scratch buffers (memory of one layer instead of all).  gd_model_backward then
 * refuses; gd_classifier_gradient and models with gradients enabled keep what they need
 * anyway.  Off by default. */
void gd_model_set_inference (GdModel *model, gboolean inference);
gboolean gd_model_get_inference (const GdModel *model);
/* bf16 mode: convolutions whose parameter gradients nobody wants (inference forward passes,
 * and the forward and input-gradient passes of a guidance gradient) run their products in
 * bfloat16 with float sums (gd-bf16.h).  Faster where the processor has AMX; results differ
 * from float by bfloat16's rounding of weights and activations (docs/performance.md gives
 * the measured error).  The weights are rounded and packed at the
 * first bf16 pass (half the size of the float weights, twice for a classifier: the weights
 * and their transposes; kept until bf16 is turned off;
 * turn it off and on after changing the weights).  FALSE, with an error, on a processor
 * without a bf16 product. */
gboolean gd_model_set_bf16 (GdModel *model, gboolean bf16, GError **error);
gboolean gd_model_get_bf16 (const GdModel *model);

/* Bytes of the activation and scratch buffers the model holds (kept across calls and
 * reused; weights and gradients not counted). */
size_t gd_model_buffer_bytes (const GdModel *model);

/* A classifier's features: the vector its last layer reads ([n, gd_classifier_feature_size]),
 * i.e. the pooled activations (adaptive pooling) or the attention-pooled first token.
 * logits may be NULL. */
gboolean gd_classifier_features (GdModel *model, const float *x, int n, int h, int w,
                                 const int64_t *t, float *logits, float *features, GError **error);
int gd_classifier_feature_size (const GdModel *model);

/* Backward pass of the last gd_model_forward (its inputs must still be alive):
 * dout is the gradient at the output ([n, out_channels, h, w] or [n, classes]); writes the
 * input gradient to dx (may be NULL) and accumulates parameter gradients when enabled. */
gboolean gd_model_backward (GdModel *model, const float *dout, float *dx);
/* Allocates (zeroed) gradients for every parameter; from then on backward passes
 * accumulate into them. */
void gd_model_enable_grads (GdModel *model);
void gd_model_zero_grads (GdModel *model);

/* Classifier guidance gradient: grad = d/dx sum_i log_softmax(classifier(x_i, t_i))[y_i],
 * by a backward pass through every layer.  logits ([n, classes]) may be NULL. */
gboolean gd_classifier_gradient (GdModel *model, const float *x, int n, int h, int w,
                                 const int64_t *t, const int64_t *y,
                                 float *logits, float *grad, GError **error);

G_END_DECLS
