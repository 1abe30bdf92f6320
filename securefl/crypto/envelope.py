"""Sealed envelopes: bytes that only one named party can open, from a sender it can name.

A data owner must hand its fellow owners the CKKS committee secret, and the
only path between sites may run through the coordinator, which must never
learn that secret. An envelope is ECIES-style public-key encryption plus a
signature, built from ``cryptography``'s primitives:

- an ephemeral X25519 key agrees a secret with the recipient's long-lived
  *transport* key (an X25519 key each party creates beside its Ed25519 key);
- HKDF-SHA256 turns it into an AES-256-GCM key, bound to the purpose, both ids
  and both X25519 public keys; the associated data binds the same;
- the sender signs the whole record with its Ed25519 key, so the recipient
  knows which roster member sealed it (and a relay cannot swap the contents
  for its own: re-signing under another name breaks the decryption's binding).

:func:`open_envelope` refuses, with :class:`EnvelopeError` naming the reason,
an envelope for another purpose or recipient, from a sender the caller does not
trust, with a bad signature, or whose ciphertext does not authenticate.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from cryptography.exceptions import InvalidSignature, InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from securefl.crypto.wire import length_prefixed, split_length_prefixed

__all__ = ["EnvelopeError", "open_envelope", "seal_envelope", "x25519_public_bytes"]

_MAGIC = b"securefl/envelope/v1\x00"
_SIGNED_PREFIX = b"securefl/envelope/v1/signature\x00"
_NONCE_BYTES = 12


class EnvelopeError(ValueError):
    """An envelope that must not be opened (the message says why)."""


def x25519_public_bytes(key: X25519PublicKey | X25519PrivateKey) -> bytes:
    if isinstance(key, X25519PrivateKey):
        key = key.public_key()
    return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _key(shared: bytes, purpose: str, sender: str, recipient: str, ephemeral: bytes, recipient_key: bytes) -> bytes:
    info = _MAGIC + length_prefixed(purpose, sender, recipient, ephemeral, recipient_key)
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(shared)


def seal_envelope(data: bytes, *, purpose: str, sender_id: str, sender_key: Ed25519PrivateKey,
                  recipient_id: str, recipient_key: X25519PublicKey) -> bytes:
    """``data`` encrypted for ``recipient_id``'s transport key and signed by ``sender_id``."""
    ephemeral = X25519PrivateKey.generate()
    ephemeral_pub, recipient_pub = x25519_public_bytes(ephemeral), x25519_public_bytes(recipient_key)
    aead = AESGCM(_key(ephemeral.exchange(recipient_key), purpose, sender_id, recipient_id, ephemeral_pub, recipient_pub))
    nonce = os.urandom(_NONCE_BYTES)
    ciphertext = aead.encrypt(nonce, data, length_prefixed(purpose, sender_id, recipient_id, ephemeral_pub))
    body = length_prefixed(purpose, sender_id, recipient_id, ephemeral_pub, nonce, ciphertext)
    return _MAGIC + length_prefixed(body, sender_key.sign(_SIGNED_PREFIX + body))


def open_envelope(blob: bytes, *, purpose: str, recipient_id: str, recipient_key: X25519PrivateKey,
                  trusted_senders: Mapping[str, Ed25519PublicKey]) -> tuple[str, bytes]:
    """``(sender id, plaintext)`` of an envelope sealed for ``recipient_id`` by one of ``trusted_senders``."""
    if not blob.startswith(_MAGIC):
        raise EnvelopeError("not a securefl envelope (wrong magic bytes)")
    try:
        body, signature = split_length_prefixed(blob[len(_MAGIC):], 2)
        fields = split_length_prefixed(body, 6)
    except ValueError as exc:
        raise EnvelopeError(f"malformed envelope ({exc})") from None
    got_purpose, sender, recipient = (f.decode("utf-8", "replace") for f in fields[:3])
    ephemeral_pub, nonce, ciphertext = fields[3:]
    if got_purpose != purpose:
        raise EnvelopeError(f"the envelope holds {got_purpose!r}, not {purpose!r}")
    if recipient != recipient_id:
        raise EnvelopeError(f"the envelope is addressed to {recipient!r}, not {recipient_id!r}")
    if sender not in trusted_senders:
        raise EnvelopeError(f"the envelope's sender {sender!r} is not one of the trusted senders "
                            f"({', '.join(sorted(trusted_senders)) or 'none'})")
    try:
        trusted_senders[sender].verify(signature, _SIGNED_PREFIX + body)
    except InvalidSignature:
        raise EnvelopeError(f"bad signature: the envelope was not sealed by {sender!r}'s key, or was altered") from None
    try:
        ephemeral = X25519PublicKey.from_public_bytes(ephemeral_pub)
        key = _key(recipient_key.exchange(ephemeral), purpose, sender, recipient_id, ephemeral_pub,
                   x25519_public_bytes(recipient_key))
        data = AESGCM(key).decrypt(nonce, ciphertext, length_prefixed(purpose, sender, recipient_id, ephemeral_pub))
    except (InvalidTag, ValueError):
        raise EnvelopeError(f"the envelope does not open with {recipient_id!r}'s transport key (sealed for another "
                            "key, or altered)") from None
    return sender, data

