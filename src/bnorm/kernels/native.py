"""bnorm's native CPU kernels for ``act(BN(x) + r)`` in training: C with OpenMP
(``bn_act_native.c``), built once per machine with the system's C compiler, called by a
C++ autograd node (``bn_act_node.cpp``, the operator ``bnorm_native::bn_act_train``,
built against the installed torch: :func:`node`) or, where that cannot be built, through
:mod:`ctypes` from a Python ``autograd.Function`` (:func:`forward`, :func:`backward`).

What they cover: CPU tensors of float32 or float64 (a residual of the same dtype), any
memory layout, and the piecewise-linear activations — identity, relu, leaky_relu — whose
forward and derivative are a select. The forward is one call (statistics, the
running-statistics update, y), the backward one call (Σ dz and Σ dz·(x − μ), with dr = dz
written on the way, then dx), with the minimal passes over memory: forward 2 reads + 1
write (one more read with a residual), backward 2 reads, then 2 reads + 1 write without a
residual, 3 reads + 1 write, then 2 reads + 1 write with one. The per-channel sums are
taken over each (row, channel) run or chunk of rows in the input's precision and added
in float64 in a fixed order, so the results do not depend on the thread count. Each call
uses torch's thread count (``torch.get_num_threads()``; serial below 32768 elements).

Why a hand-written kernel: a compiled Inductor kernel costs ~30 µs of wrappers per call
and its channels-last reductions reached a quarter of the memory bandwidth; these cost
~1-3 µs per call and run at the copy's speed. Why a C++ node: a Python
``autograd.Function`` costs ~40 µs per forward+backward here, which at small batches
weighed as much as the kernels' work; the node's forward costs ~14 µs at 2×64×8×8, kernel
included.

Build: ``cc -O3 -march=native -fopenmp -ffp-contract=off -shared -fPIC`` into the cache
directory (``$BNORM_CACHE_DIR``, else ``$XDG_CACHE_HOME/bnorm``, else ``~/.cache/bnorm``),
named by a hash of the sources, the flags, the compiler's version and the CPU's features,
so a change of any of them builds anew; the build takes about a second. ``$CC`` chooses
the compiler. If there is none, or the build fails, bnorm warns once and the layers use
the compiled Inductor kernels or the eager fallback (:mod:`bnorm.kernels.bn_act`).
``BNORM_NO_NATIVE=1`` switches these kernels off. The node is built on its first use
(~15 s: torch's headers) with ``$CXX`` (else c++/g++/clang++), linked with the kernels'
library and torch's, into the same cache, named by a hash that adds torch's version and
location; where it cannot be built bnorm warns once and calls the kernels from Python.
``BNORM_NO_NATIVE_NODE=1`` switches the node off.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ..options import Activation, env_switch

__all__ = ["Shape", "available", "backward", "forward", "node", "node_try", "slope_of", "supports"]

_ENV_NO_NATIVE = "BNORM_NO_NATIVE"
_SOURCES = ("bn_act_native.c", "bn_act_native_impl.h")
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC")
_DTYPES = {torch.float32: "f32", torch.float64: "f64"}
# The activations these kernels cover: the slope below 0 from the activation's parameter.
_SLOPES = {"identity": lambda p: 1.0, "relu": lambda p: 0.0, "leaky_relu": float}

_P, _I, _D, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double, ctypes.c_int
_FWD_ARGS = [_P, _P, _P, _I, _I, _I, _P, _P, _D, _D, _P, _P, _P, _P, _P, _D, _C, _P, _P, _C]
_BWD_ARGS = [_P, _P, _P, _P, _P, _I, _I, _I, _P, _P, _P, _P, _D, _P, _P, _C]


def slope_of(act: Activation) -> float | None:
    """The slope below 0 of a piecewise-linear activation (identity 1, relu 0, leaky_relu
    its negative slope), or None for one these kernels do not cover."""
    slope = _SLOPES.get(act.name)
    return None if slope is None else slope(act.param)


def supports(x: Tensor, residual: Tensor | None, act: Activation) -> bool:
    """Whether these kernels can run ``act(BN(x) + r)``: CPU, float32/float64, a residual
    of x's dtype, a piecewise-linear activation, the library built, and not switched off
    (``BNORM_NO_NATIVE``)."""
    return (
        act.name in _SLOPES
        and x.dtype in _DTYPES
        and x.is_cpu
        and x.numel() > 0
        and (residual is None or (residual.dtype == x.dtype and residual.is_cpu))
        and available()
    )


def available() -> bool:
    """Whether the native kernels are on: not switched off with ``BNORM_NO_NATIVE`` and
    the library built (building it on the first call)."""
    if env_switch(_ENV_NO_NATIVE):
        return False
    return _library() is not None


Shape = tuple[int, int, int]
"""(R, C, B): a tensor's memory as R rows of C channels of B contiguous values."""


