"""The smaller network a masked network is equivalent to while it trains without internal noise.

Pruning leaves many hidden units that do no per-sample work, and two kinds can be taken out of
the per-sample products without changing a single result beyond float rounding:

* **constant** units have no unmasked incoming weight, so their pre-activation is their bias and
  their activation is the same for every sample (``act(b) * scale - shift``). Their outgoing
  weights add one number per next-layer unit: folded into that unit's bias for the step, a
  matrix-vector product instead of a matrix-matrix one.
* **dead** units reach the output through no unmasked weight (directly, or only through other
  dead units). Their activations never matter and their gradients are exactly zero, so Adam, fresh
  for every :func:`~virtualpatient.network.train` call, leaves their weights where they are.

Everything else is **live**. A magnitude-pruned network at 95 % sparsity keeps about 11 % of
its dense products this way (most hidden units of the first layer are constant: the 2 -> 512 layer
keeps about 51 weights) and the ketamine-like network at 47.5 % about 56 %
(``docs/performance.md``). The engine trains the live block of every layer (dense or compressed,
padded to the largest patient), plus the constant units' outgoing weights as a flat list and
their biases, and writes the trained values back into the full tensors.

The reduction holds only while every unit of a layer sees the same value for every sample, so it
is used only for noise-free training (internal noise is drawn per unit and sample); evaluation
always runs the full network (it also reports every unit's activation magnitude).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["ConstantInputs", "Reduction", "UnitRoles", "unit_roles"]


@dataclass(frozen=True)
class UnitRoles:
    """Per hidden layer, which units are live, constant and dead (bool ``[P, units]`` each).

    Every unit has exactly one role; ``live | constant | dead`` is all ones.
    """

    live: list[torch.Tensor]
    constant: list[torch.Tensor]
    dead: list[torch.Tensor]

    def count(self, role: str) -> list[list[int]]:
        """Per hidden layer, per patient, how many units have ``role``."""
        return [t.sum(1).tolist() for t in getattr(self, role)]


def unit_roles(masks: Sequence[torch.Tensor]) -> UnitRoles:
    """Classify the hidden units of masked networks ``masks`` (``[P, out, in]`` per layer).

    A unit is *dead* when no unmasked weight leads from it to a unit that is not dead (the output
    units never are), found from the output backwards; *constant* when it is not dead and has no
    unmasked incoming weight; *live* otherwise.

    Examples
    --------
    >>> import torch
    >>> w1 = torch.tensor([[[1., 1.], [0., 0.], [1., 0.]]])  # 2 inputs -> 3 units; unit 1 has no inputs
    >>> w2 = torch.tensor([[[1., 1., 0.]]])                  # 3 units -> 1 output; unit 2 feeds nothing
    >>> roles = unit_roles([w1, w2])
    >>> roles.live[0].int().tolist(), roles.constant[0].int().tolist(), roles.dead[0].int().tolist()
    ([[1, 0, 0]], [[0, 1, 0]], [[0, 0, 1]])
    """
    kept = [m != 0 for m in masks]
    n_patients = kept[0].shape[0]
    needed = torch.ones(n_patients, kept[-1].shape[1], dtype=torch.bool, device=kept[-1].device)  # outputs
    dead: list[torch.Tensor] = []
    for layer in range(len(kept) - 1, 0, -1):  # layer l's inputs are the units of hidden layer l - 1
        dead.append(~(kept[layer] & needed.unsqueeze(2)).any(1))
        needed = ~dead[-1]
    dead.reverse()
    constant = [~kept[layer].any(2) & ~d for layer, d in enumerate(dead)]
    live = [~c & ~d for c, d in zip(constant, dead)]
    return UnitRoles(live, constant, dead)


def _padded_index(select: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per patient, the positions where ``select`` ``[P, U]`` is true, padded to the longest:
    ``(index [P, R], valid [P, R])`` (padding points at unit 0 and is not valid)."""
    counts = select.sum(1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~select).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=select.device).unsqueeze(0) < counts.unsqueeze(1)
    return order.masked_fill(~valid, 0), valid


