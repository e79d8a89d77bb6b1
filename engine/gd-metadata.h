/* What a model file says about itself beyond its architecture: diffusion settings
 * (`diffusion` metadata key) and class names (`labels`). */
#pragma once
#include "gd-diffusion.h"
#include "gd-model.h"

G_BEGIN_DECLS

typedef struct {
  GdScheduleKind schedule;
  int steps;
  GdVarianceKind variance;
} GdDiffusionSettings;

/* From the `diffusion` metadata, a JSON object {"diffusion_steps": 1000,
 * "noise_schedule": "linear", "learn_sigma": true, "sigma_small": false}; absent keys
 * default to 1000 linear steps and a variance type that fits the model's output
 * channels (learned range for 2C outputs, else fixed large). */
gboolean gd_model_diffusion_settings (const GdModel *model, GdDiffusionSettings *settings,
                                      GError **error);
char *gd_diffusion_settings_to_json (const GdDiffusionSettings *settings);

/* Class names from the `labels` metadata (a JSON array of strings), or NULL. */
GPtrArray *gd_model_labels (const GdModel *model, GError **error);

/* Reads a label list file: one "index<TAB>name" per line. */
GPtrArray *gd_labels_read_tsv (const char *path, GError **error);

/* The class index of `name` in labels (exact, then case-insensitive), or -1 with an
 * error that lists close matches. */
int gd_labels_lookup (GPtrArray *labels, const char *name, const char *origin, GError **error);

G_END_DECLS
