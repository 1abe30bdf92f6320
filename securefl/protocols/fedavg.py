"""FedAvg baseline, for homogeneous participants only.

McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient Learning of Deep
Networks from Decentralized Data", AISTATS 2017, arXiv:1602.05629. The server broadcasts the
global model, sampled clients train ``local_epochs`` on their data and send their weights, and the
server takes the mean weighted by sample counts (``fedavg.weighting: samples``, the paper's) or the
plain mean (``uniform``). FedAvg cannot mix architectures; a heterogeneous set-up is refused before
round 1. Sample weighting sends each client's exact record count in the clear and scales each
client's share of distributed noise, so the privacy set-up refuses ``samples`` under DP (see
``docs/algorithms/fedavg.md``).

Paper (FederatedAveraging)                             here
the server initialises w_0                             ``setup_server`` (``global_model``)
each round: send w_t (all start from w_0; only a       ``open_round``
client that missed a round needs it again)
ClientUpdate: E epochs of minibatch SGD from w_t       ``client_step``
w_{t+1} = Σ_k (n_k / n) · w_{t+1}^k                    ``server_step`` (``weighting``; declared in
                                                       ``uplink_metadata``, ``weighted_aggregation``)
clients load w_{t+1}                                   ``client_update``
one architecture for all                               ``validate_participants``
evaluation: the global model (``accuracy``)            ``evaluate``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from pydantic import Field as PydField

from securefl.core.aggregator import Aggregator
from securefl.core.message import Message
from securefl.core.party import Party
from securefl.core.training import accuracy
from securefl.protocols.base import (
    Downlink,
    Field,
    Protocol,
    ProtocolConfig,
    ProtocolSetupError,
    Schema,
    flat_parameters,
    load_flat_parameters,
    only_message,
    record_count_metadata,
    record_count_weighting,
)


class FedAvgConfig(ProtocolConfig):
    weighting: Literal["samples", "uniform"] = PydField(
        "samples", description="server mean weighted by each client's record count (the paper), or uniform "
                               "(sends no count; what DP needs)")


class FedAvg(Protocol):
    name = "fedavg"
    summary = "baseline: parameter averaging, sample-weighted or uniform (homogeneous models only)"
    paper = "McMahan et al. 2017"
    Config = FedAvgConfig
    uplink = Schema("weights", weights=Field(aggregatable=True, description="all float parameters, flattened"))
    downlink = Schema("global_model", weights=Field(aggregatable=False, private=False))
    server_opens_aggregates = True  # the server keeps the global model

    # Sent at the start of a round to a sampled participant that missed earlier rounds' downlinks.
    CATCH_UP = "global_model_catch_up"

    config: FedAvgConfig

    def __init__(self, config: FedAvgConfig, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, ctx)
        self.global_model: torch.nn.Module | None = None
        # Server side: the round whose global model each participant last received (0: the initial one).
        self._holds_round: dict[str, int] = {}
        self._global_round = 0

    def validate_participants(self, parties: Sequence[Party]) -> None:
        models = sorted({p.model_name for p in parties})
        if len(models) != 1:
            raise ProtocolSetupError(
                f"fedavg needs every participant to use the same model; participants use {', '.join(models)}. "
                "Use a heterogeneous protocol (fedmd, fedh2l, heterofl, fml, fedgen) or one model name."
            )

    def uplink_metadata(self) -> dict[str, Field]:
        return record_count_metadata("fedavg", self.config.weighting)

    def weighted_aggregation(self) -> str | None:
        return record_count_weighting("fedavg", self.config.weighting)

    def setup_server(self, parties: Sequence[Party]) -> None:
        self.global_model = self.ctx.build_model(parties[0].model_name, purpose="fedavg-global")

    def warm_start_refusal(self) -> str | None:
        return ("fedavg trains one global model: every round starts from it, and an average of owners' separately "
                "early-stopped models is not a FedAvg round")

    def setup_party(self, party: Party) -> None:
        # Every participant starts from the global initialisation (same derived seed as the server's).
        party.model = self.ctx.build_model(party.model_name, purpose="fedavg-global")
        party.state["private_opt"] = self.ctx.make_optimizer(party.model, lr=party.lr)

    def open_round(self, rnd: int, sampled: Sequence[str]) -> Downlink:
        # Participants start from the global initialisation and receive every later global model in the
        # downlink of the rounds they take part in; only one that missed a round needs the current model.
        assert self.global_model is not None
        stale = [pid for pid in sampled if self._holds_round.get(pid, 0) < self._global_round]
        if not stale:
            return None
        catch_up = self.broadcast(rnd, weights=flat_parameters(self.global_model)).model_copy(update={"kind": self.CATCH_UP})
        return {pid: catch_up for pid in stale}

    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message:
        assert party.model is not None
        for msg in inbox:
            if msg.kind == self.CATCH_UP:
                load_flat_parameters(party.model, msg.tensor("weights"))
        party.trainer.fit(party.model, party.state["private_opt"], party.train.x, party.train.y,
                          batch_size=self.ctx.training.batch_size, epochs=self.ctx.training.local_epochs,
                          max_grad_norm=self.ctx.training.max_grad_norm, payload="local_training")
        msg = self.reply(party, rnd, weights=flat_parameters(party.model))
        if self.config.weighting == "samples":
            # The count sets the client's weight, so it leaves in the clear (declared in uplink_metadata);
            # a masking layer pre-weights the input with the declared aggregation weight.
            msg = msg.with_meta(num_samples=party.num_samples, aggregation_weight=float(party.num_samples))
        return msg

    def expected_uplink_shape(self, kind: str, field: str, sender: str, rnd: int) -> tuple[int, ...] | None:
        if (kind, field) != ("weights", "weights") or self.global_model is None:
            return None
        return (int(flat_parameters(self.global_model).numel()),)

    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Message:
        assert self.global_model is not None
        if self.config.weighting == "samples":
            merged = aggregator.weighted_mean(replies, "weights", [float(r.meta["num_samples"]) for r in replies])
        else:
            merged = aggregator.mean(replies, "weights")
        if not isinstance(merged, torch.Tensor):
            # The server loads the average into its own model: a sealed (CKKS) one is refused before round 1.
            raise TypeError(f"FedAvg's server needs a plaintext average, got {type(merged).__name__}")
        load_flat_parameters(self.global_model, merged)
        self._global_round = rnd
        # Every participant of the round gets the new global model (the runtime sends to the sampled ones).
        for r in replies:
            self._holds_round[r.sender] = rnd
        return self.broadcast(rnd, weights=flat_parameters(self.global_model))

    def client_update(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        # The round ends with the new global model at every participant of the round.
        assert party.model is not None
        load_flat_parameters(party.model, only_message(inbox, "global_model").tensor("weights"))

    def evaluate(self, party: Party) -> dict[str, float]:
        # After client_update the participant's model is the global model: report that one.
        assert party.model is not None
        return {"accuracy": accuracy(party.model, self.ctx.test_x, self.ctx.test_y, classes=self.ctx.eval_classes)}

    def state_dict(self) -> dict:
        # A participant's node has no global model of its own (None there).
        return {"global_model": self.global_model.state_dict() if self.global_model is not None else None,
                "holds_round": dict(self._holds_round), "global_round": self._global_round}

    def load_state_dict(self, state: dict) -> None:
        if self.global_model is not None:
            self.global_model.load_state_dict(state["global_model"])
        self._holds_round = dict(state["holds_round"])
        self._global_round = int(state["global_round"])
