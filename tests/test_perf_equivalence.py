"""The performance paths compute what the plain dense math computes.

The engine stores layers whose masks keep few weights compressed (only the unmasked weights, in a
block-diagonal CSR layout, with native or ``torch.sparse`` kernels), runs dense layers through
per-patient oneDNN matmuls, uses torch's fused Adam and evaluates through reused buffers. Each of
these only reorders float32 sums, so results must equal the dense path up to rounding:

* single products and their gradients: ``atol 1e-5, rtol 1e-5`` (float32 sums of up to a few
  hundred terms of order 1, in another order: gradients summed over 130 samples reach ~40);
* a few training epochs: ``atol 1e-5`` on the weights (Adam steps of ``lr`` at most);
* masked weights: exactly 0, always.

All networks here are small so the file runs in a few seconds; ``engine_options`` forces the
compressed path onto them (by default only large, sparse layers are compressed).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virtualpatient.engine import adam, batched, native, ops, settings
from virtualpatient.engine.settings import engine_options
from virtualpatient.network import BiasedNoise, Modulation, NoiseSource, Params
from virtualpatient.protocol import StabiliserConfig

STAB = StabiliserConfig()
SIZES = (2, 24, 20, 12, 4)
ALL_SPARSE = {"sparse_max_density": 1.0, "sparse_min_weights": 0}
KINDS = ["native", "torch"] if native.kernels_available() else ["torch"]


def _params(seed: int, n_patients: int = 3, keep: float = 0.3, sizes=SIZES) -> Params:
    """Random weights under random masks whose density differs per patient (one empty row each)."""
    rng = np.random.default_rng(seed)
    weights, biases, masks = [], [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        density = keep * (1 + 0.5 * np.arange(n_patients) / n_patients)[:, None, None]
        m = (rng.random((n_patients, fan_out, fan_in)) < density).astype(np.float32)
        m[:, 0, :] = 0.0  # a unit with no inputs
        w = rng.normal(0.0, 0.8, m.shape).astype(np.float32) * m
        weights.append(torch.tensor(w))
        biases.append(torch.tensor(rng.normal(0.0, 0.3, (n_patients, fan_out)), dtype=torch.float32))
        masks.append(torch.tensor(m))
    return Params(weights, biases, masks)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("n", [1, 37, 130])
def test_sparse_product_and_gradients_equal_dense(kind, n):
    """W x + b and its gradients (values = dense dW at unmasked positions, bias, input) equal the dense
    ``baddbmm`` ones for widths that exercise every tile of the native kernel (130 = 128 + 2, 37 = 32 + 5)."""
    gen = torch.Generator().manual_seed(n)
    mask = (torch.rand(3, 20, 24, generator=gen) < torch.tensor([0.05, 0.3, 0.6]).view(3, 1, 1)).float()
    weight = torch.randn(3, 20, 24, generator=gen) * mask
    bias = torch.randn(3, 20, generator=gen)
    x = torch.randn(3, 24, n, generator=gen)
    g = torch.randn(3, 20, n, generator=gen)

    pattern = ops.Pattern(mask)
    values = pattern.gather(weight).requires_grad_(True)
    b1, x1 = bias.clone().requires_grad_(True), x.clone().requires_grad_(True)
    got = ops.sparse_linear_t(pattern, values, b1, x1, kind)
    got.backward(g)

    w2, b2, x2 = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True), x.clone().requires_grad_(True)
    want = torch.baddbmm(b2.unsqueeze(2), w2, x2)
    want.backward(g)

    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(values.grad, pattern.gather(w2.grad), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b1.grad, b2.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)
    out = torch.empty_like(want)
    torch.testing.assert_close(ops.sparse_linear_t_out(pattern, values.detach(), bias, x, out, kind), want.detach(),
                               atol=1e-5, rtol=0)


def test_pattern_round_trip_and_offsets():
    """gather/scatter invert each other, masked entries come back exactly 0, offsets split patients."""
    params = _params(1)
    w, m = params.weights[1], params.masks[1]
    pattern = ops.Pattern(m)
    values = pattern.gather(w)
    back = pattern.scatter(values, torch.full_like(w, 7.0))
    assert torch.equal(back, w) and torch.all(back[m == 0] == 0)
    assert pattern.offsets[-1] == pattern.nnz == int(m.sum())
    for p, part in enumerate(pattern.patient_slices(values)):
        assert torch.equal(part, w[p][m[p] > 0])


def test_dense_onednn_product_and_gradients_equal_baddbmm():
    """The per-patient oneDNN matmul of dense layers equals torch.baddbmm, forward and backward."""
    gen = torch.Generator().manual_seed(3)
    w = torch.randn(2, 30, 40, generator=gen, requires_grad=True)
    b = torch.randn(2, 30, generator=gen, requires_grad=True)
    x = torch.randn(2, 40, 33, generator=gen, requires_grad=True)
    g = torch.randn(2, 30, 33, generator=gen)
    got = ops.dense_linear_t(w, b, x)
    grads = torch.autograd.grad(got, (w, b, x), g)
    want = torch.baddbmm(b.unsqueeze(2), w, x)
    wgrads = torch.autograd.grad(want, (w, b, x), g)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    for a, c in zip(grads, wgrads):
        torch.testing.assert_close(a, c, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mod", [Modulation(), Modulation(gain=1.6, protection=0.6, noise_sigma=0.5),
                                 Modulation(gain=0.85, damping=0.7, activation="tanh", protection=1.0)],
                         ids=["plain", "ssri-noisy-protected", "neurosteroid"])
@pytest.mark.parametrize("biased", [None, BiasedNoise(1.0, 1.0)], ids=["unbiased", "biased"])
def test_engine_forward_equals_dense_forward(mod, biased):
    """Evaluation logits and activation magnitudes of the engine (every layer compressed, same noise
    streams) equal the dense autograd-visible math."""
    params = _params(2)
    x = torch.randn(3, 50, 2, generator=torch.Generator().manual_seed(4)) * 3

    def noise():
        return NoiseSource([torch.Generator().manual_seed(10 + i) for i in range(3)])

    mags_dense: list[torch.Tensor] = []
    want = batched._forward_dense(params, x, mod, STAB, noise(), biased, mags_dense)
    for options in (ALL_SPARSE, {"sparse_backend": "off"}):
        with engine_options(**options):
            mags: list[torch.Tensor] = []
            got = batched.forward(params, x, mod, STAB, noise=noise(), biased=biased, magnitudes=mags)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        for a, b in zip(mags, mags_dense):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)


def _train(params, options, epochs=3, lr=1e-2, schedule=None, snapshots=()):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(params.n_patients, 96, 2, generator=gen) * 3
    y = torch.randint(0, 4, (params.n_patients, 96), generator=gen)
    with engine_options(**options):
        snaps = batched.train(params, x, y, epochs=epochs, lr=lr, batch_size=32,
                              schedule=schedule or (lambda e: Modulation(gain=1.25, protection=0.5)), stab=STAB,
                              shuffle=[torch.Generator().manual_seed(20 + i) for i in range(params.n_patients)],
                              noise=NoiseSource([torch.Generator().manual_seed(30 + i)
                                                 for i in range(params.n_patients)]),
                              snapshots=snapshots)
    return params, snaps


@pytest.mark.parametrize("kind", KINDS)
def test_sparse_training_equals_dense_training(kind):
    """Three epochs (with internal noise in the second, as the SSRI-like course has) end at the same
    weights with every layer compressed as with every layer dense; masked weights stay exactly 0,
    masks unchanged; snapshots agree too."""
    def schedule(epoch):
        return Modulation(gain=1.0 + 0.3 * epoch, noise_sigma=0.5 if epoch == 1 else 0.0)

    start = _params(6)
    dense, dense_snaps = _train(start.clone(), {"sparse_backend": "off"}, schedule=schedule, snapshots=(1, 3))
    comp, comp_snaps = _train(start.clone(), {**ALL_SPARSE, "sparse_backend": kind}, schedule=schedule,
                              snapshots=(1, 3))
    for a, b in zip(comp.weights + comp.biases, dense.weights + dense.biases):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for w, m, m0 in zip(comp.weights, comp.masks, start.masks):
        assert torch.equal(m, m0)
        assert torch.all(w[m == 0] == 0)
    for w0, w1 in zip(start.weights, comp.weights):
        assert not torch.allclose(w0, w1)  # it trained
    for e in (1, 3):
        for a, b in zip(comp_snaps[e].weights, dense_snaps[e].weights):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    assert all(torch.equal(a, b) for a, b in zip(comp_snaps[3].weights, comp.weights))


def test_compressed_training_is_batching_invariant():
    """Three patients trained together on the compressed path end where each ends trained alone
    (same data, shuffle and noise generators): a patient's numbers ignore its batch mates."""
    start = _params(7)
    together, _ = _train(start.clone(), ALL_SPARSE)
    gen = torch.Generator().manual_seed(5)  # the data _train draws
    x = torch.randn(3, 96, 2, generator=gen) * 3
    y = torch.randint(0, 4, (3, 96), generator=gen)
    for p in range(3):
        one = start.select([p])
        with engine_options(**ALL_SPARSE):
            batched.train(one, x[p:p + 1], y[p:p + 1], epochs=3, lr=1e-2, batch_size=32,
                          schedule=lambda e: Modulation(gain=1.25, protection=0.5), stab=STAB,
                          shuffle=[torch.Generator().manual_seed(20 + p)],
                          noise=NoiseSource([torch.Generator().manual_seed(30 + p)]))
        for a, b in zip(one.weights + one.biases, together.weights + together.biases):
            torch.testing.assert_close(a[0], b[p], atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eight-passes"])
def test_batched_adam_equals_torch_adam_with_per_patient_rates_and_segments(fused, monkeypatch):
    """BatchedAdam (torch's fused kernel, or the eight-pass fallback of older torch) with two learning
    rates and a flat (segmented) tensor equals torch.optim.Adam run on each patient's slice alone."""
    monkeypatch.setattr(adam, "FUSED_ADAM", None if fused else False)
    gen = torch.Generator().manual_seed(8)
    dense = torch.randn(3, 5, 4, generator=gen)
    flat = torch.randn(9, generator=gen)
    seg = [0, 2, 2, 9]  # patient 1 has no entries
    lr = torch.tensor([1e-2, 3e-3, 1e-2])
    grads = [(torch.randn(3, 5, 4, generator=gen), torch.randn(9, generator=gen)) for _ in range(4)]
    t1, t2 = dense.clone(), flat.clone()
    opt = adam.BatchedAdam([t1, t2], lr, segments=[None, seg])
    for g1, g2 in grads:
        opt.step([g1, g2])
    for p in range(3):
        a = dense[p].clone().requires_grad_(True)
        b = flat[seg[p]:seg[p + 1]].clone().requires_grad_(True)
        ref = torch.optim.Adam([a, b], lr=float(lr[p]))
        for g1, g2 in grads:
            a.grad, b.grad = g1[p].clone(), g2[seg[p]:seg[p + 1]].clone()
            ref.step()
        torch.testing.assert_close(t1[p], a.detach(), atol=1e-6, rtol=0)
        torch.testing.assert_close(t2[seg[p]:seg[p + 1]], b.detach(), atol=1e-6, rtol=0)


@pytest.mark.parametrize("fused", [True, False], ids=["fused", "eight-passes"])
@pytest.mark.parametrize("rates", ["one", "per-patient"])
def test_batched_adam_takes_per_patient_gradient_lists(fused, rates, monkeypatch):
    """A dense weight's gradient given as its per-patient slices (what the engine's dense layers hand
    over, unstacked) moves the weights exactly as the stacked gradient does, bit for bit, beside a
    stacked gradient and a segmented tensor; a list for a segmented tensor is refused."""
    monkeypatch.setattr(adam, "FUSED_ADAM", None if fused else False)
    gen = torch.Generator().manual_seed(9)
    start = [torch.randn(3, 37, 11, generator=gen), torch.randn(3, 5, generator=gen), torch.randn(9, generator=gen)]
    seg = [0, 2, 2, 9]
    lr = 1e-2 if rates == "one" else torch.tensor([1e-2, 3e-3, 1e-2])
    grads = [[torch.randn(t.shape, generator=gen) for t in start]
             for _ in range(3)]
    stacked = [t.clone() for t in start]
    listed = [t.clone() for t in start]
    a = adam.BatchedAdam(stacked, lr, segments=[None, None, seg])
    b = adam.BatchedAdam(listed, lr, segments=[None, None, seg])
    for g in grads:
        a.step(g)
        b.step([list(g[0].unbind(0)), g[1], g[2]])
    assert all(torch.equal(x, y) for x, y in zip(stacked, listed))
    with pytest.raises(ValueError, match="leading patient axis"):
        b.step([g[0], g[1], list(g[2].split([2, 0, 7]))])


def test_noise_fill_equals_randn_per_patient():
    """NoiseSource.fill_ writes exactly torch.randn(shape, generator=g_i) into slice i."""
    out = NoiseSource([torch.Generator().manual_seed(s) for s in (1, 2)]).fill_(torch.empty(2, 7, 5))
    for i, s in enumerate((1, 2)):
        assert torch.equal(out[i], torch.randn((7, 5), generator=torch.Generator().manual_seed(s)))


def test_eval_cache_follows_in_place_changes():
    """The engine's cached copy of a network is rebuilt when a weight or mask changes in place."""
    params = _params(9)
    x = torch.randn(3, 20, 2, generator=torch.Generator().manual_seed(11))
    with engine_options(**ALL_SPARSE):
        first = batched.forward(params, x, Modulation(), STAB)
        params.weights[1].mul_(2.0)
        second = batched.forward(params, x, Modulation(), STAB)
    torch.testing.assert_close(second, batched._forward_dense(params, x, Modulation(), STAB, None, None, None),
                               atol=1e-5, rtol=0)
    assert not torch.allclose(first, second)


def test_grouped_evaluation_equals_one_batch():
    """forward splits a batch that would not fit EngineConfig.eval_max_bytes into groups of
    networks; activation magnitudes equal the one-batch evaluation bit for bit, with internal and
    biased noise drawn from each patient's own generator in the same order, and logits equal it to
    float32 rounding.

    Logits were bit for bit equal on the AVX-512 machine of the performance work; on an Intel
    Xeon @ 2.00 GHz (2026-12) the 256 -> 4 output layer's batched ``baddbmm`` rounds differently
    for a batch of 5, 2 and 1 networks (3.8e-6 on logits up to 37), so the test allows 1e-6 relative.
    """
    params = _params(11, n_patients=5)
    x = torch.randn(5, 40, 2, generator=torch.Generator().manual_seed(3)) * 3
    mod = Modulation(gain=1.3, protection=0.4, noise_sigma=0.3)

    def run(max_bytes):
        noise = NoiseSource([torch.Generator().manual_seed(50 + i) for i in range(5)])
        mags: list[torch.Tensor] = []
        with engine_options(eval_max_bytes=max_bytes):
            logits = batched.forward(params, x, mod, STAB, noise=noise, biased=BiasedNoise(), magnitudes=mags)
            groups = len(batched._eval_nets(params, settings.eval_group_size(40, SIZES)))
        return logits, mags, groups

    one, one_mags, one_groups = run(2**30)
    split, split_mags, split_groups = run(2 * 40 * max(SIZES) * 4)  # two networks per group
    assert (one_groups, split_groups) == (1, 3)
    torch.testing.assert_close(one, split, rtol=1e-6, atol=1e-6)
    assert all(torch.equal(a, b) for a, b in zip(one_mags, split_mags)) and len(split_mags) == len(SIZES) - 2
