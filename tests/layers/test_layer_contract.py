"""The layer contract: every layer ``build_layers`` can put in a stack keeps two promises.

1. **A refusal comes before round 1.** A layer that cannot work with a protocol (or, for validation, with a
   participant's data) says so in ``check``, with its setup error; a ``Federation`` built for that combination
   raises it before anything runs, so no metrics line is written and no ledger books a spend.
2. **Outbound then inbound gives back what the layer lets through.** A message a participant sends, passed
   through the sender's ``outbound`` and the receiver's inbound path, arrives with every field the layer lets
   through unchanged, bit for bit (validation, signing); participant-level DP changes only the declared private
   fields; CKKS and masking seal the aggregatable fields, and what the participants read of their aggregate is
   the plain sum to the scheme's precision.

The layers are built by ``build_layers(config, side="simulation", ...)`` from the tiny config, one config per
layer that puts it in the stack; the DP layer is built as :class:`~securefl.runtime.privacy.PrivacyRuntime`
builds it, with a commit that only records what it is asked to book.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

import securefl.runtime.federation as federation_module
from securefl.core.aggregator import PlainAggregator
from securefl.core.message import AGGREGATOR, Message
from securefl.core.party import DataView, Party
from securefl.core.sealed import SealedTensor, attach, is_sealed
from securefl.crypto.signing import PartyKeys
from securefl.data.datasets import DataError
from securefl.layers.base import Layer, LayerSetupError
from securefl.layers.privacy import ParticipantDPLayer
from securefl.layers.stack import build_layers
from securefl.privacy.events import PrivacyEvent
from securefl.privacy.ledger import read_ledger
from securefl.protocols.base import Field, Protocol, ProtocolConfig, Schema
from securefl.runtime.federation import Federation, build_world
from tests.conftest import tiny_config

RUN = "layer-contract"
IDS = ["p0", "p1", "p2"]
SHAPE = (4, 5)
# What reaches the receiver of a field: the same tensor bit for bit, a noised tensor of the same shape and dtype,
# or a sealed value whose aggregate the participants read to within the scheme's precision.
EXACT, NOISED, SEALED = "exact", "noised", "sealed"


class TwoFields(Protocol):
    """A stand-in protocol whose uplink declares one private and one public field, both aggregatable."""

    name = "two_fields"
    summary = "the layer contract's stand-in"
    uplink = Schema("update", secret=Field(aggregatable=True, description="derived from private data"),
                    public=Field(aggregatable=True, private=False, description="a public fact"))

    def setup_party(self, party: Party) -> None:
        """Nothing to build: the contract drives the layers by hand."""

    def client_step(self, party: Party, inbox: Any, rnd: int) -> None:
        return None

    def expected_uplink_shape(self, kind: str, field: str, sender: str, rnd: int) -> tuple[int, ...] | None:
        return SHAPE


@dataclass
class LayerCase:
    """One layer, the config that puts it in a simulation's stack, and what it lets through."""

    name: str
    layer_name: str
    changes: dict[str, Any]
    uplink: dict[str, str]  # field -> what reaches the server
    peer: dict[str, str]  # field -> what reaches a peer
    tolerance: float = 0.0  # of a sealed aggregate
    layer: Any = None
    booked: list[tuple[str, PrivacyEvent]] = field(default_factory=list)


DP = {"unit": "participant", "target_epsilon": 8.0, "clip_norm": 1.0}
CASES = {
    "validation": LayerCase("validation", "validation", {}, {"secret": EXACT, "public": EXACT},
                            {"secret": EXACT, "public": EXACT}),
    "participant_dp_local": LayerCase("participant_dp_local", "participant_dp", {"privacy": DP},
                                      {"secret": NOISED, "public": EXACT}, {"secret": NOISED, "public": EXACT}),
    "participant_dp_distributed": LayerCase(
        "participant_dp_distributed", "participant_dp",
        {"privacy": {**DP, "noise": "distributed"}, "secure_aggregation": "masking"},
        {"secret": NOISED, "public": EXACT}, {"secret": NOISED, "public": EXACT}),
    # CKKS is approximate (about 1e-6 on unit-scale values); masking encodes in fixed point with 24 fractional bits.
    "ckks": LayerCase("ckks", "ckks", {"secure_aggregation": "ckks"}, {"secret": SEALED, "public": SEALED},
                      {"secret": EXACT, "public": EXACT}, tolerance=1e-4),
    "masking": LayerCase("masking", "masking", {"secure_aggregation": "masking"}, {"secret": SEALED, "public": SEALED},
                         {"secret": EXACT, "public": EXACT}, tolerance=1e-5),
    "signing": LayerCase("signing", "signing", {"signing": True}, {"secret": EXACT, "public": EXACT},
                         {"secret": EXACT, "public": EXACT}),
}


