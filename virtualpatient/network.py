"""Masked MLP math, batched over a leading patient axis.

Every tensor carries a leading patient axis ``P``: weights ``[P, out, in]``, biases ``[P, out]``,
inputs ``[P, N, in]``. A cohort that shares a schedule trains as one tensor program; a single
patient is ``P = 1``. Nothing here mixes patients: losses are summed over patients, so each
patient's gradient is its own, and Adam is elementwise, so P patients trained together end equal
(up to float rounding) to each trained alone.

Masks are explicit tensors beside the weights, re-applied after every optimiser step, so a pruned
weight never silently revives (as in ``torch.nn.utils.prune``).

The hidden layer computes, in this order (fact 3)::

    h = act(W h + b)
    h += sigma * N(0, 1)                            # internal noise, if sigma > 0
    h += s_b * N(0, 1) + m_b * (1 - f * p)          # biased (manic) test only
    h *= damping * effective_gain(gain, p)
    h -= inhibition * p                             # stabiliser, if p > 0

The output layer is plain linear.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
import torch.nn.functional as F

from virtualpatient import stabiliser

__all__ = [
    "BatchedAdam",
    "BiasedNoise",
    "Modulation",
    "NoiseSource",
    "NonFiniteError",
    "Params",
    "accuracy",
    "forward",
    "init_params",
    "train",
]

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"relu": torch.relu, "tanh": torch.tanh}


@dataclass(frozen=True)
class Modulation:
    """The neuromodulatory state of the hidden layers, shared by a batch of patients.

    Attributes
    ----------
    gain
        Nominal global gain (ketamine-like 1.25, SSRI-like ramps to 1.6, neurosteroid-like 0.85).
    damping
        Post-activation multiplier (neurosteroid-like 0.7).
    activation
        ``"relu"`` or ``"tanh"`` (neurosteroid-like).
    noise_sigma
        SD of internal Gaussian noise added after each activation.
    protection
        Mood-stabiliser protection ``p`` in [0, 1].
    """

    gain: float = 1.0
    damping: float = 1.0
    activation: Literal["relu", "tanh"] = "relu"
    noise_sigma: float = 0.0
    protection: float = 0.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {self.activation!r}")
        if not 0.0 <= self.protection <= 1.0:
            raise ValueError(f"protection must lie in [0, 1], got {self.protection}")
        if self.noise_sigma < 0:
            raise ValueError(f"noise_sigma must be >= 0, got {self.noise_sigma}")

    def replace(self, **changes) -> Modulation:
        return replace(self, **changes)


@dataclass(frozen=True)
class BiasedNoise:
    """The biased (manic) perturbation: ``sigma * N(0, 1) + shift * (1 - f * p)`` per hidden unit."""

    sigma: float = 1.0
    shift: float = 1.0


class NoiseSource:
    """Draws noise of shape ``[P, ...]`` with patient ``i``'s slice from patient ``i``'s generator.

    Per-patient generators make a patient's noise independent of who it is batched with.
    """

    def __init__(self, generators: Sequence[torch.Generator]) -> None:
        self.generators = list(generators)

    def __call__(self, shape: Sequence[int], device: torch.device | str = "cpu") -> torch.Tensor:
        if shape[0] != len(self.generators):
            raise ValueError(f"noise for {shape[0]} patients requested from {len(self.generators)} generators")
        return torch.stack(
            [torch.randn(tuple(shape[1:]), generator=g, device=device) for g in self.generators]
        )


class NonFiniteError(FloatingPointError):
    """Training produced NaN or inf; ``patients`` are batch positions, ``epoch`` is 0-based."""

    def __init__(self, patients: list[int], epoch: int) -> None:
        self.patients, self.epoch = patients, epoch
        super().__init__(f"non-finite loss for batch positions {patients} at epoch {epoch + 1}")


@dataclass
class Params:
    """Stacked weights, biases and masks of P patients' networks.

    ``masks[i]`` is a float 0/1 tensor of ``weights[i]``'s shape; biases are never masked.
    """

    weights: list[torch.Tensor]
    biases: list[torch.Tensor]
    masks: list[torch.Tensor] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.masks:
            self.masks = [torch.ones_like(w) for w in self.weights]

    @property
    def n_patients(self) -> int:
        return self.weights[0].shape[0]

    def clone(self) -> Params:
        return Params(*([t.detach().clone() for t in group] for group in (self.weights, self.biases, self.masks)))

    def apply_masks(self) -> None:
        """Zero every masked weight (in place)."""
        with torch.no_grad():
            for w, m in zip(self.weights, self.masks):
                w.mul_(m)

    def sparsity(self) -> torch.Tensor:
        """Share of mask zeros over all weight-matrix entries, per patient, in percent (fact 7)."""
        zeros = sum((m == 0).flatten(1).sum(1) for m in self.masks)
        total = sum(m[0].numel() for m in self.masks)
        return 100.0 * zeros.double() / total

    def select(self, index: Sequence[int]) -> Params:
        """The sub-batch of the given patient positions (a copy)."""
        idx = torch.as_tensor(list(index), dtype=torch.long, device=self.weights[0].device)
        return Params(*([t.index_select(0, idx).clone() for t in group] for group in
                        (self.weights, self.biases, self.masks)))

    @staticmethod
    def cat(items: Sequence[Params]) -> Params:
        """Concatenate batches along the patient axis."""
        return Params(*(
            [torch.cat([getattr(p, group)[i] for p in items]) for i in range(len(items[0].weights))]
            for group in ("weights", "biases", "masks")
        ))

    def to(self, device: str | torch.device) -> Params:
        return Params(*([t.to(device) for t in group] for group in (self.weights, self.biases, self.masks)))


def init_params(layer_sizes: Sequence[int], generators: Sequence[torch.Generator]) -> Params:
    """PyTorch's default ``nn.Linear`` initialisation, U(-1/sqrt(fan_in), 1/sqrt(fan_in)), per patient."""
    weights, biases = [], []
    for fan_in, fan_out in zip(layer_sizes[:-1], layer_sizes[1:]):
        bound = 1.0 / math.sqrt(fan_in)
        w, b = [], []
        for g in generators:
            w.append((torch.rand((fan_out, fan_in), generator=g) * 2 - 1) * bound)
            b.append((torch.rand((fan_out,), generator=g) * 2 - 1) * bound)
        weights.append(torch.stack(w))
        biases.append(torch.stack(b))
    return Params(weights, biases)


