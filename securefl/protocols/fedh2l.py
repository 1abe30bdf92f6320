"""FedH2L: decentralised mutual distillation on a shared seed set.

Li, Zhou, Wang, Mi & Hospedales, "FedH2L: Federated Learning with Model and Statistical
Heterogeneity", arXiv:2101.11296, 2021. There is no public reference code; this file follows the
paper as the project spec (section 2) states it. There is no server: peers on a neighbour graph
send each other their posteriors on a small public (or consented) seed set S and distil from them,
optionally aligning the distillation with the local task (``meta`` or ``pcgrad``). The procedure,
the relay form, why ``direct`` is refused under secure aggregation and distributed noise, and why
each variant stays sound under DP-SGD: ``docs/algorithms/fedh2l.md``.

Paper / spec                                           here
the seed set S, the neighbour graph N(i)               ``seed_indices``, ``neighbour_sets``
1. share p_i^T(S) with each neighbour (or the relay)   ``client_step``, ``posteriors``; relay:
                                                       ``server_step`` (a sum, nothing else)
2. L_i = CE(f_i; D_i) + λ·T²·mean_{j∈N(i)} KL(p_j^T(S) ‖ p_i^T(S))
                                                       ``client_update``, ``received_posteriors``,
                                                       ``local_objective``, ``public_objective``,
                                                       ``distillation_loss``
3. align: ``meta`` (first-order MLDG step)             ``look_ahead``
          ``pcgrad`` (project off a conflicting g)     ``gradient_combine``, ``project_conflicting``
refusals: direct exchange under SecAgg / shared noise  ``secure_aggregation_refusal``, ``peer_to_peer``
evaluation: each peer's model, global test set         the base class's ``evaluate``; ``run_notes``
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field as PydField
from pydantic import model_validator
from torch import nn

from securefl.core.aggregator import Aggregator
from securefl.core.message import Message
from securefl.core.party import FederationContext, Party
from securefl.core.training import BatchLoss, GradientCombine, LookAhead, predict_logits
from securefl.protocols.base import Field, Protocol, ProtocolConfig, ProtocolSetupError, Schema, only_message


class FedH2LConfig(ProtocolConfig):
    seed_set: Literal["public", "consented"] = PydField(
        "public", description="status of the shared seed set S (a documented privacy assumption; stated in the report)")
    seed_size: int | None = PydField(
        None, ge=1, description="|S|: records of the public set drawn (once, from the run seed) as the seed set; "
                                "None = the whole public set")
    seed_batch_size: int = PydField(64, ge=1, description="seed-set records in the distillation term of each step")
    topology: Literal["full", "ring", "k_regular"] = PydField("full", description="the peers' neighbour graph")
    k: int | None = PydField(None, ge=1, description="neighbours per peer; topology k_regular only")
    exchange: Literal["direct", "relay_sum"] = PydField(
        "direct", description="direct: peer-to-peer posteriors; relay_sum: a relay sums them (full mesh only)")
    temperature: float = PydField(2.0, gt=0, description="T of the posteriors and of the distillation term")
    distill_weight: float = PydField(1.0, ge=0, description="lambda, weight of the distillation term")
    alignment: Literal["none", "meta", "pcgrad"] = PydField("none", description="gradient alignment variant")
    meta_lr: float = PydField(0.1, gt=0, description="alpha, the (plain SGD) inner step on L_dist of 'meta'")
    # beta = 1 (the default) puts all of the cross-entropy at the look-ahead point: MLDG's objective
    # F(theta) + beta G(theta - alpha F'(theta)) with its beta = 1, meta-train F = L_dist, meta-test G = L_loc.
    meta_weight: float = PydField(1.0, ge=0, le=1, description="beta, the share of L_loc taken at theta' in "
                                                               "'meta' (1 - beta of it stays at theta)")

    @model_validator(mode="after")
    def _k_goes_with_k_regular(self) -> FedH2LConfig:
        if self.topology == "k_regular" and self.k is None:
            raise ValueError("fedh2l.k (neighbours per peer) is required when fedh2l.topology is 'k_regular'")
        if self.topology != "k_regular" and self.k is not None:
            raise ValueError(f"fedh2l.k = {self.k} is only used with topology 'k_regular' "
                             f"(fedh2l.topology is {self.topology!r}); remove it")
        return self


# ----- the neighbour graph ------------------------------------------------------------------
def neighbour_sets(ids: Sequence[str], topology: str, k: int | None,
                   generator: torch.Generator) -> dict[str, tuple[str, ...]]:
    """N(i) for every peer, as tuples in participant order.

    ``k_regular`` is a circulant graph over a seeded permutation of the peers:
    peer at position q is linked to positions q +- 1, ..., q +- k//2 and, for
    odd k, to the opposite position q + K/2. That graph is k-regular for every
    k < K with k*K even, and a different run seed gives a different graph.
    """
    n = len(ids)
    if n < 2:
        raise ProtocolSetupError(f"fedh2l needs at least 2 participants (peers); got {n}")
    links: set[tuple[int, int]] = set()
    if topology == "full":
        links = {(a, b) for a in range(n) for b in range(n) if a != b}
    elif topology == "ring":
        for a in range(n):
            for b in ((a - 1) % n, (a + 1) % n):
                if a != b:
                    links.add((a, b))
    elif topology == "k_regular":
        if k is None:
            raise ProtocolSetupError("fedh2l.k is required when fedh2l.topology is 'k_regular'")
        if k >= n:
            raise ProtocolSetupError(f"fedh2l.k = {k}: a k-regular graph on {n} participants needs k < {n}")
        if (k * n) % 2:
            raise ProtocolSetupError(
                f"fedh2l.k = {k}: a k-regular graph needs k x (number of participants) even; {k} x {n} is odd")
        order = torch.randperm(n, generator=generator).tolist()
        offsets = list(range(1, k // 2 + 1)) + ([n // 2] if k % 2 else [])
        for q, a in enumerate(order):
            for off in offsets:
                b = order[(q + off) % n]
                links.add((a, b))
                links.add((b, a))
    else:  # the config's Literal makes this unreachable
        raise ProtocolSetupError(f"fedh2l.topology = {topology!r}: allowed full, ring, k_regular")
    return {ids[a]: tuple(ids[b] for b in range(n) if (a, b) in links) for a in range(n)}


# ----- the local objective --------------------------------------------------------------------
def posteriors(model: nn.Module, x: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^T(x) = softmax(f(x) / T), row per record: what a peer releases."""
    return F.softmax(predict_logits(model, x) / temperature, dim=1)


