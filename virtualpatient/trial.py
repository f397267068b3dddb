"""ClinicalTrial: run a study's schedule over its cohort, into a tidy results table.

A schedule (:mod:`virtualpatient.phases`) is a *spine* every patient goes through (the paper's:
baseline training, the lesion, untreated assessments) and *regimens* that each run on their own
copy of the spine's end state (the paper's: one per arm, fact 15). The trial knows no particular
phase: it cuts the work into units, a chunk of patients' spine and a chunk of patients x one
regimen, runs them in-process or on any :class:`concurrent.futures.Executor`, and stores each
finished unit at once, so a run resumes after a kill.

Every random draw comes from a named per-patient stream (see :mod:`virtualpatient.cohort`), so
results do not depend on batching, order, worker or resume.

Examples
--------
>>> from virtualpatient import ClinicalTrial, load_study
>>> trial = ClinicalTrial(load_study("studies/quick.toml"))       # doctest: +SKIP
>>> results = trial.run(out="runs/quick")                         # doctest: +SKIP
>>> results.query("phase == 'acute' and condition == 'combined'").groupby("arm").value.mean()  # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from concurrent.futures import Executor, Future, as_completed
from pathlib import Path
from typing import Any

import pandas as pd

from virtualpatient.cohort import COVARIATES, Cohort, PatientSpec
from virtualpatient.engine import settings
from virtualpatient.patient import PatientBatch
from virtualpatient.phases import (  # DISCONTINUED: re-exported for benchmarks/bench_levers.py
    DISCONTINUED,
    SPINE,
    Context,
    Fork,
    Group,
    Phase,
    TrainingDivergedError,
    clock_origin,
    resolve,
    run_schedule,
    trained_prefix,
)
from virtualpatient.protocol import Protocol
from virtualpatient.schema import COLUMNS, SCHEDULE_COLUMNS
from virtualpatient.store import RunStore

__all__ = ["COLUMNS", "DISCONTINUED", "SCHEDULE_COLUMNS", "UNIT_PATIENTS", "ClinicalTrial", "TrainingDivergedError",
           "run_arm", "run_baseline"]

Tick = Callable[[int], None] | None


def _strip(rows: list[dict]) -> list[dict]:
    for r in rows:
        r.pop("_key", None)
    return rows


# -- units of work ---------------------------------------------------------------------------
def run_baseline(protocol: Protocol, specs: Sequence[PatientSpec], tick: Tick = None, *,
                 trained: Sequence[dict] | None = None, keep_trained: bool = False) -> list[dict[str, Any]]:
    """The spine for a chunk of patients (the paper's: train, test, prune, untreated assessments).

    Parameters
    ----------
    trained
        Per patient of ``specs``, its state after the spine's training (the phases before the
        lesion, :func:`~virtualpatient.phases.trained_prefix`) as another trial's ``keep_trained``
        gave it: the spine then starts at the lesion. The same patients in a protocol that differs
        only from the lesion on give the same numbers, bit for bit.
    keep_trained
        Also return that state, as each payload's ``"trained"``.

    Returns
    -------
    list of dict
        Per patient ``{"rows": [...], "state": <single-patient state dict>, "meta": <schedule state>}``.
    """
    spine, _ = resolve(protocol)
    prefix = trained_prefix(spine, protocol) if trained is not None or keep_trained else 0
    ctx = Context(protocol, SPINE, tick)
    rows: list[dict] = []
    kept: dict[int, dict] | None = None  # patient index -> its trained state, when asked to keep it
    if trained is not None:
        if not prefix:
            raise ValueError("trained states given, but this spine trains nothing before a lesion")
        # the state is this level's patient: its own spec (the lesion depth is a covariate)
        groups, _ = _groups(protocol, [{"state": {**t["state"], "specs": [s.to_dict()]}, "meta": t["meta"]}
                                       for s, t in zip(specs, trained, strict=True)])
        ctx.restore_streams(trained[0]["streams"])
        rows = [dict(r) for t in trained for r in t["rows"]]
    else:
        groups = [Group.start(PatientBatch(specs, protocol), clock_origin(spine, protocol))]
        if prefix:
            groups, rows = run_schedule(spine[:prefix], groups, ctx)
            _strip(rows)
            kept = {s.index: {**payload, "streams": ctx.streams_state()}
                    for s, payload in zip(specs, _payloads(groups, rows, specs))}
    groups, more = run_schedule(spine, groups, ctx, start=prefix)
    out = _payloads(groups, rows + _strip(more), specs)
    if kept is not None:
        for s, payload in zip(specs, out):
            payload["trained"] = kept[s.index]
    return out


def _payloads(groups: list[Group], rows: list[dict], specs: Sequence[PatientSpec]) -> list[dict[str, Any]]:
    """Per patient of ``specs``: its rows, its single-patient state and its schedule state."""
    where = {g.batch.specs[i].index: (g, i) for g in groups for i in range(len(g))}
    out = []
    for s in specs:
        g, i = where[s.index]
        out.append({"rows": [r for r in rows if r["patient"] == s.index],
                    "state": g.batch.select([i]).state_dict(), "meta": g.meta(i)})
    return out


def _groups(protocol: Protocol, pruned: PatientBatch | Sequence[dict]) -> tuple[list[Group], list[PatientSpec]]:
    """Groups of patients that can run together, from a batch or the spine's stored payloads."""
    if isinstance(pruned, PatientBatch):
        return [Group.start(pruned)], list(pruned.specs)
    by_modulation: dict[Any, list[dict]] = {}
    for payload in pruned:
        by_modulation.setdefault(tuple(sorted(payload["state"]["modulation"].items())), []).append(payload)
    groups = []
    for payloads in by_modulation.values():
        batch = PatientBatch.stack([PatientBatch.from_state_dict(p["state"], protocol) for p in payloads])
        groups.append(Group.from_meta(batch, [p.get("meta") or Group.start(batch).meta(0) for p in payloads]))
    specs = [PatientSpec.from_dict(p["state"]["specs"][0]) for p in pruned]
    return groups, specs


