"""FedGen, what its two modes share: config, the losses, the users' replica, local training, evaluation.

Zhu, Hong & Zhou, "Data-Free Knowledge Distillation for Heterogeneous Federated Learning",
ICML 2021, arXiv:2105.10056 (reference code: ``zhuangdizhu/FedGen``: ``servers/serverpFedGen.py``,
``users/userpFedGen.py``, ``trainmodel/generator.py``, ``utils/model_config.py``). Users keep their
own extractors g_k and share a linear head h and a conditional generator G(ε, y) of latent features
that the heads agree to classify as y. ``fedgen.mode`` says who trains G: the server, on every user's
head in the clear (:mod:`~securefl.protocols.fedgen_reference`, the paper's), or each user against
its own head, the updates only averaged (:mod:`~securefl.protocols.fedgen_private`, the default).
``get_protocol("fedgen")(config, ctx)`` builds the configured mode's class. The algorithm and every
choice made here: ``docs/algorithms/fedgen.md``.

Paper (Algorithm 1), reference code                    here
1. select users; they hold h, G and the label prior m  ``open_round``, :class:`FedGenReplica`
2. local steps: CE(f(x), y) + α_t·(B_gen/B)·CE(h(G(ε, ŷ)), ŷ)
   + β_t·KL(p_h(G(ε, y)) ‖ p_f(x)), α_t = β_t = max(1e-4, 10·0.98^t)
                                                       ``train_locally``, ``user_loss``, ``generated_loss``,
                                                       ``regularizer_weight``, ``regularised_steps``
3. L_G = Σ_u mean_i w_{y_i,u}·CE(h_u(G(ε_i, y_i)), y_i) + η·L_div, w_{y,u} = cnt_u(y) / Σ_u' cnt_u'(y)
                                                       ``teacher_loss``, ``label_weights``, ``fit_generator``
                                                       (run by each mode's ``client_step``/``server_step``)
4. average the heads                                   ``finish_round``; users: ``apply_prior_and_head``
``share``: the head, or whole identical models         ``initial_shared``, ``validate_participants``
evaluation                                             ``evaluate``, ``generator_accuracy``
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, cast

import torch
import torch.nn.functional as F
from pydantic import Field as PydField
from torch import nn

from securefl.core.aggregator import Aggregator
from securefl.core.message import AGGREGATOR, Message
from securefl.core.party import FederationContext, Party
from securefl.core.seeding import derive_seed
from securefl.core.training import (
    BatchLoss,
    accuracy,
    cross_entropy_loss,
    kl_distillation,
    make_optimizer,
)
from securefl.models.generator import ConditionalGenerator, diversity_loss
from securefl.protocols.base import (
    Downlink,
    Field,
    GlobalUpdate,
    Protocol,
    ProtocolConfig,
    ProtocolSetupError,
    Replica,
    Schema,
    UpdateLog,
    attach_updates,
    flat_parameters,
    load_flat_parameters,
    only_message,
    read_updates,
    send_updates,
)


class FedGenConfig(ProtocolConfig):
    mode: Literal["private", "reference"] = PydField(
        "private", description="private: users send generator updates; reference: server trains G on clear heads")
    label_counts: Literal["histogram", "none"] = PydField(
        "histogram", description="release label histograms for w_{y,u}, or nothing (uniform weights)")
    share: Literal["head", "full"] = PydField("head", description="head only, or whole models (identical models)")
    head_aggregation: Literal["auto", "weighted_mean", "mean"] = PydField(
        "auto", description="auto: weighted by sample counts in reference mode (as the reference), unweighted in "
                            "private mode (so every uplink field is a plain mean, which masking supports)")
    # ----- users' local training (reference: userpFedGen.train) -----
    local_steps: int = PydField(20, ge=1, description="local SGD steps (the reference's 'local_epochs')")
    local_epochs: int | None = PydField(
        None, ge=1, description="if set: this many passes over the user's data per round (ceil(n/batch_size) "
                                "steps each, FedAvg's schedule) in place of local_steps")
    early_stop: int | None = PydField(
        20, ge=0, description="local steps per round that carry the generator terms, the first ones (the "
                              "reference's early_stop = 20); the rest are plain CE. None: every step")
    batch_size: int = PydField(32, ge=1)
    optimizer: Literal["sgd", "adam"] = PydField(
        "sgd", description="users' optimizer: sgd (the reference's plain pFedIBOptimizer) or adam")
    lr: float = PydField(0.01, gt=0, description="users' learning rate")
    momentum: float = PydField(0.0, ge=0, lt=1, description="SGD momentum (the reference: none; ignored by adam)")
    weight_decay: float = PydField(0.0, ge=0, description="users' weight decay (the reference's SGD: none)")
    lr_decay: float = PydField(0.99, gt=0, le=1, description="per-round decay of the users' lr")
    gen_batch_size: int = PydField(32, ge=1, description="generated samples per user step")
    generative_alpha: float = PydField(10.0, ge=0, description="α_0 of the generated-CE term (0: off)")
    generative_beta: float = PydField(10.0, ge=0, description="β_0 of the reference's latent-KL term (0: paper)")
    generative_decay: float = PydField(0.98, gt=0, le=1, description="α_t = max(floor, α_0 · decay^t)")
    generative_floor: float = PydField(1e-4, ge=0)
    # ----- the generator (reference: GENERATORCONFIGS['mnist'], RUNCONFIGS['mnist']) -----
    noise_dim: int = PydField(32, ge=1)
    hidden_dim: int = PydField(256, ge=1)
    generator_output: Literal["linear", "relu"] = PydField(
        "linear", description="linear (reference) or relu (match the zoo's non-negative features)")
    generator_steps: int = PydField(50, ge=0, description="Adam steps of G per round (server, or each user)")
    generator_batch_size: int = PydField(32, ge=2, description="labels per generator step (BatchNorm needs 2)")
    generator_lr: float = PydField(3e-4, gt=0)
    generator_weight_decay: float = PydField(1e-2, ge=0)
    generator_lr_decay: float = PydField(0.98, gt=0, le=1, description="per-round decay of G's lr")
    diversity_weight: float = PydField(1.0, ge=0, description="η, the weight of L_div")


# ----- the math both modes use ----------------------------------------------------------------
def regularizer_weight(t: int, initial: float, decay: float = 0.98, floor: float = 1e-4) -> float:
    """α_t = max(floor, initial · decay^t), the reference's ``exp_lr_scheduler`` (t: zero-based round)."""
    return max(floor, initial * decay**t)