@dataclass
class ConstantInputs:
    """The unmasked weights from one level's constant units into the next level's live units.

    A flat list (patient by patient, like compressed layer values): ``values[k]`` connects
    constant unit ``col[k]`` (an index into the flattened ``[P, K]`` constants) to live unit
    ``row[k]`` (into the flattened ``[P, R]`` live units); ``offsets`` are the patients' bounds.
    """

    values: torch.Tensor
    row: torch.Tensor
    col: torch.Tensor
    offsets: list[int]
    positions: torch.Tensor  # where each value sits in the flattened full weight tensor

    def bias(self, bias: torch.Tensor, const: torch.Tensor) -> torch.Tensor:
        """The live units' effective bias ``bias + W_c const`` (a new tensor, shaped like ``bias``)."""
        out = bias.detach().clone()
        out.view(-1).index_add_(0, self.row, self.values * const.reshape(-1).index_select(0, self.col))
        return out

    def backward(self, gbias: torch.Tensor, const: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(d values, d const)`` from the gradient of the effective bias (summed over samples)."""
        g = gbias.reshape(-1).index_select(0, self.row)
        gvalues = g * const.reshape(-1).index_select(0, self.col)
        gconst = torch.zeros(const.numel(), dtype=const.dtype, device=const.device)
        gconst.index_add_(0, self.col, g.mul_(self.values))
        return gvalues, gconst.view(const.shape)


class Reduction:
    """The live blocks of masked networks and the index maps back to the full tensors.

    Level 0 is the input, level ``L`` the output (all units live there), levels in between the
    hidden layers. Layer ``l`` maps level ``l`` to level ``l + 1``; its reduced form is

    * ``weight`` ``[P, R_out, R_in]``: live outputs x live inputs (dense, with ``mask``; padding
      rows and columns masked),
    * ``bias`` ``[P, R_out]``: the live outputs' biases,
    * ``inputs``: a :class:`ConstantInputs` from the constant units of level ``l`` (or ``None``),

    and each hidden level keeps its constant units' biases ``[P, K]`` (:meth:`constant_biases`).

    Parameters
    ----------
    weights, biases, masks
        The full networks (``[P, out, in]``, ``[P, out]``, as in ``Params``).
    roles
        Their :class:`UnitRoles` (computed from ``masks`` when not given).
    """

    def __init__(self, masks: Sequence[torch.Tensor], roles: UnitRoles | None = None) -> None:
        self.roles = roles if roles is not None else unit_roles(masks)
        self.shapes = [tuple(m.shape) for m in masks]
        n_patients, device = masks[0].shape[0], masks[0].device
        ones = [torch.ones(n_patients, masks[0].shape[2], dtype=torch.bool, device=device)]
        top = [torch.ones(n_patients, masks[-1].shape[1], dtype=torch.bool, device=device)]
        self.live = [_padded_index(s) for s in ones + self.roles.live + top]
        self.const = [_padded_index(s) for s in self.roles.constant]
        self._masks = list(masks)

    @property
    def n_layers(self) -> int:
        return len(self.shapes)

    def work_fraction(self) -> float:
        """Per-sample multiply-adds of the live blocks over those of the full layers."""
        full = sum(out * inp for _, out, inp in self.shapes)
        kept = sum(self.live[i + 1][0].shape[1] * self.live[i][0].shape[1] for i in range(self.n_layers))
        return kept / full

    def _block(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat positions in the full weight of the live block ``[P, R_out, R_in]`` and their validity."""
        p, n_out, n_in = self.shapes[layer]
        (rows, row_ok), (cols, col_ok) = self.live[layer + 1], self.live[layer]
        base = torch.arange(p, device=rows.device).view(-1, 1, 1) * (n_out * n_in)
        pos = base + rows.unsqueeze(2) * n_in + cols.unsqueeze(1)
        return pos, row_ok.unsqueeze(2) & col_ok.unsqueeze(1)

    def block(self, layer: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The live block of ``weight`` and its mask (copies; padding entries 0)."""
        pos, ok = self._block(layer)
        mask = self._masks[layer].reshape(-1)[pos] * ok
        return weight.detach().reshape(-1)[pos] * mask, mask

    def write_block(self, layer: int, block: torch.Tensor, weight: torch.Tensor) -> None:
        """Copy the valid entries of a live block back into the full ``weight`` (in place)."""
        pos, ok = self._block(layer)
        weight.view(-1).index_copy_(0, pos[ok], block.detach().reshape(-1)[ok.reshape(-1)].to(weight.dtype))

    def _units(self, level: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        index, ok = self.live[level] if kind == "live" else self.const[level - 1]
        width = self.shapes[level - 1][1]
        pos = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * width + index
        return pos, ok

    def unit_values(self, level: int, bias: torch.Tensor, kind: str = "live") -> torch.Tensor:
        """The biases ``[P, R]`` (``kind="live"``) or ``[P, K]`` (``"constant"``) of a level's units."""
        pos, ok = self._units(level, kind)
        return bias.detach().reshape(-1)[pos] * ok

    def write_units(self, level: int, values: torch.Tensor, bias: torch.Tensor, kind: str = "live") -> None:
        pos, ok = self._units(level, kind)
        bias.view(-1).index_copy_(0, pos[ok], values.detach()[ok].to(bias.dtype))

    def constant_inputs(self, layer: int, weight: torch.Tensor) -> ConstantInputs | None:
        """The unmasked weights of ``layer`` from level ``layer``'s constant units into live ones."""
        if layer == 0 or self.const[layer - 1][0].shape[1] == 0:
            return None
        p, n_out, n_in = self.shapes[layer]
        (rows, row_ok), (cols, col_ok) = self.live[layer + 1], self.const[layer - 1]
        base = torch.arange(p, device=rows.device).view(-1, 1, 1) * (n_out * n_in)
        pos = base + rows.unsqueeze(2) * n_in + cols.unsqueeze(1)
        keep = (self._masks[layer].reshape(-1)[pos] != 0) & row_ok.unsqueeze(2) & col_ok.unsqueeze(1)
        patient, r, k = keep.nonzero(as_tuple=True)  # patient-major order
        counts = torch.bincount(patient, minlength=p)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        positions = pos[patient, r, k]
        return ConstantInputs(values=weight.detach().reshape(-1)[positions].clone(), row=patient * rows.shape[1] + r,
                              col=patient * cols.shape[1] + k, offsets=offsets, positions=positions)
