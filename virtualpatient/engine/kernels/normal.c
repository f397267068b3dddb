/* Standard-normal draws from a torch CPU generator: the same numbers torch draws, 2.5-5x faster.

   Every internal-noise term and every biased test draws N(0, 1) per unit and sample from the
   patient's own torch.Generator (virtualpatient/network.py, NoiseSource). torch draws a float32
   tensor of at least 16 values (Tensor.normal_ on the CPU) in two passes: first every value as a
   uniform from the generator's Mersenne twister, one 32-bit output at a time (its low 24 bits
   times 2^-24), then a Box-Muller transform in blocks of 16 (the pairs j and j + 8) through
   single-precision polynomial approximations of log, sin and cos (the Cephes forms), contracted
   to fused multiply-adds as torch's build contracts them. When the count is not a multiple of
   16, 16 more uniforms are drawn for the last 16 places and that block is transformed again.

   vp_normal does the same work with the twister's outputs produced a state block at a time and
   the transform vectorised, on a copy of the generator's state (torch's get_state() layout) that
   the caller writes back with set_state(). virtualpatient/engine/native.py checks it against
   torch on first use and falls back to torch when they differ; tests/test_native_normal.py
   compares values and generator states on many sizes. Compiled with fp-contract off: the only
   fused multiply-adds are the explicit fmaf calls. */
#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__clang__)
#pragma clang fp contract(off)
#define VP_EXACT
#elif defined(__GNUC__)
#define VP_EXACT __attribute__((optimize("fp-contract=off")))
#else
#define VP_EXACT
#endif

enum { MT_N = 624, MT_M = 397 };

/* The generator as torch's get_state() lays it out, viewed as 64-bit words: word 1 holds `left`
   (its low 32 bits), word 2 `next`, words 3 .. 626 the twister's 624 state words. */
enum { W_LEFT = 1, W_NEXT = 2, W_STATE = 3 };

typedef struct {
    uint32_t s[MT_N];
    int64_t left; /* torch's convention: a draw first decrements left and regenerates at 0 */
    int64_t next; /* index of the next state word to temper */
} vp_twister;

static inline uint32_t mix(uint32_t upper, uint32_t lower) {
    const uint32_t y = (upper & 0x80000000u) | (lower & 0x7fffffffu);
    return (y >> 1) ^ ((lower & 1u) ? 0x9908b0dfu : 0u);
}

/* The next 624 state words (MT19937's recurrence, in place). */
static void regenerate(uint32_t *s) {
    int i = 0;
    for (; i < MT_N - MT_M; ++i) s[i] = s[i + MT_M] ^ mix(s[i], s[i + 1]);
    for (; i < MT_N - 1; ++i) s[i] = s[i + MT_M - MT_N] ^ mix(s[i], s[i + 1]);
    s[MT_N - 1] = s[MT_M - 1] ^ mix(s[MT_N - 1], s[0]);
}

static inline uint32_t temper(uint32_t y) {
    y ^= y >> 11;
    y ^= (y << 7) & 0x9d2c5680u;
    y ^= (y << 15) & 0xefc60000u;
    y ^= y >> 18;
    return y;
}

/* n uniforms in [0, 1) as torch's float uniform draws them: (output & (2^24 - 1)) * 2^-24. */
VP_EXACT static void uniforms(vp_twister *g, float *restrict out, int64_t n) {
    int64_t i = 0;
    while (i < n) {
        int64_t ready = g->left - 1; /* draws before the state must be regenerated */
        if (ready == 0) {
            regenerate(g->s);
            g->left = MT_N + 1;
            g->next = 0;
            ready = MT_N;
        }
        const int64_t k = n - i < ready ? n - i : ready;
        const uint32_t *restrict src = g->s + g->next;
        for (int64_t j = 0; j < k; ++j)
            out[i + j] = (float)(int32_t)(temper(src[j]) & 0xffffffu) * 5.9604644775390625e-08f;
        g->next += k;
        g->left -= k;
        i += k;
    }
}

static inline float from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t to_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

/* log(x) for x in (0, 1]: exponent and mantissa in [sqrt(1/2), sqrt(2)), then Cephes' degree-8
   polynomial in the mantissa minus 1. */
