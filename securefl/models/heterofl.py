"""HeteroFL's width-scalable models: one global architecture, sub-models by width.

Diao, Ding & Tarokh, "HeteroFL: Computation and Communication Efficient
Federated Learning for Heterogeneous Clients", ICLR 2021 (reference code:
``HeteroFL-Computation-and-Communication-Efficient-Federated-Learning-for-Heterogeneous-Clients``,
``src/models/conv.py``).

A model of rate ``r`` is the global architecture with every *hidden* width
``h`` replaced by ``ceil(r * h)``; the input channels of the first layer and
the outputs of the classifier are never scaled. Because every hidden layer
shrinks from the top, the parameters of a rate-``r`` model are exactly the
top-left slice ``W[:ceil(r * out), :ceil(r * in)]`` of the global ones, which
is what a client of the protocol (``securefl/protocols/heterofl.py``) slices
from its replica of the global model, trains and sends back zero-padded.

Two families, chosen by ``heterofl.model``:

- ``conv``: the reference's conv net (``[conv 3x3 -> Scaler -> norm -> ReLU ->
  max-pool] x L``, no pool after the last block, global average pool, linear
  classifier). The reference uses hidden sizes 64-128-256-512; on 8x8 digits a
  block stops pooling once the map is 1x1.
- ``mlp``: the same pieces for tabular records (``[linear -> Scaler -> norm ->
  ReLU] x L``, linear classifier).

The model pieces the paper adds:

- :class:`Scaler` divides activations by ``r / r_global`` during training and is
  the identity at evaluation (reference ``Scaler``: ``input / rate if
  self.training else input``), so that a thin sub-model's activations have the
  scale of the global model's.
- Static batch norm (sBN, :class:`StaticBatchNorm2d` / ``1d``): in training it
  always normalises by the batch's own statistics and never tracks running
  statistics (reference: ``BatchNorm2d(..., momentum=None,
  track_running_stats=False)``); its ``running_mean`` / ``running_var`` buffers
  are only ever written by the protocol's federated statistics query, and are
  what evaluation uses.
- ``norm: gn`` replaces sBN by GroupNorm, the option for DP-SGD: batch norm
  mixes the records of a batch, so per-example gradients do not exist. The
  reference's ``GroupNorm(4, C)`` puts C/4 channels in a group, so the same
  channels are grouped differently at each width (channel 0 shares its
  statistics with 16 channels in a 64-wide layer and with 1 in a 4-wide one).
  Here every group holds the same number of channels at every width
  (``channels_per_group``): groups are contiguous, so a sub-model's channel
  slice is a whole number of the global model's groups and each is
  normalised exactly as in the global model. The sBN classes subclass torch's batch norm (so
  ``isinstance`` checks see them as such) and keep their statistics in
  buffers, which Opacus's ``GradSampleModule`` refuses in its default strict
  mode (its ``ModuleValidator`` matches exact types only and does not list them).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

# The paper's five complexity levels.
LEVEL_RATES: dict[str, float] = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
# Hidden sizes when ``heterofl.hidden_sizes`` is not given: the reference's conv net,
# and a two-layer MLP for tabular data (the reference's MLP takes its sizes from its config).
DEFAULT_HIDDEN: dict[str, tuple[int, ...]] = {"conv": (64, 128, 256, 512), "mlp": (256, 128)}

Family = Literal["conv", "mlp"]
Norm = Literal["bn", "gn"]


def scaled_width(width: int, rate: float) -> int:
    """``ceil(rate * width)``, as the reference sizes every hidden layer (at least 1)."""
    # Rounding first keeps float noise (e.g. 0.1 * 30 = 3.0000000000000004) from adding a unit.
    return max(1, math.ceil(round(rate * width, 9)))


class Scaler(nn.Module):
    """Divide by ``rate`` in training; identity in evaluation (HeteroFL's Scaler)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        if not rate > 0:
            raise ValueError(f"Scaler rate must be positive, got {rate}")
        self.rate = float(rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x / self.rate if self.training else x

    def extra_repr(self) -> str:
        return f"rate={self.rate}"


def _static_batch_norm(norm: nn.modules.batchnorm._BatchNorm, x: torch.Tensor) -> torch.Tensor:
    """Batch statistics in training, stored (federated) statistics in evaluation.

    The running buffers are never updated here: sBN keeps no running average
    during training, and the protocol writes the buffers from federated sums
    after aggregation.
    """
    assert norm.running_mean is not None and norm.running_var is not None
    assert norm.weight is not None and norm.bias is not None
    if not norm.training:
        # One fused pass: the unfused form below cost a third of a Fashion-MNIST round's evaluation.
        return F.batch_norm(x, norm.running_mean, norm.running_var, norm.weight, norm.bias, training=False,
                            eps=norm.eps)
    if x.numel() // x.shape[1] > 1:
        return F.batch_norm(x, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
    # By hand where F.batch_norm refuses a single value per channel: a silo's last minibatch can be one
    # record, and the deepest block of the conv net on 8x8 digits is 1x1.
    shape = [1, -1] + [1] * (x.dim() - 2)
    dims = [0, *range(2, x.dim())]
    mean = x.mean(dim=dims)
    var = x.var(dim=dims, unbiased=False)
    x_hat = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + norm.eps)
    return x_hat * norm.weight.view(shape) + norm.bias.view(shape)


class StaticBatchNorm1d(nn.BatchNorm1d):
    """sBN for (N, C) activations (the MLP family)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _static_batch_norm(self, x)


class StaticBatchNorm2d(nn.BatchNorm2d):
    """sBN for (N, C, H, W) activations (the conv family)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _static_batch_norm(self, x)


STATIC_NORMS = (StaticBatchNorm1d, StaticBatchNorm2d)


def level_widths(family: Family, hidden: Sequence[int] | None, rates: Iterable[float]) -> dict[float, list[int]]:
    """The hidden widths of the model at each rate."""
    full = tuple(hidden) if hidden else DEFAULT_HIDDEN[family]
    return {rate: [scaled_width(h, rate) for h in full] for rate in rates}


def channels_per_group(family: Family, hidden: Sequence[int] | None, rates: Iterable[float],
                       requested: int | None = None) -> int:
    """GroupNorm's channels per group, the same in every layer of every model rate in ``rates``.

    ``requested=None`` takes the largest count that divides every width (their gcd), so the thinnest layer
    still forms whole groups. A requested count must divide every width. The MLP family refuses 1: a group
    of one value normalises to 0 and the layer's output would be its bias alone.
    """
    widths = level_widths(family, hidden, rates)
    chosen = requested if requested is not None else math.gcd(*(w for ws in widths.values() for w in ws))
    for rate, ws in sorted(widths.items(), reverse=True):
        bad = [w for w in ws if w % chosen]
        if bad:
            raise ValueError(f"heterofl.gn_channels_per_group = {chosen} does not divide the width {bad[0]} of the "
                             f"rate-{rate:g} model (widths {ws}); choose a divisor of every width or leave it unset")
    if family == "mlp" and chosen == 1:
        raise ValueError(f"heterofl.gn_channels_per_group = 1 with model: mlp normalises single values to 0 "
                         f"(widths per rate: {widths}); use hidden sizes whose scaled widths share a factor >= 2")
    return chosen


def _norm(kind: Norm, channels: int, conv: bool, per_group: int) -> nn.Module:
    if kind == "bn":
        return StaticBatchNorm2d(channels) if conv else StaticBatchNorm1d(channels)
    if kind == "gn":
        if channels % per_group:
            raise ValueError(f"heterofl.gn_channels_per_group = {per_group} does not divide {channels} channels")
        return nn.GroupNorm(channels // per_group, channels)
    raise ValueError(f"unknown norm {kind!r}; allowed: bn, gn")


class HeteroFLModel(nn.Module):
    """``forward(x) = classifier(body(x))`` at model rate ``rate``.

    Attributes
    ----------
    rate
        The width multiplier applied to the configured hidden sizes.
    scaler_rate
        ``rate / global_rate``: what the Scalers divide by in training.
    widths
        The hidden widths actually built.
    """

    def __init__(self, body: nn.Sequential, classifier: nn.Linear, *, family: Family, rate: float,
                 scaler_rate: float, widths: Sequence[int], norm: Norm) -> None:
        super().__init__()
        self.body = body
        self.classifier = classifier
        self.family = family
        self.rate = rate
        self.scaler_rate = scaler_rate
        self.widths = tuple(widths)
        self.norm_kind = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.body(x))

    def static_norms(self) -> Iterator[tuple[str, nn.modules.batchnorm._BatchNorm]]:
        """The sBN layers with their state-dict prefixes, in forward order."""
        for name, module in self.named_modules():
            if isinstance(module, STATIC_NORMS):
                yield name, module


def _conv_body(input_shape: tuple[int, ...], widths: Sequence[int], scaler_rate: float, norm: Norm,
               scale: bool, per_group: int) -> tuple[nn.Sequential, int]:
    if len(input_shape) != 3:
        raise ValueError(f"the conv family needs (C, H, W) inputs, got shape {input_shape}; use model: mlp")
    c_in, size = input_shape[0], min(input_shape[1:])
    layers: list[nn.Module] = []
    for i, c_out in enumerate(widths):
        layers += [nn.Conv2d(c_in, c_out, 3, 1, 1), Scaler(scaler_rate) if scale else nn.Identity(),
                   _norm(norm, c_out, conv=True, per_group=per_group), nn.ReLU()]
        # The reference pools after every block but the last; a small image stops
        # pooling once the map is 1x1 (8x8 digits: 8 -> 4 -> 2 -> 1).
        if i < len(widths) - 1 and size >= 2:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    return nn.Sequential(*layers), c_in


def _mlp_body(input_shape: tuple[int, ...], widths: Sequence[int], scaler_rate: float, norm: Norm,
              scale: bool, per_group: int) -> tuple[nn.Sequential, int]:
    d_in = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Flatten()]
    for d_out in widths:
        layers += [nn.Linear(d_in, d_out), Scaler(scaler_rate) if scale else nn.Identity(),
                   _norm(norm, d_out, conv=False, per_group=per_group), nn.ReLU()]
        d_in = d_out
    return nn.Sequential(*layers), d_in


def build_heterofl_model(family: Family, input_shape: Sequence[int], num_classes: int, *,
                         hidden: Sequence[int] | None = None, rate: float = 1.0, global_rate: float = 1.0,
                         norm: Norm = "bn", scale: bool = True,
                         gn_channels_per_group: int | None = None) -> HeteroFLModel:
    """The HeteroFL model of ``family`` at model rate ``rate``.

    Parameters
    ----------
    family
        ``conv`` (images) or ``mlp`` (any input, flattened).
    input_shape
        One record's shape, without the batch dimension. Never scaled.
    num_classes
        Classifier outputs. Never scaled.
    hidden
        Full-width hidden sizes (``None``: :data:`DEFAULT_HIDDEN`).
    rate
        Model rate: every hidden width becomes ``ceil(rate * h)``.
    global_rate
        Rate of the server's global model; the Scalers divide by ``rate / global_rate``.
    norm
        ``bn`` (static batch norm) or ``gn`` (GroupNorm, for DP-SGD).
    scale
        Use the Scaler (the reference's ``scale`` switch, for ablations).
    gn_channels_per_group
        ``norm: gn`` only: channels per group (``None``: :func:`channels_per_group` over the paper's levels up
        to ``global_rate``). Pass the same value for every rate, so slices are normalised alike.
    """
    if family not in DEFAULT_HIDDEN:
        raise ValueError(f"unknown HeteroFL model family {family!r}; allowed: {', '.join(DEFAULT_HIDDEN)}")
    if not 0 < rate <= global_rate:
        raise ValueError(f"model rate {rate} must be in (0, global rate {global_rate}]")
    widths = level_widths(family, hidden, [rate])[rate]
    per_group = 1
    if norm == "gn":
        per_group = gn_channels_per_group if gn_channels_per_group is not None else channels_per_group(
            family, hidden, {rate} | {r for r in LEVEL_RATES.values() if r <= global_rate})
    scaler_rate = rate / global_rate
    make_body = _conv_body if family == "conv" else _mlp_body
    body, features = make_body(tuple(input_shape), widths, scaler_rate, norm, scale, per_group)
    return HeteroFLModel(body, nn.Linear(features, num_classes), family=family, rate=rate,
                         scaler_rate=scaler_rate, widths=widths, norm=norm)


def masked_cross_entropy(logits: torch.Tensor, y: torch.Tensor, classes: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy over a client's present classes (HeteroFL's label-split mask).

    As in the reference (``out.masked_fill(label_mask == 0, 0)``), the logits of
    classes absent from the client's data are replaced by the constant 0 before
    the softmax: they carry no gradient, so the classifier rows of absent
    classes are not trained towards "never this class" by a client that has
    never seen them. ``classes=None`` is the plain cross-entropy.
    """
    if classes is not None:
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[classes] = True
        logits = logits.masked_fill(~present, 0.0)
    return F.cross_entropy(logits, y)
