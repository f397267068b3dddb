"""The paper's Tables 1-4 computed from a results table, beside the published values.

The paper reports every cell as mean +/- SD across its ten seeds, where the SD
is the population SD (``ddof=0``).  :func:`paper_tables` computes the same
cells from a tidy results table (``docs/results-schema.md``),
:func:`load_published` reads the published numbers (``data/paper_tables.csv``)
and :func:`format_tables` prints both side by side in the paper's layout.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from analysis._data import (
    UNTREATED,
    TableColumn,
    arm_order,
    cell_values,
    check_results,
    display_name,
    require_columns,
    select,
)

__all__ = [
    "TableColumn",
    "compare_published",
    "format_tables",
    "load_published",
    "paper_tables",
    "table_columns",
]

#: Default location of the published numbers, relative to the repository root.
PUBLISHED_PATH = Path(__file__).resolve().parents[1] / "data" / "paper_tables.csv"

PUBLISHED_COLUMNS = ("table", "arm", "phase", "metric", "condition", "noise_sigma", "mean", "sd")

TABLE_NAMES = ("Table 1", "Table 2", "Table 3", "Table 4")

TABLE_TITLES = {
    "Table 1": "Antidepressant Efficacy (Mean ± SD Across Patients)",
    "Table 2": "Stress Resilience Profile (Mean ± SD Across Patients)",
    "Table 3": "Manic Conversion Risk Metrics (Mean ± SD Across Patients)",
    "Table 4": "Summary Comparison Matrix",
    "Off medication": "Neurosteroid Medication Dependence (damping module off)",
}

#: The paper's column headers of Table 2, by internal-noise SD.
RESILIENCE_LABELS = {
    0.0: "None (%)",
    0.5: "Moderate (σ=0.5) (%)",
    1.0: "High (σ=1.0) (%)",
    1.5: "Severe (σ=1.5) (%)",
    2.5: "Extreme (σ=2.5) (%)",
}


_T1 = (
    TableColumn("Sparsity (%)", "sparsity"),
    TableColumn("Clean (%)", "accuracy", "clean"),
    TableColumn("Standard (%)", "accuracy", "standard"),
    TableColumn("Combined (%)", "accuracy", "combined"),
)
_T3 = (
    TableColumn("Gain Multiplier", "gain", decimals=2),
    TableColumn("Biased Stress Accuracy (%)", "accuracy", "biased"),
    TableColumn("Activation Magnitude", "activation_magnitude", decimals=3),
)
_T4 = (
    TableColumn("Combined Stress (%)", "accuracy", "combined"),
    TableColumn("Biased Stress (%)", "accuracy", "biased"),
    TableColumn("Gain Multiplier", "gain", decimals=2),
    TableColumn("Activation Magnitude", "activation_magnitude", decimals=3),
    TableColumn("Acute Relapse Drop (%)", "relapse_drop", phase="acute_relapse"),
    TableColumn("Manic Relapse Prob. (%)", "relapse_probability", phase="washout"),
    TableColumn("MS Decay Rate", "decay_rate", phase="washout", decimals=4),
)
_OFF = (
    ("Combined (%)", "accuracy", "combined", None, 1),
    ("Biased (%)", "accuracy", "biased", None, 1),
    ("Extreme (σ=2.5) (%)", "accuracy", "internal_noise", 2.5, 1),
    ("Activation Magnitude", "activation_magnitude", "", None, 3),
)


def _sigmas(df: pd.DataFrame) -> list[float]:
    rows = df[(df["metric"] == "accuracy") & (df["condition"] == "internal_noise")]
    rows = rows[rows["phase"].isin(["pruned", "acute"])]
    values = sorted({round(float(s), 6) for s in rows["noise_sigma"].dropna()})
    return values or sorted(RESILIENCE_LABELS)


def _resilience_label(sigma: float) -> str:
    for known, label in RESILIENCE_LABELS.items():
        if math.isclose(sigma, known):
            return label
    return f"σ={sigma:g} (%)"


def table_columns(results: pd.DataFrame | None = None) -> dict[str, tuple[TableColumn, ...]]:
    """The columns of Tables 1-4, keyed ``"Table 1"`` .. ``"Table 4"``.

    Table 2 has one column per internal-noise SD found in ``results`` (the
    paper's five when ``results`` is None or has none).

    Examples
    --------
    >>> from analysis.tables import table_columns
    >>> [c.label for c in table_columns()["Table 3"]]
    ['Gain Multiplier', 'Biased Stress Accuracy (%)', 'Activation Magnitude']
    """
    sigmas = sorted(RESILIENCE_LABELS) if results is None else _sigmas(check_results(results))
    t2 = tuple(
        TableColumn(_resilience_label(s), "accuracy", "internal_noise", noise_sigma=s)
        for s in sigmas
    )
    return {"Table 1": _T1, "Table 2": t2, "Table 3": _T3, "Table 4": _T4}


def _mean_sd(values: pd.Series) -> tuple[float, float, int]:
    arr = values.to_numpy(dtype=float)
    arr = arr[~np.isnan(arr)]
    if arr.size == 0:
        return float("nan"), float("nan"), 0
    if np.ptp(arr) == 0.0:  # constant: exact mean, SD exactly 0 (no rounding residue)
        return float(arr[0]), 0.0, int(arr.size)
    return float(arr.mean()), float(arr.std(ddof=0)), int(arr.size)


def paper_tables(
    results: pd.DataFrame, protocol: Mapping | None = None
) -> dict[str, pd.DataFrame]:
    """Tables 1-4 of the paper as mean and population SD across patients.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table (``docs/results-schema.md``).
    protocol : dict, optional
        The resolved protocol (``protocol.json``); only
        ``arms[<arm>]["washout_decay"]`` is read, for Table 4's decay rate.

    Returns
    -------
    dict of str to pandas.DataFrame
        Keys ``"Table 1"`` .. ``"Table 4"``.  Each frame has one row per arm
        (index ``arm``: ``untreated`` first, then the arms in the order they
        appear in ``results``) and two-level columns ``(header, stat)`` with
        ``header`` the paper's column header and ``stat`` in
        ``("mean", "sd")``; SD is ``ddof=0`` as in the paper.  Cells the run
        has no data for (e.g. the untreated relapse columns) are NaN.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.tables import paper_tables
    >>> tables = paper_tables(make_results(n_patients=4, seed=1))
    >>> tables["Table 1"].loc["ketamine", ("Sparsity (%)", "mean")]
    np.float64(47.5)
    """
    df = check_results(results)
    arms = arm_order(df)
    out: dict[str, pd.DataFrame] = {}
    for name, columns in table_columns(df).items():
        data: dict[tuple[str, str], list[float]] = {}
        for col in columns:
            means, sds = [], []
            for arm in arms:
                mean, sd, _ = _mean_sd(cell_values(df, col, arm, protocol))
                means.append(mean)
                sds.append(sd)
            data[(col.label, "mean")] = means
            data[(col.label, "sd")] = sds
        frame = pd.DataFrame(data, index=pd.Index(arms, name="arm"))
        frame.columns = pd.MultiIndex.from_tuples(frame.columns, names=["column", "stat"])
        out[name] = frame
    return out


def load_published(path: str | Path | None = None) -> pd.DataFrame:
    """Read the paper's published numbers.

    Parameters
    ----------
    path : str or Path, optional
        CSV with columns ``table, arm, phase, metric, condition, noise_sigma,
        mean, sd``; defaults to the repository's ``data/paper_tables.csv``.

    Returns
    -------
    pandas.DataFrame
        One row per published number; ``table`` is a string (``"1"`` ..
        ``"4"`` or ``"text"`` for numbers only given in the text),
        ``condition`` is ``""`` where empty, numbers are floats.

    Examples
    --------
    >>> from analysis.tables import load_published
    >>> pub = load_published()
    >>> float(pub.query("arm == 'ketamine' and metric == 'relapse_drop'")["mean"].iloc[0])
    -0.1
    """
    if path is None:
        path = PUBLISHED_PATH
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a str or Path, got {type(path).__name__}")
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"published tables not found: {path}")
    pub = pd.read_csv(path, dtype={"table": str})
    require_columns(pub, PUBLISHED_COLUMNS, str(path))
    pub["condition"] = pub["condition"].where(pub["condition"].notna(), "").astype(str)
    for col in ("arm", "phase", "metric", "table"):
        pub[col] = pub[col].astype(str)
    for col in ("noise_sigma", "mean", "sd"):
        pub[col] = pd.to_numeric(pub[col], errors="coerce").astype(float)
    return pub


def _published_lookup(
    published: pd.DataFrame | None,
    arm: str,
    phase: str,
    metric: str,
    condition: str,
    noise_sigma: float | None,
) -> tuple[float, float]:
    if published is None:
        return float("nan"), float("nan")
    rows = published[
        (published["arm"] == arm)
        & (published["phase"] == phase)
        & (published["metric"] == metric)
        & (published["condition"] == condition)
    ]
    if noise_sigma is None:
        rows = rows[rows["noise_sigma"].isna()]
    else:
        rows = rows[np.isclose(rows["noise_sigma"].fillna(-1.0), noise_sigma)]
    if rows.empty:
        return float("nan"), float("nan")
    return float(rows["mean"].iloc[0]), float(rows["sd"].iloc[0])


def _check_published(published: object) -> pd.DataFrame | None:
    if published is None:
        return None
    require_columns(published, PUBLISHED_COLUMNS, "published", expected="a DataFrame from load_published() or None")
    pub = published.copy()
    pub["condition"] = pub["condition"].where(pub["condition"].notna(), "").astype(str)
    return pub


def compare_published(
    results: pd.DataFrame,
    published: pd.DataFrame | None = None,
    protocol: Mapping | None = None,
) -> pd.DataFrame:
    """Every cell of Tables 1-4 and the off-medication numbers, ours beside the paper's.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    published : pandas.DataFrame, optional
        From :func:`load_published`; read from the default path when None.
    protocol : dict, optional
        The resolved protocol, for the decay rates.

    Returns
    -------
    pandas.DataFrame
        Long form, one row per (table, column, arm) with columns ``table``,
        ``column``, ``arm``, ``phase``, ``metric``, ``condition``,
        ``noise_sigma``, ``decimals``, ``n``, ``mean``, ``sd`` (ddof=0),
        ``paper_mean``, ``paper_sd`` and ``deviation_sd`` = (ours - paper) /
        our SD (when our SD is 0: 0 if the means agree to the paper's printed
        ``decimals``, else ``inf``; NaN when either side is missing).  Off-medication rows have
        ``table == "Off medication"``.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.tables import compare_published
    >>> cmp = compare_published(make_results(n_patients=4, seed=1))
    >>> sorted(cmp["table"].unique())
    ['Off medication', 'Table 1', 'Table 2', 'Table 3', 'Table 4']
    """
    df = check_results(results)
    pub = load_published() if published is None else _check_published(published)
    arms = arm_order(df)
    records = []
    specs: list[tuple[str, TableColumn, str]] = []
    for name, columns in table_columns(df).items():
        for col in columns:
            for arm in arms:
                specs.append((name, col, arm))
    off_arms = [a for a in arms if not select(df, arm=a, phase="off_medication").empty]
    for arm in off_arms:
        for label, metric, condition, sigma, decimals in _OFF:
            col = TableColumn(label, metric, condition, sigma, "off_medication", decimals)
            specs.append(("Off medication", col, arm))
    for name, col, arm in specs:
        values = cell_values(df, col, arm, protocol)
        mean, sd, n = _mean_sd(values)
        phase = col.phase_for(arm)
        paper_mean, paper_sd = _published_lookup(
            pub, arm, phase, col.metric, col.condition, col.noise_sigma
        )
        records.append(
            {
                "table": name,
                "column": col.label,
                "arm": arm,
                "phase": phase,
                "metric": col.metric,
                "condition": col.condition,
                "noise_sigma": np.nan if col.noise_sigma is None else col.noise_sigma,
                "decimals": col.decimals,
                "n": n,
                "mean": mean,
                "sd": sd,
                "paper_mean": paper_mean,
                "paper_sd": paper_sd,
                "deviation_sd": _deviation(mean, sd, paper_mean, col.decimals),
            }
        )
    return pd.DataFrame.from_records(records)


def _deviation(mean: float, sd: float, paper: float, decimals: int = 12) -> float:
    if math.isnan(mean) or math.isnan(paper) or math.isnan(sd):
        return float("nan")
    diff = mean - paper
    if sd == 0.0:
        # the paper prints `decimals` digits: a smaller difference is no difference (94.9993 is 95.0)
        if abs(diff) < 0.5 * 10.0 ** -decimals:
            return 0.0
        return math.copysign(math.inf, diff)
    return diff / sd


def _fmt(mean: float, sd: float, decimals: int, *, with_sd: bool = True) -> str:
    if math.isnan(mean):
        return "n/a"
    text = _num(mean, decimals)
    if with_sd and not math.isnan(sd):
        text += f" ± {_num(sd, decimals)}"
    return text


def _num(value: float, decimals: int) -> str:
    text = f"{value:.{decimals}f}"
    if text.startswith("-") and float(text) == 0.0:
        text = text[1:]
    return text


def _cell(row: Mapping, *, with_sd: bool = True) -> str:
    d = int(row["decimals"])
    with_sd = with_sd and row["metric"] != "decay_rate"
    ours = _fmt(row["mean"], row["sd"], d, with_sd=with_sd)
    paper = _fmt(row["paper_mean"], row["paper_sd"], d, with_sd=with_sd)
    return f"{ours}  (paper {paper})"


def text_table(title: str, header: list[str], rows: list[list[str]]) -> str:
    """Render an aligned plain-text table (first column left, others left)."""
    widths = [len(h) for h in header]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))
    sep = "  "

    def line(cells: list[str]) -> str:
        return sep.join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip()

    rule = "-" * (sum(widths) + len(sep) * (len(widths) - 1))
    parts = [title, rule, line(header), rule]
    parts += [line(r) for r in rows]
    parts.append(rule)
    return "\n".join(parts)


def format_tables(
    results: pd.DataFrame,
    published: pd.DataFrame | None = None,
    protocol: Mapping | None = None,
) -> str:
    """The paper's tables as aligned plain text, ours beside the published numbers.

    Each cell reads ``ours mean ± sd  (paper mean ± sd)``.  Tables 1-3 have
    one row per arm; Table 4 is laid out as in the paper (one row per
    measure, treated arms then Untreated as columns, means only).  When the
    run has off-medication rows, a fifth block compares the acute and
    damping-off numbers with those given in the paper's text.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    published : pandas.DataFrame, optional
        From :func:`load_published`; read from the default path when None.
    protocol : dict, optional
        The resolved protocol, for Table 4's decay rates.

    Returns
    -------
    str

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.tables import format_tables
    >>> print(format_tables(make_results(n_patients=3, seed=0)).splitlines()[0])
    Table 1. Antidepressant Efficacy (Mean ± SD Across Patients)
    """
    cmp = compare_published(results, published, protocol)
    df = check_results(results)
    arms = arm_order(df)
    blocks = []
    for name in TABLE_NAMES:
        part = cmp[cmp["table"] == name]
        labels = list(dict.fromkeys(part["column"]))
        title = f"{name}. {TABLE_TITLES[name]}"
        if name != "Table 4":
            rows = []
            for arm in arms:
                cells = [display_name(arm)]
                for label in labels:
                    rec = part[(part["arm"] == arm) & (part["column"] == label)].iloc[0]
                    cells.append(_cell(rec))
                rows.append(cells)
            blocks.append(text_table(title, ["Treatment", *labels], rows))
        else:
            t4_arms = [a for a in arms if a != UNTREATED] + [a for a in arms if a == UNTREATED]
            rows = []
            for label in labels:
                cells = [label]
                for arm in t4_arms:
                    rec = part[(part["arm"] == arm) & (part["column"] == label)].iloc[0]
                    if math.isnan(rec["mean"]) and math.isnan(rec["paper_mean"]):
                        cells.append("N/A")
                    else:
                        cells.append(_cell(rec))
                rows.append(cells)
            header = ["Metric", *(display_name(a) for a in t4_arms)]
            blocks.append(text_table(title, header, rows))
    off = cmp[cmp["table"] == "Off medication"]
    for arm in dict.fromkeys(off["arm"]):
        part = off[off["arm"] == arm]
        rows = []
        for _, rec in part.iterrows():
            acute = cmp[
                (cmp["table"].isin(["Table 1", "Table 2", "Table 3"]))
                & (cmp["arm"] == arm)
                & (cmp["metric"] == rec["metric"])
                & (cmp["condition"] == rec["condition"])
                & (np.isclose(cmp["noise_sigma"].fillna(-1.0), _nan_to(rec["noise_sigma"])))
            ]
            acute_cell = _cell(acute.iloc[0]) if not acute.empty else "n/a"
            rows.append([str(rec["column"]), acute_cell, _cell(rec)])
        title = f"{display_name(arm)}: {TABLE_TITLES['Off medication']}"
        blocks.append(text_table(title, ["Measure", "On medication (acute)", "Damping off"], rows))
    return "\n\n".join(blocks) + "\n"


def _nan_to(value: float, fill: float = -1.0) -> float:
    return fill if math.isnan(float(value)) else float(value)
