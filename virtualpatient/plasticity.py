"""Structural plasticity: magnitude pruning and regrowth of pruned synapses.

Pruning is the depressive lesion (fact 7) and the acute-relapse stressor (fact 11). Regrowth is the
ketamine-like mechanism (fact 8). As in RigL, *which* positions grow (a score) is separate from
*how many* and *with what values* (:func:`regrow`), so a random-regrowth control is one small
score function.

Examples
--------
>>> import torch
>>> from virtualpatient.network import Params
>>> w = torch.arange(1.0, 21.0).view(1, 4, 5)
>>> p = Params([w], [torch.zeros(1, 4)])
>>> prune_per_layer(p, [0.5])
>>> int(p.masks[0].sum())
10
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from virtualpatient.engine.batched import batch_loss, epoch_batches, gather_batch
from virtualpatient.network import Modulation, Params

if TYPE_CHECKING:
    from virtualpatient.protocol import StabiliserConfig

__all__ = [
    "gradient_scores",
    "prune_global",
    "prune_per_layer",
    "quantile",
    "prune_weakest",
    "random_positions",
    "random_scores",
    "regrow",
]


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """``torch.quantile(values, q)`` (linear interpolation) of a 1-D tensor, bit for bit, in linear time.

    Selects the two order statistics around rank ``q (n - 1)`` and interpolates them with the same
    ``torch.lerp`` that ``torch.quantile`` applies after its full sort (3-4x faster on a layer).

    >>> x = torch.tensor([4.0, 1.0, 3.0, 2.0], dtype=torch.float64)
    >>> quantile(x, 0.5).item(), torch.quantile(x, 0.5).item()
    (2.5, 2.5)
    """
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"need a non-empty 1-D tensor, got shape {tuple(values.shape)}")
    rank = q * (values.numel() - 1)
    lo, hi = math.floor(rank), math.ceil(rank)
    below = torch.kthvalue(values, lo + 1).values
    above = below if hi == lo else torch.kthvalue(values, hi + 1).values
    return torch.lerp(below, above, torch.tensor(rank - lo, dtype=values.dtype, device=values.device))


def _keep_top(magnitude: torch.Tensor, alive: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mask keeping entries with magnitude at or above the ``fraction`` quantile, among alive ones."""
    # Compare in float64: rounding the threshold to float32 could let one weight below it survive.
    exact = magnitude.double()
    threshold = quantile(exact.flatten(), fraction)
    return ((exact >= threshold) & alive).to(magnitude.dtype)


def prune_per_layer(params: Params, fractions: Sequence[float], layers: Sequence[int] | None = None,
                    exclude: Sequence[torch.Tensor] | None = None) -> None:
    """One-shot magnitude pruning of each layer on its own (fact 7).

    In every chosen weight matrix a patient keeps the weights whose ``|w|`` is at or above the
    ``fraction`` quantile of that matrix's ``|w|`` (already-pruned weights count as zeros and stay
    pruned). Masks are updated and weights zeroed in place; biases are never pruned.

    Parameters
    ----------
    fractions
        Target sparsity per patient, in [0, 1).
    layers
        Indices of the weight matrices to prune (default: all).
    exclude
        Per weight matrix, a bool ``[P, out, in]`` of scarred positions: they stay pruned and are
        left out of the population the quantile is taken over (a scar is not a weak weight).
    """
    _check_fractions(params, fractions)
    layers = range(len(params.weights)) if layers is None else layers
    with torch.no_grad():
        for i in layers:
            w, m = params.weights[i], params.masks[i]
            for p, frac in enumerate(fractions):
                if exclude is None or not bool(exclude[i][p].any()):
                    m[p] = _keep_top(w[p].abs(), m[p] > 0, frac)
                    continue
                free = ~exclude[i][p]
                exact = w[p].abs().double()
                threshold = quantile(exact[free], frac)
                m[p] = ((exact >= threshold) & (m[p] > 0) & free).to(m.dtype)
    params.apply_masks()


def prune_global(params: Params, fractions: Sequence[float], layers: Sequence[int]) -> None:
    """Magnitude pruning with one threshold across the chosen layers together (the text's reading).

    The paper's text prunes "across the three hidden layers the 95 % smallest-magnitude weights";
    this pools ``|w|`` of ``layers`` per patient and keeps those at or above its quantile.
    """
    _check_fractions(params, fractions)
    with torch.no_grad():
        for p, frac in enumerate(fractions):
            pooled = torch.cat([params.weights[i][p].abs().flatten() for i in layers]).double()
            threshold = quantile(pooled, frac)
            for i in layers:
                w, m = params.weights[i], params.masks[i]
                m[p] = ((w[p].abs().double() >= threshold) & (m[p] > 0)).to(m.dtype)
    params.apply_masks()


def _check_fractions(params: Params, fractions: Sequence[float]) -> None:
    if len(fractions) != params.n_patients:
        raise ValueError(f"need one pruning fraction per patient ({params.n_patients}), got {len(fractions)}")
    for f in fractions:
        if not 0.0 <= f < 1.0:
            raise ValueError(f"pruning fraction must lie in [0, 1), got {f}")


