"""The run folder survives interruption: kill-and-resume, damaged files, foreign runs, the lock.

Every test uses a tiny study (three patients, small networks, short schedules) so that a whole run
takes a few seconds; the properties checked do not depend on the size.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from virtualpatient import ClinicalTrial, load_study
from virtualpatient.cli import main
from virtualpatient.store import RunStore, RunStoreError, code_hash

ROOT = Path(__file__).resolve().parents[1]

TINY = """
name = "tiny_resume"
seed = 11
n_patients = 3

[network]
layer_sizes = [2, 24, 24, 16, 4]

[task]
n_train = 2048
n_standard = 128
n_clean = 32

[baseline]
epochs = 10

[longitudinal]
durations = [20, 40]
washout_steps = 5

[arms.ketamine]
epochs = 2
score_batches = 2

[arms.ssri]
epochs = 3

[arms.neurosteroid]
epochs = 2
"""

N_UNITS = 3 * 4  # patients x (baseline + three arms)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def reference(study, tmp_path_factory) -> Path:
    """An uninterrupted run folder of the tiny study (in-process, one patient per unit)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    ClinicalTrial(load_study(study), patients_per_unit=1, progress=False).run(out=out)
    return out


def _cli(study: Path, out: Path, *extra: str) -> list[str]:
    return ["reproduce", "--study", str(study), "--out", str(out), "--patients-per-unit", "1", "--no-progress",
            *extra]


def _units(out: Path) -> int:
    return len(list((out / "units").glob("*/p*"))) if (out / "units").exists() else 0


def _snapshot(folder: Path, skip: tuple[str, ...] = (".lock",)) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and p.name not in skip}


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("virtualpatient: error: ")
    return lines[0]


def test_kill_and_resume_matches_uninterrupted(study, reference, tmp_path):
    """SIGKILL at seeded random moments (early in a run, then within the units of the resumed run),
    then resuming, gives a results.csv identical to the uninterrupted run's; running a finished
    folder again recomputes and rewrites no unit."""
    rng = random.Random(5)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "virtualpatient.cli", *_cli(study, out)]
    partial_kills = 0
    # kill 1: a random moment after the folder is set up; kills 2 and 3: once a random number of
    # units is stored (polling the folder, so the test does not depend on how fast the machine is)
    targets = [None, rng.randint(1, N_UNITS // 2), rng.randint(N_UNITS // 2 + 1, N_UNITS - 1)]
    for target in targets:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        if target is None:
            while proc.poll() is None and not (out / "manifest.json").exists() and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.3))
        else:
            while proc.poll() is None and _units(out) < target and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(rng.uniform(0.0, 0.02))
        if proc.poll() is not None:
            continue
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        partial_kills += 0 < _units(out) < N_UNITS
    assert partial_kills >= 1, "no kill landed in the middle of the run"
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not list(out.rglob("*.tmp")), "half-written files of killed runs are cleaned up"
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), pd.read_csv(reference / "results.csv"),
                                  check_exact=True)
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["sessions"]) >= 2  # every (re)start is recorded

    # a finished folder: running again recomputes nothing and leaves every unit file as it was
    units = _snapshot(out / "units")
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "units").rglob("p*")}
    assert main(_cli(study, out)) == 0
    assert _snapshot(out / "units") == units
    assert {p: p.stat().st_mtime_ns for p in (out / "units").rglob("p*")} == mtimes


def test_manifest_records_protocol_hash_versions_commit(study, reference):
    """The manifest holds the full resolved protocol, its hash, package versions and the git commit."""
    manifest = json.loads((reference / "manifest.json").read_text())
    protocol = load_study(study)
    assert manifest["protocol_hash"] == protocol.hash()
    assert manifest["protocol"] == json.loads(json.dumps(protocol.to_dict(), default=str))
    assert json.loads((reference / "protocol.json").read_text()) == manifest["protocol"]
    assert {"python", "torch", "numpy", "pandas", "virtualpatient"} <= set(manifest["versions"])
    assert "commit" in manifest and "dirty" in manifest


