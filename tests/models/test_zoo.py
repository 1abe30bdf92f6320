"""The model zoo: every model runs on every input kind it claims and is Opacus-ready."""

from __future__ import annotations

import pytest
import torch
from opacus.validators import ModuleValidator

from securefl.models.zoo import LATENT_DIM, MODEL_ZOO, UnknownModel, build_model

SHAPES = {"digits": (1, 8, 8), "fashion_mnist": (1, 28, 28), "tabular": (30,)}


@pytest.mark.parametrize("name", sorted(MODEL_ZOO))
@pytest.mark.parametrize("kind", sorted(SHAPES))
def test_every_model_builds_runs_and_passes_opacus_validation(name: str, kind: str) -> None:
    shape = SHAPES[kind]
    if MODEL_ZOO[name].needs_image and len(shape) != 3:
        with pytest.raises(UnknownModel, match="needs image inputs"):
            build_model(name, shape, 10)
        return
    model = build_model(name, shape, 10)
    assert ModuleValidator.validate(model, strict=False) == []
    out = model(torch.randn(4, *shape))
    assert out.shape == (4, 10)
    assert model.extractor(torch.randn(2, *shape)).shape == (2, LATENT_DIM)


def test_at_least_four_families_with_several_sizes() -> None:
    families: dict[str, int] = {}
    for spec in MODEL_ZOO.values():
        families[spec.family] = families.get(spec.family, 0) + 1
    assert len(families) >= 4 and all(n >= 2 for n in families.values())


def test_sizes_differ_within_a_family() -> None:
    count = {n: sum(p.numel() for p in build_model(n, (1, 28, 28), 10).parameters()) for n in ("cnn_s", "cnn_m")}
    assert count["cnn_m"] > 2 * count["cnn_s"]


def test_unknown_model_names_the_allowed_ones() -> None:
    with pytest.raises(UnknownModel, match="allowed: mlp_s"):
        build_model("vgg99", (1, 8, 8), 10)
