"""HeteroFL: width-scaled subnetworks of one global model.

Diao, Ding & Tarokh, "HeteroFL: Computation and Communication Efficient Federated Learning for
Heterogeneous Clients", ICLR 2021 (reference code:
``diaoenmao/HeteroFL-Computation-and-Communication-Efficient-Federated-Learning-for-Heterogeneous-Clients``,
``src/fed.py`` and ``src/train_classifier_fed.py``). There is one global model; client m trains the
sub-model of rate r_m (every hidden width h becomes ceil(r_m h), ``securefl/models/heterofl.py``),
and every parameter element is averaged over the clients whose slice covers it. The participants,
never the server, hold the global model (:class:`HeteroFLReplica`), so the same code runs in
plaintext, under masking and under CKKS. The procedure, the federated sBN statistics, and what DP
refuses (``norm: bn``, ``label_split: present``) and why: ``docs/algorithms/heterofl.md``.

Paper, reference code                                  here
rates: ``fixed`` or ``dynamic`` from the proportions   ``rate_of``, ``fixed_rates``, ``dynamic_rates``
1. down: the top-left slice of every parameter         ``open_round`` (rate, missed updates),
                                                       ``submodel``, ``sub_shapes``, ``ParamLayout``
2. local training: SGD, static BN, Scaler, CE masked   ``client_step``, ``label_split``,
   to the label split; MultiStepLR over rounds         ``learning_rate``
3. up: the slice zero-padded to global coordinates     ``client_step`` (``ParamLayout.pad``)
4. new = where(count > 0, sum / count, old)            ``server_step`` (the sum), ``contributors``,
                                                       ``counts``, ``apply_update`` (every replica)
5. sBN statistics, federated                           ``_federated_sbn_statistics``,
                                                       ``client_sbn_sums``, ``channel_sums``
evaluation: global model, sub-model, "Local" metric    ``evaluate``
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Sequence
from typing import Annotated, Literal, cast

import numpy as np
import torch
from pydantic import Field as PydField
from pydantic import field_validator, model_validator
from torch import nn

from securefl.core.aggregator import Aggregator
from securefl.core.message import AGGREGATOR, BROADCAST, Message
from securefl.core.party import FederationContext, Party
from securefl.core.seeding import derive_seed
from securefl.core.training import argmax_accuracy, make_optimizer, predict_logits
from securefl.models.heterofl import (
    LEVEL_RATES,
    HeteroFLModel,
    build_heterofl_model,
    channels_per_group,
    masked_cross_entropy,
)
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
    freshest,
    load_flat_parameters,
    only_message,
    read_updates,
    send_updates,
)

_PROPORTIONS = re.compile(r"^[a-e][1-9][0-9]*(-[a-e][1-9][0-9]*)*$")

PositiveInt = Annotated[int, PydField(ge=1)]


def parse_proportions(text: str) -> list[tuple[float, int]]:
    """``"a2-b8"`` -> ``[(1.0, 2), (0.5, 8)]``: (model rate, share) per level."""
    if not _PROPORTIONS.match(text):
        raise ValueError("expected levels a-e each followed by a positive integer share, joined by '-', "
                         "e.g. 'a1-b1-c1-d1-e1' or 'a2-b8'")
    parts = [(p[0], int(p[1:])) for p in text.split("-")]
    letters = [letter for letter, _ in parts]
    if len(set(letters)) != len(letters):
        raise ValueError("each level may appear only once")
    return [(LEVEL_RATES[letter], share) for letter, share in parts]


class HeteroFLConfig(ProtocolConfig):
    """HeteroFL settings; defaults are the reference's (MNIST, conv)."""

    model: Literal["conv", "mlp"] = PydField("conv", description="width-scalable family of the global model")
    hidden_sizes: list[PositiveInt] | None = PydField(
        None, min_length=1, description="full-width hidden sizes (None: conv 64-128-256-512, mlp 256-128)")
    norm: Literal["bn", "gn"] = PydField("bn", description="static batch norm, or GroupNorm (for DP-SGD)")
    gn_channels_per_group: PositiveInt | None = PydField(
        None, description="norm: gn: channels per group, the same at every width so a slice is normalised as in "
                          "the global model; must divide every width of every level (None: their gcd)")
    scale: bool = PydField(True, description="use the Scaler (the reference's ablation switch)")
    mask: bool = PydField(True, description="mask the cross-entropy to the client's classes")
    mode: Literal["fixed", "dynamic"] = PydField("fixed", description="rates fixed per client or re-drawn per round")
    proportions: str = PydField("a1-b1-c1-d1-e1", description="shares of clients per level, e.g. 'a2-b8'")
    local_epochs: int = PydField(5, ge=1, description="local passes over the client's data per round")
    local_steps: PositiveInt | None = PydField(
        None, description="when set: exactly this many minibatch steps per round, in place of local_epochs "
                          "(an equal step budget for every client, whatever its data size)")
    batch_size: int = PydField(10, ge=1)
    lr: float = PydField(1e-2, gt=0, le=10)
    momentum: float = PydField(0.9, ge=0, lt=1)
    weight_decay: float = PydField(5e-4, ge=0)
    max_grad_norm: float | None = PydField(1.0, gt=0)
    milestones: list[PositiveInt] = PydField(default_factory=list,
                                             description="MultiStepLR: rounds after which the lr decays")
    lr_decay: float = PydField(0.1, gt=0, le=1, description="MultiStepLR factor")
    sbn_clients: Literal["all", "sampled"] = PydField(
        "all", description="whose training data the sBN statistics are summed over")
    sbn_max_records: PositiveInt | None = PydField(
        None, description="each client sums the sBN statistics over at most this many of its training records, "
                          "a fixed seeded subset (None: all of them, the reference)")
    label_split: Literal["present", "all"] = PydField(
        "present", description="a client's classes: those present in its data (the reference; public metadata, "
                               "refused under DP) or every class of the task")

    @field_validator("proportions")
    @classmethod
    def _valid_proportions(cls, value: str) -> str:
        parse_proportions(value)
        return value

    @model_validator(mode="after")
    def _groups_divide_every_width(self) -> HeteroFLConfig:
        # A config error before any model is built: the widths follow from public settings alone.
        if self.norm == "gn":
            self.group_size()
        return self

    def group_size(self) -> int:
        """GroupNorm's channels per group for the levels in use (``gn_channels_per_group`` or the widths' gcd)."""
        rates = {rate for rate, _ in parse_proportions(self.proportions)}
        return channels_per_group(self.model, self.hidden_sizes, rates, self.gn_channels_per_group)

    @field_validator("milestones")
    @classmethod
    def _increasing(cls, value: list[int]) -> list[int]:
        if any(b <= a for a, b in zip(value, value[1:], strict=False)):
            raise ValueError("milestones must be strictly increasing")
        return value


