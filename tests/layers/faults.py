"""Fault injection for tests: a transport that breaks messages, and participants that misbehave.

:class:`FaultyTransport` applies one function to the messages matching a predicate (the original,
still used by the signing and secure-aggregation tests).

:class:`ChaosTransport` is the harness of ``tests/reliability``: it executes a schedule of
:class:`Fault` values (hand-written, or drawn from a seed by :func:`random_schedule`), counts what it
injected, and records which releases actually left each participant, so a test can check that no
ledger under-counts. Faults, by where they happen:

- in the participant, before its layers (``attach`` wraps ``protocol.client_step``):
  ``drop_before_send`` (it goes offline: no computation, no message, no unmasking answer),
  ``nan`` / ``inf`` / ``wrong_shape`` / ``wrong_dtype`` with ``at="model"`` (its model produces it);
- on the wire, after the participant's layers: ``drop_after_send`` (delivered, then offline: no
  unmasking answer, no downlink), ``delay`` (delivered at the next round's first send), ``duplicate``,
  ``reorder`` (the aggregator's inbox of that round is shuffled), ``truncate`` and ``flip_bytes``
  (ciphertext or plaintext bytes), and ``nan`` / ``inf`` / ``wrong_shape`` / ``wrong_dtype`` with
  ``at="wire"`` (plaintext fields). ``resign=True`` re-signs the broken message with the sender's
  own key: a malicious participant, not a bad link, so the signature does not catch it;
- ``kill``: the process dies at the ``count``-th message sent in that round (``Killed``, a
  BaseException no ``except Exception`` catches; or a real SIGKILL with ``die=sigkill``).
"""

from __future__ import annotations

import os
import signal
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import is_sealed
from securefl.runtime.transport import InProcessTransport

Fault_ = Callable[[Message], list[Message]]


class FaultyTransport(InProcessTransport):
    """Applies ``fault`` to every message matching ``when``; the fault returns what is delivered instead."""

    def __init__(self, when: Callable[[Message], bool], fault: Fault_) -> None:
        super().__init__()
        self.when = when
        self.fault = fault
        self.injected = 0

    def send(self, msg: Message) -> None:
        if self.when(msg):
            self.injected += 1
            for out in self.fault(msg):
                super().send(out)
        else:
            super().send(msg)


# ----- the harness ------------------------------------------------------------------------------------
CORRUPTIONS = ("nan", "inf", "wrong_shape", "wrong_dtype")
WIRE_ONLY = ("drop_after_send", "delay", "duplicate", "reorder", "truncate", "flip_bytes")
KINDS = ("drop_before_send", *WIRE_ONLY, *CORRUPTIONS, "kill")


class Killed(BaseException):  # noqa: N818 - it is a death, not an error
    """The process died mid-round (in-process stand-in for SIGKILL)."""


def raise_killed(rnd: int) -> None:
    raise Killed(f"killed in round {rnd}")


def sigkill(rnd: int) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Fault:
    kind: str
    round: int
    party: str = ""  # the participant it affects (unused by kill and reorder)
    downlink: bool = False  # break a message *to* the party instead of one from it
    at: str = "wire"  # corruptions: "model" (its own output, before its layers) or "wire"
    resign: bool = False  # wire corruption re-signed with the sender's key
    count: int = 1  # kill: die at this message of the round
    message_kind: str = ""  # only messages of this kind (default: every message of the round)

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}")

    def label(self) -> str:
        extra = "/model" if self.kind in CORRUPTIONS and self.at == "model" else ""
        extra += "/resigned" if self.resign else ""
        extra += "/downlink" if self.downlink else ""
        return self.kind + extra


