"""What every tool that runs a model on data shares: the argument checks, reading a batch,
running the batches (with a progress line), and collecting the per-channel moments of the
inputs each batch-norm layer sees (merged exactly, also across ranks)."""

from __future__ import annotations

import inspect
import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ..functional import Moments, merge_moments, moments
from ._state import SavedState
from .layers import channel_axis

__all__ = [
    "Forward",
    "InputMoments",
    "Progress",
    "all_gather_moments",
    "batch_input",
    "call_input",
    "check_count",
    "check_data",
    "check_run_arguments",
    "collect_input_moments",
    "first_tensor",
    "format_table",
    "input_moments_hook",
    "mask_position",
    "module_device",
    "resolve_progress",
    "run_batches",
]

#: ``forward(module, batch)``: runs the model on one batch (the tools' ``forward=`` argument).
Forward = Callable[[nn.Module, Any], Any]


# --------------------------------------------------------------------------------------
# Feeding the data


def check_count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"expected {name} to be an int or None (got {type(value).__name__})")
    if value < 1:
        raise ValueError(f"expected {name} >= 1 or None (got {value})")
    return value


def check_data(data: Any) -> None:
    if isinstance(data, Tensor):
        # Iterating a tensor gives its rows: almost certainly a mistake.
        raise TypeError(
            "expected data to be an iterable of batches, e.g. a DataLoader or a list of "
            f"tensors (got a single Tensor of shape {tuple(data.shape)}; wrap it: [tensor])"
        )
    try:
        iter(data)
    except TypeError:
        raise TypeError(
            f"expected data to be an iterable of batches (got {type(data).__name__})"
        ) from None


def check_run_arguments(
    data: Any,
    num_batches: Any,
    num_samples: Any,
    forward: Any,
    *,
    nonempty: bool = False,
) -> tuple[int | None, int | None]:
    """Check the arguments of a tool that runs a model on ``data`` (``nonempty``: a sized
    ``data`` must hold a batch); returns (num_batches, num_samples)."""
    check_data(data)
    if nonempty and hasattr(data, "__len__") and len(data) == 0:
        raise ValueError("expected data with at least one batch (got an empty one)")
    num_batches = check_count("num_batches", num_batches)
    num_samples = check_count("num_samples", num_samples)
    if forward is not None and not callable(forward):
        raise TypeError(f"expected forward to be callable or None (got {type(forward).__name__})")
    return num_batches, num_samples


def batch_input(batch: Any) -> Tensor:
    """The model input of a batch, by the documented default: the batch itself if it is a
    tensor, its first element if it is a tuple/list (``(inputs, targets)``), its
    ``"input"`` entry if it is a dict."""
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    if isinstance(batch, Mapping) and isinstance(batch.get("input"), Tensor):
        return batch["input"]
    kind = type(batch).__name__
    keys = f" with keys {sorted(map(str, batch))}" if isinstance(batch, Mapping) else ""
    raise TypeError(
        "expected each batch to be a Tensor, a tuple/list whose first element is the input "
        f"Tensor, or a dict with an 'input' Tensor (got a {kind}{keys}); pass "
        "forward=lambda model, batch: model(...) to say how to run a batch"
    )


def first_tensor(batch: Any) -> Tensor | None:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (tuple, list)):
        for item in batch:
            found = first_tensor(item)
            if found is not None:
                return found
    return None


def module_device(module: nn.Module) -> torch.device | None:
    for parameter in module.parameters():
        return parameter.device
    for buffer in module.buffers():
        return buffer.device
    return None


class Progress:
    """A one-line progress display on stderr, redrawn at most ten times a second."""

    def __init__(self, label: str, enabled: bool, total: int | None) -> None:
        self.label = label
        self.enabled = enabled
        self.total = total
        self.start = time.perf_counter()
        self.last = -math.inf

    def update(self, batches: int, samples: int, *, final: bool = False) -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not final and now - self.last < 0.1:
            return
        self.last = now
        of = f"/{self.total}" if self.total is not None else ""
        line = f"\r{self.label}: batch {batches}{of}, {samples} samples, {now - self.start:.1f} s"
        sys.stderr.write(line + ("\n" if final else ""))
        sys.stderr.flush()