def forward(
    params: Params,
    x: torch.Tensor,
    mod: Modulation,
    stab,
    noise: NoiseSource | None = None,
    biased: BiasedNoise | None = None,
    magnitudes: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits ``[P, N, C]`` of inputs ``x`` ``[P, N, in]`` (the layer order is in the module docstring).

    Parameters
    ----------
    stab
        A :class:`~virtualpatient.protocol.StabiliserConfig`.
    noise
        Needed when ``mod.noise_sigma > 0`` or ``biased`` is given.
    magnitudes
        If given, receives per hidden layer the per-patient mean of ``|act(W h + b) * damping * gain|``
        (nominal gain, before noise and stabiliser terms; fact 6).
    """
    act = ACTIVATIONS[mod.activation]
    p = mod.protection
    scale = mod.damping * stabiliser.effective_gain(mod.gain, p, stab)
    shift = stabiliser.inhibitory_shift(p, stab)
    n_hidden = len(params.weights) - 1
    h = x
    for i in range(n_hidden):
        h = act(torch.baddbmm(params.biases[i].unsqueeze(1), h, params.weights[i].transpose(1, 2)))
        if magnitudes is not None:
            magnitudes.append((h * (mod.damping * mod.gain)).abs().mean(dim=(1, 2)))
        if mod.noise_sigma > 0:
            h = h + mod.noise_sigma * noise(h.shape, h.device)
        if biased is not None:
            h = h + biased.sigma * noise(h.shape, h.device) + biased.shift * stabiliser.biased_shift_scale(p, stab)
        h = h * scale
        if shift:
            h = h - shift
    return torch.baddbmm(params.biases[-1].unsqueeze(1), h, params.weights[-1].transpose(1, 2))


@torch.no_grad()
def accuracy(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    mod: Modulation,
    stab,
    noise: NoiseSource | None = None,
    biased: BiasedNoise | None = None,
) -> torch.Tensor:
    """Per-patient accuracy in percent on ``x`` ``[P, N, in]``, labels ``y`` ``[P, N]``."""
    logits = forward(params, x, mod, stab, noise=noise, biased=biased)
    return 100.0 * (logits.argmax(-1) == y).double().mean(-1)


class BatchedAdam:
    """Adam over stacked parameters with a per-patient learning rate.

    The update is torch's ``Adam`` (no weight decay, no amsgrad), elementwise, so each patient's
    slice moves exactly as if it were optimised alone. A fresh instance is a fresh optimiser.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], lr: torch.Tensor | float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.tensors = list(tensors)
        n = self.tensors[0].shape[0]
        lr = torch.as_tensor(lr, dtype=self.tensors[0].dtype, device=self.tensors[0].device)
        self.lr = lr.expand(n) if lr.ndim == 0 else lr
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(t) for t in self.tensors]
        self.exp_avg_sq = [torch.zeros_like(t) for t in self.tensors]

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor]) -> None:
        self.step_count += 1
        bc1 = 1 - self.beta1 ** self.step_count
        bc2_sqrt = math.sqrt(1 - self.beta2 ** self.step_count)
        for t, g, m, v in zip(self.tensors, grads, self.exp_avg, self.exp_avg_sq):
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            step_size = (self.lr / bc1).view(-1, *([1] * (t.ndim - 1)))
            t.addcdiv_(m * step_size, denom, value=-1.0)


