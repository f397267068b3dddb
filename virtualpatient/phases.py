"""The schedule's vocabulary: one small, validated phase per step of a virtual trial.

A schedule is a list of phases that a batch of patients goes through in order. Each phase is a
frozen pydantic dataclass (its fields are its parameters, checked when a study is loaded) with a
:meth:`Phase.run` that changes the patients' state and returns tidy result rows
(``docs/results-schema.md``). Every number a phase leaves unset (``None``) is the protocol's default
for that step, so the paper's schedule (:func:`paper_spine`, :func:`paper_regimen`) reads all its
numbers from :class:`~virtualpatient.protocol.Protocol`.

The phases, each found by its registered name:

``train``
    training with a fresh Adam (the healthy baseline, Methods; fact 1).
``lesion``
    magnitude pruning to a sparsity (fact 7), optionally leaving a persistent scar.
``treat``
    an arm's acute course, :meth:`Treatment.apply` (facts 8-10).
``assess``
    any registered assessments, by name (facts 4-6, 12).
``maintain``
    training on drug under mood-stabiliser protection; several durations fork the cohort and run
    as snapshots of one run of the longest (fact 14, DESIGN "nested maintenance").
``discontinue``
    the drug's effects off: abrupt (fact 14) or tapered over N steps.
``washout``
    protection decays step by step under the biased test, then the relapse verdict (fact 14).
``stress``
    prune a further share of what remains (fact 11) and/or a period of noisy training.
``repeat``
    a block of phases N times; rows carry the cycle number.
``scar``
    a random lesion at the patient level that leaves a persistent scar (family 068E fact 3).
``snapshot`` / ``dose``
    keep the weights; later, dose metrics of the change since then (family 068A fact 7).
``probe``
    a block of phases on a copy of the patients: a side experiment that leaves their state as it
    was (the paper's follow-up and acute-relapse challenge both start from the post-acute state).
``block``
    (study files only) the phases of a named ``[[blocks.NAME]]`` list, in place.

Every phase also takes ``label`` (its name in the results' ``phase`` and ``label`` columns) and
``when`` (``"always"``, ``"relapsed"`` or ``"remitted"``: run only for the patients whose last
wash-out verdict says so).

A study forks into regimens (``[[regimens.NAME]]`` in a study file, or :class:`Fork` as the last
phase of a Python schedule): the *spine* (shared phases) runs once per patient, then each regimen
runs on its own copy; a regimen's name is the results' ``arm``.

Examples
--------
>>> from virtualpatient.phases import build_phase
>>> build_phase({"phase": "washout", "steps": 10, "test_every": 5})
Washout(label='washout', when='always', steps=10, decay=None, test_every=5, threshold=None, bias=None)
>>> build_phase({"phase": "repeat", "times": 0, "phases": []})
Traceback (most recent call last):
...
ValueError: times: Input should be greater than or equal to 1; phases: a block needs at least one phase
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, Literal

import pydantic
import torch
from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from virtualpatient import plasticity
from virtualpatient.assessments import (
    ACUTE,
    ASSESSMENTS,
    OFF_MEDICATION,
    SEVERITY_ACTIVATION_REFERENCE,
    SEVERITY_ACTIVATION_WEIGHT,
    SEVERITY_RANGE,
    episode_severity,
    rows_for,
)
from virtualpatient.errors import VirtualPatientError
from virtualpatient.limits import MAX_EPOCHS, MAX_LEVELS, MAX_LR, MAX_NOISE, MAX_STEPS
from virtualpatient.network import BiasedNoise, Modulation, NoiseSource, NonFiniteError, Params
from virtualpatient.stabiliser import washout_schedule

if TYPE_CHECKING:
    from virtualpatient.patient import PatientBatch
    from virtualpatient.treatments import Treatment

__all__ = [
    "DISCONTINUED",
    "PHASES",
    "SPINE",
    "Assess",
    "Context",
    "Discontinue",
    "Fork",
    "Group",
    "Lesion",
    "Maintain",
    "Phase",
    "Probe",
    "Dose",
    "Repeat",
    "Scar",
    "Snapshot",
    "Stress",
    "Train",
    "TrainingDivergedError",
    "Treat",
    "Washout",
    "arms_used",
    "build_phase",
    "build_schedule",
    "check_schedule",
    "paper_regimen",
    "paper_spine",
    "register_phase",
    "resolve",
    "run_schedule",
    "trained_prefix",
]

Row = dict[str, Any]
Tick = Callable[[int], None] | None

#: The modulation after discontinuation: drug effects gone (gain 1, damping 1, ReLU, no noise; fact 14).
DISCONTINUED = Modulation()

#: The results' ``arm`` of the spine (the phases every patient shares before the regimens fork).
SPINE = "untreated"

#: Phase labels only the spine may use (the paper's: its rows before any regimen; the run folder
#: refuses them in a regimen's unit).
SPINE_LABELS = ("baseline", "pruned")

#: Conditions a phase's ``when`` may name: every patient, or those whose last wash-out verdict was
#: relapse / no relapse.
CONDITIONS = ("always", "relapsed", "remitted")

PHASES: dict[str, type[Phase]] = {}

#: Episode damage sized by state (family 068E fact 8e): share of live weights scarred =
#: clip(0.05 x severity, 0.02, 0.20) (the 0.05 is the study file's ``live``; the severity is
#: :func:`~virtualpatient.assessments.episode_severity`).
EPISODE_SHARE_RANGE = (0.02, 0.20)

#: Dose metrics (family 068A fact 7): an entry "turned over" when |post - pre| / max(|pre|, 1e-8)
#: exceeds 0.1; a weight counts as zero below 1e-8.
TURNOVER_THRESHOLD = 0.1
DOSE_FLOOR = 1e-8

#: Phases are frozen, validated, keyword-only dataclasses; floats refuse NaN and inf and every
#: number has finite bounds (:mod:`virtualpatient.limits`), as every protocol number does.
_phase = dataclass(frozen=True, config=ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False),
                   kw_only=True)


class TrainingDivergedError(VirtualPatientError, FloatingPointError):
    """A training step produced NaN or inf; the message names patients, arm, phase and epoch."""


def register_phase(name: str) -> Callable[[type[Phase]], type[Phase]]:
    """Class decorator: make a phase available to study files as ``phase = "<name>"``."""

    def deco(cls: type[Phase]) -> type[Phase]:
        if not (isinstance(cls, type) and issubclass(cls, Phase)):
            raise TypeError(f"{cls!r} is not a Phase subclass")
        PHASES[name] = cls
        cls.kind = name
        return cls

    return deco


# -- state ------------------------------------------------------------------------------------
@dataclasses.dataclass
class Group:
    """Patients (batch rows) that go through the schedule together, with what the schedule knows of them.

    A row is a patient, or after a fork a patient x branch of the fork (``keys`` says which, e.g.
    ``(("maintenance_epochs", 25),)``). Per row: the trial clock (training epochs since the
    lesion), the extra result columns (``tags``), the last wash-out verdict (``relapsed``: 1, 0 or
    NaN before any), remembered accuracies (``memory[label|condition]``, for drops), and per weight
    matrix the persistent ``scar`` mask (bool, or ``None`` while nothing is scarred). ``arm`` is the
    last treated arm (its wash-out rate applies).
    """

    batch: PatientBatch
    clock: list[float]
    keys: list[tuple]
    tags: list[dict[str, Any]]
    relapsed: list[float]
    memory: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    scar: list[torch.Tensor] | None = None
    arm: str | None = None
    #: Named weight-matrix snapshots (``snapshot`` phase), per matrix ``[P, out, in]``; kept within
    #: a unit of work (a regimen), not stored with the spine's state.
    snapshots: dict[str, list[torch.Tensor]] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(cls, batch: PatientBatch, clock: float = 0.0) -> Group:
        n = len(batch)
        return cls(batch, [clock] * n, [()] * n, [{} for _ in range(n)], [math.nan] * n)

    def __len__(self) -> int:
        return len(self.batch)

    def take(self, positions: Sequence[int], batch: PatientBatch | None = None) -> Group:
        """The rows at ``positions`` (repeats allowed), as a new group (``batch`` if already built)."""
        pos = list(positions)
        idx = torch.as_tensor(pos, dtype=torch.long)
        scar = None if self.scar is None else [s.index_select(0, idx.to(s.device)) for s in self.scar]
        snaps = {k: [w.index_select(0, idx.to(w.device)) for w in v] for k, v in self.snapshots.items()}
        return Group(batch if batch is not None else self.batch.select(pos), [self.clock[i] for i in pos],
                     [self.keys[i] for i in pos], [dict(self.tags[i]) for i in pos],
                     [self.relapsed[i] for i in pos], {k: [v[i] for i in pos] for k, v in self.memory.items()},
                     scar, self.arm, snaps)

    def clone(self) -> Group:
        return Group(self.batch.clone(), list(self.clock), list(self.keys), [dict(t) for t in self.tags],
                     list(self.relapsed), {k: list(v) for k, v in self.memory.items()},
                     None if self.scar is None else [s.clone() for s in self.scar], self.arm, dict(self.snapshots))

    def suffix(self, i: int) -> str:
        """The stream suffix of row ``i``: ``/<value>`` per fork it went through (empty before any)."""
        return "".join(f"/{v}" for _, v in self.keys[i])

    def noise(self, stream: str) -> NoiseSource:
        """Per-row noise: row ``i`` draws from its patient's ``stream + suffix(i)`` stream."""
        return NoiseSource([s.generator(stream + self.suffix(i)) for i, s in enumerate(self.batch.specs)])

    def add_scar(self, before: list[torch.Tensor]) -> None:
        """Scar every position that was alive in ``before`` (masks) and is pruned now."""
        new = [(b > 0) & (m == 0) for b, m in zip(before, self.batch.params.masks)]
        self.add_scar_positions(new)

    def add_scar_positions(self, new: list[torch.Tensor]) -> None:
        """Scar the given positions (per matrix, bool ``[P, out, in]``): masked, weight 0, never regrown."""
        self.scar = new if self.scar is None else [s | n for s, n in zip(self.scar, new)]
        with torch.no_grad():
            for m, n in zip(self.batch.params.masks, new):
                m[n] = 0.0
        self.batch.params.apply_masks()

    def meta(self, i: int) -> dict[str, Any]:
        """Row ``i``'s schedule state as plain data (stored with the spine's unit)."""
        return {"clock": self.clock[i], "relapsed": self.relapsed[i], "arm": self.arm,
                "memory": {k: v[i] for k, v in self.memory.items()},
                "scar": None if self.scar is None else [s[i].cpu() for s in self.scar]}

    @classmethod
    def from_meta(cls, batch: PatientBatch, metas: Sequence[dict[str, Any]]) -> Group:
        """Rebuild a group from :meth:`meta` records, one per patient of ``batch``."""
        group = cls.start(batch)
        group.clock = [float(m["clock"]) for m in metas]
        group.relapsed = [float(m["relapsed"]) for m in metas]
        group.arm = metas[0]["arm"] if metas else None
        group.memory = {k: [m["memory"][k] for m in metas] for k in (metas[0]["memory"] if metas else {})}
        if metas and metas[0]["scar"] is not None:
            group.scar = [torch.stack([m["scar"][j] for m in metas]).to(batch.device)
                          for j in range(len(metas[0]["scar"]))]
        return group


