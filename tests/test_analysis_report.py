"""Tests of analysis.figures, analysis.claims, analysis.report and analysis.synthetic."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from analysis.claims import CLAIMS, evaluate_claims
from analysis.figures import make_figures, save_figure
from analysis.report import load_run, write_report
from analysis.synthetic import make_protocol, make_results, write_run

FIGURE_NAMES = [
    "resilience",
    "table1_points",
    "table3_points",
    "relapse_vs_duration",
    "kaplan_meier",
    "washout_trajectories",
    "sparsity",
    "weight_magnitudes",
]


@pytest.fixture(scope="module")
def results() -> pd.DataFrame:
    return make_results(n_patients=10, seed=0)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, results):
    """A synthetic run folder following docs/results-schema.md, with weights/."""
    return write_run(
        tmp_path_factory.mktemp("run"), make_results(n_patients=5, seed=3), weights=True
    )


def test_synthetic_results_follow_the_schema():
    """Columns, phases, 6 durations x 51 wash-out steps, relapsed only at the last step."""
    df = make_results(n_patients=2, seed=1)
    for col in [
        "patient",
        "arm",
        "phase",
        "metric",
        "condition",
        "noise_sigma",
        "maintenance_epochs",
        "step",
        "value",
        "prune_fraction",
        "regrowth_fraction",
        "lr_scale",
    ]:
        assert col in df.columns
    assert set(df["phase"]) == {
        "baseline",
        "pruned",
        "acute",
        "off_medication",
        "acute_relapse",
        "maintenance",
        "washout",
    }
    wash = df[(df["phase"] == "washout") & (df["metric"] == "accuracy")]
    assert wash.groupby(["patient", "arm"]).size().unique().tolist() == [6 * 51]
    rel = df[df["metric"] == "relapsed"]
    assert set(rel["step"]) == {50.0} and set(rel["value"]) <= {0.0, 1.0}
    assert (df.loc[df["metric"] != "accuracy", "condition"] == "").all()
    assert df.groupby("patient")["lr_scale"].nunique().max() == 1
    pd.testing.assert_frame_equal(df, make_results(n_patients=2, seed=1))


def test_every_figure_is_written_and_non_empty(results, tmp_path):
    """Each figure exists as a non-empty PNG (with PNG magic) and SVG."""
    run = write_run(tmp_path / "run", make_results(n_patients=3, seed=2), weights=True)
    recs = make_figures(
        make_results(n_patients=3, seed=2), tmp_path / "figs", weights_dir=run / "weights"
    )
    assert [r.name for r in recs] == FIGURE_NAMES
    for rec in recs:
        assert not rec.skipped, (rec.name, rec.skipped)
        assert rec.caption
        png, svg = rec.paths
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000
        assert svg.read_text().lstrip().startswith("<?xml") and svg.stat().st_size > 1000


def test_weight_figure_is_skipped_with_a_reason_without_weights(tmp_path):
    """No weights/ folder: the weight-magnitude figure is skipped, the others are drawn."""
    recs = {r.name: r for r in make_figures(make_results(n_patients=2), tmp_path)}
    assert recs["weight_magnitudes"].skipped and not recs["weight_magnitudes"].paths
    assert not recs["resilience"].skipped


def test_saved_figures_are_byte_identical(tmp_path):
    """Saving the same figure twice gives identical PNG and SVG bytes (no dates, fixed salt)."""
    from analysis.figures import plot_resilience

    df = make_results(n_patients=2)
    a = save_figure(plot_resilience(df), tmp_path / "a", "f")
    b = save_figure(plot_resilience(df), tmp_path / "b", "f")
    for pa, pb in zip(a, b, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
    assert b"Date" not in a[1].read_bytes()


def test_claims_on_paper_like_data(results):
    """Paper-like synthetic data reproduce the robust claims; every claim has a status."""
    res = evaluate_claims(results)
    frame = res.frame.set_index("id")
    assert len(frame) == len(CLAIMS)
    assert set(frame["status"]) <= {"reproduced", "not reproduced", "not testable"}
    for cid in ["R1", "R2", "R5", "R9", "R10", "R12", "R13", "R15", "R17", "R18", "R20"]:
        assert frame.loc[cid, "status"] == "reproduced", (cid, frame.loc[cid, "evidence"])
    assert "reproduced" in res.summary()


def test_claims_detect_a_planted_violation_and_missing_arms(results):
    """Ketamine-like with the lowest biased accuracy fails R9; a run without the neurosteroid
    arm marks its claims not testable; a relapse in ketamine fails R18."""
    df = results.copy()
    mask = (df["arm"] == "ketamine") & (df["phase"] == "acute") & (df["condition"] == "biased")
    df.loc[mask, "value"] = 10.0
    rel = (df["arm"] == "ketamine") & (df["metric"] == "relapsed")
    df.loc[rel[rel].index[0], "value"] = 1.0
    frame = evaluate_claims(df).frame.set_index("id")
    assert frame.loc["R9", "status"] == "not reproduced"
    assert frame.loc["R18", "status"] == "not reproduced"
    no_neuro = results[results["arm"] != "neurosteroid"]
    frame = evaluate_claims(no_neuro).frame.set_index("id")
    for cid in ["R15", "R16", "R17", "R11"]:
        assert frame.loc[cid, "status"] == "not testable"


@pytest.fixture(scope="module")
def builds(run_dir):
    """The report built twice from the same run folder: the bytes of every output file."""

    def snapshot():
        md = write_report(run_dir, n_resamples=199)
        files = [md, run_dir / "report.html", *sorted((run_dir / "figures").iterdir())]
        return {p.name: p.read_bytes() for p in files}

    return snapshot(), snapshot()


def test_report_is_rebuilt_byte_identically(builds):
    """Two builds from the same run folder give identical report.md, report.html, figures."""
    first, second = builds
    assert first.keys() == second.keys() and len(first) == 2 + 2 * len(FIGURE_NAMES)
    for name in first:
        assert first[name] == second[name], name


def test_report_content(builds):
    """The report has every table beside the paper, the claims, the interpretations in force,
    the statistics, a caption per figure, and an HTML with only embedded images."""
    md = builds[0]["report.md"].decode()
    for heading in [
        "Table 1.",
        "Table 2.",
        "Table 3.",
        "Table 4.",
        "off medication",
        "qualitative claims",
        "Protocol interpretations in force",
        "Arm comparisons within patients",
        "binomial GEE",
        "mixed model",
        "Time to relapse",
        "Figures",
    ]:
        assert heading in md, heading
    assert "one-shot per layer, all four weight matrices (notebook)" in md
    assert "| 47.2 ± 12.7 |" in md  # paper's SSRI biased accuracy beside ours
    assert md.count("*Figure:") == len(FIGURE_NAMES)
    assert re.search(r"\| R18 \| Ketamine-like never relapses", md)
    assert "20" not in md.split("\n", 1)[0]  # no date in the title line
    html = builds[0]["report.html"].decode()
    srcs = re.findall(r'src="([^"]*)"', html)
    assert len(srcs) == len(FIGURE_NAMES) and all(
        s.startswith("data:image/png;base64,") for s in srcs
    )
    assert "<table>" in html


def test_report_without_weights_or_interpretations(tmp_path):
    """Missing weights/ and interpretations are noted, not fatal."""
    proto = make_protocol(n_patients=3)
    del proto["interpretations"]
    run = write_run(tmp_path / "run", make_results(n_patients=2, seed=4), proto)
    md = write_report(run, n_resamples=99).read_text()
    assert "weight_magnitudes` not drawn" in md
    assert "protocol.json lists no interpretations" in md


def test_load_run_and_write_report_reject_bad_folders(tmp_path):
    """Not a folder, or no results.csv, or broken JSON: ValueError; wrong type: TypeError."""
    with pytest.raises(ValueError, match="not found"):
        write_report(tmp_path / "missing")
    with pytest.raises(ValueError, match=r"results\.csv"):
        load_run(tmp_path)
    run = write_run(tmp_path / "r", make_results(n_patients=2))
    (run / "protocol.json").write_text("{not json")
    with pytest.raises(ValueError, match="JSON"):
        load_run(run)
    with pytest.raises(TypeError):
        load_run(3)


def test_import_is_light_and_has_no_side_effects():
    """Importing analysis loads neither matplotlib.pyplot, statsmodels nor scipy.stats."""
    code = (
        "import sys, analysis; "
        "bad = [m for m in ('matplotlib.pyplot', 'statsmodels', 'scipy.stats') "
        "if m in sys.modules]; print(bad)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
    import analysis

    assert callable(analysis.stats.compare_arms)
    with pytest.raises(AttributeError):
        _ = analysis.nope


def test_protocol_json_round_trip(run_dir):
    """load_run returns the protocol and manifest written by write_run."""
    run = load_run(run_dir)
    assert run.protocol == json.loads((run_dir / "protocol.json").read_text())
    assert run.weights_dir is not None and run.results["patient"].nunique() == 5
    assert np.isclose(run.protocol["arms"]["ssri"]["washout_decay"], 0.015)


def test_manifest_clock_times_and_nested_entries_are_left_out():
    """Manifest scalars are shown; start times and nested dicts are not (no dates in report)."""
    from analysis.report import _manifest_rows

    rows = _manifest_rows({"protocol_hash": "abc", "started": "2025-01-01T10:00",
                           "versions": {"torch": "2.5"}, "protocol": {"a": 1},
                           "sessions": [{"started": "x"}, {}]})
    assert rows == [["protocol_hash", "abc"], ["versions.torch", "2.5"], ["sessions", "2"]]


def _swept(levels, shift_per_unit=400.0, seed=0):
    """Synthetic sweep results: acute accuracies fall by ``shift_per_unit`` x (level - 0.9) above 0.9."""
    frames = []
    for level in levels:
        r = make_results(n_patients=6, seed=seed)
        acute = (r["phase"] == "acute") & (r["metric"] == "accuracy")
        r.loc[acute, "value"] -= max(0.0, level - 0.9) * shift_per_unit
        frames.append(r.assign(**{"pruning.fraction": level}))
    return pd.concat(frames, ignore_index=True).assign(cohort=0)


def test_sweep_report_shows_dose_response_instead_of_the_papers_tables(tmp_path):
    """A sweep's report has a section per outcome of the swept field (levels, trend, midpoint, cliff,
    figure) and no paper table pooled over levels; the planted cliff (above 0.9) is found."""
    import warnings

    run = write_run(tmp_path / "sweep", _swept([0.8, 0.85, 0.9, 0.93, 0.95, 0.97]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = write_report(run, n_resamples=99).read_text()
    assert "## Sweep" in text and "Table 1" not in text
    assert "### Combined-stress accuracy (%), `acute` vs `pruning.fraction`" in text
    assert "Combined-stress accuracy (%), `pruned`: the same at every level" in text  # unshifted rows
    assert "| Ketamine-like | 0.97 | 6 |" in text
    row = next(line for line in text.splitlines() if line.startswith("| Ketamine-like | -160"))
    assert "<0.001" in row and ("0.93 -> 0.95" in row or "0.9 -> 0.93" in row or "0.95 -> 0.97" in row)
    assert (run / "figures").is_dir() and any(p.suffix == ".png" for p in (run / "figures").iterdir())


def test_sweep_report_shows_both_switch_proxies_and_the_acute_relapse(tmp_path):
    """Besides efficiency, a sweep section reports the second manic-switch proxy (activation
    magnitude, to three decimals) and the acute-relapse drop; a planted rise of the magnitude with
    the level is found by the trend test, and a relapse drop the same at every level is said so."""
    import warnings

    df = _swept([0.8, 0.85, 0.9, 0.93, 0.95, 0.97], shift_per_unit=0.0)
    magnitude = (df["phase"] == "acute") & (df["metric"] == "activation_magnitude")
    df.loc[magnitude, "value"] += df.loc[magnitude, "pruning.fraction"]
    run = write_run(tmp_path / "sweep", df)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = write_report(run, n_resamples=99).read_text()
    section = text.split("### Activation magnitude (mean |h|), `acute` vs `pruning.fraction`")[1].split("###")[0]
    mean = df[magnitude & (df["arm"] == "ketamine") & (df["pruning.fraction"] == 0.8)]["value"].mean()
    assert f"| Ketamine-like | 0.8 | 6 | {mean:.3f} |" in section
    trend = next(line for line in section.splitlines() if line.startswith("| Ketamine-like | 1 ["))
    assert "<0.001" in trend  # slope 1 per unit, planted exactly
    assert "Acute-relapse drop in combined accuracy (points), `acute_relapse`: the same at every level" in text


def test_lesion_sweep_without_treatment_reports_its_pruned_rows(tmp_path):
    """A sweep whose schedule has no treated phase (the family's pruning cliff: train, lesion, assess
    'pruned') still gets its dose-response section, at the phase that measured the outcome, with
    the planted fall located."""
    import warnings

    frames = []
    for level in [0.8, 0.85, 0.9, 0.93, 0.95, 0.97]:
        r = make_results(n_patients=6, seed=1)
        r = r[r["arm"] == "untreated"].copy()
        r.loc[r["metric"] == "accuracy", "value"] -= max(0.0, level - 0.9) * 400.0
        frames.append(r.assign(**{"pruning.fraction": level}))
    run = write_run(tmp_path / "cliff", pd.concat(frames, ignore_index=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        text = write_report(run, n_resamples=99).read_text()
    assert "### Combined-stress accuracy (%), `pruned` vs `pruning.fraction`" in text
    row = next(line for line in text.splitlines() if line.startswith("| Untreated (pruned) | -"))
    assert "<0.001" in row and ("0.9 -> 0.93" in row or "0.93 -> 0.95" in row or "0.95 -> 0.97" in row)


def test_replication_report_gives_each_claims_share_of_cohorts(tmp_path):
    """Two cohorts of the paper's study: a replication table with each claim's share and Wilson CI,
    and the paper's tables of the first cohort."""
    frames = [make_results(n_patients=8, seed=s).assign(cohort=s) for s in (0, 1)]
    run = write_run(tmp_path / "rep", pd.concat(frames, ignore_index=True))
    text = write_report(run, n_resamples=99).read_text()
    assert "## Replication across cohorts" in text and "Table 1" in text
    rows = [line for line in text.splitlines() if re.match(r"\| R\d+ \| [0-2] \| [0-2] \|", line)]
    assert len(rows) >= 10
    assert all(line.split("|")[3].strip() <= line.split("|")[2].strip() for line in rows)