def epoch_batches(n: int, batch_size: int, generators: Sequence[torch.Generator],
                  device: torch.device | str) -> list[torch.Tensor]:
    """One epoch's mini-batch index tensors ``[P, B]``: a fresh permutation per patient."""
    perm = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
    return list(perm.split(batch_size, dim=1))


def gather_batch(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xb = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return xb, torch.gather(y, 1, idx)


def batch_loss(params: Params, xb: torch.Tensor, yb: torch.Tensor, mod: Modulation, stab,
               noise: NoiseSource | None) -> torch.Tensor:
    """Per-patient mean cross-entropy, ``[P]``."""
    logits = forward(params, xb, mod, stab, noise=noise)
    return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(yb.shape).mean(1)


def train(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: torch.Tensor | float,
    batch_size: int,
    schedule: Callable[[int], Modulation],
    stab,
    shuffle: Sequence[torch.Generator],
    noise: NoiseSource | None = None,
    snapshots: Sequence[int] = (),
    on_epoch: Callable[[int], None] | None = None,
) -> dict[int, Params]:
    """Train ``params`` in place with a fresh Adam, re-applying masks after every step.

    Parameters
    ----------
    schedule
        Epoch (0-based) -> the modulation used for that epoch's training steps.
    shuffle
        One generator per patient for the per-epoch permutation.
    snapshots
        Epoch counts after which a copy of the parameters is kept (0 = before training).
    on_epoch
        Called with the finished epoch's number (1-based), e.g. to advance a progress bar.

    Returns
    -------
    dict
        Epoch count -> a copy of the parameters at that point, for each of ``snapshots``.

    Raises
    ------
    NonFiniteError
        When any patient's loss becomes NaN or inf.
    """
    n = x.shape[1]
    out: dict[int, Params] = {}
    if 0 in snapshots:
        out[0] = params.clone()
    for w in params.weights + params.biases:
        w.requires_grad_(True)
    leaves = params.weights + params.biases
    opt = BatchedAdam(leaves, lr)
    try:
        for epoch in range(epochs):
            mod = schedule(epoch)
            total = torch.zeros(params.n_patients, dtype=torch.float64, device=x.device)
            for idx in epoch_batches(n, batch_size, shuffle, x.device):
                xb, yb = gather_batch(x, y, idx)
                loss = batch_loss(params, xb, yb, mod, stab, noise)
                grads = torch.autograd.grad(loss.sum(), leaves)
                opt.step(grads)
                params.apply_masks()
                total += loss.detach()
            bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
            if bad:
                raise NonFiniteError(bad, epoch)
            if epoch + 1 in snapshots:
                out[epoch + 1] = params.clone()
            if on_epoch is not None:
                on_epoch(epoch + 1)
    finally:
        for w in leaves:
            w.requires_grad_(False)
    return out
