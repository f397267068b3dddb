/* The dense layers' products as one fused multiply-add chain per output, k = 0, 1, ..., K - 1 from
   0: the order in which oneDNN's matmul (brgemm) computes them for K <= 1024 and more than one row
   (benchmarks/bench_levers.py --only order), so these give its numbers bit for bit where that holds.
   virtualpatient/engine/ops.py checks that on first use and otherwise keeps calling oneDNN.

   Written with explicit FMA intrinsics: GCC's tuning for AMD cores splits long chains of a * b + c
   into a multiply and an add (a second rounding). Without AVX2 and FMA there is no fast path, and
   vp_dense_fast() says so (the scalar loop below only keeps such builds correct; vector tails
   are masked). */
#include <stdint.h>

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

/* A read through a transpose (the input gradient, W^T gz) touches one cache line per term and
   row strip, K strided lines per strip: a tile's rows of A are first copied, term by term, into a
   contiguous strip (pack_strip), read from there for every panel of B and C. Its terms come in
   blocks of at most STRIP_TERMS (the chains are stored in C between blocks: the same chains), so
   the strip (STRIP_TERMS x 6 floats) lives on the stack. */
#define STRIP_TERMS 512

/* strip[i mr + r] = a[r][k_i sak], k_i = terms[i] (or k0 + i without terms), i < n. */
static inline void pack_strip(int mr, const float *const *a, int64_t sak, const int32_t *terms, int64_t k0,
                              int64_t n, float *strip) {
    for (int64_t i = 0; i < n; ++i) {
        const int64_t k = (terms ? terms[i] : k0 + i) * sak;
        for (int r = 0; r < mr; ++r) strip[i * mr + r] = a[r][k];
    }
}

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

/* B's rows ldb apart (bt = 0), or B given as its transpose with rows ldb apart (bt = 1, packed a
   panel at a time into panel, K x 2 DL floats). */
static void dense_one(const float *A0, int64_t sam, int64_t sak, const float *B0, int64_t ldb, int bt, float *panel,
                      float *C, int64_t ldc, const float *bias0, int64_t M, int64_t N, int64_t K) {
    const vmask none = tail_mask(DL);
    const int64_t block = sak == 1 ? K : STRIP_TERMS;
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

/* Tiles given as lists (vp_dense_tiles): up to 6 rows anywhere in A and C (one pointer per row),
   over the terms k listed in terms (LISTED 1 and 2) or k = 0 .. K - 1 (LISTED 0). A's value for
   the i-th term k is a[r][k sak], or a[r][i sak] with LISTED 2 (a strip packed for the listed
   terms). A zero term adds nothing to a chain of fused multiply-adds (fma(0, b, c) = c for
   finite b, and the chain never holds -0), so leaving out terms whose A entries are all 0 keeps
   every chain's value. bv: the rows' bias values or 0. */
#define LIST_TILE(MR, NV, MASKED, LISTED)                                                            \
    static inline void list_tile_##MR##_##NV##_##MASKED##_##LISTED(                                  \
        const float *const *a, int64_t sak, const int32_t *terms, const float *B, int64_t ldb,       \
        float *const *c, const float *bv, int64_t K, vmask mask, int first) {                        \
        vr acc[MR][NV];                                                                              \
        D_UNROLL for (int r = 0; r < MR; ++r) D_UNROLL for (int j = 0; j < NV; ++j)                  \
            acc[r][j] = first ? V_ZERO() : (MASKED && j == NV - 1) ? V_MLOAD(c[r] + DL * j, mask)    \
                                                                   : V_LOAD(c[r] + DL * j);          \
        for (int64_t i = 0; i < K; ++i) {                                                            \
            const int64_t k = LISTED ? terms[i] : i, ka = LISTED == 2 ? i : k;                       \
            vr b[NV];                                                                                \
            D_UNROLL for (int j = 0; j < NV; ++j)                                                    \
                b[j] = (MASKED && j == NV - 1) ? V_MLOAD(B + k * ldb + DL * j, mask)                 \
                                               : V_LOAD(B + k * ldb + DL * j);                       \
            D_UNROLL for (int r = 0; r < MR; ++r) {                                                  \
                const vr av = V_SET1(a[r][ka * sak]);                                                \
                D_UNROLL for (int j = 0; j < NV; ++j) acc[r][j] = V_FMA(av, b[j], acc[r][j]);        \
            }                                                                                        \
        }                                                                                            \
        D_UNROLL for (int r = 0; r < MR; ++r) {                                                      \
            const vr add = V_SET1(bv ? bv[r] : 0.0f);                                                \
            D_UNROLL for (int j = 0; j < NV; ++j) {                                                  \
                const vr v = bv ? V_ADD(acc[r][j], add) : acc[r][j];                                 \
                if (MASKED && j == NV - 1) V_MSTORE(c[r] + DL * j, mask, v);                         \
                else V_STORE(c[r] + DL * j, v);                                                      \
            }                                                                                        \
        }                                                                                            \
    }
