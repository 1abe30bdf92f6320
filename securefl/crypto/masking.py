"""Secure aggregation by pairwise masking (the SecAgg family), with real cryptography.

K. Bonawitz, V. Ivanov, B. Kreuter, A. Marcedone, H. B. McMahan, S. Patel,
D. Ramage, A. Segal, K. Seth, "Practical Secure Aggregation for
Privacy-Preserving Machine Learning", ACM CCS 2017 (the semi-honest protocol,
Figure 4: rounds 0-2 and 4; the active-security consistency check, round 3,
and the signatures of keys are left to :mod:`securefl.crypto.signing`).

Each participant ``u`` adds to its fixed-point encoded input ``x_u`` (ring
``Z_{2^k}``, see :mod:`securefl.crypto.fixedpoint`)

* a pairwise mask ``+PRG(s_uv)`` for every peer ``v`` with ``u < v`` and
  ``-PRG(s_uv)`` for ``u > v``, which cancel in the sum, and
* a self mask ``+PRG(b_u)``, which the server removes after the survivors
  reveal their shares of ``b_u``.

Cryptography (all from ``cryptography``; nothing from numpy's RNG):

* two X25519 key pairs per participant and round: ``c`` for the share
  channel, ``s`` for the pairwise masks;
* pairwise seeds ``s_uv = HKDF-SHA256(X25519(s_u, s_v), info = run id, round,
  both ids)``; the self-mask key is ``HKDF(b_u, info = run id, round, u)``;
* the PRG is the ChaCha20 keystream, keyed per seed and per payload field
  (``HKDF(seed, info = field)``, zero nonce: every key produces one stream),
  read as little-endian ring elements;
* ``s_u``'s private key and the 32-byte seed ``b_u`` are Shamir-shared
  (threshold ``t``, :mod:`securefl.crypto.shamir`); each share travels to its
  holder through the server under AES-256-GCM with the pairwise channel key,
  with the sender, receiver, run id and round bound as associated data.

Phases and the calls that implement them::

    Round 0  AdvertiseKeys         client.advertise_keys()      -> server.collect_advertisements()
    Round 1  ShareKeys             client.share_keys(roster)    -> server.route_shares()
                                                                 -> client.receive_shares(inbox)
    Round 2  MaskedInputCollection client.mask_input(x, field=) (a SealedTensor in the reply message)
    Round 4  Unmasking             server.sum/mean/weighted_mean(replies, field)
                                     asks each survivor client.unmask(request) through ``unmask_channel``

This module holds the session, the client and the primitives both sides share.
The server (``server`` above) is the aggregator one floor up,
:class:`securefl.layers.masking_aggregator.MaskingAggregator`, and
:class:`~securefl.layers.masking_aggregator.SecAggSimulation` wires clients and
server together in-process and runs rounds 0-1 for you. In a deployment the
same messages travel between the coordinator and the nodes
(:mod:`securefl.layers.secure_aggregation`, ``MaskingCoordinatorLayer`` and
``MaskingNodeLayer``); a node keeps its client between phases with
:meth:`MaskingClient.export_state`, and the server asks every survivor at once
(``unmask_batch``).

Dropouts. Participants missing at round 1 are simply left out of the masks
(``U2``). Participants who shared keys but send no masked input (``U2 \\ U3``)
are recovered: the server reconstructs their ``s`` key from ``>= t`` shares
and removes their pairwise masks from the survivors' inputs. If fewer than
``t`` participants are left at any phase, :class:`SecAggAbort` is raised and no
partial result is returned.

Threat model. Against a semi-honest server (the paper's Theorem 6.2), the
server together with fewer than ``t`` participants learns nothing about the
honest survivors' inputs beyond their sum. Against a server that lies about
who dropped out: every client answers the unmasking request for one survivor
set only, and ``t > n/2`` is enforced, so the ``b_u`` shares and the ``s_u``
shares of one participant can never both reach ``t``. Not covered: a server
that substitutes public keys in the roster (a man in the middle); the paper's
active variant signs the advertised keys, so sign these messages with
:mod:`securefl.crypto.signing` and verify them against known party keys; the
round 3 consistency check is not implemented. Unlike CKKS, the server learns
the sum in the clear (that is the design), and a coalition of the server with
``t`` or more participants can unmask an individual input. With CKKS the
aggregator alone sees nothing, but any key holder can decrypt an intercepted
ciphertext.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefl.core.codec import DecodeError, decode, encode
from securefl.core.message import AGGREGATOR, Message
from securefl.core.sealed import SealedTensor, dtype_name, to_float64
from securefl.crypto import shamir
from securefl.crypto.errors import SecAggAbort
from securefl.crypto.fixedpoint import FixedPoint
from securefl.crypto.wire import SecretHolder
from securefl.crypto.wire import length_prefixed as _lp
from securefl.crypto.wire import split_length_prefixed as _unlp

__all__ = [
    "ClientSecrets",
    "MaskingClient",
    "MaskingSession",
    "prg_stream",
]

_DOMAIN = b"securefl/secagg/v1"
KIND_ADVERTISE = "secagg/advertise"
KIND_ROSTER = "secagg/roster"
KIND_SHARES = "secagg/shares"
KIND_SHARE_INBOX = "secagg/share-inbox"
KIND_UNMASK_REQUEST = "secagg/unmask-request"
KIND_UNMASK = "secagg/unmask"


# -- primitives ------------------------------------------------------------------------------------
def _hkdf(ikm: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_DOMAIN + info).derive(ikm)


def _raw_public(key: X25519PublicKey) -> bytes:
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _raw_private(key: X25519PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())


_ZERO_NONCE = b"\x00" * 16


def _keystream_into(seed: bytes, field: str, out: np.ndarray, zeros: bytes) -> np.ndarray:
    # Writing the keystream straight into a preallocated array (update_into) is
    # about 4x faster than allocating a fresh zero buffer and output per stream.
    key = _hkdf(seed, _lp("prg", field))
    encryptor = Cipher(algorithms.ChaCha20(key, _ZERO_NONCE), mode=None).encryptor()
    encryptor.update_into(zeros, out.data.cast("B"))
    return out


def prg_stream(seed: bytes, *, field: str, length: int, dtype: np.dtype) -> np.ndarray:
    """Expand a 32-byte seed into ``length`` uniform ring elements with ChaCha20.

    The ChaCha20 key is ``HKDF-SHA256(seed, info = field)``, so every payload
    field gets an independent stream (reusing a mask on two fields would leak
    their difference), and the nonce is zero because each key is used once.
    The keystream bytes are read as little-endian ring elements.

    Parameters
    ----------
    seed
        32 secret bytes (a pairwise seed or a self-mask key).
    field
        The payload field being masked.
    length
        Number of elements.
    dtype
        ``<u8`` or ``<u4``.
    """
    out = np.empty(length, dtype=dtype)
    return _keystream_into(seed, field, out, bytes(out.nbytes))


class _MaskAccumulator:
    """Adds and subtracts PRG streams into one ring vector in place, reusing its buffers."""

    def __init__(self, acc: np.ndarray, field: str) -> None:
        self.acc = acc
        self.field = field
        self._scratch = np.empty_like(acc)
        self._zeros = bytes(acc.nbytes)

    def add(self, seed: bytes, *, sign: int) -> None:
        stream = _keystream_into(seed, self.field, self._scratch, self._zeros)
        if sign > 0:
            np.add(self.acc, stream, out=self.acc)
        else:
            np.subtract(self.acc, stream, out=self.acc)


def _ids_to_bytes(ids: Iterable[str]) -> list[bytes]:
    return [i.encode() for i in ids]


def _ids_from_bytes(raw: Any, what: str) -> list[str]:
    if not isinstance(raw, list) or not all(isinstance(b, bytes) for b in raw):
        raise ValueError(f"{what} must be list[bytes] of participant ids")
    return [b.decode() for b in raw]


def _bytes_list(msg: Message, name: str) -> list[bytes]:
    value = msg.payload.get(name)
    if not isinstance(value, list) or not all(isinstance(b, bytes) for b in value):
        raise ValueError(f"message {msg.kind!r} from {msg.sender!r}: payload field {name!r} must be list[bytes]")
    return value


# -- session ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class MaskingSession:
    """Public parameters of one secure-aggregation instance (one round of one run).

    Parameters
    ----------
    run_id, round
        Bound into every key derivation, so masks never repeat across rounds or runs.
    participant_ids
        Everyone who may take part; stored as a sorted tuple (the order defines the mask signs).
    threshold
        ``t``: shares needed to reconstruct a secret, and the minimum number of
        participants at every phase. Must satisfy ``n/2 < t <= n``.
    encoding
        The fixed-point ring encoding (default ``k = 64``, ``f = 24``).
    """

    run_id: str
    round: int
    participant_ids: Sequence[str]
    threshold: int
    encoding: FixedPoint = field(default_factory=FixedPoint)

    def __post_init__(self) -> None:
        if isinstance(self.participant_ids, str) or not all(isinstance(i, str) and i for i in self.participant_ids):
            raise ValueError(f"participant_ids must be a sequence of non-empty strings, got {self.participant_ids!r}")
        ids = tuple(sorted(self.participant_ids))
        object.__setattr__(self, "participant_ids", ids)
        if len(set(ids)) != len(ids):
            dupes = sorted({i for i in ids if ids.count(i) > 1})
            raise ValueError(f"participant_ids contains duplicates: {dupes}")
        n = len(ids)
        if n < 2:
            raise ValueError(f"secure aggregation needs at least 2 participants, got {n}")
        if not n // 2 < self.threshold <= n:
            raise ValueError(f"threshold must satisfy n/2 < t <= n (a majority) for n={n} participants, got {self.threshold}")
        if self.round < 0:
            raise ValueError(f"round must be >= 0, got {self.round}")

    @staticmethod
    def default_threshold(n: int) -> int:
        """A common choice: a strict majority, ``floor(n/2) + 1``."""
        return n // 2 + 1

    def x_of(self, participant: str) -> int:
        """The Shamir evaluation point of ``participant`` (1-based index in the sorted ids)."""
        try:
            return self.participant_ids.index(participant) + 1
        except ValueError:
            raise ValueError(f"{participant!r} is not a participant of this session {self.participant_ids}") from None

    def abort(self, phase: str, have: int, what: str) -> SecAggAbort:
        """The error that ends the session at ``phase``: fewer than t parties left (no partial result)."""
        return SecAggAbort(
            f"secure aggregation aborted in round {self.round} of run {self.run_id!r} at {phase}: "
            f"only {have} {what}, below the threshold t={self.threshold}; no partial result is returned"
        )

    def message(self, *, sender: str, receiver: str, kind: str, payload: dict[str, Any]) -> Message:
        return Message(sender=sender, receiver=receiver, run_id=self.run_id, round=self.round, kind=kind, payload=payload)

    def check_message(self, msg: Message, kind: str) -> None:
        """Refuse a message of another kind, run or round than this session expects at this phase."""
        if not isinstance(msg, Message):
            raise TypeError(f"expected a Message of kind {kind!r}, got {type(msg).__name__}")
        if msg.kind != kind or msg.run_id != self.run_id or msg.round != self.round:
            raise ValueError(
                f"expected a {kind!r} message of run {self.run_id!r} round {self.round}, got {msg.kind!r} "
                f"of run {msg.run_id!r} round {msg.round} from {msg.sender!r}"
            )


def _session_identity(session: MaskingSession) -> list[Any]:
    enc = session.encoding
    return [session.run_id, session.round, list(session.participant_ids), session.threshold,
            enc.ring_bits, enc.fractional_bits]


def _pair_info(session: MaskingSession, purpose: str, u: str, v: str) -> bytes:
    lo, hi = sorted((u, v))
    return _lp(purpose, session.run_id, session.round, lo, hi)


def _self_mask_key(session: MaskingSession, participant: str, b_seed: bytes) -> bytes:
    return _hkdf(b_seed, _lp("self-mask", session.run_id, session.round, participant))


def _pair_seed(session: MaskingSession, me: str, my_s: X25519PrivateKey, peer: str, peer_s: bytes) -> bytes:
    shared = my_s.exchange(X25519PublicKey.from_public_bytes(peer_s))
    return _hkdf(shared, _pair_info(session, "pair-mask", me, peer))


# -- client ----------------------------------------------------------------------------------------
class ClientSecrets(SecretHolder):
    """A participant's secrets for one session: two X25519 keys and the self-mask seed ``b_u``.

    Fresh by default (:meth:`generate`). Passing fixed bytes is for tests and
    reproducibility only. Secrets are single-use: once a participant is
    treated as dropped, the server reconstructs its mask key, so reusing it in
    another round would let the server strip that participant's pairwise
    masks. An object is therefore bound to the first session that uses it.
    """

    _secret_kind = "SecAgg secret key and self-mask seed"

    def __init__(self, *, channel_key: bytes, mask_key: bytes, self_mask_seed: bytes) -> None:
        if len(self_mask_seed) != 32:
            raise ValueError(f"self_mask_seed must be 32 bytes, got {len(self_mask_seed)}")
        self.channel_key = X25519PrivateKey.from_private_bytes(channel_key)
        self.mask_key = X25519PrivateKey.from_private_bytes(mask_key)
        self.self_mask_seed = bytes(self_mask_seed)
        self._bound_to: tuple[str, int, str] | None = None

    def _bind(self, session: MaskingSession, participant: str) -> None:
        key = (session.run_id, session.round, participant)
        if self._bound_to is not None and self._bound_to != key:
            raise ValueError(
                f"ClientSecrets are single-use: already used by {self._bound_to[2]!r} in run "
                f"{self._bound_to[0]!r} round {self._bound_to[1]}; generate fresh ones for each round"
            )
        self._bound_to = key

    @classmethod
    def generate(cls) -> ClientSecrets:
        return cls(
            channel_key=_raw_private(X25519PrivateKey.generate()),
            mask_key=_raw_private(X25519PrivateKey.generate()),
            self_mask_seed=secrets.token_bytes(32),
        )

    def __repr__(self) -> str:
        return "ClientSecrets(<hidden>)"


class MaskingClient(SecretHolder):
    """The participant side of secure aggregation for one :class:`MaskingSession`.

    Parameters
    ----------
    session
        The shared public parameters.
    participant_id
        This participant's id (one of ``session.participant_ids``).
    client_secrets
        Keyword-only; fresh secrets by default (see :class:`ClientSecrets`).
    """

    _secret_kind = "SecAgg secret key, self-mask seed and peers' shares"

    def __init__(self, session: MaskingSession, participant_id: str, *, client_secrets: ClientSecrets | None = None) -> None:
        session.x_of(participant_id)
        self.session = session
        self.id = participant_id
        self._secrets = client_secrets or ClientSecrets.generate()
        self._secrets._bind(session, participant_id)
        self._roster: dict[str, tuple[bytes, bytes]] = {}
        self._u2: tuple[str, ...] = ()
        self._held: dict[str, tuple[shamir.Share, shamir.Share]] = {}  # owner -> (s-key share, b share)
        self._pair_seeds: dict[str, bytes] = {}
        self._channels: dict[str, AESGCM] = {}
        self._masked_fields: set[str] = set()
        self._answered: frozenset[str] | None = None

    @property
    def public_keys(self) -> tuple[bytes, bytes]:
        """``(channel public key, mask public key)``, raw 32 bytes each."""
        return _raw_public(self._secrets.channel_key.public_key()), _raw_public(self._secrets.mask_key.public_key())

    def _channel(self, peer: str) -> AESGCM:
        if peer not in self._channels:
            c_peer = X25519PublicKey.from_public_bytes(self._roster[peer][0])
            shared = self._secrets.channel_key.exchange(c_peer)
            self._channels[peer] = AESGCM(_hkdf(shared, _pair_info(self.session, "share-channel", self.id, peer)))
        return self._channels[peer]

    # Round 0 ------------------------------------------------------------------------------------
    def advertise_keys(self) -> Message:
        """Round 0 (AdvertiseKeys): send both public keys to the server."""
        c_pk, s_pk = self.public_keys
        return self.session.message(
            sender=self.id, receiver=AGGREGATOR, kind=KIND_ADVERTISE, payload={"c_pk": c_pk, "s_pk": s_pk}
        )

    # Round 1 ------------------------------------------------------------------------------------
    def share_keys(self, roster: Message) -> Message:
        """Round 1 (ShareKeys): Shamir-share ``s_u`` and ``b_u`` with everyone in the roster ``U1``.

        Each peer's share pair is encrypted with AES-GCM under the pairwise
        channel key and sent through the server. This client keeps its own share.
        """
        self.session.check_message(roster, KIND_ROSTER)
        ids = _ids_from_bytes(roster.payload.get("ids"), "roster ids")
        c_pks, s_pks = _bytes_list(roster, "c_pks"), _bytes_list(roster, "s_pks")
        if not (len(ids) == len(c_pks) == len(s_pks)) or len(set(ids)) != len(ids):
            raise ValueError("malformed roster: ids and keys do not line up, or ids repeat")
        for pid in ids:
            self.session.x_of(pid)
        if self.id not in ids:
            raise ValueError(f"the roster does not include this participant {self.id!r}")
        if (c_pks[ids.index(self.id)], s_pks[ids.index(self.id)]) != self.public_keys:
            raise ValueError(f"the roster lists different public keys for {self.id!r} than the ones it advertised")
        if len(ids) < self.session.threshold:
            raise self.session.abort("ShareKeys", len(ids), "participants advertised keys")
        self._roster = {pid: (c, s) for pid, c, s in zip(ids, c_pks, s_pks, strict=True)}
        xs = [self.session.x_of(pid) for pid in ids]
        t = self.session.threshold
        s_shares = shamir.split(_raw_private(self._secrets.mask_key), threshold=t, xs=xs)
        b_shares = shamir.split(self._secrets.self_mask_seed, threshold=t, xs=xs)
        to, ciphertexts = [], []
        for pid, s_share, b_share in zip(ids, s_shares, b_shares, strict=True):
            if pid == self.id:
                self._held[self.id] = (s_share, b_share)
                continue
            nonce = secrets.token_bytes(12)
            plaintext = _lp(self.id, pid, s_share.to_bytes(), b_share.to_bytes())
            aad = _lp("share", self.session.run_id, self.session.round, self.id, pid)
            to.append(pid.encode())
            ciphertexts.append(nonce + self._channel(pid).encrypt(nonce, plaintext, aad))
        return self.session.message(
            sender=self.id, receiver=AGGREGATOR, kind=KIND_SHARES, payload={"to": to, "ciphertexts": ciphertexts}
        )

    def receive_shares(self, inbox: Message) -> None:
        """End of round 1: decrypt and keep the shares forwarded by the server; learn ``U2``."""
        self.session.check_message(inbox, KIND_SHARE_INBOX)
        if not self._roster:
            raise RuntimeError(f"{self.id!r}: receive_shares() before share_keys()")
        senders = _ids_from_bytes(inbox.payload.get("from"), "share inbox senders")
        ciphertexts = _bytes_list(inbox, "ciphertexts")
        if len(senders) != len(ciphertexts) or len(set(senders)) != len(senders) or self.id in senders:
            raise ValueError(f"{self.id!r}: malformed share inbox (senders {senders})")
        for pid, blob in zip(senders, ciphertexts, strict=True):
            if pid not in self._roster:
                raise ValueError(f"{self.id!r}: share from {pid!r}, who is not in the roster")
            aad = _lp("share", self.session.run_id, self.session.round, pid, self.id)
            try:
                plaintext = self._channel(pid).decrypt(blob[:12], blob[12:], aad)
                owner, holder, s_raw, b_raw = _unlp(plaintext, 4)
            except Exception as exc:  # noqa: BLE001 - InvalidTag or a malformed record
                raise ValueError(f"{self.id!r}: the share from {pid!r} failed to decrypt or parse ({exc!r})") from exc
            if (owner.decode(), holder.decode()) != (pid, self.id):
                raise ValueError(f"{self.id!r}: share labelled {owner!r}->{holder!r} arrived as {pid!r}->{self.id!r}")
            self._held[pid] = (shamir.Share.from_bytes(s_raw), shamir.Share.from_bytes(b_raw))
        u2 = sorted([*senders, self.id])
        if len(u2) < self.session.threshold:
            raise self.session.abort("ShareKeys", len(u2), "participants shared their keys")
        self._u2 = tuple(u2)

    @property
    def mask_peers(self) -> tuple[str, ...]:
        """``U2``: the participants whose pairwise masks this client adds."""
        return self._u2

    # Round 2 ------------------------------------------------------------------------------------
    def _pair_seed(self, peer: str) -> bytes:
        if peer not in self._pair_seeds:
            self._pair_seeds[peer] = _pair_seed(self.session, self.id, self._secrets.mask_key, peer, self._roster[peer][1])
        return self._pair_seeds[peer]

    def mask_input(self, values: torch.Tensor | np.ndarray, *, field: str, weight: float | None = None) -> SealedTensor:
        """Round 2 (MaskedInputCollection): return ``y_u = x_u + PRG(b_u) + sum_v ±PRG(s_uv) mod 2^k``.

        Parameters
        ----------
        values
            The plaintext payload (any shape).
        field
            The payload field name; it keys the masks, and may be masked once per session.
        weight
            Optional public weight: the input is multiplied by it *before*
            masking, for :meth:`~securefl.layers.masking_aggregator.MaskingAggregator.weighted_mean` (masks only
            cancel in an unweighted sum, so the server cannot weight later).
        """
        if not self._u2:
            raise RuntimeError(f"{self.id!r}: mask_input() before receive_shares() (round 1 not finished)")
        if self._answered is not None:
            raise SecAggAbort(f"{self.id!r}: unmasking has started; refusing to send a new masked input")
        if field in self._masked_fields:
            raise ValueError(f"{self.id!r}: field {field!r} was already masked in this session; a mask is never reused")
        tensor_dtype = values.dtype if isinstance(values, torch.Tensor) else torch.float64
        arr = to_float64(values)
        shape = tuple(arr.shape)
        params: dict[str, Any] = {
            "ring_bits": self.session.encoding.ring_bits,
            "fractional_bits": self.session.encoding.fractional_bits,
        }
        if weight is not None:
            weight = float(weight)
            if not math.isfinite(weight) or weight < 0:
                raise ValueError(f"{self.id!r}: weight must be finite and >= 0, got {weight}")
            arr = arr * weight
            params["weight"] = weight
        enc = self.session.encoding
        y = np.ascontiguousarray(enc.encode(arr, n_contributors=len(self._u2)), dtype=enc.dtype)
        n, dt = y.size, enc.dtype
        masks = _MaskAccumulator(y, field)
        masks.add(_self_mask_key(self.session, self.id, self._secrets.self_mask_seed), sign=+1)
        for peer in self._u2:
            if peer != self.id:
                masks.add(self._pair_seed(peer), sign=+1 if self.id < peer else -1)
        self._masked_fields.add(field)
        return SealedTensor(
            chunks=(y.astype(dt, copy=False).tobytes(),),
            length=int(n),
            shape=shape,
            scheme="secagg",
            dtype=dtype_name(tensor_dtype),
            params=params,
        )

    def seal(self, tensor: torch.Tensor, *, field: str) -> SealedTensor:
        """:class:`~securefl.core.sealed.Sealer` protocol: :meth:`mask_input` without a weight."""
        return self.mask_input(tensor, field=field)

    # Round 4 ------------------------------------------------------------------------------------
    def unmask(self, request: Message) -> Message:
        """Round 4 (Unmasking): reveal ``b`` shares of survivors and ``s`` shares of dropped participants.

        A client answers for one survivor set only: answering twice with
        different sets could hand the server both shares of the same peer.
        """
        self.session.check_message(request, KIND_UNMASK_REQUEST)
        survivors = set(_ids_from_bytes(request.payload.get("survivors"), "survivors"))
        dropped = set(_ids_from_bytes(request.payload.get("dropped"), "dropped"))
        if not self._u2:
            raise SecAggAbort(f"{self.id!r}: unmasking requested before this client finished round 1")
        if survivors & dropped or survivors | dropped != set(self._u2):
            raise SecAggAbort(
                f"{self.id!r}: inconsistent unmasking request: survivors {sorted(survivors)} and dropped "
                f"{sorted(dropped)} must partition the participants who shared keys {list(self._u2)}"
            )
        if self.id not in survivors:
            raise SecAggAbort(f"{self.id!r}: unmasking request lists this client as dropped")
        if len(survivors) < self.session.threshold:
            raise self.session.abort("Unmasking", len(survivors), "survivors")
        frozen = frozenset(survivors)
        if self._answered is not None and self._answered != frozen:
            raise SecAggAbort(
                f"{self.id!r}: already answered unmasking for survivors {sorted(self._answered)}; refusing a "
                f"second answer for {sorted(frozen)} (it could reveal both shares of a participant)"
            )
        self._answered = frozen
        b_from = sorted(survivors)
        s_from = sorted(dropped)
        return self.session.message(
            sender=self.id,
            receiver=AGGREGATOR,
            kind=KIND_UNMASK,
            payload={
                "b_owners": _ids_to_bytes(b_from),
                "b_shares": [self._held[o][1].to_bytes() for o in b_from],
                "s_owners": _ids_to_bytes(s_from),
                "s_shares": [self._held[o][0].to_bytes() for o in s_from],
            },
        )

    # Between processes ---------------------------------------------------------------------------
    def export_state(self) -> bytes:
        """Everything this client must remember between the phases of its session, as wire bytes.

        A deployed node may run each phase in a fresh process, so it keeps this between them. It holds the
        client's secrets and its peers' shares: store it where only the data owner can read it, and delete it
        when the session is over. A client restored from it keeps its promises: one survivor set answered,
        no field masked twice.
        """
        return encode({
            "session": _session_identity(self.session),
            "participant": self.id,
            "channel_key": _raw_private(self._secrets.channel_key),
            "mask_key": _raw_private(self._secrets.mask_key),
            "self_mask_seed": self._secrets.self_mask_seed,
            "roster": {pid: [c, s] for pid, (c, s) in self._roster.items()},
            "u2": list(self._u2),
            "held": {owner: [s.to_bytes(), b.to_bytes()] for owner, (s, b) in self._held.items()},
            "masked_fields": sorted(self._masked_fields),
            "answered": sorted(self._answered) if self._answered is not None else None,
        })

    @classmethod
    def from_state(cls, session: MaskingSession, participant_id: str, state: bytes) -> MaskingClient:
        """The client that :meth:`export_state` saved, for the same session and participant only."""
        try:
            saved = decode(state)
            if saved["session"] != _session_identity(session) or saved["participant"] != participant_id:
                raise ValueError(f"saved for participant {saved['participant']!r} in session {saved['session']}, "
                                 f"not {participant_id!r} in {_session_identity(session)}")
            client = cls(session, participant_id, client_secrets=ClientSecrets(
                channel_key=saved["channel_key"], mask_key=saved["mask_key"], self_mask_seed=saved["self_mask_seed"]))
            client._roster = {pid: (bytes(c), bytes(s)) for pid, (c, s) in saved["roster"].items()}
            client._u2 = tuple(saved["u2"])
            client._held = {owner: (shamir.Share.from_bytes(s), shamir.Share.from_bytes(b))
                            for owner, (s, b) in saved["held"].items()}
            client._masked_fields = set(saved["masked_fields"])
            answered = saved["answered"]
            client._answered = frozenset(answered) if answered is not None else None
        except (DecodeError, KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"saved SecAgg client state is unusable: {str(exc):.300}") from None
        return client

    def __repr__(self) -> str:
        return f"MaskingClient({self.id!r}, run={self.session.run_id!r}, round={self.session.round})"
