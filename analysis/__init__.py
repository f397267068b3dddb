"""Cohort statistics, the paper's tables, figures and the reproduction report.

The modules each hold one concept:

- :mod:`analysis.tables` - the paper's Tables 1-4 beside the published numbers;
- :mod:`analysis.summaries` - per-arm descriptive statistics with confidence intervals;
- :mod:`analysis.stats` - within-patient arm comparisons;
- :mod:`analysis.longitudinal` - relapse GEE and wash-out mixed model;
- :mod:`analysis.survival` - time to relapse during wash-out;
- :mod:`analysis.trajectories` - any metric per arm over trial time or cycles (any schedule);
- :mod:`analysis.figures` - the figures;
- :mod:`analysis.claims` - the paper's qualitative claims, each decided by a test;
- :mod:`analysis.dose_response` - sweeps: per-level summaries, trend test, logistic fit, cliff;
- :mod:`analysis.dose_matching` - dose sweeps: arms compared at matched doses of weight change;
- :mod:`analysis.replication` - claims across cohorts (Wilson CIs), the smallest sufficient cohort;
- :mod:`analysis.family` - the model family's sheets: published numbers beside ours, findings decided by tests;
- :mod:`analysis.report` - ``report.md`` / ``report.html`` from a run folder;
- :mod:`analysis.synthetic` - synthetic results and run folders for tests and demos.

Importing :mod:`analysis` loads only pandas (never torch); the statistics modules (and
statsmodels, scipy, matplotlib) load on first use.
"""

from __future__ import annotations

import importlib

from analysis.tables import format_tables, load_published, paper_tables

__all__ = [
    "claims",
    "dose_matching",
    "dose_response",
    "family",
    "figures",
    "format_tables",
    "load_published",
    "longitudinal",
    "paper_tables",
    "replication",
    "report",
    "stats",
    "summaries",
    "survival",
    "synthetic",
    "tables",
    "trajectories",
]

#: Every public name but the three functions imported above is a module, loaded on first use.
_LAZY_MODULES = frozenset(__all__) - {"format_tables", "load_published", "paper_tables"}


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f"analysis.{name}")
    raise AttributeError(f"module 'analysis' has no attribute {name!r}")
