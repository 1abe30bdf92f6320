"""The heterogeneous model zoo: participants choose architectures by name.

Every model is split into a feature ``extractor`` and a linear ``head`` (the
last layer), because FedGen shares only heads and generated latent features,
and because a common split makes every family usable by every protocol. All
normalisation is GroupNorm, never BatchNorm, so Opacus's DP-SGD can be switched
on for any participant without changing its model
(``opacus.validators.ModuleValidator.validate`` passes on every entry; a test
checks this).

Families (each in several widths/depths, all adapting to the input shape):

- ``mlp_*``: fully connected nets, for images (flattened) and tabular records;
- ``cnn_*``: two conv blocks, the FedMD paper's small CNNs;
- ``deepcnn_*``: three conv blocks;
- ``resnet_*``: a small residual net (two residual stages).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import AfterValidator
from torch import nn

LATENT_DIM = 32  # shared by all zoo models so FedGen's heads are interchangeable


class ZooModel(nn.Module):
    """``forward(x) = head(extractor(x))``; the extractor ends in ``latent_dim`` features."""

    def __init__(self, extractor: nn.Module, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.extractor = extractor
        self.latent_dim = latent_dim
        self.head = nn.Linear(latent_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.extractor(x))


def _groups(channels: int) -> int:
    for groups in (8, 4, 2):
        if channels % groups == 0:
            return groups
    return 1


def _mlp(input_shape: tuple[int, ...], hidden: tuple[int, ...], latent: int) -> nn.Module:
    layers: list[nn.Module] = [nn.Flatten()]
    width = 1
    for d in input_shape:
        width *= d
    for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU()]
        width = h
    layers += [nn.Linear(width, latent), nn.ReLU()]
    return nn.Sequential(*layers)


def _conv_block(c_in: int, c_out: int, pool: bool) -> list[nn.Module]:
    block: list[nn.Module] = [
        nn.Conv2d(c_in, c_out, kernel_size=3, padding=1),
        nn.GroupNorm(_groups(c_out), c_out),
        nn.ReLU(),
    ]
    if pool:
        block.append(nn.MaxPool2d(2))
    return block


def _cnn(input_shape: tuple[int, ...], channels: tuple[int, ...], latent: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"convolutional models need (C, H, W) inputs, got shape {input_shape}")
    c_in, height, _ = input_shape
    layers: list[nn.Module] = []
    size = height
    for c_out in channels:
        # Pool only while the map is large enough, so the same name works for 8x8 and 28x28.
        pool = size >= 4
        layers += _conv_block(c_in, c_out, pool)
        size = size // 2 if pool else size
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(c_in * 4, latent), nn.ReLU()]
    return nn.Sequential(*layers)


class _ResidualBlock(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels),
            nn.ReLU(),
            nn.Conv2d(channels, channels, 3, padding=1),
            nn.GroupNorm(_groups(channels), channels),
        )
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(x + self.body(x))


def _resnet(input_shape: tuple[int, ...], width: int, latent: int) -> nn.Module:
    if len(input_shape) != 3:
        raise ValueError(f"convolutional models need (C, H, W) inputs, got shape {input_shape}")
    c_in, height, _ = input_shape
    stem_pool = height >= 16
    layers: list[nn.Module] = _conv_block(c_in, width, pool=stem_pool)
    layers += [_ResidualBlock(width), *_conv_block(width, 2 * width, pool=True), _ResidualBlock(2 * width)]
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(8 * width, latent), nn.ReLU()]
    return nn.Sequential(*layers)


@dataclass(frozen=True)
class ModelSpec:
    name: str
    family: str
    description: str
    build_extractor: Callable[[tuple[int, ...], int], nn.Module]
    needs_image: bool


def _spec(name: str, family: str, description: str, build: Callable[[tuple[int, ...], int], nn.Module],
          needs_image: bool) -> ModelSpec:
    return ModelSpec(name, family, description, build, needs_image)


MODEL_ZOO: dict[str, ModelSpec] = {
    s.name: s
    for s in [
        _spec("mlp_s", "mlp", "MLP, one hidden layer of 64", lambda shp, lat: _mlp(shp, (64,), lat), False),
        _spec("mlp_m", "mlp", "MLP, hidden 128-64", lambda shp, lat: _mlp(shp, (128, 64), lat), False),
        _spec("mlp_l", "mlp", "MLP, hidden 256-128-64", lambda shp, lat: _mlp(shp, (256, 128, 64), lat), False),
        _spec("cnn_s", "cnn", "2 conv blocks, 16-32 channels", lambda shp, lat: _cnn(shp, (16, 32), lat), True),
        _spec("cnn_m", "cnn", "2 conv blocks, 32-64 channels", lambda shp, lat: _cnn(shp, (32, 64), lat), True),
        _spec("deepcnn_s", "deepcnn", "3 conv blocks, 16-32-64 channels",
              lambda shp, lat: _cnn(shp, (16, 32, 64), lat), True),
        _spec("deepcnn_m", "deepcnn", "3 conv blocks, 32-64-64 channels",
              lambda shp, lat: _cnn(shp, (32, 64, 64), lat), True),
        _spec("resnet_s", "resnet", "residual net, width 8", lambda shp, lat: _resnet(shp, 8, lat), True),
        _spec("resnet_m", "resnet", "residual net, width 16", lambda shp, lat: _resnet(shp, 16, lat), True),
    ]
}


class UnknownModel(ValueError):
    pass


def check_model_name(value: str) -> str:
    """Pydantic validator: a config field naming a zoo model."""
    if value not in MODEL_ZOO:
        raise ValueError(f"unknown model; allowed: {', '.join(MODEL_ZOO)}")
    return value


ModelName = Annotated[str, AfterValidator(check_model_name)]


def build_model(name: str, input_shape: tuple[int, ...], num_classes: int, *,
                latent_dim: int = LATENT_DIM) -> ZooModel:
    """Build zoo model ``name`` for inputs of ``input_shape`` (without the batch dimension)."""
    spec = MODEL_ZOO.get(name)
    if spec is None:
        raise UnknownModel(f"unknown model {name!r}; allowed: {', '.join(MODEL_ZOO)}")
    if spec.needs_image and len(input_shape) != 3:
        raise UnknownModel(
            f"model {name!r} is convolutional and needs image inputs; this dataset has shape {input_shape} "
            f"(use an mlp_* model)"
        )
    return ZooModel(spec.build_extractor(tuple(input_shape), latent_dim), latent_dim, num_classes)
