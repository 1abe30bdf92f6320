"""FML: Federated Mutual Learning.

Shen, Zhang, Jia, Zhang, Huang, Zhou, Kuang, Wu & Wu, "Federated Mutual Learning",
arXiv:2006.16765, 2020 (reference code: ``ZJU-DAI/Federated-Mutual-Learning``). Each client holds
a **local** model of its own architecture that never leaves it (the personalized model) and a
**meme** of one common architecture, the only thing shared and averaged as in FedAvg. Both are
trained together by deep mutual learning. The procedure, the optimizer schedule, the traps of the
code in circulation avoided here, and why both models go through one private-training loop (DP):
``docs/algorithms/fml.md``.

Paper                                                  here
1. initialise the global meme (one shared seed)        ``setup_party``, ``_build_meme``
2. fork: each selected client takes the global meme    ``open_round`` (to a client that sat out),
                                                       ``client_step``
   DML on every minibatch, α = β = 0.5, T = 1:         ``client_step``, ``MutualPair``,
   L_local = α·CE(z_l, y) + (1−α)·KL(p_m ‖ p_l)         ``mutual_losses``
   L_meme  = β·CE(z_m, y) + (1−β)·KL(p_l ‖ p_m)
   the reference's lr schedule                         ``learning_rate``, ``decayed_learning_rate``
3. upload the meme                                     ``client_step``
4. merge: the mean of the memes, loaded by the clients ``server_step``, ``client_update``
evaluation: the local model (``accuracy``), the meme   ``evaluate``
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field as PydField
from torch import nn

from securefl.core.aggregator import Aggregator
from securefl.core.message import Message
from securefl.core.party import Party
from securefl.core.training import (
    argmax_accuracy,
    kl_distillation,
    make_optimizer,
    own_distribution_from_logits,
    predict_logits,
)
from securefl.models.zoo import ModelName, UnknownModel
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


class FMLConfig(ProtocolConfig):
    """The ``fml:`` section. Defaults are the reference's (Args.py, Node.init_optimizer).

    The number of local epochs E is ``training.local_epochs`` (the reference
    uses E = 5); rounds and clients are ``run.rounds`` and ``participants``.
    """

    meme_model: ModelName = PydField("cnn_s", description="zoo architecture of the shared meme model (same for all)")
    alpha: float = PydField(0.5, ge=0, le=1, description="local model's weight on CE; 1-alpha on KL(p_meme||p_local)")
    beta: float = PydField(0.5, ge=0, le=1, description="meme's weight on CE; 1-beta on KL(p_local||p_meme)")
    weighting: Literal["uniform", "samples"] = PydField(
        "uniform", description="merge weights: uniform (the reference) or by training-sample count")
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = PydField(0.01, gt=0, le=10)
    momentum: float = PydField(0.9, ge=0, lt=1, description="SGD momentum (ignored by adam)")
    weight_decay: float = PydField(5e-4, ge=0)
    batch_size: int = PydField(128, ge=1)
    reset_meme_optimizer: bool = PydField(
        True, description="clear the meme's optimizer state at each fork, as the reference does")
    # The reference's step decay (utils.LR_scheduler): before zero-based round r, lr *= 0.1 whenever
    # r > 0, r % int(R/3) == 0 and r < stop_decay (50); one rate for both models' optimizers.
    lr_decay: float = PydField(0.1, gt=0, le=1, description="factor of each step decay of the lr (1: no decay)")
    lr_decay_every: int | None = PydField(
        None, ge=1, description="rounds between decays; None: run.rounds // 3, the reference's trigger")
    lr_decay_stop: int | None = PydField(
        50, ge=1, description="no decay from this zero-based round on (the reference's stop_decay); None: never stop")



def decayed_learning_rate(base: float, rnd: int, *, rounds: int, decay: float, every: int | None,
                          stop: int | None) -> float:
    """The lr of round ``rnd`` (one-based) under the reference's step decay: a pure function of the round.

    Decays happen before zero-based rounds k = every, 2·every, ... below ``stop``; ``every`` None is
    ``rounds // 3`` (the reference's ``int(R/3)``; with fewer than 3 rounds, where the reference divides
    by zero, there is no decay).
    """
    period = rounds // 3 if every is None else every
    if period <= 0:
        return base
    last = rnd - 1 if stop is None else min(rnd - 1, stop - 1)
    return base * decay ** (max(last, 0) // period)


class MutualPair(nn.Module):
    """A client's two models seen as one module, so one training loop steps both.

    It owns no parameters of its own: ``local`` and ``meme`` are the client's
    models themselves, so stepping the pair steps them in place.
    """

    def __init__(self, local: nn.Module, meme: nn.Module) -> None:
        super().__init__()
        self.local = local
        self.meme = meme

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.local(x), self.meme(x)


def mutual_losses(local_logits: torch.Tensor, meme_logits: torch.Tensor, y: torch.Tensor, *,
                  alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The paper's two objectives on one minibatch, at temperature T = 1.

    Returns ``(L_local, L_meme)`` with
    ``L_local = α·CE(z_l, y) + (1−α)·KL(p_m ‖ p_l)`` and
    ``L_meme = β·CE(z_m, y) + (1−β)·KL(p_l ‖ p_m)``. Each KL is ``batchmean``
    and its teacher is detached (inside :func:`kl_distillation`), so
    ``L_local`` has no gradient path into the meme and ``L_meme`` none into
    the local model.
    """
    loss_local = alpha * F.cross_entropy(local_logits, y) + (1 - alpha) * kl_distillation(local_logits, meme_logits)
    loss_meme = beta * F.cross_entropy(meme_logits, y) + (1 - beta) * kl_distillation(meme_logits, local_logits)
    return loss_local, loss_meme


