"""Compile policy of the kernels: ``torch.compile`` once per kernel key (dynamic shapes) in
two variants — serial code for small tensors, OpenMP code with the run-time thread count
from :data:`PARALLEL_MIN_NUMEL` elements on — called without Dynamo's frame hook once
compiled (:class:`_Variant`); the eager fallback with ``BNORM_NO_COMPILE=1`` or after a
failed compile (one warning), and what an enclosing ``torch.compile`` sees."""

from __future__ import annotations

import functools
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..options import env_switch

_ENV_NO_COMPILE = "BNORM_NO_COMPILE"


def compile_enabled() -> bool:
    """Whether the kernels are compiled: False when ``BNORM_NO_COMPILE`` is set to anything
    but ``""``/``"0"``, when torch.compile is unsupported here, or after a failed compile."""
    if env_switch(_ENV_NO_COMPILE):
        return False
    return _COMPILE_FAILURE is None and _dynamo_supported()


_COMPILE_FAILURE: str | None = None


@functools.cache
def _dynamo_supported() -> bool:
    try:
        return bool(torch._dynamo.is_dynamo_supported())
    except Exception:  # pragma: no cover - very old or unusual builds
        return False


# --- compilation: one code object per kernel variant ---------------------------------

_COMPILED: dict[tuple[Any, ...], _Compiled] = {}


# Inductor stores a pointwise result that feeds both a reduction and another kernel once it
# reads more than `realize_reads_threshold` (4) buffers: in the backward that is dz, one
# more tensor-sized allocation, write and read. Recomputing dz from dy and x is cheaper.
_INDUCTOR_OPTIONS: dict[str, Any] = {"realize_reads_threshold": 16}

# Threads. Inductor's C++ backend decides at compile time whether a loop gets an OpenMP
# parallel region, from the size hints of the shape it compiles first (serial below
# `cpp.min_chunk_size` elements per thread), with `num_threads` fixed to
# torch.get_num_threads() at that time. With dynamic shapes that one kernel then serves
# every shape, and Inductor's on-disk FX graph cache keys it without the hints: a kernel
# first compiled at a small shape (a test, a warm-up batch) ran serially at every size, in
# that process and in every later one that hit the cache (what made 2 threads barely faster
# than 1), and `torch.set_num_threads` after the first call changed nothing. So each
# kernel has two compiled variants, chosen per call by the size of its largest tensor:
# from PARALLEL_MIN_NUMEL elements on, `cpp.dynamic_threads` (every loop nest in a parallel
# region, OpenMP's thread count at run time, i.e. torch's setting); below it serial code
# (`cpp.threads=1`), since waking a second thread costs more than such a kernel's loop —
# ATen's own ops stay serial below a similar grain. The options differ, so the two never
# share an on-disk cache entry.
PARALLEL_MIN_NUMEL = 1 << 16
_PARALLEL_OPTIONS: dict[str, Any] = {**_INDUCTOR_OPTIONS, "cpp.dynamic_threads": True}
_SERIAL_OPTIONS: dict[str, Any] = {**_INDUCTOR_OPTIONS, "cpp.threads": 1}


def _specialized(fn: Callable[..., Any], name: str) -> Callable[..., Any]:
    """A copy of ``fn`` with its own code object: torch.compile keeps its cache (and its
    recompile limit) per code object, so every kernel variant gets its own."""
    code = fn.__code__.replace(co_name=name, co_qualname=name)
    return types.FunctionType(code, fn.__globals__, name, fn.__defaults__, fn.__closure__)


def _run(
    kind: str,
    fn: Callable[..., Any],
    key: tuple[Any, ...],
    *args: Any,
    use_compiled: bool | None = None,
) -> Any:
    """``fn(*args)``: compiled (cached per ``key``) when enabled (or when ``use_compiled`` is
    True: a recomputation in the mode of its forward), else eager. If compiling or
    running the compiled kernel fails (no C++ compiler, an unsupported platform, Dynamo's
    recompile limit...), compilation is switched off with a warning and ``fn`` runs eagerly:
    the kernels are pure functions, so the result is the same."""
    # Inside an enclosing torch.compile, first: Dynamo traces fn into the caller's graph,
    # and must not trace compile_enabled (torch._dynamo.is_dynamo_supported is marked as
    # skipped: calling it is a graph break, an error under fullgraph=True).
    if torch.compiler.is_compiling():
        return fn(*args)
    if use_compiled is None:
        use_compiled = compile_enabled()
    if not use_compiled:
        return fn(*args)
    # Plain tensors in: Dynamo keeps a Parameter's shape static (which would make the
    # channel count static too) and guards on requires_grad (one more compile each).
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    full_key = (kind, *key)
    compiled = _COMPILED.get(full_key)
    if compiled is None:
        text = "_".join(str(k) for k in full_key).replace("torch.", "").replace(".", "p")
        name = "".join(ch if ch.isalnum() else "_" for ch in text)
        compiled = _COMPILED[full_key] = _Compiled(fn, f"bnorm_{name}")
    try:
        return compiled(*args)
    except Exception as err:
        _disable_compile(err)
        return fn(*args)


