"""Ed25519 message signatures and verification (replay, reorder, forgery and tampering checks).

privacy.md requires that every message be signed by its sender and carry the
run id, round and kind, and that a replayed, reordered, forged or malformed
message be rejected with a clear error (the round goes on without it, and the
rejection is logged). Signatures use Ed25519 (Bernstein et al., "High-speed
high-security signatures", 2012; RFC 8032) from the ``cryptography`` library.

What is signed (format v2, hash-then-sign): :func:`message_digest` streams an
unambiguous encoding, with type tags and length prefixes, of the sender,
receiver, run id, round, kind, every payload field (sorted by name; tensors as
dtype + shape + the SHA-256 of their raw little-endian bytes; bytes as their
length and SHA-256; ``list[bytes]`` item by item) and the meta dict except
``meta["signature"]`` itself into one SHA-256. Ed25519 signs
:func:`canonical_bytes`: the domain-separation and version prefix
``b"securefl/message/v2\x00sha256\x00"`` followed by that 32-byte digest. A
change to any of those fields changes the digest (SHA-256 collision
resistance), so it breaks the signature. Format v1 signed the whole encoding
(Ed25519 then hashed megabytes of ciphertext twice with SHA-512); its
signatures do not verify as v2, and v2 nodes reject them as ``"bad
signature"``. The signature is stored as a hex string in ``meta["signature"]``.

What :class:`MessageVerifier` rejects, and the ``reason`` it gives
(:class:`~securefl.crypto.errors.RejectedMessage`):

``"malformed"``       not a Message, missing/ill-typed signature, unencodable meta;
``"unknown sender"``  no public key for the sender;
``"wrong run id"``    the message belongs to another run;
``"wrong receiver"``  (if the verifier has an identity) addressed to someone else;
``"bad signature"``   forged, or modified after signing;
``"replay"``          this very message was accepted before, or this sender already sent this kind
                      to this receiver in this round;
``"stale"``           the round is older than the latest accepted one for that sender and kind.

A verifier given a ``state_file`` keeps what it accepted on disk (small JSON,
written atomically and fsynced before the message is let through), so a
fresh process, as when Flower starts a ClientApp for every message, still
refuses a replayed message.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.core.durable import write_atomically
from securefl.core.message import BROADCAST, Message
from securefl.crypto.errors import RejectedMessage
from securefl.crypto.wire import SecretHolder

__all__ = [
    "NONCE_META_KEY",
    "SIGNATURE_META_KEY",
    "MessageVerifier",
    "ReplayStateError",
    "PartyKeys",
    "canonical_bytes",
    "generate_signing_key",
    "load_public_key",
    "message_digest",
    "public_key_bytes",
    "sign_message",
]

SIGNATURE_META_KEY = "signature"
# A random value a signer puts in the meta before signing, so no two signing acts give the same bytes: a
# message seen again byte for byte is then a replay, never a sender that legitimately said the same twice.
NONCE_META_KEY = "nonce"
_REPLAY_FORMAT = "securefl-replay-record/1"


class ReplayStateError(ValueError):
    """A verifier's replay record on disk cannot be used (unreadable, or of another run)."""
_SIG_LEN = 64


def generate_signing_key() -> Ed25519PrivateKey:
    """Return a fresh Ed25519 private key."""
    return Ed25519PrivateKey.generate()


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """Raw 32-byte encoding of a public key (of a private key's public half)."""
    if isinstance(key, Ed25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw: bytes) -> Ed25519PublicKey:
    """Inverse of :func:`public_key_bytes`."""
    return Ed25519PublicKey.from_public_bytes(raw)


