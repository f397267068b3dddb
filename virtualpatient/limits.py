"""Resource bounds: caps on every size a study may ask for, and a memory and time estimate.

A typo in a study file (``n_patients = 1e12``, a layer of 2e9 units) must not allocate until the
machine runs out of memory: every size field of the protocol is capped here, far above any study of
the model family, and checked when the study is loaded, before anything is allocated. Every float
field has finite bounds too, so NaN and inf never reach the engine. :func:`estimate` then sizes a
run on this machine before it starts (the command line prints it, and refuses a run that would not
fit in memory unless told ``--yes``).

The time estimate's arithmetic rate is learned: a finished run records, for this machine, the
rate its estimate would have needed to be right (:func:`record_speed`), and later estimates use the
median of the last few records (:func:`measured_speed`); until then a rough default.

This module imports no torch, so the checks cost nothing at load time.

Examples
--------
>>> MAX_PATIENTS
10000
>>> est = Estimate(memory_bytes=3 * 2**30, available_bytes=2 * 2**30, seconds=5400.0, workers=2)
>>> est.fits
False
>>> est.describe()  # doctest: +NORMALIZE_WHITESPACE
'peak memory about 3.0 GiB (available 2.0 GiB); about 1.5 h on 2 worker(s)
 (a rough figure: no run measured here yet)'
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_EPOCHS", "MAX_GAIN", "MAX_LAYERS", "MAX_LAYER_UNITS", "MAX_LR", "MAX_NOISE", "MAX_PATIENTS",
    "MAX_POSITION", "MAX_SAMPLES", "MAX_SCALE", "MAX_STUDY_BYTES", "MAX_SEED", "MAX_STEPS", "MAX_LEVELS", "MAX_WORKERS",
    "Estimate", "available_memory", "cache_dir", "cpu_signature", "estimate", "measured_speed", "record_speed",
]

#: Patients in one study (the paper has 10; the family's largest sweeps a few hundred).
MAX_PATIENTS = 10_000
#: Units in one layer (the paper's widest is 512).
MAX_LAYER_UNITS = 16_384
#: Hidden layers (the paper has 3).
MAX_LAYERS = 16
#: Points in one data set or mini-batch (the paper's training set has 12,000).
MAX_SAMPLES = 1_000_000
#: Epochs of one training phase or maintenance duration (the paper's longest is 300).
MAX_EPOCHS = 100_000
#: Steps of a wash-out, score batches of a regrowth (the paper's: 50 and 30).
MAX_STEPS = 100_000
#: Entries of a list of levels (noise levels, maintenance durations).
MAX_LEVELS = 256
#: Largest study file read (a study is a page of settings; anything larger is not one).
MAX_STUDY_BYTES = 1_000_000
#: Largest study seed (it is stored in JSON and CSV as an integer).
MAX_SEED = 2**63 - 1
#: Largest learning rate (Adam above 1 only diverges).
MAX_LR = 1.0
#: Largest noise SD, noise shift, inhibition or regrowth SD (the paper's largest is 2.5).
MAX_NOISE = 100.0
#: Largest gain, damping or gain floor (the paper's largest is 1.6).
MAX_GAIN = 100.0
#: Largest multiplier a covariate may apply to a rate (``lr_scale``).
MAX_SCALE = 100.0
#: Largest absolute coordinate of a task centre (the paper's are +-3).
MAX_POSITION = 1_000.0
#: Worker processes of one run (more than this many per core only thrash).
MAX_WORKERS = 4 * (os.cpu_count() or 1)

#: Tensors per patient's parameters that a unit of work holds at once: weights, masks, gradients,
#: Adam's two moments, the pruned state, the on-drug copy and a spare (maintenance snapshots come
#: on top, one per duration).
_PARAM_COPIES = 8
#: Float32 activation buffers an evaluation holds (``EngineConfig.eval_max_bytes`` bounds each).
_EVAL_BUFFERS = 3
#: The interpreter with torch and the analysis stack loaded.
_BASE_BYTES = 400 * 2**20
#: Dense-equivalent arithmetic a worker achieves (measured: the full study, about 63 TFLOP of
#: training at the lesion's density, ran in 500 s on two workers of an AVX-512 machine; an AVX2
#: machine is about half as fast). A rough figure for an estimate, not a promise.
FLOPS_PER_WORKER = 5e10
#: Runs shorter than this, or with less training than this many seconds at :data:`FLOPS_PER_WORKER`,
#: are not recorded as the machine's speed (start-up costs and tests dominate them).
MIN_RECORDED_SECONDS = 60.0
#: Recorded speeds kept per machine; an estimate uses their median.
SPEED_RECORDS = 5


@dataclass(frozen=True)
class Estimate:
    """What a run will need: peak memory (all workers together) and wall time."""

    memory_bytes: float
    available_bytes: float | None
    seconds: float
    workers: int
    #: Dense-equivalent arithmetic of the run (what :func:`record_speed` divides by the wall time).
    flops: float = 0.0
    #: Whether ``seconds`` uses a speed measured on this machine (else the rough default).
    measured: bool = False

    @property
    def fits(self) -> bool:
        """Whether the peak memory fits in the memory available now (unknown counts as fitting)."""
        return self.available_bytes is None or self.memory_bytes <= self.available_bytes

    @property
    def worth_saying(self) -> bool:
        """Whether the run is large enough to print the estimate before it starts."""
        near = self.available_bytes is not None and self.memory_bytes > 0.5 * self.available_bytes
        return near or self.seconds > 3600

    def describe(self) -> str:
        gib = 2**30
        avail = "" if self.available_bytes is None else f" (available {self.available_bytes / gib:.1f} GiB)"
        hours = self.seconds / 3600
        time = f"{hours:.1f} h" if hours >= 1 else f"{self.seconds / 60:.0f} min" if self.seconds >= 60 else \
            "under a minute"
        how = "at the speed measured on this machine" if self.measured else "a rough figure: no run measured here yet"
        return (f"peak memory about {self.memory_bytes / gib:.1f} GiB{avail}; about {time} on {self.workers} "
                f"worker(s) ({how})")


def cache_dir() -> Path:
    """Where the package keeps what it learns about this machine (built kernels, measured speed):
    ``$VIRTUALPATIENT_CACHE``, else ``$XDG_CACHE_HOME``, else ``~/.cache``, then ``virtualpatient``."""
    root = os.environ.get("VIRTUALPATIENT_CACHE") or os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "virtualpatient"


def cpu_signature() -> str:
    """Something that changes when the CPU does: its model and feature flags (``/proc/cpuinfo``)."""
    sig = platform.machine() + platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                sig += line
            if line.startswith("flags"):
                break
    except OSError:
        pass
    return sig


def _speed_key() -> str:
    # the instruction-set switches change the speed as much as the CPU does (docs/performance.md)
    switches = [os.environ.get(k, "") for k in ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "VIRTUALPATIENT_MARCH")]
    return hashlib.sha256("|".join([cpu_signature(), str(os.cpu_count()), *switches]).encode()).hexdigest()[:16]


def _read_speeds(path: Path) -> dict[str, list[float]]:
    """The speed file, or nothing where it is missing or not what this module writes."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {k: [float(x) for x in v if isinstance(x, (int, float)) and not isinstance(x, bool) and 0 < x < 1e16]
            for k, v in data.items() if isinstance(k, str) and isinstance(v, list)}


