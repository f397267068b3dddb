"""Masked MLP math, batched over a leading patient axis.

Every tensor carries a leading patient axis ``P``: weights ``[P, out, in]``, biases ``[P, out]``,
inputs ``[P, N, in]``. A cohort that shares a schedule trains as one tensor program; a single
patient is ``P = 1``. Nothing here mixes patients: losses are summed over patients, so each
patient's gradient is its own, and Adam is elementwise, so P patients trained together end equal
(up to float rounding) to each trained alone.

Masks are explicit tensors beside the weights, re-applied after every optimiser step, so a pruned
weight never silently revives (as in ``torch.nn.utils.prune``).

The hidden layer computes, in this order (fact 3)::

    h = act(W h + b)
    h += sigma * N(0, 1)                            # internal noise, if sigma > 0
    h += s_b * N(0, 1) + m_b * (1 - f * p)          # biased (manic) test only
    h *= damping * effective_gain(gain, p)
    h -= inhibition * p                             # stabiliser, if p > 0

The output layer is plain linear. ``gain``, ``damping``, ``sigma`` and ``p`` may be one value per
patient (:class:`Modulation`): when they are shared the engine passes floats to its kernels as
always; when they differ it calls the same kernels once per patient slice with that patient's floats
(``[P, 1, 1]`` tensors on the dense path), so each patient computes what it computes alone.

The engine
----------
:func:`train` and the evaluation path of :func:`forward` run on a working copy of the network
(``_Net``) in which activations are *transposed*, ``[P, units, n]``, and every large layer whose
masks keep at most :attr:`EngineConfig.sparse_max_density` of its weights is stored compressed
(only its unmasked weights, see :mod:`virtualpatient.sparse`). Both give the dense results up to
float rounding (``tests/test_perf_equivalence.py``); ``docs/performance.md`` has the measurements
behind the defaults. Noise-free training runs on the live units only (constant units folded into
the next layer's biases, dead units left out: :mod:`virtualpatient.reduction`). The dense,
autograd-visible path (:func:`batch_loss`, and :func:`forward` when
the weights require gradients) is kept for gradient-based regrowth scores, which need gradients at
pruned positions too.
"""

from __future__ import annotations

import contextlib
import functools
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
import torch.nn.functional as F

from virtualpatient import reduction, sparse, stabiliser

if TYPE_CHECKING:
    from virtualpatient.protocol import StabiliserConfig

__all__ = [
    "BatchedAdam",
    "BiasedNoise",
    "EngineConfig",
    "Modulation",
    "NoiseSource",
    "NonFiniteError",
    "PER_PATIENT_FIELDS",
    "Params",
    "PerPatient",
    "accuracy",
    "engine_options",
    "eval_group_size",
    "forward",
    "hidden_terms",
    "init_params",
    "per_patient",
    "train",
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


def _per_row(value: PerPatient, like: torch.Tensor) -> float | torch.Tensor:
    """``value`` itself when shared, else a ``[P, 1, ...]`` tensor to broadcast against ``like``."""
    if not isinstance(value, tuple):
        return value
    return torch.tensor(value, dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))


