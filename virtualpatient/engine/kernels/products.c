/* The engine's compressed products: SpMM (a layer's forward and its input gradient) and SDDMM (the
   gradient of its unmasked weights), over the block-diagonal CSR layout of virtualpatient/engine/ops.py.
   Compiled with elementwise.c into one library by virtualpatient/engine/native.py (at first use,
   cached by a key that holds both files' text, the compiler, its flags and the target). */
#include <stdint.h>
#include <string.h>

/* The products are written for 16-float vectors ("v16"): the SpMM accumulates each column alone,
   and the SDDMM sums 16 lanes, then adds them by halving in a fixed order, so results are
   reproducible. A v16 is NW native vectors of WL floats: one AVX-512 register, or two AVX2 (or
   baseline) ones, with the same lane-by-lane arithmetic and the same halving order, so every
   target computes the same numbers. (A 64-byte GCC vector type on a target without 64-byte
   registers is kept in memory and moved in 8-byte pieces: 3-4x slower on AVX2.) Loads and stores
   dereference an unaligned, may_alias type directly: memcpy would be expanded in the compiler's
   preferred width (256 bits for -march=skylake-avx512), through the stack. */
#if defined(__AVX512F__)
#define WL 16
#else
#define WL 8
#endif
#define NW (16 / WL)
typedef float vw __attribute__((vector_size(4 * WL), aligned(4), may_alias));

static inline vw ld(const float *p) { return *(const vw *)p; }
static inline void st(float *p, vw v) { *(vw *)p = v; }
#if defined(__clang__)
typedef int vwi __attribute__((ext_vector_type(WL)));
#define VP_SHUFFLE(v, ...) __builtin_shufflevector(v, v, __VA_ARGS__)
#define VP_UNROLL _Pragma("unroll")
#else
typedef int vwi __attribute__((vector_size(4 * WL)));
#define VP_SHUFFLE(v, ...) __builtin_shuffle(v, (vwi){__VA_ARGS__})
#define VP_UNROLL _Pragma("GCC unroll 16")   /* keeps arrays of accumulators in registers */
#endif

/* Sum of the 16 lanes of the v16 s[0..NW-1] by halving: lanes i and i + 8, then i + 4, i + 2, i + 1. */
static inline float hsum16(const vw *s) {
#if WL == 16
    vw v = s[0];
    v += VP_SHUFFLE(v, 8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7);
    v += VP_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11);
    v += VP_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13);
    v += VP_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14);
#else
    vw v = s[0] + s[1];
    v += VP_SHUFFLE(v, 4, 5, 6, 7, 0, 1, 2, 3);
    v += VP_SHUFFLE(v, 2, 3, 0, 1, 6, 7, 4, 5);
    v += VP_SHUFFLE(v, 1, 0, 3, 2, 5, 4, 7, 6);
#endif
    return v[0];
}

/* Rows r0..r1 of Y[:, b0:b0 + WL NV] = bias + sum_k val * X[idx[k], b0:...]; NV accumulators stay
   in registers (8 are a quarter of AVX-512's registers, half of AVX2's). */
#define SPMM_TILE(NV)                                                                              \
    static void spmm_tile_##NV(const int64_t *ptr, const int64_t *idx, const float *val,           \
                               const int64_t *perm, const float *bias, const float *X, float *Y,   \
                               int64_t ldx, int64_t ldy, int64_t r0, int64_t r1, int64_t b0) {     \
        for (int64_t r = r0; r < r1; ++r) {                                                        \
            vw acc[NV];                                                                            \
            VP_UNROLL for (int j = 0; j < NV; ++j) acc[j] = (vw){0};                               \
            for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k) {                                        \
                const float v = perm ? val[perm[k]] : val[k];                                      \
                const float *x = X + idx[k] * ldx + b0;                                            \
                VP_UNROLL for (int j = 0; j < NV; ++j) acc[j] += v * ld(x + WL * j);               \
            }                                                                                      \
            const float b = bias ? bias[r] : 0.0f;                                                 \
            VP_UNROLL for (int j = 0; j < NV; ++j) st(Y + r * ldy + b0 + WL * j, acc[j] + b);     \
        }                                                                                          \
    }
SPMM_TILE(8)
SPMM_TILE(4)
SPMM_TILE(2)
SPMM_TILE(1)

/* Y[r, 0:B] = bias[r] + sum_{k = ptr[r]}^{ptr[r+1]-1} val[perm ? perm[k] : k] * X[idx[k], 0:B]
   for rows r0 <= r < r1. X has row stride ldx, Y row stride ldy. Rows go in blocks of block_rows
   (one patient) and, inside a block, column tile by column tile, so a patient's tile of X stays
   in cache. Tiles only split the columns: each output is the same sum in the same order. */
