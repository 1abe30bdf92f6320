"""Reading a ledger file back: every line verified (structure, hash chain, header, events, seals) or refused.

:func:`read_ledger` is what :meth:`~securefl.privacy.ledger.Ledger.open` resumes from and what the audit
recomputes ε from, so a refusal names the file and the first bad line, and says what is wrong with it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from securefl.privacy.accountants import ACCOUNTANT_NAMES
from securefl.privacy.errors import LedgerCorrupt
from securefl.privacy.events import UNITS, AnyEvent, PrivacyEvent, PublicDataEvent
from securefl.privacy.ledger.format import (
    ENTRY_KINDS,
    EVENT_FIELDS,
    FORMAT,
    GENESIS_HASH,
    canonical_json,
    entry_hash,
    is_number,
    seal_message,
)

__all__ = ["LedgerContents", "iter_ledger_files", "read_ledger"]


@dataclass(frozen=True)
class LedgerContents:
    """A verified ledger file: its entries (line i is ``entries[i-1]``) and events."""

    path: Path
    entries: tuple[dict[str, Any], ...]
    events: tuple[AnyEvent, ...]
    event_lines: tuple[int, ...]

    @property
    def header(self) -> dict[str, Any]:
        return self.entries[0]

    @property
    def head(self) -> str:
        """Hash of the last entry (the chain head)."""
        return str(self.entries[-1]["hash"])

    @property
    def sealed(self) -> bool:
        """Whether the last entry is a seal (nothing was appended after it)."""
        return self.entries[-1]["kind"] == "seal"

    def spend_history(self) -> list[dict[str, Any]]:
        """One row per release, for reports and plots of ε over rounds.

        Each row has ``seq``, ``round``, ``unit``, ``payload``, ``mechanism``,
        ``noise_multiplier``, ``epsilon_after`` and ``epsilon_by_unit``.
        """
        keys = ("seq", "round", "unit", "payload", "mechanism", "noise_multiplier", "epsilon_after", "epsilon_by_unit")
        return [{k: e[k] for k in keys} for e in self.entries if e["kind"] == "release"]


def _check_header(h: dict[str, Any], fail: Callable[[str], NoReturn]) -> None:
    if h.get("format") != FORMAT:
        fail(f"unknown ledger format {h.get('format')!r}; expected {FORMAT!r}")
    if not isinstance(h.get("participant"), str) or not h["participant"]:
        fail(f"header field 'participant' must be a non-empty string, got {h.get('participant')!r}")
    if not is_number(h.get("max_epsilon")) or h["max_epsilon"] <= 0:
        fail(f"header field 'max_epsilon' must be a number > 0, got {h.get('max_epsilon')!r}")
    if not is_number(h.get("delta")) or not 0 < h["delta"] < 1:
        fail(f"header field 'delta' must be in (0, 1), got {h.get('delta')!r}")
    if h.get("accountant") not in ACCOUNTANT_NAMES:
        fail(f"header field 'accountant' must be one of {ACCOUNTANT_NAMES}, got {h.get('accountant')!r}")
    budgets = h.get("unit_budgets")
    if not isinstance(budgets, dict) or any(u not in UNITS or not is_number(v) or v <= 0 for u, v in budgets.items()):
        fail(f"header field 'unit_budgets' must map units {UNITS} to numbers > 0, got {budgets!r}")
    key = h.get("public_key")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        fail(f"header field 'public_key' is not a hex Ed25519 public key: {key!r}")


def _event_from_entry(entry: dict[str, Any], fail: Callable[[str], NoReturn]) -> AnyEvent:
    try:
        if entry["mechanism"] == "none":
            stray = [k for k in EVENT_FIELDS if k not in ("unit", "mechanism", "payload") and entry[k] is not None]
            if stray:
                fail(f"a public-data entry (mechanism 'none') must have null {stray}")
            return PublicDataEvent(payload=entry["payload"], unit=entry["unit"], reason=entry["note"])
        if entry["note"] is not None:
            fail(f"field 'note' must be null for a {entry['mechanism']!r} release, got {entry['note']!r}")
        return PrivacyEvent(**{k: entry[k] for k in EVENT_FIELDS})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "event"
        fail(f"invalid event field {field!r}: {err['msg']} (got {err.get('input')!r})")


def _check_fields(entry: dict[str, Any], kind: str, fail: Callable[[str], NoReturn]) -> str | None:
    """Validate ``entry`` with the model of its kind: refuse missing or unexpected fields at once; return the
    first field of a wrong type as a message, for after the checks that name a bad value more precisely."""
    try:
        ENTRY_KINDS[kind].model_validate(entry)
    except ValidationError as exc:
        errors = exc.errors()
        missing = sorted(str(e["loc"][0]) for e in errors if e["type"] == "missing")
        extra = sorted(str(e["loc"][0]) for e in errors if e["type"] == "extra_forbidden")
        if missing or extra:
            fail(f"{kind} entry has missing fields {missing} / unexpected fields {extra}")
        err = errors[0]
        field = ".".join(str(p) for p in err["loc"])
        return f"field {field!r}: {err['msg']} (got {err.get('input')!r})"
    return None


def read_ledger(path: str | Path) -> LedgerContents:
    """Read and fully verify a ledger file (structure, hash chain, seals).

    Raises
    ------
    LedgerCorrupt
        Naming the file and the first bad line: an incomplete last line, a line
        that is not canonical JSON, a wrong ``seq``/``prev_hash``/``hash``, an
        invalid event, an entry of another participant, or a bad seal signature.
    FileNotFoundError
        If the file does not exist.
    """
    path = Path(path)
    data = path.read_bytes()
    spath = str(path)
    if not data:
        raise LedgerCorrupt("empty file: no header (creation was interrupted, or the file was truncated)", path=spath, line=1)
    raw_lines = data.split(b"\n")
    if raw_lines[-1] != b"":
        raise LedgerCorrupt(
            "last line is incomplete (no trailing newline): a torn write or truncation; the release it "
            "describes never left (write-ahead), but the file must be inspected by hand",
            path=spath,
            line=len(raw_lines),
        )
    raw_lines.pop()

    entries: list[dict[str, Any]] = []
    events: list[AnyEvent] = []
    event_lines: list[int] = []
    prev = GENESIS_HASH
    header: dict[str, Any] = {}
    public_key: Ed25519PublicKey | None = None
    for lineno, raw in enumerate(raw_lines, start=1):

        def fail(message: str, _line: int = lineno) -> NoReturn:
            raise LedgerCorrupt(message, path=spath, line=_line)

        # The line as bytes: JSON, canonical, and in its place in the chain.
        try:
            text = raw.decode("utf-8")
            entry = json.loads(text)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            fail(f"not valid JSON ({exc.__class__.__name__}: {exc})")
        if not isinstance(entry, dict):
            fail(f"an entry must be a JSON object, got {type(entry).__name__}")
        try:
            canonical = canonical_json(entry)
        except ValueError as exc:
            fail(f"entry contains a non-finite number: {exc}")
        if text != canonical:
            fail("line is not in canonical form (edited by hand?)")
        if type(entry.get("seq")) is not int or entry["seq"] != lineno - 1:
            fail(f"field 'seq' is {entry.get('seq')!r}, expected {lineno - 1} (a line was deleted or reordered)")
        if entry.get("prev_hash") != prev:
            fail(
                f"field 'prev_hash' does not match the hash of line {lineno - 1} (chain broken)"
                if lineno > 1
                else "field 'prev_hash' of the first line must be the genesis hash"
            )
        if entry.get("hash") != entry_hash(entry):
            fail("field 'hash' does not match the entry's content (the entry was edited)")

        # The entry: a kind allowed here, with exactly its fields.
        kind = entry.get("kind")
        if lineno == 1 and kind != "header":
            fail(f"first line must be the header, got kind {kind!r}")
        if lineno > 1 and kind not in ("release", "seal", "approval"):
            fail(f"field 'kind' must be 'release', 'seal' or 'approval' after the header, got {kind!r}")
        wrong_type = _check_fields(entry, str(kind), fail)

        # Its values, and their agreement with the header.
        if kind == "header":
            _check_header(entry, fail)
            header = entry
            public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry["public_key"]))
        else:
            for name in ("participant", "accountant", "delta"):
                if entry[name] != header[name]:
                    fail(f"field {name!r} is {entry[name]!r} but the header says {header[name]!r}")
            if not isinstance(entry["epsilon_by_unit"], dict) or any(
                u not in UNITS or not is_number(v) or v < 0 for u, v in entry["epsilon_by_unit"].items()
            ):
                fail(f"field 'epsilon_by_unit' must map units to numbers >= 0, got {entry['epsilon_by_unit']!r}")
        if kind == "release":
            rnd = entry["round"]
            if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
                fail(f"field 'round' must be an integer >= 0, got {rnd!r}")
            if not is_number(entry["epsilon_after"]) or entry["epsilon_after"] < 0:
                fail(f"field 'epsilon_after' must be a number >= 0, got {entry['epsilon_after']!r}")
            events.append(_event_from_entry(entry, fail))
            event_lines.append(lineno)
        elif kind == "approval":
            if not isinstance(entry["approval_digest"], str) or len(entry["approval_digest"]) != 64:
                fail(f"field 'approval_digest' must be a SHA-256 hex digest, got {entry['approval_digest']!r}")
            if not isinstance(entry["approved"], dict):
                fail(f"field 'approved' must be an object, got {type(entry['approved']).__name__}")
        elif kind == "seal":
            if entry["head"] != entry["prev_hash"]:
                fail("seal field 'head' must equal its 'prev_hash' (the chain head it signs)")
            if entry["public_key"] != header["public_key"]:
                fail("seal field 'public_key' differs from the header's public key")
            try:
                assert public_key is not None
                public_key.verify(bytes.fromhex(entry["signature"]), seal_message(entry["head"]))
            except (InvalidSignature, ValueError, TypeError):
                fail("seal signature is invalid for the participant's public key (forged or altered)")
        if wrong_type is not None:
            # A field none of the checks above reads (e.g. 'written_at') holds a value of the wrong type.
            fail(wrong_type)
        entries.append(entry)
        prev = entry["hash"]
    return LedgerContents(path=path, entries=tuple(entries), events=tuple(events), event_lines=tuple(event_lines))


def iter_ledger_files(directory: str | Path) -> Iterator[Path]:
    """Ledger files (``*.jsonl``) in ``directory``, sorted by name."""
    yield from sorted(Path(directory).glob("*.jsonl"))
