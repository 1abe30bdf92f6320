"""Where a party's long-lived keys live on its node: one file per key, owner-readable only.

The same Ed25519 key signs a participant's messages and seals its privacy
ledger, and a resumed run must find it again, so keys are files in the data
owner's key directory (in simulation, ``RUN_DIR/keys``), never regenerated
behind the owner's back.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from securefl.crypto.signing import PartyKeys


class KeyFileError(ValueError):
    """A key file exists but cannot be read as an Ed25519 private key."""


def load_or_create_party_keys(key_dir: Path, party_id: str) -> PartyKeys:
    path = Path(key_dir) / f"{party_id}.ed25519"
    if path.exists():
        try:
            key = serialization.load_pem_private_key(path.read_bytes(), password=None)
        except (ValueError, TypeError) as exc:
            raise KeyFileError(f"{path}: not a readable Ed25519 private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise KeyFileError(f"{path}: holds a {type(key).__name__}, expected an Ed25519 private key")
        return PartyKeys(party_id, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    keys = PartyKeys.generate(party_id)
    pem = keys.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(pem)
    return keys
