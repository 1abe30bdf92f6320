"""FedGen's conditional generator G(ε, y) and its diversity loss.

Zhu, Hong & Zhou, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning", ICML 2021, arXiv:2105.10056 (reference code:
``zhuangdizhu/FedGen``, ``FLAlgorithms/trainmodel/generator.py``).

G maps uniform noise ε ~ U[0, 1)^noise_dim, concatenated with the one-hot
label y, to a latent feature in the input space of the classifier heads::

    [ε, onehot(y)] -> Linear(noise_dim + C, hidden) -> BatchNorm1d -> ReLU -> Linear(hidden, latent)

with hidden 256, latent 32 and noise 32 for MNIST-like data (the reference's
``GENERATORCONFIGS['mnist']``; the reference's optional label embedding is
off by default there and not offered here).

Why BatchNorm is allowed here although the zoo uses GroupNorm: G is never
trained on private records. It is trained only on its own noise, against
classifier heads (FedGen's server, or in securefl's private mode a user's
head), so Opacus never wraps it and its batch statistics are statistics of
generated samples, not of anyone's data.

The output is linear, as in the reference, whose latent layer has no
activation either. securefl's zoo extractors end in a ReLU, so real
features are non-negative; ``output_activation="relu"`` makes G's outputs
live in the same orthant (an option, measured in the FedGen report).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from securefl.models.zoo import LATENT_DIM


class ConditionalGenerator(nn.Module):
    """G(ε, y): uniform noise plus a one-hot label to a latent feature.

    Parameters
    ----------
    num_classes:
        C, the size of the one-hot label.
    noise_dim:
        Dimension of the uniform noise ε.
    hidden_dim:
        Width of the hidden layer.
    latent_dim:
        Dimension of the generated feature; must equal the heads' input.
    output_activation:
        ``"linear"`` (the reference) or ``"relu"`` (non-negative features).
    """

    def __init__(self, num_classes: int, *, noise_dim: int = 32, hidden_dim: int = 256,
                 latent_dim: int = LATENT_DIM, output_activation: Literal["linear", "relu"] = "linear") -> None:
        super().__init__()
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.latent_dim = latent_dim
        self.output_activation = output_activation
        self.body = nn.Sequential(
            nn.Linear(noise_dim + num_classes, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.ReLU(),
        )
        self.representation = nn.Linear(hidden_dim, latent_dim)

    def sample_noise(self, n: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
        """ε ~ U[0, 1)^noise_dim (uniform, as in the reference, although its comment says Gaussian)."""
        return torch.rand((n, self.noise_dim), generator=generator)

    def forward(self, labels: torch.Tensor, eps: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Generate one latent feature per label; returns ``(features, eps)``.

        ``eps`` is drawn from torch's global RNG when not given (the runtime
        seeds that RNG per round, party and phase).
        """
        labels = labels.long()
        if eps is None:
            eps = self.sample_noise(len(labels))
        onehot = F.one_hot(labels, self.num_classes).to(eps.dtype)
        z = self.representation(self.body(torch.cat([eps, onehot], dim=1)))
        if self.output_activation == "relu":
            z = F.relu(z)
        return z, eps


def diversity_loss(eps: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """L_div = exp(-mean_ij d_ε(i, j) · d_g(i, j)), the reference's ``DiversityLoss(metric='l1')``.

    Exactly as in the reference code, the two distances are *means over
    coordinates*, not norms: d_ε(i, j) = mean_k (ε_ik - ε_jk)^2 (the
    reference's ``'l2'``, a mean squared difference, no square root) and
    d_g(i, j) = mean_k |g_ik - g_jk| (its ``'l1'``); the outer mean runs over
    all n^2 ordered pairs, the zero diagonal included. The spec's
    ``‖ε_i−ε_j‖₂ · ‖g_i−g_j‖₁`` is the same idea up to these scalings.
    Minimising it pushes samples with distant noise to distant features,
    which keeps G from collapsing to one feature per label.
    """
    if features.dim() > 2:
        features = features.reshape(len(features), -1)
    noise_dist = (eps.unsqueeze(0) - eps.unsqueeze(1)).pow(2).mean(dim=2)
    feature_dist = (features.unsqueeze(0) - features.unsqueeze(1)).abs().mean(dim=2)
    return torch.exp(torch.mean(-noise_dist * feature_dist))
