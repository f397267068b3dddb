"""Sheet 068C, chronic stress: its published numbers and findings, read from a run of
``studies/family/chronic_stress.toml``.

The study (sheet facts 7-10): each arm's post-treatment network is assessed (cycle 0), then goes
through 8 cycles of [prune 10 % of what remains -> the arm's own maintenance -> assess]; rows
``phase = "chronic"``, ``cycle`` 0-8, combined accuracy and sparsity. A patient relapses in an arm
when its combined accuracy is below 80 % at any cycle 0-8, cycle 0 included (fact 10, the code's
reading). The acute part is 068D's without gain (facts 2-6).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.family import _rules as rules
from analysis.family._rows import (
    ARMS,
    COMBINED,
    KET,
    NEURO,
    OFF_COMBINED,
    OFF_SIGMA_25,
    SIGMA_25,
    SSRI,
    UNT,
    Reader,
    acute,
    at,
    by_cycle,
    empty,
)
from analysis.family._sheet import Finding, NotTestable, Quantity, Sheet

__all__ = ["CHRONIC_CYCLES", "RELAPSE_BELOW", "SHEET", "chronic_trajectory", "relapse_cycles"]

#: Stress cycles after cycle 0 (fact 9).
CHRONIC_CYCLES = 8

#: Combined accuracy (%) below which a patient counts as relapsed (fact 10).
RELAPSE_BELOW = 80.0

#: Share of the remaining weights each stress episode prunes (fact 9a).
EPISODE_SHARE = 0.1

#: "Keeps its combined accuracy": the one-sided 95 % upper bound of the mean drop from cycle 0 to
#: cycle 8 stays below this many points (068C-7).
KEEP_MARGIN = 2.0

#: The ketamine-like sparsity the sheet prints at cycle 8; 068C-11 checks ours to within
#: :data:`SPARSITY_TOLERANCE` points.
KETAMINE_CYCLE8_SPARSITY, SPARSITY_TOLERANCE = 77.4, 0.1


def chronic_trajectory(results: pd.DataFrame, arm: str, metric: str = "accuracy") -> pd.DataFrame:
    """Patients x cycles 0-8 of an arm's chronic-stress rows: combined accuracy (``metric =
    "accuracy"``) or sparsity; only patients measured at every cycle."""
    condition = "combined" if metric == "accuracy" else ""
    return by_cycle(results, arm, "chronic", metric, condition, range(CHRONIC_CYCLES + 1))


def relapse_cycles(results: pd.DataFrame, arm: str) -> pd.Series:
    """Each patient's first cycle (0-8) with combined accuracy below 80 %, NaN where it never is
    (fact 10: cycle 0 counts, so a patient below 80 % right after treatment relapses at 0)."""
    wide = chronic_trajectory(results, arm)
    below = wide < RELAPSE_BELOW
    first = below.to_numpy().argmax(axis=1).astype(float)
    first[~below.any(axis=1).to_numpy()] = np.nan
    return pd.Series(first, index=wide.index, name="relapse_cycle")


def _cycle(metric: str, cycle: int) -> Reader:
    def read(results: pd.DataFrame, arm: str) -> pd.Series:
        wide = chronic_trajectory(results, arm, metric)
        return wide[cycle] if not wide.empty else empty()

    return read


def _total_drop(results: pd.DataFrame, arm: str) -> pd.Series:
    wide = chronic_trajectory(results, arm)
    return wide[0] - wide[CHRONIC_CYCLES] if not wide.empty else empty()


def _relapsed(results: pd.DataFrame, arm: str) -> pd.Series:
    cycles = relapse_cycles(results, arm)
    return cycles.notna().astype(float) * 100.0 if not cycles.empty else empty()


CYCLE_0, CYCLE_8 = _cycle("accuracy", 0), _cycle("accuracy", CHRONIC_CYCLES)

QUANTITIES = (
    Quantity("sparsity %", acute("sparsity")),
    Quantity("clean %", acute("accuracy", "clean")),
    Quantity("combined stress %", COMBINED),
    Quantity("internal sigma 2.5 %", SIGMA_25),
    Quantity("acute relapse drop (points)", at("acute_relapse", "relapse_drop")),
    Quantity("chronic: combined at cycle 0 %", CYCLE_0),
    Quantity("chronic: combined at cycle 8 %", CYCLE_8),
    Quantity("chronic: sparsity at cycle 8 %", _cycle("sparsity", CHRONIC_CYCLES)),
    Quantity("total drop, cycle 0 -> 8 (points)", _total_drop),
    Quantity("relapsed, < 80 % at any cycle 0-8 (% of patients)", _relapsed, decimals=0),
    Quantity("off medication: combined %", OFF_COMBINED),
    Quantity("off medication: internal sigma 2.5 %", OFF_SIGMA_25),
)

#: The sheet's table ("Published results to compare with"), 10 seeds, mean and population SD.
PUBLISHED: dict[tuple[str, str], tuple[float, float | None]] = {
    ("sparsity %", UNT): (95.0, 0.0), ("sparsity %", KET): (47.5, 0.0),
    ("sparsity %", SSRI): (95.0, 0.0), ("sparsity %", NEURO): (95.0, 0.0),
    ("clean %", UNT): (32.1, 11.8), ("clean %", KET): (100.0, 0.0),
    ("clean %", SSRI): (97.5, 7.6), ("clean %", NEURO): (100.0, 0.0),
    ("combined stress %", UNT): (28.9, 2.4), ("combined stress %", KET): (97.3, 0.2),
    ("combined stress %", SSRI): (81.3, 8.8), ("combined stress %", NEURO): (97.8, 0.1),
    ("internal sigma 2.5 %", UNT): (27.8, 1.6), ("internal sigma 2.5 %", KET): (81.7, 3.0),
    ("internal sigma 2.5 %", SSRI): (42.0, 3.1), ("internal sigma 2.5 %", NEURO): (41.2, 1.0),
    ("acute relapse drop (points)", KET): (0.0, 0.4), ("acute relapse drop (points)", SSRI): (9.1, 5.8),
    ("acute relapse drop (points)", NEURO): (6.9, 5.6),
    ("chronic: combined at cycle 0 %", KET): (97.5, 0.2), ("chronic: combined at cycle 0 %", SSRI): (80.8, 8.7),
    ("chronic: combined at cycle 0 %", NEURO): (97.7, 0.2),
    ("chronic: combined at cycle 8 %", KET): (97.6, 0.4), ("chronic: combined at cycle 8 %", SSRI): (93.2, 2.0),
    ("chronic: combined at cycle 8 %", NEURO): (88.2, 14.0),
    ("chronic: sparsity at cycle 8 %", KET): (77.4, 0.0), ("chronic: sparsity at cycle 8 %", SSRI): (97.8, 0.0),
    ("chronic: sparsity at cycle 8 %", NEURO): (97.8, 0.0),
    ("total drop, cycle 0 -> 8 (points)", KET): (-0.1, 0.3), ("total drop, cycle 0 -> 8 (points)", SSRI): (-12.4, 8.3),
    ("total drop, cycle 0 -> 8 (points)", NEURO): (9.5, 14.0),
    ("relapsed, < 80 % at any cycle 0-8 (% of patients)", KET): rules.share(0, 10),
    ("relapsed, < 80 % at any cycle 0-8 (% of patients)", SSRI): rules.share(4, 10),
    ("relapsed, < 80 % at any cycle 0-8 (% of patients)", NEURO): rules.share(2, 10),
    ("off medication: combined %", NEURO): (68.8, 9.9),
    ("off medication: internal sigma 2.5 %", NEURO): (51.9, 2.8),
}


# --------------------------------------------------------------------------- findings


def _above_untreated(results: pd.DataFrame) -> tuple[bool, str]:
    unt = rules.values(results, COMBINED, UNT, "acute combined accuracy")
    return rules.ordered([((rules.name(a), rules.values(results, COMBINED, a, "acute combined accuracy")),
                           (rules.name(UNT), unt)) for a in (KET, NEURO)])


def _ssri_lowest(results: pd.DataFrame) -> tuple[bool, str]:
    ssri = rules.values(results, COMBINED, SSRI, "acute combined accuracy")
    return rules.ordered([((rules.name(a), rules.values(results, COMBINED, a, "acute combined accuracy")),
                           (rules.name(SSRI), ssri)) for a in (KET, NEURO)])


def _ketamine_extreme_noise(results: pd.DataFrame) -> tuple[bool, str]:
    ket = rules.values(results, SIGMA_25, KET, "accuracy at sigma 2.5")
    return rules.ordered([((rules.name(KET), ket), (rules.name(a), rules.values(results, SIGMA_25, a,
                                                                                  "accuracy at sigma 2.5")))
                          for a in (UNT, SSRI, NEURO)])


def _cycles_or_untestable(results: pd.DataFrame, arm: str) -> pd.Series:
    cycles = relapse_cycles(results, arm)
    if cycles.empty:
        raise NotTestable(f"no complete chronic-stress trajectory (cycles 0-{CHRONIC_CYCLES}) for {rules.name(arm)}")
    return cycles


def _never_relapses(results: pd.DataFrame) -> tuple[bool, str]:
    cycles = _cycles_or_untestable(results, KET)
    k = int(cycles.notna().sum())
    return k == 0, f"{rules.name(KET)}: {rules.wilson(k, len(cycles))} patients below 80 % at some cycle 0-8"


def _ssri_relapses_at_cycle_0(results: pd.DataFrame) -> tuple[bool, str]:
    cycles = _cycles_or_untestable(results, SSRI).dropna()
    if cycles.empty:
        raise NotTestable(f"no {rules.name(SSRI)} patient relapsed, so where relapses happen cannot be checked")
    at_0 = int((cycles == 0).sum())
    where = ", ".join(f"{c:g}" for c in cycles.sort_values())
    return at_0 == len(cycles), f"{at_0} of {len(cycles)} relapses at cycle 0 (relapse cycles: {where})"


def _neuro_in_remission_at_0(results: pd.DataFrame) -> tuple[bool, str]:
    cycles = _cycles_or_untestable(results, NEURO)
    k = int((cycles == 0).sum())
    later = ", ".join(f"{c:g}" for c in cycles.dropna().sort_values()) or "none"
    return k == 0, (f"{rules.name(NEURO)}: {rules.wilson(k, len(cycles))} patients below 80 % at cycle 0; "
                    f"relapse cycles: {later}")


def _drops(results: pd.DataFrame, arm: str) -> pd.Series:
    return rules.values(results, _total_drop, arm, f"chronic trajectory (cycles 0-{CHRONIC_CYCLES})")


def _ketamine_keeps(results: pd.DataFrame) -> tuple[bool, str]:
    drop = _drops(results, KET)
    if len(drop) < 2:
        raise NotTestable("fewer than two ketamine-like patients with a complete trajectory")
    bound = rules.upper_bound(drop)
    return bound < KEEP_MARGIN, (f"mean drop {drop.mean():.2f} points (SD {drop.std(ddof=0):.2f}), one-sided 95 % "
                                 f"upper bound {bound:.2f} vs margin {KEEP_MARGIN:g}; n = {len(drop)}")


def _ssri_improves(results: pd.DataFrame) -> tuple[bool, str]:
    c0 = rules.values(results, CYCLE_0, SSRI, "chronic combined accuracy at cycle 0")
    c8 = rules.values(results, CYCLE_8, SSRI, f"chronic combined accuracy at cycle {CHRONIC_CYCLES}")
    return rules.ordered([(("cycle 8", c8), ("cycle 0", c0))])


def _neuro_loses_more(results: pd.DataFrame) -> tuple[bool, str]:
    return rules.ordered([((rules.name(NEURO), _drops(results, NEURO)), (rules.name(KET), _drops(results, KET)))],
                         unit=" points")


def _off_medication(results: pd.DataFrame) -> tuple[bool, str]:
    return rules.on_off(results, [("combined", COMBINED, OFF_COMBINED, False),
                                  ("sigma 2.5", SIGMA_25, OFF_SIGMA_25, True)])


def _ketamine_sparsity(results: pd.DataFrame) -> tuple[bool, str]:
    wide = chronic_trajectory(results, KET, "sparsity")
    if wide.empty:
        raise NotTestable(f"no complete chronic sparsity trajectory for {rules.name(KET)}")
    final, start = float(wide[CHRONIC_CYCLES].mean()), float(wide[0].mean())
    expected = 100.0 - (100.0 - start) * (1.0 - EPISODE_SHARE) ** CHRONIC_CYCLES
    ok = abs(final - KETAMINE_CYCLE8_SPARSITY) <= SPARSITY_TOLERANCE
    return ok, (f"cycle 8 {final:.2f} % (sheet {KETAMINE_CYCLE8_SPARSITY:g}); from our cycle 0 ({start:.2f} %) "
                f"eight 10 % episodes give {expected:.2f} %; n = {len(wide)}")


FINDINGS = (
    Finding("068C-1", "Ketamine-like and neurosteroid-like both raise acute combined-stress accuracy above "
            "the untreated pruned network",
            "one-sided paired Wilcoxon arm > untreated, Holm over the two arms", _above_untreated),
    Finding("068C-2", "SSRI-like (here without a gain ramp) has the lowest acute combined-stress accuracy of "
            "the treated arms",
            "one-sided paired Wilcoxon ketamine-like and neurosteroid-like > SSRI-like, Holm", _ssri_lowest),
    Finding("068C-3", "Ketamine-like keeps the highest accuracy at extreme internal noise (sigma 2.5)",
            "one-sided paired Wilcoxon ketamine-like > each other arm at sigma 2.5, Holm", _ketamine_extreme_noise),
    Finding("068C-4", "No ketamine-like patient relapses under chronic stress",
            "descriptive: no patient below 80 % combined at any cycle 0-8 (Wilson 95 % interval shown)",
            _never_relapses),
    Finding("068C-5", "SSRI-like relapses are patients who never reached remission: each is already below 80 % "
            "at cycle 0, right after treatment",
            "descriptive: every SSRI-like relapse cycle is 0 (not testable without a relapse)",
            _ssri_relapses_at_cycle_0),
    Finding("068C-6", "Neurosteroid-like starts the stress series in remission: any relapse comes later",
            "descriptive: no neurosteroid-like patient below 80 % at cycle 0", _neuro_in_remission_at_0),
    Finding("068C-7", "Ketamine-like keeps its combined accuracy from cycle 0 to cycle 8 despite losing 10 % of "
            "its weights per episode",
            f"one-sided: 95 % upper t bound of the mean drop (cycle 0 - cycle 8) < {KEEP_MARGIN:g} points",
            _ketamine_keeps),
    Finding("068C-8", "SSRI-like ends the stress series better than it started (its maintenance courses keep "
            "training it)",
            "one-sided paired Wilcoxon combined at cycle 8 > cycle 0", _ssri_improves),
    Finding("068C-9", "Neurosteroid-like loses more combined accuracy over the stress series than ketamine-like",
            "one-sided paired Wilcoxon drop (cycle 0 - cycle 8) neurosteroid-like > ketamine-like",
            _neuro_loses_more),
    Finding("068C-10", "Off medication (damping 1, ReLU), neurosteroid-like loses combined accuracy but gains "
            "accuracy at sigma 2.5",
            "one-sided paired Wilcoxon on > off (combined) and off > on (sigma 2.5), Holm", _off_medication),
    Finding("068C-11", "Without regrowth, the ketamine-like sparsity climbs from 47.5 % to 77.4 % at cycle 8 "
            "(eight episodes of 10 % of what remains)",
            f"descriptive: mean cycle-8 sparsity within {SPARSITY_TOLERANCE:g} points of "
            f"{KETAMINE_CYCLE8_SPARSITY:g} %", _ketamine_sparsity),
)

SHEET = Sheet(
    id="068C",
    title="chronic stress: repeated pruning episodes with maintenance that differs by arm",
    source="family/068C-chronic-stress.md",
    n_published=10,
    arms=ARMS,
    quantities=QUANTITIES,
    published=PUBLISHED,
    findings=FINDINGS,
    notes=(
        "Sheet fact 13: the notebook printed untreated numbers that differ from 068D's with the same code "
        "and seeds (environment drift); compare within spread.",
        "Relapse counts cycle 0 (fact 10, the code's reading); the text counts cycles 1-8 only.",
        "The sheet prints the relapsed share as seeds out of 10; its SD is that of the 0/1 values, "
        "sqrt(p (1 - p)).",
    ),
)
