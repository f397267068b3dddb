"""Bad input gets exit status 2 and one clear line on standard error, and loses nothing.

Each case of the table is run through ``virtualpatient.cli.main`` and checked for its exit status,
for exactly one line on standard error starting with ``virtualpatient: error:``, and for the words
that name the problem and the field or file. One case also runs as a real subprocess, to show that
no traceback reaches standard error.
"""

from __future__ import annotations

import math
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from virtualpatient import ClinicalTrial, Treatment, load_study, register, treatment_dataclass
from virtualpatient.cli import main

ROOT = Path(__file__).resolve().parents[1]


@register("poison_test")
@treatment_dataclass
class Poison(Treatment):
    """A test arm whose course starts from an infinite weight: its loss is NaN at the first epoch."""

    washout_decay: float = 0.01
    epochs: int = 1

    def apply(self, batch, arm, on_epoch=None):
        batch.params.weights[1].fill_(math.inf)
        batch.train(self.epochs, 1e-3, f"{arm}/train", on_epoch=on_epoch)

TINY = """
name = "tiny_bad_input"
seed = 4
n_patients = 1

[network]
layer_sizes = [2, 16, 16, 8, 4]

[task]
n_train = 256
n_standard = 128
n_clean = 32

[baseline]
epochs = 2

[longitudinal]
durations = [1, 2]
washout_steps = 3

[arms.ketamine]
epochs = 2
score_batches = 2

[arms.ssri]
epochs = 2

[arms.neurosteroid]
epochs = 2
"""


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> tuple[Path, Path]:
    """A study file and a finished run folder of it (one patient)."""
    base = tmp_path_factory.mktemp("finished")
    study = base / "tiny.toml"
    study.write_text(TINY)
    ClinicalTrial(load_study(study), progress=False).run(out=base / "run")
    return study, base / "run"