@pytest.mark.parametrize("unit", ["units/baseline/p0001.pt", "units/ketamine/p0002.json"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_damaged_unit_is_reported_and_kept(study, reference, tmp_path, capsys, unit, damage):
    """A truncated or corrupted unit file stops the run with exit 2 and one line naming the file; the
    file and every other finished result stay byte for byte as they were."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    path = out / unit
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"\x00not a result\xff" * 7)
    before = _snapshot(out, skip=(".lock", "manifest.json"))
    assert main(_cli(study, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "corrupted or truncated" in line
    assert _snapshot(out, skip=(".lock", "manifest.json")) == before


def test_other_protocol_is_refused_and_folder_untouched(study, reference, tmp_path, capsys):
    """Resuming a folder with a different protocol (here another seed) exits 2 with a message naming
    the folder and both hashes, and changes nothing in the folder."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    before = _snapshot(out)
    assert main(_cli(study, out, "--seed", "12")) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(out) in line and "another protocol" in line
    assert _snapshot(out) == before


def test_non_run_folder_is_refused(study, tmp_path, capsys):
    """An existing, non-empty folder that is not a run folder is refused (nothing written into it)."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(_cli(study, out)) == 2
    assert "not a run folder" in _one_error_line(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_second_process_is_refused_by_the_lock(study, tmp_path, capsys):
    """While one process runs a study into a folder, a second one on the same folder exits 2 with a
    'folder locked' message and writes nothing there."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "virtualpatient.cli", *_cli(study, out)]
    first = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not (out / "manifest.json").exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert first.poll() is None, "the first run ended before the check"
        sessions = json.loads((out / "manifest.json").read_text())["sessions"]
        assert main(_cli(study, out)) == 2
        line = _one_error_line(capsys.readouterr().err)
        assert str(out) in line and "locked" in line
        assert json.loads((out / "manifest.json").read_text())["sessions"] == sessions
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait(timeout=30)


def test_lock_is_released_after_a_refusal(study, reference, tmp_path):
    """A refused open (other protocol) releases the lock, so the same process can open it again."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    store = RunStore(out)
    with pytest.raises(RunStoreError, match="another protocol"):
        store.open(load_study(study, seed=99))
    with store.session(load_study(study)):
        pass


def test_resume_with_other_code_warns(study, reference, tmp_path, capsys):
    """Resuming a folder started by other code (source hash, commit or versions) still runs, and says
    so in one warning line naming what changed."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sessions"][0]["code_hash"] = "0123456789abcdef"
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert main(_cli(study, out)) == 0
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"virtualpatient: warning: {out}: resumed by other code") and "0123456789abcdef" in line


def test_code_hash_covers_python_and_the_c_kernels(tmp_path):
    """The source hash of a run's manifest changes with any .py file of the package and with the
    engine's C kernels (engine/kernels/*.c), not with other files beside them."""
    package = Path(__file__).resolve().parents[1] / "virtualpatient"
    copy = tmp_path / "virtualpatient"
    shutil.copytree(package, copy, ignore=shutil.ignore_patterns("__pycache__"))
    assert code_hash(copy) == code_hash()
    kernels = sorted((copy / "engine" / "kernels").glob("*.c"))
    assert kernels
    seen = {code_hash(copy)}
    for path, text in ((kernels[0], "/* changed */\n"), (copy / "engine" / "ops.py", "# changed\n")):
        path.write_text(path.read_text() + text)
        seen.add(code_hash(copy))
    (copy / "engine" / "kernels" / "README").write_text("not source")
    seen.add(code_hash(copy))
    assert len(seen) == 3


def test_cohort_grows_on_resume(study, reference, tmp_path):
    """A finished folder resumed with more patients computes only the new patients' units, and the
    grown table's old patients are exactly the original run's rows (patient streams are their own)."""
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    small = pd.read_csv(out / "results.csv")
    n = int(small.patient.nunique())
    before = {p: p.read_bytes() for p in (out / "units").rglob("p*")}
    grown = ClinicalTrial(load_study(study, n_patients=n + 1), patients_per_unit=1, progress=False).run(out=out)
    assert sorted(grown.patient.unique()) == list(range(n + 1))
    assert all(p.read_bytes() == b for p, b in before.items())  # finished units untouched
    old = pd.read_csv(out / "results.csv").query("patient < @n").reset_index(drop=True)
    pd.testing.assert_frame_equal(old, small)
    assert json.loads((out / "protocol.json").read_text())["n_patients"] == n + 1


def test_command_line_warnings_say_each_message_once(capsys):
    """The run command's warning printer gives each distinct message one line, once: a sweep opens a
    level's folder twice (its spine adoption and its trial) and must not repeat itself."""
    from virtualpatient.cli import _OneLineWarnings

    show = _OneLineWarnings()
    for message in ("a: resumed", "b: resumed", "a: resumed"):
        show(UserWarning(message), UserWarning, "f.py", 1)
    assert capsys.readouterr().err.splitlines() == ["virtualpatient: warning: a: resumed",
                                                    "virtualpatient: warning: b: resumed"]
