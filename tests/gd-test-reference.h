/* The reference fixtures of a test: their folder ($GD_REFERENCE_DIR, else
 * ../shared/reference) and a skip, said aloud, when they are missing. */
#pragma once
#include <glib.h>

static inline char *
gd_test_reference_dir (void)
{
  const char *dir = g_getenv ("GD_REFERENCE_DIR");
  return g_strdup (dir ? dir : "../shared/reference");
}

static inline gboolean
gd_test_have_reference (const char *dir)
{
  if (g_file_test (dir, G_FILE_TEST_IS_DIR))
    return TRUE;
  char *msg = g_strdup_printf ("reference fixtures %s are missing", dir);
  g_printerr ("SKIP: %s\n", msg);
  g_test_skip (msg);
  g_free (msg);
  return FALSE;
}
