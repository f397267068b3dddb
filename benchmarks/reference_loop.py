"""A deliberately plain, per-patient implementation of the manic-switch protocol: the benchmark baseline.

Written the way the published notebook is: one patient at a time, a ``torch.nn.Module`` MLP, a
``DataLoader`` over a ``TensorDataset``, ``torch.optim.Adam``, and a separate maintenance run for
each of the durations. It is used only by ``benchmarks/bench_trial.py``, which runs it beside the
engine on the same (reduced) protocol and checks that both give the same numbers.

It shares with the library only what makes the numbers comparable: a patient's data sets
(:func:`virtualpatient.task.make_task_data`) and its named random streams
(:meth:`virtualpatient.cohort.PatientSpec.generator`): ``init``, ``baseline``, ``<arm>/score``,
``<arm>/regrow``, ``<arm>/train`` (and ``<arm>/train/noise``), ``<arm>/maintenance``, and the
assessment streams ``untreated/baseline``, ``untreated/assess``, ``<arm>/assess``,
``<arm>/maintenance/<d>/assess``, ``<arm>/washout/<d>``, ``<arm>/off`` and ``<arm>/relapse``.
Every formula is written out again here from the protocol facts (DESIGN.md, facts 1-16).

Run it alone::

    python benchmarks/reference_loop.py --study studies/quick.toml --patients 1
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Sampler, TensorDataset

from virtualpatient.cohort import PatientSpec
from virtualpatient.protocol import Protocol, load_study
from virtualpatient.task import make_task_data


# ------------------------------------------------------------------------------------------
# The network
# ------------------------------------------------------------------------------------------
class MLP(nn.Module):
    """2-512-512-256-4 with the hidden-layer order of fact 3 and the modulation as attributes."""

    def __init__(self, sizes, stab) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.masks = [torch.ones_like(lin.weight) for lin in self.layers]
        self.stab = stab
        self.gain, self.damping, self.activation = 1.0, 1.0, "relu"
        self.noise_sigma, self.protection = 0.0, 0.0
        self.noise_gen: torch.Generator | None = None   # internal noise comes from here
        self.biased: tuple[float, float] | None = None   # (sigma, shift) during the biased test
        self.magnitudes: list[float] | None = None       # filled when not None (fact 6)

    def set_modulation(self, gain=1.0, damping=1.0, activation="relu", noise_sigma=0.0, protection=0.0):
        self.gain, self.damping, self.activation = gain, damping, activation
        self.noise_sigma, self.protection = noise_sigma, protection

    def effective_gain(self) -> float:
        p, g, floor = self.protection, self.gain, self.stab.gain_floor
        if p <= 0:
            return g
        return min(g, max(floor, floor + (1.0 - p) * (g - floor)))

    def forward(self, x):
        p = self.protection
        scale = self.damping * self.effective_gain()
        h = x
        for lin in self.layers[:-1]:
            h = lin(h)
            h = torch.relu(h) if self.activation == "relu" else torch.tanh(h)
            if self.magnitudes is not None:
                self.magnitudes.append(float((h * (self.damping * self.gain)).abs().mean()))
            if self.noise_sigma > 0:
                h = h + self.noise_sigma * torch.randn(h.shape, generator=self.noise_gen)
            if self.biased is not None:
                sigma, shift = self.biased
                h = h + sigma * torch.randn(h.shape, generator=self.noise_gen) + shift * (
                    1.0 - self.stab.noise_shift_factor * p)
            h = h * scale
            if p > 0:
                h = h - self.stab.inhibition * p
        return self.layers[-1](h)

    def apply_masks(self) -> None:
        with torch.no_grad():
            for lin, m in zip(self.layers, self.masks):
                lin.weight.mul_(m)

    def sparsity(self) -> float:
        zeros = sum(int((m == 0).sum()) for m in self.masks)
        return 100.0 * zeros / sum(m.numel() for m in self.masks)


def build_model(spec: PatientSpec, protocol: Protocol) -> MLP:
    """The MLP with PyTorch's default initialisation drawn from the patient's ``init`` stream."""
    with torch.random.fork_rng():  # nn.Linear draws its own init from the global RNG; it is overwritten
        model = MLP(protocol.network.layer_sizes, protocol.stabiliser)
    g = spec.generator("init")
    with torch.no_grad():
        for lin in model.layers:
            bound = 1.0 / math.sqrt(lin.in_features)
            lin.weight.copy_((torch.rand(lin.weight.shape, generator=g) * 2 - 1) * bound)
            lin.bias.copy_((torch.rand(lin.bias.shape, generator=g) * 2 - 1) * bound)
    return model


# ------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------
class EpochPermutation(Sampler):
    """Yields ``torch.randperm(n, generator=g)``, one fresh permutation per epoch.

    ``DataLoader(shuffle=True, generator=g)`` is *not* used: its ``RandomSampler`` draws a second,
    unused permutation at the end of every epoch and the loader draws a worker seed from ``g`` each
    epoch, so its order would drift from "one randperm per epoch" (checked with torch 2.13).
    """

    def __init__(self, n: int, generator: torch.Generator) -> None:
        self.n, self.generator = n, generator

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        yield from torch.randperm(self.n, generator=self.generator).tolist()


def train(model: MLP, data, protocol: Protocol, spec: PatientSpec, epochs: int, lr: float, stream: str,
          schedule=None) -> None:
    """Adam, mini-batches of 128 reshuffled every epoch, masks re-applied after every step (fact 1)."""
    dataset = TensorDataset(data.train_x, data.train_y)
    loader = DataLoader(dataset, batch_size=protocol.baseline.batch_size,
                        sampler=EpochPermutation(len(dataset), spec.generator(stream)))
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    model.noise_gen = spec.generator(f"{stream}/noise")
    model.train()
    for epoch in range(epochs):
        if schedule is not None:
            schedule(model, epoch)
        for xb, yb in loader:
            loss = F.cross_entropy(model(xb), yb)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            model.apply_masks()


# ------------------------------------------------------------------------------------------
# Assessments
# ------------------------------------------------------------------------------------------
@torch.no_grad()
def accuracy(model: MLP, x, y) -> float:
    return 100.0 * float((model(x).argmax(1) == y).double().mean())


class Assessor:
    """Runs the paper's measurements in order, all noise from one stream (``assess`` of the engine)."""

    def __init__(self, model: MLP, data, protocol: Protocol, spec: PatientSpec, stream: str) -> None:
        self.model, self.data, self.cfg = model, data, protocol.assessment
        self.g = spec.generator(stream)
        self.rows: list[dict] = []
        self.base = (model.gain, model.damping, model.activation, model.noise_sigma, model.protection)

    def _with(self, **changes):
        gain, damping, activation, noise, protection = self.base
        values = dict(gain=gain, damping=damping, activation=activation, noise_sigma=noise, protection=protection)
        values.update(changes)
        self.model.set_modulation(**values)
        self.model.noise_gen = self.g

    def _row(self, metric, value, condition="", noise_sigma=math.nan):
        self.rows.append({"metric": metric, "condition": condition, "noise_sigma": noise_sigma, "value": value})

    def run(self, names) -> list[dict]:
        x, y = self.data.standard_x, self.data.standard_y
        for name in names:
            if name == "sparsity":
                self._row("sparsity", self.model.sparsity())
            elif name in ("clean", "standard"):
                self._with(noise_sigma=0.0)
                xs, ys = (self.data.clean_x, self.data.clean_y) if name == "clean" else (x, y)
                self._row("accuracy", accuracy(self.model, xs, ys), name)
            elif name == "combined":
                self._with(noise_sigma=self.cfg.combined_internal_sigma)
                noisy = x + self.cfg.combined_input_sd * torch.randn(x.shape, generator=self.g)
                self._row("accuracy", accuracy(self.model, noisy, y), "combined")
            elif name in ("resilience", "off_medication_noise"):
                sigmas = self.cfg.resilience_sigmas if name == "resilience" else self.cfg.off_medication_sigmas
                for sigma in sigmas:
                    self._with(noise_sigma=float(sigma))
                    self._row("accuracy", accuracy(self.model, x, y), "internal_noise", float(sigma))
            elif name == "biased":
                self._with(noise_sigma=0.0)
                self.model.biased = (self.cfg.biased_sigma, self.cfg.biased_shift)
                self._row("accuracy", accuracy(self.model, x, y), "biased")
                self.model.biased = None
            elif name == "gain":
                self._row("gain", self.base[0])
            elif name == "activation_magnitude":
                self._with(noise_sigma=0.0, protection=0.0)
                self.model.magnitudes = []
                with torch.no_grad():
                    self.model(x)
                self._row("activation_magnitude", float(np.mean(self.model.magnitudes)))
                self.model.magnitudes = None
            else:
                raise ValueError(name)
        self._with()
        return self.rows


