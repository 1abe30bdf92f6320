"""The server's side of pairwise masking (SecAgg): it relays the key agreement and unmasks the sum.

:class:`MaskingAggregator` runs the server's part of rounds 0-1 and 4 of Bonawitz et al. (CCS 2017) and
implements the aggregator interface protocols call; :class:`SecAggSimulation` wires it to every
participant's :class:`~securefl.crypto.masking.MaskingClient` in one process. The protocol, its
cryptography and its threat model are :mod:`securefl.crypto.masking`'s.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from securefl.core.aggregator import Aggregator, require_one_shape, require_replies
from securefl.core.message import AGGREGATOR, BROADCAST, Message
from securefl.core.sealed import SealedTensor, from_float64, torch_dtype
from securefl.crypto import shamir
from securefl.crypto.errors import SecAggAbort
from securefl.crypto.masking import (
    KIND_ADVERTISE,
    KIND_ROSTER,
    KIND_SHARE_INBOX,
    KIND_SHARES,
    KIND_UNMASK,
    KIND_UNMASK_REQUEST,
    ClientSecrets,
    MaskingClient,
    MaskingSession,
    _bytes_list,
    _ids_from_bytes,
    _ids_to_bytes,
    _MaskAccumulator,
    _pair_seed,
    _raw_public,
    _self_mask_key,
)

__all__ = ["MaskingAggregator", "SecAggSimulation", "UnmaskBatch", "UnmaskChannel"]

# One unmasking request to a survivor -> its answer, or None if it has gone silent.
UnmaskChannel = Callable[[Message], Message | None]
# All unmasking requests at once -> the answers that came back, by participant (one round trip in a deployment).
UnmaskBatch = Callable[[Sequence[Message]], Mapping[str, Message]]


@dataclass
class _Unmasked:
    survivors: frozenset[str]
    dropped: frozenset[str]
    self_keys: dict[str, bytes]  # survivor -> self-mask key
    dropped_pair_seeds: dict[tuple[str, str], bytes]  # (survivor, dropped) -> pairwise seed


class MaskingAggregator(Aggregator):
    """The server side: routes setup messages and aggregates masked replies.

    Implements the aggregator interface used by protocols
    (``sum``/``mean``/``weighted_mean(replies, field)``) and returns plaintext
    tensors: masking reveals the sum to the server by design.

    Parameters
    ----------
    session
        The shared public parameters.
    unmask_channel
        Keyword-only. Sends an unmasking request to a survivor and returns its
        answer, or ``None`` if it has gone silent. :class:`SecAggSimulation`
        provides an in-process one.
    unmask_batch
        Keyword-only, instead of ``unmask_channel``: sends every survivor its
        request at once and returns the answers that came back, by sender (a
        deployment's single round trip). A malformed answer counts as no answer,
        and its reason is kept in :attr:`unmask_failures`.
    """

    name = "secagg"
    scheme = "secagg"

    def __init__(self, session: MaskingSession, *, unmask_channel: UnmaskChannel | None = None,
                 unmask_batch: UnmaskBatch | None = None) -> None:
        self.session = session
        self.unmask_channel = unmask_channel
        self.unmask_batch = unmask_batch
        self.unmask_failures: list[str] = []
        self._roster: dict[str, tuple[bytes, bytes]] = {}
        self._u2: tuple[str, ...] = ()
        self._unmasked: _Unmasked | None = None

    # Round 0 ------------------------------------------------------------------------------------
    def check_advertisement(self, msg: Message) -> None:
        """One participant's round-0 message on its own (ValueError naming what is wrong)."""
        self.session.check_message(msg, KIND_ADVERTISE)
        self.session.x_of(msg.sender)
        for name in ("c_pk", "s_pk"):
            key = msg.payload.get(name)
            if not isinstance(key, bytes) or len(key) != 32:
                raise ValueError(f"advertisement from {msg.sender!r}: {name} must be 32 raw X25519 bytes")

    def collect_advertisements(self, adverts: Sequence[Message]) -> Message:
        """Round 0 (server): collect public keys (``U1``) and return the roster to broadcast."""
        roster: dict[str, tuple[bytes, bytes]] = {}
        for msg in adverts:
            self.check_advertisement(msg)
            if msg.sender in roster:
                raise ValueError(f"two key advertisements from {msg.sender!r}")
            roster[msg.sender] = (msg.payload["c_pk"], msg.payload["s_pk"])
        if len(roster) < self.session.threshold:
            raise self.session.abort("AdvertiseKeys", len(roster), "participants advertised keys")
        self._roster = dict(sorted(roster.items()))
        ids = list(self._roster)
        return self.session.message(
            sender=AGGREGATOR,
            receiver=BROADCAST,
            kind=KIND_ROSTER,
            payload={
                "ids": _ids_to_bytes(ids),
                "c_pks": [self._roster[i][0] for i in ids],
                "s_pks": [self._roster[i][1] for i in ids],
            },
        )

    # Round 1 ------------------------------------------------------------------------------------
    def check_share_message(self, msg: Message) -> None:
        """One participant's round-1 message on its own (ValueError naming what is wrong)."""
        if not self._roster:
            raise RuntimeError("shares before collect_advertisements()")
        self.session.check_message(msg, KIND_SHARES)
        if msg.sender not in self._roster:
            raise ValueError(f"shares from {msg.sender!r}, who did not advertise keys in round 0")
        to = _ids_from_bytes(msg.payload.get("to"), "share recipients")
        blobs = _bytes_list(msg, "ciphertexts")
        expected = set(self._roster) - {msg.sender}
        if len(to) != len(blobs) or set(to) != expected or len(set(to)) != len(to):
            raise ValueError(f"share message from {msg.sender!r} must hold one share for each of {sorted(expected)}")

    def route_shares(self, share_messages: Sequence[Message]) -> dict[str, Message]:
        """Round 1 (server): forward each encrypted share to its holder; the senders form ``U2``.

        Returns
        -------
        dict[str, Message]
            The share inbox for each participant in ``U2``.
        """
        if not self._roster:
            raise RuntimeError("route_shares() before collect_advertisements()")
        outgoing: dict[str, dict[str, bytes]] = {}
        for msg in share_messages:
            self.check_share_message(msg)
            if msg.sender in outgoing:
                raise ValueError(f"two share messages from {msg.sender!r}")
            to = _ids_from_bytes(msg.payload.get("to"), "share recipients")
            outgoing[msg.sender] = dict(zip(to, _bytes_list(msg, "ciphertexts"), strict=True))
        u2 = sorted(outgoing)
        if len(u2) < self.session.threshold:
            raise self.session.abort("ShareKeys", len(u2), "participants shared their keys")
        self._u2 = tuple(u2)
        self._unmasked = None
        return {
            v: self.session.message(
                sender=AGGREGATOR,
                receiver=v,
                kind=KIND_SHARE_INBOX,
                payload={"from": _ids_to_bytes(u for u in u2 if u != v), "ciphertexts": [outgoing[u][v] for u in u2 if u != v]},
            )
            for v in u2
        }

    @property
    def mask_peers(self) -> tuple[str, ...]:
        """``U2``: the participants included in the masks."""
        return self._u2

    # Round 4 ------------------------------------------------------------------------------------
    def _load(self, replies: Sequence[Message], field: str) -> tuple[list[np.ndarray], SealedTensor]:
        if not self._u2:
            raise RuntimeError("aggregation before route_shares(): rounds 0-1 have not run")
        require_replies(replies, field)
        senders = [r.sender for r in replies]
        dupes = sorted({s for s in senders if senders.count(s) > 1})
        if dupes:
            raise ValueError(f"field {field!r}: several replies from {dupes}; each participant counts once")
        strangers = sorted(set(senders) - set(self._u2))
        if strangers:
            raise ValueError(f"field {field!r}: replies from {strangers}, who did not share keys in round 1")
        if len(replies) < self.session.threshold:
            raise self.session.abort("MaskedInputCollection", len(replies), "participants sent masked inputs")
        enc = self.session.encoding
        arrays, first = [], None
        for reply in replies:
            sealed = SealedTensor.from_message(reply, field)
            where = f"reply from {reply.sender!r}, field {field!r}"
            if sealed.scheme != "secagg":
                raise ValueError(f"{where}: scheme {sealed.scheme!r}, expected 'secagg'")
            if (sealed.params.get("ring_bits"), sealed.params.get("fractional_bits")) != (enc.ring_bits, enc.fractional_bits):
                raise ValueError(f"{where}: encoded with {dict(sealed.params)}, the session uses {enc}")
            if first is None:
                first = sealed
            require_one_shape(field, [(replies[0].sender, tuple(first.shape)), (reply.sender, tuple(sealed.shape))])
            if len(sealed.chunks) != 1 or len(sealed.chunks[0]) != sealed.length * enc.dtype.itemsize:
                raise ValueError(
                    f"{where}: expected one chunk of {sealed.length * enc.dtype.itemsize} bytes, got "
                    f"{[len(c) for c in sealed.chunks]}"
                )
            arrays.append(np.frombuffer(sealed.chunks[0], dtype=enc.dtype))
        assert first is not None
        return arrays, first

    def _unmask(self, survivors: frozenset[str]) -> _Unmasked:
        """Round 4: ask the survivors for shares and reconstruct the seeds needed to remove masks."""
        if self._unmasked is not None:
            if self._unmasked.survivors != survivors:
                raise SecAggAbort(
                    f"replies come from {sorted(survivors)}, but unmasking in this session was done for "
                    f"{sorted(self._unmasked.survivors)}; the survivor set cannot change within a session"
                )
            return self._unmasked
        if self.unmask_channel is None and self.unmask_batch is None:
            raise RuntimeError("MaskingAggregator needs an unmask_channel to reach the survivors (round 4)")
        dropped = frozenset(self._u2) - survivors
        b_shares: dict[str, list[shamir.Share]] = {u: [] for u in survivors}
        s_shares: dict[str, list[shamir.Share]] = {v: [] for v in dropped}
        requests = [
            self.session.message(
                sender=AGGREGATOR,
                receiver=u,
                kind=KIND_UNMASK_REQUEST,
                payload={"survivors": _ids_to_bytes(sorted(survivors)), "dropped": _ids_to_bytes(sorted(dropped))},
            )
            for u in sorted(survivors)
        ]
        if self.unmask_batch is not None:
            answers = dict(self.unmask_batch(requests))
        else:
            answers = {r.receiver: a for r in requests if (a := self.unmask_channel(r)) is not None}  # type: ignore[misc]
        responders = 0
        for u in sorted(survivors):
            if u not in answers:
                continue
            try:
                shares = self._answer_shares(answers[u], u, survivors, dropped)
            except ValueError as exc:
                if self.unmask_batch is None:
                    raise
                self.unmask_failures.append(str(exc))
                continue
            for owner, share in shares[0]:
                b_shares[owner].append(share)
            for owner, share in shares[1]:
                s_shares[owner].append(share)
            responders += 1
        if responders < self.session.threshold:
            raise self.session.abort("Unmasking", responders, "survivors answered the unmasking request")
        self_keys = {u: _self_mask_key(self.session, u, shamir.reconstruct(b_shares[u])) for u in survivors}
        pair_seeds: dict[tuple[str, str], bytes] = {}
        for v in dropped:
            s_v = X25519PrivateKey.from_private_bytes(shamir.reconstruct(s_shares[v]))
            if _raw_public(s_v.public_key()) != self._roster[v][1]:
                raise SecAggAbort(
                    f"the mask key reconstructed for dropped participant {v!r} does not match its "
                    "advertised public key (corrupted shares)"
                )
            for u in survivors:
                pair_seeds[(u, v)] = _pair_seed(self.session, v, s_v, u, self._roster[u][1])
        self._unmasked = _Unmasked(survivors, dropped, self_keys, pair_seeds)
        return self._unmasked

    def _answer_shares(
        self, answer: Message, u: str, survivors: frozenset[str], dropped: frozenset[str]
    ) -> tuple[list[tuple[str, shamir.Share]], list[tuple[str, shamir.Share]]]:
        """The (owner, share) pairs of one unmasking answer, checked against the request (ValueError if not)."""
        self.session.check_message(answer, KIND_UNMASK)
        if answer.sender != u:
            raise ValueError(f"unmasking answer for {u!r} came from {answer.sender!r}")
        b_owners = _ids_from_bytes(answer.payload.get("b_owners"), "b_owners")
        s_owners = _ids_from_bytes(answer.payload.get("s_owners"), "s_owners")
        if set(b_owners) != survivors or set(s_owners) != dropped:
            raise ValueError(f"unmasking answer from {u!r} does not match the request")
        b_raw, s_raw = _bytes_list(answer, "b_shares"), _bytes_list(answer, "s_shares")
        if len(b_raw) != len(b_owners) or len(s_raw) != len(s_owners):
            raise ValueError(f"unmasking answer from {u!r}: owners and shares do not line up")
        try:
            return ([(o, shamir.Share.from_bytes(r)) for o, r in zip(b_owners, b_raw, strict=True)],
                    [(o, shamir.Share.from_bytes(r)) for o, r in zip(s_owners, s_raw, strict=True)])
        except Exception as exc:  # noqa: BLE001 - any malformed share is this answer's fault
            raise ValueError(f"unmasking answer from {u!r}: malformed share ({exc!r:.200})") from None

    def _ring_sum(self, replies: Sequence[Message], field: str) -> tuple[np.ndarray, SealedTensor]:
        arrays, like = self._load(replies, field)
        state = self._unmask(frozenset(r.sender for r in replies))
        dt, n = self.session.encoding.dtype, like.length
        total = np.zeros(n, dtype=dt)
        for arr in arrays:
            np.add(total, arr, out=total)
        masks = _MaskAccumulator(total, field)
        for key in state.self_keys.values():
            masks.add(key, sign=-1)
        for (u, v), seed in state.dropped_pair_seeds.items():
            # Survivor u added +PRG(s_uv) if u < v, else -PRG(s_uv); v's opposite mask never arrived.
            masks.add(seed, sign=-1 if u < v else +1)
        return total, like

    def _decode(self, total: np.ndarray, like: SealedTensor, divisor: float = 1.0) -> torch.Tensor:
        values = self.session.encoding.decode(total) / divisor
        return from_float64(values.reshape(like.shape), torch_dtype(like.dtype))

    def sum(self, replies: Sequence[Message], field: str) -> torch.Tensor:
        """Unmasked element-wise sum over the replies (exact in the ring, then decoded)."""
        total, like = self._ring_sum(replies, field)
        return self._decode(total, like)

    def mean(self, replies: Sequence[Message], field: str) -> torch.Tensor:
        """Unweighted mean over the replies that arrived (the survivors)."""
        for reply in replies:
            if "weight" in SealedTensor.from_message(reply, field).params:
                raise ValueError(f"reply from {reply.sender!r} was pre-weighted; use weighted_mean()")
        total, like = self._ring_sum(replies, field)
        return self._decode(total, like, float(len(replies)))

    def weighted_mean(
        self, replies: Sequence[Message], field: str, weights: Sequence[float] | Mapping[str, float]
    ) -> torch.Tensor:
        """Weighted mean ``sum_k w_k x_k / sum_k w_k`` over the survivors.

        Masks only cancel in an unweighted sum, so each client must have
        multiplied its input by its public weight before masking
        (``client.mask_input(x, field=..., weight=w_k)``). ``weights`` is checked
        against the weights the replies declare.
        """
        if isinstance(weights, Mapping):
            given = {r.sender: float(weights[r.sender]) for r in replies if r.sender in weights}
        else:
            weights = list(weights)
            if len(weights) != len(replies):
                raise ValueError(f"weighted_mean: {len(weights)} weights for {len(replies)} replies")
            given = {r.sender: float(w) for r, w in zip(replies, weights, strict=True)}
        for reply in replies:
            declared = SealedTensor.from_message(reply, field).params.get("weight")
            if declared is None:
                raise ValueError(
                    f"reply from {reply.sender!r} was not pre-weighted; under masking each client must call "
                    "mask_input(..., weight=w) because the server cannot weight masked values"
                )
            if reply.sender not in given or not math.isclose(given[reply.sender], float(declared), rel_tol=1e-12):
                raise ValueError(
                    f"weighted_mean: weight for {reply.sender!r} is {given.get(reply.sender)}, but its reply was "
                    f"masked with weight {declared}"
                )
        total_weight = math.fsum(given[r.sender] for r in replies)
        if total_weight <= 0:
            raise ValueError(f"weighted_mean: weights sum to {total_weight}; at least one must be positive")
        total, like = self._ring_sum(replies, field)
        return self._decode(total, like, total_weight)


# -- in-process simulation -----------------------------------------------------------------------
@dataclass
class SecAggSimulation:
    """Clients and server of one session wired together in-process (for simulation and tests).

    Attributes
    ----------
    clients
        The clients still in the session after set-up (``U2``), by id.
    aggregator
        The server, whose ``unmask_channel`` reaches ``clients`` unless they are in :attr:`offline`.
    offline
        Ids that no longer answer (see :meth:`drop`).
    traffic
        Every set-up and unmasking message exchanged, for byte accounting.
    """

    session: MaskingSession
    clients: dict[str, MaskingClient]
    aggregator: MaskingAggregator
    offline: set[str] = field(default_factory=set)
    traffic: list[Message] = field(default_factory=list)

    @classmethod
    def setup(
        cls,
        session: MaskingSession,
        *,
        drop_before_advertise: Iterable[str] = (),
        drop_before_share_keys: Iterable[str] = (),
        client_secrets: Mapping[str, ClientSecrets] | None = None,
    ) -> SecAggSimulation:
        """Run rounds 0 (AdvertiseKeys) and 1 (ShareKeys) in-process.

        Parameters
        ----------
        drop_before_advertise, drop_before_share_keys
            Participants that go silent before that phase.
        client_secrets
            Optional fixed secrets per participant (tests and reproducibility only).
        """
        sim = cls(session=session, clients={}, aggregator=MaskingAggregator(session))
        sim.aggregator.unmask_channel = sim._deliver_unmask
        gone0, gone1 = set(drop_before_advertise), set(drop_before_share_keys)
        clients = {
            pid: MaskingClient(session, pid, client_secrets=(client_secrets or {}).get(pid))
            for pid in session.participant_ids
            if pid not in gone0
        }
        adverts = [c.advertise_keys() for c in clients.values()]
        roster = sim.aggregator.collect_advertisements(adverts)
        share_msgs = [c.share_keys(roster) for pid, c in clients.items() if pid not in gone1]
        inboxes = sim.aggregator.route_shares(share_msgs)
        for pid, inbox in inboxes.items():
            clients[pid].receive_shares(inbox)
        sim.traffic += [*adverts, *([roster] * len(clients)), *share_msgs, *inboxes.values()]
        sim.clients = {pid: clients[pid] for pid in inboxes}
        return sim

    def drop(self, *participant_ids: str) -> None:
        """Mark participants as gone: they will not answer the unmasking request."""
        self.offline.update(participant_ids)

    def _deliver_unmask(self, request: Message) -> Message | None:
        if request.receiver in self.offline or request.receiver not in self.clients:
            return None
        answer = self.clients[request.receiver].unmask(request)
        self.traffic += [request, answer]
        return answer
