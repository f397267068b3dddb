"""Every path computes a hidden layer as its one definition, :meth:`HiddenLayer.reference`.

``virtualpatient/engine/hidden.py`` defines the order of operations (act, internal noise, biased
noise and its lift, ``* scale``, ``- shift``). The dense path runs ``HiddenLayer.reference``; the
engine's evaluation and training steps (``_Net.forward_eval``, ``_Net.logits_t``, ``_Net.step``)
run ``HiddenLayer.apply_t`` and ``HiddenLayer.grad_t``, which stay fused for speed (native kernels
of ``engine/kernels/elementwise.c``, or torch ops). So the fused passes are checked here against
the reference, on the same seeded random pre-activations and noise, for every combination of

* activation: relu, tanh;
* gain, damping, protection (which set the effective gain and the inhibitory shift) and internal
  noise, each at its neutral value, at another shared value, or one value per patient (then some
  patients have no noise and draw none);
* the biased test or not; activation magnitudes asked for or not; 37 samples (partial 16 x 16
  tiles of the noise transpose) or one (a reduced network's constant units);

on each backend here, and on each instruction-set build of the native kernels in
``tests/test_isa_kernels.py``.

Tolerances: **equal bits** wherever the code is exact, which is every output and gradient of relu
on both backends and every output of tanh on the torch backend. The native tanh is a rational
approximation within 3e-7 of ``torch.tanh``: ``atol 2e-6`` on the layer's output (that error times
a scale up to 1.6, plus a rounding of sums up to about 10; measured at most 9.5e-7). The gradient
through tanh: ``atol 1e-6`` on the torch backend (autograd's tanh backward rounds ``1 - y * y``
its own way; measured 2.4e-7) and ``atol 5e-6`` on the native one (the approximate ``y`` enters
``1 - y * y``, times gradients up to about 6; measured 2.0e-6). Activation magnitudes are means of
the same values summed in another memory order: ``rtol 1e-5``.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from virtualpatient.engine import batched, native
from virtualpatient.engine.hidden import HiddenLayer
from virtualpatient.network import BiasedNoise, Modulation, NoiseSource, Params
from virtualpatient.protocol import StabiliserConfig

STAB = StabiliserConfig()
P, UNITS = 3, 21
KINDS = ["native", "torch"] if native.kernels_available() else ["torch"]

#: Per modulation field: neutral, another shared value, one value per patient.
VALUES = {
    "gain": (1.0, 1.25, (1.0, 1.25, 1.6)),
    "damping": (1.0, 0.7, (1.0, 0.7, 0.85)),
    "protection": (0.0, 0.6, (0.0, 0.5, 1.0)),
    "noise_sigma": (0.0, 0.5, (0.0, 0.5, 0.3)),
}
BIASED = [None, BiasedNoise(1.0, 1.0)]


def modulations(activation: str) -> list[Modulation]:
    """Every combination of the values of :data:`VALUES` (81 modulations)."""
    return [Modulation(activation=activation, **dict(zip(VALUES, combo)))
            for combo in itertools.product(*VALUES.values())]


def _noise(seed: int) -> NoiseSource:
    return NoiseSource([torch.Generator().manual_seed(seed + i) for i in range(P)])


def _dense_draw(noise: NoiseSource):
    """What the dense path draws: fresh tensors of the requested shape."""
    return lambda term, shape: noise(shape, "cpu", term.drawn)


def _engine_draw(noise: NoiseSource):
    """What the engine draws: into a (reused) buffer, in place."""
    return lambda term, shape: noise.fill_(torch.empty(tuple(shape)), term.drawn)


def _t(z: torch.Tensor) -> torch.Tensor:
    """``z`` in the engine's layout ``[P, units, n]``, a copy of its own (``apply_t`` works in place)."""
    return z.transpose(1, 2).contiguous().clone()


def _same(got: torch.Tensor, want: torch.Tensor, exact: bool, atol: float, what: str) -> None:
    if exact:
        assert torch.equal(got, want), f"{what}: not bit for bit (max diff {(got - want).abs().max().item():.3g})"
    else:
        torch.testing.assert_close(got, want, atol=atol, rtol=0, msg=lambda m: f"{what}: {m}")


