"""Virtual patients: networks with weights, masks, modulation and a mood stabiliser.

:class:`PatientBatch` holds P patients that follow one schedule, stacked along a leading axis, and
is what the engine trains; :class:`VirtualPatient` is a batch of one, for scripting and inspecting
a single patient. Both have the same methods, so there is one code path.

Examples
--------
>>> from virtualpatient import Protocol, VirtualPatient
>>> protocol = Protocol().replace(baseline=dict(epochs=1))
>>> patient = VirtualPatient(0, protocol)          # doctest: +SKIP
>>> patient.train_baseline()                       # doctest: +SKIP
>>> patient.prune()                                # doctest: +SKIP
>>> round(float(patient.sparsity()[0]), 1)         # doctest: +SKIP
95.0
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

from virtualpatient import network, plasticity
from virtualpatient.cohort import PatientSpec
from virtualpatient.network import BiasedNoise, Modulation, NoiseSource, Params
from virtualpatient.task import TaskData, make_task_data, stack_task_data

__all__ = ["PatientBatch", "VirtualPatient"]


class PatientBatch:
    """P patients sharing a schedule: stacked parameters, their data, and their modulation.

    Parameters
    ----------
    specs
        The patients, in batch order.
    protocol
        The study protocol (architecture, task, stabiliser, batch size, device).
    params
        Stacked parameters; freshly initialised from each patient's ``init`` stream if omitted.
    modulation
        The current neuromodulatory state (gain, damping, activation, noise, protection); gain,
        damping, noise and protection are shared floats or one value per patient
        (:class:`~virtualpatient.network.Modulation`). The patients' ``gain_sensitivity`` and
        ``protection_scale`` covariates act on top of it (:meth:`effective_modulation`).

    Examples
    --------
    >>> from virtualpatient import PatientBatch, PatientSpec, Protocol
    >>> protocol = Protocol()
    >>> batch = PatientBatch([PatientSpec(i, protocol.seed) for i in range(3)], protocol)
    >>> len(batch), tuple(batch.params.weights[1].shape)
    (3, (3, 512, 512))
    >>> batch.modulation = batch.modulation.replace(gain=[1.0, 1.25, 1.6])   # one gain per patient
    >>> batch.select([2]).modulation.gain
    1.6
    """

    def __init__(self, specs: Sequence[PatientSpec], protocol, params: Params | None = None,
                 modulation: Modulation | None = None, data: TaskData | None = None) -> None:
        if not specs:
            raise ValueError("a patient batch needs at least one patient")
        self.specs = list(specs)
        self.protocol = protocol
        self.device = torch.device(protocol.device)
        if params is None:
            params = network.init_params(protocol.network.layer_sizes, self.generators("init", device="cpu"))
        self.params = params.to(self.device)
        if self.params.n_patients != len(self.specs):
            raise ValueError(f"{len(self.specs)} patients but parameters for {self.params.n_patients}")
        self.modulation = modulation or Modulation()
        self._data = data

    @property
    def modulation(self) -> Modulation:
        """The (nominal) modulation: shared values, or one per patient of this batch."""
        return self._modulation

    @modulation.setter
    def modulation(self, value: Modulation) -> None:
        if not isinstance(value, Modulation):
            raise TypeError(f"modulation must be a Modulation, got {type(value).__name__}")
        self._modulation = value.check(len(self.specs))

    def effective_modulation(self, mod: Modulation | None = None) -> Modulation:
        """What the engine sees: ``mod`` (default: :attr:`modulation`) with each patient's state
        covariates applied.

        A patient's ``gain_sensitivity`` ``s`` makes its gain ``1 + s (gain - 1)``; its
        ``protection_scale`` ``c`` makes its protection ``c * protection``. A patient without them
        (or with 1) keeps the value as it is, and a batch where no patient has them gets ``mod``
        itself, so the engine's shared-value path and its numbers are unchanged.

        Examples
        --------
        >>> from virtualpatient import Protocol
        >>> p = Protocol()
        >>> batch = PatientBatch([PatientSpec(0, 0, {"gain_sensitivity": 0.5}), PatientSpec(1, 0)], p)
        >>> batch.effective_modulation(Modulation(gain=1.6)).gain
        (1.3, 1.6)
        """
        mod = (mod or self.modulation).check(len(self))
        sensitivity = [_unset_is_one(v) for v in self.covariate("gain_sensitivity")]
        response = [_unset_is_one(v) for v in self.covariate("protection_scale")]
        changes: dict[str, list[float]] = {}
        if any(s != 1.0 for s in sensitivity):
            changes["gain"] = [g if s == 1.0 else 1.0 + s * (g - 1.0)
                               for g, s in zip(mod.values("gain", len(self)), sensitivity)]
        if any(c != 1.0 for c in response):
            changes["protection"] = [p if c == 1.0 else c * p
                                     for p, c in zip(mod.values("protection", len(self)), response)]
        return mod.replace(**changes) if changes else mod

    # -- identity and randomness -------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.specs)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(patients={[s.index for s in self.specs]}, modulation={self.modulation})"

    def generators(self, stream: str, device: str | torch.device = "cpu") -> list[torch.Generator]:
        """One generator per patient for the named stream."""
        return [s.generator(stream, device) for s in self.specs]

    def noise(self, stream: str) -> NoiseSource:
        """A per-patient noise source for the named stream."""
        return NoiseSource(self.generators(stream))

    def covariate(self, name: str) -> list[float]:
        """Each patient's value of covariate ``name`` (NaN where it has none)."""
        return [s.covariates.get(name, math.nan) for s in self.specs]

    @property
    def data(self) -> TaskData:
        """The patients' task data, regenerated from their streams on first use."""
        if self._data is None:
            self._data = stack_task_data([make_task_data(s, self.protocol.task) for s in self.specs]).to(self.device)
        return self._data

    # -- copies ------------------------------------------------------------------------------
    def clone(self) -> PatientBatch:
        """An independent copy (parameters copied, data shared: it is never modified)."""
        return PatientBatch(self.specs, self.protocol, self.params.clone(), self.modulation, self._data)

    def with_modulation(self, modulation: Modulation) -> PatientBatch:
        """A view with another modulation that shares parameters and data (for tests off drug)."""
        return PatientBatch(self.specs, self.protocol, self.params, modulation, self._data)

    def select(self, positions: Sequence[int]) -> PatientBatch:
        """The sub-batch of the given positions (a copy), with their per-patient modulation."""
        positions = list(positions)
        data = None
        if self._data is not None:
            idx = torch.as_tensor(positions, device=self.device)
            data = TaskData(*(getattr(self._data, f).index_select(0, idx) for f in TaskData.__dataclass_fields__))
        return PatientBatch([self.specs[i] for i in positions], self.protocol,
                            self.params.select(positions), self.modulation.take(positions), data)

    def split(self) -> list[VirtualPatient]:
        """One :class:`VirtualPatient` per patient (copies)."""
        return [VirtualPatient.from_batch(self.select([i])) for i in range(len(self))]

    @classmethod
    def stack(cls, batches: Sequence[PatientBatch]) -> PatientBatch:
        """Concatenate batches that share protocol and activation; the other modulation values
        become per-patient where the batches differ (shared where they agree).

        Raises
        ------
        ValueError
            For no batches, or batches with different activations.
        """
        if not batches:
            raise ValueError("nothing to stack")
        first = batches[0]
        specs = [s for b in batches for s in b.specs]
        mod = Modulation.cat([(b.modulation, len(b)) for b in batches])
        return cls(specs, first.protocol, Params.cat([b.params for b in batches]), mod)

    # -- plasticity --------------------------------------------------------------------------
    def learning_rates(self, base: float, scaled: bool = True) -> torch.Tensor:
        """``base`` per patient, times each patient's ``lr_scale`` covariate when ``scaled``."""
        scale = [s.covariates.get("lr_scale", 1.0) if scaled else 1.0 for s in self.specs]
        return torch.tensor(scale, dtype=torch.float32, device=self.device) * base

    def train(self, epochs: int, lr: float, stream: str, *,
              schedule: Callable[[int], Modulation] | None = None, snapshots: Sequence[int] = (),
              scale_lr: bool = True, on_epoch: Callable[[int], None] | None = None) -> dict[int, Params]:
        """Train on the training set with a fresh Adam; masks stay locked.

        Parameters
        ----------
        stream
            Name of the random stream for shuffling (and internal noise, from ``stream + '/noise'``).
        schedule
            Epoch -> modulation; default: the current modulation throughout.
        snapshots
            Epoch counts at which to keep a copy of the parameters (nested maintenance).
        """
        mod = self.modulation
        nominal = schedule or (lambda epoch: mod)
        schedule = lambda epoch: self.effective_modulation(nominal(epoch))  # noqa: E731
        return network.train(
            self.params, self.data.train_x, self.data.train_y, epochs=epochs,
            lr=self.learning_rates(lr, scale_lr), batch_size=self.protocol.baseline.batch_size,
            schedule=schedule, stab=self.protocol.stabiliser, shuffle=self.generators(stream),
            noise=self.noise(f"{stream}/noise"), snapshots=snapshots, on_epoch=on_epoch,
        )

    def train_baseline(self, on_epoch: Callable[[int], None] | None = None) -> None:
        """The healthy network: baseline epochs at the baseline learning rate (Methods)."""
        cfg = self.protocol.baseline
        self.train(cfg.epochs, cfg.lr, "baseline", scale_lr=False, on_epoch=on_epoch)

    def prune(self, fractions: Sequence[float] | None = None) -> None:
        """The depressive lesion: magnitude pruning to each patient's ``prune_fraction`` (fact 7)."""
        if fractions is None:
            default = self.protocol.pruning.fraction
            fractions = [f if not math.isnan(f) else default for f in self.covariate("prune_fraction")]
        if self.protocol.pruning.layers == "all":
            plasticity.prune_per_layer(self.params, fractions)
        else:
            plasticity.prune_global(self.params, fractions, layers=self.lesion_layers)

    @property
    def lesion_layers(self) -> list[int]:
        """Indices of the weight matrices the lesion prunes: all four, or the hidden ones (text's reading)."""
        n = len(self.protocol.network.layer_sizes) - 1
        return list(range(n if self.protocol.pruning.layers == "all" else n - 1))

    def sparsity(self) -> torch.Tensor:
        """Per-patient sparsity in percent over all weight matrices."""
        return self.params.sparsity()

    # -- evaluation --------------------------------------------------------------------------
    def accuracy(self, test: str = "standard", *, mod: Modulation | None = None, noise_stream: str | None = None,
                 input_sd: float = 0.0, biased: BiasedNoise | None = None,
                 noise: NoiseSource | None = None) -> torch.Tensor:
        """Per-patient accuracy (percent) on the ``"standard"`` or ``"clean"`` test set.

        ``mod`` overrides the current (nominal) modulation; the patients' state covariates act on
        top of either (:meth:`effective_modulation`). ``input_sd`` adds N(0, input_sd^2) to the
        inputs; noise comes from ``noise`` or the named stream.
        """
        if test not in ("standard", "clean", "train"):
            raise ValueError(f"unknown test set {test!r} (standard, clean or train)")
        x, y = getattr(self.data, f"{test}_x"), getattr(self.data, f"{test}_y")
        mod = self.effective_modulation(mod)
        if noise is None and (input_sd > 0 or mod.noisy or biased is not None):
            if noise_stream is None:
                raise ValueError("a noisy test needs a noise stream")
            noise = self.noise(noise_stream)
        if input_sd > 0:
            x = x + input_sd * noise(x.shape, x.device)
        return network.accuracy(self.params, x, y, mod, self.protocol.stabiliser, noise=noise, biased=biased)

    @torch.no_grad()
    def activation_magnitude(self, mod: Modulation | None = None) -> torch.Tensor:
        """Mean ``|act(W h + b) * damping * gain|`` over hidden layers, standard set, no noise (fact 6)."""
        mod = self.effective_modulation((mod or self.modulation).replace(noise_sigma=0.0, protection=0.0))
        mags: list[torch.Tensor] = []
        network.forward(self.params, self.data.standard_x, mod, self.protocol.stabiliser, magnitudes=mags)
        return torch.stack(mags).mean(0)

    # -- persistence -------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild the batch exactly (data are regenerated from the specs)."""
        return {
            "specs": [s.to_dict() for s in self.specs],
            "weights": [w.detach().cpu() for w in self.params.weights],
            "biases": [b.detach().cpu() for b in self.params.biases],
            "masks": [m.detach().cpu() for m in self.params.masks],
            "modulation": vars(self.modulation).copy(),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], protocol) -> PatientBatch:
        """Rebuild a batch from :meth:`state_dict` (per-patient modulation included).

        Raises
        ------
        ValueError
            When the state is incomplete or holds another architecture than ``protocol``'s.
        """
        missing = [k for k in ("specs", "weights", "biases", "masks", "modulation") if k not in state]
        if missing:
            raise ValueError(f"not a patient state: missing {', '.join(missing)}")
        params = Params(list(state["weights"]), list(state["biases"]), list(state["masks"]))
        specs = [PatientSpec.from_dict(s) for s in state["specs"]]
        check_architecture(params, len(specs), protocol.network.layer_sizes)
        return cls(specs, protocol, params, Modulation(**state["modulation"]))

    def load_state_dict(self, state: dict[str, Any]) -> None:
        other = type(self).from_state_dict(state, self.protocol)
        if [s.index for s in other.specs] != [s.index for s in self.specs]:
            raise ValueError("state belongs to other patients")
        self.params, self.modulation = other.params, other.modulation

    def save(self, path) -> None:
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path, protocol) -> PatientBatch:
        return cls.from_state_dict(torch.load(path, weights_only=True), protocol)


