"""FedMD: heterogeneous federated learning via model distillation.

Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation", NeurIPS 2019 Workshop
on Federated Learning for Data Privacy and Confidentiality, arXiv:1910.03581 (reference code:
``diogenes0319/FedMD_clean``, TF/Keras). Each participant keeps its own architecture and its weights
never leave it; what crosses the wire is its logits on a public alignment subset, averaged into a
consensus that every model is then fitted to. The procedure, its choices (early stopping on
validation splits, the digest losses, optimizer state across rounds) and how it differs from the
reference code: ``docs/algorithms/fedmd.md``.

Paper                                                  here
0. transfer learning: D_0 to convergence, then D_k     ``prepare_party`` (the warm start:
                                                       ``has_own_warm_start``)
1. a fresh alignment subset X_a of D_0 each round,     ``alignment_indices``
   the same at every party (seeded by the round)
2. communicate: each participant sends z_k(X_a)        ``client_step``, ``expected_uplink_shape``
3. aggregate: the unweighted mean of the logits        ``server_step``
4. digest: fit z_k(X_a) to the consensus               ``client_update``, ``digest_loss``
   (L1 on raw logits, or T²·KL with ``kl``)
5. revisit: a few epochs of CE on the private data     ``client_update``
evaluation: each participant's own model (``accuracy``), the base class's ``evaluate``
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field as PydField

from securefl.core.aggregator import Aggregator
from securefl.core.message import Message
from securefl.core.party import Party
from securefl.core.seeding import derive_seed
from securefl.core.training import (
    accuracy,
    fit_with_early_stopping,
    kl_distillation,
    predict_logits,
)
from securefl.data.partition import stratified_sample
from securefl.protocols.base import Field, Protocol, ProtocolConfig, Schema, only_message, val_score


class FedMDConfig(ProtocolConfig):
    alignment_size: int = PydField(5000, ge=1, description="N_a: alignment subset drawn from D_0 each round")
    digest_loss: Literal["l1", "mse", "kl"] = "l1"
    digest_temperature: float = PydField(1.0, gt=0, description="temperature of the 'kl' digest loss")
    digest_epochs: int = PydField(1, ge=1)
    digest_lr: float = PydField(1e-3, gt=0)
    digest_batch_size: int = PydField(256, ge=1)
    revisit_epochs: int = PydField(2, ge=0)
    revisit_batch_size: int = PydField(32, ge=1)
    transfer_max_epochs: int = PydField(50, ge=1, description="max epochs of each transfer-learning stage")
    transfer_patience: int = PydField(5, ge=1)
    transfer_public_batch_size: int | None = PydField(
        None, ge=1, description="batch size of the transfer stage on the labelled public set (None: training.batch_size)")


def digest_loss(kind: str, temperature: float):  # type: ignore[no-untyped-def]
    """The per-batch loss of the digest phase: fit z_k(X_a) to the consensus."""

    def loss(model: torch.nn.Module, x: torch.Tensor, consensus: torch.Tensor) -> torch.Tensor:
        logits = model(x)
        if kind == "l1":
            return F.l1_loss(logits, consensus)
        if kind == "mse":
            return F.mse_loss(logits, consensus)
        return temperature**2 * kl_distillation(logits, consensus, temperature)

    return loss


class FedMD(Protocol):
    name = "fedmd"
    summary = "logits on a public alignment set, unweighted consensus, digest then revisit"
    paper = "Li & Wang 2019, arXiv:1910.03581"
    Config = FedMDConfig
    uplink = Schema("logits", logits=Field(aggregatable=True, description="z_k(X_a), N_a x C"))
    downlink = Schema("consensus", consensus=Field(aggregatable=True, description="mean of z_k(X_a)"))

    config: FedMDConfig
    # Step 0's transfer learning ends in an early-stopped fit on the private data: it is the warm start.
    has_own_warm_start = True

    # ----- step 0: transfer learning -----------------------------------------------------
    def setup_party(self, party: Party) -> None:
        party.model = self.ctx.build_model(party.model_name, purpose=party.id)
        party.state["private_opt"] = self.ctx.make_optimizer(party.model, lr=party.lr)
        party.state["digest_opt"] = self.ctx.make_optimizer(party.model, kind="adam", lr=self.config.digest_lr,
                                                             weight_decay=0.0)

    def prepare_party(self, party: Party) -> None:
        cfg, ctx = self.config, self.ctx
        model = party.model
        assert model is not None
        if ctx.public_labelled and len(ctx.public) > 0:
            public_opt = ctx.make_optimizer(model, lr=party.lr)
            fit_with_early_stopping(
                lambda: party.trainer.fit_public(model, public_opt, ctx.public.x, ctx.public.y,
                                                 batch_size=cfg.transfer_public_batch_size or ctx.training.batch_size,
                                                 epochs=1, payload="transfer_public"),
                model, lambda: accuracy(model, ctx.public_val.x, ctx.public_val.y),
                max_epochs=cfg.transfer_max_epochs, patience=cfg.transfer_patience)
        self._train_private_with_early_stopping(party, max_epochs=cfg.transfer_max_epochs)

    def private_training_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        cfg = self.config
        return [(self.ctx.training.batch_size, cfg.transfer_max_epochs, None),
                (cfg.revisit_batch_size, self.ctx.rounds * cfg.revisit_epochs, None)]

    # ----- steps 1-2: alignment subset and logits ---------------------------------------
    def alignment_indices(self, rnd: int) -> torch.Tensor:
        """X_a for round ``rnd``: the same draw at every party, from the round number alone."""
        n_public = len(self.ctx.public)
        size = min(self.config.alignment_size, n_public)
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "fedmd-alignment", rnd))
        if self.ctx.public_labelled:
            labels = self.ctx.public.y.numpy()
            chosen = stratified_sample(labels, size, rng)
        else:
            # Unlabelled public set: nothing to stratify on, so a uniform draw.
            chosen = rng.choice(n_public, size=size, replace=False)
        return torch.as_tensor(np.sort(chosen), dtype=torch.long)

    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message:
        assert party.model is not None
        x_align = self.ctx.public.x[self.alignment_indices(rnd)]
        return self.reply(party, rnd, logits=predict_logits(party.model, x_align))

    def expected_uplink_shape(self, kind: str, field: str, sender: str, rnd: int) -> tuple[int, ...] | None:
        if (kind, field) != ("logits", "logits"):
            return None
        return (len(self.alignment_indices(rnd)), self.ctx.num_classes)

    # ----- step 3: consensus ----------------------------------------------------------------
    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Message:
        return self.broadcast(rnd, consensus=aggregator.mean(replies, "logits"))

    # ----- steps 4-5: digest, then revisit ----------------------------------------------
    def client_update(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        cfg = self.config
        consensus = only_message(inbox, self.downlink.kind).tensor("consensus")  # type: ignore[union-attr]
        model = party.model
        assert model is not None
        x_align = self.ctx.public.x[self.alignment_indices(rnd)]
        # The digest fits public inputs to an aggregate: no private record is touched here.
        party.trainer.fit_public(model, party.state["digest_opt"], x_align, consensus, batch_size=cfg.digest_batch_size,
                                 epochs=cfg.digest_epochs, batch_loss=digest_loss(cfg.digest_loss, cfg.digest_temperature),
                                 payload="digest")
        if cfg.revisit_epochs > 0:
            party.trainer.fit(model, party.state["private_opt"], party.train.x, party.train.y,
                              batch_size=cfg.revisit_batch_size, epochs=cfg.revisit_epochs,
                              max_grad_norm=self.ctx.training.max_grad_norm, payload="revisit")

    def _train_private_with_early_stopping(self, party: Party, *, max_epochs: int) -> None:
        model = party.model
        assert model is not None
        fit_with_early_stopping(
            lambda: party.trainer.fit(model, party.state["private_opt"], party.train.x, party.train.y,
                                      batch_size=self.ctx.training.batch_size, epochs=1,
                                      max_grad_norm=self.ctx.training.max_grad_norm, payload="transfer_private"),
            model, party.trainer.validation(lambda: val_score(party, self.ctx.eval_classes)),
            max_epochs=max_epochs, patience=self.config.transfer_patience)

    # ----- reporting -------------------------------------------------------------------------
    def digest_steps_per_round(self) -> int:
        """Optimizer steps of one digest: ceil(|X_a| / digest batch) per digest epoch."""
        cfg = self.config
        size = min(cfg.alignment_size, len(self.ctx.public))
        return math.ceil(size / cfg.digest_batch_size) * cfg.digest_epochs

    def revisit_steps_per_round(self) -> list[int]:
        """Optimizer steps of one revisit, per participant: ceil(n_private / revisit batch) per revisit epoch."""
        cfg = self.config
        return [math.ceil(len(p.train) / cfg.revisit_batch_size) * cfg.revisit_epochs for p in self.ctx.split.parties]

    def run_notes(self) -> dict[str, str]:
        """The digest's loss and the digest/revisit balance: a revisit that outweighs the digest pulls each
        model back to its silo every round."""
        cfg = self.config
        loss = f"kl at temperature T = {cfg.digest_temperature:g}" if cfg.digest_loss == "kl" else cfg.digest_loss
        digest, revisit = self.digest_steps_per_round(), self.revisit_steps_per_round()
        spread = (f"{revisit[0]}" if min(revisit) == max(revisit) else
                  f"mean {sum(revisit) / len(revisit):.1f}, per participant {min(revisit)}-{max(revisit)}")
        return {
            "digest loss": loss,
            "optimizer steps per round": (f"digest {digest} (batch {cfg.digest_batch_size}, {cfg.digest_epochs} "
                                          f"epoch(s)); revisit {spread} (batch {cfg.revisit_batch_size}, "
                                          f"{cfg.revisit_epochs} epoch(s))"),
        }
