"""Tests of virtualpatient.network and the engine's batched network (virtualpatient.engine.batched): the hidden-layer
formula, batched training and its Adam."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from virtualpatient import PatientBatch, PatientSpec
from virtualpatient.engine.batched import forward, train
from virtualpatient.network import (
    BiasedNoise,
    Modulation,
    NoiseSource,
    NonFiniteError,
    Params,
    init_params,
)
from virtualpatient.protocol import StabiliserConfig
from virtualpatient.task import make_task_data

STAB = StabiliserConfig()
SIZES = (2, 5, 4, 3, 4)


def _tiny_params(seed: int, n_patients: int = 2, sizes=SIZES) -> Params:
    """Random weights with some zeros (masked), drawn from a seeded numpy generator."""
    rng = np.random.default_rng(seed)
    weights, biases, masks = [], [], []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        w = rng.normal(0.0, 0.8, (n_patients, fan_out, fan_in))
        m = (rng.random(w.shape) > 0.3).astype(np.float64)
        weights.append(torch.tensor(w * m, dtype=torch.float32))
        biases.append(torch.tensor(rng.normal(0.0, 0.3, (n_patients, fan_out)), dtype=torch.float32))
        masks.append(torch.tensor(m, dtype=torch.float32))
    return Params(weights, biases, masks)


def _hand_forward(params: Params, x: np.ndarray, mod: Modulation, internal=None, biased=None, biased_noise=None):
    """Fact 3 (and fact 5 for the biased test) written out in float64 numpy, one patient at a time.

    ``internal[p][i]`` / ``biased_noise[p][i]`` are the N(0, 1) draws of patient p at hidden layer i.
    """
    act = {"relu": lambda a: np.maximum(a, 0.0), "tanh": np.tanh}[mod.activation]
    p = mod.protection
    g = mod.gain
    eff = g if p <= 0 else min(g, max(1.05, 1.05 + (1 - p) * (g - 1.05)))
    out = []
    for pat in range(params.n_patients):
        ws = [w[pat].double().numpy() for w in params.weights]
        bs = [b[pat].double().numpy() for b in params.biases]
        h = x[pat].astype(np.float64)
        for i in range(len(ws) - 1):
            h = act(h @ ws[i].T + bs[i])
            if mod.noise_sigma > 0:
                h = h + mod.noise_sigma * internal[pat][i]
            if biased is not None:
                h = h + biased.sigma * biased_noise[pat][i] + biased.shift * (1 - 0.3 * p)
            h = h * mod.damping * eff
            if p > 0:
                h = h - 0.15 * p
        out.append(h @ ws[-1].T + bs[-1])
    return np.stack(out)


def _draws(seeds, n, sizes, per_layer: int):
    """Replay the per-patient noise streams: per patient, per hidden layer, ``per_layer`` draws in order."""
    result = []
    for s in seeds:
        g = torch.Generator().manual_seed(s)
        layers = []
        for width in sizes[1:-1]:
            layers.append([torch.randn((n, width), generator=g).double().numpy() for _ in range(per_layer)])
        result.append(layers)
    return result


@pytest.mark.parametrize(
    "mod",
    [
        Modulation(),
        Modulation(gain=1.25),
        Modulation(gain=1.6),
        Modulation(gain=0.85, damping=0.7, activation="tanh"),
        Modulation(gain=1.6, protection=0.6),  # gain capped to 1.27, shift -0.09
        Modulation(gain=1.25, protection=1.0),  # gain capped to the floor 1.05, shift -0.15
        Modulation(gain=0.85, damping=0.7, activation="tanh", protection=0.5),
    ],
    ids=["plain", "ketamine", "ssri", "neurosteroid", "ssri-p0.6", "ketamine-p1", "neurosteroid-p0.5"],
)
def test_forward_matches_hand_computation(mod):
    """forward equals fact 3 computed by hand (act, damping x capped gain, -0.15 p), no noise."""
    params = _tiny_params(1)
    x = np.random.default_rng(2).normal(0.0, 3.0, (2, 7, 2))
    got = forward(params, torch.tensor(x, dtype=torch.float32), mod, STAB).double().numpy()
    want = _hand_forward(params, x.astype(np.float32), mod)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_neurosteroid_modulation_changes_the_output_as_the_formula_says():
    """tanh x 0.7 x 0.85 gives other logits than relu x 1.0 x 1.0, each matching its own hand computation."""
    params = _tiny_params(4)
    x = np.random.default_rng(5).normal(0.0, 3.0, (2, 9, 2))
    xt = torch.tensor(x, dtype=torch.float32)
    plain, neuro = Modulation(), Modulation(gain=0.85, damping=0.7, activation="tanh")
    a = forward(params, xt, plain, STAB).double().numpy()
    b = forward(params, xt, neuro, STAB).double().numpy()
    assert np.abs(a - b).max() > 0.1
    np.testing.assert_allclose(a, _hand_forward(params, x.astype(np.float32), plain), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(b, _hand_forward(params, x.astype(np.float32), neuro), rtol=1e-5, atol=1e-5)
    # tanh alone, damping alone: each term matters
    c = forward(params, xt, Modulation(activation="tanh"), STAB).double().numpy()
    d = forward(params, xt, Modulation(damping=0.7), STAB).double().numpy()
    assert np.abs(a - c).max() > 1e-3 and np.abs(a - d).max() > 1e-3


@pytest.mark.parametrize("protection", [0.0, 0.7])
def test_internal_noise_enters_before_gain_and_shift(protection):
    """Internal noise sigma N(0,1) is added after the activation and before damping x gain (fact 3).

    The noise is replayed from each patient's own generator, so the comparison is exact.
    """
    params = _tiny_params(6)
    n = 11
    x = np.random.default_rng(7).normal(0.0, 3.0, (2, n, 2))
    mod = Modulation(gain=1.6, damping=0.9, noise_sigma=0.5, protection=protection)
    seeds = [101, 202]
    noise = NoiseSource([torch.Generator().manual_seed(s) for s in seeds])
    got = forward(params, torch.tensor(x, dtype=torch.float32), mod, STAB, noise=noise).double().numpy()
    draws = _draws(seeds, n, SIZES, 1)
    internal = [[layer[0] for layer in pat] for pat in draws]
    want = _hand_forward(params, x.astype(np.float32), mod, internal=internal)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("protection", [0.0, 0.9])
def test_biased_noise_formula(protection):
    """Biased test: h += 1.0 N(0,1) + 1.0 (1 - 0.3 p), then damping x effective gain, then -0.15 p (fact 5)."""
    params = _tiny_params(8)
    n = 13
    x = np.random.default_rng(9).normal(0.0, 3.0, (2, n, 2))
    mod = Modulation(gain=1.25, protection=protection)
    seeds = [11, 12]
    noise = NoiseSource([torch.Generator().manual_seed(s) for s in seeds])
    got = forward(params, torch.tensor(x, dtype=torch.float32), mod, STAB, noise=noise,
                  biased=BiasedNoise(1.0, 1.0)).double().numpy()
    draws = _draws(seeds, n, SIZES, 1)
    biased_noise = [[layer[0] for layer in pat] for pat in draws]
    want = _hand_forward(params, x.astype(np.float32), mod, biased=BiasedNoise(1.0, 1.0), biased_noise=biased_noise)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_activation_magnitudes_use_nominal_gain_before_noise():
    """magnitudes = per layer mean |act(W h + b) x damping x nominal gain| (fact 6), by hand."""
    params = _tiny_params(10)
    x = np.random.default_rng(11).normal(0.0, 3.0, (2, 8, 2))
    mod = Modulation(gain=0.85, damping=0.7, activation="tanh")
    mags: list[torch.Tensor] = []
    forward(params, torch.tensor(x, dtype=torch.float32), mod, STAB, magnitudes=mags)
    assert len(mags) == 3
    for pat in range(2):
        h = x[pat].astype(np.float32).astype(np.float64)
        for i in range(3):
            w = params.weights[i][pat].double().numpy()
            b = params.biases[i][pat].double().numpy()
            a = np.tanh(h @ w.T + b)
            assert float(mags[i][pat]) == pytest.approx(np.abs(a * 0.7 * 0.85).mean(), rel=1e-5)
            h = a * 0.7 * 0.85


def test_init_params_is_per_patient_and_torch_default():
    """init: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) per layer; a patient's draw ignores its batch mates."""
    gens = [torch.Generator().manual_seed(s) for s in (1, 2, 3)]
    params = init_params((2, 64, 32, 4), gens)
    for w, b, fan_in in zip(params.weights, params.biases, (2, 64, 32)):
        bound = 1 / math.sqrt(fan_in)
        assert float(w.abs().max()) <= bound and float(b.abs().max()) <= bound
    assert float(params.weights[1].abs().max()) > 0.9 / 8  # spans the interval
    alone = init_params((2, 64, 32, 4), [torch.Generator().manual_seed(2)])
    for a, b in zip(alone.weights + alone.biases, params.weights + params.biases):
        assert torch.equal(a[0], b[1])


