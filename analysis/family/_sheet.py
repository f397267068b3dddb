"""The vocabulary of a family sheet: its quantities, published numbers and findings."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

__all__ = ["Finding", "NotTestable", "Quantity", "Sheet"]


@dataclass(frozen=True)
class Quantity:
    """A number the sheet publishes per arm, read from a run one value per patient."""

    name: str
    per_patient: Callable[[pd.DataFrame, str], pd.Series]
    decimals: int = 1


@dataclass(frozen=True)
class Finding:
    """A qualitative finding of the sheet and the rule that decides it on a run."""

    id: str
    text: str
    test: str
    decide: Callable[[pd.DataFrame], tuple[bool, str]]


class NotTestable(Exception):
    """The run lacks the data a finding needs."""


@dataclass(frozen=True)
class Sheet:
    """One family sheet: its arms, quantities, published numbers and findings."""

    id: str
    title: str
    source: str
    n_published: int
    arms: tuple[str, ...]
    quantities: tuple[Quantity, ...]
    published: dict[tuple[str, str], tuple[float, float | None]]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...] = ()
