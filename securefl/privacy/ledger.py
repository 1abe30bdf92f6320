"""One privacy ledger per data owner, for the whole run: check, then commit.

A :class:`Ledger` records every release of one participant as a frozen event in
an append-only JSON-lines file, composes them with ONE accountant that lives as
long as the ledger (there is deliberately no way to reset it), and refuses any
release that would take the participant over its budget.

Write-ahead
-----------
:meth:`Ledger.commit` appends the entry and calls ``flush`` + ``os.fsync``
*before* it returns; the caller releases the payload only after that. A crash
between commit and release therefore over-counts (the spend is on disk, the
payload never left) but can never under-count.

File format (``securefl-ledger/1``)
----------------------------------
One canonical JSON object per line (``sort_keys``, no spaces, UTF-8), each with
``seq`` (0, 1, …), ``prev_hash`` (the previous line's ``hash``; 64 zeros for the
first) and ``hash`` = SHA-256 of the canonical JSON of the entry without
``hash``. Line 1 is the ``header`` (participant, budget, δ, accountant, public
key). ``release`` entries carry the event, the round, the payload kind and the
running ε. An ``approval`` entry records the data owner's signed approval of the run's setup
(its digest, the approving key's fingerprint and the approved settings; it spends
nothing). A ``seal`` entry carries an Ed25519 signature (RFC 8032, via
``cryptography``) by the participant's key over the chain head, i.e. the hash of
the line before it; the public key is also written to ``<path>.pub`` (hex).
Appending after a seal (a resumed run) is allowed; the run must be sealed again.

What the chain does and does not prove: the hash chain detects edits,
deletions, reorderings and torn writes; the seal makes the sealed prefix
unforgeable without the participant's key. Rolling a file back to an *earlier*
seal is only detectable against an external record of the final head (pass
``expected_heads`` to :func:`securefl.privacy.audit.audit_run`).

References
----------
Mironov 2017 (RDP) and Opacus / dp-accounting for the accounting; Crosby &
Wallach, "Efficient Data Structures for Tamper-Evident Logging", USENIX Security
2009, for hash-chained logs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import ValidationError

from securefl.privacy.accountants import ACCOUNTANT_NAMES, Accountant, get_accountant
from securefl.privacy.budget import Budget, ExperimentTarget, PrivacyPolicy, resolve_budget
from securefl.privacy.errors import (
    BudgetExceeded,
    LedgerCorrupt,
    LedgerLocked,
    LedgerMismatch,
    UnsupportedEvent,
)
from securefl.privacy.events import UNITS, AnyEvent, PrivacyEvent, PublicDataEvent

try:  # POSIX advisory locks; without them (Windows) double-opening is not detected.
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT",
    "GENESIS_HASH",
    "Budget",
    "ExperimentTarget",
    "Ledger",
    "LedgerContents",
    "PrivacyPolicy",
    "canonical_json",
    "entry_hash",
    "public_key_path",
    "read_ledger",
    "resolve_budget",
    "seal_message",
]

FORMAT = "securefl-ledger/1"
GENESIS_HASH = "0" * 64
#: Domain separation: a seal signature can never be confused with the signature
#: of a protocol message made with the same participant key.
_SEAL_DOMAIN = b"securefl-ledger-seal/1\n"
#: Relative tolerance when re-checking recorded ε on re-open (same accountant,
#: same canonical events: normally bit-identical; this absorbs library updates).
_REOPEN_RTOL = 1e-6

_HEADER_KEYS = frozenset(
    {
        "kind",
        "seq",
        "format",
        "participant",
        "max_epsilon",
        "unit_budgets",
        "delta",
        "accountant",
        "public_key",
        "created_at",
        "prev_hash",
        "hash",
    }
)
_RELEASE_KEYS = frozenset(
    {
        "kind",
        "seq",
        "round",
        "participant",
        "unit",
        "mechanism",
        "noise_multiplier",
        "sample_rate",
        "steps",
        "sensitivity",
        "relation",
        "payload",
        "note",
        "accountant",
        "delta",
        "epsilon_after",
        "epsilon_by_unit",
        "written_at",
        "prev_hash",
        "hash",
    }
)
_SEAL_KEYS = frozenset(
    {
        "kind",
        "seq",
        "participant",
        "accountant",
        "delta",
        "head",
        "public_key",
        "signature",
        "epsilon_by_unit",
        "written_at",
        "prev_hash",
        "hash",
    }
)
#: An owner's approval of the run (see :mod:`securefl.deploy.approval`): it costs nothing and releases
#: nothing, so it is its own kind, not a release; the chain and the seal cover it like any entry.
_APPROVAL_KEYS = frozenset(
    {
        "kind",
        "seq",
        "participant",
        "accountant",
        "delta",
        "approval_digest",
        "approver_key",
        "approved",
        "epsilon_by_unit",
        "written_at",
        "prev_hash",
        "hash",
    }
)
_EVENT_FIELDS = ("unit", "mechanism", "noise_multiplier", "sample_rate", "steps", "sensitivity", "relation", "payload")


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


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _private_key(key: object) -> Ed25519PrivateKey:
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, bytes | bytearray) and len(key) == 32:
        return Ed25519PrivateKey.from_private_bytes(bytes(key))
    raise TypeError(f"signing_key must be an Ed25519PrivateKey or 32 raw private-key bytes, got {type(key).__name__}")


def _public_hex(key: Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(Encoding.Raw, PublicFormat.Raw).hex()


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _isclose(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


# --------------------------------------------------------------------------- reading
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
    if not _is_number(h.get("max_epsilon")) or h["max_epsilon"] <= 0:
        fail(f"header field 'max_epsilon' must be a number > 0, got {h.get('max_epsilon')!r}")
    if not _is_number(h.get("delta")) or not 0 < h["delta"] < 1:
        fail(f"header field 'delta' must be in (0, 1), got {h.get('delta')!r}")
    if h.get("accountant") not in ACCOUNTANT_NAMES:
        fail(f"header field 'accountant' must be one of {ACCOUNTANT_NAMES}, got {h.get('accountant')!r}")
    budgets = h.get("unit_budgets")
    if not isinstance(budgets, dict) or any(u not in UNITS or not _is_number(v) or v <= 0 for u, v in budgets.items()):
        fail(f"header field 'unit_budgets' must map units {UNITS} to numbers > 0, got {budgets!r}")
    key = h.get("public_key")
    try:
        Ed25519PublicKey.from_public_bytes(bytes.fromhex(key))  # type: ignore[arg-type]
    except (TypeError, ValueError):
        fail(f"header field 'public_key' is not a hex Ed25519 public key: {key!r}")


def _event_from_entry(entry: dict[str, Any], fail: Callable[[str], NoReturn]) -> AnyEvent:
    try:
        if entry["mechanism"] == "none":
            stray = [k for k in _EVENT_FIELDS if k not in ("unit", "mechanism", "payload") and entry[k] is not None]
            if stray:
                fail(f"a public-data entry (mechanism 'none') must have null {stray}")
            return PublicDataEvent(payload=entry["payload"], unit=entry["unit"], reason=entry["note"])
        if entry["note"] is not None:
            fail(f"field 'note' must be null for a {entry['mechanism']!r} release, got {entry['note']!r}")
        return PrivacyEvent(**{k: entry[k] for k in _EVENT_FIELDS})
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "event"
        fail(f"invalid event field {field!r}: {err['msg']} (got {err.get('input')!r})")


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
        kind = entry.get("kind")
        expected = {"header": _HEADER_KEYS, "release": _RELEASE_KEYS, "seal": _SEAL_KEYS,
                    "approval": _APPROVAL_KEYS}.get(kind)  # type: ignore[arg-type]
        if lineno == 1 and kind != "header":
            fail(f"first line must be the header, got kind {kind!r}")
        if lineno > 1 and kind not in ("release", "seal", "approval"):
            fail(f"field 'kind' must be 'release', 'seal' or 'approval' after the header, got {kind!r}")
        assert expected is not None
        if set(entry) != expected:
            missing, extra = sorted(expected - set(entry)), sorted(set(entry) - expected)
            fail(f"{kind} entry has missing fields {missing} / unexpected fields {extra}")

        if kind == "header":
            _check_header(entry, fail)
            header = entry
            public_key = Ed25519PublicKey.from_public_bytes(bytes.fromhex(entry["public_key"]))
        else:
            for name in ("participant", "accountant", "delta"):
                if entry[name] != header[name]:
                    fail(f"field {name!r} is {entry[name]!r} but the header says {header[name]!r}")
            if not isinstance(entry["epsilon_by_unit"], dict) or any(
                u not in UNITS or not _is_number(v) or v < 0 for u, v in entry["epsilon_by_unit"].items()
            ):
                fail(f"field 'epsilon_by_unit' must map units to numbers >= 0, got {entry['epsilon_by_unit']!r}")
        if kind == "release":
            rnd = entry["round"]
            if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
                fail(f"field 'round' must be an integer >= 0, got {rnd!r}")
            if not _is_number(entry["epsilon_after"]) or entry["epsilon_after"] < 0:
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
        entries.append(entry)
        prev = entry["hash"]
    return LedgerContents(path=path, entries=tuple(entries), events=tuple(events), event_lines=tuple(event_lines))


# --------------------------------------------------------------------------- the ledger
class Ledger:
    """A participant's privacy ledger: one per data owner, for the whole run.

    Create or resume one with :meth:`Ledger.open`; never construct it directly.
    Budgets: each unit of privacy has its own budget, ``unit_budgets[unit]`` if
    given, else ``max_epsilon``; ε of different units are never added together.

    Typical use by the runtime::

        if ledger.would_exceed(event):      # check: before computing/noising
            stop contributing
        entry = ledger.commit(event, round=r)  # commit: durable before release
        send(payload)                        # release only after commit returned
    """

    def __init__(self, *, _token: object, path: Path, fd: int, contents: LedgerContents) -> None:
        if _token is not _OPEN_TOKEN:
            raise TypeError("use Ledger.open(...) to create or resume a ledger")
        header = contents.header
        self._path = path
        self._fd: int | None = fd
        self._participant: str = header["participant"]
        self._max_epsilon: float = float(header["max_epsilon"])
        self._unit_budgets: Mapping[str, float] = MappingProxyType({u: float(v) for u, v in header["unit_budgets"].items()})
        self._delta: float = float(header["delta"])
        self._public_key: str = header["public_key"]
        # The ONE accountant of this participant, for the ledger's whole life.
        # It is private, and nothing in this class replaces or clears it.
        self._accountant: Accountant = get_accountant(header["accountant"])
        self._entries: list[dict[str, Any]] = [dict(e) for e in contents.entries]
        self._events: list[AnyEvent] = list(contents.events)
        self._lock = threading.Lock()
        self._broken: str | None = None

    # ------------------------------------------------------------------ opening
    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        participant: str,
        max_epsilon: float,
        delta: float,
        signing_key: Ed25519PrivateKey | bytes,
        unit_budgets: Mapping[str, float] | None = None,
        accountant: str = "rdp",
    ) -> Ledger:
        """Create a ledger file, or re-open (resume) an existing one after verifying it.

        Parameters
        ----------
        path : str or Path
            The JSON-lines ledger file (parent directories are created).
        participant : str
            The data owner.
        max_epsilon : float
            ε budget of every unit without an entry in ``unit_budgets``.
        delta : float
            δ in (0, 1) at which every ε of this ledger is computed.
        signing_key : Ed25519PrivateKey or bytes
            The participant's key; its public half is recorded in the header and
            must match on re-open.
        unit_budgets : mapping, optional
            Per-unit ε budgets, e.g. ``{"record": 8.0, "participant": 2.0}``.
        accountant : {"rdp", "pld", "prv"}
            The accountant this ledger composes and reports with.

        Raises
        ------
        LedgerCorrupt
            The existing file is truncated, tampered with or otherwise invalid.
        LedgerMismatch
            The existing file was created with different parameters or another key.
        LedgerLocked
            Another open ledger object (in this or another process) holds the file.
        """
        if not isinstance(participant, str) or not participant:
            raise ValueError(f"participant must be a non-empty string, got {participant!r}")
        if not _is_number(max_epsilon) or max_epsilon <= 0:
            raise ValueError(f"max_epsilon must be a finite number > 0, got {max_epsilon!r}")
        if not _is_number(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        budgets = dict(unit_budgets or {})
        for unit, value in budgets.items():
            if unit not in UNITS:
                raise ValueError(f"unit_budgets: unknown unit {unit!r}; units are {UNITS}")
            if not _is_number(value) or value <= 0:
                raise ValueError(f"unit_budgets[{unit!r}] must be a finite number > 0, got {value!r}")
        if accountant not in ACCOUNTANT_NAMES:
            # Checked by name: the ledger constructs exactly one accountant, below.
            raise ValueError(f"unknown accountant {accountant!r}; choose one of {', '.join(map(repr, ACCOUNTANT_NAMES))}")
        key = _private_key(signing_key)
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)

        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o644)
            created = True
        except FileExistsError:
            fd = os.open(path, os.O_RDWR | os.O_APPEND)
            created = False
        try:
            _lock(fd, path)
            if created:
                header: dict[str, Any] = {
                    "kind": "header",
                    "seq": 0,
                    "format": FORMAT,
                    "participant": participant,
                    "max_epsilon": float(max_epsilon),
                    "unit_budgets": {u: float(v) for u, v in sorted(budgets.items())},
                    "delta": float(delta),
                    "accountant": accountant,
                    "public_key": _public_hex(key),
                    "created_at": _now(),
                    "prev_hash": GENESIS_HASH,
                }
                header["hash"] = entry_hash(header)
                _write_durably(fd, (canonical_json(header) + "\n").encode("utf-8"))
                _fsync_dir(path.parent)
                _write_public_key(path, header["public_key"])
            contents = read_ledger(path)
            if not created:
                _check_resume(
                    contents,
                    participant=participant,
                    max_epsilon=max_epsilon,
                    delta=delta,
                    unit_budgets=budgets,
                    accountant=accountant,
                    public_key=_public_hex(key),
                )
                _check_public_key_file(path, contents.header["public_key"])
            ledger = cls(_token=_OPEN_TOKEN, path=path, fd=fd, contents=contents)
            if not created:
                ledger._verify_recorded_epsilons(contents)
            return ledger
        except BaseException:
            os.close(fd)
            raise

    def _verify_recorded_epsilons(self, contents: LedgerContents) -> None:
        # The chain proves the lines are as written; this proves the running ε
        # written last is what the accountant gives for the logged events, so a
        # resumed run starts from the true spend, never from a lower number.
        if not contents.event_lines:
            return
        last_line = contents.event_lines[-1]
        recorded = contents.entries[last_line - 1]["epsilon_by_unit"]
        recomputed = self._accountant.epsilon_by_unit(self._events, delta=self._delta)
        if set(recorded) != set(recomputed) or not all(_isclose(recorded[u], recomputed[u], _REOPEN_RTOL) for u in recomputed):
            raise LedgerCorrupt(
                f"recorded epsilon_by_unit {recorded} does not match the {self._accountant.name} "
                f"recomputation {recomputed} from the logged events",
                path=str(self._path),
                line=last_line,
            )

    # ------------------------------------------------------------------ properties
    @property
    def path(self) -> Path:
        return self._path

    @property
    def participant(self) -> str:
        return self._participant

    @property
    def delta(self) -> float:
        return self._delta

    @property
    def max_epsilon(self) -> float:
        return self._max_epsilon

    @property
    def unit_budgets(self) -> Mapping[str, float]:
        return self._unit_budgets

    @property
    def accountant_name(self) -> str:
        return self._accountant.name

    @property
    def public_key(self) -> str:
        """The participant's Ed25519 public key (raw, hex)."""
        return self._public_key

    @property
    def events(self) -> tuple[AnyEvent, ...]:
        """Every committed event, in order (frozen values)."""
        return tuple(self._events)

    @property
    def entries(self) -> tuple[dict[str, Any], ...]:
        """Copies of every entry written, header first."""
        return tuple(json.loads(canonical_json(e)) for e in self._entries)

    @property
    def head(self) -> str:
        """Hash of the last entry; record it outside the ledger to detect rollbacks."""
        return str(self._entries[-1]["hash"])

    @property
    def sealed(self) -> bool:
        """Whether the last entry is a seal."""
        return self._entries[-1]["kind"] == "seal"

    @property
    def closed(self) -> bool:
        return self._fd is None

    # ------------------------------------------------------------------ budget queries
    def budget(self, unit: str) -> float:
        """ε budget of ``unit``: ``unit_budgets[unit]`` if set, else ``max_epsilon``."""
        if unit not in UNITS:
            raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
        return self._unit_budgets.get(unit, self._max_epsilon)

    def _unit_events(self, unit: str) -> list[PrivacyEvent]:
        return [e for e in self._events if isinstance(e, PrivacyEvent) and e.unit == unit]

    def relation(self, unit: str) -> str | None:
        """The neighbouring relation of ``unit``'s events (one per unit), or ``None`` if none yet."""
        relations = {e.relation for e in self._unit_events(unit)}
        return relations.pop() if relations else None

    def epsilon_by_unit(self) -> dict[str, float]:
        """ε spent so far for each unit that has spent anything."""
        return self._accountant.epsilon_by_unit(self._events, delta=self._delta)

    def epsilon(self, unit: str | None = None) -> float:
        """ε spent so far for ``unit``; with no unit, the largest over units (0 if none)."""
        if unit is not None:
            if unit not in UNITS:
                raise ValueError(f"unit must be one of {UNITS}, got {unit!r}")
            return self._accountant.epsilon(self._unit_events(unit), delta=self._delta)
        return max(self.epsilon_by_unit().values(), default=0.0)

    def remaining(self, unit: str | None = None) -> float:
        """Budget left for ``unit``; with no unit, the smallest over units."""
        units = UNITS if unit is None else (unit,)
        return min(max(self.budget(u) - self.epsilon(u), 0.0) for u in units)

    def epsilon_if(self, event: AnyEvent) -> float:
        """ε of the event's unit if ``event`` were committed now (nothing is written)."""
        if isinstance(event, PublicDataEvent):
            return self.epsilon(event.unit)
        if not isinstance(event, PrivacyEvent):
            raise TypeError(f"event must be a PrivacyEvent or PublicDataEvent, got {type(event).__name__}")
        return self._accountant.epsilon([*self._unit_events(event.unit), event], delta=self._delta)

    def would_exceed(self, event: AnyEvent) -> bool:
        """Whether committing ``event`` would take its unit over budget (check before release).

        Raises
        ------
        UnsupportedEvent
            If the ledger's accountant cannot account the event soundly.
        """
        if isinstance(event, PublicDataEvent):
            return False
        return self.epsilon_if(event) > self.budget(event.unit)

    # ------------------------------------------------------------------ writing
    def commit(self, event: AnyEvent, *, round: int, payload: str | None = None) -> dict[str, Any]:
        """Record ``event`` durably, or refuse it; release the payload only after this returns.

        Parameters
        ----------
        event : PrivacyEvent or PublicDataEvent
            What the release costs.
        round : int
            The round of the release (>= 0).
        payload : str, optional
            Payload kind; if given it must equal ``event.payload`` (a guard
            against committing one event for another payload).

        Returns
        -------
        dict
            The entry as written.

        Raises
        ------
        BudgetExceeded
            If composing the event would exceed the unit's budget; nothing is written.
        UnsupportedEvent
            If the accountant cannot account the event; nothing is written.
        """
        if isinstance(round, bool) or not isinstance(round, int) or round < 0:
            raise ValueError(f"round must be an integer >= 0, got {round!r}")
        if not isinstance(event, PrivacyEvent | PublicDataEvent):
            raise TypeError(f"event must be a PrivacyEvent or PublicDataEvent, got {type(event).__name__}")
        if payload is not None and payload != event.payload:
            raise ValueError(f"payload {payload!r} does not match the event's payload {event.payload!r}")
        with self._lock:
            self._check_usable()
            by_unit = self.epsilon_by_unit()
            if isinstance(event, PrivacyEvent):
                if not self._accountant.supports(event):
                    raise UnsupportedEvent(
                        f"{self._accountant.name} accountant of {self._participant!r} cannot account "
                        f"{event!r}: {self._accountant.unsupported_reason(event)}"
                    )
                eps_after = self.epsilon_if(event)
                budget = self.budget(event.unit)
                if eps_after > budget:
                    raise BudgetExceeded(
                        f"{self._participant}: releasing {event.payload!r} would spend {event.unit}-level "
                        f"ε={eps_after:.6g} > budget {budget:g} at δ={self._delta:g} ({self._accountant.name}); "
                        "the release must not happen",
                        participant=self._participant,
                        unit=event.unit,
                        epsilon_would_be=eps_after,
                        budget=budget,
                        delta=self._delta,
                    )
                by_unit[event.unit] = eps_after
                fields: dict[str, Any] = {k: getattr(event, k) for k in _EVENT_FIELDS}
                fields["note"] = None
            else:
                eps_after = by_unit.get(event.unit, 0.0) if event.unit else max(by_unit.values(), default=0.0)
                fields = {
                    "unit": event.unit,
                    "mechanism": "none",
                    "noise_multiplier": None,
                    "sample_rate": None,
                    "steps": None,
                    "sensitivity": None,
                    "relation": None,
                    "payload": event.payload,
                    "note": event.reason,
                }
            entry: dict[str, Any] = {
                "kind": "release",
                "seq": len(self._entries),
                "round": round,
                "participant": self._participant,
                **fields,
                "accountant": self._accountant.name,
                "delta": self._delta,
                "epsilon_after": float(eps_after),
                "epsilon_by_unit": {u: float(v) for u, v in sorted(by_unit.items())},
                "written_at": _now(),
                "prev_hash": self.head,
            }
            entry["hash"] = entry_hash(entry)
            self._append(entry)
            self._events.append(event)
            return json.loads(canonical_json(entry))

    def approvals(self) -> list[dict[str, Any]]:
        """The owner's approvals recorded in this ledger (``approval`` entries), oldest first."""
        return [json.loads(canonical_json(e)) for e in self._entries if e["kind"] == "approval"]

    def record_approval(self, *, digest: str, approver_key: str, approved: Mapping[str, Any]) -> dict[str, Any]:
        """Record, durably, that the data owner approved this run's setup: ``digest`` of what was approved,
        ``approver_key`` the fingerprint of the key that signed the approval, ``approved`` the settings in
        plain values. It spends nothing; the seal that follows covers it."""
        if not isinstance(digest, str) or len(digest) != 64:
            raise ValueError(f"digest must be a SHA-256 hex digest, got {digest!r}")
        with self._lock:
            self._check_usable()
            entry: dict[str, Any] = {
                "kind": "approval",
                "seq": len(self._entries),
                "participant": self._participant,
                "accountant": self._accountant.name,
                "delta": self._delta,
                "approval_digest": digest,
                "approver_key": str(approver_key),
                # Through canonical JSON once, so what is hashed is what a reader will parse back.
                "approved": json.loads(canonical_json(dict(approved))),
                "epsilon_by_unit": {u: float(v) for u, v in sorted(self.epsilon_by_unit().items())},
                "written_at": _now(),
                "prev_hash": self.head,
            }
            entry["hash"] = entry_hash(entry)
            self._append(entry)
            return json.loads(canonical_json(entry))

    def seal(self, signing_key: Ed25519PrivateKey | bytes) -> dict[str, Any]:
        """Sign the chain head with the participant's key and append the seal entry.

        Sealing an already-sealed ledger (nothing appended since) returns the
        existing seal. The public key is (re)written to ``<path>.pub``.
        """
        key = _private_key(signing_key)
        if _public_hex(key) != self._public_key:
            raise LedgerMismatch(
                f"{self._path}: field 'signing_key': this key's public half does not match the ledger's "
                f"public key {self._public_key}"
            )
        with self._lock:
            self._check_usable()
            if self.sealed:
                return json.loads(canonical_json(self._entries[-1]))
            head = self.head
            entry: dict[str, Any] = {
                "kind": "seal",
                "seq": len(self._entries),
                "participant": self._participant,
                "accountant": self._accountant.name,
                "delta": self._delta,
                "head": head,
                "public_key": self._public_key,
                "signature": key.sign(seal_message(head)).hex(),
                "epsilon_by_unit": {u: float(v) for u, v in sorted(self.epsilon_by_unit().items())},
                "written_at": _now(),
                "prev_hash": head,
            }
            entry["hash"] = entry_hash(entry)
            self._append(entry)
            _write_public_key(self._path, self._public_key)
            return json.loads(canonical_json(entry))

    def _check_usable(self) -> None:
        if self._fd is None:
            raise ValueError(f"{self._path}: ledger is closed")
        if self._broken is not None:
            raise LedgerCorrupt(
                f"an earlier write failed ({self._broken}); re-open the ledger to verify it", path=str(self._path)
            )

    def _append(self, entry: dict[str, Any]) -> None:
        assert self._fd is not None
        try:
            _write_durably(self._fd, (canonical_json(entry) + "\n").encode("utf-8"))
        except BaseException as exc:
            # The file may now end in a torn line: refuse further writes so the
            # next append cannot bury it; re-opening will report it.
            self._broken = f"{type(exc).__name__}: {exc}"
            raise
        self._entries.append(entry)

    # ------------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Release the file lock. Committed entries are already durable."""
        fd, self._fd = self._fd, None
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)  # closing the descriptor also releases the flock

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return (
            f"Ledger({str(self._path)!r}, participant={self._participant!r}, accountant={self.accountant_name!r}, "
            f"delta={self._delta:g}, epsilon={self.epsilon_by_unit()}, sealed={self.sealed})"
        )


