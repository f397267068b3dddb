"""Measure each performance lever of the engine on its own (the numbers behind docs/performance.md).

Every figure is CPU seconds of this process (``time.process_time``) per patient, the minimum over a
few repeats, so other work on a shared machine disturbs it less than wall time would. One torch
thread unless ``--threads`` says otherwise.

    python benchmarks/bench_levers.py            # about 2 minutes
    python benchmarks/bench_levers.py --only crossover,step
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from virtualpatient import network, plasticity
from virtualpatient.engine import adam as optimiser
from virtualpatient.engine import batched, native, ops, reduction, settings
from virtualpatient.network import Modulation
from virtualpatient.protocol import Protocol

STAB = Protocol().stabiliser
SIZES = (2, 512, 512, 256, 4)


def _cpu(fn, repeat: int = 3, number: int = 10) -> float:
    """Minimum CPU seconds of one call."""
    fn()
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time()
        for _ in range(number):
            fn()
        best = min(best, (time.process_time() - start) / number)
    return best


def _lesioned(p: int, regrow: bool = False) -> network.Params:
    gens = [torch.Generator().manual_seed(i) for i in range(p)]
    params = network.init_params(SIZES, gens)
    plasticity.prune_per_layer(params, [0.95] * p)
    if regrow:  # reinstate a random half of the pruned positions: the ketamine-like 47.5 %
        for m in params.masks:
            for i in range(p):
                pruned = (m[i] == 0).nonzero()
                pick = pruned[torch.randperm(len(pruned), generator=gens[i])[: len(pruned) // 2]]
                m[i][pick[:, 0], pick[:, 1]] = 1.0
    return params


def _layer_costs(p: int, density: float, x, g, b, gen) -> list[float]:
    mask = (torch.rand(p, 512, 512, generator=gen) < density).float()
    w = torch.randn(p, 512, 512, generator=gen) * mask
    pattern = ops.Pattern(mask)
    values = pattern.gather(w)

    def mkl():
        torch.baddbmm(b.unsqueeze(2), w, x)
        torch.bmm(g, x.transpose(1, 2))
        torch.bmm(w.transpose(1, 2), g)

    def onednn():
        ops.dense_forward(w, b, x)
        ops.dense_backward(w, g, x)

    def compressed(kind):
        ops.sparse_forward(pattern, values, b, x, kind=kind)
        ops.sparse_backward(pattern, values, g, x, kind=kind)

    fns = (mkl, onednn, lambda: compressed("native"), lambda: compressed("torch"))
    return [_cpu(f, number=3) * 1e3 / p for f in fns]


def crossover(p: int = 10, n: int = 128) -> None:
    """Forward + backward of one 512 x 512 layer for P patients, per patient, by density."""
    print(f"crossover     512x512 layer, P={p}, {n} samples, forward+backward ms per patient")
    print("crossover     density  mkl_bmm  onednn  sparse_native  sparse_torch")
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(p, 512, n, generator=gen)
    g = torch.randn(p, 512, n, generator=gen)
    b = torch.randn(p, 512, generator=gen)
    for density in (0.05, 0.1, 0.2, 0.3, 0.4, 0.525, 1.0):
        row = _layer_costs(p, density, x, g, b, gen)
        print(f"crossover     {density:7.3f}  " + "  ".join(f"{t:7.3f}" for t in row))


def _plain_step(params: network.Params, p: int):
    """The pre-engine step: dense autograd (baddbmm) + the eight-pass Adam, masks after each step."""
    leaves = [t.clone().requires_grad_(True) for t in params.weights + params.biases]
    ws, bs = leaves[:4], leaves[4:]
    masks = params.masks
    x = torch.randn(p, 128, 2)
    y = torch.randint(0, 4, (p, 128))
    m = [torch.zeros_like(t) for t in leaves]
    v = [torch.zeros_like(t) for t in leaves]
    mod = Modulation(gain=1.6, protection=1.0)

    def step():
        logits = batched._forward_dense(network.Params(ws, bs, masks), x, mod, STAB, None, None, None)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="none").view(p, -1).mean(1)
        grads = torch.autograd.grad(loss.sum(), leaves)
        with torch.no_grad():
            for t, gr, mm, vv in zip(leaves, grads, m, v):
                mm.lerp_(gr, 0.1)
                vv.mul_(0.999).addcmul_(gr, gr, value=0.001)
                t.addcdiv_(mm * 1e-6, (vv.sqrt() / 0.03).add_(1e-8), value=-1.0)
            for t, mk in zip(ws, masks):
                t.mul_(mk)
    return step


def _engine_step(params: network.Params, p: int, reduce: bool = False):
    net = batched._Net(params, reduce=reduce)
    leaves, segments = net.leaves()
    opt = optimiser.BatchedAdam(leaves, 1e-6, segments=segments)
    x = torch.randn(p, 2, 128)
    y = torch.randint(0, 4, (p, 128))
    mod = Modulation(gain=1.6, protection=1.0)

    def step():
        _, grads = net.step(x, y, mod, STAB, None)
        opt.step(grads)
        net.apply_masks()
    return step


def step(p: int = 10) -> None:
    """One training step (batch 128) per patient: the pre-engine dense step vs the engine."""
    print(f"step          training step, batch 128, P={p}, ms per patient-step")
    for label, regrow in (("95%", False), ("47.5%", True)):
        params = _lesioned(p, regrow)
        plain = _cpu(_plain_step(params, p)) * 1e3 / p
        engine = _cpu(_engine_step(params, p)) * 1e3 / p
        with settings.engine_options(sparse_backend="off"):
            dense = _cpu(_engine_step(params, p)) * 1e3 / p
        with settings.engine_options(sparse_max_density=1.0):
            compressed = _cpu(_engine_step(params, p)) * 1e3 / p
        print(f"step          {label:6s} sparse: plain {plain:.3f}  engine {engine:.3f}  "
              f"engine_all_dense {dense:.3f}  engine_all_compressed {compressed:.3f}  ratio {plain / engine:.1f}x")


def _treated(p: int) -> dict[str, network.Params]:
    """The networks of ``bench_trial.py``'s reduced protocol: lesioned, ketamine-like and SSRI-like treated."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import bench_trial

    from virtualpatient import PatientBatch, PatientSpec
    from virtualpatient.trial import DISCONTINUED

    protocol = bench_trial._protocol(p)
    batch = PatientBatch([PatientSpec(i, protocol.seed) for i in range(p)], protocol)
    batch.train_baseline()
    batch.prune()
    out = {"lesioned": batch.params.clone()}
    for arm in ("ketamine", "ssri"):
        treated = batch.clone()
        treated.modulation = DISCONTINUED
        protocol.arms[arm].apply(treated, arm, None)
        out[arm] = treated.params
    return out


