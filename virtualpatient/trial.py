"""ClinicalTrial: the schedule from healthy network to manic relapse, and its tidy results.

Per patient (fact 15): baseline training, the lesion (pruning), untreated assessments; then per arm,
on its own copy of the pruned network: the acute course, acute assessments, maintenance under full
mood-stabiliser protection for each duration, discontinuation and wash-out with a biased-noise test
after every decay step, (state-dependent arms: tests with the module off), and acute relapse.

The trial owns the schedule and the randomness: every draw comes from a named per-patient stream
(see :mod:`virtualpatient.cohort`), so results do not depend on batching, order, worker or resume.
Work is cut into units (a chunk of patients' baselines; a chunk of patients x one arm) that run
in-process or on any :class:`concurrent.futures.Executor`, and each finished unit is stored at once.

Examples
--------
>>> from virtualpatient import ClinicalTrial, load_study
>>> trial = ClinicalTrial(load_study("studies/quick.toml"))       # doctest: +SKIP
>>> results = trial.run(out="runs/quick")                         # doctest: +SKIP
>>> results.query("phase == 'acute' and condition == 'combined'").groupby("arm").value.mean()  # doctest: +SKIP
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, as_completed
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from virtualpatient import plasticity
from virtualpatient.assessments import ACUTE, OFF_MEDICATION, assess
from virtualpatient.assessments import biased as biased_test
from virtualpatient.cohort import COVARIATES, Cohort, PatientSpec
from virtualpatient.errors import VirtualPatientError
from virtualpatient.network import Modulation, NoiseSource, NonFiniteError, Params
from virtualpatient.patient import PatientBatch
from virtualpatient.protocol import Protocol
from virtualpatient.schema import COLUMNS
from virtualpatient.stabiliser import washout_schedule
from virtualpatient.store import RunStore
from virtualpatient.task import TaskData

__all__ = ["COLUMNS", "ClinicalTrial", "TrainingDivergedError", "run_arm", "run_baseline"]


#: The modulation after discontinuation: drug effects gone (gain 1, damping 1, ReLU, no noise).
DISCONTINUED = Modulation()

Tick = Callable[[int], None] | None


class TrainingDivergedError(VirtualPatientError, FloatingPointError):
    """A training step produced NaN or inf; the message names patients, arm, phase and epoch."""


def _tag(rows: list[dict], arm: str, phase: str, **extra: Any) -> list[dict]:
    for r in rows:
        r.update(arm=arm, phase=phase, **extra)
    return rows


def _train_guard(batch: PatientBatch, arm: str, phase: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except NonFiniteError as exc:
        ids = [batch.specs[i].index for i in exc.patients]
        raise TrainingDivergedError(
            f"training diverged (NaN/inf loss): patient(s) {ids}, arm {arm}, {phase}, epoch {exc.epoch + 1}"
        ) from None


def _scale_tick(tick: Tick, n: int) -> Tick:
    return None if tick is None else (lambda _epoch: tick(n))


# -- units of work ---------------------------------------------------------------------------
def run_baseline(protocol: Protocol, specs: Sequence[PatientSpec], tick: Tick = None) -> list[dict[str, Any]]:
    """Train, prune and assess the untreated patients; one payload per patient.

    Returns
    -------
    list of dict
        Per patient ``{"rows": [...], "state": <single-patient state dict>}``.
    """
    batch = PatientBatch(specs, protocol)
    _train_guard(batch, "untreated", "baseline training", lambda: batch.train_baseline(_scale_tick(tick, len(batch))))
    rows = _tag(assess(batch, ("standard", "clean"), "untreated/baseline"), "untreated", "baseline")
    batch.prune()
    rows += _tag(assess(batch, ACUTE, "untreated/assess"), "untreated", "pruned")
    return [
        {"rows": [r for r in rows if r["patient"] == s.index], "state": batch.select([i]).state_dict()}
        for i, s in enumerate(batch.specs)
    ]


def run_arm(protocol: Protocol, arm: str, pruned: PatientBatch, tick: Tick = None) -> list[dict[str, Any]]:
    """One arm for a batch of pruned patients: acute course, assessments, follow-up, relapse.

    Returns
    -------
    list of dict
        Per patient, in batch order, ``{"rows": [...], "weights": [W0, W1, ...]}`` (the weight
        matrices after the acute course, for the weight-distribution figures).
    """
    treatment = protocol.arms[arm]
    batch = pruned.clone()
    batch.modulation = DISCONTINUED
    _train_guard(batch, arm, "acute course", lambda: treatment.apply(batch, arm, _scale_tick(tick, len(batch))))
    acute = _tag(assess(batch, ACUTE, f"{arm}/assess"), arm, "acute")
    rows = acute + longitudinal(batch, arm, tick)
    if treatment.state_dependent:
        rows += _tag(assess(batch.with_modulation(DISCONTINUED), OFF_MEDICATION, f"{arm}/off"), arm, "off_medication")
    before = [r["value"] for r in acute if r["metric"] == "accuracy" and r["condition"] == "combined"]
    rows += acute_relapse(batch, arm, before)
    weights = [w.detach().cpu() for w in batch.params.weights]
    return [
        {"rows": [r for r in rows if r["patient"] == s.index], "weights": [w[i] for w in weights]}
        for i, s in enumerate(batch.specs)
    ]


def longitudinal(batch: PatientBatch, arm: str, tick: Tick = None) -> list[dict]:
    """Maintenance for each duration, discontinuation, wash-out and the relapse verdict (fact 14).

    With ``longitudinal.nested`` (default) the durations are snapshots of one run of the longest
    duration: every duration starts from the same state with the same data order, so the first
    ``d`` epochs of the longest run *are* the ``d``-epoch run.
    """
    cfg = batch.protocol.longitudinal
    rate = batch.protocol.arms[arm].washout_decay
    on_drug = batch.clone()
    on_drug.modulation = batch.modulation.replace(protection=cfg.protection, noise_sigma=0.0)
    stream = f"{arm}/maintenance"
    if cfg.nested:
        longest = max(cfg.durations, default=0)
        snaps = _train_guard(on_drug, arm, "maintenance", lambda: on_drug.train(
            longest, cfg.lr, stream, snapshots=cfg.durations, on_epoch=_scale_tick(tick, len(batch))))
    else:
        snaps = {}
        for d in cfg.durations:
            run = on_drug.clone()
            _train_guard(run, arm, f"maintenance ({d} epochs)",
                         lambda run=run, d=d: run.train(d, cfg.lr, stream, on_epoch=_scale_tick(tick, len(batch))))
            snaps[d] = run.params
    if not cfg.durations:
        return []
    # All durations are tested as one batch of len(durations) x P networks: one evaluation call per
    # wash-out step instead of one per duration (network.forward splits a batch whose activations
    # would not fit EngineConfig.eval_max_bytes). Each (duration, patient) keeps its own noise stream.
    durations, n = list(cfg.durations), len(batch)
    repeat = torch.arange(n, device=batch.device).repeat(len(durations))
    data = TaskData(*(getattr(batch.data, f).index_select(0, repeat) for f in TaskData.__dataclass_fields__))
    maintained = PatientBatch([s for _ in durations for s in batch.specs], batch.protocol,
                              Params.cat([snaps[d] for d in durations]), on_drug.modulation, data)
    noise = NoiseSource([s.generator(f"{arm}/washout/{d}") for d in durations for s in batch.specs])
    per_duration: dict[int, list[dict]] = {d: [] for d in durations}

    def collect(rows: list[dict], phase: str, **extra: Any) -> None:
        for i, r in enumerate(rows):
            d = durations[i // n]
            per_duration[d] += _tag([r], arm, phase, maintenance_epochs=d, **extra)

    collect(assess(maintained, ("standard",), f"{arm}/maintenance/assess"), "maintenance")
    levels = washout_schedule(cfg.protection, rate, cfg.washout_steps)
    for step, p in enumerate(levels):
        biased = biased_test(maintained.with_modulation(DISCONTINUED.replace(protection=p)), noise)
        collect(biased, "washout", step=step)
        collect([dict(r, metric="protection", condition="", value=p) for r in biased], "washout", step=step)
    collect([dict(r, metric="relapsed", condition="", value=float(r["value"] < cfg.relapse_threshold)) for r in biased],
            "washout", step=len(levels) - 1)
    return [r for d in durations for r in per_duration[d]]


def acute_relapse(batch: PatientBatch, arm: str, before: Sequence[float]) -> list[dict]:
    """Prune a further share of the remaining weights and re-test under combined stress (fact 11).

    Each matrix the lesion pruned is re-pruned to ``s + further (1 - s)``, ``s`` the current
    sparsity over those matrices (all four by default; the hidden ones under the text's reading).
    """
    cfg = batch.protocol.relapse
    layers = batch.lesion_layers
    s = batch.params.sparsity(layers) / 100.0
    targets = [min(float(x) + cfg.further_fraction * (1.0 - float(x)), cfg.max_sparsity) for x in s]
    stressed = batch.clone()
    plasticity.prune_per_layer(stressed.params, targets, layers=layers)
    rows = assess(stressed, ("sparsity", "combined"), f"{arm}/relapse")
    after = [r["value"] for r in rows if r["metric"] == "accuracy"]
    drop = [{"patient": spec.index, "metric": "relapse_drop", "condition": "", "noise_sigma": math.nan,
             "value": b - a} for spec, b, a in zip(batch.specs, before, after)]
    return _tag(rows + drop, arm, "acute_relapse")


def _baseline_payloads(protocol_data: dict, spec_data: list[dict]) -> list[dict[str, Any]]:
    """Process-safe entry point: plain data in, plain data out."""
    protocol = Protocol.from_dict(protocol_data)
    return run_baseline(protocol, [PatientSpec.from_dict(s) for s in spec_data])


def _arm_payloads(protocol_data: dict, arm: str, states: list[dict]) -> list[dict[str, Any]]:
    """Process-safe entry point: the protocol as a dict and pruned state dicts in, rows and weights out."""
    protocol = Protocol.from_dict(protocol_data)
    pruned = PatientBatch.stack([PatientBatch.from_state_dict(s, protocol) for s in states])
    return run_arm(protocol, arm, pruned)


# -- the trial -------------------------------------------------------------------------------
class ClinicalTrial:
    """Run a study: a cohort, its arms and the full schedule, into a tidy results table.

    Parameters
    ----------
    protocol
        The study (see :func:`~virtualpatient.protocol.load_study`).
    executor
        Where units of work run: ``None`` runs them in this process (with per-epoch progress);
        any :class:`concurrent.futures.Executor` (a process pool, or Dask's
        ``client.get_executor(pure=False)``) runs them there.
    patients_per_unit
        How many patients train together in one batched unit (default: all of them; smaller
        chunks spread over more workers and lose less on interruption).
    progress
        Show a progress bar (patient-epochs) on standard error.

    Examples
    --------
    >>> from virtualpatient import ClinicalTrial, Protocol
    >>> trial = ClinicalTrial(Protocol().replace(n_patients=2))
    >>> len(trial.cohort)
    2
    """

    def __init__(self, protocol: Protocol, *, executor: Executor | None = None,
                 patients_per_unit: int | None = None, progress: bool = True) -> None:
        if not isinstance(protocol, Protocol):
            raise TypeError(f"protocol must be a Protocol, got {type(protocol).__name__}")
        if patients_per_unit is not None and patients_per_unit < 1:
            raise ValueError(f"patients_per_unit must be >= 1, got {patients_per_unit}")
        self.protocol = protocol
        self.executor = executor
        self.patients_per_unit = patients_per_unit or protocol.n_patients
        self.progress = progress
        self.cohort = Cohort.from_config(
            protocol.cohort, protocol.n_patients, protocol.seed,
            defaults={"prune_fraction": protocol.pruning.fraction, "regrowth_fraction": math.nan, "lr_scale": 1.0},
        )

    # ------------------------------------------------------------------------------------------
    def epochs_per_patient(self) -> dict[str, int]:
        """Training epochs each patient goes through, per unit kind (for progress and benchmarks)."""
        cfg = self.protocol.longitudinal
        follow = max(cfg.durations, default=0) if cfg.nested else sum(cfg.durations)
        out = {"baseline": self.protocol.baseline.epochs}
        out.update({arm: t.training_epochs() + follow for arm, t in self.protocol.arms.items()})
        return out

    def _chunks(self, patients: list[PatientSpec]) -> list[list[PatientSpec]]:
        n = self.patients_per_unit
        return [patients[i:i + n] for i in range(0, len(patients), n)]

    def run(self, out: str | Path | None = None) -> pd.DataFrame:
        """Run (or resume) the study and return the tidy results table.

        Parameters
        ----------
        out
            Run folder. Finished units found there are reused; the results table, the resolved
            protocol and the manifest are written there.
        """
        store = RunStore(out)
        with store.session(self.protocol):
            self._run_units(store)
            frame = self._assemble(store)
            store.write_results(frame)
        return frame

    def _run_units(self, store: RunStore) -> None:
        from tqdm.auto import tqdm

        epochs = self.epochs_per_patient()
        arms = list(self.protocol.arms)
        self._verify(store, ["baseline", *arms])
        todo_base = [s for s in self.cohort if not store.has("baseline", s.index)]
        todo_arm = {a: [s for s in self.cohort if not store.has(a, s.index)] for a in arms}
        total = len(todo_base) * epochs["baseline"] + sum(len(v) * epochs[a] for a, v in todo_arm.items())
        bar = tqdm(total=total, unit="patient-epoch", desc=self.protocol.name, disable=not self.progress,
                   dynamic_ncols=True, smoothing=0.05)
        try:
            if self.executor is None:
                self._run_inline(store, todo_base, todo_arm, bar)
            else:
                self._run_executor(store, todo_base, todo_arm, bar, epochs)
        finally:
            bar.close()

    def _verify(self, store: RunStore, kinds: list[str]) -> None:
        """Read every finished unit once, so a damaged file stops the run before any work (and stays)."""
        for kind in kinds:
            for s in self.cohort:
                if store.has(kind, s.index):
                    store.load_unit(kind, s.index)

    def _pruned(self, store: RunStore, specs: list[PatientSpec]) -> list[dict]:
        return [store.load_unit("baseline", s.index)["state"] for s in specs]

    def _save_baseline(self, store: RunStore, payloads: list[dict]) -> None:
        for payload in payloads:
            state = payload["state"]
            index = state["specs"][0]["index"]
            store.save_weights("untreated", index, state["weights"])
            store.save_unit("baseline", index, payload)

    def _save_arm(self, store: RunStore, arm: str, specs: list[PatientSpec], payloads: list[dict]) -> None:
        for s, payload in zip(specs, payloads, strict=True):
            store.save_weights(arm, s.index, payload["weights"])
            store.save_unit(arm, s.index, payload["rows"])

    def _run_inline(self, store, todo_base, todo_arm, bar) -> None:
        for chunk in self._chunks(todo_base):
            bar.set_postfix_str("baseline")
            self._save_baseline(store, run_baseline(self.protocol, chunk, bar.update))
        for arm, specs in todo_arm.items():
            for chunk in self._chunks(specs):
                bar.set_postfix_str(arm)
                pruned = PatientBatch.stack([PatientBatch.from_state_dict(s, self.protocol)
                                             for s in self._pruned(store, chunk)])
                self._save_arm(store, arm, chunk, run_arm(self.protocol, arm, pruned, bar.update))

    def _run_executor(self, store, todo_base, todo_arm, bar, epochs) -> None:
        data = self.protocol.to_dict()
        pending: dict[Future, tuple[str, list[PatientSpec]]] = {}
        for chunk in self._chunks(todo_base):
            fut = self.executor.submit(_baseline_payloads, data, [s.to_dict() for s in chunk])
            pending[fut] = ("baseline", chunk)

        def submit_arms(specs: list[PatientSpec]) -> None:
            for arm, wanted in todo_arm.items():
                ids = {s.index for s in wanted}
                chunk = [s for s in specs if s.index in ids]
                if chunk:
                    fut = self.executor.submit(_arm_payloads, data, arm, self._pruned(store, chunk))
                    pending[fut] = (arm, chunk)

        ready = [s for s in self.cohort if s not in todo_base]
        for chunk in self._chunks(ready):
            submit_arms(chunk)
        try:
            while pending:
                fut = next(as_completed(pending))
                kind, chunk = pending.pop(fut)
                result = fut.result()
                if kind == "baseline":
                    self._save_baseline(store, result)
                    submit_arms(chunk)
                else:
                    self._save_arm(store, kind, chunk, result)
                bar.update(len(chunk) * epochs[kind])
        finally:
            for fut in pending:  # after a failure: drop queued units (finished ones are stored)
                fut.cancel()

    def _assemble(self, store: RunStore) -> pd.DataFrame:
        rows: list[dict] = []
        for kind in ["baseline", *self.protocol.arms]:
            for s in self.cohort:
                unit = store.load_unit(kind, s.index)
                unit_rows = unit["rows"] if kind == "baseline" else unit
                rows += [{**r, **{c: s.covariates[c] for c in COVARIATES}} for r in unit_rows]
        frame = pd.DataFrame(rows)
        for col in ("noise_sigma", "maintenance_epochs", "step"):
            if col not in frame:
                frame[col] = math.nan
        frame = frame[COLUMNS + list(COVARIATES)]
        return frame.astype({"patient": int, "noise_sigma": float, "maintenance_epochs": float, "step": float,
                             "value": float})
