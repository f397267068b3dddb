"""The engine's batched network: forward, accuracy and training of P patients' networks at once.

:func:`forward` and :func:`accuracy` evaluate :class:`~virtualpatient.network.Params`;
:func:`train` trains them in place. Both run on a working copy of the network (``_Net``) in which
activations are *transposed*, ``[P, units, n]``, and every large layer whose masks keep at most
:attr:`~virtualpatient.engine.settings.EngineConfig.sparse_max_density` of its weights is stored
compressed (only its unmasked weights, see :mod:`virtualpatient.engine.ops`). Training steps are
backpropagated by hand (``_Net.step``) and optimised by
:class:`~virtualpatient.engine.adam.BatchedAdam`; noise-free training runs on the live units only
(constant units folded into the next layer's biases, dead units left out:
:mod:`virtualpatient.engine.reduction`). Every hidden layer, on every path, follows
:class:`~virtualpatient.engine.hidden.HiddenLayer`.

All of it gives the dense results up to float rounding (``tests/test_perf_equivalence.py``);
``docs/performance.md`` has the measurements behind the defaults. The dense, autograd-visible
path (:func:`batch_loss`, and :func:`forward` when the weights require gradients) is kept for
gradient-based regrowth scores, which need gradients at pruned positions too.

Nothing here mixes patients: losses are summed over patients, so each patient's gradient is its
own, and Adam is elementwise, so P patients trained together end equal (up to float rounding) to
each trained alone. ``gain``, ``damping``, ``sigma`` and ``p`` may be one value per patient
(:class:`~virtualpatient.network.Modulation`): when they are shared the engine passes floats to its
kernels as always; when they differ it calls the same kernels once per patient slice with that
patient's floats (``[P, 1, 1]`` tensors on the dense path), so each patient computes what it
computes alone.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from virtualpatient.engine import native, ops, reduction, settings
from virtualpatient.engine.adam import BatchedAdam
from virtualpatient.engine.hidden import HiddenLayer, NoiseTerm
from virtualpatient.engine.tiles import TilePlan
from virtualpatient.network import BiasedNoise, Modulation, NoiseSource, NonFiniteError, Params

if TYPE_CHECKING:
    from virtualpatient.protocol import StabiliserConfig

__all__ = ["accuracy", "batch_loss", "epoch_batches", "forward", "gather_batch", "train"]


# --------------------------------------------------------------------------------------------
# Evaluation, and the dense reference math (autograd-visible; used for gradient scores)
# --------------------------------------------------------------------------------------------
def _forward_dense(params, x, mod, stab, noise, biased, magnitudes) -> torch.Tensor:
    """The network in plain torch ops: each hidden layer is :meth:`HiddenLayer.reference`."""
    hidden = HiddenLayer.of(mod.check(params.n_patients), stab, biased)

    def draw(term: NoiseTerm, shape: Sequence[int]) -> torch.Tensor:
        return noise(shape, x.device, term.drawn)

    h = x
    for w, b in zip(params.weights[:-1], params.biases[:-1]):
        h = hidden.reference(torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2)), draw, magnitudes)
    return torch.baddbmm(params.biases[-1].unsqueeze(1), h, params.weights[-1].transpose(1, 2))


def forward(
    params: Params | _Net,
    x: torch.Tensor,
    mod: Modulation,
    stab: StabiliserConfig,
    noise: NoiseSource | None = None,
    biased: BiasedNoise | None = None,
    magnitudes: list[torch.Tensor] | None = None,
) -> torch.Tensor:
    """Logits ``[P, N, C]`` of inputs ``x`` ``[P, N, in]`` (each hidden layer is a
    :class:`~virtualpatient.engine.hidden.HiddenLayer`).

    ``mod`` may hold one value per patient (:class:`~virtualpatient.network.Modulation`); patient
    ``i`` then computes exactly what it computes alone with ``mod.patient(i)``.

    Without gradients (evaluation) this runs on the engine (compressed layers, reused buffers);
    when the weights, biases or ``x`` require gradients it runs the dense autograd-visible math.
    :func:`train` runs every mini-batch through this function too, passing its working copy of
    the network and transposed inputs ``[P, in, B]`` (logits ``[P, C, B]``), so wrapping
    ``forward`` observes the modulation of every training step.

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
    if isinstance(params, _Net):  # a training step of the engine (see train)
        return params.logits_t(x, mod, stab, noise)
    if _needs_grad(params, x):
        return _forward_dense(params, x, mod, stab, noise, biased, magnitudes)
    with torch.no_grad():
        return _evaluate(params, x, mod, stab, noise, biased, magnitudes)


