"""Compressed masked layers: the unmasked weights of P patients as one block-diagonal CSR matrix.

After the lesion a layer keeps 5 % of its weights (47.5 % after ketamine-like regrowth), and the
masks never change during training (fact 8: "the mask is then locked"). Storing only the unmasked
weights, and multiplying with them directly, does a twentieth of the dense work at 95 % sparsity.

Layout
------
Activations travel *transposed*, ``[P, units, n]`` (the ``n`` samples contiguous), so one row of the
input is a contiguous run of ``n`` floats and a sparse row times the input is a sum of scaled
contiguous rows (vectorised over samples). The P patients' masks form one block-diagonal CSR
matrix of shape ``[P * out, P * in]``: row ``p * out + r`` holds patient ``p``'s unit ``r``. The
values of all patients are one flat tensor, patient by patient, so patient ``p``'s values are the
contiguous slice ``offsets[p]:offsets[p + 1]``.

For a layer ``z = W h + b`` with ``W`` given by the pattern and ``values``:

* forward: ``z[r, :] = b[r] + sum_k values[k] * h[col[k], :]`` (SpMM);
* input gradient: ``dh = W^T dz`` (SpMM with the transposed pattern, values permuted);
* value gradient: ``dvalues[k] = sum_s dz[row[k], s] * h[col[k], s]`` (sampled dense-dense product:
  only the unmasked entries of the dense ``dz h^T`` are computed), which is exactly the dense weight
  gradient at the unmasked positions; masked positions have no value and so can never revive.

Each output entry is a sum over its own row only, in a fixed order, so a patient's numbers do not
depend on which patients it is batched with.

Kernels
-------
``native``: a small C file (below) compiled at first use with the system C compiler (``$CC`` or
``cc``, ``-O3 -march=native``, about a second) into ``$VIRTUALPATIENT_CACHE`` or
``~/.cache/virtualpatient`` and called through :mod:`ctypes` (which releases the GIL); besides the
three products it holds the elementwise steps of a hidden layer fused into single passes
(:func:`post_activation`, :func:`pre_activation_grad`, :func:`add_noise_t`). ``torch``:
``torch.sparse`` CSR products and torch elementwise ops (any device, slower on CPU). The
environment variable ``VIRTUALPATIENT_SPARSE`` chooses ``auto`` (default: native when it compiles,
else torch; dense on GPUs), ``native``, ``torch`` or ``off`` (dense matmuls everywhere).
``VIRTUALPATIENT_MARCH`` chooses the kernels' instruction-set target (:data:`MARCH_CHOICES`:
``native`` by default, ``x86-64-v3`` for AVX2 code on any AVX2 CPU, ...); the cache keys on it.

Dense layers (the ketamine-like arm's 52.5 % dense ones) use one oneDNN matmul per patient on CPU
(:func:`dense_forward`, :func:`dense_backward`): MKL's batched matmul runs its AVX2 code on AMD
CPUs, oneDNN its AVX-512 code (1.8x faster here; docs/performance.md).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from virtualpatient.errors import UsageError

__all__ = [
    "Pattern",
    "add_noise_t",
    "backend",
    "dense_backward",
    "dense_forward",
    "dense_linear_t",
    "kernels_available",
    "post_activation",
    "pre_activation_grad",
    "sparse_backward",
    "sparse_forward",
    "sparse_linear_t",
    "sparse_linear_t_out",
]

# --------------------------------------------------------------------------------------------
# The native kernels
# --------------------------------------------------------------------------------------------
_C_SOURCE = r"""
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
   as float. bias (per row, may be NULL) is added first. */