VP_EXACT static inline float cephes_log(float x) {
    x = x < 1.17549435e-38f ? 1.17549435e-38f : x; /* no subnormals */
    float e = (float)((int32_t)(to_bits(x) >> 23) - 0x7f) + 1.0f;
    x = from_bits((to_bits(x) & 0x807fffffu) | 0x3f000000u); /* mantissa in [0.5, 1) */
    const int low = x < 0.707106781186547524f;
    const float keep = low ? x : 0.0f;
    x = x - 1.0f;
    e = e - (low ? 1.0f : 0.0f);
    x = x + keep;
    const float z = x * x;
    float y = 7.0376836292e-2f;
    y = fmaf(y, x, -1.1514610310e-1f);
    y = fmaf(y, x, 1.1676998740e-1f);
    y = fmaf(y, x, -1.2420140846e-1f);
    y = fmaf(y, x, 1.4249322787e-1f);
    y = fmaf(y, x, -1.6668057665e-1f);
    y = fmaf(y, x, 2.0000714765e-1f);
    y = fmaf(y, x, -2.4999993993e-1f);
    y = fmaf(y, x, 3.3333331174e-1f);
    y = y * x;
    y = fmaf(y, z, e * -2.12194440e-4f);
    y = fmaf(-z, 0.5f, y);
    x = x + y;
    return fmaf(e, 0.693359375f, x);
}

/* sin and cos of x >= 0: reduction by pi/4 in three parts, then Cephes' two polynomials. */
VP_EXACT static inline void cephes_sincos(float x, float *sin_out, float *cos_out) {
    int32_t j = (int32_t)(x * 1.27323954473516f);
    j = (j + 1) & ~1;
    const float y = (float)j;
    const uint32_t sin_sign = (uint32_t)(j & 4) << 29;
    const uint32_t cos_sign = (uint32_t)(~(j - 2) & 4) << 29;
    const int cos_first = (j & 2) == 0;
    x = fmaf(y, -0.78515625f, x);
    x = fmaf(y, -2.4187564849853515625e-4f, x);
    x = fmaf(y, -3.77489497744594108e-8f, x);
    const float z = x * x;
    float c = 2.443315711809948e-5f;
    c = fmaf(c, z, -1.388731625493765e-3f);
    c = fmaf(c, z, 4.166664568298827e-2f);
    c = c * z;
    c = fmaf(c, z, -(z * 0.5f));
    c = c + 1.0f;
    float s = -1.9515295891e-4f;
    s = fmaf(s, z, 8.3321608736e-3f);
    s = fmaf(s, z, -1.6666654611e-1f);
    s = s * z;
    s = fmaf(s, x, x);
    *sin_out = from_bits(to_bits(cos_first ? s : c) ^ sin_sign);
    *cos_out = from_bits(to_bits(cos_first ? c : s) ^ cos_sign);
}

/* Box-Muller on one block of 16 uniforms, in place: places j and j + 8 from the pair (j, j + 8). */
VP_EXACT static inline void box_muller16(float *restrict d, float mean, float std) {
    const float two_pi = (float)(2.0 * 3.14159265358979323846);
    float out[16];
    for (int j = 0; j < 8; ++j) {
        const float radius = sqrtf(-2.0f * cephes_log(1.0f - d[j]));
        float s, c;
        cephes_sincos(two_pi * d[j + 8], &s, &c);
        out[j] = fmaf(radius * c, std, mean);
        out[j + 8] = fmaf(radius * s, std, mean);
    }
    memcpy(d, out, sizeof out);
}

/* n >= 16 draws of N(mean, std^2) into out, from the generator state `words` (updated). */
VP_EXACT void vp_normal(int64_t *words, float *out, int64_t n, float mean, float std) {
    vp_twister g;
    for (int i = 0; i < MT_N; ++i) g.s[i] = (uint32_t)words[W_STATE + i];
    int32_t left;
    memcpy(&left, words + W_LEFT, sizeof left);
    g.left = left;
    g.next = words[W_NEXT];
    /* torch draws all uniforms, then transforms: done here a cache-sized chunk at a time (the
       same draws in the same order), chunks a multiple of 16 long */
    const int64_t chunk = 4096;
    for (int64_t i = 0; i < n; i += chunk) {
        const int64_t k = n - i < chunk ? n - i : chunk;
        uniforms(&g, out + i, k);
        for (int64_t b = 0; b + 16 <= k; b += 16) box_muller16(out + i + b, mean, std);
    }
    if (n % 16) {
        uniforms(&g, out + n - 16, 16);
        box_muller16(out + n - 16, mean, std);
    }
    for (int i = 0; i < MT_N; ++i) words[W_STATE + i] = g.s[i];
    left = (int32_t)g.left;
    memcpy(words + W_LEFT, &left, sizeof left);
    words[W_NEXT] = g.next;
}