def _times(h: torch.Tensor, factor: PerPatient) -> torch.Tensor:
    """``h * factor`` with ``factor`` shared or one per patient (leading axis)."""
    return h * _per_row(factor, h)


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

    def fill_(self, out: torch.Tensor, patients: Sequence[bool] | None = None) -> torch.Tensor:
        """Fill ``out`` ``[P, ...]`` in place (each ``out[i]`` must be contiguous); returns ``out``.

        With ``patients``, only the slots marked ``True`` are drawn; the others are zero and their
        generators are not advanced (a patient without noise draws none, as it would alone).
        """
        if out.shape[0] != len(self.generators):
            raise ValueError(f"noise for {out.shape[0]} patients requested from {len(self.generators)} generators")
        for i, (slot, g) in enumerate(zip(out, self.generators)):
            if patients is not None and not patients[i]:
                slot.zero_()
            elif slot.device == g.device and slot.is_contiguous():
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
        return Params(*([t.index_select(0, idx).clone() for t in group] for group in
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


# --------------------------------------------------------------------------------------------
# Engine settings
# --------------------------------------------------------------------------------------------
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
    sparse_backend
        ``None`` (default: :func:`virtualpatient.sparse.backend`), ``"native"``, ``"torch"`` or ``"off"``.
    reduce_units
        Train the live units only when a :func:`train` call has no internal noise: constant units
        (no incoming weight) folded into the next layer's biases, dead ones (no path to the
        output) left out (:mod:`virtualpatient.reduction`).
    reduce_max_work
        ... but only when the live blocks keep at most this share of the per-sample products.
    eval_max_bytes
        Largest activation buffer an evaluation may use: :func:`forward` evaluates a batch in groups
        of :func:`eval_group_size` networks, so memory does not grow with the batch (each buffer
        is networks x points x units float32; there are three). Each patient's noise comes from
        its own generator either way, so the grouping changes no number.
    """

    sparse_max_density: float = 0.25
    sparse_min_weights: int = 0
    onednn_min_weights: int = 16_384
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


# --------------------------------------------------------------------------------------------
# The dense reference math (autograd-visible; used for gradient scores)
# --------------------------------------------------------------------------------------------
def _forward_dense(params, x, mod, stab, noise, biased, magnitudes) -> torch.Tensor:
    act = ACTIVATIONS[mod.activation]
    scale, shift = hidden_terms(mod.check(params.n_patients), stab)
    drawn = _drawn(mod.noise_sigma)
    n_hidden = len(params.weights) - 1
    h = x
    for i in range(n_hidden):
        h = act(torch.baddbmm(params.biases[i].unsqueeze(1), h, params.weights[i].transpose(1, 2)))
        if magnitudes is not None:
            magnitudes.append(_times(h, _nominal(mod)).abs().mean(dim=(1, 2)))
        if mod.noisy:
            h = h + _times(noise(h.shape, h.device, drawn), mod.noise_sigma)
        if biased is not None:
            h = h + biased.sigma * noise(h.shape, h.device) + _per_row(_lift(mod, biased, stab), h)
        h = _times(h, scale)
        if shift:
            h = h - _per_row(shift, h)
    return torch.baddbmm(params.biases[-1].unsqueeze(1), h, params.weights[-1].transpose(1, 2))


def _drawn(sigma: PerPatient) -> list[bool] | None:
    """Which patients draw internal noise (``None``: all of them, or none when ``sigma`` is 0)."""
    return [s > 0 for s in sigma] if isinstance(sigma, tuple) else None


def forward(
    params: Params | _Net,
    x: torch.Tensor,
    mod: Modulation,
    stab: StabiliserConfig,
    noise: NoiseSource | None = None,
    biased: BiasedNoise | None = None,
    magnitudes: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits ``[P, N, C]`` of inputs ``x`` ``[P, N, in]`` (the layer order is in the module docstring).

    ``mod`` may hold one value per patient (:class:`Modulation`); patient ``i`` then computes
    exactly what it computes alone with ``mod.patient(i)``.

    Without gradients (evaluation) this runs on the engine (compressed layers, reused buffers);
    when the weights, biases or ``x`` require gradients it runs the dense autograd-visible math.
    :func:`train` runs every mini-batch through this function too, passing its working copy of
    the network and transposed inputs ``[P, in, B]`` (logits ``[P, C, B]``), so wrapping
    ``forward`` observes the modulation of every training step.

    Parameters
    ----------
    stab
        A :class:`~virtualpatient.protocol.StabiliserConfig`.
    noise
        Needed when ``mod.noise_sigma > 0`` or ``biased`` is given.
    magnitudes
        If given, receives per hidden layer the per-patient mean of ``|act(W h + b) * damping * gain|``
        (nominal gain, before noise and stabiliser terms; fact 6).
    """
    if isinstance(params, _Net):  # a training step of the engine (see train)
        return params.logits_t(x, mod, stab, noise)
    if _needs_grad(params, x):
        return _forward_dense(params, x, mod, stab, noise, biased, magnitudes)
    with torch.no_grad():
        return _evaluate(params, x, mod, stab, noise, biased, magnitudes)


def _evaluate(params: Params, x: torch.Tensor, mod: Modulation, stab: StabiliserConfig, noise: NoiseSource | None,
              biased: BiasedNoise | None, magnitudes: list[torch.Tensor] | None) -> torch.Tensor:
    """The engine's evaluation, in groups of networks that fit :attr:`EngineConfig.eval_max_bytes`."""
    widths = [x.shape[2]] + [w.shape[1] for w in params.weights]
    nets = _eval_nets(params, eval_group_size(x.shape[1], widths))
    mod.check(params.n_patients)
    if len(nets) == 1:
        return nets[0][1].forward_eval(x, mod, stab, noise, biased, magnitudes)
    logits, found = [], []
    for (p0, net), p1 in zip(nets, [p0 for p0, _ in nets[1:]] + [params.n_patients]):
        part = None if noise is None else NoiseSource(noise.generators[p0:p1])
        found.append(None if magnitudes is None else [])
        logits.append(net.forward_eval(x[p0:p1], mod.take(range(p0, p1)), stab, part, biased, found[-1]))
    if magnitudes is not None:
        magnitudes.extend(torch.cat(layer) for layer in zip(*found))
    return torch.cat(logits)


def _needs_grad(params: Params, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params.weights + params.biases))


