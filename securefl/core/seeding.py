"""Seeding: every random stream of a run derives from (seed, purpose), never from one global RNG.

Only the non-private streams come from here (initialisation, shuffling, sampling of the cohort). DP noise,
Poisson sampling and masks draw from OS entropy (``securefl.privacy.randomness``).
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed for one purpose (e.g. ("init", party) or ("step", round, party)).

    Deriving every random stream from (seed, purpose) instead of threading one
    global RNG through the run makes a resumed run draw exactly what an
    uninterrupted one would, with no RNG state in the checkpoint.
    """
    digest = hashlib.sha256(repr((seed, *parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & ((1 << 63) - 1)


class seeded:
    """Seed torch's global RNG for one step, restoring the outer state afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self._fork = torch.random.fork_rng()
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
