"""The key ceremony of a real deployment: every party creates its keys on its own machine.

:func:`securefl.deploy.provision.provision` makes every key on one machine,
which suits tests and a single-site cluster. Across hospitals nothing secret
may travel except the CKKS committee secret, and that only sealed for its
recipient. The steps, each run by its party on its own machine
(``securefl keys ...`` on the command line):

1. **create** — each data owner, and the coordinator (as ``aggregator``),
   creates its Ed25519 signing key and an X25519 *transport* key in its key
   directory (``NODE/keys``), and a public *card*: both public keys, signed
   with the signing key. Only the card leaves the machine.
2. **trust** — each party installs the others' cards in its roster, giving
   each card's fingerprint as its owner read it out out of band (a phone
   call, never through the coordinator); a card without it, or with another
   one, is refused.
   A card that would replace a different key already trusted for that id is
   refused: that is what a key-substitution attack looks like.
3. **committee** (CKKS runs) — one data owner creates the CKKS key pair and
   seals the committee secret for each fellow owner's transport key
   (:mod:`securefl.crypto.envelope`); the envelopes and the public context may
   travel through the coordinator, which cannot open them. Each owner joins
   with its envelope, accepting one only from another data owner of the
   config, never from the coordinator.
4. **context** — the coordinator installs the public CKKS context, which is
   refused if it holds a secret key.

The files are those ``provision`` writes (``<id>.ed25519``, ``roster/<id>.pub``,
``ckks_committee.secret``, ``ckks_public.context``), so a node or coordinator
set up either way runs the same.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from securefl.config import PARTY_ID_PATTERN, ExperimentConfig
from securefl.crypto.envelope import EnvelopeError, open_envelope, seal_envelope, x25519_public_bytes
from securefl.crypto.keystore import (
    ROSTER,
    KeyFileError,
    load_or_create_party_keys,
    load_roster,
    publish_public_key,
    write_private_file,
)
from securefl.crypto.signing import load_public_key, public_key_bytes
from securefl.crypto.wire import length_prefixed

__all__ = ["CeremonyError", "PublicCard", "create_committee", "create_party", "fingerprint", "install_public_context",
           "join_committee", "roster_entries", "trust_card"]

_CARD_DOMAIN = b"securefl/card/v1\x00"
COMMITTEE_PURPOSE = "ckks-committee-secret"
TRANSPORT_SUFFIX = ".x25519"
TRANSPORT_PUB_SUFFIX = ".transport.pub"
_CKKS_SECRET_MAGIC = b"SFSK"  # the committee secret's file header (securefl.crypto.ckks)


class CeremonyError(ValueError):
    """A ceremony step that must not happen (the message says why and what to do)."""


def _check_id(party_id: str, where: str) -> str:
    # Ids become file names in the key directory: a card naming "../x" must not write outside it.
    if not PARTY_ID_PATTERN.match(party_id):
        raise CeremonyError(f"{where}: party id {party_id!r} must be 1-64 characters of letters, digits, '_', '.', "
                            "'-', starting alphanumeric (as in the config)")
    return party_id


def fingerprint(signing_key: bytes) -> str:
    """What two owners read to each other over the phone: the first 128 bits of SHA-256 of the raw key."""
    digest = hashlib.sha256(signing_key).hexdigest()[:32]
    return " ".join(digest[i:i + 4] for i in range(0, 32, 4))


@dataclass(frozen=True)
class PublicCard:
    """A party's public keys, signed by its signing key (so the transport key is the signing key holder's)."""

    party_id: str
    signing_key: bytes
    transport_key: bytes
    signature: bytes

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.signing_key)

    def signed_bytes(self) -> bytes:
        return _CARD_DOMAIN + length_prefixed(self.party_id, self.signing_key, self.transport_key)

    def to_bytes(self) -> bytes:
        return (json.dumps({"securefl_card": 1, "party": self.party_id, "signing_key": self.signing_key.hex(),
                            "transport_key": self.transport_key.hex(), "signature": self.signature.hex()},
                           indent=2) + "\n").encode()

    @classmethod
    def from_bytes(cls, data: bytes, *, source: str = "card") -> PublicCard:
        """Parse a card and check its signature; a private key sent by mistake is named as such."""
        if b"PRIVATE KEY" in data or data.startswith(_CKKS_SECRET_MAGIC):
            raise CeremonyError(f"{source}: this is a private key, not a public card. Never send it; send the "
                                "card that `securefl keys create` wrote, and make a new key if this one left its machine")
        if len(data) == 32:
            raise CeremonyError(f"{source}: a bare 32-byte key (a roster .pub, or a transport key's private half, "
                                "which must never leave its machine), not a card: trust the <id>.card file that "
                                "`securefl keys create` wrote")
        try:
            raw = json.loads(data)
            if raw.get("securefl_card") != 1:
                raise ValueError("no 'securefl_card': 1 field")
            card = cls(str(raw["party"]), bytes.fromhex(raw["signing_key"]), bytes.fromhex(raw["transport_key"]),
                       bytes.fromhex(raw["signature"]))
            signing_key = load_public_key(card.signing_key)
            X25519PublicKey.from_public_bytes(card.transport_key)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise CeremonyError(f"{source}: not a securefl public card ({exc})") from None
        _check_id(card.party_id, source)
        try:
            signing_key.verify(card.signature, card.signed_bytes())
        except InvalidSignature:
            raise CeremonyError(f"{source}: the card's signature does not verify: it was altered after "
                                f"{card.party_id!r} made it (e.g. its transport key was swapped)") from None
        return card


# ----- step 1: create ----------------------------------------------------------------------------
def _load_or_create_transport_key(key_dir: Path, party_id: str) -> X25519PrivateKey:
    path = Path(key_dir) / f"{party_id}{TRANSPORT_SUFFIX}"
    if path.exists():
        try:
            return X25519PrivateKey.from_private_bytes(path.read_bytes())
        except ValueError as exc:
            raise KeyFileError(f"{path}: not a readable X25519 private key ({exc})") from None
    key = X25519PrivateKey.generate()
    raw = key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    write_private_file(path, raw, exclusive=True)
    return key


def create_party(key_dir: str | Path, party_id: str) -> tuple[PublicCard, Path]:
    """Create (or keep) ``party_id``'s keys in ``key_dir``; its card, and where the card was written."""
    key_dir = Path(key_dir)
    keys = load_or_create_party_keys(key_dir, _check_id(party_id, "keys create"))
    transport = _load_or_create_transport_key(key_dir, party_id)
    unsigned = PublicCard(party_id, public_key_bytes(keys.public_key), x25519_public_bytes(transport), b"")
    card = PublicCard(party_id, unsigned.signing_key, unsigned.transport_key, keys.private_key.sign(unsigned.signed_bytes()))
    publish_public_key(key_dir, keys)
    (key_dir / ROSTER / f"{party_id}{TRANSPORT_PUB_SUFFIX}").write_bytes(card.transport_key)
    path = key_dir / f"{party_id}.card"
    path.write_bytes(card.to_bytes())
    return card, path