@torch.no_grad()
def accuracy(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    mod: Modulation,
    stab: StabiliserConfig,
    noise: NoiseSource | None = None,
    biased: BiasedNoise | None = None,
) -> torch.Tensor:
    """Per-patient accuracy in percent on ``x`` ``[P, N, in]``, labels ``y`` ``[P, N]``."""
    logits = forward(params, x, mod, stab, noise=noise, biased=biased)
    return 100.0 * (logits.argmax(-1) == y).double().mean(-1)


# --------------------------------------------------------------------------------------------
# Adam
# --------------------------------------------------------------------------------------------
#: ``False`` forces the plain elementwise Adam update (for tests and benchmarks); by default torch's
#: fused kernel is used where it works.
FUSED_ADAM: bool | None = None


@functools.cache
def _fused_adam_works() -> bool:
    """Whether torch's fused Adam kernel runs here (checked once, on first use)."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    try:
        t, g = torch.ones(3), torch.ones(3)
        torch._fused_adam_([t], [g], [torch.zeros(3)], [torch.zeros(3)], [], [torch.ones(())], lr=0.1, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        return bool(torch.isfinite(t).all())
    except (RuntimeError, TypeError):  # pragma: no cover - old torch
        return False



class BatchedAdam:
    """Adam over stacked parameters with a per-patient learning rate.

    The update is torch's ``Adam`` (no weight decay, no amsgrad), elementwise, so each patient's
    slice moves exactly as if it were optimised alone. A fresh instance is a fresh optimiser.

    Parameters
    ----------
    tensors
        Parameters; by default each has a leading patient axis.
    lr
        One learning rate, or one per patient ``[P]``.
    segments
        Per tensor, ``None`` (leading patient axis) or the ``P + 1`` offsets of a flat tensor that
        holds the patients one after another (compressed layer values).

    Notes
    -----
    Uses torch's fused CPU/GPU Adam kernel (one pass over memory instead of eight; the same update
    as ``torch.optim.Adam(fused=True)``) when available, with one call per distinct learning rate.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], lr: torch.Tensor | float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 segments: Sequence[Sequence[int] | None] | None = None) -> None:
        self.tensors = list(tensors)
        self.segments = list(segments) if segments is not None else [None] * len(self.tensors)
        n = self._n_patients()
        lr = torch.as_tensor(lr, dtype=torch.float32, device=self.tensors[0].device)
        self.lr = lr.expand(n) if lr.ndim == 0 else lr
        if self.lr.shape != (n,):
            raise ValueError(f"need one learning rate or one per patient ({n}), got shape {tuple(self.lr.shape)}")
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(t) for t in self.tensors]
        self.exp_avg_sq = [torch.zeros_like(t) for t in self.tensors]
        self._step_t = torch.zeros((), dtype=torch.float32, device=self.tensors[0].device)
        lrs = self.lr.tolist()
        self._groups = {v: [p for p, w in enumerate(lrs) if w == v] for v in dict.fromkeys(lrs)}

    def _n_patients(self) -> int:
        for t, seg in zip(self.tensors, self.segments):
            return t.shape[0] if seg is None else len(seg) - 1
        raise ValueError("BatchedAdam needs at least one tensor")

    def _split(self, tensors: Sequence[torch.Tensor], patients: list[int]) -> list[torch.Tensor]:
        out = []
        for t, seg in zip(tensors, self.segments):
            for p in patients:
                out.append(t[p] if seg is None else t[seg[p]:seg[p + 1]])
        return out

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.step_count += 1
        grads = [g.contiguous() for g in grads]
        if _fused_adam_works() and FUSED_ADAM is not False:
            self._step_t.fill_(self.step_count)
            for lr, patients in self._groups.items():
                if len(self._groups) == 1:
                    lists = (self.tensors, grads, self.exp_avg, self.exp_avg_sq)
                else:
                    lists = tuple(self._split(ts, patients) for ts in (self.tensors, grads, self.exp_avg,
                                                                         self.exp_avg_sq))
                torch._fused_adam_(*lists, [], [self._step_t] * len(lists[0]), lr=lr, beta1=self.beta1,
                                   beta2=self.beta2, weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
            return
        bc1 = 1 - self.beta1 ** self.step_count
        bc2_sqrt = math.sqrt(1 - self.beta2 ** self.step_count)
        for t, g, m, v, seg in zip(self.tensors, grads, self.exp_avg, self.exp_avg_sq, self.segments):
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            step_size = (self.lr / bc1).to(t.dtype)
            if seg is None:
                step_size = step_size.view(-1, *([1] * (t.ndim - 1)))
            else:
                step_size = step_size.repeat_interleave(torch.tensor(seg, device=t.device).diff())
            t.addcdiv_(m * step_size, denom, value=-1.0)


# --------------------------------------------------------------------------------------------
# Mini-batches
# --------------------------------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, generators: Sequence[torch.Generator],
                  device: torch.device | str) -> list[torch.Tensor]:
    """One epoch's mini-batch index tensors ``[P, B]``: a fresh permutation per patient.

    Patient ``i``'s permutation is ``torch.randperm(n, generator=generators[i])``, split into runs
    of ``batch_size`` in order (the last one shorter), which is what a ``DataLoader`` over the
    patient's data with ``batch_size`` and a sampler yielding that permutation gives.
    """
    perm = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
    return list(perm.split(batch_size, dim=1))


