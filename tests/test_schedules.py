"""Schedules as data: study files name their phases, Python builds the same, bad schedules are refused.

The tiny study (``tests/data/tiny.toml``) keeps every run short; the paper's schedule written out in
``studies/manic_switch.toml`` must be exactly the default one (the regression reference checks its
numbers).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from helpers import assert_same_results

from virtualpatient import ClinicalTrial, load_study
from virtualpatient.phases import (
    Assess,
    Fork,
    Lesion,
    Probe,
    Repeat,
    Stress,
    Train,
    Treat,
    Washout,
    paper_regimen,
    paper_spine,
    resolve,
)
from virtualpatient.protocol import Protocol, ProtocolError

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "tiny.toml"
REFERENCE = ROOT / "data" / "reference" / "tiny_seed5_results.csv.gz"


def test_paper_study_file_spells_out_the_default_schedule():
    """studies/manic_switch.toml's [[schedule]] and [[regimens.*]] are phase for phase the schedule a
    study without them runs, and the two protocols hash alike (so their run folders are one)."""
    explicit = load_study(ROOT / "studies" / "manic_switch.toml")
    default = explicit.replace(schedule=None, regimens=None)
    assert explicit.schedule is not None and set(explicit.regimens) == set(explicit.arms)
    spine, regimens = resolve(explicit)
    assert [p.to_dict() for p in spine] == [p.to_dict() for p in paper_spine(default)]
    for arm in explicit.arms:
        assert [p.to_dict() for p in regimens[arm]] == [p.to_dict() for p in paper_regimen(default, arm)]
    assert explicit.hash() == default.hash()
    changed = explicit.replace(regimens={**explicit.regimens, "ssri": explicit.regimens["ssri"][:2]})
    assert changed.hash() != default.hash()


def test_explicit_paper_schedule_reproduces_the_reference(tmp_path):
    """The tiny study run with the schedule read from studies/manic_switch.toml (not the built-in
    default) writes the reference results table, every existing column identical (the activation
    magnitude to its last float32 bit: ``helpers.CROSS_MACHINE_RTOL``)."""
    paper = load_study(ROOT / "studies" / "manic_switch.toml")
    protocol = load_study(TINY).replace(schedule=paper.schedule, regimens=paper.regimens)
    got = ClinicalTrial(protocol, progress=False).run(out=tmp_path / "run")
    want = pd.read_csv(REFERENCE, keep_default_na=False, na_values=[""])
    got = pd.read_csv(tmp_path / "run" / "results.csv", keep_default_na=False, na_values=[""])
    assert_same_results(got, want)


def _study(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "study.toml"
    path.write_text(TINY.read_text() + "\n" + text)
    return path


SPINE = """
[[schedule]]
phase = "train"
[[schedule]]
phase = "lesion"
"""


def test_toml_schedule_with_blocks_repeat_and_conditions_round_trips(tmp_path):
    """A study file with a spine, blocks, a repeat, a probe and a conditional phase loads into the
    phases it names, and the resolved protocol's plain data loads back into an equal protocol."""
    path = _study(tmp_path, SPINE + """
[[blocks.episode]]
phase = "stress"
further = 0.1
[[blocks.episode]]
phase = "assess"
label = "cycle"
tests = ["sparsity", "combined"]

[[regimens.ket_cycles]]
phase = "treat"
arm = "ketamine"
[[regimens.ket_cycles]]
phase = "repeat"
times = 3
block = "episode"
[[regimens.ket_cycles]]
phase = "maintain"
epochs = 2
[[regimens.ket_cycles]]
phase = "discontinue"
steps = 2
[[regimens.ket_cycles]]
phase = "washout"
steps = 4
test_every = 2
[[regimens.ket_cycles]]
phase = "probe"
when = "relapsed"
phases = [{phase = "stress", further = 0.2, scar = true}, {phase = "assess", tests = ["sparsity"]}]
""")
    protocol = load_study(path)
    assert [type(p).__name__ for p in protocol.schedule] == ["Train", "Lesion"]
    regimen = protocol.regimens["ket_cycles"]
    assert [type(p).__name__ for p in regimen] == ["Treat", "Repeat", "Maintain", "Discontinue", "Washout", "Probe"]
    assert regimen[1].times == 3 and [type(p).__name__ for p in regimen[1].phases] == ["Stress", "Assess"]
    assert regimen[5].when == "relapsed" and regimen[5].phases[0].scar
    again = Protocol.from_dict(protocol.to_dict())
    assert again == protocol and again.hash() == protocol.hash()


