"""The run folder: manifest, finished units of work, and the assembled results.

Every finished unit (a patient's baseline, a patient x arm) is written atomically (write to a
temporary file, then rename) as soon as it is done, so a killed run loses at most the units in
flight, and re-running on the same folder skips what is finished. A run folder records the full
resolved protocol, its hash, package versions and the git commit; resuming with a different
protocol is refused.

Layout::

    RUN_DIR/
      manifest.json        protocol hash, versions, commit, start time
      protocol.json        the resolved protocol
      units/baseline/p0000.pt   pruned state + rows of patient 0's baseline
      units/<arm>/p0000.json    rows of patient 0 in that arm
      results.csv          the tidy table (docs/results-schema.md), written at the end
      weights/<arm>_p0000.npz   weight matrices after the lesion / each acute course

The folder is recognised by its manifest alone: ``manifest.json`` carries ``"format":
"virtualpatient-run/1"`` and is the first file a new run commits, so a folder without it holds at
most an empty ``.lock`` and the store's own temporary files; any other folder is refused, whatever
it holds (a user's ``protocol.json`` included). Manifests written before the format marker existed
(they hold ``protocol_hash``, ``protocol`` and ``sessions``) are still resumed, and get the marker
on their next rewrite.

Every path is joined through :func:`virtualpatient.names.inside`, so no name (an arm passed to
:class:`RunStore` directly from Python, say) can place a file outside the run folder. Temporary
files are named ``.<target>.vp-XXXXXXXX.tmp``; only files of exactly that form, in the folders the
store writes (the folder itself, ``units/<arm>/``, ``weights/``), are ever deleted as stale.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import math
import os
import platform
import re
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from virtualpatient.errors import VirtualPatientError
from virtualpatient.names import check_name, inside

__all__ = ["FORMAT", "UNIT_FORMAT", "CodeChangedWarning", "RunStore", "RunStoreError", "code_hash", "environment"]

#: The format marker of a run folder's manifest: what makes a folder a run folder.
FORMAT = "virtualpatient-run/1"

#: The format marker of a unit file written with a digest of its content.
UNIT_FORMAT = "virtualpatient-unit/1"

TMP_SUFFIX = ".tmp"

#: The infix of the store's temporary files: ``.<target>.vp-XXXXXXXX.tmp`` (``XXXXXXXX`` from mkstemp).
TMP_INFIX = ".vp-"

_TMP = re.compile(r"\.(?P<target>.+)\.vp-[a-z0-9_]{8}\.tmp")

#: Per folder the store writes: the names of the files it writes there (the targets of its tmp files).
_TARGETS = {
    "root": re.compile(r"manifest\.json|protocol\.json|results\.csv|write-test"),
    "units": re.compile(r"p[0-9]{4,}\.(?:pt|json)"),
    "weights": re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*_p[0-9]{4,}\.npz"),
}


@functools.cache
def _umask() -> int:
    """The process umask, read once on first write (reading it means setting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

#: The lock file; the only file a run folder may hold before its manifest (empty, as the store makes it).
LOCK = ".lock"


class RunStoreError(VirtualPatientError, RuntimeError):
    """The run folder cannot be used (other protocol, corrupted file, locked, not writable)."""


class CodeChangedWarning(UserWarning):
    """A run folder is resumed by other code (commit, source files or package versions) than started it."""


def environment() -> dict[str, Any]:
    """Package versions and the git commit of the code that runs (``None`` outside a checkout)."""
    import numpy
    import pandas

    import virtualpatient

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "pandas": pandas.__version__, "virtualpatient": virtualpatient.__version__}
    commit, dirty = None, False
    root = Path(__file__).resolve().parent.parent
    try:
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10).stdout.strip()

        # only this package's own checkout counts, not a repository an installed copy happens to sit in
        if git("rev-parse", "--show-toplevel") and Path(git("rev-parse", "--show-toplevel")).resolve() == root:
            commit = git("rev-parse", "HEAD") or None
            dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):
        pass
    return {"versions": versions, "commit": commit, "dirty": dirty, "code_hash": code_hash(),
            "platform": platform.platform()}


