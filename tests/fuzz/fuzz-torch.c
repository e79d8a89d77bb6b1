/* libFuzzer target: the checkpoint reader (zip archive through minizip, legacy stream,
 * pickle, storage resolution), then every tensor's values and architecture recognition,
 * as loading a .pt does. */
#include "gd-recognize.h"
#include "gd-torch.h"

#include <stdint.h>
#include <stddef.h>

/* Tensors larger than this are not converted: the input is small, but a stride-0 view
 * may legitimately describe a huge tensor. */
#define MAX_CONVERTED ((int64_t) 1 << 20)

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  GBytes *bytes = g_bytes_new_static (data, size);
  GError *error = NULL;
  GdTorchFile *file = gd_torch_open_bytes (bytes, "fuzz.pt", &error);
  if (!file)
    {
      g_error_free (error);
      g_bytes_unref (bytes);
      return 0;
    }
  guint n = gd_torch_count (file);
  GdKeyShape *keys = g_new0 (GdKeyShape, n ? n : 1);
  for (guint i = 0; i < n; i++)
    {
      const GdTorchTensor *t = gd_torch_nth (file, i);
      if (t->numel <= MAX_CONVERTED)
        g_free (gd_torch_tensor_to_f32 (t));
      gd_torch_tensor_f32_in_place (t);
      keys[i] = (GdKeyShape) { t->name, t->ndim, t->shape };
    }
  GdRecognition rec;
  if (gd_recognize (keys, n, NULL, "fuzz.pt", "fuzz.pt", &rec, &error))
    gd_recognition_clear (&rec);
  else
    g_error_free (error);
  g_free (keys);
  gd_torch_free (file);
  g_bytes_unref (bytes);
  return 0;
}
