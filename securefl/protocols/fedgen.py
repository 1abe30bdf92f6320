"""FedGen: data-free knowledge distillation through a generator of latent features.

Zhu, Hong & Zhou, "Data-Free Knowledge Distillation for Heterogeneous
Federated Learning", ICML 2021, arXiv:2105.10056 (reference code:
``zhuangdizhu/FedGen``: ``servers/serverpFedGen.py``, ``users/userpFedGen.py``,
``trainmodel/generator.py``, ``utils/model_config.py``).

Every user's classifier is a feature extractor g_k followed by a linear head
h (``ZooModel(extractor, head)``; all zoo models end in ``LATENT_DIM = 32``
features, so extractors may differ while heads are interchangeable). FedGen
learns, without any data, a conditional generator G(ε, y) of latent features
(:mod:`securefl.models.generator`) that the users' heads agree to classify as
y: it distils the ensemble's knowledge of p(y | z) into G, and G hands that
knowledge back to every user as an inductive bias. Per round, as in the paper
(Algorithm 1) and its reference code:

1. the server selects users (the runtime's ``run.participation``; the
   reference selects 10 of 20); each holds the shared parameters (the
   averaged head) and G (see "Who holds the global state" below; the
   reference's server broadcasts them);
2. each user loads the head and trains its model for ``local_steps`` = 20
   *steps* of batch 32 (the reference's ``--local_epochs 20`` counts steps:
   its loop draws one batch per "epoch"; ``local_epochs`` gives FedAvg's
   passes instead), plain SGD with lr 0.01 (decayed 0.99 per round, the
   reference's user scheduler; ``optimizer: adam`` for parity with other
   rows), on

       CE(f(x), y) + α_t · (B_gen / B) · CE(h(G(ε, ŷ)), ŷ) + β_t · KL(p_h(G(ε, y)) ‖ p_f(x)),

   where ŷ is drawn uniformly from the available labels (B_gen = 32 of them),
   α_t = β_t = max(1e-4, 10 · 0.98^t) with t the zero-based round, and no
   regulariser in the first round (G is still untrained). As in the
   reference (``epoch < early_stop``, 20), only the first ``early_stop``
   steps of a round carry the two generator terms; later steps are plain
   CE (with the default 20 steps: all of them). The first two
   terms are the paper's user objective; the third, a KL from the head's
   posterior on a generated feature of the *same* label to the model's
   posterior on the real record, is in the reference code only
   (``generative_beta``); ``generative_beta: 0`` gives the paper's form, and
   ``generative_alpha: 0`` with it gives plain head averaging (FedAvg).
   ŷ's "available labels" are those the broadcast label histogram shows (all
   classes while none is known; the reference uses the union of all users'
   labels). Training goes through ``party.trainer.fit(steps=...)``, which
   reshuffles every pass (the reference's loader was first unshuffled, its
   issue #7; after the authors' fix they report FedAvg 90.7 ± 1.2 against
   FedGen 95.7 ± 0.2 on MNIST) and cycles, so a user with fewer records than
   a batch trains without crashing (the reference's ``drop_last=True``
   loader raises ``StopIteration`` there);
3. the server trains G for 50 Adam steps (lr 3e-4 decayed 0.98 per round,
   weight decay 1e-2, batch 32) on

       L_G = Σ_u mean_i w_{y_i,u} · CE(h_u(G(ε_i, y_i)), y_i) + η · L_div,
       w_{y,u} = cnt_u(y) / Σ_u' cnt_u'(y),   η = 1,

   with y_i uniform over the labels some selected user holds, and L_div the
   reference's diversity loss (:func:`securefl.models.generator.diversity_loss`).
   cnt_u(y) is the user's label histogram; the reference counts the labels
   of the batches it drew this round, plus one (nearly proportional, since
   20 steps cycle over the silo). Its adversarial "student" term
   (``ensemble_beta``) is 0 for MNIST and is not implemented;
4. the server averages the heads, weighted by sample counts.

Two modes (``fedgen.mode``):

- ``reference``: step 3 as above. The server needs every selected user's
  head and label counts *individually and in the clear*; the uplink declares
  them ``aggregatable=False``, so a secure-aggregation layer must refuse this
  mode before round 1 (:attr:`FedGen.secure_aggregation_note` says why). Plaintext only.
- ``private`` (the default; the spec requires it): no individual head ever
  reaches the server. The server broadcasts G; each user computes a local
  generator update against its *own* head: ``generator_steps`` Adam steps
  (same lr, decay and weight decay as the server's) on its share of L_G,

       L_u = mean_i ω_u(y_i) · CE(h_u(G(ε_i, y_i)), y_i) + η · L_div,
       ω_u(y) = |S| · w_{y,u} = cnt_u(y) / max(m(y), cnt_u(y) / |S|),

  where m(y) is the server's broadcast estimate of the *mean* label
  histogram of the sampled users, so that mean_u L_u = L_G (the cap keeps a
  user's share w ≤ 1 when m is stale or DP-noised). It sends Δθ_G; the
  server applies θ_G ← θ_G + mean_u Δθ_G,u. *Mean, not sum*: with one SGD
  step per user, mean_u Δ_u is exactly one step on L_G (the |S| is folded
  into ω), while with the local Adam steps each Δ_u has the size of a whole
  local optimisation, so a sum would grow with the number of users. The
  number sampled is public, so a secure aggregator computes the mean as its
  sum divided by |S|. The heads are averaged unweighted here (``head_aggregation:
  auto``; the reference weights by sample counts): a masking layer pre-weights a
  whole message with one weight, and the generator update and histogram must
  be plain means. Label counts go up as an aggregatable histogram (a DP
  layer noises it with sensitivity 1 per record); m is the running average
  of the per-round mean histograms (an unbiased estimate of the population's
  mean histogram; exact under full participation), which is one round stale
  by construction. ``label_counts: none`` sends no counts
  at all and weights users uniformly (ω = 1, ŷ uniform over all classes),
  as it does in round 1 before any histogram is known. Every uplink field
  (shared head, generator update, histogram) is aggregatable, and the
  server reads the replies only through the aggregator and never computes
  on the means: it broadcasts them as the aggregator returned them.

Who holds the global state: the users, never the server (in private mode).
Each user keeps a replica (:class:`FedGenReplica`: the averaged head, G and
m) and applies every round's means to it: θ_G ← θ_G + mean_u Δθ_G,u, the
head ← the mean head, m ← the running average. Applying is deterministic, so
all replicas are identical; a user that sat out some rounds receives the
updates it missed, in order, before it trains again. So the same code runs
in plaintext, under pairwise masking (the server learns the means) and under
CKKS (the means stay sealed until a user's inbound layer opens them). In
reference mode the server keeps and trains G itself and sends θ_G in the
clear; the replicas load it.

Where privacy attaches (the layers do it; this file only declares fields):
DP-SGD in the users' local training (the generated-feature terms use no
private record); participant-level clip-and-noise of ``generator_update``
(and of ``shared``); at record level, ``label_counts`` is released once with
the Gaussian mechanism at sensitivity 1 by the injected trainer
(:meth:`released_label_counts`), and ω_u in the generator update reads that
release, not the raw counts, so what leaves a user is post-processing of
DP-SGD and of that one histogram release.

What is shared: with heterogeneous extractors only the head and G cross the
wire (``share: head``, always available). With identical models the
reference averages whole models; ``share: full`` does that and is refused
for mixed architectures.

``accuracy`` is the user's own extractor with the averaged head (``share: head``) / the averaged whole model (``share: full``).

Homogeneous full sharing (the paper's own setting): every user the same
model, ``share: full``, in either mode; the warm start is refused there
(every round overwrites the model). With ``generative_alpha: 0`` and
``generative_beta: 0`` it is FedAvg: in private mode the models are averaged
uniformly (``fedavg.weighting: uniform``), in reference mode by sample counts
(FedAvg's default), or ``head_aggregation`` picks either; the same schedule
needs ``optimizer``/``lr``/``weight_decay``/``batch_size`` as ``training:``,
``lr_decay: 1`` and ``local_epochs: 1`` (``training.local_epochs``). Whole-model
sharing starts from FedAvg's initial global model, so the two rows are paired.

Evaluation (``accuracy``): the reference evaluates, at the start of each
round, the global model each user has just received. The heterogeneous
analogue reported here is the user's own extractor (as it left its last
local training) with the averaged head of its replica (the current one, once
it has caught up; the server holds none). ``local_accuracy`` is the user's
model with its own locally trained head (the personalised one). Both are on
the global balanced test set, not per-user test splits as in the
reference. ``generator_accuracy``, how often the replica's head classifies
G(ε, y) as y, is a diagnostic of the user's copy of G.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from typing import Any, Literal, cast

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


def _head_of(model: nn.Module) -> nn.Module:
    # A DP trainer may hand the closure a wrapped model (Opacus keeps the original as ``_module``);
    # calling the wrapped submodule still runs the wrapper's hooks.
    return cast(nn.Module, getattr(model, "_module", model).head)


def _uplink_schema(config: FedGenConfig) -> Schema:
    if config.mode == "reference":
        fields = {"shared": Field(aggregatable=False, description=(
            "the user's head (or model) in the clear: the server trains G against each one individually"))}
        if config.label_counts == "histogram":
            fields["label_counts"] = Field(aggregatable=False, description="the user's label counts, used individually")
        return Schema("fedgen_reference_update", **fields)
    fields = {
        "shared": Field(aggregatable=True, description="the trained head (or model), flattened; only averaged"),
        "generator_update": Field(aggregatable=True, description="Δθ_G against the user's own head; only averaged"),
    }
    if config.label_counts == "histogram":
        fields["label_counts"] = Field(aggregatable=True, description="label histogram, sensitivity 1 per record")
    return Schema("fedgen_update", **fields)


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
    name = "fedgen"
    summary = "shared heads plus a generator of latent features that regularises every user (data-free KD)"
    paper = "Zhu, Hong & Zhou, ICML 2021, arXiv:2105.10056"
    Config = FedGenConfig
    # The class-level schema is the default config's (private mode, histogram); an instance
    # declares the one of its own config (see ``__init__``), which is what the runtime checks.
    uplink = _uplink_schema(FedGenConfig.model_validate({}))
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

    def __init__(self, config: FedGenConfig, ctx: FederationContext) -> None:
        super().__init__(config, ctx)
        self.uplink = _uplink_schema(config)  # type: ignore[misc]
        self.classes = torch.as_tensor(sorted(ctx.split.private_classes), dtype=torch.long)
        self.latent_dim = self.initial_generator().latent_dim
        # Reference mode: the server trains G itself, against the users' heads in the clear. Private
        # mode: the server holds no G (nor head, nor prior); the users hold replicas (FedGenReplica).
        self.generator: ConditionalGenerator | None = None
        self.generator_opt: torch.optim.Optimizer | None = None
        if config.mode == "reference":
            self.generator = self.initial_generator()
            # The reference keeps one Adam for G across rounds (lr decayed by an ExponentialLR).
            self.generator_opt = torch.optim.Adam(self.generator.parameters(), lr=config.generator_lr,
                                                  weight_decay=config.generator_weight_decay)
        self.generator_rounds = 0
        self.log = UpdateLog()
        self._sampled: list[str] = []
        # The public architecture of the shared part: the first participant's model (head or whole).
        self._shared_model_name: str | None = None
        self._shared_template: nn.Module | None = None

    @property
    def secure_aggregation_note(self) -> str:
        """Why this configuration cannot run under secure aggregation ("" when it can).

        The declaration itself is the uplink schema: in reference mode the head
        and the label counts are private fields that are not aggregatable, which
        a secure-aggregation layer refuses before round 1; this note says why.
        """
        if self.config.mode == "reference":
            return ("fedgen mode 'reference' trains the generator on the server against every user's head "
                    "and label counts individually, so they must arrive in the clear; use fedgen.mode=private")
        return ""

    @property
    def head_weighting(self) -> Literal["weighted_mean", "mean"]:
        if self.config.head_aggregation != "auto":
            return self.config.head_aggregation
        return "weighted_mean" if self.config.mode == "reference" else "mean"

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
        return init if self.config.share == "full" else _head_of(init)

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
        return model if self.config.share == "full" else _head_of(model)

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

    # ----- step 2: local training (and, in private mode, the local generator update) ---
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
            head = _head_of(model)
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
            return gen_ratio * alpha * F.cross_entropy(_head_of(model)(z_hat), y_hat)

        return loss

    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message:
        cfg = self.config
        model = party.model
        assert model is not None
        down = only_message(inbox, self.start.kind)
        replica = self.replica(party)
        replica.catch_up(read_updates(down), self.apply_update, party.id)
        load_flat_parameters(self._shared_part(model), flat_parameters(replica.shared))
        generator_flat = flat_parameters(replica.generator)
        prior = replica.label_prior.clone()
        generator = self._generator_from(generator_flat)

        opt = party.state["private_opt"]
        for group in opt.param_groups:
            group["lr"] = party.learning_rate(cfg.lr) * cfg.lr_decay ** (rnd - 1)
        # The reference's early_stop: the generator terms ride on the round's first steps only, the rest
        # are plain CE. Two trainer calls whose steps add up to the plan (the second reshuffles).
        total = self.steps_per_round(party)
        regularised = self.regularised_steps(rnd, total)
        available = self.available_labels(prior)
        if regularised > 0:
            party.trainer.fit(model, opt, party.train.x, party.train.y, batch_size=cfg.batch_size,
                              steps=regularised, batch_loss=self.user_loss(generator, available, rnd),
                              public_loss=self.generated_loss(generator, available, rnd),
                              max_grad_norm=self.ctx.training.max_grad_norm, payload="local_training")
        if total > regularised:
            party.trainer.fit(model, opt, party.train.x, party.train.y, batch_size=cfg.batch_size,
                              steps=total - regularised, batch_loss=cross_entropy_loss,
                              max_grad_norm=self.ctx.training.max_grad_norm, payload="local_training")

        counts = self.released_label_counts(party)
        payload: dict[str, torch.Tensor] = {"shared": flat_parameters(self._shared_part(model))}
        if cfg.label_counts == "histogram":
            payload["label_counts"] = counts
        if cfg.mode == "private":
            n_sampled = int(down.meta.get("num_sampled", 1))
            updated = self.local_generator_update(generator, _head_of(model), counts, prior, n_sampled, rnd)
            payload["generator_update"] = flat_parameters(updated) - generator_flat
        # Which global update this user built on: the server sends again whatever it lost.
        msg = self.reply(party, rnd, **payload).with_meta(replica_version=replica.version)
        if self.head_weighting == "weighted_mean":
            # The count sets the head's weight, so it leaves in the clear (declared in uplink_metadata, and
            # refused under DP).
            msg = msg.with_meta(num_samples=party.num_samples)
        return msg

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
        """Private mode: a copy of G after ``generator_steps`` Adam steps on this user's share L_u of L_G.

        Touches no private record: only the user's own head and label counts.
        """
        cfg = self.config
        local = copy.deepcopy(generator)
        frozen_head = copy.deepcopy(head).requires_grad_(False)
        omega, labels = self.private_label_weights(counts, prior, n_sampled)
        opt = torch.optim.Adam(local.parameters(), lr=cfg.generator_lr * cfg.generator_lr_decay ** (rnd - 1),
                               weight_decay=cfg.generator_weight_decay)
        local.train()
        for _ in range(cfg.generator_steps):
            y = labels[torch.randint(len(labels), (cfg.generator_batch_size,))]
            z, eps = local(y)
            ce = F.cross_entropy(frozen_head(z), y, reduction="none")
            loss = (omega[y] * ce).mean() + cfg.diversity_weight * diversity_loss(eps, z)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return local

    # ----- steps 3-4: the server aggregates, every user applies -----------------------------
    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Downlink:
        cfg = self.config
        fields: dict[str, Any] = {}
        if cfg.mode == "reference":
            self._train_generator_on_heads(replies)
            assert self.generator is not None
            fields["generator"] = flat_parameters(self.generator)
        else:
            # Only the mean update (sealed under CKKS), never one user's; the users apply it.
            fields["generator_update"] = aggregator.mean(replies, "generator_update")
        if cfg.label_counts == "histogram":
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

    def apply_update(self, replica: FedGenReplica, update: GlobalUpdate) -> None:
        """θ_G ← θ_G + mean Δθ_G (private) or the server's θ_G (reference); m; the averaged head."""
        fields = update.fields
        if self.config.mode == "reference":
            load_flat_parameters(replica.generator, fields["generator"])
        else:
            load_flat_parameters(replica.generator, flat_parameters(replica.generator) + fields["generator_update"])
        if self.config.label_counts == "histogram":
            replica.observe_histogram(fields["label_counts"])
        load_flat_parameters(replica.shared, fields["shared"])

    def _train_generator_on_heads(self, replies: Sequence[Message]) -> None:
        """Reference mode: 50 Adam steps on L_G against every selected user's head (in the clear)."""
        cfg = self.config
        heads = [self._head_from(r.tensor("shared")) for r in replies]
        if cfg.label_counts == "histogram":
            weights, qualified = label_weights(torch.stack([r.tensor("label_counts") for r in replies]))
        else:
            weights = torch.full((self.ctx.num_classes, len(replies)), 1.0 / len(replies))
            qualified = self.classes  # no histogram: every class (what available_labels gives)
        self.train_generator(heads, weights, qualified)

    def train_generator(self, heads: Sequence[nn.Module], weights: torch.Tensor, labels: torch.Tensor) -> None:
        """``generator_steps`` Adam steps on L_G = teacher_loss + η · L_div, y uniform over ``labels``."""
        cfg = self.config
        assert self.generator is not None and self.generator_opt is not None, "only reference mode trains G here"
        for group in self.generator_opt.param_groups:
            group["lr"] = cfg.generator_lr * cfg.generator_lr_decay**self.generator_rounds
        self.generator.train()
        for _ in range(cfg.generator_steps):
            y = labels[torch.randint(len(labels), (cfg.generator_batch_size,))]
            z, eps = self.generator(y)
            loss = teacher_loss(heads, z, y, weights) + cfg.diversity_weight * diversity_loss(eps, z)
            self.generator_opt.zero_grad(set_to_none=True)
            loss.backward()
            self.generator_opt.step()
        self.generator_rounds += 1

    def _head_from(self, flat: torch.Tensor) -> nn.Module:
        if self._shared_template is None:
            self._shared_template = self.initial_shared()  # the public architecture; its values are overwritten
        shared = copy.deepcopy(self._shared_template)
        load_flat_parameters(shared, flat)
        head = _head_of(shared) if self.config.share == "full" else shared
        return head.requires_grad_(False)

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
        head = _head_of(replica.shared) if self.config.share == "full" else replica.shared
        generator = replica.generator
        labels = self.classes.repeat_interleave(32)
        eps = generator.sample_noise(len(labels), generator=self.ctx.generator("fedgen-eval-noise"))
        generator.eval()
        with torch.no_grad():
            logits = head(generator(labels, eps)[0])
        pred = self.classes[logits[:, self.classes].argmax(dim=1)]
        return float((pred == labels).float().mean())

    # ----- checkpointing ---------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"log": self.log.state_dict(), "generator_rounds": self.generator_rounds}
        if self.generator is not None and self.generator_opt is not None:  # reference mode's server G
            state.update(generator=self.generator.state_dict(), generator_opt=self.generator_opt.state_dict())
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.log.load_state_dict(state["log"])
        self.generator_rounds = int(state["generator_rounds"])
        if self.generator is not None and self.generator_opt is not None:
            self.generator.load_state_dict(state["generator"])
            self.generator_opt.load_state_dict(state["generator_opt"])
