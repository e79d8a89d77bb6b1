/* Which model a bare state_dict is.  The keys and shapes of guided-diffusion's UNetModel
 * and EncoderUNetModel reveal most constructor arguments (channels, levels, residual
 * blocks, where attention sits, classes, learned sigma, scale-shift norm, resampling,
 * the classifier head); the released checkpoints are then told apart by those, and the
 * settings that shapes cannot reveal (attention heads or head width, attention order,
 * noise schedule, image size of U-Nets) come from the table of releases.  A file that is
 * not a release needs an override for what its shapes leave open. */
#pragma once
#include "gd-model.h"

G_BEGIN_DECLS

/* A released checkpoint of openai/guided-diffusion, with the flags of its scripts. */
typedef struct {
  const char *name;             /* e.g. "256x256_diffusion" (its file name without .pt) */
  GdModelKind kind;
  int image_size;
  /* U-Nets */
  int num_channels;
  int num_res_blocks;
  gboolean class_cond;
  int num_head_channels;        /* -1: num_heads heads */
  double dropout;               /* training only: tells releases apart by name, not by shape */
  gboolean use_new_attention_order;
  const char *noise_schedule;
  /* classifiers */
  int classifier_depth;
  double classifier_scale;      /* the guidance scale the paper samples with */
  const char *labels;           /* label list name, or NULL */
  const char *file_hint;        /* picks this release among same-shaped ones by file name */
} GdRelease;

guint gd_release_count (void);
const GdRelease *gd_release_nth (guint i);
const GdRelease *gd_release_find (const char *name);
/* The release's script flags as a JSON object, in the vocabulary of the reference's
 * model_and_diffusion_defaults() / classifier_defaults(). */
char *gd_release_flags_json (const GdRelease *release);
/* {"diffusion_steps": ..., "noise_schedule": ...} for U-Nets, {"classifier_scale": ...}
 * for classifiers. */
char *gd_release_diffusion_json (const GdRelease *release);

/* Script flags (JSON object; absent flags take the scripts' defaults) to constructor
 * arguments, as the reference's create_model / create_classifier derive them.
 * diffusion_json (may be NULL) receives the `diffusion` metadata of a U-Net. */
gboolean gd_flags_to_config (const char *flags_json, GdModelKind kind, const char *origin,
                             GdModelConfig *cfg, char **diffusion_json, GError **error);

typedef struct {
  const char *name;
  int ndim;
  const int64_t *shape;
} GdKeyShape;

typedef struct {
  GdModelConfig config;
  const GdRelease *release;     /* NULL: not a released model */
  char *diffusion_json;         /* `diffusion` metadata, or NULL when unknown */
  char *labels;                 /* label list name or .tsv path, or NULL */
} GdRecognition;

/* Recognises the architecture of a state_dict from its keys and shapes.  override_json
 * (may be NULL) is a JSON object of constructor arguments that replace the recognised
 * ones, plus optional "kind", "release" (the name of a release whose settings to take),
 * "diffusion" (an object as the `diffusion` metadata) and "labels" (a list name or a
 * .tsv path).  file_name (may be NULL) breaks ties between same-shaped releases.
 * Errors start with origin. */
gboolean gd_recognize (const GdKeyShape *tensors, guint n, const char *override_json,
                       const char *file_name, const char *origin, GdRecognition *result,
                       GError **error);
void gd_recognition_clear (GdRecognition *result);


G_END_DECLS
