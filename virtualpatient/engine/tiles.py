"""Zero-skipping tiles for a masked dense layer's products (``vp_dense_tiles``).

The ketamine-like arm trains its layers 52.5 % dense, too dense to store compressed. But its
regrowth is guided by gradient magnitude (DESIGN.md, protocol fact 8), and a weight's gradient is
a product of its output unit's error and its input unit's activation: the reinstated positions
gather in rows. In the full study's maintenance runs, 62 % of the rows of the 512 -> 512 layer's
live block keep more than 90 % of their inputs and 27 % fewer than 10 % (512 -> 256: 44 % and
40 %). Dense products multiply all those zeros all the same.

A :class:`TilePlan` groups a layer's rows six at a time (the kernel's register tile), densest
first, and lists for each tile the inputs any of its rows keeps; and groups its columns six at a
time, listing the rows any of them keeps. ``vp_dense_tiles`` then runs each output's chain of
fused multiply-adds over its tile's listed terms only, in the forward product ``W h`` (terms:
inputs) and the input gradient ``W^T gz`` (terms: outputs). A term whose weight is 0 adds nothing
to such a chain: ``fma(0, b, c) = c`` for finite ``b`` and nonzero ``c``, and for ``c = +0`` too,
so every output keeps its bits (only a chain that underflowed to ``-0`` could end as ``+0``
instead, a sign no later step can see). The weight gradient ``gz h^T`` is needed at the kept
entries only, as the layer is re-masked after every optimiser step: its nearly empty rows are
computed on the groups of eight columns where they keep an entry (:class:`GradientPairs`,
``vp_dense_wgrad``), the other rows in full.

Example
-------
>>> import torch
>>> mask = torch.zeros(1, 12, 10)
>>> mask[0, :6] = 1                      # six full rows, six empty ones
>>> plan = TilePlan(mask)
>>> plan.rows.n_tiles, plan.rows.full.tolist()
(2, [True, False])
"""

from __future__ import annotations

import torch

__all__ = ["TILE_ROWS", "GradientPairs", "TilePlan", "Tiles"]

#: Rows per tile: ``vp_dense``'s register tile height (kernels/dense.c).
TILE_ROWS = 6

#: A tile whose list holds at least this share of the terms runs the plain loop over all of them.
FULL_SHARE = 0.9

#: In the weight gradient, a row keeping an entry in fewer than this share of its groups of
#: columns is computed by pairs (row, group); the others in full tiles.
PAIR_SHARE = 0.5


def _count(keep: torch.Tensor) -> torch.Tensor:
    """Trues along the last axis, exact as float32 (below 2**24); bool sums are 5x slower in torch."""
    return keep.sum(-1, dtype=torch.float32)


class Tiles:
    """Tiles of rows of one side of a ``[P, rows, terms]`` keep-pattern, each with its own list.

    Attributes
    ----------
    table
        ``int32`` ``[n_tiles, 9]``: patient, number of rows (1-6), full (1: every term), then the
        rows' indices; the layout ``vp_dense_tiles`` reads.
    ptr, idx
        The lists, compressed by tile: tile ``t`` keeps terms ``idx[ptr[t]:ptr[t + 1]]``
        (ascending; empty for a full tile).
    full
        ``bool`` ``[n_tiles]``: the tiles that take every term.
    kept
        Share of the layer's products (rows x terms, all patients) that the tiles compute.
    """

    def __init__(self, keep: torch.Tensor, order: str) -> None:
        if keep.ndim != 3 or keep.dtype != torch.bool:
            raise ValueError(f"keep must be a bool tensor [P, rows, terms], got {keep.dtype} {tuple(keep.shape)}")
        if order not in ("densest", "index"):
            raise ValueError(f"order must be 'densest' or 'index', got {order!r}")
        n_patients, n_rows, n_terms = keep.shape
        rows = torch.arange(n_rows).expand(n_patients, n_rows)
        if order == "densest":  # similar rows share a tile; ties keep the rows' order
            rows = torch.sort(_count(keep), dim=1, descending=True, stable=True).indices
        pad = -n_rows % TILE_ROWS
        grouped = torch.cat([rows, rows.new_full((n_patients, pad), n_rows)], 1).view(n_patients, -1, TILE_ROWS)
        padded = torch.cat([keep, keep.new_zeros(n_patients, 1, n_terms)], 1)  # row n_rows: the zero row
        union = padded[torch.arange(n_patients).view(-1, 1, 1), grouped].any(2)  # [P, tiles, terms]
        n_kept = _count(union)
        full = n_kept >= FULL_SHARE * n_terms
        real = grouped < n_rows
        table = torch.zeros(*grouped.shape[:2], 3 + TILE_ROWS, dtype=torch.int32)
        table[..., 0] = torch.arange(n_patients, dtype=torch.int32).view(-1, 1)
        table[..., 1] = real.sum(2)
        table[..., 2] = full
        table[..., 3:] = grouped.masked_fill(~real, 0)
        listed = union & ~full.unsqueeze(2)
        self.table = table.view(-1, 3 + TILE_ROWS).contiguous()
        self.full = full.flatten()
        self.idx = listed.nonzero()[:, 2].to(torch.int32).contiguous()  # tile by tile, ascending within each
        self.ptr = torch.zeros(len(self.full) + 1, dtype=torch.int64)
        torch.cumsum(_count(listed).flatten().long(), 0, out=self.ptr[1:])
        work = torch.where(full, n_terms, n_kept) * table[..., 1]
        self.kept = float(work.sum()) / max(1, n_patients * n_rows * n_terms)

    @property
    def n_tiles(self) -> int:
        return self.table.shape[0]