def resolve_progress(progress: Any) -> bool:
    if progress == "auto":
        isatty = getattr(sys.stderr, "isatty", None)
        distributed = dist.is_available() and dist.is_initialized()
        return bool(isatty and isatty()) and (not distributed or dist.get_rank() == 0)
    if isinstance(progress, bool):
        return progress
    raise TypeError(f"expected progress to be True, False or 'auto' (got {progress!r})")


def run_batches(
    module: nn.Module,
    data: Iterable[Any],
    *,
    num_batches: int | None,
    num_samples: int | None,
    forward: Forward | None,
    progress: Progress,
) -> tuple[int, int]:
    """Run ``module`` on the batches of ``data`` (without gradients) until the data ends,
    ``num_batches`` batches ran, or ``num_samples`` samples ran. Returns (batches,
    samples). Without ``forward``, the last batch is cut so that exactly ``num_samples``
    samples run; with ``forward`` the batch that reaches ``num_samples`` runs whole."""
    device = module_device(module)
    batches = samples = 0
    iterator: Iterator[Any] = iter(data)
    with torch.no_grad():
        while num_batches is None or batches < num_batches:
            if num_samples is not None and samples >= num_samples:
                break
            try:
                batch = next(iterator)
            except StopIteration:
                break
            if forward is None:
                x = batch_input(batch)
                if num_samples is not None and x.dim() > 0:
                    x = x[: num_samples - samples]
                if device is not None and x.device != device:
                    x = x.to(device)
                module(x)
                size = int(x.shape[0]) if x.dim() > 0 else 1
            else:
                found = first_tensor(batch)
                if found is None and num_samples is not None:
                    raise TypeError(
                        "expected each batch to hold a Tensor whose first dimension counts "
                        f"samples, to honour num_samples (got a {type(batch).__name__} "
                        "without one); use num_batches instead"
                    )
                forward(module, batch)
                size = int(found.shape[0]) if found is not None and found.dim() > 0 else 1
            batches += 1
            samples += size
            progress.update(batches, samples)
    progress.update(batches, samples, final=True)
    return batches, samples


# --------------------------------------------------------------------------------------
# Collecting the moments of each layer's input


def mask_position(layer: nn.Module) -> int | None:
    """Position of ``mask`` among the positional arguments of ``layer.forward``."""
    try:
        names = list(inspect.signature(layer.forward).parameters)
    except (TypeError, ValueError):
        return None
    return names.index("mask") if "mask" in names else None


def call_input(
    args: tuple[Any, ...], kwargs: dict[str, Any], mask_index: int | None
) -> tuple[Tensor, Tensor | None] | None:
    """The (input, mask) of a layer call seen by a forward pre-hook (``with_kwargs=True``),
    both detached: the input is the first positional argument or ``input=``, the mask
    ``mask=`` or the positional argument at ``mask_index`` (:func:`mask_position`), None
    if it is not a tensor. None when the input is not a non-empty tensor (the layer itself
    will complain about a bad input)."""
    x = args[0] if args else kwargs.get("input")
    if not isinstance(x, Tensor) or x.numel() == 0:
        return None
    mask = kwargs.get("mask")
    if mask is None and mask_index is not None and len(args) > mask_index:
        mask = args[mask_index]
    return x.detach(), mask.detach() if isinstance(mask, Tensor) else None


