"""The study's networks, each built with or without a normalization layer.

* ``mlp`` — fully connected hidden layers (default 3×100 sigmoid units: the BN paper's
  MNIST network), ``Linear → [norm] → activation`` per hidden layer, then a linear
  classifier. ``deep-mlp`` is the same with 10 hidden layers of 64 sigmoid units.
* ``cnn`` — the classic ``conv → norm → ReLU → max-pool`` stack (32 then 64 channels,
  3×3 convolutions) with a dense head (128 units, ``Linear → norm → ReLU``).
* ``resnet20/32/44/56/110`` — He et al. (2016) CIFAR ResNets, depth 6n + 2: a 3×3
  conv with 16 channels, three stages of n basic blocks (16, 32, 64 channels; stride 2
  at the start of stages 2 and 3), global average pooling and a linear classifier.
  Shortcuts are identities; where the shape changes, "option A": subsample by 2 and
  zero-pad the new channels (no parameters).

The normalization comes from :data:`NORM_LAYERS`, a dict from a name to a factory
``(num_features, spatial_dims) -> nn.Module`` (``spatial_dims`` 0 after a linear layer,
2 after a convolution); ``None`` means no normalization. Besides bnorm's batch norms it
holds the per-sample normalizations users pick when batches are small: ``ln``
(LayerNorm, Ba et al. 2016: each sample's features — after a convolution its C × H × W
values — normalized by their own mean and variance, per-feature γ, β) and ``gn``
(GroupNorm, Wu & He 2018: the same per group of channels). A layer followed by a
normalization has no bias (the normalization's β replaces it). Adding a variant is one
entry in that dict (and its label in :data:`NORM_LABELS`).

Every network has a ``probe`` module (an identity) at the input of the last hidden
nonlinearity — the "input to a sigmoid" that the paper's Fig. 1 follows — and lists its
weight layers in ``weight_layers`` (for per-layer gradient norms).

Weights are drawn by :func:`initialize` from an explicit generator, layer by layer in
order, so that the arms with and without normalization start from identical weights;
biases start at zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

import bnorm

__all__ = [
    "ACTIVATIONS",
    "INIT_SCHEMES",
    "MLP",
    "MODELS",
    "NORM_LABELS",
    "NORM_LAYERS",
    "CifarResNet",
    "Probe",
    "SimpleCNN",
    "build_model",
    "count_parameters",
    "initialize",
    "raw_weight",
]

NormFactory = Callable[[int, int], nn.Module]


_BN_BY_DIMS: dict[int, type[nn.Module]] = {
    0: bnorm.BatchNorm1d,
    1: bnorm.BatchNorm1d,
    2: bnorm.BatchNorm2d,
    3: bnorm.BatchNorm3d,
}

# The paper's Batch Renorm schedule (r_max 3, d_max 5; 5k warm-up, ramps of 35k and 20k
# steps) scaled by 1/100 to the study's runs of hundreds to thousands of steps.
STUDY_RENORM = bnorm.Renorm(
    r_max=3.0, d_max=5.0, warmup_steps=50, r_ramp_steps=350, d_ramp_steps=200
)
# Ghost batches of 8 samples (a batch of at most 8 is a single group).
STUDY_VIRTUAL_BATCH = 8
# Moving-average BN (MABN): the reference's window of 16 batches (normalization batch 2
# averaged to 32 samples); its warm-up of 100 steps scaled to the study's short runs.
STUDY_MOVING_AVERAGE = bnorm.MovingAverage(window=16, warmup_steps=10)


def _bn_factory(**options: Any) -> NormFactory:
    def make(num_features: int, spatial_dims: int) -> nn.Module:
        return _BN_BY_DIMS[spatial_dims](num_features, **options)

    return make


def _sync_bn(num_features: int, spatial_dims: int) -> nn.Module:
    # Global-batch statistics under torchrun (DDP); local BN in a single process.
    return bnorm.SyncBatchNorm(num_features)


# GroupNorm's groups: Wu & He's G = 32, or the largest divisor of the channels below it.
STUDY_GROUPS = 32


def _layer_norm(num_features: int, spatial_dims: int) -> nn.Module:
    # After a linear layer LayerNorm over the features; after a convolution GroupNorm with
    # one group, which is LayerNorm over (C, H, W) with a γ, β per channel.
    if spatial_dims == 0:
        return nn.LayerNorm(num_features)
    return nn.GroupNorm(1, num_features)


def _group_norm(num_features: int, spatial_dims: int) -> nn.Module:
    return nn.GroupNorm(math.gcd(STUDY_GROUPS, num_features), num_features)


# Name → factory (None: no normalization). New variants plug in here.
NORM_LAYERS: dict[str, NormFactory | None] = {
    "none": None,
    "bn": _bn_factory(),
    "renorm": _bn_factory(renorm=STUDY_RENORM),
    "ghost": _bn_factory(virtual_batch_size=STUDY_VIRTUAL_BATCH),
    "syncbn": _sync_bn,
    "ln": _layer_norm,
    "gn": _group_norm,
    "mabn": _bn_factory(moving_average=STUDY_MOVING_AVERAGE),
}

# What a norm needs of the whole network beyond its layers: MABN's reduced normalization
# does not subtract a mean, so the paper centers the weights of the layer before it.
NORM_MODEL_STEPS: dict[str, Callable[[nn.Module], object]] = {
    "mabn": bnorm.centralize_weights,
}

# How each norm is named in reports (a name missing here is shown as is).
NORM_LABELS: dict[str, str] = {
    "none": "no BN",
    "bn": "BN",
    "renorm": "Batch Renorm",
    "ghost": f"ghost BN ({STUDY_VIRTUAL_BATCH})",
    "syncbn": "SyncBN",
    "ln": "LayerNorm",
    "gn": "GroupNorm",
    "mabn": "moving-average BN",
    "bn+accumulate": "BN + accumulate",  # the accumulation experiment's merged arm
    "bn+recalibrated": "BN, recalibrated",  # the BN networks after bnorm.recalibrate
}

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
}


class Probe(nn.Identity):
    """Marks the input of the last hidden nonlinearity (a forward hook reads it)."""


def _norm_or_identity(norm: NormFactory | None, num_features: int, spatial_dims: int) -> nn.Module:
    return nn.Identity() if norm is None else norm(num_features, spatial_dims)


class MLP(nn.Module):
    """Fully connected network: per hidden layer ``h ← act(norm(W h [+ b]))``, then
    ``logits = W_out h + b_out``.

    Shape:
        input: (N, *) flattened to (N, in_features); output: (N, num_classes).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int,
        hidden: Sequence[int] = (100, 100, 100),
        activation: str = "sigmoid",
        norm: NormFactory | None = None,
    ) -> None:
        super().__init__()
        if not hidden:
            raise ValueError("expected at least one hidden layer (got hidden=[])")
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"expected activation in {', '.join(ACTIVATIONS)} (got {activation!r})"
            )
        layers: list[nn.Module] = [nn.Flatten()]
        self.weight_layers: list[nn.Module] = []
        width = in_features
        for i, h in enumerate(hidden):
            linear = nn.Linear(width, h, bias=norm is None)
            self.weight_layers.append(linear)
            layers += [linear, _norm_or_identity(norm, h, 0)]
            if i == len(hidden) - 1:
                self.probe = Probe()
                layers.append(self.probe)
            layers.append(ACTIVATIONS[activation]())
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, num_classes)
        self.weight_layers.append(self.head)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class SimpleCNN(nn.Module):
    """``[conv3×3 → norm → ReLU → maxpool2] × 2 → Linear(128) → norm → ReLU → Linear``.

    Shape:
        input: (N, C, H, W) with H, W ≥ 4; output: (N, num_classes).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: tuple[int, int],
        norm: NormFactory | None = None,
        channels: tuple[int, int] = (32, 64),
        hidden: int = 128,
    ) -> None:
        super().__init__()
        h, w = image_size
        if h < 4 or w < 4:
            raise ValueError(f"expected images of at least 4×4 for the cnn (got {h}×{w})")
        c1, c2 = channels
        conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=norm is None)
        conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=norm is None)
        fc = nn.Linear(c2 * (h // 4) * (w // 4), hidden, bias=norm is None)
        self.head = nn.Linear(hidden, num_classes)
        self.probe = Probe()
        self.features = nn.Sequential(
            conv1, _norm_or_identity(norm, c1, 2), nn.ReLU(), nn.MaxPool2d(2),
            conv2, _norm_or_identity(norm, c2, 2), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
            fc, _norm_or_identity(norm, hidden, 0), self.probe, nn.ReLU(),
        )  # fmt: skip
        self.weight_layers: list[nn.Module] = [conv1, conv2, fc, self.head]

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class _BasicBlock(nn.Module):
    """``relu(norm(conv(relu(norm(conv(x))))) + shortcut(x))`` with an option-A shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int, norm: NormFactory | None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=norm is None)
        self.norm1 = _norm_or_identity(norm, planes, 2)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=norm is None)
        self.norm2 = _norm_or_identity(norm, planes, 2)
        self.stride = stride
        self.pad = planes - in_planes
        self.out_probe = Probe()

    def shortcut(self, x: Tensor) -> Tensor:
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad:
            x = nn.functional.pad(x, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return x

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return torch.relu(self.out_probe(out + self.shortcut(x)))


class CifarResNet(nn.Module):
    """He et al. (2016) ResNet for 32×32 images, depth 6n + 2 (20, 32, 44, 56, 110).

    Shape:
        input: (N, C, H, W); output: (N, num_classes).
    """

    def __init__(
        self, depth: int, in_channels: int, num_classes: int, norm: NormFactory | None = None
    ) -> None:
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"expected a ResNet depth 6n + 2 with n ≥ 1 (got {depth})")
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(in_channels, 16, 3, padding=1, bias=norm is None)
        self.norm = _norm_or_identity(norm, 16, 2)
        blocks: list[_BasicBlock] = []
        in_planes = 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(n):
                blocks.append(_BasicBlock(in_planes, planes, stride if i == 0 else 1, norm))
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, num_classes)
        self.probe = blocks[-1].out_probe
        self.weight_layers: list[nn.Module] = [self.conv]
        for b in blocks:
            self.weight_layers += [b.conv1, b.conv2]
        self.weight_layers.append(self.head)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.norm(self.conv(x)))
        out = self.blocks(out)
        return self.head(out.mean(dim=(2, 3)))


