"""The Dask backend: same results as the in-process run, loopback only, one torch thread per worker.

A local cluster of two worker processes (one thread each) is started on 127.0.0.1 through
:func:`virtualpatient.distributed.connect`, the same call the ``--workers`` option makes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from urllib.parse import urlparse

import pandas as pd
import pytest

from virtualpatient import ClinicalTrial, load_study
from virtualpatient.cli import main

TINY = """
name = "tiny_dask"
seed = 21
n_patients = 3

[network]
layer_sizes = [2, 24, 24, 16, 4]

[task]
n_train = 256
n_standard = 128
n_clean = 32

[baseline]
epochs = 3

[cohort]
prune_fraction = {kind = "uniform", low = 0.85, high = 0.98}

[longitudinal]
durations = [2, 4]
washout_steps = 5

[arms.ketamine]
epochs = 2
score_batches = 2

[arms.ssri]
epochs = 3

[arms.neurosteroid]
epochs = 2
"""


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study") / "tiny.toml"
    path.write_text(TINY)
    return path


@pytest.fixture(scope="module")
def in_process(study, tmp_path_factory) -> tuple[pd.DataFrame, Path]:
    """The reference: the same study run in this process (results table and run folder)."""
    out = tmp_path_factory.mktemp("inproc") / "run"
    return ClinicalTrial(load_study(study), patients_per_unit=1, progress=False).run(out=out), out


@pytest.fixture(scope="module")
def cluster():
    pytest.importorskip("distributed")
    from virtualpatient.distributed import close, connect

    client, local = connect(workers=2)
    yield client, local
    close(client, local)


def test_cluster_is_loopback_with_one_torch_thread_per_worker(cluster):
    """Scheduler, workers and dashboard listen on 127.0.0.1; each worker process has one task
    thread and one torch thread."""
    client, _ = cluster
    info = client.scheduler_info()
    assert urlparse(info["address"]).hostname == "127.0.0.1"
    assert len(info["workers"]) == 2
    assert all(urlparse(addr).hostname == "127.0.0.1" for addr in info["workers"])
    assert all(w["nthreads"] == 1 for w in info["workers"].values())
    if client.dashboard_link:
        assert urlparse(client.dashboard_link).hostname == "127.0.0.1"

    def torch_threads() -> int:
        import torch

        return torch.get_num_threads()

    assert set(client.run(torch_threads).values()) == {1}
    assert len(set(client.run(lambda: __import__("os").getpid()).values())) == 2  # two processes


def test_dask_executor_matches_in_process(cluster, study, in_process, tmp_path):
    """A run through ``client.get_executor(pure=False)`` gives exactly the in-process results table
    (per-patient random streams make results independent of worker, order and thread count), and
    the same results.csv."""
    client, _ = cluster
    out = tmp_path / "run"
    trial = ClinicalTrial(load_study(study), executor=client.get_executor(pure=False), patients_per_unit=1,
                          progress=False)
    frame = trial.run(out=out)
    pd.testing.assert_frame_equal(frame, in_process[0], check_exact=True)
    assert (out / "results.csv").read_bytes() == (in_process[1] / "results.csv").read_bytes()
    assert sorted(p.name for p in (out / "units" / "ketamine").iterdir()) == [f"p{i:04d}.json" for i in range(3)]


def test_cli_workers_option_uses_the_dask_executor(cluster, study, in_process, tmp_path, monkeypatch, capsys):
    """``reproduce --dask --workers N`` runs its units on the cluster from ``connect`` and writes the same
    results.csv as the in-process run (here ``connect`` hands back the test's cluster)."""
    import virtualpatient.distributed as vd

    client, _ = cluster
    calls = []

    class Borrowed:  # the test's client, which the command must not close
        def __getattr__(self, name):
            return getattr(client, name)

        def close(self):
            calls.append("close")

    def fake_connect(workers=None, scheduler=None):
        calls.append((workers, scheduler))
        return Borrowed(), None

    monkeypatch.setattr(vd, "connect", fake_connect)
    submitted = []
    real_submit = type(client.get_executor(pure=False)).submit

    def spy(self, fn, *args, **kwargs):
        submitted.append(fn.__name__)
        return real_submit(self, fn, *args, **kwargs)

    monkeypatch.setattr(type(client.get_executor(pure=False)), "submit", spy)
    out = tmp_path / "run"
    status = main(["reproduce", "--study", str(study), "--out", str(out), "--patients-per-unit", "1",
                   "--dask", "--workers", "2", "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert calls == [(2, None), "close"]
    assert submitted.count("_baseline_payloads") == 3 and submitted.count("_arm_payloads") == 9
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv"), pd.read_csv(in_process[1] / "results.csv"),
                                  check_exact=True)


def test_missing_dask_gives_install_hint(monkeypatch, tmp_path, study, capsys):
    """Without Dask, ``--dask`` ends with exit 2 and one line telling how to install the extra."""
    monkeypatch.setitem(sys.modules, "distributed", None)  # makes `import distributed` fail
    status = main(["reproduce", "--study", str(study), "--out", str(tmp_path / "run"), "--dask", "--workers", "2",
                   "--no-progress"])
    assert status == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line == "virtualpatient: error: Dask is not installed; install the dask extra: pip install -e '.[dask]'"
    assert not (tmp_path / "run").exists()


def test_connect_rejects_inconsistent_arguments():
    """connect() needs exactly one of workers / scheduler, and workers >= 1."""
    from virtualpatient.distributed import DistributedError, connect

    with pytest.raises(DistributedError, match="either"):
        connect()
    with pytest.raises(DistributedError, match="either"):
        connect(workers=2, scheduler="tcp://127.0.0.1:8786")
    with pytest.raises(DistributedError, match=">= 1"):
        connect(workers=0)


def test_cli_default_process_pool_equals_in_process(study, in_process, tmp_path, capsys):
    """``reproduce --workers 2`` (the standard-library process pool, no Dask) writes the same
    results.csv as the in-process run, byte for byte."""
    out = tmp_path / "run"
    status = main(["reproduce", "--study", str(study), "--out", str(out), "--workers", "2", "--no-progress"])
    assert status == 0, capsys.readouterr().err
    assert (out / "results.csv").read_bytes() == (in_process[1] / "results.csv").read_bytes()


def test_local_pool_stops_its_workers_at_once_when_interrupted():
    """After an interruption stop_pool ends running workers without waiting for their units."""
    import time

    from virtualpatient.distributed import local_pool, stop_pool

    pool = local_pool(1)
    pool.submit(time.sleep, 60)
    time.sleep(0.5)
    start = time.monotonic()
    stop_pool(pool, interrupted=True)
    assert time.monotonic() - start < 15


def test_engine_settings_travel_with_the_units(study, tmp_path):
    """The driver's engine settings reach a worker process as a value: under engine_options with a
    one-network evaluation budget, the pool's units evaluate in groups of one (and still give the
    in-process numbers), and the worker's own module state is never patched."""
    from virtualpatient.distributed import local_pool, stop_pool
    from virtualpatient.engine import settings

    seen = []
    pool = local_pool(1)
    real_submit = pool.submit

    def spy(fn, *args):
        if fn.__name__.endswith("_payloads"):
            seen.append(args[-1])
        return real_submit(fn, *args)

    pool.submit = spy
    try:
        with settings.engine_options(eval_max_bytes=1):
            frame = ClinicalTrial(load_study(study), executor=pool, patients_per_unit=3, progress=False).run()
        later = pool.submit(settings.eval_group_size, 1, [1]).result()  # ENGINE.eval_max_bytes // 4 there
    finally:
        stop_pool(pool)
    assert seen and all(engine["eval_max_bytes"] == 1 for engine in seen)
    assert later == settings.EngineConfig().eval_max_bytes // 4
    reference = ClinicalTrial(load_study(study), patients_per_unit=3, progress=False).run()
    pd.testing.assert_frame_equal(frame, reference, check_exact=False, rtol=1e-6, atol=1e-6)


def test_unit_size_never_follows_the_core_count(study, tmp_path, monkeypatch, capsys):
    """The default unit holds trial.UNIT_PATIENTS patients (all when fewer), with or without a pool
    and for any --workers: batching changes the last bits of the numbers, so a unit size taken from
    the machine's cores would make results.csv depend on the machine."""
    from virtualpatient import trial as trial_module
    from virtualpatient.protocol import Protocol

    twelve = ClinicalTrial(Protocol().replace(n_patients=12), progress=False)
    assert twelve.patients_per_unit == trial_module.UNIT_PATIENTS
    assert ClinicalTrial(Protocol().replace(n_patients=3), progress=False).patients_per_unit == 3
    seen = []
    real_run = trial_module.ClinicalTrial.run
    monkeypatch.setattr(trial_module.ClinicalTrial, "run", lambda self, out=None: seen.append(self.patients_per_unit)
                        or real_run(self, out))
    for workers in ("1", "2"):
        assert main(["reproduce", "--study", str(study), "--out", str(tmp_path / workers), "--workers", workers,
                     "--no-progress"]) == 0
    capsys.readouterr()
    assert len(seen) == 2 and seen[0] == seen[1]


def test_arm_units_go_out_regimen_by_regimen_as_workers_free(study, in_process):
    """Arm units wait in the driver and go to the pool only while it has a free worker, the first
    regimen's units before the next one's (a pool runs what it is given in order, so a long
    regimen's last unit no longer runs alone at the end); the results equal the in-process run."""
    from concurrent.futures import ThreadPoolExecutor

    submitted, in_flight, most = [], [0], [0]

    class OneWorker(ThreadPoolExecutor):
        def submit(self, fn, *args):
            in_flight[0] += 1
            most[0] = max(most[0], in_flight[0])
            if fn.__name__ == "_arm_payloads":
                submitted.append((args[1], args[2][0]["state"]["specs"][0]["index"]))
            future = super().submit(fn, *args)
            future.add_done_callback(lambda _: in_flight.__setitem__(0, in_flight[0] - 1))
            return future

    with OneWorker(max_workers=1) as pool:
        frame = ClinicalTrial(load_study(study), executor=pool, patients_per_unit=1, progress=False).run()
    arms = list(load_study(study).arms)
    assert submitted == sorted(submitted, key=lambda unit: (arms.index(unit[0]), unit[1]))
    assert len(submitted) == 3 * len(arms) and most[0] <= 3  # the three spine units, then one at a time
    pd.testing.assert_frame_equal(frame, in_process[0])
