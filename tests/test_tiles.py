"""Zero-skipping tiles (``engine/tiles.py``, ``vp_dense_tiles``) give ``vp_dense``'s numbers, bit for bit.

A masked dense layer's forward product and input gradient may leave out the terms whose weight is
0 in every row of a tile: a fused multiply-add chain does not change when a zero term is dropped.
The tests build masks like the ketamine-like arm's (rows nearly full or nearly empty, some rows
empty), compare the tiles' products with ``vp_dense`` by exact equality for every instruction-set
build, and train a reduced network with and without the tiles.
"""

from __future__ import annotations

import pytest
import test_isa_kernels as isa
import test_reduction as red
import torch

from virtualpatient.engine import batched, native, ops
from virtualpatient.engine.settings import engine_options
from virtualpatient.engine.tiles import FULL_SHARE, PAIR_SHARE, TILE_ROWS, GradientPairs, TilePlan, Tiles

libraries = isa.libraries
target = isa.target

needs_kernels = pytest.mark.skipif(not native.kernels_available(), reason="needs the native kernels")


def _rowwise_mask(n_patients: int, n_out: int, n_in: int, seed: int) -> torch.Tensor:
    """About 60 % of rows 95 % kept, the others 3 %; the last three rows empty (a padded block)."""
    gen = torch.Generator().manual_seed(seed)
    full_rows = torch.rand(n_patients, n_out, 1, generator=gen) < 0.6
    kept = torch.rand(n_patients, n_out, n_in, generator=gen)
    mask = torch.where(full_rows, kept < 0.95, kept < 0.03).float()
    mask[:, -3:] = 0
    return mask


def test_plan_covers_every_row_once_with_the_union_of_its_rows():
    """Each row is in exactly one tile of at most six; a listed tile's terms are the ascending union
    of its rows' kept terms; a full tile is one whose union holds at least ``FULL_SHARE``; rows come
    densest first; the column tiles are six consecutive columns."""
    mask = _rowwise_mask(2, 47, 31, seed=1)
    plan = TilePlan(mask)
    for tiles, keep in ((plan.rows, mask != 0), (plan.cols, (mask != 0).transpose(1, 2))):
        seen = torch.zeros(keep.shape[:2], dtype=torch.int64)
        for t in range(tiles.n_tiles):
            p, n_rows, full = tiles.table[t, :3].tolist()
            rows = tiles.table[t, 3:3 + n_rows].long()
            assert 1 <= n_rows <= TILE_ROWS
            seen[p, rows] += 1
            union = keep[p, rows].any(0)
            listed = tiles.idx[tiles.ptr[t]:tiles.ptr[t + 1]].long()
            if full:
                assert len(listed) == 0 and union.sum() >= FULL_SHARE * keep.shape[2]
            else:
                assert torch.equal(listed, union.nonzero().flatten())
        assert bool((seen == 1).all())
    density = (mask[0] != 0).sum(1)
    first_rows = plan.rows.table[plan.rows.table[:, 0] == 0, 3:].flatten()[:mask.shape[1]].long()
    assert bool((density[first_rows].diff() <= 0).all())  # densest first (no padding before the last tile)
    assert plan.cols.table[0, 3:].tolist() == list(range(6))
    assert 0.5 < plan.kept < 0.8


