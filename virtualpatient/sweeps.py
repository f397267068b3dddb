"""Sweeps and replication: one study file, many settings of the protocol, one tidy table.

A sweep varies protocol fields, each named by its dotted path (``pruning.fraction``,
``arms.ssri.gain_end``, ``arms.*.washout_decay`` for every arm that has the field), over a list or
a range; several fields form a grid (every combination) or are zipped (level by level).
Replication runs the same study as K independent cohorts. Each level is an ordinary study: it runs
as a :class:`~virtualpatient.trial.ClinicalTrial` into its own run folder under the sweep's,
so a level resumes, spreads over workers and validates like any run; and the sweep's rows equal a
separate run of the level's protocol bit for bit.

In a study file::

    [sweep]
    mode = "grid"                       # or "zip", or "each" (one field at a time)
    baseline = "shared"                 # every level's patients start from the same trained networks
    cohorts = 1                         # K > 1: K independent cohorts of every level
    [sweep.fields]
    "pruning.fraction" = {start = 0.80, stop = 0.99, num = 20}
    "arms.*.washout_decay" = [0.002, 0.008, 0.015]

``baseline = "shared"`` (default) gives every level the study seed, so patient k's baseline network
(its initialisation, data and training) is the same at every level and only what the level
changes differs: what a lesion sweep needs. ``"fresh"`` gives each level its own seed, derived from
the study seed and the level's settings: independent patients per level. Cohort 0 is the study
seed itself; cohort k > 0 has a seed derived from it, so a replication's first cohort equals the
plain study.

Each level's folder is named by a hash of its settings (``levels/L<hash>``), never by user text,
so adding values to a sweep and running it again on the same folder computes only the new levels.

Examples
--------
>>> from virtualpatient.protocol import Protocol
>>> spec = SweepSpec(fields={"pruning.fraction": {"start": 0.9, "stop": 0.95, "num": 2}})
>>> [lv.values for lv in expand(Protocol(), spec)]
[{'pruning.fraction': 0.9}, {'pruning.fraction': 0.95}]
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pydantic
from pydantic import ConfigDict, Field, field_validator
from pydantic.dataclasses import dataclass as pydantic_dataclass

from virtualpatient.limits import MAX_LEVELS, MAX_PATIENTS, MAX_SEED
from virtualpatient.protocol import Protocol, ProtocolError, read_study

__all__ = ["Level", "Plan", "SweepSpec", "cohort_seed", "expand", "load_plan", "run_sweep"]

#: Protocol fields a sweep may not vary: labels and where it runs, not what it computes.
UNSWEPT = frozenset({"name", "device"})


@pydantic_dataclass(frozen=True, config=ConfigDict(extra="forbid", allow_inf_nan=False))
class SweepSpec:
    """What a sweep varies and how (the ``[sweep]`` table of a study file).

    Parameters
    ----------
    fields
        Dotted protocol path -> a list of values, or a range ``{start, stop, num}`` (``num`` evenly
        spaced values from ``start`` to ``stop`` inclusive). ``arms.*.FIELD`` sets FIELD in every arm
        that has it. Empty for a replication alone.
    mode
        ``"grid"``: every combination of the fields' values; ``"zip"``: the i-th value of every
        field together (all lists of one length); ``"each"``: one field at a time, the others at
        the study's values (a dose-response per field; the others' columns are empty on its rows).
    baseline
        ``"shared"``: every level uses the study seed (the same trained baseline networks);
        ``"fresh"``: each level its own derived seed.
    cohorts
        Independent cohorts of every level (replication); seeds derived from the study seed.
    regimens
        ``"all"`` (default): every level runs every regimen. ``"swept"``: a level that changes only
        fields of named arms (``arms.X.FIELD``, no wildcard) runs only the regimens that treat with
        those arms; the others would repeat the study's own numbers at every level (068A's
        per-arm dose sweeps, ``mode = "each"``). Each regimen draws its own random streams, so its
        rows are the same either way.
    """

    fields: dict[str, Any] = pydantic.Field(default_factory=dict)
    mode: Literal["grid", "zip", "each"] = "grid"
    baseline: Literal["shared", "fresh"] = "shared"
    cohorts: int = Field(1, ge=1, le=MAX_PATIENTS)
    regimens: Literal["all", "swept"] = "all"

    @field_validator("fields")
    @classmethod
    def _fields(cls, v: dict[str, Any]) -> dict[str, Any]:
        out = {}
        for path, values in v.items():
            if path.split(".")[0] in UNSWEPT:
                raise ValueError(f"{path!r}: a sweep cannot vary the study's {path.split('.')[0]}")
            out[path] = tuple(_values(path, values))
        return out

    def levels(self) -> list[dict[str, Any]]:
        """The settings of each level, in order (before cohorts)."""
        if not self.fields:
            return [{}]
        paths = list(self.fields)
        if self.mode == "each":
            return [{p: value} for p in paths for value in self.fields[p]]
        if self.mode == "zip":
            lengths = {len(self.fields[p]) for p in paths}
            if len(lengths) > 1:
                raise ValueError(f"zip needs value lists of one length, got {', '.join(map(str, sorted(lengths)))}")
            combos = zip(*(self.fields[p] for p in paths))
        else:
            combos = itertools.product(*(self.fields[p] for p in paths))
        return [dict(zip(paths, combo)) for combo in combos]


def _values(path: str, values: Any) -> list[Any]:
    if isinstance(values, dict):
        unknown = set(values) - {"start", "stop", "num"}
        if unknown or set(values) != {"start", "stop", "num"}:
            raise ValueError(f"{path!r}: a range is {{start, stop, num}}, got keys {sorted(values)}")
        start, stop, num = values["start"], values["stop"], values["num"]
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in (start, stop)) or \
                not isinstance(num, int) or isinstance(num, bool):
            raise ValueError(f"{path!r}: a range needs numbers start, stop and an integer num")
        if not (math.isfinite(start) and math.isfinite(stop)) or not 1 <= num <= MAX_LEVELS:
            raise ValueError(f"{path!r}: a range needs finite start and stop and 1 <= num <= {MAX_LEVELS}")
        # rounded to 12 significant digits, so 0.1-steps print and hash as the numbers people wrote
        return [float(f"{x:.12g}") for x in np.linspace(start, stop, num)]
    if not isinstance(values, (list, tuple)) or not values:
        raise ValueError(f"{path!r}: needs a non-empty list of values or a range {{start, stop, num}}")
    if len(values) > MAX_LEVELS:
        raise ValueError(f"{path!r}: at most {MAX_LEVELS} values, got {len(values)}")
    if len({json.dumps(v, sort_keys=True) for v in values}) != len(values):
        raise ValueError(f"{path!r}: values must be distinct")
    return list(values)


@dataclass(frozen=True)
class Level:
    """One level of a sweep: its folder name, the swept values, the cohort and the resolved protocol."""

    name: str
    values: dict[str, Any]
    cohort: int
    protocol: Protocol


@dataclass(frozen=True)
class Plan:
    """A study file's protocol and, if it has one, its sweep."""

    protocol: Protocol
    sweep: SweepSpec | None
    source: str = "study"

    def levels(self, max_levels: int | None = MAX_LEVELS) -> list[Level]:
        """The levels to run (one plain level when the study has no sweep)."""
        if self.sweep is None:
            return [Level("study", {}, 0, self.protocol)]
        return expand(self.protocol, self.sweep, self.source, max_levels=max_levels)


