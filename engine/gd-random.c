#include "gd-random.h"

#include <math.h>

#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u

void
gd_philox (uint64_t seed, uint64_t stream, uint64_t index, uint32_t out[4])
{
  uint32_t c0 = (uint32_t) index, c1 = (uint32_t) (index >> 32);
  uint32_t c2 = (uint32_t) stream, c3 = (uint32_t) (stream >> 32);
  uint32_t k0 = (uint32_t) seed, k1 = (uint32_t) (seed >> 32);
  for (int round = 0; round < 10; round++)
    {
      uint64_t p0 = (uint64_t) PHILOX_M0 * c0, p1 = (uint64_t) PHILOX_M1 * c2;
      uint32_t n0 = (uint32_t) (p1 >> 32) ^ c1 ^ k0;
      uint32_t n1 = (uint32_t) p1;
      uint32_t n2 = (uint32_t) (p0 >> 32) ^ c3 ^ k1;
      uint32_t n3 = (uint32_t) p0;
      c0 = n0; c1 = n1; c2 = n2; c3 = n3;
      k0 += PHILOX_W0;
      k1 += PHILOX_W1;
    }
  out[0] = c0; out[1] = c1; out[2] = c2; out[3] = c3;
}

/* (0, 1]: never 0, so that log() in Box-Muller stays finite. */
static double
open_unit (uint32_t hi, uint32_t lo)
{
  uint64_t bits = ((uint64_t) hi << 21) ^ (lo >> 11);   /* 53 random bits */
  return ((double) (bits & ((1ull << 53) - 1)) + 1.0) / 9007199254740992.0;
}

void
gd_random_normal (uint64_t seed, uint64_t stream, float *out, size_t count)
{
  /* one Philox block (4 words) gives two normals by the Box-Muller transform */
  for (size_t i = 0; i < count; i += 2)
    {
      uint32_t r[4];
      gd_philox (seed, stream, i / 2, r);
      double radius = sqrt (-2.0 * log (open_unit (r[0], r[1])));
      double angle = 2.0 * M_PI * (open_unit (r[2], r[3]) - 0.5);
      out[i] = (float) (radius * cos (angle));
      if (i + 1 < count)
        out[i + 1] = (float) (radius * sin (angle));
    }
}

void
gd_random_uniform (uint64_t seed, uint64_t stream, float *out, size_t count)
{
  for (size_t i = 0; i < count; i++)
    {
      uint32_t r[4];
      gd_philox (seed, stream, i, r);
      out[i] = (float) (r[0] >> 8) / 16777216.0f;
    }
}
