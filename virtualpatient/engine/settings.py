"""How the engine computes: :class:`EngineConfig`, the process-wide :data:`ENGINE` and :func:`engine_options`.

Every setting changes only how the numbers are computed, never which ones (up to float rounding).
Read the settings as ``settings.ENGINE`` at the moment of use: :func:`engine_options` replaces the
object, so a name imported from here keeps the old one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

__all__ = ["ENGINE", "EngineConfig", "engine_options", "eval_group_size"]


@dataclass
class EngineConfig:
    """How the engine computes (never *what*: every choice gives the dense numbers up to rounding).

    Attributes
    ----------
    sparse_max_density
        A layer is stored compressed when every patient keeps at most this share of its weights.
        Measured crossover (docs/performance.md): the compressed kernels beat per-patient oneDNN
        matmuls below about 25-30 % density; so the 95 % sparse arms run compressed and the
        47.5 % sparse ketamine-like arm runs dense. Re-measured with AVX2 only (emulated) and the
        faster kernels: compressed wins to about 30-40 %, dense at 52.5 %, so both arms stay on
        their side; the value is not raised, as blocks between would round differently.
    sparse_min_weights
        Layers with fewer weights per patient always stay dense.
    onednn_min_weights
        Dense layers with at least this many weights per patient use per-patient oneDNN matmuls;
        smaller ones (the 2 -> 512 and 256 -> 4 layers) one batched ``baddbmm``, whose per-call
        cost is lower.
    native_dense
        Compute those oneDNN products with the native kernel ``vp_dense`` instead (one call per
        layer for all patients, written where the step needs them, the weight gradient's
        transposed input packed a panel at a time) wherever it gives oneDNN's numbers bit for
        bit: it keeps oneDNN's order of sums, which
        :func:`~virtualpatient.engine.ops.dense_matches_onednn` checks on first use; training
        batches only (at most 256 samples). ``None`` (default): on where it was measured faster,
        with kernels built for 8-float vectors (AVX2 + FMA) and one torch thread, as in the
        worker processes every study command uses by default. On a 2-core AVX2 EPYC (Zen 3) the
        ketamine-like maintenance step took 13.0-13.5 ms instead of 15.2-16.0 (p10 of five
        alternated runs, the same weights bit for bit). With several threads its rows are split
        over them, but an in-process run of the quick study with 2 threads took 22.7-24.5 s with
        it and 20.8-21.8 s with oneDNN's threading, so it stays off there; with AVX-512 kernels it
        stays off until it is measured there (docs/performance.md). The same setting governs
        the one-sample products (``vp_gemv``, ``vp_gemv_t``: the constant units' share in a
        reduced step), which follow oneDNN's matrix-vector order where
        :func:`~virtualpatient.engine.ops.gemv_matches_onednn` finds it; by default with one
        torch thread, whatever the vector width.
    skip_zeros
        Where ``vp_dense`` computes a masked dense layer's products, skip the zero weights
        (:mod:`virtualpatient.engine.tiles`): the forward product and the input gradient run each
        tile of six outputs over the terms with a nonzero weight only (training batches and
        evaluations alike), and the weight gradient computes a nearly empty row only where it keeps
        weights. Every number the trial reports stays the same bit for bit (a zero term adds
        nothing to a chain of fused multiply-adds, and masked weights are re-masked after each
        step); the masked weights themselves stay 0 but may change sign (``+0`` where the dense
        path leaves ``-0``). The ketamine-like arm keeps its regrown weights in nearly full rows,
        so this computes about 65-80 % of those products (docs/performance.md).
    sparse_backend
        ``None`` (default: :func:`virtualpatient.engine.native.backend`), ``"native"``, ``"torch"`` or ``"off"``.
    reduce_units
        Train the live units only when a :func:`~virtualpatient.engine.batched.train` call has no
        internal noise: constant units (no incoming weight) folded into the next layer's biases,
        dead ones (no path to the output) left out (:mod:`virtualpatient.engine.reduction`).
    reduce_max_work
        ... but only when the live blocks keep at most this share of the per-sample products.
    eval_max_bytes
        Largest activation buffer an evaluation may use:
        :func:`~virtualpatient.engine.batched.forward` evaluates a batch in groups of
        :func:`eval_group_size` networks, so memory does not grow with the batch (each buffer
        is networks x points x units float32; there are three). Each patient's noise comes from
        its own generator either way, so the grouping changes no number.
    """

    sparse_max_density: float = 0.25
    sparse_min_weights: int = 0
    onednn_min_weights: int = 16_384
    native_dense: bool | None = None
    skip_zeros: bool = True
    sparse_backend: str | None = None
    reduce_units: bool = True
    reduce_max_work: float = 0.9
    eval_max_bytes: int = 256 * 2**20


ENGINE = EngineConfig()


def eval_group_size(n_points: int, layer_sizes: Sequence[int]) -> int:
    """How many networks one evaluation of ``n_points`` inputs may hold within
    :attr:`EngineConfig.eval_max_bytes` per activation buffer (at least one)."""
    per_network = n_points * max(layer_sizes) * 4
    return max(1, ENGINE.eval_max_bytes // per_network)


@contextlib.contextmanager
def engine_options(**changes) -> Iterator[EngineConfig]:
    """Temporarily change :data:`ENGINE` (for tests and benchmarks)::

        with engine_options(sparse_max_density=1.0, sparse_min_weights=0):
            train(...)   # every layer compressed
    """
    global ENGINE
    old = ENGINE
    ENGINE = replace(old, **changes)
    try:
        yield ENGINE
    finally:
        ENGINE = old

