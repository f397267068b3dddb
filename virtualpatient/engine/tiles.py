"""Zero-skipping tiles for a masked dense layer's products (``vp_dense_tiles``).

The ketamine-like arm trains its layers 52.5 % dense, too dense to store compressed. But its
regrowth is guided by gradient magnitude (DESIGN.md, protocol fact 8), and a weight's gradient is
a product of its output unit's error and its input unit's activation: the reinstated positions
gather in rows. In the full study's maintenance runs the rows of the 512 -> 512 and 512 -> 256
layers' live blocks are either almost full (94-98 % kept) or almost empty (1-3 %). Dense products
spend half their work on such rows' zeros.

A :class:`TilePlan` groups a layer's rows six at a time (the kernel's register tile), densest
first, and lists for each tile the inputs any of its rows keeps; and groups its columns six at a
time, listing the rows any of them keeps. ``vp_dense_tiles`` then runs each output's chain of
fused multiply-adds over its tile's listed terms only, in the forward product ``W h`` (terms:
inputs) and the input gradient ``W^T gz`` (terms: outputs). A term whose weight is 0 adds nothing
to such a chain (``fma(0, b, c) = c`` for finite ``b``, and the chain never holds ``-0``), so
every output keeps its value bit for bit. The weight gradient ``gz h^T`` stays dense: a tile of
sparse rows still keeps some input in nearly every block of columns, and gathering them cost more
than it saved (docs/performance.md).

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

__all__ = ["TILE_ROWS", "TilePlan", "Tiles"]

#: Rows per tile: ``vp_dense``'s register tile height (kernels/dense.c).
TILE_ROWS = 6

#: A tile whose list holds at least this share of the terms runs the plain loop over all of them.
FULL_SHARE = 0.9


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

    @property
    def kept(self) -> float:
        """Share of a dense layer's forward and input-gradient products that the plan computes."""
        return (self.rows.kept + self.cols.kept) / 2

    def __repr__(self) -> str:
        return (f"TilePlan({self.shape}, rows {self.rows.n_tiles} tiles ({self.rows.kept:.0%} of the products), "
                f"cols {self.cols.n_tiles} tiles ({self.cols.kept:.0%}))")
