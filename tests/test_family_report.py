"""The family sheets' published numbers beside ours and their findings (analysis.family), and the
report sections they give a study that names a sheet (``compare_with``).

Planted tables are built row by row from seeded generators; the two end-to-end runs are the tiny
study files of tests/test_family_studies.py (2 patients, a small network), fixed by their seeds.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from test_family_studies import tiny

from analysis.family import SHEETS, Quantity, Sheet, compare_published, decide_findings
from analysis.family._rows import acute
from analysis.family.chronic_stress import CHRONIC_CYCLES
from analysis.family.scarring import KINDLING_BIAS, KINDLING_CYCLES, kindling_summary
from analysis.report import load_run, write_report
from virtualpatient import ClinicalTrial
from virtualpatient.schema import PUBLISHED_SHEETS

FAMILY = Path(__file__).resolve().parents[1] / "studies" / "family"
SMALL_ARM = {"epochs": 1, "score_batches": 2}


def row(patient: int, arm: str, phase: str, metric: str, value: float, condition: str = "", *,
        sigma: float = math.nan, cycle: int = 0, label: str | None = None, epochs: float = math.nan,
        step: float = math.nan) -> dict:
    """One row of the results schema (docs/results-schema.md) with the schedule columns."""
    return {"patient": patient, "arm": arm, "phase": phase, "metric": metric, "condition": condition,
            "noise_sigma": sigma, "maintenance_epochs": epochs, "step": step, "value": float(value),
            "time": 0.0, "cycle": cycle, "label": label or phase}


# --------------------------------------------------------------------------- the differs rule


def _combined(values: dict[str, list[float]]) -> pd.DataFrame:
    return pd.DataFrame([row(p, arm, "acute", "accuracy", v, "combined")
                         for arm, vs in values.items() for p, v in enumerate(vs)])


def _sheet(published: dict, n_published: int = 10, decimals: int = 1) -> Sheet:
    arms = tuple(dict.fromkeys(arm for _, arm in published))
    return Sheet("T", "test", "-", n_published, arms,
                 (Quantity("combined %", acute("accuracy", "combined"), decimals),), published, ())


def test_differs_rule_on_planted_values():
    """A planted match is within spread and a planted difference differs; the allowance is the one the
    docs state, 2 sqrt(sd_o^2/n_o + sd_p^2/n_p) + half a printed unit, computed here independently."""
    rng = np.random.default_rng(11)
    same = list(97.0 + rng.normal(0, 0.4, 10))
    shifted = list(93.0 + rng.normal(0, 0.4, 10))
    sheet = _sheet({("combined %", "ketamine"): (97.0, 0.5), ("combined %", "ssri"): (97.0, 0.5)})
    frame = compare_published(_combined({"ketamine": same, "ssri": shifted}), sheet).frame.set_index("arm")
    assert frame.loc["ketamine", "verdict"] == "within spread"
    assert frame.loc["ssri", "verdict"] == "differs"
    for arm, vals in (("ketamine", same), ("ssri", shifted)):
        sd = float(np.std(vals))  # population SD, as the sheets
        margin = 2 * math.sqrt(sd**2 / 10 + 0.5**2 / 10) + 0.05
        assert frame.loc[arm, "margin"] == pytest.approx(margin, abs=1e-12)
        assert frame.loc[arm, "difference"] == pytest.approx(np.mean(vals) - 97.0, abs=1e-12)
        assert frame.loc[arm, "sd"] == pytest.approx(sd, abs=1e-12)


def test_differs_rule_flips_at_the_margin():
    """Our values 0 +- 1 (population SD 1, n 4) against a published 0 ± 2 of 10 seeds: the allowance
    is 2 sqrt(1/4 + 4/10) + 0.05; a shift 0.01 inside it is within spread, 0.01 beyond it differs."""
    margin = 2 * math.sqrt(1 / 4 + 4 / 10) + 0.05
    base = np.array([-1.0, 1.0, -1.0, 1.0])
    for shift, verdict in ((margin - 0.01, "within spread"), (margin + 0.01, "differs"),
                           (-margin - 0.01, "differs")):
        sheet = _sheet({("combined %", "ketamine"): (0.0, 2.0)})
        got = compare_published(_combined({"ketamine": list(base + shift)}), sheet).frame.iloc[0]
        assert got["verdict"] == verdict, shift


def test_differs_rule_without_a_published_sd_and_rounding():
    """Where the sheet prints no SD (one seed), the allowance is our spread for one new patient,
    2 sd sqrt(1 + 1/n), plus half a printed unit; with no spread anywhere only that half unit is left,
    so 95.04 matches a printed 95.0 and 95.06 does not."""
    vals = [10.0, 12.0, 14.0]
    sheet = _sheet({("combined %", "ketamine"): (12.0, None)}, n_published=1, decimals=0)
    got = compare_published(_combined({"ketamine": vals}), sheet).frame.iloc[0]
    assert got["margin"] == pytest.approx(2 * np.std(vals) * math.sqrt(1 + 1 / 3) + 0.5, abs=1e-12)
    assert math.isnan(got["published_sd"])
    flat = _sheet({("combined %", "ketamine"): (95.0, 0.0)})
    verdicts = [compare_published(_combined({"ketamine": [v, v]}), flat).frame.iloc[0]["verdict"]
                for v in (95.04, 95.06)]
    assert verdicts == ["within spread", "differs"]


def test_missing_rows_are_not_in_this_run():
    """A published (quantity, arm) the run has no rows for is reported, not dropped: n 0, no numbers."""
    sheet = _sheet({("combined %", "ketamine"): (97.0, 0.5), ("combined %", "ssri"): (90.0, 3.0)})
    frame = compare_published(_combined({"ketamine": [97.0, 97.2]}), sheet).frame.set_index("arm")
    assert frame.loc["ssri", "verdict"] == "not in this run" and frame.loc["ssri", "n"] == 0
    assert math.isnan(frame.loc["ssri", "mean"])


def test_bad_input_is_refused_with_a_clear_message():
    """Unknown sheet ids, wrong types, several cohorts and a sheet whose published value names an
    unknown quantity are refused, each saying what is wrong."""
    df = _combined({"ketamine": [97.0, 97.2]})
    with pytest.raises(ValueError, match="no published sheet 'XYZ'"):
        compare_published(df, "XYZ")
    with pytest.raises(TypeError, match="sheet must be a Sheet"):
        decide_findings(df, 3)
    with pytest.raises(TypeError, match="results must be a pandas DataFrame"):
        compare_published(df.to_dict(), "068C")
    with pytest.raises(ValueError, match="2 cohorts"):
        compare_published(pd.concat([df.assign(cohort=0), df.assign(cohort=1)]), "068C")
    with pytest.raises(ValueError, match="unknown quantity 'nope'"):
        _sheet({("nope", "ketamine"): (1.0, 0.0)})


# --------------------------------------------------------------------------- planted findings: 068C

TREATED = ("ketamine", "ssri", "neurosteroid")


def _chronic_world(seed: int = 5, n: int = 10) -> pd.DataFrame:
    """Rows shaped like a run of chronic_stress.toml with the sheet's published picture: ketamine-like
    and neurosteroid-like near 97-98 %, SSRI-like near 81 % with patients 0-3 below 80 % right after
    treatment, untreated near 29 %; the ketamine-like sparsity 47.5 % losing 10 % of what remains per
    episode; neurosteroid-like off medication lower on combined and higher at sigma 2.5."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n):
        acute_combined = {"untreated": 29 + rng.normal(0, 2), "ketamine": 97.3 + rng.normal(0, 0.2),
                          "ssri": 81 + rng.normal(0, 2), "neurosteroid": 97.8 + rng.normal(0, 0.1)}
        sigma_25 = {"untreated": 28 + rng.normal(0, 1), "ketamine": 81 + rng.normal(0, 2),
                    "ssri": 42 + rng.normal(0, 2), "neurosteroid": 41 + rng.normal(0, 1)}
        for arm, v in acute_combined.items():
            phase = "pruned" if arm == "untreated" else "acute"
            rows.append(row(p, arm, phase, "accuracy", v, "combined"))
            rows.append(row(p, arm, phase, "accuracy", sigma_25[arm], "internal_noise", sigma=2.5))
        rows.append(row(p, "neurosteroid", "off_medication", "accuracy", 68 + rng.normal(0, 5), "combined"))
        rows.append(row(p, "neurosteroid", "off_medication", "accuracy", 52 + rng.normal(0, 2), "internal_noise",
                        sigma=2.5))
        for c in range(CHRONIC_CYCLES + 1):
            ssri = (70.0 if p < 4 else 86.0) if c == 0 else 85 + c + rng.normal(0, 0.5)
            values = {"ketamine": 97.5 + rng.normal(0, 0.2), "ssri": ssri,
                      "neurosteroid": 97.7 - (0.3 * c if p else 2.0 * c) + rng.normal(0, 0.1)}
            sparsity = {"ketamine": 100 - 52.5 * 0.9**c, "ssri": 100 - 5 * 0.9**c, "neurosteroid": 100 - 5 * 0.9**c}
            for arm in TREATED:
                rows.append(row(p, arm, "chronic", "accuracy", values[arm], "combined", cycle=c))
                rows.append(row(p, arm, "chronic", "sparsity", sparsity[arm], cycle=c))
    return pd.DataFrame(rows)


