"""A patient's network: its parameters, its neuromodulatory state and its noise, batched over patients.

Every tensor carries a leading patient axis ``P``: weights ``[P, out, in]``, biases ``[P, out]``,
inputs ``[P, N, in]``. A cohort that shares a schedule is one :class:`Params` (a single patient is
``P = 1``), its modulation one :class:`Modulation` (each value shared or one per patient), its
noise one :class:`NoiseSource` (one generator per patient). Nothing mixes patients: patient ``i``
of a batch computes exactly what it computes alone.

Masks are explicit tensors beside the weights, re-applied after every optimiser step, so a pruned
weight never silently revives (as in ``torch.nn.utils.prune``).

The hidden layer computes, in this order (fact 3)::

    h = act(W h + b)
    h += sigma * N(0, 1)                            # internal noise, if sigma > 0
    h += s_b * N(0, 1) + m_b * (1 - f * p)          # biased (manic) test only
    h *= damping * effective_gain(gain, p)
    h -= inhibition * p                             # stabiliser, if p > 0

The output layer is plain linear. That order is defined once, in
:class:`virtualpatient.engine.hidden.HiddenLayer`; computing with these objects (forward,
accuracy, training) is the engine's, :mod:`virtualpatient.engine` (start at its docstring).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import numpy as np
import torch

__all__ = [
    "ACTIVATIONS",
    "BiasedNoise",
    "Modulation",
    "NoiseSource",
    "NonFiniteError",
    "PER_PATIENT_FIELDS",
    "Params",
    "PerPatient",
    "init_params",
    "per_patient",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}


#: The fields of :class:`Modulation` that may hold one value per patient.
PER_PATIENT_FIELDS = ("gain", "damping", "noise_sigma", "protection")

#: A value shared by a batch (a float) or one per patient (a tuple of floats, not all equal).
PerPatient = float | tuple[float, ...]


def per_patient(value: object, name: str = "value") -> PerPatient:
    """Normalise a modulation value: a number -> ``float``; a sequence, 1-D array or 1-D tensor of
    numbers -> a ``tuple`` of floats, or one ``float`` when all are equal (so a uniform value takes
    the scalar path of the engine, bit for bit).

    A float32 tensor gives the float32 values (``torch.tensor([1.1])`` is 1.100000023841858);
    pass a list or a float64 tensor for exact decimal values.

    Raises
    ------
    TypeError
        For anything but a number or a one-dimensional collection of numbers.
    ValueError
        For an empty collection, a non-finite value or an array of another shape.
    """
    if isinstance(value, (torch.Tensor, np.ndarray)):
        if value.ndim > 1:
            raise ValueError(f"{name} must be a number or one value per patient, got shape {tuple(value.shape)}")
        value = value.tolist()
    if isinstance(value, (bool, str, bytes)):
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {type(value).__name__}")
    if isinstance(value, numbers.Real):
        values: tuple[float, ...] = (float(value),)
    elif isinstance(value, Iterable):
        items = list(value)
        if not items:
            raise ValueError(f"{name} needs at least one value")
        bad = [v for v in items if isinstance(v, bool) or not isinstance(v, numbers.Real)]
        if bad:
            raise TypeError(f"{name} must hold numbers, got {type(bad[0]).__name__} {bad[0]!r}")
        values = tuple(float(v) for v in items)
    else:
        raise TypeError(f"{name} must be a number or a sequence of numbers, got {type(value).__name__}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return values[0] if all(v == values[0] for v in values) else values


def _at(value: PerPatient, i: int) -> float:
    """Patient ``i``'s value of a :data:`PerPatient` value."""
    return value[i] if isinstance(value, tuple) else value