def run_arm(protocol: Protocol, arm: str, pruned: PatientBatch | Sequence[dict], tick: Tick = None) -> list[dict]:
    """One regimen (the paper's: one arm's course) for a chunk of patients after the spine.

    Parameters
    ----------
    arm
        The regimen's name (the results' ``arm``).
    pruned
        The patients after the spine: a :class:`PatientBatch`, or the spine's payloads.

    Returns
    -------
    list of dict
        Per patient, in order, ``{"rows": [...], "weights": [W0, W1, ...]}`` (the weight matrices
        after the regimen's first acute course, else at its end, for the weight-distribution figures).
    """
    _, regimens = resolve(protocol)
    groups, specs = _groups(protocol, pruned)
    ctx = Context(protocol, arm, tick)
    groups, rows = run_schedule(regimens[arm], groups, ctx)
    _strip(rows)
    for g in groups:  # patients that never went through a treat: their weights at the end
        ctx.capture(g)
    for g in groups:
        for i, s in enumerate(g.batch.specs):
            ctx.weights.setdefault(s.index, [w[i].detach().cpu() for w in g.batch.params.weights])
    return [{"rows": [r for r in rows if r["patient"] == s.index], "weights": ctx.weights[s.index]} for s in specs]


def _baseline_payloads(protocol_data: dict, spec_data: list[dict], trained: list[dict] | None = None,
                       keep_trained: bool = False, engine: dict | None = None) -> list[dict[str, Any]]:
    """Process-safe entry point: plain data in (the driver's engine settings last), plain data out."""
    protocol = Protocol.from_dict(protocol_data)
    with settings.engine_options(**(engine or {})):
        return run_baseline(protocol, [PatientSpec.from_dict(s) for s in spec_data], trained=trained,
                            keep_trained=keep_trained)