# ----- step 2: trust -----------------------------------------------------------------------------
def trust_card(key_dir: str | Path, data: bytes, *, expected_fingerprint: str, source: str = "card") -> PublicCard:
    """Install a verified card in ``key_dir``'s roster if its fingerprint is ``expected_fingerprint`` (what its
    owner read out, out of band; spaces and case ignored); refuse one that would replace another key for its id.

    The fingerprint is required: a card's own signature proves only that whoever made it holds its key, so a
    coordinator that relays the cards could hand over its own card under an owner's id and then open the
    committee envelope sealed for that owner. Only the comparison with the real owner stops that.
    """
    card = PublicCard.from_bytes(data, source=source)
    heard = "".join(str(expected_fingerprint or "").split()).lower()
    if not heard:
        raise CeremonyError(f"{source}: no fingerprint given for {card.party_id!r}'s card; ask its owner to read out "
                            "the fingerprint `securefl keys create` printed (by phone, not through the coordinator) "
                            "and pass it (--fingerprint \"3f1a 09c2 ...\"). A card trusted unchecked may be someone "
                            "else's key under that id")
    if heard != card.fingerprint.replace(" ", ""):
        raise CeremonyError(f"{source}: {card.party_id!r}'s card has fingerprint {card.fingerprint}, not the "
                            f"{expected_fingerprint!r} its owner read out; do not trust it (the card may have been "
                            "swapped on its way: get it again from its owner)")
    roster = Path(key_dir) / ROSTER
    signing, transport = roster / f"{card.party_id}.pub", roster / f"{card.party_id}{TRANSPORT_PUB_SUFFIX}"
    for path, new in ((signing, card.signing_key), (transport, card.transport_key)):
        if path.exists() and path.read_bytes() != new:
            known = fingerprint(signing.read_bytes()) if signing.exists() else "?"
            raise CeremonyError(
                f"{source}: the roster already trusts another key for {card.party_id!r} (fingerprint {known}); "
                f"this card's is {card.fingerprint}. A changed key is what a key-substitution attack looks like: "
                f"confirm with {card.party_id!r}'s owner, then delete {path} yourself and trust the card again")
    roster.mkdir(parents=True, exist_ok=True)
    signing.write_bytes(card.signing_key)
    transport.write_bytes(card.transport_key)
    return card