def live_units(p: int = 3) -> None:
    """The training step on the live units only (constant units folded, dead ones left out) vs the
    whole network, on trained, lesioned and treated networks (the synthetic ones of ``step`` have
    fewer constant and dead units than training leaves)."""
    print(f"live_units    training step, batch 128, P={p}, ms per patient-step; units per hidden layer, patient 0")
    for label, params in _treated(p).items():
        r = reduction.Reduction(params.masks)
        roles = "  ".join(f"h{i}:{c[0]}/{d[0]}" for i, (c, d) in
                          enumerate(zip(r.roles.count("constant"), r.roles.count("dead"))))
        full = _cpu(_engine_step(params, p)) * 1e3 / p
        live = _cpu(_engine_step(params, p, reduce=True)) * 1e3 / p
        print(f"live_units    {label:9s} constant/dead {roles}  work {r.work_fraction():.2f}:  "
              f"full {full:.3f}  live {live:.3f}  ratio {full / live:.2f}x")


def adam(p: int = 10) -> None:
    """The optimiser step over all 396k parameters of P patients: eight passes vs torch's fused kernel."""
    params = _lesioned(p)
    tensors = [t.clone() for t in params.weights + params.biases]
    grads = [torch.randn_like(t) for t in tensors]
    fused = optimiser.BatchedAdam(tensors, 1e-3)
    saved, optimiser.FUSED_ADAM = optimiser.FUSED_ADAM, False
    try:
        manual = optimiser.BatchedAdam([t.clone() for t in tensors], 1e-3)
        t_manual = _cpu(lambda: manual.step(grads)) * 1e3 / p
    finally:
        optimiser.FUSED_ADAM = saved
    t_fused = _cpu(lambda: fused.step(grads)) * 1e3 / p
    print(f"adam          dense 396k parameters, ms per patient-step: eight_passes {t_manual:.3f}  fused {t_fused:.3f}")