def _arm_payloads(protocol_data: dict, arm: str, states: list[dict],
                  engine: dict | None = None) -> list[dict[str, Any]]:
    """Process-safe entry point: the protocol as a dict, the spine's payloads and the driver's engine
    settings in; rows and weights out."""
    with settings.engine_options(**(engine or {})):
        return run_arm(Protocol.from_dict(protocol_data), arm, states)


def _worker_slots(executor: Executor) -> int | float:
    """How many units ``executor`` runs at once: a local pool's worker count, else unbounded (a
    Dask executor schedules what it is given itself)."""
    workers = getattr(executor, "_max_workers", None)
    return workers if isinstance(workers, int) and workers > 0 else math.inf


# -- the trial -------------------------------------------------------------------------------
#: Patients trained together in one unit of work by default. A fixed number, never one derived
#: from the machine's cores: how patients are batched changes the last bits of their numbers (a
#: vectorised elementwise kernel rounds a tensor's tail differently from its body), so a fixed size
#: keeps ``results.csv`` independent of the core count. Five is the size the stored 10-patient
#: reference tables were made with (two units per arm, so two workers stay busy).
UNIT_PATIENTS = 5


class ClinicalTrial:
    """Run a study: a cohort, its arms and its schedule, into a tidy results table.

    Parameters
    ----------
    protocol
        The study (see :func:`~virtualpatient.protocol.load_study`).
    schedule
        Phases replacing the study's spine (a list; it may end with a
        :class:`~virtualpatient.phases.Fork` of regimens).
    regimens
        Regimen name -> phases, replacing the study's regimens.
    executor
        Where units of work run: ``None`` runs them in this process (with per-epoch progress);
        any :class:`concurrent.futures.Executor` (a process pool, or Dask's
        ``client.get_executor(pure=False)``) runs them there.
    patients_per_unit
        How many patients train together in one batched unit (default :data:`UNIT_PATIENTS`, or
        all of them when fewer; smaller units spread over more workers and lose less on
        interruption, but change the last bits of the numbers).
    progress
        Show a progress bar (patient-epochs) on standard error.

    Examples
    --------
    >>> from virtualpatient import ClinicalTrial, Protocol
    >>> trial = ClinicalTrial(Protocol().replace(n_patients=2))
    >>> len(trial.cohort)
    2
    >>> from virtualpatient.phases import Assess, Fork, Lesion, Train, Treat
    >>> trial = ClinicalTrial(Protocol().replace(n_patients=2), schedule=[
    ...     Train(), Lesion(), Fork(regimens={"ket": [Treat(arm="ketamine"), Assess(label="acute")]})])
    >>> list(trial.protocol.regimens)
    ['ket']
    """

    def __init__(self, protocol: Protocol, schedule: Sequence[Phase] | None = None,
                 regimens: dict[str, Sequence[Phase]] | None = None, *, executor: Executor | None = None,
                 patients_per_unit: int | None = None, progress: bool = True) -> None:
        if not isinstance(protocol, Protocol):
            raise TypeError(f"protocol must be a Protocol, got {type(protocol).__name__}")
        if patients_per_unit is not None and patients_per_unit < 1:
            raise ValueError(f"patients_per_unit must be >= 1, got {patients_per_unit}")
        if schedule is not None:
            if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence):
                raise TypeError(f"schedule must be a list of phases, got {type(schedule).__name__}")
            schedule = list(schedule)
            if schedule and isinstance(schedule[-1], Fork):
                if regimens is not None:
                    raise ValueError("give the regimens either as the schedule's final Fork or as regimens=")
                regimens = dict(schedule.pop().regimens)
            protocol = protocol.replace(schedule=schedule)
        if regimens is not None:
            protocol = protocol.replace(regimens=regimens)
        self.protocol = protocol
        self.executor = executor
        self.patients_per_unit = patients_per_unit or min(UNIT_PATIENTS, protocol.n_patients)
        self.progress = progress
        #: Patient index -> its state after the spine's training, before the lesion. ``None``: not
        #: kept. A dict: states found there are started from, and the spine's states are added to
        #: it, so trials whose spines differ only from the lesion on (a lesion sweep's levels, see
        #: :func:`virtualpatient.sweeps.run_sweep`) train each patient once.
        self.trained: dict[int, dict] | None = None
        self.cohort = Cohort.from_config(
            protocol.cohort, protocol.n_patients, protocol.seed,
            defaults={"prune_fraction": protocol.pruning.fraction, "regrowth_fraction": math.nan, "lr_scale": 1.0},
        )

    # ------------------------------------------------------------------------------------------
    def epochs_per_patient(self) -> dict[str, int]:
        """Training epochs each patient goes through, per unit kind (for progress and benchmarks)."""
        spine, regimens = resolve(self.protocol)
        out = {"baseline": sum(p.training_epochs(self.protocol) for p in spine)}
        out.update({name: sum(p.training_epochs(self.protocol) for p in phases) for name, phases in regimens.items()})
        return out

    @property
    def regimens(self) -> list[str]:
        """The regimens' names: the results' arms besides the spine's ``untreated``."""
        return list(resolve(self.protocol)[1])

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
        arms = self.regimens
        self._verify(store, ["baseline", *arms])
        todo_base = [s for s in self.cohort if not store.has("baseline", s.index)]
        todo_arm = {a: [s for s in self.cohort if not store.has(a, s.index)] for a in arms}
        total = sum(self._spine_epochs(chunk) for chunk in self._chunks(todo_base)) + \
            sum(len(v) * epochs[a] for a, v in todo_arm.items())
        bar = tqdm(total=total, unit="patient-epoch", desc=self.protocol.name, disable=not self.progress,
                   dynamic_ncols=True, smoothing=0.05)
        try:
            if self.executor is None:
                self._run_inline(store, todo_base, todo_arm, bar)
            else:
                self._run_executor(store, todo_base, todo_arm, bar, epochs)
        finally:
            bar.close()

    def _start(self, chunk: list[PatientSpec]) -> tuple[list[dict] | None, bool]:
        """For a chunk's spine: the trained states to start from (``None``: train), and whether to
        keep the chunk's own for later trials."""
        if self.trained is None:
            return None, False
        if all(s.index in self.trained for s in chunk):
            return [self.trained[s.index] for s in chunk], False
        return None, True

    def _spine_epochs(self, chunk: list[PatientSpec]) -> int:
        """Training epochs of a chunk's spine (none of the trained prefix when it starts past it)."""
        spine, _ = resolve(self.protocol)
        skip = trained_prefix(spine, self.protocol) if self._start(chunk)[0] is not None else 0
        return len(chunk) * sum(p.training_epochs(self.protocol) for p in spine[skip:])

    def _keep_trained(self, payloads: list[dict]) -> list[dict]:
        for payload in payloads:
            trained = payload.pop("trained", None)
            if trained is not None and self.trained is not None:
                self.trained[payload["state"]["specs"][0]["index"]] = trained
        return payloads

    def _verify(self, store: RunStore, kinds: list[str]) -> None:
        """Read every finished unit once, so a damaged file stops the run before any work (and stays)."""
        for kind in kinds:
            for s in self.cohort:
                if store.has(kind, s.index):
                    store.load_unit(kind, s.index)

    def _pruned(self, store: RunStore, specs: list[PatientSpec]) -> list[dict]:
        """The spine's end states (weights, masks, modulation and schedule state) of ``specs``."""
        out = []
        for s in specs:
            unit = store.load_unit("baseline", s.index)
            out.append({"state": unit["state"], "meta": unit.get("meta")})
        return out

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
            trained, keep = self._start(chunk)
            payloads = run_baseline(self.protocol, chunk, bar.update, trained=trained, keep_trained=keep)
            self._save_baseline(store, self._keep_trained(payloads))
        for arm, specs in todo_arm.items():
            for chunk in self._chunks(specs):
                bar.set_postfix_str(arm)
                pruned = self._pruned(store, chunk)
                self._save_arm(store, arm, chunk, run_arm(self.protocol, arm, pruned, bar.update))

    def _run_executor(self, store, todo_base, todo_arm, bar, epochs) -> None:
        data = self.protocol.to_dict()
        # the engine settings travel with every unit as a value: a worker process never sees the
        # driver's module state (engine_options in the driver applies to the workers too)
        engine = dataclasses.asdict(settings.ENGINE)
        pending: dict[Future, tuple[str, list[PatientSpec]]] = {}
        spine_epochs: dict[int, int] = {}
        for chunk in self._chunks(todo_base):
            spine_epochs[id(chunk)] = self._spine_epochs(chunk)
            fut = self.executor.submit(_baseline_payloads, data, [s.to_dict() for s in chunk],
                                       *self._start(chunk), engine)
            pending[fut] = ("baseline", chunk)

        # Arm units wait here until a worker is free, then go out regimen by regimen (all of the
        # first regimen's units before the second's): a pool runs what it is given in order, so
        # given the units one spine chunk at a time it would run a long regimen's last unit at
        # the end, alone (on 2 workers the paper's study would take about 8 % longer, by its units' times).
        waiting: list[tuple[int, int, str, list[PatientSpec]]] = []
        order = {arm: k for k, arm in enumerate(todo_arm)}
        slots = _worker_slots(self.executor)

        def queue_arms(specs: list[PatientSpec]) -> None:
            for arm, wanted in todo_arm.items():
                ids = {s.index for s in wanted}
                chunk = [s for s in specs if s.index in ids]
                if chunk:
                    waiting.append((order[arm], chunk[0].index, arm, chunk))
            waiting.sort(key=lambda item: item[:2])

        def dispatch() -> None:
            while waiting and len(pending) < slots:
                _, _, arm, chunk = waiting.pop(0)
                fut = self.executor.submit(_arm_payloads, data, arm, self._pruned(store, chunk), engine)
                pending[fut] = (arm, chunk)

        ready = [s for s in self.cohort if s not in todo_base]
        for chunk in self._chunks(ready):
            queue_arms(chunk)
        dispatch()
        try:
            while pending:
                fut = next(as_completed(pending))
                kind, chunk = pending.pop(fut)
                result = fut.result()
                if kind == "baseline":
                    self._save_baseline(store, self._keep_trained(result))
                    queue_arms(chunk)
                    bar.update(spine_epochs[id(chunk)])
                else:
                    self._save_arm(store, kind, chunk, result)
                    bar.update(len(chunk) * epochs[kind])
                dispatch()
        finally:
            for fut in pending:  # after a failure: drop queued units (finished ones are stored)
                fut.cancel()

    def _assemble(self, store: RunStore) -> pd.DataFrame:
        rows: list[dict] = []
        for kind in ["baseline", *self.regimens]:
            for s in self.cohort:
                unit = store.load_unit(kind, s.index)
                unit_rows = unit["rows"] if kind == "baseline" else unit
                rows += [{**r, **{c: s.covariates[c] for c in COVARIATES}} for r in unit_rows]
        frame = pd.DataFrame(rows)
        for col in ("noise_sigma", "maintenance_epochs", "step"):
            if col not in frame:
                frame[col] = math.nan
        frame = frame[COLUMNS + list(COVARIATES) + SCHEDULE_COLUMNS]
        return frame.astype({"patient": int, "noise_sigma": float, "maintenance_epochs": float, "step": float,
                             "value": float, "time": float, "cycle": int})
