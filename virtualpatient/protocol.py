"""The study configuration: every number of the paper's protocol as a named default.

A :class:`Protocol` is a tree of frozen dataclasses. Each default is a protocol fact of the paper
(Cheung 2026, *Modeling antidepressant-induced manic switch and longitudinal relapse*), either
stated in its Methods or, where the text is silent or disagrees with how the published tables were
produced, read from the published notebook (``docs/protocol.md`` lists each fact and its source;
the DESIGN facts are cited below as "fact N"). Where the text reads differently, a field selects the
text's reading; :attr:`Protocol.interpretations` reports those fields.

Studies are TOML files whose tables mirror the dataclasses (see ``studies/``); loading validates
every field at once and reports each invalid one by its path.

Examples
--------
>>> from virtualpatient.protocol import Protocol
>>> p = Protocol()
>>> p.network.layer_sizes
(2, 512, 512, 256, 4)
>>> p.replace(n_patients=3).n_patients
3
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import tomllib
from pathlib import Path
from typing import Any, Literal

import pydantic
from pydantic import ConfigDict, Field, field_validator, model_validator
from pydantic.dataclasses import dataclass

from virtualpatient.cohort import STATE_COVARIATES, CohortConfig
from virtualpatient.errors import VirtualPatientError
from virtualpatient.limits import (
    MAX_EPOCHS,
    MAX_GAIN,
    MAX_LAYER_UNITS,
    MAX_LAYERS,
    MAX_LEVELS,
    MAX_LR,
    MAX_NOISE,
    MAX_PATIENTS,
    MAX_POSITION,
    MAX_SAMPLES,
    MAX_SEED,
    MAX_STEPS,
    MAX_STUDY_BYTES,
)
from virtualpatient.names import check_distinct, check_name
from virtualpatient.schema import PAPER_PHASES, PUBLISHED_SHEETS, UNTREATED

__all__ = [
    "AssessmentConfig",
    "BaselineConfig",
    "CohortConfig",
    "LongitudinalConfig",
    "NetworkConfig",
    "PruningConfig",
    "Protocol",
    "ProtocolError",
    "RelapseConfig",
    "StabiliserConfig",
    "TaskConfig",
    "load_study",
    "read_study",
]

#: Every protocol table refuses unknown keys, and every float refuses NaN and inf.
_STRICT = ConfigDict(extra="forbid", allow_inf_nan=False)

#: Names an arm may not take: the untreated group and the phases its rows are tagged with
#: (``docs/results-schema.md``); an arm called ``baseline`` would also share the baseline's unit folder.
RESERVED_ARM_NAMES = frozenset({UNTREATED, *PAPER_PHASES})

class ProtocolError(VirtualPatientError, ValueError):
    """A study file or protocol value is invalid; the message names every offending field."""


@dataclass(frozen=True, config=_STRICT)
class NetworkConfig:
    """Architecture: 2 inputs, hidden layers of 512, 512 and 256 units, 4 outputs (Methods)."""

    layer_sizes: tuple[int, ...] = (2, 512, 512, 256, 4)

    @field_validator("layer_sizes")
    @classmethod
    def _sizes(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if len(v) < 3 or any(n < 1 for n in v):
            raise ValueError("needs an input, at least one hidden and an output size, all >= 1")
        if len(v) > MAX_LAYERS + 2 or max(v) > MAX_LAYER_UNITS:
            raise ValueError(f"at most {MAX_LAYERS} hidden layers of at most {MAX_LAYER_UNITS} units each, "
                             f"got {len(v) - 2} layers, the widest {max(v)}")
        return v

    @property
    def n_hidden(self) -> int:
        """Number of hidden layers."""
        return len(self.layer_sizes) - 2


@dataclass(frozen=True, config=_STRICT)
class TaskConfig:
    """The four-blob task and its test sets (Methods; fact 2 for set sizes and the clean set).

    Training points are drawn at ``train_sd`` around the centres; the paper's "noise-free" means
    no *internal* noise, so the default is the sd 0.8 set (fact 2). ``train_sd = 0`` is the literal
    reading of the text.
    """

    centres: tuple[tuple[float, float], ...] = ((-3.0, -3.0), (3.0, 3.0), (-3.0, 3.0), (3.0, -3.0))
    n_train: int = Field(12_000, ge=1, le=MAX_SAMPLES)
    train_sd: float = Field(0.8, ge=0, le=MAX_NOISE)
    n_standard: int = Field(4_000, ge=1, le=MAX_SAMPLES)
    standard_sd: float = Field(0.8, ge=0, le=MAX_NOISE)
    n_clean: int = Field(2_000, ge=1, le=MAX_SAMPLES)
    clean_sd: float = Field(0.0, ge=0, le=MAX_NOISE)

    @field_validator("centres")
    @classmethod
    def _centres(cls, v: tuple[tuple[float, float], ...]) -> tuple[tuple[float, float], ...]:
        if not 2 <= len(v) <= MAX_LEVELS:
            raise ValueError(f"needs 2 to {MAX_LEVELS} class centres, got {len(v)}")
        if any(abs(c) > MAX_POSITION for centre in v for c in centre):
            raise ValueError(f"centre coordinates must lie in [-{MAX_POSITION:g}, {MAX_POSITION:g}]")
        if len(set(v)) != len(v):
            raise ValueError("class centres must be distinct")
        return v


@dataclass(frozen=True, config=_STRICT)
class BaselineConfig:
    """Baseline training: 20 epochs of Adam at 1e-3, mini-batches of 128 (Methods; fact 1)."""

    epochs: int = Field(20, ge=0, le=MAX_EPOCHS)
    lr: float = Field(1e-3, gt=0, le=MAX_LR)
    batch_size: int = Field(128, ge=1, le=MAX_SAMPLES)


@dataclass(frozen=True, config=_STRICT)
class PruningConfig:
    """The depressive lesion: magnitude pruning to 95 % sparsity (Methods; fact 7).

    ``layers = "all"`` prunes each of the four weight matrices to the fraction on its own (fact 7,
    how the tables were made); ``"hidden"`` is the text's reading (only the matrices into the three
    hidden layers). Biases are never pruned.
    """

    fraction: float = Field(0.95, ge=0, lt=1)
    layers: Literal["all", "hidden"] = "all"


@dataclass(frozen=True, config=_STRICT)
class AssessmentConfig:
    """Test conditions (Methods; facts 4-6).

    Combined stress adds N(0, ``combined_input_sd``) to the inputs and internal noise
    ``combined_internal_sigma``; the resilience curve sweeps internal noise over ``resilience_sigmas``;
    the biased (manic) test adds ``biased_sigma * N(0, 1) + biased_shift`` after each activation.
    A state-dependent arm is also tested off medication at ``off_medication_sigmas`` (fact 12).
    The ``input_noise`` test adds N(0, sd^2) to the inputs at each of ``input_noise_sds``, no
    internal noise (family Ch02 fact 6: 1.0 and 2.0).
    """

    combined_input_sd: float = Field(1.0, ge=0, le=MAX_NOISE)
    combined_internal_sigma: float = Field(0.5, ge=0, le=MAX_NOISE)
    resilience_sigmas: tuple[float, ...] = (0.0, 0.5, 1.0, 1.5, 2.5)
    off_medication_sigmas: tuple[float, ...] = (2.5,)
    input_noise_sds: tuple[float, ...] = (1.0, 2.0)
    biased_sigma: float = Field(1.0, ge=0, le=MAX_NOISE)
    biased_shift: float = Field(1.0, ge=-MAX_NOISE, le=MAX_NOISE)

    @field_validator("resilience_sigmas", "off_medication_sigmas", "input_noise_sds")
    @classmethod
    def _sigmas(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v or any(s < 0 for s in v):
            raise ValueError("needs at least one noise level, all >= 0")
        if len(v) > MAX_LEVELS or max(v) > MAX_NOISE:
            raise ValueError(f"at most {MAX_LEVELS} noise levels, each at most {MAX_NOISE:g}")
        return v


@dataclass(frozen=True, config=_STRICT)
class StabiliserConfig:
    """The mood-stabiliser guard rail (Methods; fact 13).

    With protection ``p > 0`` the effective gain is capped at
    ``max(gain_floor, gain_floor + (1 - p) (g - gain_floor))``, each hidden layer is shifted by
    ``-inhibition * p``, and the biased-noise shift is scaled by ``1 - noise_shift_factor * p``.
    """

    inhibition: float = Field(0.15, ge=0, le=MAX_NOISE)
    noise_shift_factor: float = Field(0.3, ge=0, le=1)
    gain_floor: float = Field(1.05, gt=0, le=MAX_GAIN)


@dataclass(frozen=True, config=_STRICT)
class RelapseConfig:
    """Acute relapse: prune a further 40 % of the remaining weights (Methods; fact 11)."""

    further_fraction: float = Field(0.4, ge=0, lt=1)
    max_sparsity: float = Field(0.99, gt=0, lt=1)


@dataclass(frozen=True, config=_STRICT)
class LongitudinalConfig:
    """Maintenance, discontinuation and wash-out (Methods; fact 14).

    Each duration starts from the arm's post-acute state with full protection, trains at Adam
    ``lr``, discontinues (gain 1, damping 1, ReLU), then decays protection by the arm's
    ``washout_decay`` for ``washout_steps`` steps; a biased-noise accuracy below
    ``relapse_threshold`` (percent) at the end counts as relapse.
    """

    durations: tuple[int, ...] = (25, 50, 100, 150, 200, 300)
    lr: float = Field(1e-6, gt=0, le=MAX_LR)
    protection: float = Field(1.0, ge=0, le=1)
    washout_steps: int = Field(50, ge=0, le=MAX_STEPS)
    relapse_threshold: float = Field(60.0, ge=0, le=100)
    nested: bool = True

    @field_validator("durations")
    @classmethod
    def _durations(cls, v: tuple[int, ...]) -> tuple[int, ...]:
        if any(d < 0 for d in v) or any(d > MAX_EPOCHS for d in v):
            raise ValueError(f"maintenance durations must lie in [0, {MAX_EPOCHS}] epochs")
        if len(v) > MAX_LEVELS:
            raise ValueError(f"at most {MAX_LEVELS} maintenance durations, got {len(v)}")
        if list(v) != sorted(set(v)):
            raise ValueError("maintenance durations must be distinct and increasing")
        return v


#: Fields added since run folders were first written, which :meth:`Protocol.to_dict` leaves out while
#: at their default (``("arms", key)``: a parameter of any arm). A new field whose default changes
#: nothing belongs here, so that existing run folders keep their protocol hash.
LATER_FIELDS: tuple[tuple[str, str], ...] = (("assessment", "input_noise_sds"), ("arms", "regrow_min"))


def _default_arms() -> dict[str, Any]:
    from virtualpatient.treatments import default_arms

    return default_arms()


@dataclass(frozen=True, config=_STRICT)
class Protocol:
    """A whole study: cohort, task, lesion, arms, assessments and schedule.

    Parameters
    ----------
    name
        A label for reports.
    seed
        The study seed; every random stream of every patient is spawned from it.
    n_patients
        Cohort size (the paper's ten seeds are ten patients).
    arms
        Arm name -> treatment. In a study file each arm is a table whose ``treatment`` key names a
        registered treatment (default: the arm's own name) and whose other keys are that
        treatment's parameters. The paper's arms are ``ketamine``, ``ssri`` and ``neurosteroid``.
    device
        ``"cpu"`` or ``"cuda"``; the same code runs on both.
    schedule
        The spine: phases every patient goes through before the regimens fork (a study file's
        ``[[schedule]]`` tables; see ``docs/schedules.md``). ``None``: the paper's (baseline
        training, lesion, untreated assessments; fact 15).
    regimens
        Regimen name -> its phases (``[[regimens.NAME]]``); each runs on its own copy of the
        spine's patients and names the results' ``arm``. ``None``: the paper's course for every arm.
    compare_with
        A family sheet with published numbers (:data:`~virtualpatient.schema.PUBLISHED_SHEETS`,
        e.g. ``"068C"``) that the report puts beside this study's (``analysis.family``). It changes
        no number, so it is not part of :meth:`hash`.

    Examples
    --------
    >>> p = load_study("studies/quick.toml")  # doctest: +SKIP
    >>> list(p.arms)  # doctest: +SKIP
    ['ketamine', 'ssri', 'neurosteroid']
    """

    name: str = "manic_switch"
    seed: int = Field(0, ge=0, le=MAX_SEED)
    n_patients: int = Field(10, ge=1, le=MAX_PATIENTS)
    network: NetworkConfig = dataclasses.field(default_factory=NetworkConfig)
    task: TaskConfig = dataclasses.field(default_factory=TaskConfig)
    baseline: BaselineConfig = dataclasses.field(default_factory=BaselineConfig)
    pruning: PruningConfig = dataclasses.field(default_factory=PruningConfig)
    assessment: AssessmentConfig = dataclasses.field(default_factory=AssessmentConfig)
    stabiliser: StabiliserConfig = dataclasses.field(default_factory=StabiliserConfig)
    relapse: RelapseConfig = dataclasses.field(default_factory=RelapseConfig)
    longitudinal: LongitudinalConfig = dataclasses.field(default_factory=LongitudinalConfig)
    cohort: CohortConfig = dataclasses.field(default_factory=CohortConfig)
    arms: dict[str, Any] = dataclasses.field(default_factory=_default_arms)
    device: Literal["cpu", "cuda"] = "cpu"
    schedule: tuple[Any, ...] | None = None
    regimens: dict[str, tuple[Any, ...]] | None = None
    compare_with: Literal[PUBLISHED_SHEETS] | None = None  # type: ignore[valid-type]

    @field_validator("schedule", mode="before")
    @classmethod
    def _build_schedule(cls, v: Any) -> tuple[Any, ...] | None:
        return None if v is None else _phases(v, "schedule")

    @field_validator("regimens", mode="before")
    @classmethod
    def _build_regimens(cls, v: Any) -> dict[str, tuple[Any, ...]] | None:
        if v is None:
            return None
        if not isinstance(v, dict):
            raise ValueError("must be a table of regimen name -> list of phases")
        return {name: _phases(phases, f"regimens.{name}") for name, phases in v.items()}

    @field_validator("arms", mode="before")
    @classmethod
    def _build_arms(cls, v: Any) -> dict[str, Any]:
        from virtualpatient.treatments import build_treatment

        if not isinstance(v, dict) or not v:
            raise ValueError("needs at least one arm, as a table of arm name -> treatment")
        arms, problems = {}, []
        for name, spec in v.items():
            try:
                check_name(name, "arm")
                if name.lower() in RESERVED_ARM_NAMES:
                    raise ValueError(f"arm name {name!r} is reserved (it names a phase or the untreated group)")
                arms[name] = build_treatment(name, spec)
            except (ValueError, TypeError) as exc:
                problems.append(f"{name}: {exc}")
        if problems:
            raise ValueError("; ".join(problems))
        check_distinct(arms, "arm")
        return arms

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_name(v, "study")

    @model_validator(mode="after")
    def _check(self) -> Protocol:
        if self.network.layer_sizes[0] != 2 or self.network.layer_sizes[-1] != len(self.task.centres):
            raise ValueError(
                "network.layer_sizes must start with 2 inputs and end with one output per task centre"
            )
        if self.schedule is not None or self.regimens is not None:
            from virtualpatient.phases import check_schedule, resolve

            problems = check_schedule(*resolve(self), self.arms)
            if problems:
                raise ValueError("\n".join(problems))
        return self

    # ----------------------------------------------------------------------------------------
    def replace(self, **changes: Any) -> Protocol:
        """Return a copy with top-level fields replaced (validated again)."""
        return Protocol(**{**{f.name: getattr(self, f.name) for f in dataclasses.fields(self)}, **changes})

    def to_dict(self, *, complete: bool = False) -> dict[str, Any]:
        """The resolved protocol as plain JSON-able data (arms with their full parameters).

        Fields added since run folders were first written are left out while at their default (so
        the hash of an older study is unchanged); ``complete=True`` keeps every field, e.g. to list
        what a sweep may vary.
        """
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "arms":
                out["arms"] = {name: t.to_dict() for name, t in value.items()}
            elif f.name in ("schedule", "regimens"):
                continue
            elif f.name == "compare_with":
                if value is not None:  # absent when unset: older studies keep their saved protocol
                    out[f.name] = value
            elif dataclasses.is_dataclass(value):
                out[f.name] = _plain(dataclasses.asdict(value))
            else:
                out[f.name] = value
        # Fields added after run folders were first written are left out while at their default, so a
        # protocol that does not use them hashes as before they existed (run folders made then resume).
        for name in STATE_COVARIATES if not complete else ():
            if out["cohort"].get(name) is None:
                out["cohort"].pop(name, None)
        for section, key in LATER_FIELDS if not complete else ():
            owners = self.arms.items() if section == "arms" else [(None, getattr(self, section))]
            for arm, owner in owners:
                table = out["arms"][arm] if arm is not None else out[section]
                field = type(owner).__pydantic_fields__.get(key)
                if field is not None and key in table and _plain(table[key]) == _plain(field.default):
                    del table[key]
        out.update(self._schedule_dict())
        out["interpretations"] = self.interpretations
        return out

    def _schedule_dict(self) -> dict[str, Any]:
        """The schedule as plain data, leaving out what equals the paper's default (built from the
        protocol's sections): a study that spells out the paper's schedule has the default's hash,
        and so does every run folder made before schedules existed."""
        if self.schedule is None and self.regimens is None:
            return {}
        from virtualpatient.phases import paper_regimen, paper_spine

        out: dict[str, Any] = {}
        if self.schedule is not None:
            spine = [p.to_dict() for p in self.schedule]
            if spine != [p.to_dict() for p in paper_spine(self)]:
                out["schedule"] = spine
        if self.regimens is not None:
            regimens = {name: [p.to_dict() for p in phases] for name, phases in self.regimens.items()}
            default = {arm: [p.to_dict() for p in paper_regimen(self, arm)] for arm in self.arms}
            if regimens != default:
                out["regimens"] = regimens
        return out

    def hash(self) -> str:
        """A short hash of what each patient computes; equal protocols give equal hashes.

        ``device`` and ``n_patients`` are left out: where it runs does not change the numbers, and
        patient ``i``'s numbers do not depend on how many others there are (its random streams are
        its own), so a run folder can be resumed with a larger cohort.
        """
        data = self.to_dict()
        data.pop("device")
        data.pop("n_patients")
        data.pop("compare_with", None)
        blob = json.dumps(data, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @property
    def interpretations(self) -> dict[str, Any]:
        """The fields where the paper's text and the published notebook differ, with their values.

        ``docs/protocol.md`` explains each; the defaults are the notebook's (how the tables were made).
        """
        return {
            "task.train_sd": self.task.train_sd,
            "pruning.layers": self.pruning.layers,
            **{
                f"arms.{name}.{key}": value
                for name, t in self.arms.items()
                for key, value in t.interpretations().items()
            },
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "protocol") -> Protocol:
        """Build and validate a protocol from nested plain data (as read from TOML or JSON).

        Raises
        ------
        ProtocolError
            One line per invalid field, each naming the field by its dotted path.
        """
        data = dict(data)
        data.pop("interpretations", None)
        problems: list[str] = []
        if any(key in data for key in ("schedule", "regimens", "blocks")):
            from virtualpatient.phases import build_schedule

            spine, regimens, bad = build_schedule(data.pop("schedule", None), data.pop("regimens", None),
                                                  data.pop("blocks", None))
            problems += [f"{source}: {line}" for line in bad]
            if not bad:
                data.update(schedule=spine, regimens=regimens)
        try:
            protocol = cls(**data)
        except pydantic.ValidationError as exc:
            raise ProtocolError("\n".join([*problems, _format_errors(exc, source)])) from None
        except TypeError as exc:  # e.g. a table where a scalar belongs
            raise ProtocolError("\n".join([*problems, f"{source}: {exc}"])) from None
        if problems:
            raise ProtocolError("\n".join(problems))
        return protocol


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isinf(value):
        return str(value)
    return value


def _phases(value: Any, where: str) -> tuple[Any, ...]:
    """Phases from a list of phase objects or study-file tables (see :mod:`virtualpatient.phases`)."""
    from virtualpatient.phases import Fork, build_schedule

    if not isinstance(value, (list, tuple)):
        raise ValueError("must be a list of phases")
    if value and isinstance(value[-1], Fork):
        raise ValueError("a Fork ends a schedule given to ClinicalTrial; a Protocol takes regimens= instead")
    spine, _, problems = build_schedule(list(value), None, None)
    if problems:
        raise ValueError("; ".join(p.removeprefix("schedule") for p in problems))
    return spine


def _format_errors(exc: pydantic.ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        path = ".".join(str(p) for p in err["loc"]) or "(study)"
        msg = err["msg"]
        if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
            msg = "unknown key"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        if not err["loc"] and msg.startswith(("schedule", "regimens")):
            # schedule checks name their own places, one per line
            lines += [f"{source}: {line}" for line in msg.splitlines()]
            continue
        lines.append(f"{source}: {path}: {msg}")
    return "\n".join(lines)


def load_study(path: str | Path, **overrides: Any) -> Protocol:
    """Read and validate a TOML study file.

    Parameters
    ----------
    path
        The study file.
    **overrides
        Top-level fields to replace after loading, e.g. ``n_patients=3``.

    Raises
    ------
    ProtocolError
        If the file is missing, too large, not UTF-8, not valid TOML, sets nothing (an empty study is
        almost always a mistake, not a request for the defaults), or any field is invalid; the
        message names the file and each field.

    Examples
    --------
    >>> p = load_study("studies/quick.toml", n_patients=2)  # doctest: +SKIP
    """
    data = read_study(path)
    if "sweep" in data:
        raise ProtocolError(f"{path}: has a [sweep] table; run it with 'virtualpatient run' "
                            "(or virtualpatient.sweeps.load_plan from Python)")
    data.update(overrides)
    return Protocol.from_dict(data, source=str(path))


def read_study(path: str | Path) -> dict[str, Any]:
    """The tables of a TOML study file, checked to be a readable, non-empty study (not yet validated).

    Raises
    ------
    ProtocolError
        The file is missing, a folder, too large, not UTF-8, not valid TOML, or sets nothing.
    """
    path = Path(path)
    try:
        if path.is_dir():
            raise ProtocolError(f"{path}: is a folder, not a study file")
        with path.open("rb") as fh:
            raw = fh.read(MAX_STUDY_BYTES + 1)
    except OSError as exc:
        raise ProtocolError(f"{path}: cannot read study file ({exc.strerror or exc})") from None
    if len(raw) > MAX_STUDY_BYTES:
        raise ProtocolError(f"{path}: larger than {MAX_STUDY_BYTES:,} bytes; not a study file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"{path}: not UTF-8 text (byte {exc.start}); save the study file as UTF-8") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ProtocolError(f"{path}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ProtocolError(f"{path}: not valid TOML (nested too deeply)") from None
    if not data:
        raise ProtocolError(f"{path}: the study file sets nothing; to run the paper's protocol, leave out the study "
                            "file (virtualpatient reproduce without --study)")
    return data