INIT_SCHEMES = ("normal", "kaiming", "xavier", "torch")

MODELS = ("mlp", "deep-mlp", "cnn", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110")


def build_model(
    name: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    norm: str = "none",
    *,
    hidden: Sequence[int] | None = None,
    activation: str | None = None,
) -> nn.Module:
    """A network by name (one of :data:`MODELS`) with the normalization ``norm`` (a key of
    :data:`NORM_LAYERS`, then its step of :data:`NORM_MODEL_STEPS` if it has one).
    ``hidden``/``activation`` apply to the MLPs (defaults: 3×100 sigmoid for ``mlp``,
    10×64 sigmoid for ``deep-mlp``)."""
    if norm not in NORM_LAYERS:
        raise ValueError(f"expected a norm in {', '.join(NORM_LAYERS)} (got {norm!r})")
    factory = NORM_LAYERS[norm]
    c, h, w = image_shape
    model: nn.Module
    if name in ("mlp", "deep-mlp"):
        default_hidden = (100,) * 3 if name == "mlp" else (64,) * 10
        model = MLP(
            c * h * w,
            num_classes,
            tuple(hidden) if hidden else default_hidden,
            activation or "sigmoid",
            factory,
        )
    elif name == "cnn":
        model = SimpleCNN(c, num_classes, (h, w), factory)
    elif name.startswith("resnet") and name in MODELS:
        model = CifarResNet(int(name[len("resnet") :]), c, num_classes, factory)
    else:
        raise ValueError(f"expected a model in {', '.join(MODELS)} (got {name!r})")
    step = NORM_MODEL_STEPS.get(norm)
    if step is not None:
        step(model)
    return model


def raw_weight(layer: nn.Module) -> Tensor:
    """The weight tensor SGD updates: ``layer.weight``, or for a parametrized weight (the
    layers centralized for ``mabn``) its raw tensor, from which ``layer.weight`` is
    computed."""
    if parametrize.is_parametrized(layer, "weight"):
        chain: Any = layer.parametrizations
        original: Tensor = chain.weight.original
        return original
    weight: Tensor = getattr(layer, "weight")  # noqa: B009
    return weight


def initialize(
    model: nn.Module, generator: torch.Generator, scheme: str = "kaiming", std: float = 0.1
) -> None:
    """Draw every weight layer's weights (in ``model.weight_layers`` order) from
    ``generator``; biases to zero. (Normalization layers keep their fresh γ = 1, β = 0.)

    Schemes (fan_in = inputs per output unit, e.g. in_channels·k·k for a conv):
    ``normal`` N(0, std²); ``kaiming`` N(0, 2/fan_in) (He et al., for ReLU);
    ``xavier`` N(0, 2/(fan_in + fan_out)); ``torch`` U(−1/√fan_in, 1/√fan_in), the
    distribution PyTorch's default initialization gives nn.Linear/nn.Conv weights. A
    parametrized weight (``mabn``'s centralized layers) gets the draw in its raw tensor,
    so every arm starts from the same raw weights.
    """
    layers = getattr(model, "weight_layers", None)
    if layers is None:
        raise TypeError(f"expected a study model with weight_layers (got {type(model).__name__})")
    with torch.no_grad():
        for layer in layers:
            weight = raw_weight(layer)
            fan_in = weight[0].numel()
            fan_out = weight.shape[0] * (weight[0, 0].numel() if weight.dim() > 2 else 1)
            if scheme == "normal":
                w = torch.randn(weight.shape, generator=generator) * std
            elif scheme == "kaiming":
                w = torch.randn(weight.shape, generator=generator) * math.sqrt(2.0 / fan_in)
            elif scheme == "xavier":
                w = torch.randn(weight.shape, generator=generator) * math.sqrt(
                    2.0 / (fan_in + fan_out)
                )
            elif scheme == "torch":
                w = (torch.rand(weight.shape, generator=generator) * 2 - 1) / math.sqrt(fan_in)
            else:
                raise ValueError(
                    f"expected init in normal, kaiming, xavier, torch (got {scheme!r})"
                )
            weight.copy_(w.to(weight.dtype))
            if layer.bias is not None:
                layer.bias.zero_()


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameter values."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