def scaling(sizes=(1, 2, 5, 10, 20, 50)) -> None:
    """Engine step cost per patient as the batch of patients grows."""
    for label, regrow in (("95%", False), ("47.5%", True)):
        cells = []
        for p in sizes:
            params = _lesioned(p, regrow)
            cells.append(f"P={p} {_cpu(_engine_step(params, p), number=5) * 1e3 / p:.3f}")
        print(f"scaling       {label:6s} ms per patient-step:  " + "  ".join(cells))


def _evaluation_costs(params, data_x, p: int) -> tuple[float, float, float]:
    noise = network.NoiseSource([torch.Generator().manual_seed(i) for i in range(p)])
    mod = Modulation(protection=0.5)
    biased = network.BiasedNoise()
    buf = torch.empty(p, 4000, 512)
    engine = _cpu(lambda: batched.forward(params, data_x, mod, STAB, noise=noise, biased=biased), number=3)
    draws = _cpu(lambda: (noise.fill_(buf), noise.fill_(buf), noise.fill_(buf[:, :, :256].contiguous())), number=3)
    plain = _cpu(lambda: batched._forward_dense(params, data_x, mod, STAB, noise, biased, None), number=3)
    return plain, engine, draws


def evaluation(p: int = 10) -> None:
    """One biased test (4,000 points) per patient: noise draws vs the rest."""
    data_x = torch.randn(p, 4000, 2) * 3
    for label, regrow in (("95%", False), ("47.5%", True)):
        plain, engine, draws = _evaluation_costs(_lesioned(p, regrow), data_x, p)
        print(f"evaluation    {label:6s} biased test, ms per patient: plain {plain * 1e3 / p:.2f}  "
              f"engine {engine * 1e3 / p:.2f}  of which noise draws {draws * 1e3 / p:.2f}")


def threads(p: int = 10) -> None:
    """The engine step with 1 and 2 intra-op threads (wall time: threads only help if cores are free)."""
    cells = []
    for label, regrow in (("95%", False), ("47.5%", True)):
        params = _lesioned(p, regrow)
        for n in (1, 2):
            torch.set_num_threads(n)
            fn = _engine_step(params, p)
            fn()
            start = time.perf_counter()
            for _ in range(10):
                fn()
            cells.append(f"{label} threads={n} {(time.perf_counter() - start) / 10 * 1e3 / p:.3f}")
    torch.set_num_threads(1)
    print("threads       wall ms per patient-step:  " + "  ".join(cells))


def compiled(p: int = 10) -> None:
    """torch.compile (inductor) of the plain dense step, against the same step eager."""
    params = _lesioned(p)
    plain = _plain_step(params, p)
    eager = _cpu(plain) * 1e3 / p
    try:
        start = time.perf_counter()
        fn = torch.compile(plain)
        fn()
        build = time.perf_counter() - start
        t = _cpu(fn) * 1e3 / p
        print(f"compile       plain dense step, ms per patient-step: eager {eager:.3f}  compiled {t:.3f}  "
              f"(compile {build:.0f} s)")
    except Exception as exc:  # inductor needs a C++ compiler; report rather than fail
        print(f"compile       unavailable: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}")