def cohort_seed(study_seed: int, cohort: int, salt: str = "") -> int:
    """The seed of cohort ``cohort`` (cohort 0 without salt: the study seed itself).

    Derived with :class:`numpy.random.SeedSequence` from the study seed, the cohort and a salt
    (a level's settings, for ``baseline = "fresh"``), so seeds never depend on how many cohorts or
    levels there are.
    """
    if cohort == 0 and not salt:
        return study_seed
    key = int.from_bytes(hashlib.sha256(f"{cohort}/{salt}".encode()).digest()[:8], "little")
    state = np.random.SeedSequence(study_seed, spawn_key=(0x5EED, key)).generate_state(2, np.uint64)
    return int(state[0]) & MAX_SEED


def _set(data: dict[str, Any], path: str, value: Any, source: str) -> None:
    keys = path.split(".")
    if keys[0] == "arms" and len(keys) == 3 and keys[1] == "*":
        targets = [arm for arm in data["arms"].values() if keys[2] in arm]
        if not targets:
            raise ProtocolError(f"{source}: sweep.fields.{path}: no arm has a field {keys[2]!r}")
        for arm in targets:
            arm[keys[2]] = value
        return
    node = data
    for depth, key in enumerate(keys):
        if not isinstance(node, dict) or key not in node:
            where = ".".join(keys[:depth + 1])
            raise ProtocolError(f"{source}: sweep.fields.{path}: {where!r} is not a protocol field")
        if depth == len(keys) - 1:
            node[key] = value
        else:
            node = node[key]


