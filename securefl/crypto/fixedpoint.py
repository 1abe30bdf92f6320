"""Fixed-point encoding of real vectors into the ring Z_{2^k}, for pairwise masking.

Masks in secure aggregation (Bonawitz et al., CCS 2017) are uniform in a
finite ring, so real values are first encoded as integers: ``x -> round(x·2^f)
mod 2^k``, negative values in two's complement. Sums then wrap exactly like
``uint64``/``uint32`` arithmetic, which numpy does natively.

Defaults: ``k = 64`` ring bits and ``f = 24`` fractional bits.

* Resolution ``2^-24 ≈ 6e-8`` per element, about float32's relative
  precision for values of magnitude 1: each encoded value is within
  ``2^-25`` of its input, so a sum of ``n`` values is within ``n·2^-25``
  of the exact real sum (and exactly equal when inputs are multiples of
  ``2^-24``).
* Range: the **sum** over ``n`` contributors must stay within
  ``±(2^63 - 1)``, so each input must satisfy ``|x| <= (2^63 - 1) / (n·2^24)``,
  i.e. about ``5.5e11 / n``. :meth:`FixedPoint.encode` checks this bound and
  rejects NaN/Inf, naming the value, its index and the bound.
* Wire size: 8 bytes per element, 2x float32. ``ring_bits=32`` halves it but
  leaves only ``31 - f`` integer bits for the sum.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from securefl.core.sealed import to_float64

__all__ = ["FixedPoint"]

_DTYPES: dict[int, tuple[np.dtype, np.dtype]] = {
    32: (np.dtype("<u4"), np.dtype("<i4")),
    64: (np.dtype("<u8"), np.dtype("<i8")),
}


@dataclass(frozen=True)
class FixedPoint:
    """Encode reals as ``round(x · 2^fractional_bits)`` in ``Z_{2^ring_bits}``.

    Parameters
    ----------
    ring_bits
        ``k``: 64 (default) or 32.
    fractional_bits
        ``f``: bits after the binary point, ``0 <= f <= k - 2``.
    """

    ring_bits: int = 64
    fractional_bits: int = 24

    def __post_init__(self) -> None:
        if self.ring_bits not in _DTYPES:
            raise ValueError(f"ring_bits must be 32 or 64, got {self.ring_bits}")
        if not 0 <= self.fractional_bits <= self.ring_bits - 2:
            raise ValueError(
                f"fractional_bits must be in [0, {self.ring_bits - 2}] for ring_bits={self.ring_bits}, got {self.fractional_bits}"
            )

    @property
    def dtype(self) -> np.dtype:
        """Unsigned numpy dtype of ring elements (little-endian on the wire)."""
        return _DTYPES[self.ring_bits][0]

    @property
    def resolution(self) -> float:
        """Distance between neighbouring representable values, ``2^-f``."""
        return 2.0**-self.fractional_bits

    def _int_limit(self, n_contributors: int) -> int:
        if n_contributors < 1:
            raise ValueError(f"n_contributors must be >= 1, got {n_contributors}")
        return ((1 << (self.ring_bits - 1)) - 1) // n_contributors

    def bound(self, n_contributors: int) -> float:
        """Largest ``|x|`` per element such that the sum of ``n_contributors`` values cannot overflow."""
        return self._int_limit(n_contributors) / 2.0**self.fractional_bits

    def encode(self, values: np.ndarray | torch.Tensor, *, n_contributors: int) -> np.ndarray:
        """Encode a real array (any shape) into a flat array of ring elements.

        Raises
        ------
        ValueError
            If a value is NaN/Inf, or exceeds :meth:`bound` for ``n_contributors``.
        """
        flat = to_float64(values).reshape(-1)
        finite = np.isfinite(flat)
        if not finite.all():
            bad = int(np.flatnonzero(~finite)[0])
            raise ValueError(f"cannot encode non-finite value {flat[bad]} at flat index {bad} in fixed point")
        scaled = np.rint(flat * 2.0**self.fractional_bits)
        limit = self._int_limit(n_contributors)
        # Compare in float64 against the largest float not above the integer limit,
        # so that the int64 conversion below can never overflow.
        limit_f = float(limit)
        if int(limit_f) > limit:
            limit_f = float(np.nextafter(limit_f, 0.0))
        over = np.abs(scaled) > limit_f
        if over.any():
            bad = int(np.flatnonzero(over)[0])
            raise ValueError(
                f"value {flat[bad]} at flat index {bad} exceeds the fixed-point bound ±{self.bound(n_contributors):.6g} "
                f"for {n_contributors} contributors (ring 2^{self.ring_bits}, {self.fractional_bits} fractional bits)"
            )
        ints = scaled.astype(np.int64)
        if self.ring_bits == 64:
            return ints.view(np.uint64).astype(self.dtype, copy=False)
        return (ints & 0xFFFFFFFF).astype(self.dtype)

    def decode(self, ring: np.ndarray) -> np.ndarray:
        """Decode ring elements (e.g. an unmasked sum) to float64 (two's complement, divided by ``2^f``)."""
        signed = np.ascontiguousarray(ring, dtype=self.dtype).view(_DTYPES[self.ring_bits][1])
        return signed.astype(np.float64) / 2.0**self.fractional_bits