#define LIST_TILES(MR)                                                                               \
    LIST_TILE(MR, 2, 0, 0) LIST_TILE(MR, 1, 0, 0) LIST_TILE(MR, 1, 1, 0)                             \
    LIST_TILE(MR, 2, 0, 1) LIST_TILE(MR, 1, 0, 1) LIST_TILE(MR, 1, 1, 1)                             \
    LIST_TILE(MR, 2, 0, 2) LIST_TILE(MR, 1, 0, 2) LIST_TILE(MR, 1, 1, 2)
LIST_TILES(6) LIST_TILES(5) LIST_TILES(4) LIST_TILES(3) LIST_TILES(2) LIST_TILES(1)

#define LIST_CASE(MR, NV, MASKED, LISTED)                                                            \
    case MR: list_tile_##MR##_##NV##_##MASKED##_##LISTED(a, sak, terms, B, ldb, c, bv, K, mask, first); break;
#define LIST_SWITCH(NV, MASKED, LISTED)                                                              \
    switch (mr) {                                                                                    \
        LIST_CASE(6, NV, MASKED, LISTED) LIST_CASE(5, NV, MASKED, LISTED)                            \
        LIST_CASE(4, NV, MASKED, LISTED) LIST_CASE(3, NV, MASKED, LISTED)                            \
        LIST_CASE(2, NV, MASKED, LISTED) LIST_CASE(1, NV, MASKED, LISTED)                            \
        default: break;                                                                              \
    }

/* One tile of mr rows on nj columns (2 DL, DL, or fewer: masked) of B and C; packed: A holds
   strips for the listed terms. */
static void list_tile(int mr, int64_t nj, const float *const *a, int64_t sak, const int32_t *terms, int packed,
                      const float *B, int64_t ldb, float *const *c, const float *bv, int64_t K, int first) {
    if (nj == 2 * DL) {
        const vmask mask = tail_mask(DL);
        if (!terms) { LIST_SWITCH(2, 0, 0) } else if (packed) { LIST_SWITCH(2, 0, 2) } else { LIST_SWITCH(2, 0, 1) }
    } else if (nj == DL) {
        const vmask mask = tail_mask(DL);
        if (!terms) { LIST_SWITCH(1, 0, 0) } else if (packed) { LIST_SWITCH(1, 0, 2) } else { LIST_SWITCH(1, 0, 1) }
    } else {
        const vmask mask = tail_mask(nj);
        if (!terms) { LIST_SWITCH(1, 1, 0) } else if (packed) { LIST_SWITCH(1, 1, 2) } else { LIST_SWITCH(1, 1, 1) }
    }
}

static inline int64_t panel_width(int64_t left) { return left >= 2 * DL ? 2 * DL : left >= DL ? DL : left; }

/* Up to 6 pairs (row of A, group of DL columns of a packed panel of B, lb floats per term): one
   chain per column over all K terms, 6 independent accumulators; group i's first width[i] columns
   stored (all DL when width[i] = DL). */