def test_python_schedule_with_a_fork_equals_the_study_file(tmp_path):
    """ClinicalTrial(protocol, schedule=[..., Fork(...)]) builds the protocol a study file with the
    same [[schedule]] and [[regimens.*]] loads; one block object may serve several regimens."""
    block = [Treat(arm="ssri"), Assess(label="acute", tests=("sparsity", "combined"))]
    trial = ClinicalTrial(load_study(TINY), schedule=[Train(), Lesion(), Fork(regimens={"a": block, "b": block})],
                          progress=False)
    path = _study(tmp_path, SPINE + """
[[blocks.course]]
phase = "treat"
arm = "ssri"
[[blocks.course]]
phase = "assess"
label = "acute"
tests = ["sparsity", "combined"]
[[regimens.a]]
phase = "block"
name = "course"
[[regimens.b]]
phase = "block"
name = "course"
""")
    assert trial.protocol == load_study(path)
    assert trial.regimens == ["a", "b"]
    df = trial.run()
    a, b = (df[df.arm == arm].drop(columns="arm").reset_index(drop=True) for arm in "ab")
    assert len(a) == 3 * 2 and set(df.phase) == {"acute"}
    assert not a.equals(b)  # each regimen draws from its own streams (combined-stress noise)


#: A regimen's measurement, so that a snippet has only the one problem it is about.
ASSESS = "[[regimens.{name}]]\nphase = \"assess\"\ntests = [\"sparsity\"]\n"

BAD = [
    ("[[schedule]]\nphase = \"sleep\"\n", ["study.toml: schedule[0].phase: unknown phase 'sleep'"]),
    ("[[schedule]]\nphase = \"train\"\nepochs = -1\n",
     ["study.toml: schedule[0].epochs: Input should be greater than or equal to 0"]),
    ("[[schedule]]\nphase = \"train\"\nepoch = 3\n", ["study.toml: schedule[0].epoch: unknown key"]),
    (SPINE + "[[schedule]]\nphase = \"repeat\"\ntimes = 0\nphases = [{phase = \"lesion\"}]\n",
     ["study.toml: schedule[2].times: Input should be greater than or equal to 1"]),
    (SPINE + "[[schedule]]\nphase = \"repeat\"\ntimes = 2\nphases = []\n",
     ["study.toml: schedule[2].phases: a block needs at least one phase"]),
    (SPINE + "[[schedule]]\nphase = \"washout\"\n",
     ["study.toml: schedule[2]: washout before any treat (give decay, or treat first)"]),
    ("[[regimens.x]]\nphase = \"treat\"\narm = \"lithium\"\n" + ASSESS.format(name="x"),
     ["study.toml: regimens.x[0].arm: arm 'lithium' is not defined in [arms] (defined: ketamine, ssri, neurosteroid)"]),
    ("[[regimens.x]]\nphase = \"treat\"\narm = \"ssri\"\n[[regimens.x]]\nphase = \"stress\"\nfurther = 0.1\n"
     "when = \"relapsed\"\n" + ASSESS.format(name="x"),
     ["study.toml: regimens.x[1].when: 'relapsed' reads a wash-out verdict, but no washout runs before it"]),
    ("[[regimens.x]]\nphase = \"probe\"\nblock = \"nope\"\n",
     ["study.toml: regimens.x[0].block: unknown block 'nope'"]),
    ("[[regimens.\"../up\"]]\nphase = \"treat\"\narm = \"ssri\"\n" + ASSESS.format(name='"../up"'),
     ["study.toml: regimens.../up: regimen name '../up' is not allowed"]),
    ("[[regimens.baseline]]\nphase = \"treat\"\narm = \"ssri\"\n" + ASSESS.format(name="baseline"),
     ["study.toml: regimens.baseline: regimen name 'baseline' is reserved"]),
    (SPINE + "[[schedule]]\nphase = \"maintain\"\nepochs = [1, 2]\n",
     ["study.toml: schedule[2]: several maintenance durations fork the cohort"]),
    ("[[regimens.x]]\nphase = \"assess\"\ndrop_from = \"acute\"\n",
     ["study.toml: regimens.x[0].drop_from: no assess labelled 'acute' runs before it"]),
    ("[[regimens.x]]\nphase = \"stress\"\n",
     ["study.toml: regimens.x[0]: a stress phase needs further or live > 0 (pruning) or epochs > 0 (noisy training)"]),
    ("[[regimens.x]]\nphase = \"treat\"\narm = \"ssri\"\n",
     ["study.toml: regimens.x: a regimen must measure something"]),
    ("[[regimens.x]]\nphase = \"assess\"\ntests = [\"mood\"]\n",
     ["study.toml: regimens.x[0].tests: unknown assessment(s) ['mood']"]),
    ("[[schedule]]\nphase = \"snapshot\"\n[[regimens.x]]\nphase = \"dose\"\n",
     ["study.toml: regimens.x[0].since: no snapshot named 'pre' is taken before it in this regimen"]),
    # two problems in two places: one line each
    ("[[schedule]]\nphase = \"train\"\nlr = 0\n[[schedule]]\nphase = \"lesion\"\nfraction = 1.5\n",
     ["study.toml: schedule[0].lr: Input should be greater than 0",
      "study.toml: schedule[1].fraction: Input should be less than 1"]),
]


