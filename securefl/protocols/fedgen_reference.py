"""FedGen, reference mode (``fedgen.mode: reference``): the server trains G on every user's head, as the paper.

Zhu, Hong & Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021, arXiv:2105.10056 (reference code: ``zhuangdizhu/FedGen``). The server needs every selected
user's head and label counts individually and in the clear: the uplink declares them not
aggregatable, so a secure-aggregation layer refuses this mode before round 1 (plaintext only; use
:mod:`~securefl.protocols.fedgen_private`). The server keeps G and its Adam across rounds and sends
θ_G in the clear; the users' replicas load it. ``share: full`` (whole models, the paper's own
homogeneous setting) works in both modes. What both modes share: :mod:`~securefl.protocols.fedgen_common`;
the reasoning: ``docs/algorithms/fedgen.md``. ``diff fedgen_private.py fedgen_reference.py`` shows
everything the two modes do differently.

Paper (Algorithm 1), this mode                         here
2. local steps (shared); the head and cnt_u go up as they are
                                                       ``client_step``
3. ``generator_steps`` Adam steps (lr 3e-4, decayed 0.98 a round) on
   L_G = Σ_u mean_i w_{y_i,u}·CE(h_u(G(ε_i, y_i)), y_i) + η·L_div, y_i over the labels some user holds
                                                       ``server_step``, ``train_generator_on_heads``,
                                                       ``train_generator``; users: ``apply_update``
4. the heads averaged weighted by sample counts (``head_aggregation: auto``), as the reference
                                                       ``auto_head_weighting``
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from securefl.core.aggregator import Aggregator
from securefl.core.message import Message
from securefl.core.party import FederationContext, Party
from securefl.protocols.base import (
    Downlink,
    Field,
    GlobalUpdate,
    Schema,
    flat_parameters,
    load_flat_parameters,
    only_message,
)
from securefl.protocols.fedgen_common import FedGen, FedGenConfig, FedGenReplica, fit_generator, label_weights


def uplink_schema(config: FedGenConfig) -> Schema:
    """What a user sends: its head and counts in the clear (not aggregatable), which secure aggregation refuses."""
    fields = {"shared": Field(aggregatable=False, description=(
        "the user's head (or model) in the clear: the server trains G against each one individually"))}
    if config.label_counts == "histogram":
        fields["label_counts"] = Field(aggregatable=False, description="the user's label counts, used individually")
    return Schema("fedgen_reference_update", **fields)


class FedGenReference(FedGen, mode="reference"):
    """The server trains G itself, against the users' heads in the clear; the users' replicas load its θ_G."""

    uplink = uplink_schema(FedGenConfig.model_validate({"mode": "reference"}))
    auto_head_weighting = "weighted_mean"

    def __init__(self, config: FedGenConfig, ctx: FederationContext) -> None:
        super().__init__(config, ctx)
        self.uplink = uplink_schema(config)  # type: ignore[misc]
        self.generator = self.initial_generator()
        # The reference keeps one Adam for G across rounds (lr decayed by an ExponentialLR).
        self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr,
                                              weight_decay=config.generator_weight_decay)
        self.generator_rounds = 0
        # The public architecture of the shared part, built when the first heads arrive.
        self._shared_template: nn.Module | None = None

    @property
    def secure_aggregation_note(self) -> str:
        """Why this configuration cannot run under secure aggregation.

        The declaration itself is the uplink schema: the head and the label counts
        are private fields that are not aggregatable, which a secure-aggregation
        layer refuses before round 1; this note says why.
        """
        return ("fedgen mode 'reference' trains the generator on the server against every user's head "
                "and label counts individually, so they must arrive in the clear; use fedgen.mode=private")

    # ----- step 2 -----------------------------------------------------------------------------------
    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message:
        down = only_message(inbox, self.start.kind)
        self.train_locally(party, down, rnd)
        counts = self.released_label_counts(party)
        payload = self.shared_payload(party, counts)
        return self.reply_with_version(party, rnd, payload)

    # ----- steps 3-4: the server trains G and averages, every user applies ----------------------------
    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Downlink:
        self.train_generator_on_heads(replies)
        fields: dict[str, Any] = {"generator": flat_parameters(self.generator)}
        return self.finish_round(rnd, replies, aggregator, fields)

    def apply_update(self, replica: FedGenReplica, update: GlobalUpdate) -> None:
        """θ_G ← the server's θ_G; m; the averaged head."""
        load_flat_parameters(replica.generator, update.fields["generator"])
        self.apply_prior_and_head(replica, update)

    def train_generator_on_heads(self, replies: Sequence[Message]) -> None:
        """``generator_steps`` Adam steps on L_G against every selected user's head (in the clear)."""
        heads = [self._head_from(r.tensor("shared")) for r in replies]
        if self.config.label_counts == "histogram":
            weights, qualified = label_weights(torch.stack([r.tensor("label_counts") for r in replies]))
        else:
            weights = torch.full((self.ctx.num_classes, len(replies)), 1.0 / len(replies))
            qualified = self.classes  # no histogram: every class (what available_labels gives)
        self.train_generator(heads, weights, qualified)

    def train_generator(self, heads: Sequence[nn.Module], weights: torch.Tensor, labels: torch.Tensor) -> None:
        """``generator_steps`` Adam steps on L_G = teacher_loss + η · L_div, y uniform over ``labels``."""
        cfg = self.config
        for group in self.generator_opt.param_groups:
            group["lr"] = cfg.generator_lr * cfg.generator_lr_decay**self.generator_rounds
        fit_generator(self.generator, self.generator_opt, heads, weights, labels, cfg)
        self.generator_rounds += 1

    def _head_from(self, flat: torch.Tensor) -> nn.Module:
        if self._shared_template is None:
            self._shared_template = self.initial_shared()  # the public architecture; its values are overwritten
        shared = copy.deepcopy(self._shared_template)
        load_flat_parameters(shared, flat)
        return self._head_in(shared).requires_grad_(False)

    # ----- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"log": self.log.state_dict(), "generator_rounds": self.generator_rounds,
                "generator": self.generator.state_dict(), "generator_opt": self.generator_opt.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load_state_dict(state["log"])
        self.generator_rounds = int(state["generator_rounds"])
        self.generator.load_state_dict(state["generator"])
        self.generator_opt.load_state_dict(state["generator_opt"])