def measured_speed() -> float | None:
    """This machine's dense-equivalent FLOP/s per worker, from its last recorded runs (``None``
    until a run of at least :data:`MIN_RECORDED_SECONDS` has finished here)."""
    speeds = _read_speeds(cache_dir() / "speed.json").get(_speed_key())
    return statistics.median(speeds) if speeds else None


def record_speed(estimate: Estimate, seconds: float) -> bool:
    """Record the speed a finished run achieved on this machine: its estimate's arithmetic over
    ``seconds`` of wall time on its workers. Runs shorter than :data:`MIN_RECORDED_SECONDS`, or
    whose training would take less than that at the rough rate (a tiny study is mostly start-up
    and tests), are not recorded; nor is anything when the cache cannot be written. Returns
    whether it was."""
    if not (seconds >= MIN_RECORDED_SECONDS and estimate.flops >= MIN_RECORDED_SECONDS * FLOPS_PER_WORKER):
        return False
    path = cache_dir() / "speed.json"
    speeds = _read_speeds(path)
    key = _speed_key()
    speeds[key] = [*speeds.get(key, []), estimate.flops / (seconds * max(1, estimate.workers))][-SPEED_RECORDS:]
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as fh:
            json.dump(speeds, fh)
        os.replace(fh.name, path)
    except OSError:
        return False
    return True


def available_memory() -> float | None:
    """Physical memory available now, in bytes (``None`` where the system does not say)."""
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate(protocol: Any, epochs_per_patient: Mapping[str, int], patients_per_unit: int,
             workers: int = 1, eval_max_bytes: float = 256 * 2**20, speed: float | None = None) -> Estimate:
    """Estimate the peak memory and the wall time of running ``protocol``.

    Parameters
    ----------
    protocol
        A :class:`~virtualpatient.protocol.Protocol`.
    epochs_per_patient
        Training epochs per patient of each unit kind (``ClinicalTrial.epochs_per_patient()``).
    patients_per_unit
        Patients trained together in one unit of work.
    workers
        Units running at once.
    eval_max_bytes
        The engine's bound on one evaluation buffer.
    speed
        Dense-equivalent FLOP/s of one worker, as :func:`measured_speed` gives it for this machine;
        ``None``: the rough :data:`FLOPS_PER_WORKER`.

    Notes
    -----
    Memory: each running unit holds ``_PARAM_COPIES`` + one per maintenance duration copies of its
    patients' parameters (float32), their data sets and the evaluation buffers. Time: training
    epochs x points x weights x 6 (forward and backward) at the density after the lesion (the
    baseline dense), at ``speed``.
    """
    sizes = protocol.network.layer_sizes
    n_weights = sum(a * b for a, b in zip(sizes[:-1], sizes[1:]))
    n_params = n_weights + sum(sizes[1:])
    task = protocol.task
    points = task.n_train + task.n_standard + task.n_clean
    copies = _PARAM_COPIES + len(protocol.longitudinal.durations)
    per_patient = copies * n_params * 4 + points * (2 * 4 + 8)
    unit_patients = min(patients_per_unit, protocol.n_patients)
    running = min(max(workers, 1), -(-protocol.n_patients // unit_patients) * (1 + len(protocol.arms)))
    widest = max(sizes[1:-1])
    eval_bytes = min(eval_max_bytes, unit_patients * task.n_standard * widest * 4.0) * _EVAL_BUFFERS
    memory = _BASE_BYTES + running * (unit_patients * per_patient + eval_bytes)

    density = 1.0 - protocol.pruning.fraction
    flops = 0.0
    for kind, epochs in epochs_per_patient.items():
        share = 1.0 if kind == "baseline" else density
        regrow = getattr(protocol.arms.get(kind), "regrow_fraction", 0.0)
        share += (1.0 - share) * regrow
        flops += protocol.n_patients * epochs * task.n_train * n_weights * 6 * share
    seconds = flops / ((speed or FLOPS_PER_WORKER) * max(1, running))
    return Estimate(memory_bytes=memory, available_bytes=available_memory(), seconds=seconds, workers=running,
                    flops=flops, measured=speed is not None)