def _evaluate(params: Params, x: torch.Tensor, mod: Modulation, stab: StabiliserConfig, noise: NoiseSource | None,
              biased: BiasedNoise | None, magnitudes: list[torch.Tensor] | None) -> torch.Tensor:
    """The engine's evaluation, in groups of networks that fit
    :attr:`~virtualpatient.engine.settings.EngineConfig.eval_max_bytes`."""
    widths = [x.shape[2]] + [w.shape[1] for w in params.weights]
    nets = _eval_nets(params, settings.eval_group_size(x.shape[1], widths))
    mod.check(params.n_patients)
    if len(nets) == 1:
        return nets[0][1].forward_eval(x, mod, stab, noise, biased, magnitudes)
    logits, found = [], []
    for (p0, net), p1 in zip(nets, [p0 for p0, _ in nets[1:]] + [params.n_patients]):
        part = None if noise is None else NoiseSource(noise.generators[p0:p1])
        found.append(None if magnitudes is None else [])
        logits.append(net.forward_eval(x[p0:p1], mod.take(range(p0, p1)), stab, part, biased, found[-1]))
    if magnitudes is not None:
        magnitudes.extend(torch.cat(layer) for layer in zip(*found))
    return torch.cat(logits)


def _needs_grad(params: Params, x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(t.requires_grad for t in params.weights + params.biases))


@torch.no_grad()
def accuracy(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    mod: Modulation,
    stab: StabiliserConfig,
    noise: NoiseSource | None = None,
    biased: BiasedNoise | None = None,
) -> torch.Tensor:
    """Per-patient accuracy in percent on ``x`` ``[P, N, in]``, labels ``y`` ``[P, N]``."""
    logits = forward(params, x, mod, stab, noise=noise, biased=biased)
    return 100.0 * (logits.argmax(-1) == y).double().mean(-1)



# --------------------------------------------------------------------------------------------
# Mini-batches
# --------------------------------------------------------------------------------------------
def epoch_batches(n: int, batch_size: int, generators: Sequence[torch.Generator],
                  device: torch.device | str) -> list[torch.Tensor]:
    """One epoch's mini-batch index tensors ``[P, B]``: a fresh permutation per patient.

    Patient ``i``'s permutation is ``torch.randperm(n, generator=generators[i])``, split into runs
    of ``batch_size`` in order (the last one shorter), which is what a ``DataLoader`` over the
    patient's data with ``batch_size`` and a sampler yielding that permutation gives.
    """
    perm = torch.stack([torch.randperm(n, generator=g) for g in generators]).to(device)
    return list(perm.split(batch_size, dim=1))