def forward(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    shape: Shape,
    eps: float,
    slope: float,
    running: tuple[Tensor, Tensor, float, Tensor | None, Tensor | None] | None,
    skip_nonfinite: bool,
    var: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, int]:
    """(y, μ, 1/√(σ² + ε), status) of ``y = a(γ x̂ + β + r)``, a the activation of negative
    ``slope`` (:func:`slope_of`), for x (and a residual with x's strides) whose memory is
    ``shape`` = (R, C, B), and contiguous (C,) weight and bias of x's dtype (None: γ = 1,
    β = 0); y has x's strides. With ``running`` =
    (running_mean, running_var, α, num_batches_tracked, num_batches_skipped) — contiguous
    statistics of x's dtype, a float α — the kernel updates the buffers in place by
    :func:`bnorm._math.running_update`'s rule (torch.lerp's formula) and counts the batch:
    status 1 (updated) or 0 (``skip_nonfinite`` found a non-finite statistic: left, counted
    as skipped); without, status -1. ``var`` (C,), if given, receives the biased variance."""
    fwd = _functions()[x.dtype][0]
    r, c, b = shape
    y = torch.empty_like(x)
    mean, invstd = x.new_empty(c), x.new_empty(c)
    if running is None:
        rm = rv = tracked = skipped = None
        alpha = 0.0
    else:
        rm, rv, alpha, tracked, skipped = running
    status = fwd(
        x.data_ptr(), None if residual is None else residual.data_ptr(), y.data_ptr(), r, c, b,
        None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(), eps, slope, mean.data_ptr(), invstd.data_ptr(),
        None if var is None else var.data_ptr(), None if rm is None else rm.data_ptr(),
        None if rv is None else rv.data_ptr(), alpha, skip_nonfinite,
        None if tracked is None else tracked.data_ptr(),
        None if skipped is None else skipped.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    if status < -1:
        _failed("forward", status)
    if running is not None:  # (written through a pointer: autograd's in-place check)
        counter = tracked if status == 1 else skipped
        bumped = [t for t in (rm, rv, counter) if t is not None]
        torch.autograd.graph.increment_version(bumped)
    return y, mean, invstd, status


def backward(
    dy: Tensor,
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    shape: Shape,
    slope: float,
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(dx, dγ, dβ, dr) for dy, x (and r) with x's strides and memory ``shape``, the
    forward's weight and bias (None: γ = 1, β = 0), μ and 1/√(σ² + ε), and the
    activation's negative ``slope``; dx and dr have x's strides, dr is None without a
    residual."""
    bwd = _functions()[x.dtype][1]
    r, c, b = shape
    dx = torch.empty_like(x)
    dr = None if residual is None else torch.empty_like(x)
    dw, db = x.new_empty(c), x.new_empty(c)
    status = bwd(
        dy.data_ptr(), x.data_ptr(), None if residual is None else residual.data_ptr(),
        dx.data_ptr(), None if dr is None else dr.data_ptr(), r, c, b,
        None if weight is None else weight.data_ptr(),
        None if bias is None else bias.data_ptr(), mean.data_ptr(), invstd.data_ptr(), slope,
        dw.data_ptr(), db.data_ptr(),
        torch.get_num_threads(),
    )  # fmt: skip
    if status < 0:
        _failed("backward", status)
    return dx, dw, db, dr


def _failed(what: str, status: int) -> None:
    if status == -2:
        raise MemoryError(f"bnorm's native batch-norm {what} could not allocate its workspace")
    raise ValueError(f"bnorm's native batch-norm {what}: expected a non-empty input")


def _functions() -> dict[torch.dtype, tuple[Any, Any]]:
    loaded = _library()
    if loaded is None:  # callers check supports() first
        raise RuntimeError("bnorm's native kernels are not available here")
    return loaded[1]


# --- the build --------------------------------------------------------------------------


def cache_dir() -> Path:
    """Where the built library is kept: ``$BNORM_CACHE_DIR``, else
    ``$XDG_CACHE_HOME/bnorm``, else ``~/.cache/bnorm`` (where that cannot be written, the
    build uses ``bnorm-<uid>`` in the temp directory)."""
    if os.environ.get("BNORM_CACHE_DIR"):
        return Path(os.environ["BNORM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "bnorm"


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return name
    return None


def _cpu_features() -> str:
    """The CPU's feature flags (-march=native compiles for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(compiler: str) -> str:
    return subprocess.run(
        [compiler, "--version"], capture_output=True, text=True, timeout=60, check=False
    ).stdout


def library_path(compiler: str) -> Path:
    """The built library's path for this compiler: named by a hash of the sources, the
    flags, the compiler's version and the CPU's features."""
    here = Path(__file__).parent
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((here / name).read_bytes())
    for part in (" ".join(_FLAGS), _version(compiler), _cpu_features(), sys.platform):
        digest.update(part.encode())
    return cache_dir() / f"bn_act_native-{digest.hexdigest()[:20]}.so"


def build(compiler: str) -> Path:
    """Build the library into the cache (if not there yet) and return its path; a build
    writes a temporary file and renames it, so concurrent processes never load a partial
    library. Raises RuntimeError with the compiler's message if the build fails."""
    source = Path(__file__).parent / _SOURCES[0]
    return _cached_build(
        library_path(compiler), lambda out: [compiler, *_FLAGS, "-o", out, str(source), "-lm"]
    )


def _cached_build(path: Path, command: Callable[[str], list[str]]) -> Path:
    """``path`` built by ``command(output)`` unless it exists: into a temporary file of
    the same folder, renamed into place (concurrent builds never load a partial file);
    where the cache folder cannot be written, into ``bnorm-<uid>`` in the temp
    directory. Raises RuntimeError with the compiler's message if the build fails."""
    if path.exists():
        return path
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if not os.access(path.parent, os.W_OK):
            raise PermissionError(f"{path.parent} is not writable")
    except OSError:  # (a read-only home, say): a per-user folder in the temp directory
        user = getattr(os, "getuid", lambda: "user")()
        path = Path(tempfile.gettempdir()) / f"bnorm-{user}" / path.name
        if path.exists():
            return path
        path.parent.mkdir(parents=True, exist_ok=True)
    with _build_lock(path.with_suffix(".lock")):
        if path.exists():  # (another process built it while this one waited)
            return path
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
        os.close(fd)
        try:
            cmd = command(tmp)
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, check=False)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[:500]}")
            os.chmod(tmp, 0o755)  # (mkstemp's 0600: readable by every user of the cache)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return path


