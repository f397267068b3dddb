"""The ``virtualpatient`` command.

``virtualpatient reproduce`` runs a study (default: the paper's) into a run folder, resuming what a
previous run on the same folder finished, and prints Tables 1-4 beside the published values.
``virtualpatient report RUN_DIR`` rebuilds the reproduction report from a run folder's data alone.

Every expected failure (bad study file, unwritable or foreign run folder, damaged result file,
diverged training) ends with exit status 2 and one line on standard error, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line too (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"virtualpatient: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="virtualpatient", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run a study and print the paper's tables beside ours")
    rep.add_argument("--study", type=Path, help="TOML study file (default: the paper's protocol)")
    rep.add_argument("--patients", type=int, help="number of patients (overrides the study)")
    rep.add_argument("--seed", type=int, help="study seed (overrides the study)")
    rep.add_argument("--out", type=Path, help="run folder (default: runs/<study>-<protocol hash>)")
    rep.add_argument("--patients-per-unit", type=int, help="patients trained together in one unit")
    rep.add_argument("--device", choices=["cpu", "cuda"], help="where tensors live (overrides the study)")
    dask = rep.add_mutually_exclusive_group()
    dask.add_argument("--workers", type=int, help="run units on a local Dask cluster of N processes (dask extra)")
    dask.add_argument("--scheduler", help="run units on the Dask cluster at this address, e.g. tcp://host:8786")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")

    report = sub.add_parser("report", help="write report.md/report.html from a run folder")
    report.add_argument("run_dir", type=Path)
    return parser


def _fail(message: str) -> int:
    print(f"virtualpatient: error: {message}", file=sys.stderr)
    return 2


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"virtualpatient: warning: {message}", file=sys.stderr)


def _reproduce(args: argparse.Namespace) -> int:
    from virtualpatient.protocol import Protocol, load_study
    from virtualpatient.store import CodeChangedWarning
    from virtualpatient.trial import ClinicalTrial

    for flag, value in (("--patients-per-unit", args.patients_per_unit), ("--workers", args.workers)):
        if value is not None and value < 1:
            return _fail(f"{flag} must be >= 1, got {value}")
    overrides = {}
    if args.patients is not None:
        overrides["n_patients"] = args.patients
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.device is not None:
        overrides["device"] = args.device
    if args.study is not None:
        protocol = load_study(args.study, **overrides)
    else:
        protocol = Protocol.from_dict(overrides, source="command line")
    out = args.out or Path("runs") / f"{protocol.name}-{protocol.hash()[:8]}"
    print(f"study {protocol.name}: {protocol.n_patients} patients, arms {', '.join(protocol.arms)}; "
          f"run folder {out}", flush=True)
    with _executor(args) as executor, warnings.catch_warnings():
        warnings.simplefilter("always", CodeChangedWarning)
        warnings.showwarning = _show_warning  # one line, restored by catch_warnings
        trial = ClinicalTrial(protocol, executor=executor, patients_per_unit=args.patients_per_unit,
                              progress=not args.no_progress)
        results = trial.run(out=out)
    from analysis.tables import format_tables

    print(format_tables(results, protocol=protocol.to_dict()))
    print(f"\nresults: {out / 'results.csv'}   report: virtualpatient report {out}")
    return 0


class _executor:
    """Context manager giving ``None`` (in-process) or a Dask executor, closed on exit."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.client, self.cluster = args, None, None

    def __enter__(self):
        if self.args.workers is None and self.args.scheduler is None:
            return None
        from virtualpatient.distributed import connect

        self.client, self.cluster = connect(workers=self.args.workers, scheduler=self.args.scheduler)
        # pure=False: Dask would otherwise treat calls with equal arguments as one cached result
        return self.client.get_executor(pure=False)

    def __exit__(self, *exc) -> None:
        from virtualpatient.distributed import close

        if self.client is not None or self.cluster is not None:
            close(self.client, self.cluster)


def _report(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    if not (args.run_dir / "results.csv").is_file():
        return _fail(f"{args.run_dir}: no results.csv (not a finished run folder)")
    path = write_report(args.run_dir)
    print(f"report written: {path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``virtualpatient`` console script; returns the exit status."""
    from virtualpatient.distributed import DistributedError
    from virtualpatient.protocol import ProtocolError
    from virtualpatient.store import RunStoreError
    from virtualpatient.trial import TrainingDivergedError

    args = _parser().parse_args(argv)
    try:
        if args.command == "reproduce":
            return _reproduce(args)
        return _report(args)
    except ProtocolError as exc:
        return _fail(str(exc).replace("\n", "; "))
    except (RunStoreError, TrainingDivergedError, DistributedError) as exc:
        return _fail(str(exc).replace("\n", "; "))
    except KeyboardInterrupt:
        return _fail("interrupted; finished units are kept, run the same command again to resume")


if __name__ == "__main__":
    sys.exit(main())