class Context:
    """What a unit of work knows while it runs a schedule: protocol, branch, cycle, streams, progress.

    Stream names are ``<branch>/<key>`` the first time a key is used in a unit and ``<branch>/<key>#n``
    for its n-th use by another phase execution (a repeat's cycles, a second treat), so repeated
    phases draw fresh numbers while the paper's schedule keeps its stream names. Names depend only on
    the schedule, never on which patients meet a condition, so a patient's numbers do not depend on
    batching.
    """

    def __init__(self, protocol, branch: str, tick: Tick = None) -> None:
        self.protocol = protocol
        self.branch = branch
        self.tick = tick
        self.cycle = 0
        self.labels: list[str] = []
        self.exec_id: tuple = ()
        self._streams: dict[str, list[tuple]] = {}
        #: Patient index -> weight matrices after its first acute course (for the weight figures).
        self.weights: dict[int, list[torch.Tensor]] = {}

    def stream(self, key: str, rooted: bool = True) -> str:
        """The stream name of ``key`` for the phase execution now running (``rooted``: under the branch)."""
        name = (self.branch if not key else f"{self.branch}/{key}") if rooted else key
        users = self._streams.setdefault(name, [])
        if self.exec_id not in users:
            users.append(self.exec_id)
        n = users.index(self.exec_id)
        return name if n == 0 else f"{name}#{n + 1}"

    def streams_state(self) -> dict[str, list[tuple]]:
        """Which phase executions have used each stream name so far (to continue a schedule elsewhere)."""
        return {name: list(users) for name, users in self._streams.items()}

    def restore_streams(self, state: dict[str, list[tuple]]) -> None:
        """Continue from :meth:`streams_state`: later phases then name their streams as in one run."""
        self._streams = {name: [tuple(u) for u in users] for name, users in state.items()}

    def on_epoch(self, n: int) -> Tick:
        """A per-epoch callback advancing the progress bar by ``n`` patient-epochs."""
        return None if self.tick is None else (lambda _epoch: self.tick(n))

    def guard(self, group: Group, what: str, fn: Callable[[], Any]) -> Any:
        """Run a training call; a NaN/inf loss becomes :class:`TrainingDivergedError` naming patients."""
        try:
            return fn()
        except NonFiniteError as exc:
            ids = sorted({group.batch.specs[i].index for i in exc.patients})
            raise TrainingDivergedError(
                f"training diverged (NaN/inf loss): patient(s) {ids}, arm {self.branch}, {what}, epoch {exc.epoch + 1}"
            ) from None

    def emit(self, group: Group, rows: list[Row], label: str, **extra: Any) -> list[Row]:
        """Tag rows (in blocks of one row per batch row, batch order) with arm, phase, clock, cycle, label."""
        n = len(group)
        path = "/".join([*self.labels, label])
        for i, r in enumerate(rows):
            pos = i % n
            r.update(arm=self.branch, phase=label, **group.tags[pos], **extra, time=group.clock[pos],
                     cycle=self.cycle, label=path, _key=group.keys[pos])
            if r.get("metric") == "accuracy" and not r.get("condition") == "internal_noise":
                group.memory.setdefault(f"{label}|{r['condition']}", [math.nan] * n)[pos] = r["value"]
        return rows

    def capture(self, group: Group) -> None:
        """Keep each unforked patient's weight matrices, the first time it is called for that patient."""
        for i, s in enumerate(group.batch.specs):
            if not group.keys[i] and s.index not in self.weights:
                self.weights[s.index] = [w[i].detach().cpu() for w in group.batch.params.weights]


def _per_cycle_values(v, lo: float, hi: float):
    """Validate a number or a non-empty list of numbers (one per repeat cycle) within [lo, hi]."""
    if v is None:
        return v
    values = v if isinstance(v, tuple) else (v,)
    if not values:
        raise ValueError("needs at least one value")
    if any(not (lo <= x <= hi) for x in values):
        raise ValueError(f"values must lie in [{lo}, {hi}]")
    return v


def at_cycle(value, ctx: Context, name: str):
    """A phase parameter's value now: a number as is, a list's entry for the repeat's cycle (1-based)."""
    if not isinstance(value, tuple):
        return value
    k = ctx.cycle
    if not 1 <= k <= len(value):
        raise ValueError(f"{name}: {len(value)} per-cycle values, but this is cycle {k} (lists need a repeat)")
    return value[k - 1]