def _build(case: LayerCase, key_dir: Path) -> Layer:
    """``case``'s layer, out of the stack ``build_layers`` makes for a simulation of its config."""
    config = tiny_config(**case.changes)
    dp = None
    if config.privacy.unit == "participant":
        # As PrivacyRuntime.build makes it, but booking into a list instead of a ledger.
        dp = ParticipantDPLayer(noise_multipliers=dict.fromkeys(IDS, 1.0), clip_norm=config.privacy.clip_norm,
                                mode=config.privacy.noise, commit=lambda pid, event: case.booked.append((pid, event)),
                                min_contributors=config.cohort_fraction())
        dp.plan_cohort(config.cohort())
    signers = {pid: PartyKeys.generate(pid) for pid in [*IDS, AGGREGATOR]}
    layers = build_layers(config, side="simulation", run_id=RUN, key_dir=key_dir, party_ids=IDS, signers=signers,
                          privacy_layer=dp)
    matching = [layer for layer in layers if layer.name == case.layer_name]
    assert len(matching) == 1, [layer.name for layer in layers]
    return matching[0]


@pytest.fixture(params=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path: Path) -> LayerCase:
    """A freshly built layer for each test: a layer keeps what it accepted (signing refuses a replay)."""
    case = CASES[request.param]
    case.booked.clear()
    case.layer = _build(case, tmp_path / "keys")
    return case


# ----- 1. a refusal comes before round 1 -----------------------------------------------------------------
def _nan_features(party: Party) -> None:
    x = party.train.x_all.clone()
    x[party.train.idx[:3], 0, 0, 0] = float("nan")
    party.train = DataView(x, party.train.y_all, party.train.idx)


SAME_MODEL = [{"id": pid, "model": "mlp_s"} for pid in IDS]
HETEROFL = {"model": "mlp", "hidden_sizes": [16], "proportions": "a1-b1"}
# Each set-up, and the layers that refuse it: (error, what the message says). Every other layer accepts it.
CKKS_READS_CLEAR = (LayerSetupError, "secure_aggregation=ckks cannot run fedavg: its server computes on the "
                                     "aggregate in the clear")
SETUPS: dict[str, tuple[dict[str, Any], Callable[[Party], None] | None, dict[str, tuple[type[Exception], str]]]] = {
    "fedmd": ({}, None, {}),
    "fedmd-nan-features": ({}, _nan_features, {
        "validation": (DataError, "participant 'p1': 3 training feature values are NaN or Inf")}),
    "fedavg-weighted": ({"protocol": "fedavg", "participants": SAME_MODEL}, None, {
        "participant_dp_local": (LayerSetupError, "privacy.unit = 'participant', privacy.noise = 'local' cannot run "
                                                  "fedavg: its uplink metadata 'num_samples'"),
        "participant_dp_distributed": (LayerSetupError, "noise = 'distributed' cannot run fedavg: its uplink metadata "
                                                        "'num_samples'"),
        "ckks": CKKS_READS_CLEAR}),
    "fedavg-uniform": ({"protocol": "fedavg", "participants": SAME_MODEL, "fedavg": {"weighting": "uniform"}}, None,
                       {"ckks": CKKS_READS_CLEAR}),
    "fedgen-reference": ({"protocol": "fedgen", "fedgen": {"mode": "reference", "head_aggregation": "mean"}}, None, {
        scheme: (LayerSetupError, f"secure_aggregation={scheme} cannot run fedgen: its uplink sends shared, "
                                  "label_counts that the server must read individually")
        for scheme in ("ckks", "masking")}),
    "fedh2l-direct": ({"protocol": "fedh2l", "fedh2l": {"exchange": "direct"}}, None, {
        "participant_dp_distributed": (LayerSetupError, "noise = 'distributed' cannot run fedh2l: fedh2l.exchange = "
                                                        "'direct' sends each peer's posteriors"),
        **{scheme: (LayerSetupError, f"secure_aggregation={scheme} cannot run fedh2l: fedh2l.exchange = 'direct'")
           for scheme in ("ckks", "masking")}}),
    "heterofl-bn": ({"protocol": "heterofl", "heterofl": {**HETEROFL, "norm": "bn", "label_split": "all"}}, None, {
        **{dp: (LayerSetupError, "cannot run heterofl: it releases the static batch-norm statistics")
           for dp in ("participant_dp_local", "participant_dp_distributed")},
        **{scheme: (LayerSetupError, f"secure_aggregation={scheme} cannot run heterofl: heterofl.norm = 'bn'")
           for scheme in ("ckks", "masking")}}),
    "heterofl-gn": ({"protocol": "heterofl", "heterofl": {**HETEROFL, "norm": "gn", "label_split": "all"}}, None, {}),
    "local_only": ({"protocol": "local_only"}, None, {}),
}