def _set(df: pd.DataFrame, value: float, **where) -> pd.DataFrame:
    out = df.copy()
    mask = np.ones(len(out), dtype=bool)
    for col, v in where.items():
        mask &= (out[col] == v).to_numpy()
    assert mask.any(), where
    out.loc[mask, "value"] = value
    return out


def _verdicts(df: pd.DataFrame, sheet: str) -> dict[str, str]:
    return decide_findings(df, sheet).frame.set_index("id")["verdict"].to_dict()


def test_068c_findings_hold_on_the_planted_picture():
    """On rows that show the sheet's picture, every 068C finding holds (each was written from it)."""
    got = _verdicts(_chronic_world(), "068C")
    assert got == {f.id: "holds" for f in SHEETS["068C"].findings}, got


def test_068c_findings_fail_where_the_picture_breaks():
    """Each finding turns to 'does not hold' when the planted rows contradict it: a ketamine-like
    patient below 80 % at cycle 4 (never relapses; keeps its accuracy), an SSRI-like relapse at cycle 3
    (relapses only at cycle 0), a cycle-8 ketamine-like sparsity of 77.0 % (77.4 % to 0.1), the
    untreated network as good as the treated ones (above untreated), and without chronic rows the
    relapse findings are not testable."""
    world = _chronic_world()
    broken = _set(world, 70.0, patient=0, arm="ketamine", phase="chronic", metric="accuracy", cycle=4)
    got = _verdicts(broken, "068C")
    assert got["068C-4"] == "does not hold" and got["068C-1"] == "holds"
    late = _set(world, 75.0, patient=6, arm="ssri", phase="chronic", metric="accuracy", cycle=3)
    assert _verdicts(late, "068C")["068C-5"] == "does not hold"
    dropped = world.copy()
    mask = (dropped.arm == "ketamine") & (dropped.phase == "chronic") & (dropped.metric == "accuracy") & (
        dropped.cycle == CHRONIC_CYCLES)
    dropped.loc[mask, "value"] -= 5.0
    assert _verdicts(dropped, "068C")["068C-7"] == "does not hold"
    sparse = _set(world, 77.0, arm="ketamine", phase="chronic", metric="sparsity", cycle=CHRONIC_CYCLES)
    assert _verdicts(sparse, "068C")["068C-11"] == "does not hold"
    equal = world.copy()
    mask = (equal.arm == "untreated") & (equal.condition == "combined")
    equal.loc[mask, "value"] = 99.9
    assert _verdicts(equal, "068C")["068C-1"] == "does not hold"
    untestable = _verdicts(world[world.phase != "chronic"], "068C")
    assert {untestable[i] for i in ("068C-4", "068C-5", "068C-6", "068C-7", "068C-11")} == {"not testable"}