void vp_spmm(const int64_t *ptr, const int64_t *idx, const float *val, const int64_t *perm,
             const float *bias, const float *X, float *Y, int64_t r0, int64_t r1, int64_t B,
             int64_t ldx, int64_t ldy, int64_t block_rows) {
    for (int64_t q0 = r0; q0 < r1; q0 += block_rows) {
        const int64_t q1 = q0 + block_rows < r1 ? q0 + block_rows : r1;
        int64_t b0 = 0;
        for (; b0 + 8 * WL <= B; b0 += 8 * WL) spmm_tile_8(ptr, idx, val, perm, bias, X, Y, ldx, ldy, q0, q1, b0);
        if (b0 + 4 * WL <= B) { spmm_tile_4(ptr, idx, val, perm, bias, X, Y, ldx, ldy, q0, q1, b0); b0 += 4 * WL; }
        if (b0 + 2 * WL <= B) { spmm_tile_2(ptr, idx, val, perm, bias, X, Y, ldx, ldy, q0, q1, b0); b0 += 2 * WL; }
        if (b0 + WL <= B) { spmm_tile_1(ptr, idx, val, perm, bias, X, Y, ldx, ldy, q0, q1, b0); b0 += WL; }
        for (; b0 < B; ++b0)
            for (int64_t r = q0; r < q1; ++r) {
                float acc = 0.0f;
                for (int64_t k = ptr[r]; k < ptr[r + 1]; ++k)
                    acc += (perm ? val[perm[k]] : val[k]) * X[idx[k] * ldx + b0];
                Y[r * ldy + b0] = acc + (bias ? bias[r] : 0.0f);
            }
    }
}

/* out[k] = sum_{b < B} G[r, b] * X[idx[k], b] for every entry k of the rows r0 <= r < r1, and
   gsum[r] = sum_b G[r, b] (the bias gradient) when gsum is not NULL. Sums run in v16 lanes over
   16-column chunks (even and odd chunks apart), then hsum16, then the columns past the last chunk. */
void vp_sddmm(const int64_t *ptr, const int64_t *idx, const float *G, const float *X, float *out,
              float *gsum, int64_t r0, int64_t r1, int64_t B, int64_t ldg, int64_t ldx) {
    const int64_t nv = B / 16;
    for (int64_t r = r0; r < r1; ++r) {
        const float *g = G + r * ldg;
        if (gsum) {
            vw a[NW];
            VP_UNROLL for (int h = 0; h < NW; ++h) a[h] = (vw){0};
            for (int64_t j = 0; j < nv; ++j)
                VP_UNROLL for (int h = 0; h < NW; ++h) a[h] += ld(g + 16 * j + WL * h);
            float t = hsum16(a);
            for (int64_t b = 16 * nv; b < B; ++b) t += g[b];
            gsum[r] = t;
        }
        int64_t k = ptr[r];
        const int64_t k1 = ptr[r + 1];
        for (; k + 2 <= k1; k += 2) {   /* two entries at a time: independent chains */
            const float *x0 = X + idx[k] * ldx, *x1 = X + idx[k + 1] * ldx;
            vw s0[NW], t0[NW], s1[NW], t1[NW];
            VP_UNROLL for (int h = 0; h < NW; ++h) s0[h] = t0[h] = s1[h] = t1[h] = (vw){0};
            int64_t j = 0;
            for (; j + 2 <= nv; j += 2)
                VP_UNROLL for (int h = 0; h < NW; ++h) {
                    const int64_t o = 16 * j + WL * h;
                    const vw ga = ld(g + o), gb = ld(g + o + 16);
                    s0[h] += ga * ld(x0 + o); t0[h] += gb * ld(x0 + o + 16);
                    s1[h] += ga * ld(x1 + o); t1[h] += gb * ld(x1 + o + 16);
                }
            if (j < nv)
                VP_UNROLL for (int h = 0; h < NW; ++h) {
                    const int64_t o = 16 * j + WL * h;
                    const vw ga = ld(g + o);
                    s0[h] += ga * ld(x0 + o); s1[h] += ga * ld(x1 + o);
                }
            VP_UNROLL for (int h = 0; h < NW; ++h) { s0[h] += t0[h]; s1[h] += t1[h]; }
            float a0 = hsum16(s0), a1 = hsum16(s1);
            for (int64_t b = 16 * nv; b < B; ++b) { a0 += g[b] * x0[b]; a1 += g[b] * x1[b]; }
            out[k] = a0; out[k + 1] = a1;
        }
        for (; k < k1; ++k) {
            const float *x0 = X + idx[k] * ldx;
            vw s0[NW], t0[NW];
            VP_UNROLL for (int h = 0; h < NW; ++h) s0[h] = t0[h] = (vw){0};
            int64_t j = 0;
            for (; j + 2 <= nv; j += 2)
                VP_UNROLL for (int h = 0; h < NW; ++h) {
                    const int64_t o = 16 * j + WL * h;
                    s0[h] += ld(g + o) * ld(x0 + o); t0[h] += ld(g + o + 16) * ld(x0 + o + 16);
                }
            if (j < nv)
                VP_UNROLL for (int h = 0; h < NW; ++h) s0[h] += ld(g + 16 * j + WL * h) * ld(x0 + 16 * j + WL * h);
            VP_UNROLL for (int h = 0; h < NW; ++h) s0[h] += t0[h];
            float a0 = hsum16(s0);
            for (int64_t b = 16 * nv; b < B; ++b) a0 += g[b] * x0[b];
            out[k] = a0;
        }
    }
}