class PartyKeys(SecretHolder):
    """A party's Ed25519 signing key together with its id.

    Cannot be pickled or sent: distribute ``keys.public_key`` (or
    :func:`public_key_bytes`) instead.
    """

    _secret_kind = "Ed25519 signing key"

    def __init__(self, party_id: str, private_key: Ed25519PrivateKey) -> None:
        self.party_id = party_id
        self.private_key = private_key
        # Digests of the large bytes of the last message signed: the server signs the same aggregate
        # once per receiver, and hashes it once.
        self._leaf_digests = _LeafDigests()
        self._lock = threading.Lock()

    @classmethod
    def generate(cls, party_id: str) -> PartyKeys:
        return cls(party_id, generate_signing_key())

    @property
    def public_key(self) -> Ed25519PublicKey:
        return self.private_key.public_key()

    def sign(self, msg: Message) -> Message:
        """Sign ``msg``; its sender must be this party."""
        if msg.sender != self.party_id:
            raise ValueError(f"PartyKeys of {self.party_id!r} cannot sign a message from {msg.sender!r}")
        with self._lock:
            try:
                return _sign(msg, self.private_key, self._leaf_digests)
            finally:
                self._leaf_digests.rotate()

    def __repr__(self) -> str:
        return f"PartyKeys({self.party_id!r}, public={public_key_bytes(self.public_key).hex()[:16]}..)"


# -- canonical encoding ----------------------------------------------------------------------------
# Hash-then-sign (format v2). The encoding is streamed into one SHA-256, so no copy of a payload is
# ever built, and Ed25519 signs a short statement holding the digest: Ed25519 itself hashes what it
# signs twice with SHA-512, which for megabytes of ciphertext cost more than everything else in
# signing. Each raw byte string (a bytes value, a tensor's body) enters the stream as its length and
# its own SHA-256, which lets a signer reuse the digest of an immutable ``bytes`` object it has just
# signed (the server sends one aggregate to every participant, each copy signed for its receiver).
_STATEMENT = b"securefl/message/v2\x00sha256\x00"  # what Ed25519 signs: this prefix + the 32-byte digest
_U64 = struct.Struct("<Q")
# Large immutable bytes whose digests a signer keeps from one message to the next (smaller ones are
# cheaper to hash again than to look up).
_MEMO_MIN = 1 << 16


class _LeafDigests:
    """SHA-256 of the ``bytes`` objects of the last message a signer signed, by object identity.

    Each entry holds the object itself, so its id cannot be reused for another object while the entry
    lives, and ``bytes`` cannot change: a hit is the digest of exactly these bytes.
    """

    __slots__ = ("_last", "_next")

    def __init__(self) -> None:
        self._last: dict[int, tuple[bytes, bytes]] = {}
        self._next: dict[int, tuple[bytes, bytes]] = {}

    def digest(self, raw: bytes) -> bytes:
        entry = self._last.get(id(raw))
        if entry is not None and entry[0] is raw:
            value = entry[1]
        else:
            value = hashlib.sha256(raw).digest()
        self._next[id(raw)] = (raw, value)
        return value

    def rotate(self) -> None:
        """Keep only the digests of the message just signed."""
        self._last, self._next = self._next, {}


def _blob(h: Any, tag: bytes, raw: bytes | bytearray | memoryview, memo: _LeafDigests | None) -> None:
    if memo is not None and type(raw) is bytes and len(raw) >= _MEMO_MIN:
        digest = memo.digest(raw)
    else:
        digest = hashlib.sha256(raw).digest()
    h.update(tag + _U64.pack(len(raw)) + digest)


def _feed(h: Any, value: Any, path: str, memo: _LeafDigests | None) -> None:
    """Stream ``value``'s encoding into the hash ``h``.

    Every item is a 1-byte type tag followed by content whose size the tag and an 8-byte length (or
    item count) determine, so the encoding is prefix-free: no two different structures give the same
    stream, and with SHA-256 collision resistance no two give the same digest.
    """
    if value is None:
        h.update(b"N")
    elif isinstance(value, bool):
        h.update(b"?\x01" if value else b"?\x00")
    elif isinstance(value, int):
        raw = str(value).encode()
        h.update(b"i" + _U64.pack(len(raw)) + raw)
    elif isinstance(value, float):
        h.update(b"f" + struct.pack("<d", value if not math.isnan(value) else math.nan))
    elif isinstance(value, str):
        raw = value.encode("utf-8")
        h.update(b"s" + _U64.pack(len(raw)) + raw)
    elif isinstance(value, bytes | bytearray):
        _blob(h, b"b", value, memo)
    elif isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise TypeError(f"{path}: only dense tensors can be signed, got layout {value.layout}")
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        header = f"{str(value.dtype).removeprefix('torch.')}|{','.join(str(d) for d in value.shape)}".encode()
        h.update(b"T" + _U64.pack(len(header)) + header)
        # The tensor's own bytes, not a copy.
        _blob(h, b"r", flat.view(torch.uint8).numpy().data if flat.numel() else b"", None)
    elif isinstance(value, list | tuple):
        h.update(b"L" + _U64.pack(len(value)))
        for i, item in enumerate(value):
            _feed(h, item, f"{path}[{i}]", memo)
    elif isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"{path}: dict keys must be str to be signed, got {[type(k).__name__ for k in keys]}")
        h.update(b"D" + _U64.pack(len(keys)))
        for key in sorted(keys):
            _feed(h, key, path, memo)
            _feed(h, value[key], f"{path}[{key!r}]", memo)
    else:
        raise TypeError(f"{path}: values of type {type(value).__name__} cannot be signed")