class UplinkKinds(Schema):
    """Several uplink message kinds declared together.

    ``kind`` is the per-round kind; ``fields`` is the union of all kinds'
    fields, so everything a client may release is declared in one place.
    """

    def __init__(self, main: Schema, *extra: Schema) -> None:
        fields: dict[str, Field] = {}
        for schema in (main, *extra):
            fields.update(schema.fields)
        super().__init__(main.kind, **fields)
        self.kinds = {schema.kind: schema for schema in (main, *extra)}

    def __repr__(self) -> str:
        return f"UplinkKinds({', '.join(map(repr, self.kinds.values()))})"

    def check(self, msg: Message) -> None:
        schema = self.kinds.get(msg.kind)
        if schema is None:
            raise ValueError(f"expected one of the message kinds {sorted(self.kinds)}, got {msg.kind!r}")
        schema.check(msg)


def region(shape: Sequence[int]) -> tuple[slice, ...]:
    """The top-left block of a tensor: ``W[:shape[0], :shape[1], ...]``."""
    return tuple(slice(0, n) for n in shape)


class ParamLayout:
    """Where each parameter of the global model lives in the flat, zero-padded vector.

    The layout is a function of the public architecture only, so clients and
    server agree on it without exchanging anything.
    """

    CLASSIFIER = ("classifier.weight", "classifier.bias")

    def __init__(self, global_model: HeteroFLModel) -> None:
        self.shapes = {name: tuple(p.shape) for name, p in global_model.named_parameters()}
        self.offsets: dict[str, int] = {}
        offset = 0
        for name, shape in self.shapes.items():
            self.offsets[name] = offset
            offset += math.prod(shape)
        self.numel = offset

    def _view(self, flat: torch.Tensor, name: str) -> torch.Tensor:
        start = self.offsets[name]
        return flat[start:start + math.prod(self.shapes[name])].view(self.shapes[name])

    def flatten(self, model: nn.Module) -> torch.Tensor:
        """The parameters of a global-width model as one vector."""
        return torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])

    def load(self, model: nn.Module, flat: torch.Tensor) -> None:
        with torch.no_grad():
            for name, p in model.named_parameters():
                p.copy_(self._view(flat, name))

    def slice(self, global_model: nn.Module, sub_shapes: dict[str, tuple[int, ...]]) -> torch.Tensor:
        """Step 1: the top-left slice of every global parameter, flattened in sub-model order."""
        params = dict(global_model.named_parameters())
        return torch.cat([params[name].detach()[region(shape)].reshape(-1) for name, shape in sub_shapes.items()])

    def pad(self, sub_model: nn.Module) -> torch.Tensor:
        """Step 3: a sub-model's parameters, zero-padded to global coordinates."""
        flat = torch.zeros(self.numel)
        for name, p in sub_model.named_parameters():
            self._view(flat, name)[region(p.shape)] = p.detach().float()
        return flat

    def coverage(self, sub_shapes: dict[str, tuple[int, ...]], classes: torch.Tensor) -> torch.Tensor:
        """1 where a client at these sub-shapes with these classes counts, else 0.

        Used by the client to zero what it must not send (absent classes'
        classifier rows) and by the server to count the clients per element;
        both sides compute it from public facts (rate and label split).
        """
        flat = torch.zeros(self.numel)
        for name, shape in sub_shapes.items():
            self._view(flat, name)[region(shape)] = 1.0
        absent = torch.ones(self.shapes[self.CLASSIFIER[0]][0], dtype=torch.bool)
        absent[classes] = False
        for name in self.CLASSIFIER:
            self._view(flat, name)[absent] = 0.0
        return flat


