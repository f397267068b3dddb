"""The vocabulary of the results table: its columns, and the paper's phase names.

One torch-free module that the simulation (``trial``, ``patient``, ``store``) and the analysis
package both import, so the two can never disagree on a column name, and ``import analysis``
loads no torch. ``docs/results-schema.md`` documents each column.

Examples
--------
>>> COLUMNS[:3]
['patient', 'arm', 'phase']
>>> "washout" in PAPER_PHASES
True
"""

from __future__ import annotations

__all__ = ["COLUMNS", "HEADLINE_PHASES", "LEVELS_FILE", "PAPER_PHASES", "PUBLISHED_SHEETS", "SCHEDULE_COLUMNS",
           "UNTREATED", "tag_level"]

#: The columns of every results table, in order (covariate and sweep columns follow them).
COLUMNS = ["patient", "arm", "phase", "metric", "condition", "noise_sigma", "maintenance_epochs", "step", "value"]

#: Columns that place a row in a schedule (``docs/schedules.md``), after the covariates: the trial
#: clock (training epochs since the lesion), the cycle of the innermost repeat (0 outside one) and
#: the phase's label path.
SCHEDULE_COLUMNS = ["time", "cycle", "label"]

#: The arm label of the pruned, untreated baseline.
UNTREATED = "untreated"

#: The phases the paper's schedule tags its rows with.
PAPER_PHASES = ("baseline", "pruned", "acute", "maintenance", "washout", "off_medication", "acute_relapse")

#: Where an arm's effect is read when one assessment must stand for it (a run's per-arm summary, a
#: sweep's outcomes): the treated state after the acute course, else the untreated, pruned state.
HEADLINE_PHASES = ("acute", "pruned")

#: The family sheets (``../shared/family``) whose published numbers ``analysis.family`` carries, the
#: values of a study's ``compare_with``.
PUBLISHED_SHEETS = ("068A", "068C", "068E")

#: A sweep folder's plan: its swept fields and every level's folder name, values and cohort, written
#: when the sweep starts, so the finished levels of an unfinished sweep can be read (and reported).
LEVELS_FILE = "levels.json"


def tag_level(frame, fields, values, cohort: int):
    """A level's rows with one column per swept field (NaN where the level leaves the field at the
    study's value, as ``mode = "each"`` does) and its ``cohort``: how a sweep's rows are told apart.

    >>> import pandas as pd
    >>> tag_level(pd.DataFrame({"value": [1.0]}), ["a", "b"], {"a": 0.5}, 0).to_dict("records")
    [{'value': 1.0, 'a': 0.5, 'b': nan, 'cohort': 0}]
    """
    for field in fields:
        frame[field] = values.get(field, float("nan"))
    frame["cohort"] = cohort
    return frame