def gather_batch(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xb = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return xb, torch.gather(y, 1, idx)


def batch_loss(params: Params, xb: torch.Tensor, yb: torch.Tensor, mod: Modulation, stab: StabiliserConfig,
               noise: NoiseSource | None) -> torch.Tensor:
    """Per-patient mean cross-entropy, ``[P]`` (dense, autograd-visible math)."""
    if _needs_grad(params, xb):  # through forward (which then runs the dense math), as every step does
        logits = forward(params, xb, mod, stab, noise=noise)
    else:
        logits = _forward_dense(params, xb, mod, stab, noise, None, None)
    return F.cross_entropy(logits.flatten(0, 1), yb.flatten(), reduction="none").view(yb.shape).mean(1)



# --------------------------------------------------------------------------------------------
# The engine's working copy of a network
# --------------------------------------------------------------------------------------------
class _Layer:
    """One layer of a :class:`_Net`: dense (the ``Params`` weight itself) or compressed."""

    __slots__ = ("weight", "bias", "mask", "pattern", "values", "kind", "_plan")

    def __init__(self, weight: torch.Tensor, mask: torch.Tensor, kind: str, bias: torch.Tensor) -> None:
        self.weight, self.bias, self.kind = weight, bias, kind
        self.pattern: ops.Pattern | None = None
        self.values: torch.Tensor | None = None
        self.mask: torch.Tensor | None = None
        self._plan: TilePlan | bool | None = None
        cfg = settings.ENGINE
        size = weight[0].numel()
        if kind != "off" and size >= cfg.sparse_min_weights:
            kept = (mask != 0).flatten(1).sum(1).max().item() / size
            if kept <= cfg.sparse_max_density:
                self.pattern = ops.Pattern(mask)
                self.values = self.pattern.gather(weight.detach())
                return
        if not bool((mask != 0).all()):
            self.mask = mask

    @property
    def compressed(self) -> bool:
        return self.pattern is not None

    def leaf(self) -> torch.Tensor:
        """The tensor the optimiser updates: the compressed values or the dense weight."""
        return self.values if self.compressed else self.weight

    def segments(self) -> list[int] | None:
        return self.pattern.offsets if self.compressed else None

    @property
    def onednn(self) -> bool:
        return self.weight[0].numel() >= settings.ENGINE.onednn_min_weights

    def tiles(self) -> TilePlan | None:
        """The zero-skipping :class:`~virtualpatient.engine.tiles.TilePlan` of a masked dense layer
        (:attr:`~virtualpatient.engine.settings.EngineConfig.skip_zeros`), made on first use; ``None``
        for other layers, or when a masked weight is not 0 (the tiles would leave it out). The
        layer's masked weights stay 0 after that: :func:`train` re-masks after every step."""
        if self._plan is None:
            self._plan = False
            if self.mask is not None and settings.ENGINE.skip_zeros:
                with torch.no_grad():
                    if not bool(self.weight.masked_select(self.mask == 0).any()):
                        self._plan = TilePlan(self.mask)
        return self._plan or None

    def forward(self, h: torch.Tensor, out: torch.Tensor | None = None,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        """``W h + b`` for transposed activations ``h`` ``[P, in, n]`` -> ``[P, out, n]`` (no autograd);
        ``bias`` replaces the layer's own for this product."""
        bias = self.bias if bias is None else bias
        if self.compressed:
            return ops.sparse_forward(self.pattern, self.values, bias, h, out, self.kind)
        return ops.dense_forward(self.weight, bias, h, out, onednn=self.onednn, tiles=self.tiles)

    def products(self, h: torch.Tensor) -> list[torch.Tensor] | None:
        """``W h`` per patient, without the bias, for a dense layer on oneDNN (else ``None``: use
        :meth:`forward`); the hidden layer's first pass adds the bias as it reads them."""
        return None if self.compressed else ops.dense_products(self.weight, h, onednn=self.onednn, tiles=self.tiles)

    def backward(self, gz: torch.Tensor, h: torch.Tensor, need_input: bool, out: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor | list[torch.Tensor], torch.Tensor, torch.Tensor | None]:
        """``(d leaf, d bias, d h)`` from ``gz = dL/dz`` and the layer's input ``h`` (``d leaf`` of a
        dense layer may be a list of per-patient tensors, as :class:`BatchedAdam` takes it)."""
        if self.compressed:
            return ops.sparse_backward(self.pattern, self.values, gz, h, need_input, out, self.kind)
        return ops.dense_backward(self.weight, gz, h, need_input, out, onednn=self.onednn, stacked=False,
                                  tiles=self.tiles)


_workspace = threading.local()


def _buffer(name: str, shape: tuple[int, ...], like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A reusable per-thread scratch tensor (large fresh allocations cost page faults and cache misses)."""
    store = _workspace.__dict__.setdefault("buffers", {})
    buf = store.get(name)
    numel = math.prod(shape)
    dtype = dtype or like.dtype
    if buf is None or buf.numel() < numel or buf.dtype != dtype or buf.device != like.device:
        buf = torch.empty(numel, dtype=dtype, device=like.device)
        store[name] = buf
    return buf[:numel].view(shape)


class _Net:
    """The engine's working copy of :class:`Params`: transposed activations, compressed sparse layers.

    Dense layers use the ``Params`` tensors themselves; compressed layers hold their unmasked
    weights as new tensors, written back by :meth:`write_back`. Training steps are backpropagated
    by hand (:meth:`step`): the same products and elementwise derivatives autograd would form,
    in place in reused buffers, without building a graph per mini-batch.

    With ``reduce`` (noise-free training on the CPU) the layers hold the live blocks of a
    :class:`~virtualpatient.engine.reduction.Reduction` instead; ``inputs[i]``, when not ``None``, is a
    layer from the constant units of layer ``i``'s input level (biases ``const_biases[i]``), whose
    product with their activations is added to layer ``i``'s bias every step. All of it is written
    back by :meth:`write_back`.
    """

    def __init__(self, params: Params, reduce: bool = False) -> None:
        device = params.weights[0].device
        kind = settings.ENGINE.sparse_backend or native.backend(device)
        self.kind = kind
        # the native kernels draw noise too (the same numbers as torch); the torch backend draws with torch
        self._normal = ops.normal_ if kind == "native" else None
        self._saved: tuple | None = None
        self._step_layer: tuple[Modulation, StabiliserConfig, HiddenLayer] | None = None
        self.reduction = _reduction(params) if reduce else None
        n_layers = len(params.weights)
        self.inputs: list[_Layer | None] = [None] * n_layers
        self.const_biases: list[torch.Tensor | None] = [None] * n_layers
        r = self.reduction
        if r is None:
            self.layers = [_Layer(w, m, kind, b) for w, b, m in zip(params.weights, params.biases, params.masks)]
            return
        self.layers = []
        for i, (w, b) in enumerate(zip(params.weights, params.biases)):
            self.layers.append(_Layer(*r.block(i, w), kind=kind, bias=r.unit_values(i + 1, b)))
            if r.has_constant_inputs(i):
                self.inputs[i] = _Layer(*r.block(i, w, "constant"), kind=kind, bias=self.layers[i].bias)
                self.const_biases[i] = r.unit_values(i, params.biases[i - 1], "constant")

    # -- training ----------------------------------------------------------------------------
    def leaves(self) -> tuple[list[torch.Tensor], list[list[int] | None]]:
        """What the optimiser updates, with each tensor's patient segments (``None``: leading axis)."""
        leaves = [layer.leaf() for layer in self.layers] + [layer.bias for layer in self.layers]
        segments = [layer.segments() for layer in self.layers] + [None] * len(self.layers)
        for inp in self.inputs:
            if inp is not None:
                leaves.append(inp.leaf())
                segments.append(inp.segments())
        extra = [c for c in self.const_biases if c is not None]
        return leaves + extra, segments + [None] * len(extra)

    def _constants(self, hidden: HiddenLayer) -> list[tuple | None]:
        """Per layer, the activations ``[P, K, 1]`` of its input level's constant units and their
        derivatives (or ``None``): the hidden layer on their biases, as a batch of one sample."""
        return [None if b is None else hidden.apply_t(b.detach().clone().unsqueeze(2), kind=self.kind, deriv=None)
                for b in self.const_biases]

    def _bias(self, i: int, consts: list[tuple | None]) -> torch.Tensor | None:
        """Layer ``i``'s bias for this step: its own plus its constant inputs' share (``None``: its own)."""
        inp = self.inputs[i]
        return None if inp is None else inp.forward(consts[i][0]).squeeze(2)

    def apply_masks(self) -> None:
        with torch.no_grad():
            for layer in self.layers + [inp for inp in self.inputs if inp is not None]:
                if layer.mask is not None:
                    layer.weight.mul_(layer.mask)

    def _hidden_layer(self, mod: Modulation, stab: StabiliserConfig) -> HiddenLayer:
        """:meth:`HiddenLayer.of` ``mod``, built once for the steps that share it: :func:`train` passes
        one (frozen) modulation object to every step of an epoch, and per-patient terms cost about
        0.2 ms to compute."""
        cached = self._step_layer
        if cached is None or cached[0] is not mod or cached[1] is not stab:
            cached = self._step_layer = (mod, stab, HiddenLayer.of(mod, stab))
        return cached[2]

    @torch.no_grad()
    def logits_t(self, xt: torch.Tensor, mod: Modulation, stab: StabiliserConfig,
                 noise: NoiseSource | None) -> torch.Tensor:
        """Logits ``[P, C, B]`` of transposed inputs ``xt`` ``[P, in, B]``; keeps what :meth:`step`'s
        backward pass needs. Each hidden layer is :meth:`HiddenLayer.apply_t`."""
        hidden = self._hidden_layer(mod.check(xt.shape[0]), stab)
        n_patients, n = xt.shape[0], xt.shape[2]
        inputs, derivs = [xt], []
        h = xt
        relu = mod.activation == "relu"
        if self.reduction is not None and hidden.noise:
            raise ValueError("a reduced network trains without internal noise only")
        consts = self._constants(hidden)

        def draw(term: NoiseTerm, shape: Sequence[int]) -> torch.Tensor:
            return noise.fill_(_buffer("train/noise", shape, xt), term.drawn, self._normal)

        for i, layer in enumerate(self.layers[:-1]):
            z = _buffer(f"train/a{i}", (n_patients, layer.bias.shape[1], n), xt)
            h, d = _hidden(layer, h, z, hidden, draw, self.kind, self._bias(i, consts),
                           deriv=_buffer(f"train/d{i}", z.shape, z, torch.bool if relu else None))
            derivs.append(d)
            inputs.append(h)
        self._saved = (inputs, derivs, hidden, consts)
        return self.layers[-1].forward(h, bias=self._bias(len(self.layers) - 1, consts))

    @torch.no_grad()
    def step(self, xt: torch.Tensor, y: torch.Tensor, mod: Modulation, stab: StabiliserConfig,
             noise: NoiseSource | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Per-patient mean cross-entropy ``[P]`` of one mini-batch and the gradients of its sum with
        respect to :meth:`leaves` (in that order; a dense weight's may be a list of per-patient
        tensors, which :class:`BatchedAdam` takes as it is)."""
        logits = forward(self, xt, mod, stab, noise=noise)  # -> logits_t, via the public entry point
        inputs, derivs, hidden, consts = self._saved
        self._saved = None
        logp = torch.log_softmax(logits, 1)
        target = y.unsqueeze(1)
        loss = logp.gather(1, target).squeeze(1).neg_().mean(1)
        g = logp.exp_()  # d(sum_p mean_b CE) / d logits = (softmax - onehot) / B
        g.scatter_add_(1, target, torch.full(target.shape, -1.0, dtype=g.dtype, device=g.device))
        g.mul_(1.0 / y.shape[1])
        n_layers = len(self.layers)
        g_leaf: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        g_bias: list[torch.Tensor] = [None] * n_layers  # type: ignore[list-item]
        g_inputs: list[torch.Tensor] = []
        g_consts: list[torch.Tensor] = []
        for i in range(n_layers - 1, -1, -1):
            h = inputs[i]
            out = _buffer(f"train/g{i}", h.shape, h) if i > 0 else None
            g_leaf[i], g_bias[i], gh = self.layers[i].backward(g, h, i > 0, out)
            if self.inputs[i] is not None:  # the constant units below, through their folded-in share
                const, deriv = consts[i]
                g_values, _, g_const = self.inputs[i].backward(g_bias[i].unsqueeze(2), const, True)
                g_inputs.insert(0, g_values)
                g_consts.insert(0, hidden.grad_t(g_const, deriv, self.kind).squeeze(2))
            if i > 0:  # through the hidden layer below
                g = hidden.grad_t(gh, derivs[i - 1], self.kind)
        return loss, g_leaf + g_bias + g_inputs + g_consts

    @torch.no_grad()
    def write_back(self, params: Params) -> None:
        """Copy what this copy holds apart from ``params`` into it: compressed values into the dense
        weights (masked entries exactly 0); with a reduction, every live block, constant input and bias."""
        r = self.reduction
        if r is None:
            for layer, w in zip(self.layers, params.weights):
                if layer.compressed:
                    layer.pattern.scatter(layer.values, w)
            return
        def write(i: int, part: _Layer, w: torch.Tensor, inputs: str) -> None:
            if part.compressed:  # only the unmasked entries: the others are 0 in w already
                r.write_block(i, part.values, w, inputs, entries=part.pattern.flat)
            else:
                r.write_block(i, part.weight, w, inputs)

        for i, (layer, w, b) in enumerate(zip(self.layers, params.weights, params.biases)):
            write(i, layer, w, "live")
            r.write_units(i + 1, layer.bias, b)
            if self.inputs[i] is not None:
                write(i, self.inputs[i], w, "constant")
                r.write_units(i, self.const_biases[i], params.biases[i - 1], "constant")

    def export(self, params: Params) -> Params:
        """A copy of ``params`` holding the current values."""
        out = params.clone()
        self.write_back(out)
        return out

    # -- evaluation ------------------------------------------------------------------------------
    @torch.no_grad()
    def forward_eval(self, x: torch.Tensor, mod: Modulation, stab: StabiliserConfig, noise: NoiseSource | None,
                     biased: BiasedNoise | None, magnitudes: list[torch.Tensor] | None) -> torch.Tensor:
        """Logits ``[P, N, C]`` (no autograd); each hidden layer is :meth:`HiddenLayer.apply_t`."""
        hidden = HiddenLayer.of(mod.check(x.shape[0]), stab, biased)
        n_patients, n = x.shape[0], x.shape[1]

        def draw(term: NoiseTerm, shape: Sequence[int]) -> torch.Tensor:
            return noise.fill_(_buffer("eval/noise", shape, x), term.drawn, self._normal)

        h = x.transpose(1, 2).contiguous()
        for i, layer in enumerate(self.layers[:-1]):
            z = _buffer(f"eval/h{i % 2}", (n_patients, layer.bias.shape[1], n), x)
            h, _ = _hidden(layer, h, z, hidden, draw, self.kind, magnitudes=magnitudes)
        return self.layers[-1].forward(h).transpose(1, 2)


def _hidden(layer: _Layer, h: torch.Tensor, z: torch.Tensor, hidden: HiddenLayer, draw, kind: str,
            bias: torch.Tensor | None = None, **how) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``layer``'s product of ``h`` into ``z`` (``bias`` replacing its own), then ``hidden`` on it in
    place (:meth:`HiddenLayer.apply_t`, ``how`` its options). A dense layer's per-patient products
    go to the hidden layer's first pass as they are, which adds the bias as it reads them."""
    parts = layer.products(h)
    if parts is None:
        return hidden.apply_t(layer.forward(h, z, bias), draw, kind, **how)
    return hidden.apply_t(z, draw, kind, source=parts, bias=layer.bias if bias is None else bias, **how)


def _reduction(params: Params) -> reduction.Reduction | None:
    """The reduction of ``params`` when it pays (:attr:`EngineConfig.reduce_max_work`), else ``None``."""
    if len(params.weights) < 2:
        return None
    r = reduction.Reduction(params.masks)
    if min(index.shape[1] for index, _ in r.live) == 0 or r.work_fraction() > settings.ENGINE.reduce_max_work:
        return None
    return r


def _signature(params: Params, kind: str) -> tuple:
    return (kind, settings.ENGINE, tuple((id(t), t._version) for t in params.weights + params.biases + params.masks))


def _patients(params: Params, start: int, stop: int) -> Params:
    """Patients ``start:stop`` of ``params`` as views (no copy)."""
    return Params(*([t[start:stop] for t in group] for group in (params.weights, params.biases, params.masks)))


def _eval_nets(params: Params, size: int) -> list[tuple[int, _Net]]:
    """The engine copies of ``params`` for evaluation, one per group of at most ``size`` patients
    (with the group's first patient), cached on ``params`` until one of its tensors changes."""
    key = (_signature(params, settings.ENGINE.sparse_backend or native.backend(params.weights[0].device)), size)
    cached = getattr(params, "_engine_nets", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    n = params.n_patients
    if size >= n:
        nets = [(0, _Net(params))]
    else:
        nets = [(p0, _Net(_patients(params, p0, min(p0 + size, n)))) for p0 in range(0, n, size)]
    params._engine_nets = (key, nets)
    return nets



# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------
def train(
    params: Params,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    lr: torch.Tensor | float,
    batch_size: int,
    schedule: Callable[[int], Modulation],
    stab: StabiliserConfig,
    shuffle: Sequence[torch.Generator],
    noise: NoiseSource | None = None,
    snapshots: Sequence[int] = (),
    on_epoch: Callable[[int], None] | None = None,
) -> dict[int, Params]:
    """Train ``params`` in place with a fresh Adam; masked weights stay exactly 0.

    Large layers at most :attr:`~virtualpatient.engine.settings.EngineConfig.sparse_max_density`
    dense train compressed (only their unmasked weights exist, so a pruned weight cannot revive);
    other masked layers are re-masked after every step.

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
        When any patient's loss becomes NaN or inf, or its weights do after the last step.
    """
    n = x.shape[1]
    out: dict[int, Params] = {}
    if 0 in snapshots:
        out[0] = params.clone()
    # Constant units stay constant only without internal noise (drawn per unit and sample); the
    # reduction saves CPU work, a GPU runs the full network.
    reduce = (settings.ENGINE.reduce_units and x.device.type == "cpu"
              and not any(schedule(e).noisy for e in range(epochs)))
    net = _Net(params, reduce=reduce)
    leaves, segments = net.leaves()
    opt = BatchedAdam(leaves, lr, segments=segments)
    xt = x.transpose(1, 2).contiguous()  # [P, in, N]: one gather per step gives the transposed batch
    try:
        for epoch in range(epochs):
            mod = schedule(epoch)
            total = torch.zeros(params.n_patients, dtype=torch.float64, device=x.device)
            for idx in epoch_batches(n, batch_size, shuffle, x.device):
                xb = torch.gather(xt, 2, idx.unsqueeze(1).expand(-1, xt.shape[1], -1))
                loss, grads = net.step(xb, torch.gather(y, 1, idx), mod, stab, noise)
                opt.step(grads)
                net.apply_masks()
                total += loss
            bad = (~torch.isfinite(total)).nonzero().flatten().tolist()
            if bad:
                raise NonFiniteError(bad, epoch)
            if epoch + 1 in snapshots:
                out[epoch + 1] = net.export(params)
            if on_epoch is not None:
                on_epoch(epoch + 1)
    finally:
        net.write_back(params)
    if epochs > 0:  # a blow-up on the very last step shows in no loss: check what that step left
        with torch.no_grad():
            last = batch_loss(params, x[:, :batch_size], y[:, :batch_size], schedule(epochs - 1).replace(
                noise_sigma=0.0), stab, None)
        bad = (~torch.isfinite(last)).nonzero().flatten().tolist()
        if bad:
            raise NonFiniteError(bad, epochs - 1)
    return out