class FML(Protocol):
    name = "fml"
    summary = "private local model + shared meme, deep mutual learning per batch, meme averaged as in FedAvg"
    paper = "Shen et al. 2020, arXiv:2006.16765"
    Config = FMLConfig
    uplink = Schema("meme", meme=Field(aggregatable=True, description="the meme's parameters and float buffers"))
    downlink = Schema("global_meme", meme=Field(aggregatable=True, private=False,
                                                description="the merge: mean of the uploaded memes"))
    # The fork of a client that sat out rounds: the latest merge again, under its own kind so that it
    # is not taken for a replay of the round's merge message.
    fork = Schema("meme_fork", meme=Field(aggregatable=True, private=False, description="the latest merge"))
    # The server only forwards the merge; it never reads it (so CKKS, where it cannot, works too).
    server_opens_aggregates = False
    # Weighted by the owner's own label shares, which no DP mechanism protects: reported without DP only.
    owner_only_metrics = frozenset({"own_distribution_accuracy", "meme_own_distribution_accuracy"})

    config: FMLConfig

    def __init__(self, config: FMLConfig, ctx) -> None:  # type: ignore[no-untyped-def]
        super().__init__(config, ctx)
        # The latest merge exactly as the aggregator returned it (a tensor, or a sealed value the server
        # cannot read), the round that produced it (0: none yet, everyone holds the shared
        # initialisation) and the version each client holds. Under partial participation a client that
        # sat out must fork the latest merge before it trains. All of this is public to the server.
        self.latest: Any = None
        self.version = 0
        self.holds: dict[str, int] = {}
        self._sampled: list[str] = []

    # ----- checks and set-up ---------------------------------------------------------------
    def validate_participants(self, parties: Sequence[Party]) -> None:
        try:
            self._build_meme()
        except UnknownModel as exc:
            raise ProtocolSetupError(f"fml.meme_model = {self.config.meme_model!r}: {exc}") from None

    def _build_meme(self) -> nn.Module:
        # One purpose for every copy: all memes start as the same global initialisation, as if the
        # server had sent its initial model (the paper's first fork) - without the download.
        return self.ctx.build_model(self.config.meme_model, purpose="fml-meme")

    def private_training_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        return [(self.config.batch_size, self.ctx.rounds * self.ctx.training.local_epochs, None)]

    def uplink_metadata(self) -> dict[str, Field]:
        return record_count_metadata("fml", self.config.weighting)

    def weighted_aggregation(self) -> str | None:
        return record_count_weighting("fml", self.config.weighting)

    def setup_party(self, party: Party) -> None:
        cfg = self.config
        party.model = self.ctx.build_model(party.model_name, purpose=party.id)  # the local model
        party.state["meme"] = self._build_meme()
        # The local model's and the meme's optimizers, as one torch optimizer over the pair
        # (see the module docstring); the meme's share of its state is cleared at each fork.
        party.state["optimizer"] = make_optimizer(self.pair(party), kind=cfg.optimizer, lr=party.learning_rate(cfg.lr),
                                                  momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def learning_rate(self, party: Party, rnd: int) -> float:
        """Both models' lr in round ``rnd``: the owner's (or ``fml.lr``) after the reference's step decay."""
        cfg = self.config
        return decayed_learning_rate(party.learning_rate(cfg.lr), rnd, rounds=self.ctx.rounds, decay=cfg.lr_decay,
                                     every=cfg.lr_decay_every, stop=cfg.lr_decay_stop)

    @staticmethod
    def pair(party: Party) -> MutualPair:
        assert party.model is not None
        return MutualPair(party.model, party.state["meme"])

    # ----- one round ---------------------------------------------------------------------------
    def open_round(self, rnd: int, sampled: Sequence[str]) -> Downlink:
        """Fork: send the latest merge to the selected clients whose copy is out of date."""
        self._sampled = list(sampled)
        stale = [pid for pid in sampled if self.holds.get(pid, 0) != self.version]
        if not stale:
            return None
        msg = self.broadcast(rnd, meme=self.latest).model_copy(update={"kind": self.fork.kind})
        for pid in stale:
            self.holds[pid] = self.version
        return {pid: msg for pid in stale}

    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message:
        cfg = self.config
        meme: nn.Module = party.state["meme"]
        forks = [m for m in inbox if m.kind == self.fork.kind]
        if len(forks) > 1:
            raise RuntimeError(f"expected at most one {self.fork.kind!r} message in the inbox, found {len(forks)}")
        if forks:
            load_flat_parameters(meme, forks[0].tensor("meme"))
        optimizer: torch.optim.Optimizer = party.state["optimizer"]
        if cfg.reset_meme_optimizer:
            # The reference builds a fresh optimizer for the meme at every fork: momentum gathered on
            # the client's previous meme does not belong to the newly merged one. The local model's
            # optimizer state is kept across rounds.
            for p in meme.parameters():
                optimizer.state.pop(p, None)

        # Set every round from the round number alone, so a resumed run trains at the rate an unbroken
        # one would; one rate for the local model and the meme, as the reference's LR_scheduler sets both
        # (and its fork rebuilds the meme's optimizer at the decayed rate).
        for group in optimizer.param_groups:
            group["lr"] = self.learning_rate(party, rnd)

        alpha, beta = cfg.alpha, cfg.beta

        def batch_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            # Both models see the same minibatch; detached teachers make the sum's gradient the two
            # separate updates (module docstring).
            local_logits, meme_logits = model(xb)
            loss_local, loss_meme = mutual_losses(local_logits, meme_logits, yb, alpha=alpha, beta=beta)
            return loss_local + loss_meme

        party.trainer.fit(self.pair(party), optimizer, party.train.x, party.train.y,
                          batch_size=cfg.batch_size, epochs=self.ctx.training.local_epochs,
                          batch_loss=batch_loss, max_grad_norm=self.ctx.training.max_grad_norm,
                          payload="mutual_training")
        msg = self.reply(party, rnd, meme=flat_parameters(meme))
        if cfg.weighting == "samples":
            # Counts leave in the clear only when they set the weights (declared in uplink_metadata); a
            # masking layer pre-weights the input with the declared aggregation weight.
            msg = msg.with_meta(num_samples=party.num_samples, aggregation_weight=float(party.num_samples))
        return msg

    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Message:
        """Merge: the mean of the uploaded memes (uniform, or weighted by sample counts)."""
        if self.config.weighting == "samples":
            merged = aggregator.weighted_mean(replies, "meme", [float(r.meta["num_samples"]) for r in replies])
        else:
            merged = aggregator.mean(replies, "meme")
        self.latest, self.version = merged, rnd
        # The runtime delivers the merge to every selected client.
        for pid in {*self._sampled, *(r.sender for r in replies)}:
            self.holds[pid] = rnd
        return self.broadcast(rnd, meme=merged)

    def client_update(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        # Only parameters and float buffers travel, so integer buffers are never averaged or overwritten.
        load_flat_parameters(party.state["meme"], only_message(inbox, self.downlink.kind).tensor("meme"))  # type: ignore[union-attr]

    # ----- evaluation ----------------------------------------------------------------------------
    def evaluate(self, party: Party) -> dict[str, float]:
        """``accuracy``: the local, personalized model (the headline); ``meme_accuracy``: the client's meme.

        ``own_distribution_accuracy`` (and ``meme_own_distribution_accuracy``) reweight the per-class
        test accuracy to the owner's training label distribution: how the personalized model serves
        the owner's own population. Computed at the owner, from its own label counts. A client that
        took part in the latest round holds the latest merge, so its ``meme_accuracy`` is the global
        meme's; the server itself never reads the merge.
        """
        assert party.model is not None
        x, y, classes = self.ctx.test_x, self.ctx.test_y, self.ctx.eval_classes
        meme: nn.Module = party.state["meme"]
        counts = party.train.label_counts(self.ctx.num_classes)
        local, shared = predict_logits(party.model, x), predict_logits(meme, x)  # once each for both scores
        return {"accuracy": argmax_accuracy(local, y, classes),
                "own_distribution_accuracy": own_distribution_from_logits(local, y, counts, classes),
                "meme_accuracy": argmax_accuracy(shared, y, classes),
                "meme_own_distribution_accuracy": own_distribution_from_logits(shared, y, counts, classes)}

    # ----- checkpointing ---------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"latest": self.latest, "version": self.version, "holds": dict(self.holds)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.latest = state["latest"]
        self.version = int(state["version"])
        self.holds = dict(state["holds"])