#: The suffixes of the package's source files: Python and the engine's C kernels (``engine/kernels/*.c``).
SOURCE_SUFFIXES = (".py", ".c", ".h")


def code_hash(package: Path | None = None) -> str:
    """A short hash of this package's source files, Python and C (tells apart uncommitted versions of
    the code); ``package`` is another copy's folder (for tests)."""
    import hashlib

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent if package is None else package
    for path in sorted(p for p in package.rglob("*") if p.suffix in SOURCE_SUFFIXES and p.is_file()):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename it into place.

    ``path`` is already known to lie inside the run folder (:meth:`RunStore._file`); the temporary
    file beside it is ``.<name>.vp-XXXXXXXX.tmp``, the only kind of file the store deletes.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}{TMP_INFIX}", suffix=TMP_SUFFIX)
    except OSError as exc:
        raise RunStoreError(f"{path}: cannot write ({exc.strerror or exc})") from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files; results are ordinary files
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise RunStoreError(f"{path}: cannot write ({exc.strerror or exc})") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunStore:
    """A run folder on disk, or in memory when ``path`` is ``None``.

    Parameters
    ----------
    path
        The run folder; created if missing.

    Notes
    -----
    :meth:`open` takes an exclusive ``flock`` on ``RUN_DIR/.lock`` for as long as the store is open,
    so a second process on the same folder is refused instead of interleaving with the first. Locks
    are advisory and local to one machine (and unreliable on some network file systems): run one
    driver per folder; the workers of a cluster never touch the folder.

    Every file the store writes is joined through :func:`~virtualpatient.names.inside` and every
    arm name through :func:`~virtualpatient.names.check_name`, so a hostile name is refused with a
    :class:`RunStoreError` even when the store is used directly, without a checked study.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._memory: dict[Any, Any] = {}
        self._lock_fd: int | None = None
        #: The protocol's layer sizes once :meth:`open` ran: baseline units are checked against them.
        self._layer_sizes: tuple[int, ...] | None = None
        #: After :meth:`open` on an existing run: how this session's code differs from the first one's.
        self.code_changes: list[str] = []

    def _file(self, *parts: str) -> Path:
        """``RUN_DIR/parts``, refused with :class:`RunStoreError` if it would leave the run folder."""
        try:
            return inside(self.path, *parts)
        except (ValueError, RuntimeError, OSError) as exc:  # RuntimeError: a symlink loop on Python < 3.13
            raise RunStoreError(f"{self.path}: refusing a path outside the run folder ({_first_line(exc)})") from None

    # -- manifest ----------------------------------------------------------------------------
    def open(self, protocol) -> None:
        """Lock the folder; create its manifest, or check that an existing one ran the same protocol.

        Raises
        ------
        RunStoreError
            The folder cannot be a folder (a file, under a file, a dangling symbolic link or a
            symbolic link loop), is not writable, is locked by another process, holds another
            protocol's run, or is a non-empty folder that is not a run folder (no manifest of this
            format). The folder is left as it was.
        """
        if self.path is None:
            return
        self._layer_sizes = tuple(protocol.network.layer_sizes)
        problem = _path_problem(self.path)
        if problem:
            raise RunStoreError(f"{self.path}: output folder {problem}")
        if self.path.is_dir():
            self._identify()  # before anything is written: a refused folder gets nothing, not even a lock file
        self._check_writable()
        self._acquire_lock()
        try:
            self._open_locked(protocol)
        except BaseException:
            self.close()
            raise

    def _check_writable(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=f".write-test{TMP_INFIX}", suffix=TMP_SUFFIX)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            problem = _path_problem(self.path)  # changed since the first look (a race), or not writable
            raise RunStoreError(
                f"{self.path}: output folder {problem or f'is not writable ({exc.strerror or exc})'}"
            ) from None

    def _identify(self) -> dict | None:
        """The folder's manifest if the folder is a run folder; ``None`` if it is not one yet.

        Not one yet means empty, or holding only what a run killed before its first commit leaves:
        an empty ``.lock`` and the store's own temporary files. Anything else is refused.
        """
        try:
            names = sorted(os.listdir(self.path))
        except OSError as exc:
            raise RunStoreError(f"{self.path}: output folder is not readable ({exc.strerror or exc})") from None
        if "manifest.json" in names:
            return self._read_manifest(self.path / "manifest.json")
        foreign = [n for n in names if not self._ours_before_manifest(n)]
        if foreign:
            raise RunStoreError(
                f"{self.path}: not a run folder (no manifest.json) and not empty "
                f"(holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); use another --out folder"
            )
        return None

    def _ours_before_manifest(self, name: str) -> bool:
        try:
            st = os.lstat(self.path / name)
        except FileNotFoundError:
            return True  # gone meanwhile
        if not stat.S_ISREG(st.st_mode):
            return False
        if name == LOCK:
            return st.st_size == 0  # the store's lock file is always empty
        match = _TMP.fullmatch(name)
        return bool(match and _TARGETS["root"].fullmatch(match["target"]))

    def _read_manifest(self, path: Path) -> dict:
        def refuse(why: str) -> RunStoreError:
            return RunStoreError(
                f"{self.path}: not a run folder (its manifest.json is not a virtualpatient run manifest: {why}); "
                "use another --out folder"
            )

        try:
            if not stat.S_ISREG(os.lstat(path).st_mode):
                raise refuse("not a regular file")
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:  # ValueError: bad JSON or bad UTF-8
            raise refuse(_first_line(exc)) from None
        if not isinstance(manifest, dict):
            raise refuse("not a JSON object")
        fmt = manifest.get("format")
        if fmt == FORMAT:
            return manifest
        if "format" in manifest:
            if isinstance(fmt, str) and fmt.startswith("virtualpatient-run/"):
                raise RunStoreError(
                    f"{self.path}: run folder of another format ({fmt}; this version reads {FORMAT}); "
                    "use another --out folder or the version that wrote it"
                )
            raise refuse(f"format {str(fmt)[:40]!r}")
        # written before the format marker existed: a manifest of ours has exactly these entries
        if (isinstance(manifest.get("protocol_hash"), str) and isinstance(manifest.get("protocol"), dict)
                and isinstance(manifest.get("sessions"), list)):
            return manifest
        raise refuse(f"no \"format\": \"{FORMAT}\"")

    def _open_locked(self, protocol) -> None:
        manifest = self._identify()  # again, under the lock: another process may have started the run meanwhile
        session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **environment()}
        if manifest is None:
            self._remove_stale_tmp()
            manifest = {"format": FORMAT, "protocol_hash": protocol.hash(), "study": protocol.name,
                        "protocol": protocol.to_dict(), **session, "sessions": [session]}
            # the manifest first: it is the commit point that makes the folder a run folder
            self._write_json(self._file("manifest.json"), manifest)
            self._write_json(self._file("protocol.json"), protocol.to_dict())
            return
        if manifest.get("protocol_hash") != protocol.hash():
            raise RunStoreError(
                f"{self.path}: holds a run of another protocol (hash {manifest.get('protocol_hash')}, "
                f"this one {protocol.hash()}); use another --out folder"
            )
        self._remove_stale_tmp()
        manifest["format"] = FORMAT  # an older manifest gets the marker
        # the cohort may have grown (or the device changed): the folder describes the latest run
        if manifest.get("protocol") != protocol.to_dict() or not self._file("protocol.json").exists():
            self._write_json(self._file("protocol.json"), protocol.to_dict())
            manifest["protocol"] = protocol.to_dict()
        first = (manifest.get("sessions") or [manifest])[0]
        if not isinstance(first, dict):
            first = {}
        first_versions = first.get("versions") if isinstance(first.get("versions"), dict) else {}
        self.code_changes = [
            f"{key} {first.get(key)} -> {session[key]}" for key in ("commit", "code_hash")
            if first.get(key) is not None and first.get(key) != session[key]
        ] + [f"{name} {first_versions.get(name)} -> {v}" for name, v in session["versions"].items()
             if first_versions.get(name) not in (None, v)]
        manifest["sessions"] = [*manifest.get("sessions", []), session]
        self._write_json(self._file("manifest.json"), manifest)
        if self.code_changes:
            warnings.warn(CodeChangedWarning(
                f"{self.path}: resumed by other code than started the run ({'; '.join(self.code_changes)}); "
                "its units may mix both versions' numbers"), stacklevel=2)

    def _remove_stale_tmp(self) -> None:
        """Delete half-written temporary files of a killed run (never a finished file, never a user's).

        Only files named exactly like the store's own (``.<target>.vp-XXXXXXXX.tmp``, ``<target>`` a
        file the store writes in that folder) and only in the folders the store writes: the run
        folder itself, ``units/<arm>/`` and ``weights/`` (never through a symbolic link).
        """
        folders = [(self.path, "root"), (self.path / "weights", "weights")]
        units = self.path / "units"
        if _is_real_dir(units):
            folders += [(units / name, "units") for name in sorted(os.listdir(units)) if _valid_name(name)]
        for folder, kind in folders:
            if not _is_real_dir(folder):
                continue
            for name in os.listdir(folder):
                match = _TMP.fullmatch(name)
                if match and _TARGETS[kind].fullmatch(match["target"]) and _is_regular(folder / name):
                    (folder / name).unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        import fcntl

        try:
            fd = os.open(self._file(LOCK), os.O_CREAT | os.O_RDWR | getattr(os, "O_NOFOLLOW", 0), 0o644)
        except OSError as exc:
            raise RunStoreError(f"{self.path}: output folder is not writable ({exc.strerror or exc})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunStoreError(
                f"{self.path}: another process is running this study (folder locked); "
                "wait for it to finish or use another --out folder"
            ) from None
        self._lock_fd = fd

    def close(self) -> None:
        """Release the folder's lock."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def session(self, protocol) -> Iterator[RunStore]:
        """``open`` the folder for the duration of a ``with`` block, then release the lock."""
        self.open(protocol)
        try:
            yield self
        finally:
            self.close()

    # -- units -------------------------------------------------------------------------------
    def _checked(self, arm: Any, patient: Any) -> tuple[str, int]:
        """``arm`` and ``patient`` if they are safe in a file name, else :class:`RunStoreError`."""
        try:
            check_name(arm, "arm")
        except (TypeError, ValueError) as exc:
            raise RunStoreError(f"{self.path}: {exc}") from None
        if isinstance(patient, bool) or not isinstance(patient, int) or patient < 0:
            raise RunStoreError(f"{self.path}: patient must be an int >= 0, got {patient!r}")
        return arm, patient

    def _unit_path(self, arm: str, patient: int) -> Path:
        arm, patient = self._checked(arm, patient)
        suffix = ".pt" if arm == "baseline" else ".json"
        return self._file("units", arm, f"p{patient:04d}{suffix}")

    def has(self, arm: str, patient: int) -> bool:
        """Whether the unit is finished (its file exists; :meth:`load_unit` checks that it is intact)."""
        if self.path is None:
            return (arm, patient) in self._memory
        return self._unit_path(arm, patient).exists()

    def save_unit(self, arm: str, patient: int, payload: Any) -> None:
        """Store a finished unit: ``{"rows": [...], "state": ..., "meta": ...}`` for baselines (``meta``,
        the schedule's state of the patient, optional), rows for arms.

        An existing unit is never replaced: finished results are not overwritten. The file holds
        the payload with a SHA-256 digest of it, so :meth:`load_unit` notices any later edit.

        Raises
        ------
        RunStoreError
            A bad arm name or patient, or a payload :meth:`load_unit` would refuse (nothing is written).
        """
        if self.path is None:
            self._memory.setdefault((arm, patient), payload)
            return
        path = self._unit_path(arm, patient)
        if path.exists():
            return
        try:
            _check_unit(arm, patient, payload, self._layer_sizes)
        except Exception as exc:  # noqa: BLE001 - whatever is wrong, it is not a unit
            raise RunStoreError(f"{path}: refusing to store an invalid unit ({_detail(exc)})") from None
        if arm == "baseline":
            body = {k: payload[k] for k in ("rows", "state", "meta") if k in payload}
            data = {**body, "format": UNIT_FORMAT, "sha256": _digest(body)}
            _atomic_write(path, lambda fh: torch.save(data, fh))
        else:
            data = {"format": UNIT_FORMAT, "rows": payload, "sha256": _digest(payload)}
            _atomic_write(path, lambda fh: fh.write(json.dumps(data).encode()))

    def load_unit(self, arm: str, patient: int) -> Any:
        """Read a finished unit and check it in full.

        Checked: the file's digest (files written before digests existed have none), the schema of
        every row (fields, types, finite values where a value must be finite), that the rows are
        this patient's and this arm's, and for baselines that the network state has the protocol's
        layer sizes.

        Raises
        ------
        RunStoreError
            The file is unreadable, truncated, edited or does not hold this patient's unit. The
            file is left in place.
        """
        if self.path is None:
            return self._memory[(arm, patient)]
        path = self._unit_path(arm, patient)
        try:
            if arm == "baseline":
                payload = torch.load(path, weights_only=True)
            else:
                payload = json.loads(path.read_text(encoding="utf-8"))
            payload = _unwrap(arm, payload)
            _check_unit(arm, patient, payload, self._layer_sizes)
            return payload
        except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged file
            raise RunStoreError(
                f"{path}: corrupted or truncated result file ({_detail(exc)}); move it away to recompute that unit"
            ) from None

    # -- outputs -----------------------------------------------------------------------------
    def write_results(self, frame) -> Path | None:
        """Write ``results.csv`` (derived from the units, so rewriting it loses nothing)."""
        if self.path is None:
            return None
        path = self._file("results.csv")
        _atomic_write(path, lambda fh: fh.write(frame.to_csv(index=False).encode()))
        return path

    def write_json(self, name: str, data: Any) -> Path | None:
        """Write a small JSON record (a sweep's plan) into the run folder, atomically."""
        if self.path is None:
            return None
        path = self._file(name)
        self._write_json(path, data)
        return path

    def save_weights(self, arm: str, patient: int, weights: list[torch.Tensor]) -> None:
        """Write one patient's weight matrices after the lesion (``untreated``) or an acute course."""
        if self.path is None:
            return
        import numpy as np

        arm, patient = self._checked(arm, patient)
        arrays = {f"W{i}": w.detach().cpu().numpy() for i, w in enumerate(weights)}
        _atomic_write(self._file("weights", f"{arm}_p{patient:04d}.npz"), lambda fh: np.savez_compressed(fh, **arrays))

    @staticmethod
    def _write_json(path: Path, data: Any) -> None:
        _atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode()))


