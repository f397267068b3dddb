"""The native dense products (``kernels/dense.c``) are oneDNN's products, bit for bit, where enabled.

oneDNN's matmul computes each output of the engine's dense products as one fused multiply-add
chain over ``k = 0, 1, ..., K - 1`` (for sums of at most 1,024 terms and more than one row or
column; ``benchmarks/bench_levers.py --only order``). ``vp_dense`` keeps that order, so the
ketamine-like arm's training may run on it without moving a number; the engine uses it only when
``EngineConfig.native_dense`` is on and the first-use check :func:`ops.dense_matches_onednn`
passes. Tests compare with oneDNN itself (exact equality), on shapes with vector tails for 8- and
16-float vectors, and train a reduced network both ways.

Single-sample products (the constant units' share in a reduced network's step) go through
oneDNN's matrix-vector kernels instead, in another order; ``vp_gemv`` and ``vp_gemv_t`` keep the
one found on AVX2 machines, checked by :func:`ops.gemv_matches_onednn` the same way.
"""

from __future__ import annotations

import numpy as np
import pytest
import test_isa_kernels as isa
import test_reduction as red
import torch

from virtualpatient.engine import native, ops
from virtualpatient.engine.settings import engine_options

pytestmark = pytest.mark.skipif(not (native.kernels_available() and ops.onednn_available()),
                                reason="needs the native kernels and oneDNN")

libraries = isa.libraries
target = isa.target

#: (out, in, n): the paper's live blocks, odd sizes for every vector tail, the longest chain allowed,
#: an input gradient summed over more terms than one packed strip holds (700 > STRIP_TERMS = 512).
SHAPES = [(458, 276, 128), (167, 458, 96), (37, 45, 19), (5, 3, 2), (64, 1024, 33), (9, 17, 1024), (700, 37, 19)]


def _needs_chain_order():
    if not ops.dense_matches_onednn():
        pytest.skip("this oneDNN does not sum as one chain per output (or no fast kernel): oneDNN stays")


@pytest.mark.parametrize("shape", SHAPES)
def test_three_products_equal_onednn(shape):
    """Forward with bias, weight gradient and input gradient: equal to the oneDNN calls they replace."""
    _needs_chain_order()
    n_out, n_in, n = shape
    gen = torch.Generator().manual_seed(sum(shape))
    w, b = torch.randn(2, n_out, n_in, generator=gen), torch.randn(2, n_out, generator=gen)
    x, g = torch.randn(2, n_in, n, generator=gen), torch.randn(2, n_out, n, generator=gen)
    z = native.dense(w, x, torch.empty(2, n_out, n), b)
    gw = native.dense(g, x.transpose(1, 2), torch.empty(2, n_out, n_in))  # x^T packed a panel at a time
    gx = native.dense(w.transpose(1, 2), g, torch.empty(2, n_in, n))
    assert torch.equal(gw, native.dense(g, x.transpose(1, 2).contiguous(), torch.empty(2, n_out, n_in)))
    g_packed = g.transpose(1, 2).contiguous().transpose(1, 2)  # A read through W^T and B packed
    assert torch.equal(gx, native.dense(w.transpose(1, 2), g_packed, torch.empty(2, n_in, n)))
    for p in range(2):
        assert torch.equal(z[p], ops._mm(w[p], x[p].t()) + b[p].unsqueeze(1))
        assert torch.equal(gw[p], ops._mm(g[p], x[p]))
        assert torch.equal(gx[p], ops._mm(g[p].t(), w[p].t()).t())


def test_dense_layer_calls_take_it_only_when_enabled(monkeypatch):
    """``dense_forward``/``dense_backward`` give the same bits with the option on and off, and the
    option really routes them (``vp_dense`` is called only when on, never for a single sample)."""
    _needs_chain_order()
    calls = []
    real = native.dense
    monkeypatch.setattr(native, "dense", lambda *a, **k: calls.append(1) or real(*a, **k))
    gen = torch.Generator().manual_seed(3)
    w, b = torch.randn(3, 40, 30, generator=gen), torch.randn(3, 40, generator=gen)
    x, g = torch.randn(3, 30, 50, generator=gen), torch.randn(3, 40, 50, generator=gen)
    results = {}
    for on in (False, True):
        with engine_options(native_dense=on):
            fwd = ops.dense_forward(w, b, x)
            gw, gb, gx = ops.dense_backward(w, g, x)
            ops.dense_backward(w, g[:, :, :1], x[:, :, :1])  # one sample: oneDNN's other kernel
            ops.dense_forward(w, b, torch.randn(3, 30, ops._NATIVE_MAX_N + 1))  # an evaluation: oneDNN
        results[on] = (fwd, gw, gb, gx)
        assert len(calls) == (3 if on else 0)
    for a, c in zip(results[False], results[True]):
        assert torch.equal(a, c)


