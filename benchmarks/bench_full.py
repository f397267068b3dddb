"""Time the full study (``studies/manic_switch.toml``: 10 patients, all arms, all six durations).

Runs the study through :class:`virtualpatient.ClinicalTrial` and prints the wall time, patient-epochs
per second and the peak resident memory (this process and its worker processes). It takes the
whole machine for a while: on 2 cores, run it with ``--workers 2`` (two single-threaded worker
processes; see docs/performance.md for why processes beat threads here).

    python benchmarks/bench_full.py --workers 2                      # the full study
    python benchmarks/bench_full.py --patients 1 --durations 1,2     # a smoke test, about half a minute
    # memory of one 10-patient unit (virtualpatient reproduce's default), wash-out tests grouped or not
    python benchmarks/bench_full.py --patients 10 --durations 1,2,3,4,5,6
    python benchmarks/bench_full.py --patients 10 --durations 1,2,3,4,5,6 --eval-max-mib 100000

The last line reads ``full_study <seconds> s``.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def _setup(threads: int, eval_max_mib: int | None) -> None:
    """Torch threads and the evaluation memory budget of this process (the driver's engine settings
    travel with every unit of work, so the workers need only their one thread)."""
    from virtualpatient.engine import settings

    torch.set_num_threads(threads)
    if eval_max_mib is not None:
        settings.ENGINE = dataclasses.replace(settings.ENGINE, eval_max_bytes=eval_max_mib * 2**20)


def _rss_mib(who: int) -> float:
    return resource.getrusage(who).ru_maxrss / 1024.0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=ROOT / "studies" / "manic_switch.toml")
    parser.add_argument("--patients", type=int, help="override the number of patients")
    parser.add_argument("--durations", help="override the maintenance durations, e.g. 1,2 (a shortened run)")
    parser.add_argument("--workers", type=int, default=1,
                        help="worker processes, one torch thread each (default 1: in this process)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads of this process when --workers 1 (default 1: a second thread only "
                             "helps when a core is idle, and costs a lot when it is not)")
    parser.add_argument("--patients-per-unit", type=int,
                        help="patients trained together per unit (default: trial.UNIT_PATIENTS, as the command)")
    parser.add_argument("--eval-max-mib", type=int,
                        help="largest evaluation buffer in MiB (EngineConfig.eval_max_bytes; default 256)")
    parser.add_argument("--out", type=Path, help="run folder (default: in memory, nothing written)")
    args = parser.parse_args(argv)

    from bench_trial import isa_line  # the figures depend on it: printed beside them

    from virtualpatient import ClinicalTrial, load_study
    from virtualpatient.distributed import local_pool
    from virtualpatient.engine import native, ops

    protocol = load_study(args.study)
    changes = {}
    if args.patients:
        changes["n_patients"] = args.patients
    if args.durations:
        durations = tuple(int(d) for d in args.durations.split(","))
        changes["longitudinal"] = dataclasses.replace(protocol.longitudinal, durations=durations)
    if changes:
        protocol = protocol.replace(**changes)
    _setup(args.threads, args.eval_max_mib)
    from virtualpatient.trial import UNIT_PATIENTS

    per_unit = args.patients_per_unit or min(UNIT_PATIENTS, protocol.n_patients)  # as the command

    executor = None
    if args.workers > 1:
        executor = local_pool(args.workers)  # what `virtualpatient reproduce` uses
    print(f"bench_full    python {platform.python_version()}  torch {torch.__version__}  cpus {os.cpu_count()}  "
          f"workers {args.workers}  threads {1 if args.workers > 1 else torch.get_num_threads()}  "
          f"sparse {native.backend('cpu')}  onednn {ops.onednn_available()}  {isa_line()}")
    cfg = protocol.longitudinal
    print(f"protocol      {protocol.name}  patients {protocol.n_patients}  patients_per_unit {per_unit}  "
          f"durations {','.join(map(str, cfg.durations))}  washout_steps {cfg.washout_steps}")
    try:
        trial = ClinicalTrial(protocol, executor=executor, patients_per_unit=per_unit, progress=False)
        trial_epochs = sum(trial.epochs_per_patient().values()) * protocol.n_patients
        start = time.perf_counter()
        frame = trial.run(out=args.out)
        wall = time.perf_counter() - start
    finally:
        if executor is not None:
            executor.shutdown()
    print(f"result        rows {len(frame)}  patient-epochs {trial_epochs}  "
          f"patient-epochs/s {trial_epochs / wall:.2f}")
    print(f"memory        peak_rss_main {_rss_mib(resource.RUSAGE_SELF):.0f} MiB  "
          f"peak_rss_worker {_rss_mib(resource.RUSAGE_CHILDREN):.0f} MiB")
    print(f"full_study {wall:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