ACUTE = ("sparsity", "clean", "standard", "combined", "resilience", "biased", "gain", "activation_magnitude")
OFF_MEDICATION = ("combined", "off_medication_noise", "biased", "activation_magnitude")


# ------------------------------------------------------------------------------------------
# Plasticity
# ------------------------------------------------------------------------------------------
def prune(model: MLP, fraction: float) -> None:
    """Per layer, keep |w| at or above the layer's ``fraction`` quantile of |w| (fact 7)."""
    with torch.no_grad():
        for lin, i in zip(model.layers, range(len(model.masks))):
            w = lin.weight.detach().double().abs()
            threshold = float(np.quantile(w.numpy().ravel(), fraction))
            model.masks[i] = ((w >= threshold) & (model.masks[i] > 0)).float()
    model.apply_masks()


def regrow_ketamine(model: MLP, data, protocol: Protocol, spec: PatientSpec, arm: str, treatment) -> None:
    """Score pruned synapses by summed |dL/dw| over the first mini-batches, regrow the top half (fact 8)."""
    saved_gain = model.gain
    model.set_modulation(gain=1.0 if treatment.score_at_unit_gain else treatment.gain)
    perm = torch.randperm(data.train_x.shape[0], generator=spec.generator(f"{arm}/score"))
    batches = perm.split(protocol.baseline.batch_size)[:treatment.score_batches]
    scores = [torch.zeros_like(lin.weight) for lin in model.layers]
    for idx in batches:
        model.zero_grad()
        F.cross_entropy(model(data.train_x[idx]), data.train_y[idx]).backward()
        for s, lin in zip(scores, model.layers):
            s.add_(lin.weight.grad.abs())
    model.zero_grad()
    g = spec.generator(f"{arm}/regrow")
    with torch.no_grad():
        for lin, i, s in zip(model.layers, range(len(model.masks)), scores):
            values = torch.randn(lin.weight.shape, generator=g) * treatment.regrow_sd
            pruned = model.masks[i] == 0
            k = int(treatment.regrow_fraction * int(pruned.sum()))
            if k == 0:
                continue
            top = torch.where(pruned, s, torch.full_like(s, -math.inf)).flatten().topk(k).indices
            lin.weight.view(-1)[top] = values.flatten()[top]
            model.masks[i].view(-1)[top] = 1.0
    model.set_modulation(gain=saved_gain)


