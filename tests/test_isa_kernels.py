"""Every instruction-set build of the native kernels computes the dense reference's numbers.

The kernels are compiled for one target (``VIRTUALPATIENT_MARCH``: ``native`` by default,
``x86-64-v3`` for AVX2 + FMA, ``x86-64-v4`` for AVX-512); the vector code differs between them
(16-float vectors become one AVX-512 register or two AVX2 ones, other FMA contractions), so each
build must pass the equivalence checks of ``tests/test_perf_equivalence.py`` with its tolerances
(products and gradients ``atol 1e-5, rtol 1e-5``; evaluation and three training epochs
``atol 1e-5``) and the hidden-layer checks of ``tests/test_hidden_layer.py`` with theirs. A target
is skipped when the C compiler is missing or cannot build it, or when this CPU cannot run it.
Also: the compile cache keeps one file per target, and an unknown target is a one-line
:class:`~virtualpatient.errors.UsageError`.
"""

from __future__ import annotations

import pytest
import test_hidden_layer as hl
import test_perf_equivalence as eq
import torch

from virtualpatient.engine import native, ops
from virtualpatient.errors import UsageError

TARGETS = ["native", "x86-64-v3", "x86-64-v4"]


@pytest.fixture(scope="module")
def libraries(tmp_path_factory):
    """Each target built once into a fresh cache (None where it cannot be built or run here)."""
    mp = pytest.MonkeyPatch()
    cache = tmp_path_factory.mktemp("isa-cache")
    mp.setenv("VIRTUALPATIENT_CACHE", str(cache))
    built = {"cache": cache}
    try:
        for march in TARGETS:
            built[march] = native._compile(march) if native.march_supported(march) else None
    finally:
        mp.undo()
    return built


@pytest.fixture(params=TARGETS)
def target(request, libraries, monkeypatch):
    """The kernels built for one target, loaded for the test's duration."""
    march = request.param
    if libraries[march] is None:
        pytest.skip(f"no {march} kernels here (no compiler for it, or this CPU cannot run it)")
    monkeypatch.setattr(native, "_native", libraries[march])
    monkeypatch.setattr(native, "_native_tried", True)
    assert native.kernel_target() == march and native.kernels_available()
    yield march


@pytest.mark.parametrize("n", [1, 37, 130])
def test_products_and_gradients_equal_dense(target, n):
    """Compressed forward, value/bias/input gradients (every tile width of the kernels) equal baddbmm."""
    eq.test_sparse_product_and_gradients_equal_dense("native", n)


def test_fused_elementwise_steps_equal_torch(target):
    """The fused hidden-layer epilogues (bias + relu/tanh + gain - shift, noise transpose-add, the
    gradient through them) equal the torch ops in the same order (tanh: within the rational
    approximation's 3e-7)."""
    gen = torch.Generator().manual_seed(7)
    for act in ("relu", "tanh"):
        z = torch.randn(3, 21, 37, generator=gen) * 3
        bias = torch.randn(3, 21, generator=gen)
        got, dgot = ops.post_activation(z.clone(), act, 1.25, 0.5, bias, kind="native")
        want, dwant = ops.post_activation(z.clone(), act, 1.25, 0.5, bias, kind="torch")
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
        if act == "relu":
            assert torch.equal(dgot, dwant)
        else:
            torch.testing.assert_close(dgot, dwant, atol=1e-6, rtol=0)
        g = torch.randn(3, 21, 37, generator=gen)
        torch.testing.assert_close(ops.pre_activation_grad(g.clone(), dgot, 1.25, "native"),
                                   ops.pre_activation_grad(g.clone(), dgot, 1.25, "torch"), atol=0, rtol=0)
    for units, n in ((19, 35), (8, 8), (64, 40), (7, 5), (17, 9)):  # 8 x 8 register blocks and edges
        h = torch.randn(2, units, n, generator=gen)
        draw = torch.randn(2, n, units, generator=gen)
        torch.testing.assert_close(ops.add_noise_t(h.clone(), draw.clone(), 0.5, 0.1, 1.5, 0.2, "native"),
                                   ops.add_noise_t(h.clone(), draw.clone(), 0.5, 0.1, 1.5, 0.2, "torch"),
                                   atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["native", "torch"])
