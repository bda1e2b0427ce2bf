"""Compile policy of the kernels: ``torch.compile`` once per kernel key (dynamic shapes),
the eager fallback with ``BNORM_NO_COMPILE=1`` or after a failed compile (one warning),
and what an enclosing ``torch.compile`` sees."""

from __future__ import annotations

import functools
import os
import types
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_ENV_NO_COMPILE = "BNORM_NO_COMPILE"


def compile_enabled() -> bool:
    """Whether the kernels are compiled: False when ``BNORM_NO_COMPILE`` is set to anything
    but ``""``/``"0"``, when torch.compile is unsupported here, or after a failed compile."""
    if os.environ.get(_ENV_NO_COMPILE, "") not in ("", "0"):
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

_COMPILED: dict[tuple[Any, ...], Callable[..., Any]] = {}


# Inductor stores a pointwise result that feeds both a reduction and another kernel once it
# reads more than `realize_reads_threshold` (4) buffers: in the backward that is dz, one
# more tensor-sized allocation, write and read. Recomputing dz from dy and x is cheaper.
_INDUCTOR_OPTIONS: dict[str, Any] = {"realize_reads_threshold": 16}


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
    if use_compiled is None:
        use_compiled = compile_enabled()
    if torch.compiler.is_compiling() or not use_compiled:
        return fn(*args)
    # Plain tensors in: Dynamo keeps a Parameter's shape static (which would make the
    # channel count static too) and guards on requires_grad (one more compile each).
    args = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    full_key = (kind, *key)
    compiled = _COMPILED.get(full_key)
    if compiled is None:
        text = "_".join(str(k) for k in full_key).replace("torch.", "").replace(".", "p")
        name = "".join(ch if ch.isalnum() else "_" for ch in text)
        compiled = _COMPILED[full_key] = torch.compile(
            _specialized(fn, f"bnorm_{name}"),
            dynamic=True,
            fullgraph=True,
            options=_INDUCTOR_OPTIONS,
        )
    try:
        return compiled(*args)
    except Exception as err:
        _disable_compile(err)
        return fn(*args)


def _disable_compile(err: Exception) -> None:
    global _COMPILE_FAILURE
    _COMPILE_FAILURE = f"{type(err).__name__}: {err}"
    warnings.warn(
        f"bnorm: compiling the fused kernels failed ({_COMPILE_FAILURE.splitlines()[0][:300]}); "
        f"using the eager fallback. Set {_ENV_NO_COMPILE}=1 to silence this.",
        RuntimeWarning,
        stacklevel=3,
    )