_OPEN_TOKEN = object()


def _lock(fd: int, path: Path) -> None:
    if fcntl is None:  # pragma: no cover
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise LedgerLocked(
            f"{path}: the ledger is already open (in this or another process); a participant has ONE ledger for the whole run"
        ) from None


def _write_durably(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]
    os.fsync(fd)


def _fsync_dir(directory: Path) -> None:
    # Make the new file's directory entry durable too (POSIX); best effort elsewhere.
    with contextlib.suppress(OSError):
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def _write_public_key(path: Path, public_hex: str) -> None:
    target = public_key_path(path)
    tmp = target.with_name(target.name + ".tmp")
    with open(tmp, "w", encoding="ascii") as fh:
        fh.write(public_hex + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, target)
    _fsync_dir(path.parent)


def _check_public_key_file(path: Path, public_hex: str) -> None:
    pub = public_key_path(path)
    if not pub.exists():
        # Lost sidecar (e.g. a crash right after creation): the header is the
        # authority, and it is covered by the chain, so restore it from there.
        _write_public_key(path, public_hex)
        return
    try:
        on_disk = pub.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        on_disk = None
    if on_disk != public_hex:
        raise LedgerCorrupt(f"public key file {pub.name} does not match the ledger header's key", path=str(path))


def _check_resume(
    contents: LedgerContents,
    *,
    participant: str,
    max_epsilon: float,
    delta: float,
    unit_budgets: Mapping[str, float],
    accountant: str,
    public_key: str,
) -> None:
    header = contents.header
    given = {
        "participant": participant,
        "max_epsilon": float(max_epsilon),
        "delta": float(delta),
        "accountant": accountant,
        "unit_budgets": {u: float(v) for u, v in unit_budgets.items()},
    }
    for name, value in given.items():
        if header[name] != value:
            raise LedgerMismatch(
                f"{contents.path}: field {name!r}: the ledger was created with {header[name]!r} but is "
                f"re-opened with {value!r}; a participant's ledger parameters cannot change mid-run"
            )
    if header["public_key"] != public_key:
        raise LedgerMismatch(
            f"{contents.path}: field 'signing_key': its public key does not match the ledger's "
            f"({header['public_key']}); this is another participant's key or a rewritten ledger"
        )


def iter_ledger_files(directory: str | Path) -> Iterator[Path]:
    """Ledger files (``*.jsonl``) in ``directory``, sorted by name."""
    yield from sorted(Path(directory).glob("*.jsonl"))
