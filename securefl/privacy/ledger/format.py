"""The ledger's on-disk format, ``securefl-ledger/1``: canonical JSON lines, a hash chain, and four kinds of entry.

One canonical JSON object per line (``sort_keys``, no spaces, UTF-8), each with ``seq`` (0, 1, …),
``prev_hash`` (the previous line's ``hash``; 64 zeros for the first) and ``hash`` = SHA-256 of the canonical
JSON of the entry without ``hash``. Line 1 is the ``header`` (participant, budget, δ, accountant, public
key). ``release`` entries carry the event, the round, the payload kind and the running ε. An ``approval``
entry records the data owner's signed approval of the run's setup (its digest, the approving key's
fingerprint and the approved settings; it spends nothing). A ``seal`` entry carries an Ed25519 signature
(RFC 8032, via ``cryptography``) by the participant's key over the chain head, i.e. the hash of the line
before it; the public key is also written to ``<path>.pub`` (hex). Appending after a seal (a resumed run) is
allowed; the run must be sealed again.

What the chain does and does not prove: the hash chain detects edits, deletions, reorderings and torn
writes; the seal makes the sealed prefix unforgeable without the participant's key. Rolling a file back to
an *earlier* seal is only detectable against an external record of the final head (pass ``expected_heads``
to :func:`securefl.privacy.audit.audit_run`).

The entry kinds are declared below as frozen pydantic models: the reader validates every line with the
model of its kind (which fields, of which types), then checks what a model cannot see alone (the header's
values, agreement with the header, the events, the seal's signature). Entries are written and kept as
plain dicts, whose canonical JSON is the line.

References
----------
Crosby & Wallach, "Efficient Data Structures for Tamper-Evident Logging", USENIX Security 2009, for
hash-chained logs.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

__all__ = [
    "ENTRY_KINDS",
    "EVENT_FIELDS",
    "FORMAT",
    "GENESIS_HASH",
    "ApprovalEntry",
    "HeaderEntry",
    "LedgerEntry",
    "ReleaseEntry",
    "SealEntry",
    "canonical_json",
    "entry_hash",
    "is_number",
    "public_key_path",
    "seal_message",
]

FORMAT = "securefl-ledger/1"
GENESIS_HASH = "0" * 64
#: Domain separation: a seal signature can never be confused with the signature
#: of a protocol message made with the same participant key.
_SEAL_DOMAIN = b"securefl-ledger-seal/1\n"
#: The fields of a release entry that describe its event (:class:`~securefl.privacy.events.PrivacyEvent`).
EVENT_FIELDS = ("unit", "mechanism", "noise_multiplier", "sample_rate", "steps", "sensitivity", "relation", "payload")


# --------------------------------------------------------------------------- encoding
def canonical_json(obj: Mapping[str, Any]) -> str:
    """The one byte-exact JSON form of an entry (sorted keys, no whitespace, no NaN)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the canonical JSON of ``entry`` without its ``hash`` field."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical_json(body).encode("utf-8")).hexdigest()


def seal_message(head: str) -> bytes:
    """The bytes a seal signs: a domain tag and the chain head hash."""
    return _SEAL_DOMAIN + head.encode("ascii")


def public_key_path(path: str | Path) -> Path:
    """``<ledger>.pub``: the participant's Ed25519 public key, raw, hex-encoded."""
    path = Path(path)
    return path.with_name(path.name + ".pub")


def is_number(value: object) -> bool:
    """A finite JSON number (``bool`` is not one, though Python counts it as an ``int``)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# --------------------------------------------------------------------------- entries
class LedgerEntry(BaseModel):
    """What every line has: its kind, its position and its place in the hash chain."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: str
    seq: int
    prev_hash: str
    hash: str


class HeaderEntry(LedgerEntry):
    """Line 1: who the ledger belongs to, its budgets, δ, accountant and the participant's public key."""

    kind: Literal["header"]
    format: str
    participant: str
    max_epsilon: float
    #: ε budget per unit of privacy; a unit without an entry has ``max_epsilon``.
    unit_budgets: dict[str, float]
    delta: float
    accountant: str
    #: The participant's Ed25519 public key, raw, hex.
    public_key: str
    created_at: str


class _AfterHeader(LedgerEntry):
    """What every entry after the header repeats of it, and the running ε when it was written."""

    participant: str
    accountant: str
    delta: float
    #: ε spent so far per unit, including this entry.
    epsilon_by_unit: dict[str, float]
    written_at: str


class ReleaseEntry(_AfterHeader):
    """A payload that left the participant, and what it cost (the event's fields; null for public data)."""

    kind: Literal["release"]
    round: int
    unit: str | None
    #: ``"none"`` for a release computed from public data only, which costs nothing.
    mechanism: str
    noise_multiplier: float | None
    sample_rate: float | None
    steps: int | None
    sensitivity: float | None
    relation: str | None
    payload: str
    #: Why a public-data release costs nothing; null for a private release.
    note: str | None
    #: ε of the event's unit after this release.
    epsilon_after: float


class ApprovalEntry(_AfterHeader):
    """The data owner's signed approval of the run's setup (see :mod:`securefl.deploy.approval`).

    It costs nothing and releases nothing, so it is its own kind, not a release; the chain and the seal
    cover it like any entry.
    """

    kind: Literal["approval"]
    #: SHA-256 (hex) of what was approved.
    approval_digest: str
    #: Fingerprint of the key that signed the approval.
    approver_key: str
    #: The approved settings, in plain values.
    approved: dict[str, Any]


class SealEntry(_AfterHeader):
    """The participant's Ed25519 signature over the chain head (the hash of the line before)."""

    kind: Literal["seal"]
    head: str
    public_key: str
    #: Hex signature of :func:`seal_message` ``(head)``.
    signature: str


#: The model of each kind of entry, by its ``kind``.
ENTRY_KINDS: Mapping[str, type[LedgerEntry]] = {
    "header": HeaderEntry,
    "release": ReleaseEntry,
    "seal": SealEntry,
    "approval": ApprovalEntry,
}
