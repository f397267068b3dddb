"""Cohorts of virtual patients: who they are and where their randomness comes from.

A :class:`PatientSpec` is everything that distinguishes one patient before any training: its index,
the study seed its random streams are spawned from, and its covariates (pruning depth, plasticity
reserve, drug and stabiliser response). Covariates are fixed numbers or are drawn per patient from a
named distribution, so a cohort can be heterogeneous the way patients are (the paper's Limitations
name pruning depth and plasticity reserve).

The covariates, their ranges and what reads them:

======================= ========== ==================================================================
covariate               range      effect
======================= ========== ==================================================================
``prune_fraction``      [0, 1)     depth of the lesion (``PatientBatch.prune``)
``regrowth_fraction``   [0, 1]     share of pruned positions a regrowth arm reinstates
``lr_scale``            (0, 100]   multiplier of every learning rate after the baseline
``gain_sensitivity``    [0, 100]   response to a gain change: the network sees ``1 + s (gain - 1)``
                                   (0: no gain effect, 1: the arm's gain, 2: twice its deviation);
                                   baseline and discontinued states (gain 1) are unaffected
``protection_scale``    [0, 1]     response to the mood stabiliser: the network sees ``s * p``
                                   (maintenance and every wash-out step; 0: no protection)
======================= ========== ==================================================================

The first three are :data:`COVARIATES`, columns of every results table. The last two are
:data:`STATE_COVARIATES` (not results columns: the trial writes :data:`COVARIATES` only): they set
the patient's per-patient modulation state wherever its batch hands a modulation to the engine
(:meth:`PatientBatch.effective_modulation`), so every arm and phase honours them. They are recorded
in a patient's spec only when the study sets them; unset (or 1) gives the paper's numbers bit for bit.

Every random draw of a patient comes from a named stream,
``SeedSequence(study_seed, spawn_key=(patient, crc32(name)))``. A patient's numbers therefore do
not depend on cohort size, batching, execution order, worker or resume.

Examples
--------
>>> from virtualpatient.cohort import Cohort, CohortConfig, Distribution
>>> config = CohortConfig(prune_fraction=Distribution(kind="uniform", low=0.85, high=0.98))
>>> cohort = Cohort.from_config(config, n_patients=3, seed=7, defaults={"prune_fraction": 0.95})
>>> [round(p.covariates["prune_fraction"], 5) for p in cohort]
[0.9119, 0.91192, 0.94234]
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydantic
from pydantic import ConfigDict, ValidationInfo, field_validator, model_validator
from pydantic.dataclasses import dataclass

from virtualpatient.limits import MAX_GAIN, MAX_SCALE

if TYPE_CHECKING:
    import torch

__all__ = ["COVARIATES", "Cohort", "CohortConfig", "Distribution", "PatientSpec", "STATE_COVARIATES",
           "check_covariates", "stream_seed"]

COVARIATES = ("prune_fraction", "regrowth_fraction", "lr_scale")
#: Covariates that set a patient's modulation state (see the module docstring); recorded only when set.
STATE_COVARIATES = ("gain_sensitivity", "protection_scale")


#: The parameters each kind of distribution takes (required, optional).
DISTRIBUTION_PARAMS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "uniform": (("low", "high"), ()),
    "normal": (("mean", "sd"), ("low", "high")),
    "choice": (("values",), ()),
}

#: Allowed range of each covariate: (low, high, whether low itself is allowed, whether high is).
COVARIATE_LIMITS: dict[str, tuple[float, float, bool, bool]] = {
    "prune_fraction": (0.0, 1.0, True, False),
    "regrowth_fraction": (0.0, 1.0, True, True),
    "lr_scale": (0.0, MAX_SCALE, False, True),
    "gain_sensitivity": (0.0, MAX_GAIN, True, True),
    "protection_scale": (0.0, 1.0, True, True),
}


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Distribution:
    """A named distribution a covariate is drawn from, once per patient.

    ``uniform(low, high)``; ``normal(mean, sd)``, truncated to ``[low, high]`` when given (by
    redrawing; the range must hold at least 1 % of the mass); ``choice(values)``, uniformly among
    the values. A parameter the kind does not take is refused.

    In a study file: ``prune_fraction = {kind = "uniform", low = 0.85, high = 0.98}``.
    """

    kind: Literal["uniform", "normal", "choice"]
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    sd: float | None = None
    values: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        required, optional = DISTRIBUTION_PARAMS[self.kind]
        given = {k for k in ("low", "high", "mean", "sd", "values") if getattr(self, k) is not None}
        if missing := [k for k in required if k not in given]:
            raise ValueError(f"{self.kind} needs {' and '.join(required)} (missing {', '.join(missing)})")
        if extra := sorted(given - set(required) - set(optional)):
            raise ValueError(f"{self.kind} takes no {', '.join(extra)} (it takes {', '.join(required + optional)})")
        if self.low is not None and self.high is not None and not self.low < self.high:
            raise ValueError(f"{self.kind} needs low < high, got low={self.low}, high={self.high}")
        if any(not np.isfinite(getattr(self, k)) for k in ("low", "high", "mean", "sd") if k in given) or (
                self.values is not None and not np.all(np.isfinite(self.values))):
            raise ValueError(f"{self.kind} parameters must be finite numbers")
        if self.kind == "normal":
            if self.sd <= 0:
                raise ValueError(f"normal needs sd > 0, got {self.sd}")
            if self.mass() < 0.01:
                raise ValueError(f"normal(mean={self.mean}, sd={self.sd}) puts under 1 % of its mass in "
                                 f"[{self.low}, {self.high}]; move the mean into the range or widen it")
        if self.kind == "choice" and not self.values:
            raise ValueError("choice needs a non-empty list of values")
        return self

    def mass(self) -> float:
        """Share of the untruncated distribution inside ``[low, high]`` (1 for uniform and choice)."""
        if self.kind != "normal":
            return 1.0
        cdf = lambda x: 0.5 * (1.0 + math.erf((x - self.mean) / (self.sd * math.sqrt(2.0))))  # noqa: E731
        low = 0.0 if self.low is None else cdf(self.low)
        high = 1.0 if self.high is None else cdf(self.high)
        return high - low

    def sample(self, rng: np.random.Generator) -> float:
        """Draw one value."""
        if self.kind == "uniform":
            return float(rng.uniform(self.low, self.high))
        if self.kind == "choice":
            return float(rng.choice(np.asarray(self.values, dtype=float)))
        low = -np.inf if self.low is None else self.low
        high = np.inf if self.high is None else self.high
        for _ in range(10_000):
            x = float(rng.normal(self.mean, self.sd))
            if low <= x <= high:
                return x
        raise ValueError(f"normal({self.mean}, {self.sd}) almost never falls in [{low}, {high}]")

    def bounds(self) -> tuple[float, float]:
        """Smallest and largest value this distribution can give."""
        if self.kind == "choice":
            return min(self.values), max(self.values)
        low = -np.inf if self.low is None else self.low
        high = np.inf if self.high is None else self.high
        return low, high

    @classmethod
    def parse(cls, table: dict[str, Any]) -> Distribution:
        """Build a distribution from a study-file table, with a one-line error naming the problem."""
        kind = table.get("kind")
        if kind is None:
            raise ValueError(f"a distribution table needs kind = one of {', '.join(map(repr, DISTRIBUTION_PARAMS))}")
        if kind not in DISTRIBUTION_PARAMS:
            raise ValueError(f"unknown distribution {kind!r} (known: {', '.join(DISTRIBUTION_PARAMS)})")
        try:
            return cls(**table)
        except pydantic.ValidationError as exc:
            problems = []
            for err in exc.errors():
                where = ".".join(str(p) for p in err["loc"])
                if err["type"] in ("unexpected_keyword_argument", "extra_forbidden"):
                    problems.append(f"{where}: unknown key")
                else:
                    msg = err["msg"].removeprefix("Value error, ")
                    problems.append(f"{where}: {msg}" if where else msg)
            text = "; ".join(problems)
            raise ValueError(text if text.startswith(kind) else f"{kind}: {text}") from None
        except TypeError as exc:
            raise ValueError(f"{kind}: {exc}") from None


Covariate = float | Distribution | None


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CohortConfig:
    """Per-patient covariates; ``None`` means "the protocol's value for everyone".

    Each is a number (the same for every patient) or a :class:`Distribution` drawn once per
    patient from the patient's own stream ``cohort/<covariate>``.

    Attributes
    ----------
    prune_fraction
        Pruning depth of the lesion, in [0, 1) (default: ``pruning.fraction``, 0.95).
    regrowth_fraction
        Plasticity reserve of a regrowth arm: the share of pruned positions it can reinstate, in
        [0, 1] (default: the arm's own ``regrow_fraction``, 0.5).
    lr_scale
        Plasticity reserve as a multiplier (> 0) of every learning rate after the baseline (default 1).
    gain_sensitivity
        Response to a drug's gain, >= 0: the hidden layers see ``1 + s (gain - 1)`` (default 1:
        the arm's own gain).
    protection_scale
        Response to the mood stabiliser, in [0, 1]: the hidden layers see ``s * protection``
        (default 1).
    """

    prune_fraction: Covariate = None
    regrowth_fraction: Covariate = None
    lr_scale: Covariate = None
    gain_sensitivity: Covariate = None
    protection_scale: Covariate = None

    @field_validator(*COVARIATES, *STATE_COVARIATES, mode="before")
    @classmethod
    def _parse(cls, value: Any) -> Any:
        if value is None or isinstance(value, Distribution):
            return value
        if isinstance(value, dict):
            return Distribution.parse(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"must be a number or a distribution table like {{kind = \"uniform\", low = ..., "
                             f"high = ...}}, got {type(value).__name__} {value!r}")
        return float(value)

    @field_validator(*COVARIATES, *STATE_COVARIATES, mode="after")
    @classmethod
    def _range(cls, value: Any, info: ValidationInfo) -> Any:
        if value is None:
            return value
        vlo, vhi = value.bounds() if isinstance(value, Distribution) else (value, value)
        problem = _out_of_range(info.field_name, vlo, vhi)
        if problem:
            if not (np.isfinite(vlo) and np.isfinite(vhi)):
                problem += " (give low and high to truncate the normal)"
            raise ValueError(problem)
        return value


def _out_of_range(name: str, vlo: float, vhi: float) -> str:
    """The complaint when values ``vlo``..``vhi`` leave covariate ``name``'s range ('' when they do not)."""
    lo, hi, lo_ok, hi_ok = COVARIATE_LIMITS[name]
    if (vlo > lo or (lo_ok and vlo == lo)) and (vhi < hi or (hi_ok and vhi == hi)):
        return ""
    interval = f"{'[' if lo_ok else '('}{lo:g}, {hi:g}{']' if hi_ok else ')'}"
    got = f"{vlo:g}" if vlo == vhi else f"values in [{vlo:g}, {vhi:g}]"
    return f"must lie in {interval}, got {got}"


def check_covariates(covariates: dict[str, float] | None) -> dict[str, float]:
    """Validate one patient's covariates (names and ranges; NaN means "the protocol's value").

    Returns
    -------
    dict
        The covariates as floats.

    Raises
    ------
    ValueError
        For an unknown name or a value outside the covariate's range.
    TypeError
        For a value that is not a number.

    Examples
    --------
    >>> check_covariates({"gain_sensitivity": 0.5})
    {'gain_sensitivity': 0.5}
    """
    out: dict[str, float] = {}
    for name, value in (covariates or {}).items():
        if name not in COVARIATE_LIMITS:
            raise ValueError(f"unknown covariate {name!r} (known: {', '.join(COVARIATE_LIMITS)})")
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"covariate {name} must be a number, got {type(value).__name__}")
        value = float(value)
        if not math.isnan(value) and (problem := _out_of_range(name, value, value)):
            raise ValueError(f"covariate {name} {problem}")
        out[name] = value
    return out


