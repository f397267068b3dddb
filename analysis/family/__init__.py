"""The model family's sheets (``/work/shared/family``): their published numbers beside ours, and
their findings decided by tests.

A study file that names a sheet (``compare_with = "068C"``, a value of
:data:`virtualpatient.schema.PUBLISHED_SHEETS`) gets two sections in its report: the sheet's
published table beside our numbers (:func:`compare_published`) and the sheet's findings, each
decided by a stated rule (:func:`decide_findings`). ``docs/family.md`` lists the rules.

- :mod:`analysis.family.chronic_stress` - sheet 068C;
- :mod:`analysis.family.scarring` - sheet 068E, with the kindling summary per arm and cycle;
- :mod:`analysis.family.dose_sweeps` - sheet 068A (registered when present).

:data:`SHEETS` (sheet id -> :class:`Sheet`) is built on first use from the modules in
:data:`SHEET_MODULES` that are present; each module holds one :class:`Sheet`.

Examples
--------
>>> from analysis.family import SHEETS
>>> SHEETS["068C"].arms
('untreated', 'ketamine', 'ssri', 'neurosteroid')
"""

from __future__ import annotations

import importlib

from analysis.family._sheet import Finding, NotTestable, Quantity, Sheet
from analysis.family.compare import FindingResults, PublishedComparison, compare_published, decide_findings

__all__ = [
    "SHEETS",
    "SHEET_MODULES",
    "Finding",
    "FindingResults",
    "NotTestable",
    "PublishedComparison",
    "Quantity",
    "Sheet",
    "compare_published",
    "decide_findings",
]

#: The modules that each hold one sheet; one that is not there (068A's, until it is merged) is skipped.
SHEET_MODULES = ("dose_sweeps", "chronic_stress", "scarring")

_sheets: dict[str, Sheet] | None = None


def _load() -> dict[str, Sheet]:
    found: dict[str, Sheet] = {}
    for module_name in SHEET_MODULES:
        full = f"{__name__}.{module_name}"
        try:
            module = importlib.import_module(full)
        except ModuleNotFoundError as exc:
            if exc.name == full:  # the module is not in this checkout; anything else is a real error
                continue
            raise
        for sheet in {id(v): v for v in vars(module).values() if isinstance(v, Sheet)}.values():
            if sheet.id in found:
                raise ValueError(f"sheet {sheet.id} is defined twice ({full} and an earlier module)")
            found[sheet.id] = sheet
    return dict(sorted(found.items()))


def __getattr__(name: str):
    global _sheets
    if name == "SHEETS":
        if _sheets is None:
            _sheets = _load()
        return _sheets
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