def _unset_is_one(value: float) -> float:
    return 1.0 if math.isnan(value) else value


def _sizes(layer_sizes: Sequence[int]) -> str:
    return "-".join(str(s) for s in layer_sizes)


def check_architecture(params: Params, n_patients: int, layer_sizes: Sequence[int]) -> None:
    """Check that stacked parameters are ``n_patients`` networks of ``layer_sizes``.

    Raises
    ------
    ValueError
        Naming the architecture found and the one expected.
    """
    groups = (params.weights, params.biases, params.masks)
    if len({len(g) for g in groups}) != 1 or not params.weights:
        raise ValueError("a patient state needs as many weights, biases and masks, at least one of each")
    found = [int(params.weights[0].shape[-1])] + [int(w.shape[-2]) for w in params.weights] \
        if all(w.ndim == 3 for w in params.weights) else None
    ok = found == list(layer_sizes)
    for w, b, m, fan_in, fan_out in zip(*groups, layer_sizes[:-1], layer_sizes[1:]):
        ok = ok and tuple(w.shape) == tuple(m.shape) == (n_patients, fan_out, fan_in) \
            and tuple(b.shape) == (n_patients, fan_out)
    if not ok:
        what = _sizes(found) if found else "tensors of shapes " + str([tuple(w.shape) for w in params.weights])
        raise ValueError(f"the state holds {what} networks ({len(params.weights)} weight matrices) for "
                         f"{n_patients} patient(s), but the protocol's architecture is {_sizes(layer_sizes)}")