def test_reduced_training_is_bit_identical():
    """Three epochs of the reduced network through oneDNN's products, then through ``vp_dense``:
    the same weights and biases, bit for bit (the step's other passes are shared)."""
    _needs_chain_order()
    options = {"sparse_backend": "off", "onednn_min_weights": 0}
    start = red._params(4)
    base, _ = red._train(start.clone(), {**options, "native_dense": False})
    mine, _ = red._train(start.clone(), {**options, "native_dense": True})
    for a, c in zip(base.weights + base.biases, mine.weights + mine.biases):
        assert torch.equal(a, c)


def test_without_fast_path_onednn_stays(monkeypatch):
    """A build without the vector kernel (no AVX2 and FMA) fails the first-use check."""
    monkeypatch.setattr(native._native_lib(), "vp_dense_ok", None, raising=False)  # unchecked; restored after
    monkeypatch.setattr(native, "dense_vector_width", lambda: 0)
    assert not ops.dense_matches_onednn()
    with engine_options(native_dense=True):
        assert not ops._native_dense(torch.zeros(1, 8, 8), torch.zeros(1, 8, 8))


def test_rejects_strided_rows():
    """``native.dense`` refuses operands contiguous along neither axis rather than read past them."""
    with pytest.raises(ValueError, match="contiguous"):
        native.dense(torch.zeros(1, 4, 4), torch.zeros(1, 8, 8)[:, ::2, ::2], torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="contiguous"):
        native.dense(torch.zeros(1, 4, 4), torch.zeros(1, 4, 4), torch.zeros(1, 4, 8)[:, :, ::2])