def test_gradient_pairs_cover_every_kept_entry():
    """Every kept entry of the mask lies in a full tile's row or in a pair (row, group of columns);
    pair rows keep an entry in fewer than ``PAIR_SHARE`` of their groups; each pair's group keeps
    an entry; pairs are listed by patient and panel of two groups."""
    mask = _rowwise_mask(2, 47, 37, seed=3)
    keep = mask != 0
    group = 8
    pairs = GradientPairs(keep, group)
    covered = torch.zeros_like(keep)
    for t in range(pairs.table.shape[0]):
        p, n_rows, full = pairs.table[t, :3].tolist()
        assert full == 1 and 1 <= n_rows <= TILE_ROWS
        covered[p, pairs.table[t, 3:3 + n_rows].long()] = True
    full_rows = covered.any(2)
    n_groups = -(-37 // group)
    for p in range(2):
        for q in range(pairs.n_panels):
            first, last = pairs.ptr[p * pairs.n_panels + q], pairs.ptr[p * pairs.n_panels + q + 1]
            for row, sub in pairs.pairs[first:last].tolist():
                cols = slice((2 * q + sub) * group, (2 * q + sub + 1) * group)
                assert not full_rows[p, row] and bool(keep[p, row, cols].any())
                covered[p, row, cols] = True
    assert bool(covered[keep].all())
    groups = torch.nn.functional.pad(keep, (0, n_groups * group - 37)).view(2, 47, n_groups, group).any(3)
    assert bool((groups.float().mean(2)[~full_rows] < PAIR_SHARE).all())
    assert pairs.kept < 0.8


def test_plan_rejects_bad_input():
    """Masks that are not ``[P, out, in]`` and keep patterns that are not bool are refused with a message."""
    with pytest.raises(ValueError, match=r"\[P, out, in\]"):
        TilePlan(torch.ones(4, 4))
    with pytest.raises(ValueError, match="bool"):
        Tiles(torch.ones(1, 4, 4), "densest")
    with pytest.raises(ValueError, match="order"):
        Tiles(torch.ones(1, 4, 4, dtype=torch.bool), "sparsest")


@needs_kernels
@pytest.mark.parametrize("shape", [(458, 276, 128), (167, 458, 96), (37, 45, 19), (13, 300, 7), (50, 7, 40),
                                   (600, 40, 17)])
def test_tiles_equal_vp_dense(target, shape):
    """Forward with bias and input gradient (read through ``W^T``: each tile's terms packed into a
    strip, 512 terms at a time, so 600 output rows take two): the same bits as ``vp_dense`` on
    every build, for vector tails of 8 and 16 floats; the rows of a forward product are all
    written, the empty ones with the bias alone."""
    n_out, n_in, n = shape
    mask = _rowwise_mask(3, n_out, n_in, seed=sum(shape))
    gen = torch.Generator().manual_seed(7)
    w = torch.randn(3, n_out, n_in, generator=gen) * mask
    b, x = torch.randn(3, n_out, generator=gen), torch.randn(3, n_in, n, generator=gen)
    g = torch.randn(3, n_out, n, generator=gen)
    plan = TilePlan(mask)
    nan = float("nan")
    z = native.dense_tiles(w, x, torch.full((3, n_out, n), nan), plan.rows, b)
    gx = native.dense_tiles(w.transpose(1, 2), g, torch.full((3, n_in, n), nan), plan.cols)
    assert torch.equal(z, native.dense(w, x, torch.empty(3, n_out, n), b))
    assert torch.equal(gx, native.dense(w.transpose(1, 2), g, torch.empty(3, n_in, n)))
    assert plan.kept < 0.85


@needs_kernels
@pytest.mark.parametrize("shape", [(458, 276, 128), (167, 458, 96), (37, 45, 19), (30, 17, 33), (20, 9, 5)])
def test_weight_gradient_by_pairs_equals_vp_dense(target, shape):
    """``vp_dense_wgrad``: at every kept entry the bits of ``vp_dense``'s weight gradient, on every
    build and panel width (full, one vector, a partial one); elsewhere those bits or the buffer's 0."""
    n_out, n_in, n = shape
    mask = _rowwise_mask(3, n_out, n_in, seed=n_out + n)
    gen = torch.Generator().manual_seed(12)
    g, x = torch.randn(3, n_out, n, generator=gen), torch.randn(3, n_in, n, generator=gen)
    pairs = TilePlan(mask).pairs(native.dense_group_width())
    mine = native.dense_wgrad(g, x.transpose(1, 2), torch.zeros(3, n_out, n_in), pairs)
    theirs = native.dense(g, x.transpose(1, 2), torch.empty(3, n_out, n_in))
    keep = mask != 0
    assert torch.equal(mine[keep], theirs[keep])
    assert bool(((mine == theirs) | (mine == 0))[~keep].all())
    with pytest.raises(ValueError, match="groups of 3"):
        native.dense_wgrad(g, x.transpose(1, 2), torch.zeros(3, n_out, n_in), TilePlan(mask).pairs(3))


@needs_kernels
def test_tiles_split_over_threads_give_the_same_products():
    """With two torch threads the tiles (and the weight gradient's patients) are split over the
    pool: the same bits as one thread."""
    mask = _rowwise_mask(6, 200, 180, seed=4)
    gen = torch.Generator().manual_seed(8)
    w, x = torch.randn(6, 200, 180, generator=gen) * mask, torch.randn(6, 180, 128, generator=gen)
    g = torch.randn(6, 200, 128, generator=gen)
    plan = TilePlan(mask)
    pairs = plan.pairs(native.dense_group_width())
    threads = torch.get_num_threads()
    results = []
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            results.append((native.dense_tiles(w, x, torch.empty(6, 200, 128), plan.rows),
                            native.dense_wgrad(g, x.transpose(1, 2), torch.zeros(6, 200, 180), pairs)))
        assert len(native._split_blocks(plan.rows.n_tiles, 6 * 200 * 180 * 128)) == 2
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results):
        assert torch.equal(one, two)