def stream_seed(study_seed: int, patient: int, name: str) -> np.random.SeedSequence:
    """The seed sequence of one patient's named random stream."""
    return np.random.SeedSequence(study_seed, spawn_key=(patient, zlib.crc32(name.encode())))


class PatientSpec:
    """One patient before training: index, study seed and covariates.

    Parameters
    ----------
    index
        Position in the cohort; with the study seed it fixes every random stream of the patient.
    study_seed
        The study's seed.
    covariates
        Covariate name -> value (see :data:`COVARIATES`); recorded in every results row.
    """

    def __init__(self, index: int, study_seed: int, covariates: dict[str, float] | None = None) -> None:
        if index < 0:
            raise ValueError(f"patient index must be >= 0, got {index}")
        self.index = int(index)
        self.study_seed = int(study_seed)
        self.covariates = dict(covariates or {})

    def __repr__(self) -> str:
        return f"PatientSpec(index={self.index}, study_seed={self.study_seed}, covariates={self.covariates})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PatientSpec) and self.to_dict() == other.to_dict()

    def rng(self, name: str) -> np.random.Generator:
        """A numpy generator for the named stream (same name, same numbers)."""
        return np.random.default_rng(stream_seed(self.study_seed, self.index, name))

    def generator(self, name: str, device: str | torch.device = "cpu") -> torch.Generator:
        """A torch generator for the named stream (same name, same numbers)."""
        import torch  # here, not at the top: the protocol (and analysis) load without torch

        state = stream_seed(self.study_seed, self.index, name).generate_state(1, np.uint64)[0]
        g = torch.Generator(device=device)
        g.manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)
        return g

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "study_seed": self.study_seed, "covariates": dict(self.covariates)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PatientSpec:
        return cls(data["index"], data["study_seed"], data.get("covariates"))