def test_rows_split_over_threads_give_the_same_products():
    """With two torch threads the rows of one call are split over a thread pool (each part with
    its own packing panel): the same bits as one thread computing them all."""
    _needs_chain_order()
    gen = torch.Generator().manual_seed(11)
    a, y = torch.randn(6, 130, 300, generator=gen), torch.randn(6, 140, 300, generator=gen)
    b = y.transpose(1, 2)  # [6, 300, 140], packed a panel at a time
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = native.dense(a, b, torch.empty(6, 130, 140))
        torch.set_num_threads(2)
        parts = native._split_blocks(-(-130 // 6), 6 * 130 * 140 * 300)  # as native.dense splits rows
        two = native.dense(a, b, torch.empty(6, 130, 140))
    finally:
        torch.set_num_threads(threads)
    assert len(parts) == 2
    assert torch.equal(one, two)
    assert torch.equal(one, native.dense(a, b.contiguous(), torch.empty(6, 130, 140)))


def test_each_instruction_set_build_equals_onednn(target):
    """Each build (AVX-512, AVX2 + FMA, native) passes the first-use check on its own library."""
    lib = native._native_lib()
    if hasattr(lib, "vp_dense_ok"):
        delattr(lib, "vp_dense_ok")
    assert ops.dense_matches_onednn()


def test_default_takes_it_with_one_thread_and_8_float_kernels(monkeypatch):
    """``native_dense=None`` (the default) uses ``vp_dense`` for a training batch exactly where it
    was measured faster: one torch thread (the worker processes) and kernels for 8-float vectors;
    never for an evaluation-sized batch."""
    _needs_chain_order()
    w, x = torch.zeros(2, 40, 30), torch.zeros(2, 30, 128)
    threads = torch.get_num_threads()
    try:
        for n_threads, width, expected in ((1, 8, True), (2, 8, False), (1, 16, False)):
            torch.set_num_threads(n_threads)
            monkeypatch.setattr(native, "dense_vector_width", lambda width=width: width)
            with engine_options(native_dense=None):
                assert ops._native_dense(w, x) is expected
                assert not ops._native_dense(w, torch.zeros(2, 30, 4000))
    finally:
        torch.set_num_threads(threads)


def _fma(a, b, c):
    """float32 ``fma(a, b, c)``: the product is exact in float64, the sum is rounded once to float32
    (twice in principle, through float64; a double rounding that changed a result here would be
    a 1-in-2^29 event per term)."""
    return np.float32(np.float64(a) * np.float64(b) + np.float64(c))


def _gemv_order(w_row, x):
    """oneDNN's single-sample forward order on AVX2 (``kernels/dense.c``): eight lanes, lane k mod 8
    a chain in ascending k; lanes folded as l + (l + 4), then summed in pairs."""
    lane = [np.float32(0)] * 8
    for k, (a, b) in enumerate(zip(w_row, x)):
        lane[k % 8] = _fma(a, b, lane[k % 8])
    a = [np.float32(lane[i] + lane[i + 4]) for i in range(4)]
    return np.float32(np.float32(a[0] + a[1]) + np.float32(a[2] + a[3]))


def _chain(column, g):
    acc = np.float32(0)
    for a, b in zip(column, g):
        acc = _fma(a, b, acc)
    return acc


@pytest.mark.parametrize("shape", [(3, 1), (5, 7), (4, 8), (6, 9), (37, 45), (11, 242), (2, 1024)])
def test_one_sample_products_follow_their_stated_order(shape):
    """``vp_gemv`` sums each output in the lane order it documents and ``vp_gemv_t`` as one chain,
    for vector tails of 0, 1, 2, 5 and 7 terms; computed independently here in float64 (on any machine: the kernels'
    vector and scalar paths give the same bits)."""
    n_out, n_in = shape
    gen = torch.Generator().manual_seed(n_out * 1000 + n_in)
    w = torch.randn(2, n_out, n_in, generator=gen)
    c, g = torch.randn(2, n_in, 1, generator=gen), torch.randn(2, n_out, 1, generator=gen)
    fwd = native.gemv(w, c, torch.empty(2, n_out, 1))
    bwd = native.gemv(w, g, torch.empty(2, n_in, 1), transpose=True)
    wn, cn, gn = w.numpy(), c.numpy()[:, :, 0], g.numpy()[:, :, 0]
    for p in range(2):
        assert [_gemv_order(wn[p, i], cn[p]) for i in range(n_out)] == fwd[p, :, 0].tolist()
        assert [_chain(wn[p, :, j], gn[p]) for j in range(n_in)] == bwd[p, :, 0].tolist()


def test_one_sample_products_equal_onednn():
    """Where the first-use check passes (AVX2 oneDNN, one thread), both one-sample products equal
    the oneDNN calls they replace on shapes the check does not use; ``W^T g`` for one output is
    oneDNN's dot product (another order) and stays with oneDNN."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if not ops.gemv_matches_onednn():
            pytest.skip("this oneDNN sums single samples in another order (e.g. 16-float vectors): oneDNN stays")
        gen = torch.Generator().manual_seed(17)
        for n_out, n_in in ((167, 31), (1, 300), (300, 2), (512, 512), (9, 1000)):
            w = torch.randn(3, n_out, n_in, generator=gen)
            c, g = torch.randn(3, n_in, 1, generator=gen), torch.randn(3, n_out, 1, generator=gen)
            fwd = native.gemv(w, c, torch.empty(3, n_out, 1))
            bwd = native.gemv(w, g, torch.empty(3, n_in, 1), transpose=True)
            for p in range(3):
                assert torch.equal(fwd[p], ops._mm(w[p], c[p].t()))
                assert torch.equal(bwd[p], ops._mm(g[p].t(), w[p].t()).t())
        with engine_options(native_dense=True):
            assert ops._native_gemv(torch.zeros(1, 4, 2), torch.zeros(1, 4, 1), transpose=True)
            assert not ops._native_gemv(torch.zeros(1, 4, 1), torch.zeros(1, 4, 1), transpose=True)
    finally:
        torch.set_num_threads(threads)


def test_reduced_training_takes_the_one_sample_kernels(monkeypatch):
    """A reduced network's step computes its constant units' share with ``vp_gemv`` and its input
    gradient with ``vp_gemv_t`` when enabled, and trains to the same weights, bit for bit, as
    with oneDNN's kernels (three epochs, constant units in every hidden layer)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        if not (ops.gemv_matches_onednn() and ops.dense_matches_onednn()):
            pytest.skip("this oneDNN sums in other orders: oneDNN stays")
        calls = {False: 0, True: 0}  # by transpose
        real = native.gemv

        def counted(*args, transpose=False):
            calls[transpose] += 1
            return real(*args, transpose=transpose)

        monkeypatch.setattr(native, "gemv", counted)
        options = {"sparse_backend": "off", "onednn_min_weights": 0}
        start = red._params(4)
        base, _ = red._train(start.clone(), {**options, "native_dense": False})
        assert calls == {False: 0, True: 0}
        mine, _ = red._train(start.clone(), {**options, "native_dense": True})
        assert calls[False] > 0 and calls[True] > 0
        for a, c in zip(base.weights + base.biases, mine.weights + mine.biases):
            assert torch.equal(a, c)
    finally:
        torch.set_num_threads(threads)


def test_gemv_rejects_mismatched_shapes():
    """``native.gemv`` refuses a column of the wrong length or strided rows rather than read past them."""
    with pytest.raises(ValueError, match="do not match"):
        native.gemv(torch.zeros(1, 4, 3), torch.zeros(1, 4, 1), torch.zeros(1, 4, 1))
    with pytest.raises(ValueError, match="contiguous"):
        native.gemv(torch.zeros(1, 4, 6)[:, :, ::2], torch.zeros(1, 3, 1), torch.zeros(1, 4, 1))


def test_each_instruction_set_build_sums_one_sample_products_alike(target):
    """The AVX-512, AVX2 + FMA and native builds give ``vp_gemv``'s and ``vp_gemv_t``'s stated
    orders too (whether oneDNN sums that way is the first-use check's question, per machine)."""
    test_one_sample_products_follow_their_stated_order((6, 45))