def fixed_rates(levels: Sequence[tuple[float, int]], n_clients: int, generator: torch.Generator) -> list[float]:
    """Fixed mode: shares of clients per level, then a seeded permutation of the clients.

    The reference gives ``num_users // sum(shares)`` blocks per share and the
    remainder to the last level, which with few clients (5 clients, "a2-b8")
    puts everyone at the last level; largest-remainder rounding keeps the
    proportions as close as the client count allows.
    """
    total = sum(share for _, share in levels)
    quotas = [n_clients * share / total for _, share in levels]
    counts = [math.floor(q) for q in quotas]
    by_remainder = sorted(range(len(levels)), key=lambda i: (-(quotas[i] - counts[i]), i))
    for i in by_remainder[:n_clients - sum(counts)]:
        counts[i] += 1
    rates = [rate for (rate, _), count in zip(levels, counts, strict=True) for _ in range(count)]
    order = torch.randperm(n_clients, generator=generator).tolist()
    return [rates[i] for i in order]


def dynamic_rates(levels: Sequence[tuple[float, int]], n_clients: int, generator: torch.Generator) -> list[float]:
    """Dynamic mode: every client's level drawn from the proportions (reference ``make_model_rate``)."""
    shares = torch.tensor([float(share) for _, share in levels])
    picks = torch.multinomial(shares / shares.sum(), n_clients, replacement=True, generator=generator)
    return [levels[i][0] for i in picks.tolist()]


class _StopForward(Exception):
    """Raised by a hook once the activations the sBN query needs are captured."""


