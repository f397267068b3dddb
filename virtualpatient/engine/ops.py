"""The engine's operations, without autograd: one layer's products and a hidden layer's fused steps.

Compressed masked layers: the unmasked weights of P patients as one block-diagonal CSR matrix.

After the lesion a layer keeps 5 % of its weights (47.5 % after ketamine-like regrowth), and the
masks never change during training (fact 8: "the mask is then locked"). Storing only the unmasked
weights, and multiplying with them directly, does a twentieth of the dense work at 95 % sparsity.

Layout
------
Activations travel *transposed*, ``[P, units, n]`` (the ``n`` samples contiguous), so one row of the
input is a contiguous run of ``n`` floats and a sparse row times the input is a sum of scaled
contiguous rows (vectorised over samples). The P patients' masks form one block-diagonal CSR
matrix of shape ``[P * out, P * in]``: row ``p * out + r`` holds patient ``p``'s unit ``r``. The
values of all patients are one flat tensor, patient by patient, so patient ``p``'s values are the
contiguous slice ``offsets[p]:offsets[p + 1]``.

For a layer ``z = W h + b`` with ``W`` given by the pattern and ``values``:

* forward: ``z[r, :] = b[r] + sum_k values[k] * h[col[k], :]`` (SpMM);
* input gradient: ``dh = W^T dz`` (SpMM with the transposed pattern, values permuted);
* value gradient: ``dvalues[k] = sum_s dz[row[k], s] * h[col[k], s]`` (sampled dense-dense product:
  only the unmasked entries of the dense ``dz h^T`` are computed), which is exactly the dense weight
  gradient at the unmasked positions; masked positions have no value and so can never revive.

Each output entry is a sum over its own row only, in a fixed order, so a patient's numbers do not
depend on which patients it is batched with.

Kernels
-------
``native``: the C kernels of :mod:`virtualpatient.engine.native` (``kernels/products.c``: the
three products; ``kernels/elementwise.c``: the elementwise steps of a hidden layer fused into
single passes, :func:`post_activation`, :func:`pre_activation_grad`, :func:`add_noise_t`, whose
order :mod:`virtualpatient.engine.hidden` defines). ``torch``: ``torch.sparse`` CSR products and
torch elementwise ops (any device, slower on CPU). :func:`~virtualpatient.engine.native.backend`
chooses (``VIRTUALPATIENT_SPARSE``).

Dense layers (the ketamine-like arm's 52.5 % dense ones) use one oneDNN matmul per patient on CPU
(:func:`dense_forward`, :func:`dense_backward`): MKL's batched matmul runs its AVX2 code on AMD
CPUs, oneDNN its AVX-512 code (1.8x faster here; docs/performance.md).
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable, Sequence

import torch

from virtualpatient.engine import native, settings
from virtualpatient.engine.tiles import TilePlan

__all__ = [
    "Pattern",
    "add_noise_t",
    "dense_backward",
    "dense_forward",
    "dense_linear_t",
    "dense_products",
    "normal_",
    "onednn_available",
    "post_activation",
    "pre_activation_grad",
    "scale_shift_",
    "sparse_backward",
    "sparse_forward",
    "sparse_linear_t",
    "sparse_linear_t_out",
]


def _rowwise(t: torch.Tensor) -> torch.Tensor:
    """``t`` as a 2-D tensor whose rows are contiguous runs (a copy only when needed)."""
    t = t.reshape(-1, t.shape[-1])
    return t if t.stride(-1) == 1 else t.contiguous()

# --------------------------------------------------------------------------------------------
# The pattern
# --------------------------------------------------------------------------------------------
class Pattern:
    """The block-diagonal CSR structure of P stacked masks ``[P, out, in]`` (and its transpose).

    Attributes
    ----------
    ptr, col
        CSR row pointers ``[P * out + 1]`` and global column indices ``[nnz]`` (patient ``p``'s
        column ``c`` is ``p * in + c``), row-major order, patient by patient.
    row
        Global row of every entry ``[nnz]``.
    flat
        Position of every entry in the flattened ``[P, out, in]`` weight tensor.
    ptr_t, row_t, perm_t
        The transpose: pointers over the ``P * in`` columns, the row of each entry and the entry's
        index into ``values``.
    offsets
        ``[P + 1]``: patient ``p``'s values are ``values[offsets[p]:offsets[p + 1]]``.
    """

    def __init__(self, mask: torch.Tensor) -> None:
        if mask.ndim != 3:
            raise ValueError(f"a mask must be [P, out, in], got shape {tuple(mask.shape)}")
        p, n_out, n_in = mask.shape
        self.n_patients, self.n_out, self.n_in = p, n_out, n_in
        self.device = mask.device
        flat = (mask.reshape(-1) != 0).nonzero().flatten()
        self.flat = flat
        self.nnz = flat.numel()
        row = flat // n_in                               # global row p * out + r
        col = (flat // (n_out * n_in)) * n_in + flat % n_in   # global column p * in + c
        self.row, self.col = row, col
        self.ptr = _pointers(row, p * n_out)
        order = torch.argsort(col * (p * n_out) + row)   # column-major order of the entries
        self.perm_t = order
        self.row_t = row[order].contiguous()
        self.ptr_t = _pointers(col, p * n_in)
        counts = torch.bincount(flat // (n_out * n_in), minlength=p)
        self.offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).tolist()
        self._csr: torch.Tensor | None = None

    @property
    def density(self) -> float:
        """Largest per-patient share of unmasked entries."""
        per = [b - a for a, b in zip(self.offsets[:-1], self.offsets[1:])]
        return max(per) / (self.n_out * self.n_in)

    def gather(self, weight: torch.Tensor) -> torch.Tensor:
        """The unmasked entries of ``weight`` ``[P, out, in]`` as a flat ``[nnz]`` tensor (a copy)."""
        return weight.reshape(-1).index_select(0, self.flat)

    def scatter(self, values: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write ``values`` into ``out`` ``[P, out, in]`` in place; masked entries become exactly 0."""
        with torch.no_grad():
            out.zero_()
            out.view(-1).index_copy_(0, self.flat, values.detach().to(out.dtype))
        return out

    def patient_slices(self, values: torch.Tensor) -> list[torch.Tensor]:
        """Per-patient views of ``values``."""
        return [values[a:b] for a, b in zip(self.offsets[:-1], self.offsets[1:])]


