"""Cohorts of virtual patients: who they are and where their randomness comes from.

A :class:`PatientSpec` is everything that distinguishes one patient before any training: its index,
the study seed its random streams are spawned from, and its covariates (pruning depth, plasticity
reserve). Covariates are fixed numbers or are drawn per patient from a named distribution, so a
cohort can be heterogeneous the way patients are (the paper's Limitations name pruning depth and
plasticity reserve).

Every random draw of a patient comes from a named stream,
``SeedSequence(study_seed, spawn_key=(patient, crc32(name)))``. A patient's numbers therefore do
not depend on cohort size, batching, execution order, worker or resume.

Examples
--------
>>> from virtualpatient.cohort import Cohort, CohortConfig, Distribution
>>> config = CohortConfig(prune_fraction=Distribution(kind="uniform", low=0.85, high=0.98))
>>> cohort = Cohort.from_config(config, n_patients=3, seed=7, defaults={"prune_fraction": 0.95})
>>> [round(p.covariates["prune_fraction"], 3) for p in cohort]  # doctest: +SKIP
[0.912, 0.874, 0.965]
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from pydantic import ConfigDict, model_validator
from pydantic.dataclasses import dataclass

__all__ = ["Cohort", "CohortConfig", "Distribution", "PatientSpec", "stream_seed"]

COVARIATES = ("prune_fraction", "regrowth_fraction", "lr_scale")


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class Distribution:
    """A named distribution a covariate is drawn from, once per patient.

    ``uniform(low, high)``; ``normal(mean, sd)``, truncated to ``[low, high]`` when given (by
    redrawing); ``choice(values)``, uniformly among the values.
    """

    kind: Literal["uniform", "normal", "choice"]
    low: float | None = None
    high: float | None = None
    mean: float | None = None
    sd: float | None = None
    values: tuple[float, ...] | None = None

    @model_validator(mode="after")
    def _check(self) -> Distribution:
        if self.kind == "uniform" and (self.low is None or self.high is None or self.low >= self.high):
            raise ValueError("uniform needs low < high")
        if self.kind == "normal":
            if self.mean is None or self.sd is None or self.sd <= 0:
                raise ValueError("normal needs mean and sd > 0")
            if self.low is not None and self.high is not None and self.low >= self.high:
                raise ValueError("normal truncation needs low < high")
        if self.kind == "choice" and not self.values:
            raise ValueError("choice needs a non-empty list of values")
        return self

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


Covariate = float | Distribution | None


@dataclass(frozen=True, config=ConfigDict(extra="forbid"))
class CohortConfig:
    """Per-patient covariates; ``None`` means "the protocol's value for everyone".

    Attributes
    ----------
    prune_fraction
        Pruning depth of the lesion (default: ``pruning.fraction``, 0.95).
    regrowth_fraction
        Plasticity reserve of a regrowth arm: the share of pruned positions it can reinstate
        (default: the arm's own ``regrow_fraction``, 0.5).
    lr_scale
        Plasticity reserve as a multiplier of every learning rate after the baseline (default 1).
    """

    prune_fraction: Covariate = None
    regrowth_fraction: Covariate = None
    lr_scale: Covariate = None

    @model_validator(mode="after")
    def _ranges(self) -> CohortConfig:
        limits = {"prune_fraction": (0.0, 1.0), "regrowth_fraction": (0.0, 1.0), "lr_scale": (0.0, np.inf)}
        for name, (lo, hi) in limits.items():
            value = getattr(self, name)
            if value is None:
                continue
            vlo, vhi = value.bounds() if isinstance(value, Distribution) else (value, value)
            if not (lo <= vlo and vhi < hi) or (name == "lr_scale" and vlo <= 0):
                raise ValueError(f"{name} must lie in [{lo}, {hi}) (lr_scale > 0); got range [{vlo}, {vhi}]")
        return self


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
        cls, config: CohortConfig, n_patients: int, seed: int, defaults: dict[str, float]
    ) -> Cohort:
        """Draw each patient's covariates from its own stream (``cohort/<covariate>``).

        ``defaults`` gives the value of a covariate that the config leaves at ``None``.
        """
        patients = []
        for i in range(n_patients):
            spec = PatientSpec(i, seed)
            for name in COVARIATES:
                value = getattr(config, name)
                if value is None:
                    value = defaults[name]
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
