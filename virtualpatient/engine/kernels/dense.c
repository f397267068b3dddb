/* The dense layers' products as one fused multiply-add chain per output, k = 0, 1, ..., K - 1 from
   0: the order in which oneDNN's matmul (brgemm) computes them for K <= 1024 and more than one row
   (benchmarks/bench_levers.py --only order), so these give its numbers bit for bit where that holds.
   virtualpatient/engine/ops.py checks that on first use and otherwise keeps calling oneDNN.

   Written with explicit FMA intrinsics: GCC's tuning for AMD cores splits long chains of a * b + c
   into a multiply and an add (a second rounding). Without AVX2 and FMA there is no fast path, and
   vp_dense_fast() says so (the scalar loop below only keeps such builds correct; vector tails
   are masked). */
#include <stdint.h>

#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#if defined(__AVX512F__)
#define DL 16
typedef __m512 vr;
#define V_LOAD(p) _mm512_loadu_ps(p)
#define V_STORE(p, v) _mm512_storeu_ps(p, v)
#define V_MLOAD(p, m) _mm512_maskz_loadu_ps((__mmask16)(m), p)
#define V_MSTORE(p, m, v) _mm512_mask_storeu_ps(p, (__mmask16)(m), v)
#define V_SET1(a) _mm512_set1_ps(a)
#define V_FMA(a, b, c) _mm512_fmadd_ps(a, b, c)
#define V_ADD(a, b) _mm512_add_ps(a, b)
#define V_ZERO() _mm512_setzero_ps()
typedef uint32_t vmask;
static inline vmask tail_mask(int64_t n) { return (1u << n) - 1u; }
#else
#define DL 8
typedef __m256 vr;
#define V_LOAD(p) _mm256_loadu_ps(p)
#define V_STORE(p, v) _mm256_storeu_ps(p, v)
#define V_MLOAD(p, m) _mm256_maskload_ps(p, m)
#define V_MSTORE(p, m, v) _mm256_maskstore_ps(p, m, v)
#define V_SET1(a) _mm256_set1_ps(a)
#define V_FMA(a, b, c) _mm256_fmadd_ps(a, b, c)
#define V_ADD(a, b) _mm256_add_ps(a, b)
#define V_ZERO() _mm256_setzero_ps()
typedef __m256i vmask;
static inline vmask tail_mask(int64_t n) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32((int)n), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
#endif
#define D_UNROLL _Pragma("GCC unroll 16")

/* Rows m0..m0+MR-1, columns j0..j0+NV*DL-1 of C (the last vector masked when MASKED), over K terms:
   the chains start from 0 (first) or go on from the float32 values C holds, the same chain. The
   bias, when given, is added to each finished chain: one more rounding, as adding it afterwards. */
#define DENSE_TILE(MR, NV, MASKED)                                                                   \
    static inline void dense_tile_##MR##_##NV##_##MASKED(                                            \
        const float *A, int64_t sam, int64_t sak, const float *B, int64_t ldb, float *C,             \
        int64_t ldc, const float *bias, int64_t K, vmask mask, int first) {                          \
        vr acc[MR][NV];                                                                              \
        D_UNROLL for (int r = 0; r < MR; ++r) D_UNROLL for (int j = 0; j < NV; ++j)                  \
            acc[r][j] = first ? V_ZERO() : (MASKED && j == NV - 1) ? V_MLOAD(C + r * ldc + DL * j, mask) \
                                                                   : V_LOAD(C + r * ldc + DL * j);   \
        for (int64_t k = 0; k < K; ++k) {                                                            \
            vr b[NV];                                                                                \
            D_UNROLL for (int j = 0; j < NV; ++j)                                                    \
                b[j] = (MASKED && j == NV - 1) ? V_MLOAD(B + k * ldb + DL * j, mask)                 \
                                               : V_LOAD(B + k * ldb + DL * j);                       \
            D_UNROLL for (int r = 0; r < MR; ++r) {                                                  \
                const vr a = V_SET1(A[r * sam + k * sak]);                                           \
                D_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] = V_FMA(a, b[j], acc[r][j]);         \
            }                                                                                        \
        }                                                                                            \
        D_UNROLL for (int r = 0; r < MR; ++r) {                                                      \
            const vr add = V_SET1(bias ? bias[r] : 0.0f);                                            \
            D_UNROLL for (int j = 0; j < NV; ++j) {                                                  \
                const vr v = bias ? V_ADD(acc[r][j], add) : acc[r][j];                               \
                if (MASKED && j == NV - 1) V_MSTORE(C + r * ldc + DL * j, mask, v);                  \
                else V_STORE(C + r * ldc + DL * j, v);                                               \
            }                                                                                        \
        }                                                                                            \
    }
#define DENSE_TILES(NV, MASKED) \
    DENSE_TILE(6, NV, MASKED) DENSE_TILE(3, NV, MASKED) DENSE_TILE(2, NV, MASKED) DENSE_TILE(1, NV, MASKED)
DENSE_TILES(2, 0)
DENSE_TILES(1, 0)
DENSE_TILES(1, 1)

/* Columns j0.. of every row: rows six at a time, the rest in tiles of 3, 2 and 1 (one row alone
   does 2 FMAs per 2 loads). */
