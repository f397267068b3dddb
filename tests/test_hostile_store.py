"""Hostile input to the run folder and the report: nothing is written outside the run folder,
nothing of the user's is overwritten or deleted, damaged files are refused with one line naming
them, and a crashed or concurrent report never leaves a half-written one.

The run folder tests use a one-patient study with tiny networks (a run takes a few seconds); the
report tests use synthetic run folders (:mod:`analysis.synthetic`), which follow the same schema.
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import re
import shutil
import sys
from pathlib import Path

import pytest
import torch
from test_bad_input import TINY as BAD_INPUT_TINY

from analysis.report import ReportError, write_report
from analysis.synthetic import make_results, write_run
from virtualpatient import ClinicalTrial, load_study
from virtualpatient.cli import main
from virtualpatient.store import FORMAT, RunStore, RunStoreError, _digest

#: The bad-input tests' tiny study under its own name and seed.
TINY = BAD_INPUT_TINY.replace('name = "tiny_bad_input"', 'name = "tiny_hostile"').replace("seed = 4", "seed = 7", 1)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def finished(study, tmp_path_factory) -> Path:
    """A finished run folder of the tiny study."""
    out = tmp_path_factory.mktemp("finished") / "run"
    ClinicalTrial(load_study(study), progress=False).run(out=out)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out, symlinks=True)
    return out


def _tree(folder: Path) -> dict[str, bytes | str]:
    """Every entry under ``folder`` (files by content, links by target, folders by name)."""
    out: dict[str, bytes | str] = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            p = Path(root) / name
            rel = str(p.relative_to(folder))
            out[rel] = f"-> {os.readlink(p)}" if p.is_symlink() else ("<dir>" if p.is_dir() else p.read_bytes())
    return out


def _cli(study: Path, out: Path) -> list[str]:
    return ["reproduce", "--study", str(study), "--out", str(out), "--no-progress"]


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("virtualpatient: error: ")
    return lines[0]


# -- 1. every write stays inside the run folder -------------------------------------------------
_WRITES: list[tuple[str, str]] | None = None  # recording while a list, else off
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND


def _audit(event: str, args: tuple) -> None:
    if _WRITES is None:
        return
    paths: list = []
    if event == "open":
        path, mode, flags = args
        if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (flags or 0) & _WRITE_FLAGS:
            paths = [path]
    elif event == "os.rename":  # also os.replace
        paths = [args[0], args[1]]
    elif event in ("os.mkdir", "os.remove", "os.rmdir", "os.truncate", "os.symlink", "os.link", "shutil.rmtree",
                   "os.chmod", "os.utime"):
        paths = [args[0]]
    for p in paths:
        if isinstance(p, (str, bytes, os.PathLike)):
            _WRITES.append((event, os.path.abspath(os.fsdecode(p))))


_HOOKED = False


def _record_writes() -> list[tuple[str, str]]:
    global _HOOKED, _WRITES
    if not _HOOKED:
        sys.addaudithook(_audit)  # audit hooks cannot be removed: it records only while _WRITES is a list
        _HOOKED = True
    _WRITES = []
    return _WRITES


def _stop_recording() -> None:
    global _WRITES
    _WRITES = None


def test_every_write_of_a_run_and_its_report_stays_inside_the_run_folder(study, tmp_path, fast):
    """A real run (killed-and-resumed state included: a stale store tmp is planted) and its report
    write, create, rename, chmod or delete only paths inside the run folder: every such operation
    is recorded through the interpreter's audit hooks (open for writing, os.open, rename/replace,
    mkdir, remove, rmtree, chmod), and the folders around the run folder are unchanged. (The
    report's statistics sections, which write no file, are skipped to keep the test short.)"""
    import matplotlib.figure  # noqa: F401 - any font cache is built before recording

    outer = tmp_path / "outer"
    run = outer / "inner" / "run"
    run.mkdir(parents=True)
    (outer / "neighbour.txt").write_text("not the run's")
    before = {k: v for k, v in _tree(outer).items() if not k.startswith("inner/run")}
    writes = _record_writes()
    try:
        ClinicalTrial(load_study(study), progress=False).run(out=run)
        (run / "units" / "ssri" / ".p0000.json.vp-abcdefgh.tmp").write_text("half")  # a killed write
        ClinicalTrial(load_study(study), progress=False).run(out=run)  # resume: cleans it
        write_report(run, n_resamples=20)
    finally:
        _stop_recording()
    root = str(run.resolve())
    kinds = {event for event, _ in writes}
    assert {"open", "os.rename", "os.mkdir", "os.remove"} <= kinds, kinds  # the hook saw them
    outside = [(e, p) for e, p in writes if p != root and not os.path.realpath(p).startswith(root + os.sep)]
    # /dev/null is no file (subprocess and git open it); the planted tmp is the test's own write
    outside = [(e, p) for e, p in outside if p != os.devnull and not p.endswith(".vp-abcdefgh.tmp")]
    assert outside == []
    written = {os.path.relpath(p, root) for e, p in writes if e == "os.rename"}
    for name in ("manifest.json", "protocol.json", "results.csv", "units/baseline/p0000.pt",
                 "units/ketamine/p0000.json", "weights/ssri_p0000.npz", "report.md", "report.html",
                 "figures/resilience.png"):
        assert name in written, name
    assert {k: v for k, v in _tree(outer).items() if not k.startswith("inner/run")} == before


@pytest.mark.parametrize("name", ["../../x", "../escape", "/tmp/abs", "a/b", "..", ".hidden", "", "con", 3])
def test_a_hostile_arm_name_given_to_the_store_is_refused(study, tmp_path, name):
    """RunStore used directly with an unchecked arm name refuses it (RunStoreError naming it) for
    saving units and weights, and for has/load, and writes nothing anywhere."""
    run = tmp_path / "deep" / "er" / "run"
    store = RunStore(run)
    rows = [{"patient": 0, "arm": str(name), "phase": "acute", "metric": "gain", "condition": "",
             "noise_sigma": float("nan"), "value": 1.0}]
    with store.session(load_study(study)):
        before = _tree(tmp_path)
        for call in (lambda: store.save_unit(name, 0, rows), lambda: store.save_weights(name, 0, [torch.zeros(2, 2)]),
                     lambda: store.has(name, 0), lambda: store.load_unit(name, 0)):
            with pytest.raises(RunStoreError) as info:
                call()
            assert str(info.value).startswith(f"{run}: arm name {name!r}") or \
                str(info.value).startswith(f"{run}: arm name must be a string"), str(info.value)
        assert _tree(tmp_path) == before


def test_a_symlink_inside_the_run_folder_cannot_lead_a_write_outside(finished, tmp_path):
    """units/<arm> replaced by a symbolic link to a folder outside the run folder: saving a unit
    through it is refused ('outside the run folder') and the outside folder stays empty."""
    run = _copy(finished, tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    shutil.rmtree(run / "units" / "ssri")
    (run / "units" / "ssri").symlink_to(elsewhere)
    store = RunStore(run)
    rows = json.loads((run / "units" / "ketamine" / "p0000.json").read_text())["rows"]
    with pytest.raises(RunStoreError, match="outside the run folder"):
        store.save_unit("ssri", 0, [dict(r, arm="ssri") for r in rows])
    assert list(elsewhere.iterdir()) == []


# -- 2. the run folder is identified by its own manifest ----------------------------------------
def test_a_folder_holding_only_the_users_protocol_json_is_refused_untouched(study, tmp_path, capsys):
    """A folder holding only a protocol.json of the user's (even a real protocol) is not a run folder:
    exit 2, one line naming the file, and the folder keeps exactly its one file, byte for byte."""
    out = tmp_path / "mine"
    out.mkdir()
    (out / "protocol.json").write_text(json.dumps(load_study(study).to_dict(), default=str))
    before = _tree(out)
    assert main(_cli(study, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert f"{out}: not a run folder" in line and "protocol.json" in line
    assert _tree(out) == before


@pytest.mark.parametrize("manifest", ['{"name": "my web app", "version": 2}', "not json at all", "[1, 2]",
                                      '{"format": "something-else/1", "protocol_hash": "x"}'])
def test_a_manifest_json_that_is_not_ours_is_refused(study, tmp_path, manifest):
    """A folder whose manifest.json is not a virtualpatient run manifest (another program's JSON,
    garbage, a list, another format marker) is refused as 'not a run folder' and left untouched."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text(manifest)
    before = _tree(out)
    with pytest.raises(RunStoreError, match=f"^{re.escape(str(out))}: not a run folder"):
        RunStore(out).open(load_study(study))
    assert _tree(out) == before


def test_a_newer_run_format_is_refused(study, finished, tmp_path):
    """A run folder of another version of the format is named as such, not resumed."""
    out = _copy(finished, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["format"] = "virtualpatient-run/2"
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(RunStoreError, match="another format"):
        RunStore(out).open(load_study(study))


def test_a_run_folder_of_before_the_format_marker_is_resumed(study, finished, tmp_path):
    """A manifest written before the format marker existed is resumed (no unit recomputed, the
    same results) and gets the marker on the resume's rewrite."""
    out = _copy(finished, tmp_path)
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["format"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    units = {p: p.read_bytes() for p in (out / "units").rglob("p*")}
    ClinicalTrial(load_study(study), progress=False).run(out=out)
    assert {p: p.read_bytes() for p in (out / "units").rglob("p*")} == units
    assert (out / "results.csv").read_bytes() == (finished / "results.csv").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["format"] == FORMAT


@pytest.mark.parametrize("killed_at", [0, 1])
def test_a_run_killed_while_starting_is_recognised_as_ours(study, tmp_path, monkeypatch, killed_at):
    """The manifest is the first file committed: a start killed before it (only the empty lock
    file is left) or right after it (no protocol.json yet) is resumed by the next open, which
    completes the folder; what a killed start leaves is never taken for a user's folder."""
    out = tmp_path / "run"
    calls = []
    real = RunStore._write_json

    def dying(path, data):
        calls.append(path.name)
        if len(calls) > killed_at:
            raise KeyboardInterrupt  # the process dies here
        real(path, data)

    monkeypatch.setattr(RunStore, "_write_json", staticmethod(dying))
    with pytest.raises(KeyboardInterrupt):
        RunStore(out).open(load_study(study))
    assert calls[0] == "manifest.json"
    left = sorted(p.name for p in out.iterdir())
    assert left == ([".lock"] if killed_at == 0 else [".lock", "manifest.json"])
    monkeypatch.setattr(RunStore, "_write_json", staticmethod(real))
    with RunStore(out).session(load_study(study)):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "protocol.json"]


def test_a_folder_left_by_a_start_killed_mid_write_is_ours_but_a_users_lock_file_is_not(study, tmp_path):
    """Before its manifest, a folder holding only an empty .lock and the store's half-written
    manifest tmp is taken (and the tmp removed); a .lock with content is someone else's file."""
    out = tmp_path / "run"
    out.mkdir()
    (out / ".lock").touch()
    (out / ".manifest.json.vp-k3x_9a0b.tmp").write_text('{"half')
    with RunStore(out).session(load_study(study)):
        pass
    assert sorted(p.name for p in out.iterdir()) == [".lock", "manifest.json", "protocol.json"]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / ".lock").write_text("my lock notes")
    with pytest.raises(RunStoreError, match=r"not a run folder .*holds \.lock"):
        RunStore(mine).open(load_study(study))
    assert sorted(p.name for p in mine.iterdir()) == [".lock"]


# -- 3. the store deletes only its own temporary files ------------------------------------------
def test_resume_removes_only_the_stores_own_stale_tmp_files(study, finished, tmp_path):
    """On resume, the store's stale tmp files (.<target>.vp-XXXXXXXX.tmp in the folders it writes)
    are removed; a user's .notes.tmp, a .x.tmp in a subfolder, a look-alike whose target is no
    store file, and a store-like name in a folder the store does not write all survive."""
    out = _copy(finished, tmp_path)
    (out / "notes").mkdir()
    users = {
        ".notes.tmp": "mine", "notes/.x.tmp": "mine too", "units/ssri/.x.tmp": "also mine",
        ".draft.vp-abcdefgh.tmp": "look-alike", "notes/.results.csv.vp-abcdefgh.tmp": "not a store folder",
        ".results.csv.vp-abcdefgh.tmp.bak": "suffix differs",
    }
    stale = [".results.csv.vp-abcdefgh.tmp", ".manifest.json.vp-0_z9y8x7.tmp",
             "units/ssri/.p0000.json.vp-abcdefgh.tmp", "units/baseline/.p0003.pt.vp-abcdefgh.tmp",
             "weights/.ssri_p0000.npz.vp-abcdefgh.tmp"]
    for rel, text in users.items():
        (out / rel).write_text(text)
    for rel in stale:
        (out / rel).write_text("half-written")
    with RunStore(out).session(load_study(study)):
        pass
    for rel, text in users.items():
        assert (out / rel).read_text() == text, rel
    for rel in stale:
        assert not (out / rel).exists(), rel


# -- 4. unit files are validated in full ---------------------------------------------------------
def _nan_sigma_row(rows: list[dict]) -> int:
    return next(i for i, r in enumerate(rows) if r["condition"] != "internal_noise")


ARM_DAMAGE = {
    "missing field": (lambda rows: rows[3].pop("value"), "row 3 lacks field(s) value"),
    "missing condition": (lambda rows: rows[0].pop("condition"), "row 0 lacks field(s) condition"),
    "wrong type": (lambda rows: rows[2].update(value="87.5"), "row 2: value must be a number, got str"),
    "bool patient": (lambda rows: rows[1].update(patient=True), "row 1: patient must be an integer"),
    "inf value": (lambda rows: rows[4].update(value=float("inf")), "row 4: value inf is not finite"),
    "nan value": (lambda rows: rows[4].update(value=float("nan")), "row 4: value nan is not finite"),
    "negative sigma": (lambda rows: rows[0].update(noise_sigma=-1.0), "noise_sigma -1.0 is not a noise level"),
    "float step": (lambda rows: next(r for r in rows if "step" in r).update(step=1.5), "step must be an integer"),
    "another patient": (lambda rows: rows[5].update(patient=1), "rows of another patient than 0"),
    "another arm": (lambda rows: [r.update(arm="ssri") for r in rows], "arm 'ssri', expected 'ketamine'"),
    "baseline phase": (lambda rows: rows[0].update(phase="pruned"), "phase 'pruned' does not belong"),
    "unknown field": (lambda rows: rows[0].update(extra=1), "row 0 has unknown field(s) extra"),
    "empty list": (lambda rows: rows.clear(), "no result rows"),
}


@pytest.mark.parametrize("digest", ["none", "recomputed"])
@pytest.mark.parametrize("case", list(ARM_DAMAGE))
def test_a_damaged_arm_unit_is_refused_naming_the_file(finished, tmp_path, case, digest):
    """A ketamine unit whose rows break the schema is refused on load with one line naming the
    file and the fault, and the file stays byte for byte: both as a file of before the digest
    (a bare list) and with a digest recomputed over the damaged rows (a hand-made file)."""
    out = _copy(finished, tmp_path)
    path = out / "units" / "ketamine" / "p0000.json"
    rows = json.loads(path.read_text())["rows"]
    damage, expected = ARM_DAMAGE[case]
    damage(rows)
    data = rows if digest == "none" else {"format": "virtualpatient-unit/1", "rows": rows, "sha256": _digest(rows)}
    path.write_text(json.dumps(data))
    before = path.read_bytes()
    with pytest.raises(RunStoreError) as info:
        RunStore(out).load_unit("ketamine", 0)
    message = str(info.value)
    assert message.startswith(f"{path}: corrupted or truncated result file") and expected in message, message
    assert "\n" not in message
    assert path.read_bytes() == before


def test_an_edited_unit_fails_its_digest_and_an_older_intact_one_is_accepted(finished, tmp_path):
    """Changing one value of a unit file (still valid JSON, still schema-valid) is caught by its
    digest; the same rows as a file of before the digest (a bare list) load as they are."""
    out = _copy(finished, tmp_path)
    path = out / "units" / "ketamine" / "p0000.json"
    data = json.loads(path.read_text())
    rows = data["rows"]
    data["rows"][0]["value"] += 1.0
    path.write_text(json.dumps(data))
    with pytest.raises(RunStoreError, match="does not match its SHA-256 digest"):
        RunStore(out).load_unit("ketamine", 0)
    data["rows"][0]["value"] -= 1.0
    path.write_text(json.dumps(data["rows"]))
    assert RunStore(out).load_unit("ketamine", 0) == rows


BASELINE_DAMAGE = {
    "wrong layer size": (lambda s: s["weights"].__setitem__(1, torch.zeros(1, 16, 12)),
                         "state weight 1 is 16x12, the protocol's layer 16x16"),
    "missing layer": (lambda s: [s[k].pop() for k in ("weights", "biases", "masks")], "3 weight matrices"),
    "nan weight": (lambda s: s["weights"][0].view(-1).__setitem__(0, float("nan")), "weight 0 is not finite"),
    "mask not 0/1": (lambda s: s["masks"][2].view(-1).__setitem__(0, 0.5), "mask 2 holds values other than 0 and 1"),
    "another patient's state": (lambda s: s["specs"][0].update(index=4), "state is not patient 0's alone"),
    "missing key": (lambda s: s.pop("masks"), "state must hold"),
}


@pytest.mark.parametrize("case", list(BASELINE_DAMAGE))
def test_a_damaged_baseline_state_is_refused_naming_the_file(study, finished, tmp_path, case):
    """A baseline unit whose network state does not fit the protocol's layer sizes, is not finite,
    has a non-0/1 mask or is another patient's is refused on load (one line naming the file) once
    the store is open on the protocol; the file stays as it was."""
    out = _copy(finished, tmp_path)
    path = out / "units" / "baseline" / "p0000.pt"
    payload = torch.load(path, weights_only=True)
    unit = {"rows": payload["rows"], "state": payload["state"]}
    damage, expected = BASELINE_DAMAGE[case]
    damage(unit["state"])
    torch.save(unit, path)  # as a file of before the digest: the schema check must catch it
    before = path.read_bytes()
    store = RunStore(out)
    with store.session(load_study(study)):
        with pytest.raises(RunStoreError) as info:
            store.load_unit("baseline", 0)
    message = str(info.value)
    assert message.startswith(f"{path}: corrupted or truncated result file") and expected in message, message
    assert path.read_bytes() == before


def test_a_damaged_unit_stops_the_cli_with_one_line(study, finished, tmp_path, capsys):
    """Through the command: a unit lacking a field ends with exit 2 and one line naming the file."""
    out = _copy(finished, tmp_path)
    path = out / "units" / "ssri" / "p0000.json"
    rows = json.loads(path.read_text())["rows"]
    del rows[0]["metric"]
    path.write_text(json.dumps(rows))
    assert main(_cli(study, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert str(path) in line and "lacks field(s) metric" in line


def test_the_store_refuses_to_write_a_unit_it_would_refuse_to_read(study, tmp_path):
    """save_unit checks the payload as load_unit does: an invalid one raises and writes no file."""
    store = RunStore(tmp_path / "run")
    rows = [{"patient": 0, "arm": "ssri", "phase": "acute", "metric": "gain", "condition": "",
             "noise_sigma": float("nan"), "value": float("inf")}]
    with store.session(load_study(study)):
        with pytest.raises(RunStoreError, match="refusing to store an invalid unit .*not finite"):
            store.save_unit("ssri", 0, rows)
        assert not store.has("ssri", 0)
        store.save_unit("ssri", 0, [dict(rows[0], value=1.5)])
        assert json.dumps(store.load_unit("ssri", 0)) == json.dumps([dict(rows[0], value=1.5)])


# -- 6. odd --out paths ----------------------------------------------------------------------------
def _odd(tmp: Path, kind: str) -> tuple[Path, str]:
    if kind == "self loop":
        (tmp / "loop").symlink_to(tmp / "loop")
        return tmp / "loop", "output folder is a symbolic link loop"
    if kind == "two-link loop":
        (tmp / "a").symlink_to(tmp / "b")
        (tmp / "b").symlink_to(tmp / "a")
        return tmp / "a", "output folder is a symbolic link loop"
    if kind == "under a loop":
        (tmp / "loop").symlink_to(tmp / "loop")
        return tmp / "loop" / "run", f"it lies under {tmp / 'loop'}, which is a symbolic link loop"
    if kind == "dangling link":
        (tmp / "link").symlink_to(tmp / "missing")
        return tmp / "link", f"is a dangling symbolic link to {tmp / 'missing'}, which does not exist"
    if kind == "under a dangling link":
        (tmp / "link").symlink_to(tmp / "missing")
        return tmp / "link" / "run", f"lies under {tmp / 'link'}, which is a dangling symbolic link"
    (tmp / "file.txt").write_text("x")
    return tmp / "file.txt" / "run", f"it lies under {tmp / 'file.txt'}, which is a file, not a folder"


@pytest.mark.parametrize("kind", ["self loop", "two-link loop", "under a loop", "dangling link",
                                  "under a dangling link", "under a file"])
def test_an_odd_out_path_is_refused_with_one_clear_line(study, tmp_path, capsys, kind):
    """A symbolic link loop, a dangling link, or a path under a loop, a dangling link or a file as
    --out: exit 2, one line naming the path and saying what it is; nothing is created."""
    out, expected = _odd(tmp_path, kind)
    before = _tree(tmp_path)
    assert main(_cli(study, out)) == 2
    line = _one_error_line(capsys.readouterr().err)
    assert line.startswith(f"virtualpatient: error: {out}: ") and expected in line, line
    assert _tree(tmp_path) == before


# -- 5. report hardening ------------------------------------------------------------------------------
def _fast_sections(mp: pytest.MonkeyPatch) -> None:
    """Skip the report's statistics sections (bootstraps and models, writing no file) and all but
    three figures (resilience, sparsity, weights; the others are recorded as not drawn): the tests
    using this are about how the report is written, not what it says."""
    import analysis.figures
    import analysis.report

    def not_drawn(*args, **kwargs):
        raise ValueError("not drawn in this test")

    for name in ("_tables_section", "_claims_section", "_comparison_blocks", "_relapse_section"):
        mp.setattr(analysis.report, name, lambda *args, **kwargs: [])
    for name in ("plot_metric_points", "plot_relapse_vs_duration", "plot_kaplan_meier", "plot_washout"):
        mp.setattr(analysis.figures, name, not_drawn)


@pytest.fixture
def fast(monkeypatch) -> None:
    _fast_sections(monkeypatch)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    """A synthetic run folder (three patients, weights/) with a finished report in it."""
    run = write_run(tmp_path_factory.mktemp("synthetic") / "run", make_results(n_patients=3, seed=2), weights=True)
    with pytest.MonkeyPatch.context() as mp:
        _fast_sections(mp)
        write_report(run, n_resamples=20)
    return run


def _garbage(n: int) -> bytes:
    rng = random.Random(3)
    return bytes(rng.randrange(256) for _ in range(n))


def _csv_damage(csv: Path, case: str) -> None:
    text = csv.read_text()
    header, *lines = text.splitlines()
    if case == "binary garbage":
        csv.write_bytes(_garbage(4000))
    elif case == "garbage after a valid header":
        csv.write_bytes(header.encode() + b"\n" + _garbage(4000))
    elif case == "missing column":
        cols = header.split(",")
        i = cols.index("value")
        csv.write_text("\n".join(",".join(f for j, f in enumerate(r.split(",")) if j != i)
                                 for r in [header, *lines]) + "\n")
    elif case == "empty file":
        csv.write_text("")
    elif case == "header only":
        csv.write_text(header + "\n")
    elif case == "non-numeric value":
        i = header.split(",").index("value")
        fields = lines[5].split(",")
        fields[i] = "n/a%"
        lines[5] = ",".join(fields)
        csv.write_text("\n".join([header, *lines]) + "\n")
    elif case == "infinite value":
        i = header.split(",").index("value")
        fields = lines[7].split(",")
        fields[i] = "inf"
        lines[7] = ",".join(fields)
        csv.write_text("\n".join([header, *lines]) + "\n")
    elif case == "truncated last line":  # cut before its value, as a killed writer of old could leave it
        i = header.split(",").index("value")
        lines[-1] = ",".join(lines[-1].split(",")[:i])
        csv.write_text("\n".join([header, *lines]))
    elif case == "non-integer patient":
        fields = lines[2].split(",")
        fields[header.split(",").index("patient")] = "x"
        lines[2] = ",".join(fields)
        csv.write_text("\n".join([header, *lines]) + "\n")
    elif case == "a folder":
        csv.unlink()
        csv.mkdir()


@pytest.mark.parametrize("case", ["binary garbage", "garbage after a valid header", "missing column", "empty file",
                                  "header only", "non-numeric value", "infinite value", "truncated last line",
                                  "non-integer patient"])
def test_a_damaged_results_csv_raises_report_error_naming_it(synthetic, tmp_path, case):
    """Each damaged results.csv raises ReportError (one line, starting with the file's path) and
    leaves the previous report exactly as it was."""
    run = tmp_path / "run"
    shutil.copytree(synthetic, run)
    csv = run / "results.csv"
    _csv_damage(csv, case)
    before = _tree(run)
    with pytest.raises(ReportError) as info:
        write_report(run, n_resamples=20)
    message = str(info.value)
    assert message.startswith(str(csv)) and "\n" not in message, message
    assert _tree(run) == before


def test_report_error_is_a_value_error_for_existing_callers():
    """ReportError subclasses ValueError, so code catching ValueError from load_run still does."""
    assert issubclass(ReportError, ValueError)


@pytest.mark.parametrize("target", ["figures", "report.md", "report.html"])
def test_an_unwritable_report_target_raises_report_error(synthetic, tmp_path, target):
    """A run folder whose report files cannot be replaced (figures/ is a file, report.md or
    report.html a folder) raises ReportError naming the folder and the file before any statistics
    are computed, leaving everything as it was and no temporary file or folder behind."""
    run = tmp_path / "run"
    shutil.copytree(synthetic, run)
    path = run / target
    if path.is_dir():
        shutil.rmtree(path)
        path.write_text("a file where the figures go")
    else:
        path.unlink()
        path.mkdir()
    before = _tree(run)
    expected = f"^{re.escape(str(run))}: cannot write the report \\({re.escape(target)} is not"
    with pytest.raises(ReportError, match=expected):
        write_report(run, n_resamples=20)
    assert _tree(run) == before


def test_a_damaged_weights_file_skips_the_weight_figure(synthetic, tmp_path, fast):
    """A truncated weights .npz (a zip cut short) does not end the report: the weight figure is
    noted as not drawn and the rest is written."""
    run = tmp_path / "run"
    shutil.copytree(synthetic, run)
    npz = sorted((run / "weights").glob("*.npz"))[0]
    npz.write_bytes(npz.read_bytes()[:100])
    md = write_report(run, n_resamples=20).read_text()
    assert "Figure `weight_magnitudes` not drawn" in md


def test_a_read_only_run_folder_raises_report_error(synthetic, tmp_path, monkeypatch):
    """When the lock file cannot be created (a read-only file system, simulated with EROFS as root
    ignores permissions) the report raises ReportError naming the folder and writes nothing."""
    import errno

    run = tmp_path / "run"
    shutil.copytree(synthetic, run)
    before = _tree(run)
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and str(path).startswith(str(run)):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only)
    with pytest.raises(ReportError, match=f"^{re.escape(str(run))}: cannot write the report .*Read-only"):
        write_report(run, n_resamples=20)
    monkeypatch.undo()
    assert _tree(run) == before


@pytest.mark.parametrize("where", ["figure writer", "html writer"])
def test_a_crash_while_writing_leaves_the_previous_report_intact(synthetic, tmp_path, monkeypatch, fast, where):
    """A crash mid-report (the third figure's writer raising after writing half a file, or the
    HTML rendering raising after all figures are drawn) leaves report.md, report.html and every
    figure byte for byte as before, and no temporary file or folder."""
    import analysis.figures
    import analysis.report

    run = tmp_path / "run"
    shutil.copytree(synthetic, run)
    before = _tree(run)
    if where == "figure writer":
        real, count = analysis.figures.save_figure, []

        def crashing(fig, out_dir, name):
            count.append(name)
            if len(count) == 3:
                (Path(out_dir) / f"{name}.png").write_bytes(b"\x89PNG half")
                raise RuntimeError("disk on fire")
            return real(fig, out_dir, name)

        monkeypatch.setattr(analysis.figures, "save_figure", crashing)
    else:
        def crashing(blocks, title):
            raise RuntimeError("disk on fire")

        monkeypatch.setattr(analysis.report, "_to_html", crashing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        write_report(run, n_resamples=20)
    assert _tree(run) == before


def test_stale_report_tmp_files_are_removed_and_the_users_kept(synthetic, tmp_path, fast):
    """What a report killed mid-write leaves (its .report.md/.html tmp files, its staging figures
    folder) is removed by the next report; a user's files of similar names are kept."""
    run = tmp_path / "run"
    shutil.copytree(synthetic, run)
    (run / ".report.md.vp-abcdefgh.tmp").write_text("half")
    (run / ".report.html.vp-abcdefgh.tmp").write_text("half")
    (run / ".figures.vp-abcdefgh.tmp").mkdir()
    (run / ".figures.vp-abcdefgh.tmp" / "sparsity.png").write_bytes(b"half")
    users = {".report.md.tmp": "mine", ".notes.vp-abcdefgh.tmp": "mine", "figures/.x.tmp": "mine"}
    for rel, text in users.items():
        (run / rel).write_text(text)
    write_report(run, n_resamples=20)
    assert not list(run.glob(".report.*.vp-*")) and not list(run.glob(".figures.vp-*"))
    for rel, text in users.items():
        assert (run / rel).read_text() == text


def test_a_second_report_is_refused_while_one_is_being_written(synthetic, tmp_path, monkeypatch, fast):
    """While a report holds the folder's report lock, a second report on the folder raises
    ReportError ('another report') and changes nothing; the lock is really held while the report
    commits its files (checked from inside the commit), and released afterwards."""
    import analysis.report

    run = tmp_path / "run"
    shutil.copytree(synthetic, run)
    fd = os.open(run / ".report.lock", os.O_CREAT | os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        before = _tree(run)
        with pytest.raises(ReportError, match=f"^{re.escape(str(run))}: another report is being written"):
            write_report(run, n_resamples=20)
        assert _tree(run) == before
    finally:
        os.close(fd)

    real_commit, held = analysis.report._commit, []

    def probing_commit(*args):
        probe = os.open(run / ".report.lock", os.O_RDWR)
        try:
            fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
            held.append(False)
        except OSError:
            held.append(True)
        finally:
            os.close(probe)
        return real_commit(*args)

    monkeypatch.setattr(analysis.report, "_commit", probing_commit)
    write_report(run, n_resamples=20)
    assert held == [True]
    probe = os.open(run / ".report.lock", os.O_RDWR)
    try:
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released: no error
    finally:
        os.close(probe)