def roster_entries(key_dir: str | Path) -> list[dict[str, Any]]:
    """Every party the roster trusts: id, fingerprint, whether it has a transport key, whether it is this node."""
    key_dir = Path(key_dir)
    rows = []
    for path in sorted((key_dir / ROSTER).glob("*.pub")):
        if path.name.endswith(TRANSPORT_PUB_SUFFIX):
            continue
        pid = path.name.removesuffix(".pub")
        rows.append({"party": pid, "fingerprint": fingerprint(path.read_bytes()),
                     "transport_key": (key_dir / ROSTER / f"{pid}{TRANSPORT_PUB_SUFFIX}").exists(),
                     "own": (key_dir / f"{pid}.ed25519").exists()})
    return rows


def _transport_key(key_dir: Path, party_id: str) -> X25519PublicKey:
    path = key_dir / ROSTER / f"{party_id}{TRANSPORT_PUB_SUFFIX}"
    if not path.exists():
        raise CeremonyError(f"{path}: no transport key for {party_id!r}; trust its card first (`securefl keys trust`)")
    return X25519PublicKey.from_public_bytes(path.read_bytes())


def _own(key_dir: Path, party_id: str) -> tuple[Any, X25519PrivateKey]:
    if not (key_dir / f"{party_id}.ed25519").exists() or not (key_dir / f"{party_id}{TRANSPORT_SUFFIX}").exists():
        raise CeremonyError(f"{key_dir}: holds no keys of {party_id!r}; run `securefl keys create {party_id}` there first")
    return load_or_create_party_keys(key_dir, party_id), _load_or_create_transport_key(key_dir, party_id)


# ----- step 3: the CKKS committee ----------------------------------------------------------------
def _committee_key(secret: bytes, what: str) -> Any:
    from securefl.crypto.ckks import KeyHolderContext

    try:
        return KeyHolderContext.from_committee_secret(secret)
    except ValueError as exc:
        raise CeremonyError(f"{what}: not a readable CKKS committee key ({str(exc)[:160]})") from None


def _committee_members(config: ExperimentConfig, own_id: str) -> list[str]:
    if config.secure_aggregation != "ckks":
        raise CeremonyError(f"secure_aggregation={config.secure_aggregation!r}: only a ckks run has a committee key")
    ids = [p.id for p in config.participants]
    if own_id not in ids:
        raise CeremonyError(f"--id {own_id!r}: not a participant of the config ({', '.join(ids)}); only data owners "
                            "hold the committee key, never the coordinator")
    return ids