class VirtualPatient(PatientBatch):
    """A single virtual patient (a batch of one).

    Parameters
    ----------
    index
        The patient's position in its cohort; with the study seed it fixes all its randomness.
    protocol
        The study protocol; default :class:`~virtualpatient.protocol.Protocol` ().

    Examples
    --------
    >>> from virtualpatient import Protocol, VirtualPatient
    >>> p = VirtualPatient(3, Protocol())
    >>> len(p), p.sparsity().item()
    (1, 0.0)
    """

    def __init__(self, index: int | PatientSpec = 0, protocol=None, **kwargs: Any) -> None:
        if protocol is None:
            from virtualpatient.protocol import Protocol

            protocol = Protocol()
        spec = index if isinstance(index, PatientSpec) else PatientSpec(index, protocol.seed)
        super().__init__([spec], protocol, **kwargs)

    @classmethod
    def from_batch(cls, batch: PatientBatch) -> VirtualPatient:
        if len(batch) != 1:
            raise ValueError(f"a VirtualPatient is one patient; this batch has {len(batch)}")
        return cls(batch.specs[0], batch.protocol, params=batch.params, modulation=batch.modulation,
                   data=batch._data)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], protocol) -> VirtualPatient:
        return cls.from_batch(PatientBatch.from_state_dict(state, protocol))

    def clone(self) -> VirtualPatient:
        return VirtualPatient.from_batch(super().clone())

    @property
    def spec(self) -> PatientSpec:
        return self.specs[0]