@pytest.mark.parametrize(("text", "lines"), BAD, ids=[
    "unknown-phase", "negative-epochs", "unknown-key", "repeat-zero", "empty-block", "washout-before-treat",
    "undefined-arm", "condition-without-verdict", "unknown-block", "path-name", "reserved-name", "fork-in-spine",
    "drop-without-source", "empty-stress", "measures-nothing", "unknown-assessment", "dose-without-snapshot",
    "two-problems"])
def test_bad_schedules_are_refused_one_line_per_problem(tmp_path, text, lines):
    """Each faulty schedule raises ProtocolError whose lines name the file, the place and the problem."""
    path = _study(tmp_path, text)
    with pytest.raises(ProtocolError) as info:
        load_study(path)
    message = str(info.value).replace(str(path), "study.toml")
    got = message.splitlines()
    assert len(got) == len(lines), message
    for line, want in zip(got, lines):
        assert line.startswith(want), (line, want)


def test_python_phases_are_validated_with_clear_errors():
    """Phases built in Python refuse bad values (ValueError naming the field) and a schedule that is
    not a list of phases (TypeError)."""
    with pytest.raises(ValueError, match="times"):
        Repeat(times=0, phases=(Lesion(),))
    with pytest.raises(ValueError, match="further"):
        Stress(further=1.5)
    with pytest.raises(ValueError, match="block holds phases"):
        Probe(phases=("lesion",))
    with pytest.raises(ValueError, match="decay"):
        Washout(decay=2.0)
    with pytest.raises(TypeError, match="list of phases"):
        ClinicalTrial(load_study(TINY), schedule="train, lesion")


def _custom_trial(**kwargs) -> ClinicalTrial:
    """The tiny study with a schedule using a scarring spine, a fork outside a probe, a condition and a repeat."""
    from virtualpatient.phases import Discontinue, Maintain

    spine = [Train(), Lesion(scar=True), Assess(label="pruned", tests=("sparsity", "combined"))]
    regimens = {
        "a": [Treat(arm="ketamine"), Maintain(epochs=(1, 2)), Discontinue(), Washout(steps=2, threshold=100.0),
              Stress(further=0.2, scar=True, when="relapsed"),
              Repeat(times=2, phases=(Assess(label="cycle", tests=("sparsity", "combined"), drop_from="pruned"),))],
        "b": [Treat(arm="neurosteroid"),
              Probe(phases=(Stress(further=0.3), Assess(label="probe", tests=("combined",))))],
    }
    return ClinicalTrial(load_study(TINY), schedule=spine, regimens=regimens, progress=False, **kwargs)


def test_any_schedule_resumes_and_runs_on_an_executor(tmp_path):
    """For a schedule unlike the paper's (scars and the clock carried from the spine's unit into the
    regimens', forks, conditions, repeats): an executor (protocol and states as plain data, one patient
    per unit) gives the in-process table exactly; a run folder missing some finished units (as after a
    kill) recomputes only those and writes the same results.csv."""
    from concurrent.futures import ThreadPoolExecutor

    out = tmp_path / "run"
    reference = _custom_trial().run(out=out)
    assert set(reference.arm) == {"untreated", "a", "b"}
    assert (reference[reference.phase == "cycle"].groupby("patient").cycle.unique().map(list) == [[1, 2]] * 3).all()
    with ThreadPoolExecutor(2) as pool:
        pooled = _custom_trial(executor=pool, patients_per_unit=1).run()
    pd.testing.assert_frame_equal(pooled, reference, check_exact=True)
    units = out / "units"
    lost = [units / "a" / "p0001.json", units / "baseline" / "p0002.pt", units / "b" / "p0002.json"]
    kept = {p: p.read_bytes() for p in (out / "units").rglob("p*") if p not in lost}
    for p in lost:
        p.unlink()
    again = _custom_trial(patients_per_unit=1).run(out=out)
    pd.testing.assert_frame_equal(again, reference, check_exact=True)
    assert all(p.exists() for p in lost) and all(p.read_bytes() == b for p, b in kept.items())


def test_command_runs_a_schedule_study(tmp_path, capsys):
    """'virtualpatient run' on a study file with regimens (here two, one in-process worker) exits 0,
    names the regimens as the arms, and its results.csv has one arm per regimen."""
    from virtualpatient.cli import main

    path = _study(tmp_path, SPINE + """
[[regimens.ket]]
phase = "treat"
arm = "ketamine"
[[regimens.ket]]
phase = "assess"
label = "acute"
tests = ["sparsity", "combined"]
[[regimens.neuro]]
phase = "treat"
arm = "neurosteroid"
[[regimens.neuro]]
phase = "assess"
label = "acute"
tests = ["sparsity", "combined"]
""")
    out = tmp_path / "run"
    assert main(["run", str(path), "--out", str(out), "--no-progress", "--workers", "1"]) == 0
    assert "arms ket, neuro" in capsys.readouterr().out
    assert set(pd.read_csv(out / "results.csv").arm) == {"ket", "neuro"}
