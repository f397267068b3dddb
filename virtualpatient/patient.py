"""Virtual patients: networks with weights, masks, modulation and a mood stabiliser.

:class:`PatientBatch` holds P patients stacked along a leading axis and is what the engine trains;
its modulation holds gain, damping, noise and protection shared or per patient, so patients of one
batch may be in different states. :class:`VirtualPatient` is the object a user scripts with: one
patient that trains, is lesioned, treated and assessed, records every action in a tidy history,
and saves to one file; the batch of one behind it is the engine's business.

Examples
--------
>>> from virtualpatient import Protocol, VirtualPatient
>>> patient = VirtualPatient(0, Protocol(), covariates={"gain_sensitivity": 0.5})
>>> patient.modulate(gain=1.6)
>>> patient.state["gain"], patient.modulation.gain
(1.3, 1.6)
"""

from __future__ import annotations

import contextlib
import math
import numbers
import pickle
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd
import torch

from virtualpatient import network, plasticity
from virtualpatient.assessments import ACUTE, assess
from virtualpatient.cohort import COVARIATES, PatientSpec, check_covariates
from virtualpatient.engine import batched
from virtualpatient.network import BiasedNoise, Modulation, NoiseSource, Params
from virtualpatient.schema import COLUMNS
from virtualpatient.task import TaskData, make_task_data, stack_task_data

if TYPE_CHECKING:
    from virtualpatient.treatments import Treatment

