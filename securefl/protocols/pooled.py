"""Pooled baseline: one model per architecture trained on the union of all private data.

No paper: the upper bound of the comparisons, and it is *not* private: it pretends the silos' data
were pooled in one place, which is what federated learning exists to avoid. Participants with the
same architecture share one model, so the cost is one training per architecture, not per
participant. Model selection uses the union of the validation splits. It needs every silo in one
process (``simulation_only``). Page: ``docs/algorithms/pooled.md``.

Step                                                   here
one model per architecture, shared by its users        ``setup_party``
each round: epochs on the union of the silos (plain    ``client_step`` (returns no message)
training, never a DP trainer), best validation weights kept
nothing booked to any owner's DP plan                  ``private_training_plan``
optimizers and best weights across a resume            ``state_dict``, ``load_state_dict``
no warm start (no owner has a model of its own)        ``warm_start_refusal``
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from pydantic import Field as PydField

from securefl.core.message import Message
from securefl.core.party import DataView, Party
from securefl.core.training import PlainTrainer, accuracy
from securefl.protocols.base import Protocol, ProtocolConfig


class PooledConfig(ProtocolConfig):
    epochs_per_round: int | None = PydField(None, ge=1, description="default: training.local_epochs")


class Pooled(Protocol):
    name = "pooled"
    summary = "baseline: one model per architecture on the union of the private data (upper bound, not private)"
    Config = PooledConfig
    simulation_only = ("pooled trains one model on every silo's data at once, which needs all the data in one "
                       "process; it is the simulation's upper bound, not a federated protocol")
    config: PooledConfig

    def __init__(self, config: PooledConfig, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, ctx)
        self._models: dict[str, torch.nn.Module] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._trained_in_round: dict[str, int] = {}
        self._train_views: list[DataView] = []
        self._val_views: list[DataView] = []
        self._best: dict[str, tuple[float, dict]] = {}

    def warm_start_refusal(self) -> str | None:
        return "the pooled baseline trains one model on everyone's data; no owner has a model of its own to warm start"

    def setup_party(self, party: Party) -> None:
        arch = party.model_name
        if arch not in self._models:
            self._models[arch] = self.ctx.build_model(arch, purpose=f"pooled-{arch}")
            self._optimizers[arch] = self.ctx.make_optimizer(self._models[arch])
        party.model = self._models[arch]
        self._train_views.append(party.train)
        self._val_views.append(party.val)

    def private_training_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        return []  # the centralised upper bound trains outside every participant: nothing to protect per owner

    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        arch = party.model_name
        if self._trained_in_round.get(arch) == rnd:
            return None
        self._trained_in_round[arch] = rnd
        x = torch.cat([v.x for v in self._train_views])
        y = torch.cat([v.y for v in self._train_views])
        model = self._models[arch]
        # Pooling is a centralised upper bound: it deliberately bypasses the party's (possibly DP) trainer.
        PlainTrainer().fit(model, self._optimizers[arch], x, y, batch_size=self.ctx.training.batch_size,
                           epochs=self.config.epochs_per_round or self.ctx.training.local_epochs)
        val_x = torch.cat([v.x for v in self._val_views])
        val_y = torch.cat([v.y for v in self._val_views])
        acc = accuracy(model, val_x, val_y, classes=self.ctx.eval_classes) if len(val_x) else 0.0
        best = self._best.get(arch)
        if best is None or acc > best[0]:
            self._best[arch] = (acc, {k: v.clone() for k, v in model.state_dict().items()})
        else:
            model.load_state_dict(best[1])
        return None

    def state_dict(self) -> dict:
        return {
            "optimizers": {a: o.state_dict() for a, o in self._optimizers.items()},
            "best": self._best,
            "trained_in_round": dict(self._trained_in_round),
        }

    def load_state_dict(self, state: dict) -> None:
        for arch, opt_state in state["optimizers"].items():
            self._optimizers[arch].load_state_dict(opt_state)
        self._best = state["best"]
        self._trained_in_round = dict(state["trained_in_round"])
