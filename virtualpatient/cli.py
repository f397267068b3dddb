"""The ``virtualpatient`` command.

``virtualpatient reproduce`` runs a study (default: the paper's) into a run folder, resuming what a
previous run on the same folder finished, and prints Tables 1-4 beside the published values.
``virtualpatient report RUN_DIR`` rebuilds the reproduction report from a run folder's data alone.

Every expected failure (bad study file, flag or environment setting, unwritable or foreign run
folder, damaged result file, diverged training, a run too large for the machine) ends with exit
status 2 and one line on standard error that names the file, field or flag at fault. Anything else
is a bug: one line with the path of a log file holding the traceback, exit status 1. SIGINT and
SIGTERM, at any moment, end with one line; finished units stay and the same command resumes.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
import traceback
import warnings
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from virtualpatient.errors import UsageError, VirtualPatientError
from virtualpatient.limits import MAX_PATIENTS, MAX_SEED, MAX_WORKERS

__all__ = ["main"]


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line too (exit status 2)."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"virtualpatient: error: {message} (see {self.prog} --help)\n")


#: Largest --cohort-draws: 10,000 draws of the paper's claims would take over an hour per size.
MAX_COHORT_DRAWS = 10_000


def _bounded(low: int, high: int):
    """An argparse type: an integer in ``[low, high]`` (argparse names the flag in its message)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must lie in [{low}, {high}], got {value}")
        return value

    parse.__name__ = "int"
    return parse


def _run_options(cmd: argparse.ArgumentParser) -> None:
    """The options of every command that runs a study."""
    cmd.add_argument("--patients", type=_bounded(1, MAX_PATIENTS), help="number of patients (overrides the study)")
    cmd.add_argument("--seed", type=_bounded(0, MAX_SEED), help="study seed (overrides the study)")
    cmd.add_argument("--out", type=Path, help="run folder (default: runs/<study>-<protocol hash>)")
    cmd.add_argument("--patients-per-unit", type=_bounded(1, MAX_PATIENTS),
                     help="patients trained together in one unit")
    cmd.add_argument("--device", choices=["cpu", "cuda"], help="where tensors live (overrides the study)")
    cmd.add_argument("--workers", type=_bounded(1, MAX_WORKERS),
                     help="worker processes, one torch thread each (default: one per core; 1 runs in this "
                          "process with torch's own threads)")
    dask = cmd.add_mutually_exclusive_group()
    dask.add_argument("--dask", action="store_true",
                      help="run the --workers on a local Dask cluster instead of a process pool (dask extra)")
    dask.add_argument("--scheduler", help="run units on the Dask cluster at this address, e.g. tcp://host:8786")
    cmd.add_argument("--yes", action="store_true",
                     help="run even if the estimated peak memory exceeds the memory available, or a sweep has "
                          "more levels than the limit")
    cmd.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="virtualpatient", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    rep = sub.add_parser("reproduce", help="run a study and print the paper's tables beside ours")
    rep.add_argument("--study", type=Path, help="TOML study file (default: the paper's protocol)")
    _run_options(rep)

    run = sub.add_parser("run", help="run any study (sweeps and replications too) and print a per-arm summary")
    run.add_argument("study", type=Path, help="TOML study file")
    _run_options(run)

    report = sub.add_parser("report", help="write report.md/report.html from a run folder")
    report.add_argument("run_dir", type=Path)
    report.add_argument("--cohort-draws", type=_bounded(0, MAX_COHORT_DRAWS), default=20, metavar="N",
                        help="replication: draw N cohorts at each size to find the smallest cohort size at which "
                             "each claim holds in 80%% of them (default 20; 0: not computed)")
    report.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def _fail(message: str) -> int:
    print(f"virtualpatient: error: {message}", file=sys.stderr)
    return 2