__all__ = ["HISTORY_COLUMNS", "PatientBatch", "RESULT_COLUMNS", "VirtualPatient", "check_architecture"]


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
        return batched.train(
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
        return batched.accuracy(self.params, x, y, mod, self.protocol.stabiliser, noise=noise, biased=biased)

    @torch.no_grad()
    def activation_magnitude(self, mod: Modulation | None = None) -> torch.Tensor:
        """Mean ``|act(W h + b) * damping * gain|`` over hidden layers, standard set, no noise (fact 6)."""
        mod = self.effective_modulation((mod or self.modulation).replace(noise_sigma=0.0, protection=0.0))
        mags: list[torch.Tensor] = []
        batched.forward(self.params, self.data.standard_x, mod, self.protocol.stabiliser, magnitudes=mags)
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


#: The columns of a trial's results table (``docs/results-schema.md``) that a history shares.
RESULT_COLUMNS = COLUMNS
#: A patient's history: the results columns and covariates, then the action counter and its name.
HISTORY_COLUMNS = [*RESULT_COLUMNS, *COVARIATES, "action", "event"]
#: The format tag of a saved :class:`VirtualPatient` file.
SAVE_FORMAT = "virtualpatient.VirtualPatient/1"

#: The noise stream of :meth:`VirtualPatient.assess` per phase; after a treatment ``"<arm>/assess"``.
#: These are the trial's streams, so a scripted patient's assessments equal the trial's numbers.
_ASSESS_STREAMS = {"initial": "untreated/initial", "baseline": "untreated/baseline", "pruned": "untreated/assess"}


class VirtualPatient(PatientBatch):
    """One virtual patient to script with: train, lesion, treat, assess, inspect, save.

    Every action (:meth:`train_baseline`, :meth:`train`, :meth:`lesion` / :meth:`prune`,
    :meth:`treat`, :meth:`modulate`, :meth:`assess`) appends rows to :attr:`history`, a tidy
    table with the trial's results columns plus an ``action`` counter and the action's name
    (``event``). Its random streams are the trial's, so a scripted patient computes what the same
    patient computes inside a trial or a batch (up to float rounding of batched products).

    It is a :class:`PatientBatch` of one: the engine's methods (``params``, ``accuracy``, ...)
    work on it too; a method that the engine calls from inside an action (a treatment's training)
    records nothing of its own.

    Parameters
    ----------
    index
        The patient's position in its cohort (with the study seed it fixes all its randomness), or
        a ready :class:`~virtualpatient.cohort.PatientSpec`.
    protocol
        The study protocol; default :class:`~virtualpatient.protocol.Protocol` ().
    covariates
        The patient's covariates (``prune_fraction``, ``gain_sensitivity``, ...; see
        :mod:`virtualpatient.cohort`), when ``index`` is a number.

    Examples
    --------
    >>> from virtualpatient import Protocol, VirtualPatient
    >>> protocol = Protocol(network={"layer_sizes": (2, 32, 32, 16, 4)}, baseline={"epochs": 1},
    ...                     task={"n_train": 512, "n_standard": 200, "n_clean": 100},
    ...                     arms={"ketamine": {"epochs": 1, "score_batches": 2}})
    >>> patient = VirtualPatient(0, protocol)
    >>> patient.train_baseline()
    >>> patient.lesion()
    >>> patient.treat("ketamine")
    >>> rows = patient.assess(["sparsity", "gain", "clean"])
    >>> patient.state["gain"], round(patient.state["sparsity"], 1)
    (1.25, 47.4)
    >>> patient.history[["action", "event", "phase", "metric"]].tail(3).values.tolist()
    [[3, 'assess', 'acute', 'sparsity'], [3, 'assess', 'acute', 'gain'], [3, 'assess', 'acute', 'accuracy']]
    >>> [tuple(w.shape) for w in patient.weights]
    [(32, 2), (32, 32), (16, 32), (4, 16)]
    """

    def __init__(self, index: int | PatientSpec = 0, protocol=None, *, covariates: dict[str, float] | None = None,
                 **kwargs: Any) -> None:
        from virtualpatient.protocol import Protocol

        if protocol is None:
            protocol = Protocol()
        if not isinstance(protocol, Protocol):
            raise TypeError(f"protocol must be a Protocol, got {type(protocol).__name__}")
        if isinstance(index, PatientSpec):
            if covariates is not None:
                raise ValueError("give covariates in the PatientSpec or as covariates=, not both")
            spec = index
        elif isinstance(index, numbers.Integral) and not isinstance(index, bool):
            spec = PatientSpec(int(index), protocol.seed, check_covariates(covariates))
        else:
            raise TypeError(f"index must be an int or a PatientSpec, got {type(index).__name__}")
        super().__init__([spec], protocol, **kwargs)
        self.arm = "untreated"
        self.phase = "initial"
        self._history: list[dict[str, Any]] = []
        self._actions = 0
        self._depth = 0

    def __repr__(self) -> str:
        return f"VirtualPatient(index={self.spec.index}, arm={self.arm!r}, phase={self.phase!r}, state={self.state})"

    @classmethod
    def from_batch(cls, batch: PatientBatch) -> VirtualPatient:
        """The one patient of ``batch`` (sharing its parameters), with an empty history."""
        if len(batch) != 1:
            raise ValueError(f"a VirtualPatient is one patient; this batch has {len(batch)}")
        return cls(batch.specs[0], batch.protocol, params=batch.params, modulation=batch.modulation,
                   data=batch._data)

    def clone(self) -> VirtualPatient:
        """An independent copy, history included."""
        out = VirtualPatient.from_batch(super().clone())
        out._restore(self._history, self.arm, self.phase, self._actions)
        return out

    @property
    def spec(self) -> PatientSpec:
        """Index, study seed and covariates."""
        return self.specs[0]

    # -- inspection ----------------------------------------------------------------------------
    @property
    def weights(self) -> list[torch.Tensor]:
        """The weight matrices ``[out, in]`` (copies; masked entries are 0)."""
        return [w[0].detach().clone() for w in self.params.weights]

    @property
    def biases(self) -> list[torch.Tensor]:
        """The bias vectors ``[out]`` (copies)."""
        return [b[0].detach().clone() for b in self.params.biases]

    @property
    def masks(self) -> list[torch.Tensor]:
        """The 0/1 masks of :attr:`weights` (copies)."""
        return [m[0].detach().clone() for m in self.params.masks]

    @property
    def state(self) -> dict[str, Any]:
        """The state the network is in, as plain numbers: ``gain``, ``damping``, ``noise_sigma`` and
        ``protection`` as handed to the engine (covariates applied: :meth:`effective_modulation`;
        :attr:`modulation` holds the nominal values; the gain is before the stabiliser's cap,
        :func:`~virtualpatient.stabiliser.effective_gain`), ``activation``, and ``sparsity`` in percent."""
        mod = self.effective_modulation()
        out: dict[str, Any] = {name: mod.values(name)[0] for name in ("gain", "damping", "noise_sigma", "protection")}
        out["activation"] = mod.activation
        out["sparsity"] = float(self.sparsity()[0])
        return out

    @property
    def history(self) -> pd.DataFrame:
        """Every action's rows, in order: :data:`HISTORY_COLUMNS` (a copy)."""
        frame = pd.DataFrame(self._history, columns=HISTORY_COLUMNS)
        return frame.astype({"patient": int, "noise_sigma": float, "maintenance_epochs": float, "step": float,
                             "value": float, "action": int, **{c: float for c in COVARIATES}})

    # -- actions -------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inside(self) -> Iterator[bool]:
        """Yields whether this is a top-level action (what the engine calls from inside is not one)."""
        self._depth += 1
        try:
            yield self._depth == 1
        finally:
            self._depth -= 1

    def _record(self, event: str, rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
        """Append ``rows`` as one action; fills in the columns they lack."""
        covs = {c: float(self.spec.covariates.get(c, math.nan)) for c in COVARIATES}
        out = []
        for r in rows:
            row = {"patient": self.spec.index, "arm": self.arm, "phase": self.phase, "condition": "",
                   "noise_sigma": math.nan, "maintenance_epochs": math.nan, "step": math.nan, **r, **covs,
                   "action": self._actions, "event": event}
            row["value"] = float(row["value"])
            out.append(row)
        self._history += out
        self._actions += 1
        return out

    def _row(self, metric: str, value: float, condition: str = "") -> dict[str, Any]:
        return {"metric": metric, "condition": condition, "value": float(value)}

    def train_baseline(self, on_epoch: Callable[[int], None] | None = None) -> None:
        """Train the healthy network (the trial's baseline: its epochs, learning rate and stream).

        Records ``epochs`` (phase ``baseline``).
        """
        with self._inside() as top:
            super().train_baseline(on_epoch)
            if top:
                self.phase = "baseline"
                self._record("train_baseline", [self._row("epochs", self.protocol.baseline.epochs)])

    def train(self, epochs: int, lr: float, stream: str, **kwargs: Any) -> dict[int, Params]:
        """Train ``epochs`` epochs at ``lr`` (see :meth:`PatientBatch.train`); records ``epochs``
        with the stream as condition."""
        with self._inside() as top:
            out = super().train(epochs, lr, stream, **kwargs)
            if top:
                self._record("train", [self._row("epochs", epochs, stream)])
        return out

    def prune(self, fractions: Sequence[float] | None = None) -> None:
        """The lesion (see :meth:`PatientBatch.prune`); records ``sparsity`` (phase ``pruned``)."""
        with self._inside() as top:
            super().prune(fractions)
            if top:
                self.phase = "pruned"
                self._record("lesion", [self._row("sparsity", self.sparsity()[0])])

    def lesion(self, fraction: float | None = None) -> None:
        """Prune to ``fraction`` (default: the patient's ``prune_fraction`` covariate, else the protocol's)."""
        if fraction is not None and (isinstance(fraction, bool) or not isinstance(fraction, numbers.Real)):
            raise TypeError(f"fraction must be a number, got {type(fraction).__name__}")
        if fraction is not None and not 0.0 <= fraction < 1.0:
            raise ValueError(f"fraction must lie in [0, 1), got {fraction}")
        self.prune(None if fraction is None else [float(fraction)])

    def treat(self, treatment: str | Treatment, arm: str | None = None,
              on_epoch: Callable[[int], None] | None = None) -> None:
        """Run a treatment's acute course from the current state; records ``sparsity`` and ``gain``
        (phase ``acute``).

        Parameters
        ----------
        treatment
            An arm of the protocol (its parameters), a registered treatment name (its defaults),
            or a :class:`~virtualpatient.treatments.Treatment`.
        arm
            The arm's name, which names its random streams (``"<arm>/..."``) and its history rows;
            default: ``treatment`` itself, or the treatment's registered name.
        """
        from virtualpatient.names import check_name
        from virtualpatient.treatments import Treatment, build_treatment

        if isinstance(treatment, str):
            name = arm or treatment
            chosen = self.protocol.arms.get(treatment) or build_treatment(treatment, {})
        elif isinstance(treatment, Treatment):
            name = arm or treatment.registry_name or type(treatment).__name__
            chosen = treatment
        else:
            raise TypeError(f"treatment must be an arm name or a Treatment, got {type(treatment).__name__}")
        check_name(name, "arm")
        with self._inside():
            chosen.apply(self, name, on_epoch)
        self.arm, self.phase = name, "acute"
        self._record("treat", [self._row("sparsity", self.sparsity()[0]),
                               self._row("gain", self.effective_modulation().values("gain")[0])])

    def modulate(self, **changes: Any) -> None:
        """Change the modulation (``gain``, ``damping``, ``activation``, ``noise_sigma``,
        ``protection``), e.g. a mood stabiliser on board; records each changed number."""
        self.modulation = self.modulation.replace(**changes)
        self._record("modulate", [self._row(k, getattr(self.modulation, k)) for k in changes if k != "activation"])

    def assess(self, names: Sequence[str] | str = ACUTE, stream: str | None = None,
               phase: str | None = None) -> pd.DataFrame:
        """Run assessments (names from :data:`~virtualpatient.assessments.ASSESSMENTS`) and record
        their rows.

        Parameters
        ----------
        names
            One name or several; default the acute set (:data:`~virtualpatient.assessments.ACUTE`).
        stream
            The noise stream; default the trial's for the current phase (``untreated/baseline``,
            ``untreated/assess`` after the lesion, ``<arm>/assess`` after a treatment), so the
            numbers equal the trial's.
        phase
            The ``phase`` of the rows; default the current phase.

        Returns
        -------
        pandas.DataFrame
            The new rows (:data:`HISTORY_COLUMNS`).
        """
        if isinstance(names, str):
            names = [names]
        if stream is None:
            untreated = self.arm == "untreated"
            stream = _ASSESS_STREAMS.get(self.phase, "untreated/assess") if untreated else f"{self.arm}/assess"
        with self._inside():
            rows = assess(self, list(names), stream)
        if phase is not None:
            for r in rows:
                r["phase"] = phase
        return pd.DataFrame(self._record("assess", rows), columns=HISTORY_COLUMNS)

    # -- persistence ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The batch state plus the protocol, the history and the current arm and phase (plain
        data: loadable with ``torch.load(..., weights_only=True)``)."""
        return {**super().state_dict(), "format": SAVE_FORMAT, "protocol": self.protocol.to_dict(),
                "history": [dict(r) for r in self._history], "arm": self.arm, "phase": self.phase,
                "actions": self._actions}

    def _restore(self, history: Sequence[dict[str, Any]], arm: str, phase: str, actions: int) -> None:
        self._history = [dict(r) for r in history]
        self.arm, self.phase, self._actions = arm, phase, int(actions)

    @classmethod
    def from_state_dict(cls, state: dict[str, Any], protocol=None) -> VirtualPatient:
        """Rebuild a patient from :meth:`state_dict` (or a one-patient :meth:`PatientBatch.state_dict`).

        Parameters
        ----------
        protocol
            Default: the protocol saved with the patient.

        Raises
        ------
        ValueError
            When the state is not a patient's, holds no protocol and none is given, or holds
            another architecture than the protocol's.
        """
        from virtualpatient.protocol import Protocol

        if not isinstance(state, dict):
            raise ValueError(f"not a patient state: a {type(state).__name__}")
        missing = [k for k in ("specs", "weights", "biases", "masks", "modulation") if k not in state]
        if missing:
            raise ValueError(f"not a patient state: missing {', '.join(missing)}")
        if protocol is None:
            if "protocol" not in state:
                raise ValueError("this state holds no protocol: pass the protocol it was made with")
            protocol = Protocol.from_dict(state["protocol"], source="saved patient")
        patient = cls.from_batch(PatientBatch.from_state_dict(state, protocol))
        if "history" in state:
            patient._restore(state["history"], state.get("arm", "untreated"), state.get("phase", "initial"),
                             state.get("actions", 0))
        return patient

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if "history" in state:
            self._restore(state["history"], state.get("arm", "untreated"), state.get("phase", "initial"),
                          state.get("actions", 0))

    def save(self, path: str | Path) -> None:
        """Write the patient to one file (:meth:`state_dict` via ``torch.save``)."""
        torch.save(self.state_dict(), path)

    @classmethod
    def load(cls, path: str | Path, protocol=None) -> VirtualPatient:
        """Read a patient written by :meth:`save` (safely: ``weights_only=True``).

        Raises
        ------
        ValueError
            When the file is not a saved patient, or holds another architecture than ``protocol``.
        """
        try:
            state = torch.load(path, weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as exc:
            raise ValueError(f"{path}: not a saved patient ({exc})") from None
        if isinstance(state, dict) and state.get("format", SAVE_FORMAT) != SAVE_FORMAT:
            raise ValueError(f"{path}: format {state['format']!r}, this version reads {SAVE_FORMAT!r}")
        try:
            return cls.from_state_dict(state, protocol)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