# -- paths -------------------------------------------------------------------------------------
def _path_problem(path: Path) -> str | None:
    """Why ``path`` cannot be or become a folder, as the rest of a sentence; ``None`` if it can.

    Walks the path from its root, so a problem in a parent is named too: a file, a dangling
    symbolic link or a symbolic link loop.
    """
    parts = Path(path).absolute().parts
    for i in range(1, len(parts) + 1):
        here = Path(*parts[:i])
        last = i == len(parts)
        try:
            os.lstat(here)
        except FileNotFoundError:
            return None  # this and the rest are created
        except OSError as exc:
            return f"is not writable ({exc.strerror or exc})" if last else \
                f"is not writable ({here} cannot be reached: {exc.strerror or exc})"
        try:
            st = os.stat(here)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                what = "a symbolic link loop"
            elif exc.errno == errno.ENOENT:
                what = f"a dangling symbolic link to {os.readlink(here)}"
            else:
                what = f"unreachable: {exc.strerror or exc}"
            if last:
                return f"is {what}{', which does not exist' if exc.errno == errno.ENOENT else ''}"
            return f"is not writable (it lies under {here}, which is {what})"
        if not stat.S_ISDIR(st.st_mode):
            return "is a file, not a folder" if last else \
                f"is not writable (it lies under {here}, which is a file, not a folder)"
    return None