#define DENSE_ROWS(NV, MASKED, mask, Bj, lb)                                                         \
    do {                                                                                             \
        int64_t m = 0;                                                                               \
        for (; m + 6 <= M; m += 6)                                                                   \
            dense_tile_6_##NV##_##MASKED(A + m * sam, sam, sak, Bj, lb, C + m * ldc + j, ldc,     \
                                         bias ? bias + m : 0, kc, mask, first);                      \
        if (m + 3 <= M) {                                                                            \
            dense_tile_3_##NV##_##MASKED(A + m * sam, sam, sak, Bj, lb, C + m * ldc + j, ldc,     \
                                         bias ? bias + m : 0, kc, mask, first);                      \
            m += 3;                                                                                  \
        }                                                                                            \
        if (m + 2 <= M) {                                                                            \
            dense_tile_2_##NV##_##MASKED(A + m * sam, sam, sak, Bj, lb, C + m * ldc + j, ldc,     \
                                         bias ? bias + m : 0, kc, mask, first);                      \
            m += 2;                                                                                  \
        }                                                                                            \
        if (m < M)                                                                                   \
            dense_tile_1_##NV##_##MASKED(A + m * sam, sam, sak, Bj, lb, C + m * ldc + j, ldc,     \
                                         bias ? bias + m : 0, kc, mask, first);                      \
    } while (0)

/* Columns j..j+width-1 of B given as its transpose (BT's rows ldbt apart, contiguous in k): copied
   into panel as K rows of width, the layout the tiles read, while the columns stay in cache. */
static inline const float *pack_panel(const float *BT, int64_t ldbt, int64_t j, int64_t nj, int64_t width,
                                      int64_t K, float *panel) {
    for (int64_t c = 0; c < nj; ++c) {
        const float *row = BT + (j + c) * ldbt;
        for (int64_t k = 0; k < K; ++k) panel[k * width + c] = row[k];
    }
    return panel;
}

/* Terms per block of the sum when A is read through a transpose (the input gradient: one cache
   line per term and row strip): the chains are stored in C between blocks (the same chains), so a
   block's panel of B (KC x 2 DL floats) and strip of A stay in L1. With A's rows contiguous, one
   block (measured faster on the Zen 3: the strip is K floats per row). */
#define KC 128

/* B's rows ldb apart (bt = 0), or B given as its transpose with rows ldb apart (bt = 1, packed a
   panel at a time into panel, K x 2 DL floats). */
static void dense_one(const float *A0, int64_t sam, int64_t sak, const float *B0, int64_t ldb, int bt, float *panel,
                      float *C, int64_t ldc, const float *bias0, int64_t M, int64_t N, int64_t K) {
    const vmask none = tail_mask(DL);
    const int64_t block = sak == 1 ? K : KC;
    for (int64_t k0 = 0; k0 < K; k0 += block) {
        const int64_t kc = K - k0 < block ? K - k0 : block;
        const int first = k0 == 0;
        const float *bias = k0 + kc == K ? bias0 : 0;
        const float *A = A0 + k0 * sak;
        const float *B = bt ? B0 + k0 : B0 + k0 * ldb;
        int64_t j = 0;
        for (; j + 2 * DL <= N; j += 2 * DL) {
            const float *Bj = bt ? pack_panel(B, ldb, j, 2 * DL, 2 * DL, kc, panel) : B + j;
            const int64_t lb = bt ? 2 * DL : ldb;
            DENSE_ROWS(2, 0, none, Bj, lb);
        }
        if (j + DL <= N) {
            const float *Bj = bt ? pack_panel(B, ldb, j, DL, DL, kc, panel) : B + j;
            const int64_t lb = bt ? DL : ldb;
            DENSE_ROWS(1, 0, none, Bj, lb);
            j += DL;
        }
        if (j < N) {
            const vmask tail = tail_mask(N - j);
            const float *Bj = bt ? pack_panel(B, ldb, j, N - j, DL, kc, panel) : B + j;
            const int64_t lb = bt ? DL : ldb;
            DENSE_ROWS(1, 1, tail, Bj, lb);
        }
    }
}

int vp_dense_fast(void) { return DL; }
#else
static void dense_one(const float *A, int64_t sam, int64_t sak, const float *B, int64_t ldb, int bt, float *panel,
                      float *C, int64_t ldc, const float *bias, int64_t M, int64_t N, int64_t K) {
    (void)panel;
    for (int64_t m = 0; m < M; ++m)
        for (int64_t j = 0; j < N; ++j) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k)
                acc = __builtin_fmaf(A[m * sam + k * sak], bt ? B[j * ldb + k] : B[k * ldb + j], acc);
            C[m * ldc + j] = bias ? acc + bias[m] : acc;
        }
}

int vp_dense_fast(void) { return 0; }
#endif

/* For each of patients p = p0 .. p1 - 1: C_p[m, j] = sum_k A_p[m, k] B_p[k, j] (+ bias_p[m]), with
   A_p[m, k] at A + p * sap + m * sam + k * sak (any layout: a weight or its transpose), B_p's rows
   ldb apart and contiguous (bt = 0) or B_p given as its transpose, rows of K ldb apart (bt = 1),
   C_p's rows ldc apart, bias (may be NULL) rows sbias apart. A caller may split the rows: pass
   A, C and bias at the first row and M the rows to compute (each output is its own chain). panel:
   K x 2 DL floats of scratch when bt (any thread calling this at once needs its own). */
void vp_dense(const float *A, int64_t sap, int64_t sam, int64_t sak, const float *B, int64_t sbp,
              int64_t ldb, int64_t bt, float *panel, float *C, int64_t scp, int64_t ldc, const float *bias,
              int64_t sbias, int64_t p0, int64_t p1, int64_t M, int64_t N, int64_t K) {
    for (int64_t p = p0; p < p1; ++p)
        dense_one(A + p * sap, sam, sak, B + p * sbp, ldb, (int)bt, panel, C + p * scp, ldc,
                  bias ? bias + p * sbias : 0, M, N, K);
}
