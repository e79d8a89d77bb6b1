#include "gd-model-cache.h"
#include "gd-checkpoint.h"
#include "gd-error.h"

#include <errno.h>
#include <glib/gstdio.h>
#include <string.h>

static GMutex cache_lock;
static GPtrArray *cache;    /* every GdCachedModel with users > 0 */

static gboolean
file_stamp (const char *path, gint64 *mtime, goffset *size, GError **error)
{
  GStatBuf st;
  if (g_stat (path, &st) != 0)
    {
      int saved = errno;
      g_set_error (error, GD_ERROR, GD_ERROR_IO, "%s: %s", path, g_strerror (saved));
      return FALSE;
    }
  *mtime = (gint64) st.st_mtime;
  *size = (goffset) st.st_size;
  return TRUE;
}

static GdModel *
load (const char *path, const char *config, GError **error)
{
  if (!*config)
    return gd_model_load (path, error);
  char *json = gd_checkpoint_read_config (config, error);
  if (!json)
    return NULL;
  GdLoadOptions options = { .config = json };
  GdModel *model = gd_checkpoint_load (path, &options, error);
  g_free (json);
  return model;
}

GdCachedModel *
gd_model_cache_acquire (const char *path, const char *config, GError **error)
{
  if (!config)
    config = "";
  char *key = g_canonicalize_filename (path, NULL);
  gint64 mtime;
  goffset size;
  GdCachedModel *entry = NULL;
  if (!file_stamp (key, &mtime, &size, error))
    {
      g_free (key);
      return NULL;
    }
  g_mutex_lock (&cache_lock);
  if (!cache)
    cache = g_ptr_array_new ();
  for (guint i = 0; i < cache->len && !entry; i++)
    {
      GdCachedModel *e = cache->pdata[i];
      if (strcmp (e->path, key) == 0 && strcmp (e->config, config) == 0 && e->mtime == mtime
          && e->size == size)
        entry = e;
    }
  if (entry)
    entry->users++;
  else
    {
      GdModel *model = load (key, config, error);
      if (model)
        {
          entry = g_new0 (GdCachedModel, 1);
          entry->model = model;
          entry->path = key;
          entry->config = g_strdup (config);
          key = NULL;
          entry->mtime = mtime;
          entry->size = size;
          entry->users = 1;
          g_mutex_init (&entry->lock);
          g_ptr_array_add (cache, entry);
        }
    }
  g_mutex_unlock (&cache_lock);
  g_free (key);
  return entry;
}

void
gd_model_cache_release (GdCachedModel *entry)
{
  if (!entry)
    return;
  g_mutex_lock (&cache_lock);
  gboolean last = --entry->users == 0;
  if (last)
    g_ptr_array_remove (cache, entry);
  g_mutex_unlock (&cache_lock);
  if (last)
    {
      gd_model_free (entry->model);
      g_mutex_clear (&entry->lock);
      g_free (entry->path);
      g_free (entry->config);
      g_free (entry);
    }
}

guint
gd_model_cache_count (void)
{
  g_mutex_lock (&cache_lock);
  guint count = cache ? cache->len : 0;
  g_mutex_unlock (&cache_lock);
  return count;
}
