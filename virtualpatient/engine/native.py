"""The native kernels: the C files in ``kernels/``, built at first use and called through ctypes.

``kernels/products.c`` holds the compressed products (SpMM, SDDMM) and ``kernels/elementwise.c``
the fused elementwise steps of a hidden layer (:mod:`virtualpatient.engine.ops` calls both). They
are compiled together with the system C compiler (``$CC`` or ``cc``, ``-O3 -march=native``, about a
second) into one library in ``$VIRTUALPATIENT_CACHE`` or ``~/.cache/virtualpatient``, named by a
key that holds the text of every ``.c`` file (read from disk here, as the package ships them), the
compiler, its flags and the instruction-set target; calls go through :mod:`ctypes`, which releases
the GIL.

Two environment switches: ``VIRTUALPATIENT_SPARSE`` chooses ``auto`` (default: native when it
compiles, else ``torch.sparse``; dense on GPUs), ``native``, ``torch`` or ``off`` (dense matmuls
everywhere); ``VIRTUALPATIENT_MARCH`` the kernels' instruction-set target (:data:`MARCH_CHOICES`:
``native`` by default, ``x86-64-v3`` for AVX2 code on any AVX2 CPU, ...).
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from virtualpatient.engine.tiles import GradientPairs, Tiles
from virtualpatient.errors import UsageError
from virtualpatient.limits import cache_dir, cpu_signature

__all__ = [
    "KERNELS",
    "MARCH_CHOICES",
    "SPARSE_CHOICES",
    "backend",
    "kernel_sources",
    "kernel_target",
    "kernels_available",
    "kernels_for",
    "march_setting",
    "march_supported",
    "sparse_setting",
]

#: The folder of the C sources (package data: an installed wheel carries them).
KERNELS = Path(__file__).resolve().parent / "kernels"


def kernel_sources() -> dict[str, str]:
    """File name -> text of every C source of the kernels, in name order (what is compiled and keyed)."""
    return {path.name: path.read_text() for path in sorted(KERNELS.glob("*.c"))}

#: Compiler flags (plus -march=native when the compiler takes it). -fno-trapping-math lets the
#: relu select vectorise, -fno-math-errno the square root of the normal draws; neither changes a
#: value (no reassociation, no fast-math).
_FLAGS = "-O3 -fno-trapping-math -fno-math-errno"

_lock = threading.Lock()
_native: ctypes.CDLL | None = None
_native_tried = False
_pool: ThreadPoolExecutor | None = None


def _cpu_flags() -> set[str] | None:
    """The CPU's feature flags from ``/proc/cpuinfo`` (None where that file is not there)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


#: The values of ``VIRTUALPATIENT_MARCH``: the instruction-set target the native kernels are compiled
#: for, as GCC and clang name it (``-march=...``), plus ``generic`` (no ``-march`` at all: baseline
#: x86-64 or whatever the compiler defaults to). ``native`` (default) is this CPU; ``x86-64-v3`` is
#: AVX2 + FMA (what a CPU without AVX-512 runs); ``x86-64-v4`` adds AVX-512.
MARCH_CHOICES = ("native", "x86-64-v4", "x86-64-v3", "x86-64-v2", "x86-64", "generic")