def expand(protocol: Protocol, spec: SweepSpec, source: str = "study",
           max_levels: int | None = MAX_LEVELS) -> list[Level]:
    """Resolve a sweep into its levels, each validated as a protocol of its own.

    Raises
    ------
    ProtocolError
        A path names no protocol field, a value is refused by its field (the message names the
        level), zip lists differ in length, or there are more than ``max_levels`` levels
        (``None``: no limit; the command line lifts it with ``--yes``).
    """
    try:
        settings = spec.levels()
    except ValueError as exc:
        raise ProtocolError(f"{source}: sweep: {exc}") from None
    n = len(settings) * spec.cohorts
    if max_levels is not None and n > max_levels:
        raise ProtocolError(f"{source}: sweep: {n} levels x cohorts, more than {max_levels}; "
                            "narrow it, or pass --yes to run them all")
    base = protocol.to_dict(complete=True)
    base.pop("interpretations", None)
    levels = []
    for values in settings:
        data = copy.deepcopy(base)
        for path, value in values.items():
            _set(data, path, value, source)
        label = ", ".join(f"{p} = {v}" for p, v in values.items()) or "the study"
        for cohort in range(spec.cohorts):
            salt = json.dumps(values, sort_keys=True) if spec.baseline == "fresh" else ""
            data_c = dict(data, seed=cohort_seed(protocol.seed, cohort, salt))
            level_protocol = Protocol.from_dict(data_c, source=f"{source}: sweep level {label}")
            if spec.regimens == "swept":
                level_protocol = _swept_regimens(level_protocol, values, f"{source}: sweep level {label}")
            digest = hashlib.sha256(json.dumps([values, cohort, spec.baseline], sort_keys=True,
                                               default=str).encode()).hexdigest()[:12]
            levels.append(Level(f"L{digest}", dict(values), cohort, level_protocol))
    return levels


def _swept_regimens(protocol: Protocol, values: dict[str, Any], source: str) -> Protocol:
    """``protocol`` with only the regimens that treat with an arm whose fields ``values`` set."""
    from virtualpatient.phases import arms_used, resolve

    keys = [path.split(".") for path in values]
    if not keys or not all(k[0] == "arms" and k[1] != "*" for k in keys):
        return protocol  # a level that changes more than named arms' fields runs everything
    swept = {k[1] for k in keys}
    spine, regimens = resolve(protocol)
    kept = {name: phases for name, phases in regimens.items() if arms_used(phases) & swept}
    if not kept:
        raise ProtocolError(f"{source}: sweep.regimens = 'swept': no regimen treats with {', '.join(sorted(swept))}")
    return protocol.replace(schedule=spine, regimens=kept)