@dataclass(frozen=True)
class Modulation:
    """The neuromodulatory state of the hidden layers of a batch of patients.

    ``gain``, ``damping``, ``noise_sigma`` and ``protection`` are each one float (every patient
    the same: the engine's scalar path) or one value per patient, given as a sequence, array or
    1-D tensor and stored as a tuple of floats (a sequence whose values are all equal is stored as
    that one float). ``activation`` is batch-wide: a batch whose patients need different activations
    is split into one batch per activation.

    Attributes
    ----------
    gain
        Nominal global gain (ketamine-like 1.25, SSRI-like ramps to 1.6, neurosteroid-like 0.85).
    damping
        Post-activation multiplier (neurosteroid-like 0.7).
    activation
        ``"relu"`` or ``"tanh"`` (neurosteroid-like).
    noise_sigma
        SD of internal Gaussian noise added after each activation, >= 0.
    protection
        Mood-stabiliser protection ``p`` in [0, 1].

    Examples
    --------
    >>> mod = Modulation().replace(gain=[1.1, 1.3])
    >>> mod.gain, mod.n_patients, mod.take([1]).gain
    ((1.1, 1.3), 2, 1.3)
    >>> Modulation(gain=[1.25, 1.25]) == Modulation(gain=1.25)
    True
    """

    gain: PerPatient = 1.0
    damping: PerPatient = 1.0
    activation: Literal["relu", "tanh"] = "relu"
    noise_sigma: PerPatient = 0.0
    protection: PerPatient = 0.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        for name in PER_PATIENT_FIELDS:
            object.__setattr__(self, name, per_patient(getattr(self, name), name))
        lengths = {name: len(v) for name in PER_PATIENT_FIELDS if isinstance(v := getattr(self, name), tuple)}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"per-patient values must all have one length, got {lengths}")
        if not all(0.0 <= p <= 1.0 for p in self.values("protection")):
            raise ValueError(f"protection must lie in [0, 1], got {self.protection}")
        if any(s < 0 for s in self.values("noise_sigma")):
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")

    def replace(self, **changes) -> Modulation:
        """A copy with fields replaced (numbers, or one value per patient)."""
        return replace(self, **changes)

    @property
    def n_patients(self) -> int | None:
        """How many patients the per-patient values are for (``None``: every value is shared)."""
        for name in PER_PATIENT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, tuple):
                return len(value)
        return None

    @property
    def noisy(self) -> bool:
        """Whether any patient has internal noise."""
        return any(s > 0 for s in self.values("noise_sigma"))

    def values(self, name: str, n: int | None = None) -> list[float]:
        """Field ``name`` as a list: one entry per patient (``n`` of them for a shared value; one
        entry when ``n`` is not given)."""
        if name not in PER_PATIENT_FIELDS:
            raise ValueError(f"{name!r} is not a per-patient field ({', '.join(PER_PATIENT_FIELDS)})")
        value = getattr(self, name)
        return list(value) if isinstance(value, tuple) else [value] * (1 if n is None else n)

    def patient(self, i: int) -> Modulation:
        """Patient ``i``'s modulation (every value a float)."""
        return replace(self, **{name: _at(getattr(self, name), i) for name in PER_PATIENT_FIELDS})

    def take(self, positions: Sequence[int]) -> Modulation:
        """The modulation of a sub-batch: the per-patient values at ``positions`` (shared ones stay)."""
        positions = list(positions)
        changes = {name: tuple(value[i] for i in positions) for name in PER_PATIENT_FIELDS
                   if isinstance(value := getattr(self, name), tuple)}
        return replace(self, **changes) if changes else self

    @staticmethod
    def cat(items: Sequence[tuple[Modulation, int]]) -> Modulation:
        """The modulation of batches concatenated along the patient axis, from ``(modulation, size)``
        pairs (one activation for all)."""
        if not items:
            raise ValueError("nothing to concatenate")
        first = items[0][0]
        if any(m.activation != first.activation for m, _ in items):
            raise ValueError("only batches with the same activation can be stacked")
        for m, n in items:
            if m.n_patients not in (None, n):
                raise ValueError(f"a modulation for {m.n_patients} patients given for a batch of {n}")
        return replace(first, **{name: tuple(v for m, n in items for v in m.values(name, n))
                                 for name in PER_PATIENT_FIELDS})

    def check(self, n_patients: int) -> Modulation:
        """``self``, if its per-patient values fit a batch of ``n_patients``.

        Raises
        ------
        ValueError
            When they are for another number of patients.
        """
        if self.n_patients not in (None, n_patients):
            raise ValueError(f"the modulation has values for {self.n_patients} patients, the batch has {n_patients}")
        return self



@dataclass(frozen=True)
class BiasedNoise:
    """The biased (manic) perturbation: ``sigma * N(0, 1) + shift * (1 - f * p)`` per hidden unit."""

    sigma: float = 1.0
    shift: float = 1.0