#: CPU flags (as /proc/cpuinfo names them) that a library built for each x86 level needs.
_MARCH_NEEDS = {
    "x86-64-v2": ("sse4_2", "ssse3", "popcnt"),
    "x86-64-v3": ("sse4_2", "ssse3", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe"),
    "x86-64-v4": ("sse4_2", "ssse3", "popcnt", "avx", "avx2", "fma", "bmi1", "bmi2", "f16c", "movbe",
                  "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"),
}


def march_setting() -> str:
    """The ``VIRTUALPATIENT_MARCH`` switch, validated (``"native"`` when unset).

    Raises
    ------
    UsageError
        The variable holds another value (the message names the variable and the values it takes).
    """
    choice = os.environ.get("VIRTUALPATIENT_MARCH", "native").strip().lower() or "native"
    if choice not in MARCH_CHOICES:
        raise UsageError(f"environment variable VIRTUALPATIENT_MARCH must be one of {', '.join(MARCH_CHOICES)}, "
                         f"got {choice!r}")
    return choice


def march_supported(march: str) -> bool:
    """Whether this CPU runs code built for ``march`` (True where its flags cannot be read)."""
    if march in ("native", "generic", "x86-64"):
        return True
    flags = _cpu_flags()
    if flags is None or platform.machine().lower() not in ("x86_64", "amd64"):
        return flags is None
    return all(f in flags for f in _MARCH_NEEDS[march])


def _arch_flags(march: str) -> list[str]:
    return [] if march == "generic" else [f"-march={march}"]


def _compile(march: str = "native") -> ctypes.CDLL | None:
    """Build (or find in the cache) the kernels for the instruction-set target ``march``.

    The cache key holds the source, the compiler, the flags and the target; a ``native`` build
    also holds the CPU's model and flags (it is built for this CPU), so a ``native`` and an
    ``x86-64-v3`` library never share a file, even on one machine.
    """
    if march not in MARCH_CHOICES:
        raise UsageError(f"instruction-set target must be one of {', '.join(MARCH_CHOICES)}, got {march!r}")
    if not march_supported(march):
        raise UsageError(f"VIRTUALPATIENT_MARCH={march} needs CPU features "
                         f"({', '.join(_MARCH_NEEDS[march])}) that this CPU lacks")
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        return None
    machine = cpu_signature() if march == "native" else platform.machine()
    sources = kernel_sources()
    if not sources:
        raise FileNotFoundError(f"no C sources in {KERNELS}")
    texts = [part for name, text in sources.items() for part in (name, text)]
    key = hashlib.sha256("\0".join((*texts, cc, _FLAGS, march, machine)).encode()).hexdigest()[:16]
    target = cache_dir() / f"vp_sparse_{march}_{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            files = []  # the texts the key was made of, not a second read of the folder
            for name, text in sources.items():
                files.append(str(Path(tmp) / name))
                Path(files[-1]).write_text(text)
            out = Path(tmp) / target.name
            # A compiler that does not know the target builds a baseline library only for "native"
            # (the default must work anywhere); a named target it cannot build is no target at all.
            for arch in ((_arch_flags(march), []) if march == "native" else (_arch_flags(march),)):
                cmd = [cc, *_FLAGS.split(), *arch, "-shared", "-fPIC", "-o", str(out), *files, "-lm"]
                if subprocess.run(cmd, capture_output=True).returncode == 0:
                    break
            else:
                return None
            os.replace(out, target)  # atomic: concurrent workers may build the same file
    lib = ctypes.CDLL(str(target))
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.vp_spmm.argtypes = [p, p, p, p, p, p, p, i, i, i, i, i, i]
    lib.vp_spmm.restype = None
    lib.vp_sddmm.argtypes = [p, p, p, p, p, p, i, i, i, i, i]
    lib.vp_sddmm.restype = None
    f, c = ctypes.c_float, ctypes.c_int
    lib.vp_post.argtypes = [p, p, p, p, i, i, i, c, f, f]
    lib.vp_post.restype = None
    lib.vp_pre_grad.argtypes = [p, p, i, c, f]
    lib.vp_pre_grad.restype = None
    lib.vp_noise_t.argtypes = [p, p, i, i, i, f, f, f, f]
    lib.vp_noise_t.restype = None
    lib.vp_normal.argtypes = [p, p, i, f, f]
    lib.vp_normal.restype = None
    lib.vp_dense.argtypes = [p, i, i, i, p, i, i, i, p, p, i, i, p, i, i, i, i, i, i]
    lib.vp_dense.restype = None
    lib.vp_dense_tiles.argtypes = [p, i, i, i, p, i, i, p, i, i, p, i, p, p, p, i, i, i, i]
    lib.vp_dense_tiles.restype = None
    lib.vp_dense_wgrad.argtypes = [p, i, i, p, i, i, p, p, i, i, p, i, p, p, i, i, i, i]
    lib.vp_dense_wgrad.restype = None
    lib.vp_gemv.argtypes = [p, i, i, p, i, p, i, i, i, i, i]
    lib.vp_gemv.restype = None
    lib.vp_gemv_t.argtypes = [p, i, i, p, i, p, i, i, i, i, i]
    lib.vp_gemv_t.restype = None
    lib.vp_dense_fast.argtypes = []
    lib.vp_dense_fast.restype = ctypes.c_int
    lib.vp_march = march
    return lib


def _native_lib() -> ctypes.CDLL | None:
    global _native, _native_tried
    if not _native_tried:
        with _lock:
            if not _native_tried:
                march = march_setting()  # a bad value is the user's to fix: raised, not warned about
                try:
                    _native = _compile(march)
                except UsageError:
                    raise
                except Exception as exc:  # pragma: no cover - depends on the machine
                    warnings.warn(f"virtualpatient: native sparse kernels unavailable ({exc}); using torch.sparse",
                                  RuntimeWarning, stacklevel=2)
                    _native = None
                _native_tried = True
    return _native


def kernel_target() -> str | None:
    """The instruction-set target of the loaded native kernels (a :data:`MARCH_CHOICES` value), or
    None without them."""
    lib = _native_lib()
    return None if lib is None else lib.vp_march


@contextlib.contextmanager
def kernels_for(march: str):
    """Within the block, the native kernels are the ones built for ``march`` (for tests and
    benchmarks that compare targets in one process). Raises :class:`UsageError` for an unknown
    target or one this CPU cannot run, and RuntimeError when the compiler cannot build it."""
    global _native, _native_tried
    lib = _compile(march)
    if lib is None:
        raise RuntimeError(f"the C compiler could not build the kernels for {march}")
    with _lock:
        old = (_native, _native_tried)
        _native, _native_tried = lib, True
    try:
        yield lib
    finally:
        with _lock:
            _native, _native_tried = old


def kernels_available() -> bool:
    """Whether the native CPU kernels compiled on this machine."""
    return _native_lib() is not None


#: The values of the ``VIRTUALPATIENT_SPARSE`` environment switch.
SPARSE_CHOICES = ("auto", "native", "torch", "off")


def sparse_setting() -> str:
    """The ``VIRTUALPATIENT_SPARSE`` switch, validated (``"auto"`` when unset).

    Raises
    ------
    UsageError
        The variable holds another value (the message names the variable and the values it takes),
        or ``VIRTUALPATIENT_MARCH`` does (:func:`march_setting`).
    """
    choice = os.environ.get("VIRTUALPATIENT_SPARSE", "auto").strip().lower() or "auto"
    if choice not in SPARSE_CHOICES:
        raise UsageError(f"environment variable VIRTUALPATIENT_SPARSE must be one of {', '.join(SPARSE_CHOICES)}, "
                         f"got {choice!r}")
    march_setting()  # its companion switch, so that callers refusing bad settings early refuse both
    return choice


def backend(device: torch.device | str) -> str:
    """The sparse backend used on ``device``: ``"native"``, ``"torch"`` or ``"off"`` (dense matmuls).

    ``VIRTUALPATIENT_SPARSE`` overrides the default, which is ``native`` on CPU when the kernels
    compile, ``torch`` on CPU otherwise, and ``off`` on GPUs (dense matmuls are fast there).
    """
    choice = sparse_setting()
    is_cpu = torch.device(device).type == "cpu"
    if choice == "auto":
        if not is_cpu:
            return "off"
        return "native" if kernels_available() else "torch"
    if choice == "native" and (not is_cpu or not kernels_available()):
        return "torch"
    return choice


def _threads_pool() -> ThreadPoolExecutor | None:
    global _pool
    n = torch.get_num_threads()
    if n <= 1:
        return None
    if _pool is None or _pool._max_workers != n:
        _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="vp-sparse")
    return _pool