@contextlib.contextmanager
def _build_lock(lock: Path) -> Iterator[None]:
    """One build at a time of a cached file across processes (pytest-xdist workers, DDP
    ranks, a job's workers): the others wait, then find it built, rather than each
    compiling the same file at once. An exclusive ``flock`` on ``lock``, released with
    the file descriptor; without ``fcntl`` (Windows), no lock: concurrent builds are
    still safe, only wasteful."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@functools.cache
def _library() -> tuple[Path, dict[torch.dtype, tuple[Any, Any]]] | None:
    """The library's path and its (forward, backward) per dtype, built and loaded on the
    first call; None (after one warning) where it cannot be built."""
    compiler = _compiler()
    try:
        if compiler is None:
            raise RuntimeError("no C compiler found (set CC, or install gcc)")
        path = build(compiler)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:  # a damaged cached file: build it again, once
            path.unlink(missing_ok=True)
            path = build(compiler)
            lib = ctypes.CDLL(str(path))
        functions = {}
        for dtype, sfx in _DTYPES.items():
            fwd, bwd = getattr(lib, f"bnorm_fwd_{sfx}"), getattr(lib, f"bnorm_bwd_{sfx}")
            fwd.argtypes, fwd.restype = _FWD_ARGS, _C
            bwd.argtypes, bwd.restype = _BWD_ARGS, _C
            functions[dtype] = (fwd, bwd)
        return path, functions
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"bnorm: building the native CPU kernels failed ({err}); using the compiled "
            f"or eager kernels instead. Set {_ENV_NO_NATIVE}=1 to silence this.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None


# --- the autograd node ------------------------------------------------------------------

_ENV_NO_NODE = "BNORM_NO_NATIVE_NODE"
_NODE_SOURCE = "bn_act_node.cpp"
_NODE_FLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared")


def _cxx_compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def node_path(compiler: str, library: Path) -> Path:
    """The built autograd node's path: named by a hash of its source, the kernels'
    library it links (whose name hashes theirs), the flags, the C++ compiler's version and
    the torch it was built against (its version and where it is installed)."""
    digest = hashlib.sha256((Path(__file__).parent / _NODE_SOURCE).read_bytes())
    parts = (library.name, " ".join(_NODE_FLAGS), _version(compiler), torch.__version__)
    for part in (*parts, str(Path(torch.__file__).parent), sys.platform):
        digest.update(part.encode())
    return library.parent / f"bn_act_node-{digest.hexdigest()[:20]}.so"


def build_node(compiler: str, library: Path) -> Path:
    """Build the autograd node (``bn_act_node.cpp``, linked with the kernels' ``library``
    and torch's C++ libraries) into the cache, as :func:`build` does the kernels."""
    from torch.utils import cpp_extension  # (only to build: it imports setuptools)

    source = Path(__file__).parent / _NODE_SOURCE
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    libs = cpp_extension.library_paths()[0]
    abi = f"-D_GLIBCXX_USE_CXX11_ABI={int(torch.compiled_with_cxx11_abi())}"
    inputs = [str(source), str(library), f"-L{libs}", "-lc10", "-ltorch", "-ltorch_cpu"]
    rpath = f"-Wl,-rpath,{libs}"
    return _cached_build(
        node_path(compiler, library),
        lambda out: [compiler, *_NODE_FLAGS, *includes, abi, "-o", out, *inputs, rpath],
    )


def node() -> Any | None:
    """The operator ``torch.ops.bnorm_native.bn_act_train`` (``bn_act_node.cpp``): a C++
    autograd node around these kernels, so that a training step's forward and backward
    run no Python between the layer and the kernels. Built with the C++ compiler
    (``$CXX``, else c++/g++/clang++) against the installed torch on the first call (~15 s;
    cached like the kernels) and loaded with ``torch.ops.load_library``; None where
    ``BNORM_NO_NATIVE_NODE=1``, or (after one warning) where it cannot be built or loaded
    — the layers then call the kernels from a Python ``autograd.Function``, with the same
    results. For a call :func:`supports` has accepted (the kernels are on and built)."""
    if env_switch(_ENV_NO_NODE):
        return None
    return _node()


def node_try() -> Any | None:
    """The operator ``torch.ops.bnorm_native.bn_act_try`` (``bn_act_node.cpp``, built and
    loaded with :func:`node`'s): :func:`node`'s step where its kernels take the call's
    tensors as they are, and an empty list where they do not — the checks in C++; how
    :mod:`bnorm.kernels.bn_act` calls the node. None where :func:`node` is None."""
    return None if node() is None else _node_try()


@functools.cache
def _node_try() -> Any:
    return torch.ops.bnorm_native.bn_act_try.default


@functools.cache
def _node() -> Any | None:
    loaded = _library()
    compiler = _cxx_compiler()
    try:
        if loaded is None:
            raise RuntimeError("the native kernels are not built")
        if compiler is None:
            raise RuntimeError("no C++ compiler found (set CXX, or install g++)")
        path = build_node(compiler, loaded[0])
        try:
            torch.ops.load_library(str(path))
        except OSError:  # a damaged cached file: build it again, once
            path.unlink(missing_ok=True)
            torch.ops.load_library(str(build_node(compiler, loaded[0])))
        return torch.ops.bnorm_native.bn_act_train.default
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"bnorm: building the native kernels' C++ autograd node failed ({err}); calling "
            f"the kernels from Python instead (same results, more fixed cost per call). Set "
            f"{_ENV_NO_NODE}=1 to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