def _settings_hash(protocol: Protocol, phases: Sequence, leave_out: tuple[str, ...]) -> str:
    """A hash of the protocol's settings without ``leave_out`` and the arms ``phases`` never treat
    with, and of ``phases``: what those phases compute from."""
    from virtualpatient.phases import arms_used

    used = arms_used(phases)
    data = protocol.to_dict(complete=True)
    for key in leave_out:
        data.pop(key, None)
    data["arms"] = {name: arm for name, arm in data["arms"].items() if name in used}
    data["phases"] = [p.to_dict() for p in phases]
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def spine_key(protocol: Protocol) -> str:
    """A hash of everything a protocol's spine computes from: the protocol without its regimens and
    without the arms the spine never treats with. Two levels with equal keys have equal spines
    (baseline training, lesion, untreated rows), so a sweep of arm fields trains them once."""
    from virtualpatient.phases import resolve

    spine, _ = resolve(protocol)
    return _settings_hash(protocol, spine, ("regimens", "interpretations", "n_patients", "device", "compare_with"))


def trained_key(protocol: Protocol) -> str | None:
    """A hash of everything the spine's training (its phases before the lesion,
    :func:`~virtualpatient.phases.trained_prefix`) computes from, or ``None`` when it trains nothing
    before a lesion. The lesion's settings are left out: two levels of a lesion sweep with shared
    baselines have equal keys, so the second starts each patient's spine from the first one's
    trained network instead of training it again."""
    from virtualpatient.phases import resolve, trained_prefix

    spine, _ = resolve(protocol)
    k = trained_prefix(spine, protocol)
    if not k:
        return None
    return _settings_hash(protocol, spine[:k], ("regimens", "schedule", "interpretations", "device", "compare_with",
                                                "pruning"))


def reused_spine_epochs(levels: Sequence[Level]) -> list[int]:
    """Per level, the spine's training epochs per patient that an earlier level of the same sweep has
    already run (the whole spine for an equal :func:`spine_key`, the training before the lesion for
    an equal :func:`trained_key`), so a run's estimate counts each only once."""
    from virtualpatient.phases import resolve, trained_prefix

    spines: set[str] = set()
    trained: set[str | None] = {None}
    out = []
    for level in levels:
        spine, _ = resolve(level.protocol)
        skey, tkey = spine_key(level.protocol), trained_key(level.protocol)
        if skey in spines:
            done = spine
        elif tkey in trained:  # None (nothing trained before a lesion) gives an empty prefix
            done = spine[:trained_prefix(spine, level.protocol)]
        else:
            done = ()
        out.append(sum(p.training_epochs(level.protocol) for p in done))
        spines.add(skey)
        trained.add(tkey)
    return out


def _adopt_spines(source: Path, target: Path, protocol: Protocol) -> None:
    """Copy the finished spine units of ``source`` (a level with the same :func:`spine_key`) that
    ``target`` lacks, through the store's checks, so the level does not train them again."""
    from virtualpatient.store import RunStore

    origin = RunStore(source)
    with RunStore(target).session(protocol) as store:
        for patient in range(protocol.n_patients):
            if origin.has("baseline", patient) and not store.has("baseline", patient):
                unit = origin.load_unit("baseline", patient)
                store.save_weights("untreated", patient, unit["state"]["weights"])
                store.save_unit("baseline", patient, unit)