class InputMoments:
    """Forward pre-hooks that accumulate the per-channel moments (count, mean, M2) of the
    input each layer sees, merged exactly over calls in float64. bnorm layers' ``mask``
    (positional or keyword) is respected. Use as a context manager: hooks are removed on
    exit, whatever happens."""

    def __init__(self, layers: list[tuple[str, nn.Module]]) -> None:
        self.layers = layers
        self.moments: dict[str, Moments | None] = {name: None for name, _ in layers}
        self.handles: list[Any] = []

    def __enter__(self) -> InputMoments:
        for name, layer in self.layers:
            self.handles.append(
                layer.register_forward_pre_hook(self._hook(name, layer), with_kwargs=True)
            )
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _hook(self, name: str, layer: nn.Module) -> Callable[..., None]:
        def merge(x: Tensor, batch: Moments) -> None:
            batch = Moments(*(t.to(torch.float64) for t in batch))
            # An all-masked batch has count 0 (and mean 0): merge_moments ignores it.
            seen = self.moments[name]
            self.moments[name] = batch if seen is None else merge_moments(seen, batch)

        return input_moments_hook(layer, merge)


def input_moments_hook(
    layer: nn.Module, receive: Callable[[Tensor, Moments], None]
) -> Callable[..., None]:
    """A forward pre-hook (``with_kwargs=True``) for ``layer`` that hands each call's input
    and the per-channel moments of its values (masked positions excluded) to
    ``receive(input, moments)``; calls without a non-empty input tensor are passed over
    (:func:`call_input`)."""
    axis = channel_axis(layer)
    mask_index = mask_position(layer)

    def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        call = call_input(args, kwargs, mask_index)
        if call is not None:
            x, mask = call
            receive(x, moments(x, axis, mask))

    return hook


def collect_input_moments(
    module: nn.Module,
    watched: list[tuple[str, nn.Module]],
    changed: list[Any],  # Any: batch-norm layers, whose momentum is set
    data: Iterable[Any],
    *,
    training: bool,
    num_batches: int | None,
    num_samples: int | None,
    forward: Forward | None,
    progress: Progress,
) -> tuple[dict[str, Moments | None], int, int]:
    """Run ``module`` on ``data`` (:func:`run_batches`) with the batch-norm layers
    ``changed`` in training mode (``training``) or eval mode, their momentum 0, and
    collect the moments of the inputs of the ``watched`` layers (:class:`InputMoments`).
    Training flags, momenta and buffers are put back afterwards, also when an exception
    interrupts the pass: the running statistics are untouched. Returns (moments by
    layer name, batches, samples)."""
    with SavedState(module, changed):
        for layer in changed:
            layer.training = training
            layer.momentum = 0.0  # a training-mode update then leaves the statistics put
        with InputMoments(watched) as collector:
            batches, samples = run_batches(
                module,
                data,
                num_batches=num_batches,
                num_samples=num_samples,
                forward=forward,
                progress=progress,
            )
    return collector.moments, batches, samples


def all_gather_moments(
    per_layer: dict[str, Moments | None],
    sizes: dict[str, int],
    process_group: Any = None,
) -> dict[str, Moments | None]:
    """Merge every rank's moments: one ``all_gather`` of a flat float64 tensor holding
    (count, mean, M2) of every layer, then :func:`merge_moments` over ranks in rank order,
    so that every rank computes bit-identical global moments."""
    world = dist.get_world_size(process_group)
    backend = dist.get_backend(process_group)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    parts = []
    for name, size in sizes.items():
        mom = per_layer[name]
        if mom is None:
            parts.append(torch.zeros(3 * size, dtype=torch.float64, device=device))
        else:
            parts.append(torch.cat([t.to(device, torch.float64) for t in mom]))
    flat = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat, group=process_group)
    merged: dict[str, Moments | None] = {}
    offset = 0
    for name, size in sizes.items():
        total: Moments | None = None
        for rank_flat in gathered:
            chunk = rank_flat[offset : offset + 3 * size].view(3, size)
            mom = Moments(chunk[0], chunk[1], chunk[2])
            if float(mom.count[0]) == 0:
                continue
            total = mom if total is None else merge_moments(total, mom)
        merged[name] = total
        offset += 3 * size
    return merged




# --------------------------------------------------------------------------------------
# Reports


def format_table(rows: Sequence[Sequence[str]], *, rule: bool = False) -> list[str]:
    """The lines of a table whose columns are padded to their widest cell (trailing spaces
    cut); ``rows[0]`` is the header, followed by a line of dashes if ``rule``."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if rule:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines
