"""Every message signed by its sender (Ed25519) and verified by its receiver.

A forged, modified, replayed, stale or malformed message is rejected with a
reason; the runtime logs the rejection and the round goes on without it.
Signatures cover the run id, round, kind, sender, receiver, payload and the
non-signature meta (see :func:`securefl.crypto.signing.canonical_bytes`).

Every message gets a fresh random nonce in its meta before it is signed, so
no two signing acts give the same bytes: a message that arrives again byte
for byte is a replay, whereas a coordinator that resumes and redoes a round
signs new messages. A node keeps its verifiers' record of what it accepted
on disk (:meth:`SigningLayer.keep_replay_state`), since Flower may start a
new process for every message.
"""

from __future__ import annotations

import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from securefl.core.message import AGGREGATOR, Message
from securefl.crypto.signing import NONCE_META_KEY, MessageVerifier, PartyKeys, RejectedMessage, Roster
from securefl.layers.base import Layer, Rejected


class SigningLayer(Layer):
    name = "signing"

    def __init__(self, *, run_id: str, keys: Mapping[str, PartyKeys],
                 public_keys: Mapping[str, Ed25519PublicKey] | None = None) -> None:
        """``keys``: the private keys of the parties in this process, which sign what they send and
        receive as themselves (in a simulation: every participant and the aggregator). ``public_keys``:
        everyone's public key, the roster a deployment distributes (default: those of ``keys``)."""
        self._keys = dict(keys)
        public = dict(public_keys) if public_keys is not None else {pid: k.public_key for pid, k in self._keys.items()}
        missing = sorted(set(self._keys) - set(public))
        if missing:
            raise ValueError(f"the roster has no public key for {missing}")
        roster = Roster(public)  # checked once, shared by every receiver's verifier
        self._verifiers = {pid: MessageVerifier(run_id, roster, receiver=pid) for pid in self._keys}
        self.current_round = 0

    def keep_replay_state(self, directory: str | Path) -> None:
        """Keep what each hosted party's verifier accepts in ``directory/<party>.replay.json``, merging what a
        previous process recorded there: a replayed message is then refused by a fresh process too."""
        for pid, verifier in self._verifiers.items():
            verifier.persist_to(Path(directory) / f"{pid}.replay.json")

    def seen_before(self, msg: Message, receiver: str) -> str | None:
        """``"replay"`` if ``receiver`` accepted this very message before, ``"stale"`` if it accepted a later
        round of its kind from its sender; else ``None`` (see :meth:`MessageVerifier.seen_before`)."""
        verifier = self._verifiers.get(receiver)
        return verifier.seen_before(msg) if verifier is not None else None

    def redo_round(self) -> None:
        """The round is being redone (a coordinator resumed): accept its messages signed afresh, as a new
        process would; copies of the messages accepted the first time stay refused."""
        for verifier in self._verifiers.values():
            verifier.new_attempt()

    def start_round(self, rnd: int, sampled: Any) -> None:
        self.current_round = rnd

    def _verify(self, msg: Message, receiver: str) -> Message:
        if msg.round != self.current_round:
            raise Rejected(msg.sender, f"stale: round {msg.round} received during round {self.current_round}")
        try:
            return self._verifiers[receiver].verify(msg)
        except RejectedMessage as exc:
            raise Rejected(getattr(msg, "sender", "?"), str(exc)) from None

    def outbound(self, msg: Message, party: Any) -> Message:
        return self._keys[party.id].sign(_with_nonce(msg))

    def inbound(self, msg: Message, party: Any) -> Message:
        return self._verify(msg, party.id)

    def server_inbound(self, msg: Message) -> Message:
        return self._verify(msg, AGGREGATOR)

    def server_outbound(self, msg: Message) -> Message:
        return self._keys[AGGREGATOR].sign(_with_nonce(msg))


def _with_nonce(msg: Message) -> Message:
    return msg.with_meta(**{NONCE_META_KEY: secrets.token_hex(16)})
