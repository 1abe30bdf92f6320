"""Shamir secret sharing over the Mersenne prime field GF(2^127 - 1).

A. Shamir, "How to Share a Secret", Communications of the ACM 22(11), 1979.
Used by :mod:`securefl.crypto.masking` (Bonawitz et al., CCS 2017) to share
each participant's X25519 mask key and self-mask seed, so that the server can
recover the masks of participants who drop out.

A secret of any length is cut into 15-byte blocks (120 bits, below the 127-bit
field), and every block is shared with an independent random polynomial of
degree ``threshold - 1``. Polynomial coefficients come from :mod:`secrets`
(the operating system's CSPRNG). Any ``threshold`` shares reconstruct the
secret; fewer reveal nothing about it (information-theoretically).

The secret's length is public (it is carried in every share), as is the
share's x-coordinate.
"""

from __future__ import annotations

import secrets
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from securefl.crypto.errors import ShamirError

__all__ = ["PRIME", "Share", "reconstruct", "split"]

#: The field modulus, the Mersenne prime 2^127 - 1.
PRIME = (1 << 127) - 1
_BLOCK = 15  # bytes per field element; 120 bits < 127 bits
_ELEMENT = 16  # bytes used to store one field element on the wire
_HEADER = struct.Struct("<BHHI")  # version, x, threshold, secret length
_VERSION = 1


@dataclass(frozen=True)
class Share:
    """One participant's share of a secret.

    Parameters
    ----------
    x
        The evaluation point, ``1 <= x < 2^16`` (never 0: ``f(0)`` is the secret).
    ys
        ``f_j(x)`` for every 15-byte block ``j`` of the secret.
    threshold
        Number of shares needed to reconstruct.
    secret_length
        Length of the secret in bytes.
    """

    x: int
    ys: tuple[int, ...]
    threshold: int
    secret_length: int

    def to_bytes(self) -> bytes:
        """Serialize: a 9-byte header then 16 bytes per block."""
        return _HEADER.pack(_VERSION, self.x, self.threshold, self.secret_length) + b"".join(
            y.to_bytes(_ELEMENT, "little") for y in self.ys
        )

    @classmethod
    def from_bytes(cls, data: bytes) -> Share:
        """Parse :meth:`to_bytes` output, checking every field."""
        if len(data) < _HEADER.size:
            raise ShamirError(f"share of {len(data)} bytes is shorter than its {_HEADER.size}-byte header")
        version, x, threshold, length = _HEADER.unpack_from(data)
        if version != _VERSION:
            raise ShamirError(f"share version {version} is not supported (expected {_VERSION})")
        body = data[_HEADER.size :]
        n_blocks = _n_blocks(length)
        if len(body) != n_blocks * _ELEMENT:
            raise ShamirError(f"share body has {len(body)} bytes; a {length}-byte secret needs {n_blocks * _ELEMENT}")
        ys = tuple(int.from_bytes(body[i : i + _ELEMENT], "little") for i in range(0, len(body), _ELEMENT))
        if any(y >= PRIME for y in ys):
            raise ShamirError("share holds a value outside the field GF(2^127 - 1)")
        return cls(x=x, ys=ys, threshold=threshold, secret_length=length)


def _n_blocks(length: int) -> int:
    return -(-length // _BLOCK)


def _eval(coeffs: Sequence[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):  # Horner
        acc = (acc * x + c) % PRIME
    return acc


def split(secret: bytes, *, threshold: int, xs: Sequence[int]) -> list[Share]:
    """Split ``secret`` into one share per evaluation point in ``xs``.

    Parameters
    ----------
    secret
        The bytes to share (at least 1 byte).
    threshold
        Number of shares needed to reconstruct, ``1 <= threshold <= len(xs)``.
    xs
        Distinct evaluation points in ``[1, 65535]`` (typically 1-based
        participant indices).

    Returns
    -------
    list[Share]
        ``shares[i]`` is the share for ``xs[i]``.
    """
    if not isinstance(secret, bytes | bytearray) or len(secret) == 0:
        raise ShamirError(
            f"secret must be non-empty bytes, got {type(secret).__name__} of length "
            f"{len(secret) if isinstance(secret, bytes | bytearray) else '?'}"
        )
    xs = [int(x) for x in xs]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"evaluation points must be distinct, got {xs}")
    bad = [x for x in xs if not 1 <= x <= 0xFFFF]
    if bad:
        raise ShamirError(f"evaluation points must be in [1, 65535], got {bad}")
    if not 1 <= threshold <= len(xs):
        raise ShamirError(f"threshold must be in [1, {len(xs)}] for {len(xs)} shares, got {threshold}")
    blocks = [int.from_bytes(secret[i : i + _BLOCK], "little") for i in range(0, len(secret), _BLOCK)]
    polys = [[b] + [secrets.randbelow(PRIME) for _ in range(threshold - 1)] for b in blocks]
    return [Share(x=x, ys=tuple(_eval(p, x) for p in polys), threshold=threshold, secret_length=len(secret)) for x in xs]


def _lagrange_at(xs: Sequence[int], target: int) -> list[int]:
    """Lagrange basis coefficients l_i(target) for the points ``xs`` over GF(PRIME)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (target - xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return out


def reconstruct(shares: Sequence[Share]) -> bytes:
    """Recover the secret from at least ``threshold`` shares.

    The first ``threshold`` shares (by x) interpolate the polynomials; any
    further shares are checked against them, so a corrupted share is detected
    rather than silently producing a wrong secret.

    Raises
    ------
    ShamirError
        If there are fewer than ``threshold`` shares, duplicate points, shares
        of different secrets, or inconsistent extra shares.
    """
    if not shares:
        raise ShamirError("no shares given")
    first = shares[0]
    for s in shares:
        if (s.threshold, s.secret_length, len(s.ys)) != (first.threshold, first.secret_length, len(first.ys)):
            raise ShamirError(
                f"shares disagree: x={s.x} has threshold {s.threshold} and secret length {s.secret_length}, "
                f"x={first.x} has threshold {first.threshold} and secret length {first.secret_length}"
            )
    t = first.threshold
    xs = [s.x for s in shares]
    if len(set(xs)) != len(xs):
        raise ShamirError(f"duplicate share points: {sorted(xs)}")
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares given, the threshold is {t}")
    ordered = sorted(shares, key=lambda s: s.x)
    base, extra = ordered[:t], ordered[t:]
    base_x = [s.x for s in base]
    at_zero = _lagrange_at(base_x, 0)
    blocks = [sum(l * s.ys[j] for l, s in zip(at_zero, base, strict=True)) % PRIME for j in range(len(first.ys))]
    for s in extra:
        at_x = _lagrange_at(base_x, s.x)
        for j, y in enumerate(s.ys):
            if sum(l * b.ys[j] for l, b in zip(at_x, base, strict=True)) % PRIME != y:
                raise ShamirError(f"share x={s.x} is inconsistent with the others (corrupted or from another secret)")
    length = first.secret_length
    out = bytearray()
    for j, value in enumerate(blocks):
        size = min(_BLOCK, length - j * _BLOCK)
        if value >= 1 << (8 * size):
            raise ShamirError("reconstructed value does not fit its block: the shares are corrupted")
        out += value.to_bytes(size, "little")
    return bytes(out)