@pytest.mark.parametrize("setup", list(SETUPS))
def test_check_refuses_exactly_the_set_ups_the_layer_cannot_work_with(case: LayerCase, setup: str) -> None:
    changes, corrupt, refusals = SETUPS[setup]
    _, _, _, parties, protocol = build_world(tiny_config(**changes), RUN)
    if corrupt is not None:
        corrupt(parties[1])
    refusal = refusals.get(case.name)
    if refusal is None:
        case.layer.check(protocol, parties)
        return
    error, message = refusal
    with pytest.raises(error) as info:
        case.layer.check(protocol, parties)
    assert message in str(info.value)


def test_every_layer_refuses_something_but_signing() -> None:
    # The table above is not vacuous: each layer with a check is shown refusing, and signing (which supports
    # every protocol, having nothing to read in a payload) is the only one that never does.
    refusing = {name for _, _, refusals in SETUPS.values() for name in refusals}
    assert refusing == set(CASES) - {"signing"}


@pytest.mark.parametrize("name", ["participant_dp_local", "participant_dp_distributed"])
def test_participant_dp_refuses_a_protocol_that_declares_no_private_uplink_field(name: str, tmp_path: Path) -> None:
    class OnlyPublic(TwoFields):
        name = "only_public"
        uplink = Schema("update", public=Field(aggregatable=True, private=False))

    layer = _build(CASES[name], tmp_path / "keys")
    with pytest.raises(LayerSetupError, match="^privacy.unit=participant: only_public declares no private uplink "
                                              "field to protect$"):
        layer.check(OnlyPublic(ProtocolConfig(), None), [])  # type: ignore[arg-type]


# One refused set-up per layer with a check, run as a Federation: (the set-up, what else the config turns on,
# whether the ledgers are open when the layer refuses). DP is on wherever the protocol allows it, so that
# "nothing booked" is a claim about real ledger files.
FEDERATION_REFUSALS: dict[str, tuple[str, dict[str, Any], bool]] = {
    "validation": ("fedmd-nan-features", {"privacy": DP}, True),
    "participant_dp_local": ("fedavg-weighted", {"privacy": DP}, False),
    "participant_dp_distributed": ("fedh2l-direct", {"privacy": {**DP, "noise": "distributed"},
                                                     "secure_aggregation": "masking"}, False),
    "ckks": ("fedavg-uniform", {"privacy": DP, "secure_aggregation": "ckks"}, True),
    "masking": ("fedgen-reference", {"privacy": DP, "secure_aggregation": "masking"}, True),
}


def test_every_layer_with_a_check_has_a_refused_federation_below() -> None:
    assert set(FEDERATION_REFUSALS) == set(CASES) - {"signing"}