class GradientPairs:
    """How ``vp_dense_wgrad`` covers a masked layer's weight gradient ``gz h^T`` ``[P, out, in]``.

    The rows that keep an entry in at least :data:`PAIR_SHARE` of their groups of ``group``
    columns go in full tiles of six (every column); each other row only on the pairs (row, group)
    where it keeps an entry, computed six pairs at a time. Columns are taken in panels of two
    groups, as the kernel packs them.

    Attributes
    ----------
    group, n_panels
        Columns per group; panels of two groups.
    table
        ``int32`` ``[n_tiles, 9]``: the full tiles, patient by patient (the layout of :class:`Tiles`).
    ptr, pairs
        Pairs by (patient, panel): those of panel ``q`` of patient ``p`` are the rows of ``pairs``
        (``int32`` ``[n, 2]``: row, group 0 or 1 in the panel) from ``ptr[p * n_panels + q]`` to
        ``ptr[p * n_panels + q + 1]``.
    kept
        Share of the dense gradient's products computed.
    """

    def __init__(self, keep: torch.Tensor, group: int) -> None:
        if keep.ndim != 3 or keep.dtype != torch.bool or group < 1:
            raise ValueError("keep must be a bool tensor [P, rows, columns] and group a positive width")
        n_patients, n_rows, n_cols = keep.shape
        n_groups = -(-n_cols // group)
        self.group, self.n_panels = group, -(-n_groups // 2)
        padded = torch.cat([keep, keep.new_zeros(n_patients, n_rows, n_groups * group - n_cols)], 2)
        groups = padded.view(n_patients, n_rows, n_groups, group).any(3)
        by_pairs = _count(groups) < PAIR_SHARE * n_groups
        tables = []
        for p in range(n_patients):
            rows = (~by_pairs[p]).nonzero().flatten()
            for t0 in range(0, len(rows), TILE_ROWS):
                chunk = rows[t0:t0 + TILE_ROWS]
                table = torch.zeros(3 + TILE_ROWS, dtype=torch.int32)
                table[0], table[1], table[2] = p, len(chunk), 1
                table[3:3 + len(chunk)] = chunk
                tables.append(table)
        self.table = torch.stack(tables) if tables else torch.zeros(0, 3 + TILE_ROWS, dtype=torch.int32)
        found = (groups & by_pairs.unsqueeze(2)).nonzero()  # (patient, row, group), by patient and row
        key = found[:, 0] * self.n_panels + found[:, 2] // 2
        order = torch.sort(key, stable=True).indices
        self.pairs = torch.stack([found[order, 1], found[order, 2] % 2], 1).to(torch.int32).contiguous()
        self.ptr = torch.zeros(n_patients * self.n_panels + 1, dtype=torch.int64)
        torch.cumsum(torch.bincount(key, minlength=n_patients * self.n_panels), 0, out=self.ptr[1:])
        work = int(self.table[:, 1].sum()) * n_cols + len(self.pairs) * group
        self.kept = work / max(1, n_patients * n_rows * n_cols)


class TilePlan:
    """The tiles of a masked dense layer ``W`` ``[P, out, in]`` for its three products.

    ``rows``: tiles of ``W``'s rows, densest first, each with the inputs any of its rows keeps
    (the terms of the forward product ``W h``). ``cols``: tiles of six consecutive columns of
    ``W``, each with the rows any of them keeps (the terms of the input gradient ``W^T gz``).

    Parameters
    ----------
    mask
        The layer's mask ``[P, out, in]``; the weights must be 0 wherever it is.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.ndim != 3:
            raise ValueError(f"mask must be [P, out, in], got shape {tuple(mask.shape)}")
        keep = (mask != 0).cpu()
        self.shape = tuple(mask.shape)
        self.rows = Tiles(keep, "densest")
        self.cols = Tiles(keep.transpose(1, 2), "index")
        self._keep = keep
        self._pairs: dict[int, GradientPairs] = {}
        self._gradient: torch.Tensor | None = None

    def pairs(self, group: int) -> GradientPairs:
        """The weight gradient's :class:`GradientPairs` for groups of ``group`` columns (made once)."""
        if group not in self._pairs:
            self._pairs[group] = GradientPairs(self._keep, group)
        return self._pairs[group]

    def gradient_buffer(self, like: torch.Tensor) -> torch.Tensor:
        """A zeroed ``[P, out, in]`` tensor the weight gradient is written into, step after step:
        the entries no pair covers stay 0 (masked weights: their gradient is never used)."""
        if self._gradient is None or self._gradient.dtype != like.dtype or self._gradient.device != like.device:
            self._gradient = torch.zeros(self.shape, dtype=like.dtype, device=like.device)
        return self._gradient

    @property
    def kept(self) -> float:
        """Share of a dense layer's forward and input-gradient products that the plan computes."""
        return (self.rows.kept + self.cols.kept) / 2

    def __repr__(self) -> str:
        return (f"TilePlan({self.shape}, rows {self.rows.n_tiles} tiles ({self.rows.kept:.0%} of the products), "
                f"cols {self.cols.n_tiles} tiles ({self.cols.kept:.0%}))")
