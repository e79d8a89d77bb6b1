/* Counter-based random numbers (Philox4x32-10, Salmon et al. 2011): every number is a
 * pure function of (seed, stream, index), so results do not depend on thread count,
 * batch position or the order in which they are drawn. */
#pragma once
#include <stddef.h>
#include <stdint.h>

/* Four 32-bit words for counter (stream, index) under key seed. */
void gd_philox (uint64_t seed, uint64_t stream, uint64_t index, uint32_t out[4]);

/* Standard normal numbers: out[i] for i in [0, count) is the i-th number of the stream. */
void gd_random_normal (uint64_t seed, uint64_t stream, float *out, size_t count);

/* Uniform numbers in [0, 1). */
void gd_random_uniform (uint64_t seed, uint64_t stream, float *out, size_t count);
