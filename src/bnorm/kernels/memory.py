"""``bnorm.memory_saving()``: recompute the fused layers' outputs in backward instead of
saving them — fewer saved bytes for any activation, ReLU included, same gradients.

In a conv → BN → act network each activation y = act(γ x̂ + β + r) is saved by the layer
that consumes it (the next conv's input, the next block's residual), while the fused
layer (:func:`bnorm.kernels.batch_norm_act_train`) already saves its own input x. Inside
the scope::

    with bnorm.memory_saving():
        loss = criterion(model(x), target)
    loss.backward()

every fused ``BatchNormAct`` layer in training registers its output with the scope along
with what recomputes it: its input x, its residual r and the forward's per-channel
scale = γ/√(σ²_B + ε) and shift = β − μ_B·scale. The scope's saved-tensor hooks
(:class:`torch.autograd.graph.saved_tensors_hooks`) store, for a tensor that autograd
saves and that is a registered output or a view of one (same storage, dtype and version),
a handle instead of the tensor. In backward the handle's first unpack recomputes
y = act(x·scale + shift + r) with the very function the forward used for y (compiled or
eager alike) on the very same inputs — the forward's statistics, not recomputed ones — so
the recomputed y is the forward's bit for bit and every gradient is unchanged. The value
is kept while any handle of it lives (one recomputation per output and backward pass;
with ``retain_graph=True`` it stays for the next pass). A residual that is itself a
registered output is held as a handle too, so a ResNet's block outputs are recomputed
along the residual chain: the first handle unpacked in backward recomputes the block
outputs before it that are not yet recomputed, and each stays until its own handles are
released.

What it saves: a conv → BN → act block keeps x only (1× the activation) where the
layer alone keeps x and the next conv's saved input y (2×); the register of outputs
holds no tensor of its own (x and r are tensors the layer saves anyway) besides the
per-channel scale and shift. Measured (docs/kernels.md; ``bnorm bench
kernels``): a ReLU ResNet-20 at batch 128 saves 99.5 MB instead of 185.5 MB (torch's
layers) and its hooks hold at most 104.5 MB during backward, recomputed outputs
included. The cost is one more kernel call per layer in the forward (the statistics and
the output are two calls) and one output pass per recomputed output in backward.

Rules:

* Only fused layers register outputs: ``BatchNormAct*`` in training with an activation
  other than identity or a residual, not memory-efficient (it saves y itself), without a
  mask, ghost batches or sync, while gradients are recorded. Other layers run as usual.
  Inside an enclosing ``torch.compile`` nothing registers (the compiled graph's
  partitioner decides what is saved) and the scope changes nothing.
* Autograd's check for in-place modification of a saved tensor is kept: a tensor modified
  in place after it was saved raises ``RuntimeError`` in backward as without the scope
  (for a handle: while the tensor object given to the hook is alive). Autograd forbids
  modifying a ``BatchNormAct`` output in place; a tensor sharing its storage at another
  version than the registered output's is stored as is.
* Scopes do not nest (``ValueError``), and saved-tensor hooks entered inside the scope
  take precedence over it for their duration (autograd uses the innermost hooks). Leaving
  the scope, by an exception too, removes its hooks and its register; handles already
  stored keep working in backward.
* Double backward (``create_graph=True``) through a recomputed value is not supported:
  the recomputation runs without gradient tracking.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["memory_saving"]


class _State(threading.local):
    """Per-thread: the active scope. A class-level default, so that reading it where no
    scope was ever entered finds None (getattr with a default raised and caught an
    AttributeError on every training forward: ~2 µs each)."""

    scope: memory_saving | None = None


_STATE = _State()


def current_scope() -> memory_saving | None:
    """The active :class:`memory_saving` scope of this thread, or None."""
    return _STATE.scope


def _storage_key(t: Tensor) -> int | None:
    if t.layout != torch.strided or t.is_nested:
        return None
    try:
        return int(t.untyped_storage().data_ptr())
    except (RuntimeError, NotImplementedError):  # pragma: no cover - unusual subclasses
        return None


def _modified_error() -> RuntimeError:
    return RuntimeError(
        "one of the variables needed for gradient computation has been modified by an "
        "inplace operation (inside bnorm.memory_saving: a tensor saved for backward changed "
        "its version after it was saved)"
    )


class _Stored:
    """A tensor kept as is, with its version when saved (autograd's in-place check)."""

    __slots__ = ("tensor", "version")

    def __init__(self, tensor: Tensor) -> None:
        self.tensor = tensor
        self.version = tensor._version

    def get(self) -> Tensor:
        if self.tensor._version != self.version:
            raise _modified_error()
        return self.tensor


class _Entry:
    """A registered output: ``fn(*inputs)`` recomputes it (inputs: tensors, handles or None)."""

    __slots__ = ("__weakref__", "cached", "fn", "inputs", "observe", "output", "version")

    def __init__(
        self,
        output: Tensor,
        inputs: tuple[Any, ...],
        fn: Callable[..., Tensor],
        observe: Callable[[Tensor], None],
    ) -> None:
        self.fn = fn
        self.inputs = inputs
        self.cached: Tensor | None = None
        self.output = weakref.ref(output)
        self.version = output._version
        self.observe = observe

    def value(self) -> Tensor:
        """The output: recomputed on the first call (its handle inputs recomputed first),
        then kept while the entry lives."""
        if self.cached is not None:
            return self.cached
        args = [a.get() if isinstance(a, _Handle) else a for a in self.inputs]
        with torch.no_grad():
            value = self.fn(*args)
        self.cached = value
        self.inputs = ()  # the value is kept: its inputs are not needed any more
        self.observe(value)
        return value


class _Handle:
    """What is stored for a registered output (or a view of one): its entry, the view's
    geometry, and the saved tensor object (weakly) with its version."""

    __slots__ = ("entry", "geometry", "ref", "version")

    def __init__(self, entry: _Entry, t: Tensor) -> None:
        self.entry = entry
        self.geometry = (tuple(t.shape), tuple(t.stride()), t.storage_offset())
        self.ref = weakref.ref(t)
        self.version = t._version

    def get(self) -> Tensor:
        t = self.ref()
        if t is not None and t._version != self.version:
            raise _modified_error()
        y = self.entry.value()
        if (tuple(y.shape), tuple(y.stride()), y.storage_offset()) == self.geometry:
            return y
        return y.as_strided(*self.geometry)


class memory_saving:
    """Context manager: inside it, the fused ``BatchNormAct`` layers' outputs that autograd
    saves are not stored but recomputed in backward from the layer's saved input and its
    forward statistics (see :mod:`bnorm.kernels.memory`). Gradients are those without the scope.

    ``stored_bytes(exclude)`` gives the bytes of the distinct storages the scope's hooks
    stored or that a recomputation captured (a view counts its whole storage; handles
    count 0) that are still alive,
    leaving out ``exclude``'s parameters and buffers — the analogue of
    :func:`bnorm.testing.saved_tensor_bytes` for a forward run in the scope.
    """

    def __init__(self) -> None:
        self._entries: dict[int, _Entry] = {}
        self._stored: dict[int, tuple[StorageWeakRef, int]] = {}
        self._hooks: torch.autograd.graph.saved_tensors_hooks | None = None
        self._track_peak = False
        self.peak_bytes = 0

    def __enter__(self) -> memory_saving:
        if current_scope() is not None:
            raise ValueError("expected no enclosing bnorm.memory_saving scope (got a nested one)")
        if self._hooks is not None:
            raise ValueError("expected a bnorm.memory_saving object not in use (got one in use)")
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack)
        self._hooks.__enter__()
        _STATE.scope = self
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        _STATE.scope = None
        self._entries.clear()
        hooks, self._hooks = self._hooks, None
        if hooks is not None:
            hooks.__exit__(exc_type, exc, tb)

    # --- called by the fused layers ----------------------------------------------------

    def register(
        self,
        output: Tensor,
        inputs: tuple[Tensor | None, ...],
        fn: Callable[..., Tensor],
        captured: tuple[Tensor, ...] = (),
    ) -> None:
        """Register ``output`` = ``fn(*inputs)`` (``fn`` deterministic: the forward's own
        function; ``captured``: the tensors ``fn`` holds, counted by :meth:`stored_bytes`).
        Inputs that are registered outputs themselves are held as handles."""
        key = _storage_key(output)
        if key is None:
            return
        held = tuple(None if t is None else self._hold(t) for t in inputs)
        for t in captured:
            self._count(t)
        self._entries[key] = _Entry(output, held, fn, self._count)

    def _lookup(self, t: Tensor) -> _Entry | None:
        if not self._entries:
            return None
        key = _storage_key(t)
        entry = None if key is None else self._entries.get(key)
        if entry is None:
            return None
        out = entry.output()
        if out is None or out.dtype != t.dtype or t._version != entry.version:
            return None
        return entry

    def _hold(self, t: Tensor) -> Tensor | _Handle:
        entry = self._lookup(t)
        return t if entry is None else _Handle(entry, t)

    # --- the hooks ------------------------------------------------------------------------

    def _pack(self, t: Tensor) -> _Stored | _Handle:
        entry = self._lookup(t)
        if entry is not None:
            return _Handle(entry, t)
        self._count(t)
        return _Stored(t)

    def _count(self, t: Tensor) -> None:
        key = _storage_key(t)
        if key is not None and (key not in self._stored or self._stored[key][0].expired()):
            storage = t.untyped_storage()
            self._stored[key] = (StorageWeakRef(storage), storage.nbytes())

    def _unpack(self, packed: _Stored | _Handle) -> Tensor:
        t = packed.get()
        if self._track_peak:
            self.peak_bytes = max(self.peak_bytes, self.stored_bytes())
        return t

    def stored_bytes(self, exclude: nn.Module | None = None) -> int:
        """Bytes of the distinct, still alive storages stored by the hooks or captured by
        a registered output's recomputation (see the class)."""
        skip = set()
        if exclude is not None:
            skip = {_storage_key(t) for t in (*exclude.parameters(), *exclude.buffers())}
        items = self._stored.items()
        alive = (n for key, (ref, n) in items if not ref.expired() and key not in skip)
        return sum(alive)