# --------------------------------------------------------------------------- planted findings: 068E


def _kindling_world(seed: int = 7, n: int = 10) -> pd.DataFrame:
    """Rows shaped like a run of scarring.toml with the sheet's picture: ketamine-like never relapses
    after discontinuation, the others nearly always; kindling relapses SSRI-like 5, neurosteroid-like
    3, ketamine-like at most 1 of 6; scars that only grow, fastest in the ketamine-like arm; autonomy
    in SSRI-like patients 0-2 only; neurosteroid-like off medication lower on combined and biased,
    higher at sigma 2.5."""
    rng = np.random.default_rng(seed)
    relapses = {"ketamine": lambda p: int(p < 3), "ssri": lambda p: 5, "neurosteroid": lambda p: 3}
    growth = {"ketamine": 1.2, "ssri": 0.5, "neurosteroid": 0.3}
    rows = []
    for p in range(n):
        early = rng.uniform(0, 6)
        for arm in TREATED:
            rows.append(row(p, arm, "acute", "scar_fraction", early))
            for d in (25.0, 50.0):
                relapsed = 0.0 if arm == "ketamine" else 1.0
                rows.append(row(p, arm, "washout", "relapsed", relapsed, epochs=d, step=50.0))
            scar = early
            for c in range(KINDLING_CYCLES):
                hit = c < relapses[arm](p)
                rows.append(row(p, arm, "state", "scar_fraction", scar, cycle=c, label="kindling/state"))
                rows.append(row(p, arm, "trigger", "relapsed", float(hit), cycle=c, label="kindling/trigger",
                                step=0.0))
                rows.append(row(p, arm, "trigger", "accuracy", 40.0 if hit else 90.0, "biased", cycle=c,
                                label="kindling/trigger", step=0.0))
                scar += growth[arm] * hit + (0.9 if arm == "ketamine" else 0.0)
                rows.append(row(p, arm, "after", "scar_fraction", scar, cycle=c, label="kindling/after"))
            autonomous = arm == "ssri" and p < 3
            rows.append(row(p, arm, "autonomy", "relapsed", float(autonomous), label="kindling/autonomy", step=0.0))
            accuracy = {"ketamine": 97.0, "ssri": 60.0 if autonomous else 80.0, "neurosteroid": 92.0}[arm]
            rows.append(row(p, arm, "autonomy", "accuracy", accuracy + rng.normal(0, 0.5), "biased",
                            label="kindling/autonomy", step=0.0))
        for phase, combined, biased, sigma in (("acute", 97.6, 50.0, 42.4), ("off_medication", 77.8, 38.0, 57.7)):
            rows.append(row(p, "neurosteroid", phase, "accuracy", combined + rng.normal(0, 1), "combined"))
            rows.append(row(p, "neurosteroid", phase, "accuracy", biased + rng.normal(0, 1), "biased"))
            rows.append(row(p, "neurosteroid", phase, "accuracy", sigma + rng.normal(0, 1), "internal_noise",
                            sigma=2.5))
    return pd.DataFrame(rows)


