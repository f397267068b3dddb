/* The fused elementwise steps of a hidden layer (virtualpatient/engine/ops.py calls them): the
   order of operations is the one virtualpatient/engine/hidden.py defines (HiddenLayer.reference),
   and tests/test_hidden_layer.py checks these kernels against it for every activation and
   modulation. Compiled with products.c into one library by virtualpatient/engine/native.py. */
#include <stdint.h>

/* Elementwise epilogues. Separate roundings, in the order of the dense path: no FMA contraction. */
#if defined(__clang__)
#pragma clang fp contract(off)
#define VP_NOCONTRACT
#elif defined(__GNUC__)
#define VP_NOCONTRACT __attribute__((optimize("fp-contract=off")))
#else
#define VP_NOCONTRACT
#endif

/* tanh as Eigen's rational minimax approximation (13/6 degree, clamped at +-7.905; |error| < 3e-7,
   at most 5 float ulps from torch.tanh), vectorisable: 7x faster than torch.tanh here. */
static inline float vp_tanhf(float v) {
    const float lim = 7.90531110763549805f;
    const float c = v > lim ? lim : (v < -lim ? -lim : v);
    const float s = c * c;
    float p = s * -2.76076847742355e-16f + 2.00018790482477e-13f;
    p = s * p + -8.60467152213735e-11f;
    p = s * p + 5.12229709037114e-08f;
    p = s * p + 1.48572235717979e-05f;
    p = s * p + 6.37261928875436e-04f;
    p = s * p + 4.89352455891786e-03f;
    p = c * p;
    float q = s * 1.19825839466702e-06f + 1.18534705686654e-04f;
    q = s * q + 2.26843463243900e-03f;
    q = s * q + 4.89352518554385e-03f;
    const float r = p / q;
    return (v < 0.0004f && v > -0.0004f) ? v : r;
}

/* After a layer's product z [rows, n] (row stride ld): relu in place with mask[i] = !(h <= 0) (relu's
   backward passes the gradient unless h <= 0), then h = h * scale - shift as two roundings (scale 1
   and shift 0 change nothing). For tanh (act = 1) h = vp_tanhf(z) and deriv[i] = 1 - h*h is stored
   as float. bias (per row, may be NULL) is added first. z is read from src when given (same layout
   as h: a dense layer's product for one patient, so no copy of it into h comes first), else from h. */
VP_NOCONTRACT void vp_post(float *h, const float *src, const float *bias, void *deriv, int64_t rows, int64_t n,
                           int64_t ld, int act, float scale, float shift) {
    for (int64_t r = 0; r < rows; ++r) {
        float *x = h + r * ld;
        const float *in = src ? src + r * ld : x;
        if (bias) {
            const float b = bias[r];
            for (int64_t j = 0; j < n; ++j) x[j] = in[j] + b;
            in = x;
        }
        if (act == 0 && !deriv) {
            for (int64_t j = 0; j < n; ++j) {
                const float v = in[j] < 0.0f ? 0.0f : in[j];
                const float t = v * scale;
                x[j] = t - shift;
            }
        } else if (act == 0) {
            unsigned char *m = (unsigned char *)deriv + r * n;
            for (int64_t j = 0; j < n; ++j) {
                const float v = in[j] < 0.0f ? 0.0f : in[j];   /* keeps NaN, as torch.relu does */
                m[j] = !(v <= 0.0f);
                const float t = v * scale;
                x[j] = t - shift;
            }
        } else if (!deriv) {
            for (int64_t j = 0; j < n; ++j) {
                const float t = vp_tanhf(in[j]) * scale;
                x[j] = t - shift;
            }
        } else {
            float *d = (float *)deriv + r * n;
            for (int64_t j = 0; j < n; ++j) {
                const float v = vp_tanhf(in[j]);
                const float sq = v * v;
                d[j] = 1.0f - sq;
                const float t = v * scale;
                x[j] = t - shift;
            }
        }
    }
}

/* Noise drawn as [P, n, units] added to activations kept as [P, units, n], then the rest of the
   hidden layer: h = ((h + sigma * noise^T) + add) * scale - shift, each a separate rounding as in the
   dense path (add = 0, scale = 1, shift = 0 change nothing). With AVX2, blocks of 8 x 8 are
   transposed in registers (the same four roundings per value, in vectors); edges, and builds
   without AVX2, go through 16 x 16 tiles in L1. */
