"""The rules that decide the sheets' findings, in the style of :mod:`analysis.claims`.

Orderings ("a is above b") are one-sided paired Wilcoxon signed-rank tests across patients,
Holm-corrected within a finding, and hold when every pair is significant at :data:`ALPHA` and
every mean difference points the stated way. Shares get Wilson 95 % intervals. Descriptive
statements ("never relapses") are decided by stated thresholds on the numbers themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from analysis._data import display_name
from analysis._results import fmt_p
from analysis.family._rows import NEURO, Reader
from analysis.family._sheet import NotTestable

#: Significance level of every test that decides a finding (after Holm within the finding).
ALPHA = 0.05

#: One side of a comparison: a label for the detail and one value per patient.
Side = tuple[str, pd.Series]


def name(arm: str) -> str:
    """The arm's display name (``Ketamine-like``, ...)."""
    return display_name(arm)


def values(results: pd.DataFrame, reader: Reader, arm: str, what: str) -> pd.Series:
    """``reader(results, arm)`` without NaN, or :class:`NotTestable` saying ``what`` is missing."""
    out = reader(results, arm).dropna()
    if out.empty:
        raise NotTestable(f"no {what} for {name(arm)} in this run")
    return out


def ordered(pairs: Sequence[tuple[Side, Side]], unit: str = "%", decimals: int = 1) -> tuple[bool, str]:
    """Decide "a > b" for every pair by one-sided paired Wilcoxon across the patients both sides
    have, Holm over the pairs; holds when every Holm p < :data:`ALPHA` and every mean points up."""
    from analysis.stats import holm, paired_test

    ps, parts, direction = [], [], True
    for (label_a, a), (label_b, b) in pairs:
        both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
        if len(both) < 2:
            raise NotTestable(f"fewer than two patients with both {label_a} and {label_b}")
        _, p, _ = paired_test(both["a"].to_numpy(), both["b"].to_numpy(), "wilcoxon", "greater")
        ps.append(1.0 if math.isnan(p) else float(p))
        direction &= bool(both["a"].mean() > both["b"].mean())
        parts.append((f"{label_a} {both['a'].mean():.{decimals}f}{unit} vs {label_b} "
                      f"{both['b'].mean():.{decimals}f}{unit}", len(both)))
    adjusted = [float(p) for p in holm(ps)[0]]
    ok = direction and max(adjusted) < ALPHA
    detail = "; ".join(f"{text} (p_Holm {fmt_p(p)}, n = {n})" for (text, n), p in zip(parts, adjusted, strict=True))
    if direction and not ok:
        detail += " (direction holds, not significant)"
    return ok, detail


def on_off(results: pd.DataFrame, tests: Sequence[tuple[str, Reader, Reader, bool]]) -> tuple[bool, str]:
    """Decide how switching the neurosteroid-like medication off moves each test: per ``(label,
    on reader, off reader, off_higher)`` a one-sided paired Wilcoxon off > on (``off_higher``) or on >
    off, Holm over the tests (:func:`ordered`)."""
    pairs = []
    for label, on_reader, off_reader, off_higher in tests:
        on = ("on", values(results, on_reader, NEURO, f"on-medication {label}"))
        off = ("off", values(results, off_reader, NEURO, f"off-medication {label}"))
        first, second = (off, on) if off_higher else (on, off)
        pairs.append(((f"{label} {first[0]}", first[1]), second))
    return ordered(pairs)


def share(k: int, n: int) -> tuple[float, float]:
    """A share a sheet prints as ``k / n`` seeds, as a published (mean, SD) in percent: the SD is the
    population SD of the 0/1 values, sqrt(p (1 - p)), which the sheet does not print but the share fixes."""
    p = k / n
    return 100.0 * p, 100.0 * math.sqrt(p * (1.0 - p))


def wilson(k: int, n: int) -> str:
    """``k/n`` with its Wilson 95 % interval in percent."""
    from analysis.replication import wilson_ci

    lo, hi = wilson_ci(k, n)
    return f"{k}/{n} (Wilson 95 % {100 * float(lo):.0f}-{100 * float(hi):.0f} %)"


def wilson_bounds(k: int, n: int) -> tuple[float, float]:
    """The Wilson 95 % interval of ``k/n`` in percent."""
    from analysis.replication import wilson_ci

    lo, hi = wilson_ci(k, n)
    return 100 * float(lo), 100 * float(hi)


def upper_bound(x: pd.Series, confidence: float = 0.95) -> float:
    """One-sided upper ``confidence`` t bound of the mean (``ddof=1``); the mean itself when the
    values do not vary; NaN below two values."""
    from scipy import stats

    v = np.asarray(x, dtype=float)
    if v.size < 2:
        return math.nan
    sem = float(v.std(ddof=1)) / math.sqrt(v.size)
    return float(v.mean()) + float(stats.t.ppf(confidence, v.size - 1)) * sem
