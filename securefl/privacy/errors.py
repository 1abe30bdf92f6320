"""Exceptions of the privacy layer.

Every error names the field, the bad value and, where there is one, the file
and the line, so that an operator can act on it without reading the code.
They all derive from :class:`PrivacyError` so a runtime can catch the family
and turn it into an error reply (Flower's habit: failures come back as replies,
not as exceptions deep inside a round).
"""

from __future__ import annotations


class PrivacyError(Exception):
    """Base class of every securefl privacy error."""


class UnsupportedEvent(PrivacyError, ValueError):
    """An accountant was asked to compose an event it cannot account soundly."""


class BudgetExceeded(PrivacyError):
    """Composing an event would exceed a participant's budget; nothing was written.

    Attributes
    ----------
    participant, unit : str
        Whose budget, and for which unit of privacy.
    epsilon_would_be : float
        ε after composing the refused event.
    budget : float
        The ε budget that would have been exceeded.
    delta : float
        The δ at which both are computed.
    """

    def __init__(
        self,
        message: str,
        *,
        participant: str,
        unit: str,
        epsilon_would_be: float,
        budget: float,
        delta: float,
    ) -> None:
        super().__init__(message)
        self.participant = participant
        self.unit = unit
        self.epsilon_would_be = epsilon_would_be
        self.budget = budget
        self.delta = delta


class LedgerCorrupt(PrivacyError):
    """A ledger file is truncated, tampered with or otherwise unreadable.

    Attributes
    ----------
    path : str
        The ledger file.
    line : int or None
        1-based line number of the first bad line (``None`` if the problem is
        not tied to one line, e.g. a missing public-key file).
    """

    def __init__(self, message: str, *, path: str, line: int | None = None) -> None:
        where = f"{path}" if line is None else f"{path}, line {line}"
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line
        self.reason = message


class LedgerMismatch(PrivacyError, ValueError):
    """A ledger was re-opened with parameters that differ from those it was created with."""


class LedgerLocked(PrivacyError):
    """Another open :class:`~securefl.privacy.ledger.Ledger` already holds this file."""


class PolicyError(PrivacyError, ValueError):
    """A privacy policy (file or object) is invalid; the message names the file and field."""


class CalibrationError(PrivacyError, ValueError):
    """No noise multiplier can meet the requested (ε, δ) target."""