def flops(p: int = 10, n: int = 128) -> None:
    """Achieved multiply-adds per second of the dense layers' oneDNN products (the ketamine-like arm's
    work) at the network's shapes, per product kind, against a large square matmul (this core's
    practical peak under the current instruction-set caps); and of the native compressed kernels."""
    gen = torch.Generator().manual_seed(0)
    big = torch.randn(1024, 1024, generator=gen)
    peak = 1024 ** 3 / _cpu(lambda: ops._mm(big, big), number=3) / 1e9
    cells = [f"square1024 {peak:.1f}"]
    for n_out, n_in in ((512, 512), (256, 512)):
        w = torch.randn(p, n_out, n_in, generator=gen)
        b = torch.randn(p, n_out, generator=gen)
        x = torch.randn(p, n_in, n, generator=gen)
        g = torch.randn(p, n_out, n, generator=gen)
        fma = p * n_out * n_in * n / 1e9
        fwd = _cpu(lambda w=w, b=b, x=x: ops.dense_forward(w, b, x), number=5)
        gw = _cpu(lambda g=g, x=x: torch.stack([ops._mm(gg, xx) for gg, xx in zip(g, x)]), number=5)
        gx = _cpu(lambda g=g, w=w: torch.stack([ops._mm(gg.t(), ww.t()).t() for gg, ww in zip(g, w)]), number=5)
        cells.append(f"{n_out}x{n_in} fwd {fma / fwd:.1f} dW {fma / gw:.1f} dx {fma / gx:.1f}")
    for density in (0.05, 0.525):
        mask = (torch.rand(p, 512, 512, generator=gen) < density).float()
        pat = ops.Pattern(mask)
        values = torch.randn(pat.nnz, generator=gen)
        x = torch.randn(p, 512, n, generator=gen)
        g = torch.randn(p, 512, n, generator=gen)
        fma = pat.nnz * n / 1e9
        fwd = _cpu(lambda pat=pat, v=values, x=x: ops.sparse_forward(pat, v, None, x), number=5)
        bwd = _cpu(lambda pat=pat, v=values, g=g, x=x: ops.sparse_backward(pat, v, g, x), number=5)
        cells.append(f"native@{density} fwd {fma / fwd:.1f} bwd(dv+dx) {2 * fma / bwd:.1f}")
    print(f"flops         GFMA/s, P={p}, {n} samples, kernels {native.kernel_target()}:  "
          + "  ".join(cells))


def noise(n: int = 4000 * 512) -> None:
    """Nanoseconds per N(0, 1) draw from a patient's generator: torch's ``normal_`` against the
    engine's native replica (the same numbers, checked here too), for one biased-test layer's draw
    (4,000 samples x 512 units) and one training batch's (128 x 512)."""
    cells = []
    for size in (n, 128 * 512):
        out = torch.empty(size)
        gen = torch.Generator().manual_seed(0)
        t_torch = _cpu(lambda out=out, gen=gen: out.normal_(generator=gen)) * 1e9 / size
        t_native = _cpu(lambda out=out, gen=gen: ops.normal_(out, gen)) * 1e9 / size
        a, b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        same = torch.equal(torch.empty(size).normal_(generator=a), ops.normal_(torch.empty(size), b))
        cells.append(f"{size} draws: torch {t_torch:.2f}  native {t_native:.2f}  same {same}")
    print(f"noise         ns per draw, kernels {native.kernel_target()}:  " + "  ".join(cells))