def gradient_scores(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    n_batches: int,
    batch_size: int,
    mod: Modulation,
    stab: StabiliserConfig,
    shuffle: Sequence[torch.Generator],
) -> list[torch.Tensor]:
    """Sum of ``|dLoss/dw|`` over the first ``n_batches`` shuffled mini-batches (no optimiser step).

    Pruned weights are zero but their gradient is not: it says how much the loss would fall if the
    synapse came back ("strong silent synapses", fact 8).
    """
    scores = [torch.zeros_like(w) for w in params.weights]
    weights = [w.detach().requires_grad_(True) for w in params.weights]
    probe = Params(weights, params.biases, params.masks)
    batches = epoch_batches(x.shape[1], batch_size, shuffle, x.device)[:n_batches]
    for idx in batches:
        xb, yb = gather_batch(x, y, idx)
        grads = torch.autograd.grad(batch_loss(probe, xb, yb, mod, stab, None).sum(), weights)
        for s, g in zip(scores, grads):
            s.add_(g.abs())
    return scores


def random_scores(params: Params, generators: Sequence[torch.Generator]) -> list[torch.Tensor]:
    """Uniform random scores: the random-regrowth control."""
    return [
        torch.stack([torch.rand(w.shape[1:], generator=g) for g in generators]).to(w.device)
        for w in params.weights
    ]


def regrow(
    params: Params,
    scores: Sequence[torch.Tensor],
    fractions: Sequence[float],
    init_sd: float,
    generators: Sequence[torch.Generator],
    blocked: Sequence[torch.Tensor] | None = None,
    min_count: int = 0,
) -> list[torch.Tensor]:
    """Reinstate the top-scored pruned positions of every layer with N(0, init_sd^2) values.

    In each layer a patient regrows ``floor(fraction * pruned count)`` of its pruned positions,
    those with the highest score; the mask is set to 1 there (fact 8). ``blocked`` (per layer, a
    bool ``[P, out, in]``: scars) are never regrown and do not count as pruned candidates.
    ``min_count`` regrows at least that many per layer while candidates remain (the family
    notebooks' gradient regrowth: at least 1; family README, 068E fact 5, Ch03 fact 7).

    Returns
    -------
    list of Tensor
        Per layer, a bool ``[P, out, in]`` marking the reinstated positions.
    """
    if len(fractions) != params.n_patients:
        raise ValueError(f"need one regrowth fraction per patient ({params.n_patients}), got {len(fractions)}")
    grown = []
    with torch.no_grad():
        for layer, (w, m, s) in enumerate(zip(params.weights, params.masks, scores)):
            new = torch.zeros_like(m, dtype=torch.bool)
            for p, (frac, g) in enumerate(zip(fractions, generators)):
                if not 0.0 <= frac <= 1.0:
                    raise ValueError(f"regrowth fraction must lie in [0, 1], got {frac}")
                pruned = m[p] == 0
                if blocked is not None:
                    pruned &= ~blocked[layer][p]
                n = int(pruned.sum())
                k = min(n, max(min_count, int(frac * n)))
                values = torch.randn(w.shape[1:], generator=g).to(w.device) * init_sd
                if k == 0:
                    continue
                candidate = torch.where(pruned, s[p], torch.full_like(s[p], -torch.inf))
                top = candidate.flatten().topk(k).indices
                new[p].view(-1)[top] = True
                w[p].view(-1)[top] = values.flatten()[top]
                m[p].view(-1)[top] = 1.0
            grown.append(new)
    return grown


def prune_weakest(params: Params, shares: Sequence[float], layers: Sequence[int] | None = None,
                  exclude: Sequence[torch.Tensor] | None = None, min_count: int = 0) -> list[torch.Tensor]:
    """Prune a share of each layer's *live* weights, the weakest first (family 068A fact 6, 068E fact 8e).

    Per patient and chosen layer: ``n`` live entries (mask 1, not in ``exclude``), ``k =
    max(min_count, floor(share x n))`` at most ``n`` (the layer is skipped when ``k = 0``; 068A uses
    ``min_count = 0``, 068E's episode scar 1), threshold = the k-th smallest ``|w|``
    among them, and every live entry with ``|w|`` at or below it is pruned (ties may prune a few
    more). Unlike :func:`prune_per_layer`, each layer loses a share of its *own* live weights, with
    no overall target and no cap.

    Returns
    -------
    list of Tensor
        Per weight matrix, a bool ``[P, out, in]`` of the newly pruned positions.
    """
    if len(shares) != params.n_patients:
        raise ValueError(f"share: need one per patient ({params.n_patients}), got {len(shares)}")
    layers = range(len(params.weights)) if layers is None else layers
    new = [torch.zeros_like(m, dtype=torch.bool) for m in params.masks]
    with torch.no_grad():
        for i in layers:
            w, m = params.weights[i], params.masks[i]
            for p, share in enumerate(shares):
                if not 0.0 <= share <= 1.0:
                    raise ValueError(f"share: must lie in [0, 1], got {share}")
                live = m[p] > 0
                if exclude is not None:
                    live &= ~exclude[i][p]
                n = int(live.sum())
                k = min(n, max(min_count, math.floor(share * n)))
                if k == 0:
                    continue
                mag = w[p].abs().double()
                threshold = torch.kthvalue(mag[live], k).values
                hit = live & (mag <= threshold)
                new[i][p] = hit
                m[p][hit] = 0.0
    params.apply_masks()
    return new


def random_positions(free: torch.Tensor, k: int, generator: torch.Generator) -> torch.Tensor:
    """A bool mask of ``k`` positions drawn uniformly without replacement among ``free`` (068E fact 3)."""
    idx = free.flatten().nonzero().flatten()
    k = min(k, idx.numel())
    order = torch.randperm(idx.numel(), generator=generator)[:k].to(idx.device)
    out = torch.zeros(free.numel(), dtype=torch.bool, device=free.device)
    out[idx[order]] = True
    return out.view_as(free)
