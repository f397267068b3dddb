"""Figures of a trial, as PNG and SVG, readable in grey-scale.

Each ``plot_*`` function takes the tidy results table and returns a
:class:`matplotlib.figure.Figure` (no pyplot state, Agg rendering);
:func:`save_figure` writes it as PNG and SVG byte-for-byte reproducibly
(fixed SVG hash salt, no dates in the metadata, text kept as text); :func:`make_figures`
draws and saves every figure with its caption.

Arms are told apart by line style and marker as well as by grey level, so
the figures survive grey-scale printing.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from analysis._data import (
    UNTREATED,
    arm_order,
    check_results,
    display_name,
    relapse_threshold,
    select,
)
from analysis.summaries import t_ci

__all__ = [
    "FigureRecord",
    "arm_style",
    "make_figures",
    "plot_kaplan_meier",
    "plot_metric_points",
    "plot_relapse_vs_duration",
    "plot_resilience",
    "plot_sparsity",
    "plot_washout",
    "plot_weight_magnitudes",
    "save_figure",
]

_GREYS = ["#000000", "#3c3c3c", "#6a6a6a", "#8c8c8c", "#222222", "#555555"]
_LINESTYLES = ["-", "--", "-.", ":", (0, (5, 1, 1, 1)), (0, (1, 1))]
_MARKERS = ["o", "s", "^", "D", "v", "P"]
_KNOWN = [UNTREATED, "ketamine", "ssri", "neurosteroid"]

RC = {
    "svg.hashsalt": "virtualpatient",
    "svg.fonttype": "none",
    "font.size": 9,
    "axes.titlesize": 9,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "path.simplify": False,
}


def arm_style(arm: str, arms: list[str] | None = None) -> dict:
    """Colour (grey), line style and marker of an arm, stable across figures."""
    if arm in _KNOWN:
        i = _KNOWN.index(arm)
    else:
        others = [a for a in (arms or [arm]) if a not in _KNOWN]
        i = len(_KNOWN) + (others.index(arm) if arm in others else 0)
    return {
        "color": _GREYS[i % len(_GREYS)],
        "linestyle": _LINESTYLES[i % len(_LINESTYLES)],
        "marker": _MARKERS[i % len(_MARKERS)],
    }


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def save_figure(fig, out_dir: str | Path, name: str) -> list[Path]:
    """Write ``fig`` to ``out_dir/name.png`` and ``.svg``, reproducibly; return the paths.

    Examples
    --------
    >>> import tempfile
    >>> from matplotlib.figure import Figure
    >>> from analysis.figures import save_figure
    >>> fig = Figure(); _ = fig.add_subplot().plot([0, 1])
    >>> [p.suffix for p in save_figure(fig, tempfile.mkdtemp(), "demo")]
    ['.png', '.svg']
    """
    import matplotlib

    if not isinstance(name, str) or not name or "/" in name:
        raise ValueError(f"name must be a plain file stem, got {name!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{name}.png", out / f"{name}.svg"]
    with matplotlib.rc_context(RC):
        fig.savefig(paths[0], format="png", dpi=130, metadata={"Software": None})
        # the layout is fixed by the first draw; freezing it saves recomputing it for the SVG
        fig.set_layout_engine("none")
        fig.savefig(paths[1], format="svg", metadata={"Date": None, "Creator": None})
    return paths


def _per_patient(df: pd.DataFrame, **where) -> np.ndarray:
    rows = select(df, **where)
    if rows["step"].notna().any():
        rows = rows[rows["step"] == rows["step"].max()]
    return rows.groupby("patient")["value"].mean().to_numpy(dtype=float)


def _short(arm: str) -> str:
    return {UNTREATED: "Untreated"}.get(arm, display_name(arm))


def _phase(arm: str) -> str:
    return "pruned" if arm == UNTREATED else "acute"


def plot_resilience(results: pd.DataFrame, *, confidence: float = 0.95):
    """Resilience curves: accuracy versus internal-noise SD, mean and CI band per arm.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.figures import plot_resilience
    >>> len(plot_resilience(make_results(n_patients=3)).axes)
    1
    """
    import matplotlib

    df = check_results(results)
    arms = arm_order(df)
    with matplotlib.rc_context(RC):
        fig = _figure(5.0, 3.6)
        ax = fig.add_subplot()
        for arm in arms:
            rows = select(
                df, arm=arm, phase=_phase(arm), metric="accuracy", condition="internal_noise"
            )
            sigmas = sorted(rows["noise_sigma"].dropna().unique())
            if not sigmas:
                continue
            means, lows, highs = [], [], []
            for s in sigmas:
                x = _per_patient(rows, noise_sigma=s)
                lo, hi = t_ci(x, confidence)
                means.append(x.mean())
                lows.append(x.mean() if math.isnan(lo) else lo)
                highs.append(x.mean() if math.isnan(hi) else hi)
            st = arm_style(arm, arms)
            ax.fill_between(sigmas, lows, highs, color=st["color"], alpha=0.18, linewidth=0)
            ax.plot(
                sigmas,
                means,
                label=display_name(arm),
                color=st["color"],
                linestyle=st["linestyle"],
                marker=st["marker"],
                markersize=4,
            )
        ax.set_xlabel("internal noise SD (σ)")
        ax.set_ylabel("accuracy (%)")
        ax.set_ylim(0, 102)
        ax.legend(frameon=False, loc="lower left")
    return fig


def plot_metric_points(
    results: pd.DataFrame,
    panels: list[tuple[str, str, str, str]],
    *,
    confidence: float = 0.95,
    seed: int = 0,
):
    """Per-patient points over arm means (with CI) for several measures.

    ``panels`` is a list of ``(title, metric, condition, unit)``; each panel
    shows every patient's value per arm (jittered, joined across arms by a
    faint line since every patient receives every arm) and the arm mean with
    its t confidence interval.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.figures import plot_metric_points
    >>> fig = plot_metric_points(make_results(n_patients=3), [("Gain", "gain", "", "")])
    >>> len(fig.axes)
    1
    """
    import matplotlib

    df = check_results(results)
    arms = arm_order(df)
    rng = np.random.default_rng(seed)
    with matplotlib.rc_context(RC):
        fig = _figure(2.3 * len(panels) + 0.4, 3.4)
        axes = fig.subplots(1, len(panels), squeeze=False)[0]
        for ax, (title, metric, condition, unit) in zip(axes, panels, strict=True):
            wide = {}
            for arm in arms:
                rows = select(df, arm=arm, phase=_phase(arm), metric=metric, condition=condition)
                wide[arm] = rows.groupby("patient")["value"].mean()
            frame = pd.DataFrame(wide)
            jitter = rng.uniform(-0.12, 0.12, size=frame.shape)
            xs = np.arange(len(arms))[None, :] + jitter
            for i in range(len(frame)):
                ax.plot(xs[i], frame.iloc[i].to_numpy(), color="#cccccc", linewidth=0.6, zorder=1)
            for j, arm in enumerate(arms):
                st = arm_style(arm, arms)
                vals = frame[arm].to_numpy(dtype=float)
                ax.scatter(
                    xs[:, j],
                    vals,
                    s=12,
                    facecolors="white",
                    edgecolors="#444444",
                    marker=st["marker"],
                    linewidths=0.8,
                    zorder=2,
                )
                ok = vals[~np.isnan(vals)]
                if ok.size:
                    lo, hi = t_ci(ok, confidence)
                    m = ok.mean()
                    ax.hlines(m, j - 0.28, j + 0.28, color="black", linewidth=1.6, zorder=3)
                    if not math.isnan(lo):
                        ax.errorbar(
                            j,
                            m,
                            yerr=[[m - lo], [hi - m]],
                            color="black",
                            capsize=3,
                            linewidth=1.0,
                            zorder=3,
                        )
            ax.set_xticks(range(len(arms)))
            ax.set_xticklabels([_short(a) for a in arms], rotation=35, ha="right")
            ax.set_title(title)
            if unit:
                ax.set_ylabel(unit)
    return fig


def plot_relapse_vs_duration(results: pd.DataFrame, *, confidence: float = 0.95):
    """Relapse probability versus maintenance duration per arm, with Wilson intervals.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.figures import plot_relapse_vs_duration
    >>> len(plot_relapse_vs_duration(make_results(n_patients=3)).axes)
    1
    """
    import matplotlib

    from analysis.summaries import relapse_probability

    df = check_results(results)
    rp = relapse_probability(df, by_duration=True, confidence=confidence).frame
    arms = [a for a in arm_order(df) if a in set(rp["arm"])]
    durations = sorted(rp["maintenance_epochs"].unique())
    pos = {d: i for i, d in enumerate(durations)}
    with matplotlib.rc_context(RC):
        fig = _figure(5.0, 3.6)
        ax = fig.add_subplot()
        width = 0.5 / max(1, len(arms))
        for k, arm in enumerate(arms):
            sub = rp[rp["arm"] == arm]
            offset = (k - (len(arms) - 1) / 2) * width
            x = np.array([pos[d] for d in sub["maintenance_epochs"]]) + offset
            y = sub["probability"].to_numpy()
            err = np.clip(
                [y - sub["conf_int_low"].to_numpy(), sub["conf_int_high"].to_numpy() - y], 0, None
            )
            st = arm_style(arm, arms)
            ax.errorbar(
                x,
                y,
                yerr=err,
                label=display_name(arm),
                color=st["color"],
                linestyle=st["linestyle"],
                marker=st["marker"],
                markersize=4,
                capsize=2,
                linewidth=1.0,
            )
        ax.set_xticks(range(len(durations)))
        ax.set_xticklabels([f"{d:g}" for d in durations])
        ax.set_xlabel("maintenance duration (epochs)")
        ax.set_ylabel("relapse probability (%)")
        ax.set_ylim(-3, 103)
        ax.legend(frameon=False, loc="center right")
    return fig


def plot_kaplan_meier(results: pd.DataFrame, protocol: Mapping | None = None):
    """Kaplan-Meier curves of time to relapse during wash-out, with censoring ticks.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.figures import plot_kaplan_meier
    >>> len(plot_kaplan_meier(make_results(n_patients=3)).axes)
    1
    """
    import matplotlib

    from analysis.survival import kaplan_meier, time_to_relapse

    df = check_results(results)
    ttr = time_to_relapse(df, protocol)
    km = kaplan_meier(ttr)
    arms = list(dict.fromkeys(ttr["arm"]))
    with matplotlib.rc_context(RC):
        fig = _figure(5.0, 3.6)
        ax = fig.add_subplot()
        for arm in arms:
            tab = km.table[km.table["arm"] == arm]
            t = np.concatenate([[0.0], tab["time"].to_numpy()])
            s = np.concatenate([[1.0], tab["survival"].to_numpy()])
            lo = np.concatenate([[1.0], tab["conf_int_low"].to_numpy()])
            hi = np.concatenate([[1.0], tab["conf_int_high"].to_numpy()])
            st = arm_style(arm, arms)
            ax.fill_between(t, lo, hi, step="post", color=st["color"], alpha=0.15, linewidth=0)
            ax.step(
                t,
                s,
                where="post",
                color=st["color"],
                linestyle=st["linestyle"],
                label=display_name(arm),
                linewidth=1.4,
            )
            cens = tab[tab["n_censored"] > 0]
            ax.plot(
                cens["time"],
                cens["survival"],
                linestyle="none",
                marker="|",
                markersize=8,
                color=st["color"],
            )
        ax.set_xlabel("wash-out step")
        ax.set_ylabel("probability of no relapse")
        ax.set_ylim(-0.02, 1.05)
        ax.legend(frameon=False, loc="lower left")
    return fig


def plot_washout(results: pd.DataFrame, protocol: Mapping | None = None):
    """Wash-out trajectories of biased-noise accuracy: one panel per arm, one line per duration.

    Lines are the mean over patients per maintenance duration; the band is
    +/- 1 SD across patients for the longest duration; the dashed line is the
    relapse threshold.

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.figures import plot_washout
    >>> len(plot_washout(make_results(n_patients=2, arms=["ssri"])).axes)
    1
    """
    import matplotlib

    df = check_results(results)
    rows = select(df, phase="washout", metric="accuracy", condition="biased")
    rows = rows[rows["step"].notna()]
    if rows.empty:
        raise ValueError("results have no per-step wash-out biased-noise accuracy rows")
    arms = [a for a in arm_order(df) if a in set(rows["arm"])]
    thr = relapse_threshold(protocol)
    durations = sorted(rows["maintenance_epochs"].dropna().unique())
    with matplotlib.rc_context(RC):
        fig = _figure(2.6 * len(arms) + 0.6, 3.4)
        axes = fig.subplots(1, len(arms), squeeze=False, sharey=True)[0]
        for ax, arm in zip(axes, arms, strict=True):
            sub = rows[rows["arm"] == arm]
            for k, d in enumerate(durations):
                traj = sub[sub["maintenance_epochs"] == d]
                stats = traj.groupby("step")["value"].agg(["mean", "std"])
                grey = str(0.75 * k / max(1, len(durations) - 1))
                style = _LINESTYLES[k % len(_LINESTYLES)]
                ax.plot(
                    stats.index,
                    stats["mean"],
                    color=grey,
                    linestyle=style,
                    linewidth=1.1,
                    label=f"{d:g} ep",
                )
                if k == len(durations) - 1:
                    sd = stats["std"].fillna(0.0)
                    ax.fill_between(
                        stats.index,
                        stats["mean"] - sd,
                        stats["mean"] + sd,
                        color="#999999",
                        alpha=0.2,
                        linewidth=0,
                    )
            ax.axhline(thr, color="black", linestyle=(0, (2, 2)), linewidth=0.9)
            ax.set_title(display_name(arm))
            ax.set_xlabel("wash-out step")
            ax.set_ylim(0, 102)
        axes[0].set_ylabel("biased-noise accuracy (%)")
        axes[-1].legend(frameon=False, title="maintenance", loc="lower left", fontsize=7)
    return fig


def plot_sparsity(results: pd.DataFrame):
    """Sparsity per patient before (pruned) and after each arm (acute, and after re-pruning).

    Examples
    --------
    >>> from analysis.synthetic import make_results
    >>> from analysis.figures import plot_sparsity
    >>> len(plot_sparsity(make_results(n_patients=3)).axes)
    1
    """
    import matplotlib

    df = check_results(results)
    arms = [a for a in arm_order(df) if a != UNTREATED]
    before = _per_patient(df, arm=UNTREATED, phase="pruned", metric="sparsity")
    stages = [("acute", "after treatment"), ("acute_relapse", "after further pruning")]
    with matplotlib.rc_context(RC):
        fig = _figure(1.3 * len(arms) + 2.4, 3.4)
        ax = fig.add_subplot()
        ticks, labels = [], []
        if before.size:
            ax.scatter(np.zeros(before.size), before, s=16, marker="o", facecolors="white",
                       edgecolors="black")
            ticks.append(0.0)
            labels.append("Pruned\n(before)")
        for i, arm in enumerate(arms, start=1):
            st = arm_style(arm, arms)
            for k, (phase, _) in enumerate(stages):
                vals = _per_patient(df, arm=arm, phase=phase, metric="sparsity")
                if vals.size:
                    ax.scatter(np.full(vals.size, i + (k - 0.5) * 0.3), vals, s=16,
                               marker=st["marker"], edgecolors="black",
                               facecolors="black" if k else "white")
            ticks.append(float(i))
            labels.append(_short(arm))
        ax.set_xticks(ticks)
        ax.set_xticklabels(labels)
        ax.set_xlim(-0.6, len(arms) + 0.6)
        ax.set_ylabel("sparsity (% of weight entries masked)")
        ax.set_ylim(0, 102)
        handles = [
            ax.scatter([], [], marker="s", facecolors="white", edgecolors="black",
                       label="after acute treatment (left)"),
            ax.scatter([], [], marker="s", facecolors="black", edgecolors="black",
                       label="after further pruning (right)"),
        ]
        ax.legend(handles=handles, frameon=False, loc="lower left", fontsize=7)
    return fig


def _load_weights(weights_dir: Path) -> dict[str, np.ndarray]:
    out: dict[str, list[np.ndarray]] = {}
    for path in sorted(weights_dir.glob("*_p*.npz")):
        arm = path.stem.rsplit("_p", 1)[0]
        with np.load(path) as data:
            mats = [np.asarray(data[k]).ravel() for k in sorted(data.files) if k.startswith("W")]
        if mats:
            out.setdefault(arm, []).append(np.concatenate(mats))
    return {arm: np.concatenate(v) for arm, v in out.items()}


def plot_weight_magnitudes(weights_dir: str | Path, arms: list[str] | None = None):
    """Distributions of non-zero |weight| before (pruned) and after each arm.

    Reads ``weights_dir/<arm>_p<patient>.npz`` (arrays ``W0..W3``); pools
    patients and layers; histograms of log10 |w| of the unmasked (non-zero)
    entries, one panel per treated arm with the pruned baseline behind it.

    Raises
    ------
    ValueError
        If the folder holds no weight files or no ``untreated`` files.
    """
    import matplotlib

    wdir = Path(weights_dir)
    if not wdir.is_dir():
        raise ValueError(f"no weights folder at {wdir}")
    weights = _load_weights(wdir)
    if UNTREATED not in weights or len(weights) < 2:
        raise ValueError(f"{wdir} needs untreated_p*.npz and at least one arm's files")
    treated = [a for a in (arms or list(weights)) if a != UNTREATED and a in weights]
    treated = [a for a in _KNOWN if a in treated] + [a for a in treated if a not in _KNOWN]
    base = np.abs(weights[UNTREATED])
    base = np.log10(base[base > 0])
    with matplotlib.rc_context(RC):
        fig = _figure(2.6 * len(treated) + 0.6, 3.2)
        axes = fig.subplots(1, len(treated), squeeze=False, sharey=True)[0]
        allv = [base] + [np.log10(np.abs(weights[a])[np.abs(weights[a]) > 0]) for a in treated]
        lo = min(float(v.min()) for v in allv if v.size)
        hi = max(float(v.max()) for v in allv if v.size)
        bins = np.linspace(lo, hi, 41)
        for ax, arm in zip(axes, treated, strict=True):
            after = np.abs(weights[arm])
            after = np.log10(after[after > 0])
            ax.hist(base, bins=bins, color="#bbbbbb", label="pruned (before)")
            ax.hist(
                after,
                bins=bins,
                histtype="step",
                color="black",
                linewidth=1.2,
                label="after treatment",
            )
            ax.set_title(display_name(arm))
            ax.set_xlabel("log10 |w| (non-zero weights)")
        axes[0].set_ylabel("count (all patients, all layers)")
        axes[-1].legend(frameon=False, fontsize=7)
    return fig


@dataclass
class FigureRecord:
    """One figure of the report: name, caption, written paths, or why skipped."""

    name: str
    caption: str
    paths: list[Path] = field(default_factory=list)
    skipped: str = ""


TABLE1_PANELS = [
    ("Sparsity", "sparsity", "", "%"),
    ("Clean", "accuracy", "clean", "accuracy (%)"),
    ("Standard", "accuracy", "standard", "accuracy (%)"),
    ("Combined stress", "accuracy", "combined", "accuracy (%)"),
]
TABLE3_PANELS = [
    ("Gain multiplier", "gain", "", ""),
    ("Biased-noise accuracy", "accuracy", "biased", "accuracy (%)"),
    ("Activation magnitude", "activation_magnitude", "", "mean |activation|"),
]


def make_figures(
    results: pd.DataFrame,
    out_dir: str | Path,
    protocol: Mapping | None = None,
    *,
    weights_dir: str | Path | None = None,
) -> list[FigureRecord]:
    """Draw and save every figure of the report (PNG and SVG) with its caption.

    A figure whose data are absent (e.g. no ``weights/`` folder, no wash-out
    rows) is skipped; its record says why.

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results table.
    out_dir : str or Path
        Folder for the files (created).
    protocol : dict, optional
        Resolved protocol (relapse threshold).
    weights_dir : str or Path, optional
        Folder of ``<arm>_p<patient>.npz`` weight files.

    Returns
    -------
    list of FigureRecord

    Examples
    --------
    >>> import tempfile
    >>> from analysis.synthetic import make_results
    >>> from analysis.figures import make_figures
    >>> recs = make_figures(make_results(n_patients=2), tempfile.mkdtemp())
    >>> [r.name for r in recs if not r.skipped][:3]
    ['resilience', 'table1_points', 'table3_points']
    """
    df = check_results(results)
    n = int(df["patient"].nunique())
    thr = relapse_threshold(protocol)
    pct = "95 %"
    specs: list[tuple[str, str, Callable[[], object]]] = [
        (
            "resilience",
            f"Resilience curves: accuracy on the standard test set versus internal-noise SD "
            f"(Table 2), mean over {n} patients with {pct} t confidence bands; untreated is "
            "the pruned network, treated arms are after acute treatment.",
            lambda: plot_resilience(df),
        ),
        (
            "table1_points",
            f"Table 1 measures per patient (open symbols, joined across arms for each of the "
            f"{n} patients) over the arm mean (bar) with its {pct} t confidence interval.",
            lambda: plot_metric_points(df, TABLE1_PANELS),
        ),
        (
            "table3_points",
            f"Table 3 measures (manic conversion risk) per patient over the arm mean with its "
            f"{pct} t confidence interval; lower biased-noise accuracy means higher risk.",
            lambda: plot_metric_points(df, TABLE3_PANELS),
        ),
        (
            "relapse_vs_duration",
            f"Manic relapse probability after wash-out versus maintenance duration, share of "
            f"the {n} patients relapsing (biased-noise accuracy < {thr:g} % at the last step) "
            f"with {pct} Wilson intervals.",
            lambda: plot_relapse_vs_duration(df),
        ),
        (
            "kaplan_meier",
            f"Kaplan-Meier estimates of remaining relapse-free during wash-out: time is the "
            f"first decay step with biased-noise accuracy below {thr:g} %; trajectories that "
            f"never cross are censored at the last step (ticks); bands are pointwise {pct} "
            "log-log intervals treating each patient x duration trajectory as independent.",
            lambda: plot_kaplan_meier(df, protocol),
        ),
        (
            "washout_trajectories",
            f"Wash-out trajectories of biased-noise accuracy, mean over patients per "
            f"maintenance duration (grey level and dash), with +/- 1 SD across patients for "
            f"the longest duration; dashed black line: relapse threshold {thr:g} %.",
            lambda: plot_washout(df, protocol),
        ),
        (
            "sparsity",
            "Sparsity (share of masked weight entries) per patient: pruned baseline, after "
            "each arm's acute treatment (open) and after the acute-relapse re-pruning (filled).",
            lambda: plot_sparsity(df),
        ),
    ]
    records = []
    out = Path(out_dir)
    for name, caption, draw in specs:
        try:
            fig = draw()
        except ValueError as exc:
            records.append(FigureRecord(name, caption, skipped=str(exc)))
            continue
        records.append(FigureRecord(name, caption, save_figure(fig, out, name)))
    wcaption = (
        "Distribution of non-zero weight magnitudes (log10 |w|, all patients and layers) "
        "of the pruned baseline (grey) and after each arm's acute treatment (outline)."
    )
    if weights_dir is None or not Path(weights_dir).is_dir():
        records.append(
            FigureRecord(
                "weight_magnitudes",
                wcaption,
                skipped="the run folder has no weights/ folder of final weight matrices",
            )
        )
    else:
        try:
            fig = plot_weight_magnitudes(weights_dir)
            records.append(
                FigureRecord(
                    "weight_magnitudes", wcaption, save_figure(fig, out, "weight_magnitudes")
                )
            )
        except (ValueError, OSError, KeyError, EOFError, zipfile.BadZipFile) as exc:  # a damaged .npz
            records.append(FigureRecord("weight_magnitudes", wcaption, skipped=str(exc)))
    return records
