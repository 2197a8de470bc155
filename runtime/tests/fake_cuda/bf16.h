/* bf16 <-> float for the fake libraries (round to nearest even; NaN stays
 * a quiet NaN), shared by fake_cuda.c and fake_cublaslt.c. */
#ifndef FPDT_FAKE_BF16_H
#define FPDT_FAKE_BF16_H
#include <stdint.h>
#include <string.h>

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16; float f; memcpy(&f, &u, 4); return f;
}
static inline uint16_t float_to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7fc0;
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}
#endif
