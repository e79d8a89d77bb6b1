/* The training loop: deterministic batches, resumable checkpoints, EMA weights out. */
#pragma once
#include "gd-dataset.h"
#include "gd-metadata.h"
#include "gd-model.h"
#include "gd-train.h"

G_BEGIN_DECLS

typedef struct {
  GdModelConfig model;          /* kind and constructor arguments */
  GdDiffusionSettings diffusion;
  int batch_size;
  gint64 steps;                 /* optimiser steps in all */
  guint64 seed;
  GdOptimSettings optim;
  gboolean flip;                /* random horizontal flips */
  gboolean noised;              /* classifier: train on q_sample(x, t) (else clean images) */
  double checkpoint_minutes;
} GdTrainConfig;

/* Reads a training configuration: {"kind": "unet" | "classifier", "model": {constructor
 * arguments}, "diffusion": {...}, "batch_size", "steps", "seed", "lr", "weight_decay",
 * "ema_rate", "grad_clip", "warmup_steps", "flip", "noised", "checkpoint_minutes"}. */
gboolean gd_train_config_parse (GdTrainConfig *cfg, const char *json, const char *origin,
                                GError **error);
char *gd_train_config_to_json (const GdTrainConfig *cfg);

typedef struct GdTrainer GdTrainer;

/* Checks that the data fit the model (channels, size, labels) before anything runs.
 * The data set must outlive the trainer. */
GdTrainer *gd_trainer_new (const GdTrainConfig *cfg, const GdDataset *data, GError **error);
void gd_trainer_free (GdTrainer *trainer);
GdModel *gd_trainer_get_model (GdTrainer *trainer);
gint64 gd_trainer_get_step (const GdTrainer *trainer);

/* One optimiser step on the batch that step number determines. */
gboolean gd_trainer_step (GdTrainer *trainer, double *loss, GError **error);

/* Weights, EMA weights, Adam moments, step and configuration, written atomically. */
gboolean gd_trainer_save_checkpoint (GdTrainer *trainer, const char *path, GError **error);
/* Continues from a checkpoint written with the same configuration. */
gboolean gd_trainer_load_checkpoint (GdTrainer *trainer, const char *path, GError **error);
/* The EMA weights as a self-describing model file (architecture, diffusion settings, labels). */
gboolean gd_trainer_save_model (GdTrainer *trainer, const char *path, GError **error);

G_END_DECLS