@torch.no_grad()
def channel_sums(model: HeteroFLModel, layer: str, x: torch.Tensor, *, batch_size: int = 1024) -> torch.Tensor:
    """Per-channel (sum x, sum x^2, n) of the input of norm layer ``layer``, in evaluation mode.

    Evaluation mode: Scalers are the identity and earlier norm layers use
    their (already federated) statistics, as in the evaluated network.
    Returns one vector ``[sum x (C), sum x^2 (C), n (C)]``.
    """
    module = dict(model.named_modules())[layer]
    captured: list[torch.Tensor] = []

    def capture(_: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        captured.append(inputs[0])
        raise _StopForward  # nothing after this layer is needed

    channels = module.num_features  # type: ignore[union-attr]
    s1 = torch.zeros(channels, dtype=torch.float64)
    s2 = torch.zeros(channels, dtype=torch.float64)
    count = 0
    handle = module.register_forward_pre_hook(capture)
    model.eval()
    try:
        for start in range(0, len(x), batch_size):
            captured.clear()
            try:
                model(x[start:start + batch_size])
            except _StopForward:
                pass
            act = captured[0].double().transpose(0, 1).reshape(channels, -1)
            s1 += act.sum(dim=1)
            s2 += (act * act).sum(dim=1)
            count += act.shape[1]
    finally:
        handle.remove()
    return torch.cat([s1, s2, torch.full((channels,), float(count), dtype=torch.float64)])


def moments_from_sums(sums: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Mean and population variance from aggregated (sum x, sum x^2, n); None when n = 0."""
    s1, s2, n = sums.double().view(3, -1)
    if float(n.min()) <= 0:
        return None
    mean = s1 / n
    var = (s2 / n - mean * mean).clamp(min=0.0)
    return mean.float(), var.float()


class HeteroFLReplica(Replica):
    """A participant's copy of the global model and of its federated sBN statistics per level."""

    def __init__(self, model: HeteroFLModel) -> None:
        self.model = model
        self.level_stats: dict[float, dict[str, torch.Tensor]] = {}
        self.version = 0

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "level_stats": self.level_stats, "version": self.version}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.level_stats = state["level_stats"]
        self.version = int(state["version"])


def pack_statistics(level_stats: dict[float, dict[str, torch.Tensor]]) -> tuple[torch.Tensor, list[list]]:
    """Every level's sBN statistics as one vector, and its public layout ``[[rate, buffer, numel], ...]``."""
    layout = [[rate, name, int(t.numel())] for rate, stats in level_stats.items() for name, t in stats.items()]
    parts = [t.reshape(-1).float() for stats in level_stats.values() for t in stats.values()]
    return (torch.cat(parts) if parts else torch.empty(0)), layout


def unpack_statistics(flat: torch.Tensor, layout: Sequence[Sequence]) -> dict[float, dict[str, torch.Tensor]]:
    out: dict[float, dict[str, torch.Tensor]] = {}
    offset = 0
    for rate, name, numel in layout:
        out.setdefault(float(rate), {})[str(name)] = flat[offset:offset + int(numel)].clone()
        offset += int(numel)
    return out


class HeteroFL(Protocol):
    name = "heterofl"
    summary = "width-scaled slices of one global model, averaged element-wise over the clients covering them"
    paper = "Diao, Ding & Tarokh, ICLR 2021"
    Config = HeteroFLConfig
    uplink = UplinkKinds(
        Schema("padded_slice", padded_update=Field(
            aggregatable=True, description="trained slice zero-padded to global coordinates; absent classes' "
                                           "classifier rows are 0")),
        Schema("sbn_sums", sbn_sums=Field(
            aggregatable=True, description="per-channel (sum x, sum x^2, n) of one norm layer's input")),
    )
    # Start of a round: the client's rate, and the updates of the global model it missed.
    assignment = Schema("assignment", updates=Field(aggregatable=True, private=False,
                                                    description="missed global_update fields, oldest first"))
    # End of a round: what every participant applies to its replica of the global model.
    downlink = Schema(
        "global_update",
        sum=Field(aggregatable=True, private=False,
                  description="sum of the padded slices (sealed under CKKS); the per-element counts follow from "
                              "the contributors' public rates and label splits, sent beside it"),
        statistics=Field(aggregatable=False, private=False,
                         description="norm: bn only: the federated sBN statistics of every level"),
    )
    sbn_query = Schema("sbn_query", state=Field(aggregatable=False, private=False,
                                                description="sub-model parameters and the statistics so far"))

    config: HeteroFLConfig

    SBN_IN_PROCESS = ("heterofl.norm = 'bn' computes its static batch-norm statistics with a query inside "
                      "server_step that runs every client's data in the server's process; use heterofl.norm: gn")

    def __init__(self, config: HeteroFLConfig, ctx: FederationContext) -> None:
        super().__init__(config, ctx)
        if config.model == "conv" and len(ctx.input_shape) != 3:
            raise ProtocolSetupError(
                f"heterofl.model = 'conv' needs image inputs; this dataset has shape {ctx.input_shape}. "
                "Use heterofl.model: mlp")
        self.levels = parse_proportions(config.proportions)
        # The reference's global_model_rate: the global model is as wide as the widest level used.
        self.global_rate = max(rate for rate, _ in self.levels)
        self._per_group = config.group_size() if config.norm == "gn" else None
        self.layout = ParamLayout(self._blank(self.global_rate))
        if config.norm == "bn":
            self.simulation_only = self.SBN_IN_PROCESS  # type: ignore[misc]
        self.log = UpdateLog(supersedes=self.supersedes)
        self._ids: list[str] = []  # every participant, in config order (public)
        # The parties hosted in this process: the sBN query's handles on the clients (simulation only).
        self._parties: dict[str, Party] = {}
        self._sampled: list[str] = []
        self._fixed: dict[str, float] | None = None
        self._shapes: dict[float, dict[str, tuple[int, ...]]] = {}
        self._scratch: dict[float, HeteroFLModel] = {}
        self._logits: dict[tuple[bytes, float], torch.Tensor] = {}  # test logits, by model bytes and rate

    # ----- models ------------------------------------------------------------------------
    def _build(self, rate: float) -> HeteroFLModel:
        cfg = self.config
        return build_heterofl_model(cfg.model, self.ctx.input_shape, self.ctx.num_classes, hidden=cfg.hidden_sizes,
                                    rate=rate, global_rate=self.global_rate, norm=cfg.norm, scale=cfg.scale,
                                    gn_channels_per_group=self._per_group)

    def _blank(self, rate: float) -> HeteroFLModel:
        """A model of ``rate`` whose weights are about to be overwritten (built without touching the RNG)."""
        with torch.random.fork_rng():
            return self._build(rate)

    def initial_global_model(self) -> HeteroFLModel:
        """The global model before round 1, from the run seed: every participant builds the same one."""
        with torch.random.fork_rng():
            torch.manual_seed(derive_seed(self.ctx.seed, "init", "heterofl-global"))
            return self._build(self.global_rate)

    def sub_shapes(self, rate: float) -> dict[str, tuple[int, ...]]:
        if rate not in self._shapes:
            self._shapes[rate] = {name: tuple(p.shape) for name, p in self._blank(rate).named_parameters()}
        return self._shapes[rate]

    def submodel(self, replica: HeteroFLReplica, rate: float) -> HeteroFLModel:
        """The rate-``rate`` slice of a replica's global model, with that level's sBN statistics if known."""
        model = self._blank(rate)
        load_params(model, self.layout.slice(replica.model, self.sub_shapes(rate)))
        stats = replica.level_stats.get(rate)
        if stats:
            model.load_state_dict(stats, strict=False)
        return model

    @staticmethod
    def replica(party: Party) -> HeteroFLReplica:
        return party.state["replica"]

    # ----- rates -------------------------------------------------------------------------
    def rate_of(self, party_id: str, rnd: int) -> float:
        """Client ``party_id``'s model rate in round ``rnd``."""
        ids = self._ids
        if self.config.mode == "fixed":
            if self._fixed is None:
                rates = fixed_rates(self.levels, len(ids), self.ctx.generator("heterofl-levels"))
                self._fixed = dict(zip(ids, rates, strict=True))
            return self._fixed[party_id]
        rates = dynamic_rates(self.levels, len(ids), self.ctx.generator("heterofl-rates", rnd))
        return dict(zip(ids, rates, strict=True))[party_id]

    def learning_rate(self, rnd: int, base: float | None = None) -> float:
        """MultiStepLR over global rounds: round t trains at lr * decay^#{milestones < t} (``base``: a client's
        own lr in place of heterofl.lr)."""
        passed = sum(1 for m in self.config.milestones if m < rnd)
        return (self.config.lr if base is None else base) * self.config.lr_decay ** passed

    def label_split(self, party: Party) -> torch.Tensor:
        """A client's classes, sent as metadata: those present in its training data, or every class."""
        if self.config.label_split == "all":
            return torch.arange(self.ctx.num_classes)
        return torch.unique(party.train.y)

    # ----- lifecycle ---------------------------------------------------------------------
    def secure_aggregation_refusal(self) -> str | None:
        if self.config.norm == "bn":
            return ("heterofl.norm = 'bn' computes its static batch-norm statistics with a query inside "
                    "server_step whose sub-models and per-channel sums bypass the participants' layers, so "
                    "they would cross the server in the clear; use heterofl.norm: gn (GroupNorm, also the "
                    "option for DP-SGD)")
        return None

    def private_training_plan(self, party: Party) -> list[tuple[int, int | None, int | None]]:
        cfg = self.config
        if cfg.local_steps is not None:
            return [(cfg.batch_size, None, self.ctx.rounds * cfg.local_steps)]
        return [(cfg.batch_size, self.ctx.rounds * cfg.local_epochs, None)]

    def warm_start_refusal(self) -> str | None:
        return ("HeteroFL keeps no model of a client's own: every round the client slices a fresh sub-model from "
                "its replica of the global model, which would overwrite a warm-started one")

    def uplink_metadata(self) -> dict[str, Field]:
        present = self.config.label_split == "present"
        return {
            "rate": Field(private=False, description="the rate the server assigned"),
            "label_split": Field(private=present, description=(
                "the exact set of classes in the client's training data (a class held by one record exposes it; "
                "heterofl.label_split: all sends every class)" if present else "every class of the task")),
            "replica_version": Field(private=False, description="the global update the client built on"),
        }

    def releases_outside_layers(self) -> str | None:
        if self.config.norm == "bn":
            return ("the static batch-norm statistics, per-channel (sum x, sum x^2, n) of each client's raw training "
                    "data, which the server's sBN query reads in the clear (heterofl.norm = 'bn'; use "
                    "heterofl.norm: gn)")
        return None

    def record_coupling(self) -> str | None:
        if self.config.label_split == "present" and self.config.mask:
            return ("heterofl.label_split = 'present' masks every record's loss to the classes present in its "
                    "client's data: removing a class's only record changes the gradient of every other record "
                    "(use heterofl.label_split: all)")
        return None

    def validate_participants(self, parties: Sequence[Party]) -> None:
        # Rates are drawn over every participant in config order, on the server and on every node alike.
        self._ids = [p.id for p in sorted(parties, key=lambda p: p.index)]
        self._fixed = None

    def setup_server(self, parties: Sequence[Party]) -> None:
        for party in parties:
            self.log.register(party.id)

    def setup_party(self, party: Party) -> None:
        # A client trains a fresh sub-model every round (fresh optimizer, as in the reference), sliced
        # from its replica of the global model; the server holds no model.
        party.model = None
        party.state["replica"] = HeteroFLReplica(self.initial_global_model())
        self._parties[party.id] = party

    # ----- step 1: rates, and the updates a client missed ------------------------------------
    def open_round(self, rnd: int, sampled: Sequence[str]) -> Downlink:
        self._sampled = list(sampled)
        out: dict[str, Message | list[Message]] = {}
        for pid in sampled:
            msg = Message(sender=AGGREGATOR, receiver=pid, run_id=self.ctx.run_id, round=rnd,
                          kind=self.assignment.kind, meta={"rate": self.rate_of(pid, rnd)})
            out[pid] = attach_updates(msg, self.log.missed(pid))
        self.log.delivered(sampled)
        return out

    # ----- steps 2-3: local training, padded slice up ---------------------------------------
    def client_step(self, party: Party, inbox: Sequence[Message], rnd: int) -> Message:
        cfg = self.config
        down = only_message(inbox, self.assignment.kind)
        replica = self.replica(party)
        replica.catch_up(read_updates(down), self.apply_update, party.id, self.supersedes)
        rate = float(down.meta["rate"])
        model = self.submodel(replica, rate)
        classes = self.label_split(party)
        mask = classes if cfg.mask else None
        optimizer = make_optimizer(model, kind="sgd", lr=self.learning_rate(rnd, party.lr), momentum=cfg.momentum,
                                   weight_decay=cfg.weight_decay)
        # local_steps, when set, replaces the epochs (the trainer takes one or the other).
        epochs, steps = (cfg.local_epochs, None) if cfg.local_steps is None else (None, cfg.local_steps)
        party.trainer.fit(model, optimizer, party.train.x, party.train.y, batch_size=cfg.batch_size,
                          epochs=epochs, steps=steps, max_grad_norm=cfg.max_grad_norm, payload="local_training",
                          batch_loss=lambda m, xb, yb: masked_cross_entropy(m(xb), yb, mask))
        # Zero what the client does not vouch for: classifier rows of classes it never saw.
        padded = self.layout.pad(model) * self.layout.coverage(self.sub_shapes(rate), classes)
        return self.reply(party, rnd, padded_update=padded).with_meta(rate=rate, label_split=classes.tolist(),
                                                                      replica_version=replica.version)

    # ----- step 4: sum on the server, element-wise average on every replica --------------------
    def contributors(self, replies: Sequence[Message], rnd: int) -> list[dict]:
        """The public facts of every reply (the rate the server assigned, the label split), checked."""
        out = []
        for reply in replies:
            rate = self.rate_of(reply.sender, rnd)
            if float(reply.meta.get("rate", -1)) != rate:
                raise ValueError(f"reply from {reply.sender!r} claims rate {reply.meta.get('rate')}; "
                                 f"it was assigned {rate} in round {rnd}")
            classes = [int(c) for c in reply.meta["label_split"]]
            if classes and (min(classes) < 0 or max(classes) >= self.ctx.num_classes):
                raise ValueError(f"reply from {reply.sender!r}: label split {classes} outside the classes")
            out.append({"rate": rate, "label_split": classes})
        return out

    def counts(self, contributors: Sequence[dict]) -> torch.Tensor:
        """Per-element client counts, from public metadata only (rates and label splits)."""
        count = torch.zeros(self.layout.numel)
        for c in contributors:
            classes = torch.as_tensor(c["label_split"], dtype=torch.long)
            count += self.layout.coverage(self.sub_shapes(float(c["rate"])), classes)
        return count

    def server_step(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator) -> Downlink:
        """Sum the padded slices; the division by the public counts happens on every replica."""
        meta: dict = {"contributors": self.contributors(replies, rnd)}
        fields = {"sum": aggregator.sum(replies, "padded_update")}
        if self.config.norm == "bn" and self.ctx.evaluated(rnd):
            pending = GlobalUpdate(self.log.version + 1, rnd, fields, meta)
            fields["statistics"], meta["statistics"] = pack_statistics(
                self._federated_sbn_statistics(rnd, replies, aggregator, pending))
        for reply in replies:
            self.log.acknowledge(reply.sender, reply.meta.get("replica_version"))
        self.log.record(rnd, fields, meta)
        return send_updates(self.broadcast(rnd), self.log, self._sampled)

    def client_update(self, party: Party, inbox: Sequence[Message], rnd: int) -> None:
        self.replica(party).catch_up(read_updates(only_message(inbox, self.downlink.kind)), self.apply_update,
                                     party.id, self.supersedes)

    def supersedes(self, update: GlobalUpdate) -> bool:
        """Whether applying ``update`` leaves nothing of the replica's earlier state: every element has a
        contributor (the public counts), and under ``bn`` the update carries the statistics too. Then a
        replica that missed earlier updates reaches everyone's state from this one alone."""
        covered = bool((self.counts(update.meta["contributors"]) > 0).all())
        return covered and (self.config.norm != "bn" or "statistics" in update.fields)

    def apply_update(self, replica: HeteroFLReplica, update: GlobalUpdate) -> None:
        """``new = where(count > 0, sum / count, old)``, then the update's sBN statistics if any."""
        count = self.counts(update.meta["contributors"])
        old = self.layout.flatten(replica.model)
        total = update.fields["sum"]
        self.layout.load(replica.model, torch.where(count > 0, total / count.clamp(min=1.0), old))
        if "statistics" in update.fields:
            replica.level_stats = unpack_statistics(update.fields["statistics"], update.meta["statistics"])
            replica.model.load_state_dict(replica.level_stats[self.global_rate], strict=False)

    # ----- step 5: federated sBN statistics ------------------------------------------------
    def _federated_sbn_statistics(self, rnd: int, replies: Sequence[Message], aggregator: Aggregator,
                                  pending: GlobalUpdate) -> dict[float, dict[str, torch.Tensor]]:
        if self.config.sbn_clients == "all":
            clients = sorted(self._parties.values(), key=lambda p: p.index)
        else:
            clients = [self._parties[r.sender] for r in replies]
        # The new global model: a current replica with this round's update applied, exactly what every
        # replica will hold. Its slices go out in the clear (hence the refusal under secure aggregation).
        hosted = sorted(self._parties.values(), key=lambda p: p.index)
        committee = copy.deepcopy(cast(HeteroFLReplica, freshest([self.replica(p) for p in hosted])))
        if committee.version != pending.version - 1:
            raise RuntimeError(f"no participant holds update {pending.version - 1}, which the sBN query needs")
        committee.level_stats = {}
        self.apply_update(committee, pending)
        # Statistics for the global model and for every level a client is evaluated at.
        levels = {self.global_rate} | {self.rate_of(pid, rnd) for pid in self._parties}
        level_stats: dict[float, dict[str, torch.Tensor]] = {}
        for rate in sorted(levels, reverse=True):
            model = self.submodel(committee, rate)
            for layer, norm in model.static_norms():
                query = Message(sender=AGGREGATOR, receiver=BROADCAST, run_id=self.ctx.run_id, round=rnd,
                                kind=self.sbn_query.kind, payload={"state": flat_parameters(model)},
                                meta={"rate": rate, "layer": layer})
                answers = [self.client_sbn_sums(p, query) for p in clients]
                moments = moments_from_sums(torch.as_tensor(aggregator.sum(answers, "sbn_sums")))
                if moments is not None:  # no data at all: keep the defaults
                    assert norm.running_mean is not None and norm.running_var is not None
                    norm.running_mean.copy_(moments[0])
                    norm.running_var.copy_(moments[1])
            level_stats[rate] = {k: v.clone() for k, v in model.state_dict().items()
                                 if k.endswith(("running_mean", "running_var"))}
        return level_stats

    def client_sbn_sums(self, party: Party, query: Message) -> Message:
        """Client side of the sBN query: per-channel sums of one norm layer's input over its training data."""
        rate, layer = float(query.meta["rate"]), str(query.meta["layer"])
        if rate not in self._scratch:
            self._scratch[rate] = self._blank(rate)
        model = self._scratch[rate]
        load_flat_parameters(model, query.tensor("state"))
        sums = channel_sums(model, layer, party.train.x[self.sbn_records(party)])
        return Message(sender=party.id, receiver=AGGREGATOR, run_id=self.ctx.run_id, round=query.round,
                       kind="sbn_sums", payload={"sbn_sums": sums}, meta={"rate": rate, "layer": layer})

    def sbn_records(self, party: Party) -> torch.Tensor:
        """The client's records its sBN sums are taken over: all, or a fixed subset (``sbn_max_records``),
        drawn from the run seed and the client's id, the same in every round."""
        n, cap = len(party.train), self.config.sbn_max_records
        if cap is None or n <= cap:
            return torch.arange(n)
        rng = np.random.default_rng(derive_seed(self.ctx.seed, "heterofl-sbn-records", party.id))
        return torch.as_tensor(np.sort(rng.choice(n, size=cap, replace=False)), dtype=torch.long)

    # ----- evaluation: on the participant's own replica ----------------------------------------
    def evaluate(self, party: Party) -> dict[str, float]:
        """``accuracy``: the global model (the paper's headline), as the client's replica holds it; beside it
        the client's sub-model at its rate.

        The rate is the one of the round that made the replica's latest update (fixed mode: always the same).
        """
        ctx = self.ctx
        replica = self.replica(party)
        rate = self.rate_of(party.id, replica.round)
        y = ctx.test_y
        glob = self._test_logits(replica, self.global_rate)
        sub = self._test_logits(replica, rate)
        metrics = {"accuracy": argmax_accuracy(glob, y, ctx.eval_classes), "rate": rate,
                   "submodel_accuracy": argmax_accuracy(sub, y, ctx.eval_classes)}
        classes = self.label_split(party)
        local = torch.isin(y, classes)
        if bool(local.any()):
            metrics["submodel_local_accuracy"] = argmax_accuracy(sub[local], y[local], classes)
        return metrics

    def _test_logits(self, replica: HeteroFLReplica, rate: float) -> torch.Tensor:
        """Test-set logits of a replica's model at ``rate``, computed once per distinct model in this process.

        Replicas holding the same update are the same model (the update is deterministic); in a simulation
        every participant would otherwise score the same global model again, and each level's sub-model once
        per client at that level (on Fashion-MNIST with 64-128-256, about 30 s of CPU for the global model).
        The key is the replica's exact bytes, so a replica that differs in any parameter or statistic is
        scored on its own.
        """
        digest = hashlib.sha256()
        for tensor in replica.model.state_dict().values():
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
        key = (digest.digest(), rate)
        if key not in self._logits:
            if len(self._logits) >= 2 * len(self.levels):
                self._logits.clear()  # an older round's models: never asked for again in a simulation
            model = replica.model if rate == self.global_rate else self.submodel(replica, rate)
            self._logits[key] = predict_logits(model, self.ctx.test_x)
        return self._logits[key]

    # ----- checkpointing -----------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"log": self.log.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.log.load_state_dict(state["log"])


def load_params(model: nn.Module, flat: torch.Tensor) -> None:
    """Load a flat vector into a model's parameters (buffers untouched), in ``named_parameters`` order."""
    expected = sum(p.numel() for p in model.parameters())
    if flat.numel() != expected:
        raise ValueError(f"flat parameter vector has {flat.numel()} values; the model needs {expected}")
    offset = 0
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(flat[offset:offset + p.numel()].view_as(p))
            offset += p.numel()