def distillation_loss(student_logits: torch.Tensor, teachers: torch.Tensor, *, temperature: float,
                      weight: float) -> torch.Tensor:
    """lambda * T^2 * mean_j KL(p_j^T || p_i^T) on one seed minibatch.

    ``teachers`` is (m, B, C): the m received posteriors, already softmaxed at
    T. Each KL has the spec's form (``kl_div`` of the student's log-softmax at
    T against the teacher's probabilities, ``batchmean``).
    """
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    kls = torch.stack([F.kl_div(log_student, t.detach(), reduction="batchmean") for t in teachers])
    return weight * temperature**2 * kls.mean()


def project_conflicting(g_dist: torch.Tensor, g_loc: torch.Tensor) -> torch.Tensor:
    """PCGrad, one way: drop the component of ``g_dist`` that opposes ``g_loc``.

    When g_dist . g_loc < 0 the result lies on the normal plane of g_loc;
    otherwise ``g_dist`` is returned unchanged.
    """
    dot = torch.dot(g_dist, g_loc)
    norm_sq = torch.dot(g_loc, g_loc)
    if dot >= 0 or norm_sq == 0:
        return g_dist
    return g_dist - (dot / norm_sq) * g_loc


# ----- the protocol ---------------------------------------------------------------------------
class FedH2L(Protocol):
    name = "fedh2l"
    summary = "decentralised mutual distillation: peers exchange posteriors on a shared seed set"
    paper = "Li, Zhou, Wang, Mi & Hospedales 2021, arXiv:2101.11296"
    Config = FedH2LConfig
    # Peer-to-peer in 'direct' mode, to the relay in 'relay_sum' mode: the same message either way.
    uplink = Schema("posteriors", posteriors=Field(aggregatable=True, description="p_i^T(S), |S| x C"))
    downlink = Schema("posterior_sum", posterior_sum=Field(aggregatable=True,
                                                           description="sum_j p_j^T(S) (relay_sum only)"))

    config: FedH2LConfig

    def __init__(self, config: FedH2LConfig, ctx: FederationContext) -> None:
        super().__init__(config, ctx)
        self.neighbours: dict[str, tuple[str, ...]] | None = None
        self._seed_idx: torch.Tensor | None = None

    # ----- set-up --------------------------------------------------------------------------
    def validate_participants(self, parties: Sequence[Party]) -> None:
        cfg = self.config
        n_public = len(self.ctx.public)
        if n_public == 0:
            raise ProtocolSetupError("fedh2l needs a shared seed set S, taken from the public set: "
                                     "set data.public_size > 0")
        if cfg.seed_size is not None and cfg.seed_size > n_public:
            raise ProtocolSetupError(f"fedh2l.seed_size = {cfg.seed_size} is larger than the public set "
                                     f"({n_public} records, data.public_size)")
        if cfg.exchange == "relay_sum" and cfg.topology != "full":
            raise ProtocolSetupError(
                f"fedh2l.exchange = 'relay_sum' needs fedh2l.topology = 'full' (got {cfg.topology!r}): a relay "
                "that only sums gives every peer the mean over all other peers, which is the full mesh")
        self.neighbours = neighbour_sets([p.id for p in parties], cfg.topology, cfg.k,
                                         self.ctx.generator("fedh2l-topology"))

    def peer_to_peer(self) -> str | None:
        if self.config.exchange == "direct":
            return ("fedh2l.exchange = 'direct' sends each peer's posteriors to every neighbour in a message of its "
                    "own (fedh2l.exchange: relay_sum sends them only into the relay's sum)")
        return None

    def secure_aggregation_refusal(self) -> str | None:
        if self.config.exchange == "direct":
            return ("fedh2l.exchange = 'direct' sends each peer's posteriors to its neighbours one message at a "
                    "time, which no secure aggregator seals (they would cross in the clear); use "
                    "fedh2l.exchange: relay_sum (full mesh), where the relay only ever sees the sealed sum")
        return None

    def seed_indices(self) -> torch.Tensor:
        """S as indices into the public set: drawn once from the run seed, identical at every peer."""
        if self._seed_idx is None:
            n_public = len(self.ctx.public)
            size = self.config.seed_size or n_public
            order = torch.randperm(n_public, generator=self.ctx.generator("fedh2l-seed-set"))
            self._seed_idx = order[:size].sort().values
        return self._seed_idx

    def seed_x(self) -> torch.Tensor:
        # Only the inputs: the seed set's labels (if any) are never used.
        return self.ctx.public.x[self.seed_indices()]

    def setup_party(self, party: Party) -> None:
        party.model = self.ctx.build_model(party.model_name, purpose=party.id)
        # One optimizer for the whole run, so its state (Adam moments) carries across rounds.
        party.state["opt"] = self.ctx.make_optimizer(party.model, lr=party.lr)

    # ----- step 1: share posteriors ------------------------------------------------------------
    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> list[Message] | Message:
        assert party.model is not None
        assert self.neighbours is not None, "validate_participants must run before round 1"
        for msg in inbox:
            # Anything waiting now was sent in an earlier round while this peer was not sampled:
            # stale posteriors of a model that has since moved on. A posterior of *this* round here
            # would mean a peer's message was delivered before every peer had shared (runtime bug).
            if msg.round >= rnd:
                raise RuntimeError(f"{party.id}: a round-{msg.round} {msg.kind!r} message from {msg.sender!r} "
                                   f"arrived before round {rnd}'s client_update")
        p_i = posteriors(party.model, self.seed_x(), self.config.temperature)
        # Kept so the relay form can subtract exactly what was sent.
        party.state["sent_posteriors"] = {"round": rnd, "posteriors": p_i}
        if self.config.exchange == "relay_sum":
            return self.reply(party, rnd, posteriors=p_i)
        assert self.uplink is not None
        return [Message(sender=party.id, receiver=j, run_id=self.ctx.run_id, round=rnd, kind=self.uplink.kind,
                        payload={"posteriors": p_i})
                for j in self.neighbours[party.id]]

    # ----- relay_sum only: the relay sums, and does nothing else ---------------------------------
    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Message:
        if self.config.exchange != "relay_sum":
            raise RuntimeError("fedh2l exchange 'direct' sends nothing to the relay; it must not compute")
        total = aggregator.sum(replies, "posteriors")
        # The number of contributors is public (every peer knows who is online in the mesh).
        return self.broadcast(rnd, posterior_sum=total).with_meta(contributors=len(replies))

    # ----- steps 2-3: mutual distillation ------------------------------------------------------
    def client_update(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        assert party.model is not None
        teachers = self.received_posteriors(party, inbox, rnd)
        party.trainer.fit(party.model, party.state["opt"], party.train.x, party.train.y,
                          batch_size=self.ctx.training.batch_size, epochs=self.ctx.training.local_epochs,
                          batch_loss=self.local_objective(teachers), max_grad_norm=self.ctx.training.max_grad_norm,
                          payload="fedh2l_local", public_loss=self.public_objective(teachers),
                          combine=self.gradient_combine(teachers), lookahead=self.look_ahead(teachers))

    def received_posteriors(self, party: Party, inbox: Sequence[Message], rnd: int) -> torch.Tensor | None:
        """The round's fixed teachers, (m, |S|, C), or None when no posterior of a neighbour arrived."""
        assert self.uplink is not None and self.downlink is not None and self.neighbours is not None
        if self.config.exchange == "relay_sum":
            msg = only_message(inbox, self.downlink.kind)
            self.downlink.check(msg)
            sent = party.state.get("sent_posteriors")
            if sent is None or sent["round"] != rnd:
                raise RuntimeError(f"{party.id}: no posteriors of round {rnd} to subtract from the relay's sum")
            n = int(msg.meta["contributors"])
            if n < 2:
                return None  # alone this round: nobody to distil from
            others = (msg.tensor("posterior_sum") - sent["posteriors"]) / (n - 1)
            # A CKKS sum carries small noise: a tiny negative entry would make the KL's log undefined.
            return others.clamp_min(0)[None]
        allowed = set(self.neighbours[party.id])
        by_sender: dict[str, torch.Tensor] = {}
        for msg in inbox:
            # The runtime checks the uplink schema only for messages to the aggregator: check peers' here.
            self.uplink.check(msg)
            if msg.round != rnd:
                raise RuntimeError(f"{party.id}: round-{msg.round} posteriors in round {rnd}'s inbox")
            if msg.sender not in allowed:
                raise RuntimeError(f"{party.id}: posteriors from {msg.sender!r}, which is not a neighbour "
                                   f"(N = {sorted(allowed)})")
            if msg.sender in by_sender:
                raise RuntimeError(f"{party.id}: two posterior messages from {msg.sender!r} in round {rnd}")
            by_sender[msg.sender] = msg.tensor("posteriors")
        if not by_sender:
            return None
        return torch.stack([by_sender[j] for j in self.neighbours[party.id] if j in by_sender])

    def local_objective(self, teachers: torch.Tensor | None) -> BatchLoss:
        """The per-private-minibatch loss handed to ``party.trainer.fit``: CE on the private minibatch.

        The distillation term on a random seed-set minibatch is handed to the trainer separately
        (:meth:`public_objective`, joined by :meth:`gradient_combine` for PCGrad and stepped along by
        :meth:`look_ahead` for meta), so a DP trainer clips and noises only the private CE.
        """
        del teachers  # the private term is the same in every variant

        def batch_loss(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
            return F.cross_entropy(model(xb), yb)

        return batch_loss

    def public_objective(self, teachers: torch.Tensor | None) -> Callable[[nn.Module], torch.Tensor] | None:
        """The seed-set distillation term L_dist (public inputs only)."""
        if teachers is None:
            return None
        x_seed = self.seed_x()
        return lambda model: self.distillation_term(model, x_seed, teachers)

    def gradient_combine(self, teachers: torch.Tensor | None) -> GradientCombine | None:
        """PCGrad: the local gradient plus the distillation gradient with its conflicting component removed."""
        if teachers is None or self.config.alignment != "pcgrad":
            return None
        return lambda g_loc, g_dist: g_loc + project_conflicting(g_dist, g_loc)

    def look_ahead(self, teachers: torch.Tensor | None) -> LookAhead | None:
        """Meta: theta' = theta - alpha * grad L_dist(theta), and the step follows
        (1 - beta) grad L_loc(theta) + grad L_dist(theta) + beta grad L_loc(theta').

        This is MLDG's meta-train / meta-test split: meta-train on L_dist plus the share 1 - beta of
        L_loc at theta, meta-test on the share beta of L_loc at theta'. The cross-entropy so keeps
        total weight 1, as in plain mutual distillation, whatever beta; with beta = 1 (the default,
        MLDG's own beta) it is evaluated at theta' only, which is MLDG with meta-train L_dist and
        meta-test L_loc. To second order the objective is L_i(theta) - alpha * beta * g_dist . g_loc.

        Why grad L_dist(theta) stays in the update: the spec writes it as
        grad[L_loc(theta) + beta * L_loc(theta')]. Read literally and to first order,
        that direction contains no distillation gradient at all (distillation
        would enter only through where L_loc is evaluated), so the peers would
        stop distilling. We read it as the meta term added to the local
        objective L_i = L_loc + L_dist that the spec defines just above.
        """
        if teachers is None or self.config.alignment != "meta":
            return None
        return LookAhead(step=self.config.meta_lr, weight=self.config.meta_weight)

    def distillation_term(self, model: nn.Module, x_seed: torch.Tensor, teachers: torch.Tensor) -> torch.Tensor:
        """lambda T^2 mean_j KL(p_j || p_i) on a fresh random minibatch of S (torch's runtime-seeded RNG)."""
        cfg = self.config
        pick = torch.randperm(len(x_seed))[: cfg.seed_batch_size]
        return distillation_loss(model(x_seed[pick]), teachers[:, pick], temperature=cfg.temperature,
                                 weight=cfg.distill_weight)

    # ----- reporting -------------------------------------------------------------------------
    def run_notes(self) -> dict[str, str]:
        """Facts the run report must state (the seed set's status is a privacy assumption)."""
        cfg = self.config
        graph = f"k_regular (k = {cfg.k})" if cfg.topology == "k_regular" else cfg.topology
        return {
            "seed set": (f"{cfg.seed_set}: {len(self.seed_indices())} records of the public set, shared by every "
                         "peer (inputs only; a documented privacy assumption)"),
            "topology": graph,
            "exchange": cfg.exchange,
            "gradient alignment": (f"meta (alpha = {cfg.meta_lr}, beta = {cfg.meta_weight}: cross-entropy "
                                   f"{1 - cfg.meta_weight:g} at theta + {cfg.meta_weight:g} at theta')"
                                   if cfg.alignment == "meta" else cfg.alignment),
        }
