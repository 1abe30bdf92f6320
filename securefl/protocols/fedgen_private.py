"""FedGen, private mode (``fedgen.mode: private``, the default): no user's head ever reaches the server.

Zhu, Hong & Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021, arXiv:2105.10056 (reference code: ``zhuangdizhu/FedGen``). The paper's server trains G
on every user's head (:mod:`~securefl.protocols.fedgen_reference`). Here each user trains its own
share of that loss against its own head and sends the change of G; every uplink field (head, Δθ_G,
label histogram) is only ever averaged, so this mode runs under masking and CKKS, and the users, not
the server, hold G. What both modes share: :mod:`~securefl.protocols.fedgen_common`; why the
weights and the mean: ``docs/algorithms/fedgen.md``. ``diff fedgen_private.py fedgen_reference.py``
shows everything the two modes do differently.

Paper (Algorithm 1), this mode                         here
2. local steps (shared), then the user's share of L_G:
   L_u = mean_i ω_u(y_i)·CE(h_u(G(ε_i, y_i)), y_i) + η·L_div,
   ω_u(y) = |S|·w_{y,u} = cnt_u(y) / max(m(y), cnt_u(y)/|S|)
                                                       ``client_step``, ``private_label_weights``,
                                                       ``local_generator_update``
3. θ_G ← θ_G + mean_u Δθ_G,u (mean_u L_u = L_G)        ``server_step`` (the aggregator's mean only),
                                                       ``apply_update`` (every user's replica)
4. the heads averaged unweighted (``head_aggregation: auto``), a plain mean as masking needs
                                                       ``auto_head_weighting``
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, cast

import torch
from torch import nn

from securefl.core.aggregator import Aggregator
from securefl.core.message import Message
from securefl.core.party import FederationContext, Party
from securefl.models.generator import ConditionalGenerator
from securefl.protocols.base import (
    Downlink,
    Field,
    GlobalUpdate,
    Schema,
    flat_parameters,
    load_flat_parameters,
    only_message,
)
from securefl.protocols.fedgen_common import FedGen, FedGenConfig, FedGenReplica, fit_generator, head_of


def uplink_schema(config: FedGenConfig) -> Schema:
    """What a user sends: every field aggregatable, so a secure aggregator may seal it."""
    fields = {
        "shared": Field(aggregatable=True, description="the trained head (or model), flattened; only averaged"),
        "generator_update": Field(aggregatable=True, description="Δθ_G against the user's own head; only averaged"),
    }
    if config.label_counts == "histogram":
        fields["label_counts"] = Field(aggregatable=True, description="label histogram, sensitivity 1 per record")
    return Schema("fedgen_update", **fields)


class FedGenPrivate(FedGen, mode="private"):
    """The server holds no G (nor head, nor prior): it averages, and the users' replicas apply the means."""

    uplink = uplink_schema(FedGenConfig.model_validate({}))
    auto_head_weighting = "mean"

    def __init__(self, config: FedGenConfig, ctx: FederationContext) -> None:
        super().__init__(config, ctx)
        self.uplink = uplink_schema(config)  # type: ignore[misc]

    @property
    def secure_aggregation_note(self) -> str:
        """Why this configuration cannot run under secure aggregation: it can ("")."""
        return ""

    # ----- step 2, and the user's share of step 3 --------------------------------------------------
    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message:
        down = only_message(inbox, self.start.kind)
        generator = self.train_locally(party, down, rnd)
        counts = self.released_label_counts(party)
        payload = self.shared_payload(party, counts)
        replica, n_sampled = self.replica(party), int(down.meta.get("num_sampled", 1))
        updated = self.local_generator_update(generator, head_of(cast(nn.Module, party.model)), counts,
                                              replica.label_prior, n_sampled, rnd)
        payload["generator_update"] = flat_parameters(updated) - flat_parameters(replica.generator)
        return self.reply_with_version(party, rnd, payload)

    def private_label_weights(self, counts: torch.Tensor, prior: torch.Tensor,
                              n_sampled: int) -> tuple[torch.Tensor, torch.Tensor]:
        """ω_u(y) = |S| · w_{y,u} for every class, and the labels to train G on.

        With the histogram known, ω_u(y) = cnt_u(y) / max(m(y), cnt_u(y)/|S|);
        without it (``label_counts: none``, or round 1), ω = 1: uniform weights.
        """
        if self.config.label_counts == "none" or not bool((prior[self.classes] > 0).any()):
            return torch.ones(self.ctx.num_classes), self.classes
        denominator = torch.maximum(prior, counts / max(n_sampled, 1))
        omega = torch.where(counts > 0, counts / denominator.clamp_min(1e-12), torch.zeros_like(counts))
        return omega, self.available_labels(prior)

    def local_generator_update(self, generator: ConditionalGenerator, head: nn.Module, counts: torch.Tensor,
                               prior: torch.Tensor, n_sampled: int, rnd: int) -> ConditionalGenerator:
        """A copy of G after ``generator_steps`` Adam steps on this user's share L_u of L_G.

        Touches no private record: only the user's own head and label counts.
        """
        cfg = self.config
        local = copy.deepcopy(generator)
        frozen_head = copy.deepcopy(head).requires_grad_(False)
        omega, labels = self.private_label_weights(counts, prior, n_sampled)
        opt = torch.optim.Adam(local.parameters(), lr=cfg.generator_lr * cfg.generator_lr_decay ** (rnd - 1),
                               weight_decay=cfg.generator_weight_decay)
        fit_generator(local, opt, [frozen_head], omega.unsqueeze(1), labels, cfg)  # one head: L_u
        return local

    # ----- steps 3-4: the server averages, every user applies ---------------------------------------
    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Downlink:
        # Only the mean update (sealed under CKKS), never one user's; the users apply it.
        fields: dict[str, Any] = {"generator_update": aggregator.mean(replies, "generator_update")}
        return self.finish_round(rnd, replies, aggregator, fields)

    def apply_update(self, replica: FedGenReplica, update: GlobalUpdate) -> None:
        """θ_G ← θ_G + mean Δθ_G; m; the averaged head."""
        generator = replica.generator
        load_flat_parameters(generator, flat_parameters(generator) + update.fields["generator_update"])
        self.apply_prior_and_head(replica, update)

    # ----- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        # The server trains no G; "generator_rounds" keeps the checkpoint layout of both modes one.
        return {"log": self.log.state_dict(), "generator_rounds": 0}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load_state_dict(state["log"])
