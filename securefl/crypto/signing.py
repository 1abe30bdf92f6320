"""Ed25519 message signatures and verification (replay, reorder, forgery and tampering checks).

privacy.md requires that every message be signed by its sender and carry the
run id, round and kind, and that a replayed, reordered, forged or malformed
message be rejected with a clear error (the round goes on without it, and the
rejection is logged). Signatures use Ed25519 (Bernstein et al., "High-speed
high-security signatures", 2012; RFC 8032) from the ``cryptography`` library.

What is signed: :func:`canonical_bytes` encodes, unambiguously and with type
tags and length prefixes, the sender, receiver, run id, round, kind, every
payload field (sorted by name; tensors as dtype + shape + raw little-endian
bytes; bytes as-is; ``list[bytes]`` with each length) and the meta dict except
``meta["signature"]`` itself. The signature is stored as a hex string in
``meta["signature"]``.

What :class:`MessageVerifier` rejects, and the ``reason`` it gives
(:class:`~securefl.crypto.errors.RejectedMessage`):

``"malformed"``       not a Message, missing/ill-typed signature, unencodable meta;
``"unknown sender"``  no public key for the sender;
``"wrong run id"``    the message belongs to another run;
``"wrong receiver"``  (if the verifier has an identity) addressed to someone else;
``"bad signature"``   forged, or modified after signing;
``"replay"``          this sender already sent this kind to this receiver in this round;
``"stale"``           the round is older than the latest accepted one for that sender and kind.
"""

from __future__ import annotations

import math
import struct
import threading
from collections.abc import Mapping
from typing import Any

import torch
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.crypto.errors import RejectedMessage
from securefl.crypto.wire import SecretHolder
from securefl.runtime.message import BROADCAST, Message

__all__ = [
    "SIGNATURE_META_KEY",
    "MessageVerifier",
    "PartyKeys",
    "canonical_bytes",
    "generate_signing_key",
    "load_public_key",
    "public_key_bytes",
    "sign_message",
]

SIGNATURE_META_KEY = "signature"
_DOMAIN = b"securefl/message/v1\x00"
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
        return sign_message(msg, self.private_key)

    def __repr__(self) -> str:
        return f"PartyKeys({self.party_id!r}, public={public_key_bytes(self.public_key).hex()[:16]}..)"


# -- canonical encoding ----------------------------------------------------------------------------
# The encoder appends parts to a list and the caller joins them once: a ciphertext payload is
# megabytes, and copying it into every enclosing container cost more than the signature's hashing.
def _put(parts: list[Any], tag: bytes, raw: bytes | memoryview) -> int:
    parts.append(tag + struct.pack("<Q", len(raw)))
    parts.append(raw)
    return 9 + len(raw)


def _open(parts: list[Any]) -> int:
    """Reserve the tag and length of a container whose content follows; :func:`_close` fills them."""
    parts.append(b"")
    return len(parts) - 1


def _close(parts: list[Any], slot: int, tag: bytes, length: int) -> int:
    parts[slot] = tag + struct.pack("<Q", length)
    return 9 + length