class _OneLineWarnings:
    """``warnings.showwarning`` for the command line: each distinct message once, on one line (a
    sweep opens a level's folder twice, and would say the same thing twice)."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def __call__(self, message, category, filename, lineno, file=None, line=None) -> None:
        if str(message) not in self.seen:
            self.seen.add(str(message))
            print(f"virtualpatient: warning: {message}", file=sys.stderr)


def _import_torch() -> None:
    """Import torch with SIGINT and SIGTERM held back. A signal that lands inside torch's native
    initialisation can abort the process (seen: SIGABRT, exit -6); held, it is delivered right
    after the import as an ordinary interruption, which ends in one line."""
    if threading.current_thread() is not threading.main_thread():
        import torch  # noqa: F401
        return
    held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
    try:
        import torch  # noqa: F401
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, held)


def _plan(args: argparse.Namespace):
    """The study file (or the paper's protocol) with the command line's overrides, validated."""
    _import_torch()
    from virtualpatient.protocol import Protocol
    from virtualpatient.sweeps import Plan, load_plan

    overrides = {}
    if args.patients is not None:
        overrides["n_patients"] = args.patients
    if args.seed is not None:
        overrides["seed"] = args.seed
    if args.device is not None:
        overrides["device"] = args.device
    if args.study is not None:
        return load_plan(args.study, **overrides)
    return Plan(Protocol.from_dict(overrides, source="command line"), None, "command line")


def _execute(args: argparse.Namespace, plan):
    """Size, announce and run a plan's levels; return the results table and the run folder."""
    from virtualpatient import limits
    from virtualpatient.distributed import default_workers
    from virtualpatient.engine import native
    from virtualpatient.store import CodeChangedWarning
    from virtualpatient.sweeps import reused_spine_epochs, run_sweep
    from virtualpatient.trial import ClinicalTrial

    native.sparse_setting()  # a bad environment switch is refused before any work
    protocol = plan.protocol
    if protocol.device == "cuda":
        _check_cuda("--device cuda" if args.device else f"{args.study or 'the protocol'}: device")
    levels = plan.levels(max_levels=None if args.yes else limits.MAX_LEVELS)

    reused = reused_spine_epochs(levels)
    speed = limits.measured_speed()

    def sized(workers: int, per_unit: int | None) -> limits.Estimate:
        parts = []
        for level, shared in zip(levels, reused, strict=True):
            trial = ClinicalTrial(level.protocol, patients_per_unit=per_unit, progress=False)
            epochs = trial.epochs_per_patient()
            epochs["baseline"] -= shared
            parts.append(limits.estimate(level.protocol, epochs, trial.patients_per_unit, workers, speed=speed))
        return limits.Estimate(max(p.memory_bytes for p in parts), parts[0].available_bytes,
                               sum(p.seconds for p in parts), parts[0].workers, flops=sum(p.flops for p in parts),
                               measured=speed is not None)

    if args.scheduler is None and args.workers is None:
        # a run estimated under a minute stays in this process: starting workers costs seconds each
        args.workers = 1 if sized(1, args.patients_per_unit).seconds < 60 else default_workers()
    # None: ClinicalTrial's fixed default (trial.UNIT_PATIENTS), never a size from the core count,
    # which would make the numbers depend on the machine
    per_unit = args.patients_per_unit
    est = sized(args.workers or 1, per_unit)
    if est.worth_saying or not est.fits:
        print(f"estimate: {est.describe()}", flush=True)
    if not est.fits and not args.yes:
        raise UsageError(f"this run would need more memory than is available ({est.describe()}); "
                         "lower --patients-per-unit or --patients, or pass --yes to try anyway")
    out = args.out or Path("runs") / f"{protocol.name}-{protocol.hash()[:8]}"
    sweep = "" if plan.sweep is None else f"; {len(levels)} levels"
    arms = protocol.regimens or protocol.arms  # a schedule's regimens are its results' arms
    print(f"study {protocol.name}: {protocol.n_patients} patients, arms {', '.join(arms)}{sweep}; "
          f"run folder {out}", flush=True)
    # a run from scratch on this machine's own workers tells the next estimate how fast it is
    fresh = args.scheduler is None and not (Path(out) / "manifest.json").exists()
    started = time.monotonic()
    with _executor(args) as executor, warnings.catch_warnings():
        warnings.simplefilter("always", CodeChangedWarning)
        warnings.showwarning = _OneLineWarnings()  # restored by catch_warnings
        if plan.sweep is None:
            trial = ClinicalTrial(protocol, executor=executor, patients_per_unit=per_unit,
                                  progress=not args.no_progress)
            results = trial.run(out=out)
        else:
            results = run_sweep(plan, out, executor=executor, patients_per_unit=per_unit,
                                progress=not args.no_progress, levels=levels)
    if fresh:
        limits.record_speed(est, time.monotonic() - started)
    return results, out


def _reproduce(args: argparse.Namespace) -> int:
    plan = _plan(args)
    if plan.sweep is not None:
        raise UsageError(f"{args.study}: has a [sweep] table; run it with 'virtualpatient run {args.study}'")
    results, out = _execute(args, plan)
    from analysis.tables import format_tables

    print(format_tables(results, protocol=plan.protocol.to_dict()))
    print(f"\nresults: {out / 'results.csv'}   report: virtualpatient report {out}")
    return 0


def _run(args: argparse.Namespace) -> int:
    plan = _plan(args)
    results, out = _execute(args, plan)
    swept = list(plan.sweep.fields) if plan.sweep is not None else []
    if plan.sweep is not None and plan.sweep.cohorts > 1:
        swept.append("cohort")
    print(per_arm_summary(results, swept))
    print(f"\nresults: {out / 'results.csv'}   report: virtualpatient report {out}")
    return 0


def per_arm_summary(results, by: list[str] | tuple[str, ...] = ()) -> str:
    """A short text table: per arm (and swept level), patients, the mean accuracy per test condition
    at the arm's headline assessment (``schema.HEADLINE_PHASES``: acute for a treated arm, pruned for
    the untreated; else the arm's first assessment, named in the ``phase`` column), and the share
    relapsed."""
    import pandas as pd

    from virtualpatient.schema import HEADLINE_PHASES

    keys = [*by, "arm"]
    if by:  # a field a level leaves at the study's value (mode "each") is NaN there; show "-", keep the row
        results = results.assign(**{c: results[c].astype(object).where(results[c].notna(), "-") for c in by})
    plain = results[results["step"].isna() & results["maintenance_epochs"].isna() & (results["metric"] == "accuracy")]
    headline = {arm: next((p for p in HEADLINE_PHASES if p in set(phases)), phases[0])
                for arm, phases in plain.groupby("arm", sort=False)["phase"].unique().items()}
    plain = plain[plain["phase"] == plain["arm"].map(headline)]
    table = plain.pivot_table(index=keys, columns="condition", values="value", aggfunc="mean", sort=False)
    table.insert(0, "patients", results.groupby(keys, sort=False)["patient"].nunique())
    table.insert(1, "phase", [headline[arm] for arm in table.index.get_level_values("arm")])
    relapsed = results[results["metric"] == "relapsed"]
    if "label" in relapsed and relapsed["label"].nunique() > 1:  # several wash-outs: one column each
        for label, rows in relapsed.groupby("label", sort=False):
            table[f"relapsed % {str(label).removesuffix('/washout')}"] = \
                rows.groupby(keys, sort=False)["value"].mean() * 100
    elif not relapsed.empty:
        table["relapsed %"] = relapsed.groupby(keys, sort=False)["value"].mean() * 100
    with pd.option_context("display.width", 200, "display.max_columns", 30, "display.max_rows", 1000):
        return table.round(1).to_string()


def _check_cuda(source: str) -> None:
    import torch

    if not torch.cuda.is_available():
        why = "this torch is built without CUDA" if torch.version.cuda is None else "no CUDA device is visible"
        raise UsageError(f"{source}: cuda was asked for, but {why}; use --device cpu")


class _executor:
    """Context manager giving where units run: ``None`` (in this process), a local process pool, or a
    Dask executor; closed on exit, and a pool's workers ended at once if the run was interrupted."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args, self.client, self.cluster, self.pool = args, None, None, None

    def __enter__(self):
        args = self.args
        if args.scheduler is None and not args.dask:
            if args.workers == 1:
                return None
            from virtualpatient.distributed import local_pool

            self.pool = local_pool(args.workers)
            return self.pool
        from virtualpatient.distributed import connect

        self.client, self.cluster = connect(workers=None if args.scheduler else args.workers,
                                            scheduler=args.scheduler)
        # pure=False: Dask would otherwise treat calls with equal arguments as one cached result
        return self.client.get_executor(pure=False)

    def __exit__(self, kind, exc, tb) -> None:
        from virtualpatient.distributed import close, stop_pool

        if self.pool is not None:
            stop_pool(self.pool, interrupted=kind is not None)
        if self.client is not None or self.cluster is not None:
            close(self.client, self.cluster)


def _report(args: argparse.Namespace) -> int:
    from analysis.report import unfinished_sweep, write_report
    from virtualpatient.schema import LEVELS_FILE

    if not (args.run_dir / "results.csv").is_file() and not (args.run_dir / LEVELS_FILE).is_file():
        return _fail(f"{args.run_dir}: no results.csv (not a finished run folder)")
    progress = unfinished_sweep(args.run_dir)
    bars = []

    def advance(n: int) -> None:  # the bar appears with the first drawn cohort: only a replication has any
        if not bars:
            from tqdm import tqdm

            bars.append(tqdm(total=_cohort_draw_total(args.run_dir, args.cohort_draws), unit="cohort",
                             desc="smallest cohort size", leave=False))
        bars[0].update(n)

    try:
        path = write_report(args.run_dir, cohort_draws=args.cohort_draws,
                            progress=None if args.no_progress else advance)
    finally:
        for bar in bars:
            bar.close()
    unfinished = "" if progress is None or progress[0] == progress[1] else \
        f" (an unfinished sweep: its {progress[0]} finished levels of {progress[1]})"
    print(f"report written: {path}{unfinished}")
    return 0


def _cohort_draw_total(run_dir: Path, draws: int) -> int | None:
    """How many cohorts ``--cohort-draws`` will decide (for the bar), or ``None`` if unknown."""
    import pandas as pd

    from analysis.report import cohort_sizes

    try:
        ids = pd.read_csv(run_dir / "results.csv", usecols=["cohort", "patient"]).drop_duplicates()
    except (OSError, ValueError):
        return None
    return draws * len(cohort_sizes(len(ids)))


class _Terminated(BaseException):
    """Raised in the main thread by SIGTERM, so it unwinds like Ctrl-C (locks released, tmp files removed)."""


def _on_sigterm(signum, frame) -> None:
    raise _Terminated


def _crash_log(exc: BaseException) -> str:
    """Write the traceback of an unexpected exception to a new log file; return its path."""
    fd, path = tempfile.mkstemp(prefix=f"virtualpatient-{time.strftime('%Y%m%d-%H%M%S')}-", suffix=".log")
    with open(fd, "w") as fh:
        fh.write(f"virtualpatient {' '.join(sys.argv[1:])}\n\n")
        traceback.print_exception(exc, file=fh)
    return path


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) if str(exc).strip() else type(exc).__name__


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``virtualpatient`` console script; returns the exit status.

    Exit status 0 on success, 2 for every expected failure and for an interruption (one line on
    standard error each), 1 for a bug (one line naming a log file with the traceback).
    """
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _on_sigterm) if in_main_thread else None
    try:
        args = _parser().parse_args(argv)
        return {"reproduce": _reproduce, "run": _run, "report": _report}[args.command](args)
    except VirtualPatientError as exc:
        return _fail(_one_line(exc))
    except (KeyboardInterrupt, _Terminated) as exc:
        which = "SIGTERM" if isinstance(exc, _Terminated) else "SIGINT"
        return _fail(f"interrupted ({which}); finished units are kept, run the same command again to resume")
    except BrokenProcessPool:
        return _fail("a worker process died (killed, or out of memory); finished units are kept, run the same "
                     "command again to resume, with fewer --workers or a smaller --patients-per-unit")
    except MemoryError:
        return _fail("out of memory; lower --patients-per-unit or --patients (finished units are kept)")
    except Exception as exc:  # noqa: BLE001 - the one place a bug becomes one line and a log file
        try:
            where = f"traceback in {_crash_log(exc)}"
        except OSError:
            where = "no log file could be written"
        print(f"virtualpatient: internal error: {type(exc).__name__}: {_one_line(exc)[:200]} ({where}; "
              "please report it)", file=sys.stderr)
        return 1
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
