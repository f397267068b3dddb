"""The native normal draws (``kernels/normal.c``) are torch's draws, bit for bit, state included.

Every noise term of the model is ``Tensor.normal_`` from a patient's own generator; the engine
draws them with a native replica of torch's algorithm (Mersenne twister, 24-bit uniforms,
Box-Muller in blocks of 16 through single-precision log and sincos, the last block redrawn when
the count is not a multiple of 16). Replacing a draw may not change one bit of it, nor the
generator's state afterwards, or every later draw of the patient moves. Tests compare with torch
itself on the same seeds (exact equality, no tolerance), for sizes around the block of 16 and the
twister's 624-word state, for draws interleaved with torch's on one generator, and for each
instruction-set build of the kernels.
"""

from __future__ import annotations

import pytest
import test_isa_kernels as isa
import torch

from virtualpatient.engine import native, ops
from virtualpatient.network import NoiseSource

pytestmark = pytest.mark.skipif(not native.kernels_available(), reason="no C compiler: torch draws everywhere")

#: Sizes on both sides of a block of 16, of the twister's state (624) and of the kernel's chunk (4096).
SIZES = [16, 17, 31, 32, 100, 623, 624, 625, 1247, 1248, 4095, 4096, 4097, 65541]

libraries = isa.libraries
target = isa.target


def _same_draws(sizes, seed: int) -> None:
    mine, theirs = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    for n in sizes:
        got, want = torch.empty(n), torch.empty(n)
        ops.normal_(got, mine)
        want.normal_(generator=theirs)
        assert torch.equal(got, want), f"{int((got != want).sum())} of {n} draws differ"
        assert torch.equal(mine.get_state(), theirs.get_state()), f"generator state differs after {n} draws"


def test_kernel_reproduces_torch_here():
    """The first-use check passes on this machine (otherwise the engine would silently use torch)."""
    assert native.normal_matches_torch()


def test_draws_and_generator_state_equal_torch():
    """Consecutive draws of every size from one generator: the same values and states as torch's."""
    _same_draws(SIZES, seed=3)
    _same_draws(SIZES[::-1], seed=4)


def test_many_draws_equal_torch():
    """Two million draws (a million Box-Muller pairs: the log and sincos approximations meet about
    one in seventeen of their 2^24 possible inputs): equal to torch's. (Checked once at 200
    million draws, all of them equal, while the kernel was written.)"""
    _same_draws([2_000_003], seed=11)


def test_interleaved_with_torch_draws():
    """Native and torch draws alternate on one generator, and a torch draw below 16 values (a
    different torch path) in between: the stream continues exactly as torch's alone."""
    mine, theirs = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for n in (700, 5, 1300, 16, 3, 2000):
        got, want = torch.empty(n), torch.empty(n)
        (got.normal_(generator=mine) if n % 2 else ops.normal_(got, mine))
        want.normal_(generator=theirs)
        assert torch.equal(got, want)
    assert torch.equal(mine.get_state(), theirs.get_state())


@pytest.mark.parametrize("case", ["small", "strided", "double"])
def test_falls_back_to_torch(case):
    """Where the kernel does not apply (under 16 values, a strided view, float64) torch draws."""
    mine, theirs = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    make = {"small": lambda: torch.empty(15), "strided": lambda: torch.empty(40, 2)[:, 0],
            "double": lambda: torch.empty(50, dtype=torch.float64)}[case]
    got, want = make(), make()
    ops.normal_(got, mine)
    want.normal_(generator=theirs)
    assert torch.equal(got, want) and torch.equal(mine.get_state(), theirs.get_state())


def test_noise_source_fill_with_native_draws():
    """``NoiseSource.fill_`` with the engine's draw equals its default (patients without noise skipped)."""
    a = NoiseSource([torch.Generator().manual_seed(i) for i in range(3)])
    b = NoiseSource([torch.Generator().manual_seed(i) for i in range(3)])
    for patients in (None, (True, False, True)):
        got = a.fill_(torch.empty(3, 40, 7), patients, ops.normal_)
        want = b.fill_(torch.empty(3, 40, 7), patients)
        assert torch.equal(got, want)
    assert all(torch.equal(x.get_state(), y.get_state()) for x, y in zip(a.generators, b.generators))


def test_each_instruction_set_build_equals_torch(target):
    """Each instruction-set build of the kernels (AVX-512, AVX2 + FMA, native) draws torch's numbers."""
    assert native.normal_matches_torch()
    _same_draws(SIZES, seed=21)
