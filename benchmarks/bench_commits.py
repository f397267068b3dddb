"""Engine time of two versions of the code on the same reduced protocol, interleaved: did a change slow it?

Each round runs the reduced protocol of ``bench_trial.py`` (the paper's network and arms at about
1/30 of the full study's work) once with each source tree, each in a fresh single-threaded process,
alternating which goes first, and reports the median wall time of each and their ratio. The
machines this project runs on are shared and noisy: only a ratio measured in one interleaved run
means anything.

    git worktree add /tmp/vp-base <earlier commit>
    python benchmarks/bench_commits.py --base /tmp/vp-base --rounds 5

The last line is exactly ``ratio <head/base>`` (below 1.05 means "no more than 5 % slower").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
sys.path.insert(1, sys.argv[1] + "/benchmarks")
import torch
torch.set_num_threads(1)
from bench_trial import REDUCED
from virtualpatient import ClinicalTrial, Protocol
protocol = Protocol.from_dict(dict(REDUCED, n_patients=int(sys.argv[2])))
start = time.perf_counter()
frame = ClinicalTrial(protocol, progress=False).run()
print(json.dumps({"seconds": time.perf_counter() - start, "rows": len(frame),
                  "checksum": float(frame["value"].fillna(0).sum())}))
"""


def _time(tree: Path, patients: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tree), str(patients)], env=env, cwd=tree,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=Path, required=True, help="source tree of the earlier version")
    parser.add_argument("--head", type=Path, default=ROOT, help="source tree of the later version (default: this one)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--patients", type=int, default=3)
    args = parser.parse_args()
    if args.rounds < 1 or args.patients < 1:
        parser.error("--rounds and --patients must be >= 1")
    isa = "avx512" if "avx512f" in Path("/proc/cpuinfo").read_text() else "avx2-or-less"
    env = {k: os.environ.get(k, "default") for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")}
    print(f"machine  {platform.processor() or platform.machine()}  isa {isa}  cpus {os.cpu_count()}  threads 1  "
          f"capability {env['ATEN_CPU_CAPABILITY']}  onednn {env['ONEDNN_MAX_CPU_ISA']}")
    times: dict[str, list[float]] = {"base": [], "head": []}
    checks: dict[str, set] = {"base": set(), "head": set()}
    for r in range(args.rounds):
        order = ["base", "head"] if r % 2 == 0 else ["head", "base"]
        for which in order:
            result = _time(getattr(args, which), args.patients)
            times[which].append(result["seconds"])
            checks[which].add((result["rows"], round(result["checksum"], 6)))
            print(f"round {r}  {which}  {result['seconds']:.2f} s  rows {result['rows']}", flush=True)
    base, head = statistics.median(times["base"]), statistics.median(times["head"])
    print(f"median   base {base:.2f} s  head {head:.2f} s")
    print(f"results  base {sorted(checks['base'])}  head {sorted(checks['head'])}")
    print(f"ratio {head / base:.3f}")


if __name__ == "__main__":
    main()
