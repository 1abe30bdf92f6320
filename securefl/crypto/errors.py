"""Exceptions raised by :mod:`securefl.crypto`.

They are kept in one dependency-free module so that a runtime can catch them
(and turn them into error replies, as Flower does) without importing TenSEAL or
``cryptography``.
"""

from __future__ import annotations


class CiphertextError(ValueError):
    """A ciphertext received from the wire is malformed, truncated or inconsistent.

    The message names the chunk (``chunk i of n``) and what was wrong with it.
    """


class SecAggAbort(RuntimeError):
    """Secure aggregation by pairwise masking cannot complete safely.

    Raised when fewer than ``threshold`` participants are left at some phase, or
    when the survivor set is inconsistent. No partial result is ever returned
    alongside it.
    """


class ShamirError(ValueError):
    """Shamir shares are missing, duplicated, malformed or inconsistent."""


class RejectedMessage(Exception):
    """A message failed verification and must be dropped (and the rejection logged).

    Parameters
    ----------
    reason
        A short, stable tag that a log line or a metric can carry: one of
        ``"malformed"``, ``"unknown sender"``, ``"wrong run id"``,
        ``"wrong receiver"``, ``"bad signature"``, ``"replay"``, ``"stale"``.
    detail
        A human-readable explanation naming the offending values.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}" if detail else reason)