def create_committee(config: ExperimentConfig, key_dir: str | Path, own_id: str, out_dir: str | Path) -> list[Path]:
    """On one data owner's machine: the committee key (kept if it exists), an envelope for every other owner,
    and the public context for the coordinator, written to ``out_dir``. Returns the files written."""
    from securefl.crypto.ckks import KeyHolderContext
    from securefl.layers.secure_aggregation import CkksLayer

    key_dir, out_dir = Path(key_dir), Path(out_dir)
    members = _committee_members(config, own_id)
    keys, _ = _own(key_dir, own_id)
    recipients = {pid: _transport_key(key_dir, pid) for pid in members if pid != own_id}  # all missing ones fail first
    secret_path = key_dir / CkksLayer.COMMITTEE_FILE
    if secret_path.exists():
        # The file's own bytes travel, so an owner that already joined compares equal.
        secret = secret_path.read_bytes()
        committee = _committee_key(secret, str(secret_path))
        if committee.params != config.ckks:
            raise CeremonyError(f"{secret_path}: a committee key with other CKKS parameters than the config's ckks "
                                "section; a run with this config could not use it")
    else:
        committee = KeyHolderContext.generate(config.ckks)
        secret = committee.export_secret_for_committee()
        write_private_file(secret_path, secret, exclusive=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for pid, transport in recipients.items():
        path = out_dir / f"ckks_committee.for-{pid}.envelope"
        path.write_bytes(seal_envelope(secret, purpose=COMMITTEE_PURPOSE, sender_id=own_id, sender_key=keys.private_key,
                                       recipient_id=pid, recipient_key=transport))
        written.append(path)
    public = out_dir / CkksLayer.PUBLIC_FILE
    public.write_bytes(committee.public().to_bytes())
    return [*written, public]


def join_committee(config: ExperimentConfig, key_dir: str | Path, own_id: str, envelope: bytes) -> str:
    """On a fellow owner's machine: open its envelope (sealed by another data owner of the config) and keep the
    committee key. Returns the sender."""
    from securefl.layers.secure_aggregation import CkksLayer

    key_dir = Path(key_dir)
    members = _committee_members(config, own_id)
    _, transport = _own(key_dir, own_id)
    roster = key_dir / ROSTER
    senders = [pid for pid in members if pid != own_id and (roster / f"{pid}.pub").exists()]
    trusted = load_roster(key_dir, senders)  # the coordinator is never among them
    try:
        sender, secret = open_envelope(envelope, purpose=COMMITTEE_PURPOSE, recipient_id=own_id, recipient_key=transport,
                                       trusted_senders=trusted)
    except EnvelopeError as exc:
        raise CeremonyError(f"committee envelope refused: {exc}") from None
    committee = _committee_key(secret, f"the committee key {sender!r} sent")
    if committee.params != config.ckks:
        raise CeremonyError(f"the committee key {sender!r} sent has other CKKS parameters than the config's ckks section")
    path = key_dir / CkksLayer.COMMITTEE_FILE
    if path.exists() and path.read_bytes() != secret:
        raise CeremonyError(f"{path}: already holds another committee key; two owners created one each. Agree on "
                            "one, delete this file and join again")
    if not path.exists():
        write_private_file(path, secret, exclusive=True)
    return sender


# ----- step 4: the coordinator's public context --------------------------------------------------
def install_public_context(config: ExperimentConfig, key_dir: str | Path, data: bytes) -> Path:
    """On the coordinator: keep the committee's public context; refuse one that holds a secret key."""
    from securefl.crypto.ckks import PublicContext
    from securefl.layers.secure_aggregation import CkksLayer

    if config.secure_aggregation != "ckks":
        raise CeremonyError(f"secure_aggregation={config.secure_aggregation!r}: only a ckks run has a public context")
    try:
        public = PublicContext.from_bytes(data)
    except ValueError as exc:
        raise CeremonyError(f"not a public CKKS context ({exc}); the coordinator must never hold the committee's "
                            "secret key") from None
    if public.params != config.ckks:
        raise CeremonyError("the public context has other CKKS parameters than the config's ckks section")
    path = Path(key_dir) / CkksLayer.PUBLIC_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path