class NoiseSource:
    """Draws noise of shape ``[P, ...]`` with patient ``i``'s slice from patient ``i``'s generator.

    Per-patient generators make a patient's noise independent of who it is batched with. Patient
    ``i``'s slice holds exactly ``torch.randn(shape[1:], generator=generators[i])``, drawn on the
    generator's device (CPU generators give the same numbers whatever device the model runs on).
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    def __call__(self, shape: Sequence[int], device: torch.device | str = "cpu",
                 patients: Sequence[bool] | None = None) -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} patients requested from {len(self.generators)} generators")
        return self.fill_(torch.empty(tuple(shape), device=device), patients)

    def fill_(self, out: torch.Tensor, patients: Sequence[bool] | None = None,
              normal: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None) -> torch.Tensor:
        """Fill ``out`` ``[P, ...]`` in place (each ``out[i]`` must be contiguous); returns ``out``.

        With ``patients``, only the slots marked ``True`` are drawn; the others are zero and their
        generators are not advanced (a patient without noise draws none, as it would alone).
        ``normal(slot, generator)`` draws a slot in place (default ``Tensor.normal_``); the engine
        passes a faster one that draws the same numbers
        (:func:`virtualpatient.engine.ops.normal_`).
        """
        if out.shape[0] != len(self.generators):
            raise ValueError(f"noise for {out.shape[0]} patients requested from {len(self.generators)} generators")
        for i, (slot, g) in enumerate(zip(out, self.generators)):
            if patients is not None and not patients[i]:
                slot.zero_()
            elif slot.device == g.device and slot.is_contiguous():
                if normal is not None:
                    normal(slot, g)
                else:
                    slot.normal_(generator=g)  # what torch.randn(shape, generator=g) does, without a copy
            else:
                slot.copy_(torch.randn(tuple(slot.shape), generator=g, device=g.device))
        return out


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf; ``patients`` are batch positions, ``epoch`` is 0-based."""

    def __init__(self, patients: list[int], epoch: int) -> None:
        self.patients, self.epoch = patients, epoch
        super().__init__(f"non-finite loss for batch positions {patients} at epoch {epoch + 1}")


@dataclass
class Params:
    """Stacked weights, biases and masks of P patients' networks.

    ``masks[i]`` is a float 0/1 tensor of ``weights[i]``'s shape; biases are never masked.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    masks: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.masks:
            self.masks = [torch.ones_like(w) for w in self.weights]

    @property
    def n_patients(self) -> int:
        return self.weights[0].shape[0]

    def clone(self) -> Params:
        return Params(*([t.detach().clone() for t in group] for group in (self.weights, self.biases, self.masks)))

    def apply_masks(self) -> None:
        """Zero every masked weight (in place)."""
        with torch.no_grad():
            for w, m in zip(self.weights, self.masks):
                w.mul_(m)

    def sparsity(self, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Share of mask zeros over the weight matrices (default: all), per patient, in percent (fact 7)."""
        masks = self.masks if layers is None else [self.masks[i] for i in layers]
        zeros = sum((m == 0).flatten(1).sum(1) for m in masks)
        total = sum(m[0].numel() for m in masks)
        return 100.0 * zeros.double() / total

    def select(self, index: Sequence[int]) -> Params:
        """The sub-batch of the given patient positions (a copy)."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.weights[0].device)
        return Params(*([t.index_select(0, idx) for t in group] for group in  # index_select copies
                        (self.weights, self.biases, self.masks)))

    @staticmethod
    def cat(items: Sequence[Params]) -> Params:
        """Concatenate batches along the patient axis."""
        return Params(*(
            [torch.cat([getattr(p, group)[i] for p in items]) for i in range(len(items[0].weights))]
            for group in ("weights", "biases", "masks")
        ))

    def to(self, device: str | torch.device) -> Params:
        """These parameters on ``device``: ``self`` when they are there already (so caches are shared)."""
        device = torch.device(device)
        tensors = self.weights + self.biases + self.masks
        if all(t.device == device or (device.index is None and t.device.type == device.type) for t in tensors):
            return self
        return Params(*([t.to(device) for t in group] for group in (self.weights, self.biases, self.masks)))


def init_params(layer_sizes: Sequence[int], generators: Sequence[torch.Generator]) -> Params:
    """PyTorch's default ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per patient."""
    weights, biases = [], []
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        w, b = [], []
        for g in generators:
            w.append((torch.rand((fan_out, fan_in), generator=g) * 2 - 1) * bound)
            b.append((torch.rand((fan_out,), generator=g) * 2 - 1) * bound)
        weights.append(torch.stack(w))
        biases.append(torch.stack(b))
    return Params(weights, biases)

