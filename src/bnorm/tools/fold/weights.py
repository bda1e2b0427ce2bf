"""The weight math of folding: an eval-mode batch norm as a per-channel affine map, and
that map composed into a convolution or linear layer on either side.

In evaluation a batch-norm layer is ``y = s ⊙ x + t`` with::

    s = γ / √(running_var + ε),   t = β − running_mean · s

(γ = 1, β = 0 without affine parameters). After a layer ``z = W x + b`` whose output
channels it normalizes, the two are one layer::

    W' = s ⊙ W   (per output channel),   b' = s ⊙ b + t

and before a layer that mixes its channels linearly, ``W (s ⊙ x + t) + b``::

    W' = W · diag(s)   (per input channel),   b' = b + W t

The second form is exact only where every output sees the constant t the same way: a
Linear, or a convolution without zero padding (a zero-padded border would see 0, not t);
:mod:`.rules` decides that. Pure tensor functions, as in PyTorch's ``fusion.py``; float64
inside, the layer's dtype and device out.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["batch_norm_scale_shift", "fold_bn_conv_weights", "fold_conv_bn_weights"]


def batch_norm_scale_shift(
    running_mean: Tensor,
    running_var: Tensor,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> tuple[Tensor, Tensor]:
    """The eval-mode batch norm as ``y = s ⊙ x + t``: ``s = γ/√(var + ε)``,
    ``t = β − mean · s`` (γ = 1 / β = 0 when None), in float64.

    Shape:
        every input: (C,); returns two (C,) float64 tensors.
    """
    var = running_var.detach().to(torch.float64)
    scale = torch.rsqrt(var + eps)
    if weight is not None:
        scale = scale * weight.detach().to(torch.float64)
    shift = -running_mean.detach().to(torch.float64) * scale
    if bias is not None:
        shift = shift + bias.detach().to(torch.float64)
    return scale, shift


def _per_output_channel(
    values: Tensor, weight_shape: torch.Size, transposed: bool, groups: int
) -> Tensor:
    """``values`` (one per output channel) laid out to multiply a weight tensor."""
    kernel_dims = [1] * (len(weight_shape) - 2)
    if not transposed:
        return values.view(-1, 1, *kernel_dims)
    # ConvTranspose weight: (in, out/groups, *k); output channel o = g·(out/groups) + j
    # for input channels c of group g = c // (in/groups).
    in_channels, out_per_group = weight_shape[0], weight_shape[1]
    in_per_group = in_channels // groups
    laid = values.view(groups, 1, out_per_group).expand(groups, in_per_group, out_per_group)
    return laid.reshape(in_channels, out_per_group, *kernel_dims)


def fold_conv_bn_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    transposed: bool = False,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of ``bn(layer(x))`` as one layer, for a convolution or linear ``layer``
    followed by an eval-mode batch norm over its output channels::

        W' = s ⊙ W (per output channel),   b' = s ⊙ b + t

    with s, t from :func:`batch_norm_scale_shift` (b = 0 when ``bias`` is None). Computed
    in float64, returned in ``weight``'s dtype and device.

    Shape:
        weight: (out, in/groups, *kernel) — Linear: (out, in); ``transposed=True``
        (ConvTranspose): (in, out/groups, *kernel); bias and the batch-norm tensors: (out,).
        Returns (weight', bias') shaped like weight and (out,).
    """
    scale, shift = batch_norm_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    w64 = weight.detach().to(torch.float64)
    new_weight = w64 * _per_output_channel(scale, weight.shape, transposed, groups)
    new_bias = shift if bias is None else bias.detach().to(torch.float64) * scale + shift
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)


def fold_bn_conv_weights(
    weight: Tensor,
    bias: Tensor | None,
    running_mean: Tensor,
    running_var: Tensor,
    bn_weight: Tensor | None = None,
    bn_bias: Tensor | None = None,
    eps: float = 1e-5,
    *,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """Weights of ``layer(bn(x))`` as one layer, for an eval-mode batch norm followed by a
    convolution (not transposed) or linear ``layer`` over the normalized channels::

        W'[o, i, k] = W[o, i, k] · s[c],   b'[o] = b[o] + Σ_{i,k} W[o, i, k] · t[c]

    where c = (o // (out/groups))·(in/groups) + i is the input channel that weight
    W[o, i, k] reads. Exact for a Linear and for a convolution without zero padding (the
    caller checks that). Computed in float64, returned in ``weight``'s dtype and device.

    Shape:
        weight: (out, in/groups, *kernel) (Linear: (out, in)); bias: (out,) or None; the
        batch-norm tensors: (in,). Returns (weight', bias').
    """
    scale, shift = batch_norm_scale_shift(running_mean, running_var, bn_weight, bn_bias, eps)
    scale, shift = scale.to(weight.device), shift.to(weight.device)
    out_channels, in_per_group = weight.shape[0], weight.shape[1]
    out_per_group = out_channels // groups
    kernel_dims = [1] * (weight.dim() - 2)

    def per_weight(values: Tensor) -> Tensor:
        laid = values.view(groups, 1, in_per_group).expand(groups, out_per_group, in_per_group)
        return laid.reshape(out_channels, in_per_group, *kernel_dims)

    w64 = weight.detach().to(torch.float64)
    new_weight = w64 * per_weight(scale)
    through = (w64 * per_weight(shift)).sum(dim=list(range(1, weight.dim())))
    new_bias = through if bias is None else bias.detach().to(torch.float64) + through
    return new_weight.to(weight.dtype), new_bias.to(weight.dtype)
