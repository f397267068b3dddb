"""Base class of the analysis results objects (statsmodels style)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd


class ResultsBase:
    """A results object: ``summary()`` is text, ``summary_frame()`` a DataFrame.

    Subclasses implement both; ``str()`` of a results object is its summary.
    """

    def summary(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def summary_frame(self) -> pd.DataFrame:  # pragma: no cover - abstract
        raise NotImplementedError

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<{type(self).__name__}: call .summary() or .summary_frame()>"


class FrameResults(ResultsBase):
    """A results object holding one table of statistics at one confidence level."""

    def __init__(self, frame: pd.DataFrame, confidence: float) -> None:
        self.frame = frame
        self.confidence = confidence

    def summary_frame(self) -> pd.DataFrame:
        """The statistics as a DataFrame (a copy)."""
        return self.frame.copy()


def fmt_p(p: float) -> str:
    """A p-value as printed in papers: ``<0.001`` below 0.001, 3 decimals otherwise."""
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "n/a"
    if p < 0.001:
        return "<0.001"
    return f"{p:.3f}"


def fmt_num(x: float, decimals: int = 3) -> str:
    """A number with fixed decimals, ``n/a`` for NaN, ``inf`` kept, no negative zero."""
    if x is None:
        return "n/a"
    x = float(x)
    if math.isnan(x):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    text = f"{x:.{decimals}f}"
    if text.startswith("-") and float(text) == 0.0:
        text = text[1:]
    return text


def frame_to_text(frame: pd.DataFrame, decimals: int = 3) -> str:
    """Render a DataFrame as an aligned text table (numbers with fixed decimals)."""
    header = [str(c) for c in frame.columns]
    rows = []
    for _, rec in frame.iterrows():
        cells = []
        for col in frame.columns:
            v = rec[col]
            if isinstance(v, (float, np.floating)):
                cells.append(fmt_p(v) if str(col).startswith("pvalue") else fmt_num(v, decimals))
            else:
                cells.append(str(v))
        rows.append(cells)
    widths = [len(h) for h in header]
    for r in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, r, strict=True)]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "-" * (sum(widths) + 2 * max(len(widths) - 1, 0))
    return "\n".join([rule, line(header), rule, *[line(r) for r in rows], rule])