def _rowwise_params(seed: int):
    """:func:`test_reduction._params`, its two middle layers' masks made row-wise (as after
    gradient-guided regrowth)."""
    params = red._params(seed)
    for i in (1, 2):
        m = params.masks[i]
        m.mul_(_rowwise_mask(*m.shape, seed=seed + i))
        params.weights[i].mul_(m)
    return params


@needs_kernels
def test_training_with_tiles_is_bit_identical(monkeypatch):
    """Three epochs of a reduced row-wise network through ``vp_dense``, without and with the tiles:
    the same weights and biases (``torch.equal``; a masked weight's zero may differ in sign, as the
    weight gradient by pairs leaves masked entries at 0), and the tiles were really used."""
    if not ops.dense_matches_onednn():
        pytest.skip("vp_dense is not used here (no fast kernel, or oneDNN sums in another order)")
    calls = []
    real = native.dense_tiles
    monkeypatch.setattr(native, "dense_tiles", lambda *a, **k: calls.append(1) or real(*a, **k))
    options = {"sparse_backend": "off", "onednn_min_weights": 0, "native_dense": True}
    start = _rowwise_params(6)
    base, _ = red._train(start.clone(), {**options, "skip_zeros": False})
    assert not calls
    mine, _ = red._train(start.clone(), {**options, "skip_zeros": True})
    assert calls
    for a, c in zip(base.weights + base.biases, mine.weights + mine.biases):
        assert torch.equal(a, c)
    for a, c, m in zip(base.weights, mine.weights, mine.masks):  # bit for bit where kept
        assert torch.equal(torch.signbit(a[m != 0]), torch.signbit(c[m != 0]))


def test_a_layer_with_a_nonzero_masked_weight_gets_no_tiles():
    """The tiles would leave a masked weight out, so a layer holding one (not this engine's state,
    but a user's) computes every term; an unmasked layer has no tiles either."""
    params = _rowwise_params(2)
    layer = batched._Layer(params.weights[1], params.masks[1], "off", params.biases[1])
    assert isinstance(layer.tiles(), TilePlan)
    w = params.weights[1].clone()
    w[params.masks[1] == 0] = 1e-3
    assert batched._Layer(w, params.masks[1], "off", params.biases[1]).tiles() is None
    ones = torch.ones_like(params.masks[1])
    assert batched._Layer(params.weights[1], ones, "off", params.biases[1]).tiles() is None
    with engine_options(skip_zeros=False):
        assert batched._Layer(params.weights[1], params.masks[1], "off", params.biases[1]).tiles() is None


@needs_kernels
@pytest.mark.parametrize("n", [600, 4000])
def test_wide_forward_takes_tiles_and_equals_onednn(n):
    """An evaluation's forward product (more samples than a training batch) runs the tiles in
    blocks of columns, the last one partial: the same bits as oneDNN's product plus the bias,
    which computes it otherwise (and ``dense_products`` then hands the layer to the tiles)."""
    if not ops.dense_matches_onednn():
        pytest.skip("vp_dense is not used here (no fast kernel, or oneDNN sums in another order)")
    mask = _rowwise_mask(2, 512, 512, seed=n)
    gen = torch.Generator().manual_seed(9)
    w, b = torch.randn(2, 512, 512, generator=gen) * mask, torch.randn(2, 512, generator=gen)
    x = torch.randn(2, 512, n, generator=gen)
    plan = TilePlan(mask)
    with engine_options(native_dense=True):
        assert ops.dense_products(w, x, tiles=lambda: plan) is None
        mine = ops.dense_forward(w, b, x, tiles=lambda: plan)
    with engine_options(native_dense=False):
        theirs = ops.dense_products(w, x, tiles=lambda: plan)
    for p in range(2):
        assert torch.equal(mine[p], theirs[p] + b[p].unsqueeze(1))