# -- the phases -------------------------------------------------------------------------------
@_phase
class Phase:
    """Base class of schedule phases.

    Subclasses are frozen pydantic dataclasses (keyword-only fields) registered with
    :func:`register_phase`; a leaf phase implements :meth:`apply`, a container :meth:`run`.
    """

    #: The name a study file uses (set by :func:`register_phase`).
    kind: ClassVar[str] = ""
    label: str = "phase"
    when: Literal["always", "relapsed", "remitted"] = "always"

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        """Change ``group`` in place and return its result rows."""
        raise NotImplementedError

    def run(self, group: Group, ctx: Context) -> tuple[list[Group], list[Row]]:
        """Run on a group; return the groups it leaves (a fork may change them) and the rows."""
        rows = self.apply(group, ctx)
        return [group], rows

    def stream_keys(self) -> tuple[str, ...]:
        """Keys of the random streams a run draws from (registered even when no patient meets ``when``)."""
        return ()

    def declare(self, ctx: Context) -> None:
        """Register this phase's stream names as if it had run (no patient met its condition)."""
        for key in self.stream_keys():
            ctx.stream(key)

    def training_epochs(self, protocol) -> int:
        """Training epochs a patient goes through in this phase (for progress and the clock)."""
        return 0

    def children(self) -> tuple[Phase, ...]:
        """The phases of a block (a repeat's, a probe's); none for a leaf."""
        return ()

    def to_dict(self) -> dict[str, Any]:
        """The phase as a study-file table (unset defaults left out), nested phases included."""
        out: dict[str, Any] = {"phase": self.kind}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, tuple) and value and isinstance(value[0], Phase):
                value = [p.to_dict() for p in value]
            elif isinstance(value, dict):
                value = {k: [p.to_dict() for p in v] for k, v in value.items()}
            elif isinstance(value, tuple):
                value = list(value)
            if value is not None:
                out[f.name] = value
        return out


def _known_tests(v: tuple[str, ...]) -> tuple[str, ...]:
    unknown = [t for t in v if t not in ASSESSMENTS]
    if unknown:
        raise ValueError(f"unknown assessment(s) {unknown} (known: {', '.join(sorted(ASSESSMENTS))})")
    return v


@register_phase("train")
@_phase
class Train(Phase):
    """Training with a fresh Adam and locked masks (the healthy baseline: Methods; fact 1).

    ``epochs`` and ``lr`` default to ``protocol.baseline``; ``scale_lr`` applies each patient's
    ``lr_scale`` covariate (the baseline does not). The spine's training draws from the stream
    ``baseline``, a regimen's from ``<regimen>/baseline``.
    """

    label: str = "baseline training"
    epochs: int | None = Field(None, ge=0, le=MAX_EPOCHS)
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    scale_lr: bool = False
    stream: str = "baseline"

    def training_epochs(self, protocol) -> int:
        return protocol.baseline.epochs if self.epochs is None else self.epochs

    def stream_keys(self) -> tuple[str, ...]:
        return ()

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        cfg = ctx.protocol.baseline
        n = self.training_epochs(ctx.protocol)
        lr = cfg.lr if self.lr is None else self.lr
        stream = ctx.stream(self.stream, rooted=ctx.branch != SPINE)
        b = group.batch
        ctx.guard(group, self.label, lambda: b.train(n, lr, stream, scale_lr=self.scale_lr,
                                                      on_epoch=ctx.on_epoch(len(b))))
        group.clock = [c + n for c in group.clock]
        return []

    def declare(self, ctx: Context) -> None:
        ctx.stream(self.stream, rooted=ctx.branch != SPINE)


def _layers(protocol, which: str) -> list[int]:
    n = len(protocol.network.layer_sizes) - 1
    if which == "lesion":
        which = protocol.pruning.layers
    return list(range(n if which == "all" else n - 1))


@register_phase("lesion")
@_phase
class Lesion(Phase):
    """The depressive lesion: magnitude pruning of each patient to a sparsity (Methods; fact 7).

    ``fraction`` defaults to each patient's ``prune_fraction`` covariate, else
    ``protocol.pruning.fraction``; ``layers`` to ``protocol.pruning.layers`` (``"all"``: each matrix
    on its own; ``"hidden"``: one threshold over the hidden matrices, the text's reading). Instead of
    a fraction, ``further`` prunes that share of what remains (each chosen matrix to
    ``s + further (1 - s)``, as :class:`Stress` does). With ``scar`` the pruned positions become a
    persistent scar that regrowth may not undo. The first lesion of the spine is time 0 of the
    trial clock.
    """

    label: str = "lesion"
    fraction: float | None = Field(None, ge=0, lt=1)
    further: float | None = Field(None, gt=0, lt=1)
    layers: Literal["all", "hidden"] | None = None
    scar: bool = False

    @model_validator(mode="after")
    def _one_target(self) -> Lesion:
        if self.fraction is not None and self.further is not None:
            raise ValueError("give fraction (a sparsity) or further (a share of what remains), not both")
        return self

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        b = group.batch
        if self.further is not None:
            Stress(further=self.further, layers=self.layers or "lesion", scar=self.scar).apply(group, ctx)
            return []
        default = ctx.protocol.pruning.fraction if self.fraction is None else self.fraction
        fractions = [f if self.fraction is None and not math.isnan(f) else default
                     for f in b.covariate("prune_fraction")]
        which = self.layers or ctx.protocol.pruning.layers
        before = [m.clone() for m in b.params.masks]
        if which == "all":
            plasticity.prune_per_layer(b.params, fractions, exclude=group.scar)
        else:
            plasticity.prune_global(b.params, fractions, layers=_layers(ctx.protocol, "hidden"))
        if self.scar:
            group.add_scar(before)
        return []