def test_068e_findings_hold_on_the_planted_picture():
    """On rows that show the sheet's picture, every 068E finding holds."""
    got = _verdicts(_kindling_world(), "068E")
    assert got == {f.id: "holds" for f in SHEETS["068E"].findings}, got


def test_068e_findings_fail_where_the_picture_breaks():
    """A scar that falls in one cycle breaks 'scars never shrink'; an autonomous ketamine-like patient
    breaks 'autonomy only with SSRI-like'; one ketamine-like wash-out ending relapsed breaks 'never
    relapses after discontinuation'; equal kindling totals break 'SSRI-like relapses most'."""
    world = _kindling_world()
    assert _verdicts(_set(world, 0.0, patient=4, arm="ssri", phase="after", cycle=3), "068E")["068E-5"] == (
        "does not hold")
    assert _verdicts(_set(world, 1.0, patient=5, arm="ketamine", phase="autonomy", metric="relapsed"),
                     "068E")["068E-6"] == "does not hold"
    assert _verdicts(_set(world, 1.0, patient=2, arm="ketamine", phase="washout", maintenance_epochs=25.0),
                     "068E")["068E-1"] == "does not hold"
    flat = world.copy()
    trig = (flat.phase == "trigger") & (flat.metric == "relapsed")
    flat.loc[trig, "value"] = 0.0
    assert _verdicts(flat, "068E")["068E-3"] == "does not hold"


# --------------------------------------------------------------------------- tiny runs, end to end


@pytest.fixture(scope="module")
def chronic_run(tmp_path_factory) -> Path:
    """A run folder of the tiny chronic_stress study (compare_with = "068C")."""
    out = tmp_path_factory.mktemp("chronic") / "run"
    protocol = tiny("chronic_stress", arms={"ketamine": SMALL_ARM, "ssri": {"epochs": 3}, "neurosteroid": {"epochs": 2},
                                            "ssri_maintenance": {"epochs": 2}})
    ClinicalTrial(protocol, progress=False).run(out=out)
    return out


@pytest.fixture(scope="module")
def scarring_run(tmp_path_factory) -> Path:
    """A run folder of the tiny scarring study (compare_with = "068E")."""
    out = tmp_path_factory.mktemp("scarring") / "run"
    protocol = tiny("scarring", longitudinal={"durations": [2], "washout_steps": 4},
                    arms={"ketamine": SMALL_ARM, "ssri": {"epochs": 3}, "neurosteroid": {"epochs": 2},
                          "ketamine_kindling": SMALL_ARM})
    ClinicalTrial(protocol, progress=False).run(out=out)
    return out