#define PAIR_TILE(NP)                                                                                \
    static inline void pair_tile_##NP(const float *const *a, const float *const *b, int64_t lb,      \
                                      float *const *c, const int64_t *width, int64_t K) {            \
        vr acc[NP];                                                                                  \
        D_UNROLL for (int i = 0; i < NP; ++i) acc[i] = V_ZERO();                                     \
        for (int64_t k = 0; k < K; ++k)                                                              \
            D_UNROLL for (int i = 0; i < NP; ++i)                                                    \
                acc[i] = V_FMA(V_SET1(a[i][k]), V_LOAD(b[i] + k * lb), acc[i]);                      \
        D_UNROLL for (int i = 0; i < NP; ++i) {                                                      \
            if (width[i] == DL) V_STORE(c[i], acc[i]);                                               \
            else V_MSTORE(c[i], tail_mask(width[i]), acc[i]);                                        \
        }                                                                                            \
    }
PAIR_TILE(6) PAIR_TILE(5) PAIR_TILE(4) PAIR_TILE(3) PAIR_TILE(2) PAIR_TILE(1)

static void pair_tile(int np, const float *const *a, const float *const *b, int64_t lb, float *const *c,
                      const int64_t *width, int64_t K) {
    switch (np) {
        case 6: pair_tile_6(a, b, lb, c, width, K); break;
        case 5: pair_tile_5(a, b, lb, c, width, K); break;
        case 4: pair_tile_4(a, b, lb, c, width, K); break;
        case 3: pair_tile_3(a, b, lb, c, width, K); break;
        case 2: pair_tile_2(a, b, lb, c, width, K); break;
        case 1: pair_tile_1(a, b, lb, c, width, K); break;
        default: break;
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

/* Without the fast path: one tile as plain chains (the same values; A read as the fast path reads it). */
static void list_tile(int mr, int64_t nj, const float *const *a, int64_t sak, const int32_t *terms, int packed,
                      const float *B, int64_t ldb, float *const *c, const float *bv, int64_t K, int first) {
    for (int r = 0; r < mr; ++r)
        for (int64_t j = 0; j < nj; ++j) {
            float acc = first ? 0.0f : c[r][j];
            for (int64_t i = 0; i < K; ++i) {
                const int64_t k = terms ? terms[i] : i;
                acc = __builtin_fmaf(a[r][(packed ? i : k) * sak], B[k * ldb + j], acc);
            }
            c[r][j] = bv ? acc + bv[r] : acc;
        }
}

#define DL 8 /* the fast path's narrowest panel, also here for the same tiles */
static inline int64_t panel_width(int64_t left) { return left >= 2 * DL ? 2 * DL : left; }

static void pair_tile(int np, const float *const *a, const float *const *b, int64_t lb, float *const *c,
                      const int64_t *width, int64_t K) {
    for (int i = 0; i < np; ++i)
        for (int64_t j = 0; j < width[i]; ++j) {
            float acc = 0.0f;
            for (int64_t k = 0; k < K; ++k) acc = __builtin_fmaf(a[i][k], b[i][k * lb + j], acc);
            c[i][j] = acc;
        }
}

int vp_dense_fast(void) { return 0; }
#endif

/* A read through a transpose (sak != 1) with B's rows direct: row tile by row tile, each tile's
   rows of A packed into a strip once per block of terms and read from there for every panel. The
   same chains as dense_one's (the blocks only store them in C in between). */
static void dense_packed(const float *A, int64_t sam, int64_t sak, const float *B, int64_t ldb, float *C,
                         int64_t ldc, const float *bias, int64_t M, int64_t N, int64_t K) {
    float strip[STRIP_TERMS * 6], bv[6];
    const float *a[6], *s[6];
    float *c[6];
    for (int r = 0; r < 6; ++r) s[r] = strip + r;
    for (int64_t k0 = 0; k0 < K; k0 += STRIP_TERMS) {
        const int64_t kc = K - k0 < STRIP_TERMS ? K - k0 : STRIP_TERMS;
        const int first = k0 == 0, last = k0 + kc == K;
        for (int64_t m = 0; m < M;) {
            const int mr = M - m >= 6 ? 6 : (int)(M - m);
            for (int r = 0; r < mr; ++r) {
                a[r] = A + (m + r) * sam;
                if (bias && last) bv[r] = bias[m + r];
            }
            pack_strip(mr, a, sak, 0, k0, kc, strip);
            for (int64_t j = 0; j < N;) {
                const int64_t nj = panel_width(N - j);
                for (int r = 0; r < mr; ++r) c[r] = C + (m + r) * ldc + j;
                list_tile(mr, nj, s, mr, 0, 0, B + k0 * ldb + j, ldb, c, bias && last ? bv : 0, kc, first);
                j += nj;
            }
            m += mr;
        }
    }
}

/* For each of patients p = p0 .. p1 - 1: C_p[m, j] = sum_k A_p[m, k] B_p[k, j] (+ bias_p[m]), with
   A_p[m, k] at A + p * sap + m * sam + k * sak (any layout: a weight or its transpose), B_p's rows
   ldb apart and contiguous (bt = 0) or B_p given as its transpose, rows of K ldb apart (bt = 1),
   C_p's rows ldc apart, bias (may be NULL) rows sbias apart. A caller may split the rows: pass
   A, C and bias at the first row and M the rows to compute (each output is its own chain). panel:
   K x 2 DL floats of scratch when bt (any thread calling this at once needs its own). */
void vp_dense(const float *A, int64_t sap, int64_t sam, int64_t sak, const float *B, int64_t sbp,
              int64_t ldb, int64_t bt, float *panel, float *C, int64_t scp, int64_t ldc, const float *bias,
              int64_t sbias, int64_t p0, int64_t p1, int64_t M, int64_t N, int64_t K) {
    for (int64_t p = p0; p < p1; ++p) {
        if (sak != 1 && !bt)
            dense_packed(A + p * sap, sam, sak, B + p * sbp, ldb, C + p * scp, ldc, bias ? bias + p * sbias : 0,
                         M, N, K);
        else
            dense_one(A + p * sap, sam, sak, B + p * sbp, ldb, (int)bt, panel, C + p * scp, ldc,
                      bias ? bias + p * sbias : 0, M, N, K);
    }
}

/* Ints per tile of vp_dense_tiles: patient, rows, full (1: every term), then 6 row indices. */
#define TILE_INTS 9

/* vp_dense for tiles of rows listed in tiles[t * TILE_INTS ...] (t = t0 .. t1 - 1; any rows of any
   patient, each row of C in at most one tile), each over the terms k listed for it
   (lidx[lptr[t] .. lptr[t + 1]), ascending) or, for a full tile, every term. Each output is the
   chain over its tile's terms, which is vp_dense's chain when the A entries left out are 0. B's
   rows ldb apart and contiguous. When A is read through a transpose, each tile's rows of A are
   first packed into a strip for its terms (a block of STRIP_TERMS terms at a time). Strides and
   the rest as vp_dense. */
void vp_dense_tiles(const float *A, int64_t sap, int64_t sam, int64_t sak, const float *B, int64_t sbp,
                    int64_t ldb, float *C, int64_t scp, int64_t ldc, const float *bias, int64_t sbias,
                    const int32_t *tiles, const int64_t *lptr, const int32_t *lidx, int64_t t0, int64_t t1,
                    int64_t N, int64_t K) {
    const float *a[6], *s[6];
    float *c[6];
    float bv[6], strip[STRIP_TERMS * 6];
    const int64_t block = sak == 1 ? K : STRIP_TERMS;
    for (int64_t k0 = 0; k0 < K; k0 += block) {
        const int64_t kc = K - k0 < block ? K - k0 : block;
        const int first = k0 == 0, last = k0 + kc == K;
        for (int64_t t = t0; t < t1; ++t) {
            const int32_t *tile = tiles + t * TILE_INTS;
            const int mr = tile[1];
            const int64_t p = tile[0];
            const int32_t *terms = 0;
            int64_t n_terms = kc;
            if (!tile[2]) {  /* the listed terms inside this block */
                const int32_t *lo = lidx + lptr[t], *hi = lidx + lptr[t + 1];
                while (lo < hi && *lo < k0) ++lo;
                const int32_t *end = lo;
                while (end < hi && *end < k0 + kc) ++end;
                terms = lo;
                n_terms = end - lo;
            }
            for (int r = 0; r < mr; ++r) {
                const int64_t row = tile[3 + r];
                a[r] = A + p * sap + row * sam + (terms ? 0 : k0 * sak);
                if (bias && last) bv[r] = bias[p * sbias + row];
            }
            const int packed = sak != 1;
            if (packed) {
                pack_strip(mr, a, sak, terms, 0, n_terms, strip);
                for (int r = 0; r < mr; ++r) s[r] = strip + r;
            }
            const float *Bp = B + p * sbp + (terms ? 0 : k0 * ldb);
            for (int64_t j = 0; j < N;) {
                const int64_t nj = panel_width(N - j);
                for (int r = 0; r < mr; ++r) c[r] = C + p * scp + tile[3 + r] * ldc + j;
                list_tile(mr, nj, packed ? s : a, packed ? mr : sak, terms, packed, Bp + j, ldb, c,
                          bias && last ? bv : 0, n_terms, first);
                j += nj;
            }
        }
    }
}

/* The weight gradient C_p = A_p B_p of a masked layer for patients p0 .. p1 - 1, B_p given as its
   transpose (rows of K, ldb apart; A_p's rows sam apart, contiguous): the rows of the full tiles
   in tiles[0 .. n_tiles) (TILE_INTS each, patient by patient) on every column; other rows only on
   their pairs (row, group): for panel q (columns q 2 DL .. q 2 DL + 2 DL - 1) of patient p, pairs
   pairs[2 i], pairs[2 i + 1] for i in pptr[p n_panels + q] .. pptr[p n_panels + q + 1), the group
   0 or 1 of DL columns in the panel. Every output computed is vp_dense's chain; the columns of a
   pair row outside its pairs are not written. panel: 2 DL x K floats of scratch. */
void vp_dense_wgrad(const float *A, int64_t sap, int64_t sam, const float *B, int64_t sbp, int64_t ldb,
                    float *panel, float *C, int64_t scp, int64_t ldc, const int32_t *tiles, int64_t n_tiles,
                    const int64_t *pptr, const int32_t *pairs, int64_t p0, int64_t p1, int64_t N, int64_t K) {
    const int64_t n_panels = (N + 2 * DL - 1) / (2 * DL);
    const float *a[6], *b[6];
    float *c[6];
    int64_t width[6];
    int64_t t = 0;
    while (t < n_tiles && tiles[t * TILE_INTS] < p0) ++t;
    for (int64_t p = p0; p < p1; ++p) {
        int64_t t_end = t;
        while (t_end < n_tiles && tiles[t_end * TILE_INTS] == p) ++t_end;
        const float *Ap = A + p * sap;
        for (int64_t q = 0; q < n_panels; ++q) {
            const int64_t j = q * 2 * DL, nj = N - j < 2 * DL ? N - j : 2 * DL;
            pack_panel(B + p * sbp, ldb, j, nj, 2 * DL, K, panel);
            for (int64_t u = t; u < t_end; ++u) {
                const int32_t *tile = tiles + u * TILE_INTS;
                const int mr = tile[1];
                for (int64_t part = 0; part < nj; part += DL) {  /* one or two vectors' worth */
                    const int64_t w = nj - part < DL ? nj - part : DL;
                    const int64_t full2 = part == 0 && nj == 2 * DL;
                    for (int r = 0; r < mr; ++r) {
                        a[r] = Ap + tile[3 + r] * sam;
                        c[r] = C + p * scp + tile[3 + r] * ldc + j + part;
                    }
                    list_tile(mr, full2 ? 2 * DL : w, a, 1, 0, 0, panel + part, 2 * DL, c, 0, K, 1);
                    if (full2) break;
                }
            }
            const int64_t e0 = pptr[p * n_panels + q], e1 = pptr[p * n_panels + q + 1];
            for (int64_t e = e0; e < e1; e += 6) {
                const int np = e1 - e < 6 ? (int)(e1 - e) : 6;
                for (int i = 0; i < np; ++i) {
                    const int64_t row = pairs[2 * (e + i)], group = pairs[2 * (e + i) + 1];
                    const int64_t w = nj - group * DL;
                    a[i] = Ap + row * sam;
                    b[i] = panel + group * DL;
                    c[i] = C + p * scp + row * ldc + j + group * DL;
                    width[i] = w < DL ? w : DL;
                }
                pair_tile(np, a, (const float *const *)b, 2 * DL, c, width, K);
            }
        }
        t = t_end;
    }
}

/* One-sample products: the constant units' share of the next layer's bias, W c, and its input
   gradient W^T g (a batch of one column). oneDNN computes these through its matrix-vector kernels,
   in other orders than its matrix products:

   - W c (vp_gemv): each output's terms k go to eight lanes, lane k mod 8, each lane one fused
     multiply-add chain in ascending k; then the lanes are folded, l + (l + 4) for l < 4, and summed
     in pairs, (0 + 1) + (2 + 3). That is oneDNN's order on AVX2 machines for sums of up to 1,024
     terms (ops.gemv_matches_onednn checks it on first use; with wider vectors it differs).
   - W^T g (vp_gemv_t): one chain per output in ascending term order, as vp_dense.

   Neither depends on the build's vectors: the scalar loops give the same bits. */
static inline float gemv_row(const float *w, const float *x, int64_t K) {
    float lane[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
    int64_t k = 0;
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (; k + 8 <= K; k += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), acc);
    _mm256_storeu_ps(lane, acc);
#endif
    for (; k < K; ++k) lane[k & 7] = __builtin_fmaf(w[k], x[k], lane[k & 7]);
    const float a0 = lane[0] + lane[4], a1 = lane[1] + lane[5], a2 = lane[2] + lane[6], a3 = lane[3] + lane[7];
    return (a0 + a1) + (a2 + a3);
}

/* y_p[m] = sum_k W_p[m, k] x_p[k] in oneDNN's order above, for patients p0 .. p1 - 1: W_p's rows sam
   apart and contiguous, x_p and y_p contiguous. */
void vp_gemv(const float *W, int64_t swp, int64_t sam, const float *x, int64_t sxp, float *y, int64_t syp,
             int64_t p0, int64_t p1, int64_t M, int64_t K) {
    for (int64_t p = p0; p < p1; ++p)
        for (int64_t m = 0; m < M; ++m) y[p * syp + m] = gemv_row(W + p * swp + m * sam, x + p * sxp, K);
}

/* y_p[k] = sum_m W_p[m, k] g_p[m], one chain per output in ascending m (vp_dense's order), for
   patients p0 .. p1 - 1: W_p's rows sam apart and contiguous, g_p and y_p contiguous. Outputs go
   four vectors at a time down the rows (each row's piece contiguous). */
void vp_gemv_t(const float *W, int64_t swp, int64_t sam, const float *g, int64_t sgp, float *y, int64_t syp,
               int64_t p0, int64_t p1, int64_t M, int64_t K) {
    for (int64_t p = p0; p < p1; ++p) {
        const float *Wp = W + p * swp, *gp = g + p * sgp;
        float *yp = y + p * syp;
        int64_t k = 0;
#if defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
        for (; k + 32 <= K; k += 32) {
            __m256 acc0 = _mm256_setzero_ps(), acc1 = acc0, acc2 = acc0, acc3 = acc0;
            for (int64_t m = 0; m < M; ++m) {
                const float *row = Wp + m * sam + k;
                const __m256 gm = _mm256_set1_ps(gp[m]);
                acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(row), gm, acc0);
                acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(row + 8), gm, acc1);
                acc2 = _mm256_fmadd_ps(_mm256_loadu_ps(row + 16), gm, acc2);
                acc3 = _mm256_fmadd_ps(_mm256_loadu_ps(row + 24), gm, acc3);
            }
            _mm256_storeu_ps(yp + k, acc0);
            _mm256_storeu_ps(yp + k + 8, acc1);
            _mm256_storeu_ps(yp + k + 16, acc2);
            _mm256_storeu_ps(yp + k + 24, acc3);
        }
        for (; k + 8 <= K; k += 8) {
            __m256 acc = _mm256_setzero_ps();
            for (int64_t m = 0; m < M; ++m)
                acc = _mm256_fmadd_ps(_mm256_loadu_ps(Wp + m * sam + k), _mm256_set1_ps(gp[m]), acc);
            _mm256_storeu_ps(yp + k, acc);
        }
#endif
        for (; k < K; ++k) {
            float acc = 0.0f;
            for (int64_t m = 0; m < M; ++m) acc = __builtin_fmaf(Wp[m * sam + k], gp[m], acc);
            yp[k] = acc;
        }
    }
}