def _pointers(keys: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(keys, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


# --------------------------------------------------------------------------------------------
# Layer primitives (no autograd): compressed and dense, forward and backward
# --------------------------------------------------------------------------------------------
def _csr(pattern: Pattern, values: torch.Tensor, transpose: bool) -> torch.Tensor:
    shape = (pattern.n_patients * pattern.n_out, pattern.n_patients * pattern.n_in)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "sparse CSR support is in beta"
        if transpose:
            return torch.sparse_csr_tensor(pattern.ptr_t, pattern.row_t, values[pattern.perm_t], size=shape[::-1])
        return torch.sparse_csr_tensor(pattern.ptr, pattern.col, values, size=shape)


def sparse_forward(pattern: Pattern, values: torch.Tensor, bias: torch.Tensor | None, xt: torch.Tensor,
                   out: torch.Tensor | None = None, kind: str = "native", transpose: bool = False) -> torch.Tensor:
    """``W xt + b`` (or ``W^T xt`` with ``transpose``) for ``xt`` ``[P, in, n]`` -> ``[P, out, n]``.

    ``W`` is given by ``pattern`` and the flat ``values``; ``bias`` is ``[P, out]`` (ignored with
    ``transpose``). Writes into ``out`` (contiguous) when given. No autograd.
    """
    rows = pattern.n_in if transpose else pattern.n_out
    n = xt.shape[-1]
    shape = (pattern.n_patients, rows, n)
    if out is None:
        out = torch.empty(shape, dtype=xt.dtype, device=xt.device)
    x2 = _rowwise(xt)
    values = values.detach()
    if kind == "native" and native.usable(values, x2, out) and out.is_contiguous():
        y2 = out.view(-1, n)
        if transpose:
            native.spmm(pattern.ptr_t, pattern.row_t, values.contiguous(), pattern.perm_t, None, x2, y2, rows,
                         pattern.n_patients)
        else:
            b = None if bias is None else bias.detach().contiguous()
            native.spmm(pattern.ptr, pattern.col, values.contiguous(), None, b, x2, y2, rows, pattern.n_patients)
        return out
    y = _csr(pattern, values, transpose) @ x2
    if bias is not None and not transpose:
        y = y + bias.detach().reshape(-1, 1)
    return out.copy_(y.view(shape))


def sparse_backward(pattern: Pattern, values: torch.Tensor, gz: torch.Tensor, xt: torch.Tensor,
                    need_input: bool = True, out: torch.Tensor | None = None,
                    kind: str = "native") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of ``z = W xt + b`` given ``gz = dL/dz``: ``(d values, d bias, d xt or None)``.

    ``d values[k] = sum_s gz[row_k, s] xt[col_k, s]`` (the dense weight gradient at the unmasked
    positions, computed only there), ``d xt = W^T gz``.
    """
    g2, x2 = _rowwise(gz), _rowwise(xt)
    if kind == "native" and native.usable(g2, x2):
        gvalues = torch.empty(pattern.nnz, dtype=gz.dtype, device=gz.device)
        gbias = torch.empty((pattern.n_patients, pattern.n_out), dtype=gz.dtype, device=gz.device)
        native.sddmm(pattern.ptr, pattern.col, g2, x2, gvalues, gbias, pattern.n_out, pattern.n_patients)
    else:
        zeros = torch.zeros(pattern.nnz, dtype=gz.dtype, device=gz.device)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            gvalues = torch.sparse.sampled_addmm(_csr(pattern, zeros, False), g2, x2.t(), beta=0.0).values()
        gbias = g2.sum(1).view(pattern.n_patients, pattern.n_out)
    gx = sparse_forward(pattern, values, None, gz, out, kind, transpose=True) if need_input else None
    return gvalues, gbias, gx


def _onednn_works() -> bool:
    try:
        op = torch.ops.mkldnn._linear_pointwise
        a, b = torch.randn(3, 4), torch.randn(5, 4)
        return bool(torch.allclose(op(a, b, None, "none", [], ""), a @ b.t(), atol=1e-5))
    except (AttributeError, RuntimeError):  # pragma: no cover - torch built without oneDNN
        return False


@functools.cache
def onednn_available() -> bool:
    """Whether oneDNN matmuls work in this torch build (checked once, on first use)."""
    return torch.backends.mkldnn.is_available() and _onednn_works()


def _mm(a: torch.Tensor, b_t: torch.Tensor) -> torch.Tensor:
    """``a @ b_t.T`` for 2-D float32 CPU tensors through oneDNN's matmul (AVX-512 on any x86 vendor)."""
    return torch.ops.mkldnn._linear_pointwise(a, b_t, None, "none", [], "")


def _use_onednn(*tensors: torch.Tensor) -> bool:
    return onednn_available() and all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors)


#: Longest sum for which oneDNN's products were found to be one FMA chain per output (longer ones
#: it splits), and the fewest rows or columns (a single one goes through another oneDNN kernel).
_CHAIN_MAX_K, _CHAIN_MIN_N = 1024, 2

#: Most samples (columns) for which ``vp_dense`` is used: it does not block for cache, and from 512
#: columns (evaluations) oneDNN was faster on a 2-core AVX2 Zen 3, one thread (512 x 512 layer, 5
#: patients: 16.6 vs 19.0 ms at 512, 61 vs 67 ms at 2,000); at training batches of 128 it is faster.
_NATIVE_MAX_N = 256


def dense_matches_onednn() -> bool:
    """Whether ``vp_dense`` computes the dense layers' three products (``W h``, ``gz h^T`` and
    ``W^T gz`` as :func:`dense_backward` forms it) with this oneDNN's numbers, bit for bit.

    Checked once per loaded library, on shapes with vector tails for 8- and 16-float vectors and
    sums of 2 to 1,024 terms, against the calls the engine makes otherwise. ``False`` (oneDNN stays)
    on a target without the kernel's fast path or a oneDNN that sums in another order."""
    lib = native._native_lib()
    if lib is None or not onednn_available():
        return False
    ok = getattr(lib, "vp_dense_ok", None)
    if ok is None:
        ok = native.dense_vector_width() > 0
        gen = torch.Generator().manual_seed(20261202)
        for n_out, n_in, n in ((37, 45, 96), (64, 2, 128), (45, 37, 2), (13, 1024, 19), (8, 300, 1024)) if ok else ():
            w = torch.randn(1, n_out, n_in, generator=gen)
            b = torch.randn(1, n_out, generator=gen)
            x = torch.randn(1, n_in, n, generator=gen)
            g = torch.randn(1, n_out, n, generator=gen)
            z = _mm(w[0], x[0].t()) + b[0].unsqueeze(1)
            gw = _mm(g[0], x[0])
            gx = _mm(g[0].t(), w[0].t()).t()
            mine = (native.dense(w, x, torch.empty(1, n_out, n), b)[0],
                    native.dense(g, x.transpose(1, 2), torch.empty(1, n_out, n_in))[0],
                    native.dense(w.transpose(1, 2), g, torch.empty(1, n_in, n))[0])
            ok = ok and all(torch.equal(a, c) for a, c in zip(mine, (z, gw, gx)))
        lib.vp_dense_ok = ok
    return ok


def _native_wanted(any_width: bool = False) -> bool:
    """:attr:`~virtualpatient.engine.settings.EngineConfig.native_dense`, its default (``None``)
    resolved: on with one torch thread (oneDNN may split work over more) and the kernels built,
    for ``vp_dense`` also only with 8-float vectors, where it was measured faster
    (docs/performance.md); the one-sample kernels (``any_width``) take any width."""
    wanted = settings.ENGINE.native_dense
    if wanted is None:
        return (torch.get_num_threads() == 1 and native.kernels_available()
                and (any_width or native.dense_vector_width() == 8))
    return bool(wanted)


def gemv_matches_onednn() -> bool:
    """Whether ``vp_gemv`` and ``vp_gemv_t`` give the one-sample products of :func:`dense_forward`
    and :func:`dense_backward` (``W c`` and ``W^T g`` for a single sample: the constant units'
    share in a reduced network's step) with this oneDNN's numbers, bit for bit.

    oneDNN computes them with its matrix-vector kernels, not as one chain per output:
    ``kernels/dense.c`` keeps the order found on AVX2 machines. Checked once per loaded library on
    six shapes (sums of 1 to 1,024 terms, five lengths of vector tail), against the calls the
    engine makes otherwise (``W^T g`` for two or more outputs: a single one is a dot product, in
    oneDNN's vector order)."""
    lib = native._native_lib()
    if lib is None or not onednn_available():
        return False
    ok = getattr(lib, "vp_gemv_ok", None)
    if ok is None:
        ok = True
        gen = torch.Generator().manual_seed(20261203)
        for n_out, n_in in ((37, 45), (64, 2), (3, 1), (13, 1024), (458, 242), (20, 503)):
            w = torch.randn(1, n_out, n_in, generator=gen)
            c = torch.randn(1, n_in, 1, generator=gen)
            g = torch.randn(1, n_out, 1, generator=gen)
            ok = ok and torch.equal(native.gemv(w, c, torch.empty(1, n_out, 1))[0], _mm(w[0], c[0].t()))
            if n_in >= 2:
                mine = native.gemv(w, g, torch.empty(1, n_in, 1), transpose=True)[0]
                ok = ok and torch.equal(mine, _mm(g[0].t(), w[0].t()).t())
        lib.vp_gemv_ok = ok
    return ok


def _native_gemv(weight: torch.Tensor, *tensors: torch.Tensor, transpose: bool = False) -> bool:
    """Whether a dense layer's one-sample product (``W c``, or ``W^T g`` with ``transpose``) goes
    through ``vp_gemv`` / ``vp_gemv_t``: where ``vp_dense`` is wanted
    (:attr:`~virtualpatient.engine.settings.EngineConfig.native_dense`) and they give oneDNN's
    numbers (:func:`gemv_matches_onednn`), for sums of at most 1,024 terms."""
    # W^T g for one output is oneDNN's dot product, in the forward's order, not one chain
    shape_ok = max(weight.shape[1:]) <= _CHAIN_MAX_K and (not transpose or weight.shape[2] >= 2)
    return (_native_wanted(any_width=True) and shape_ok and weight.stride(2) == 1 and _use_onednn(weight, *tensors)
            and native.usable(weight, *tensors) and gemv_matches_onednn())


def _native_dense(weight: torch.Tensor, xt: torch.Tensor, *grads: torch.Tensor, wide: bool = False) -> bool:
    """Whether the products of a dense layer ``weight`` ``[P, out, in]`` with ``xt`` ``[P, in, n]``
    (and, given ``grads``, its backward products) go through ``vp_dense`` (see
    :attr:`~virtualpatient.engine.settings.EngineConfig.native_dense`): where each of their sums
    (over ``in``; backward also over ``out`` and ``n``) is one chain in oneDNN. ``wide``: any
    number of samples (a tiled forward product, computed in blocks of columns)."""
    if not _native_wanted():
        return False
    n_out, n_in, n = *weight.shape[1:], xt.shape[2]
    longest = max(n_in, n_out, n) if grads else n_in
    return (min(n_out, n_in, n) >= _CHAIN_MIN_N and longest <= _CHAIN_MAX_K and (wide or n <= _NATIVE_MAX_N)
            and _use_onednn(weight, xt, *grads) and native.usable(weight, xt, *grads) and dense_matches_onednn())


def dense_forward(weight: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor,
                  out: torch.Tensor | None = None, onednn: bool = True,
                  tiles: Callable[[], TilePlan | None] | None = None) -> torch.Tensor:
    """``W xt + b`` for ``xt`` ``[P, in, n]`` -> ``[P, out, n]`` (no autograd).

    On CPU one oneDNN matmul per patient (MKL's batched matmul runs its AVX2 code on AMD CPUs;
    oneDNN's AVX-512 code was 2.2x faster per product here, docs/performance.md), else ``baddbmm``.
    ``tiles`` gives a masked layer's :class:`~virtualpatient.engine.tiles.TilePlan` (or ``None``),
    asked for only where ``vp_dense`` computes the product: its tiles then skip the zero weights.
    """
    weight, bias = weight.detach(), bias.detach()
    if onednn and xt.shape[2] == 1 and _native_gemv(weight, xt):  # one sample: oneDNN's vector order
        if out is None:
            out = torch.empty(weight.shape[0], weight.shape[1], 1, dtype=xt.dtype, device=xt.device)
        return native.gemv(weight, xt.contiguous(), out).add_(bias.unsqueeze(2))
    plan = _forward_tiles(weight, xt, tiles) if onednn else None
    if plan is not None or (onednn and _native_dense(weight, xt)):
        if out is None:
            out = torch.empty(weight.shape[0], weight.shape[1], xt.shape[2], dtype=xt.dtype, device=xt.device)
        xt, bias = xt.contiguous(), bias.contiguous()
        if plan is None:
            return native.dense(weight, xt, out, bias)
        for c in range(0, xt.shape[2], _TILE_COLUMNS):  # B's block of rows stays in cache for every tile
            native.dense_tiles(weight, xt[:, :, c:c + _TILE_COLUMNS], out[:, :, c:c + _TILE_COLUMNS], plan.rows, bias)
        return out
    parts = dense_products(weight, xt, onednn)
    if parts is None:
        return torch.baddbmm(bias.unsqueeze(2), weight, xt, out=out) if out is not None else \
            torch.baddbmm(bias.unsqueeze(2), weight, xt)
    z = torch.stack(parts, out=out) if out is not None else torch.stack(parts)
    return z.add_(bias.unsqueeze(2))


def _forward_tiles(weight: torch.Tensor, xt: torch.Tensor, tiles: Callable[[], TilePlan | None] | None
                   ) -> TilePlan | None:
    """The tiles for :func:`dense_forward`'s product, if ``vp_dense_tiles`` computes it: for any
    number of samples, as the tiles' products beat oneDNN's on evaluations too (docs/performance.md)."""
    return tiles() if tiles is not None and _native_dense(weight, xt, wide=True) else None


#: Samples per ``vp_dense_tiles`` call in a wide (evaluation) forward product.
_TILE_COLUMNS = 128


def dense_products(weight: torch.Tensor, xt: torch.Tensor, onednn: bool = True,
                   tiles: Callable[[], TilePlan | None] | None = None) -> list[torch.Tensor] | None:
    """``W xt`` per patient as oneDNN computes it for :func:`dense_forward` (a list of ``[out, n]``),
    or ``None`` where it would not use oneDNN or uses ``vp_dense`` instead. The fused hidden-layer
    pass reads these products directly (:func:`post_activation`'s ``source``), adding the bias as
    :func:`dense_forward` does."""
    weight = weight.detach()
    if (not (onednn and _use_onednn(weight, xt)) or _native_dense(weight, xt)
            or _forward_tiles(weight, xt, tiles) is not None or (xt.shape[2] == 1 and _native_gemv(weight, xt))):
        return None  # the native products write into the layer's buffer, bias added: dense_forward
    return [_mm(w, x.t()) for w, x in zip(weight, xt)]  # [out, in] @ [in, n]


def dense_backward(weight: torch.Tensor, gz: torch.Tensor, xt: torch.Tensor, need_input: bool = True,
                   out: torch.Tensor | None = None, onednn: bool = True, stacked: bool = True,
                   tiles: Callable[[], TilePlan | None] | None = None,
                   ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
    """Gradients of ``z = W xt + b``: ``(d W = gz xt^T, d b, d xt = W^T gz or None)``.

    With ``stacked=False`` the oneDNN path gives ``d W`` as the list of per-patient products it
    computes (what :class:`~virtualpatient.engine.adam.BatchedAdam` takes as it is), saving a
    copy of every weight gradient per step; the values are the same. ``tiles`` as in
    :func:`dense_forward`, for ``d xt`` and ``d W``; ``d W`` is then exact at the layer's unmasked
    weights only (it is written into the plan's own buffer, each call over the last), so the
    caller must re-mask the weights after using it, as :func:`~virtualpatient.engine.batched.train`
    does after every optimiser step."""
    weight = weight.detach()
    gz, xt = gz.contiguous(), xt.contiguous()
    gbias = gz.sum(2)
    if not (onednn and _use_onednn(weight, gz, xt)):
        gw = torch.bmm(gz, xt.transpose(1, 2))
        gx = None
        if need_input:
            gx = torch.bmm(weight.transpose(1, 2), gz, out=out) if out is not None else \
                torch.bmm(weight.transpose(1, 2), gz)
        return gw, gbias, gx
    n = gz.shape[2]
    if onednn and _native_dense(weight, xt, gz):  # the same sums as oneDNN's below
        plan = tiles() if tiles is not None else None
        if plan is None:
            gw = native.dense(gz, xt.transpose(1, 2), torch.empty_like(weight))  # [out, n] @ [n, in], packed
        else:  # the entries of masked weights only where a row or pair computes them anyway
            gw = native.dense_wgrad(gz, xt.transpose(1, 2), plan.gradient_buffer(weight),
                                    plan.pairs(native.dense_group_width()))
        if not stacked:  # per patient, as below: Adam's scalar tail then falls where it did
            gw = list(gw.unbind(0))
        gx = None
        if need_input:  # W^T gz: the weight read in place through its transpose's strides
            gx = out if out is not None else torch.empty_like(xt)
            gx = native.dense(weight.transpose(1, 2), gz, gx) if plan is None else \
                native.dense_tiles(weight.transpose(1, 2), gz, gx, plan.cols)
        return gw, gbias, gx
    if n == 1:  # an outer product (the constant units' share, one sample): one rounding
        gw = torch.mul(gz, xt.transpose(1, 2))  # per entry whoever computes it, and one call, not P
    else:
        gw = [_mm(g, x) for g, x in zip(gz, xt)]  # [out, n] @ [n, in]
        if stacked:
            gw = torch.stack(gw)
    gx = None
    if need_input and n == 1 and _native_gemv(weight, gz, transpose=True):
        gx = native.gemv(weight, gz, out if out is not None else torch.empty_like(xt), transpose=True)
    elif need_input:  # W^T gz as (gz^T W)^T: oneDNN reads W where it lies; given W^T as a strided view
        # it copies it first (2x slower on 512 x 512, on AVX-512 and AVX2 alike: bench_levers --only
        # flops). It copies gz^T instead (the smaller operand: [n, out]). The same sums in the same
        # order: the same bits (checked on AVX-512 and AVX2, square and odd live-block shapes).
        parts = [_mm(g.t(), w.t()).t() for g, w in zip(gz, weight)]
        gx = torch.stack(parts, out=out) if out is not None else torch.stack(parts)
    return gw, gbias, gx


# --------------------------------------------------------------------------------------------
# Autograd wrappers (for use outside the engine's own training loop)
# --------------------------------------------------------------------------------------------
class _SparseLinearT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, values, bias, xt, pattern, kind):
        ctx.save_for_backward(values, xt)
        ctx.pattern, ctx.kind = pattern, kind
        return sparse_forward(pattern, values, bias, xt, kind=kind)

    @staticmethod
    def backward(ctx, gz):
        values, xt = ctx.saved_tensors
        gvalues, gbias, gx = sparse_backward(ctx.pattern, values, gz, xt, ctx.needs_input_grad[2], kind=ctx.kind)
        return gvalues, gbias, gx, None, None


def sparse_linear_t(pattern: Pattern, values: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor,
                    kind: str = "native") -> torch.Tensor:
    """``W xt + b`` for transposed activations ``xt`` ``[P, in, n]`` -> ``[P, out, n]``, differentiable.

    ``W`` is given by ``pattern`` and the flat ``values``; ``bias`` is ``[P, out]``. ``kind`` is
    ``"native"`` or ``"torch"`` (see :func:`backend`).
    """
    if kind not in ("native", "torch"):
        raise ValueError(f"kind must be native or torch, got {kind!r}")
    return _SparseLinearT.apply(values, bias, xt, pattern, kind)


def sparse_linear_t_out(pattern: Pattern, values: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor,
                        out: torch.Tensor, kind: str = "native") -> torch.Tensor:
    """As :func:`sparse_linear_t`, without autograd, into ``out`` ``[P, out, n]``."""
    return sparse_forward(pattern, values, bias, xt, out, kind)


class _DenseLinearT(torch.autograd.Function):
    @staticmethod
    def forward(ctx, weight, bias, xt):
        ctx.save_for_backward(weight, xt)
        return dense_forward(weight, bias, xt)

    @staticmethod
    def backward(ctx, gz):
        weight, xt = ctx.saved_tensors
        gw, gb, gx = dense_backward(weight, gz, xt, ctx.needs_input_grad[2])
        return gw, gb, gx


def dense_linear_t(weight: torch.Tensor, bias: torch.Tensor, xt: torch.Tensor) -> torch.Tensor:
    """``W xt + b`` for transposed activations ``xt`` ``[P, in, n]`` -> ``[P, out, n]``, differentiable."""
    return _DenseLinearT.apply(weight, bias, xt)


# --------------------------------------------------------------------------------------------
# Fused elementwise steps of the training loop
# --------------------------------------------------------------------------------------------
def _varies(*values: float | tuple[float, ...]) -> bool:
    """Whether any of these scalars is one value per patient (a tuple)."""
    return any(isinstance(v, tuple) for v in values)


def _at(value: float | tuple[float, ...], i: int) -> float:
    return value[i] if isinstance(value, tuple) else value


def post_activation(z: torch.Tensor, activation: str, scale: float | tuple[float, ...],
                    shift: float | tuple[float, ...], bias: torch.Tensor | None = None,
                    deriv: torch.Tensor | None | bool = None, kind: str = "native",
                    source: Sequence[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """In place on ``z`` ``[P, units, n]``: ``h = act(z [+ bias]) * scale - shift`` (each step only when it
    changes something), returning ``(h, deriv)`` where ``deriv`` is ``not h <= 0`` (bool, relu) or
    ``1 - tanh^2`` (float) for the backward pass (``deriv=False``: not wanted). One pass with the
    native kernels, else torch ops in the same order (the same numbers, except that the native
    tanh is a rational approximation within 3e-7 of the exact one, 7x faster than ``torch.tanh``).

    ``scale`` and ``shift`` are floats, or tuples of one float per patient: then each patient's
    slice is computed by the same call with its own floats (what it computes alone).

    ``source``, when given, holds the pre-activations as one ``[units, n]`` tensor per patient (a
    dense layer's products, :func:`dense_products`): they are read from there and ``z`` is only
    written, which saves copying them into ``z`` first (the same numbers)."""
    relu = activation == "relu"
    shape = z.shape
    if deriv is None:
        deriv = torch.empty(shape, dtype=torch.bool if relu else z.dtype, device=z.device)
    elif deriv is False:
        deriv = None
    if _varies(scale, shift):
        for i in range(shape[0]):
            post_activation(z[i:i + 1], activation, _at(scale, i), _at(shift, i),
                            None if bias is None else bias[i:i + 1], False if deriv is None else deriv[i:i + 1], kind,
                            None if source is None else source[i:i + 1])
        return z, deriv
    if kind == "native" and native.usable(z) and z.is_contiguous() and (deriv is None or deriv.is_contiguous()):
        b = None if bias is None else bias.detach().contiguous()
        if source is None:
            native.post(z, b, deriv, shape[0] * shape[1], shape[2], 0 if relu else 1, scale, shift)
            return z, deriv
        if native.usable(*source):
            for i, part in enumerate(source):
                native.post(z[i], None if b is None else b[i], None if deriv is None else deriv[i], shape[1],
                            shape[2], 0 if relu else 1, scale, shift, source=part.contiguous())
            return z, deriv
    if source is not None:
        torch.stack(list(source), out=z)
    if bias is not None:
        z.add_(bias.detach().unsqueeze(2))
    if relu:
        z.relu_()
        if deriv is not None:
            torch.le(z, 0, out=deriv).logical_not_()
    else:
        z.tanh_()
        if deriv is not None:
            torch.mul(z, z, out=deriv).neg_().add_(1.0)
    if scale != 1.0:
        z.mul_(scale)
    if shift:
        z.sub_(shift)
    return z, deriv


def add_noise_t(h: torch.Tensor, draw: torch.Tensor, sigma: float | tuple[float, ...],
                add: float | tuple[float, ...] = 0.0, scale: float | tuple[float, ...] = 1.0,
                shift: float | tuple[float, ...] = 0.0, kind: str = "native") -> torch.Tensor:
    """In place on ``h`` ``[P, units, n]``: ``((h + sigma * draw^T) + add) * scale - shift`` for noise
    ``draw`` ``[P, n, units]`` (drawn in the dense path's order); ``add`` 0, ``scale`` 1, ``shift`` 0
    are no-ops. ``draw`` may be overwritten.

    Any of the four may be a tuple of one float per patient: each patient's slice is then computed
    with its own floats, and a patient with ``sigma`` and ``add`` 0 gets only ``* scale - shift``
    (what it computes alone, where it has no noise term)."""
    if _varies(sigma, add, scale, shift):
        for i in range(h.shape[0]):
            s, a = _at(sigma, i), _at(add, i)
            if s == 0 and a == 0:
                scale_shift_(h[i:i + 1], _at(scale, i), _at(shift, i))
            else:
                add_noise_t(h[i:i + 1], draw[i:i + 1], s, a, _at(scale, i), _at(shift, i), kind)
        return h
    if kind == "native" and native.usable(h, draw) and h.is_contiguous() and draw.is_contiguous():
        native.noise_t(h, draw, sigma, add, scale, shift)
        return h
    h.add_(draw.mul_(sigma).transpose(1, 2))
    if add:
        h.add_(add)
    if scale != 1.0:
        h.mul_(scale)
    if shift:
        h.sub_(shift)
    return h


def normal_(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``out.normal_(generator=generator)``: the same numbers, and the generator left in the same
    state, 2.5-5x faster (docs/performance.md) where the native kernel applies (``kernels/normal.c``: float32,
    contiguous, at least 16 values, a CPU generator, and a kernel library that reproduces this
    torch's draws, :func:`~virtualpatient.engine.native.normal_matches_torch`); elsewhere torch draws.

    Noise draws were the largest cost of the wash-out's biased tests (4,000 samples x 1,280 units
    per network and test); they must stay the patients' own torch draws, so the kernel replicates
    them rather than drawing differently.
    """
    if (out.dtype == torch.float32 and out.device.type == "cpu" and out.numel() >= 16 and out.is_contiguous()
            and generator.device.type == "cpu" and native.normal_matches_torch()):
        return native.normal_(out, generator)
    return out.normal_(generator=generator)


def scale_shift_(h: torch.Tensor, scale: float | tuple[float, ...], shift: float | tuple[float, ...]) -> torch.Tensor:
    """In place: ``h * scale - shift`` (two roundings; scale 1 and shift 0 skipped), per patient for tuples."""
    if _varies(scale, shift):
        for i in range(h.shape[0]):
            scale_shift_(h[i:i + 1], _at(scale, i), _at(shift, i))
        return h
    if scale != 1.0:
        h.mul_(scale)
    if shift:
        h.sub_(shift)
    return h


def pre_activation_grad(g: torch.Tensor, deriv: torch.Tensor, scale: float | tuple[float, ...],
                        kind: str = "native") -> torch.Tensor:
    """In place: the gradient through :func:`post_activation`, ``g * scale * act'`` (``scale`` per
    patient when a tuple)."""
    if _varies(scale):
        for i in range(g.shape[0]):
            pre_activation_grad(g[i:i + 1], deriv[i:i + 1], scale[i], kind)
        return g
    if kind == "native" and native.usable(g) and g.is_contiguous() and deriv.is_contiguous():
        native.pre_grad(g, deriv, scale)
        return g
    if scale != 1.0:
        g.mul_(scale)
    return g.masked_fill_(~deriv, 0.0) if deriv.dtype == torch.bool else g.mul_(deriv)
