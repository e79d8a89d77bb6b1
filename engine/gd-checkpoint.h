/* Models from any file the engine reads: a self-describing safetensors file, or a PyTorch
 * checkpoint (.pt, zip or legacy format) whose architecture is recognised from its keys
 * and shapes (gd-recognize.h).  gd_model_load() dispatches here for PyTorch files; callers
 * that offer a configuration override (the command line's --config, an op's property)
 * call gd_checkpoint_load() directly.
 *
 * A model loaded from a PyTorch file carries these metadata keys (gd_model_get_metadata):
 *   diffusion      the release's diffusion settings, when known
 *   labels         JSON array of class names, when the label list was found
 *   labels_name    the label list's name (e.g. "imagenet-1000")
 *   release        the released checkpoint it was recognised as (e.g. "64x64_diffusion")
 *   source_format  "pytorch-zip" or "pytorch-legacy"
 *   source_dtypes  the storage dtypes of its weights, e.g. "F16" (converted to float32) */
#pragma once
#include "gd-model.h"
#include "gd-torch.h"

G_BEGIN_DECLS

typedef struct {
  const char *config;       /* override JSON (see gd_recognize), or NULL */
  gboolean shapes_only;     /* build and check the architecture, leave the weights unread */
} GdLoadOptions;

GdModel *gd_checkpoint_load (const char *path, const GdLoadOptions *options, GError **error);
GdModel *gd_torch_load_model (const char *path, const GdLoadOptions *options, GError **error);

/* The argument of --config: inline JSON when it starts with '{', else a file to read. */
char *gd_checkpoint_read_config (const char *argument, GError **error);

/* Path of a label list: a name (looked up as labels/NAME.tsv in $GD_DATA_DIR, the
 * installed data folder, then the source tree's data/) or a path to a .tsv file.
 * NULL when not found. */
char *gd_labels_find (const char *name);

G_END_DECLS
