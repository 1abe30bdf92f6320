"""The :class:`Ledger`: one privacy ledger per data owner, for the whole run: check, then commit.

A :class:`Ledger` records every release of one participant as a frozen event in
an append-only JSON-lines file (:mod:`~securefl.privacy.ledger.format`), composes
them with ONE accountant that lives as long as the ledger (there is deliberately
no way to reset it), and refuses any release that would take the participant
over its budget.

Write-ahead
-----------
:meth:`Ledger.commit` appends the entry and calls ``os.fsync`` *before* it
returns; the caller releases the payload only after that. A crash between
commit and release therefore over-counts (the spend is on disk, the payload
never left) but can never under-count.

References
----------
Mironov 2017 (RDP) and Opacus / dp-accounting for the accounting.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from securefl.core.durable import append_durably, fsync_dir, lock_descriptor, write_atomically
from securefl.privacy.accountants import ACCOUNTANT_NAMES, Accountant, get_accountant
from securefl.privacy.errors import BudgetExceeded, LedgerCorrupt, LedgerLocked, LedgerMismatch, UnsupportedEvent
from securefl.privacy.events import UNITS, AnyEvent, PrivacyEvent, PublicDataEvent
from securefl.privacy.ledger.format import (
    EVENT_FIELDS,
    FORMAT,
    GENESIS_HASH,
    canonical_json,
    entry_hash,
    is_number,
    public_key_path,
    seal_message,
)
from securefl.privacy.ledger.reader import LedgerContents, read_ledger

__all__ = ["Ledger"]

#: Relative tolerance when re-checking recorded ε on re-open (same accountant,
#: same canonical events: normally bit-identical; this absorbs library updates).
_REOPEN_RTOL = 1e-6


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


def _isclose(a: float, b: float, rtol: float) -> bool:
    return math.isclose(a, b, rel_tol=rtol, abs_tol=1e-12)


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
        if not is_number(max_epsilon) or max_epsilon <= 0:
            raise ValueError(f"max_epsilon must be a finite number > 0, got {max_epsilon!r}")
        if not is_number(delta) or not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta!r}")
        budgets = dict(unit_budgets or {})
        for unit, value in budgets.items():
            if unit not in UNITS:
                raise ValueError(f"unit_budgets: unknown unit {unit!r}; units are {UNITS}")
            if not is_number(value) or value <= 0:
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
                append_durably(fd, (canonical_json(header) + "\n").encode("utf-8"))
                fsync_dir(path.parent)
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
                fields: dict[str, Any] = {k: getattr(event, k) for k in EVENT_FIELDS}
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
            append_durably(self._fd, (canonical_json(entry) + "\n").encode("utf-8"))
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
    try:
        lock_descriptor(fd)
    except BlockingIOError:
        raise LedgerLocked(
            f"{path}: the ledger is already open (in this or another process); a participant has ONE ledger for the whole run"
        ) from None


def _write_public_key(path: Path, public_hex: str) -> None:
    write_atomically(public_key_path(path), (public_hex + "\n").encode("ascii"))


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
