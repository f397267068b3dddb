"""The smaller network a masked network is equivalent to while it trains without internal noise.

Pruning leaves many hidden units that do no per-sample work, and two kinds can be taken out of
the per-sample products without changing a single result beyond float rounding:

* **constant** units have no unmasked incoming weight, so their pre-activation is their bias and
  their activation is the same for every sample (``act(b) * scale - shift``). Their outgoing
  weights add one number per next-layer unit: folded into that unit's bias for the step, a
  matrix-vector product instead of a matrix-matrix one.
* **dead** units reach the output through no unmasked weight (directly, or only through other
  dead units). Their activations never matter and their gradients are exactly zero, so Adam, fresh
  for every :func:`~virtualpatient.engine.batched.train` call, leaves their weights where they are.

Everything else is **live**. A magnitude-pruned network at 95 % sparsity keeps about 11 % of
its dense products this way (most hidden units of the first layer are constant: the 2 -> 512 layer
keeps about 51 weights) and the ketamine-like network at 47.5 % about 56 %
(``docs/performance.md``). The engine trains the live block of every layer (dense or compressed,
padded to the largest patient), plus the constant units' outgoing weights as a layer of their own
(applied to the constants as a batch of one sample) and their biases, and writes the trained
values back into the full tensors.

The reduction holds only while every unit of a layer sees the same value for every sample, so it
is used only for noise-free training (internal noise is drawn per unit and sample); evaluation
always runs the full network (it also reports every unit's activation magnitude).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = ["Reduction", "UnitRoles", "unit_roles"]


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


class Reduction:
    """The live blocks of masked networks and the index maps back to the full tensors.

    Level 0 is the input, level ``L`` the output (all units live there), levels in between the
    hidden layers. Layer ``l`` maps level ``l`` to level ``l + 1``; its reduced form is

    * the live block ``[P, R_out, R_in]``: weights from live units to live units,
    * the constant block ``[P, R_out, K_in]``: weights from the constant units of level ``l``
      into live units (for layers ``l >= 1`` whose input level has constant units),
    * the live units' biases ``[P, R_out]``,

    and each hidden level keeps its constant units' biases ``[P, K]``. Every block is padded to
    the patient with the most units; padding rows and columns are masked (mask 0, value 0).

    Parameters
    ----------
    masks
        The networks' masks, ``[P, out, in]`` per layer (as in ``Params``).
    roles
        Their :class:`UnitRoles` (computed from ``masks`` when not given).
    """

    def __init__(self, masks: Sequence[torch.Tensor], roles: UnitRoles | None = None) -> None:
        self.roles = roles if roles is not None else unit_roles(masks)
        self.shapes = [tuple(m.shape) for m in masks]
        n_patients, device = masks[0].shape[0], masks[0].device
        inputs = torch.ones(n_patients, masks[0].shape[2], dtype=torch.bool, device=device)
        outputs = torch.ones(n_patients, masks[-1].shape[1], dtype=torch.bool, device=device)
        self.live = [_padded_index(s) for s in [inputs, *self.roles.live, outputs]]
        self.const = [(inputs[:, :0].long(), inputs[:, :0])] + [_padded_index(s) for s in self.roles.constant]
        self._masks = list(masks)
        self._positions: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    @property
    def n_layers(self) -> int:
        return len(self.shapes)

    def work_fraction(self) -> float:
        """Per-sample multiply-adds of the live blocks over those of the full layers."""
        full = sum(out * inp for _, out, inp in self.shapes)
        kept = sum(self.live[i + 1][0].shape[1] * self.live[i][0].shape[1] for i in range(self.n_layers))
        return kept / full

    def has_constant_inputs(self, layer: int) -> bool:
        """Whether any patient has constant units in ``layer``'s input level."""
        return self.const[layer][0].shape[1] > 0

    def _block(self, layer: int, inputs: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a block ``[P, R_out, R_in or K_in]``: the flat position in the full weight of each of
        its entries, their validity, and the flat indices of the valid ones."""
        if inputs not in ("live", "constant"):
            raise ValueError(f"inputs must be 'live' or 'constant', got {inputs!r}")
        key = (layer, inputs)
        if key not in self._positions:
            p, n_out, n_in = self.shapes[layer]
            rows, row_ok = self.live[layer + 1]
            cols, col_ok = self.live[layer] if inputs == "live" else self.const[layer]
            base = torch.arange(p, device=rows.device).view(-1, 1, 1) * (n_out * n_in)
            pos = base + rows.unsqueeze(2) * n_in + cols.unsqueeze(1)
            ok = row_ok.unsqueeze(2) & col_ok.unsqueeze(1)
            self._positions[key] = (pos, ok, ok.reshape(-1).nonzero().flatten())
        return self._positions[key]

    def block(self, layer: int, weight: torch.Tensor, inputs: str = "live") -> tuple[torch.Tensor, torch.Tensor]:
        """The block of ``weight`` from the ``inputs`` (``"live"`` or ``"constant"``) units of its
        input level into the live units of its output level, and its mask (copies; padding 0)."""
        pos, ok, _ = self._block(layer, inputs)
        mask = self._masks[layer].reshape(-1)[pos] * ok
        return weight.detach().reshape(-1)[pos] * mask, mask

    def write_block(self, layer: int, block: torch.Tensor, weight: torch.Tensor, inputs: str = "live",
                    entries: torch.Tensor | None = None) -> None:
        """Copy a block back into the full ``weight`` (in place): its valid entries, or with
        ``entries`` (flat indices into the block) ``block`` holds just those entries' values."""
        pos, _, valid = self._block(layer, inputs)
        if entries is None:
            weight.view(-1).index_copy_(0, pos.reshape(-1)[valid], block.detach().reshape(-1)[valid].to(weight.dtype))
        else:
            weight.view(-1).index_copy_(0, pos.reshape(-1)[entries], block.detach().to(weight.dtype))

    def _units(self, level: int, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
        index, ok = self.live[level] if kind == "live" else self.const[level]
        width = self.shapes[level - 1][1]
        pos = torch.arange(index.shape[0], device=index.device).unsqueeze(1) * width + index
        return pos, ok

    def unit_values(self, level: int, bias: torch.Tensor, kind: str = "live") -> torch.Tensor:
        """The biases ``[P, R]`` (``kind="live"``) or ``[P, K]`` (``"constant"``) of a level's units;
        ``bias`` is the full bias of the layer that computes the level."""
        pos, ok = self._units(level, kind)
        return bias.detach().reshape(-1)[pos] * ok

    def write_units(self, level: int, values: torch.Tensor, bias: torch.Tensor, kind: str = "live") -> None:
        """Copy the valid entries of :meth:`unit_values`-shaped ``values`` back into ``bias`` (in place)."""
        pos, ok = self._units(level, kind)
        bias.view(-1).index_copy_(0, pos[ok], values.detach()[ok].to(bias.dtype))