VP_NOCONTRACT void vp_post(float *h, const float *bias, void *deriv, int64_t rows, int64_t n, int64_t ld,
                           int act, float scale, float shift) {
    for (int64_t r = 0; r < rows; ++r) {
        float *x = h + r * ld;
        if (bias) {
            const float b = bias[r];
            for (int64_t j = 0; j < n; ++j) x[j] = x[j] + b;
        }
        if (act == 0 && !deriv) {
            for (int64_t j = 0; j < n; ++j) {
                const float v = x[j] < 0.0f ? 0.0f : x[j];
                const float t = v * scale;
                x[j] = t - shift;
            }
        } else if (act == 0) {
            unsigned char *m = (unsigned char *)deriv + r * n;
            for (int64_t j = 0; j < n; ++j) {
                const float v = x[j] < 0.0f ? 0.0f : x[j];   /* keeps NaN, as torch.relu does */
                m[j] = !(v <= 0.0f);
                const float t = v * scale;
                x[j] = t - shift;
            }
        } else if (!deriv) {
            for (int64_t j = 0; j < n; ++j) {
                const float t = vp_tanhf(x[j]) * scale;
                x[j] = t - shift;
            }
        } else {
            float *d = (float *)deriv + r * n;
            for (int64_t j = 0; j < n; ++j) {
                const float v = vp_tanhf(x[j]);
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
   dense path (add = 0, scale = 1, shift = 0 change nothing). 16 x 16 tiles keep the transpose in L1. */
VP_NOCONTRACT void vp_noise_t(float *h, const float *noise, int64_t P, int64_t units, int64_t n, float sigma,
                              float add, float scale, float shift) {
    float tile[16][16];
    for (int64_t p = 0; p < P; ++p) {
        const float *N = noise + p * n * units;
        float *H = h + p * units * n;
        for (int64_t u0 = 0; u0 < units; u0 += 16) {
            const int64_t nu = units - u0 < 16 ? units - u0 : 16;
            for (int64_t j0 = 0; j0 < n; j0 += 16) {
                const int64_t nj = n - j0 < 16 ? n - j0 : 16;
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
"""

#: Compiler flags (plus -march=native when the compiler takes it). -fno-trapping-math lets the
#: relu select vectorise; it changes no value (no reassociation, no fast-math).
_FLAGS = "-O3 -fno-trapping-math"

_lock = threading.Lock()
_native: ctypes.CDLL | None = None
_native_tried = False
_pool: ThreadPoolExecutor | None = None


def _cache_dir() -> Path:
    root = os.environ.get("VIRTUALPATIENT_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "virtualpatient"


def _cpu_signature() -> str:
    """Something that changes when the CPU does (a ``-march=native`` library is built for it)."""
    sig = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                sig += line
            if line.startswith("flags"):
                break
    except OSError:
        pass
    return sig


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (None where that file is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


#: The values of ``VIRTUALPATIENT_MARCH``: the instruction-set target the native kernels are compiled
#: for, as GCC and clang name it (``-march=...``), plus ``generic`` (no ``-march`` at all: baseline
#: x86-64 or whatever the compiler defaults to). ``native`` (default) is this CPU; ``x86-64-v3`` is
#: AVX2 + FMA (what a CPU without AVX-512 runs); ``x86-64-v4`` adds AVX-512.
MARCH_CHOICES = ("native", "x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64", "generic")

#: CPU flags (as /proc/cpuinfo names them) that a library built for each x86 level needs.
_MARCH_NEEDS = {
    "x86-64-v2": ("sse4_2", "ssse3", "popcnt"),
    "x86-64-v3": ("sse4_2", "ssse3", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"),
    "x86-64-v4": ("sse4_2", "ssse3", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe",
                  "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def march_setting() -> str:
    """The ``VIRTUALPATIENT_MARCH`` switch, validated (``"native"`` when unset).

    Raises
    ------
    UsageError
        The variable holds another value (the message names the variable and the values it takes).
    """
    choice = os.environ.get("VIRTUALPATIENT_MARCH", "native").strip().lower() or "native"
    if choice not in MARCH_CHOICES:
        raise UsageError(f"environment variable VIRTUALPATIENT_MARCH must be one of {', '.join(MARCH_CHOICES)}, "
                         f"got {choice!r}")
    return choice


def march_supported(march: str) -> bool:
    """Whether this CPU runs code built for ``march`` (True where its flags cannot be read)."""
    if march in ("native", "generic", "x86-64"):
        return True
    flags = _cpu_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return flags is None
    return all(f in flags for f in _MARCH_NEEDS[march])


def _arch_flags(march: str) -> list[str]:
    return [] if march == "generic" else [f"-march={march}"]


def _compile(march: str = "native") -> ctypes.CDLL | None:
    """Build (or find in the cache) the kernels for the instruction-set target ``march``.

    The cache key holds the source, the compiler, the flags and the target; a ``native`` build
    also holds the CPU's model and flags (it is built for this CPU), so a ``native`` and an
    ``x86-64-v3`` library never share a file, even on one machine.
    """
    if march not in MARCH_CHOICES:
        raise UsageError(f"instruction-set target must be one of {', '.join(MARCH_CHOICES)}, got {march!r}")
    if not march_supported(march):
        raise UsageError(f"VIRTUALPATIENT_MARCH={march} needs CPU features "
                         f"({', '.join(_MARCH_NEEDS[march])}) that this CPU lacks")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None
    machine = _cpu_signature() if march == "native" else platform.machine()
    key = hashlib.sha256("\0".join((_C_SOURCE, cc, _FLAGS, march, machine)).encode()).hexdigest()[:16]
    target = _cache_dir() / f"vp_sparse_{march}_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            src = Path(tmp) / "vp_sparse.c"
            src.write_text(_C_SOURCE)
            out = Path(tmp) / target.name
            # A compiler that does not know the target builds a baseline library only for "native"
            # (the default must work anywhere); a named target it cannot build is no target at all.
            for arch in ((_arch_flags(march), []) if march == "native" else (_arch_flags(march),)):
                cmd = [cc, *_FLAGS.split(), *arch, "-shared", "-fPIC", "-o", str(out), str(src)]
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    break
            else:
                return None
            os.replace(out, target)  # atomic: concurrent workers may build the same file
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.vp_spmm.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, i]
    lib.vp_spmm.restype = None
    lib.vp_sddmm.argtypes = [p, p, p, p, p, p, i, i, i, i, i]
    lib.vp_sddmm.restype = None
    f, c = ctypes.c_float, ctypes.c_int
    lib.vp_post.argtypes = [p, p, p, i, i, i, c, f, f]
    lib.vp_post.restype = None
    lib.vp_pre_grad.argtypes = [p, p, i, c, f]
    lib.vp_pre_grad.restype = None
    lib.vp_noise_t.argtypes = [p, p, i, i, i, f, f, f, f]
    lib.vp_noise_t.restype = None
    lib.vp_march = march
    return lib


def _native_lib() -> ctypes.CDLL | None:
    global _native, _native_tried
    if not _native_tried:
        with _lock:
            if not _native_tried:
                march = march_setting()  # a bad value is the user's to fix: raised, not warned about
                try:
                    _native = _compile(march)
                except UsageError:
                    raise
                except Exception as exc:  # pragma: no cover - depends on the machine
                    warnings.warn(f"virtualpatient: native sparse kernels unavailable ({exc}); using torch.sparse",
                                  RuntimeWarning, stacklevel=2)
                    _native = None
                _native_tried = True
    return _native


def kernel_target() -> str | None:
    """The instruction-set target of the loaded native kernels (a :data:`MARCH_CHOICES` value), or
    None without them."""
    lib = _native_lib()
    return None if lib is None else lib.vp_march


@contextlib.contextmanager
def kernels_for(march: str):
    """Within the block, the native kernels are the ones built for ``march`` (for tests and
    benchmarks that compare targets in one process). Raises :class:`UsageError` for an unknown
    target or one this CPU cannot run, and RuntimeError when the compiler cannot build it."""
    global _native, _native_tried
    lib = _compile(march)
    if lib is None:
        raise RuntimeError(f"the C compiler could not build the kernels for {march}")
    with _lock:
        old = (_native, _native_tried)
        _native, _native_tried = lib, True
    try:
        yield lib
    finally:
        with _lock:
            _native, _native_tried = old


def kernels_available() -> bool:
    """Whether the native CPU kernels compiled on this machine."""
    return _native_lib() is not None


#: The values of the ``VIRTUALPATIENT_SPARSE`` environment switch.
SPARSE_CHOICES = ("auto", "native", "torch", "off")


def sparse_setting() -> str:
    """The ``VIRTUALPATIENT_SPARSE`` switch, validated (``"auto"`` when unset).

    Raises
    ------
    UsageError
        The variable holds another value (the message names the variable and the values it takes),
        or ``VIRTUALPATIENT_MARCH`` does (:func:`march_setting`).
    """
    choice = os.environ.get("VIRTUALPATIENT_SPARSE", "auto").strip().lower() or "auto"
    if choice not in SPARSE_CHOICES:
        raise UsageError(f"environment variable VIRTUALPATIENT_SPARSE must be one of {', '.join(SPARSE_CHOICES)}, "
                         f"got {choice!r}")
    march_setting()  # its companion switch, so that callers refusing bad settings early refuse both
    return choice


def backend(device: torch.device | str) -> str:
    """The sparse backend used on ``device``: ``"native"``, ``"torch"`` or ``"off"`` (dense matmuls).

    ``VIRTUALPATIENT_SPARSE`` overrides the default, which is ``native`` on CPU when the kernels
    compile, ``torch`` on CPU otherwise, and ``off`` on GPUs (dense matmuls are fast there).
    """
    choice = sparse_setting()
    is_cpu = torch.device(device).type == "cpu"
    if choice == "auto":
        if not is_cpu:
            return "off"
        return "native" if kernels_available() else "torch"
    if choice == "native" and (not is_cpu or not kernels_available()):
        return "torch"
    return choice


def _threads_pool() -> ThreadPoolExecutor | None:
    global _pool
    n = torch.get_num_threads()
    if n <= 1:
        return None
    if _pool is None or _pool._max_workers != n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="vp-sparse")
    return _pool


def _split_blocks(n_blocks: int, work: int) -> list[tuple[int, int]]:
    """Split patient blocks over torch's thread count when the work is worth it (ctypes drops the GIL)."""
    if work < 2_000_000 or n_blocks < 2 or torch.get_num_threads() <= 1:
        return [(0, n_blocks)]
    pool = _threads_pool()
    if pool is None or work < 2_000_000 or n_blocks < 2:
        return [(0, n_blocks)]
    parts = min(pool._max_workers, n_blocks)
    bounds = [round(i * n_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run_parts(parts: list[tuple[int, int]], fn) -> None:
    if len(parts) == 1:
        fn(*parts[0])
        return
    futures = [_threads_pool().submit(fn, a, b) for a, b in parts]
    for f in futures:
        f.result()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D tensor whose rows are contiguous runs (a copy only when needed)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()


def _native_spmm(ptr, idx, val, perm, bias, x, y, block_rows: int, n_blocks: int) -> None:
    lib = _native_lib()
    n = x.shape[-1]

    def run(b0: int, b1: int) -> None:
        lib.vp_spmm(_ptr(ptr), _ptr(idx), _ptr(val), _ptr(perm), _ptr(bias), _ptr(x), _ptr(y),
                    b0 * block_rows, b1 * block_rows, n, x.stride(0), y.stride(0), block_rows)

    _run_parts(_split_blocks(n_blocks, idx.numel() * n), run)


def _native_sddmm(ptr, idx, g, x, out, gsum, block_rows: int, n_blocks: int) -> None:
    lib = _native_lib()
    n = x.shape[-1]

    def run(b0: int, b1: int) -> None:
        lib.vp_sddmm(_ptr(ptr), _ptr(idx), _ptr(g), _ptr(x), _ptr(out), _ptr(gsum), b0 * block_rows,
                     b1 * block_rows, n, g.stride(0), x.stride(0))

    _run_parts(_split_blocks(n_blocks, idx.numel() * n), run)


# --------------------------------------------------------------------------------------------
# The pattern
# --------------------------------------------------------------------------------------------
class Pattern:
    """The block-diagonal CSR structure of P stacked masks ``[P, out, in]`` (and its transpose).

    Attributes
    ----------
    ptr, col
        CSR row pointers ``[P * out + 1]`` and global column indices ``[nnz]`` (patient ``p``'s
        column ``c`` is ``p * in + c``), row-major order, patient by patient.
    row
        Global row of every entry ``[nnz]``.
    flat
        Position of every entry in the flattened ``[P, out, in]`` weight tensor.
    ptr_t, row_t, perm_t
        The transpose: pointers over the ``P * in`` columns, the row of each entry and the entry's
        index into ``values``.
    offsets
        ``[P + 1]``: patient ``p``'s values are ``values[offsets[p]:offsets[p + 1]]``.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.ndim != 3:
            raise ValueError(f"a mask must be [P, out, in], got shape {tuple(mask.shape)}")
        p, n_out, n_in = mask.shape
        self.n_patients, self.n_out, self.n_in = p, n_out, n_in
        self.device = mask.device
        flat = (mask.reshape(-1) != 0).nonzero().flatten()
        self.flat = flat
        self.nnz = flat.numel()
        row = flat // n_in                               # global row p * out + r
        col = (flat // (n_out * n_in)) * n_in + flat % n_in   # global column p * in + c
        self.row, self.col = row, col
        self.ptr = _pointers(row, p * n_out)
        order = torch.argsort(col * (p * n_out) + row)   # column-major order of the entries
        self.perm_t = order
        self.row_t = row[order].contiguous()
        self.ptr_t = _pointers(col, p * n_in)
        counts = torch.bincount(flat // (n_out * n_in), minlength=p)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        self._csr: torch.Tensor | None = None

    @property
    def density(self) -> float:
        """Largest per-patient share of unmasked entries."""
        per = [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        return max(per) / (self.n_out * self.n_in)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The unmasked entries of ``weight`` ``[P, out, in]`` as a flat ``[nnz]`` tensor (a copy)."""
        return weight.reshape(-1).index_select(0, self.flat)

    def scatter(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write ``values`` into ``out`` ``[P, out, in]`` in place; masked entries become exactly 0."""
        with torch.no_grad():
            out.zero_()
            out.view(-1).index_copy_(0, self.flat, values.detach().to(out.dtype))
        return out

    def patient_slices(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-patient views of ``values``."""
        return [values[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


def _pointers(keys: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(keys, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


# --------------------------------------------------------------------------------------------
# Layer primitives (no autograd): compressed and dense, forward and backward
# --------------------------------------------------------------------------------------------
def _csr(pattern: Pattern, values: torch.Tensor, transpose: bool) -> torch.Tensor:
    shape = (pattern.n_patients * pattern.n_out, pattern.n_patients * pattern.n_in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        if transpose:
            return torch.sparse_csr_tensor(pattern.ptr_t, pattern.row_t, values[pattern.perm_t], size=shape[::-1])
        return torch.sparse_csr_tensor(pattern.ptr, pattern.col, values, size=shape)


def _native_ok(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and kernels_available()


def sparse_forward(pattern: Pattern, values: torch.Tensor, bias: torch.Tensor | None, xt: torch.Tensor,
                   out: torch.Tensor | None = None, kind: str = "native", transpose: bool = False) -> torch.Tensor:
    """``W xt + b`` (or ``W^T xt`` with ``transpose``) for ``xt`` ``[P, in, n]`` -> ``[P, out, n]``.

    ``W`` is given by ``pattern`` and the flat ``values``; ``bias`` is ``[P, out]`` (ignored with
    ``transpose``). Writes into ``out`` (contiguous) when given. No autograd.
    """
    rows = pattern.n_in if transpose else pattern.n_out
    n = xt.shape[-1]
    shape = (pattern.n_patients, rows, n)
    if out is None:
        out = torch.empty(shape, dtype=xt.dtype, device=xt.device)
    x2 = _rowwise(xt)
    values = values.detach()
    if kind == "native" and _native_ok(values, x2, out) and out.is_contiguous():
        y2 = out.view(-1, n)
        if transpose:
            _native_spmm(pattern.ptr_t, pattern.row_t, values.contiguous(), pattern.perm_t, None, x2, y2, rows,
                         pattern.n_patients)
        else:
            b = None if bias is None else bias.detach().contiguous()
            _native_spmm(pattern.ptr, pattern.col, values.contiguous(), None, b, x2, y2, rows, pattern.n_patients)
        return out
    y = _csr(pattern, values, transpose) @ x2
    if bias is not None and not transpose:
        y = y + bias.detach().reshape(-1, 1)
    return out.copy_(y.view(shape))


def sparse_backward(pattern: Pattern, values: torch.Tensor, gz: torch.Tensor, xt: torch.Tensor,
                    need_input: bool = True, out: torch.Tensor | None = None,
                    kind: str = "native") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``z = W xt + b`` given ``gz = dL/dz``: ``(d values, d bias, d xt or None)``.

    ``d values[k] = sum_s gz[row_k, s] xt[col_k, s]`` (the dense weight gradient at the unmasked
    positions, computed only there), ``d xt = W^T gz``.
    """
    g2, x2 = _rowwise(gz), _rowwise(xt)
    if kind == "native" and _native_ok(g2, x2):
        gvalues = torch.empty(pattern.nnz, dtype=gz.dtype, device=gz.device)
        gbias = torch.empty((pattern.n_patients, pattern.n_out), dtype=gz.dtype, device=gz.device)
        _native_sddmm(pattern.ptr, pattern.col, g2, x2, gvalues, gbias, pattern.n_out, pattern.n_patients)
    else:
        zeros = torch.zeros(pattern.nnz, dtype=gz.dtype, device=gz.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gvalues = torch.sparse.sampled_addmm(_csr(pattern, zeros, False), g2, x2.t(), beta=0.0).values()
        gbias = g2.sum(1).view(pattern.n_patients, pattern.n_out)
    gx = sparse_forward(pattern, values, None, gz, out, kind, transpose=True) if need_input else None
    return gvalues, gbias, gx


def _onednn_works() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a, b = torch.randn(3, 4), torch.randn(5, 4)
        return bool(torch.allclose(op(a, b, None, "none", [], ""), a @ b.t(), atol=1e-5))
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN matmuls work in this torch build (checked once, on first use)."""
    return torch.backends.mkldnn.is_available() and _onednn_works()


def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t.T`` for 2-D float32 CPU tensors through oneDNN's matmul (AVX-512 on any x86 vendor)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


def _use_onednn(*tensors: torch.Tensor) -> bool:
    return onednn_available() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


def dense_forward(weight: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor,
                  out: torch.Tensor | None = None, onednn: bool = True) -> torch.Tensor:
    """``W xt + b`` for ``xt`` ``[P, in, n]`` -> ``[P, out, n]`` (no autograd).

    On CPU one oneDNN matmul per patient (MKL's batched matmul runs its AVX2 code on AMD CPUs;
    oneDNN's AVX-512 code was 2.2x faster per product here, docs/performance.md), else ``baddbmm``.
    """
    weight, bias = weight.detach(), bias.detach()
    if not (onednn and _use_onednn(weight, xt)):
        return torch.baddbmm(bias.unsqueeze(2), weight, xt, out=out) if out is not None else \
            torch.baddbmm(bias.unsqueeze(2), weight, xt)
    parts = [_mm(w, x.t()) for w, x in zip(weight, xt)]  # [out, in] @ [in, n]
    z = torch.stack(parts, out=out) if out is not None else torch.stack(parts)
    return z.add_(bias.unsqueeze(2))


def dense_backward(weight: torch.Tensor, gz: torch.Tensor, xt: torch.Tensor, need_input: bool = True,
                   out: torch.Tensor | None = None,
                   onednn: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``z = W xt + b``: ``(d W = gz xt^T, d b, d xt = W^T gz or None)``."""
    weight = weight.detach()
    gz, xt = gz.contiguous(), xt.contiguous()
    gbias = gz.sum(2)
    if not (onednn and _use_onednn(weight, gz, xt)):
        gw = torch.bmm(gz, xt.transpose(1, 2))
        gx = None
        if need_input:
            gx = torch.bmm(weight.transpose(1, 2), gz, out=out) if out is not None else \
                torch.bmm(weight.transpose(1, 2), gz)
        return gw, gbias, gx
    gw = torch.stack([_mm(g, x) for g, x in zip(gz, xt)])  # [out, n] @ [n, in]
    gx = None
    if need_input:  # W^T gz as (gz^T W)^T: oneDNN reads both operands where they lie, as it does in
        # the forward; given W^T as a strided view it copies it first (2x slower on 512 x 512, on
        # AVX-512 and AVX2 alike: bench_levers --only flops). The same sums in the same order: the
        # same bits (checked on AVX-512 and AVX2, square and odd live-block shapes).
        parts = [_mm(g.t(), w.t()).t() for g, w in zip(gz, weight)]
        gx = torch.stack(parts, out=out) if out is not None else torch.stack(parts)
    return gw, gbias, gx


# --------------------------------------------------------------------------------------------
# Autograd wrappers (for use outside the engine's own training loop)
# --------------------------------------------------------------------------------------------
class _SparseLinearT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, bias, xt, pattern, kind):
        ctx.save_for_backward(values, xt)
        ctx.pattern, ctx.kind = pattern, kind
        return sparse_forward(pattern, values, bias, xt, kind=kind)

    @staticmethod
    def backward(ctx, gz):
        values, xt = ctx.saved_tensors
        gvalues, gbias, gx = sparse_backward(ctx.pattern, values, gz, xt, ctx.needs_input_grad[2], kind=ctx.kind)
        return gvalues, gbias, gx, None, None


def sparse_linear_t(pattern: Pattern, values: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor,
                    kind: str = "native") -> torch.Tensor:
    """``W xt + b`` for transposed activations ``xt`` ``[P, in, n]`` -> ``[P, out, n]``, differentiable.

    ``W`` is given by ``pattern`` and the flat ``values``; ``bias`` is ``[P, out]``. ``kind`` is
    ``"native"`` or ``"torch"`` (see :func:`backend`).
    """
    if kind not in ("native", "torch"):
        raise ValueError(f"kind must be native or torch, got {kind!r}")
    return _SparseLinearT.apply(values, bias, xt, pattern, kind)


def sparse_linear_t_out(pattern: Pattern, values: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor,
                        out: torch.Tensor, kind: str = "native") -> torch.Tensor:
    """As :func:`sparse_linear_t`, without autograd, into ``out`` ``[P, out, n]``."""
    return sparse_forward(pattern, values, bias, xt, out, kind)


class _DenseLinearT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, xt):
        ctx.save_for_backward(weight, xt)
        return dense_forward(weight, bias, xt)

    @staticmethod
    def backward(ctx, gz):
        weight, xt = ctx.saved_tensors
        gw, gb, gx = dense_backward(weight, gz, xt, ctx.needs_input_grad[2])
        return gw, gb, gx


def dense_linear_t(weight: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """``W xt + b`` for transposed activations ``xt`` ``[P, in, n]`` -> ``[P, out, n]``, differentiable."""
    return _DenseLinearT.apply(weight, bias, xt)


# --------------------------------------------------------------------------------------------
# Fused elementwise steps of the training loop
# --------------------------------------------------------------------------------------------
def _varies(*values: float | tuple[float, ...]) -> bool:
    """Whether any of these scalars is one value per patient (a tuple)."""
    return any(isinstance(v, tuple) for v in values)


def _at(value: float | tuple[float, ...], i: int) -> float:
    return value[i] if isinstance(value, tuple) else value


def post_activation(z: torch.Tensor, activation: str, scale: float | tuple[float, ...],
                    shift: float | tuple[float, ...], bias: torch.Tensor | None = None,
                    deriv: torch.Tensor | None | bool = None,
                    kind: str = "native") -> tuple[torch.Tensor, torch.Tensor | None]:
    """In place on ``z`` ``[P, units, n]``: ``h = act(z [+ bias]) * scale - shift`` (each step only when it
    changes something), returning ``(h, deriv)`` where ``deriv`` is ``not h <= 0`` (bool, relu) or
    ``1 - tanh^2`` (float) for the backward pass (``deriv=False``: not wanted). One pass with the
    native kernels, else torch ops in the same order (the same numbers, except that the native
    tanh is a rational approximation within 3e-7 of the exact one, 7x faster than ``torch.tanh``).

    ``scale`` and ``shift`` are floats, or tuples of one float per patient: then each patient's
    slice is computed by the same call with its own floats (what it computes alone)."""
    relu = activation == "relu"
    shape = z.shape
    if deriv is None:
        deriv = torch.empty(shape, dtype=torch.bool if relu else z.dtype, device=z.device)
    elif deriv is False:
        deriv = None
    if _varies(scale, shift):
        for i in range(shape[0]):
            post_activation(z[i:i + 1], activation, _at(scale, i), _at(shift, i),
                            None if bias is None else bias[i:i + 1], False if deriv is None else deriv[i:i + 1], kind)
        return z, deriv
    if kind == "native" and _native_ok(z) and z.is_contiguous() and (deriv is None or deriv.is_contiguous()):
        rows = shape[0] * shape[1]
        b = None if bias is None else bias.detach().contiguous()
        _native_lib().vp_post(_ptr(z), _ptr(b), _ptr(deriv), rows, shape[2], shape[2], 0 if relu else 1,
                              scale, shift)
        return z, deriv
    if bias is not None:
        z.add_(bias.detach().unsqueeze(2))
    if relu:
        z.relu_()
        if deriv is not None:
            torch.le(z, 0, out=deriv).logical_not_()
    else:
        z.tanh_()
        if deriv is not None:
            torch.mul(z, z, out=deriv).neg_().add_(1.0)
    if scale != 1.0:
        z.mul_(scale)
    if shift:
        z.sub_(shift)
    return z, deriv


def add_noise_t(h: torch.Tensor, draw: torch.Tensor, sigma: float | tuple[float, ...],
                add: float | tuple[float, ...] = 0.0, scale: float | tuple[float, ...] = 1.0,
                shift: float | tuple[float, ...] = 0.0, kind: str = "native") -> torch.Tensor:
    """In place on ``h`` ``[P, units, n]``: ``((h + sigma * draw^T) + add) * scale - shift`` for noise
    ``draw`` ``[P, n, units]`` (drawn in the dense path's order); ``add`` 0, ``scale`` 1, ``shift`` 0
    are no-ops. ``draw`` may be overwritten.

    Any of the four may be a tuple of one float per patient: each patient's slice is then computed
    with its own floats, and a patient with ``sigma`` and ``add`` 0 gets only ``* scale - shift``
    (what it computes alone, where it has no noise term)."""
    if _varies(sigma, add, scale, shift):
        for i in range(h.shape[0]):
            s, a = _at(sigma, i), _at(add, i)
            if s == 0 and a == 0:
                scale_shift_(h[i:i + 1], _at(scale, i), _at(shift, i))
            else:
                add_noise_t(h[i:i + 1], draw[i:i + 1], s, a, _at(scale, i), _at(shift, i), kind)
        return h
    if kind == "native" and _native_ok(h, draw) and h.is_contiguous() and draw.is_contiguous():
        p, units, n = h.shape
        _native_lib().vp_noise_t(_ptr(h), _ptr(draw), p, units, n, sigma, add, scale, shift)
        return h
    h.add_(draw.mul_(sigma).transpose(1, 2))
    if add:
        h.add_(add)
    if scale != 1.0:
        h.mul_(scale)
    if shift:
        h.sub_(shift)
    return h


def scale_shift_(h: torch.Tensor, scale: float | tuple[float, ...], shift: float | tuple[float, ...]) -> torch.Tensor:
    """In place: ``h * scale - shift`` (two roundings; scale 1 and shift 0 skipped), per patient for tuples."""
    if _varies(scale, shift):
        for i in range(h.shape[0]):
            scale_shift_(h[i:i + 1], _at(scale, i), _at(shift, i))
        return h
    if scale != 1.0:
        h.mul_(scale)
    if shift:
        h.sub_(shift)
    return h


def pre_activation_grad(g: torch.Tensor, deriv: torch.Tensor, scale: float | tuple[float, ...],
                        kind: str = "native") -> torch.Tensor:
    """In place: the gradient through :func:`post_activation`, ``g * scale * act'`` (``scale`` per
    patient when a tuple)."""
    if _varies(scale):
        for i in range(g.shape[0]):
            pre_activation_grad(g[i:i + 1], deriv[i:i + 1], scale[i], kind)
        return g
    if kind == "native" and _native_ok(g) and g.is_contiguous() and deriv.is_contiguous():
        _native_lib().vp_pre_grad(_ptr(g), _ptr(deriv), g.numel(), 0 if deriv.dtype == torch.bool else 1, scale)
        return g
    if scale != 1.0:
        g.mul_(scale)
    return g.masked_fill_(~deriv, 0.0) if deriv.dtype == torch.bool else g.mul_(deriv)