def label_weights(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w_{y,u} = cnt_u(y) / Σ_u' cnt_u'(y) from a (users × classes) count matrix.

    Returns the (classes × users) weights, zero for labels no user holds, and
    the labels some user holds (the ones G is trained on; the reference's
    ``qualified_labels``).
    """
    counts = counts.float().clamp_min(0)
    totals = counts.sum(dim=0)
    weights = torch.where(totals > 0, counts / totals.clamp_min(1e-12), torch.zeros_like(counts)).T
    return weights.contiguous(), torch.nonzero(totals > 0).flatten()


def teacher_loss(heads: Sequence[nn.Module], features: torch.Tensor, labels: torch.Tensor,
                 weights: torch.Tensor) -> torch.Tensor:
    """Σ_u mean_i w_{y_i,u} · CE(h_u(features_i), y_i); ``weights`` is (classes × users)."""
    total = features.new_zeros(())
    for u, head in enumerate(heads):
        ce = F.cross_entropy(head(features), labels, reduction="none")
        total = total + (weights[labels, u] * ce).mean()
    return total


def fit_generator(generator: ConditionalGenerator, optimizer: torch.optim.Optimizer, heads: Sequence[nn.Module],
                  weights: torch.Tensor, labels: torch.Tensor, config: FedGenConfig) -> None:
    """``generator_steps`` steps of ``optimizer`` on teacher_loss + η · L_div, y uniform over ``labels``.

    The server's L_G against every head (reference mode), or one user's share of it against its own head
    (private mode): the heads are frozen, only G moves.
    """
    generator.train()
    for _ in range(config.generator_steps):
        y = labels[torch.randint(len(labels), (config.generator_batch_size,))]
        z, eps = generator(y)
        loss = teacher_loss(heads, z, y, weights) + config.diversity_weight * diversity_loss(eps, z)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def head_of(model: nn.Module) -> nn.Module:
    """The linear head of a zoo model."""
    # A DP trainer may hand the closure a wrapped model (Opacus keeps the original as ``_module``);
    # calling the wrapped submodule still runs the wrapper's hooks.
    return cast(nn.Module, getattr(model, "_module", model).head)


# ----- the users' replica of the global state --------------------------------------------------
class FedGenReplica(Replica):
    """A user's copy of the global state: the averaged head (or model), G and the label prior m."""

    def __init__(self, shared: nn.Module, generator: ConditionalGenerator, num_classes: int) -> None:
        self.shared = shared
        self.generator = generator
        self.label_prior = torch.zeros(num_classes)
        self.prior_rounds = 0
        self.version = 0

    def observe_histogram(self, mean_histogram: torch.Tensor) -> None:
        """m ← running average of the per-round mean histograms."""
        # Clamping is post-processing of a (possibly DP-noised) histogram: counts are never negative.
        m = mean_histogram.float().clamp_min(0)
        self.label_prior = (self.label_prior * self.prior_rounds + m) / (self.prior_rounds + 1)
        self.prior_rounds += 1

    def state_dict(self) -> dict[str, Any]:
        return {"shared": self.shared.state_dict(), "generator": self.generator.state_dict(),
                "label_prior": self.label_prior.clone(), "prior_rounds": self.prior_rounds, "version": self.version}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.shared.load_state_dict(state["shared"])
        self.generator.load_state_dict(state["generator"])
        self.label_prior = state["label_prior"].clone()
        self.prior_rounds = int(state["prior_rounds"])
        self.version = int(state["version"])


class FedGen(Protocol):
    """What both modes do; each mode's class adds who trains G (its uplink, ``client_step``, ``server_step``,
    ``apply_update`` and checkpoint). ``FedGen(config, ctx)``, the registry's entry, builds the class of
    ``config.mode``."""

    name = "fedgen"
    summary = "shared heads plus a generator of latent features that regularises every user (data-free KD)"
    paper = "Zhu, Hong & Zhou, ICML 2021, arXiv:2105.10056"
    Config = FedGenConfig
    #: The ``fedgen.mode`` a subclass runs (``class FedGenPrivate(FedGen, mode="private")``), and the
    #: subclasses by mode.
    mode: ClassVar[str]
    modes: ClassVar[dict[str, type[FedGen]]] = {}
    #: What ``head_aggregation: auto`` resolves to in the mode.
    auto_head_weighting: ClassVar[Literal["weighted_mean", "mean"]]
    # ``uplink``: each mode's own (``uplink_schema`` in its file), declared by an instance from its config,
    # which is what the runtime checks.
    # Start of a round: |S|, and the updates of the global state the user missed.
    start = Schema("fedgen_start", updates=Field(aggregatable=True, private=False,
                                                 description="missed fedgen_aggregate fields, oldest first"))
    # End of a round: what every user applies to its replica (sealed under CKKS until the user opens it).
    downlink = Schema(
        "fedgen_aggregate",
        shared=Field(aggregatable=True, private=False, description="the averaged head (or model)"),
        generator_update=Field(aggregatable=True, private=False, description="private mode: mean Δθ_G"),
        generator=Field(aggregatable=False, private=False,
                        description="reference mode: θ_G as the server trained it, parameters and BN statistics"),
        label_counts=Field(aggregatable=True, private=False, description="mean label histogram of the round"),
    )

    config: FedGenConfig

    def __init_subclass__(cls, mode: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if mode is not None:  # a mode's class; a subclass of it (a test's, say) keeps its mode
            cls.mode = mode
            FedGen.modes[mode] = cls

    def __new__(cls, *args: Any, **kwargs: Any) -> FedGen:
        if cls is FedGen:  # get_protocol("fedgen")(config, ctx): the class of the configured mode
            config = args[0] if args else kwargs["config"]
            cls = FedGen.modes[config.mode]
        # A copy (or unpickling) calls the mode's class with no arguments.
        return super().__new__(cls)

    def __init__(self, config: FedGenConfig, ctx: FederationContext) -> None:
        super().__init__(config, ctx)
        if config.mode != self.mode:
            raise ValueError(f"{type(self).__name__} runs fedgen.mode {self.mode!r}, not {config.mode!r}")
        self.classes = torch.as_tensor(sorted(ctx.split.private_classes), dtype=torch.long)
        self.latent_dim = self.initial_generator().latent_dim
        self.log = UpdateLog()
        self._sampled: list[str] = []
        # The public architecture of the shared part: the first participant's model (head or whole).
        self._shared_model_name: str | None = None

    @property
    def head_weighting(self) -> Literal["weighted_mean", "mean"]:
        if self.config.head_aggregation != "auto":
            return self.config.head_aggregation
        return self.auto_head_weighting

    def uplink_metadata(self) -> dict[str, Field]:
        meta = {"replica_version": Field(private=False, description="the global update the user built on")}
        if self.head_weighting == "weighted_mean":
            meta["num_samples"] = Field(private=True, description=(
                "the user's exact number of training records, which weights its head (fedgen.head_aggregation: "
                "mean sends none)"))
        return meta

    def weighted_aggregation(self) -> str | None:
        if self.head_weighting == "weighted_mean":
            return ("each user's record count (fedgen.head_aggregation resolves to 'weighted_mean' in this mode; "
                    "use fedgen.head_aggregation: mean)")
        return None

    # ----- set-up ----------------------------------------------------------------------
    def _new_generator(self) -> ConditionalGenerator:
        cfg = self.config
        return ConditionalGenerator(self.ctx.num_classes, noise_dim=cfg.noise_dim, hidden_dim=cfg.hidden_dim,
                                    output_activation=cfg.generator_output)

    def initial_generator(self) -> ConditionalGenerator:
        """G before round 1, from the run seed: the server (reference mode) and every user build the same one."""
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.ctx.seed, "init", "fedgen-generator"))
            return self._new_generator()

    def initial_shared(self) -> nn.Module:
        """The shared head (or model) before round 1, as the reference's server initialises it."""
        assert self._shared_model_name is not None
        # Whole-model sharing starts from FedAvg's global initialisation (same derived seed), so a FedGen row
        # and a FedAvg row of one seed are paired: they differ in the generator only.
        purpose = "fedavg-global" if self.config.share == "full" else "fedgen-global"
        init = self.ctx.build_model(self._shared_model_name, purpose=purpose)
        return init if self.config.share == "full" else head_of(init)

    @staticmethod
    def replica(party: Party) -> FedGenReplica:
        return party.state["replica"]

    def _generator_from(self, flat: torch.Tensor) -> ConditionalGenerator:
        # A user's own copy of the broadcast G; the architecture is public, so it never needs seeding. Its
        # initial values are overwritten, so building it must not draw from the training stream (with the
        # generator terms off, a round then trains exactly as FedAvg's would).
        with torch.random.fork_rng():
            generator = self._new_generator()
        load_flat_parameters(generator, flat)
        return generator

    def released_label_counts(self, party: Party) -> torch.Tensor:
        """cnt_u as the user releases it: computed once (its data do not change) through its injected
        trainer, which under record-level DP adds Gaussian noise at sensitivity 1 and books the release.
        Both the uplinked histogram and ω_u in the generator update use this one release, so neither
        reads the raw counts again (post-processing). Counts are clamped at 0, also post-processing."""
        if self.config.label_counts == "none":
            return party.train.label_counts(self.ctx.num_classes).float()  # used only where ω = 1
        if "released_label_counts" not in party.state:
            # No generator from the run's seed: a DP trainer draws the noise from OS entropy itself.
            released = party.trainer.label_histogram(party.train.y, self.ctx.num_classes)
            party.state["released_label_counts"] = released.float().clamp_min(0)
        return party.state["released_label_counts"]

    def private_histogram_releases(self, party: Party) -> int:
        return 1 if self.config.label_counts == "histogram" else 0

    def validate_participants(self, parties: Sequence[Party]) -> None:
        self._shared_model_name = min(parties, key=lambda p: p.index).model_name
        models = sorted({p.model_name for p in parties})
        if self.config.share == "full" and len(models) != 1:
            raise ProtocolSetupError(
                f"fedgen.share=full averages whole models and needs every participant to use the same model; "
                f"participants use {', '.join(models)}. Use fedgen.share=head for heterogeneous models."
            )

    def steps_per_round(self, party: Party) -> int:
        """The user's local steps in one round: ``local_steps``, or ``local_epochs`` passes over its data."""
        cfg = self.config
        if cfg.local_epochs is None:
            return cfg.local_steps
        return cfg.local_epochs * -(-party.num_samples // cfg.batch_size)

    def regularised_steps(self, rnd: int, total: int) -> int:
        """How many of the round's ``total`` steps carry the generator terms: the first ``early_stop``
        (the reference's ``epoch < early_stop``), none in round 1 or when both terms are off."""
        cfg = self.config
        if rnd <= 1 or (cfg.generative_alpha <= 0 and cfg.generative_beta <= 0):
            return 0
        return total if cfg.early_stop is None else min(cfg.early_stop, total)

    def private_training_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        # Exactly what client_step trains: the regularised and the plain steps of a round add up to this.
        return [(self.config.batch_size, None, self.ctx.rounds * self.steps_per_round(party))]

    def setup_party(self, party: Party) -> None:
        cfg, ctx = self.config, self.ctx
        model = ctx.build_model(party.model_name, purpose=party.id)
        head = getattr(model, "head", None)
        if not isinstance(head, nn.Linear) or head.in_features != self.latent_dim:
            raise ProtocolSetupError(
                f"fedgen needs every model to end in a linear head on {self.latent_dim} latent features; "
                f"{party.id}'s model {party.model_name!r} does not"
            )
        party.model = model
        # Every user starts from the initial head (or model) and G, as if the reference's round 1 broadcast.
        party.state["replica"] = FedGenReplica(self.initial_shared(), self.initial_generator(), ctx.num_classes)
        # Default: plain SGD without momentum, the reference's pFedIBOptimizer; adam for parity with other rows.
        party.state["private_opt"] = make_optimizer(model, kind=cfg.optimizer, lr=party.learning_rate(cfg.lr),
                                                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def warm_start_refusal(self) -> str | None:
        if self.config.share == "full":
            return ("fedgen.share = 'full' loads the averaged whole model at the start of every round, which "
                    "overwrites a warm-started model; use training.warm_start=false")
        # share: head keeps the extractor but replaces its head by the average of heads fitted to other
        # extractors: on Fashion-MNIST A1 the warm-started users' own models fell from 64.4 to 34.5 in two rounds.
        return ("fedgen.share = 'head' replaces every user's head by the averaged head at the start of every "
                "round, which a warm-started extractor was not fitted to; use training.warm_start=false")

    def setup_server(self, parties: Sequence[Party]) -> None:
        for party in parties:
            self.log.register(party.id)

    def _shared_part(self, model: nn.Module) -> nn.Module:
        return model if self.config.share == "full" else head_of(model)

    def _head_in(self, shared: nn.Module) -> nn.Module:
        """The head within a shared part (the part itself, or the whole model's head)."""
        return head_of(shared) if self.config.share == "full" else shared

    # ----- step 1: |S|, and the updates a user missed ---------------------------------------
    def open_round(self, rnd: int, sampled: Sequence[str]) -> Downlink:
        self._sampled = list(sampled)
        out: dict[str, Message | list[Message]] = {}
        for pid in sampled:
            # Users scale their share of L_G by |S| (public: the runtime's sample size).
            msg = Message(sender=AGGREGATOR, receiver=pid, run_id=self.ctx.run_id, round=rnd, kind=self.start.kind,
                          meta={"num_sampled": len(sampled)})
            out[pid] = attach_updates(msg, self.log.missed(pid))
        self.log.delivered(sampled)
        return out

    # ----- step 2: local training -----------------------------------------------------------
    def available_labels(self, prior: torch.Tensor) -> torch.Tensor:
        """Labels ŷ is drawn from: those the label histogram shows, or every class while it is unknown."""
        if self.config.label_counts == "none" or not bool((prior[self.classes] > 0).any()):
            return self.classes
        return self.classes[prior[self.classes] > 0]

    def user_loss(self, generator: ConditionalGenerator, available: torch.Tensor, rnd: int) -> BatchLoss:
        """The user's per-batch loss on private records at round ``rnd`` (plain CE in round 1).

        CE(f(x), y) + β_t·KL(p_h(G(y)) ‖ p_f(x)); the α_t term on generated features has no
        private input and is :meth:`generated_loss`, handed to the trainer separately.
        """
        cfg = self.config
        if rnd <= 1:
            return cross_entropy_loss
        t = rnd - 1  # the reference's zero-based glob_iter
        # A zero initial weight switches its term off (the reference's floor would keep 1e-4 of it).
        beta = regularizer_weight(t, cfg.generative_beta, cfg.generative_decay, cfg.generative_floor) \
            if cfg.generative_beta > 0 else 0.0
        generator.eval()  # users only sample from G (running BN statistics); it is never trained here

        def loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(x)
            head = head_of(model)
            total = F.cross_entropy(logits, y)
            if beta > 0:
                with torch.no_grad():
                    target = head(generator(y)[0])  # the head's posterior on a feature of the same label
                total = total + beta * kl_distillation(logits, target)
            return total

        return loss

    def generated_loss(self, generator: ConditionalGenerator, available: torch.Tensor,
                       rnd: int) -> Callable[[nn.Module], torch.Tensor] | None:
        """α_t · CE(h(G(ŷ)), ŷ): the head on *generated* features, a term with no private input.

        Handed to the trainer as a public term, so a DP trainer adds its gradient after
        clipping and noising the private one.
        """
        cfg = self.config
        if rnd <= 1 or cfg.generative_alpha <= 0:
            return None
        alpha = regularizer_weight(rnd - 1, cfg.generative_alpha, cfg.generative_decay, cfg.generative_floor)
        # The reference balances the generated batch against the real one by their nominal sizes.
        gen_ratio = cfg.gen_batch_size / cfg.batch_size
        generator.eval()

        def loss(model: nn.Module) -> torch.Tensor:
            y_hat = available[torch.randint(len(available), (cfg.gen_batch_size,))]
            with torch.no_grad():
                z_hat, _ = generator(y_hat)
            return gen_ratio * alpha * F.cross_entropy(head_of(model)(z_hat), y_hat)

        return loss

    def train_locally(self, party: Party, down: Message, rnd: int) -> ConditionalGenerator:
        """Step 2: catch the replica up with ``down``, load the averaged head (or model), then the round's
        local steps. Returns the user's copy of G as the replica holds it (the generator terms sample it)."""
        cfg = self.config
        model = party.model
        assert model is not None
        replica = self.replica(party)
        replica.catch_up(read_updates(down), self.apply_update, party.id)
        load_flat_parameters(self._shared_part(model), flat_parameters(replica.shared))
        generator = self._generator_from(flat_parameters(replica.generator))

        opt = party.state["private_opt"]
        for group in opt.param_groups:
            group["lr"] = party.learning_rate(cfg.lr) * cfg.lr_decay ** (rnd - 1)
        # The reference's early_stop: the generator terms ride on the round's first steps only, the rest
        # are plain CE. Two trainer calls whose steps add up to the plan (the second reshuffles).
        total = self.steps_per_round(party)
        regularised = self.regularised_steps(rnd, total)
        available = self.available_labels(replica.label_prior)
        if regularised > 0:
            party.trainer.fit(model, opt, party.train.x, party.train.y, batch_size=cfg.batch_size,
                              steps=regularised, batch_loss=self.user_loss(generator, available, rnd),
                              public_loss=self.generated_loss(generator, available, rnd),
                              max_grad_norm=self.ctx.training.max_grad_norm, payload="local_training")
        if total > regularised:
            party.trainer.fit(model, opt, party.train.x, party.train.y, batch_size=cfg.batch_size,
                              steps=total - regularised, batch_loss=cross_entropy_loss,
                              max_grad_norm=self.ctx.training.max_grad_norm, payload="local_training")
        return generator

    def shared_payload(self, party: Party, counts: torch.Tensor) -> dict[str, torch.Tensor]:
        """The uplink fields of both modes: the trained head (or model), and the released label counts."""
        assert party.model is not None
        payload = {"shared": flat_parameters(self._shared_part(party.model))}
        if self.config.label_counts == "histogram":
            payload["label_counts"] = counts
        return payload

    def reply_with_version(self, party: Party, rnd: int, payload: dict[str, torch.Tensor]) -> Message:
        """The uplink, with the global update the user built on (the server sends again whatever it lost)."""
        msg = self.reply(party, rnd, **payload).with_meta(replica_version=self.replica(party).version)
        if self.head_weighting == "weighted_mean":
            # The count sets the head's weight, so it leaves in the clear (declared in uplink_metadata, and
            # refused under DP).
            msg = msg.with_meta(num_samples=party.num_samples)
        return msg

    # ----- steps 3-4: after the mode's generator field, the server averages, every user applies ---------
    def finish_round(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator,
                     fields: dict[str, Any]) -> Downlink:
        """``fields`` (the mode's G) plus the mean histogram and the averaged head (or model), logged as the
        round's update and sent to every sampled user with whatever else it lacks."""
        if self.config.label_counts == "histogram":
            fields["label_counts"] = aggregator.mean(replies, "label_counts")
        if self.head_weighting == "weighted_mean":
            fields["shared"] = aggregator.weighted_mean(replies, "shared",
                                                        [float(r.meta["num_samples"]) for r in replies])
        else:
            fields["shared"] = aggregator.mean(replies, "shared")
        for reply in replies:
            self.log.acknowledge(reply.sender, reply.meta.get("replica_version"))
        self.log.record(rnd, fields)
        return send_updates(self.broadcast(rnd), self.log, self._sampled)

    def client_update(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        self.replica(party).catch_up(read_updates(only_message(inbox, self.downlink.kind)), self.apply_update,
                                     party.id)

    @abstractmethod
    def apply_update(self, replica: FedGenReplica, update: GlobalUpdate) -> None:
        """Apply one round's update to a user's replica: the mode's G, then :meth:`apply_prior_and_head`."""

    def apply_prior_and_head(self, replica: FedGenReplica, update: GlobalUpdate) -> None:
        """m ← the running average of the mean histograms; the head (or model) ← the averaged one."""
        if self.config.label_counts == "histogram":
            replica.observe_histogram(update.fields["label_counts"])
        load_flat_parameters(replica.shared, update.fields["shared"])

    # ----- evaluation: on the user's own replica ---------------------------------------------
    def _global_model_of(self, party: Party) -> nn.Module:
        assert party.model is not None
        shared = self.replica(party).shared
        if self.config.share == "full":
            return shared
        return nn.Sequential(cast(nn.Module, party.model.extractor), shared)

    def evaluate(self, party: Party) -> dict[str, float]:
        ctx = self.ctx
        assert party.model is not None
        return {
            "accuracy": accuracy(self._global_model_of(party), ctx.test_x, ctx.test_y, classes=ctx.eval_classes),
            "local_accuracy": accuracy(party.model, ctx.test_x, ctx.test_y, classes=ctx.eval_classes),
            "generator_accuracy": self.generator_accuracy(self.replica(party)),
        }

    def generator_accuracy(self, replica: FedGenReplica) -> float:
        """How often the averaged head classifies G(ε, y) as y (a diagnostic of G)."""
        head = self._head_in(replica.shared)
        generator = replica.generator
        labels = self.classes.repeat_interleave(32)
        eps = generator.sample_noise(len(labels), generator=self.ctx.generator("fedgen-eval-noise"))
        generator.eval()
        with torch.no_grad():
            logits = head(generator(labels, eps)[0])
        pred = self.classes[logits[:, self.classes].argmax(dim=1)]
        return float((pred == labels).float().mean())