def random_schedule(seed: int, *, rounds: Sequence[int], parties: Sequence[str], rate: float, sealed: bool,
                    kills: int = 0, max_offline: int | None = None) -> list[Fault]:
    """A seeded schedule: each (round, party) is faulty with probability ``rate``, of a random applicable kind.

    ``sealed``: the uplink is sealed (CKKS or masking), so plaintext corruptions happen in the model only.
    ``max_offline``: at most this many participants drop out in one round. ``kills``: that many rounds
    (never the first or last) also kill the process once.
    """
    rng = np.random.default_rng(seed)
    faults: list[Fault] = []
    kinds = [k for k in KINDS if k != "kill"]
    for rnd in rounds:
        offline = 0
        for party in parties:
            if rng.random() >= rate:
                continue
            kind = str(rng.choice(kinds))
            if kind in ("drop_before_send", "drop_after_send"):
                if max_offline is not None and offline >= max_offline:
                    kind = "duplicate"
                offline += kind in ("drop_before_send", "drop_after_send")
            at = "model" if kind in CORRUPTIONS and (sealed or rng.random() < 0.5) else "wire"
            resign = kind in ("truncate", "flip_bytes", *CORRUPTIONS) and at == "wire" and bool(rng.random() < 0.5)
            downlink = kind in ("delay", "duplicate", "truncate", "flip_bytes") and bool(rng.random() < 0.25)
            faults.append(Fault(kind, rnd, party, downlink=downlink, at=at, resign=resign))
    middle = list(rounds)[1:-1]
    for rnd in rng.choice(middle, size=min(kills, len(middle)), replace=False) if middle else []:
        faults.append(Fault("kill", int(rnd), count=int(rng.integers(1, len(parties) + 1))))
    return faults