# ------------------------------------------------------------------------------------------
# The schedule
# ------------------------------------------------------------------------------------------
def run_patient(protocol: Protocol, index: int) -> list[dict]:
    """Everything the trial does for one patient (fact 15), as tidy rows."""
    spec = PatientSpec(index, protocol.seed)
    data = make_task_data(spec, protocol.task)
    rows: list[dict] = []

    def tag(new, arm, phase, **extra):
        for r in new:
            rows.append({"patient": index, "arm": arm, "phase": phase, "maintenance_epochs": math.nan,
                         "step": math.nan, **r, **extra})

    model = build_model(spec, protocol)
    train(model, data, protocol, spec, protocol.baseline.epochs, protocol.baseline.lr, "baseline")
    tag(Assessor(model, data, protocol, spec, "untreated/baseline").run(("standard", "clean")), "untreated", "baseline")
    prune(model, protocol.pruning.fraction)
    tag(Assessor(model, data, protocol, spec, "untreated/assess").run(ACUTE), "untreated", "pruned")

    for arm, treatment in protocol.arms.items():
        kind = treatment.registry_name
        m = copy.deepcopy(model)
        m.set_modulation()
        if kind == "ketamine":
            m.set_modulation(gain=treatment.gain)
            regrow_ketamine(m, data, protocol, spec, arm, treatment)
            train(m, data, protocol, spec, treatment.epochs, treatment.lr, f"{arm}/train")
        elif kind == "ssri":
            def ssri_schedule(net, epoch, t=treatment):
                progress = epoch / (t.epochs - 1) if t.epochs > 1 else 1.0
                net.set_modulation(gain=t.gain_start + (t.gain_end - t.gain_start) * progress,
                                   noise_sigma=t.noise_start + (t.noise_end - t.noise_start) * progress)
            train(m, data, protocol, spec, treatment.epochs, treatment.lr, f"{arm}/train", schedule=ssri_schedule)
            m.set_modulation(gain=treatment.gain_end)
        elif kind == "neurosteroid":
            m.set_modulation(gain=treatment.gain, damping=treatment.damping, activation=treatment.activation)
            train(m, data, protocol, spec, treatment.epochs, treatment.lr, f"{arm}/train")
        else:
            raise ValueError(f"the reference loop knows the paper's three treatments, not {kind!r}")
        on_drug = (m.gain, m.damping, m.activation)
        acute = Assessor(m, data, protocol, spec, f"{arm}/assess").run(ACUTE)
        tag(acute, arm, "acute")

        cfg = protocol.longitudinal
        for d in cfg.durations:  # a separate maintenance run per duration, as the notebook does
            kept = copy.deepcopy(m)
            kept.set_modulation(*on_drug, noise_sigma=0.0, protection=cfg.protection)
            train(kept, data, protocol, spec, d, cfg.lr, f"{arm}/maintenance")
            tag(Assessor(kept, data, protocol, spec, f"{arm}/maintenance/{d}/assess").run(("standard",)),
                arm, "maintenance", maintenance_epochs=d)
            g = spec.generator(f"{arm}/washout/{d}")
            p = cfg.protection
            for step in range(cfg.washout_steps + 1):
                if step > 0:
                    p = max(0.0, p - treatment.washout_decay)
                kept.set_modulation(protection=p)  # discontinued: gain 1, damping 1, ReLU, no noise
                kept.noise_gen = g
                kept.biased = (protocol.assessment.biased_sigma, protocol.assessment.biased_shift)
                acc = accuracy(kept, data.standard_x, data.standard_y)
                kept.biased = None
                tag([{"metric": "accuracy", "condition": "biased", "noise_sigma": math.nan, "value": acc}],
                    arm, "washout", maintenance_epochs=d, step=step)
                tag([{"metric": "protection", "condition": "", "noise_sigma": math.nan, "value": p}],
                    arm, "washout", maintenance_epochs=d, step=step)
            tag([{"metric": "relapsed", "condition": "", "noise_sigma": math.nan,
                  "value": float(acc < cfg.relapse_threshold)}], arm, "washout", maintenance_epochs=d,
                step=cfg.washout_steps)

        if treatment.state_dependent:
            m.set_modulation()
            tag(Assessor(m, data, protocol, spec, f"{arm}/off").run(OFF_MEDICATION), arm, "off_medication")
            m.set_modulation(*on_drug)

        before = [r["value"] for r in acute if r["condition"] == "combined"][0]
        stressed = copy.deepcopy(m)
        s = stressed.sparsity() / 100.0
        target = min(s + protocol.relapse.further_fraction * (1.0 - s), protocol.relapse.max_sparsity)
        prune(stressed, target)
        after_rows = Assessor(stressed, data, protocol, spec, f"{arm}/relapse").run(("sparsity", "combined"))
        after = [r["value"] for r in after_rows if r["condition"] == "combined"][0]
        tag(after_rows + [{"metric": "relapse_drop", "condition": "", "noise_sigma": math.nan,
                           "value": before - after}], arm, "acute_relapse")
    return rows


def run_reference(protocol: Protocol, patients: int | None = None) -> list[dict]:
    """All patients, one after another."""
    rows: list[dict] = []
    for index in range(protocol.n_patients if patients is None else patients):
        rows += run_patient(protocol, index)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", default="studies/quick.toml")
    parser.add_argument("--patients", type=int, default=1)
    args = parser.parse_args(argv)
    protocol = load_study(args.study)
    start = time.perf_counter()
    rows = run_reference(protocol, args.patients)
    print(f"{len(rows)} rows in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
