"""Tests of virtualpatient.plasticity: the lesion (fact 7), relapse pruning (fact 11), regrowth (fact 8)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

from virtualpatient import PatientBatch, PatientSpec, Protocol
from virtualpatient.network import Params
from virtualpatient.plasticity import gradient_scores, prune_global, prune_per_layer, quantile, random_scores, regrow
from virtualpatient.treatments import KetamineLike

#: The paper's architecture with a tiny schedule: untrained (0 epochs), 4,000 training points so the
#: 30 scoring mini-batches of 128 are the first 30 of 32.
DEFAULT_ARCH = Protocol().replace(
    n_patients=2, seed=5, task={"n_train": 4000, "n_standard": 100, "n_clean": 100}, baseline={"epochs": 0}
)


def _survivors_numpy(w: np.ndarray, q: float = 95) -> np.ndarray:
    """Independent reference: |w| >= the q-th percentile of |w| (numpy, float64, linear interpolation)."""
    a = np.abs(w.astype(np.float64))
    return a >= np.percentile(a, q)


@pytest.fixture(scope="module")
def default_batch() -> PatientBatch:
    """Two untrained patients of the 2-512-512-256-4 network (the fixture is never modified)."""
    return PatientBatch([PatientSpec(0, DEFAULT_ARCH.seed), PatientSpec(1, DEFAULT_ARCH.seed)], DEFAULT_ARCH)


def test_lesion_prunes_each_matrix_to_its_95th_percentile(default_batch):
    """Fact 7: each of the 4 weight matrices keeps exactly |w| >= its own 95th percentile; biases untouched."""
    batch = default_batch.clone()
    before = batch.params.clone()
    batch.prune()
    total = 0
    for i, (w0, w, m) in enumerate(zip(before.weights, batch.params.weights, batch.params.masks)):
        for p in range(2):
            keep = _survivors_numpy(w0[p].numpy())
            assert int(m[p].sum()) == int(keep.sum()), f"layer {i} patient {p}"
            np.testing.assert_array_equal(m[p].numpy() == 1, keep)
            np.testing.assert_array_equal(w[p].numpy(), np.where(keep, w0[p].numpy(), 0.0))
        total += w0[0].numel()
    # sizes: 1024, 262144, 131072, 1024 -> keeps 52, 13108, 6554, 52 (independent of the values)
    assert [int(m[0].sum()) for m in batch.params.masks] == [52, 13108, 6554, 52]
    for b0, b in zip(before.biases, batch.params.biases):
        assert torch.equal(b0, b)
    expected = 100 * (total - (52 + 13108 + 6554 + 52)) / total
    np.testing.assert_allclose(batch.sparsity().numpy(), [expected, expected], rtol=0, atol=1e-9)
    assert abs(expected - 95.0) < 0.01


def test_hidden_reading_prunes_hidden_matrices_with_one_pooled_threshold(default_batch):
    """pruning.layers = "hidden": one threshold over the three hidden matrices' pooled |w|; output untouched.

    The kept set must be exactly {|w| >= pooled 95th percentile} (numpy, float64). Patient 0 of this
    seed has a weight just below the threshold that a float32-rounded threshold would wrongly keep.
    """
    protocol = DEFAULT_ARCH.replace(pruning={"fraction": 0.95, "layers": "hidden"})
    batch = PatientBatch(default_batch.specs, protocol, default_batch.params.clone())
    before = batch.params.clone()
    batch.prune()
    for p in range(2):
        pooled = np.concatenate([np.abs(w[p].numpy().astype(np.float64)).ravel() for w in before.weights[:3]])
        threshold = np.percentile(pooled, 95)
        kept = 0
        for i in range(3):
            a = np.abs(before.weights[i][p].numpy().astype(np.float64))
            got = batch.params.masks[i][p].numpy() == 1
            np.testing.assert_array_equal(got, a >= threshold, err_msg=f"layer {i} patient {p}")
            kept += int(got.sum())
        assert kept == int((pooled >= threshold).sum())
        assert kept == pytest.approx(0.05 * pooled.size, abs=2)
        # one pooled threshold, not per-layer: the large-|w| input matrix keeps far more than 5 %
        assert float(batch.params.masks[0][p].mean()) > 0.5
        assert float(batch.params.masks[1][p].mean()) < 0.05
    assert torch.all(batch.params.masks[3] == 1)
    assert torch.equal(batch.params.weights[3], before.weights[3])
    for b0, b in zip(before.biases, batch.params.biases):
        assert torch.equal(b0, b)


def _boundary_layer() -> tuple[torch.Tensor, np.ndarray]:
    """12 magnitudes whose two largest are adjacent float32 numbers a < b.

    The 95th percentile (linear) sits at rank 0.95 x 11 = 10.45, i.e. a + 0.45 (b - a): strictly above
    a, so only b may survive. Rounded to float32 the threshold becomes a, and a survives too.
    """
    a = np.float32(0.5)
    b = np.nextafter(a, np.float32(1.0))
    values = np.concatenate([np.linspace(0.01, 0.3, 10, dtype=np.float32), [a, b]]).astype(np.float32)
    values = values * np.where(np.arange(12) % 2 == 0, 1, -1).astype(np.float32)
    keep = _survivors_numpy(values)
    assert keep.sum() == 1 and keep[-1]  # the reference: b alone
    return torch.tensor(values.reshape(1, 3, 4)), keep.reshape(3, 4)


def test_threshold_not_rounded_below_percentile_per_layer():
    """prune_per_layer keeps exactly |w| >= the layer's 95th percentile, even one ulp below it."""
    w, keep = _boundary_layer()
    params = Params([w.clone()], [torch.zeros(1, 3)])
    prune_per_layer(params, [0.95])
    np.testing.assert_array_equal(params.masks[0][0].numpy() == 1, keep)


