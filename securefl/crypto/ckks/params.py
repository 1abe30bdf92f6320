"""CKKS parameters: the ring, the primes and the scale, checked against 128-bit security.

Kept apart from the TenSEAL contexts so that the configuration (``securefl.config``) can validate
``ckks:`` settings without loading TenSEAL.
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = ["CkksParams"]

# Largest total coefficient-modulus size (bits) that keeps 128-bit security for
# each ring dimension (HomomorphicEncryption.org standard, as enforced by SEAL).
_MAX_BITS_128 = {4096: 109, 8192: 218, 16384: 438, 32768: 881}


class CkksParams(BaseModel):
    """CKKS encryption parameters.

    The defaults (``N = 8192``, primes ``(60, 40, 40, 60)``, scale ``2^40``) give
    128-bit security, 4,096 slots per ciphertext and two rescale levels, which
    is what secure aggregation needs: additions, and one multiplication by a
    plaintext (``mean``, ``weighted_mean``) with one level to spare (e.g. a
    per-element ``1/count`` after a weighted sum).

    Precision (measured with TenSEAL 0.3.18 on these defaults, 3 repetitions of
    10 vectors of 4,096 values drawn uniformly from [-10, 10]):

    * sum of 10 ciphertexts: max abs error at most 2.7e-8 (documented tolerance 1e-6);
    * mean (sum times plaintext 1/10, then rescale): max abs error at most 9.5e-7
      (documented tolerance 1e-5).

    ``tests/crypto/test_crypto_ckks.py`` checks both tolerances.

    ``N = 4096`` with ``(40, 20, 40)`` and scale ``2^20`` is accepted but much
    coarser (max abs error 1.3e-2 for the sum, 1e-1 for the mean).

    Range. After a rescale only the first prime is left, so an aggregate must
    satisfy ``|x| < 2^(first_bits - global_scale_bits - 1)``, i.e. ``|x| < 2^19``
    with the defaults. :attr:`max_abs_value` returns this bound;
    :meth:`KeyHolderContext.encrypt` rejects inputs beyond it.

    Rules checked (each error names the field and the bad value): the degree
    is a power of two in {4096, 8192, 16384, 32768}; the total modulus stays
    within the 128-bit-security budget for that degree; there are at least 3
    primes (one rescale level); every prime is 20..60 bits; the inner primes
    equal ``global_scale_bits`` (so a rescale returns to the same scale); the
    first prime is larger than the scale (room for the integer part); and the
    last (special) prime is at least as large as any other.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    poly_modulus_degree: int = 8192
    coeff_mod_bit_sizes: tuple[int, ...] = (60, 40, 40, 60)
    global_scale_bits: int = 40

    @field_validator("poly_modulus_degree")
    @classmethod
    def _degree(cls, value: int) -> int:
        if value <= 0 or value & (value - 1):
            raise ValueError(f"poly_modulus_degree must be a power of two, got {value}")
        if value not in _MAX_BITS_128:
            raise ValueError(f"poly_modulus_degree must be one of {sorted(_MAX_BITS_128)}, got {value}")
        return value

    @field_validator("global_scale_bits")
    @classmethod
    def _scale(cls, value: int) -> int:
        if not 20 <= value <= 60:
            raise ValueError(f"global_scale_bits must be in [20, 60], got {value}")
        return value

    @field_validator("coeff_mod_bit_sizes")
    @classmethod
    def _primes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) < 3:
            raise ValueError(f"coeff_mod_bit_sizes needs at least 3 primes (one rescale level for mean), got {value}")
        bad = [b for b in value if not 20 <= b <= 60]
        if bad:
            raise ValueError(f"coeff_mod_bit_sizes entries must be in [20, 60] bits, got {bad} in {value}")
        return value

    @model_validator(mode="after")
    def _combination(self) -> CkksParams:
        sizes = self.coeff_mod_bit_sizes
        budget = _MAX_BITS_128[self.poly_modulus_degree]
        if sum(sizes) > budget:
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes} total {sum(sizes)} bits, above the 128-bit-security maximum "
                f"of {budget} for poly_modulus_degree={self.poly_modulus_degree}"
            )
        inner = sizes[1:-1]
        if any(b != self.global_scale_bits for b in inner):
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes}: the inner primes {inner} must all equal "
                f"global_scale_bits={self.global_scale_bits} so that a rescale keeps the scale"
            )
        if sizes[0] <= self.global_scale_bits:
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes}: the first prime ({sizes[0]} bits) must exceed "
                f"global_scale_bits={self.global_scale_bits} to hold the integer part of results"
            )
        if sizes[-1] < max(sizes[:-1]):
            raise ValueError(
                f"coeff_mod_bit_sizes {sizes}: the last (special) prime ({sizes[-1]} bits) must be at least "
                f"as large as every other prime ({max(sizes[:-1])} bits)"
            )
        return self

    @property
    def slots(self) -> int:
        """Number of values packed in one ciphertext (``N / 2``)."""
        return self.poly_modulus_degree // 2

    @property
    def max_abs_value(self) -> float:
        """Largest magnitude that an (aggregated) value may have to decrypt correctly."""
        return float(2.0 ** (self.coeff_mod_bit_sizes[0] - self.global_scale_bits - 1))

    def n_chunks(self, length: int) -> int:
        """Number of ciphertexts needed for a flat vector of ``length`` values."""
        return max(1, math.ceil(length / self.slots))