def _study(tmp: Path, text: str, name: str = "study.toml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path


def _edit(section: str, line: str) -> str:
    """The tiny study with ``line`` added at the top of ``[section]`` (or at the top level)."""
    if not section:
        return f"{line}\n{TINY}"
    if f"[{section}]" in TINY:
        return TINY.replace(f"[{section}]", f"[{section}]\n{line}", 1)
    return f"{TINY}\n[{section}]\n{line}\n"


# Each case: (id, builder(tmp, finished) -> (argv, out folder), fragments the error line must contain).
Builder = Callable[[Path, tuple[Path, Path]], tuple[list[str], Path]]


def _run(study: Path, out: Path, *extra: str) -> tuple[list[str], Path]:
    return ["reproduce", "--study", str(study), "--out", str(out), "--no-progress", *extra], out


def _with(text: str) -> Builder:
    return lambda tmp, fin: _run(_study(tmp, text), tmp / "out")


def _corrupt(unit: str) -> Builder:
    def build(tmp: Path, fin: tuple[Path, Path]) -> tuple[list[str], Path]:
        out = tmp / "out"
        shutil.copytree(fin[1], out)
        data = (out / unit).read_bytes()
        (out / unit).write_bytes(data[: len(data) // 3])
        return _run(fin[0], out)
    return build


def _under_a_file(tmp: Path, fin: tuple[Path, Path]) -> tuple[list[str], Path]:
    (tmp / "plain-file").write_text("x")
    return _run(fin[0], tmp / "plain-file" / "run")


CASES: list[tuple[str, Builder, list[str]]] = [
    ("malformed TOML", _with("name = 'x\n" + TINY), ["study.toml", "not valid TOML"]),
    ("unknown top-level key", _with(_edit("", "colour = 'blue'")), ["study.toml", "colour: unknown key"]),
    ("unknown nested key", _with(_edit("pruning", "fractoin = 0.9")), ["pruning.fractoin: unknown key"]),
    ("unknown arm parameter", _with(_edit("arms.ketamine", "epoks = 3")), ["arms", "ketamine", "epoks: unknown key"]),
    ("wrong type", _with(TINY.replace("n_patients = 1", 'n_patients = "ten"')), ["n_patients", "valid integer"]),
    ("wrong nested type", _with(TINY.replace("n_train = 256", "n_train = [256]")), ["task.n_train", "valid integer"]),
    ("scalar where a table belongs", _with(_edit("", "stabiliser = 5")), ["stabiliser"]),
    ("out of range", _with(_edit("pruning", "fraction = 1.5")), ["pruning.fraction", "less than 1"]),
    ("negative epochs", _with(TINY.replace("[baseline]\nepochs = 2", "[baseline]\nepochs = -3")),
     ["baseline.epochs", "greater than or equal to 0"]),
    ("unknown arm treatment", _with(_edit("arms.lithium", "gain = 1.1")), ["arms", "unknown treatment 'lithium'"]),
    ("unknown treatment named", _with(_edit("arms.extra", 'treatment = "magic"')), ["unknown treatment 'magic'"]),
    ("unknown distribution", _with(_edit("cohort", 'prune_fraction = {kind = "gamma", low = 0.9, high = 0.95}')),
     ["cohort.prune_fraction", "unknown distribution 'gamma'"]),
    ("uniform low >= high", _with(_edit("cohort", 'prune_fraction = {kind = "uniform", low = 0.9, high = 0.9}')),
     ["cohort.prune_fraction", "uniform needs low < high"]),
    ("normal sd <= 0", _with(_edit("cohort", 'lr_scale = {kind = "normal", mean = 1, sd = 0, low = 0.5, high = 2}')),
     ["cohort.lr_scale", "sd > 0"]),
    ("distribution parameter it does not take",
     _with(_edit("cohort", 'regrowth_fraction = {kind = "choice", values = [0.3, 0.5], sd = 1}')),
     ["cohort.regrowth_fraction", "choice takes no sd"]),
    ("distribution outside the covariate's range",
     _with(_edit("cohort", 'prune_fraction = {kind = "uniform", low = 0.9, high = 1.2}')),
     ["cohort.prune_fraction", "must lie in [0, 1)"]),
    ("untruncated normal for a bounded covariate",
     _with(_edit("cohort", 'lr_scale = {kind = "normal", mean = 1, sd = 0.2}')),
     ["cohort.lr_scale", "must lie in (0, 100]"]),
    ("missing study file", lambda tmp, fin: _run(tmp / "nope.toml", tmp / "out"),
     ["nope.toml", "cannot read study file"]),
    ("output folder under a regular file", _under_a_file, ["plain-file/run", "not writable"]),
    ("output folder is a file", lambda tmp, fin: _run(fin[0], fin[0]), ["tiny.toml", "is a file, not a folder"]),
    ("truncated baseline unit", _corrupt("units/baseline/p0000.pt"),
     ["units/baseline/p0000.pt", "corrupted or truncated"]),
    ("truncated arm unit", _corrupt("units/ssri/p0000.json"), ["units/ssri/p0000.json", "corrupted or truncated"]),
    ("NaN in an arm's training", _with(_edit("arms.poisoned", 'treatment = "poison_test"')),
     ["diverged", "patient(s) [0]", "arm poisoned", "acute course", "epoch 1"]),
    ("patients per unit < 1", lambda tmp, fin: _run(fin[0], tmp / "out", "--patients-per-unit", "0"),
     ["argument --patients-per-unit", "must lie in [1, 10000], got 0"]),
    ("command-line value of the wrong type", lambda tmp, fin: _run(fin[0], tmp / "out", "--patients", "ten"),
     ["--patients", "invalid int value"]),
    ("--patients out of range", lambda tmp, fin: _run(fin[0], tmp / "out", "--patients", "0"),
     ["argument --patients", "must lie in [1, 10000], got 0"]),
    # names that would become paths outside the run folder, or collide
    ("arm name climbing out", _with(_edit('arms."../../x"', 'treatment = "ssri"')),
     ["arms: ../../x: arm name '../../x' is not allowed"]),
    ("absolute arm name", _with(_edit('arms."/tmp/evil"', 'treatment = "ssri"')),
     ["arm name '/tmp/evil' is not allowed"]),
    ("hidden arm name", _with(_edit('arms.".units"', 'treatment = "ssri"')), ["arm name '.units' is not allowed"]),
    ("arm name with a separator", _with(_edit('arms."a/b"', 'treatment = "ssri"')), ["arm name 'a/b' is not allowed"]),
    ("device name as arm", _with(_edit("arms.NUL", 'treatment = "ssri"')), ["'NUL' is reserved by some file systems"]),
    ("arm names equal but for case", _with(_edit("arms.SSRI", 'treatment = "ssri"')),
     ["arm names 'ssri' and 'SSRI' differ only in case"]),
    ("arm named like the baseline", _with(_edit("arms.baseline", 'treatment = "ssri"')),
     ["arm name 'baseline' is reserved"]),
    ("arm named like a phase", _with(_edit("arms.washout", 'treatment = "ssri"')), ["arm name 'washout' is reserved"]),
    ("study name climbing out", _with(TINY.replace('name = "tiny_bad_input"', 'name = "../../etc/x"')),
     ["name: study name '../../etc/x' is not allowed"]),
    ("empty study name", _with(TINY.replace('name = "tiny_bad_input"', 'name = ""')), ["study name '' is not allowed"]),
    # non-finite and unbounded numbers
    ("NaN float", _with(_edit("assessment", "biased_shift = nan")), ["assessment.biased_shift", "finite number"]),
    ("inf float", _with(_edit("stabiliser", "inhibition = inf")), ["stabiliser.inhibition", "finite number"]),
    ("-inf in a list", _with(_edit("assessment", "resilience_sigmas = [0.5, -inf]")), ["resilience_sigmas"]),
    ("NaN treatment parameter", _with(_edit("arms.ssri", "gain_end = nan")), ["ssri: gain_end", "finite number"]),
    ("huge gain", _with(_edit("arms.ssri", "gain_end = 1e30")), ["ssri: gain_end", "less than or equal to 100"]),
    ("huge learning rate", _with(_edit("baseline", "lr = 1e30")), ["baseline.lr", "less than or equal to 1"]),
    ("NaN covariate", _with(_edit("cohort", "lr_scale = nan")), ["cohort.lr_scale", "must lie in"]),
    ("a trillion patients", _with(TINY.replace("n_patients = 1", "n_patients = 1_000_000_000_000")),
     ["n_patients", "less than or equal to 10000"]),
    ("float patients", _with(TINY.replace("n_patients = 1", "n_patients = 1e12")),
     ["n_patients", "less than or equal"]),
    ("a layer of 2e9 units", _with(TINY.replace("[2, 16, 16, 8, 4]", "[2, 2000000000, 4]")),
     ["network.layer_sizes", "at most 16 hidden layers of at most 16384 units"]),
    ("too many samples", _with(TINY.replace("n_train = 256", "n_train = 100_000_000")),
     ["task.n_train", "less than or equal to 1000000"]),
    ("too many epochs", _with(TINY.replace("[baseline]\nepochs = 2", "[baseline]\nepochs = 10_000_000")),
     ["baseline.epochs", "less than or equal to 100000"]),
    ("huge seed", _with(TINY.replace("seed = 4", "seed = 9_223_372_036_854_775_808")), ["seed"]),
    ("equal task centres", _with(_edit("task", "centres = [[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [2.0, 2.0]]")),
     ["task.centres", "distinct"]),
    ("too many workers", lambda tmp, fin: _run(fin[0], tmp / "out", "--workers", "1000"),
     ["argument --workers", "must lie in [1,"]),
    ("huge seed flag", lambda tmp, fin: _run(fin[0], tmp / "out", "--seed", str(2**70)), ["argument --seed"]),
    # study files that are not study files
    ("empty study file", _with(""), ["study.toml: the study file sets nothing"]),
    ("comments only", _with("# nothing here\n"), ["the study file sets nothing"]),
    ("UTF-16 study file", lambda tmp, fin: _run(_raw(tmp, TINY.encode("utf-16")), tmp / "out"), ["not UTF-8 text"]),
    ("binary study file", lambda tmp, fin: _run(_raw(tmp, bytes(range(256)) * 4), tmp / "out"), ["not UTF-8 text"]),
    ("study file is a folder", lambda tmp, fin: _run(tmp, tmp / "out"), ["is a folder, not a study file"]),
    ("oversized study file", lambda tmp, fin: _run(_raw(tmp, b"# x\n" * 300_000), tmp / "out"),
     ["larger than 1,000,000 bytes"]),
    ("deeply nested TOML", lambda tmp, fin: _run(_raw(tmp, b"a = " + b"[" * 5000 + b"]" * 5000), tmp / "out"),
     ["not valid TOML"]),
]


def _raw(tmp: Path, data: bytes) -> Path:
    path = tmp / "study.toml"
    path.write_bytes(data)
    return path


@pytest.mark.parametrize(("builder", "fragments"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(builder, fragments, finished, tmp_path, capsys):
    """Exit status 2, exactly one stderr line 'virtualpatient: error: ...' naming problem and field or
    file; the run folder's finished units are never deleted or changed."""
    argv, out = builder(tmp_path, finished)
    units = {p: p.read_bytes() for p in out.rglob("units/*/*")} if out.is_dir() else {}
    try:
        status = main(argv)
    except SystemExit as exc:  # argparse usage errors
        status = exc.code
    err = capsys.readouterr().err
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("virtualpatient: error: ")
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    for path, data in units.items():
        assert path.read_bytes() == data


def test_study_errors_write_nothing(tmp_path, capsys):
    """An invalid study is refused before the run folder is created."""
    argv, out = _with(_edit("pruning", "fraction = 1.5"))(tmp_path, None)
    assert main(argv) == 2
    assert not out.exists()


def test_all_invalid_fields_in_one_line(tmp_path, capsys):
    """Several invalid fields are all reported, in one line."""
    text = _edit("pruning", "fractoin = 0.9").replace("n_patients = 1", "n_patients = -1")
    argv, _ = _with(text)(tmp_path, None)
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "pruning.fractoin: unknown key" in line and "n_patients" in line


def test_diverged_training_keeps_finished_units(tmp_path, capsys):
    """When an arm diverges, the baseline unit finished before it stays in the run folder."""
    argv, out = _with(_edit("arms.poisoned", 'treatment = "poison_test"'))(tmp_path, None)
    assert main(argv) == 2
    assert (out / "units" / "baseline" / "p0000.pt").is_file()
    assert not (out / "results.csv").exists()


def test_diverged_baseline_names_the_baseline(tmp_path, capsys, monkeypatch):
    """NaN in the baseline's training (here a NaN bias at initialisation) names the untreated baseline."""
    from virtualpatient import network

    init = network.init_params

    def poisoned_init(*args, **kwargs):
        params = init(*args, **kwargs)
        params.biases[0].fill_(math.nan)
        return params

    monkeypatch.setattr(network, "init_params", poisoned_init)
    argv, out = _with(TINY)(tmp_path, None)
    assert main(argv) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    for fragment in ["diverged", "patient(s) [0]", "arm untreated", "baseline training", "epoch 1"]:
        assert fragment in line, line


def test_subprocess_error_has_no_traceback(tmp_path):
    """Through the real command: exit 2, a single stderr line, no traceback."""
    study = _study(tmp_path, _edit("pruning", "fractoin = 0.9"))
    proc = subprocess.run([sys.executable, "-m", "virtualpatient.cli", "reproduce", "--study", str(study),
                           "--out", str(tmp_path / "out"), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [f"virtualpatient: error: {study}: pruning.fractoin: unknown key"]