def _is_real_dir(path: Path) -> bool:
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_regular(path: Path) -> bool:
    try:
        return stat.S_ISREG(os.lstat(path).st_mode)
    except OSError:
        return False


def _valid_name(name: str) -> bool:
    try:
        check_name(name, "arm")
    except ValueError:
        return False
    return True


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else "no detail"
    return first if len(first) <= 100 else first[:97] + "..."


# -- units -------------------------------------------------------------------------------------
class _UnitError(ValueError):
    """A unit's content breaks the schema (the message says where, without the exception type)."""


def _detail(exc: BaseException) -> str:
    return _first_line(exc) if isinstance(exc, _UnitError) else f"{type(exc).__name__}: {_first_line(exc)}"


def _digest(obj: Any) -> str:
    """A SHA-256 of a unit's content: rows (dicts, lists, scalars) and tensors, independent of key order."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, dict):
            h.update(b"d%d;" % len(x))
            for key in sorted(x, key=repr):
                feed(key)
                feed(x[key])
        elif isinstance(x, (list, tuple)):
            h.update(b"l%d;" % len(x))
            for item in x:
                feed(item)
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"t{t.dtype}{tuple(t.shape)};".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
        else:
            h.update(f"s{type(x).__name__}:{x!r};".encode())

    feed(obj)
    return h.hexdigest()


def _unwrap(arm: str, payload: Any) -> Any:
    """The unit a file holds, its digest checked; files written before digests pass as they are."""
    if not (isinstance(payload, dict) and "format" in payload):
        return payload
    if payload["format"] != UNIT_FORMAT:
        raise _UnitError(f"unknown unit format {str(payload['format'])[:40]!r}")
    body = {k: v for k, v in payload.items() if k not in ("format", "sha256")}
    if arm != "baseline":
        if set(body) != {"rows"}:
            raise _UnitError("not an arm unit (needs rows)")
        body = body["rows"]
    digest = payload.get("sha256")
    if not isinstance(digest, str) or _digest(body) != digest:
        raise _UnitError("content does not match its SHA-256 digest: edited or damaged")
    return body


#: Fields every result row has (docs/results-schema.md); ``maintenance_epochs`` and ``step`` only some.
_REQUIRED = ("patient", "arm", "phase", "metric", "condition", "noise_sigma", "value")
_OPTIONAL = ("maintenance_epochs", "step")
#: Where a row sits in its schedule (docs/schedules.md); rows of units written before schedules lack them.
_SCHEDULE = ("time", "cycle", "label")
#: The paper's spine phases: an arm (regimen) unit holds none of them (schedules reserve the names).
_BASELINE_PHASES = {"baseline", "pruned"}
#: What a baseline unit may carry besides rows and state: the schedule's state of the patient.
_META_KEYS = {"clock", "relapsed", "arm", "memory", "scar"}
_STATE_KEYS = {"specs", "weights", "biases", "masks", "modulation"}


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _check_rows(rows: Any, arm: str, patient: int) -> None:
    label = "untreated" if arm == "baseline" else arm
    # a spine may measure nothing (its unit is the patients' state); a regimen always reports rows
    if not isinstance(rows, list) or (not rows and arm != "baseline"):
        raise _UnitError("no result rows")
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise _UnitError(f"row {i} is not an object")
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise _UnitError(f"row {i} lacks field(s) {', '.join(missing)}")
        unknown = sorted(str(k) for k in r if k not in _REQUIRED and k not in _OPTIONAL and k not in _SCHEDULE)
        if unknown:
            raise _UnitError(f"row {i} has unknown field(s) {', '.join(unknown)[:60]}")
        if not _is_int(r["patient"]):
            raise _UnitError(f"row {i}: patient must be an integer, got {type(r['patient']).__name__}")
        if r["patient"] != patient:
            raise _UnitError(f"rows of another patient than {patient} (row {i}: patient {r['patient']})")
        for key in ("arm", "phase", "metric", "condition"):
            if not isinstance(r[key], str):
                raise _UnitError(f"row {i}: {key} must be a string, got {type(r[key]).__name__}")
            if key != "condition" and not r[key]:
                raise _UnitError(f"row {i}: {key} is empty")
        if r["arm"] != label:
            raise _UnitError(f"row {i}: arm {r['arm'][:40]!r}, expected {label!r}")
        # a spine (baseline unit) may label its phases freely; a regimen never uses the spine's names
        if arm != "baseline" and r["phase"] in _BASELINE_PHASES:
            raise _UnitError(f"row {i}: phase {r['phase'][:40]!r} does not belong in a {arm} unit")
        sigma, value = r["noise_sigma"], r["value"]
        if not _is_number(sigma):
            raise _UnitError(f"row {i}: noise_sigma must be a number, got {type(sigma).__name__}")
        # NaN means "no internal noise" (every other condition); a level is finite and >= 0
        if not (math.isnan(sigma) and r["condition"] != "internal_noise") and not (math.isfinite(sigma) and sigma >= 0):
            raise _UnitError(f"row {i}: noise_sigma {sigma!r} is not a noise level")
        if not _is_number(value):
            raise _UnitError(f"row {i}: value must be a number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise _UnitError(f"row {i}: value {value!r} is not finite")
        for key in _OPTIONAL:
            if key in r and not (_is_int(r[key]) and r[key] >= 0):
                raise _UnitError(f"row {i}: {key} must be an integer >= 0, got {r[key]!r}")
        if "time" in r and not (_is_number(r["time"]) and math.isfinite(r["time"])):
            raise _UnitError(f"row {i}: time must be a finite number, got {r['time']!r}")
        if "cycle" in r and not (_is_int(r["cycle"]) and r["cycle"] >= 0):
            raise _UnitError(f"row {i}: cycle must be an integer >= 0, got {r['cycle']!r}")
        if "label" in r and not (isinstance(r["label"], str) and r["label"]):
            raise _UnitError(f"row {i}: label must be a non-empty string")


def _check_meta(meta: Any, state: dict) -> None:
    """A baseline's schedule state (``virtualpatient.phases.Group.meta``): clock, verdict, memory, scars."""
    if not isinstance(meta, dict) or set(meta) != _META_KEYS:
        raise _UnitError(f"schedule state must hold {', '.join(sorted(_META_KEYS))}")
    if not (_is_number(meta["clock"]) and math.isfinite(meta["clock"])) or not _is_number(meta["relapsed"]):
        raise _UnitError("schedule state clock and relapsed must be numbers")
    if meta["arm"] is not None and not isinstance(meta["arm"], str):
        raise _UnitError("schedule state arm must be a name or None")
    if not (isinstance(meta["memory"], dict) and all(isinstance(k, str) and _is_number(v)
                                                     for k, v in meta["memory"].items())):
        raise _UnitError("schedule state memory must map names to numbers")
    scar = meta["scar"]
    if scar is not None:
        masks = state["masks"]
        if not (isinstance(scar, list) and len(scar) == len(masks) and all(
                isinstance(t, torch.Tensor) and t.dtype == torch.bool and tuple(t.shape) == tuple(m.shape[1:])
                for t, m in zip(scar, masks))):
            raise _UnitError("schedule state scar must be one bool mask per weight matrix")


