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
    """P patients sharing a schedule: stacked parameters, their data, and a shared modulation.

    Parameters
    ----------
    specs
        The patients, in batch order.
    protocol
        The study protocol (architecture, task, stabiliser, batch size, device).
    params
        Stacked parameters; freshly initialised from each patient's ``init`` stream if omitted.
    modulation
        The current neuromodulatory state (gain, damping, activation, noise, protection).

    Examples
    --------
    >>> from virtualpatient import PatientBatch, PatientSpec, Protocol
    >>> protocol = Protocol()
    >>> batch = PatientBatch([PatientSpec(i, protocol.seed) for i in range(3)], protocol)
    >>> len(batch), tuple(batch.params.weights[1].shape)
    (3, (3, 512, 512))
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
        data = None
        if self._data is not None:
            idx = torch.as_tensor(list(positions), device=self.device)
            data = TaskData(*(getattr(self._data, f).index_select(0, idx) for f in TaskData.__dataclass_fields__))
        return PatientBatch([self.specs[i] for i in positions], self.protocol,
                            self.params.select(positions), self.modulation, data)

    def split(self) -> list[VirtualPatient]:
        """One :class:`VirtualPatient` per patient (copies)."""
        return [VirtualPatient.from_batch(self.select([i])) for i in range(len(self))]

    @classmethod
    def stack(cls, batches: Sequence[PatientBatch]) -> PatientBatch:
        """Concatenate batches that share protocol and modulation."""
        first = batches[0]
        if any(b.modulation != first.modulation for b in batches):
            raise ValueError("only batches with the same modulation can be stacked")
        specs = [s for b in batches for s in b.specs]
        return cls(specs, first.protocol, Params.cat([b.params for b in batches]), first.modulation)

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
        schedule = schedule or (lambda epoch: mod)
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

        ``mod`` overrides the current modulation; ``input_sd`` adds N(0, input_sd^2) to the inputs;
        noise comes from ``noise`` or the named stream.
        """
        if test not in ("standard", "clean", "train"):
            raise ValueError(f"unknown test set {test!r} (standard, clean or train)")
        x, y = getattr(self.data, f"{test}_x"), getattr(self.data, f"{test}_y")
        mod = mod or self.modulation
        if noise is None and (input_sd > 0 or mod.noise_sigma > 0 or biased is not None):
            if noise_stream is None:
                raise ValueError("a noisy test needs a noise stream")
            noise = self.noise(noise_stream)
        if input_sd > 0:
            x = x + input_sd * noise(x.shape, x.device)
        return network.accuracy(self.params, x, y, mod, self.protocol.stabiliser, noise=noise, biased=biased)

    @torch.no_grad()
    def activation_magnitude(self, mod: Modulation | None = None) -> torch.Tensor:
        """Mean ``|act(W h + b) * damping * gain|`` over hidden layers, standard set, no noise (fact 6)."""
        mod = (mod or self.modulation).replace(noise_sigma=0.0, protection=0.0)
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
        params = Params(list(state["weights"]), list(state["biases"]), list(state["masks"]))
        specs = [PatientSpec.from_dict(s) for s in state["specs"]]
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