def _encode(value: Any, parts: list[Any], path: str) -> int:
    """Append ``value``'s encoding to ``parts``; returns its length in bytes."""
    # Each value is a 1-byte type tag + 8-byte length + content, so no two
    # different structures can produce the same bytes.
    if value is None:
        return _put(parts, b"N", b"")
    if isinstance(value, bool):
        return _put(parts, b"?", b"\x01" if value else b"\x00")
    if isinstance(value, int):
        return _put(parts, b"i", str(value).encode())
    if isinstance(value, float):
        return _put(parts, b"f", struct.pack("<d", value if not math.isnan(value) else math.nan))
    if isinstance(value, str):
        return _put(parts, b"s", value.encode("utf-8"))
    if isinstance(value, bytes | bytearray):
        return _put(parts, b"b", bytes(value))
    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided or value.is_quantized:
            raise TypeError(f"{path}: only dense tensors can be signed, got layout {value.layout}")
        flat = value.detach().to("cpu").contiguous().reshape(-1)
        header = f"{str(value.dtype).removeprefix('torch.')}|{','.join(str(d) for d in value.shape)}".encode()
        # A view of the tensor's bytes (it keeps the tensor alive until the join), not a copy.
        body = memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else b""
        slot = _open(parts)
        return _close(parts, slot, b"T", _put(parts, b"h", header) + _put(parts, b"r", body))
    if isinstance(value, list | tuple):
        slot = _open(parts)
        parts.append(struct.pack("<Q", len(value)))
        length = 8 + sum(_encode(item, parts, f"{path}[{i}]") for i, item in enumerate(value))
        return _close(parts, slot, b"L", length)
    if isinstance(value, Mapping):
        keys = list(value)
        if not all(isinstance(k, str) for k in keys):
            raise TypeError(f"{path}: dict keys must be str to be signed, got {[type(k).__name__ for k in keys]}")
        slot = _open(parts)
        parts.append(struct.pack("<Q", len(keys)))
        length = 8
        for key in sorted(keys):
            length += _encode(key, parts, path)
            length += _encode(value[key], parts, f"{path}[{key!r}]")
        return _close(parts, slot, b"D", length)
    raise TypeError(f"{path}: values of type {type(value).__name__} cannot be signed")


def canonical_bytes(msg: Message) -> bytes:
    """The exact bytes that are signed: everything in ``msg`` except ``meta["signature"]``.

    Raises
    ------
    TypeError
        If the payload or meta holds a value with no canonical encoding.
    """
    parts: list[Any] = [_DOMAIN]
    for name in ("sender", "receiver", "run_id", "kind"):
        _encode(getattr(msg, name), parts, name)
    _encode(int(msg.round), parts, "round")
    _encode(dict(msg.payload), parts, "payload")
    _encode({k: v for k, v in msg.meta.items() if k != SIGNATURE_META_KEY}, parts, "meta")
    return b"".join(parts)


def sign_message(msg: Message, private_key: Ed25519PrivateKey) -> Message:
    """Return a copy of ``msg`` with an Ed25519 signature (hex) in ``meta["signature"]``."""
    if not isinstance(private_key, Ed25519PrivateKey):
        raise TypeError(f"sign_message needs an Ed25519PrivateKey, got {type(private_key).__name__}")
    signature = private_key.sign(canonical_bytes(msg))
    return msg.with_meta(**{SIGNATURE_META_KEY: signature.hex()})


# -- verification ---------------------------------------------------------------------------------
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

    Notes
    -----
    Replay and staleness are tracked per ``(sender, receiver, kind)``: the
    latest accepted round. A message for that same round again is a replay; an
    older round is stale. Only messages whose signature verified update this
    state, so a forgery cannot block the genuine message. Thread-safe.
    """

    def __init__(self, run_id: str, public_keys: Mapping[str, Ed25519PublicKey | bytes], *, receiver: str | None = None) -> None:
        self.run_id = run_id
        self.receiver = receiver
        self._keys: dict[str, Ed25519PublicKey] = {
            party: load_public_key(key) if isinstance(key, bytes) else key for party, key in public_keys.items()
        }
        for party, key in self._keys.items():
            if not isinstance(key, Ed25519PublicKey):
                raise TypeError(f"public key of {party!r} must be an Ed25519PublicKey, got {type(key).__name__}")
        self._latest: dict[tuple[str, str, str], int] = {}
        self._lock = threading.Lock()

    def add_party(self, party_id: str, public_key: Ed25519PublicKey | bytes) -> None:
        """Register (or replace) a sender's public key."""
        with self._lock:
            self._keys[party_id] = load_public_key(public_key) if isinstance(public_key, bytes) else public_key

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
            raise RejectedMessage("bad signature", f"{who}: forged, or modified after signing") from None
        slot = (msg.sender, msg.receiver, msg.kind)
        with self._lock:
            latest = self._latest.get(slot)
            if latest is not None and msg.round == latest:
                raise RejectedMessage("replay", f"{who}: already received {msg.kind!r} from {msg.sender!r} in round {msg.round}")
            if latest is not None and msg.round < latest:
                raise RejectedMessage("stale", f"{who}: round {msg.round} is older than the latest accepted round {latest}")
            self._latest[slot] = msg.round
        return msg