def _split_blocks(n_blocks: int, work: int) -> list[tuple[int, int]]:
    """Split ``n_blocks`` independent blocks (patients, or a kernel's row tiles) over torch's thread
    count when the work is worth it (ctypes drops the GIL)."""
    if work < 2_000_000 or n_blocks < 2 or torch.get_num_threads() <= 1:
        return [(0, n_blocks)]
    pool = _threads_pool()
    if pool is None or work < 2_000_000 or n_blocks < 2:
        return [(0, n_blocks)]
    parts = min(pool._max_workers, n_blocks)
    bounds = [round(i * n_blocks / parts) for i in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _run_parts(parts: list[tuple[int, int]], fn) -> None:
    if len(parts) == 1:
        fn(*parts[0])
        return
    futures = [_threads_pool().submit(fn, a, b) for a, b in parts]
    for f in futures:
        f.result()


# --------------------------------------------------------------------------------------------
# Calls (the caller checks usable() first)
# --------------------------------------------------------------------------------------------
def usable(*tensors: torch.Tensor) -> bool:
    """Whether the native kernels can take these tensors: float32 on the CPU, kernels built."""
    return all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and kernels_available()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def spmm(ptr, idx, val, perm, bias, x, y, block_rows: int, n_blocks: int) -> None:
    """``vp_spmm`` over ``n_blocks`` blocks of ``block_rows`` rows (one per patient), split over
    torch's threads when the work is worth it."""
    lib = _native_lib()
    n = x.shape[-1]

    def run(b0: int, b1: int) -> None:
        lib.vp_spmm(_ptr(ptr), _ptr(idx), _ptr(val), _ptr(perm), _ptr(bias), _ptr(x), _ptr(y),
                    b0 * block_rows, b1 * block_rows, n, x.stride(0), y.stride(0), block_rows)

    _run_parts(_split_blocks(n_blocks, idx.numel() * n), run)


def sddmm(ptr, idx, g, x, out, gsum, block_rows: int, n_blocks: int) -> None:
    """``vp_sddmm`` over ``n_blocks`` blocks of ``block_rows`` rows, split as :func:`spmm`."""
    lib = _native_lib()
    n = x.shape[-1]

    def run(b0: int, b1: int) -> None:
        lib.vp_sddmm(_ptr(ptr), _ptr(idx), _ptr(g), _ptr(x), _ptr(out), _ptr(gsum), b0 * block_rows,
                     b1 * block_rows, n, g.stride(0), x.stride(0))

    _run_parts(_split_blocks(n_blocks, idx.numel() * n), run)


def post(h: torch.Tensor, bias: torch.Tensor | None, deriv: torch.Tensor | None, rows: int, n: int, act: int,
         scale: float, shift: float, source: torch.Tensor | None = None) -> None:
    """``vp_post`` on ``rows`` contiguous rows of ``n`` (``act`` 0: relu, 1: tanh), reading from
    ``source`` (contiguous, the same shape) when given."""
    _native_lib().vp_post(_ptr(h), _ptr(source), _ptr(bias), _ptr(deriv), rows, n, n, act, scale, shift)


def noise_t(h: torch.Tensor, draw: torch.Tensor, sigma: float, add: float, scale: float, shift: float) -> None:
    """``vp_noise_t`` on ``h`` ``[P, units, n]`` and ``draw`` ``[P, n, units]`` (both contiguous)."""
    p, units, n = h.shape
    _native_lib().vp_noise_t(_ptr(h), _ptr(draw), p, units, n, sigma, add, scale, shift)


#: Bytes of a torch CPU generator's state (``Generator.get_state()``), the layout ``vp_normal`` reads.
GENERATOR_STATE_BYTES = 5056


def normal_(out: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``out.normal_(generator=generator)`` through ``vp_normal``: the same numbers, and the generator
    left in the same state (``out`` float32, contiguous, at least 16 values; check
    :func:`normal_matches_torch` first)."""
    state = generator.get_state()
    _native_lib().vp_normal(_ptr(state), _ptr(out), out.numel(), 0.0, 1.0)
    generator.set_state(state)
    return out


def normal_matches_torch() -> bool:
    """Whether ``vp_normal`` draws what this torch draws (checked once per loaded library, on sizes
    with and without a partial last block and across a regeneration of the generator's state)."""
    lib = _native_lib()
    if lib is None:
        return False
    ok = getattr(lib, "vp_normal_ok", None)
    if ok is None:
        ok = torch.Generator().get_state().numel() == GENERATOR_STATE_BYTES
        mine, theirs = torch.Generator().manual_seed(20261202), torch.Generator().manual_seed(20261202)
        for n in (16, 37, 1000, 5003) if ok else ():
            a, b = torch.empty(n), torch.empty(n)
            normal_(a, mine)
            b.normal_(generator=theirs)
            ok = ok and torch.equal(a, b) and torch.equal(mine.get_state(), theirs.get_state())
        lib.vp_normal_ok = ok
    return ok


def pre_grad(g: torch.Tensor, deriv: torch.Tensor, scale: float) -> None:
    """``vp_pre_grad`` on contiguous ``g`` and ``deriv`` (bool: relu's mask; float: tanh's derivative)."""
    _native_lib().vp_pre_grad(_ptr(g), _ptr(deriv), g.numel(), 0 if deriv.dtype == torch.bool else 1, scale)


#: ``vp_dense``'s register tile height (rows split over threads come in whole tiles) and its widest
#: panel of ``B`` (two vectors of at most 16 floats): kernels/dense.c.
_DENSE_TILE_ROWS, _DENSE_PANEL_WIDTH = 6, 32


def dense(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``out[p] = a[p] @ b[p] (+ bias[p, :, None])`` through ``vp_dense``: one fused multiply-add chain
    per output in ascending ``k``. ``a`` ``[P, M, K]`` in any layout; ``b`` ``[P, K, N]`` with
    contiguous rows, or the transpose of a tensor with contiguous rows (packed a panel at a time,
    no copy of the whole); ``out`` ``[P, M, N]`` with contiguous rows, ``bias`` ``[P, M]``
    contiguous; all float32 on the CPU. With several torch threads the rows are split over them
    (each output is its own chain, so the bits do not depend on the split)."""
    n_patients, m, k = a.shape
    n = b.shape[2]
    transposed = b.stride(2) != 1 and b.stride(1) == 1
    if (b.stride(2) != 1 and not transposed) or out.stride(2) != 1 or (bias is not None and not bias.is_contiguous()):
        raise ValueError("vp_dense needs rows of b (or of its transpose) and of out, and the bias, contiguous")
    lib = _native_lib()
    ldb = b.stride(2) if transposed else b.stride(1)

    def run(t0: int, t1: int) -> None:
        m0, m1 = t0 * _DENSE_TILE_ROWS, min(t1 * _DENSE_TILE_ROWS, m)
        panel = torch.empty(_DENSE_PANEL_WIDTH * k) if transposed else None
        row_bias = None if bias is None else bias[:, m0:]
        lib.vp_dense(_ptr(a[:, m0:]), a.stride(0), a.stride(1), a.stride(2), _ptr(b), b.stride(0), ldb,
                     int(transposed), _ptr(panel), _ptr(out[:, m0:]), out.stride(0), out.stride(1), _ptr(row_bias),
                     m, 0, n_patients, m1 - m0, n, k)

    _run_parts(_split_blocks(-(-m // _DENSE_TILE_ROWS), n_patients * m * n * k), run)
    return out


def dense_tiles(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, tiles: Tiles,
                bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dense` through ``vp_dense_tiles``: the rows of ``out`` in the tiles of ``tiles``, each
    tile's chains over its own list of terms (``b``'s rows contiguous). Equal to :func:`dense`
    bit for bit where ``a`` is 0 at every term a tile leaves out (for finite ``b``)."""
    n_patients, m, k = a.shape
    n = b.shape[2]
    if b.stride(2) != 1 or out.stride(2) != 1 or (bias is not None and not bias.is_contiguous()):
        raise ValueError("vp_dense_tiles needs rows of b and of out, and the bias, contiguous")
    lib = _native_lib()
    table, ptr, idx = tiles.table, tiles.ptr, tiles.idx

    def run(t0: int, t1: int) -> None:
        lib.vp_dense_tiles(_ptr(a), a.stride(0), a.stride(1), a.stride(2), _ptr(b), b.stride(0), b.stride(1),
                           _ptr(out), out.stride(0), out.stride(1), _ptr(bias), 0 if bias is None else bias.stride(0),
                           _ptr(table), _ptr(ptr), _ptr(idx), t0, t1, n, k)

    _run_parts(_split_blocks(tiles.n_tiles, n_patients * m * n * k), run)
    return out


def dense_wgrad(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor, pairs: GradientPairs) -> torch.Tensor:
    """The weight gradient ``out[p] = a[p] @ b[p]`` through ``vp_dense_wgrad`` (``b`` the transpose
    of a tensor with contiguous rows, ``a``'s and ``out``'s rows contiguous): the full tiles of
    ``pairs`` on every column, the other rows on their pairs only, each output ``vp_dense``'s chain.
    ``pairs`` must be made for groups of :func:`dense_group_width` columns."""
    n_patients, m, k = a.shape
    n = b.shape[2]
    if b.stride(1) != 1 or a.stride(2) != 1 or out.stride(2) != 1:
        raise ValueError("vp_dense_wgrad needs rows of a, of b's transpose and of out contiguous")
    if pairs.group != dense_group_width() or pairs.n_panels != -(-n // (2 * pairs.group)):
        raise ValueError(f"pairs were made for groups of {pairs.group} of {pairs.n_panels * 2 * pairs.group} columns, "
                         f"not this library's group width {dense_group_width()} and {n} columns")
    lib = _native_lib()

    def run(p0: int, p1: int) -> None:
        panel = torch.empty(_DENSE_PANEL_WIDTH * k)
        lib.vp_dense_wgrad(_ptr(a), a.stride(0), a.stride(1), _ptr(b), b.stride(0), b.stride(2), _ptr(panel),
                           _ptr(out), out.stride(0), out.stride(1), _ptr(pairs.table), pairs.table.shape[0],
                           _ptr(pairs.ptr), _ptr(pairs.pairs), p0, p1, n, k)

    _run_parts(_split_blocks(n_patients, n_patients * m * n * k), run)
    return out


def gemv(w: torch.Tensor, x: torch.Tensor, out: torch.Tensor, transpose: bool = False) -> torch.Tensor:
    """One-sample products through ``vp_gemv`` (``out[p] = w[p] @ x[p]``, ``x`` ``[P, in, 1]``, in the order
    of oneDNN's matrix-vector kernel on AVX2) or, with ``transpose``, ``vp_gemv_t`` (``out[p] = w[p]^T
    @ x[p]``, ``x`` ``[P, out, 1]``, one chain per output). ``w`` ``[P, out, in]`` with contiguous rows;
    ``x`` and ``out`` contiguous per patient; float32 on the CPU (kernels/dense.c)."""
    n_patients, m, k = w.shape
    if w.stride(2) != 1 or x.shape[2] != 1 or out.shape[2] != 1 or x.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("vp_gemv needs rows of w contiguous and one contiguous column per patient in x and out")
    if x.shape[1] != (m if transpose else k) or out.shape[1] != (k if transpose else m):
        raise ValueError(f"vp_gemv: shapes {tuple(w.shape)}, {tuple(x.shape)} -> {tuple(out.shape)} do not match")
    fn = _native_lib().vp_gemv_t if transpose else _native_lib().vp_gemv
    fn(_ptr(w), w.stride(0), w.stride(1), _ptr(x), x.stride(0), _ptr(out), out.stride(0), 0, n_patients, m, k)
    return out


def dense_group_width() -> int:
    """Columns per group of ``vp_dense_wgrad``'s pairs: the fast path's vector width (8 where it
    has none: the scalar loop's panels)."""
    return dense_vector_width() or 8


def dense_vector_width() -> int:
    """Floats per vector of ``vp_dense``'s fast path in the loaded library (0: no fast path, only
    the scalar loop, as on targets without AVX2 and FMA)."""
    lib = _native_lib()
    return 0 if lib is None else int(lib.vp_dense_fast())