def message_digest(msg: Message, *, _memo: _LeafDigests | None = None) -> bytes:
    """SHA-256 of the canonical encoding of everything in ``msg`` except ``meta["signature"]``.

    Raises
    ------
    TypeError
        If the payload or meta holds a value with no canonical encoding.
    """
    h = hashlib.sha256()
    for name in ("sender", "receiver", "run_id", "kind"):
        _feed(h, getattr(msg, name), name, _memo)
    _feed(h, int(msg.round), "round", _memo)
    _feed(h, dict(msg.payload), "payload", _memo)
    _feed(h, {k: v for k, v in msg.meta.items() if k != SIGNATURE_META_KEY}, "meta", _memo)
    return h.digest()


def canonical_bytes(msg: Message) -> bytes:
    """The exact bytes that are signed: a versioned, domain-separated statement of :func:`message_digest`.

    They cover everything in ``msg`` except ``meta["signature"]`` (through the digest).

    Raises
    ------
    TypeError
        If the payload or meta holds a value with no canonical encoding.
    """
    return _STATEMENT + message_digest(msg)


def sign_message(msg: Message, private_key: Ed25519PrivateKey) -> Message:
    """Return a copy of ``msg`` with an Ed25519 signature (hex) in ``meta["signature"]``."""
    return _sign(msg, private_key, None)


def _sign(msg: Message, private_key: Ed25519PrivateKey, memo: _LeafDigests | None) -> Message:
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"sign_message needs an Ed25519PrivateKey, got {type(private_key).__name__}")
    signature = private_key.sign(_STATEMENT + message_digest(msg, _memo=memo))
    return msg.with_meta(**{SIGNATURE_META_KEY: signature.hex()})


# -- verification ---------------------------------------------------------------------------------
class Roster(Mapping[str, Ed25519PublicKey]):
    """An immutable ``party id -> Ed25519PublicKey`` map, each key loaded and type-checked once."""

    def __init__(self, public_keys: Mapping[str, Ed25519PublicKey | bytes]) -> None:
        keys = {party: load_public_key(key) if isinstance(key, bytes) else key for party, key in public_keys.items()}
        for party, key in keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise TypeError(f"public key of {party!r} must be an Ed25519PublicKey, got {type(key).__name__}")
        self._keys = keys

    def __getitem__(self, party: str) -> Ed25519PublicKey:
        return self._keys[party]

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