def test_replication_report_finds_each_claims_smallest_cohort_size(tmp_path):
    """With ``cohort_draws`` the replication table gains each claim's smallest cohort size for 80 % of
    drawn cohorts: a size is given only where the share there is at least 80 %, otherwise "> largest
    size" with a best share below 80 %; every drawn cohort is reported to ``progress``; the figure is
    written; and with ``cohort_draws=0`` the report says how to ask for it instead."""
    from analysis.report import cohort_sizes

    frames = [make_results(n_patients=8, seed=s).assign(cohort=s) for s in (0, 1)]
    run = write_run(tmp_path / "rep", pd.concat(frames, ignore_index=True))
    skipped = write_report(run, n_resamples=99, cohort_draws=0).read_text()
    assert "--cohort-draws 20" in skipped and "smallest size for" not in skipped
    calls = []
    text = write_report(run, n_resamples=99, cohort_draws=3, progress=calls.append).read_text()
    sizes = cohort_sizes(16)
    assert sizes == [5] and sum(calls) == 3 * len(sizes)
    section = text.split("## Replication across cohorts")[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines() if re.match(r"\| R\d+ \|", line)]
    assert len(rows) >= 10 and all(len(r) == 7 for r in rows)
    for *_, size, share in rows:
        best = float(re.match(r"\s*(\d+) %", share).group(1))
        if size.strip() == "> 5":
            assert best < 80
        else:
            assert int(size) in sizes and best >= 80
    assert (run / "figures" / "cohort_size.png").is_file() and "cohort_size.png" in text
    with pytest.raises(ValueError, match="cohort_draws"):
        write_report(run, cohort_draws=-1)
