"""Resource bounds: caps on every size a study may ask for, and a memory and time estimate.

A typo in a study file (``n_patients = 1e12``, a layer of 2e9 units) must not allocate until the
machine runs out of memory: every size field of the protocol is capped here, far above any study of
the model family, and checked when the study is loaded, before anything is allocated. Every float
field has finite bounds too, so NaN and inf never reach the engine. :func:`estimate` then sizes a
run on this machine before it starts (the command line prints it, and refuses a run that would not
fit in memory unless told ``--yes``).

This module imports no torch, so the checks cost nothing at load time.

Examples
--------
>>> MAX_PATIENTS
10000
>>> est = Estimate(memory_bytes=3 * 2**30, available_bytes=2 * 2**30, seconds=5400.0, workers=2)
>>> est.fits, est.describe()
(False, 'peak memory about 3.0 GiB (available 2.0 GiB); about 1.5 h on 2 worker(s)')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = [
    "MAX_EPOCHS", "MAX_GAIN", "MAX_LAYERS", "MAX_LAYER_UNITS", "MAX_LR", "MAX_NOISE", "MAX_PATIENTS",
    "MAX_POSITION", "MAX_SAMPLES", "MAX_SCALE", "MAX_STUDY_BYTES", "MAX_SEED", "MAX_STEPS", "MAX_LEVELS", "MAX_WORKERS",
    "Estimate", "available_memory", "estimate",
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


@dataclass(frozen=True)
class Estimate:
    """What a run will need: peak memory (all workers together) and wall time."""

    memory_bytes: float
    available_bytes: float | None
    seconds: float
    workers: int

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
        return f"peak memory about {self.memory_bytes / gib:.1f} GiB{avail}; about {time} on {self.workers} worker(s)"


def available_memory() -> float | None:
    """Physical memory available now, in bytes (``None`` where the system does not say)."""
    try:
        return float(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def estimate(protocol: Any, epochs_per_patient: Mapping[str, int], patients_per_unit: int,
             workers: int = 1, eval_max_bytes: float = 256 * 2**20) -> Estimate:
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

    Notes
    -----
    Memory: each running unit holds ``_PARAM_COPIES`` + one per maintenance duration copies of its
    patients' parameters (float32), their data sets and the evaluation buffers. Time: training
    epochs x points x weights x 6 (forward and backward) at the density after the lesion (the
    baseline dense), at :data:`FLOPS_PER_WORKER`.
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
    seconds = flops / (FLOPS_PER_WORKER * max(1, running))
    return Estimate(memory_bytes=memory, available_bytes=available_memory(), seconds=seconds, workers=running)
