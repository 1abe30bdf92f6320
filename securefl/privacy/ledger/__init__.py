"""One privacy ledger per data owner, for the whole run: an append-only, hash-chained, signed file.

- :mod:`~securefl.privacy.ledger.format`: the on-disk format (canonical JSON lines, the hash chain, the
  seal) and the kinds of entry, as frozen models.
- :mod:`~securefl.privacy.ledger.reader`: :func:`read_ledger`, which verifies every line or refuses the file.
- :mod:`~securefl.privacy.ledger.ledger`: the :class:`Ledger` a participant's releases are checked against
  and committed to, durably, before they leave.
"""

from securefl.privacy.ledger.format import (
    FORMAT,
    GENESIS_HASH,
    ApprovalEntry,
    HeaderEntry,
    ReleaseEntry,
    SealEntry,
    canonical_json,
    entry_hash,
    public_key_path,
    seal_message,
)
from securefl.privacy.ledger.ledger import Ledger
from securefl.privacy.ledger.reader import LedgerContents, iter_ledger_files, read_ledger

__all__ = [
    "FORMAT",
    "GENESIS_HASH",
    "ApprovalEntry",
    "HeaderEntry",
    "Ledger",
    "LedgerContents",
    "ReleaseEntry",
    "SealEntry",
    "canonical_json",
    "entry_hash",
    "iter_ledger_files",
    "public_key_path",
    "read_ledger",
    "seal_message",
]