def check_fused_against_reference(kind: str, activation: str) -> int:
    """Run :meth:`HiddenLayer.apply_t` (evaluation: biased test, magnitudes) and, for training,
    ``apply_t`` with derivatives then :meth:`HiddenLayer.grad_t`, against :meth:`HiddenLayer.reference`
    and its autograd gradient, for every modulation; returns how many cases ran."""
    exact = activation == "relu" or kind == "torch"
    cases = 0
    for m, mod in enumerate(modulations(activation)):
        for n, biased, with_mags in itertools.product((37, 1), BIASED, (False, True)):
            what = f"{kind} {mod} biased={biased} magnitudes={with_mags} n={n}"
            gen = torch.Generator().manual_seed(1000 * m + n)
            z = torch.randn(P, n, UNITS, generator=gen) * 3  # [P, N, units], the dense layout
            hidden = HiddenLayer.of(mod, STAB, biased)
            mags_ref, mags_got = ([], []) if with_mags else (None, None)
            want = hidden.reference(z, _dense_draw(_noise(7 * m)), mags_ref)
            got, deriv = hidden.apply_t(_t(z), _engine_draw(_noise(7 * m)), kind,
                                        magnitudes=mags_got)
            assert deriv is None
            _same(got.transpose(1, 2), want, exact, 2e-6, what)
            if with_mags:
                torch.testing.assert_close(mags_got, mags_ref, rtol=1e-5, atol=1e-6)
            cases += 1
            if biased is not None or with_mags:
                continue
            # training: the derivative kept by apply_t, then grad_t, against autograd through reference
            g = torch.randn(P, n, UNITS, generator=gen)
            z_ref = z.clone().requires_grad_(True)
            hidden.reference(z_ref, _dense_draw(_noise(7 * m))).backward(g)
            h, deriv = hidden.apply_t(_t(z), _engine_draw(_noise(7 * m)), kind, deriv=None)
            _same(h.transpose(1, 2), want, exact, 2e-6, what + " (training)")
            grad = hidden.grad_t(_t(g), deriv, kind)
            _same(grad.transpose(1, 2), z_ref.grad, activation == "relu", 5e-6 if kind == "native" else 1e-6,
                  what + " (gradient)")
    return cases


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("kind", KINDS)
def test_fused_hidden_layer_equals_the_definition(kind, activation):
    """The engine's fused hidden layer (forward, magnitudes, derivative and gradient) equals
    HiddenLayer.reference for every activation x modulation combination (module docstring)."""
    assert check_fused_against_reference(kind, activation) == 81 * 2 * 2 * 2


def test_the_terms_are_the_modulations():
    """HiddenLayer.of: scale = damping x effective gain, shift = inhibition x p, internal noise before
    the biased test's (whose lift is m_b (1 - f p)); per-patient values stay per patient."""
    mod = Modulation(gain=1.6, damping=0.7, protection=1.0, noise_sigma=(0.0, 0.5))
    hidden = HiddenLayer.of(mod, STAB, BiasedNoise(1.0, 2.0))
    assert hidden.scale == 0.7 * STAB.gain_floor and hidden.shift == STAB.inhibition
    assert [t.sigma for t in hidden.noise] == [(0.0, 0.5), 1.0]
    assert hidden.noise[0].drawn == (False, True) and hidden.noise[0].lift is None
    assert hidden.noise[1].lift == 2.0 * (1 - STAB.noise_shift_factor) and hidden.noise[1].drawn is None
    assert hidden.nominal == 0.7 * 1.6
    assert HiddenLayer.of(Modulation(), STAB).noise == ()


def test_every_path_runs_through_the_definition(monkeypatch):
    """The dense path calls HiddenLayer.reference once per hidden layer; the engine's evaluation and
    training steps call HiddenLayer.apply_t (and grad_t in the backward pass) and nothing else for
    their hidden layers."""
    calls = {"reference": 0, "apply_t": 0, "grad_t": 0}
    for name in calls:
        real = getattr(HiddenLayer, name)

        def spy(self, *args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(HiddenLayer, name, spy)
    gen = torch.Generator().manual_seed(3)
    sizes = (2, 8, 6, 4)
    params = Params([torch.randn(1, o, i, generator=gen) for i, o in zip(sizes[:-1], sizes[1:])],
                    [torch.randn(1, o, generator=gen) for o in sizes[1:]])
    x = torch.randn(1, 16, 2, generator=gen)
    y = torch.randint(0, 4, (1, 16), generator=gen)
    mod = Modulation(gain=1.25, protection=0.5)
    batched.forward(params, x, mod, STAB)  # evaluation
    assert calls == {"reference": 0, "apply_t": 2, "grad_t": 0}
    w = params.clone()
    for t in w.weights:
        t.requires_grad_(True)
    batched.forward(w, x, mod, STAB)  # dense, autograd-visible
    assert calls == {"reference": 2, "apply_t": 2, "grad_t": 0}
    batched.train(params, x, y, epochs=1, lr=1e-2, batch_size=16, schedule=lambda e: mod, stab=STAB,
                  shuffle=[torch.Generator().manual_seed(4)])
    assert calls["apply_t"] > 2 and calls["grad_t"] > 0