class Cohort(Sequence[PatientSpec]):
    """An ordered collection of :class:`PatientSpec`."""

    def __init__(self, patients: Sequence[PatientSpec]) -> None:
        self._patients = list(patients)

    @classmethod
    def from_config(
        cls, config: CohortConfig, n_patients: int, seed: int, defaults: dict[str, float] | None = None
    ) -> Cohort:
        """Draw each patient's covariates from its own stream (``cohort/<covariate>``).

        ``defaults`` gives the value of a covariate that the config leaves at ``None``; one missing
        there too is recorded as NaN, which means "the protocol's own value" downstream. A
        :data:`STATE_COVARIATES` entry left unset in both is not recorded at all (so the specs,
        and everything stored from them, are what they were before these covariates existed).
        """
        defaults = defaults or {}
        patients = []
        for i in range(n_patients):
            spec = PatientSpec(i, seed)
            for name in COVARIATES:
                value = getattr(config, name)
                if value is None:
                    value = defaults.get(name, math.nan)
                if isinstance(value, Distribution):
                    value = value.sample(spec.rng(f"cohort/{name}"))
                spec.covariates[name] = float(value)
            for name in STATE_COVARIATES:
                value = getattr(config, name)
                if value is None:
                    value = defaults.get(name)
                if value is None:
                    continue
                if isinstance(value, Distribution):
                    value = value.sample(spec.rng(f"cohort/{name}"))
                spec.covariates[name] = float(value)
            patients.append(spec)
        return cls(patients)

    def __getitem__(self, i):  # type: ignore[override]
        return self._patients[i]

    def __len__(self) -> int:
        return len(self._patients)

    def __iter__(self) -> Iterator[PatientSpec]:
        return iter(self._patients)

    def __repr__(self) -> str:
        return f"Cohort({len(self)} patients)"
