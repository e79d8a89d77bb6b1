/* libFuzzer target: the restricted unpickler, on a stream of pickles as the legacy
 * checkpoint format chains them. */
#include "gd-pickle.h"

#include <stdint.h>
#include <stddef.h>

int LLVMFuzzerTestOneInput (const uint8_t *data, size_t size);

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  GdPickle *pickle = gd_pickle_new ("fuzz.pkl");
  size_t pos = 0;
  for (int i = 0; i < 8 && pos < size; i++)
    {
      size_t used = 0;
      GError *error = NULL;
      if (!gd_pickle_parse (pickle, data + pos, size - pos, &used, &error))
        {
          g_error_free (error);
          break;
        }
      pos += used;
    }
  gd_pickle_free (pickle);
  return 0;
}
