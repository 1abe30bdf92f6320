"""Participants (data owners) and what the runtime hands every protocol."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from securefl.core.seeding import derive_seed
from securefl.core.training import PlainTrainer, Trainer, make_optimizer

__all__ = ["DataView", "DatasetInfo", "FederationContext", "ModelBuilder", "Party", "PartySplitInfo", "SplitInfo"]


class DatasetInfo(Protocol):
    """What the context needs of a dataset (``securefl.data.datasets.Dataset`` is one)."""

    @property
    def name(self) -> str: ...

    @property
    def num_classes(self) -> int: ...

    @property
    def input_shape(self) -> tuple[int, ...]: ...


class PartySplitInfo(Protocol):
    @property
    def train(self) -> np.ndarray: ...


class SplitInfo(Protocol):
    """What protocols read of who holds what (``securefl.data.partition.FederatedSplit`` is one)."""

    @property
    def parties(self) -> Sequence[PartySplitInfo]: ...

    @property
    def private_classes(self) -> tuple[int, ...]: ...

    @property
    def public_classes(self) -> tuple[int, ...]: ...


# (model name, input shape, number of classes) -> a fresh model: the zoo's builder, injected by the runtime.
ModelBuilder = Callable[[str, tuple[int, ...], int], nn.Module]


def _digest_tensor(digest: Any, tensor: torch.Tensor) -> None:
    digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())


@dataclass(frozen=True)
class DataView:
    """Index view into a shared tensor pair: a silo costs its indices, not a copy of its data."""

    x_all: torch.Tensor
    y_all: torch.Tensor
    idx: torch.Tensor

    def __len__(self) -> int:
        return int(self.idx.numel())

    @property
    def x(self) -> torch.Tensor:
        return self.x_all[self.idx]

    @property
    def y(self) -> torch.Tensor:
        return self.y_all[self.idx]

    def label_counts(self, num_classes: int) -> torch.Tensor:
        return torch.bincount(self.y, minlength=num_classes)


@dataclass
class Party:
    """One data owner: its private data views, its model(s) and its injected trainer.

    ``state`` belongs to the protocol (optimizers, extra models such as FML's meme).
    """

    id: str
    index: int
    model_name: str
    train: DataView
    val: DataView
    trainer: Trainer = field(default_factory=PlainTrainer)
    model: nn.Module | None = None
    lr: float | None = None  # the owner's own learning rate (participants[].lr); None: the protocol's
    state: dict[str, Any] = field(default_factory=dict)

    @property
    def num_samples(self) -> int:
        return len(self.train)

    def learning_rate(self, protocol_rate: float) -> float:
        """The rate this owner trains at: its own if its config sets one, else the protocol's."""
        return protocol_rate if self.lr is None else self.lr


@dataclass(frozen=True)
class FederationContext:
    """Read-only facts about the run that every protocol may use."""

    run_id: str
    seed: int
    dataset: DatasetInfo
    split: SplitInfo
    training: Any  # securefl.config.TrainingConfig
    public: DataView
    public_val: DataView
    public_labelled: bool
    test_x: torch.Tensor
    test_y: torch.Tensor
    # Output units the evaluation is restricted to (A2: the private classes), or None for all.
    eval_classes: torch.Tensor | None
    model_builder: ModelBuilder
    rounds: int = 1
    eval_every: int = 1

    def evaluated(self, rnd: int) -> bool:
        """Whether round ``rnd`` ends with an evaluation (``run.eval_every``, and always the last round)."""
        return rnd % self.eval_every == 0 or rnd == self.rounds

    @property
    def num_classes(self) -> int:
        return self.dataset.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.dataset.input_shape

    def shared_data_digests(self) -> dict[str, str]:
        """SHA-256 of the data every participant must hold identically: the public set (its labels too when
        they are used) and the test set. Nodes that read them from their own files compare these before round
        1: a public table that differs at one node would make its logits answer other questions than its
        peers', silently."""
        public = hashlib.sha256()
        for view in (self.public, self.public_val):
            _digest_tensor(public, view.x)
            if self.public_labelled:
                _digest_tensor(public, view.y)
        test = hashlib.sha256()
        for tensor in (self.test_x, self.test_y):
            _digest_tensor(test, tensor)
        return {"public": public.hexdigest(), "test": test.hexdigest()}

    def build_model(self, name: str, *, purpose: str) -> nn.Module:
        """A zoo model, initialised from its own derived seed so creation order never matters."""
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.seed, "init", purpose))
            return self.model_builder(name, self.input_shape, self.num_classes)

    def make_optimizer(self, model: nn.Module, *, lr: float | None = None, kind: str | None = None,
                       weight_decay: float | None = None) -> torch.optim.Optimizer:
        t = self.training
        return make_optimizer(
            model, kind=kind or t.optimizer, lr=lr if lr is not None else t.lr, momentum=t.momentum,
            weight_decay=t.weight_decay if weight_decay is None else weight_decay,
        )

    def generator(self, *parts: object) -> torch.Generator:
        return torch.Generator().manual_seed(derive_seed(self.seed, *parts))