def test_threshold_not_rounded_below_percentile_pooled():
    """prune_global keeps exactly |w| >= the pooled 95th percentile, even one ulp below it."""
    w, keep = _boundary_layer()
    params = Params([w.clone()], [torch.zeros(1, 3)])
    prune_global(params, [0.95], layers=[0])
    np.testing.assert_array_equal(params.masks[0][0].numpy() == 1, keep)


@pytest.mark.parametrize("seed", range(4))
def test_selection_quantile_equals_torch_quantile_bit_for_bit(seed):
    """The pruning threshold (two order statistics, lerp) is torch.quantile's, bit for bit, on
    sizes, ranks and ties of every kind (whole-number values, half the entries zero)."""
    gen = torch.Generator().manual_seed(seed)
    for case in range(300):
        n = int(torch.randint(1, 2000, (1,), generator=gen))
        x = torch.rand(n, generator=gen, dtype=torch.float64)
        if case % 3 == 0:
            x = (x * 5).floor()
        if case % 5 == 0:
            x[: n // 2] = 0.0
        q = (0.95, 0.0, 0.5, float(torch.rand(1, generator=gen)))[case % 4]
        assert torch.equal(quantile(x, q), torch.quantile(x, q)), (n, q)
    with pytest.raises(ValueError, match="1-D"):
        quantile(torch.zeros(2, 2), 0.5)


def test_prune_fraction_covariate_sets_each_patients_depth(make_protocol, make_patients):
    """A patient's prune_fraction covariate is its own lesion depth (per layer, numpy-checked)."""
    protocol = make_protocol()
    batch = make_patients(protocol, covariates={0: {"prune_fraction": 0.5}, 1: {"prune_fraction": 0.9}})
    before = batch.params.clone()
    batch.prune()
    for p, q in ((0, 50), (1, 90)):
        for w0, m in zip(before.weights, batch.params.masks):
            np.testing.assert_array_equal(m[p].numpy() == 1, _survivors_numpy(w0[p].numpy(), q))


def test_further_pruning_keeps_old_lesions_and_reaches_target():
    """Relapse pruning (fact 11) on a pruned layer: old zeros stay pruned, new threshold over all entries."""
    rng = np.random.default_rng(3)
    w = torch.tensor(rng.normal(size=(1, 40, 50)), dtype=torch.float32)
    params = Params([w.clone()], [torch.zeros(1, 40)])
    prune_per_layer(params, [0.6])
    first = params.masks[0].clone()
    prune_per_layer(params, [0.8])
    second = params.masks[0]
    assert torch.all(second <= first)  # nothing revives
    np.testing.assert_array_equal(second[0].numpy() == 1, _survivors_numpy(w[0].numpy(), 80))
    assert int(second.sum()) == 400
    with pytest.raises(ValueError):
        prune_per_layer(params, [1.0])
    with pytest.raises(ValueError):
        prune_per_layer(params, [0.5, 0.5])


def test_prune_global_layers_argument():
    """prune_global only touches the named layers."""
    rng = np.random.default_rng(4)
    ws = [torch.tensor(rng.normal(size=(1, 6, 6)), dtype=torch.float32) for _ in range(3)]
    params = Params([w.clone() for w in ws], [torch.zeros(1, 6) for _ in ws])
    prune_global(params, [0.5], layers=[0, 2])
    assert torch.all(params.masks[1] == 1)
    pooled = np.concatenate([np.abs(ws[i][0].numpy()).ravel() for i in (0, 2)]).astype(np.float64)
    assert int(params.masks[0].sum() + params.masks[2].sum()) == int((pooled >= np.percentile(pooled, 50)).sum())


def _independent_scores(spec: PatientSpec, weights, biases, x, y, stream: str, n_batches: int, batch_size: int):
    """Sum of |dLoss/dW| over the first n_batches mini-batches, one patient, plain autograd, gain 1, ReLU."""
    g = spec.generator(stream)
    perm = torch.randperm(x.shape[0], generator=g)
    ws = [w.clone().requires_grad_(True) for w in weights]
    scores = [torch.zeros_like(w) for w in weights]
    for idx in perm.split(batch_size)[:n_batches]:
        h = x[idx]
        for w, b in zip(ws[:-1], biases[:-1]):
            h = torch.relu(h @ w.T + b)
        loss = F.cross_entropy(h @ ws[-1].T + biases[-1], y[idx])
        for s, grad in zip(scores, torch.autograd.grad(loss, ws)):
            s += grad.abs()
    return scores


@pytest.fixture(scope="module")
def regrown(default_batch):
    """The default architecture pruned to 95 % and given the ketamine-like regrowth (no consolidation)."""
    batch = default_batch.clone()
    batch.prune()
    pruned = batch.params.clone()
    scores = []
    for p, spec in enumerate(batch.specs):
        scores.append(_independent_scores(
            spec, [w[p] for w in pruned.weights], [b[p] for b in pruned.biases], batch.data.train_x[p],
            batch.data.train_y[p], "ketamine/score", n_batches=30, batch_size=128))
    library_scores = gradient_scores(
        batch.params, batch.data.train_x, batch.data.train_y, n_batches=30, batch_size=128,
        mod=batch.modulation, stab=batch.protocol.stabiliser, shuffle=batch.generators("ketamine/score"))
    KetamineLike(epochs=0).apply(batch, "ketamine")
    return {"batch": batch, "pruned": pruned, "scores": scores, "library_scores": library_scores}


def test_gradient_scores_equal_independent_autograd(regrown):
    """gradient_scores = per-patient sum over the first 30 mini-batches of |dLoss/dw| (plain autograd loop)."""
    for p in range(2):
        for lib, ind in zip(regrown["library_scores"], regrown["scores"][p]):
            torch.testing.assert_close(lib[p], ind, rtol=1e-4, atol=1e-7)
    assert float(regrown["library_scores"][1].sum()) > 0


def test_regrowth_reinstates_half_of_each_layers_pruned_positions(regrown):
    """Per layer, exactly floor(0.5 x pruned count) pruned positions come back; survivors are unchanged."""
    batch, pruned = regrown["batch"], regrown["pruned"]
    for i, (m0, m1, w0, w1) in enumerate(zip(pruned.masks, batch.params.masks, pruned.weights, batch.params.weights)):
        for p in range(2):
            n_pruned = int((m0[p] == 0).sum())
            grown = (m1[p] == 1) & (m0[p] == 0)
            assert int(grown.sum()) == n_pruned // 2, f"layer {i}"
            assert torch.all(m1[p][m0[p] == 1] == 1)  # nothing pruned by regrowth
            assert torch.equal(w1[p][m0[p] == 1], w0[p][m0[p] == 1])
            assert torch.all(w1[p][m1[p] == 0] == 0)


def test_regrowth_picks_the_top_scored_pruned_positions(regrown):
    """The reinstated positions are the top-scored pruned ones under independently computed scores."""
    batch, pruned = regrown["batch"], regrown["pruned"]
    for i, (m0, m1) in enumerate(zip(pruned.masks, batch.params.masks)):
        for p in range(2):
            score = regrown["scores"][p][i]
            was_pruned = m0[p] == 0
            grown = (m1[p] == 1) & was_pruned
            not_grown = was_pruned & ~grown
            k = int(grown.sum())
            lowest_grown, highest_left = float(score[grown].min()), float(score[not_grown].max())
            assert lowest_grown >= highest_left * (1 - 1e-4) - 1e-9, f"layer {i} patient {p}"
            # and, apart from near-ties at the cut, the very same set as an independent top-k
            kth = torch.topk(score[was_pruned], k).values[-1]
            top = was_pruned & (score > kth * (1 + 1e-4) + 1e-9)
            assert torch.all(grown[top])
            near_cut = was_pruned & ((score - kth).abs() <= kth * 1e-4 + 1e-9)
            assert int((grown ^ (was_pruned & (score >= kth))).logical_and(~near_cut).sum()) == 0


def test_regrown_values_are_normal_with_sd_003(regrown):
    """Reinstated weights ~ N(0, 0.03^2): on the 512 x 512 layer, mean, SD and a KS test agree."""
    batch, pruned = regrown["batch"], regrown["pruned"]
    m0, m1, w = pruned.masks[1], batch.params.masks[1], batch.params.weights[1]
    values = w[(m1 == 1) & (m0 == 0)].double().numpy()
    assert values.size == 2 * 124518
    assert abs(values.mean()) < 0.0005
    assert values.std() == pytest.approx(0.03, rel=0.01)
    assert scipy.stats.kstest(values / 0.03, "norm").pvalue > 1e-3
    # the two patients draw from their own streams
    a = w[0][(m1[0] == 1) & (m0[0] == 0)]
    b = w[1][(m1[1] == 1) & (m0[1] == 0)]
    assert not torch.equal(a[:100], b[:100])


def test_ketamine_sparsity_is_47_5_percent(regrown):
    """With the paper's sizes, 95 % pruning then 50 % regrowth leaves 47.5 % sparsity (fact 8)."""
    batch = regrown["batch"]
    total = sum(m[0].numel() for m in batch.params.masks)
    left = sum(n - n // 2 for n in (1024 - 52, 262144 - 13108, 131072 - 6554, 1024 - 52))
    np.testing.assert_allclose(batch.sparsity().numpy(), [100 * left / total] * 2, rtol=0, atol=1e-9)
    assert float(batch.sparsity()[0]) == pytest.approx(47.5, abs=0.01)
    assert batch.modulation.gain == 1.25


def test_regrow_fraction_and_random_control(make_protocol, make_patients):
    """regrow() takes per-patient fractions (0 grows nothing); random scores also grow floor(f x pruned)."""
    protocol = make_protocol()
    batch = make_patients(protocol)
    batch.prune([0.8, 0.8])
    before = [m.clone() for m in batch.params.masks]
    gens = [torch.Generator().manual_seed(s) for s in (1, 2)]
    scores = random_scores(batch.params, [torch.Generator().manual_seed(s) for s in (3, 4)])
    grown = regrow(batch.params, scores, [0.0, 0.3], 0.03, gens)
    for m0, m1, g in zip(before, batch.params.masks, grown):
        assert torch.equal(m1[0], m0[0]) and not g[0].any()
        assert int(g[1].sum()) == int(0.3 * int((m0[1] == 0).sum()))
        assert torch.equal(g[1], (m1[1] == 1) & (m0[1] == 0))
    with pytest.raises(ValueError):
        regrow(batch.params, scores, [0.5], 0.03, gens)


def test_regrowth_fraction_covariate_is_the_plasticity_reserve(make_protocol, make_patients):
    """A patient's regrowth_fraction covariate overrides the arm's 0.5 (floor(f x pruned) per layer)."""
    protocol = make_protocol()
    batch = make_patients(protocol, covariates={1: {"regrowth_fraction": 0.25}})
    batch.prune()
    before = [m.clone() for m in batch.params.masks]
    KetamineLike(epochs=0, score_batches=1).apply(batch, "ketamine")
    for m0, m1 in zip(before, batch.params.masks):
        for p, frac in ((0, 0.5), (1, 0.25)):
            n_pruned = int((m0[p] == 0).sum())
            assert int(((m1[p] == 1) & (m0[p] == 0)).sum()) == int(frac * n_pruned)