def _fma_chain(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t.T`` in float32 as one fused multiply-add chain per output, ``k = 0, 1, ..., K - 1``
    from 0. Emulated in float64: each product of two floats is exact there, and each sum is rounded
    to float32 at once (checked against C's ``fmaf`` on the shapes below)."""
    a, b_t = a.double(), b_t.double()
    acc = torch.zeros(a.shape[0], b_t.shape[0], dtype=torch.float64)
    for k in range(a.shape[1]):
        acc = torch.addr(acc, a[:, k], b_t[:, k]).float().double()
    return acc.float()


def order(n: int = 128) -> None:
    """Whether oneDNN's products, as the dense step calls them (forward ``W h``, weight gradient
    ``gz h^T``, input gradient ``(gz^T W)^T``), equal one float32 FMA chain per output in ascending
    ``k``: if they do, a native kernel that keeps that order gives the engine's numbers bit for bit.
    Shapes: the full layers and live blocks of the paper's ketamine-like networks, at a training
    batch (128), its last batch (96) and a 4,000-point test; then the limits found (K above 1,024,
    a single row)."""
    gen = torch.Generator().manual_seed(0)
    layers = ((512, 512), (256, 512), (512, 2), (4, 256), (458, 276), (167, 458), (276, 2), (4, 167))
    equal, total, differ = 0, 0, []
    for n_out, n_in in layers:
        for batch in (n, 96, 4000):
            w = torch.randn(n_out, n_in, generator=gen)
            h = torch.randn(n_in, batch, generator=gen)
            g = torch.randn(n_out, batch, generator=gen)
            cases = {"fwd": (ops._mm(w, h.t()), w, h.t())}
            if batch <= 1024:  # training batches only: the weight gradient sums over the batch
                cases["dW"] = (ops._mm(g, h), g, h)
                cases["dx"] = (ops._mm(g.t(), w.t()), g.t(), w.t())
            for kind, (got, a, b_t) in cases.items():
                total += 1
                if torch.equal(got, _fma_chain(a, b_t)):
                    equal += 1
                else:
                    differ.append(f"{kind} {n_out}x{n_in} n={batch}")
    limits = []
    for rows, k in ((128, 1024), (128, 1025), (2, 458), (1, 458)):
        a, b_t = torch.randn(rows, k, generator=gen), torch.randn(64, k, generator=gen)
        limits.append(f"M={rows},K={k} {torch.equal(ops._mm(a, b_t), _fma_chain(a, b_t))}")
    print(f"order         oneDNN products equal to one FMA chain per output: {equal}/{total}"
          + (f" (differ: {', '.join(differ)})" if differ else "") + "  limits: " + "  ".join(limits))


def _dense_calls(w, b, x, g, native_dense: bool) -> tuple[float, float, tuple[torch.Tensor, ...]]:
    """ms of a dense layer's forward and backward calls with ``native_dense`` set, and their results."""
    z, gx = torch.empty(x.shape[0], w.shape[1], x.shape[2]), torch.empty_like(x)
    with settings.engine_options(native_dense=native_dense):
        fwd = _cpu(lambda: ops.dense_forward(w, b, x, out=z)) * 1e3
        bwd = _cpu(lambda: ops.dense_backward(w, g, x, True, out=gx, stacked=False)) * 1e3
        gw = ops.dense_backward(w, g, x, True, out=gx, stacked=False)[0]
    return fwd, bwd, (z, torch.stack(list(gw)), gx)


def dense(p: int = 5, n: int = 128) -> None:
    """A dense layer's training products, as the engine calls them, through oneDNN and through
    ``vp_dense`` (``EngineConfig.native_dense``), which must give the same bits: the paper's
    ketamine-like live blocks and the full 512 x 512 layer, a batch of ``n`` for ``p`` patients.
    ms per call (forward with bias; backward = weight, bias and input gradients)."""
    if not ops.dense_matches_onednn():
        print("dense         vp_dense does not give oneDNN's numbers here (or no AVX2 + FMA kernel): skipped")
        return
    gen = torch.Generator().manual_seed(0)
    for n_out, n_in in ((458, 276), (167, 458), (512, 512)):
        w, b = torch.randn(p, n_out, n_in, generator=gen), torch.randn(p, n_out, generator=gen)
        x, g = torch.randn(p, n_in, n, generator=gen), torch.randn(p, n_out, n, generator=gen)
        f0, b0, r0 = _dense_calls(w, b, x, g, False)
        f1, b1, r1 = _dense_calls(w, b, x, g, True)
        same = all(torch.equal(a, c) for a, c in zip(r0, r1))
        print(f"dense         {n_out}x{n_in} P={p} n={n}, ms:  oneDNN forward {f0:.2f} backward {b0:.2f}  "
              f"vp_dense forward {f1:.2f} backward {b1:.2f}  ratio {(f0 + b0) / (f1 + b1):.2f}x  same bits {same}")


def _rowwise_mask(p: int, n_out: int, n_in: int, gen: torch.Generator) -> torch.Tensor:
    """A synthetic mask shaped like the ketamine-like arm's after regrowth (engine/tiles.py): 62 % of
    rows keep 95 % of their inputs, 10 % keep half, 28 % keep 2 %."""
    kind = torch.rand(p, n_out, 1, generator=gen)
    share = torch.where(kind < 0.62, 0.95, torch.where(kind < 0.72, 0.5, 0.02))
    return (torch.rand(p, n_out, n_in, generator=gen) < share).float()


def _tile_calls(w, b, x, g, xw, plan) -> tuple:
    """ms of a masked layer's forward, backward and wide forward calls through ``vp_dense`` with
    ``plan``'s tiles (or none), and their results."""
    get = None if plan is None else (lambda: plan)
    z, gx, zw = torch.empty(w.shape[0], w.shape[1], x.shape[2]), torch.empty_like(x), torch.empty(
        w.shape[0], w.shape[1], xw.shape[2])
    with settings.engine_options(native_dense=True):
        fwd = _cpu(lambda: ops.dense_forward(w, b, x, out=z, tiles=get)) * 1e3
        bwd = _cpu(lambda: ops.dense_backward(w, g, x, True, out=gx, stacked=False, tiles=get)) * 1e3
        wid = _cpu(lambda: ops.dense_forward(w, b, xw, out=zw, tiles=get), number=2) * 1e3
        gw = torch.stack(list(ops.dense_backward(w, g, x, True, out=gx, stacked=False, tiles=get)[0]))
    return fwd, bwd, wid, z, gx, zw, gw


def tiles(p: int = 5, n: int = 128, wide: int = 4000) -> None:
    """A masked dense layer's products with and without its zero-skipping tiles
    (``EngineConfig.skip_zeros``), both through ``vp_dense``, on a synthetic ketamine-like mask:
    training batches (forward, and backward with the weight gradient by pairs) and a wide
    evaluation product, ms per call; the same bits at every kept weight."""
    if not ops.dense_matches_onednn():
        print("tiles         vp_dense does not give oneDNN's numbers here (or no AVX2 + FMA kernel): skipped")
        return
    from virtualpatient.engine.tiles import TilePlan

    gen = torch.Generator().manual_seed(1)
    for n_out, n_in in ((458, 276), (167, 458), (512, 512)):
        mask = _rowwise_mask(p, n_out, n_in, gen)
        w, b = torch.randn(p, n_out, n_in, generator=gen) * mask, torch.randn(p, n_out, generator=gen)
        x, g = torch.randn(p, n_in, n, generator=gen), torch.randn(p, n_out, n, generator=gen)
        xw = torch.randn(p, n_in, wide, generator=gen)
        plan = TilePlan(mask)
        out = {on: _tile_calls(w, b, x, g, xw, plan if on else None) for on in (False, True)}
        same = all(torch.equal(a, c) for a, c in zip(out[False][3:6], out[True][3:6]))
        same = same and torch.equal(out[False][6][mask != 0], out[True][6][mask != 0])
        (f0, b0, w0), (f1, b1, w1) = out[False][:3], out[True][:3]
        print(f"tiles         {n_out}x{n_in} P={p}, kept {plan.kept:.0%}, ms without / with tiles:  forward {f0:.2f} / "
              f"{f1:.2f}  backward {b0:.2f} / {b1:.2f}  ({(f0 + b0) / (f1 + b1):.2f}x)  forward n={wide} {w0:.1f} / "
              f"{w1:.1f} ({w0 / w1:.2f}x)  same bits {same}")


LEVERS = {"flops": flops, "order": order, "dense": dense, "tiles": tiles, "crossover": crossover, "step": step,
          "live_units": live_units, "adam": adam,
          "scaling": scaling, "evaluation": evaluation, "threads": threads, "compile": compiled, "noise": noise}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(LEVERS)}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"bench_levers  torch {torch.__version__}  sparse {native.backend('cpu')}  "
          f"onednn {ops.onednn_available()}  cpu {torch.backends.cpu.get_cpu_capability()}  "
          f"kernels {native.kernel_target()}")
    for name in (args.only.split(",") if args.only else LEVERS):
        LEVERS[name]()
    return 0


if __name__ == "__main__":
    sys.exit(main())
