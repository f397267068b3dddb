"""What a family sheet publishes, and how each of its numbers and findings is read from our results.

A :class:`Sheet` holds one protocol sheet of the model family (``/work/shared/family``): its
published table (mean and population SD over the authors' seeds), a :class:`Quantity` per row of
that table saying how to get one value per patient from our tidy results, and its findings, each a
:class:`Finding` with the rule that decides it on a run. :func:`analysis.family.compare_published`
and :func:`analysis.family.decide_findings` apply them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pandas as pd

__all__ = ["Finding", "NotTestable", "Quantity", "Sheet"]


class NotTestable(Exception):
    """The run lacks the data a finding needs (an arm, a phase, enough patients)."""


@dataclass(frozen=True)
class Quantity:
    """One row of a sheet's published table and how to read it from our results.

    Attributes
    ----------
    name : str
        The row's name as the report prints it, e.g. ``"combined stress %"``.
    per_patient : callable
        ``(results, arm) -> pandas.Series``: one value per patient (index: patient) of this
        quantity in ``arm``; an empty Series where the run has none for the arm.
    decimals : int
        Decimals the sheet prints the quantity with; half a unit of the last one is the rounding
        allowance of the ``differs`` rule.
    """

    name: str
    per_patient: Callable[[pd.DataFrame, str], pd.Series]
    decimals: int = 1


@dataclass(frozen=True)
class Finding:
    """One of a sheet's findings, in our words, and the rule that decides it on a run.

    Attributes
    ----------
    id : str
        ``"<sheet>-<k>"``, e.g. ``"068C-1"``.
    text : str
        The finding.
    test : str
        The deciding rule in one line.
    decide : callable
        ``results -> (holds, detail)``, the detail giving the numbers; raises :class:`NotTestable`
        when the run lacks the data.
    """

    id: str
    text: str
    test: str
    decide: Callable[[pd.DataFrame], tuple[bool, str]]


@dataclass(frozen=True)
class Sheet:
    """A family sheet: its published table, how to read each row from our results, its findings.

    Attributes
    ----------
    id : str
        The sheet, e.g. ``"068C"`` (a value of :data:`virtualpatient.schema.PUBLISHED_SHEETS`).
    title : str
    source : str
        The sheet's file, e.g. ``"family/068C-chronic-stress.md"``.
    n_published : int
        Seeds behind the published numbers (10; 068A: 1).
    arms : tuple of str
        Column order of the published table.
    quantities : tuple of Quantity
        The published table's rows.
    published : dict
        ``(quantity name, arm) -> (mean, population SD or None where the sheet prints none)``.
    findings : tuple of Finding
    notes : tuple of str
        Caveats the report prints with the table.

    Raises
    ------
    ValueError
        A published value names an unknown quantity or arm, an SD is negative, ``n_published`` is
        below 1, or two quantities or findings share a name.
    """

    id: str
    title: str
    source: str
    n_published: int
    arms: tuple[str, ...]
    quantities: tuple[Quantity, ...]
    published: dict[tuple[str, str], tuple[float, float | None]]
    findings: tuple[Finding, ...]
    notes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.n_published < 1:
            raise ValueError(f"sheet {self.id}: n_published must be >= 1, got {self.n_published}")
        names = [q.name for q in self.quantities]
        ids = [f.id for f in self.findings]
        for kind, seen in (("quantity", names), ("finding", ids)):
            doubled = sorted({x for x in seen if seen.count(x) > 1})
            if doubled:
                raise ValueError(f"sheet {self.id}: {kind} names must be distinct, repeated: {doubled}")
        for (name, arm), (_, sd) in self.published.items():
            if name not in names:
                raise ValueError(f"sheet {self.id}: published value of unknown quantity {name!r}; known: {names}")
            if arm not in self.arms:
                raise ValueError(f"sheet {self.id}: published value for unknown arm {arm!r}; arms: {list(self.arms)}")
            if sd is not None and not sd >= 0:
                raise ValueError(f"sheet {self.id}: SD of ({name!r}, {arm!r}) must be >= 0 or None, got {sd}")

    def quantity(self, name: str) -> Quantity:
        """The quantity called ``name`` (``KeyError`` if the sheet has none)."""
        for q in self.quantities:
            if q.name == name:
                return q
        raise KeyError(f"sheet {self.id} has no quantity {name!r}")
