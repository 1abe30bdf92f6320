"""Where a party's long-lived keys live on its node: one file per key, owner-readable only.

The same Ed25519 key signs a participant's messages and seals its privacy
ledger, and a resumed run must find it again, so keys are files in the data
owner's key directory, never regenerated behind the owner's back.

A key never sits in a run directory: whoever reads a run directory (an auditor,
a leaked backup) could otherwise re-seal a ledger with its owner's key. A node
keeps its keys in ``NODE_DIR/keys``; a simulation, which plays every owner in
one process, keeps them in a key store outside the run directory,
``<root>/<run_id>/`` (:func:`simulation_key_dir`), where ``<root>`` is
``--keys DIR``, else ``$SECUREFL_KEYS``, else ``$XDG_DATA_HOME/securefl/keys``
(``~/.local/share/securefl/keys``). Its ``roster/`` holds the public keys the
audit pins every ledger's seal to.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from securefl.core.durable import write_atomically
from securefl.crypto.signing import PartyKeys, load_public_key, public_key_bytes

#: Environment variable naming the root of the simulations' key store.
KEYS_ENV = "SECUREFL_KEYS"


def keys_root(root: str | Path | None = None) -> Path:
    """The simulations' key store: ``root`` if given, else ``$SECUREFL_KEYS``, else the user's data directory."""
    if root is not None:
        return Path(root).expanduser()
    if os.environ.get(KEYS_ENV):
        return Path(os.environ[KEYS_ENV]).expanduser()
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "securefl" / "keys"


def simulation_key_dir(run_id: str, root: str | Path | None = None) -> Path:
    """Where a simulation keeps its owners' private keys: outside its run directory, one directory per run id."""
    if not run_id or "/" in run_id or run_id in (".", ".."):
        raise KeyFileError(f"run id {run_id!r} cannot name a key directory")
    return keys_root(root) / run_id


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
    keys = PartyKeys.generate(party_id)
    pem = keys.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.NoEncryption())
    write_private_file(path, pem, exclusive=True)
    return keys


def write_private_file(path: Path, data: bytes, *, exclusive: bool = False, atomic: bool = False) -> None:
    """Create a file only its owner can read (mode 0600 from the start, never world-readable for a moment).

    ``atomic``: write a temporary file and rename it over ``path``, so a crash leaves the old content or the
    new, never half of it (for state that is rewritten, unlike a key written once).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if atomic:
        write_atomically(path, data, mode=0o600)
        return
    flags = os.O_WRONLY | os.O_CREAT | (os.O_EXCL if exclusive else os.O_TRUNC)
    fd = os.open(path, flags, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)


# ----- the roster: every party's public key, as a deployment distributes it ---------------------
ROSTER = "roster"


def publish_public_key(key_dir: Path, keys: PartyKeys) -> None:
    """Write a party's public key into a roster directory (what it hands to the others)."""
    path = Path(key_dir) / ROSTER / f"{keys.party_id}.pub"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(public_key_bytes(keys.public_key))


def load_roster(key_dir: Path, party_ids: list[str]) -> dict[str, Ed25519PublicKey]:
    """The public keys of ``party_ids`` from a key directory's roster; a missing one is a clear error."""
    roster = Path(key_dir) / ROSTER
    keys = {}
    for pid in party_ids:
        path = roster / f"{pid}.pub"
        if not path.exists():
            raise KeyFileError(f"{path}: no public key for {pid!r} in the roster; provision every party first "
                               "(`securefl provision`)")
        try:
            keys[pid] = load_public_key(path.read_bytes())
        except ValueError as exc:
            raise KeyFileError(f"{path}: not an Ed25519 public key ({exc})") from None
    return keys
