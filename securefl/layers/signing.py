"""Every message signed by its sender (Ed25519) and verified by its receiver.

A forged, modified, replayed, stale or malformed message is rejected with a
reason; the runtime logs the rejection and the round goes on without it.
Signatures cover the run id, round, kind, sender, receiver, payload and the
non-signature meta (see :func:`securefl.crypto.signing.canonical_bytes`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from securefl.crypto.signing import MessageVerifier, PartyKeys, RejectedMessage
from securefl.layers.base import Layer, Rejected
from securefl.runtime.message import AGGREGATOR, Message


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
        self._verifiers = {pid: MessageVerifier(run_id, public, receiver=pid) for pid in self._keys}
        self.current_round = 0

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
        return self._keys[party.id].sign(msg)

    def inbound(self, msg: Message, party: Any) -> Message:
        return self._verify(msg, party.id)

    def server_inbound(self, msg: Message) -> Message:
        return self._verify(msg, AGGREGATOR)

    def server_outbound(self, msg: Message) -> Message:
        return self._keys[AGGREGATOR].sign(msg)