class MessageVerifier:
    """Verify signed messages for one run, and remember what was accepted to stop replays.

    Parameters
    ----------
    run_id
        The run this verifier accepts messages for.
    public_keys
        ``party id -> Ed25519PublicKey`` (or raw 32 bytes) of every known sender.
    receiver
        Keyword-only, optional: the identity of the party verifying. If set,
        messages addressed to another party (not this one, not broadcast) are
        rejected as ``"wrong receiver"``.

    state_file
        Keyword-only, optional: where this verifier keeps what it accepted, so
        that a verifier of a later process refuses the same replays.

    Notes
    -----
    Replay and staleness are tracked per ``(sender, receiver, kind)``: the
    latest accepted round, and the digests of the messages accepted in it. A
    message accepted before (same digest) is a replay; a second message for
    the same round in this verifier's lifetime is a replay; an older round is
    stale. A message for the latest round of an earlier process with a digest
    never seen is accepted: only the sender's key can make it (a coordinator
    that resumes redoes a round, and signs its messages afresh). Only messages
    whose signature verified update this state, so a forgery cannot block the
    genuine message. Thread-safe.
    """

    def __init__(self, run_id: str, public_keys: Mapping[str, Ed25519PublicKey | bytes], *, receiver: str | None = None,
                 state_file: str | os.PathLike[str] | None = None) -> None:
        self.run_id = run_id
        self.receiver = receiver
        # A Roster is checked once and shared by the verifiers of one process (the simulation has one per
        # receiver: copying the roster into each cost K² keys at K participants); add_party copies on write.
        self._keys: Mapping[str, Ed25519PublicKey] = public_keys if isinstance(public_keys, Roster) else Roster(public_keys)
        self._latest: dict[tuple[str, str, str], int] = {}  # over this process and, with a state file, earlier ones
        self._digests: dict[tuple[str, str, str], set[str]] = {}  # accepted in the slot's latest round
        self._here: dict[tuple[str, str, str], int] = {}  # the latest round accepted by this very verifier
        self._lock = threading.Lock()
        self.state_file: Path | None = None
        if state_file is not None:
            self.persist_to(state_file)

    # ----- the replay record on disk ---------------------------------------------------------------
    def persist_to(self, state_file: str | os.PathLike[str]) -> None:
        """Keep the replay record in ``state_file`` from now on, after merging what it already holds."""
        path = Path(state_file)
        with self._lock:
            if path.exists():
                self._merge(self._read_state(path), path)
            self.state_file = path
            self._write_state()

    def _read_state(self, path: Path) -> list[Any]:
        refuse = (f"{path}: the replay record of this node; without it a replayed message would be accepted. "
                  "Restore it from the node directory's backup")
        try:
            raw = json.loads(path.read_text())
            if not isinstance(raw, dict) or raw.get("format") != _REPLAY_FORMAT or not isinstance(raw.get("slots"), list):
                raise ValueError("not a replay record")
        except (OSError, ValueError) as exc:
            raise ReplayStateError(f"{refuse} (it is unreadable: {type(exc).__name__})") from None
        if raw.get("run_id") != self.run_id:
            raise ReplayStateError(f"{path}: a replay record of run {str(raw.get('run_id'))[:80]!r}, not of run "
                                   f"{self.run_id!r}; give this run a fresh node directory")
        return raw["slots"]

    def _merge(self, slots: list[Any], path: Path) -> None:
        try:
            for sender, receiver, kind, rnd, digests in slots:
                slot = (str(sender), str(receiver), str(kind))
                if rnd > self._latest.get(slot, -1):
                    self._latest[slot], self._digests[slot] = int(rnd), {str(d) for d in digests}
                elif rnd == self._latest[slot]:
                    self._digests[slot].update(str(d) for d in digests)
        except (TypeError, ValueError) as exc:
            raise ReplayStateError(f"{path}: a malformed replay record ({type(exc).__name__}); restore it "
                                   "from the node directory's backup") from None

    def _write_state(self) -> None:
        """Write the record atomically (temporary file, fsync, rename, fsync of the directory): a crash leaves
        the old record or the new one, and a message is let through only once its record is on disk."""
        assert self.state_file is not None
        path = self.state_file
        path.parent.mkdir(parents=True, exist_ok=True)
        slots = [[*slot, rnd, sorted(self._digests.get(slot, ()))] for slot, rnd in sorted(self._latest.items())]
        record = {"format": _REPLAY_FORMAT, "run_id": self.run_id, "slots": slots}
        write_atomically(path, (json.dumps(record) + "\n").encode())

    def add_party(self, party_id: str, public_key: Ed25519PublicKey | bytes) -> None:
        """Register (or replace) a sender's public key."""
        with self._lock:
            self._keys = Roster({**self._keys, party_id: public_key})

    def new_attempt(self) -> None:
        """Behave as a verifier of a new process: a sender that redoes a round may sign its messages afresh.
        Copies of messages already accepted, and older rounds, stay refused."""
        with self._lock:
            self._here.clear()

    def seen_before(self, msg: Any) -> str | None:
        """``"replay"`` if this very message (the same signed bytes) was accepted before, by this verifier or
        one that kept the same state file; ``"stale"`` if its round is older than the latest accepted for its
        sender, receiver and kind; else ``None``. Read-only, and no signature is checked: a receiver can refuse
        such a message at once, as :meth:`verify` would."""
        if not isinstance(msg, Message):
            return None
        try:
            digest = hashlib.sha256(canonical_bytes(msg)).hexdigest()[:32]
        except TypeError:
            return None
        slot = (msg.sender, msg.receiver, msg.kind)
        with self._lock:
            if digest in self._digests.get(slot, ()):
                return "replay"
            latest = self._latest.get(slot)
            return "stale" if latest is not None and isinstance(msg.round, int) and msg.round < latest else None

    def check(self, msg: Any) -> RejectedMessage | None:
        """Like :meth:`verify`, but return the rejection instead of raising it (``None`` if accepted)."""
        try:
            self.verify(msg)
        except RejectedMessage as rejection:
            return rejection
        return None

    def verify(self, msg: Any) -> Message:
        """Accept ``msg`` (and record it against replays) or raise :class:`RejectedMessage`.

        Returns
        -------
        Message
            ``msg`` itself, so the call can wrap a receive.
        """
        if not isinstance(msg, Message):
            raise RejectedMessage("malformed", f"expected a Message, got {type(msg).__name__}")
        who = f"{msg.kind!r} from {msg.sender!r} (round {msg.round})"
        raw_sig = msg.meta.get(SIGNATURE_META_KEY)
        if raw_sig is None:
            raise RejectedMessage("malformed", f"{who} carries no signature")
        try:
            signature = bytes.fromhex(raw_sig) if isinstance(raw_sig, str) else raw_sig
        except ValueError:
            raise RejectedMessage("malformed", f"{who}: signature is not hex") from None
        if not isinstance(signature, bytes) or len(signature) != _SIG_LEN:
            raise RejectedMessage(
                "malformed",
                f"{who}: signature must be {_SIG_LEN} bytes (or their hex), got {type(raw_sig).__name__}"
                f" of length {len(raw_sig) if isinstance(raw_sig, str | bytes) else '?'}",
            )
        key = self._keys.get(msg.sender)
        if key is None:
            raise RejectedMessage("unknown sender", f"{who}: no public key for sender {msg.sender!r}")
        if msg.run_id != self.run_id:
            raise RejectedMessage("wrong run id", f"{who}: run id {msg.run_id!r}, expected {self.run_id!r}")
        if self.receiver is not None and msg.receiver not in (self.receiver, BROADCAST):
            raise RejectedMessage("wrong receiver", f"{who}: addressed to {msg.receiver!r}, this is {self.receiver!r}")
        try:
            signed = canonical_bytes(msg)
        except TypeError as exc:
            raise RejectedMessage("malformed", f"{who}: {exc}") from None
        try:
            key.verify(signature, signed)
        except InvalidSignature:
            raise RejectedMessage(
                "bad signature", f"{who}: forged, modified after signing, or signed in another format than v2"
            ) from None
        slot = (msg.sender, msg.receiver, msg.kind)
        digest = hashlib.sha256(signed).hexdigest()[:32]
        with self._lock:
            latest = self._latest.get(slot)
            if digest in self._digests.get(slot, ()) or self._here.get(slot) == msg.round:
                raise RejectedMessage("replay", f"{who}: already received {msg.kind!r} from {msg.sender!r} in round {msg.round}")
            if latest is not None and msg.round < latest:
                raise RejectedMessage("stale", f"{who}: round {msg.round} is older than the latest accepted round {latest}")
            if latest is None or msg.round > latest:
                self._digests[slot] = set()
            self._digests[slot].add(digest)
            self._latest[slot] = self._here[slot] = msg.round
            if self.state_file is not None:
                self._write_state()
        return msg
