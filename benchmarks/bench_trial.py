"""Engine vs. the plain per-patient reference loop on one reduced protocol, plus the engine's scaling.

Runs ``benchmarks/reference_loop.py`` (one patient at a time, ``nn.Module``, ``DataLoader``,
``torch.optim.Adam``, a separate maintenance run per duration) and the engine
(``ClinicalTrial``: batched patients, nested maintenance, compressed sparse layers) on the same
reduced protocol, each in a fresh process (so each peak RSS is its own), checks that their results
agree, and prints wall time, patient-epochs per second, peak memory and the speed-up. Then it
times the engine per patient-epoch at P = 1, 10 and 50 patients at full size (12,000 points,
batches of 128) for a 95 %-sparse network (maintenance of the SSRI-like and neurosteroid-like
arms) and a 47.5 %-sparse one (ketamine-like).

The output format is stable (one ``key  value ...`` line per fact) so runs can be compared across
commits; the last line is exactly ``speedup <ratio>x``.

    python benchmarks/bench_trial.py              # about 2 minutes (the reference takes one)
    python benchmarks/bench_trial.py --no-scaling --patients 1
    # each as it is meant to run on 2 cores: the plain loop with torch's default threads, the
    # engine in two single-threaded worker processes (started and set up before the clock, as the
    # reference's imports are not timed)
    python benchmarks/bench_trial.py --patients 4 --reference-threads 2 --engine-workers 2 --no-scaling
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

#: The reduced protocol: the paper's network, batch size and arms, with the full study's proportions
#: of work at about 1/30 of its size: every epoch count divided by 12.5 (maintenance 2..24 keeps the
#: ratios 25:50:100:150:200:300), the training set by 6, and the evaluation work (test-set size x
#: wash-out steps) cut so that it keeps its full-study share of the total (about 1/8 of the
#: reference's sample passes).
REDUCED = {
    "name": "bench_reduced",
    "seed": 0,
    "n_patients": 3,
    "task": {"n_train": 2000, "n_standard": 350, "n_clean": 175},
    "baseline": {"epochs": 2},
    "longitudinal": {"durations": (2, 4, 8, 12, 16, 24), "washout_steps": 5},
    "arms": {
        "ketamine": {"epochs": 1},
        "ssri": {"epochs": 8},
        "neurosteroid": {"epochs": 1},
    },
}

KEY = ["patient", "arm", "phase", "metric", "condition", "noise_sigma", "maintenance_epochs", "step"]

#: Agreement limits. Accuracies are counts over the test set, so one flipped prediction among 350
#: points moves a value by 0.29; the reference and the engine add the same numbers in other orders
#: (dense vs. compressed products, Adam kernels, the engine's tanh), which can flip a borderline
#: prediction now and then.
TOLERANCE = {"accuracy": 1.0, "activation_magnitude": 1e-4, "relapse_drop": 1.0}


#: Environment switches that cap the instruction set (to emulate an AVX2-only CPU on an AVX-512 one).
ISA_ENV = ("ONEDNN_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS", "VIRTUALPATIENT_MARCH")


def isa_line() -> str:
    """``isa avx512`` or ``isa avx2`` (the CPU's widest vector ISA), ``avx2 (emulated)`` when the
    CPU has AVX-512 but the switches cap oneDNN, ATen or the native kernels at AVX2; then the
    switches that are set, ATen's capability and the kernels' target."""
    from virtualpatient.engine import native

    flags = native._cpu_flags() or set()
    hardware = "avx512" if "avx512f" in flags else "avx2" if "avx2" in flags else "other"
    aten = torch.backends.cpu.get_cpu_capability().lower()
    target = native.kernel_target()
    capped = (aten.startswith("avx2") or os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper().startswith("AVX2")
              or os.environ.get("MKL_ENABLE_INSTRUCTIONS", "").upper().startswith("AVX2")
              or target in ("x86-64-v3", "x86-64-v2", "x86-64", "generic"))
    isa = "avx2 (emulated)" if hardware == "avx512" and capped else hardware
    env = " ".join(f"{k}={os.environ[k]}" for k in ISA_ENV if os.environ.get(k)) or "no ISA switches"
    return f"isa {isa}  [{env}; aten {aten}, kernels {target}]"


def _protocol(patients: int):
    from virtualpatient.protocol import Protocol

    data = dict(REDUCED, n_patients=patients)
    return Protocol.from_dict(data, source="bench_trial")


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _run_reference(patients: int, threads: int, queue) -> None:
    torch.set_num_threads(threads)
    import reference_loop

    protocol = _protocol(patients)
    start = time.perf_counter()
    rows = reference_loop.run_reference(protocol)
    wall = time.perf_counter() - start
    cfg = protocol.longitudinal
    epochs = protocol.baseline.epochs + sum(t.training_epochs() + sum(cfg.durations) for t in protocol.arms.values())
    queue.put({"rows": rows, "wall": wall, "patient_epochs": epochs * patients, "rss": _peak_rss_mib()})


def _worker_setup() -> None:
    """One torch thread; the imports and native kernels a unit needs, loaded before the clock starts
    (the reference's imports are not timed either)."""
    torch.set_num_threads(1)
    import virtualpatient.trial  # noqa: F401
    from virtualpatient.engine import native

    native.kernels_available()


def _started(seconds: float) -> None:
    time.sleep(seconds)


def _run_engine(patients: int, threads: int, workers: int, queue) -> None:
    torch.set_num_threads(threads)
    from concurrent.futures import ProcessPoolExecutor

    from virtualpatient import ClinicalTrial

    protocol = _protocol(patients)
    executor = None
    if workers > 1:  # single-threaded worker processes, each a share of the patients
        executor = ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_worker_setup)
        list(executor.map(_started, [0.5] * workers))  # every worker spawned and set up
    trial = ClinicalTrial(protocol, executor=executor, patients_per_unit=-(-patients // workers), progress=False)
    start = time.perf_counter()
    frame = trial.run(out=None)
    wall = time.perf_counter() - start
    if executor is not None:
        executor.shutdown()
    epochs = sum(trial.epochs_per_patient().values())
    queue.put({"rows": frame[[*KEY, "value"]].to_dict("records"), "wall": wall,
               "patient_epochs": epochs * patients, "rss": _peak_rss_mib()})


def _in_process(target, *args) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=target, args=(*args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _key(row: dict) -> tuple:
    out = []
    for k in KEY:
        v = row.get(k)
        if isinstance(v, float) and math.isnan(v):
            v = None
        elif isinstance(v, float) and v == int(v):
            v = int(v)
        out.append(v)
    return tuple(out)


def compare(reference: list[dict], engine: list[dict]) -> dict:
    """Match rows by key; the largest absolute difference overall and per metric, and misses."""
    ref = {_key(r): r["value"] for r in reference}
    eng = {_key(r): r["value"] for r in engine}
    common = ref.keys() & eng.keys()
    worst: dict[str, float] = {}
    for k in common:
        metric = k[3]
        worst[metric] = max(worst.get(metric, 0.0), abs(float(ref[k]) - float(eng[k])))
    over = [m for m, d in worst.items() if d > TOLERANCE.get(m, 1e-6)]
    return {"compared": len(common), "only_reference": len(ref.keys() - eng.keys()),
            "only_engine": len(eng.keys() - ref.keys()), "worst": worst, "over": over}


def scaling(patients: tuple[int, ...], threads: int) -> list[tuple[str, int, float]]:
    """Seconds per patient-epoch of the engine at full size for each P, 95 % and 47.5 % sparse."""
    torch.set_num_threads(threads)
    from virtualpatient import network, plasticity
    from virtualpatient.engine import batched
    from virtualpatient.network import Modulation
    from virtualpatient.protocol import Protocol

    stab = Protocol().stabiliser
    mod = Modulation(gain=1.6, protection=1.0)
    out = []
    for label, regrow in (("95%", False), ("47.5%", True)):
        for p in patients:
            gens = [torch.Generator().manual_seed(i) for i in range(p)]
            params = network.init_params((2, 512, 512, 256, 4), gens)
            plasticity.prune_per_layer(params, [0.95] * p)
            if regrow:  # reinstate a random half of the pruned positions (the ketamine-like density)
                for m in params.masks:
                    for i in range(p):
                        pruned = (m[i] == 0).nonzero()
                        pick = pruned[torch.randperm(len(pruned), generator=gens[i])[: len(pruned) // 2]]
                        m[i][pick[:, 0], pick[:, 1]] = 1.0
            x = torch.randn(p, 12_000, 2, generator=gens[0])
            y = torch.randint(0, 4, (p, 12_000), generator=gens[0])
            kw = dict(lr=1e-6, batch_size=128, schedule=lambda e: mod, stab=stab, shuffle=gens)
            batched.train(params, x[:, :512], y[:, :512], epochs=1, **kw)  # warm-up
            start = time.perf_counter()
            batched.train(params, x, y, epochs=1, **kw)
            out.append((label, p, (time.perf_counter() - start) / p))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=3, help="patients of the reduced protocol (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads for both (default 1)")
    parser.add_argument("--reference-threads", type=int,
                        help="torch threads of the reference only (default: --threads); e.g. 2, torch's default here")
    parser.add_argument("--engine-workers", type=int, default=1,
                        help="run the engine's units in N single-threaded processes (default 1: in-process)")
    parser.add_argument("--no-scaling", action="store_true", help="skip the P = 1/10/50 scaling line")
    parser.add_argument("--scaling-patients", default="1,10,50")
    args = parser.parse_args(argv)

    from virtualpatient.engine import native, ops

    protocol = _protocol(args.patients)
    cfg = protocol.longitudinal
    ref_threads = args.reference_threads or args.threads
    print(f"bench_trial   python {platform.python_version()}  torch {torch.__version__}  threads {args.threads}  "
          f"reference_threads {ref_threads}  engine_workers {args.engine_workers}  "
          f"cpus {os.cpu_count()}  sparse {native.backend('cpu')}  onednn {ops.onednn_available()}  "
          f"{isa_line()}")
    print(f"protocol      patients {args.patients}  layers {'-'.join(map(str, protocol.network.layer_sizes))}  "
          f"n_train {protocol.task.n_train}  n_standard {protocol.task.n_standard}  batch "
          f"{protocol.baseline.batch_size}  baseline {protocol.baseline.epochs}  "
          f"arms {'/'.join(f'{a}:{t.training_epochs()}' for a, t in protocol.arms.items())}  "
          f"durations {','.join(map(str, cfg.durations))}  washout_steps {cfg.washout_steps}")

    ref = _in_process(_run_reference, args.patients, ref_threads)
    eng = _in_process(_run_engine, args.patients, args.threads, args.engine_workers)
    for name, r in (("reference", ref), ("engine", eng)):
        print(f"{name:13s} wall {r['wall']:8.2f} s  patient-epochs {r['patient_epochs']:6d}  "
              f"patient-epochs/s {r['patient_epochs'] / r['wall']:8.2f}  peak_rss {r['rss']:7.0f} MiB")
    agree = compare(ref["rows"], eng["rows"])
    worst = "  ".join(f"{m} {d:.2e}" for m, d in sorted(agree["worst"].items()))
    print(f"agreement     rows {agree['compared']}  only_reference {agree['only_reference']}  "
          f"only_engine {agree['only_engine']}  max_abs_diff  {worst}")
    ok = not agree["over"] and not agree["only_reference"]
    verdict = "OK" if ok else "MISMATCH " + ",".join(agree["over"])
    limits = ", ".join(f"{k} {v}" for k, v in TOLERANCE.items())
    print(f"agreement     {verdict}  (limits: {limits}, others 1e-6)")

    if not args.no_scaling:
        sizes = tuple(int(s) for s in args.scaling_patients.split(","))
        results = scaling(sizes, args.threads)
        for label in ("95%", "47.5%"):
            line = "  ".join(f"P={p} {t:.4f}" for lab, p, t in results if lab == label)
            print(f"scaling       {label:6s} sparse, full size, s per patient-epoch:  {line}")
    print(f"speedup {ref['wall'] / eng['wall']:.1f}x")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
