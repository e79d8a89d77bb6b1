/* libFuzzer target: a safetensors file (8-byte header length, JSON header, data) read as
 * a model, through an in-memory file. */
#include "gd-model.h"
#include "gd-safetensors.h"

#include <stdint.h>
#include <stddef.h>
#include <stdio.h>
#include <sys/mman.h>
#include <unistd.h>

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  static char path[64];
  static int fd = -1;
  if (fd < 0)
    {
      fd = memfd_create ("fuzz.safetensors", 0);
      if (fd < 0)
        return 0;
      snprintf (path, sizeof path, "/proc/self/fd/%d", fd);
    }
  if (ftruncate (fd, 0) != 0 || pwrite (fd, data, size, 0) != (ssize_t) size)
    return 0;
  GError *error = NULL;
  GdSafetensors *st = gd_safetensors_open (path, &error);
  if (st)
    {
      for (guint i = 0; i < gd_safetensors_count (st); i++)
        {
          const GdStTensor *t = gd_safetensors_nth (st, i);
          if (t->numel <= (1 << 20))
            g_free (gd_st_tensor_to_f32 (t));
        }
      gd_safetensors_free (st);
    }
  else
    g_clear_error (&error);
  GdModel *model = gd_model_load (path, &error);
  if (model)
    gd_model_free (model);
  else
    g_clear_error (&error);
  return 0;
}