def test_dense_products_read_in_place_give_the_same_bits(target, kind):
    """A dense layer's per-patient products read where they lie, plus the bias, through
    post_activation(source=...) equal the stacked path (products stacked, bias added, then the
    pass) bit for bit: relu, tanh and a per-patient scale, shapes off the vector width."""
    gen = torch.Generator().manual_seed(12)
    for act, scale in (("relu", 1.25), ("tanh", 0.8), ("relu", (1.25, 0.5, 2.0))):
        z = torch.randn(3, 21, 37, generator=gen)
        bias = torch.randn(3, 21, generator=gen)
        parts = [t.clone() for t in z]
        want, dwant = ops.post_activation(z.clone().add_(bias.unsqueeze(2)), act, scale, 0.25, kind=kind)
        got, dgot = ops.post_activation(torch.full_like(z, float("nan")), act, scale, 0.25, bias, kind=kind,
                                        source=parts)
        assert torch.equal(got, want) and torch.equal(dgot, dwant)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_hidden_layer_equals_the_definition(target, activation):
    """The fused hidden layer (forward, magnitudes, derivative, gradient) of this build equals
    HiddenLayer.reference for every activation x modulation combination, with the tolerances of
    tests/test_hidden_layer.py (bits for relu)."""
    assert hl.check_fused_against_reference("native", activation) > 0


def test_evaluation_equals_dense(target):
    """Noisy, biased evaluation through the engine's compressed layers equals the dense math."""
    eq.test_engine_forward_equals_dense_forward(eq.Modulation(gain=1.6, protection=0.6, noise_sigma=0.5),
                                                eq.BiasedNoise(1.0, 1.0))


def test_training_equals_dense(target):
    """Three epochs of compressed training (noise, snapshots) end at the dense training's weights."""
    eq.test_sparse_training_equals_dense_training("native")


def test_cache_keeps_one_library_per_target(libraries, monkeypatch):
    """The native and x86-64-v3 builds on this one machine are two files (the key holds the target),
    and building a target again finds its file instead of adding one."""
    if libraries["native"] is None or libraries["x86-64-v3"] is None:
        pytest.skip("native or x86-64-v3 kernels cannot be built or run here")
    folder = libraries["cache"] / "virtualpatient"
    files = sorted(p.name for p in folder.glob("*.so"))
    assert [f for f in files if "_native_" in f] and [f for f in files if "_x86-64-v3_" in f]
    assert len(files) == sum(lib is not None for march, lib in libraries.items() if march != "cache")
    monkeypatch.setenv("VIRTUALPATIENT_CACHE", str(libraries["cache"]))
    assert native._compile("x86-64-v3") is not None
    assert sorted(p.name for p in folder.glob("*.so")) == files


@pytest.mark.parametrize("value", ["avx2", "x86-64-v9", "haswell"])
def test_unknown_target_is_a_usage_error(monkeypatch, value):
    """VIRTUALPATIENT_MARCH outside MARCH_CHOICES is refused in one line naming the variable and the
    values it takes (also by sparse_setting, which the command line checks before any work)."""
    monkeypatch.setenv("VIRTUALPATIENT_MARCH", value)
    for check in (native.march_setting, native.sparse_setting):
        with pytest.raises(UsageError, match="VIRTUALPATIENT_MARCH must be one of native") as info:
            check()
        assert "\n" not in str(info.value) and repr(value) in str(info.value)
    monkeypatch.setenv("VIRTUALPATIENT_MARCH", " X86-64-V3 ")
    assert native.march_setting() == "x86-64-v3"
