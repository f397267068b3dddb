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
"""

from __future__ import annotations

import functools
import json
import os
import platform
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

__all__ = ["CodeChangedWarning", "RunStore", "RunStoreError", "code_hash", "environment"]

TMP_SUFFIX = ".tmp"


@functools.cache
def _umask() -> int:
    """The process umask, read once on first write (reading it means setting it back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask

#: What a run folder may hold before its manifest exists (a run killed while starting).
_PRE_MANIFEST = {".lock", "protocol.json"}


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


def code_hash() -> str:
    """A short hash of this package's source files (tells apart uncommitted versions of the code)."""
    import hashlib

    digest = hashlib.sha256()
    package = Path(__file__).resolve().parent
    for path in sorted(package.rglob("*.py")):
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def _atomic_write(path: Path, write) -> None:
    """Write to a temporary file in the same folder, flush it to disk, then rename it into place."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
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
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._memory: dict[Any, Any] = {}
        self._lock_fd: int | None = None
        #: After :meth:`open` on an existing run: how this session's code differs from the first one's.
        self.code_changes: list[str] = []

    # -- manifest ----------------------------------------------------------------------------
    def open(self, protocol) -> None:
        """Lock the folder; create its manifest, or check that an existing one ran the same protocol.

        Raises
        ------
        RunStoreError
            The folder is not writable, is locked by another process, holds another protocol's run,
            is a non-empty folder that is not a run folder, or has an unreadable manifest. The
            folder is left as it was.
        """
        if self.path is None:
            return
        self._check_writable()
        self._check_run_folder()  # before the lock file, so a refused folder gets nothing written
        self._acquire_lock()
        try:
            self._open_locked(protocol)
        except BaseException:
            self.close()
            raise

    def _check_writable(self) -> None:
        if self.path.exists() and not self.path.is_dir():
            raise RunStoreError(f"{self.path}: output folder is a file, not a folder")
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            fd, probe = tempfile.mkstemp(dir=self.path, prefix=".write-test.", suffix=TMP_SUFFIX)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise RunStoreError(f"{self.path}: output folder is not writable ({exc.strerror or exc})") from None

    def _check_run_folder(self) -> None:
        """Refuse a non-empty folder without a manifest: it holds someone's files, not a run."""
        if (self.path / "manifest.json").exists():
            return
        foreign = sorted(p.name for p in self.path.iterdir() if p.name not in _PRE_MANIFEST and not _is_tmp(p))
        if foreign:
            raise RunStoreError(
                f"{self.path}: not a run folder (no manifest.json) and not empty "
                f"(holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); use another --out folder"
            )

    def _open_locked(self, protocol) -> None:
        manifest_path = self.path / "manifest.json"
        session = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **environment()}
        if not manifest_path.exists():
            self._check_run_folder()
            self._remove_stale_tmp()
            # protocol.json first: the manifest is the commit point of a new run folder
            self._write_json(self.path / "protocol.json", protocol.to_dict())
            manifest = {"protocol_hash": protocol.hash(), "study": protocol.name, "protocol": protocol.to_dict(),
                        **session, "sessions": [session]}
            self._write_json(manifest_path, manifest)
            return
        try:
            manifest = json.loads(manifest_path.read_text())
            if not isinstance(manifest, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as exc:
            raise RunStoreError(f"{manifest_path}: unreadable manifest ({exc})") from None
        if manifest.get("protocol_hash") != protocol.hash():
            raise RunStoreError(
                f"{self.path}: holds a run of another protocol (hash {manifest.get('protocol_hash')}, "
                f"this one {protocol.hash()}); use another --out folder"
            )
        self._remove_stale_tmp()
        # the cohort may have grown (or the device changed): the folder describes the latest run
        if manifest.get("protocol") != protocol.to_dict() or not (self.path / "protocol.json").exists():
            self._write_json(self.path / "protocol.json", protocol.to_dict())
            manifest["protocol"] = protocol.to_dict()
        first = (manifest.get("sessions") or [manifest])[0]
        self.code_changes = [
            f"{key} {first.get(key)} -> {session[key]}" for key in ("commit", "code_hash")
            if first.get(key) is not None and first.get(key) != session[key]
        ] + [f"{name} {first.get('versions', {}).get(name)} -> {v}" for name, v in session["versions"].items()
             if first.get("versions", {}).get(name) not in (None, v)]
        manifest["sessions"] = [*manifest.get("sessions", []), session]
        self._write_json(manifest_path, manifest)
        if self.code_changes:
            warnings.warn(CodeChangedWarning(
                f"{self.path}: resumed by other code than started the run ({'; '.join(self.code_changes)}); "
                "its units may mix both versions' numbers"), stacklevel=2)

    def _remove_stale_tmp(self) -> None:
        """Delete half-written temporary files of a killed run (never a finished file)."""
        for tmp in self.path.rglob(f".*{TMP_SUFFIX}"):
            if tmp.is_file() and _is_tmp(tmp):
                tmp.unlink(missing_ok=True)

    def _acquire_lock(self) -> None:
        import fcntl

        try:
            fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
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
    def _unit_path(self, arm: str, patient: int) -> Path:
        suffix = ".pt" if arm == "baseline" else ".json"
        return self.path / "units" / arm / f"p{patient:04d}{suffix}"

    def has(self, arm: str, patient: int) -> bool:
        """Whether the unit is finished (its file exists; :meth:`load_unit` checks that it is intact)."""
        if self.path is None:
            return (arm, patient) in self._memory
        return self._unit_path(arm, patient).exists()

    def save_unit(self, arm: str, patient: int, payload: Any) -> None:
        """Store a finished unit: ``{"rows": [...], "state": ...}`` for baselines, rows for arms.

        An existing unit is never replaced: finished results are not overwritten.
        """
        if self.path is None:
            self._memory.setdefault((arm, patient), payload)
            return
        path = self._unit_path(arm, patient)
        if path.exists():
            return
        if arm == "baseline":
            _atomic_write(path, lambda fh: torch.save(payload, fh))
        else:
            _atomic_write(path, lambda fh: fh.write(json.dumps(payload).encode()))

    def load_unit(self, arm: str, patient: int) -> Any:
        """Read a finished unit.

        Raises
        ------
        RunStoreError
            The file is unreadable, truncated, or does not hold this patient's unit. The file is
            left in place.
        """
        if self.path is None:
            return self._memory[(arm, patient)]
        path = self._unit_path(arm, patient)
        try:
            if arm == "baseline":
                payload = torch.load(path, weights_only=True)
            else:
                payload = json.loads(path.read_text())
            _check_unit(arm, patient, payload)
            return payload
        except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged file
            raise RunStoreError(
                f"{path}: corrupted or truncated result file ({type(exc).__name__}: {_first_line(exc)}); "
                "move it away to recompute that unit"
            ) from None

    # -- outputs -----------------------------------------------------------------------------
    def write_results(self, frame) -> Path | None:
        """Write ``results.csv`` (derived from the units, so rewriting it loses nothing)."""
        if self.path is None:
            return None
        path = self.path / "results.csv"
        _atomic_write(path, lambda fh: fh.write(frame.to_csv(index=False).encode()))
        return path

    def save_weights(self, arm: str, patient: int, weights: list[torch.Tensor]) -> None:
        """Write one patient's weight matrices after the lesion (``untreated``) or an acute course."""
        if self.path is None:
            return
        import numpy as np

        arrays = {f"W{i}": w.detach().cpu().numpy() for i, w in enumerate(weights)}
        _atomic_write(self.path / "weights" / f"{arm}_p{patient:04d}.npz", lambda fh: np.savez_compressed(fh, **arrays))

    @staticmethod
    def _write_json(path: Path, data: Any) -> None:
        _atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode()))


def _is_tmp(path: Path) -> bool:
    return path.name.startswith(".") and path.name.endswith(TMP_SUFFIX)


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    first = lines[0].split(". ")[0] if lines else "no detail"
    return first if len(first) <= 100 else first[:97] + "..."


def _check_unit(arm: str, patient: int, payload: Any) -> None:
    """Raise ``ValueError`` unless ``payload`` looks like patient ``patient``'s unit of ``arm``."""
    rows = payload.get("rows") if arm == "baseline" and isinstance(payload, dict) else payload
    if arm == "baseline" and not (isinstance(payload, dict) and isinstance(payload.get("state"), dict)):
        raise ValueError("not a baseline unit (needs rows and state)")
    if not isinstance(rows, list) or not rows or not all(isinstance(r, dict) for r in rows):
        raise ValueError("no result rows")
    if any(r.get("patient") != patient for r in rows):
        raise ValueError(f"rows of another patient than {patient}")