VP_NOCONTRACT static inline void noise_edge(float *H, const float *N, int64_t units, int64_t n, int64_t u0, int64_t nu,
                              int64_t j0, int64_t nj, float sigma, float add, float scale, float shift) {
    float tile[16][16];
    for (int64_t j = 0; j < nj; ++j)
        for (int64_t u = 0; u < nu; ++u) tile[u][j] = N[(j0 + j) * units + u0 + u];
    for (int64_t u = 0; u < nu; ++u) {
        float *x = H + (u0 + u) * n + j0;
        for (int64_t j = 0; j < nj; ++j) {
            const float t = sigma * tile[u][j];
            float v = x[j] + t;
            v = v + add;
            v = v * scale;
            x[j] = v - shift;
        }
    }
}

#if defined(__AVX2__)
#include <immintrin.h>
/* Rows r[0..7] (samples) of 8 units -> r[u] = unit u over the 8 samples. */
static inline void transpose8(__m256 r[8]) {
    const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
    const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
    const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
    const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
    const __m256 s0 = _mm256_shuffle_ps(t0, t2, 0x44), s1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    const __m256 s2 = _mm256_shuffle_ps(t1, t3, 0x44), s3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    const __m256 s4 = _mm256_shuffle_ps(t4, t6, 0x44), s5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    const __m256 s6 = _mm256_shuffle_ps(t5, t7, 0x44), s7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    r[0] = _mm256_permute2f128_ps(s0, s4, 0x20);
    r[1] = _mm256_permute2f128_ps(s1, s5, 0x20);
    r[2] = _mm256_permute2f128_ps(s2, s6, 0x20);
    r[3] = _mm256_permute2f128_ps(s3, s7, 0x20);
    r[4] = _mm256_permute2f128_ps(s0, s4, 0x31);
    r[5] = _mm256_permute2f128_ps(s1, s5, 0x31);
    r[6] = _mm256_permute2f128_ps(s2, s6, 0x31);
    r[7] = _mm256_permute2f128_ps(s3, s7, 0x31);
}
#endif

VP_NOCONTRACT void vp_noise_t(float *h, const float *noise, int64_t P, int64_t units, int64_t n, float sigma,
                              float add, float scale, float shift) {
    for (int64_t p = 0; p < P; ++p) {
        const float *N = noise + p * n * units;
        float *H = h + p * units * n;
        int64_t u0 = 0;
#if defined(__AVX2__)
        const __m256 vs = _mm256_set1_ps(sigma), va = _mm256_set1_ps(add), vc = _mm256_set1_ps(scale),
                     vh = _mm256_set1_ps(shift);
        for (; u0 + 8 <= units; u0 += 8) {
            int64_t j0 = 0;
            for (; j0 + 8 <= n; j0 += 8) {
                __m256 r[8];
                for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(N + (j0 + j) * units + u0);
                transpose8(r);
                for (int u = 0; u < 8; ++u) {
                    float *x = H + (u0 + u) * n + j0;
                    __m256 v = _mm256_add_ps(_mm256_loadu_ps(x), _mm256_mul_ps(vs, r[u]));
                    v = _mm256_add_ps(v, va);
                    v = _mm256_mul_ps(v, vc);
                    _mm256_storeu_ps(x, _mm256_sub_ps(v, vh));
                }
            }
            if (j0 < n) noise_edge(H, N, units, n, u0, 8, j0, n - j0, sigma, add, scale, shift);
        }
#endif
        for (; u0 < units; u0 += 16) {
            const int64_t nu = units - u0 < 16 ? units - u0 : 16;
            for (int64_t j0 = 0; j0 < n; j0 += 16)
                noise_edge(H, N, units, n, u0, nu, j0, n - j0 < 16 ? n - j0 : 16, sigma, add, scale, shift);
        }
    }
}

/* Gradient through the post-activation ops, in place on g [count]: g * scale, then relu (act = 0):
   0 where the mask is 0; tanh (act = 1): times deriv. */
VP_NOCONTRACT void vp_pre_grad(float *g, const void *deriv, int64_t count, int act, float scale) {
    if (act == 0) {
        const unsigned char *m = (const unsigned char *)deriv;
        for (int64_t i = 0; i < count; ++i) {
            const float v = g[i] * scale;
            g[i] = m[i] ? v : 0.0f;
        }
    } else {
        const float *d = (const float *)deriv;
        for (int64_t i = 0; i < count; ++i) {
            const float v = g[i] * scale;
            g[i] = v * d[i];
        }
    }
}