@register_phase("stress")
@_phase
class Stress(Phase):
    """A stressor: prune a further share of what remains and/or train a while under internal noise.

    Pruning re-prunes each chosen matrix by magnitude to ``s + further (1 - s)`` (capped at ``cap``
    when given), ``s`` the patient's sparsity over those matrices, the quantile over all entries,
    zeros included, scars excluded (fact 11; the paper's acute relapse is ``further = 0.4,
    cap = 0.99``, ``protocol.relapse``). ``layers = "lesion"`` are the matrices the lesion prunes.
    Then ``epochs`` of Adam at ``lr`` with internal noise ``noise_sigma`` (its stream
    ``<regimen>/stress``). With ``scar`` the newly pruned positions become scars.

    ``live`` is the second relapse operator: each chosen matrix loses that share of its own *live*
    weights, the weakest first (:func:`~virtualpatient.plasticity.prune_weakest`; family 068A
    fact 6, ``live = 0.4``). With ``sized_by = "severity"`` the share is sized by each patient's
    state (family 068E fact 8d-e): severity ``= clip(1 + (g - 1) + activation_weight (A -
    activation_reference), *severity_range)`` from the effective gain ``g`` and the activation
    magnitude ``A``, share ``= clip(live x severity, *share_range)``; a ``severity`` row per patient
    is reported. ``min_count`` prunes at least that many live weights per matrix (068E: 1). With
    ``scar`` and ``when = "relapsed"`` this is 068E's episode scar.
    """

    label: str = "stress"
    further: float = Field(0.0, ge=0, lt=1)
    cap: float | None = Field(None, gt=0, lt=1)
    layers: Literal["lesion", "all", "hidden"] = "lesion"
    epochs: int = Field(0, ge=0, le=MAX_EPOCHS)
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    noise_sigma: float = Field(0.0, ge=0, le=MAX_NOISE)
    scar: bool = False
    live: float = Field(0.0, ge=0, le=1)
    min_count: int = Field(0, ge=0, le=MAX_STEPS)
    sized_by: Literal["fixed", "severity"] = "fixed"
    activation_weight: float = Field(SEVERITY_ACTIVATION_WEIGHT, ge=0, le=MAX_NOISE)
    activation_reference: float = Field(SEVERITY_ACTIVATION_REFERENCE, ge=0, le=MAX_NOISE)
    severity_range: tuple[float, float] = SEVERITY_RANGE
    share_range: tuple[float, float] = EPISODE_SHARE_RANGE

    @model_validator(mode="after")
    def _check(self) -> Stress:
        if self.further == 0 and self.epochs == 0 and self.live == 0:
            raise ValueError("a stress phase needs further or live > 0 (pruning) or epochs > 0 (noisy training)")
        if self.further > 0 and self.live > 0:
            raise ValueError("live: give further (a sparsity target) or live (a share of live weights), not both")
        if self.sized_by == "severity" and self.live == 0:
            raise ValueError("sized_by: 'severity' sizes live, which is 0")
        for name in ("severity_range", "share_range"):
            lo, hi = getattr(self, name)
            if not 0 <= lo <= hi:
                raise ValueError(f"{name}: need 0 <= low <= high, got ({lo}, {hi})")
        if self.share_range[1] > 1:
            raise ValueError("share_range: the high end is a share, at most 1")
        if self.epochs > 0 and self.lr is None:
            raise ValueError("noisy training (epochs > 0) needs lr")
        return self

    def training_epochs(self, protocol) -> int:
        return self.epochs

    def stream_keys(self) -> tuple[str, ...]:
        return ("stress",) if self.epochs else ()

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        b = group.batch
        if self.further > 0:
            layers = _layers(ctx.protocol, self.layers)
            s = b.params.sparsity(layers) / 100.0
            targets = [float(x) + self.further * (1.0 - float(x)) for x in s]
            if self.cap is not None:
                targets = [min(t, self.cap) for t in targets]
            before = [m.clone() for m in b.params.masks]
            plasticity.prune_per_layer(b.params, targets, layers=layers, exclude=group.scar)
            if self.scar:
                group.add_scar(before)
        rows: list[Row] = []
        if self.live > 0:
            shares = [self.live] * len(b)
            if self.sized_by == "severity":
                sev = self.severity(b)
                shares = [min(max(self.live * x, self.share_range[0]), self.share_range[1]) for x in sev]
                rows = ctx.emit(group, rows_for(b, "severity", sev), self.label)
            new = plasticity.prune_weakest(b.params, shares, layers=_layers(ctx.protocol, self.layers),
                                           exclude=group.scar, min_count=self.min_count)
            if self.scar:
                group.add_scar_positions(new)
        n = self.epochs
        if n:
            stream = ctx.stream("stress")
            mod = b.modulation
            b.modulation = mod.replace(noise_sigma=self.noise_sigma)
            try:
                ctx.guard(group, self.label, lambda: b.train(n, self.lr, stream, on_epoch=ctx.on_epoch(len(b))))
            finally:
                b.modulation = mod
            group.clock = [c + n for c in group.clock]
        return rows

    def severity(self, batch: PatientBatch) -> list[float]:
        """Per patient ``clip(1 + (g - 1) + w (A - ref), *severity_range)`` (068E fact 8d)."""
        return episode_severity(batch, self.activation_weight, self.activation_reference, self.severity_range)


@register_phase("treat")
@_phase
class Treat(Phase):
    """An arm's acute course: its :meth:`Treatment.apply` (facts 8-10), from the off-drug state.

    ``arm`` names an arm of the study's ``[arms]``. With ``fresh`` (default, as the paper) the
    course starts from the off-drug modulation (gain 1, damping 1, ReLU, no noise, no protection);
    ``fresh = false`` keeps the current one (a course on top of another). The course's streams are
    ``<regimen>/...`` (``<regimen>#n/...`` for the regimen's n-th course). Regrowth does not undo
    a scar.
    """

    label: str = "treat"
    arm: str
    fresh: bool = True

    def treatment(self, protocol) -> Treatment:
        return protocol.arms[self.arm]

    def training_epochs(self, protocol) -> int:
        return self.treatment(protocol).training_epochs()

    def stream_keys(self) -> tuple[str, ...]:
        return ("",)

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        treatment = self.treatment(ctx.protocol)
        b = group.batch
        if self.fresh:
            b.modulation = DISCONTINUED
        root = ctx.stream("")
        b.scar = group.scar  # read by regrowth (plasticity.regrow's ``blocked``)
        try:
            ctx.guard(group, "acute course", lambda: treatment.apply(b, root, ctx.on_epoch(len(b))))
        finally:
            del b.scar
        group.arm = self.arm
        group.clock = [c + treatment.training_epochs() for c in group.clock]
        ctx.capture(group)
        return []


