"""The engine's optimiser: Adam over stacked parameters, one learning rate per patient."""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch

__all__ = ["FUSED_ADAM", "BatchedAdam"]

#: ``False`` forces the plain elementwise Adam update (for tests and benchmarks); by default torch's
#: fused kernel is used where it works.
FUSED_ADAM: bool | None = None


@functools.cache
def _fused_adam_works() -> bool:
    """Whether torch's fused Adam kernel runs here (checked once, on first use)."""
    if not hasattr(torch, "_fused_adam_"):
        return False
    try:
        t, g = torch.ones(3), torch.ones(3)
        torch._fused_adam_([t], [g], [torch.zeros(3)], [torch.zeros(3)], [], [torch.ones(())], lr=0.1, beta1=0.9,
                           beta2=0.999, weight_decay=0.0, eps=1e-8, amsgrad=False, maximize=False)
        return bool(torch.isfinite(t).all())
    except (RuntimeError, TypeError):  # pragma: no cover - old torch
        return False



class BatchedAdam:
    """Adam over stacked parameters with a per-patient learning rate.

    The update is torch's ``Adam`` (no weight decay, no amsgrad), elementwise, so each patient's
    slice moves exactly as if it were optimised alone. A fresh instance is a fresh optimiser.

    Parameters
    ----------
    tensors
        Parameters; by default each has a leading patient axis.
    lr
        One learning rate, or one per patient ``[P]``.
    segments
        Per tensor, ``None`` (leading patient axis) or the ``P + 1`` offsets of a flat tensor that
        holds the patients one after another (compressed layer values).

    Notes
    -----
    Uses torch's fused CPU/GPU Adam kernel (one pass over memory instead of eight; the same update
    as ``torch.optim.Adam(fused=True)``) when available, with one call per distinct learning rate.
    """

    def __init__(self, tensors: Sequence[torch.Tensor], lr: torch.Tensor | float,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 segments: Sequence[Sequence[int] | None] | None = None) -> None:
        self.tensors = list(tensors)
        self.segments = list(segments) if segments is not None else [None] * len(self.tensors)
        n = self._n_patients()
        lr = torch.as_tensor(lr, dtype=torch.float32, device=self.tensors[0].device)
        self.lr = lr.expand(n) if lr.ndim == 0 else lr
        if self.lr.shape != (n,):
            raise ValueError(f"need one learning rate or one per patient ({n}), got shape {tuple(self.lr.shape)}")
        self.beta1, self.beta2 = betas
        self.eps = eps
        self.step_count = 0
        self.exp_avg = [torch.zeros_like(t) for t in self.tensors]
        self.exp_avg_sq = [torch.zeros_like(t) for t in self.tensors]
        self._step_t = torch.zeros((), dtype=torch.float32, device=self.tensors[0].device)
        lrs = self.lr.tolist()
        self._groups = {v: [p for p, w in enumerate(lrs) if w == v] for v in dict.fromkeys(lrs)}
        self._views: dict[int, tuple[list[torch.Tensor], ...]] = {}

    def _n_patients(self) -> int:
        for t, seg in zip(self.tensors, self.segments):
            return t.shape[0] if seg is None else len(seg) - 1
        raise ValueError("BatchedAdam needs at least one tensor")

    def _split(self, tensors: Sequence[torch.Tensor], patients: list[int]) -> list[torch.Tensor]:
        out = []
        for t, seg in zip(tensors, self.segments):
            for p in patients:
                out.append(t[p] if seg is None else t[seg[p]:seg[p + 1]])
        return out

    def _per_patient(self, k: int) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
        """Per-patient views of tensor ``k`` and its two moments (made once)."""
        views = self._views.get(k)
        if views is None:
            views = self._views[k] = tuple(list(t.unbind(0)) for t in (self.tensors[k], self.exp_avg[k],
                                                                         self.exp_avg_sq[k]))
        return views

    def _whole(self, grads) -> tuple[list[torch.Tensor], ...]:
        """The four lists for one fused call over all patients: each tensor whole, or its per-patient
        slices where its gradient is a list of them."""
        lists: tuple[list[torch.Tensor], ...] = ([], [], [], [])
        for k, g in enumerate(grads):
            if isinstance(g, torch.Tensor):
                parts = ([self.tensors[k]], [g], [self.exp_avg[k]], [self.exp_avg_sq[k]])
            else:
                t, m, v = self._per_patient(k)
                parts = (t, list(g), m, v)
            for whole, part in zip(lists, parts):
                whole.extend(part)
        return lists

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor | Sequence[torch.Tensor]]) -> None:
        """One update. ``grads[k]`` matches ``tensors[k]``, or is the list of its per-patient slices'
        gradients (a tensor with a leading patient axis only): the fused kernel then updates those
        slices one by one, which gives the same numbers (it is elementwise) without stacking them."""
        self.step_count += 1
        if any(seg is not None and not isinstance(g, torch.Tensor) for g, seg in zip(grads, self.segments)):
            raise ValueError("per-patient gradient lists are for tensors with a leading patient axis")
        if _fused_adam_works() and FUSED_ADAM is not False:
            self._step_t.fill_(self.step_count)
            for lr, patients in self._groups.items():
                lists = self._whole(grads) if len(self._groups) == 1 else \
                    tuple(self._split(ts, patients) for ts in (self.tensors, grads, self.exp_avg, self.exp_avg_sq))
                lists[1][:] = [g.contiguous() for g in lists[1]]
                torch._fused_adam_(*lists, [], [self._step_t] * len(lists[0]), lr=lr, beta1=self.beta1,
                                   beta2=self.beta2, weight_decay=0.0, eps=self.eps, amsgrad=False, maximize=False)
            return
        grads = [g.contiguous() if isinstance(g, torch.Tensor) else torch.stack(list(g)) for g in grads]
        bc1 = 1 - self.beta1 ** self.step_count
        bc2_sqrt = math.sqrt(1 - self.beta2 ** self.step_count)
        for t, g, m, v, seg in zip(self.tensors, grads, self.exp_avg, self.exp_avg_sq, self.segments):
            m.lerp_(g, 1 - self.beta1)
            v.mul_(self.beta2).addcmul_(g, g, value=1 - self.beta2)
            denom = (v.sqrt() / bc2_sqrt).add_(self.eps)
            step_size = (self.lr / bc1).to(t.dtype)
            if seg is None:
                step_size = step_size.view(-1, *([1] * (t.ndim - 1)))
            else:
                step_size = step_size.repeat_interleave(torch.tensor(seg, device=t.device).diff())
            t.addcdiv_(m * step_size, denom, value=-1.0)

