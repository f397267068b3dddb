"""Sheet 068E, scarring and kindling: its published numbers, findings and kindling summary, read
from a run of ``studies/family/scarring.toml``.

The study (sheet facts 1-10): 068D in full plus early random scars after the prune (untreated
``pruned`` row ``scar_fraction``), then per arm, on a copy of the post-treatment state, six
kindling cycles c = 0-5: maintenance (from c = 1), state (``kindling/state``: gain, activation
magnitude, severity, sparsity, scar %), a trigger test at bias 1.5 falling to 0.5
(``kindling/trigger``: biased accuracy and ``relapsed`` below 60 %), an episode that scars the
weakest live weights if it relapsed (``kindling/episode``), and the scar % after it
(``kindling/after``); then the autonomy test at bias 0.3 (``kindling/autonomy``, ``relapsed`` =
accuracy below 70 % = autonomous). The maintenance/discontinuation block writes ``washout`` rows
whose last step per duration carries ``relapsed``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from analysis._data import arm_order, check_results, display_name
from analysis._results import FrameResults, fmt_num, frame_to_text
from analysis.family import _rules as rules
from analysis.family._rows import (
    ARMS,
    BIASED,
    COMBINED,
    KET,
    NEURO,
    OFF_BIASED,
    OFF_COMBINED,
    OFF_SIGMA_25,
    SIGMA_25,
    SSRI,
    TREATED,
    UNT,
    Reader,
    acute,
    at,
    by_cycle,
    empty,
    pick,
)
from analysis.family._sheet import Finding, NotTestable, Quantity, Sheet

__all__ = ["KINDLING_BIAS", "KINDLING_CYCLES", "SHEET", "KindlingSummary", "kindling_summary", "plot_kindling"]

#: Kindling cycles c = 0..5 (fact 8).
KINDLING_CYCLES = 6

#: The trigger bias of each cycle, b_c = 1.5 + (c / 5)(0.5 - 1.5) (fact 8): used where the run's
#: protocol does not give it.
KINDLING_BIAS = (1.5, 1.3, 1.1, 0.9, 0.7, 0.5)

#: Trigger accuracy (%) below which a kindling cycle relapses (fact 8c, 068D's threshold).
RELAPSE_BELOW = 60.0

#: Label of the kindling block's rows.
KINDLING = "kindling"

#: "Mostly relapse": the lower Wilson 95 % bound of the share of patient x duration wash-outs that
#: ended relapsed lies above this many percent (068E-2).
MOSTLY = 50.0

#: Scar fractions are percentages of float sums; a fall smaller than this is rounding (068E-5).
SCAR_TOLERANCE = 1e-9


def _kindling(results: pd.DataFrame, arm: str, phase: str, metric: str, condition: str = "") -> pd.DataFrame:
    """Patients x kindling cycles 0-5 of ``metric`` at the kindling ``phase``; complete patients only."""
    return by_cycle(results, arm, phase, metric, condition, range(KINDLING_CYCLES), label_prefix=f"{KINDLING}/")


def _total_relapses(results: pd.DataFrame, arm: str) -> pd.Series:
    wide = _kindling(results, arm, "trigger", "relapsed")
    return wide.sum(axis=1) if not wide.empty else empty()


def _final_scar(results: pd.DataFrame, arm: str) -> pd.Series:
    wide = _kindling(results, arm, "after", "scar_fraction")
    return wide[KINDLING_CYCLES - 1] if not wide.empty else empty()


WASHOUT_RELAPSE = at("washout", "relapsed", arms=TREATED, scale=100.0)
AUTONOMOUS = at("autonomy", "relapsed", arms=TREATED, scale=100.0)
AUTONOMY_ACCURACY = at("autonomy", "accuracy", "biased", arms=TREATED)
TOTAL_RELAPSES: Reader = _total_relapses
FINAL_SCAR: Reader = _final_scar

QUANTITIES = (
    Quantity("sparsity %", acute("sparsity")),
    Quantity("scar % (early adversity)", acute("scar_fraction"), decimals=2),
    Quantity("clean %", acute("accuracy", "clean")),
    Quantity("combined stress %", COMBINED),
    Quantity("biased (bias 1.0) %", BIASED),
    Quantity("activation magnitude", acute("activation_magnitude"), decimals=3),
    Quantity("internal sigma 2.5 %", SIGMA_25),
    Quantity("acute relapse drop (points)", at("acute_relapse", "relapse_drop")),
    Quantity("relapse probability after discontinuation %", WASHOUT_RELAPSE),
    Quantity("kindling: total relapses (of 6)", TOTAL_RELAPSES),
    Quantity("kindling: final scar %", FINAL_SCAR),
    Quantity("kindling: autonomy rate (bias 0.3, < 70 %) %", AUTONOMOUS, decimals=0),
    Quantity("kindling: autonomy-test accuracy %", AUTONOMY_ACCURACY),
    Quantity("off medication: combined %", OFF_COMBINED),
    Quantity("off medication: internal sigma 2.5 %", OFF_SIGMA_25),
    Quantity("off medication: biased %", OFF_BIASED),
)

#: The sheet's table ("Published results to compare with"), 10 seeds, mean and population SD; the
#: early-adversity scar fraction is the untreated network's scar %.
PUBLISHED: dict[tuple[str, str], tuple[float, float | None]] = {
    ("sparsity %", UNT): (95.2, 0.1), ("sparsity %", KET): (49.1, 1.0),
    ("sparsity %", SSRI): (95.2, 0.1), ("sparsity %", NEURO): (95.2, 0.1),
    ("scar % (early adversity)", UNT): (3.00, 1.92),
    ("clean %", UNT): (34.7, 11.9), ("clean %", KET): (100.0, 0.0),
    ("clean %", SSRI): (100.0, 0.0), ("clean %", NEURO): (100.0, 0.0),
    ("combined stress %", UNT): (29.9, 2.5), ("combined stress %", KET): (97.1, 0.3),
    ("combined stress %", SSRI): (90.3, 3.0), ("combined stress %", NEURO): (97.6, 0.3),
    ("biased (bias 1.0) %", UNT): (25.3, 0.5), ("biased (bias 1.0) %", KET): (86.2, 10.4),
    ("biased (bias 1.0) %", SSRI): (45.8, 12.7), ("biased (bias 1.0) %", NEURO): (50.0, 6.8),
    ("activation magnitude", UNT): (0.098, 0.013), ("activation magnitude", KET): (0.646, 0.062),
    ("activation magnitude", SSRI): (0.379, 0.075), ("activation magnitude", NEURO): (0.193, 0.008),
    ("internal sigma 2.5 %", NEURO): (42.4, 0.7),
    ("acute relapse drop (points)", KET): (-0.0, 0.5), ("acute relapse drop (points)", SSRI): (6.7, 2.3),
    ("acute relapse drop (points)", NEURO): (5.9, 3.2),
    ("relapse probability after discontinuation %", KET): (0.0, 0.0),
    ("relapse probability after discontinuation %", SSRI): (98.3, 5.0),
    ("relapse probability after discontinuation %", NEURO): (93.3, 15.3),
    ("kindling: total relapses (of 6)", KET): (0.7, 1.0), ("kindling: total relapses (of 6)", SSRI): (3.9, 2.0),
    ("kindling: total relapses (of 6)", NEURO): (2.9, 0.5),
    ("kindling: final scar %", KET): (7.3, 5.1), ("kindling: final scar %", SSRI): (4.6, 1.9),
    ("kindling: final scar %", NEURO): (3.7, 1.8),
    ("kindling: autonomy rate (bias 0.3, < 70 %) %", KET): rules.share(0, 10),
    ("kindling: autonomy rate (bias 0.3, < 70 %) %", SSRI): rules.share(3, 10),
    ("kindling: autonomy rate (bias 0.3, < 70 %) %", NEURO): rules.share(0, 10),
    ("kindling: autonomy-test accuracy %", KET): (97.1, 1.8),
    ("kindling: autonomy-test accuracy %", SSRI): (75.9, 10.7),
    ("kindling: autonomy-test accuracy %", NEURO): (92.7, 1.8),
    ("off medication: combined %", NEURO): (77.8, 4.0),
    ("off medication: internal sigma 2.5 %", NEURO): (57.7, 3.6),
    ("off medication: biased %", NEURO): (37.9, 10.1),
}


# --------------------------------------------------------------------------- findings


def _washout_verdicts(results: pd.DataFrame, arm: str) -> pd.Series:
    rows = pick(results, arm, "washout", "relapsed")
    if rows.empty:
        raise NotTestable(f"no wash-out relapse verdicts for {rules.name(arm)} in this run")
    return rows["value"]


def _ketamine_never_relapses(results: pd.DataFrame) -> tuple[bool, str]:
    v = _washout_verdicts(results, KET)
    k = int(v.sum())
    return k == 0, f"{rules.name(KET)}: {rules.wilson(k, len(v))} patient x duration wash-outs ended relapsed"


def _mostly_relapse(results: pd.DataFrame) -> tuple[bool, str]:
    ok, parts = True, []
    for arm in (SSRI, NEURO):
        v = _washout_verdicts(results, arm)
        k = int(v.sum())
        lo, _ = rules.wilson_bounds(k, len(v))
        ok &= lo > MOSTLY
        parts.append(f"{rules.name(arm)} {rules.wilson(k, len(v))}")
    return ok, "; ".join(parts)


def _side(results: pd.DataFrame, reader: Reader, arm: str, what: str) -> rules.Side:
    return rules.name(arm), rules.values(results, reader, arm, what)


def _most_kindling(results: pd.DataFrame) -> tuple[bool, str]:
    what = "complete kindling trigger verdicts (cycles 0-5)"
    ssri = _side(results, TOTAL_RELAPSES, SSRI, what)
    return rules.ordered([(ssri, _side(results, TOTAL_RELAPSES, a, what)) for a in (KET, NEURO)],
                         unit=" relapses")


def _fewest_kindling(results: pd.DataFrame) -> tuple[bool, str]:
    what = "complete kindling trigger verdicts (cycles 0-5)"
    ket = _side(results, TOTAL_RELAPSES, KET, what)
    return rules.ordered([(_side(results, TOTAL_RELAPSES, a, what), ket) for a in (SSRI, NEURO)],
                         unit=" relapses")


def _scar_sequences(results: pd.DataFrame, arm: str) -> pd.DataFrame:
    """Patients x the scar % in kindling order: acute, then state and after of each cycle."""
    start = at(None, "scar_fraction")(results, arm).rename("acute")
    state = _kindling(results, arm, "state", "scar_fraction")
    after = _kindling(results, arm, "after", "scar_fraction")
    cols = [start]
    for c in range(KINDLING_CYCLES):
        if c in state and c in after:
            cols += [state[c].rename(f"state {c}"), after[c].rename(f"after {c}")]
    return pd.concat(cols, axis=1, join="inner").dropna()


def _scars_never_shrink(results: pd.DataFrame) -> tuple[bool, str]:
    seqs = {arm: _scar_sequences(results, arm) for arm in TREATED}
    seqs = {arm: s for arm, s in seqs.items() if s.shape[1] > 1 and not s.empty}
    if not seqs:
        raise NotTestable("no kindling scar rows in this run")
    falls = {arm: float((-np.diff(s.to_numpy(), axis=1)).max(initial=-np.inf)) for arm, s in seqs.items()}
    n = sum(len(s) for s in seqs.values())
    worst = max(falls.values())
    ok = worst <= SCAR_TOLERANCE
    detail = ", ".join(f"{rules.name(a)} {len(s)}" for a, s in seqs.items())
    growth = ", ".join(f"{rules.name(a)} {s.iloc[:, 0].mean():.2f} -> {s.iloc[:, -1].mean():.2f} %"
                       for a, s in seqs.items())
    largest = f"largest fall {worst:.3g} points" if worst > 0 else "no fall"
    return ok, f"{n} patient x arm sequences ({detail}); {largest}; mean scar {growth}"


def _autonomy_only_ssri(results: pd.DataFrame) -> tuple[bool, str]:
    parts, counts = [], {}
    for arm in TREATED:
        v = rules.values(results, AUTONOMOUS, arm, "autonomy verdict")
        counts[arm] = int((v > 0).sum())
        parts.append(f"{rules.name(arm)} {rules.wilson(counts[arm], len(v))}")
    ok = counts[SSRI] > 0 and counts[KET] == 0 and counts[NEURO] == 0
    return ok, "autonomous: " + "; ".join(parts)


def _ketamine_most_scar(results: pd.DataFrame) -> tuple[bool, str]:
    what = "final kindling scar %"
    ket = _side(results, FINAL_SCAR, KET, what)
    return rules.ordered([(ket, _side(results, FINAL_SCAR, a, what)) for a in (SSRI, NEURO)])


def _ssri_lowest_autonomy_accuracy(results: pd.DataFrame) -> tuple[bool, str]:
    what = "autonomy-test accuracy"
    ssri = _side(results, AUTONOMY_ACCURACY, SSRI, what)
    return rules.ordered([(_side(results, AUTONOMY_ACCURACY, a, what), ssri) for a in (KET, NEURO)])


def _off_medication(results: pd.DataFrame) -> tuple[bool, str]:
    return rules.on_off(results, [("combined", COMBINED, OFF_COMBINED, False), ("biased", BIASED, OFF_BIASED, False),
                                  ("sigma 2.5", SIGMA_25, OFF_SIGMA_25, True)])


FINDINGS = (
    Finding("068E-1", "No ketamine-like patient relapses after discontinuation, whatever the maintenance "
            "duration", "descriptive: no patient x duration wash-out ends relapsed (Wilson 95 % interval shown)",
            _ketamine_never_relapses),
    Finding("068E-2", "SSRI-like and neurosteroid-like relapse after most discontinuations",
            f"descriptive: Wilson 95 % lower bound of the relapsed share of patient x duration > {MOSTLY:g} % "
            "in each arm", _mostly_relapse),
    Finding("068E-3", "SSRI-like relapses most often in the kindling cycles",
            "one-sided paired Wilcoxon of total relapses (of 6) SSRI-like > each other treated arm, Holm",
            _most_kindling),
    Finding("068E-4", "Ketamine-like relapses least often in the kindling cycles",
            "one-sided paired Wilcoxon of total relapses (of 6) ketamine-like < each other treated arm, Holm",
            _fewest_kindling),
    Finding("068E-5", "Scars never shrink: the scar fraction only grows from treatment through every kindling "
            "cycle, even under ketamine-like regrowth",
            "descriptive: in every patient and arm the scar % after treatment, at each state and after each "
            "episode never falls (tolerance 1e-9)", _scars_never_shrink),
    Finding("068E-6", "Autonomous episodes (relapse at the weak bias 0.3) appear only with SSRI-like treatment",
            "descriptive: at least one SSRI-like patient and no ketamine-like or neurosteroid-like patient "
            "below 70 % at bias 0.3", _autonomy_only_ssri),
    Finding("068E-7", "Ketamine-like ends the kindling cycles with the most scar, despite the fewest relapses "
            "(it has the most live weights to scar)",
            "one-sided paired Wilcoxon of final scar % ketamine-like > each other treated arm, Holm",
            _ketamine_most_scar),
    Finding("068E-8", "SSRI-like has the lowest accuracy in the autonomy test",
            "one-sided paired Wilcoxon autonomy-test accuracy of each other treated arm > SSRI-like, Holm",
            _ssri_lowest_autonomy_accuracy),
    Finding("068E-9", "Off medication, neurosteroid-like loses combined and biased accuracy but gains at sigma 2.5",
            "one-sided paired Wilcoxon on > off (combined, biased) and off > on (sigma 2.5), Holm over three",
            _off_medication),
)

SHEET = Sheet(
    id="068E",
    title="irreversible episode scarring and kindling",
    source="family/068E-scarring.md",
    n_published=10,
    arms=ARMS,
    quantities=QUANTITIES,
    published=PUBLISHED,
    findings=FINDINGS,
    notes=(
        "Early adversity scars among all positions, most of them already pruned (fact 3, the code's reading); "
        "its scar % is the untreated row of 'scar % (early adversity)'.",
        "The sheet prints the autonomy rate as a share of seeds; its SD is that of the 0/1 values, "
        "sqrt(p (1 - p)).",
    ),
)


# --------------------------------------------------------------------------- kindling summary


def _trigger_bias(protocol: Mapping | None, arm: str) -> dict[int, float]:
    """Cycle -> trigger bias of an arm's ``kindling/trigger`` phases in a saved protocol (``{}`` where
    the protocol does not say): a scalar bias, or a per-cycle list inside a ``repeat``."""
    regimens = protocol.get("regimens") if isinstance(protocol, Mapping) else None
    phases = regimens.get(arm) if isinstance(regimens, Mapping) else None
    found: dict[int, float] = {}

    def walk(items: object, path: tuple[str, ...], cycle: int) -> None:
        for ph in items if isinstance(items, list) else ():
            if not isinstance(ph, Mapping):
                continue
            here = (*path, ph["label"]) if ph.get("label") else path
            if ph.get("phase") == "repeat":
                for c in range(1, int(ph.get("times", 0)) + 1):
                    walk(ph.get("phases"), here, c)
            elif ph.get("phase") == "probe":
                walk(ph.get("phases"), here, cycle)
            elif ph.get("phase") == "washout" and here == (KINDLING, "trigger") and "bias" in ph:
                bias = ph["bias"]
                if isinstance(bias, list):
                    if 1 <= cycle <= len(bias):
                        found[cycle] = float(bias[cycle - 1])
                else:
                    found[cycle] = float(bias)

    walk(phases, (), 0)
    return found


class KindlingSummary(FrameResults):
    """The kindling block per arm and cycle (sheet 068E, fact 10), from :func:`kindling_summary`.

    Attributes
    ----------
    frame : pandas.DataFrame
        One row per arm and cycle: ``arm, cycle, bias, n, biased_accuracy, biased_accuracy_sd,
        relapsed, relapse_rate, scar_after, scar_after_sd, severity, activation_magnitude`` (SDs are
        population SDs; ``relapsed`` counts patients, ``relapse_rate`` is their percentage).
    """

    def summary(self) -> str:
        """The table as the sheet would print it: one line per arm and cycle."""
        rows = []
        for _, r in self.frame.iterrows():
            rows.append({
                "arm": display_name(r["arm"]), "cycle": str(int(r["cycle"])), "bias": fmt_num(r["bias"], 1),
                "biased acc. %": f"{fmt_num(r['biased_accuracy'], 1)} ± {fmt_num(r['biased_accuracy_sd'], 1)}",
                "relapsed": f"{int(r['relapsed'])}/{int(r['n'])} ({fmt_num(r['relapse_rate'], 0)} %)",
                "scar % after": f"{fmt_num(r['scar_after'], 2)} ± {fmt_num(r['scar_after_sd'], 2)}",
                "severity": fmt_num(r["severity"], 2), "activation": fmt_num(r["activation_magnitude"], 3),
            })
        head = "Kindling per arm and cycle (sheet 068E, fact 10): mean ± population SD over patients"
        return head + "\n" + frame_to_text(pd.DataFrame(rows, columns=list(rows[0]) if rows else ["arm"]))


def _cycle_stat(results: pd.DataFrame, arm: str, phase: str, metric: str, condition: str = "") -> pd.DataFrame:
    rows = pick(results, arm, phase, metric, condition)
    if "label" in rows:
        rows = rows[rows["label"].astype(str).str.startswith(f"{KINDLING}/")]
    per = rows.groupby(["cycle", "patient"])["value"].mean()
    return per.groupby(level="cycle").agg(["mean", lambda v: float(np.std(v)), "sum", "size"]).set_axis(
        ["mean", "sd", "sum", "n"], axis=1)


def kindling_summary(results: pd.DataFrame, protocol: Mapping | None = None) -> KindlingSummary:
    """Summarise the kindling block per arm and cycle, as sheet 068E's fact 10 lists it.

    Per arm and cycle: the trigger bias, the mean (and population SD) of the trigger's biased
    accuracy, how many patients relapsed (accuracy below 60 %) and their percentage, the scar % after
    the cycle's event, and the mean severity and activation magnitude of the cycle's state. Every
    number is computed from the ``kindling/...`` rows; the bias comes from the run's ``protocol``
    (its ``kindling/trigger`` phases) and, where that does not say, from the sheet (fact 8).

    Parameters
    ----------
    results : pandas.DataFrame
        The tidy results of a run of ``studies/family/scarring.toml``.
    protocol : dict, optional
        The run's saved protocol (``protocol.json``).

    Returns
    -------
    KindlingSummary

    Raises
    ------
    ValueError
        The results have no ``cycle`` column or no kindling trigger rows.

    Examples
    --------
    >>> import pandas as pd
    >>> rows = [dict(patient=p, arm="ssri", phase="trigger", metric=m, condition=c, noise_sigma=None,
    ...              maintenance_epochs=None, step=0.0, value=v, cycle=0, label="kindling/trigger")
    ...         for p, (m, c, v) in enumerate([("relapsed", "", 1.0), ("relapsed", "", 0.0)])]
    >>> kindling_summary(pd.DataFrame(rows)).frame[["arm", "cycle", "bias", "relapsed", "n"]].values.tolist()
    [['ssri', 0, 1.5, 1, 2]]
    """
    df = check_results(results)
    if "cycle" not in df:
        raise ValueError("results have no 'cycle' column; the kindling block needs a run with schedules")
    records = []
    for arm in arm_order(df):
        verdicts = _cycle_stat(df, arm, "trigger", "relapsed")
        if verdicts.empty:
            continue
        accuracy = _cycle_stat(df, arm, "trigger", "accuracy", "biased")
        scar = _cycle_stat(df, arm, "after", "scar_fraction")
        severity = _cycle_stat(df, arm, "state", "severity")
        activation = _cycle_stat(df, arm, "state", "activation_magnitude")
        bias = _trigger_bias(protocol, arm)
        for cycle, v in verdicts.iterrows():
            c = int(cycle)

            def get(stat: pd.DataFrame, col: str = "mean", c: int = c) -> float:
                return float(stat.at[c, col]) if c in stat.index else float("nan")

            sheet_bias = KINDLING_BIAS[c] if 0 <= c < len(KINDLING_BIAS) else float("nan")
            records.append({
                "arm": arm, "cycle": c, "bias": bias.get(c, sheet_bias), "n": int(v["n"]),
                "biased_accuracy": get(accuracy), "biased_accuracy_sd": get(accuracy, "sd"),
                "relapsed": int(v["sum"]), "relapse_rate": 100.0 * float(v["sum"]) / float(v["n"]),
                "scar_after": get(scar), "scar_after_sd": get(scar, "sd"),
                "severity": get(severity), "activation_magnitude": get(activation),
            })
    if not records:
        raise ValueError("results have no kindling trigger rows (phase 'trigger', label 'kindling/trigger')")
    return KindlingSummary(pd.DataFrame.from_records(records), confidence=float("nan"))


def plot_kindling(summary: KindlingSummary, arms: Sequence[str] | None = None):
    """Figure of the kindling block: the trigger's biased accuracy and the scar % after the event per
    cycle, one line per arm (mean ± population SD over patients), in the report's arm styles; the
    dashed line is the relapse threshold (60 %).

    Returns a :class:`matplotlib.figure.Figure` (no pyplot state); save it with
    :func:`analysis.figures.save_figure` for reproducible files.
    """
    from matplotlib.figure import Figure

    from analysis.figures import arm_style

    if not isinstance(summary, KindlingSummary):
        raise TypeError(f"summary must be a KindlingSummary, got {type(summary).__name__}")
    frame = summary.frame
    fig = Figure(figsize=(9, 3.6), dpi=100, layout="constrained")
    axes = fig.subplots(1, 2)
    names = list(arms or dict.fromkeys(frame["arm"]))
    for arm in names:
        g = frame[frame["arm"] == arm]
        for ax, col in zip(axes, ("biased_accuracy", "scar_after"), strict=True):
            ax.errorbar(g["cycle"], g[col], yerr=g[f"{col}_sd"], capsize=3, label=display_name(arm),
                        **arm_style(arm, names))
    axes[0].axhline(RELAPSE_BELOW, color="grey", lw=0.8, ls="--")
    axes[0].set_ylabel("trigger biased accuracy (%)")
    axes[1].set_ylabel("scar % after the event")
    ticks = frame.drop_duplicates("cycle").sort_values("cycle")
    for ax in axes:
        ax.set_xticks(ticks["cycle"], [f"{int(c)}\n{fmt_num(b, 1)}" for c, b in zip(ticks["cycle"], ticks["bias"])])
        ax.set_xlabel("kindling cycle / trigger bias")
    axes[0].legend(fontsize=8)
    return fig