def _train_alone_and_together(protocol, indices, epochs):
    together = PatientBatch([PatientSpec(i, protocol.seed) for i in indices], protocol)
    init = together.params.clone()
    together.train(epochs, 1e-3, "baseline")
    alone = []
    for i in indices:
        one = PatientBatch([PatientSpec(i, protocol.seed)], protocol)
        one.train(epochs, 1e-3, "baseline")
        alone.append(one)
    return init, together, alone


def test_batched_training_equals_per_patient_training(make_protocol):
    """P = 3 patients trained together for 2 epochs end where each ends trained alone (P = 1)."""
    protocol = make_protocol(task={"n_train": 512})
    _, together, alone = _train_alone_and_together(protocol, (0, 1, 2), epochs=2)
    for pos, one in enumerate(alone):
        for a, b in zip(one.params.weights + one.params.biases, together.params.weights + together.params.biases):
            torch.testing.assert_close(a[0], b[pos], atol=1e-5, rtol=0)
    # the patients really trained, and differently
    assert not torch.allclose(together.params.weights[1][0], together.params.weights[1][1])


def _reference_training(spec, protocol, params: Params, epochs: int, lr: float, stream: str):
    """A plain single-patient implementation: nn.Linear layers, torch.optim.Adam, masks after each step."""
    data = make_task_data(spec, protocol.task)
    sizes = protocol.network.layer_sizes
    with torch.random.fork_rng():  # nn.Linear's own initialisation is overwritten; keep global state clean
        torch.manual_seed(0)
        layers = torch.nn.ModuleList(torch.nn.Linear(i, o) for i, o in zip(sizes[:-1], sizes[1:]))
    with torch.no_grad():
        for lin, w, b in zip(layers, params.weights, params.biases):
            lin.weight.copy_(w[0])
            lin.bias.copy_(b[0])
    masks = [m[0].clone() for m in params.masks]
    opt = torch.optim.Adam(layers.parameters(), lr=lr)
    g = spec.generator(stream)
    for _ in range(epochs):
        perm = torch.randperm(data.train_x.shape[0], generator=g)
        for idx in perm.split(protocol.baseline.batch_size):
            h = data.train_x[idx]
            for lin in layers[:-1]:
                h = torch.relu(lin(h))
            loss = F.cross_entropy(layers[-1](h), data.train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            with torch.no_grad():
                for lin, m in zip(layers, masks):
                    lin.weight.mul_(m)
    return [lin.weight.detach() for lin in layers], [lin.bias.detach() for lin in layers]


@pytest.mark.parametrize("pruned", [False, True], ids=["baseline", "pruned"])
def test_batched_adam_equals_torch_adam(make_protocol, pruned):
    """Batched training (BatchedAdam, baddbmm) equals nn.Linear + torch.optim.Adam on the same data order.

    The reference builds its shuffles from the patient's own ``baseline`` stream and its data from the
    patient's own data streams; with ``pruned`` the masks of a 50 % lesion are re-applied after each step.
    """
    protocol = make_protocol(task={"n_train": 512})
    batch = PatientBatch([PatientSpec(i, protocol.seed) for i in (0, 1)], protocol)
    if pruned:
        batch.prune([0.5, 0.5])
    start = batch.params.clone()
    batch.train(2, 1e-3, "baseline", scale_lr=False)
    for pos, spec in enumerate(batch.specs):
        data = make_task_data(spec, protocol.task)
        assert torch.equal(data.train_x, batch.data.train_x[pos])  # a patient's data ignore its batch mates
        weights, biases = _reference_training(spec, protocol, start.select([pos]), 2, 1e-3, "baseline")
        for ref, got in zip(weights + biases, batch.params.weights + batch.params.biases):
            torch.testing.assert_close(got[pos], ref, atol=1e-5, rtol=0)
        for ref, start_w in zip(weights, start.weights):
            assert not torch.allclose(ref, start_w[pos])  # it trained


def test_masks_zero_pruned_weights_after_training():
    """train re-applies masks after every step: masked weights are exactly 0 afterwards."""
    params = _tiny_params(12, n_patients=2, sizes=(2, 16, 16, 8, 4))
    rng = np.random.default_rng(13)
    x = torch.tensor(rng.normal(0, 3, (2, 64, 2)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, (2, 64)))
    before = params.clone()
    train(params, x, y, epochs=2, lr=1e-2, batch_size=16, schedule=lambda e: Modulation(), stab=STAB,
          shuffle=[torch.Generator().manual_seed(s) for s in (1, 2)])
    for w, m, w0 in zip(params.weights, params.masks, before.weights):
        assert torch.all(w[m == 0] == 0)
        assert not torch.allclose(w[m == 1], w0[m == 1])
    assert all(torch.equal(m, m0) for m, m0 in zip(params.masks, before.masks))


def test_snapshots_are_copies_at_epoch_counts():
    """train(snapshots=...) keeps independent copies after exactly those epochs (0 = the start)."""
    params = _tiny_params(14)
    rng = np.random.default_rng(15)
    x = torch.tensor(rng.normal(0, 3, (2, 32, 2)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, (2, 32)))
    start = params.clone()
    snaps = train(params, x, y, epochs=3, lr=1e-2, batch_size=16, schedule=lambda e: Modulation(), stab=STAB,
                  shuffle=[torch.Generator().manual_seed(s) for s in (1, 2)], snapshots=(0, 2, 3))
    assert sorted(snaps) == [0, 2, 3]
    assert torch.equal(snaps[0].weights[1], start.weights[1])
    assert torch.equal(snaps[3].weights[1], params.weights[1])
    assert not torch.equal(snaps[2].weights[1], snaps[3].weights[1])
    again = start.clone()
    train(again, x, y, epochs=2, lr=1e-2, batch_size=16, schedule=lambda e: Modulation(), stab=STAB,
          shuffle=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert torch.equal(again.weights[1], snaps[2].weights[1])


def test_non_finite_training_names_batch_position_and_epoch():
    """An inf weight in one patient raises NonFiniteError naming that batch position and the epoch."""
    params = _tiny_params(16, n_patients=3)
    params.weights[1][2, 0, 0] = math.inf
    params.masks[1][2, 0, 0] = 1.0
    rng = np.random.default_rng(17)
    x = torch.tensor(rng.normal(0, 3, (3, 32, 2)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, (3, 32)))
    with pytest.raises(NonFiniteError) as info:
        train(params, x, y, epochs=3, lr=1e-3, batch_size=16, schedule=lambda e: Modulation(), stab=STAB,
              shuffle=[torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    assert info.value.patients == [2]
    assert info.value.epoch == 0
    assert "[2]" in str(info.value) and "epoch 1" in str(info.value)


def test_huge_learning_rate_diverges():
    """lr = 1e30 blows the weights up within the first epoch: NonFiniteError at epoch 0 for every patient."""
    params = _tiny_params(18)
    rng = np.random.default_rng(19)
    x = torch.tensor(rng.normal(0, 3, (2, 64, 2)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, (2, 64)))
    with pytest.raises(NonFiniteError) as info:
        train(params, x, y, epochs=2, lr=1e30, batch_size=16, schedule=lambda e: Modulation(), stab=STAB,
              shuffle=[torch.Generator().manual_seed(s) for s in (1, 2)])
    assert info.value.patients == [0, 1] and info.value.epoch == 0


def test_noise_source_is_per_patient():
    """NoiseSource gives patient i the draws of generator i, whoever else is in the batch."""
    both = NoiseSource([torch.Generator().manual_seed(1), torch.Generator().manual_seed(2)])((2, 5, 3))
    second = NoiseSource([torch.Generator().manual_seed(2)])((1, 5, 3))
    assert torch.equal(both[1], second[0])
    with pytest.raises(ValueError):
        NoiseSource([torch.Generator()])((2, 5, 3))


def test_params_sparsity_select_cat():
    """Params.sparsity counts mask zeros over all weight entries (percent); select/cat keep patients."""
    params = _tiny_params(20, n_patients=3)
    zeros = np.array([sum(int((m[p] == 0).sum()) for m in params.masks) for p in range(3)])
    total = sum(m[0].numel() for m in params.masks)
    np.testing.assert_allclose(params.sparsity().numpy(), 100 * zeros / total, rtol=0, atol=1e-12)
    sub = params.select([2, 0])
    assert torch.equal(sub.weights[0][0], params.weights[0][2])
    joined = Params.cat([params.select([0]), params.select([1, 2])])
    assert all(torch.equal(a, b) for a, b in zip(joined.weights, params.weights))


def test_divergence_on_the_last_step_is_reported():
    """A training call whose only (hence last) step blows the network up raises NonFiniteError instead of
    returning parameters whose outputs are NaN/inf."""
    params = _tiny_params(21)
    rng = np.random.default_rng(22)
    x = torch.tensor(rng.normal(0, 3, (2, 64, 2)), dtype=torch.float32)
    y = torch.tensor(rng.integers(0, 4, (2, 64)))
    try:
        train(params, x, y, epochs=1, lr=1e30, batch_size=64, schedule=lambda e: Modulation(), stab=STAB,
              shuffle=[torch.Generator().manual_seed(s) for s in (1, 2)])
    except NonFiniteError as exc:
        assert exc.epoch == 0 and exc.patients
        return
    logits = forward(params, x, Modulation(), STAB)
    assert torch.isfinite(logits).all(), "train() returned a network with non-finite outputs without raising"
