/* What the guided-diffusion GEGL operations share: the default models of the data dir,
 * models held by a node through the shared cache, the respaced process a node's `steps`,
 * `respacing` and `sampler` describe, class choice, whole-buffer regions and warnings. */
#pragma once
#include <gegl-plugin.h>

#include "gd-diffusion.h"
#include "gd-model-cache.h"

G_BEGIN_DECLS

typedef enum { GD_OP_SAMPLER_DDIM, GD_OP_SAMPLER_DDPM } GdOpSampler;
GType gd_op_sampler_get_type (void);
GdSamplerKind gd_op_sampler_kind (GdOpSampler sampler);

/* What a node's check found: the models it uses, the respaced process, the class, the
 * region of its output, and what is connected. */
typedef struct {
  GdCachedModel *model, *classifier;
  GdDiffusion *diffusion;
  int64_t label;             /* -1: none */
  int channels;              /* of the tensor a node makes */
  GeglRectangle box;         /* the output */
  gboolean has_image, has_mask, has_gradient;
} GdOpPlan;

/* An op's check of its properties and inputs: fills the plan, or sets the error; *quiet
 * when its input is empty because an upstream node failed (which has said why). */
typedef gboolean (*GdOpPlanFunc) (GeglOperation *op, GdOpPlan *plan, gboolean *quiet,
                                  GError **error);

/* At the start of process: TRUE with the plan filled; else FALSE and the error to report
 * (none for a quiet failure). */
gboolean gd_op_plan_begin (GeglOperation *op, GdOpPlanFunc check, GdOpPlan *plan,
                           GError **error);
/* At the end of process: reports and frees the error, if any, and frees the plan. */
void gd_op_plan_end (GeglOperation *op, GdOpPlan *plan, GError *error);

/* The file an empty `model` / `classifier` property means: models/default-unet.safetensors
 * or models/default-classifier.safetensors of the first data dir that has it
 * ($GD_DATA_DIR alone when set; else the installed data dir, then
 * ~/.local/share/guided-diffusion).  NULL with an error naming the missing file(s). */
char *gd_default_model_path (GdModelKind kind, GError **error);

/* The model a node's property names ("" = the default), with the node's architecture
 * override `config` for .pt files ("" = none), held by the node (under `slot`) until the
 * properties name another file or override or the node goes.  Checks its kind. */
GdCachedModel *gd_op_get_model (GeglOperation *op, const char *slot, const char *path,
                                const char *config, GdModelKind kind, GError **error);
/* Lets go of the model held under `slot`. */
void gd_op_drop_model (GeglOperation *op, const char *slot);

/* The respacing string of `steps`: `respacing` when not empty, else "ddimN" for DDIM and
 * "N" for DDPM (as `guided sample --steps N` does). */
char *gd_op_respacing (int steps, const char *respacing, GdOpSampler sampler);
/* The respaced process for a model's diffusion settings. */
GdDiffusion *gd_op_diffusion (const GdModel *model, int steps, const char *respacing,
                              GdOpSampler sampler, GError **error);
gboolean gd_op_check_step (int step, const GdDiffusion *d, GError **error);

/* The class a node asks for: `label` looked up in the classifier's (else the model's)
 * label list when not empty, else `class_index`; -1 when neither is given.  Checks it
 * against the classifier's outputs and a class-conditional model's classes. */
gboolean gd_op_class (GdModel *classifier, GdModel *model, int class_index, const char *label,
                      int64_t *chosen, GError **error);

/* The bounding box of an input pad, or an error naming the pad when nothing is connected
 * there.  *empty says the pad is connected but its source produced nothing (an upstream
 * node that already reported its problem). */
gboolean gd_op_source_box (GeglOperation *op, const char *pad, GeglRectangle *box,
                           gboolean *empty, GError **error);
/* The channels of the tensor on a pad, from its format: N for an N-channel float format,
 * 1 for the Y models, else 3 (alpha does not count); 0 when nothing is connected. */
int gd_op_source_channels (GeglOperation *op, const char *pad);
/* Checks that the tensor on a pad has `expected` channels; `what` names it in the error. */
gboolean gd_op_check_channels (GeglOperation *op, const char *pad, const char *what,
                               int expected, const GdModel *model, GError **error);
/* Checks that a w x h tensor at the pad fits the model (n = 1). */
gboolean gd_op_check_size (const GdModel *model, int channels, const GeglRectangle *box,
                           const int64_t *labels, GError **error);

/* A g_warning "OP (node NAME): message", once per distinct message of a node, and none
 * while one of its properties is being set. */
void gd_op_warn (GeglOperation *op, const GError *error);
/* Forgets the last warning: the node's problem is solved. */
void gd_op_clear_warning (GeglOperation *op);

/* What every gd: op class does: prepare; a bounding box from `check` (empty, with a
 * warning, when it fails); no warning while a property is being set (GEGL checks the node
 * after each property, before the host has set the rest).  With `whole_buffer` (ops that
 * run a network): the whole input is needed and the whole output computed at once, in one
 * thread. */
void gd_op_class_setup (GeglOperationClass *klass, void (*prepare) (GeglOperation *op),
                        GdOpPlanFunc check, gboolean whole_buffer);

/* Progress of a long run, reported from the thread that loaded the module only (GEGL's
 * progress signal is for the main thread). */
void gd_op_remember_main_thread (void);
void gd_op_progress (GeglOperation *op, double fraction, const char *message);

G_END_DECLS
