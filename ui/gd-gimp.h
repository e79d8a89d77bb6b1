/* The GIMP 2.10 plug-in of guided diffusion: the settings one run takes (the PDB
 * parameters, the dialog's fields, what gimp_set_data remembers), the run itself and the
 * dialog that fills the settings. */
#pragma once
#include <libgimp/gimp.h>

#include "gd-model.h"

G_BEGIN_DECLS

#define GD_GIMP_PROCEDURE "plug-in-guided-diffusion"
#define GD_GIMP_BINARY "guided-diffusion-gimp"

typedef enum {
  GD_GIMP_GENERATE,   /* new layers over the canvas (or the selection bounds) */
  GD_GIMP_VARY,       /* the active layer noised to `strength` and sampled back */
  GD_GIMP_INPAINT,    /* the selection regenerated, the rest of the layer kept */
  GD_GIMP_N_MODES
} GdGimpMode;

#define GD_GIMP_PATH_SIZE 4096
#define GD_GIMP_NAME_SIZE 256

/* Flat (no pointers): gimp_set_data stores it byte for byte. */
typedef struct {
  gint32 mode;                                /* GdGimpMode */
  gchar model[GD_GIMP_PATH_SIZE];             /* "" = the default model of the data dir */
  gchar classifier[GD_GIMP_PATH_SIZE];        /* "" = the default classifier */
  gchar model_config[GD_GIMP_PATH_SIZE];      /* architecture of a .pt file: JSON or a file */
  gchar classifier_config[GD_GIMP_PATH_SIZE];
  gchar class_name[GD_GIMP_NAME_SIZE];        /* "" = drawn from the seed per image */
  gdouble guidance_scale;                     /* 0: no classifier guidance */
  gint32 steps;
  gint32 sampler;                             /* GdOpSampler: 0 DDIM, 1 DDPM */
  gdouble eta;
  guint32 seed;
  gboolean random_seed;                       /* a new seed at every run */
  gint32 n_images;
  gdouble strength;                           /* vary and inpaint */
  gboolean bf16;                              /* convolutions in bfloat16 (the dialog's
                                                 choice; the PDB procedure runs in float) */
} GdGimpSettings;

void gd_gimp_settings_init (GdGimpSettings *s);

/* The run shows its steps in GIMP's progress bar itself; `step` is asked on the main
 * thread, every 100 ms and at each new step, whether to go on (done of total steps, total
 * 0 while the models load).  FALSE stops the run at the end of the current step. */
typedef struct {
  gboolean (*step) (gpointer user, int done, int total);
  gpointer user;
} GdGimpProgress;

/* One run: loads the models, checks everything against the image before touching it,
 * samples, and only then adds one layer per image inside one undo group.  The ids of
 * the new layers are appended to `layers`.  A stop from the progress gives
 * GD_ERROR_CANCELLED with the image as it was. */
gboolean gd_gimp_run (const GdGimpSettings *s, gint32 image, gint32 drawable,
                      const GdGimpProgress *progress, GArray *layers, GError **error);

/* The model file a setting names ("" = the default of that kind), loaded with the
 * architecture override `config` ("" = none); `shapes_only` leaves a .pt file's weights
 * unread (for the dialog's label list).  Checks the kind. */
GdModel *gd_gimp_load_model (const char *path, const char *config, GdModelKind kind,
                             gboolean shapes_only, GError **error);

/* The class list that names classes: the classifier's, else the model's; NULL when
 * neither has one.  *origin: the file it comes from. */
GPtrArray *gd_gimp_labels (GdModel *classifier, GdModel *model, const char **origin);

/* The class a name means: looked up in the label list, or a number when the models have
 * no label list; -1 for "" (drawn from the seed).  Checked against the classes of the
 * classifier and of a class-conditional model. */
gboolean gd_gimp_resolve_class (GdModel *classifier, GdModel *model, const char *name,
                                int64_t *chosen, GError **error);

/* The dialog: edits s and runs; TRUE when a run succeeded (the new layers in `layers`),
 * FALSE when the dialog was closed or a run stopped.  The settings are remembered
 * (gimp_set_data) at each OK.  Errors of a run are shown as GIMP messages and the
 * dialog stays open. */
gboolean gd_gimp_dialog (GdGimpSettings *s, gint32 image, gint32 drawable, GArray *layers);

G_END_DECLS