@pytest.mark.parametrize("name", list(FEDERATION_REFUSALS))
def test_a_federation_refuses_before_round_one_and_books_nothing(name: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    setup, turned_on, ledgers_opened = FEDERATION_REFUSALS[name]
    changes, corrupt, refusals = SETUPS[setup]
    error, message = refusals[name]
    if corrupt is not None:
        def world_with_broken_data(*args: Any, **kwargs: Any) -> Any:
            world = build_world(*args, **kwargs)
            corrupt(world[3][1])
            return world

        monkeypatch.setattr(federation_module, "build_world", world_with_broken_data)
    out = tmp_path / "run"
    out.mkdir()  # made by someone else: a refused run keeps the directory, so what is in it can be read
    with pytest.raises(error) as info:
        Federation(tiny_config(run={"rounds": 1}, **changes, **turned_on), out, progress=False).run()
    assert message in str(info.value)
    assert not (out / "metrics.jsonl").exists(), "a round (or round 0) ran before the refusal"
    assert not list((out / "checkpoints").glob("*"))
    assert not (out / "releases.jsonl").exists() or not (out / "releases.jsonl").read_text()
    ledgers = sorted((out / "ledgers").glob("*.jsonl"))
    assert [p.stem for p in ledgers] == (IDS if ledgers_opened else [])
    for path in ledgers:
        assert not read_ledger(path).events, f"{path.name} books a spend for a run that never started"


# ----- 2. outbound then inbound gives back what the layer lets through ----------------------------------------
def _uplink(sender: str, receiver: str = AGGREGATOR, *, seed: int = 0) -> Message:
    gen = torch.Generator().manual_seed(seed)
    return Message(sender=sender, receiver=receiver, run_id=RUN, round=1, kind="update",
                   payload={"secret": torch.empty(SHAPE).uniform_(-3, 3, generator=gen),
                            "public": torch.empty(SHAPE).uniform_(-3, 3, generator=gen)},
                   meta={"replica_version": 7})


def _started(case: LayerCase) -> Any:
    """The case's layer, checked against the stand-in protocol and in round 1 with every participant sampled."""
    case.layer.check(TwoFields(ProtocolConfig(), None), [])  # type: ignore[arg-type]
    case.layer.start_round(1, IDS)
    return case.layer


def _party(pid: str) -> Any:
    """What a layer reads of the participant it acts for: its id."""
    return SimpleNamespace(id=pid)


def _assert_let_through(sent: Message, received: Message, treatment: dict[str, str]) -> None:
    for name in ("sender", "receiver", "run_id", "round", "kind"):
        assert getattr(received, name) == getattr(sent, name), name
    assert {k: received.meta.get(k) for k in sent.meta} == sent.meta, "the sender's own meta was changed"
    assert set(received.payload) == set(sent.payload)
    for name, how in treatment.items():
        value, original = received.payload[name], sent.payload[name]
        if how == SEALED:
            assert is_sealed(received, name) and not isinstance(value, torch.Tensor), f"{name!r} crossed in the clear"
            assert SealedTensor.from_message(received, name).shape == SHAPE
            continue
        assert isinstance(value, torch.Tensor) and value.dtype == original.dtype and value.shape == original.shape
        if how == EXACT:
            assert torch.equal(value, original), f"{name!r} was changed on its way"
        else:
            assert not torch.equal(value, original), f"{name!r} left without noise"


def test_an_uplink_reaches_the_server_with_every_field_the_layer_lets_through(case: LayerCase) -> None:
    layer = _started(case)
    sent = _uplink("p1")
    received = layer.server_inbound(layer.outbound(sent, _party("p1")))
    _assert_let_through(sent, received, case.uplink)
    noised = [name for name, how in case.uplink.items() if how == NOISED]
    # Exactly one booking per release, and only when something private was noised.
    assert [(pid, event.payload) for pid, event in case.booked] == ([("p1", "update")] if noised else [])


def test_the_aggregate_the_participants_read_is_the_sum_of_what_the_layer_let_through(case: LayerCase) -> None:
    layer = _started(case)
    sent = [_uplink(pid, seed=i) for i, pid in enumerate(IDS)]
    left = [layer.outbound(msg, _party(msg.sender)) for msg in sent]
    replies = [layer.server_inbound(msg) for msg in left]
    aggregator = layer.wrap_aggregator(PlainAggregator(), 1)
    down = Message(sender=AGGREGATOR, receiver="p0", run_id=RUN, round=1, kind="result")
    for name in case.uplink:
        down = attach(down, name, aggregator.sum(replies, name))
    read = layer.inbound(layer.server_outbound(down), _party("p0"))
    for name, how in case.uplink.items():
        plain, got = PlainAggregator().sum(sent, name), read.tensor(name)
        if how == EXACT:
            assert torch.equal(got, plain)
        elif how == NOISED:
            # The sum of the noised releases, exactly: nothing is added or lost between the layer and the sum.
            assert torch.equal(got, PlainAggregator().sum(left, name)) and not torch.equal(got, plain)
        else:
            assert got.shape == SHAPE
            torch.testing.assert_close(got.double(), plain.double(), atol=case.tolerance, rtol=0)


def test_a_peer_message_reaches_the_peer_with_every_field_the_layer_lets_through(case: LayerCase) -> None:
    layer = _started(case)
    sent = _uplink("p0", receiver="p2")
    received = layer.inbound(layer.outbound(sent, _party("p0")), _party("p2"))
    _assert_let_through(sent, received, case.peer)


def test_a_plaintext_downlink_reaches_the_participant_unchanged(case: LayerCase) -> None:
    layer = _started(case)
    sent = Message(sender=AGGREGATOR, receiver="p2", run_id=RUN, round=1, kind="result",
                   payload={"mean": torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(4, 5)}, meta={"step": 1})
    received = layer.inbound(layer.server_outbound(sent), _party("p2"))
    _assert_let_through(sent, received, {"mean": EXACT})
    assert case.booked == []  # the server's messages are no participant's release
