"""A hidden layer's order of operations, defined once.

After its product ``z = W h + b`` every hidden layer computes, in this order (fact 3), each step a
float32 operation of its own (no fused multiply-add, no reordering)::

    h = act(z)                                  # relu or tanh
    h = h + sigma * N(0, 1)                     # internal noise; patients with sigma 0 draw none
    h = (h + s_b * N(0, 1)) + lift              # biased (manic) test only; lift = m_b * (1 - f p)
    h = h * scale                               # scale = damping * effective_gain(gain, p)
    h = h - shift                               # shift = inhibition * p; left out when 0

and, when asked, reports the activation magnitude ``mean |act(z) * damping * gain|`` per patient
(nominal gain, before noise and stabiliser; fact 6).

:class:`HiddenLayer` holds the terms of that formula for one modulation (:meth:`HiddenLayer.of`)
and runs it in two ways:

* :meth:`HiddenLayer.reference`: the formula in plain torch ops on activations ``[P, N, units]``,
  autograd-visible. The dense path (:func:`virtualpatient.engine.batched._forward_dense`, which also
  gives gradient-based regrowth scores) is this, layer after layer.
* :meth:`HiddenLayer.apply_t` and :meth:`HiddenLayer.grad_t`: the same steps on the engine's
  transposed activations ``[P, units, n]``, through the fused passes of
  :mod:`virtualpatient.engine.ops` (the native kernels of ``kernels/elementwise.c``, or torch ops in
  the same order): act and ``* scale - shift`` in one pass when there is no noise, else the act
  and then one pass per noise term, ``* scale - shift`` folded into the last. The engine's
  evaluation and training steps (``_Net.forward_eval``, ``_Net.logits_t``, ``_Net.step`` and the
  constant units of a reduced network) compute their hidden layers only through these two.

The fused passes stay fused for speed, so they are checked against :meth:`~HiddenLayer.reference`
instead of being built from it: ``tests/test_hidden_layer.py`` runs both on the same seeded random
inputs and noise for every activation and modulation (gain, damping, protection, internal noise,
biased noise, each shared or per patient), each kernel backend, and (``tests/test_isa_kernels.py``)
each instruction-set build of the native kernels. They agree bit for bit (every relu output and
gradient, every tanh output of the torch backend), except where tanh is involved: the native tanh
is a rational approximation within 3e-7 of ``torch.tanh`` (``atol`` 2e-6 after noise, gain and
shift; 5e-6 on its gradient), and autograd's tanh backward rounds ``1 - y * y`` its own way
(``atol`` 1e-6 on the torch backend's gradient).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from virtualpatient import stabiliser
from virtualpatient.engine import ops
from virtualpatient.network import ACTIVATIONS, BiasedNoise, Modulation, PerPatient, per_patient

if TYPE_CHECKING:
    from virtualpatient.protocol import StabiliserConfig

__all__ = ["HiddenLayer", "NoiseTerm", "hidden_terms"]


@dataclass(frozen=True)
class NoiseTerm:
    """One noise step of a hidden layer: ``h + sigma * N(0, 1)``, then ``+ lift`` unless ``lift`` is None.

    ``drawn`` marks the patients that draw noise (``None``: every one); the others draw nothing
    and their generators do not advance.
    """

    sigma: PerPatient
    lift: PerPatient | None = None
    drawn: tuple[bool, ...] | None = None


#: Draws a noise term's ``N(0, 1)`` of the given shape ``[P, samples, units]`` (patient ``i``'s
#: slice from patient ``i``'s generator, :class:`~virtualpatient.network.NoiseSource`).
Draw = Callable[[NoiseTerm, Sequence[int]], torch.Tensor]


@dataclass(frozen=True)
class HiddenLayer:
    """The terms of the hidden-layer formula (module docstring) for one modulation.

    Attributes
    ----------
    activation
        ``"relu"`` or ``"tanh"``.
    scale, shift
        ``damping * effective_gain(gain, p)`` and ``inhibition * p`` (:func:`hidden_terms`).
    noise
        The noise steps in order: internal noise (when any patient has some), then the biased test's.
    nominal
        ``damping * gain``, the factor of the activation magnitude.
    """

    activation: str
    scale: PerPatient
    shift: PerPatient
    noise: tuple[NoiseTerm, ...] = ()
    nominal: PerPatient = 1.0

    @classmethod
    def of(cls, mod: Modulation, stab: StabiliserConfig, biased: BiasedNoise | None = None) -> HiddenLayer:
        """The hidden layers of a network under ``mod`` (and the biased test ``biased``, if given)."""
        scale, shift = hidden_terms(mod, stab)
        noise = []
        if mod.noisy:
            noise.append(NoiseTerm(mod.noise_sigma, None, _drawn(mod.noise_sigma)))
        if biased is not None:
            noise.append(NoiseTerm(biased.sigma, _lift(mod, biased, stab)))
        return cls(mod.activation, scale, shift, tuple(noise), _nominal(mod))

    def reference(self, z: torch.Tensor, draw: Draw | None = None,
                  magnitudes: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The formula in torch ops on pre-activations ``z`` ``[P, N, units]`` (autograd-visible, a new tensor).

        ``draw(term, shape)`` gives each noise term's ``N(0, 1)`` (needed when there is noise);
        ``magnitudes``, if given, receives the per-patient activation magnitude ``[P]``.
        """
        h = ACTIVATIONS[self.activation](z)
        if magnitudes is not None:
            magnitudes.append(_times(h, self.nominal).abs().mean(dim=(1, 2)))
        for term in self.noise:
            h = h + _times(draw(term, h.shape), term.sigma)
            if term.lift is not None:
                h = h + _per_row(term.lift, h)
        h = _times(h, self.scale)
        if self.shift:
            h = h - _per_row(self.shift, h)
        return h

    def apply_t(self, z: torch.Tensor, draw: Draw | None = None, kind: str = "native",
                deriv: torch.Tensor | None | bool = False, magnitudes: list[torch.Tensor] | None = None,
                source: Sequence[torch.Tensor] | None = None,
                bias: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The formula in place on transposed pre-activations ``z`` ``[P, units, n]``, through the fused passes.

        Returns ``(h, deriv)``: ``h`` is ``z``, overwritten; ``deriv`` is what :meth:`grad_t` needs
        (``deriv`` given: filled; ``None``: allocated; ``False``: not computed, ``None`` returned).
        ``draw(term, shape)`` gives each noise term's ``N(0, 1)`` as ``[P, n, units]`` (the
        reference's layout: the same numbers); it may be overwritten. ``kind`` is the backend of
        :mod:`~virtualpatient.engine.ops` (``"native"`` or ``"torch"``). With ``source`` (one
        ``[units, n]`` product per patient) and ``bias`` ``[P, units]`` the pre-activations are
        ``source + bias``, read by the first pass and written to ``z``
        (:func:`~virtualpatient.engine.ops.post_activation`).
        """
        fused = not self.noise and magnitudes is None
        h, deriv = ops.post_activation(z, self.activation, self.scale if fused else 1.0,
                                       self.shift if fused else 0.0, bias, deriv=deriv, kind=kind, source=source)
        if magnitudes is not None:
            magnitudes.append(_times(h, self.nominal).abs().mean(dim=(1, 2)))
            if not self.noise:
                ops.scale_shift_(h, self.scale, self.shift)
        shape = (h.shape[0], h.shape[2], h.shape[1])
        for k, term in enumerate(self.noise):
            last = k == len(self.noise) - 1
            ops.add_noise_t(h, draw(term, shape), term.sigma, 0.0 if term.lift is None else term.lift,
                            self.scale if last else 1.0, self.shift if last else 0.0, kind=kind)
        return h, deriv

    def grad_t(self, g: torch.Tensor, deriv: torch.Tensor, kind: str = "native") -> torch.Tensor:
        """In place on ``g = dL/dh`` ``[P, units, n]``: ``dL/dz = g * scale * act'(z)`` (noise and
        shift are additive), from the ``deriv`` of :meth:`apply_t`."""
        return ops.pre_activation_grad(g, deriv, self.scale, kind)


def hidden_terms(mod: Modulation, stab: StabiliserConfig) -> tuple[PerPatient, PerPatient]:
    """``(scale, shift)`` of the hidden layers: ``damping * effective_gain`` and the inhibitory shift.

    Shared when ``mod`` is (the same expressions as always); otherwise computed per patient with
    the same float expressions, so patient ``i``'s terms are exactly those it has alone.
    """
    if mod.n_patients is None:
        p = mod.protection
        return mod.damping * stabiliser.effective_gain(mod.gain, p, stab), stabiliser.inhibitory_shift(p, stab)
    terms = [hidden_terms(mod.patient(i), stab) for i in range(mod.n_patients)]
    return per_patient([t[0] for t in terms]), per_patient([t[1] for t in terms])


def _lift(mod: Modulation, biased: BiasedNoise, stab: StabiliserConfig) -> PerPatient:
    """The biased-noise shift ``shift * (1 - f p)``, per patient when protection is."""
    if not isinstance(mod.protection, tuple):
        return biased.shift * stabiliser.biased_shift_scale(mod.protection, stab)
    return per_patient([biased.shift * stabiliser.biased_shift_scale(p, stab) for p in mod.protection])


def _nominal(mod: Modulation) -> PerPatient:
    """``damping * gain`` (the activation-magnitude factor), per patient when either is."""
    if mod.n_patients is None:
        return mod.damping * mod.gain
    return per_patient([d * g for d, g in zip(mod.values("damping", mod.n_patients),
                                               mod.values("gain", mod.n_patients))])


def _drawn(sigma: PerPatient) -> tuple[bool, ...] | None:
    """Which patients draw internal noise (``None``: all of them, or none when ``sigma`` is 0)."""
    return tuple(s > 0 for s in sigma) if isinstance(sigma, tuple) else None


def _per_row(value: PerPatient, like: torch.Tensor) -> float | torch.Tensor:
    """``value`` itself when shared, else a ``[P, 1, ...]`` tensor to broadcast against ``like``."""
    if not isinstance(value, tuple):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def _times(h: torch.Tensor, factor: PerPatient) -> torch.Tensor:
    """``h * factor`` with ``factor`` shared or one per patient (leading axis)."""
    return h * _per_row(factor, h)
