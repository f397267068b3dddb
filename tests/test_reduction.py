"""Training the live units only gives what training the whole masked network gives.

:mod:`virtualpatient.engine.reduction` folds constant units (no incoming weight) into the next layer's
biases and leaves dead units (no path to the output) out. Mathematically nothing changes; float32
sums run in another order, so weights after a few epochs agree to ``atol 1e-5`` (Adam steps of
``lr`` at most, as in ``test_perf_equivalence.py``). Dead units' weights and biases must come back
*exactly* as they went in, since their gradients are exactly zero.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from virtualpatient.engine import batched, native, ops, reduction
from virtualpatient.engine.settings import engine_options
from virtualpatient.network import Modulation, NoiseSource, Params
from virtualpatient.protocol import StabiliserConfig

STAB = StabiliserConfig()
SIZES = (2, 24, 20, 12, 4)
KINDS = ["native", "torch"] if native.kernels_available() else ["torch"]


def _params(seed: int, n_patients: int = 3, keep: float = 0.5) -> Params:
    """Random masked networks with constant and dead units in every hidden layer, different per patient."""
    rng = np.random.default_rng(seed)
    weights, biases, masks = [], [], []
    for fan_in, fan_out in zip(SIZES[:-1], SIZES[1:]):
        m = (rng.random((n_patients, fan_out, fan_in)) < keep).astype(np.float32)
        weights.append(rng.normal(0.0, 0.8, m.shape).astype(np.float32))
        biases.append(rng.normal(0.3, 0.3, (n_patients, fan_out)).astype(np.float32))
        masks.append(m)
    for p in range(n_patients):
        masks[0][p, : 8 + p, :] = 0.0      # constant units in hidden layer 0 (more for later patients)
        masks[1][p, :2, :] = 0.0           # ... and in hidden layer 1
        masks[3][:, :, : 3 + p] = 0.0      # hidden layer 2: units 0.. feed nothing (dead)
        masks[2][p, :, 5] = 0.0            # hidden layer 1, unit 5: feeds only a dead unit of layer 2
        masks[2][p, 0, 5] = 1.0
    return Params([torch.tensor(w * m) for w, m in zip(weights, masks)], [torch.tensor(b) for b in biases],
                  [torch.tensor(m) for m in masks])


def _train(params: Params, options: dict, schedule=None, snapshots=()) -> tuple[Params, dict]:
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(params.n_patients, 96, 2, generator=gen) * 3
    y = torch.randint(0, 4, (params.n_patients, 96), generator=gen)
    schedule = schedule or (lambda e: Modulation(gain=1.25, protection=0.5))
    with engine_options(**options):
        snaps = batched.train(params, x, y, epochs=3, lr=1e-2, batch_size=32, schedule=schedule, stab=STAB,
                              shuffle=[torch.Generator().manual_seed(20 + i) for i in range(params.n_patients)],
                              noise=NoiseSource([torch.Generator().manual_seed(30 + i)
                                                 for i in range(params.n_patients)]),
                              snapshots=snapshots)
    return params, snaps


def test_unit_roles_of_a_hand_built_network():
    """Constant = no incoming weight; dead = no path to the output, found backwards (a unit feeding
    only a dead unit is dead, a constant unit feeding nothing is dead); each unit has one role."""
    w0 = torch.tensor([[1., 0.], [0., 0.], [1., 1.], [0., 0.]])   # 2 -> 4; units 1 and 3 have no input
    w1 = torch.tensor([[1., 1., 0., 0.], [0., 0., 1., 0.]])       # 4 -> 2; unit 3 feeds nothing
    w2 = torch.tensor([[1., 0.]])                                 # 2 -> 1; unit 1 feeds nothing
    roles = reduction.unit_roles([w0[None], w1[None], w2[None]])
    assert roles.dead[1].tolist() == [[False, True]]
    assert roles.dead[0].tolist() == [[False, False, True, True]]  # unit 2 only fed the dead unit
    assert roles.constant[0].tolist() == [[False, True, False, False]]  # unit 3 is dead, not constant
    assert roles.live[0].tolist() == [[True, False, False, False]]
    for live, const, dead in zip(roles.live, roles.constant, roles.dead):
        assert torch.equal(live.int() + const.int() + dead.int(), torch.ones_like(live, dtype=torch.int))


def test_the_test_networks_are_reduced():
    """Guard for the tests below: their networks do have constant and dead units and get reduced."""
    params = _params(1)
    roles = reduction.unit_roles(params.masks)
    assert all(min(c) > 0 for c in roles.count("constant")[:2])
    assert all(min(c) > 0 for c in roles.count("dead")[1:])
    net = batched._Net(params, reduce=True)
    assert net.reduction is not None and net.reduction.work_fraction() < 0.8


@pytest.mark.parametrize("kind", KINDS + ["off", "onednn"])
@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_reduced_training_equals_full_training(kind, activation):
    """Three noise-free epochs on the live units (dense blocks with ``kind="off"``, through oneDNN
    with ``"onednn"``, as the ketamine-like arm's large layers run; compressed ones otherwise) end at
    the weights and biases of the full network trained by the same engine; masked weights stay
    exactly 0; dead units' weights and biases are returned exactly unchanged; snapshots agree."""
    def schedule(epoch):
        return Modulation(gain=1.0 + 0.2 * epoch, protection=0.5, activation=activation, damping=0.9)

    start = _params(2)
    options = {"sparse_backend": kind, "sparse_max_density": 0.6, "sparse_min_weights": 0}
    if kind == "onednn":
        if not ops.onednn_available():
            pytest.skip("this torch has no oneDNN")
        options = {"sparse_backend": "off", "onednn_min_weights": 0}
    full, full_snaps = _train(start.clone(), {**options, "reduce_units": False}, schedule, snapshots=(1, 3))
    red, red_snaps = _train(start.clone(), {**options, "reduce_units": True}, schedule, snapshots=(1, 3))
    for a, b in zip(red.weights + red.biases, full.weights + full.biases):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for w, m in zip(red.weights, red.masks):
        assert torch.all(w[m == 0] == 0)
    roles = reduction.unit_roles(start.masks)
    for layer, dead in enumerate(roles.dead):  # hidden layer `layer` is the output of weights[layer]
        assert torch.equal(red.weights[layer][dead], start.weights[layer][dead])
        assert torch.equal(red.biases[layer][dead], start.biases[layer][dead])
        assert not torch.equal(red.biases[layer][~dead], start.biases[layer][~dead])  # the rest trained
    for e in (1, 3):
        for a, b in zip(red_snaps[e].weights + red_snaps[e].biases, full_snaps[e].weights + full_snaps[e].biases):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


def test_reduced_training_is_batching_invariant():
    """Patients padded to their batch mates' sizes end where each ends trained alone."""
    start = _params(3)
    together, _ = _train(start.clone(), {})
    for p in range(start.n_patients):
        one = start.select([p])
        gen = torch.Generator().manual_seed(5)
        x = torch.randn(3, 96, 2, generator=gen)[p:p + 1] * 3
        y = torch.randint(0, 4, (3, 96), generator=gen)[p:p + 1]
        batched.train(one, x, y, epochs=3, lr=1e-2, batch_size=32,
                      schedule=lambda e: Modulation(gain=1.25, protection=0.5), stab=STAB,
                      shuffle=[torch.Generator().manual_seed(20 + p)])
        for a, b in zip(one.weights + one.biases, together.weights + together.biases):
            torch.testing.assert_close(a[0], b[p], atol=1e-6, rtol=0)


def test_noisy_training_keeps_the_full_network():
    """With internal noise in any epoch, constant units are not constant: the engine must not reduce,
    so results are bit-for-bit those with the reduction switched off."""
    def schedule(epoch):
        return Modulation(gain=1.2, noise_sigma=0.4 if epoch == 2 else 0.0)

    start = _params(4)
    on, _ = _train(start.clone(), {"reduce_units": True}, schedule)
    off, _ = _train(start.clone(), {"reduce_units": False}, schedule)
    for a, b in zip(on.weights + on.biases, off.weights + off.biases):
        assert torch.equal(a, b)
    net = batched._Net(start, reduce=True)
    with pytest.raises(ValueError, match="without internal noise"):
        net.logits_t(torch.zeros(3, 2, 4), Modulation(noise_sigma=0.1), STAB, None)