class ChaosTransport(InProcessTransport):
    """Executes a fault schedule; see the module docstring. Re-attach to a resumed Federation."""

    def __init__(self, faults: Iterable[Fault], *, seed: int = 0, die: Callable[[int], None] = raise_killed) -> None:
        super().__init__()
        self.faults = list(faults)
        self.die = die
        self.rng = np.random.default_rng(seed)
        self.fed: Any = None
        self.injected: Counter[str] = Counter()
        self.log: list[tuple[int, str, str]] = []  # (round, fault label, party)
        # (party, round) of every uplink that left a participant carrying a payload.
        self.released: set[tuple[str, int]] = set()
        self._held: list[Message] = []
        self._offline: set[tuple[str, int]] = set()
        self._sends: Counter[int] = Counter()
        self._fired: set[Fault] = set()

    # ----- wiring -------------------------------------------------------------------------------
    def attach(self, fed: Any) -> None:
        """Wrap the federation's protocol so faults inside participants can happen; returns nothing."""
        self.fed = fed
        protocol = fed.protocol
        real_step = protocol.client_step

        def client_step(party: Any, inbox: Any, rnd: int) -> Any:
            mine = [f for f in self._due(rnd, party.id, downlink=False)
                    if f.kind == "drop_before_send" or (f.kind in CORRUPTIONS and f.at == "model")]
            if any(f.kind == "drop_before_send" for f in mine):
                self._note(mine[0], party.id)
                self._go_offline(party.id, rnd)
                return None
            reply = real_step(party, inbox, rnd)
            for fault in mine:
                self._note(fault, party.id)
                reply = reply.with_payload(**{n: _corrupt(fault.kind, t) for n, t in _tensors(reply).items()})
            return reply

        protocol.client_step = client_step

    def _due(self, rnd: int, party: str, *, downlink: bool) -> list[Fault]:
        return [f for f in self.faults if f.round == rnd and f.party == party and f.downlink == downlink
                and f.kind != "kill"]

    def _note(self, fault: Fault, party: str) -> None:
        self.injected[fault.label()] += 1
        self.log.append((fault.round, fault.label(), party))

    def _go_offline(self, party: str, rnd: int) -> None:
        self._offline.add((party, rnd))
        for layer in getattr(self.fed, "layers", []):
            if hasattr(layer, "drop"):  # masking: it will not answer the unmasking request
                layer.drop(party)

    # ----- the wire --------------------------------------------------------------------------------
    def send(self, msg: Message) -> None:
        rnd = msg.round
        if self._held and any(h.round < rnd for h in self._held):
            late = [h for h in self._held if h.round < rnd]
            self._held = [h for h in self._held if h.round >= rnd]
            for h in late:
                super().send(h)
        self._sends[rnd] += 1
        for kill in [f for f in self.faults if f.kind == "kill" and f.round == rnd and f not in self._fired]:
            if self._sends[rnd] >= kill.count:
                self._fired.add(kill)
                self._note(kill, "")
                # The process dies with what its inboxes held; messages delayed "in the network" live on.
                self._inboxes.clear()
                self.die(rnd)
        uplink = msg.sender != AGGREGATOR  # from a participant (to the aggregator, or to a peer)
        party = msg.sender if uplink else msg.receiver
        if not uplink and (party, rnd) in self._offline:
            return  # an offline participant receives nothing
        if uplink and msg.payload and "withheld" not in msg.meta:
            self.released.add((party, rnd))
        out = [msg]
        for fault in self._due(rnd, party, downlink=not uplink):
            if fault.kind in ("drop_before_send", "reorder") or (fault.kind in CORRUPTIONS and fault.at == "model"):
                continue  # happened inside the participant, or when the aggregator drains its inbox
            if fault.message_kind and fault.message_kind != msg.kind:
                continue
            out = self._apply(fault, out, party)
        for m in out:
            super().send(m)

    def _apply(self, fault: Fault, msgs: list[Message], party: str) -> list[Message]:
        kind = fault.kind
        self._note(fault, party)
        if kind == "drop_after_send":
            self._go_offline(party, fault.round)
            return msgs
        if kind == "delay":
            self._held.extend(msgs)
            return []
        if kind == "duplicate":
            return [m for m in msgs for _ in range(2)]
        broken = []
        for msg in msgs:
            payload = {}
            for name, value in msg.payload.items():
                if isinstance(value, list) and is_sealed(msg, name) and kind in ("truncate", "flip_bytes"):
                    chunks = list(value)
                    if kind == "truncate":
                        chunks[-1] = chunks[-1][: len(chunks[-1]) // 2]
                    else:
                        raw = bytearray(chunks[0])
                        raw[len(raw) // 2] ^= 0x5A
                        chunks[0] = bytes(raw)
                    payload[name] = chunks
                elif isinstance(value, torch.Tensor):
                    payload[name] = _corrupt(kind, value)
            broken.append(self._resign(msg.with_payload(**payload)) if fault.resign else msg.with_payload(**payload))
        return broken

    def _resign(self, msg: Message) -> Message:
        if "signature" not in msg.meta:
            return msg
        return self.fed.keys(msg.sender).sign(msg)

    def receive(self, party_id: str) -> list[Message]:
        msgs = super().receive(party_id)
        if party_id == AGGREGATOR and msgs:
            rnd = max(m.round for m in msgs)
            for fault in [f for f in self.faults if f.kind == "reorder" and f.round == rnd]:
                self._note(fault, fault.party)
                order = self.rng.permutation(len(msgs))
                if (order == np.arange(len(msgs))).all():
                    order = np.roll(order, 1)  # a real reordering, never the identity
                msgs = [msgs[i] for i in order]
        return msgs

    # ----- figures -----------------------------------------------------------------------------
    @property
    def total_injected(self) -> int:
        return sum(self.injected.values())


def _tensors(msg: Message) -> dict[str, torch.Tensor]:
    return {n: v for n, v in msg.payload.items() if isinstance(v, torch.Tensor)}


def _corrupt(kind: str, t: torch.Tensor) -> torch.Tensor:
    """A broken copy of ``t``: a NaN/Inf entry, one column or element fewer, integer dtype, or a flipped byte."""
    if kind in ("nan", "inf"):
        out = t.clone()
        out.view(-1)[out.numel() // 2] = float("nan") if kind == "nan" else float("inf")
        return out
    if kind in ("wrong_shape", "truncate"):
        return t[..., :-1].clone() if t.dim() > 1 else t[:-1].clone()
    if kind == "wrong_dtype":
        return t.round().to(torch.int64)
    if kind == "flip_bytes":
        raw = bytearray(t.detach().contiguous().numpy().tobytes())
        raw[len(raw) // 2] ^= 0x5A
        return torch.frombuffer(raw, dtype=t.dtype).reshape(t.shape).clone()
    raise ValueError(f"{kind} does not corrupt a tensor")