@register_phase("assess")
@_phase
class Assess(Phase):
    """Run registered assessments (by name, in order) and report them under ``label``.

    Noise comes from the stream ``<regimen>/<stream>`` (default: the label). ``off_drug`` tests
    the patients with the drug's modulation switched off (gain 1, damping 1, ReLU; fact 12).
    ``drop_from`` adds a ``drop_metric`` row per patient: the ``drop_condition`` accuracy at the
    last ``drop_from`` assessment minus now (the paper's ``relapse_drop``, fact 11).
    """

    label: str = "assess"
    tests: tuple[str, ...] = ACUTE
    stream: str | None = None
    off_drug: bool = False
    drop_from: str | None = None
    drop_metric: str = "relapse_drop"
    drop_condition: str = "combined"

    @field_validator("tests")
    @classmethod
    def _tests(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _known_tests(v)

    def stream_keys(self) -> tuple[str, ...]:
        return (self.stream or self.label,)

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        b = group.batch
        if self.off_drug:
            b = b.with_modulation(DISCONTINUED.replace(protection=b.modulation.protection))
        noise = group.noise(ctx.stream(self.stream or self.label))
        rows: list[Row] = []
        b.scar = group.scar  # read by the scar_fraction assessment
        try:
            for name in self.tests:
                rows += ASSESSMENTS[name](b, noise)
        finally:
            del b.scar
        if self.drop_from is not None:
            key = f"{self.drop_from}|{self.drop_condition}"
            if key not in group.memory:
                raise ValueError(f"assess {self.label!r}: no earlier {self.drop_from!r} assessment of "
                                 f"{self.drop_condition!r} accuracy to compute {self.drop_metric} from")
            before = group.memory[key]
            after = [r["value"] for r in rows if r["metric"] == "accuracy" and r["condition"] == self.drop_condition]
            rows += [{"patient": s.index, "metric": self.drop_metric, "condition": "", "noise_sigma": math.nan,
                      "value": x - y} for s, x, y in zip(b.specs, before, after)]
        return ctx.emit(group, rows, self.label)


@register_phase("maintain")
@_phase
class Maintain(Phase):
    """Maintenance on drug under mood-stabiliser protection, then ``tests`` (fact 14).

    The patients train ``epochs`` at Adam ``lr`` (defaults: ``protocol.longitudinal``) with no
    internal noise and protection ``protection`` (``stabiliser = false``: none). Several durations
    fork each patient into one row per duration (column ``maintenance_epochs``); with ``nested``
    they are snapshots of one run of the longest, which gives the same numbers as separate runs
    (same start, same data order) for a fraction of the work.
    """

    label: str = "maintenance"
    epochs: int | tuple[int, ...] | None = None
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    stabiliser: bool = True
    protection: float | None = Field(None, ge=0, le=1)
    nested: bool | None = None
    tests: tuple[str, ...] = ("standard",)
    stream: str = "maintenance"

    @field_validator("tests")
    @classmethod
    def _tests(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _known_tests(v)

    @field_validator("epochs")
    @classmethod
    def _epochs(cls, v):
        if isinstance(v, int) and not 0 <= v <= MAX_EPOCHS:
            raise ValueError(f"Input should be between 0 and {MAX_EPOCHS}")
        if isinstance(v, tuple):
            if not v or len(v) > MAX_LEVELS:
                raise ValueError(f"needs 1 to {MAX_LEVELS} durations")
            if max(v) > MAX_EPOCHS:
                raise ValueError(f"durations must be <= {MAX_EPOCHS}")
            if any(d < 0 for d in v) or list(v) != sorted(set(v)):
                raise ValueError("durations must be >= 0, distinct and increasing")
        return v

    def durations(self, protocol) -> int | tuple[int, ...]:
        v = self.epochs
        return tuple(protocol.longitudinal.durations) if v is None else v

    def forks(self, protocol) -> bool:
        return isinstance(self.durations(protocol), tuple)

    def training_epochs(self, protocol) -> int:
        d = self.durations(protocol)
        if isinstance(d, int):
            return d
        nested = protocol.longitudinal.nested if self.nested is None else self.nested
        return max(d, default=0) if nested else sum(d)

    def stream_keys(self) -> tuple[str, ...]:
        return (self.stream,)

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        cfg = ctx.protocol.longitudinal
        lr = cfg.lr if self.lr is None else self.lr
        p = (cfg.protection if self.protection is None else self.protection) if self.stabiliser else 0.0
        nested = cfg.nested if self.nested is None else self.nested
        on = group.batch.clone()
        on.modulation = group.batch.modulation.replace(protection=p, noise_sigma=0.0)
        stream = ctx.stream(self.stream)
        tick = ctx.on_epoch(len(on))
        durations = self.durations(ctx.protocol)
        if isinstance(durations, int):
            ctx.guard(group, self.label, lambda: on.train(durations, lr, stream, on_epoch=tick))
            group.batch = on
            group.clock = [c + durations for c in group.clock]
            for t in group.tags:
                t["maintenance_epochs"] = durations
        else:
            if nested:
                snaps = ctx.guard(group, self.label, lambda: on.train(
                    max(durations), lr, stream, snapshots=durations, on_epoch=tick))
            else:
                snaps = {}
                for d in durations:
                    run = on.clone()
                    ctx.guard(group, f"{self.label} ({d} epochs)",
                              lambda run=run, d=d: run.train(d, lr, stream, on_epoch=tick))
                    snaps[d] = run.params
            # every duration x patient as one batch (one evaluation call per test; engine.batched.forward
            # splits a batch too large for EngineConfig.eval_max_bytes); each row keeps its noise stream
            n = len(on)
            repeat = list(range(n)) * len(durations)
            on.data  # noqa: B018 - loaded once here, so the forked batch shares it instead of regenerating it
            forked = on.select(repeat)
            forked.params = Params.cat([snaps[d] for d in durations])
            new = group.take(repeat, batch=forked)
            for j, d in enumerate(d for d in durations for _ in range(n)):
                new.keys[j] = (*new.keys[j], ("maintenance_epochs", d))
                new.tags[j]["maintenance_epochs"] = d
                new.clock[j] += d
            vars(group).update(vars(new))
        noise = group.noise(f"{stream}/assess")
        rows: list[Row] = []
        for name in self.tests:
            rows += ASSESSMENTS[name](group.batch, noise)
        return ctx.emit(group, rows, self.label)


@register_phase("discontinue")
@_phase
class Discontinue(Phase):
    """Stop the drug: abruptly (``steps = 0``, fact 14) or tapered over ``steps`` steps.

    The off-drug state is gain 1, damping 1, ReLU and no internal noise; protection is left to the
    wash-out. A taper moves gain, damping and internal noise linearly from the on-drug values to
    the off-drug ones, reaching them at step ``steps`` (a saturating activation switches back to
    ReLU at the last step); at each step it optionally trains ``epochs_per_step`` at ``lr``
    (default ``protocol.longitudinal.lr``) and reports ``gain``, ``damping`` and ``tests``
    (``step`` = 1..steps).
    """

    label: str = "taper"
    steps: int = Field(0, ge=0, le=MAX_STEPS)
    epochs_per_step: int = Field(0, ge=0, le=MAX_EPOCHS)
    lr: float | None = Field(None, gt=0, le=MAX_LR)
    tests: tuple[str, ...] = ("biased",)

    @field_validator("tests")
    @classmethod
    def _tests(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return _known_tests(v)

    def training_epochs(self, protocol) -> int:
        return self.steps * self.epochs_per_step

    def stream_keys(self) -> tuple[str, ...]:
        return (self.label,) if self.steps else ()

    @staticmethod
    def at(on: Modulation, step: int, steps: int) -> Modulation:
        """The modulation at taper step ``step`` of ``steps`` (0 = on drug, ``steps`` = off)."""
        off = DISCONTINUED.replace(protection=on.protection)
        if step >= steps:
            return off
        t = step / steps
        return on.replace(gain=on.gain + (off.gain - on.gain) * t, damping=on.damping + (off.damping - on.damping) * t,
                          noise_sigma=on.noise_sigma * (1.0 - t))

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        b = group.batch
        on = b.modulation
        if self.steps == 0:
            b.modulation = self.at(on, 0, 0)
            return []
        stream = ctx.stream(self.label)
        noise = group.noise(stream)
        lr = ctx.protocol.longitudinal.lr if self.lr is None else self.lr
        rows: list[Row] = []
        for k in range(1, self.steps + 1):
            b.modulation = self.at(on, k, self.steps)
            if self.epochs_per_step:
                ctx.guard(group, f"{self.label} step {k}", lambda k=k: b.train(
                    self.epochs_per_step, lr, f"{stream}/{k}", on_epoch=ctx.on_epoch(len(b))))
                group.clock = [c + self.epochs_per_step for c in group.clock]
            step_rows = ASSESSMENTS["gain"](b) + rows_for(b, "damping", [b.modulation.damping] * len(b))
            for name in self.tests:
                step_rows += ASSESSMENTS[name](b, noise)
            rows += ctx.emit(group, step_rows, self.label, step=k)
        return rows


@register_phase("washout")
@_phase
class Washout(Phase):
    """Wash-out of the mood stabiliser after discontinuation, and the relapse verdict (fact 14).

    Protection decays ``p = max(0, p - decay)`` for ``steps`` steps (defaults: the last treated
    arm's ``washout_decay``, ``protocol.longitudinal.washout_steps``); the biased (manic) test runs
    at step 0, every ``test_every`` steps and at the last step, reported with the ``protection``;
    at the last step ``relapsed`` is 1 when the biased accuracy is below ``threshold`` (default
    ``protocol.longitudinal.relapse_threshold``, percent). The verdict is what ``when`` conditions
    read. ``steps = 0, decay = 0`` is a one-off trigger test with a verdict (068E fact 8c).

    ``bias`` replaces the biased test's shift (default ``protocol.assessment.biased_shift``); a
    list gives one value per cycle of the enclosing repeat, cycle k using the k-th (family 068E
    fact 8: trigger bias 1.5, 1.3, ..., 0.5).
    """

    label: str = "washout"
    steps: int | None = Field(None, ge=0, le=MAX_STEPS)
    decay: float | None = Field(None, ge=0, le=1)
    test_every: int = Field(1, ge=1, le=MAX_STEPS)
    threshold: float | None = Field(None, ge=0, le=100)
    bias: float | tuple[float, ...] | None = None

    @field_validator("bias")
    @classmethod
    def _bias(cls, v):
        return _per_cycle_values(v, -MAX_NOISE, MAX_NOISE)

    def stream_keys(self) -> tuple[str, ...]:
        return ("washout",)

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        cfg = ctx.protocol.longitudinal
        steps = cfg.washout_steps if self.steps is None else self.steps
        threshold = cfg.relapse_threshold if self.threshold is None else self.threshold
        if self.decay is not None:
            rate = self.decay
        elif group.arm is not None:
            rate = ctx.protocol.arms[group.arm].washout_decay
        else:
            raise ValueError("a washout before any treat needs its own decay")
        b = group.batch
        mod = b.modulation
        levels = washout_schedule(mod.protection, rate, steps)
        shift = at_cycle(self.bias, ctx, "bias")
        noise = group.noise(ctx.stream("washout"))
        rows: list[Row] = []
        biased: list[Row] = []
        for step, p in enumerate(levels):
            if step % self.test_every and step != steps:
                continue
            at = b.with_modulation(mod.replace(protection=p))
            if shift is None:
                biased = ASSESSMENTS["biased"](at, noise)
            else:
                cfg = ctx.protocol.assessment
                acc = at.accuracy("standard", mod=at.modulation.replace(noise_sigma=0.0), noise=noise,
                                  biased=BiasedNoise(cfg.biased_sigma, shift))
                biased = rows_for(at, "accuracy", acc, "biased")
            rows += ctx.emit(group, biased, self.label, step=step)
            rows += ctx.emit(group, [dict(r, metric="protection", condition="", value=p) for r in biased],
                             self.label, step=step)
        verdict = [dict(r, metric="relapsed", condition="", value=float(r["value"] < threshold)) for r in biased]
        rows += ctx.emit(group, verdict, self.label, step=steps)
        group.relapsed = [r["value"] for r in verdict]
        b.modulation = mod.replace(protection=levels[-1])
        return rows


@register_phase("scar")
@_phase
class Scar(Phase):
    """A random lesion at the patient level that leaves a persistent scar (family 068E fact 3).

    Each patient draws ``f ~ Uniform(0, max_share)`` (the first draw of its stream
    ``<regimen>/<stream>``); in each weight matrix ``floor(f x entries)`` positions drawn uniformly
    among the positions not yet scarred (``among = "all"``, the notebook's reading: most are
    already pruned) or among the live ones (``among = "live"``, the text's "of the surviving
    weights") become scars: mask 0, weight 0, never regrown, left out of pruning quantiles. The
    draw ``f`` is reported as ``scar_draw``. ``share`` instead scars that fixed share.
    """

    label: str = "scar"
    max_share: float | None = Field(None, gt=0, le=1)
    share: float | None = Field(None, gt=0, le=1)
    among: Literal["all", "live"] = "all"
    stream: str = "scar"

    @model_validator(mode="after")
    def _one(self) -> Scar:
        if (self.max_share is None) == (self.share is None):
            raise ValueError("max_share: give max_share (a random share per patient) or share (a fixed one)")
        return self

    def stream_keys(self) -> tuple[str, ...]:
        return (self.stream,)

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        b = group.batch
        stream = ctx.stream(self.stream)
        gens = [spec.generator(stream + group.suffix(i)) for i, spec in enumerate(b.specs)]  # per row, as noise
        draws = [float(torch.rand((), generator=g)) * self.max_share if self.share is None else self.share
                 for g in gens]
        new = []
        for i, m in enumerate(b.params.masks):
            layer = torch.zeros_like(m, dtype=torch.bool)
            for p, (f, g) in enumerate(zip(draws, gens)):
                free = torch.ones_like(m[p], dtype=torch.bool) if group.scar is None else ~group.scar[i][p]
                if self.among == "live":
                    free &= m[p] > 0
                layer[p] = plasticity.random_positions(free, math.floor(f * m[p].numel()), g)
            new.append(layer)
        group.add_scar_positions(new)
        return ctx.emit(group, rows_for(b, "scar_draw", draws), self.label)


@register_phase("snapshot")
@_phase
class Snapshot(Phase):
    """Keep a copy of the weight matrices under ``name``, for a later ``dose`` phase (family 068A fact 5).

    A snapshot lives within a unit of work: take it in the regimen (or probe) that reads it.
    """

    label: str = "snapshot"
    name: str = "pre"

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        group.snapshots[self.name] = [w.detach().clone() for w in group.batch.params.weights]
        return []


@register_phase("dose")
@_phase
class Dose(Phase):
    """Dose metrics of the weight change since the snapshot ``since`` (family 068A fact 7).

    Over the weight matrices only (biases excluded), ``N`` entries in all, ``d = post - pre``:
    ``dose_l1 = sum |d| / N``; ``dose_l2 = sqrt(sum d^2) / N`` (the Euclidean norm over N, not an
    RMS); ``turnover`` = share of entries with ``|d| / max(|pre|, floor) > turnover_threshold``;
    ``sparsity_change`` = ``|z(post) - z(pre)|`` with ``z`` the share of entries with
    ``|w| < floor``. Shares are fractions (not percent), as the sheet prints them.
    """

    label: str = "dose"
    since: str = "pre"
    turnover_threshold: float = Field(TURNOVER_THRESHOLD, gt=0, le=MAX_NOISE)
    floor: float = Field(DOSE_FLOOR, gt=0, le=1)

    def apply(self, group: Group, ctx: Context) -> list[Row]:
        if self.since not in group.snapshots:
            raise ValueError(f"since: no snapshot {self.since!r} taken earlier in this regimen")
        pre = group.snapshots[self.since]
        post = [w.detach() for w in group.batch.params.weights]
        n = sum(w[0].numel() for w in post)
        l1 = sum((a - b).abs().flatten(1).double().sum(1) for a, b in zip(post, pre)) / n
        l2 = torch.sqrt(sum(((a - b).double() ** 2).flatten(1).sum(1) for a, b in zip(post, pre))) / n
        turn = sum(((a - b).abs() / b.abs().clamp_min(self.floor) > self.turnover_threshold).flatten(1).sum(1)
                   for a, b in zip(post, pre)).double() / n
        zeros = [sum((w.abs() < self.floor).flatten(1).sum(1) for w in ws).double() / n for ws in (post, pre)]
        b = group.batch
        rows = (rows_for(b, "dose_l1", l1) + rows_for(b, "dose_l2", l2) + rows_for(b, "turnover", turn)
                + rows_for(b, "sparsity_change", (zeros[0] - zeros[1]).abs()))
        return ctx.emit(group, rows, self.label)


def _block(v: tuple) -> tuple:
    if not v:
        raise ValueError("a block needs at least one phase")
    bad = [type(p).__name__ for p in v if not isinstance(p, Phase)]
    if bad:
        raise ValueError(f"a block holds phases, got {', '.join(bad)}")
    return tuple(v)


def _sort_by_fork(rows: list[Row]) -> list[Row]:
    return sorted(rows, key=lambda r: tuple(v for _, v in r["_key"]))


@register_phase("repeat")
@_phase
class Repeat(Phase):
    """Run a block of phases ``times`` times in a row; the rows of cycle k carry ``cycle = k`` (1-based)."""

    label: str | None = None
    times: int = Field(..., ge=1, le=MAX_STEPS)
    phases: tuple[Any, ...] = ()

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: tuple) -> tuple:
        return _block(v)

    def children(self) -> tuple[Phase, ...]:
        return self.phases

    def training_epochs(self, protocol) -> int:
        return self.times * sum(p.training_epochs(protocol) for p in self.phases)

    def run(self, group: Group, ctx: Context) -> tuple[list[Group], list[Row]]:
        groups, rows = [group], []
        outer_cycle, base = ctx.cycle, ctx.exec_id
        if self.label:
            ctx.labels.append(self.label)
        try:
            for k in range(1, self.times + 1):
                ctx.cycle, ctx.exec_id = k, (*base, k)
                groups, r = run_schedule(self.phases, groups, ctx)
                rows += r
        finally:
            ctx.cycle, ctx.exec_id = outer_cycle, base
            if self.label:
                ctx.labels.pop()
        return groups, rows

    def declare(self, ctx: Context) -> None:
        base = ctx.exec_id
        for k in range(1, self.times + 1):
            ctx.exec_id = (*base, k)
            _declare_all(self.phases, ctx)
        ctx.exec_id = base


@register_phase("probe")
@_phase
class Probe(Phase):
    """Run a block of phases on a copy of the patients; their state afterwards is as before.

    A side experiment from the current state: the paper's follow-up (maintenance, discontinuation,
    wash-out) and its acute-relapse challenge both start from the post-acute state. The block's
    rows are ordered by fork branch (e.g. by maintenance duration).
    """

    label: str | None = None
    phases: tuple[Any, ...] = ()

    @field_validator("phases")
    @classmethod
    def _phases(cls, v: tuple) -> tuple:
        return _block(v)

    def children(self) -> tuple[Phase, ...]:
        return self.phases

    def training_epochs(self, protocol) -> int:
        return sum(p.training_epochs(protocol) for p in self.phases)

    def run(self, group: Group, ctx: Context) -> tuple[list[Group], list[Row]]:
        if self.label:
            ctx.labels.append(self.label)
        try:
            _, rows = run_schedule(self.phases, [group.clone()], ctx)
        finally:
            if self.label:
                ctx.labels.pop()
        return [group], _sort_by_fork(rows)

    def declare(self, ctx: Context) -> None:
        _declare_all(self.phases, ctx)


@_phase
class Fork(Phase):
    """The end of the spine in a Python schedule: regimen name -> its phases (a study file's ``[[regimens.NAME]]``)."""

    label: str = "fork"
    regimens: dict[str, tuple[Any, ...]]

    @field_validator("regimens")
    @classmethod
    def _regimens(cls, v: dict) -> dict:
        return {name: _block(tuple(phases)) for name, phases in v.items()}


# -- running ----------------------------------------------------------------------------------
def _meets(group: Group, when: str) -> list[int]:
    if when == "always":
        return list(range(len(group)))
    want = 1.0 if when == "relapsed" else 0.0
    return [i for i, r in enumerate(group.relapsed) if r == want]


def _declare_all(phases: Sequence[Phase], ctx: Context) -> None:
    base = ctx.exec_id
    for i, phase in enumerate(phases):
        ctx.exec_id = (*base, i)
        phase.declare(ctx)
    ctx.exec_id = base


def run_schedule(phases: Sequence[Phase], groups: list[Group], ctx: Context,
                 start: int = 0) -> tuple[list[Group], list[Row]]:
    """Run ``phases`` in order on every group; a conditional phase splits a group by its ``when``.

    ``start`` skips the phases before it (the groups are already past them): every later phase keeps
    its place, so its random streams are named as in a run from the first phase.

    Returns
    -------
    (groups, rows)
        The groups after the schedule and the rows, in the order the phases emitted them (each row
        with a private ``_key`` the caller removes).
    """
    rows: list[Row] = []
    base = ctx.exec_id
    try:
        for i, phase in enumerate(phases):
            if i < start:
                continue
            ctx.exec_id = (*base, i)
            after: list[Group] = []
            ran = False
            for g in groups:
                meet = _meets(g, phase.when)
                if not meet:
                    after.append(g)
                    continue
                ran = True
                if len(meet) == len(g):
                    out, r = phase.run(g, ctx)
                    after += out
                else:
                    rest = [j for j in range(len(g)) if j not in set(meet)]
                    out, r = phase.run(g.take(meet), ctx)
                    after += [*out, g.take(rest)]
                rows += r
            if not ran:
                phase.declare(ctx)
            groups = after
    finally:
        ctx.exec_id = base
    return groups, rows


# -- building and checking --------------------------------------------------------------------
def _format(exc: pydantic.ValidationError) -> list[tuple[str, str]]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            msg = "unknown key"
        elif err["type"] == "missing_keyword_only_argument" or err["type"] == "missing":
            msg = "missing (required)"
        else:
            msg = err["msg"].removeprefix("Value error, ")
        out.append((loc, msg))
    return out


def _build(spec: Any, where: str, blocks: dict[str, list[Phase]], problems: list[str]) -> list[Phase]:
    """Build one phase (or a block's phases) from study-file data, appending ``where: problem`` lines."""
    if isinstance(spec, Phase):
        return [spec]
    if not isinstance(spec, dict):
        problems.append(f"{where}: a phase must be a table with a 'phase' key, got {type(spec).__name__}")
        return []
    params = dict(spec)
    kind = params.pop("phase", None)
    if kind == "block":
        name = params.pop("name", None)
        if params:
            problems.append(f"{where}: a block reference takes only 'name' (got {', '.join(sorted(params))})")
        if name not in blocks:
            problems.append(f"{where}.name: unknown block {name!r} (defined: {', '.join(sorted(blocks)) or 'none'})")
            return []
        return list(blocks[name])
    if kind not in PHASES:
        problems.append(f"{where}.phase: unknown phase {kind!r} (known: {', '.join(sorted([*PHASES, 'block']))})")
        return []
    cls = PHASES[kind]
    if cls in (Repeat, Probe):
        block = params.pop("block", None)
        inner = params.pop("phases", None)
        if (block is None) == (inner is None):
            problems.append(f"{where}: a {kind} needs either 'block' (a name in [blocks]) or 'phases' (a list)")
            return []
        if block is not None:
            if block not in blocks:
                known = ", ".join(sorted(blocks)) or "none"
                problems.append(f"{where}.block: unknown block {block!r} (defined: {known})")
                return []
            params["phases"] = tuple(blocks[block])
        elif not isinstance(inner, list):
            problems.append(f"{where}.phases: must be a list of phases")
            return []
        else:
            before = len(problems)
            built = [p for j, s in enumerate(inner) for p in _build(s, f"{where}.phases[{j}]", blocks, problems)]
            if len(problems) > before:
                return []
            params["phases"] = tuple(built)
    try:
        return [cls(**params)]
    except pydantic.ValidationError as exc:
        problems += [f"{where}{'.' + loc if loc else ''}: {msg}" for loc, msg in _format(exc)]
    except TypeError as exc:
        problems.append(f"{where}: {exc}")
    return []


def build_phase(spec: dict[str, Any]) -> Phase:
    """One phase from its study-file table (``{"phase": "washout", "steps": 10}``).

    Raises
    ------
    ValueError
        For an unknown phase or invalid parameters, one ``field: problem`` per fault.
    """
    problems: list[str] = []
    built = _build(spec, "", {}, problems)
    if problems:
        raise ValueError("; ".join(p.removeprefix(".").removeprefix(": ") for p in problems))
    return built[0]


def build_schedule(schedule: Any, regimens: Any, blocks: Any) -> tuple[tuple | None, dict | None, list[str]]:
    """Build the spine and regimens of a study file (``[[schedule]]``, ``[[regimens.NAME]]``, ``[[blocks.NAME]]``).

    Returns
    -------
    (spine, regimens, problems)
        ``None`` where the file gives none (the paper's), and one ``place: problem`` line per fault.
    """
    problems: list[str] = []
    built_blocks: dict[str, list[Phase]] = {}
    if blocks is not None:
        if not isinstance(blocks, dict):
            problems.append("blocks: must be a table of name -> list of phases")
        else:
            for name, phases in blocks.items():
                if not isinstance(phases, list) or not phases:
                    problems.append(f"blocks.{name}: must be a non-empty list of phases ([[blocks.{name}]])")
                    continue
                built_blocks[name] = [p for j, s in enumerate(phases)
                                      for p in _build(s, f"blocks.{name}[{j}]", built_blocks, problems)]

    def phase_list(value: Any, where: str) -> tuple:
        if not isinstance(value, (list, tuple)):
            problems.append(f"{where}: must be a list of phases ([[{where}]] tables)")
            return ()
        return tuple(p for j, s in enumerate(value) for p in _build(s, f"{where}[{j}]", built_blocks, problems))

    spine = None if schedule is None else phase_list(schedule, "schedule")
    if spine and isinstance(spine[-1], Fork):
        if regimens is not None:
            problems.append("schedule: ends in a fork and [regimens] are given as well; use one of them")
        regimens, spine = dict(spine[-1].regimens), spine[:-1]
    built_regimens = None
    if regimens is not None:
        if not isinstance(regimens, dict):
            problems.append("regimens: must be a table of regimen name -> list of phases")
        else:
            built_regimens = {name: phase_list(v, f"regimens.{name}") for name, v in regimens.items()}
    return spine, built_regimens, problems


def _walk(phases: Sequence[Phase], where: str):
    for i, p in enumerate(phases):
        yield p, f"{where}[{i}]"
        if p.children():
            yield from _walk(p.children(), f"{where}[{i}].phases")


def check_schedule(spine: Sequence[Phase], regimens: dict[str, Sequence[Phase]], arms: dict[str, Any]) -> list[str]:
    """Check a schedule against the study's arms; one ``place: problem`` line per fault.

    Faults: a regimen without phases or with a name that cannot be a folder, a treat of an arm the
    study does not define, a washout with no earlier treat (its decay rate) and no ``decay``, a
    conditional phase or ``drop_from`` with nothing earlier to read, a ``dose`` with no snapshot
    earlier in its regimen, a fork in the spine (the
    spine's end state must be one per patient), a fork anywhere but at the end of a Python spine.
    """
    from virtualpatient.names import check_distinct, check_name

    problems: list[str] = []
    for p, where in _walk(spine, "schedule"):
        if isinstance(p, Maintain) and isinstance(p.__dict__["epochs"], tuple) and not _inside_probe(spine, p):
            problems.append(f"{where}: several maintenance durations fork the cohort; forks belong in a "
                            "regimen or a probe, not in the spine")
    for name in regimens:
        try:
            check_name(name, "regimen")
            if name.lower() in {"baseline", SPINE}:
                raise ValueError(f"regimen name {name!r} is reserved (the spine's unit and rows use it)")
        except (TypeError, ValueError) as exc:
            problems.append(f"regimens.{name}: {exc}")
    try:
        check_distinct(list(regimens), "regimen")
    except ValueError as exc:
        problems.append(f"regimens: {exc}")
    for name, phases in regimens.items():
        for p, where in _walk(phases, f"regimens.{name}"):
            if p.label in SPINE_LABELS:
                problems.append(f"{where}.label: {p.label!r} is reserved for the spine's rows")
    tracks = [("schedule", list(spine), None)] + [(f"regimens.{n}", list(r), n) for n, r in regimens.items()]
    spine_state = _flow(spine, "schedule", arms, {"treated": False, "verdict": False, "labels": set(),
                                                  "snapshots": set()}, problems)
    for where, phases, _ in tracks[1:]:
        if not phases:
            problems.append(f"{where}: a regimen needs at least one phase")
        elif not any(isinstance(p, (Assess, Maintain, Washout, Dose)) or (isinstance(p, Discontinue) and p.steps)
                     for p, _ in _walk(phases, where)):
            problems.append(f"{where}: a regimen must measure something (an assess, maintain, washout, taper or dose)")
        # a snapshot lives within a unit of work: the spine's do not reach a regimen
        _flow(phases, where, arms, dict(spine_state, labels=set(spine_state["labels"]), snapshots=set()), problems)
    for p, where in [w for t in tracks for w in _walk(t[1], t[0])]:
        if isinstance(p, Fork):
            problems.append(f"{where}: a fork may only end the top-level schedule")
    return problems


def _inside_probe(phases: Sequence[Phase], target: Phase) -> bool:
    for p in phases:
        if isinstance(p, Probe) and any(q is target for q, _ in _walk(p.phases, "")):
            return True
        if isinstance(p, Repeat) and _inside_probe(p.phases, target):
            return True
    return False


def _flow(phases: Sequence[Phase], where: str, arms: dict, state: dict, problems: list[str]) -> dict:
    """Walk phases in run order, tracking what earlier phases made available."""
    for i, p in enumerate(phases):
        here = f"{where}[{i}]"
        if p.when != "always" and not state["verdict"]:
            problems.append(f"{here}.when: {p.when!r} reads a wash-out verdict, but no washout runs before it")
        if isinstance(p, Treat):
            if p.arm not in arms:
                problems.append(f"{here}.arm: arm {p.arm!r} is not defined in [arms] (defined: {', '.join(arms)})")
            state["treated"] = True
        elif isinstance(p, Washout):
            if p.decay is None and not state["treated"]:
                problems.append(f"{here}: washout before any treat (give decay, or treat first)")
            state["verdict"] = True
        elif isinstance(p, Assess):
            if p.drop_from is not None and p.drop_from not in state["labels"]:
                problems.append(f"{here}.drop_from: no assess labelled {p.drop_from!r} runs before it")
            state["labels"].add(p.label)
        elif isinstance(p, Snapshot):
            state["snapshots"].add(p.name)
        elif isinstance(p, Dose):
            if p.since not in state["snapshots"]:
                problems.append(f"{here}.since: no snapshot named {p.since!r} is taken before it in this regimen")
        elif isinstance(p, Probe):
            _flow(p.phases, f"{here}.phases", arms, dict(state, labels=set(state["labels"]),
                                                          snapshots=set(state["snapshots"])), problems)
        elif isinstance(p, Repeat):
            state = _flow(p.phases, f"{here}.phases", arms, state, problems)
    return state


# -- the paper's schedule ---------------------------------------------------------------------
def paper_spine(protocol) -> tuple[Phase, ...]:
    """The paper's shared phases (fact 15): baseline training, its test, the lesion, untreated assessments."""
    return (
        Train(),
        Assess(label="baseline", tests=("standard", "clean")),
        Lesion(),
        Assess(label="pruned", tests=ACUTE, stream="assess"),
    )


def paper_regimen(protocol, arm: str) -> tuple[Phase, ...]:
    """The paper's course of one arm (facts 11-15), every number from ``protocol``.

    Treatment, acute assessments; a probe of maintenance for each duration, abrupt discontinuation
    and wash-out; for a state-dependent arm the tests off medication; a probe of the acute-relapse
    stressor (a further ``protocol.relapse.further_fraction`` of the remaining weights, capped at
    ``max_sparsity``) with the drop in combined accuracy.
    """
    out: list[Phase] = [Treat(arm=arm), Assess(label="acute", tests=ACUTE, stream="assess")]
    if protocol.longitudinal.durations:
        out.append(Probe(phases=(Maintain(), Discontinue(), Washout())))
    if protocol.arms[arm].state_dependent:
        out.append(Assess(label="off_medication", tests=OFF_MEDICATION, stream="off", off_drug=True))
    out.append(Probe(phases=(
        Stress(further=protocol.relapse.further_fraction, cap=protocol.relapse.max_sparsity),
        Assess(label="acute_relapse", tests=("sparsity", "combined"), stream="relapse", drop_from="acute"),
    )))
    return tuple(out)


def arms_used(phases: Sequence[Phase]) -> set[str]:
    """The arms whose courses ``phases`` give (the ``arm`` of every treat, nested ones included).

    >>> sorted(arms_used([Treat(arm="ssri"), Repeat(times=2, phases=(Treat(arm="ketamine"),))]))
    ['ketamine', 'ssri']
    """
    return {p.arm for p, _ in _walk(phases, "") if isinstance(p, Treat)}


def resolve(protocol) -> tuple[tuple[Phase, ...], dict[str, tuple[Phase, ...]]]:
    """The study's spine and regimens: its own, else the paper's built from the protocol's sections."""
    spine = paper_spine(protocol) if protocol.schedule is None else tuple(protocol.schedule)
    if protocol.regimens is None:
        regimens = {arm: paper_regimen(protocol, arm) for arm in protocol.arms}
    else:
        regimens = {name: tuple(phases) for name, phases in protocol.regimens.items()}
    return spine, regimens


def trained_prefix(spine: Sequence[Phase], protocol) -> int:
    """The number of leading spine phases before the first lesion, if they train (else 0).

    They compute the same patients whatever the lesion's depth, so a lesion sweep with shared
    baselines trains them once and starts every other level's spine from their end state
    (:func:`virtualpatient.sweeps.trained_key`). A phase that holds a lesion inside it ends the prefix.

    >>> trained_prefix([Train(epochs=20), Assess(label="baseline"), Lesion(), Assess(label="pruned")], None)
    2
    """
    for i, p in enumerate(spine):
        if any(isinstance(q, Lesion) for q, _ in _walk([p], "")):
            return i if any(q.training_epochs(protocol) for q in spine[:i]) else 0
    return 0


def clock_origin(spine: Sequence[Phase], protocol) -> float:
    """The trial clock at the start: minus the training epochs before the spine's first lesion."""
    before = 0
    for p in spine:
        if isinstance(p, Lesion):
            return -float(before)
        before += p.training_epochs(protocol)
    return 0.0
