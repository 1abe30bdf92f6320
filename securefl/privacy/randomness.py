"""The one source of randomness for DP mechanisms: a CSPRNG keyed from OS entropy, never from the run's seed.

Why not the run's seed: it is in ``config.yaml``, ``run.json`` and the node reports, and on a deployment
the coordinator wrote it. Noise drawn from a generator seeded with it can be regenerated and subtracted
(recovering the clipped payload), two releases seeded alike cancel each other, and a predictable Poisson
sample voids amplification by subsampling. So every DP random value (Gaussian noise, Poisson sampling,
histogram noise) comes from a :class:`SecureRandom`: a ChaCha20 keystream (``cryptography``) under a
32-byte key from ``os.urandom``. It cannot be seeded, so nothing can replay it; a fresh instance per release
(and per field) is independent of every other. DP runs are therefore reproducible in distribution only;
everything non-private (initialisation, partitions, public subsets, non-private shuffles) stays seeded.

Uniforms carry 53 random bits (one per double mantissa); Gaussians come from the Box-Muller transform
(Box & Muller 1958). Caveat, as for Opacus and TF-Privacy without ``secure_mode``: floating-point Gaussian
samples are not a formally proven implementation of the continuous Gaussian (Mironov, CCS 2012).
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

__all__ = ["SecureRandom"]

_TWO_PI = 2.0 * math.pi
_2_POW_M53 = 2.0**-53


class SecureRandom:
    """Random values for DP releases, from ChaCha20 keyed by fresh OS entropy (the seed is known to the coordinator).

    Create one per release: ``SecureRandom().normal(shape, std=s)``. There is deliberately no seed argument.
    """

    def __init__(self) -> None:
        # 32-byte key, 16-byte nonce (ChaCha20's 4-byte counter + 12-byte nonce in ``cryptography``'s form).
        cipher = Cipher(algorithms.ChaCha20(os.urandom(32), os.urandom(16)), mode=None)
        self._stream = cipher.encryptor()

    def _words(self, n: int) -> np.ndarray:
        """``n`` uniformly random 64-bit words: the keystream, i.e. ChaCha20 applied to zeros."""
        return np.frombuffer(self._stream.update(bytes(8 * n)), dtype=np.uint64)

    def uniform(self, n: int) -> np.ndarray:
        """``n`` doubles uniform on [0, 1), each with 53 random bits."""
        return (self._words(n) >> np.uint64(11)).astype(np.float64) * _2_POW_M53

    def normal(self, shape: tuple[int, ...] | torch.Size, *, std: float = 1.0,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """A tensor of i.i.d. N(0, std²) values (computed in float64, then cast to ``dtype``)."""
        if not (math.isfinite(std) and std >= 0):
            raise ValueError(f"std must be a finite number >= 0, got {std!r}")
        n = math.prod(shape)
        half = (n + 1) // 2
        # The same float64 arithmetic in torch, in place: numpy's cos/sin and the temporaries cost 4x more, and
        # DP-SGD draws one value per parameter per step.
        u = torch.from_numpy((self._words(2 * half) >> np.uint64(11)).astype(np.float64)).mul_(_2_POW_M53)
        # u1 in (0, 1] so that log(u1) is finite; the tail is cut at sqrt(2·53·ln 2) ≈ 8.6 std.
        u1, u2 = u[:half].add_(_2_POW_M53), u[half:]
        radius = u1.log_().mul_(-2.0).sqrt_().mul_(std)
        angle = u2.mul_(_TWO_PI)
        out = torch.empty(2 * half, dtype=dtype)
        out[:half] = radius * torch.cos(angle)
        out[half:] = radius.mul_(torch.sin(angle))
        return out[:n].reshape(tuple(shape))

    def poisson_sample(self, n: int, *, sample_rate: float) -> torch.Tensor:
        """Indices of a Poisson sample of ``range(n)``: each record is in with probability ``sample_rate``,
        independently (the sampling DP-SGD's amplification assumes, and which the coordinator must not predict)."""
        if not (0.0 <= sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in [0, 1], got {sample_rate!r}")
        mask = self.uniform(n) < sample_rate
        return torch.from_numpy(np.flatnonzero(mask)).to(torch.long)