@pytest.mark.parametrize("sheet_id", ["068C", "068E"])
def test_every_quantity_reads_the_tiny_run(sheet_id, chronic_run, scarring_run):
    """Every published (quantity, arm) of the sheet reads one value per patient (2) from the tiny run
    of its study: none is 'not in this run'; a quantity of one arm (off medication) reads nothing in
    the others."""
    run = load_run(chronic_run if sheet_id == "068C" else scarring_run)
    assert run.protocol["compare_with"] == sheet_id
    sheet = SHEETS[sheet_id]
    frame = compare_published(run.results, sheet).frame
    assert len(frame) == len(sheet.published)
    assert (frame["n"] == 2).all(), frame.loc[frame["n"] != 2, ["quantity", "arm", "n"]]
    assert set(frame["verdict"]) <= {"within spread", "differs"}
    off = sheet.quantity("off medication: combined %")
    assert off.per_patient(run.results, "ketamine").empty and len(off.per_patient(run.results, "neurosteroid")) == 2


def test_report_of_the_tiny_chronic_run(chronic_run):
    """The report of a study with compare_with = "068C" has the published table (every quantity) with
    the differs rule, the findings table (every finding with a verdict), and still its trajectories."""
    text = write_report(chronic_run, n_resamples=99).read_text()
    assert "## Published numbers of sheet 068C" in text and "## Findings of sheet 068C" in text
    assert "twice the standard error" in text
    assert text.index("## Published numbers of sheet 068C") < text.index("## Trajectories over trial time")
    for q in SHEETS["068C"].quantities:
        assert f"| {q.name} |" in text
    for f in SHEETS["068C"].findings:
        line = next(x for x in text.splitlines() if x.startswith(f"| {f.id} |"))
        assert any(v in line for v in ("| holds |", "| does not hold |", "| not testable |"))


def test_kindling_summary_counts_the_rows(scarring_run):
    """The 068E kindling table counts, per arm and cycle, exactly the trigger verdicts of the rows
    (patients and relapses), takes the bias of each cycle from the saved protocol (the sheet's
    1.5 -> 0.5), and the report shows it with its figure, rebuilt byte for byte."""
    run = load_run(scarring_run)
    frame = kindling_summary(run.results, run.protocol).frame.set_index(["arm", "cycle"])
    verdicts = run.results[(run.results.label == "kindling/trigger") & (run.results.metric == "relapsed")]
    direct = verdicts.groupby(["arm", "cycle"])["value"].agg(["sum", "size"])
    assert sorted(frame.index) == sorted(direct.index)
    for key, (k, n) in direct.iterrows():
        assert frame.loc[key, "relapsed"] == int(k) and frame.loc[key, "n"] == int(n)
        assert frame.loc[key, "relapse_rate"] == pytest.approx(100 * k / n)
    assert frame.loc["ssri", "bias"].tolist() == pytest.approx(list(KINDLING_BIAS))
    text = write_report(scarring_run, n_resamples=99).read_text()
    assert "### Kindling per arm and cycle" in text and "## Findings of sheet 068E" in text
    figure = (scarring_run / "figures" / "kindling.svg").read_bytes()
    assert write_report(scarring_run, n_resamples=99).read_text() == text
    assert (scarring_run / "figures" / "kindling.svg").read_bytes() == figure
    assert (scarring_run / "figures" / "kindling.png").is_file()


# --------------------------------------------------------------------------- registry


def test_registry_agrees_with_the_schema_and_the_studies():
    """Every registered sheet is a value of PUBLISHED_SHEETS and 068C and 068E are registered; every
    family study file naming a registered sheet runs each arm of that sheet (as a regimen or untreated)."""
    assert set(SHEETS) <= set(PUBLISHED_SHEETS) and {"068C", "068E"} <= set(SHEETS)
    named = 0
    for path in FAMILY.glob("*.toml"):
        data = tomllib.loads(path.read_text())
        sheet_id = data.get("compare_with")
        if sheet_id is None:
            continue
        assert sheet_id in PUBLISHED_SHEETS, path.name
        if sheet_id in SHEETS:
            named += 1
            regimens = set(data.get("regimens", {})) or set(data.get("arms", {}))
            assert set(SHEETS[sheet_id].arms) <= regimens | {"untreated"}, path.name
    assert named >= 2


def test_family_analysis_imports_no_torch():
    """analysis.family and its sheets load without torch (the analysis package never imports it)."""
    code = "import sys, analysis.family as f; f.SHEETS; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"