def _check_state(state: Any, patient: int, layer_sizes: tuple[int, ...] | None) -> None:
    """A baseline's network state: one patient's specs, finite weights of the protocol's layer sizes."""
    if not isinstance(state, dict) or set(state) != _STATE_KEYS:
        keys = sorted(map(str, state)) if isinstance(state, dict) else type(state).__name__
        raise _UnitError(f"state must hold {', '.join(sorted(_STATE_KEYS))}; it holds {keys}")
    specs = state["specs"]
    if not (isinstance(specs, list) and len(specs) == 1 and isinstance(specs[0], dict)
            and specs[0].get("index") == patient and _is_int(specs[0].get("index"))):
        raise _UnitError(f"state is not patient {patient}'s alone")
    if not isinstance(state["modulation"], dict):
        raise _UnitError("state modulation must be a mapping")
    groups = [state[k] for k in ("weights", "biases", "masks")]
    if not all(isinstance(g, list) and all(isinstance(t, torch.Tensor) for t in g) for g in groups):
        raise _UnitError("state weights, biases and masks must be lists of tensors")
    weights, biases, masks = groups
    n_layers = len(weights)
    if n_layers == 0 or len(biases) != n_layers or len(masks) != n_layers:
        raise _UnitError("state weights, biases and masks differ in number")
    if layer_sizes is not None and n_layers != len(layer_sizes) - 1:
        raise _UnitError(f"state has {n_layers} weight matrices, the protocol's network {len(layer_sizes) - 1}")
    previous = None
    for i, (w, b, m) in enumerate(zip(weights, biases, masks)):
        if w.dim() != 3 or w.shape[0] != 1:
            raise _UnitError(f"state weight {i} has shape {tuple(w.shape)}, not (1, out, in)")
        out_, in_ = int(w.shape[1]), int(w.shape[2])
        if layer_sizes is not None and (out_, in_) != (layer_sizes[i + 1], layer_sizes[i]):
            raise _UnitError(f"state weight {i} is {out_}x{in_}, the protocol's layer "
                             f"{layer_sizes[i + 1]}x{layer_sizes[i]}")
        if previous is not None and in_ != previous:
            raise _UnitError(f"state weight {i} takes {in_} inputs, the layer before gives {previous}")
        previous = out_
        if tuple(b.shape) != (1, out_) or tuple(m.shape) != tuple(w.shape):
            raise _UnitError(f"state bias or mask {i} does not match weight {i}'s shape")
        for name, t in (("weight", w), ("bias", b), ("mask", m)):
            if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
                raise _UnitError(f"state {name} {i} is not finite floating point")
        if not bool(((m == 0) | (m == 1)).all()):
            raise _UnitError(f"state mask {i} holds values other than 0 and 1")


def _check_unit(arm: str, patient: int, payload: Any, layer_sizes: tuple[int, ...] | None = None) -> None:
    """Raise ``ValueError`` unless ``payload`` is patient ``patient``'s unit of ``arm``, valid in full."""
    if arm == "baseline":
        if not (isinstance(payload, dict) and set(payload) in ({"rows", "state"}, {"rows", "state", "meta"})):
            raise _UnitError("not a baseline unit (needs rows and state)")
        _check_rows(payload["rows"], arm, patient)
        _check_state(payload["state"], patient, layer_sizes)
        if "meta" in payload:
            _check_meta(payload["meta"], payload["state"])
    else:
        _check_rows(payload, arm, patient)