def gather_batch(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xb = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return xb, torch.gather(y, 1, idx)


def batch_loss(params: Params, xb: torch.Tensor, yb: torch.Tensor, mod: Modulation, stab: StabiliserConfig,
               noise: NoiseSource | None) -> torch.Tensor:
    """Per-patient mean cross-entropy, ``[P]`` (dense, autograd-visible math)."""
    if _needs_grad(params, xb):  # through forward (which then runs the dense math), as every step does
        logits = forward(params, xb, mod, stab, noise=noise)
    else:
        logits = _forward_dense(params, xb, mod, stab, noise, None, None)
    return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(yb.shape).mean(1)


# --------------------------------------------------------------------------------------------
# The engine's working copy of a network
# --------------------------------------------------------------------------------------------
class _Layer:
    """One layer of a :class:`_Net`: dense (the ``Params`` weight itself) or compressed."""

    __slots__ = ("weight", "bias", "mask", "pattern", "values", "kind")

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, kind: str, bias: torch.Tensor) -> None:
        self.weight, self.bias, self.kind = weight, bias, kind
        self.pattern: sparse.Pattern | None = None
        self.values: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        cfg = ENGINE
        size = weight[0].numel()
        if kind != "off" and size >= cfg.sparse_min_weights:
            kept = (mask != 0).flatten(1).sum(1).max().item() / size
            if kept <= cfg.sparse_max_density:
                self.pattern = sparse.Pattern(mask)
                self.values = self.pattern.gather(weight.detach())
                return
        if not bool((mask != 0).all()):
            self.mask = mask

    @property
    def compressed(self) -> bool:
        return self.pattern is not None

    def leaf(self) -> torch.Tensor:
        """The tensor the optimiser updates: the compressed values or the dense weight."""
        return self.values if self.compressed else self.weight

    def segments(self) -> list[int] | None:
        return self.pattern.offsets if self.compressed else None

    @property
    def onednn(self) -> bool:
        return self.weight[0].numel() >= ENGINE.onednn_min_weights

    def forward(self, h: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``W h + b`` for transposed activations ``h`` ``[P, in, n]`` -> ``[P, out, n]`` (no autograd);
        ``bias`` replaces the layer's own for this product."""
        bias = self.bias if bias is None else bias
        if self.compressed:
            return sparse.sparse_forward(self.pattern, self.values, bias, h, out, self.kind)
        return sparse.dense_forward(self.weight, bias, h, out, onednn=self.onednn)

    def backward(self, gz: torch.Tensor, h: torch.Tensor, need_input: bool,
                 out: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``(d leaf, d bias, d h)`` from ``gz = dL/dz`` and the layer's input ``h``."""
        if self.compressed:
            return sparse.sparse_backward(self.pattern, self.values, gz, h, need_input, out, self.kind)
        return sparse.dense_backward(self.weight, gz, h, need_input, out, onednn=self.onednn)


_workspace = threading.local()


def _buffer(name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reusable per-thread scratch tensor (large fresh allocations cost page faults and cache misses)."""
    store = _workspace.__dict__.setdefault("buffers", {})
    buf = store.get(name)
    numel = math.prod(shape)
    dtype = dtype or like.dtype
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != like.device:
        buf = torch.empty(numel, dtype=dtype, device=like.device)
        store[name] = buf
    return buf[:numel].view(shape)


class _Net:
    """The engine's working copy of :class:`Params`: transposed activations, compressed sparse layers.

    Dense layers use the ``Params`` tensors themselves; compressed layers hold their unmasked
    weights as new tensors, written back by :meth:`write_back`. Training steps are backpropagated
    by hand (:meth:`step`): the same products and elementwise derivatives autograd would form,
    in place in reused buffers, without building a graph per mini-batch.

    With ``reduce`` (noise-free training on the CPU) the layers hold the live blocks of a
    :class:`~virtualpatient.reduction.Reduction` instead; ``inputs[i]``, when not ``None``, is a
    layer from the constant units of layer ``i``'s input level (biases ``const_biases[i]``), whose
    product with their activations is added to layer ``i``'s bias every step. All of it is written
    back by :meth:`write_back`.
    """

    def __init__(self, params: Params, reduce: bool = False) -> None:
        device = params.weights[0].device
        kind = ENGINE.sparse_backend or sparse.backend(device)
        self.kind = kind
        self._saved: tuple | None = None
        self.reduction = _reduction(params) if reduce else None
        n_layers = len(params.weights)
        self.inputs: list[_Layer | None] = [None] * n_layers
        self.const_biases: list[torch.Tensor | None] = [None] * n_layers
        r = self.reduction
        if r is None:
            self.layers = [_Layer(w, m, kind, b) for w, b, m in zip(params.weights, params.biases, params.masks)]
            return
        self.layers = []
        for i, (w, b) in enumerate(zip(params.weights, params.biases)):
            self.layers.append(_Layer(*r.block(i, w), kind=kind, bias=r.unit_values(i + 1, b)))
            if r.has_constant_inputs(i):
                self.inputs[i] = _Layer(*r.block(i, w, "constant"), kind=kind, bias=self.layers[i].bias)
                self.const_biases[i] = r.unit_values(i, params.biases[i - 1], "constant")

    # -- training ----------------------------------------------------------------------------
    def leaves(self) -> tuple[list[torch.Tensor], list[list[int] | None]]:
        """What the optimiser updates, with each tensor's patient segments (``None``: leading axis)."""
        leaves = [layer.leaf() for layer in self.layers] + [layer.bias for layer in self.layers]
        segments = [layer.segments() for layer in self.layers] + [None] * len(self.layers)
        for inp in self.inputs:
            if inp is not None:
                leaves.append(inp.leaf())
                segments.append(inp.segments())
        extra = [c for c in self.const_biases if c is not None]
        return leaves + extra, segments + [None] * len(extra)

    def _constants(self, activation: str, scale: float, shift: float) -> list[tuple | None]:
        """Per layer, the activations ``[P, K, 1]`` of its input level's constant units and their
        derivatives (or ``None``)."""
        return [None if b is None else sparse.post_activation(b.detach().clone().unsqueeze(2), activation, scale,
                                                              shift, kind=self.kind)
                for b in self.const_biases]

    def _bias(self, i: int, consts: list[tuple | None]) -> torch.Tensor | None:
        """Layer ``i``'s bias for this step: its own plus its constant inputs' share (``None``: its own)."""
        inp = self.inputs[i]
        return None if inp is None else inp.forward(consts[i][0]).squeeze(2)

    def apply_masks(self) -> None:
        with torch.no_grad():
            for layer in self.layers + [inp for inp in self.inputs if inp is not None]:
                if layer.mask is not None:
                    layer.weight.mul_(layer.mask)

    @torch.no_grad()
    def logits_t(self, xt: torch.Tensor, mod: Modulation, stab: StabiliserConfig,
                 noise: NoiseSource | None) -> torch.Tensor:
        """Logits ``[P, C, B]`` of transposed inputs ``xt`` ``[P, in, B]``; keeps what :meth:`step`'s
        backward pass needs. Same operations, same order as the dense path (module docstring)."""
        scale, shift = hidden_terms(mod.check(xt.shape[0]), stab)
        n_patients, n = xt.shape[0], xt.shape[2]
        inputs, derivs = [xt], []
        h = xt
        relu = mod.activation == "relu"
        noisy = mod.noisy
        if self.reduction is not None and noisy:
            raise ValueError("a reduced network trains without internal noise only")
        consts = self._constants(mod.activation, scale, shift)
        for i, layer in enumerate(self.layers[:-1]):
            units = layer.bias.shape[1]
            z = layer.forward(h, _buffer(f"train/a{i}", (n_patients, units, n), xt), self._bias(i, consts))
            d = _buffer(f"train/d{i}", z.shape, z, torch.bool if relu else None)
            if noisy:  # act, noise (drawn [P, B, units] as the dense path), * scale, - shift
                h, d = sparse.post_activation(z, mod.activation, 1.0, 0.0, deriv=d, kind=self.kind)
                draw = noise.fill_(_buffer("train/noise", (n_patients, n, units), xt), _drawn(mod.noise_sigma))
                sparse.add_noise_t(h, draw, mod.noise_sigma, 0.0, scale, shift, kind=self.kind)
            else:  # one fused pass (x * 1.0 and x - 0.0 are skipped: they change nothing)
                h, d = sparse.post_activation(z, mod.activation, scale, shift, deriv=d, kind=self.kind)
            derivs.append(d)
            inputs.append(h)
        self._saved = (inputs, derivs, scale, consts)
        return self.layers[-1].forward(h, bias=self._bias(len(self.layers) - 1, consts))

    @torch.no_grad()
    def step(self, xt: torch.Tensor, y: torch.Tensor, mod: Modulation, stab: StabiliserConfig,
             noise: NoiseSource | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-patient mean cross-entropy ``[P]`` of one mini-batch and the gradients of its sum with
        respect to :meth:`leaves` (in that order)."""
        logits = forward(self, xt, mod, stab, noise=noise)  # -> logits_t, via the public entry point
        inputs, derivs, scale, consts = self._saved
        self._saved = None
        logp = torch.log_softmax(logits, 1)
        target = y.unsqueeze(1)
        loss = logp.gather(1, target).squeeze(1).neg_().mean(1)
        g = logp.exp_()  # d(sum_p mean_b CE) / d logits = (softmax - onehot) / B
        g.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=g.dtype, device=g.device))
        g.mul_(1.0 / y.shape[1])
        n_layers = len(self.layers)
        g_leaf: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        g_bias: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        g_inputs: list[torch.Tensor] = []
        g_consts: list[torch.Tensor] = []
        for i in range(n_layers - 1, -1, -1):
            h = inputs[i]
            out = _buffer(f"train/g{i}", h.shape, h) if i > 0 else None
            g_leaf[i], g_bias[i], gh = self.layers[i].backward(g, h, i > 0, out)
            if self.inputs[i] is not None:  # the constant units below, through their folded-in share
                const, deriv = consts[i]
                g_values, _, g_const = self.inputs[i].backward(g_bias[i].unsqueeze(2), const, True)
                g_inputs.insert(0, g_values)
                g_consts.insert(0, sparse.pre_activation_grad(g_const, deriv, scale, kind=self.kind).squeeze(2))
            if i > 0:  # through h = (act(z) [+ noise]) * scale [- shift]
                g = sparse.pre_activation_grad(gh, derivs[i - 1], scale, kind=self.kind)
        return loss, g_leaf + g_bias + g_inputs + g_consts

    @torch.no_grad()
    def write_back(self, params: Params) -> None:
        """Copy what this copy holds apart from ``params`` into it: compressed values into the dense
        weights (masked entries exactly 0); with a reduction, every live block, constant input and bias."""
        r = self.reduction
        if r is None:
            for layer, w in zip(self.layers, params.weights):
                if layer.compressed:
                    layer.pattern.scatter(layer.values, w)
            return
        def write(i: int, part: _Layer, w: torch.Tensor, inputs: str) -> None:
            if part.compressed:  # only the unmasked entries: the others are 0 in w already
                r.write_block(i, part.values, w, inputs, entries=part.pattern.flat)
            else:
                r.write_block(i, part.weight, w, inputs)

        for i, (layer, w, b) in enumerate(zip(self.layers, params.weights, params.biases)):
            write(i, layer, w, "live")
            r.write_units(i + 1, layer.bias, b)
            if self.inputs[i] is not None:
                write(i, self.inputs[i], w, "constant")
                r.write_units(i, self.const_biases[i], params.biases[i - 1], "constant")

    def export(self, params: Params) -> Params:
        """A copy of ``params`` holding the current values."""
        out = params.clone()
        self.write_back(out)
        return out

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_eval(self, x: torch.Tensor, mod: Modulation, stab: StabiliserConfig, noise: NoiseSource | None,
                     biased: BiasedNoise | None, magnitudes: list[torch.Tensor] | None) -> torch.Tensor:
        """Logits ``[P, N, C]`` (no autograd; the same operations in the same order as the dense path)."""
        scale, shift = hidden_terms(mod.check(x.shape[0]), stab)
        n_patients, n = x.shape[0], x.shape[1]
        sigmas = ([mod.noise_sigma] if mod.noisy else []) + ([biased.sigma] if biased else [])
        drawn = [_drawn(mod.noise_sigma)] * mod.noisy + [None] * (biased is not None)
        lift = _lift(mod, biased, stab) if biased is not None else 0.0
        h = x.transpose(1, 2).contiguous()
        for i, layer in enumerate(self.layers[:-1]):
            units = layer.bias.shape[1]
            z = layer.forward(h, _buffer(f"eval/h{i % 2}", (n_patients, units, n), x))
            if magnitudes is not None:
                h, _ = sparse.post_activation(z, mod.activation, 1.0, 0.0, deriv=False, kind=self.kind)
                magnitudes.append(_times(h, _nominal(mod)).abs().mean(dim=(1, 2)))
                if not sigmas:
                    sparse.scale_shift_(h, scale, shift)
            elif sigmas:
                h, _ = sparse.post_activation(z, mod.activation, 1.0, 0.0, deriv=False, kind=self.kind)
            else:  # act, * scale, - shift in one pass
                h, _ = sparse.post_activation(z, mod.activation, scale, shift, deriv=False, kind=self.kind)
            for k, sigma in enumerate(sigmas):  # each [P, N, units] in the dense path's order
                draw = noise.fill_(_buffer("eval/noise", (n_patients, n, units), x), drawn[k])
                last = k == len(sigmas) - 1
                sparse.add_noise_t(h, draw, sigma, lift if last else 0.0, scale if last else 1.0,
                                   shift if last else 0.0, kind=self.kind)
        return self.layers[-1].forward(h).transpose(1, 2)


def _reduction(params: Params) -> reduction.Reduction | None:
    """The reduction of ``params`` when it pays (:attr:`EngineConfig.reduce_max_work`), else ``None``."""
    if len(params.weights) < 2:
        return None
    r = reduction.Reduction(params.masks)
    if min(index.shape[1] for index, _ in r.live) == 0 or r.work_fraction() > ENGINE.reduce_max_work:
        return None
    return r


def _signature(params: Params, kind: str) -> tuple:
    return (kind, ENGINE, tuple((id(t), t._version) for t in params.weights + params.biases + params.masks))


def _patients(params: Params, start: int, stop: int) -> Params:
    """Patients ``start:stop`` of ``params`` as views (no copy)."""
    return Params(*([t[start:stop] for t in group] for group in (params.weights, params.biases, params.masks)))


def _eval_nets(params: Params, size: int) -> list[tuple[int, _Net]]:
    """The engine copies of ``params`` for evaluation, one per group of at most ``size`` patients
    (with the group's first patient), cached on ``params`` until one of its tensors changes."""
    key = (_signature(params, ENGINE.sparse_backend or sparse.backend(params.weights[0].device)), size)
    cached = getattr(params, "_engine_nets", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    n = params.n_patients
    if size >= n:
        nets = [(0, _Net(params))]
    else:
        nets = [(p0, _Net(_patients(params, p0, min(p0 + size, n)))) for p0 in range(0, n, size)]
    params._engine_nets = (key, nets)
    return nets


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: torch.Tensor | float,
    batch_size: int,
    schedule: Callable[[int], Modulation],
    stab: StabiliserConfig,
    shuffle: Sequence[torch.Generator],
    noise: NoiseSource | None = None,
    snapshots: Sequence[int] = (),
    on_epoch: Callable[[int], None] | None = None,
) -> dict[int, Params]:
    """Train ``params`` in place with a fresh Adam; masked weights stay exactly 0.

    Large layers at most :attr:`EngineConfig.sparse_max_density` dense train compressed (only their
    unmasked weights exist, so a pruned weight cannot revive); other masked layers are re-masked
    after every step.

    Parameters
    ----------
    schedule
        Epoch (0-based) -> the modulation used for that epoch's training steps.
    shuffle
        One generator per patient for the per-epoch permutation.
    snapshots
        Epoch counts after which a copy of the parameters is kept (0 = before training).
    on_epoch
        Called with the finished epoch's number (1-based), e.g. to advance a progress bar.

    Returns
    -------
    dict
        Epoch count -> a copy of the parameters at that point, for each of ``snapshots``.

    Raises
    ------
    NonFiniteError
        When any patient's loss becomes NaN or inf, or its weights do after the last step.
    """
    n = x.shape[1]
    out: dict[int, Params] = {}
    if 0 in snapshots:
        out[0] = params.clone()
    # Constant units stay constant only without internal noise (drawn per unit and sample); the
    # reduction saves CPU work, a GPU runs the full network.
    reduce = (ENGINE.reduce_units and x.device.type == "cpu"
              and not any(schedule(e).noisy for e in range(epochs)))
    net = _Net(params, reduce=reduce)
    leaves, segments = net.leaves()
    opt = BatchedAdam(leaves, lr, segments=segments)
    xt = x.transpose(1, 2).contiguous()  # [P, in, N]: one gather per step gives the transposed batch
    try:
        for epoch in range(epochs):
            mod = schedule(epoch)
            total = torch.zeros(params.n_patients, dtype=torch.float64, device=x.device)
            for idx in epoch_batches(n, batch_size, shuffle, x.device):
                xb = torch.gather(xt, 2, idx.unsqueeze(1).expand(-1, xt.shape[1], -1))
                loss, grads = net.step(xb, torch.gather(y, 1, idx), mod, stab, noise)
                opt.step(grads)
                net.apply_masks()
                total += loss
            bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
            if bad:
                raise NonFiniteError(bad, epoch)
            if epoch + 1 in snapshots:
                out[epoch + 1] = net.export(params)
            if on_epoch is not None:
                on_epoch(epoch + 1)
    finally:
        net.write_back(params)
    if epochs > 0:  # a blow-up on the very last step shows in no loss: check what that step left
        with torch.no_grad():
            last = batch_loss(params, x[:, :batch_size], y[:, :batch_size], schedule(epochs - 1).replace(
                noise_sigma=0.0), stab, None)
        bad = (~torch.isfinite(last)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(bad, epochs - 1)
    return out
