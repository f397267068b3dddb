"""Run units of work beside this process: a local process pool, or a Dask cluster.

:func:`local_pool` is the command's default on a machine with several cores: a standard-library
:class:`~concurrent.futures.ProcessPoolExecutor` of spawned single-threaded workers (processes, not
threads: two one-thread processes beat one two-thread process here, ``docs/performance.md``), and
:func:`stop_pool` ends it, at once after an interruption.

For clusters, Dask (optional: ``pip install -e '.[dask]'``): :func:`connect` starts a local
cluster of one-thread worker processes on loopback, or connects to a running scheduler;
:class:`~virtualpatient.trial.ClinicalTrial` then submits its units through Dask's own executor
interface, ``client.get_executor(pure=False)`` (``pure=False`` because Dask would otherwise cache
calls with equal arguments). Units travel as plain data: the resolved protocol as a dict, patients'
state dicts in, tidy rows and state dicts out; never modules.

Dask is imported only here, and only when this module's functions are called, so the library and
its default in-process run do not need it.

Worker processes are *spawned*: a script that starts a cluster must guard its entry point with
``if __name__ == "__main__":`` (the ``virtualpatient`` command already does).

Examples
--------
>>> from virtualpatient import ClinicalTrial, load_study
>>> from virtualpatient.distributed import connect
>>> if __name__ == "__main__":                                   # doctest: +SKIP
...     client, cluster = connect(workers=2)
...     try:
...         trial = ClinicalTrial(load_study("studies/quick.toml"),
...                               executor=client.get_executor(pure=False), patients_per_unit=1)
...         results = trial.run(out="runs/quick")
...     finally:
...         close(client, cluster)
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor

from virtualpatient.errors import VirtualPatientError

__all__ = ["DistributedError", "close", "connect", "default_workers", "local_pool", "stop_pool",
           "torch_threads_plugin"]

INSTALL_HINT = "install the dask extra: pip install -e '.[dask]'"


class DistributedError(VirtualPatientError, RuntimeError):
    """The Dask backend cannot be used (not installed, scheduler unreachable, bad arguments)."""


def default_workers() -> int:
    """The cores this process may run on (its CPU affinity), the command's default ``--workers``."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def local_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of ``workers`` spawned worker processes with one torch thread each.

    Examples
    --------
    >>> pool = local_pool(2)
    >>> pool.submit(sum, [1, 2]).result()
    3
    >>> stop_pool(pool)
    """
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    return ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=_one_thread)


def stop_pool(pool: ProcessPoolExecutor, interrupted: bool = False) -> None:
    """Shut a :func:`local_pool` down; after an interruption, end its workers at once.

    Without ``interrupted`` it waits for the units in flight. With it, queued units are cancelled
    and the workers are terminated (their units are lost; finished units are already stored).
    """
    if not interrupted:
        pool.shutdown(wait=True)
        return
    processes = list(getattr(pool, "_processes", {}).values())  # no public way to end them before 3.14
    pool.shutdown(wait=False, cancel_futures=True)
    for process in processes:
        if process.is_alive():
            process.terminate()
    for process in processes:
        process.join(timeout=10)


def _import_distributed():
    try:
        import distributed
    except ImportError:
        raise DistributedError(f"Dask is not installed; {INSTALL_HINT}") from None
    return distributed


def _torch_threads_plugin(distributed):
    class TorchThreads(distributed.WorkerPlugin):
        """Give each worker process as many torch threads as it has task threads (1 by default).

        Without it a worker's torch would use every core while its siblings do the same.
        """

        name = "virtualpatient-torch-threads"

        def setup(self, worker) -> None:
            import torch

            torch.set_num_threads(max(1, int(worker.state.nthreads)))

    return TorchThreads


def torch_threads_plugin():
    """A worker plugin that sets each worker's torch threads to its task threads (register it with
    ``client.register_plugin``; :func:`connect` does)."""
    return _torch_threads_plugin(_import_distributed())()


def connect(workers: int | None = None, scheduler: str | None = None, *, timeout: float = 30.0):
    """A Dask client: on a new local cluster of ``workers`` processes, or on ``scheduler``.

    Parameters
    ----------
    workers
        Start a :class:`distributed.LocalCluster` of this many worker processes with one thread
        each, listening on 127.0.0.1 only (scheduler, workers and dashboard).
    scheduler
        Address of a running scheduler, e.g. ``"tcp://10.0.0.5:8786"``. Its workers need this
        package installed (same version) and should run with ``--nthreads 1``.
    timeout
        Seconds to wait for the scheduler.

    Returns
    -------
    (client, cluster)
        ``cluster`` is the local cluster, or ``None`` when connecting to ``scheduler``. Close both
        with :func:`close`.

    Raises
    ------
    DistributedError
        Dask is not installed, the arguments are inconsistent, or the scheduler cannot be reached.
    """
    if (workers is None) == (scheduler is None):
        raise DistributedError("give either --workers N (a local cluster) or --scheduler ADDRESS, not both")
    if workers is not None and workers < 1:
        raise DistributedError(f"--workers must be >= 1, got {workers}")
    distributed = _import_distributed()
    cluster = client = None
    try:
        if workers is not None:
            cluster = distributed.LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, host="127.0.0.1",
                dashboard_address="127.0.0.1:0", worker_dashboard_address=None,
                # a failed unit reaches the driver as its own exception (one line from the command);
                # the workers' log copies of it would only repeat it with a traceback
                silence_logs=logging.CRITICAL,
            )
            client = distributed.Client(cluster, timeout=timeout)
        else:
            client = distributed.Client(scheduler, timeout=timeout)
        client.register_plugin(torch_threads_plugin())
    except (OSError, TimeoutError, ValueError) as exc:
        close(client, cluster)
        where = f"the Dask scheduler at {scheduler}" if scheduler else f"a local Dask cluster of {workers} workers"
        raise DistributedError(f"cannot start or reach {where} ({type(exc).__name__}: {exc})") from None
    except BaseException:
        close(client, cluster)
        raise
    return client, cluster


def close(client, cluster) -> None:
    """Close a client and its local cluster (either may be ``None``)."""
    if client is not None:
        client.close()
    if cluster is not None:
        cluster.close()