def load_plan(path: str | Path, **overrides: Any) -> Plan:
    """Read a study file that may hold a ``[sweep]`` table; validate the protocol and every level.

    Examples
    --------
    >>> plan = load_plan("studies/quick.toml")          # doctest: +SKIP
    >>> plan.sweep is None                              # doctest: +SKIP
    True
    """
    data = read_study(path)
    sweep = data.pop("sweep", None)
    data.update(overrides)
    protocol = Protocol.from_dict(data, source=str(path))
    if sweep is None:
        return Plan(protocol, None, str(path))
    if not isinstance(sweep, dict):
        raise ProtocolError(f"{path}: sweep: must be a table")
    try:
        spec = SweepSpec(**sweep)
    except pydantic.ValidationError as exc:
        problems = []
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"])
            msg = "unknown key" if err["type"] in ("unexpected_keyword_argument", "extra_forbidden") else \
                err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: sweep.{where}: {msg}")
        raise ProtocolError("\n".join(problems)) from None
    except TypeError as exc:
        raise ProtocolError(f"{path}: sweep: {exc}") from None
    return Plan(protocol, spec, str(path))


def run_sweep(plan: Plan, out: str | Path | None = None, *, executor=None, patients_per_unit: int | None = None,
              progress: bool = True, max_levels: int | None = MAX_LEVELS,
              levels: Sequence[Level] | None = None):
    """Run (or resume) every level of a plan and return one tidy table.

    Each level runs as its own :class:`~virtualpatient.trial.ClinicalTrial` into
    ``out/levels/<level name>/`` (in memory when ``out`` is ``None``); its rows gain one column per
    swept field and a ``cohort`` column. The sweep's own folder holds a manifest of the base
    protocol (so a folder of another study is refused) and the assembled ``results.csv``.

    Examples
    --------
    >>> results = run_sweep(load_plan("studies/pruning_cliff.toml"), out="runs/cliff")  # doctest: +SKIP
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from virtualpatient.names import inside
    from virtualpatient.schema import LEVELS_FILE, tag_level
    from virtualpatient.store import RunStore
    from virtualpatient.trial import ClinicalTrial

    levels = list(levels) if levels is not None else plan.levels(max_levels)
    paths = list(plan.sweep.fields) if plan.sweep is not None else []
    store = RunStore(out)
    frames = []
    spines: dict[str, Path] = {}  # spine key -> a level folder that holds those spines
    # trained key -> patient -> its trained, not yet lesioned state, for keys of levels whose spines
    # differ (equal spines are adopted whole)
    keys = [trained_key(level.protocol) for level in levels]
    spine_keys = [spine_key(level.protocol) for level in levels]
    spines_of: dict[str, set[str]] = {}
    for tkey, skey in zip(keys, spine_keys):
        if tkey is not None:
            spines_of.setdefault(tkey, set()).add(skey)
    trained: dict[str, dict[int, dict]] = {tkey: {} for tkey, skeys in spines_of.items() if len(skeys) > 1}
    with store.session(plan.protocol):
        plan_record = {"fields": paths, "levels": [{"name": lv.name, "values": lv.values, "cohort": lv.cohort}
                                                   for lv in levels]}
        store.write_json(LEVELS_FILE, {**plan_record, "finished": False})
        bar = tqdm(levels, desc="levels", unit="level", disable=not progress or len(levels) < 2, dynamic_ncols=True)
        for level, tkey, key in zip(bar, keys, spine_keys):
            bar.set_postfix_str(", ".join(f"{p}={v}" for p, v in level.values.items()) or f"cohort {level.cohort}")
            folder = None if store.path is None else inside(store.path, "levels", level.name)
            trial = ClinicalTrial(level.protocol, executor=executor, patients_per_unit=patients_per_unit,
                                  progress=progress and len(levels) < 2)
            if folder is not None and key in spines:
                _adopt_spines(spines[key], folder, level.protocol)
            trial.trained = trained.get(tkey)
            frame = trial.run(out=folder)
            if folder is not None:
                spines.setdefault(key, folder)
            frames.append(tag_level(frame, paths, level.values, level.cohort))
        result = pd.concat(frames, ignore_index=True)
        store.write_results(result)
        store.write_json(LEVELS_FILE, {**plan_record, "finished": True})  # results.csv is this plan's
    return result
