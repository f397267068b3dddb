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

import json
import os
import platform
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

__all__ = ["RunStore", "RunStoreError", "environment"]


class RunStoreError(RuntimeError):
    """The run folder cannot be used (other protocol, corrupted file, locked, not writable)."""


def environment() -> dict[str, Any]:
    """Package versions and the git commit of the code that runs."""
    import numpy
    import pandas

    import virtualpatient

    versions = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
                "pandas": pandas.__version__, "virtualpatient": virtualpatient.__version__}
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, ""
    return {"versions": versions, "commit": commit, "dirty": bool(dirty), "platform": platform.platform()}


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class RunStore:
    """A run folder on disk, or in memory when ``path`` is ``None``.

    Parameters
    ----------
    path
        The run folder; created if missing.
    """

    def __init__(self, path: str | Path | None) -> None:
        self.path = None if path is None else Path(path)
        self._memory: dict[str, Any] = {}
        self._lock_fd: int | None = None

    # -- manifest ----------------------------------------------------------------------------
    def open(self, protocol) -> None:
        """Create the folder and manifest, or check that an existing one ran the same protocol."""
        if self.path is None:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
            probe = self.path / ".write-test"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise RunStoreError(f"{self.path}: output folder is not writable ({exc.strerror or exc})") from None
        self._acquire_lock()
        manifest_path = self.path / "manifest.json"
        if manifest_path.exists():
            try:
                manifest = json.loads(manifest_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise RunStoreError(f"{manifest_path}: unreadable manifest ({exc})") from None
            if manifest.get("protocol_hash") != protocol.hash():
                raise RunStoreError(
                    f"{self.path}: holds a run of another protocol (hash {manifest.get('protocol_hash')}, "
                    f"this one {protocol.hash()}); use another --out folder"
                )
            return
        manifest = {"protocol_hash": protocol.hash(), "study": protocol.name,
                    "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), **environment()}
        self._write_json(manifest_path, manifest)
        self._write_json(self.path / "protocol.json", protocol.to_dict())

    def _acquire_lock(self) -> None:
        import fcntl

        fd = os.open(self.path / ".lock", os.O_CREAT | os.O_RDWR, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise RunStoreError(f"{self.path}: another process is running this study (folder locked)") from None
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    @contextmanager
    def session(self, protocol) -> Iterator[RunStore]:
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
        if self.path is None:
            return (arm, patient) in self._memory
        return self._unit_path(arm, patient).exists()

    def save_unit(self, arm: str, patient: int, payload: Any) -> None:
        """Store a finished unit: ``{"rows": [...], "state": ...}`` for baselines, rows for arms."""
        if self.path is None:
            self._memory[(arm, patient)] = payload
            return
        path = self._unit_path(arm, patient)
        if arm == "baseline":
            _atomic_write(path, lambda fh: torch.save(payload, fh))
        else:
            _atomic_write(path, lambda fh: fh.write(json.dumps(payload).encode()))

    def load_unit(self, arm: str, patient: int) -> Any:
        if self.path is None:
            return self._memory[(arm, patient)]
        path = self._unit_path(arm, patient)
        try:
            if arm == "baseline":
                return torch.load(path, weights_only=True)
            return json.loads(path.read_text())
        except Exception as exc:  # noqa: BLE001 - any failure to read means a damaged file
            raise RunStoreError(
                f"{path}: corrupted or truncated result file ({type(exc).__name__}); "
                "move it away to recompute that unit"
            ) from None

    # -- outputs -----------------------------------------------------------------------------
    def write_results(self, frame) -> Path | None:
        if self.path is None:
            return None
        path = self.path / "results.csv"
        _atomic_write(path, lambda fh: fh.write(frame.to_csv(index=False).encode()))
        return path

    def save_weights(self, arm: str, patient: int, weights: list[torch.Tensor]) -> None:
        if self.path is None:
            return
        import numpy as np

        arrays = {f"W{i}": w.detach().cpu().numpy() for i, w in enumerate(weights)}
        _atomic_write(self.path / "weights" / f"{arm}_p{patient:04d}.npz", lambda fh: np.savez_compressed(fh, **arrays))

    @staticmethod
    def _write_json(path: Path, data: Any) -> None:
        _atomic_write(path, lambda fh: fh.write(json.dumps(data, indent=2, sort_keys=True, default=str).encode()))