class _Compiled:
    """A kernel's two compiled variants (serial for small tensors, parallel from
    :data:`PARALLEL_MIN_NUMEL` elements on), each compiled on first use."""

    __slots__ = ("fn", "name", "variants")

    def __init__(self, fn: Callable[..., Any], name: str) -> None:
        self.fn = fn
        self.name = name
        self.variants: dict[bool, _Variant] = {}

    def __call__(self, *args: Any) -> Any:
        numel = max((a.numel() for a in args if isinstance(a, Tensor)), default=0)
        parallel = numel >= PARALLEL_MIN_NUMEL
        variant = self.variants.get(parallel)
        if variant is None:
            suffix, options = ("par", _PARALLEL_OPTIONS) if parallel else ("ser", _SERIAL_OPTIONS)
            fn = _specialized(self.fn, f"{self.name}_{suffix}")
            variant = self.variants[parallel] = _Variant(fn, options)
        return variant(*args)


class _Variant:
    """``torch.compile(fn)`` (dynamic shapes, one graph), called without Dynamo's frame
    evaluation once it has compiled: a call checks the arguments against each of Dynamo's
    cache entries for ``fn`` with that entry's own guards (its C++ guard manager, ~1 µs)
    and runs the entry's transformed code — the bytecode Dynamo would run, which calls the
    compiled graph — directly. Entering a torch.compile'd function through Dynamo's frame
    hook costs ~10-20 µs per call on this CPU, as much as a small kernel. A call that no
    entry's guards accept (a new dtype, a size 1 where there was none...) goes through
    Dynamo, which recompiles as usual, and the entries are read again; so does every call
    while a frame hook is active (eager code between an enclosing torch.compile's graphs,
    which would trace the transformed code as a new frame) or under a stance other than
    the default. The same graphs run under the same guards: only the frame hook is
    skipped."""

    __slots__ = ("compiled", "fast", "fn", "names")

    def __init__(self, fn: Callable[..., Any], options: dict[str, Any]) -> None:
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=True, fullgraph=True, options=options)
        code = fn.__code__
        self.names = code.co_varnames[: code.co_argcount]
        self.fast: list[_Entry] = []

    def __call__(self, *args: Any) -> Any:
        if self.fast and len(args) == len(self.names) and _direct_call_allowed():
            frame_locals = dict(zip(self.names, args, strict=True))
            for check, run in self.fast:
                if check(frame_locals):
                    try:
                        return run(*args)
                    except Exception:  # e.g. torch._dynamo.reset() dropped the graph
                        break
        out = self.compiled(*args)
        self.fast = _cache_entries(self.fn)
        return out


def _direct_call_allowed() -> bool:
    """Whether a compiled kernel may run without Dynamo: no frame hook active (eager code
    between an enclosing torch.compile's graphs) and Dynamo's default stance (not, e.g.,
    ``torch.compiler.set_stance("force_eager")``)."""
    try:
        return (
            torch._C._dynamo.eval_frame.get_eval_frame_callback() is None
            and torch._dynamo.eval_frame._stance.stance == "default"
        )
    except Exception:  # pragma: no cover - a torch without these internals
        return False


_Entry = tuple[Callable[[dict[str, Any]], bool], Callable[..., Any]]


def _cache_entries(fn: Callable[..., Any]) -> list[_Entry]:
    """(guard check, transformed code as a function) of each of Dynamo's cache entries for
    ``fn``, most recent first (Dynamo's order); [] where Dynamo's internals differ from
    what this expects (every call then goes through Dynamo)."""
    try:
        from torch._C._dynamo.eval_frame import _debug_get_cache_entry_list

        entries = _debug_get_cache_entry_list(fn.__code__)
        code = fn.__code__
        fast: list[_Entry] = []
        for entry in entries:
            if entry.code.co_argcount != code.co_argcount or entry.code.co_freevars:
                return []
            run = types.FunctionType(entry.code, fn.__globals__, code.co_name)
            fast.append((entry.guard_manager.check, run))
        return fast
    except Exception:  # pragma: no cover - a torch without these internals
        return []


def _disable_compile(err: Exception) -> None:
    global _COMPILE_FAILURE
    _COMPILE_FAILURE = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"bnorm: compiling the fused kernels failed ({_COMPILE_FAILURE.splitlines()[0][:300]}); "
        f"using the eager fallback. Set {_ENV_NO_COMPILE}=1 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
