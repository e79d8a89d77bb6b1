/* One loaded model per file, shared by every node that names it: nodes acquire an entry
 * and release it when they are done; the model is freed when its last user goes. */
#pragma once
#include "gd-model.h"

G_BEGIN_DECLS

typedef struct {
  GdModel *model;
  char *path;          /* canonical file name, the cache key with config */
  char *config;        /* architecture override of a .pt file ("" for none) */
  GMutex lock;         /* held around engine calls: a model keeps state per forward pass */
  /* private */
  gint64 mtime;
  goffset size;
  int users;
} GdCachedModel;

/* The model in `path`, loaded on first use; `config` (inline JSON or a JSON file, NULL or
 * "" for none) overrides what a .pt file's weights leave open.  A file changed on disk
 * since it was loaded is loaded again (users of the old copy keep it until they release it). */
GdCachedModel *gd_model_cache_acquire (const char *path, const char *config, GError **error);
void gd_model_cache_release (GdCachedModel *entry);

/* Number of models held (for tests). */
guint gd_model_cache_count (void);

G_END_DECLS
