"""Cross-process reduction of batch statistics (any torch.distributed backend).

SyncBatchNorm needs the statistics of the global batch. Each rank computes its local
per-channel moments (count, mean, M2); one ``all_gather`` gives every rank all of them,
and each merges them exactly (law of total variance, :func:`bnorm.functional.pool_moments`).
Gathering (count, mean, M2) rather than summing (count, Σx, Σx²) keeps the merge free of
the E[x²] − E[x]² cancellation in the statistics' own precision (float32 for float32 and
half inputs), at the price of W·3·C values per rank instead of 3·C — a few kilobytes.

The gather is differentiable: its backward is one ``all_reduce`` (sum) of the gradient
with respect to the gathered moments, of which each rank keeps its own row. So a layer
costs one collective in forward and one in backward, on gloo (CPU), NCCL (GPU) or any
other backend that implements ``all_gather`` and ``all_reduce``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["all_gather_differentiable", "all_gather_tensor", "all_reduce_sum", "world_size"]


def world_size(process_group: Any = None) -> int:
    """The number of ranks in ``process_group``; 1 when torch.distributed is not
    available or not initialized (the layer then behaves as local batch norm)."""
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return int(dist.get_world_size(process_group))


def _collective_error(what: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"SyncBatchNorm: the {what} across the process group failed ({err}). "
        "A rank that never reaches this layer makes its peers time out after the process "
        "group's timeout (init_process_group(timeout=...)): every rank must run the same "
        "layers in the same order, even with an empty batch."
    )


def all_gather_tensor(t: Tensor, process_group: Any = None) -> Tensor:
    """``t`` from every rank, stacked (not differentiable): result[r] is rank r's."""
    t = t.detach().contiguous()
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(process_group))]
    try:
        dist.all_gather(out, t, group=process_group)
    except RuntimeError as err:
        raise _collective_error("all_gather of batch statistics", err) from err
    return torch.stack(out)


def all_reduce_sum(t: Tensor, process_group: Any = None) -> Tensor:
    """The sum of ``t`` over every rank, in a new tensor (not differentiable)."""
    total = t.detach().contiguous().clone()
    try:
        dist.all_reduce(total, group=process_group)
    except RuntimeError as err:
        raise _collective_error("all_reduce of statistics gradients", err) from err
    return total


class _AllReduceSum(torch.autograd.Function):
    """Σ over ranks, differentiable: every rank's output is the same sum, so a rank's
    input gradient is the sum over ranks of the output gradients — an all_reduce again."""

    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        ctx.group = group
        return all_reduce_sum(t, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return _AllReduceSum.apply(grad, ctx.group), None


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, t: Tensor, group: Any) -> Tensor:
        ctx.group = group
        ctx.rank = dist.get_rank(group)
        return all_gather_tensor(t, group)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        # Differentiable (double backward through SyncBatchNorm keeps its cross-rank terms).
        return _AllReduceSum.apply(grad, ctx.group)[ctx.rank], None


def all_gather_differentiable(t: Tensor, process_group: Any = None) -> Tensor:
    """Stack ``t`` from every rank: result[r] is rank r's tensor. Differentiable: the
    gradient of rank r's ``t`` is the sum over ranks of the gradients of result[r].

    Shape:
        t: any; returns (world_size, *t.shape).
    """
    return _AllGather.apply(t, process_group)
